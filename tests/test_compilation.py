"""Regional torch.compile of the SSL stages and their logit losses: same losses and gradients as eager, same checkpoints,
clear errors."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from dinov3_eo.losses.ibot import ibot_loss
from dinov3_eo.losses.sinkhorn import sinkhorn_knopp
from dinov3_eo.models.heads import DINOHead
from dinov3_eo.models.vit import Block
from dinov3_eo.ssl import compilation
from dinov3_eo.ssl.compilation import (
    LogitLosses,
    check_compile_toolchain,
    compile_logit_losses,
    compile_regions,
    is_compiled,
)
from dinov3_eo.ssl.distill import DINOv3Distill
from dinov3_eo.ssl.module import DINOv3Pretrain

MODEL_KW = dict(
    backbone="vitmicro16", dino_out_dim=256, dino_hidden_dim=128, dino_bottleneck_dim=64, ibot_out_dim=256,
    ibot_hidden_dim=128, ibot_bottleneck_dim=64, global_crop_size=64, local_crop_size=32, n_local_crops=2,
    base_lr=2e-3, scale_lr_with_batch=False, layerwise_decay=1.0,
)


def _batch(size: int = 4, side: int = 96) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(size, side, side, dtype=torch.bool)
    valid[0, :, : side // 3] = False  # some nodata, as a Landsat collar
    return {"image": torch.randn(size, 3, side, side, generator=g) * valid[:, None], "valid": valid}


def _regions(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if isinstance(m, (Block, DINOHead))]


def test_compile_regions_compiles_every_block_and_head_once_and_keeps_the_state_dict() -> None:
    module = DINOv3Pretrain(**MODEL_KW)
    keys = list(module.state_dict())
    n_blocks = len(module.student["backbone"].blocks)
    assert compile_regions(module) == 2 * n_blocks + 4  # student and teacher: blocks, DINO head, iBOT head
    assert all(is_compiled(m) for m in _regions(module))
    assert compile_regions(module) == 0  # a second fit compiles nothing new
    assert list(module.state_dict()) == keys  # in place: checkpoints and exports keep the official key names


def test_blocks_compile_with_static_shapes_and_heads_with_torch_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an H100 static block shapes ran at 0.83-1.07x the eager time, torch's shape-generic graphs at 1.37x."""
    seen: list[tuple[type, dict]] = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((type(self), kw)))
    with torch._dynamo.config.patch(recompile_limit=8):
        compile_regions(DINOv3Pretrain(**MODEL_KW))
        # each token count and train/eval mode is a graph: room for several resolutions and students
        assert torch._dynamo.config.recompile_limit == compilation.BLOCK_RECOMPILE_LIMIT
    assert {kind for kind, _ in seen} == {Block, DINOHead}
    assert all(kw == ({"dynamic": False} if kind is Block else {}) for kind, kw in seen)
    seen.clear()
    compile_regions(DINOv3Pretrain(**MODEL_KW), dynamic=True, mode="max-autotune")  # a caller's choice wins
    assert seen and all(kw == {"dynamic": True, "mode": "max-autotune"} for _, kw in seen)


@pytest.mark.slow
def test_a_compiled_block_and_head_match_eager_forward_and_backward() -> None:
    """Two crop sets of different lengths through one training-mode block, and a head: outputs and every gradient."""
    import copy

    from dinov3_eo.models.hub import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vitmicro16").train()
    prefix = 1 + backbone.n_storage_tokens
    for eager, grids in ((backbone.blocks[0], [(4, 4), (2, 2)]), (DINOHead(backbone.embed_dim, out_dim=64, hidden_dim=32,
                                                                           bottleneck_dim=16), None)):
        compiled = copy.deepcopy(eager)
        compile_regions(compiled)  # the block with static shapes: one graph per token count
        if grids is not None:
            xs = [torch.randn(4, prefix + h * w, backbone.embed_dim, requires_grad=True) for h, w in grids]
            args: tuple = (xs, [backbone._rope_table(h, w) for h, w in grids])
        else:
            xs = [torch.randn(6, backbone.embed_dim, requires_grad=True)]
            args = (xs[0],)
        results = []
        for module in (eager, compiled):
            for x in xs:
                x.grad = None
            out = module(*args)
            outs = out if isinstance(out, list) else [out]
            torch.autograd.backward(outs, [torch.ones_like(o) * torch.linspace(-1, 1, o.shape[-1]) for o in outs])
            results.append(([o.detach() for o in outs], [x.grad.clone() for x in xs],
                            {n: p.grad.clone() for n, p in module.named_parameters()}))
        (outs_e, xgrads_e, grads_e), (outs_c, xgrads_c, grads_c) = results
        for a, b in zip(outs_c + xgrads_c, outs_e + xgrads_e):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for name, grad in grads_e.items():
            torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_compiled_step_matches_eager_losses_and_gradients() -> None:
    torch.manual_seed(0)
    eager = DINOv3Pretrain(**MODEL_KW)
    compiled = DINOv3Pretrain(**MODEL_KW)
    compiled.load_state_dict(eager.state_dict())
    compile_regions(compiled)
    batch = _batch()
    results = []
    for module in (eager, compiled):
        module.train()
        torch.manual_seed(1)  # RoPE rescaling draws from the global generator, as in training_step
        losses = module.compute_losses(batch, step=3)
        losses["total"].backward()
        grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}
        results.append((losses, grads))
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = results
    assert set(eager_losses) == set(compiled_losses)
    for name, value in eager_losses.items():
        torch.testing.assert_close(compiled_losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert list(eager_grads) == list(compiled_grads)
    # Blocks and heads agree to 1e-5 on their own (test above); through the whole step the low-temperature softmaxes
    # and the tiny LayerScale (1e-5) turn float32 rounding into ~1 % differences in a few small feed-forward gradients
    # (eager on 1 vs 2 threads: 0.3 %). The gradient as a whole must agree far more closely: 6e-7 to 3e-5 over four
    # seeds of the RoPE draws (the rounding a draw meets varies), so 1e-4, a hundred times below a real difference
    eager_flat = torch.cat([g.flatten() for g in eager_grads.values()])
    compiled_flat = torch.cat([g.flatten() for g in compiled_grads.values()])
    assert ((compiled_flat - eager_flat).norm() / eager_flat.norm()).item() < 1e-4
    for name, grad in eager_grads.items():
        assert ((compiled_grads[name] - grad).norm() / grad.norm().clamp_min(1e-30)).item() < 5e-2, name


class _Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(trainer.callback_metrics["loss"]))


