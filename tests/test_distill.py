"""Multi-student distillation: one teacher forward per step serves every student."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from meta_device import HostToDeviceCopies, UntracedTensors, allow_meta_autocast
from torch.utils.data import DataLoader, Dataset

from dinov3_eo.models.hub import export_backbone, load_backbone
from dinov3_eo.ssl.distill import DINOv3Distill, load_teacher_with_heads
from dinov3_eo.ssl.module import DINOv3Pretrain
from dinov3_eo.ssl.stage import ema_update_

HEADS = dict(dino_out_dim=128, dino_hidden_dim=64, dino_bottleneck_dim=32,
             ibot_out_dim=96, ibot_hidden_dim=64, ibot_bottleneck_dim=32)


class _Tiles(Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.randn(3, 64, 64, generator=g), "valid": torch.ones(64, 64, dtype=torch.bool)}


@pytest.fixture()
def teacher_ckpt(tmp_path: Path) -> Path:
    pretrain = DINOv3Pretrain(backbone="vitmicro16", **HEADS)
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": pretrain.state_dict(), "dinov3_eo": pretrain.backbone_meta().to_dict()}, path)
    return path


def test_teacher_heads_are_read_from_the_checkpoint(teacher_ckpt: Path) -> None:
    teacher = load_teacher_with_heads(str(teacher_ckpt))
    assert teacher["dino_head"].last_layer.out_features == 128
    assert teacher["ibot_head"].last_layer.out_features == 96
    assert not any(p.requires_grad for p in teacher.parameters())


def test_a_teacher_with_unit_norm_prototypes_scores_with_them(tmp_path: Path) -> None:
    pretrain = DINOv3Pretrain(backbone="vitmicro16", norm_last_layer=True, **HEADS)
    path = tmp_path / "normed.ckpt"
    torch.save({"state_dict": pretrain.state_dict(), "hyper_parameters": dict(pretrain.hparams)}, path)
    teacher = load_teacher_with_heads(str(path))
    assert teacher["dino_head"].norm_last_layer and teacher["ibot_head"].norm_last_layer
    x = torch.randn(3, pretrain.teacher["backbone"].embed_dim)
    torch.testing.assert_close(teacher["dino_head"](x), pretrain.teacher["dino_head"](x))


def test_backbone_only_teacher_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "bare.pth"
    torch.save(DINOv3Pretrain(backbone="vitmicro16", **HEADS).teacher["backbone"].state_dict(), path)
    with pytest.raises(KeyError, match="teacher heads"):
        load_teacher_with_heads(str(path))


def test_the_teacher_and_the_students_emas_stay_in_eval_mode(teacher_ckpt: Path) -> None:
    module = DINOv3Distill(teacher=str(teacher_ckpt), students=["vitmicro16"], head_hidden_dim=64,
                           head_bottleneck_dim=32)
    assert not module.students_ema.training and not module.teacher.training  # from construction
    module.eval()
    module.on_fit_start()  # as a fit starts: students train, teacher and EMAs do not
    assert all(m.training for m in module.students.modules())
    assert not any(m.training for m in (*module.students_ema.modules(), *module.teacher.modules()))


@pytest.mark.slow
def test_one_teacher_forward_per_step_serves_two_students(teacher_ckpt: Path, tmp_path: Path) -> None:
    module = DINOv3Distill(
        teacher=str(teacher_ckpt), students=["vitmicro16", "vitmicro16"], student_kwargs={},
        head_hidden_dim=64, head_bottleneck_dim=32, global_crop_size=32, local_crop_size=16, n_local_crops=2,
        base_lr=1e-3, scale_lr_with_batch=False, preview_every_n_steps=0,  # (a picture runs the teacher too)
    )
    calls = {"teacher": 0}
    original = module.teacher["backbone"].forward_features

    def counted(*args, **kwargs):
        calls["teacher"] += 1
        return original(*args, **kwargs)

    module.teacher["backbone"].forward_features = counted  # type: ignore[method-assign]
    before = [s["backbone"].norm.weight.clone() for s in module.students_ema]
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(_Tiles(), batch_size=4))
    assert calls["teacher"] == 3
    metrics = trainer.callback_metrics
    assert "loss/0_vitmicro16/dino" in metrics and "loss/1_vitmicro16/ibot" in metrics
    for ema, b in zip(module.students_ema, before):
        assert not torch.equal(ema["backbone"].norm.weight, b)  # each student has its own EMA, updated
    assert not any(k.startswith("teacher.") for k in module.state_dict())  # teacher stays out of checkpoints

    # students export in the official layout and load back
    out = tmp_path / "student0"
    export_backbone(module.students_ema[0]["backbone"], out, meta=module.student_meta(0))
    reloaded = load_backbone(str(out) + ".pth")
    torch.testing.assert_close(reloaded.state_dict()["norm.weight"], module.students_ema[0]["backbone"].norm.weight)


def test_a_distillation_step_never_reads_back_from_the_device(teacher_ckpt: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """As for pretraining (test_pretrain): on meta tensors any device-to-host read would raise."""
    allow_meta_autocast(monkeypatch)
    module = DINOv3Distill(
        teacher=str(teacher_ckpt), students=["vitmicro16", "vitmicro16"], student_kwargs={}, head_hidden_dim=64,
        head_bottleneck_dim=32, global_crop_size=32, local_crop_size=16, n_local_crops=2,
    )
    module._total_steps = lambda: 100  # type: ignore[method-assign]
    module.on_fit_start()
    module.to_empty(device="meta")
    image = torch.empty(4, 3, 64, 64, device="meta")
    with HostToDeviceCopies() as copies, UntracedTensors([*module.parameters(), *module.buffers(), image]) as untraced:
        losses = module.compute_losses({"image": image, "valid": None}, step=5)
        losses["total"].backward()
        ema_update_(module.students_ema.parameters(), module.students.parameters(), 0.99)
    assert copies.copies and not copies.blocking
    assert untraced.ops == []


def test_triton_logit_kernels_give_the_same_distillation_losses(teacher_ckpt: Path) -> None:
    """One teacher's factorised iBOT targets serve every student; the kernels run in Triton's interpreter here."""
    from dinov3_eo.losses import logit_kernels

    if not logit_kernels._interpreting():
        pytest.skip("needs triton in its interpreter (TRITON_INTERPRET=1 before triton is imported)")
    batch = {"image": torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3)), "valid": None}
    results = []
    for kernels in ("torch", "triton"):
        torch.manual_seed(0)
        module = DINOv3Distill(
            teacher=str(teacher_ckpt), students=["vitmicro16", "vitmicro16"], head_hidden_dim=64,
            head_bottleneck_dim=32, global_crop_size=32, local_crop_size=16, n_local_crops=2, logit_kernels=kernels,
        )
        module._total_steps = lambda: 100  # type: ignore[method-assign]  # schedules need a length outside a Trainer
        module.on_fit_start()
        results.append({k: v.detach() for k, v in module.compute_losses(batch, step=2).items()})
    assert results[0].keys() == results[1].keys() and len(results[0]) == 7  # 2 students x 3 terms, and the total
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_a_missing_teacher_says_which_file_and_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"teacher '.*missing\.ckpt' does not exist: give a pretraining "
                                               r"checkpoint with --model\.teacher"):
        load_teacher_with_heads(str(tmp_path / "missing.ckpt"))
