"""Canopy height: metrics, CHM labels warped onto tiles, the height data module, HeightTask, CHMv2 loading,
raster prediction/evaluation and an end-to-end CLI run on real NEON plots (tests/data/neon, CC0)."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from meta_device import HostToDeviceCopies, allow_meta_autocast
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.warp import reproject, transform_bounds
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

from dinov3_eo.inference.tta import dihedral
from dinov3_eo.models.dense import chmv2_head
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.height import (
    HeightTask,
    build_chmv2,
    even_layers,
    evaluate_height_raster,
    load_chmv2_head,
    load_height_model,
    main,
    predict_height,
)
from dinov3_eo.tasks.height_data import HeightDataModule, HeightLabels
from dinov3_eo.tasks.height_metrics import HEIGHT_BINS, HeightMetrics, flat_metrics, height_metrics, metrics_table

NEON = Path(__file__).resolve().parent / "data" / "neon"
PLOTS = ("TEAK_044", "TEAK_050", "TEAK_052")
NODATA = -9999.0


def _chm(plot: str) -> np.ndarray:
    with rasterio.open(NEON / f"{plot}_CHM.tif") as src:
        return src.read(1)


def _tiny_task(**kw) -> HeightTask:
    """A real DINOv3 ViT (vitmicro16, random weights) with a small DPT head."""
    args = dict(
        backbone="vitmicro16", dpt_channels=16, dpt_post_process_channels=[8, 16, 32, 32], dpt_hidden_channels=8,
        n_bins=32, max_height=64.0, loss="l1",
    )  # fmt: skip
    args.update(kw)
    return HeightTask(**args)


# ---------------------------------------------------------------------------------------------------- metrics
class TestHeightMetrics:
    def _pairs(self) -> tuple[np.ndarray, np.ndarray]:
        target = np.concatenate([_chm(p).ravel() for p in PLOTS]).astype(np.float64)
        pred = target + np.random.default_rng(0).normal(0.5, 3.0, target.shape)
        return pred, target

    def test_matches_sklearn_overall_and_per_bin(self) -> None:
        pred, target = self._pairs()
        metrics = height_metrics(pred, target)
        for (lo, hi), (name, m) in zip(((0, math.inf), *HEIGHT_BINS), metrics.items()):
            sel = (target >= lo) & (target < hi)
            assert m["n"] == sel.sum() > 0, name
            assert m["mae"] == pytest.approx(mean_absolute_error(target[sel], pred[sel]), rel=1e-9)
            assert m["rmse"] == pytest.approx(math.sqrt(mean_squared_error(target[sel], pred[sel])), rel=1e-9)
            assert m["r2"] == pytest.approx(r2_score(target[sel], pred[sel]), rel=1e-7, abs=1e-9)
            assert m["bias"] == pytest.approx(np.mean(pred[sel] - target[sel]), rel=1e-9, abs=1e-12)
        assert list(metrics) == ["all", "0-5", "5-10", "10-20", "20+"]

    def test_streaming_equals_one_shot_and_ignores_invalid(self) -> None:
        pred, target = self._pairs()
        one_shot = height_metrics(pred, target)
        acc = HeightMetrics()
        junk = target.copy()
        valid = np.ones_like(target, dtype=bool)
        for chunk in np.array_split(np.arange(target.size), 7):
            acc.update(torch.from_numpy(pred[chunk]).float(), torch.from_numpy(target[chunk]).float())
        # extra pixels that must not count: NaN reference, NaN prediction, or invalid
        junk[:10] = np.nan
        valid[10:20] = False
        pred_nan = pred.copy()
        pred_nan[20:30] = np.nan
        masked = height_metrics(pred_nan, junk, valid)
        keep = np.ones(target.size, bool)
        keep[:30] = False
        assert masked["all"]["n"] == keep.sum()
        assert masked["all"]["mae"] == pytest.approx(np.abs(pred[keep] - target[keep]).mean())
        streamed = acc.compute()
        for group in one_shot:
            for name in ("n", "mae", "rmse", "bias"):
                assert streamed[group][name] == pytest.approx(one_shot[group][name], rel=1e-5)

    def test_merge_state_round_trip_and_empty_bins(self) -> None:
        pred, target = self._pairs()
        a, b, whole = HeightMetrics(), HeightMetrics(), HeightMetrics()
        a.update(pred[:1000], target[:1000])
        b.update(pred[1000:], target[1000:])
        whole.update(pred, target)
        restored = HeightMetrics()
        restored.load_state_tensor(a.state_tensor() + b.state_tensor())
        a.merge(b)
        for m in (a.compute(), restored.compute()):
            for group, values in whole.compute().items():
                assert m[group] == pytest.approx(values, rel=1e-9)
        empty = height_metrics(np.array([1.0, 2.0]), np.array([1.5, 2.5]))
        assert empty["0-5"]["n"] == 2 and math.isnan(empty["20+"]["mae"]) and empty["20+"]["n"] == 0
        assert math.isnan(height_metrics(np.array([1.0, 2.0]), np.array([3.0, 3.0]))["all"]["r2"])  # constant reference

    def test_flat_keys_and_table(self) -> None:
        pred, target = self._pairs()
        m = height_metrics(pred, target)
        flat = flat_metrics(m, prefix="val/")
        assert flat["val/mae"] == m["all"]["mae"] and "val/rmse_20+" in flat and len(flat) == 4 * 5
        table = metrics_table({"noisy": m})
        assert table.count("\n") == 1 + 5 and "| noisy | 20+ |" in table

    def test_bad_input(self) -> None:
        with pytest.raises(ValueError, match="high > low"):
            HeightMetrics(bins=[(5.0, 5.0)])
        with pytest.raises(ValueError, match="pred has 3 pixels but target has 2"):
            HeightMetrics().update(np.zeros(3), np.zeros(2))


# ---------------------------------------------------------------------------------------------------- labels
class TestHeightLabels:
    @pytest.mark.parametrize("dst_epsg, res, resampling", [(32610, 0.3, "bilinear"), (3857, 2.5, "average"), (32611, 0.1, "bilinear")])
    def test_other_crs_grid_matches_rasterio_reproject(self, dst_epsg: int, res: float, resampling: str) -> None:
        path = NEON / "TEAK_050_CHM.tif"
        with rasterio.open(path) as src:
            dst_crs = CRS.from_epsg(dst_epsg)
            left, bottom, right, top = transform_bounds(src.crs, dst_crs, *src.bounds)
            # a grid that overhangs the CHM on the west and north, so the border must come back as NaN
            transform = from_origin(left - 5 * res, top + 5 * res, res, res)
            shape = (int((top - bottom) / res) + 5, int((right - left) / res) + 5)
            expected = np.full(shape, NODATA, np.float32)
            reproject(
                rasterio.band(src, 1), expected, src_nodata=NODATA, dst_nodata=NODATA, dst_transform=transform,
                dst_crs=dst_crs, resampling=Resampling[resampling],
            )  # fmt: skip
        expected = np.where(expected == NODATA, np.nan, expected)
        got = HeightLabels(paths=path, resampling=resampling, clip_negative=False).read(crs=dst_crs, transform=transform, shape=shape)
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_allclose(got, expected, atol=1e-4, equal_nan=True)
        assert np.isnan(got[:3]).all() and np.isfinite(got).mean() > 0.5

    def test_resampling_is_nodata_aware(self, tmp_path: Path) -> None:
        chm = _chm("TEAK_044").copy()
        chm[10:20, 10:20] = NODATA  # a 10 m hole of nodata inside the plot
        with rasterio.open(NEON / "TEAK_044_CHM.tif") as src:
            profile = src.profile
        path = tmp_path / "holed.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(chm, 1)
        with rasterio.open(NEON / "TEAK_044.tif") as img:
            crs, transform, shape = img.crs, img.transform, img.shape
        for resampling in ("bilinear", "average", "cubic"):
            heights = HeightLabels(paths=path, resampling=resampling, clip_negative=False).read(crs=crs, transform=transform, shape=shape)
            valid = chm[chm != NODATA]
            finite = heights[np.isfinite(heights)]
            # nodata (-9999) never leaks into a height; cubic may overshoot a little, never by thousands of metres
            assert finite.min() >= valid.min() - 5 and finite.max() <= valid.max() + 5, resampling
            assert np.isnan(heights[120:180, 120:180]).all()  # the hole's interior (0.1 m pixels) stays nodata
            assert np.isfinite(heights[:90, :90]).all()
        # on its own grid, bilinear reproduces the CHM exactly at the 1 m cell centres
        own = HeightLabels(paths=NEON / "TEAK_044_CHM.tif").read(crs=crs, transform=transform @ rasterio.Affine.scale(10), shape=(40, 40))
        np.testing.assert_allclose(own, np.maximum(_chm("TEAK_044"), 0), atol=1e-5)

    def test_several_files_clip_and_max_height(self) -> None:
        labels = HeightLabels(paths=str(NEON / "*_CHM.tif"), max_height=30.0)
        assert len(labels.files) == 3
        with rasterio.open(NEON / "TEAK_052.tif") as img:
            crs, transform, shape = img.crs, img.transform, img.shape
        assert [Path(labels.files[i].path).name for i in labels.overlapping(crs=crs, transform=transform, shape=shape)] == ["TEAK_052_CHM.tif"]
        heights = labels.read(crs=crs, transform=transform @ rasterio.Affine.scale(10), shape=(40, 40))
        ref = _chm("TEAK_052")
        np.testing.assert_array_equal(np.isnan(heights), ref > 30.0)
        assert np.nanmin(heights) >= 0.0
        clone = pickle.loads(pickle.dumps(labels))
        np.testing.assert_array_equal(clone.read(crs=crs, transform=transform @ rasterio.Affine.scale(10), shape=(40, 40)), heights)
        assert labels.coverage(crs=crs, transform=transform, shape=shape) == pytest.approx(1 - (ref > 30).mean(), abs=0.01)
        full = HeightLabels(paths=str(NEON / "*_CHM.tif"))
        assert full.coverage(crs=crs, transform=transform, shape=shape) == 1.0
        assert full.coverage(crs=crs, transform=transform @ rasterio.Affine.translation(300, 300), shape=shape) == pytest.approx(0.0625, abs=0.02)

    def test_each_thread_opens_its_own_files_and_close_releases_them(self) -> None:
        """GDAL handles are not thread-safe: reading threads must not share one (and close() lets them go)."""
        import threading

        labels = HeightLabels(paths=NEON / "TEAK_044_CHM.tif")
        with rasterio.open(NEON / "TEAK_044_CHM.tif") as chm:
            grid = dict(crs=chm.crs, transform=chm.transform, shape=chm.shape)
        expected = labels.read(**grid)
        mine = labels.mosaic.open(0)
        theirs, read_there = [], []

        def reader() -> None:
            theirs.append(labels.mosaic.open(0))
            read_there.append(labels.read(**grid))
            labels.close()

        thread = threading.Thread(target=reader)
        thread.start()
        thread.join()
        assert theirs[0] is not mine and theirs[0].closed and not mine.closed
        np.testing.assert_array_equal(read_there[0], expected)
        labels.close()
        assert mine.closed
        np.testing.assert_array_equal(labels.read(**grid), expected)  # reopened on the next read
        labels.close()

    def test_errors(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="resampling must be one of"):
            HeightLabels(paths=NEON / "TEAK_044_CHM.tif", resampling="mode")
        with pytest.raises(ValueError, match="band 2 is outside"):
            HeightLabels(paths=NEON / "TEAK_044_CHM.tif", band=2)
        bare = tmp_path / "bare.tif"
        with rasterio.open(bare, "w", driver="GTiff", width=4, height=4, count=1, dtype="float32") as dst:
            dst.write(np.ones((1, 4, 4), np.float32))
        with pytest.raises(ValueError, match="not georeferenced"):
            HeightLabels(paths=bare)
        with pytest.raises(FileNotFoundError):
            HeightLabels(paths=tmp_path / "nothing*.tif")


# ---------------------------------------------------------------------------------------------------- data module
class TestHeightDataModule:
    def _dm(self, **kw) -> HeightDataModule:
        args = dict(paths=str(NEON / "TEAK_0??.tif"), labels=str(NEON / "*_CHM.tif"), tile_size=128, gsd=0.2,
                    val_files=["TEAK_052.tif"], cache_dir=None, batch_size=2)  # fmt: skip
        args.update(kw)
        return HeightDataModule(**args)

    def test_split_by_file_and_targets_on_the_tile_grid(self) -> None:
        dm = self._dm()
        dm.setup("fit")
        names = [Path(r.path).name for r in dm.index.records]
        assert {names[t.file] for t in dm.train_tiles} == {"TEAK_044.tif", "TEAK_050.tif"}
        assert {names[t.file] for t in dm.val_tiles} == {"TEAK_052.tif"}
        batch = next(iter(dm.val_dataloader()))
        assert batch["image"].shape == (2, 3, 128, 128) and batch["target"].shape == (2, 128, 128)
        assert batch["target"].dtype == torch.float32
        sample = dm.dataset[dm.val_tiles[0]]
        direct = dm.label_source.read(crs=sample["crs"], transform=sample["transform"], shape=(128, 128))
        direct[~sample["valid"].numpy()] = np.nan
        np.testing.assert_array_equal(sample["target"].numpy(), direct)
        assert torch.isnan(sample["target"][~sample["valid"]]).all()

    def test_a_plot_held_out_for_the_test(self) -> None:
        dm = self._dm(test_files=["TEAK_050.tif"])
        dm.setup("test")
        names = [Path(r.path).name for r in dm.index.records]
        assert {names[t.file] for t in dm.train_tiles} == {"TEAK_044.tif"}
        assert {names[t.file] for t in dm.val_tiles} == {"TEAK_052.tif"}
        assert {names[t.file] for t in dm.test_tiles} == {"TEAK_050.tif"}
        assert next(iter(dm.test_dataloader()))["target"].shape == (2, 128, 128)

    def test_tiles_without_heights_are_skipped(self) -> None:
        dm = self._dm(labels=[str(NEON / "TEAK_044_CHM.tif"), str(NEON / "TEAK_052_CHM.tif")])
        dm.setup("fit")
        names = [Path(r.path).name for r in dm.index.records]
        assert {names[t.file] for t in dm.train_tiles} == {"TEAK_044.tif"}  # TEAK_050 has no CHM here
        assert all(dm.label_fraction(t) >= 0.5 for t in dm.train_tiles + dm.val_tiles)

    def test_chms_paired_by_name(self) -> None:
        """Each image with the CHM of its name (``TEAK_044.tif`` - ``TEAK_044_CHM.tif``) reads what the georeference
        finds where the plots do not overlap."""
        by_place, by_name = self._dm(), self._dm(label_pairing="name", label_name_suffixes=["_CHM"])
        by_place.setup("fit"), by_name.setup("fit")
        assert by_name.label_source.pairing == "name"
        assert by_name.train_tiles == by_place.train_tiles and by_name.val_tiles == by_place.val_tiles
        for tile in by_name.train_tiles[:3] + by_name.val_tiles[:2]:
            np.testing.assert_array_equal(by_name.dataset[tile]["target"].numpy(), by_place.dataset[tile]["target"].numpy())

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match="min_label_fraction must lie in"):
            self._dm(min_label_fraction=1.5)
        with pytest.raises(ValueError, match="match none of the images"):
            self._dm(val_files=["TEAK_999.tif"]).setup()
        with pytest.raises(ValueError, match="no validation tile"):
            self._dm(labels=str(NEON / "TEAK_044_CHM.tif")).setup()
        with pytest.raises(ValueError, match="no test tile has >= 50% reference height"):
            self._dm(labels=[str(NEON / "TEAK_044_CHM.tif"), str(NEON / "TEAK_052_CHM.tif")],
                     test_files=["TEAK_050.tif"]).setup()  # fmt: skip


# ---------------------------------------------------------------------------------------------------- task
class TestHeightTask:
    def test_even_layers(self) -> None:
        assert even_layers(24) == [5, 11, 17, 23] and even_layers(12) == [2, 5, 8, 11] and even_layers(4) == [0, 1, 2, 3]
        with pytest.raises(ValueError, match="1 <= n <= n_blocks"):
            even_layers(3)

    @pytest.mark.parametrize("head, output", [("dpt", "bins"), ("dpt", "regression"), ("linear", "bins")])
    def test_forward_in_metres_at_input_size(self, head: str, output: str) -> None:
        task = _tiny_task(head=head, output=output).eval()
        x = torch.randn(2, 3, 80, 48)
        with torch.no_grad():
            y = task(x)
        assert y.shape == (2, 1, 80, 48) and (y >= 0.001 - 1e-6).all() and (y <= 64.0 + 1e-4).all()
        assert task.model.layers == ([0, 1, 2, 3] if head == "dpt" else [3])

    @pytest.mark.parametrize("loss", ["sig", "l1", "huber"])
    def test_loss_ignores_nodata_and_invalid_pixels(self, loss: str) -> None:
        task = _tiny_task(loss=loss)
        target = torch.from_numpy(np.stack([_chm("TEAK_044")[:32, :32], _chm("TEAK_050")[:32, :32]]))
        pred = (target + torch.randn_like(target)).clamp_min(0)[:, None].requires_grad_(True)
        valid = torch.ones_like(target, dtype=torch.bool)
        valid[:, :8] = False
        dirty = target.clone()
        dirty[:, :8] = NODATA  # garbage under invalid pixels
        dirty[:, 30:] = float("nan")  # reference nodata
        keep = valid & ~torch.isnan(dirty)
        loss_value = task.loss_fn(pred, dirty, valid)
        reference = task.loss_fn(pred[:, 0][keep][None, None, None, :], target[keep][None, None, :])
        assert torch.isfinite(loss_value) and loss_value.item() == pytest.approx(reference.item(), rel=1e-5)
        loss_value.backward()
        assert (pred.grad[:, 0][~keep] == 0).all() and pred.grad[:, 0][keep].abs().sum() > 0

    def test_augmentation_keeps_image_and_heights_aligned(self) -> None:
        image = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
        heights = image[:, 0] * 10
        for k in range(8):
            a, h = dihedral(image, k), dihedral(heights, k)
            torch.testing.assert_close(a[:, 0] * 10, h)
        assert len({tuple(dihedral(image, k).flatten().tolist()) for k in range(8)}) == 8

    def test_frozen_backbone_only_head_trains(self) -> None:
        task = _tiny_task()
        groups = task.configure_optimizers()["optimizer"].param_groups
        assert [g["name"] for g in groups] == ["head"]
        assert not any(p.requires_grad for p in task.model.backbone.parameters())

    def test_lora_trains_the_updates_and_reloads(self, tmp_path: Path) -> None:
        """With ``lora``, the optimiser gets the head and the updates (at ``lr * lora_lr_scale``); a checkpoint of
        weights-file backbone plus updates rebuilds through :func:`load_height_model` with the same metres."""
        from dinov3_eo.models.lora import lora_parameters
        from dinov3_eo.models.vit import build_backbone

        weights = tmp_path / "backbone.pth"
        torch.save(build_backbone("vitmicro16", layerscale_init=1.0).state_dict(), weights)
        task = _tiny_task(backbone=None, weights=str(weights), lora={"rank": 4}, lora_lr_scale=2.0, lr=1e-3)
        groups = {g["name"]: g for g in task.configure_optimizers()["optimizer"].param_groups}
        assert set(groups) == {"head", "lora"} and groups["lora"]["lr"] == 2e-3
        with torch.no_grad():
            for p in lora_parameters(task.model.backbone):
                p.normal_(0, 0.05)
        ckpt = tmp_path / "h.ckpt"
        torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                    "dinov3_eo": task.backbone_meta().to_dict()}, ckpt)  # fmt: skip
        model = load_height_model(ckpt)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), task.model.eval()(x))

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="head must be one of"):
            _tiny_task(head="unet")
        with pytest.raises(ValueError, match="output must be one of"):
            _tiny_task(output="classes")
        with pytest.raises(ValueError, match="loss must be one of"):
            _tiny_task(loss="mse")
        with pytest.raises(ValueError, match="head='chmv2' predicts 256 bins"):
            _tiny_task(head="chmv2", output="regression")


# ---------------------------------------------------------------------------------------------------- CHMv2
class TestCHMv2:
    def test_official_head_layout_round_trip(self, tmp_path: Path) -> None:
        head = chmv2_head(embed_dim=1024)
        state = head.state_dict()
        assert len(state) == 68 and sum(v.numel() for v in state.values()) == pytest.approx(33.7e6, rel=0.01)
        path = tmp_path / "dinov3_vitl16_chmv2_dpt_head.pth"
        torch.save(state, path)
        loaded = load_chmv2_head(path)
        assert loaded.embed_dim == 1024
        for key, value in loaded.state_dict().items():
            torch.testing.assert_close(value, state[key], rtol=0, atol=0)
        broken = dict(state)
        broken["conv_depth.head.9.weight"] = broken.pop("conv_depth.head.4.weight")
        torch.save(broken, tmp_path / "broken.pth")
        with pytest.raises(ValueError, match="does not match DPTHead"):
            load_chmv2_head(tmp_path / "broken.pth")
        torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
        with pytest.raises(ValueError, match="not a CHMv2 DPT head"):
            load_chmv2_head(tmp_path / "other.pth")
        with pytest.raises(FileNotFoundError):
            load_chmv2_head(tmp_path / "missing.pth")

    @pytest.mark.slow
    def test_build_from_backbone_and_head_files(self, tmp_path: Path) -> None:
        # a 24-block micro ViT stands in for the SAT-493M ViT-L (same blocks read, same head layout)
        vit = build_backbone("vitmicro16", depth=24)
        torch.save(vit.state_dict(), tmp_path / "backbone.pth")
        head = chmv2_head(embed_dim=96)
        torch.save(head.state_dict(), tmp_path / "head.pth")
        model = build_chmv2(tmp_path / "backbone.pth", tmp_path / "head.pth")
        assert model.layers == [5, 11, 17, 23] and model.meta.normalization["name"] == "chmv2"
        assert model.meta.normalization["mean"] == [0.42, 0.411, 0.296]
        with torch.no_grad():
            y = model(torch.randn(1, 3, 32, 64))
        assert y.shape == (1, 1, 32, 64) and (y > 0).all() and (y <= 96.0).all()
        task = HeightTask(backbone="vitmicro16", backbone_kwargs={"depth": 24}, head="chmv2", head_weights=str(tmp_path / "head.pth"))
        torch.testing.assert_close(task.model.head.state_dict(), head.state_dict())
        with pytest.raises(ValueError, match="the head expects 96"):
            build_chmv2(build_backbone("vitt16", depth=24), tmp_path / "head.pth")
        with pytest.raises(ValueError, match="reads blocks"):
            build_chmv2(build_backbone("vitmicro16"), tmp_path / "head.pth")


# ---------------------------------------------------------------------------------------------------- rasters
class TestRasterPrediction:
    def test_output_georeferencing_nodata_and_gsd(self, tmp_path: Path) -> None:
        task = _tiny_task()
        model = task.model.eval()
        model.meta = task.backbone_meta()
        src = NEON / "TEAK_052.tif"
        out = predict_height(model, src, tmp_path / "chm.tif", normalization=_sat(), quicklook=tmp_path / "chm.png",
                             window=256, progress=False)  # fmt: skip
        with rasterio.open(src) as s, rasterio.open(out) as o:
            assert (o.crs, o.transform, o.shape, o.count) == (s.crs, s.transform, s.shape, 1)
            assert o.dtypes[0] == "float32" and math.isnan(o.nodata) and o.tags()["units"] == "metre"
            heights = o.read(1)
            invalid = (s.read() == 255).any(axis=0)
        np.testing.assert_array_equal(np.isnan(heights), invalid)
        assert (heights[~invalid] >= 0.001 - 1e-6).all()
        assert (tmp_path / "chm.png").stat().st_size > 1000
        with pytest.raises(FileExistsError, match="already exists"):
            predict_height(model, src, out, normalization=_sat(), progress=False)
        coarse = predict_height(model, src, tmp_path / "coarse.tif", normalization=_sat(), gsd=0.4, progress=False)
        with rasterio.open(coarse) as c:
            assert c.shape == (100, 100) and c.transform.a == pytest.approx(0.4) and c.transform.c == pytest.approx(321192.7)
        model.meta.normalization = None
        with pytest.raises(ValueError, match="no input normalisation"):
            predict_height(model, src, tmp_path / "x.tif", progress=False)

    def test_evaluate_against_reference_on_its_grid(self, tmp_path: Path) -> None:
        # the reference CHM itself, upsampled to 0.1 m, must score perfectly after averaging back to 1 m
        with rasterio.open(NEON / "TEAK_052.tif") as img:
            profile = dict(driver="GTiff", width=img.width, height=img.height, count=1, dtype="float32", crs=img.crs,
                           transform=img.transform, nodata=float("nan"))  # fmt: skip
        chm = np.maximum(_chm("TEAK_052"), 0)
        with rasterio.open(tmp_path / "pred.tif", "w", **profile) as dst:
            dst.write(np.kron(chm, np.ones((10, 10), np.float32))[None])
        result = evaluate_height_raster(tmp_path / "pred.tif", NEON / "TEAK_052_CHM.tif", out_dir=tmp_path / "eval")
        assert result["all"]["n"] == 1600 and result["all"]["mae"] == pytest.approx(0.0, abs=1e-5)
        assert result["all"]["r2"] == pytest.approx(1.0)
        assert {p.name for p in (tmp_path / "eval").iterdir()} == {"metrics.json", "scatter.png", "error_map.png"}
        # a reference without a georeference has no grid to resample the prediction onto
        with rasterio.open(NEON / "TEAK_052_CHM.tif") as ref:
            profile, values = ref.profile | {"crs": None}, ref.read()
        with rasterio.open(tmp_path / "bare.tif", "w", **profile) as dst:
            dst.write(values)
        with pytest.raises(ValueError, match=r"bare\.tif is not georeferenced"):
            evaluate_height_raster(tmp_path / "pred.tif", tmp_path / "bare.tif", out_dir=tmp_path / "eval2")
        assert not (tmp_path / "eval2").exists()

    def test_evaluate_reads_blocks_and_reference_tiles(self, tmp_path: Path) -> None:
        """The metrics do not depend on the block size, and a reference CHM cut into tiles (a folder or glob, as
        LiDAR CHMs ship) counts as the whole CHM; the scatter's sample is uniform over every block."""
        from dinov3_eo.tasks.height import _PairSample

        with rasterio.open(NEON / "TEAK_052.tif") as img:
            profile = dict(driver="GTiff", width=img.width, height=img.height, count=1, dtype="float32", crs=img.crs,
                           transform=img.transform, nodata=float("nan"))  # fmt: skip
        chm = np.maximum(_chm("TEAK_052"), 0)
        noisy = np.kron(chm, np.ones((10, 10), np.float32)) + np.random.default_rng(0).normal(0, 2, (400, 400))
        with rasterio.open(tmp_path / "pred.tif", "w", **profile) as dst:
            dst.write(noisy.astype(np.float32)[None])
        reference = NEON / "TEAK_052_CHM.tif"
        whole = evaluate_height_raster(tmp_path / "pred.tif", reference)
        assert whole["all"]["n"] == 1600 and whole["all"]["mae"] > 0.05
        blocks = evaluate_height_raster(tmp_path / "pred.tif", reference, block=7)  # 6 x 6 blocks, ragged edges
        (tmp_path / "tiles").mkdir()
        with rasterio.open(reference) as ref:
            for name, (r0, c0) in {"a": (0, 0), "b": (0, 17), "c": (23, 0), "d": (23, 17)}.items():
                window = rasterio.windows.Window(c0, r0, (17 if c0 == 0 else ref.width - 17),
                                                 (23 if r0 == 0 else ref.height - 23))
                with rasterio.open(tmp_path / "tiles" / f"{name}.tif", "w", **(ref.profile | {
                        "width": window.width, "height": window.height,
                        "transform": rasterio.windows.transform(window, ref.transform)})) as dst:  # fmt: skip
                    dst.write(ref.read(window=window))
        out = tmp_path / "eval"
        for tiles in (tmp_path / "tiles", str(tmp_path / "tiles" / "*.tif")):
            tiled = evaluate_height_raster(tmp_path / "pred.tif", tiles, out_dir=out, overwrite=True)
            for result in (blocks, tiled):
                for group in whole:
                    for key, value in whole[group].items():
                        assert result[group][key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), (group, key)
        assert len(json.loads((out / "metrics.json").read_text())["reference"]) == 4
        assert (out / "error_map.png").stat().st_size > 1000  # one panel per tile

        # LiDAR tiles with buffers: a and b share 6 columns, c and d 4 rows with a and b; each cell counts once
        (tmp_path / "buffered").mkdir()
        with rasterio.open(reference) as ref:
            for name, (r0, c0, r1, c1) in {"a": (0, 0, 25, 20), "b": (0, 14, 25, ref.width),
                                           "c": (21, 0, ref.height, 20), "d": (21, 14, ref.height, ref.width)}.items():
                window = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
                with rasterio.open(tmp_path / "buffered" / f"{name}.tif", "w", **(ref.profile | {
                        "width": window.width, "height": window.height,
                        "transform": rasterio.windows.transform(window, ref.transform)})) as dst:  # fmt: skip
                    dst.write(ref.read(window=window))
        buffered = evaluate_height_raster(tmp_path / "pred.tif", tmp_path / "buffered", out_dir=out, overwrite=True,
                                          block=9)  # fmt: skip
        for group in whole:
            for key, value in whole[group].items():
                assert buffered[group][key] == pytest.approx(value, rel=1e-9, abs=1e-9, nan_ok=True), (group, key)
        with rasterio.open(reference) as ref:
            values = ref.read(1, masked=True)
        cover = np.zeros(values.shape, int)
        for rows, cols in ((slice(0, 25), slice(0, 20)), (slice(0, 25), slice(14, None)),
                           (slice(21, None), slice(0, 20)), (slice(21, None), slice(14, None))):
            cover[rows, cols] += 1
        shared = int(((cover - 1) * (~np.ma.getmaskarray(values) & np.isfinite(values.filled(np.nan)))).sum())
        assert json.loads((out / "metrics.json").read_text())["reference_overlap_pixels"] == shared > 0

        # a tile in another CRS claims the pixels whose centres it covers, by their reprojected centres
        from rasterio.crs import CRS
        from rasterio.warp import transform_bounds

        from dinov3_eo.data.labels import RasterMosaic

        utm = RasterMosaic(reference).files[0]
        with rasterio.open(reference) as ref:
            west, south, east, north = transform_bounds(ref.crs, "EPSG:4326", *ref.bounds)
        wgs84 = {"crs": CRS.from_epsg(4326), "shape": (10, 10)}
        inner = rasterio.transform.from_bounds(
            west + (east - west) / 4, south + (north - south) / 4, east - (east - west) / 4, north - (north - south) / 4,
            10, 10)  # fmt: skip
        assert utm.centres_inside(transform=inner, **wgs84).all()
        straddling = rasterio.transform.from_bounds((west + east) / 2, south, east + (east - west), north, 10, 10)
        covered = utm.centres_inside(transform=straddling, **wgs84)
        assert covered[:, :3].all() and not covered[:, 6:].any()
        beside = rasterio.transform.from_bounds(east, south, 2 * east - west, north, 10, 10)
        assert not utm.centres_inside(transform=beside, **wgs84).any()  # abutting: shares an edge, claims no pixel

        sample = _PairSample(100, seed=0)
        values = np.arange(1000, dtype=np.float32).reshape(10, 100)
        for row in values:
            sample.add(row, row)  # ten blocks of 100 pairs
        picked, again = sample.pairs()
        assert len(picked) == 100 and len(set(picked.tolist())) == 100 and np.array_equal(picked, again)
        assert 300 < picked.mean() < 700  # drawn from every block, not the first ones
        small = _PairSample(100, seed=0)
        small.add(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, 3.0]))
        assert sorted(small.pairs()[0].tolist()) == [1.0, 3.0]


