"""End-to-end DINOv3 pretraining on real Landsat-8 tiles (the bundled sample), on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from meta_device import HostToDeviceCopies, UntracedTensors, allow_meta_autocast

from dinov3_eo.data.datamodule import PretrainDataModule
from dinov3_eo.models.hub import load_backbone
from dinov3_eo.ssl.module import DINOv3Pretrain, NonFiniteLossError
from dinov3_eo.ssl.schedules import clip_grad_norm_per_module
from dinov3_eo.ssl.stage import LossReadback

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"

MODEL_KW = dict(
    backbone="vitmicro16",
    dino_out_dim=256,
    dino_hidden_dim=128,
    dino_bottleneck_dim=64,
    ibot_out_dim=256,
    ibot_hidden_dim=128,
    ibot_bottleneck_dim=64,
    global_crop_size=64,
    local_crop_size=32,
    n_local_crops=2,
    base_lr=2e-3,
    scale_lr_with_batch=False,
    lr_warmup_steps=5,
    teacher_temp_warmup_steps=10,
    momentum_teacher=0.99,
    layerwise_decay=1.0,
)


def _datamodule(tmp_path: Path, steps_per_epoch: int = 8, batch_size: int = 8) -> PretrainDataModule:
    return PretrainDataModule(
        paths=str(SAMPLE), nodata=0, normalization="percentile", tile_size=96,
        tiles_per_epoch=steps_per_epoch * batch_size, batch_size=batch_size, cache_dir=str(tmp_path / "cache"),
    )


class _RecordLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("loss")}
        self.losses.append(metrics)


def _trainer(tmp_path: Path, max_steps: int, callbacks: list, *, log_every_n_steps: int | None = None) -> L.Trainer:
    """A CPU trainer; with ``log_every_n_steps``, a CSV logger writing that often (else no logger)."""
    from lightning.pytorch.loggers import CSVLogger

    logger = False if log_every_n_steps is None else CSVLogger(tmp_path / "logs", name="", version="")
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=logger, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=callbacks,
        log_every_n_steps=log_every_n_steps or 50,
    )


@pytest.mark.slow
def test_pretrain_losses_finite_and_decreasing(tmp_path: Path) -> None:
    L.seed_everything(0)
    record = _RecordLosses()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=12)
    module = DINOv3Pretrain(**MODEL_KW)
    _trainer(tmp_path, 36, [record, ckpt], log_every_n_steps=1).fit(module, datamodule=_datamodule(tmp_path))
    assert len(record.losses) == 36
    for step in record.losses:
        for name in ("loss", "loss/dino_global", "loss/dino_local", "loss/ibot", "loss/koleo"):
            assert math.isfinite(step[name]), (name, step)
    first = sum(s["loss"] for s in record.losses[:6]) / 6
    last = sum(s["loss"] for s in record.losses[-6:]) / 6
    assert last < first, (first, last)

    # the checkpoint carries the data metadata and exports a loadable backbone
    last_ckpt = tmp_path / "ckpt" / "last.ckpt"
    payload = torch.load(last_ckpt, map_location="cpu", weights_only=True)
    meta = payload["dinov3_eo"]
    assert meta["bands"] is not None and len(meta["bands"]) == 3
    assert meta["normalization"]["name"] == "percentile"
    backbone = load_backbone(str(last_ckpt))
    assert backbone.meta.normalization == meta["normalization"]
    teacher_state = {k[len("teacher.backbone."):]: v for k, v in payload["state_dict"].items()
                     if k.startswith("teacher.backbone.")}
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, teacher_state[key])


class _Kill(Callback):
    """Simulates a kill: the process dies before training step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_kill_and_resume_reproduces_losses(tmp_path: Path) -> None:
    steps_per_epoch, total, kill_at = 4, 10, 6  # killed mid-epoch, last checkpoint after step 6
    L.seed_everything(0)
    full = _RecordLosses()
    _trainer(tmp_path / "a", total, [full]).fit(
        DINOv3Pretrain(**MODEL_KW), datamodule=_datamodule(tmp_path, steps_per_epoch)
    )

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "b" / "ckpt", save_last=True, every_n_train_steps=2)
    with pytest.raises(BaseException):
        _trainer(tmp_path / "b", total, [ckpt, _Kill(kill_at)]).fit(
            DINOv3Pretrain(**MODEL_KW), datamodule=_datamodule(tmp_path, steps_per_epoch)
        )
    L.seed_everything(123)  # a different global seed: the resumed run must not depend on it
    resumed = _RecordLosses()
    _trainer(tmp_path / "b", total, [resumed]).fit(
        DINOv3Pretrain(**MODEL_KW), datamodule=_datamodule(tmp_path, steps_per_epoch),
        ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"),
    )
    assert len(resumed.losses) == total - kill_at
    for a, b in zip(full.losses[kill_at:], resumed.losses):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)


