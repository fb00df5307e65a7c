"""SegmentationTask, its metrics and checkpoints, and ``dinov3-eo segment fit/predict`` end to end on the bundled scene."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from meta_device import HostToDeviceCopies, allow_meta_autocast

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.tasks.segmentation import (
    SegmentationTask,
    classes_of_labels,
    default_layers,
    expand_inputs,
    fold_scale_offset,
    iou_f1_from_confusion,
    scene_outputs,
    shard_for_rank,
)

ROOT = Path(__file__).resolve().parents[1]
SCENE = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_polygons.gpkg"
CONFIG = ROOT / "configs" / "segment" / "sample_linear_cpu.yaml"
NAMES = ["water", "crop", "tree", "developed"]
COLORS = [[31, 120, 180], [240, 200, 60], [30, 140, 50], [200, 60, 60]]


# ------------------------------------------------------------------------------------------- pure maths
def test_iou_f1_match_sklearn() -> None:
    from sklearn.metrics import confusion_matrix, f1_score, jaccard_score

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, 500)
    pred = np.where(rng.random(500) < 0.6, truth, rng.integers(0, 4, 500))
    pred[pred == 3] = 2  # class 3 is never predicted: IoU/F1 0, not NaN
    confusion = torch.from_numpy(confusion_matrix(truth, pred, labels=[0, 1, 2, 3, 4]))
    iou, f1 = iou_f1_from_confusion(confusion)
    np.testing.assert_allclose(iou[:4].numpy(), jaccard_score(truth, pred, labels=[0, 1, 2, 3], average=None, zero_division=0))
    np.testing.assert_allclose(f1[:4].numpy(), f1_score(truth, pred, labels=[0, 1, 2, 3], average=None, zero_division=0))
    assert torch.isnan(iou[4]) and torch.isnan(f1[4])  # class 4 absent from truth and prediction


@pytest.mark.parametrize(
    "norm",
    [Normalization.zscore([10.0, 20.0], [2.0, 4.0]), Normalization.percentile([5.0, 0.0], [50.0, 80.0])],
    ids=["zscore", "percentile"],
)
def test_fold_scale_offset_equals_scaling_first(norm: Normalization) -> None:
    raw = torch.rand(2, 8, 8) * 1000
    scale, offset = [0.1, 0.05], [-3.0, 2.0]
    physical = raw * torch.tensor(scale).view(2, 1, 1) + torch.tensor(offset).view(2, 1, 1)
    folded = fold_scale_offset(norm, scale, offset)
    torch.testing.assert_close(folded(raw), norm(physical), rtol=1e-4, atol=1e-4)


def test_fold_scale_offset_rejects_negative_scale() -> None:
    with pytest.raises(ValueError, match="scales must be > 0"):
        fold_scale_offset(Normalization.zscore([0.0], [1.0]), -1.0, None)


@pytest.mark.parametrize(("head", "n_blocks", "expected"), [("linear", 12, [11]), ("multilayer", 12, [8, 9, 10, 11]),
                                                            ("dpt", 24, [5, 11, 17, 23]), ("dpt", 4, [0, 1, 2, 3])])  # fmt: skip
def test_default_layers(head: str, n_blocks: int, expected: list[int]) -> None:
    assert default_layers(head, n_blocks) == expected


# ------------------------------------------------------------------------------------------ the module
class TestSegmentationTask:
    @pytest.mark.parametrize("head", ["linear", "multilayer", "dpt"])
    def test_forward_shape_any_size(self, head: str) -> None:
        task = SegmentationTask(backbone="vitmicro16", head=head, num_classes=5).eval()
        with torch.no_grad():
            out = task(torch.randn(2, 3, 40, 56))  # not multiples of 16 or 32
        assert out.shape == (2, 5, 40, 56)

    def test_frozen_backbone_gets_no_update_and_finetune_lr(self) -> None:
        task = SegmentationTask(backbone="vitmicro16", num_classes=3, lr=0.1)
        before = {k: v.clone() for k, v in task.model.backbone.state_dict().items()}
        optimizer = task.configure_optimizers()["optimizer"]
        task.train()
        loss = task.training_step({"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}, 0)
        loss.backward()
        optimizer.step()
        assert all(torch.equal(before[k], v) for k, v in task.model.backbone.state_dict().items())
        assert task.model.head.conv.weight.grad is not None

        tuned = SegmentationTask(backbone="vitmicro16", num_classes=3, lr=0.1, freeze_backbone=False, backbone_lr_mult=0.05)
        groups = {g["name"]: g for g in tuned.configure_optimizers()["optimizer"].param_groups}
        assert groups["head"]["lr"] == pytest.approx(0.1) and groups["backbone"]["lr"] == pytest.approx(0.005)

    def test_loss_ignores_255_and_empty_batches(self) -> None:
        task = SegmentationTask(backbone="vitmicro16", num_classes=3)
        logits = torch.randn(1, 3, 4, 4, requires_grad=True)
        mask = torch.full((1, 4, 4), 255)
        mask[0, :2] = torch.tensor([0, 1, 2, 1])
        changed = logits.detach().clone()
        changed[..., 2:, :] += 100.0  # only ignored pixels change
        assert torch.isclose(task._loss(logits, mask), task._loss(changed, mask))
        empty = task._loss(logits, torch.full((1, 4, 4), 255))
        empty.backward()
        assert empty.item() == 0.0 and torch.isfinite(logits.grad).all()

    def test_class_weights_change_the_loss(self) -> None:
        logits, mask = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
        plain = SegmentationTask(backbone="vitmicro16", num_classes=3)._loss(logits, mask)
        weighted = SegmentationTask(backbone="vitmicro16", num_classes=3, class_weights=[1.0, 5.0, 0.1])._loss(logits, mask)
        manual = torch.nn.functional.cross_entropy(logits, mask, weight=torch.tensor([1.0, 5.0, 0.1]))
        assert torch.isclose(weighted, manual) and not torch.isclose(plain, weighted)

    @pytest.mark.parametrize("weights", [None, [1.0, 5.0, 0.1]])
    def test_loss_is_the_mean_over_labelled_pixels(self, weights: list[float] | None) -> None:
        logits = torch.randn(2, 3, 8, 8, requires_grad=True)
        mask = torch.randint(0, 3, (2, 8, 8))
        mask[0, :3] = 255
        task = SegmentationTask(backbone="vitmicro16", num_classes=3, class_weights=weights)
        got = task._loss(logits, mask)
        reference = F.cross_entropy(logits, mask, weight=None if weights is None else torch.tensor(weights),
                                    ignore_index=255)
        torch.testing.assert_close(got, reference)
        (grad,) = torch.autograd.grad(got, logits)
        torch.testing.assert_close(grad, torch.autograd.grad(reference, logits)[0])

    def test_labels_outside_the_classes_are_an_error(self) -> None:
        task = SegmentationTask(backbone="vitmicro16", num_classes=2)
        mask = torch.tensor([[[0, 1], [7, 255]]])
        with pytest.raises(ValueError, match=r"fall outside 0\.\.1"):
            task._loss(torch.randn(1, 2, 2, 2), mask)
        with pytest.raises(ValueError, match=r"SegmentationTask: labels \[7\] fall outside 0\.\.1"):  # on the host, before a GPU
            task.on_before_batch_transfer({"image": torch.zeros(1, 3, 2, 2), "mask": mask}, 0)
        good = {"image": torch.zeros(1, 3, 2, 2), "mask": torch.tensor([[[0, 1], [1, 255]]])}
        assert task.on_before_batch_transfer(good, 0) is good

    def test_training_batches_are_flipped_and_turned_with_their_masks(self) -> None:
        from dinov3_eo.inference.tta import random_dihedral

        batch = {"image": torch.randn(2, 3, 32, 48), "mask": torch.randint(0, 3, (2, 32, 48))}
        for augment in (True, False):
            task = SegmentationTask(backbone="vitmicro16", num_classes=3, augment=augment, augment_seed=5).eval()
            task.log_after_backward = lambda values, **kwargs: None
            with torch.no_grad():
                loss = task.training_step(batch, 0)
                image, mask = (random_dihedral(batch["image"], batch["mask"], seed=5, step=0) if augment
                               else (batch["image"], batch["mask"]))  # fmt: skip
                torch.testing.assert_close(loss, task._loss(task(image), mask))
        assert random_dihedral(batch["image"], seed=5, step=0)[0].shape == (2, 3, 48, 32)  # a quarter turn here

    def test_combined_losses_sum_their_terms_and_log_each(self) -> None:
        from dinov3_eo.losses.segmentation import dice_loss, focal_loss

        weights = torch.tensor([1.0, 5.0, 0.1])
        task = SegmentationTask(backbone="vitmicro16", num_classes=3, class_weights=weights.tolist(),
                                loss="focal + dice", focal_gamma=1.5)
        logits, mask = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
        mask[0, :2] = 255
        expected = (focal_loss(logits, mask, gamma=1.5, class_weight=weights)
                    + dice_loss(logits, mask, class_weight=weights))
        torch.testing.assert_close(task._loss(logits, mask), expected)
        logged = {}
        task.log_after_backward = lambda values, **kwargs: logged.update(values)
        batch = {"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}
        loss = task.training_step(batch, 0)
        assert set(logged) == {"train/loss", "train/loss_focal", "train/loss_dice"}
        torch.testing.assert_close(loss.detach(), logged["train/loss_focal"] + logged["train/loss_dice"])
        assert task.hparams.loss == "focal + dice" and task.loss_terms == ("focal", "dice")

    @pytest.mark.parametrize(("weights", "loss"), [(None, "ce"), ([1.0, 5.0, 0.1], "ce"), ([1.0, 5.0, 0.1], "focal+dice"),
                                                   (None, "jaccard+lovasz")])  # fmt: skip
    def test_a_training_step_never_reads_back_from_the_device(self, monkeypatch: pytest.MonkeyPatch,
                                                               weights: list[float] | None, loss: str) -> None:
        """On meta tensors (a stand-in for a GPU) any device-to-host read raises; see tests/meta_device.py."""
        allow_meta_autocast(monkeypatch)
        task = SegmentationTask(backbone="vitmicro16", num_classes=3, class_weights=weights, freeze_backbone=False,
                                loss=loss)
        task.to_empty(device="meta")
        monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)
        batch = {"image": torch.empty(2, 3, 32, 32, device="meta"),
                 "mask": torch.empty(2, 32, 32, dtype=torch.long, device="meta")}
        with HostToDeviceCopies() as copies:
            task.training_step(batch, 0).backward()
        assert not copies.copies

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            ({"head": "unet", "num_classes": 2}, "head must be one of"),
            ({}, "give num_classes or class_names"),
            ({"num_classes": 3, "class_names": ["a", "b"]}, "class_names has 2 entries for 3 classes"),
            ({"num_classes": 2, "class_weights": [1.0]}, "class_weights has 1 entries"),
            ({"num_classes": 2, "lr_schedule": "step"}, "lr_schedule must be one of"),
            ({"num_classes": 2, "loss": "ce+tversky"}, r"terms must be among .* unknown: \['tversky'\]"),
            ({"num_classes": 2, "loss": "focal", "focal_gamma": -1.0}, "focal_gamma must be >= 0"),
            ({"num_classes": 2, "class_weights": "inverse"}, r"class_weights must be a list of 2 numbers or one of"),
        ],
    )
    def test_bad_arguments(self, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            SegmentationTask(backbone="vitmicro16", **kwargs)

    def test_missing_backbone_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="neither a registered name"):
            SegmentationTask(backbone=str(tmp_path / "nope.pth"), num_classes=2)


def test_the_labels_legend_fills_what_the_config_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    names, colours = {0: "water", 1: "crop", 2: "tree", 7: "beyond the model"}, {1: (240, 200, 60)}
    task = SegmentationTask(backbone="vitmicro16", num_classes=3)
    default_colours = [list(c) for c in task.class_colors]
    task._adopt_legend(names, colours)
    assert task.class_names == ["water", "crop", "tree"] and task.hparams["class_names"] == task.class_names
    assert task.class_colors == [default_colours[0], [240, 200, 60], default_colours[2]]
    entry = task.checkpoint_metadata()["segmentation"]
    assert entry["class_names"] == ["water", "crop", "tree"] and entry["class_colors"][1] == [240, 200, 60]
    rebuilt = SegmentationTask(**task.hparams)  # what load_from_checkpoint does with the saved hyper-parameters
    assert rebuilt.class_names == task.class_names and rebuilt.class_colors == task.class_colors
    # names and colours the config gives win; names that differ are warned about
    given = SegmentationTask(backbone="vitmicro16", class_names=["a", "crop", "c"], class_colors=[[1, 1, 1]] * 3)
    with caplog.at_level("WARNING"):
        given._adopt_legend(names, colours)
    assert given.class_names == ["a", "crop", "c"] and given.class_colors == [[1, 1, 1]] * 3
    assert "differ from the labels' for ids {0: ('a', 'water'), 2: ('c', 'tree')}" in caplog.text


def test_classes_of_labels(tmp_path: Path) -> None:
    assert classes_of_labels(POLYGONS) == (4, ["crop", "developed", "tree", "water"])
    assert classes_of_labels(POLYGONS, classes={"water": 0, "crop": 1, "tree": 2, "developed": 5}) == (
        6, ["water", "crop", "tree", "class 3", "class 4", "developed"])
    profile = {"driver": "GTiff", "width": 2, "height": 2, "count": 1, "dtype": "uint8", "crs": "EPSG:32618",
               "transform": rasterio.transform.from_origin(0, 20, 10, 10)}
    with rasterio.open(tmp_path / "tagged.tif", "w", **profile) as dst:
        dst.write(np.zeros((2, 2), dtype=np.uint8), 1)
        dst.update_tags(class_names='["open", "tree"]')
    assert classes_of_labels(tmp_path / "tagged.tif") == (2, ["open", "tree"])
    # without a tag: the largest id found, block by block, nodata left out (the file's or the one given)
    with rasterio.open(tmp_path / "plain.tif", "w", **{**profile, "nodata": 255}) as dst:
        dst.write(np.array([[0, 5], [255, 2]], dtype=np.uint8), 1)
    assert classes_of_labels(tmp_path / "plain.tif") == (6, None)
    assert classes_of_labels(tmp_path / "plain.tif", nodata=5) == (256, None)  # 255 is a class then
    with rasterio.open(tmp_path / "signed.tif", "w", **{**profile, "dtype": "int16", "nodata": None}) as dst:
        dst.write(np.array([[0, -1], [3, 2]], dtype=np.int16), 1)
    with pytest.raises(ValueError, match=r"values \[-1\] that are not class ids"):
        classes_of_labels(tmp_path / "signed.tif")
    with rasterio.open(tmp_path / "empty.tif", "w", **{**profile, "nodata": 7}) as dst:
        dst.write(np.full((2, 2), 7, dtype=np.uint8), 1)
    with pytest.raises(ValueError, match="holds no label"):
        classes_of_labels(tmp_path / "empty.tif")


def test_shard_for_rank_is_a_partition(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [f"scene_{i}.tif" for i in range(10)]
    shards = [shard_for_rank(items, rank=r, world_size=3) for r in range(3)]
    assert sorted(sum(shards, [])) == sorted(items)
    assert all(not set(a) & set(b) for i, a in enumerate(shards) for b in shards[i + 1 :])
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert shard_for_rank(items) == items[1::4]
    with pytest.raises(ValueError, match="RANK < WORLD_SIZE"):
        shard_for_rank(items, rank=4, world_size=4)


def test_expand_inputs_globs(tmp_path: Path) -> None:
    for name in ("a.tif", "b.tif", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in expand_inputs([str(tmp_path / "*.tif"), str(tmp_path / "a.tif")])] == ["a.tif", "b.tif"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.jp2")])


# ------------------------------------------------------------------------------- CLI end to end (real scene)
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``dinov3-eo segment fit`` on the bundled scene and polygons for a few steps; returns the last checkpoint."""
    root = tmp_path_factory.mktemp("segfit")
    code = cli_main([
        "segment", "fit", "--config", str(CONFIG),
        "--data.paths", str(SCENE), "--data.labels", str(POLYGONS),
        "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1", "--trainer.max_steps", "6",
        "--trainer.limit_val_batches", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
    ])  # fmt: skip
    assert code == 0
    ckpt = root / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    return ckpt


