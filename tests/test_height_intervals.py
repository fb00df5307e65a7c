"""Prediction intervals of canopy-height maps (``height evaluate --calibrate``, ``--intervals``, ``height predict
--intervals``): the histogram's quantiles against the exact conformal rank, the per-bin coverage on heteroscedastic
heights where one pooled interval fails, the file round trip, and the rasters on the NEON plots' LiDAR CHMs
(``tests/data/neon``, CC0).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.height_intervals import (
    INTERVAL_EDGES,
    HeightIntervals,
    IntervalCoverage,
    ResidualHistogram,
    calibrate_height_intervals,
    interval_table,
    write_height_intervals,
)
from dinov3_eo.tasks.conformal import conformal_quantile

NEON = Path(__file__).resolve().parent / "data" / "neon"


def heteroscedastic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted, reference)`` heights: references over 0-40 m, errors whose spread grows with height (0.3 m on bare
    ground, 10 m at 40 m)."""
    rng = np.random.default_rng(seed)
    reference = rng.uniform(0.0, 40.0, n)
    predicted = np.maximum(reference + rng.normal(size=n) * (0.3 + 0.25 * reference), 0.0)
    return predicted.astype(np.float32), reference.astype(np.float32)


def test_the_histograms_quantile_is_the_conformal_rank_of_the_centimetre_errors() -> None:
    predicted, reference = heteroscedastic(5000, 0)
    predicted[:7] = np.nan  # nodata: not counted
    errors = ResidualHistogram()
    errors.add(predicted[:2000], reference[:2000])
    errors.add(predicted[2000:], reference[2000:])  # blocks add up
    keep = np.isfinite(predicted)
    assert errors.counts.sum() == keep.sum() == 4993
    bins = np.clip(np.searchsorted(INTERVAL_EDGES, predicted[keep], side="right") - 1, 0, len(INTERVAL_EDGES) - 2)
    residual = np.abs(predicted[keep].astype(np.float64) - reference[keep])
    for b in range(len(INTERVAL_EDGES) - 1):  # each bin against the exact rank of its errors rounded up to the cm
        rounded = np.ceil(residual[bins == b] / 0.01 - 1e-9) * 0.01
        for coverage in (0.5, 0.9, 0.95):
            assert errors.quantile(b, coverage) == pytest.approx(conformal_quantile(rounded, coverage), abs=1e-9)
            assert errors.quantile(b, coverage) >= conformal_quantile(residual[bins == b], coverage) - 1e-6
    # a negative prediction counts in the first bin; an error beyond the histogram (here 1 m) makes a quantile that
    # reaches it infinite, and so does an empty bin
    tiny = ResidualHistogram(max_error=1.0)
    tiny.add(np.array([-1.0, 0.5] + [1.0] * 9), np.array([0.0, 0.5] + [5.0] * 9))
    assert tiny.counts[0].sum() == 11 and tiny.counts[1:].sum() == 0
    assert tiny.quantile(0, 0.05) == 0.0 and tiny.quantile(0, 0.1) == pytest.approx(1.0)
    assert math.isinf(tiny.quantile(0, 0.9)) and math.isinf(tiny.quantile(1, 0.5))
    with pytest.raises(ValueError, match="must rise"):
        ResidualHistogram((0.0, 5.0, 5.0))