class _Tiles(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = _batch(1)
        return {"image": batch["image"][0] * (1 + 0.1 * i), "valid": batch["valid"][0]}


@pytest.mark.slow
def test_fit_with_compile_trains_the_gram_stage_with_checkpointing_and_its_checkpoint_loads_eagerly(tmp_path: Path) -> None:
    """``compile: true`` in a Lightning fit with an EMA Gram teacher (made by a deepcopy at fit start, compiled after)
    and activation checkpointing (compiled blocks re-run in the backward pass)."""
    kwargs = {**MODEL_KW, "gram_loss_weight": 1.0, "gram_teacher": "ema", "gram_teacher_scale": 1.5,
              "grad_checkpointing": True}
    module = DINOv3Pretrain(**kwargs, compile=True)
    losses = _Losses()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[losses, ckpt])
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    trainer.fit(module, torch.utils.data.DataLoader(_Tiles(), batch_size=4))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled regions really ran as graphs
    assert len(losses.values) == 3 and all(math.isfinite(v) for v in losses.values)
    assert module.gram_teacher is not None and all(is_compiled(b) for b in module.gram_teacher.blocks)
    assert all(is_compiled(m) for m in _regions(module))
    # the checkpoint of a compiled run resumes in an eager module: same keys, same weights
    eager = DINOv3Pretrain(**kwargs)
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    eager.on_fit_start()  # makes the Gram teacher, as fit does (compile is off: nothing compiled)
    eager.load_state_dict(state)
    assert not any(is_compiled(m) for m in _regions(eager))
    for name, value in module.state_dict().items():
        torch.testing.assert_close(eager.state_dict()[name], value)


@pytest.mark.slow
def test_fit_with_compiled_losses_alone_trains_and_its_checkpoint_keeps_the_mode(tmp_path: Path) -> None:
    torch._dynamo.reset()  # graphs of the same loss functions cached by an earlier test would hide this fit's
    module = DINOv3Pretrain(**MODEL_KW, compile="losses")
    losses = _Losses()
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[losses],
                        enable_checkpointing=False)
    from torch._dynamo.utils import counters

    graphs_before = counters["stats"]["unique_graphs"]
    trainer.fit(module, torch.utils.data.DataLoader(_Tiles(), batch_size=4))
    assert counters["stats"]["unique_graphs"] > graphs_before  # the compiled losses ran as graphs
    assert len(losses.values) == 2 and all(math.isfinite(v) for v in losses.values)
    assert not any(is_compiled(m) for m in _regions(module))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    restored = DINOv3Pretrain.load_from_checkpoint(tmp_path / "last.ckpt", map_location="cpu")
    assert restored.hparams.compile == "losses"


def test_distillation_compiles_teacher_students_and_their_emas(tmp_path: Path) -> None:
    heads = {k: v for k, v in MODEL_KW.items() if k.startswith(("dino_", "ibot_"))}
    pretrain = DINOv3Pretrain(backbone="vitmicro16", **heads)
    teacher = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": pretrain.state_dict(), "dinov3_eo": pretrain.backbone_meta().to_dict()}, teacher)
    module = DINOv3Distill(teacher=str(teacher), students=["vitmicro16", "vitmicro16"], head_hidden_dim=64,
                           head_bottleneck_dim=32, compile=True)
    module.on_fit_start()  # compilation itself is lazy: nothing is traced until the first step
    regions = _regions(module)
    assert len(regions) == 5 * (len(pretrain.teacher["backbone"].blocks) + 2)  # teacher, 2 students, 2 EMAs
    assert all(is_compiled(m) for m in regions)


