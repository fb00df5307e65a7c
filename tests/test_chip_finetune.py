"""Fine-tuning a chip probe with its backbone (``classify fit --finetune-epochs``): the head's logits are the probe's
scores, the schedule, a loss that falls, a killed run that resumes to the uninterrupted run's weights, a NaN loss
stopped in one sentence, and the command's exported backbone used by ``classify test``.

Chips: 16-px PNG cuts of ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0) in ``bright/`` and ``dark/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from brightness_chips import brightness_folders, micro_export

import dinov3_eo.tasks.chip_finetune as chip_finetune
from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.chip_classification import ChipClassifier, fit_chip_classifier, folder_labels
from dinov3_eo.tasks.chip_embeddings import chip_features, chip_model_input, embed_chips_with, load_chip_backbone
from dinov3_eo.tasks.chip_finetune import FinetuneSettings, ProbeHead, finetune_chip_classifier, lr_factor


@pytest.fixture(scope="module")
def chips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("finetune")
    brightness_folders(root / "chips")
    paths = sorted(str(p) for p in (root / "chips").rglob("*.png"))
    labels = folder_labels(paths)
    return {"root": root, "pth": micro_export(root), "paths": paths, "y": np.array([["bright", "dark"].index(n) for n in labels])}


def _probe(chips: dict, backbone, *, multi_label: bool = False) -> tuple[ChipClassifier, np.ndarray]:
    embedded = embed_chips_with(backbone, chips["paths"], size=32, progress=False).take(chips["paths"])
    x = chip_features(embedded)
    y = np.stack([chips["y"] == 0, np.arange(len(x)) % 3 == 0], axis=1) if multi_label else chips["y"]
    probe = fit_chip_classifier(x, y, ["bright", "dark"] if not multi_label else ["bright", "third"])
    probe.embedding = {"size": 32, "bands": None}
    return probe, x


@pytest.mark.parametrize("multi_label", [False, True])
def test_the_head_gives_the_probes_scores(chips: dict, multi_label: bool) -> None:
    backbone = load_chip_backbone(chips["pth"], device="cpu")
    probe, x = _probe(chips, backbone, multi_label=multi_label)
    head = ProbeHead(probe)
    from dinov3_eo.data.chips import read_chip_header

    inputs = [chip_model_input(read_chip_header(p), patch_size=16, normalization=backbone.normalization, size=32)
              for p in chips["paths"][:10]]  # fmt: skip
    with torch.no_grad():
        out = backbone.model.eval().forward_features(torch.stack([i for i, _ in inputs]))
        logits = head(out, torch.stack([v for _, v in inputs])).double()
    got = torch.sigmoid(logits) if multi_label else logits.softmax(1)
    np.testing.assert_allclose(got.numpy(), probe.scores(x[:10]), atol=1e-5)
    knn = fit_chip_classifier(x, chips["y"], ["bright", "dark"], method="knn")
    with pytest.raises(ValueError, match="Only a linear probe can be fine-tuned"):
        ProbeHead(knn)


def test_learning_rate_warms_up_then_decays_to_zero() -> None:
    values = [lr_factor(step, 100, 10) for step in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == 1.0 and values[10] == 1.0
    assert all(a >= b for a, b in zip(values[10:], values[11:])) and lr_factor(100, 100, 10) == pytest.approx(0.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5)  # half way through the decay


def test_fine_tuning_lowers_the_loss_and_a_killed_run_resumes_to_the_same_weights(chips: dict, tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    settings = FinetuneSettings(epochs=3, lr=1e-4, head_lr=1e-2, batch_size=16)
    paths, y = chips["paths"], chips["y"]
    held = (paths[::4], y[::4])

    def run(checkpoint: Path) -> tuple[ChipClassifier, torch.nn.Module, list]:
        backbone = load_chip_backbone(chips["pth"], device="cpu")
        probe, _ = _probe(chips, backbone)
        return finetune_chip_classifier(backbone, probe, paths, y, val=held, settings=settings, checkpoint=checkpoint,
                                        progress=False)  # fmt: skip

    probe, model, history = run(tmp_path / "whole.ckpt")
    assert [row["epoch"] for row in history] == [0, 1, 2, 3] and history[0]["loss"] is None
    assert history[-1]["loss"] < history[1]["loss"]  # the training loss falls
    assert probe.held_out_accuracy == max(row["held_out"] for row in history)

    # killed after epoch 1's checkpoint: the rerun resumes there and ends with the uninterrupted run's weights
    save = chip_finetune._save_checkpoint

    def save_then_die(path, *args):
        save(path, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(chip_finetune, "_save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.ckpt")
    monkeypatch.setattr(chip_finetune, "_save_checkpoint", save)
    saved = torch.load(tmp_path / "killed.ckpt", weights_only=True)
    assert saved["epoch"] == 1 and saved["step"] == 4  # 72 chips in batches of 16, the last short one dropped
    steps = []
    monkeypatch.setattr(chip_finetune, "lr_factor", lambda step, total, warmup: steps.append(step) or lr_factor(step, total, warmup))
    resumed, resumed_model, resumed_history = run(tmp_path / "killed.ckpt")
    assert steps[0] == 4 and steps[-1] == 11 and len(set(steps)) == 8  # epochs 2 and 3 only, at the steps they had
    assert resumed_history[:2] == saved["history"] and [row["epoch"] for row in resumed_history] == [0, 1, 2, 3]
    # the same run as the uninterrupted one, up to the last bits of its float reductions (two uninterrupted runs on
    # this CPU differ by ~2e-4 after three epochs: scikit-learn's initial probe and multithreaded sums)
    for a, b in zip(resumed_history[2:], history[2:]):
        assert a["held_out"] == pytest.approx(b["held_out"]) and a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    for (name, a), b in zip(model.state_dict().items(), resumed_model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3, msg=lambda m: f"{name}: {m}")
    np.testing.assert_allclose(resumed.weight, probe.weight, atol=2e-3)
    # a checkpoint of another run is not resumed into this one
    settings.lr = 3e-4
    with pytest.raises(ValueError, match="was written by a fine-tuning run with other \\['lr'\\]; resume with the same"):
        run(tmp_path / "killed.ckpt")


def test_multi_label_and_balanced_fine_tuning(chips: dict) -> None:
    """A multi-label probe fine-tunes on binary cross-entropy and is scored by held-out mAP; balanced weights are
    scikit-learn's ``n / (k * count)`` (single-label) and negatives / positives per class (multi-label)."""
    from sklearn.utils.class_weight import compute_class_weight

    backbone = load_chip_backbone(chips["pth"], device="cpu")
    probe, x = _probe(chips, backbone, multi_label=True)
    targets = np.stack([chips["y"] == 0, np.arange(len(x)) % 3 == 0], axis=1)
    tuned, _, history = finetune_chip_classifier(backbone, probe, chips["paths"], targets,
                                                 val=(chips["paths"][::4], targets[::4]),
                                                 settings=FinetuneSettings(epochs=1, balanced=True), progress=False)  # fmt: skip
    assert tuned.multi_label and len(history) == 2 and 0 < history[1]["held_out"] <= 1  # macro mAP
    assert np.isfinite(history[1]["loss"])

    y = np.array([0, 0, 0, 1, 2, 2])
    single = ChipClassifier(method="linear", classes=["a", "b", "c"], features="cls")
    loss = chip_finetune._loss_fn(single, y, True, "cpu")
    logits = torch.randn(6, 3)
    expected = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y),
                                                 weight=torch.tensor(compute_class_weight("balanced", classes=np.arange(3), y=y),
                                                                     dtype=torch.float32))  # fmt: skip
    torch.testing.assert_close(loss(logits, torch.from_numpy(y)), expected)
    multi = ChipClassifier(method="linear", classes=["a", "b"], features="cls", multi_label=True)
    t = np.array([[1, 0], [1, 0], [0, 1], [1, 0]], bool)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:4, :2], torch.from_numpy(t).float(),
                                                                    pos_weight=torch.tensor([1 / 3, 3.0]))  # fmt: skip
    torch.testing.assert_close(chip_finetune._loss_fn(multi, t, True, "cpu")(logits[:4, :2], torch.from_numpy(t)), expected)


