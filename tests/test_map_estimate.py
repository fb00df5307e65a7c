"""Model-assisted estimates (``regress evaluate``): the difference estimator against its formula, its interval's
coverage and unbiasedness over repeated random samples of a biased map, and the command line on a value map of the
Landsat-7 crop (``tests/data/rgb_byte_crop.tif``) with its own brightness as the reference.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.map_estimate import difference_estimate
from dinov3_eo.tasks.tile_values import value_tiles

from brightness_chips import SCENE


def test_the_difference_estimator_is_its_formula() -> None:
    rng = np.random.default_rng(0)
    mapped = rng.uniform(0, 100, 500)
    mapped[:5] = np.nan  # unmapped cells are left out
    p, y = rng.uniform(0, 100, 30), rng.uniform(0, 100, 30)
    got = difference_estimate(mapped, p, y, confidence=0.9)
    e = y - p
    n, cells = 30, 495
    se = math.sqrt((1 - n / cells) * e.var(ddof=1) / n)
    assert got.cells == cells and got.n == n and got.map_mean == pytest.approx(np.nanmean(mapped))
    assert got.mean == pytest.approx(np.nanmean(mapped) + e.mean()) and got.standard_error == pytest.approx(se)
    from scipy import stats

    t = stats.t.ppf(0.95, 29)
    assert (got.low, got.high) == (pytest.approx(got.mean - t * se), pytest.approx(got.mean + t * se))
    assert got.sample_mean == pytest.approx(y.mean())
    assert got.sample_standard_error == pytest.approx(math.sqrt((1 - n / cells) * y.var(ddof=1) / n))
    assert got.relative_efficiency == pytest.approx(y.var(ddof=1) / e.var(ddof=1))
    without = difference_estimate(mapped, p, y, finite_population=False)
    assert without.standard_error == pytest.approx(math.sqrt(e.var(ddof=1) / n))
    # a sample of every cell leaves nothing to estimate: the mean of the references, exactly
    truth = mapped[5:] * 1.1 - 2
    every = difference_estimate(mapped[5:], mapped[5:], truth)
    assert every.mean == pytest.approx(np.mean(truth)) and every.standard_error == 0.0
    with pytest.raises(ValueError, match="at least two sample cells"):
        difference_estimate(mapped, p[:1], y[:1])
    with pytest.raises(ValueError, match="between 0 and 1"):
        difference_estimate(mapped, p, y, confidence=95)
    with pytest.raises(ValueError, match="no valued cell"):
        difference_estimate(np.full(3, np.nan), p, y)


def test_over_random_samples_the_estimate_is_unbiased_and_its_interval_covers_the_true_mean() -> None:
    """A map that under-estimates tall values and adds an offset (its own mean 4.6 off the truth): over 600 random
    samples of 40 cells, the model-assisted mean centres on the true mean and its 95 % interval holds it 93-97 % of
    the time, with a standard error well below the sample alone's."""
    rng = np.random.default_rng(1)
    truth = rng.gamma(2.0, 15.0, 3000)  # biomass-like: skewed
    mapped = 0.7 * truth + 4.0 + rng.normal(scale=5.0, size=3000)
    assert abs(mapped.mean() - truth.mean()) > 4
    means, covered, ratios = [], [], []
    for _ in range(600):
        sample = rng.choice(3000, size=40, replace=False)
        got = difference_estimate(mapped, mapped[sample], truth[sample])
        means.append(got.mean)
        covered.append(got.low <= truth.mean() <= got.high)
        ratios.append(got.standard_error / got.sample_standard_error)
    assert abs(np.mean(means) - truth.mean()) < 0.15
    assert 0.93 <= np.mean(covered) <= 0.97, np.mean(covered)
    assert np.median(ratios) < 0.6  # the map's errors spread less than the values: a tighter estimate