def test_per_bin_intervals_hold_in_every_bin_where_one_interval_for_all_does_not() -> None:
    predicted, reference = heteroscedastic(40_000, 1)
    binned, pooled = ResidualHistogram(), ResidualHistogram((0.0, math.inf))
    for errors in (binned, pooled):
        errors.add(predicted[:20_000], reference[:20_000])
    intervals, one = binned.intervals(0.9), pooled.intervals(0.9)
    assert intervals.borrowed == [] and sum(intervals.pixels) == 20_000 and len(one.half_widths) == 1
    widths = intervals.half_widths  # taller predictions, wider intervals
    assert widths[0] < widths[1] < widths[2] < widths[3] < widths[-1]
    assert intervals.half_widths[-1] > 5 * intervals.half_widths[0]
    by_bin = IntervalCoverage(intervals)
    by_bin.add(predicted[20_000:], reference[20_000:])
    scored_bins = by_bin.result()
    assert 0.89 <= scored_bins["all"]["covered"] <= 0.92 and scored_bins["coverage"] == 0.9
    for label, row in scored_bins["bins"].items():
        assert row["n"] > 300 and 0.86 <= row["covered"] <= 0.95, (label, row)
    # one pooled interval: right on average, but too wide on low ground and too narrow under tall trees
    pooled_scored = IntervalCoverage(HeightIntervals(0.9, intervals.edges, [one.half_widths[0]] * 7, [0] * 7))
    pooled_scored.add(predicted[20_000:], reference[20_000:])
    rows = pooled_scored.result()["bins"]
    assert rows["0-2"]["covered"] > 0.99 and rows["30+"]["covered"] < 0.8
    assert scored_bins["bins"]["0-2"]["mean_width"] < 0.3 * rows["0-2"]["mean_width"]
    table = interval_table(intervals, scored_bins)
    assert "90 % intervals" in table and "30+ m" in table and table.splitlines()[-1].startswith("all")


def test_bounds_round_trip_and_borrowed_bins(tmp_path: Path) -> None:
    errors = ResidualHistogram((0.0, 10.0, 20.0, math.inf))
    errors.add(np.r_[np.full(200, 3.0), np.full(150, 15.0), np.full(5, 25.0)],
               np.r_[np.full(200, 4.0), np.full(150, 12.0), np.full(5, 25.0)])  # fmt: skip
    intervals = errors.intervals(0.9, source={"prediction": "a.tif"})
    assert intervals.half_widths == pytest.approx([1.0, 3.0, 3.0]) and intervals.borrowed == [2]  # 5 pixels: too few
    assert intervals.pixels == [200, 150, 5]
    lower, upper = intervals.bounds(np.array([[0.5, 15.0], [np.nan, -0.2]], np.float32))
    np.testing.assert_allclose(lower, [[0.0, 12.0], [np.nan, 0.0]])  # clipped at 0 m, NaN kept
    np.testing.assert_allclose(upper, [[1.5, 18.0], [np.nan, 0.8]])
    assert "*" in interval_table(intervals) and "too few calibration pixels" in interval_table(intervals)
    path = intervals.save(tmp_path / "intervals.json")
    back = HeightIntervals.load(path)
    assert back == intervals and math.isinf(back.edges[-1])
    with pytest.raises(FileExistsError):
        intervals.save(path)
    with pytest.raises(FileNotFoundError, match="height evaluate PRED REF --calibrate"):
        HeightIntervals.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="are not JSON"):
        HeightIntervals.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"metrics": {}}))
    with pytest.raises(ValueError, match="holds no height intervals"):
        HeightIntervals.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="No predicted-height bin holds 100"):
        ResidualHistogram().intervals(0.9)
    with pytest.raises(ValueError, match="between 0 and 1"):
        errors.intervals(1.5)


def _noisy_prediction(plot: str, path: Path, seed: int) -> Path:
    """A plot's LiDAR CHM (1 m) with errors that grow with height, written as a prediction on the CHM's grid."""
    rng = np.random.default_rng(seed)
    with rasterio.open(NEON / f"{plot}_CHM.tif") as src:
        chm, profile = src.read(1).astype(np.float32), src.profile
        nodata = src.nodata
    heights = np.where(chm == nodata, np.nan, chm) if nodata is not None else chm
    predicted = np.maximum(heights + rng.normal(size=heights.shape) * (0.5 + 0.2 * np.nan_to_num(heights)), 0)
    profile = {key: profile[key] for key in ("driver", "width", "height", "crs", "transform")}
    profile.update(dtype="float32", nodata=float("nan"), count=1)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(predicted.astype(np.float32), 1)
    return path


