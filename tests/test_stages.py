"""Stage chaining pretrain → gram → highres → export through the real ``dinov3-eo`` CLI on the bundled Landsat-8 sample.

What the chain must guarantee (issue 5): every stage starts from the previous stage's weights with a fresh step
counter, the Gram stage's Gram teacher is the EMA teacher it was handed (or the previous stage's checkpoint in
high-res adaptation), the Gram term is logged and finite, high-res adaptation draws several resolutions with a
1.5× Gram-teacher view, and the last checkpoint exports to a backbone ``load_backbone`` reads.

Interpolation of the Gram teacher's features onto the student grid against a known linear field is already proven
in ``tests/test_losses.py::TestResizePatchFeatures`` and is not repeated here.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from dinov3_eo import cli
from dinov3_eo.models.hub import load_backbone
from dinov3_eo.ssl import module as module_file
from dinov3_eo.ssl.module import DINOv3Pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

#: smaller heads and fewer local crops than the tiny configs, identical in every stage (init_from checks shapes)
SMALL = [
    "--model.dino_out_dim", "256", "--model.ibot_out_dim", "256",
    "--model.dino_hidden_dim", "64", "--model.ibot_hidden_dim", "64",
    "--model.n_local_crops", "2",
    "--data.batch_size", "4", "--data.tiles_per_epoch", "16", "--data.stats_windows", "8",
]
SMALL_MODEL = dict(
    backbone="vitmicro16", dino_out_dim=256, ibot_out_dim=256, dino_hidden_dim=64, ibot_hidden_dim=64,
    dino_bottleneck_dim=64, ibot_bottleneck_dim=64, n_local_crops=2, global_crop_size=64, local_crop_size=32,
)


def _overrides(root: Path, steps: int) -> Path:
    """A second --config: CSV metrics, one checkpoint at the last step, no progress bar, all under ``root``."""
    config = {
        "trainer": {
            "max_steps": steps,
            "log_every_n_steps": 1,
            "default_root_dir": str(root),
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root), "name": "logs"}},
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "ckpt"), "save_last": True,
                                         "every_n_train_steps": steps}}],
        }
    }
    path = root / "overrides.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def _run_stage(stage: str, root: Path, steps: int, cache: Path, *extra: str) -> Path:
    argv = [stage, "fit", "--config", str(CONFIGS / stage / "tiny_cpu.yaml"), "--config", str(_overrides(root, steps)),
            "--data.cache_dir", str(cache), *SMALL, *extra]
    assert cli.main(argv) == 0
    last = root / "ckpt" / "last.ckpt"
    assert last.is_file(), f"{stage}: no last.ckpt written"
    return last


def _metrics(root: Path) -> list[dict[str, float]]:
    """Rows of the CSV logger's metrics.csv, empty cells dropped."""
    (path,) = root.glob("logs/version_*/metrics.csv")
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=0, atol=0, msg=lambda m, k=key: f"{k}: {m}")