def test_non_finite_loss_stops_with_clear_error(tmp_path: Path) -> None:
    module = DINOv3Pretrain(**MODEL_KW)
    optimizer = module.configure_optimizers()
    batch = {"image": torch.full((2, 3, 96, 96), float("nan")), "valid": torch.ones(2, 96, 96, dtype=torch.bool)}
    loss = module.training_step(batch, 0)  # returned for the backward: the guard reads the values afterwards
    assert not torch.isfinite(loss)
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at step 0 in .*ibot"):
        module.on_before_optimizer_step(optimizer)
    module.on_before_optimizer_step(optimizer)  # nothing pending any more: a step outside training_step passes


def test_loss_readback_gives_the_values_as_float32_cpu_tensors() -> None:
    losses = {"total": torch.tensor(3.5, dtype=torch.bfloat16, requires_grad=True) * 1, "ibot": torch.tensor(1.25)}
    values = LossReadback(losses).values()
    assert list(values) == ["total", "ibot"]
    for value in values.values():
        assert value.dtype == torch.float32 and value.device.type == "cpu" and not value.requires_grad
    assert [float(v) for v in values.values()] == [3.5, 1.25]


class _PoisonBatch(Callback):
    """Fills training step ``at``'s images with NaN and keeps the weights it starts from."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            batch["image"].fill_(float("nan"))
            self.before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_a_non_finite_loss_in_a_fit_stops_before_the_weights_change(tmp_path: Path) -> None:
    """The guard runs after the backward (so the device is never left waiting on the host), and still stops the fit
    before clipping, the optimiser step and the EMA: the weights stay those the bad step started from, and the last
    checkpoint (two steps earlier) is whole and finite."""
    L.seed_everything(0)
    poison = _PoisonBatch(at=3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2)
    module = DINOv3Pretrain(**MODEL_KW)
    with pytest.raises(NonFiniteLossError, match="Non-finite loss at step 3 "):
        _trainer(tmp_path, 6, [poison, ckpt]).fit(module, datamodule=_datamodule(tmp_path, batch_size=2))
    after = module.state_dict()
    assert poison.before and after.keys() == poison.before.keys()
    for key, value in poison.before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    payload = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert payload["global_step"] == 2
    assert all(bool(torch.isfinite(v).all()) for v in payload["state_dict"].values() if v.is_floating_point())


def test_schedules_follow_the_recipe() -> None:
    module = DINOv3Pretrain(**{**MODEL_KW, "lr_warmup_steps": 10, "teacher_temp_warmup_steps": 10})
    module._total_steps = lambda: 100  # type: ignore[method-assign]
    start, warm, end = module.schedule_values(0), module.schedule_values(9), module.schedule_values(100)
    assert start["lr"] == 0.0 and warm["lr"] == pytest.approx(2e-3)
    assert end["lr"] == pytest.approx(1e-6)
    assert start["teacher_temp"] == pytest.approx(0.04) and warm["teacher_temp"] == pytest.approx(0.07)
    assert start["momentum"] == pytest.approx(0.99) and end["momentum"] == pytest.approx(1.0)


def test_gram_stage_refresh_schedule_and_high_res_sizes() -> None:
    module = DINOv3Pretrain(
        **{**MODEL_KW, "gram_loss_weight": 2.0, "gram_teacher": "ema", "gram_first_update": 4,
           "gram_update_every": 2, "gram_max_updates": 2}
    )
    module.on_fit_start()
    assert module.gram_teacher is not None
    fired = []
    for step in range(12):
        before = int(module.gram_updates)
        with torch.no_grad():
            module.teacher["backbone"].norm.weight.add_(1.0)  # make refreshes observable
        module._maybe_refresh_gram_teacher(step)
        if int(module.gram_updates) > before:
            fired.append(step)
            torch.testing.assert_close(module.gram_teacher.norm.weight, module.teacher["backbone"].norm.weight)
    assert fired == [3, 5]  # (step+1) >= 4, (step+1) % 2 == 0, at most 2 refreshes
    assert module.crop_sizes(0) == (64, 32, 128)  # Gram teacher at 2x

    highres = DINOv3Pretrain(
        **{**MODEL_KW, "gram_loss_weight": 1.5, "gram_teacher": "ema",
           "resolutions": [[64, 32, 96, 0.5], [96, 48, 144, 0.5]]}
    )
    drawn = {highres.crop_sizes(s) for s in range(40)}
    assert drawn == {(64, 32, 96), (96, 48, 144)}
    assert highres.crop_sizes(7) == highres.crop_sizes(7)  # same on every rank: a function of the step


def test_init_from_a_mismatched_stage_names_the_keys(tmp_path: Path) -> None:
    previous = DINOv3Pretrain(**MODEL_KW)
    path = tmp_path / "previous.ckpt"
    torch.save({"state_dict": previous.state_dict()}, path)
    with pytest.raises(KeyError, match=r"shape checkpoint vs model \['student.dino_head.last_layer.weight \(256, 64\)"):
        DINOv3Pretrain(**{**MODEL_KW, "dino_out_dim": 512, "init_from": str(path)})
    resumed = DINOv3Pretrain(**{**MODEL_KW, "init_from": str(path)})
    torch.testing.assert_close(resumed.teacher["dino_head"].last_layer.weight, previous.teacher["dino_head"].last_layer.weight)
    # same shapes, other meaning: unit-norm prototypes must not be read as raw ones (or the other way round)
    normed = tmp_path / "normed.ckpt"
    torch.save({"state_dict": previous.state_dict(), "hyper_parameters": {**MODEL_KW, "norm_last_layer": True}}, normed)
    with pytest.raises(ValueError, match="trained with norm_last_layer=True, this model has norm_last_layer=False"):
        DINOv3Pretrain(**{**MODEL_KW, "init_from": str(normed)})
    assert DINOv3Pretrain(**{**MODEL_KW, "norm_last_layer": True, "init_from": str(normed)}).hparams.norm_last_layer


def test_bf16_mixed_precision_steps_run(tmp_path: Path) -> None:
    """Lightning's bf16-mixed autocast (the GPU configs' precision) around a full step: crops stay float32."""
    module = DINOv3Pretrain(**MODEL_KW)
    recorder = _RecordLosses()
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", precision="bf16-mixed", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[recorder],
    )
    trainer.fit(module, datamodule=_datamodule(tmp_path, steps_per_epoch=2, batch_size=4))
    assert trainer.global_step == 2
    assert all(math.isfinite(v) for step in recorder.losses for v in step.values())
    assert next(module.student.parameters()).dtype == torch.float32  # master weights stay float32


class _Modes(Callback):
    """Records every submodule's training flag at the first training step."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self.modes = {name: m.training for name, m in pl_module.named_modules() if name}