def _sat():
    from dinov3_eo.data.normalization import Normalization

    return Normalization.preset("sat493m")


# ---------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_cli_fit_exits_without_teardown_errors(tmp_path: Path) -> None:
    """A CHM file left open until the interpreter's final teardown made every ``height fit`` end with a bare
    "Error in sys.excepthook" (rasterio's ``__del__`` failing there): the command's own process must exit cleanly."""
    import subprocess
    import sys

    config = Path(__file__).resolve().parents[1] / "configs" / "height" / "neon_tiny_cpu.yaml"
    out = subprocess.run([
        sys.executable, "-m", "dinov3_eo", "height", "fit", "--config", str(config), "--trainer.max_steps=1",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}", f"--data.paths={NEON}/TEAK_0??.tif",
        f"--data.labels={NEON}/TEAK_0??_CHM.tif", "--data.tile_size=64", "--data.gsd=0.4", "--data.batch_size=2",
    ], capture_output=True, text=True, timeout=300, env=os.environ | {"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Error in sys.excepthook" not in out.stderr and "Exception ignored" not in out.stderr


@pytest.mark.slow
def test_cli_fit_predict_evaluate_on_neon(tmp_path: Path) -> None:
    """``dinov3-eo height fit`` (a few steps on the NEON plots), then ``predict`` and ``evaluate`` from the checkpoint."""
    data = tmp_path / "neon"
    shutil.copytree(NEON, data)
    root = tmp_path / "run"
    assert main([
        "fit", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "height" / "neon_tiny_cpu.yaml"),
        "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={root}",
        f"--data.paths={data}/TEAK_0??.tif", f"--data.labels={data}/TEAK_0??_CHM.tif", "--data.tile_size=64",
        "--data.gsd=0.4", "--data.batch_size=2",
    ]) == 0  # fmt: skip
    logs = next(root.glob("lightning_logs/version_*"))
    assert {"val_metrics.json", "val_scatter.png", "val_error_map.png", "val_intervals.json"} <= {p.name for p in logs.iterdir()}
    from dinov3_eo.tasks.height_intervals import HeightIntervals

    val_intervals = HeightIntervals.load(logs / "val_intervals.json")  # calibrated on the validation plot's pixels
    assert val_intervals.coverage == 0.9 and sum(val_intervals.pixels) == json.loads(
        (logs / "val_metrics.json").read_text())["metrics"]["all"]["n"]
    report = json.loads((logs / "val_metrics.json").read_text())
    assert report["step"] == 3 and report["metrics"]["all"]["n"] > 0 and set(report["metrics"]) == {"all", "0-5", "5-10", "10-20", "20+"}
    ckpt = logs / "checkpoints" / "last.ckpt"
    # a plot held out for the test (the config validates on TEAK_052): scored with the checkpoint, reported beside
    assert main([
        "test", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "height" / "neon_tiny_cpu.yaml"),
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path / 'test'}", "--trainer.logger=false",
        f"--data.paths={data}/TEAK_0??.tif", f"--data.labels={data}/TEAK_0??_CHM.tif", "--data.tile_size=64",
        "--data.gsd=0.4", "--data.batch_size=2", '--data.test_files=["TEAK_050.tif"]', f"--ckpt_path={ckpt}",
    ]) == 0  # fmt: skip
    tested = json.loads((tmp_path / "test" / "test_metrics.json").read_text())
    assert tested["checkpoint"] == str(ckpt) and tested["metrics"]["all"]["n"] > 0
    assert {"test_scatter.png", "test_error_map.png"} <= {p.name for p in (tmp_path / "test").iterdir()}
    stored = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert stored["dinov3_eo"]["normalization"]["name"] == "sat493m" and stored["dinov3_eo"]["gsd"] == 0.4

    model = load_height_model(ckpt)
    assert model.meta.gsd == 0.4 and not model.training
    out = tmp_path / "chm.tif"
    assert main(["predict", str(data / "TEAK_052.tif"), "--model", str(ckpt), "-o", str(out), "--gsd", "model", "--quiet"]) == 0
    with rasterio.open(out) as o:
        assert o.shape == (100, 100) and o.crs.to_epsg() == 32611 and o.dtypes[0] == "float32"
        heights = o.read(1)
    assert np.isfinite(heights).mean() > 0.9 and out.with_suffix(".png").exists()
    # the streamed COG equals the checkpoint's model applied to the whole (resampled, normalised) plot
    with rasterio.open(data / "TEAK_052.tif") as s:
        raw = s.read(out_shape=(3, 100, 100), resampling=Resampling.average).astype(np.float32)
    with torch.no_grad():
        direct = model(_sat()(torch.from_numpy(raw))[None])[0, 0].numpy()
    inside = np.isfinite(heights)
    assert np.median(np.abs(direct[inside] - heights[inside])) < 0.5
    # --bf16: the same raster within bf16 rounding (heights of ~0-60 m, 8 significant bits)
    out16 = tmp_path / "chm_bf16.tif"
    assert main(["predict", str(data / "TEAK_052.tif"), "--model", str(ckpt), "-o", str(out16), "--gsd", "model",
                 "--bf16", "--quiet"]) == 0  # fmt: skip
    with rasterio.open(out16) as o:
        heights16 = o.read(1)
    assert (np.isfinite(heights16) == inside).all()
    assert np.abs(heights16[inside] - heights[inside]).max() < 0.02 * max(1.0, np.abs(heights[inside]).max())
    # --tta d4: the mean of 8 views' metres, the same nodata, close to the single view's
    out_tta = tmp_path / "chm_tta.tif"
    assert main(["predict", str(data / "TEAK_052.tif"), "--model", str(ckpt), "-o", str(out_tta), "--gsd", "model",
                 "--tta", "d4", "--no-quicklook", "--quiet"]) == 0  # fmt: skip
    with rasterio.open(out_tta) as o:
        heights_tta = o.read(1)
        assert o.tags()["tta"] == "d4"
    assert (np.isfinite(heights_tta) == inside).all()
    assert 0 < np.median(np.abs(heights_tta[inside] - heights[inside])) < 0.5 * max(1.0, np.median(np.abs(heights[inside])))
    assert main(["evaluate", str(out), str(data / "TEAK_052_CHM.tif"), "--out-dir", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["all"]["n"] == 1600
    with pytest.raises(FileExistsError, match="already exists"):  # an earlier report is kept unless --overwrite
        main(["evaluate", str(out), str(data / "TEAK_052_CHM.tif"), "--out-dir", str(tmp_path / "eval")])
    assert main(["evaluate", str(out), str(data / "TEAK_052_CHM.tif"), "--out-dir", str(tmp_path / "eval"),
                 "--overwrite"]) == 0  # fmt: skip
    # intervals calibrated on the plot's map and CHM, then written beside a map of it: each pixel's height ± its bin's
    intervals = tmp_path / "intervals.json"
    assert main(["evaluate", str(out), str(data / "TEAK_052_CHM.tif"), "--calibrate", str(intervals)]) == 0
    out_i = tmp_path / "chm_i.tif"
    assert main(["predict", str(data / "TEAK_052.tif"), "--model", str(ckpt), "-o", str(out_i), "--gsd", "model",
                 "--intervals", str(intervals), "--quiet"]) == 0  # fmt: skip
    from dinov3_eo.tasks.height_intervals import HeightIntervals

    with rasterio.open(out_i) as o, rasterio.open(tmp_path / "chm_i_interval.tif") as e:
        assert e.count == 2 and e.transform == o.transform and e.units == ("m", "m")
        lower, upper = HeightIntervals.load(intervals).bounds(o.read(1))
        np.testing.assert_array_equal(e.read(1), lower)
        np.testing.assert_array_equal(e.read(2), upper)
    assert (tmp_path / "chm_i_interval.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="missing.json' do not exist"):  # said before the prediction
        main(["predict", str(data / "TEAK_052.tif"), "--model", str(ckpt), "-o", str(tmp_path / "z.tif"), "--intervals",
              str(tmp_path / "missing.json"), "--quiet"])  # fmt: skip
    assert not (tmp_path / "z.tif").exists()
    with pytest.raises(SystemExit):
        main(["predict", str(data / "TEAK_052.tif"), "--chmv2-head", str(ckpt), "-o", str(tmp_path / "y.tif")])


@pytest.mark.parametrize("config", sorted((Path(__file__).resolve().parents[1] / "configs" / "height").glob("*.yaml")), ids=lambda p: p.name)
def test_configs_parse(config: Path, capsys: pytest.CaptureFixture) -> None:
    """Every height config maps one-to-one onto HeightTask / HeightDataModule arguments (a data block without a
    class_path is HeightDataModule's, as before image chips could be chosen)."""
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "\nmodel:\n  backbone:" in printed and "label_resampling: bilinear" in printed
    assert "\ndata:\n  class_path: dinov3_eo.tasks.height_data.HeightDataModule\n  init_args:\n    paths:" in printed


@pytest.mark.parametrize("loss", ["l1", "huber", "sig"])
def test_a_training_step_never_reads_back_from_the_device(monkeypatch: pytest.MonkeyPatch, loss: str) -> None:
    """On meta tensors (a stand-in for a GPU) any device-to-host read raises; see tests/meta_device.py."""
    allow_meta_autocast(monkeypatch)
    task = _tiny_task(loss=loss, freeze_backbone=False)
    task.to_empty(device="meta")
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)
    batch = {"image": torch.empty(2, 3, 32, 32, device="meta"), "target": torch.empty(2, 32, 32, device="meta"),
             "valid": torch.empty(2, 32, 32, dtype=torch.bool, device="meta")}
    with HostToDeviceCopies() as copies:
        task.training_step(batch, 0).backward()
    assert not copies.copies