class _Probe:
    """Records what each stage starts from and which crop sizes it draws (instrumenting the real classes)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.starts: list[dict[str, Any]] = []
        self.views: list[dict[str, Any]] = []
        on_fit_start, make_views = DINOv3Pretrain.on_fit_start, module_file.make_views
        probe = self

        def recording_on_fit_start(model: DINOv3Pretrain) -> None:
            on_fit_start(model)
            probe.starts.append({
                "global_step": model.global_step,
                "student": {k: v.detach().clone() for k, v in model.student.state_dict().items()},
                "teacher": {k: v.detach().clone() for k, v in model.teacher.state_dict().items()},
                "gram_teacher": None if model.gram_teacher is None
                else {k: v.detach().clone() for k, v in model.gram_teacher.state_dict().items()},
            })

        def recording_make_views(images: torch.Tensor, valid: Any, **kwargs: Any) -> Any:
            crops, masking = make_views(images, valid, **kwargs)
            probe.views.append({
                "global": tuple(crops["global_crops"].shape[-2:]),
                "gram": tuple(crops["gram_crops"].shape[-2:]) if "gram_crops" in crops else None,
            })
            return crops, masking

        monkeypatch.setattr(DINOv3Pretrain, "on_fit_start", recording_on_fit_start)
        monkeypatch.setattr(module_file, "make_views", recording_make_views)


@pytest.mark.slow
def test_pretrain_gram_highres_export_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    probe = _Probe(monkeypatch)
    cache = tmp_path / "cache"

    # 1. pretraining, without Lightning's warnings about choices made on purpose (a user would read them as mistakes)
    pre_steps = 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pre_ckpt = _run_stage("pretrain", tmp_path / "pretrain", pre_steps, cache)
    noise = ("validation_step", "on_before_batch_transfer", "LeafSpec", "module(s) in eval mode")
    assert not [str(w.message) for w in caught if any(n in str(w.message) for n in noise)]
    pre = torch.load(pre_ckpt, map_location="cpu", weights_only=True)
    assert pre["global_step"] == pre_steps
    assert not any(k.startswith("gram_teacher.") for k in pre["state_dict"])
    assert all(v["gram"] is None for v in probe.views)

    # 2. Gram anchoring from the pretraining checkpoint; Gram teacher = EMA snapshot, refreshed after step 2
    gram_steps = 3
    n_views = len(probe.views)
    gram_ckpt = _run_stage(
        "gram", tmp_path / "gram", gram_steps, cache, "--model.init_from", str(pre_ckpt),
        "--data.tile_size", "96", "--model.gram_first_update", "2", "--model.gram_update_every", "2",
        "--model.gram_max_updates", "1",
    )
    start = probe.starts[1]
    assert start["global_step"] == 0
    _assert_same(start["student"], _prefixed(pre["state_dict"], "student."))
    _assert_same(start["teacher"], _prefixed(pre["state_dict"], "teacher."))
    # the Gram teacher is a snapshot of the EMA teacher handed over by pretraining
    _assert_same(start["gram_teacher"], _prefixed(pre["state_dict"], "teacher.backbone."))
    gram = torch.load(gram_ckpt, map_location="cpu", weights_only=True)
    assert gram["global_step"] == gram_steps  # not pre_steps + gram_steps: the counter restarted
    assert int(gram["state_dict"]["gram_updates"]) == 1  # refresh fired once (after step index 1)
    # after the refresh the Gram teacher was the EMA teacher of step 2; one more EMA step then moved the teacher
    assert any(not torch.equal(gram["state_dict"][f"gram_teacher.{k}"], v)
               for k, v in start["gram_teacher"].items())
    assert probe.views[n_views:] == [{"global": (64, 64), "gram": (128, 128)}] * gram_steps  # 2x teacher view
    rows = [r for r in _metrics(tmp_path / "gram") if "loss/gram" in r]
    assert [int(r["step"]) for r in rows] == list(range(gram_steps))
    assert all(math.isfinite(r["loss/gram"]) and r["loss/gram"] > 0 for r in rows)
    # cosine ramp of the Gram weight from 0 to 2.0 (the config's 20 ramp steps are clamped to this 3-step run)
    weights = [r["sched/gram_weight"] for r in _metrics(tmp_path / "gram") if "sched/gram_weight" in r]
    assert weights[0] == 0.0 and 0 < weights[1] < weights[2] <= 2.0

    # 3. high-resolution adaptation from the Gram checkpoint, fixed Gram teacher = that checkpoint's EMA teacher
    hr_steps = 3
    n_views = len(probe.views)
    hr_ckpt = _run_stage(
        "highres", tmp_path / "highres", hr_steps, cache, "--model.init_from", str(gram_ckpt),
        "--model.gram_teacher", str(gram_ckpt), "--data.tile_size", "144", "--model.koleo_group_size", "4",
    )
    start = probe.starts[2]
    assert start["global_step"] == 0
    _assert_same(start["student"], _prefixed(gram["state_dict"], "student."))
    _assert_same(start["gram_teacher"], _prefixed(gram["state_dict"], "teacher.backbone."))
    hr = torch.load(hr_ckpt, map_location="cpu", weights_only=True)
    assert hr["global_step"] == hr_steps
    drawn = probe.views[n_views:]
    assert len({v["global"] for v in drawn}) > 1, drawn  # several resolutions in 3 steps (seed 0)
    for view in drawn:
        assert view["gram"][0] == round(1.5 * view["global"][0])  # 1.5x Gram teacher in high-res adaptation
    hr_rows = [r for r in _metrics(tmp_path / "highres") if "loss/gram" in r]
    assert len(hr_rows) == hr_steps and all(math.isfinite(r["loss/gram"]) for r in hr_rows)
    # the band/normalisation metadata travelled through all three stages
    assert hr["dinov3_eo"]["bands"] == pre["dinov3_eo"]["bands"]
    assert hr["dinov3_eo"]["normalization"] == pre["dinov3_eo"]["normalization"]

    # 4. export the final teacher backbone and read it back
    prefix = tmp_path / "export" / "vitmicro16_highres"
    assert cli.main(["export", str(hr_ckpt), "-o", str(prefix)]) == 0
    exported = load_backbone(str(prefix) + ".pth")
    assert exported.meta.name == "vitmicro16" and exported.meta.in_chans == 3
    assert exported.meta.bands == pre["dinov3_eo"]["bands"]
    _assert_same(exported.state_dict(), _prefixed(hr["state_dict"], "teacher.backbone."))
    with torch.no_grad():
        features = exported.forward_features(torch.randn(1, 3, 64, 64))
    assert features["x_norm_patchtokens"].shape == (1, 16, exported.embed_dim)


# ---------------------------------------------------------------------------------------------- fast unit checks


def _saved_stage(tmp_path: Path, **kwargs: Any) -> tuple[Path, DINOv3Pretrain]:
    """A Lightning-style checkpoint of a module whose student and teacher differ (as after any training)."""
    torch.manual_seed(0)
    source = DINOv3Pretrain(**SMALL_MODEL, **kwargs)
    with torch.no_grad():
        for p in source.student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "stage.ckpt"
    torch.save({"state_dict": source.state_dict(), "global_step": 123,
                "dinov3_eo": {"bands": ["B4", "B3", "B2"], "gsd": 30.0}}, path)
    return path, source


def test_init_from_restores_weights_and_metadata_with_a_fresh_counter(tmp_path: Path) -> None:
    path, source = _saved_stage(tmp_path)
    chained = DINOv3Pretrain(**SMALL_MODEL, init_from=str(path), gram_loss_weight=2.0, gram_teacher="ema")
    _assert_same(chained.student.state_dict(), source.student.state_dict())
    _assert_same(chained.teacher.state_dict(), source.teacher.state_dict())
    assert chained.global_step == 0 and int(chained.gram_updates) == 0
    assert chained.backbone_meta().bands == ["B4", "B3", "B2"] and chained.backbone_meta().gsd == 30.0
    chained.on_fit_start()  # "ema": snapshot of the restored EMA teacher, frozen
    _assert_same(chained.gram_teacher.state_dict(), source.teacher["backbone"].state_dict())
    assert not any(p.requires_grad for p in chained.gram_teacher.parameters())


def test_gram_teacher_from_a_checkpoint_is_its_ema_teacher(tmp_path: Path) -> None:
    path, source = _saved_stage(tmp_path)
    highres = DINOv3Pretrain(**SMALL_MODEL, gram_loss_weight=1.5, gram_teacher=str(path))
    _assert_same(highres.gram_teacher.state_dict(), source.teacher["backbone"].state_dict())
    highres.train()
    assert not highres.gram_teacher.training and not any(p.requires_grad for p in highres.gram_teacher.parameters())


#: every photometric change off: crops are resampled pixels only
NO_PHOTOMETRIC = {"jitter_prob": 0.0, "grayscale_prob": 0.0, "solarize_prob": 0.0, "blur_probs": [0.0, 0.0, 0.0]}


def test_augmentation_options_reach_the_crops_and_bad_keys_fail_early() -> None:
    # a band-constant image: resampling keeps every pixel at its band value, photometric changes do not
    values = torch.tensor([0.5, -1.0, 2.0])[None, :, None, None]
    batch = {"image": values.expand(2, 3, 80, 80).contiguous(), "valid": torch.ones(2, 80, 80, dtype=torch.bool)}
    views = {}
    for name, augmentation in (("none", NO_PHOTOMETRIC), ("default", None)):
        module = DINOv3Pretrain(**SMALL_MODEL, augmentation=augmentation)
        views[name] = module_file.make_views(
            batch["image"], batch["valid"], seed=0, step=0, global_size=32, local_size=16, gram_size=None, patch_size=16,
            crop_kwargs=module._crop_kwargs, mask_probability=0.0, mask_ratio_range=(0.1, 0.5),
        )[0]  # fmt: skip
    for key in ("global_crops", "local_crops"):
        torch.testing.assert_close(views["none"][key], values.expand_as(views["none"][key]))
        assert not torch.allclose(views["default"][key], values.expand_as(views["default"][key]))
    # YAML lists become the tuples MultiCrop checks; the official values stay where nothing is overridden
    kwargs = DINOv3Pretrain(**SMALL_MODEL, augmentation={"blur_probs": [0.0, 0.5, 0.5], "brightness": 0.1})._crop_kwargs
    assert kwargs["blur_probs"] == (0.0, 0.5, 0.5) and kwargs["brightness"] == 0.1 and "contrast" not in kwargs
    with pytest.raises(ValueError, match=r"augmentation: unknown option\(s\) \['brightnes'\]"):
        DINOv3Pretrain(**SMALL_MODEL, augmentation={"brightnes": 0.1})
    with pytest.raises(ValueError, match="have their own arguments"):
        DINOv3Pretrain(**SMALL_MODEL, augmentation={"n_local_crops": 2})


def test_gram_teacher_sees_the_student_crop_and_the_term_is_weighted_in() -> None:
    # a Gram teacher with the student's weights, at 1x and without photometric changes on the student side: both
    # networks see the very same pixels, so the Gram term is 0; at 2x it sees the same ground more sharply
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 3, 80, 80), "valid": torch.ones(2, 80, 80, dtype=torch.bool)}
    for scale, expect_zero in ((1.0, True), (2.0, False)):
        module = DINOv3Pretrain(**SMALL_MODEL, gram_loss_weight=2.0, gram_teacher="ema", gram_teacher_scale=scale,
                                mask_probability=0.0, augmentation=NO_PHOTOMETRIC)
        module.on_fit_start()
        module.gram_teacher.load_state_dict(module.student["backbone"].state_dict())
        module.eval()  # no drop-path / RoPE jitter in the student
        losses = module.compute_losses(batch, step=0)
        if expect_zero:
            assert losses["gram"].item() == pytest.approx(0.0, abs=1e-6)
        else:
            assert 1e-5 < losses["gram"].item() < 1.0
        # the total carries the Gram term with its scheduled weight (full weight: no warm-up configured)
        gram_teacher, module.gram_teacher = module.gram_teacher, None
        without = module.compute_losses(batch, step=0)
        module.gram_teacher = gram_teacher
        assert "gram" not in without and module.schedule_values(0)["gram_weight"] == 2.0
        torch.testing.assert_close(losses["total"] - without["total"], 2.0 * losses["gram"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="gram_loss_weight > 0 needs gram_teacher"):
        DINOv3Pretrain(**SMALL_MODEL, gram_loss_weight=1.0)


def test_ema_update_matches_the_formula_per_tensor() -> None:
    from dinov3_eo.ssl.stage import ema_update_

    torch.manual_seed(0)
    live = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    for momentum in (0.996, 0.5, 1.0, 0.0):
        ema = [torch.randn_like(t) for t in live]
        expected = [momentum * e + (1.0 - momentum) * t for e, t in zip(ema, live)]  # the formula, tensor by tensor
        before = [e.clone() for e in ema]
        ema_update_(ema, (torch.nn.Parameter(t) for t in live), momentum)
        for got, want in zip(ema, expected):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        if momentum == 1.0:  # a frozen teacher stays bit-identical; momentum 0 copies the student exactly
            assert all(torch.equal(e, b) for e, b in zip(ema, before))
        if momentum == 0.0:
            assert all(torch.equal(e, t) for e, t in zip(ema, live))