def test_missing_toolchain_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compilation.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler .* set model.compile false"):
        check_compile_toolchain("cpu")
    monkeypatch.setattr(compilation.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        check_compile_toolchain("cuda")
    module = DINOv3Pretrain(**MODEL_KW, compile=True)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        module.on_fit_start()
    assert not any(is_compiled(m) for m in _regions(module))  # nothing half-compiled


def test_compile_is_an_option_of_both_stages_and_off_by_default() -> None:
    import inspect

    for cls in (DINOv3Pretrain, DINOv3Distill):
        assert inspect.signature(cls.__init__).parameters["compile"].default is False


def test_compile_losses_compiles_the_logit_losses_alone(tmp_path: Path) -> None:
    module = DINOv3Pretrain(**MODEL_KW, compile="losses")
    module.on_fit_start()
    assert not any(is_compiled(m) for m in _regions(module))
    assert module.logit_losses.sinkhorn_knopp is not sinkhorn_knopp and module.logit_losses.ibot_loss is not ibot_loss
    heads = {k: v for k, v in MODEL_KW.items() if k.startswith(("dino_", "ibot_"))}
    teacher = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": DINOv3Pretrain(backbone="vitmicro16", **heads).state_dict()}, teacher)
    distill = DINOv3Distill(teacher=str(teacher), students=["vitmicro16"], head_hidden_dim=64, head_bottleneck_dim=32,
                            compile="losses")
    distill.on_fit_start()
    assert not any(is_compiled(m) for m in _regions(distill)) and distill.logit_losses != LogitLosses()


@pytest.mark.parametrize("mode", ["blocks", 1, None, "true"])
def test_an_unknown_compile_mode_is_one_clear_error(mode: object) -> None:
    with pytest.raises(ValueError, match=r"compile must be false, true .* or 'losses'"):
        DINOv3Pretrain(**MODEL_KW, compile=mode)


def test_the_command_line_takes_every_compile_mode(capsys: pytest.CaptureFixture) -> None:
    from dinov3_eo.ssl.cli import pretrain_main

    config = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny_cpu.yaml"
    for value, printed in (("losses", "compile: losses"), ("true", "compile: true"), ("false", "compile: false")):
        with pytest.raises(SystemExit) as done:
            pretrain_main(["fit", "--config", str(config), "--model.compile", value, "--print_config"])
        assert done.value.code == 0 and f"\n  {printed}\n" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        pretrain_main(["fit", "--config", str(config), "--model.compile", "blocks", "--print_config"])
    assert done.value.code != 0


def test_compiled_logit_losses_match_eager_without_recompiling() -> None:
    """Sinkhorn and the iBOT loss compiled with dynamic shapes: the eager values and gradients for every masked-token
    count and teacher temperature a run feeds them, from one graph each (no recompilation per step)."""
    torch._dynamo.reset()
    compiled = compile_logit_losses()
    assert LogitLosses() == LogitLosses(sinkhorn_knopp, ibot_loss)  # eager unless a stage compiles
    gen = torch.Generator().manual_seed(0)
    # temperatures change between calls: a Python float that a compiled graph kept from its first call (as an op
    # parameter such as alpha= does with torch 2.14, pytorch/pytorch#197889) would show here
    for step, (tokens, temp, student_temp) in enumerate([(37, 0.04, 0.1), (52, 0.045, 0.11), (29, 0.05, 0.07)]):
        teacher = (torch.randn(tokens, 512, generator=gen) * 3).bfloat16()
        student = (torch.randn(tokens, 512, generator=gen) * 3).bfloat16().requires_grad_()
        weights = torch.rand(tokens, generator=gen)
        targets = sinkhorn_knopp(teacher, temp)
        torch.testing.assert_close(compiled.sinkhorn_knopp(teacher, temp), targets, rtol=1e-5, atol=1e-7)
        losses = [fn(student, targets, weights, 8, student_temp=student_temp) for fn in (ibot_loss, compiled.ibot_loss)]
        grads = [torch.autograd.grad(loss, student)[0].float() for loss in losses]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-5)  # bf16 gradients
        if step == 0:
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # the later shapes reuse the graphs


def test_a_compiled_stage_compiles_its_logit_losses() -> None:
    module = DINOv3Pretrain(**MODEL_KW, compile=True)
    assert module.logit_losses == LogitLosses()
    module.on_fit_start()
    compiled = module.logit_losses
    assert compiled.sinkhorn_knopp is not sinkhorn_knopp and compiled.ibot_loss is not ibot_loss
    module.on_fit_start()
    assert module.logit_losses is compiled  # a second fit keeps the compiled functions and their graphs
    assert DINOv3Pretrain(**MODEL_KW).logit_losses.ibot_loss is ibot_loss
