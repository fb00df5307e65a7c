"""Canopy height change (``dinov3-eo height change``) on a real NEON LiDAR CHM with a known harvest and growth."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.height_change import (
    GAIN,
    LOSS,
    STABLE,
    UNSURE_GAIN,
    UNSURE_LOSS,
    classify_height_change,
    height_change,
)

CHM = Path(__file__).resolve().parent / "data" / "neon" / "TEAK_044_CHM.tif"  # 40 x 40 m at 1 m, NEON (CC0)
HARVEST = (slice(8, 20), slice(5, 25))


@pytest.fixture(scope="module")
def chms(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The real CHM as the before date; after: a 12 x 20 m stand cut to 0.5 m, 1 m of growth elsewhere, a nodata
    hole. The same after date at 2 m pixels too (so it must be brought onto the 1 m grid)."""
    folder = tmp_path_factory.mktemp("chm")
    with rasterio.open(CHM) as src:
        before, profile = src.read(1), src.profile
    after = before + 1.0
    after[HARVEST] = 0.5
    after[30:33, 30:33] = profile["nodata"]
    path = folder / "after.tif"
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(after, 1)
    coarse = folder / "after_2m.tif"
    with rasterio.open(CHM) as src:
        coarse_profile = {**profile, "width": 20, "height": 20, "transform": src.transform @ rasterio.Affine.scale(2),
                          "blockxsize": 16, "blockysize": 16, "tiled": True}  # fmt: skip
    with rasterio.open(coarse, "w", **coarse_profile) as dst:
        dst.write(np.where(after == profile["nodata"], np.nan, after).reshape(20, 2, 20, 2).mean(axis=(1, 3)), 1)
    return {"before": before, "after": after, "after_path": path, "coarse": coarse, "nodata": profile["nodata"]}


def test_classes_follow_the_thresholds() -> None:
    before = np.array([10.0, 10.0, 3.0, 10.0, np.nan, 10.0])
    delta = np.array([-6.0, -4.0, -3.0, 6.0, 1.0, np.nan])
    got = classify_height_change(before, delta, threshold=5.0, min_height=5.0)
    assert got.tolist() == [LOSS, STABLE, STABLE, GAIN, 255, 255]  # 3 m shrub cannot be "lost"


def test_height_change_on_the_same_grid(chms: dict, tmp_path: Path) -> None:
    summary = height_change(CHM, chms["after_path"], tmp_path / "dh.tif", polygons=tmp_path / "loss.gpkg",
                            quicklook=tmp_path / "dh.png", block=16)  # fmt: skip
    with rasterio.open(summary.change) as src, rasterio.open(CHM) as ref:
        assert (src.crs, src.transform, src.shape) == (ref.crs, ref.transform, ref.shape)
        assert src.tags()["units"] == "metre"
        delta = src.read(1)
    hole = chms["after"] == chms["nodata"]
    np.testing.assert_array_equal(np.isnan(delta), hole)
    expected = chms["after"] - chms["before"]
    np.testing.assert_allclose(delta[~hole], expected[~hole], atol=1e-6)
    with rasterio.open(summary.classes) as src:
        classes = src.read(1)
    lost = np.zeros(hole.shape, dtype=bool)
    lost[HARVEST] = chms["before"][HARVEST] - 0.5 >= 5.0
    lost &= chms["before"] >= 5.0
    np.testing.assert_array_equal(classes == LOSS, lost)
    assert not (classes == GAIN).any()  # 1 m of growth is below the 5 m threshold
    assert summary.loss_pixels == lost.sum() > 50 and summary.valid_pixels == (~hole).sum()
    assert summary.loss_ha == pytest.approx(lost.sum() / 10_000)
    assert summary.mean_change_m == pytest.approx(expected[~hole].mean(), abs=1e-5)
    frame = gpd.read_file(summary.polygons)
    assert set(frame["class_name"]) == {"loss"} and frame.area.sum() == pytest.approx(lost.sum())
    assert summary.quicklook.stat().st_size > 5_000


def test_height_change_brings_a_coarser_chm_onto_the_grid(chms: dict, tmp_path: Path) -> None:
    summary = height_change(CHM, chms["coarse"], tmp_path / "dh.tif", resampling=Resampling.nearest)
    with rasterio.open(summary.change) as src:
        delta = src.read(1)
    coarse_after = rasterio.open(chms["coarse"]).read(1).repeat(2, axis=0).repeat(2, axis=1)
    expected = coarse_after - chms["before"]
    seen = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(delta), seen)
    np.testing.assert_allclose(delta[seen], expected[seen], atol=1e-5)
    with pytest.raises(ValueError, match="must be >= 0"):
        height_change(CHM, chms["coarse"], tmp_path / "x.tif", threshold=-1)