@pytest.fixture()
def value_map(tmp_path: Path) -> tuple[Path, Path]:
    """A biased biomass-like map of the crop's 16-px cells (its brightness x 0.8 + 10, in "Mg/ha") and the
    brightness itself as the reference raster, NaN in the collar."""
    with rasterio.open(SCENE) as src:
        pixels = src.read().astype(np.float32)
        crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    brightness = pixels.mean(axis=0)
    brightness[(pixels == 0).any(axis=0)] = np.nan
    reference = tmp_path / "brightness.tif"
    with rasterio.open(reference, "w", driver="GTiff", width=shape[1], height=shape[0], count=1, dtype="float32",
                       crs=crs, transform=transform, nodata=float("nan")) as dst:  # fmt: skip
        dst.write(brightness, 1)
    rows, cols = -(-shape[0] // 16), -(-shape[1] // 16)
    padded = np.full((rows * 16, cols * 16), np.nan, np.float32)
    padded[: shape[0], : shape[1]] = brightness
    blocks = padded.reshape(rows, 16, cols, 16)
    valid = np.isfinite(blocks).mean(axis=(1, 3))
    sums, counts = np.nansum(blocks, axis=(1, 3)), np.isfinite(blocks).sum(axis=(1, 3))
    cells = np.where(valid >= 0.5, sums / np.maximum(counts, 1) * 0.8 + 10.0, np.nan).astype(np.float32)
    value_map = tmp_path / "crop_tile_values.tif"
    with rasterio.open(value_map, "w", driver="GTiff", width=cols, height=rows, count=1, dtype="float32", crs=crs,
                       transform=transform @ Affine.scale(16), nodata=float("nan")) as dst:  # fmt: skip
        dst.write(cells, 1)
        dst.descriptions = ("biomass",)
        dst.units = ("Mg/ha",)
        dst.update_tags(statistic="mean")
    return value_map, reference


def test_regress_evaluate_scores_a_map_and_estimates_its_mean_and_total(value_map: tuple[Path, Path], tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    map_path, reference = value_map
    out = tmp_path / "eval"
    assert cli_main(["regress", "evaluate", str(map_path), str(reference), "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    with rasterio.open(map_path) as src:
        mapped = src.read(1).astype(np.float64)
        hectares = abs(src.transform.a * src.transform.e) / 10_000
    cells = value_tiles(map_path, reference, tile_size=1)
    predicted = mapped[cells.rows, cells.cols]
    keep = np.isfinite(predicted)
    estimate = report["estimate"]
    assert report["test"]["n"] == estimate["n"] == keep.sum() > 50 and estimate["cells"] == np.isfinite(mapped).sum()
    assert estimate["mean"] == pytest.approx(np.nanmean(mapped) + np.mean(cells.values[keep] - predicted[keep]), rel=1e-6)
    # the map's mean carries its bias (x 0.8 + 10); the reference cells put the estimate back on the brightness
    assert abs(estimate["map_mean"] - estimate["mean"]) > 3 and estimate["relative_efficiency"] > 1
    assert report["test"]["bias"] == pytest.approx(np.mean(predicted[keep] - cells.values[keep]), rel=1e-6)
    total = report["total"]  # Mg/ha over the mapped hectares: Mg
    assert total["unit"] == "Mg" and total["hectares"] == pytest.approx(hectares * estimate["cells"])
    assert total["total"] == pytest.approx(estimate["mean"] * total["hectares"])
    assert "model-assisted" in printed and "Mg/ha" in printed and "in all over" in printed and " Mg " in printed
    assert {p.name for p in out.iterdir()} == {"metrics.json", "tiles.gpkg", "scatter.png"}

    # a random sample of 30 cells as field plots (points at cell centres): the interval holds the all-cell estimate
    rng = np.random.default_rng(3)
    pick = rng.choice(np.flatnonzero(keep), size=30, replace=False)
    import geopandas as gpd
    from shapely.geometry import Point

    with rasterio.open(map_path) as src:
        centres = [Point(*(src.transform @ (c + 0.5, r + 0.5))) for r, c in zip(cells.rows[pick], cells.cols[pick])]
        crs = src.crs
    gpd.GeoDataFrame({"agb": cells.values[pick]}, geometry=centres, crs=crs).to_file(tmp_path / "plots.gpkg")
    # and 'regress map''s interval raster beside the map: its coverage of the plots is reported too
    with rasterio.open(map_path) as src:
        profile = src.profile | {"count": 2}
    with rasterio.open(tmp_path / "crop_tile_interval.tif", "w", **profile) as dst:
        dst.write(np.stack([mapped - 20, mapped + 20]).astype(np.float32))
        dst.update_tags(coverage="0.9")
    assert cli_main(["regress", "evaluate", str(map_path), str(tmp_path / "plots.gpkg"), "--out-dir", str(out),
                     "--overwrite"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    sampled = json.loads((out / "metrics.json").read_text())
    assert sampled["estimate"]["n"] == 30 and sampled["estimate"]["low"] <= estimate["mean"] <= sampled["estimate"]["high"]
    inside = np.mean(np.abs(cells.values[pick] - predicted[pick]) <= 20)
    assert sampled["interval"]["covered"] == pytest.approx(inside) and "90 % prediction intervals" in printed
    # bad input: one sentence, exit code 2
    assert cli_main(["regress", "evaluate", str(map_path), str(reference), "--out-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["regress", "evaluate", str(tmp_path / "crop_tile_interval.tif"), str(reference)]) == 2
    assert "has 2 bands; a value map has one" in capsys.readouterr().err
