"""Canopy-height prediction intervals (``height evaluate --calibrate`` / ``--intervals``) on real LiDAR canopy.

The 12 NEON Teakettle plots' 1 m LiDAR CHMs (../shared/data/neon_chm, mixed conifer up to ~60 m) are the reference.
The "prediction" is what a coarse canopy-height product says of each 1 m cell: the mean of the CHM over the
``--block`` x ``--block`` m cell around it (5 m and 10 m, as 10 m global canopy-height maps are read at 1 m), so
its errors are the real canopy's gaps and crowns, larger under tall trees. No model is involved: the experiment
measures the intervals, not a network.

Three folds by plot (plot i tested in fold i % 3): per-bin split-conformal intervals (the package's default bins,
90 %) are calibrated on the other eight plots' pixels and scored on the four test plots, against one pooled
interval for every pixel (a single bin) calibrated on the same pixels. Printed: the share of test pixels inside and
the mean width, overall and per predicted-height bin, pooled over the folds.

    .venv/bin/python scripts/exp_height_intervals.py [--blocks 5 10] [--coverage 0.9]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import SHARED  # noqa: E402

from dinov3_eo.tasks.height_intervals import (  # noqa: E402
    HeightIntervals,
    IntervalCoverage,
    calibrate_height_intervals,
    interval_table,
)

NEON = SHARED / "neon_chm" / "chm"


def coarse_prediction(chm_path: Path, block: int, dst: Path) -> Path:
    """The CHM's mean over ``block`` x ``block`` cells (nodata ignored), repeated on the 1 m grid, as a GeoTIFF."""
    with rasterio.open(chm_path) as src:
        chm = src.read(1).astype(np.float64)
        if src.nodata is not None:
            chm[chm == src.nodata] = np.nan
        profile = {k: src.profile[k] for k in ("driver", "width", "height", "crs", "transform")}
    h, w = chm.shape
    out = np.full_like(chm, np.nan)
    for r in range(0, h, block):
        for c in range(0, w, block):
            cell = chm[r : r + block, c : c + block]
            if np.isfinite(cell).any():
                out[r : r + block, c : c + block] = np.nanmean(cell)
    out[~np.isfinite(chm)] = np.nan
    with rasterio.open(dst, "w", **profile, count=1, dtype="float32", nodata=float("nan")) as f:
        f.write(out.astype(np.float32), 1)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, nargs="+", default=[5, 10], help="coarse products' cell sizes in m")
    parser.add_argument("--coverage", type=float, default=0.9)
    args = parser.parse_args()
    chms = sorted(NEON.glob("TEAK_*_CHM.tif"))
    folds = [list(range(f, len(chms), 3)) for f in range(3)]
    results: dict = {"plots": len(chms), "coverage": args.coverage}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        for block in args.blocks:
            preds = [coarse_prediction(c, block, Path(scratch) / f"{c.stem}_{block}m.tif") for c in chms]
            binned = pooled = None
            for test in folds:
                train = [i for i in range(len(chms)) if i not in test]
                calib = ([preds[i] for i in train], [chms[i] for i in train])
                intervals = calibrate_height_intervals(*calib, coverage=args.coverage)
                one = calibrate_height_intervals(*calib, coverage=args.coverage, edges=(0.0, math.inf))
                flat = HeightIntervals(args.coverage, intervals.edges, one.half_widths * len(intervals.half_widths))
                if binned is None:
                    binned, pooled = IntervalCoverage(intervals), IntervalCoverage(flat)
                else:
                    binned.intervals, pooled.intervals = intervals, flat
                for i in test:
                    with rasterio.open(preds[i]) as p, rasterio.open(chms[i]) as c:
                        reference = c.read(1).astype(np.float32)
                        if c.nodata is not None:
                            reference[reference == c.nodata] = np.nan
                        predicted = p.read(1)
                    binned.add(predicted, reference)
                    pooled.add(predicted, reference)
            by_bin, by_all = binned.result(), pooled.result()
            print(f"\n{block} m product read at 1 m, last fold's per-bin intervals (calibrated on 8 plots), then "
                  "the test plots' coverage pooled over the 3 folds:")  # fmt: skip
            print(interval_table(intervals, by_bin))
            print(f"{'bin':<10}{'per-bin inside':>16}{'width':>8}{'one interval inside':>21}{'width':>8}{'pixels':>8}")
            for label, row in by_bin["bins"].items():
                other = by_all["bins"][label]
                if row["n"]:
                    print(f"{label:<10}{100 * row['covered']:>15.1f}%{row['mean_width']:>8.2f}"
                          f"{100 * other['covered']:>20.1f}%{other['mean_width']:>8.2f}{row['n']:>8d}")  # fmt: skip
            print(f"{'all':<10}{100 * by_bin['all']['covered']:>15.1f}%{by_bin['all']['mean_width']:>8.2f}"
                  f"{100 * by_all['all']['covered']:>20.1f}%{by_all['all']['mean_width']:>8.2f}{by_bin['all']['n']:>8d}")  # fmt: skip
            results[f"{block}m"] = {"per_bin": by_bin, "one_interval": by_all,
                                    "last_fold_half_widths": intervals.half_widths,
                                    "last_fold_borrowed": intervals.borrowed}  # fmt: skip
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\n{results['seconds']:.1f} s")
    print(json.dumps(results, indent=1, default=float))


if __name__ == "__main__":
    main()