@pytest.mark.slow
class TestSegmentCLI:
    def test_checkpoint_carries_metadata(self, trained: Path) -> None:
        checkpoint = torch.load(trained, map_location="cpu", weights_only=False)
        entry = checkpoint["dinov3_eo"]
        assert entry["in_chans"] == 3 and entry["patch_size"] == 16 and entry["model"] == "vitmicro16"
        assert entry["normalization"]["name"] == "zscore" and len(entry["normalization"]["mean"]) == 3
        assert entry["gsd"] == 30.0  # the Landsat scene's pixels: predict warns on a scene at another scale
        seg = entry["segmentation"]
        assert seg["class_names"] == NAMES and seg["class_colors"] == COLORS
        assert seg["nodata"] == 0 and seg["ignore_index"] == 255 and seg["head"] == "linear"

    def test_from_checkpoint_reproduces_the_model(self, trained: Path) -> None:
        task = SegmentationTask.from_checkpoint(trained)
        checkpoint = torch.load(trained, map_location="cpu", weights_only=False)
        for key, value in checkpoint["state_dict"].items():
            torch.testing.assert_close(task.state_dict()[key], value)
        assert task.input_normalization() == Normalization.from_dict(checkpoint["dinov3_eo"]["normalization"])

    def test_predict_outputs(self, trained: Path, tmp_path: Path) -> None:
        out = tmp_path / "out"
        args = ["segment", "predict", str(SCENE), "--model", str(trained), "-o", str(out), "--polygons",
                "--probabilities", "--window", "256", "--overlap", "0.25", "--batch-size", "2", "--quiet"]  # fmt: skip
        assert cli_main(args) == 0
        paths = scene_outputs(SCENE, out, probabilities=True, polygons=True)
        with rasterio.open(SCENE) as src, rasterio.open(paths.classes) as cls:
            assert (cls.crs, cls.transform, cls.width, cls.height) == (src.crs, src.transform, src.width, src.height)
            assert cls.nodata == 255 and cls.dtypes[0] == "uint8"
            assert json.loads(cls.tags()["class_names"]) == NAMES
            table = cls.colormap(1)
            assert [list(table[i][:3]) for i in range(4)] == COLORS
            labels = cls.read(1)
            collar = (src.read() == 0).all(axis=0)  # the scene's 0-valued collar is nodata (recorded in training)
            assert collar.any() and (labels[collar] == 255).all()
            assert set(np.unique(labels[~collar]).tolist()) <= {0, 1, 2, 3}
            assert cls.overviews(1)  # a COG with internal overviews
        with rasterio.open(paths.probabilities) as prob:
            assert prob.count == 4 and prob.transform == cls.transform
            p = prob.read().astype(np.int64)
            # uint8 probabilities (x254) sum to ~254 where valid and are 255 at nodata
            sums = p[:, ~collar].sum(axis=0)
            assert np.abs(sums - 254).max() <= 4 and (p[:, collar] == 255).all()
        import geopandas as gpd

        frame = gpd.read_file(paths.polygons)
        assert frame.crs == cls.crs and set(frame["class_name"]) <= set(NAMES)
        # polygons cover exactly the labelled (non-nodata) pixels: area = pixel count x pixel area
        pixel_area = abs(src.transform.a * src.transform.e)
        assert frame.area.sum() == pytest.approx((~collar).sum() * pixel_area, rel=1e-6)
        assert paths.quicklook.stat().st_size > 1000

        # existing outputs are not overwritten; --overwrite replaces them
        assert cli_main(args) == 2
        assert cli_main([*args, "--overwrite"]) == 0

    def test_predict_bf16_matches_float32(self, trained: Path, tmp_path: Path) -> None:
        labels = {}
        for flag in ([], ["--bf16"]):
            out = tmp_path / ("bf16" if flag else "fp32")
            args = ["segment", "predict", str(SCENE), "--model", str(trained), "-o", str(out), "--window", "256", "--quiet"]
            assert cli_main([*args, *flag]) == 0
            with rasterio.open(scene_outputs(SCENE, out, probabilities=False, polygons=False).classes) as cls:
                labels[bool(flag)] = cls.read(1)
        valid = labels[False] != 255
        assert ((labels[True] != 255) == valid).all()
        assert (labels[True][valid] == labels[False][valid]).mean() > 0.99  # bf16 moves only near-ties

    def test_predict_tta(self, trained: Path, tmp_path: Path) -> None:
        """``--tta flips``: probabilities averaged over 4 views (still summing to 1), recorded in the tags, the same
        nodata, and classes that mostly agree with the single view's."""
        probs, labels = {}, {}
        for flag in ([], ["--tta", "flips"]):
            out = tmp_path / ("tta" if flag else "plain")
            args = ["segment", "predict", str(SCENE), "--model", str(trained), "-o", str(out), "--window", "256",
                    "--probabilities", "--quiet"]  # fmt: skip
            assert cli_main([*args, *flag]) == 0
            paths = scene_outputs(SCENE, out, probabilities=True, polygons=False)
            with rasterio.open(paths.classes) as cls, rasterio.open(paths.probabilities) as prob:
                assert cls.tags()["tta"] == ("flips" if flag else "none")
                labels[bool(flag)], probs[bool(flag)] = cls.read(1), prob.read().astype(np.int64)
        valid = labels[False] != 255
        assert ((labels[True] != 255) == valid).all()
        assert np.abs(probs[True][:, valid].sum(axis=0) - 254).max() <= 4
        assert (labels[True][valid] == labels[False][valid]).mean() > 0.8
        assert np.abs(probs[True][:, valid] - probs[False][:, valid]).max() > 2  # the views did change the scores

    def test_evaluate_against_the_training_polygons(self, trained: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
        """``segment evaluate`` of the predicted map against the scene's polygons: every labelled pixel the map
        classes is counted once (the polygons' area in pixels, less the nodata collar), names matched to classes."""
        import geopandas as gpd

        out = tmp_path / "out"
        assert cli_main(["segment", "predict", str(SCENE), "--model", str(trained), "-o", str(out), "--quiet"]) == 0
        classes = scene_outputs(SCENE, out, probabilities=False, polygons=False).classes
        capsys.readouterr()
        assert cli_main(["segment", "evaluate", str(classes), str(POLYGONS), "--out-dir", str(tmp_path / "eval")]) == 0
        assert "overall accuracy" in capsys.readouterr().out
        report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert list(report["classes"]) == NAMES
        with rasterio.open(classes) as cls:
            pixel_area = abs(cls.transform.a * cls.transform.e)
            frame = gpd.read_file(POLYGONS).to_crs(cls.crs)
        assert 0 < report["pixels"] <= frame.area.sum() / pixel_area * 1.05
        assert all(report["classes"][n]["reference_pixels"] > 0 for n in NAMES)

    def test_lora_fit_and_predict_from_the_command_line(self, tmp_path: Path) -> None:
        """``--model.lora '{rank: 4}'``: the fit trains low-rank updates (their keys in the checkpoint, the backbone's
        own weights as built), and ``segment predict`` runs the adapted model (here with ``--simplify``d polygons)."""
        root = tmp_path / "fit"
        assert cli_main([
            "segment", "fit", "--config", str(CONFIG), "--data.paths", str(SCENE), "--data.labels", str(POLYGONS),
            "--model.lora", "{rank: 4, targets: [qkv, proj]}", "--trainer.default_root_dir", str(root),
            "--trainer.max_epochs", "1", "--trainer.max_steps", "3", "--trainer.limit_val_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        ]) == 0  # fmt: skip
        ckpt = root / "checkpoints" / "last.ckpt"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        updates = [k for k in state if ".lora." in k]
        assert len(updates) == 4 * 2 * 2  # vitmicro16's 4 blocks x (qkv, proj) x (A, B)
        assert any(state[k].abs().sum() > 0 for k in updates if k.endswith(".lora.B"))
        out = tmp_path / "out"
        assert cli_main(["segment", "predict", str(SCENE), "--model", str(ckpt), "-o", str(out), "--polygons",
                         "--simplify", "30", "--quiet"]) == 0  # fmt: skip
        paths = scene_outputs(SCENE, out, probabilities=False, polygons=True)
        import geopandas as gpd

        frame = gpd.read_file(paths.polygons)  # smoothed by one 30 m pixel, still one valid coverage
        assert len(frame) and frame.geometry.is_valid.all()

    def test_fit_takes_names_and_colours_from_the_polygons(self, tmp_path: Path) -> None:
        """A config without ``model.class_names``/``class_colors``/``num_classes`` and polygons with a ``color``
        column: the class count comes from the labels, and the checkpoint and the predicted map carry the polygons'
        names and colours."""
        import geopandas as gpd

        frame = gpd.read_file(POLYGONS)
        frame["color"] = [dict(zip(NAMES, ("#0000ff", "#ffff00", "#008000", "#ff0000")))[n] for n in frame["name"]]
        frame.to_file(tmp_path / "legend.gpkg")
        root = tmp_path / "fit"
        assert cli_main([
            "segment", "fit", "--config", str(CONFIG), "--data.paths", str(SCENE), "--data.labels",
            str(tmp_path / "legend.gpkg"), "--model.class_names", "null", "--model.class_colors", "null",
            "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false",
        ]) == 0  # fmt: skip
        ckpt = root / "checkpoints" / "last.ckpt"
        seg = torch.load(ckpt, map_location="cpu", weights_only=False)["dinov3_eo"]["segmentation"]
        assert seg["class_names"] == NAMES  # the config's data.classes ids, named by the polygons
        assert seg["class_colors"] == [[0, 0, 255], [255, 255, 0], [0, 128, 0], [255, 0, 0]]
        out = tmp_path / "out"
        assert cli_main(["segment", "predict", str(SCENE), "--model", str(ckpt), "-o", str(out), "--quiet"]) == 0
        with rasterio.open(scene_outputs(SCENE, out, probabilities=False, polygons=False).classes) as src:
            assert json.loads(src.tags()["class_names"]) == NAMES
            assert src.colormap(1)[3][:3] == (255, 0, 0)

    def test_balanced_class_weights_are_counted_once_and_kept_on_resume(self, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
        """``--model.class_weights balanced`` counts the training tiles' classes when the fit starts, the checkpoint
        keeps the weights, and a resumed fit takes them from it instead of counting again."""
        import yaml

        from dinov3_eo.data.datamodule import DenseDataModule
        from dinov3_eo.losses.segmentation import class_weights_from_counts

        root = tmp_path / "fit"
        args = ["segment", "fit", "--config", str(CONFIG), "--data.paths", str(SCENE), "--data.labels", str(POLYGONS),
                "--model.class_weights", "balanced", "--model.loss", "ce+dice", "--trainer.default_root_dir", str(root),
                "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
                "false", "--trainer.logger", "false"]  # fmt: skip
        with caplog.at_level("INFO", logger="dinov3_eo.tasks.segmentation"):
            assert cli_main([*args, "--trainer.max_steps", "2"]) == 0
        assert "Class weights (balanced) from" in caplog.text
        data = {**yaml.safe_load(CONFIG.read_text())["data"], "paths": str(SCENE), "labels": str(POLYGONS)}
        expected = class_weights_from_counts(DenseDataModule(**data).class_pixel_counts(4, progress=False))
        state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        np.testing.assert_allclose(state["state_dict"]["class_weight"].numpy(), expected, rtol=1e-6)
        assert state["hyper_parameters"]["class_weights"] == "balanced"
        assert sorted(expected)[0] < 1 < sorted(expected)[-1]  # the polygons' classes are far from balanced

        def no_recount(*args, **kwargs):
            raise AssertionError("a resumed fit counted the classes again")

        monkeypatch.setattr(DenseDataModule, "class_pixel_counts", no_recount)
        assert cli_main([*args, "--trainer.max_steps", "3", "--ckpt_path", str(root / "checkpoints" / "last.ckpt"),
                         "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path / "resumed")]) == 0  # fmt: skip
        resumed = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert resumed["global_step"] == 3
        torch.testing.assert_close(resumed["state_dict"]["class_weight"], state["state_dict"]["class_weight"])
        task = SegmentationTask.from_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
        torch.testing.assert_close(task.class_weight, state["state_dict"]["class_weight"])

    def test_fit_on_png_masks_paired_by_name(self, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
        """Imagery ``imgs/scene_RGB.tif`` and a PNG mask without georeference ``masks/scene_label.png`` on the same
        pixel grid, as segmentation datasets ship them: ``--data.label_pairing name`` trains on them, the class count
        coming from the mask."""
        import geopandas as gpd
        from PIL import Image
        from rasterio.features import rasterize

        (tmp_path / "imgs").mkdir(), (tmp_path / "masks").mkdir()
        shutil.copy(SCENE, tmp_path / "imgs" / "scene_RGB.tif")
        with rasterio.open(SCENE) as src:
            frame = gpd.read_file(POLYGONS).to_crs(src.crs)
            ids = rasterize([(g, NAMES.index(n)) for g, n in zip(frame.geometry, frame["name"])], out_shape=src.shape,
                            transform=src.transform, fill=255, dtype="uint8")  # fmt: skip
        Image.fromarray(ids).save(tmp_path / "masks" / "scene_label.png")
        root = tmp_path / "fit"
        with caplog.at_level("INFO", logger="dinov3_eo.tasks.segmentation"):
            assert cli_main([
                "segment", "fit", "--config", str(CONFIG), "--data.paths", str(tmp_path / "imgs"), "--data.labels",
                str(tmp_path / "masks"), "--data.label_pairing", "name", "--data.label_name_suffixes", "[_RGB, _label]",
                "--data.label_nodata", "255", "--data.classes", "null", "--model.class_names", "null",
                "--model.class_colors", "null", "--trainer.default_root_dir", str(root), "--trainer.max_epochs", "1",
                "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false",
                "--trainer.logger", "false", "--model.loss", "ce+lovasz",
            ]) == 0  # fmt: skip
        assert "model.num_classes = 4 from" in caplog.text
        state = torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert state["hyper_parameters"]["num_classes"] == 4 and state["hyper_parameters"]["loss"] == "ce+lovasz"

    def test_test_scores_the_held_out_files(self, trained: Path, tmp_path: Path) -> None:
        """``segment test --ckpt_path`` scores a checkpoint on ``data.test_files``: the metrics ``validate`` gives on
        the same file, the labelled pixels of its tiles, and a report (JSON, confusion CSV and PNG) in the log folder."""
        import lightning.pytorch as pl

        from dinov3_eo.data.datamodule import DenseDataModule

        for split in ("train", "heldout"):
            (tmp_path / split).mkdir()
            shutil.copy(SCENE, tmp_path / split / "scene.tif")
        common = dict(paths=str(tmp_path / "*" / "scene.tif"), labels=str(POLYGONS), nodata=0, tile_size=64,
                      classes={name: i for i, name in enumerate(NAMES)},
                      batch_size=8, num_workers=0, cache_dir=None, normalization="zscore")  # fmt: skip
        model = SegmentationTask.from_checkpoint(trained)
        trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path / "api")  # fmt: skip
        tested = trainer.test(model, DenseDataModule(**common, test_files=["*/heldout/*"]), verbose=False)[0]
        validated = trainer.validate(model, DenseDataModule(**common, val_files=["*/heldout/*"]), verbose=False)[0]
        assert tested["test/mIoU"] == pytest.approx(validated["val/mIoU"], abs=1e-6) and tested["test/mIoU"] > 0
        assert tested["test/accuracy"] == pytest.approx(validated["val/accuracy"], abs=1e-6)
        report = json.loads((tmp_path / "api" / "test_metrics.json").read_text())
        dm = DenseDataModule(**common, test_files=["*/heldout/*"])
        labelled = sum(int((batch["mask"] != 255).sum()) for batch in dm.test_dataloader())
        assert report["pixels"] == labelled > 0 and list(report["classes"]) == NAMES
        assert report["miou"] == pytest.approx(tested["test/mIoU"], abs=1e-6)
        # pictures of the first labelled tiles: imagery, reference and prediction
        assert {"test_predictions.png", "val_predictions.png"} <= {p.name for p in (tmp_path / "api").iterdir()}
        assert len(model._preview) == 4 and all((p["mask"] != 255).any() for p in model._preview)
        assert all(p["image"].shape == (64, 64, 3) and 0 <= p["image"].min() <= p["image"].max() <= 1
                   and p["pred"].shape == (64, 64) and p["title"] == "scene.tif" for p in model._preview)  # fmt: skip

        root = tmp_path / "cli"
        assert cli_main([
            "segment", "test", "--config", str(CONFIG), "--data.paths", str(tmp_path / "*" / "scene.tif"),
            "--data.labels", str(POLYGONS), "--data.test_files", '["*/heldout/*"]', "--ckpt_path", str(trained),
            "--trainer.default_root_dir", str(root), "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
        ]) == 0  # fmt: skip
        assert {"test_metrics.json", "test_confusion.csv", "test_confusion.png", "test_predictions.png"} <= {
            p.name for p in root.iterdir()
        }
        cli_report = json.loads((root / "test_metrics.json").read_text())
        assert cli_report["checkpoint"] == str(trained) and cli_report["pixels"] == labelled
        assert cli_report["miou"] == pytest.approx(report["miou"], abs=1e-6)

    def test_predict_refuses_wrong_band_count(self, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        two_bands = tmp_path / "two.tif"
        with rasterio.open(SCENE) as src:
            profile = src.profile | {"count": 2}
            with rasterio.open(two_bands, "w", **profile) as dst:
                dst.write(src.read([1, 2]))
        assert cli_main(["segment", "predict", str(two_bands), "--model", str(trained), "-o", str(tmp_path), "--quiet"]) == 2
        assert "gives 2 bands but the model was trained on 3" in capsys.readouterr().err

    def test_predict_glob_and_name_collisions(self, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        for sub in ("a", "b"):
            (tmp_path / sub).mkdir()
            shutil.copy(SCENE, tmp_path / sub / "scene.tif")
        code = cli_main(["segment", "predict", str(tmp_path / "*" / "scene.tif"), "--model", str(trained), "-o",
                         str(tmp_path / "out"), "--quiet"])  # fmt: skip
        assert code == 2 and "would collide" in capsys.readouterr().err


def test_a_scene_at_another_scale_than_training_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from dinov3_eo.tasks.segmentation import warn_on_another_scale

    with rasterio.open(SCENE) as src, caplog.at_level("WARNING", logger="dinov3_eo.tasks.segmentation"):
        for trained in (None, 30.0, 27.0, 36.0):  # unknown, or within a quarter of the scene's 30 m: nothing to say
            warn_on_another_scale(src, trained)
        assert caplog.records == []
        warn_on_another_scale(src, 0.5)
    assert len(caplog.records) == 1
    assert "has 30 m pixels but the model was trained on 0.5 m pixels" in caplog.text and "gdalwarp -tr 0.5 0.5" in caplog.text


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "segment").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_parse(config: Path, capsys: pytest.CaptureFixture) -> None:
    """Every segmentation config maps one-to-one onto SegmentationTask and DenseDataModule (or, named by
    ``data.class_path``, ChipSegmentationDataModule) arguments."""
    with pytest.raises(SystemExit) as done:
        cli_main(["segment", "fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "\nmodel:\n" in printed and "  loss: " in printed and "\ndata:\n" in printed