def test_a_nan_loss_stops_in_one_sentence(chips: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backbone = load_chip_backbone(chips["pth"], device="cpu")
    probe, _ = _probe(chips, backbone)
    monkeypatch.setattr(chip_finetune, "_loss_fn", lambda *a: (lambda logits, t: logits.sum() * float("nan")))
    with pytest.raises(ValueError, match="The fine-tuning loss is nan at step 0 \\(epoch 1\\); lower --finetune-lr"):
        finetune_chip_classifier(backbone, probe, chips["paths"], chips["y"], settings=FinetuneSettings(epochs=1),
                                 progress=False)  # fmt: skip


def test_classify_fit_finetunes_and_exports_the_backbone(chips: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    probe_path = tmp_path / "probe.safetensors"
    common = [str(chips["root"] / "chips"), "--model", str(chips["pth"]), "--size", "32", "--quiet"]
    assert cli_main(["classify", "fit", *common, "-o", str(probe_path), "--finetune-epochs", "2", "--finetune-lr", "1e-4",
                     "--finetune-blocks", "1", "--val-fraction", "0.3", "--out-dir", str(tmp_path / "report")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "fine-tuned 2 epochs, kept epoch" in out
    probe = ChipClassifier.load(probe_path)
    exported = tmp_path / "probe_backbone.pth"
    assert probe.embedding["backbone_source"] == str(exported.resolve()) and exported.exists()
    assert probe.embedding["finetuned_from"] == str(chips["pth"].resolve()) and probe.embedding["normalization"] is None
    assert probe.embedding["finetune"]["blocks"] == 1 and not Path(f"{probe_path}.finetune.ckpt").exists()
    # only the last block and the final norm moved
    before = torch.load(chips["pth"], weights_only=True)
    after = torch.load(exported, weights_only=True)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    kept = probe.embedding["finetune"]["kept_epoch"]
    assert all(k.startswith(("blocks.3.", "norm.")) for k in moved) and (bool(moved) == (kept > 0))
    held = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert probe.held_out_accuracy == pytest.approx(held["overall_accuracy"])
    assert cli_main(["classify", "test", str(chips["root"] / "chips"), "--probe", str(probe_path), "--quiet"]) == 0
    assert "test chips:" in capsys.readouterr().out

    assert cli_main(["classify", "fit", *common, "-o", str(tmp_path / "k.safetensors"), "--method", "knn",
                     "--finetune-epochs", "1"]) == 2  # fmt: skip
    assert "Only a linear probe can be fine-tuned" in capsys.readouterr().err
    assert cli_main(["classify", "fit", *common, "--size", "0", "-o", str(tmp_path / "s.safetensors"),
                     "--finetune-epochs", "1"]) == 2  # fmt: skip
    assert "give --size (e.g. 224), not 0" in capsys.readouterr().err