def test_fit_trains_the_student_with_the_teachers_in_eval_mode(tmp_path: Path) -> None:
    """The EMA and Gram teachers make targets in eval mode (no drop-path, no RoPE rescaling), the student trains,
    whatever mode the module was left in; Lightning's generic eval-mode warning does not reach users."""
    import warnings

    assert not DINOv3Pretrain(**MODEL_KW).teacher.training  # from construction, not only after train()
    module = DINOv3Pretrain(**MODEL_KW, gram_loss_weight=1.0, gram_teacher="ema",
                            backbone_kwargs={"drop_path_rate": 0.2})
    module.eval()  # e.g. after evaluating it: fit must still train the student
    modes = _Modes()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path),
                            callbacks=[modes])
        trainer.fit(module, datamodule=_datamodule(tmp_path, steps_per_epoch=1, batch_size=4))
    teachers = {n: t for n, t in modes.modes.items() if n.startswith(("teacher", "gram_teacher"))}
    students = {n: t for n, t in modes.modes.items() if n.startswith("student")}
    assert any(n.startswith("gram_teacher") for n in teachers) and not any(teachers.values())
    assert students and all(students.values())
    assert not [w for w in caught if "eval mode" in str(w.message)], [str(w.message) for w in caught]


def test_short_run_options_reach_both_heads_and_the_backbone() -> None:
    module = DINOv3Pretrain(**{**MODEL_KW, "norm_last_layer": True, "backbone_kwargs": {"layerscale_init": 0.1}})
    for part in (module.student, module.teacher):
        assert part["dino_head"].norm_last_layer and part["ibot_head"].norm_last_layer
        gamma = part["backbone"].blocks[0].ls1.gamma
        torch.testing.assert_close(gamma, torch.full_like(gamma, 0.1))
    assert not DINOv3Pretrain(**MODEL_KW).student["dino_head"].norm_last_layer  # the official default stays


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs" / "pretrain").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_pretrain_config_names_real_options(config: Path) -> None:
    import inspect

    import yaml

    from dinov3_eo.data.datamodule import PretrainDataModule

    parsed = yaml.safe_load(config.read_text())
    for section, cls in (("model", DINOv3Pretrain), ("data", PretrainDataModule)):
        unknown = set(parsed.get(section) or {}) - set(inspect.signature(cls.__init__).parameters)
        assert not unknown, f"{config.name}: {section} keys {sorted(unknown)} are not {cls.__name__} options"


