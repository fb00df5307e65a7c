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


def _naive_stratified(values, strata, p, y, s, design):
    """The stratified difference estimator written out stratum by stratum with plain Python lists."""
    values, strata, p, y, s = (list(map(float, a)) for a in (values, strata, p, y, s))
    mapped = [(v, h) for v, h in zip(values, strata) if math.isfinite(v) and h >= 0]
    big_n, n = len(mapped), len(y)
    mean, var = 0.0, 0.0
    labels = sorted({h for _, h in mapped})
    for h in labels:
        cells = [v for v, g in mapped if g == h]
        errors = [b - a for a, b, g in zip(p, y, s) if g == h]
        w, n_h = len(cells) / big_n, len(errors)
        e_bar = sum(errors) / n_h
        s2 = sum((e - e_bar) ** 2 for e in errors) / (n_h - 1)
        mean += w * (sum(cells) / len(cells) + e_bar)
        if design == "stratified":
            var += w * w * (1 - n_h / len(cells)) * s2 / n_h
        else:
            var += (1 - n / big_n) * (w * s2 / n + (1 - w) * s2 / n**2)
    return mean, math.sqrt(var)


def test_the_stratified_estimator_is_its_formula_for_both_designs() -> None:
    from dinov3_eo.tasks.map_estimate import stratified_difference_estimate

    rng = np.random.default_rng(4)
    values = rng.uniform(0, 100, 900)
    strata = rng.choice([0, 1, 2], size=900, p=[0.5, 0.3, 0.2])
    values[:7] = np.nan
    strata[7:12] = -1  # no stratum: not part of the estimate
    pick = rng.choice(np.arange(12, 900), size=45, replace=False)
    p, s = values[pick], strata[pick]
    y = p + rng.normal(3.0, 6.0, 45) + 10.0 * (s == 2)
    for design in ("stratified", "post-stratified"):
        got = stratified_difference_estimate(values, strata, p, y, s, design=design)
        mean, se = _naive_stratified(values, strata, p, y, s, design)
        assert got.mean == pytest.approx(mean) and got.standard_error == pytest.approx(se)
        assert got.cells == 888 and got.n == 45 and got.design == design and len(got.strata) == 3
        assert sum(r["weight"] for r in got.strata) == pytest.approx(1.0)
        assert got.low < got.mean < got.high
    # one stratum is the unstratified estimator, exactly
    one = stratified_difference_estimate(values, np.zeros(900, int), p, y, np.zeros(45, int))
    plain = difference_estimate(values, p, y)
    for name in ("mean", "standard_error", "low", "high", "sample_mean", "sample_standard_error"):
        assert getattr(one, name) == pytest.approx(getattr(plain, name)), name
    post = stratified_difference_estimate(values, np.zeros(900, int), p, y, np.zeros(45, int), design="post-stratified")
    assert (post.mean, post.standard_error) == (pytest.approx(plain.mean), pytest.approx(plain.standard_error))
    with pytest.raises(ValueError, match="Stratum 2 has .* mapped cells but 1 sample cell"):
        stratified_difference_estimate(values, strata, p[s != 2][:20].tolist() + [1.0], y[s != 2][:20].tolist() + [1.0],
                                       s[s != 2][:20].tolist() + [2])  # fmt: skip
    with pytest.raises(ValueError, match="design must be one of"):
        stratified_difference_estimate(values, strata, p, y, s, design="cluster")
    with pytest.raises(ValueError, match="must pair up"):
        stratified_difference_estimate(values, strata[:-1], p, y, s)


