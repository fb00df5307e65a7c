"""Benchmark ``segment evaluate`` (:func:`dinov3_eo.tasks.segmentation_eval.evaluate_class_raster`) on a large map.

Writes a ``--size``² class map (uint8, 6 classes, tiled DEFLATE, 10 m UTM pixels) and a reference raster on a
grid twice as fine (so it must be resampled onto the map's), then times, each in a fresh child process so that its
peak RSS is its own:

* ``streamed`` — ``evaluate_class_raster``: 1,024-px blocks of the map, the reference warped per block;
* ``naive`` — both rasters read whole (the reference resampled in one read), one ``np.bincount`` confusion matrix:
  what a script would do, and the baseline of the ratios.

Times and memory exclude the imports (the package's inference modules bring torch: ~0.8 GB and seconds, printed
apart), which the command pays once whatever the map's size.

    python scripts/bench_evaluate.py [--size 10000]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import child_entry, compare_on_written_inputs, peak_rss_mib  # noqa: E402

CLASSES = 6


def make_rasters(folder: Path, size: int) -> tuple[Path, Path]:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, CLASSES, (size // 50 + 1, size // 50 + 1)).astype(np.uint8)
    common = dict(driver="GTiff", count=1, dtype="uint8", crs="EPSG:32633", tiled=True, blockxsize=512,
                  blockysize=512, compress="deflate", nodata=255)  # fmt: skip
    paths = folder / "map.tif", folder / "reference.tif"
    for path, res in zip(paths, (10.0, 5.0)):
        side = int(size * 10 / res)
        with rasterio.open(path, "w", width=side, height=side, transform=from_origin(500_000, 4_300_000, res, res),
                           **common) as dst:  # fmt: skip
            dst.update_tags(class_names=json.dumps([f"class {i}" for i in range(CLASSES)]))
            for row in range(0, side, 2048):
                h = min(2048, side - row)
                rows = (np.arange(row, row + h) * res / 500).astype(int)
                cols = (np.arange(side) * res / 500).astype(int)
                block = coarse[rows][:, cols]
                if path.name == "map.tif":  # the map disagrees with the reference on ~15 % of pixels
                    noise = rng.random(block.shape) < 0.15
                    block = np.where(noise, (block + 1) % CLASSES, block).astype(np.uint8)
                dst.write(block, 1, window=Window(0, row, side, h))
    return paths


def run(mode: str, map_path: str, reference: str) -> dict:
    import rasterio
    from rasterio.enums import Resampling

    if mode == "streamed":  # the imports (torch comes with the package's inference modules) are not the evaluation
        from dinov3_eo.tasks.segmentation_eval import evaluate_class_raster
    imported = peak_rss_mib()
    started = time.perf_counter()
    if mode == "streamed":
        confusion = np.asarray(evaluate_class_raster(map_path, reference)["confusion"])
    else:
        with rasterio.open(map_path) as m, rasterio.open(reference) as r:
            mapped = m.read(1).astype(np.int64)
            truth = r.read(1, out_shape=(m.height, m.width), resampling=Resampling.nearest).astype(np.int64)
        keep = (mapped < CLASSES) & (truth < CLASSES)
        confusion = np.bincount(truth[keep] * CLASSES + mapped[keep], minlength=CLASSES**2).reshape(CLASSES, CLASSES)
    return {"seconds": time.perf_counter() - started, "pixels": int(confusion.sum()),
            "accuracy": float(np.trace(confusion) / confusion.sum()), "imports_mib": imported,
            "peak_rss_mib": peak_rss_mib(), "evaluation_mib": peak_rss_mib() - imported}  # fmt: skip


def main() -> None:
    if child_entry(run):
        return
    compare_on_written_inputs(__file__, description=__doc__, default_size=10_000, make_inputs=make_rasters,
                              cases=("naive", "streamed"), title="{size:,}² map, reference at twice its resolution:",
                              detail=lambda r: f"{r['pixels']:,} pixels compared, accuracy {r['accuracy']:.4f}")


if __name__ == "__main__":
    main()