def test_fully_valid_batches_leave_their_mask_on_the_host() -> None:
    """A batch without nodata is told before the transfer, where it is free; its crops skip the mask work and the
    losses are those of the same batch with its (all-True) mask."""
    module = DINOv3Pretrain(**MODEL_KW)
    image = torch.randn(2, 3, 64, 64)
    full = {"image": image, "valid": torch.ones(2, 64, 64, dtype=torch.bool)}
    partial = {"image": image, "valid": full["valid"].clone()}
    partial["valid"][0, :10] = False
    sent = module.on_before_batch_transfer(full, 0)
    assert sent["valid"] is None and full["valid"] is not None  # the caller's batch is not changed
    assert module.on_before_batch_transfer(partial, 0)["valid"] is partial["valid"]
    assert module.on_before_batch_transfer({"image": image}, 0).keys() == {"image"}
    module.train()
    losses = []
    for batch in (full, sent):
        torch.manual_seed(0)  # model-internal randomness, as training_step seeds it
        losses.append(module.compute_losses(batch, step=3))
    with_mask, without = losses
    for key in with_mask:
        torch.testing.assert_close(with_mask[key], without[key])


@pytest.mark.parametrize("stage", ["pretrain", "gram"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_an_ssl_step_never_reads_back_from_the_device(monkeypatch: pytest.MonkeyPatch, stage: str,
                                                      with_mask: bool) -> None:
    """On meta tensors (a stand-in for a GPU) every device-to-host read raises. Views, losses, backward, clipping and
    EMA queue their work without one, and without a blocking host-to-device copy: either would stall the GPU queue
    every step (the loss guard's one read per step, waited for in ``on_before_optimizer_step`` once the backward is
    queued, is the only, deliberate, sync)."""
    allow_meta_autocast(monkeypatch)
    extra = {"gram_loss_weight": 1.0, "gram_teacher": "ema"} if stage == "gram" else {}
    module = DINOv3Pretrain(**MODEL_KW, **extra)
    module._total_steps = lambda: 100  # type: ignore[method-assign]
    module.on_fit_start()
    module.to_empty(device="meta")
    batch = {"image": torch.empty(4, 3, 96, 96, device="meta"),
             "valid": torch.empty(4, 96, 96, dtype=torch.bool, device="meta") if with_mask else None}
    inputs = [*module.parameters(), *module.buffers(), *(t for t in batch.values() if t is not None)]
    with HostToDeviceCopies() as copies, UntracedTensors(inputs) as untraced:
        losses = module.compute_losses(batch, step=5)
        assert ("gram" in losses) == (stage == "gram")
        losses["total"].backward()
        module.clip_gradients_per_module()
        module._ema_update(0.99)
    # the crops' decisions and the iBOT masks, each in one copy that does not wait for the device
    assert len(copies.copies) == 2 and not copies.blocking
    assert untraced.ops == []  # and no tensor made from host data behind the dispatcher (a list index, say)


def test_clipping_and_ema_walk_parameter_lists_made_once_per_fit() -> None:
    """The step's clipping and EMA update use parameter lists made on their first use in a fit (listing the module
    trees is host time in every step), with the values the module walk gives, and a new fit lists them again (a
    strategy may have replaced the parameters in between)."""
    import copy

    module = DINOv3Pretrain(**MODEL_KW)
    module.on_fit_start()
    reference = copy.deepcopy(module)
    for m in (module, reference):
        for i, p in enumerate(m.student.parameters()):
            p.grad = torch.full_like(p, 0.1 * (i % 7 + 1))
    norms = module.clip_gradients_per_module()
    expected = clip_grad_norm_per_module(dict(reference.student.items()), 3.0)
    assert set(norms) == set(expected) == {"backbone", "dino_head", "ibot_head"}
    for name in norms:
        torch.testing.assert_close(norms[name], expected[name])
    for p, q in zip(module.student.parameters(), reference.student.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert module.clip_gradients_per_module().keys() == norms.keys()  # from the lists made once
    module._ema_update(0.5)
    first = [t.clone() for t in module.teacher.parameters()]
    old_teacher = module.teacher
    module.teacher = copy.deepcopy(module.teacher)  # as a strategy wrapping the modules would
    module.on_fit_start()
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(1.0)
    module._ema_update(0.5)
    for before, now, old in zip(first, module.teacher.parameters(), old_teacher.parameters()):
        assert not torch.equal(before, now)  # the new teacher moved
        assert torch.equal(before, old)  # the one the first lists held did not


def test_a_fit_logs_every_value_on_the_steps_a_logger_writes(tmp_path: Path) -> None:
    """Every loss term, schedule value and gradient norm on the steps the logger writes (every 3rd here), with their
    values from those steps; between them only the progress bar's loss and what a callback monitors, since Lightning
    would drop the rest (each ``self.log`` costs the host about a millisecond)."""
    import csv

    logged: list[tuple[int, str]] = []
    module = DINOv3Pretrain(**MODEL_KW)
    log = module.log

    def spy(name: str, value: object, **kwargs: object) -> None:  # log_dict calls it for each value too
        logged.append((module.global_step, name))
        log(name, value, **kwargs)

    module.log = spy  # type: ignore[method-assign]
    monitor = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="loss/ibot", every_n_train_steps=100)
    L.seed_everything(0)
    _trainer(tmp_path, 7, [monitor], log_every_n_steps=3).fit(module, datamodule=_datamodule(tmp_path))
    by_step: dict[int, set[str]] = {}
    for step, name in logged:
        by_step.setdefault(step, set()).add(name)
    everything = {"loss", "loss/dino_global", "loss/dino_local", "loss/ibot", "loss/koleo", "sched/lr", "sched/momentum",
                  "sched/teacher_temp", "sched/weight_decay", "grad_norm/backbone", "grad_norm/dino_head",
                  "grad_norm/ibot_head"}  # fmt: skip
    for step in range(7):
        assert by_step[step] == (everything if (step + 1) % 3 == 0 else {"loss", "loss/ibot"}), step
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["step"]) for row in rows if row.get("grad_norm/backbone")] == [2, 5]