def test_height_change_command(chms: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dh.tif"
    args = ["height", "change", str(CHM), str(chms["after_path"]), "-o", str(out), "--polygons", str(tmp_path / "l.gpkg")]
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "loss" in printed and " ha," in printed and "mean change" in printed
    assert {p.name for p in tmp_path.iterdir()} >= {"dh.tif", "dh_classes.tif", "dh.png", "l.gpkg"}
    assert cli_main(args) == 2 and "already exists" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite", "--threshold", "0.5", "--no-quicklook"]) == 0
    with rasterio.open(tmp_path / "dh_classes.tif") as src:
        assert (src.read(1) == GAIN).sum() > 1000  # now 1 m of growth counts
    assert cli_main(["height", "change", str(CHM), str(tmp_path / "none.tif"), "-o", str(tmp_path / "y.tif")]) == 2


def test_unsure_classes_follow_the_change_interval() -> None:
    before = np.array([10.0, 10.0, 10.0, 2.0, 10.0, 10.0])
    delta = np.array([-8.0, -8.0, 6.0, 6.0, -8.0, 1.0])
    lower = np.array([-11.0, -11.0, 3.0, -1.0, np.nan, -2.0])
    upper = np.array([-5.0, 0.5, 9.0, 13.0, np.nan, 4.0])
    got = classify_height_change(before, delta, threshold=5.0, min_height=5.0, lower=lower, upper=upper)
    assert got.tolist() == [LOSS, UNSURE_LOSS, GAIN, UNSURE_GAIN, UNSURE_LOSS, STABLE]


def _interval_raster(path: Path, heights: np.ndarray, half: np.ndarray, profile: dict, coverage: float) -> Path:
    with rasterio.open(path, "w", **{**profile, "count": 2, "dtype": "float32", "nodata": float("nan")}) as dst:
        dst.write(np.stack([heights - half, heights + half]).astype(np.float32))
        dst.update_tags(coverage=str(coverage))
    return path


def test_height_change_with_the_dates_intervals(chms: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Both dates ± 1.5 m, except ± 4 m over a stand that lost 6 m: the harvest is loss (its interval is far below
    zero), the 6 m drop is 'loss?' (its ± 8 m interval reaches zero); the change's interval is the intervals'
    difference, at least 80 % from two 90 % intervals."""
    with rasterio.open(CHM) as src:
        profile = src.profile
    before = np.where(chms["before"] == chms["nodata"], np.nan, chms["before"])
    after = before + 1.0
    after[HARVEST] = 0.5
    drop = (slice(25, 32), slice(4, 16))
    after[drop] = before[drop] - 6.0
    half = np.full(before.shape, 1.5)
    half[drop] = 4.0
    b, a = tmp_path / "b.tif", tmp_path / "a.tif"
    for path, heights in ((b, before), (a, after)):
        with rasterio.open(path, "w", **{**profile, "nodata": float("nan")}) as dst:
            dst.write(heights.astype(np.float32), 1)
    _interval_raster(tmp_path / "b_interval.tif", before, half, profile, 0.9)
    _interval_raster(tmp_path / "a_interval.tif", after, half, profile, 0.9)
    assert cli_main(["height", "change", str(b), str(a), "-o", str(tmp_path / "dh.tif"), "--intervals"]) == 0
    printed = capsys.readouterr().out
    assert "unsure (the change's interval, at least 80 %, reaches zero): loss?" in printed and "dh_interval.tif" in printed
    delta = after - before
    with rasterio.open(tmp_path / "dh_interval.tif") as src:
        assert src.count == 2 and float(src.tags()["coverage"]) == pytest.approx(0.8)
        lower, upper = src.read(1), src.read(2)
    seen = np.isfinite(delta)
    np.testing.assert_allclose(lower[seen], (delta - 2 * half)[seen], atol=1e-5)
    np.testing.assert_allclose(upper[seen], (delta + 2 * half)[seen], atol=1e-5)
    with rasterio.open(tmp_path / "dh_classes.tif") as src:
        classes = src.read(1)
        assert json.loads(src.tags()["class_names"]) == ["stable", "loss", "gain", "loss?", "gain?"]
    passes = seen & (before >= 5.0) & (delta <= -5.0)
    np.testing.assert_array_equal(classes == LOSS, passes & (delta + 2 * half < 0))
    np.testing.assert_array_equal(classes == UNSURE_LOSS, passes & ~(delta + 2 * half < 0))
    assert (classes == UNSURE_LOSS).sum() > 20 and (classes == LOSS).sum() > 50
    # the intervals named explicitly; one given alone, or a missing one: one sentence each
    assert cli_main(["height", "change", str(b), str(a), "-o", str(tmp_path / "dh2.tif"), "--no-quicklook",
                     "--intervals", str(tmp_path / "b_interval.tif"), str(tmp_path / "a_interval.tif")]) == 0  # fmt: skip
    assert cli_main(["height", "change", str(b), str(a), "-o", str(tmp_path / "x.tif"), "--intervals",
                     str(tmp_path / "b_interval.tif")]) == 2  # fmt: skip
    assert "takes the before and after dates' interval rasters" in capsys.readouterr().err
    assert cli_main(["height", "change", str(CHM), str(a), "-o", str(tmp_path / "y.tif"), "--intervals"]) == 2
    assert "TEAK_044_CHM_interval.tif' does not exist" in capsys.readouterr().err
    assert cli_main(["height", "change", str(b), str(a), "-o", str(tmp_path / "z.tif"), "--intervals", str(b),
                     str(a)]) == 2  # fmt: skip
    assert "is not a height interval raster" in capsys.readouterr().err