def test_over_stratified_samples_the_estimate_is_unbiased_where_the_unstratified_one_is_not() -> None:
    """Three strata of 60, 30 and 10 % of 4,000 cells, the map off by +5, -10 and +25 in them, 12 plots drawn in
    each (the rare stratum sampled six times as densely): over 500 draws the stratified estimate centres on the true
    mean and its 95 % interval holds it 93-97.5 % of the time; the unstratified estimator on the same plots is off by
    the over-sampled stratum's bias. One random sample of 60 cells sorted into strata afterwards (post-stratified)
    covers as well."""
    from dinov3_eo.tasks.map_estimate import stratified_difference_estimate

    rng = np.random.default_rng(5)
    strata = np.repeat([0, 1, 2], [2400, 1200, 400])
    truth = rng.gamma(3.0, 10.0, 4000) + 10.0 * strata
    mapped = truth + np.array([5.0, -10.0, 25.0])[strata] + rng.normal(0, 4.0, 4000)
    stratified, plain, covered, post_covered = [], [], [], []
    for _ in range(500):
        pick = np.concatenate([rng.choice(np.flatnonzero(strata == h), size=12, replace=False) for h in range(3)])
        got = stratified_difference_estimate(mapped, strata, mapped[pick], truth[pick], strata[pick])
        stratified.append(got.mean)
        covered.append(got.low <= truth.mean() <= got.high)
        plain.append(difference_estimate(mapped, mapped[pick], truth[pick]).mean)
        srs = rng.choice(4000, size=60, replace=False)
        if np.bincount(strata[srs], minlength=3).min() >= 2:
            post = stratified_difference_estimate(mapped, strata, mapped[srs], truth[srs], strata[srs],
                                                  design="post-stratified")  # fmt: skip
            post_covered.append(post.low <= truth.mean() <= post.high)
    assert abs(np.mean(stratified) - truth.mean()) < 0.2
    assert 0.93 <= np.mean(covered) <= 0.975, np.mean(covered)
    assert abs(np.mean(plain) - truth.mean()) > 3  # the rare, badly mapped stratum weighs a third of the plots
    assert len(post_covered) > 450 and 0.92 <= np.mean(post_covered) <= 0.975, np.mean(post_covered)


def test_regress_evaluate_with_strata(value_map: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Strata from a class raster on the imagery's (16x finer) grid, named by its class_names tag: each map cell
    takes the class at its centre; the report gives each stratum's share, plots and estimate."""
    map_path, reference = value_map
    with rasterio.open(reference) as src:
        profile = {k: v for k, v in src.profile.items() if not k.startswith("block")} | {"dtype": "uint8", "nodata": 255}
        width = src.width
    classes = np.zeros((profile["height"], width), np.uint8)
    classes[:, 3 * width // 4 :] = 1
    classes[:20] = 255
    with rasterio.open(tmp_path / "strata.tif", "w", **profile) as dst:
        dst.write(classes, 1)
        dst.update_tags(class_names=json.dumps(["west", "east"]))
    out = tmp_path / "eval"
    assert cli_main(["regress", "evaluate", str(map_path), str(reference), "--strata", str(tmp_path / "strata.tif"),
                     "--out-dir", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    estimate = json.loads((out / "metrics.json").read_text())["estimate"]
    assert estimate["design"] == "stratified" and [r["name"] for r in estimate["strata"]] == ["west", "east"]
    with rasterio.open(map_path) as src:
        mapped = src.read(1).astype(np.float64)
        rows, cols = np.indices(mapped.shape)
        centre_x, centre_y = src.transform @ (cols + 0.5, rows + 0.5)
    with rasterio.open(tmp_path / "strata.tif") as src:
        r, c = rasterio.transform.rowcol(src.transform, centre_x.ravel(), centre_y.ravel())
        r, c = np.clip(r, 0, src.height - 1), np.clip(c, 0, src.width - 1)
        centre_class = classes[r, c].reshape(mapped.shape).astype(np.int64)
    centre_class[centre_class == 255] = -1
    in_stratum = np.isfinite(mapped) & (centre_class >= 0)
    assert estimate["cells"] == in_stratum.sum()
    assert [r["cells"] for r in estimate["strata"]] == [int((in_stratum & (centre_class == h)).sum()) for h in (0, 1)]
    assert "mapped cells outside every stratum of strata.tif are left out" in printed and "    east: " in printed
    assert estimate["low"] <= estimate["mean"] <= estimate["high"]