def test_clipping_knows_a_sharding_strategy() -> None:
    """Under Lightning's FSDPStrategy the clipping sums the shards' norms over the processes
    (tests/test_clip_distributed.py); under DDP, or outside a fit, every process holds whole gradients."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    module = DINOv3Pretrain(**MODEL_KW)
    assert module._gradients_sharded() is False
    for strategy, sharded in ((FSDPStrategy(), True), (DDPStrategy(), False)):
        module._trainer = SimpleNamespace(strategy=strategy)
        assert module._gradients_sharded() is sharded


def test_a_training_step_logs_host_values_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything a step logs is a CPU tensor read in the guard's one device-to-host copy: Lightning reads a logged
    progress-bar tensor back at every batch end (every logged tensor at a logger flush) and copies logged Python
    numbers to the device, each a GPU sync. The values are logged once the backward is queued, before the optimiser
    step; accumulated micro-batches log their mean."""
    module = DINOv3Pretrain(**MODEL_KW, gram_loss_weight=1.0, gram_teacher="ema")
    module._total_steps = lambda: 100  # type: ignore[method-assign]
    module.on_fit_start()
    optimizer = module.configure_optimizers()
    logged: dict = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kwargs: logged.__setitem__(name, value))
    monkeypatch.setattr(module, "log_dict", lambda values, **kwargs: logged.update(values))
    losses = [module.training_step({"image": torch.randn(2, 3, 64, 64), "valid": None}, i) for i in range(2)]
    assert all(loss.requires_grad for loss in losses) and logged == {}
    module.on_before_optimizer_step(optimizer)
    expected = {"loss", "loss/dino_global", "loss/ibot", "loss/koleo", "loss/gram", "sched/lr", "sched/gram_weight"}
    assert expected <= set(logged)
    for name, value in logged.items():
        assert isinstance(value, torch.Tensor) and value.device.type == "cpu" and not value.requires_grad, name
    assert float(logged["loss"]) == pytest.approx(sum(float(loss.detach()) for loss in losses) / 2)
