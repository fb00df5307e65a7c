"""Canopy height change (``dinov3-eo height change``) on a real NEON LiDAR CHM with a known harvest and growth."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.height_change import GAIN, LOSS, STABLE, classify_height_change, height_change

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
