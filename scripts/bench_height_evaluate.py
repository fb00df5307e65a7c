"""Benchmark ``height evaluate`` (:func:`dinov3_eo.tasks.height.evaluate_height_raster`) on a large reference CHM.

Writes a ``--size``² reference CHM (float32, 1 m UTM pixels, tiled DEFLATE, a nodata border) and a predicted height
raster on a grid twice as coarse (resampled onto the reference's), then times, each in a fresh child process so that
its peak RSS is its own:

* ``streamed`` — ``evaluate_height_raster``: 1,024-px blocks of the reference, the prediction warped per block;
* ``whole`` — the reference read whole and the prediction warped onto its whole grid in one read, then the same
  metrics: what ``height evaluate`` did until session 20, and the baseline of the ratios.

Times and memory exclude the imports (torch comes with the package: ~0.8 GB and seconds, printed apart).

    python scripts/bench_height_evaluate.py [--size 8000]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import child_entry, compare_on_written_inputs, peak_rss_mib  # noqa: E402


def make_rasters(folder: Path, size: int) -> tuple[Path, Path]:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    canopy = rng.gamma(2.0, 6.0, (size // 40 + 1, size // 40 + 1)).astype(np.float32)  # 40 m stands
    common = dict(driver="GTiff", count=1, dtype="float32", crs="EPSG:32611", tiled=True, blockxsize=512,
                  blockysize=512, compress="deflate", nodata=-9999.0)  # fmt: skip
    paths = folder / "reference_chm.tif", folder / "predicted.tif"
    for path, res in zip(paths, (1.0, 2.0)):
        side = int(size / res)
        with rasterio.open(path, "w", width=side, height=side, transform=from_origin(300_000, 4_100_000, res, res),
                           **common) as dst:  # fmt: skip
            for row in range(0, side, 2048):
                h = min(2048, side - row)
                rows = (np.arange(row, row + h) * res / 40).astype(int)
                cols = (np.arange(side) * res / 40).astype(int)
                block = canopy[rows][:, cols] + rng.normal(0, 1.5 if res > 1 else 0.5, (h, side)).astype(np.float32)
                if path.name.startswith("reference"):
                    block[:, :20] = -9999.0  # the survey's edge
                dst.write(np.maximum(block, 0) if res > 1 else block, 1, window=Window(0, row, side, h))
    return paths


def run(mode: str, reference: str, predicted: str) -> dict:
    import rasterio

    from dinov3_eo.tasks.height import HeightMetrics, evaluate_height_raster
    from dinov3_eo.tasks.height_data import HeightLabels

    imported = peak_rss_mib()
    started = time.perf_counter()
    if mode == "streamed":
        result = evaluate_height_raster(predicted, reference)
    else:
        with rasterio.open(reference) as ref:
            target = ref.read(1).astype(np.float32)
            target[target == ref.nodata] = np.nan
            grid = dict(crs=ref.crs, transform=ref.transform, shape=(ref.height, ref.width))
        heights = HeightLabels(paths=predicted, resampling="average", clip_negative=False).read(**grid)
        metrics = HeightMetrics()
        metrics.update(heights, target)
        result = metrics.compute()
    return {"seconds": time.perf_counter() - started, "n": int(result["all"]["n"]), "mae": result["all"]["mae"],
            "imports_mib": imported, "evaluation_mib": peak_rss_mib() - imported}  # fmt: skip


def main() -> None:
    if child_entry(run):
        return
    compare_on_written_inputs(__file__, description=__doc__, default_size=8000, make_inputs=make_rasters,
                              cases=("whole", "streamed"),
                              title="{size:,}² reference CHM, prediction at half its resolution:",
                              detail=lambda r: f"{r['n']:,} pixels, MAE {r['mae']:.4f} m")


if __name__ == "__main__":
    main()