def test_calibrate_on_two_plots_measure_on_a_third_and_write_the_interval_raster(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    preds = [_noisy_prediction(p, tmp_path / f"{p}_pred.tif", i) for i, p in enumerate(("TEAK_044", "TEAK_050", "TEAK_052"))]
    chms = [NEON / f"{p}_CHM.tif" for p in ("TEAK_044", "TEAK_050", "TEAK_052")]
    # the Python call and the command line calibrate the same intervals from the two plots (a mosaic of each)
    intervals = calibrate_height_intervals(preds[:2], chms[:2], coverage=0.8, min_pixels=50)
    assert sum(intervals.pixels) == 3200 and intervals.coverage == 0.8
    assert intervals.source == {"prediction": [str(p) for p in preds[:2]], "reference": [str(c) for c in chms[:2]]}
    errors = ResidualHistogram()
    for pred, chm in zip(preds[:2], chms[:2]):
        with rasterio.open(pred) as p, rasterio.open(chm) as c:
            errors.add(p.read(1), np.where(c.read(1) == c.nodata, np.nan, c.read(1)) if c.nodata is not None else c.read(1))
    assert intervals.half_widths == errors.intervals(0.8, min_pixels=50).half_widths
    # 'height evaluate --calibrate' on the first plot writes them; '--intervals' measures them on the third
    saved = tmp_path / "intervals.json"
    assert cli_main(["height", "evaluate", str(preds[0]), str(chms[0]), "--calibrate", str(saved), "--coverage", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert "80 % intervals" in printed and str(saved) in printed
    first = HeightIntervals.load(saved)
    assert first.coverage == 0.8 and sum(first.pixels) == 1600
    assert cli_main(["height", "evaluate", str(preds[0]), str(chms[0]), "--calibrate", str(saved)]) == 2
    assert "already exists" in capsys.readouterr().err
    intervals.save(saved, overwrite=True)
    assert cli_main(["height", "evaluate", str(preds[2]), str(chms[2]), "--intervals", str(saved), "--out-dir",
                     str(tmp_path / "eval")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    measured = json.loads((tmp_path / "eval" / "interval_coverage.json").read_text())
    assert measured["all"]["n"] == 1600 and 0.7 <= measured["all"]["covered"] <= 0.9  # the same kind of errors
    assert measured["intervals"] == str(saved) and f"{100 * measured['all']['covered']:.1f} %" in printed
    with rasterio.open(preds[2]) as src:
        third = src.read(1)
    scorer = IntervalCoverage(intervals)
    with rasterio.open(chms[2]) as c:
        scorer.add(third, c.read(1))
    assert scorer.result()["all"]["covered"] == pytest.approx(measured["all"]["covered"])

    # the interval raster of the third plot's map: two bands on its grid, the bounds of each pixel's height
    out = write_height_intervals(preds[2], intervals, tmp_path / "ends.tif", quicklook=tmp_path / "ends.png")
    with rasterio.open(out) as o, rasterio.open(preds[2]) as src:
        assert (o.count, o.crs, o.transform, o.units) == (2, src.crs, src.transform, ("m", "m"))
        assert o.descriptions == ("lower end of the 80 % interval", "upper end of the 80 % interval")
        ends = o.read()
        assert json.loads(o.tags()["half_widths_m"]) == pytest.approx(intervals.half_widths)
    lower, upper = intervals.bounds(third)
    np.testing.assert_array_equal(ends[0], lower)
    np.testing.assert_array_equal(ends[1], upper)
    assert (tmp_path / "ends.png").stat().st_size > 1000
    with pytest.raises(FileExistsError):
        write_height_intervals(preds[2], intervals, out)
    with pytest.raises(ValueError):
        write_height_intervals(preds[2], intervals, preds[2], overwrite=True)  # never over the input
