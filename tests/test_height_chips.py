"""Canopy height on image chips without a georeference: CHM chips read as metres, windows, the data module, and
``dinov3-eo height fit / test / predict --chips`` with ``data.class_path: ChipHeightDataModule``.

The chips are the three real NEON plots of ``tests/data/neon`` (CC0) with their georeference dropped: each RGB
orthophoto saved as a plain PNG (400 x 400 px) and its LiDAR CHM (40 x 40 at 1 m) brought onto the photo's pixel
grid (bilinear, nodata-aware, as ``HeightDataModule`` warps it) and saved as a float TIFF without georeference,
``<plot>_chm.tif``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from dinov3_eo.tasks.height import main
from dinov3_eo.tasks.height_data import ChipHeightDataModule, HeightLabels, read_chip_heights

NEON = Path(__file__).resolve().parent / "data" / "neon"
PLOTS = ["TEAK_044", "TEAK_050", "TEAK_052"]


def plain_tiff(path: Path, values: np.ndarray, nodata: float | None = None) -> None:
    with rasterio.open(path, "w", driver="GTiff", width=values.shape[1], height=values.shape[0], count=1,
                       dtype=values.dtype.name, nodata=nodata) as dst:  # fmt: skip
        dst.write(values[None])


@pytest.fixture(scope="module")
def chips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("height_chips")
    (root / "images").mkdir(), (root / "chm").mkdir()
    labels = HeightLabels(paths=[str(NEON / f"{p}_CHM.tif") for p in PLOTS])
    for plot in PLOTS:
        with rasterio.open(NEON / f"{plot}.tif") as src:
            Image.fromarray(src.read().transpose(1, 2, 0)).save(root / "images" / f"{plot}.png")
            heights = labels.sample(crs=src.crs, transform=src.transform, shape=src.shape)["target"].numpy()
        plain_tiff(root / "chm" / f"{plot}_chm.tif", np.nan_to_num(heights, nan=-9999.0).astype(np.float32), -9999.0)
    labels.close()
    return root


def module(chips: Path, **kwargs) -> ChipHeightDataModule:
    settings = dict(images=str(chips / "images"), heights=str(chips / "chm"), label_name_suffixes=["_chm"],
                    tile_size=128, batch_size=4, val_files=["TEAK_052.png"])  # fmt: skip
    return ChipHeightDataModule(**{**settings, **kwargs})


def test_chm_chips_read_as_metres(tmp_path: Path) -> None:
    values = np.array([[1.5, -9999.0], [np.nan, 70.0]], np.float32)
    plain_tiff(tmp_path / "a.tif", values, -9999.0)
    assert np.array_equal(read_chip_heights(str(tmp_path / "a.tif")), [[1.5, np.nan], [np.nan, 70.0]], equal_nan=True)
    assert np.array_equal(read_chip_heights(str(tmp_path / "a.tif"), max_height=60), [[1.5, np.nan], [np.nan, np.nan]],
                          equal_nan=True)  # fmt: skip
    Image.fromarray(np.array([[0, 155], [255, 1000]], np.uint16)).save(tmp_path / "dm.png")  # decimetres, 0 = none
    np.testing.assert_allclose(read_chip_heights(str(tmp_path / "dm.png"), nodata=0, scale=0.1),
                               [[np.nan, 15.5], [25.5, 100.0]], rtol=1e-6)  # fmt: skip
    (tmp_path / "bad.tif").write_bytes(b"II*\x00 not really")
    with pytest.raises(ValueError, match="CHM chip .*bad.tif could not be read"):
        read_chip_heights(str(tmp_path / "bad.tif"))


def test_windows_carry_the_chips_heights(chips: Path) -> None:
    """The training windows put back together are each plot's CHM chip (NaN in the padding); the split is by plot;
    statistics come from the training plots; the checkpoint metadata names the bands."""
    data = module(chips, normalization="none", min_label_fraction=0.0)
    data.setup("fit")
    assert [Path(data.headers[i].path).name for i in data.train_chips] == ["TEAK_044.png", "TEAK_050.png"]
    assert [Path(data.headers[i].path).name for i in data.val_chips] == ["TEAK_052.png"]
    train = data.dataset("train")
    assert len(train) == 2 * 16  # 400 px in 128-px windows: 4 x 4 per plot, the last row and column padded
    # at the default 10 %, each plot's corner window (16 x 16 px of heights) is left out
    assert len(module(chips, normalization="none").dataset("train")) == 2 * 15
    for chip in data.train_chips:
        plot = Path(data.headers[chip].path).stem
        expected = read_chip_heights(str(chips / "chm" / f"{plot}_chm.tif"))
        pixels = np.asarray(Image.open(chips / "images" / f"{plot}.png")).transpose(2, 0, 1).astype(np.float32)
        canvas, image = np.full((512, 512), np.nan, np.float32), np.zeros((3, 512, 512), np.float32)
        for i, window in enumerate(train.windows):
            if window.chip == chip:
                sample = train[i]
                canvas[window.top : window.top + 128, window.left : window.left + 128] = sample["target"].numpy()
                image[:, window.top : window.top + 128, window.left : window.left + 128] = sample["image"].numpy()
        # (a PNG declares no nodata: every pixel of the photo counts, its white 255 ones too)
        assert np.array_equal(canvas[:400, :400], expected, equal_nan=True)
        assert np.isnan(canvas[400:]).all() and np.isnan(canvas[:, 400:]).all()
        assert np.array_equal(image[:, :400, :400], pixels)
        assert sample["valid"].dtype == torch.bool and sample["target"].dtype == torch.float32
    assert data.metadata()["bands"] == ["red", "green", "blue"]
    zscore = module(chips)
    zscore.setup("fit")
    assert zscore.normalization.name == "zscore" and zscore.normalization.num_bands == 3


def test_windows_without_heights_are_left_out(chips: Path, tmp_path: Path) -> None:
    (tmp_path / "chm").mkdir()
    for plot in PLOTS:
        heights = read_chip_heights(str(chips / "chm" / f"{plot}_chm.tif"))
        if plot == "TEAK_044":
            heights[:, 200:] = np.nan  # the plot's right half has no LiDAR
        plain_tiff(tmp_path / "chm" / f"{plot}_chm.tif", np.nan_to_num(heights, nan=-1.0), -1.0)
    data = module(chips, heights=str(tmp_path / "chm"), min_label_fraction=0.5)
    data.setup("fit")
    kept = [w for w in data.dataset("train").windows if w.chip == data.train_chips[0]]
    assert sorted({w.left for w in kept}) == [0, 128]  # windows from 256 on hold no (or too few) heights
    with pytest.raises(ValueError, match="min_label_fraction must lie in"):
        module(chips, min_label_fraction=2)
    none = tmp_path / "none"
    none.mkdir()
    for plot in PLOTS:
        plain_tiff(none / f"{plot}_chm.tif", np.full((400, 400), -1.0, np.float32), -1.0)
    with pytest.raises(ValueError, match="no training window has >= 10% of its pixels with a height"):
        module(chips, heights=str(none)).setup("fit")
    small = tmp_path / "small"
    small.mkdir()
    for plot in PLOTS:
        plain_tiff(small / f"{plot}_chm.tif", np.ones((40, 40), np.float32))
    with pytest.raises(ValueError, match="TEAK_044_chm.tif is 40x40 px but its image .*TEAK_044.png is 400x400 px"):
        module(chips, heights=str(small)).setup("fit")


def test_height_fit_test_and_predict_on_chips(chips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``height fit`` with ``data.class_path: ChipHeightDataModule`` (two plots train, one validates), ``height
    test`` on a held-out plot (every reference height scored once), ``height predict --chips`` on a chip (a TIFF of
    metres on its pixel grid, without georeference, the heights of the same pixels predicted as the georeferenced
    orthophoto), ``height evaluate --chips`` of it, and a chip refused without ``--chips``."""
    config = tmp_path / "chips.yaml"
    config.write_text(f"""
trainer:
  accelerator: cpu
  max_epochs: 2
  enable_progress_bar: false
  default_root_dir: {tmp_path / "fit"}
  logger: {{class_path: lightning.pytorch.loggers.CSVLogger, init_args: {{save_dir: {tmp_path / "fit"}}}}}
model: {{backbone: vitmicro16, in_chans: 3, lr: 0.001}}
data:
  class_path: ChipHeightDataModule
  init_args:
    images: {chips / "images"}
    heights: {chips / "chm"}
    label_name_suffixes: [_chm]
    val_files: [TEAK_052.png]
    test_files: [TEAK_050.png]
    tile_size: 128
    batch_size: 4
""")
    assert main(["fit", "--config", str(config)]) == 0
    # (a logger merges the task's and the data's hyper-parameters: no name may mean two things)
    (checkpoint,) = (tmp_path / "fit").rglob("checkpoints/*.ckpt")
    meta = torch.load(checkpoint, map_location="cpu", weights_only=False)["dinov3_eo"]
    assert meta["bands"] == ["red", "green", "blue"] and meta["normalization"]["name"] == "zscore"
    assert (checkpoint.parent.parent / "val_metrics.json").exists()
    assert main(["test", "--config", str(config), "--ckpt_path", str(checkpoint), "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path / "test")]) == 0  # fmt: skip
    tested = json.loads((tmp_path / "test" / "test_metrics.json").read_text())
    expected = np.isfinite(read_chip_heights(str(chips / "chm" / "TEAK_050_chm.tif")))
    assert tested["metrics"]["all"]["n"] == int(expected.sum())

    chip = chips / "images" / "TEAK_052.png"
    window = ["--window", "128", "--overlap", "32", "--quiet"]
    (tmp_path / "pred").mkdir()
    assert main(["predict", str(chip), "--chips", "--model", str(checkpoint), "-o", str(tmp_path / "pred" / "TEAK_052.tif"),
                 *window]) == 0  # fmt: skip
    assert main(["predict", str(NEON / "TEAK_052.tif"), "--model", str(checkpoint), "-o", str(tmp_path / "geo.tif"),
                 *window]) == 0  # fmt: skip
    with rasterio.open(tmp_path / "pred" / "TEAK_052.tif") as plain, rasterio.open(tmp_path / "geo.tif") as geo:
        assert plain.crs is None and geo.crs is not None and plain.shape == geo.shape == (400, 400)
        a, b = plain.read(1), geo.read(1)
    # the PNG declares no nodata, so its white pixels are heights too; elsewhere the same metres (up to where the
    # GeoTIFF's nodata, fed as 0, changed a window's context)
    seen = np.isfinite(b)
    close = np.abs(a[seen] - b[seen]) < 1e-3
    assert np.isfinite(a).all() and 0.9 < seen.mean() < 1 and close.mean() > 0.9
    assert (tmp_path / "pred" / "TEAK_052.png").exists()
    # scored against its CHM chip by name, pixel for pixel: the MAE of the pixels with both
    assert main(["evaluate", str(tmp_path / "pred"), str(chips / "chm"), "--chips", "--name-suffixes", "_chm",
                 "--out-dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())["metrics"]["all"]
    truth = read_chip_heights(str(chips / "chm" / "TEAK_052_chm.tif"))
    both = np.isfinite(truth) & np.isfinite(a)
    assert scored["n"] == int(both.sum()) and scored["mae"] == pytest.approx(np.abs(a - truth)[both].mean(), rel=1e-4)
    assert {"scatter.png", "error_map.png"} <= {p.name for p in (tmp_path / "eval").iterdir()}
    # chips calibrate height intervals as rasters do: the same pixels' errors, binned by predicted height
    assert main(["evaluate", str(tmp_path / "pred"), str(chips / "chm"), "--chips", "--name-suffixes", "_chm",
                 "--calibrate", str(tmp_path / "intervals.json"), "--coverage", "0.8"]) == 0  # fmt: skip
    from dinov3_eo.tasks.height_intervals import HeightIntervals, ResidualHistogram

    errors = ResidualHistogram()
    errors.add(a, truth)
    calibrated = HeightIntervals.load(tmp_path / "intervals.json")
    assert sum(calibrated.pixels) == scored["n"] and calibrated.half_widths == errors.intervals(0.8).half_widths
    (tmp_path / "small").mkdir()
    plain_tiff(tmp_path / "small" / "TEAK_052_chm.tif", np.ones((40, 40), np.float32))
    with pytest.raises(ValueError, match="TEAK_052.tif are 400x400 px but the CHM chip .* is 40x40 px"):
        main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "small"), "--chips", "--name-suffixes", "_chm"])
    with pytest.raises(FileNotFoundError, match="has a CHM chip of its name"):
        main(["evaluate", str(tmp_path / "pred"), str(chips / "chm"), "--chips"])  # without _chm dropped
    with pytest.raises(ValueError, match="TEAK_052.png is not georeferenced .* pass --chips"):
        main(["predict", str(chip), "--model", str(checkpoint), "-o", str(tmp_path / "x.tif"), *window])
    with pytest.raises(ValueError, match="no pixel size to resample from"):
        main(["predict", str(chip), "--chips", "--gsd", "0.5", "--model", str(checkpoint), "-o", str(tmp_path / "y.tif"), *window])
    assert not (tmp_path / "x.tif").exists() and not (tmp_path / "y.tif").exists()


def test_a_chip_config_gets_its_own_defaults_and_a_plain_one_stays_geotiffs(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """A config naming ``ChipHeightDataModule`` gets that module's defaults (zscore, 10 %), not those of the default
    ``HeightDataModule`` (sat493m, 50 %), which jsonargparse carries over when a class replaces a parser default."""
    config = tmp_path / "c.yaml"
    config.write_text("model: {backbone: vitmicro16}\ndata:\n  class_path: ChipHeightDataModule\n"
                      "  init_args: {images: a, heights: b}\n")  # fmt: skip
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: dinov3_eo.tasks.height_data.ChipHeightDataModule" in printed
    assert "    normalization: zscore\n" in printed and "    min_label_fraction: 0.1\n" in printed
    with pytest.raises(SystemExit):
        main(["fit", "--model.backbone", "vitmicro16", "--data.paths", "x.tif", "--data.labels", "y.tif", "--print_config"])
    assert "class_path: dinov3_eo.tasks.height_data.HeightDataModule" in capsys.readouterr().out
