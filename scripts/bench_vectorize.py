"""Benchmark polygonising a large class map (``--polygons``: :func:`dinov3_eo.inference.writers.vectorize_classes`)
strip by strip against reading it whole.

Writes a ``--size``² uint8 class map (6 classes in blobs of ~100 px with wavy edges, and a few 4 x 4 px nodata holes;
tiled DEFLATE, 10 m pixels) and polygonises it, each mode in a fresh child process so that its peak RSS is its own
(imports excluded):

* ``strips``: the default, strips of ~64 MiB of pixels (``region_polygons``), pieces joined across the strip
  boundaries;
* ``whole``: ``strip_rows`` = the map's height: the map read whole and polygonised at once (what this function did
  before session 17, and the baseline of the ratios).

Both write the same GeoPackage; the script checks that they found the same regions (count and total area per class).

    python scripts/bench_vectorize.py [--size 16000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from child_process import child_entry, peak_rss_mib, run_child


def make_map(path: Path, size: int) -> None:
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 6, (size // 100 + 2, size // 100 + 2)).astype(np.uint8)
    jitter = rng.integers(-30, 31, (size // 16 + 1, size // 16 + 1, 2))
    speck = rng.random((size // 4 + 1, size // 4 + 1)) < 0.0005
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500_000, 4_300_000, 10, 10), nodata=255, tiled=True, blockxsize=512,
                       blockysize=512, compress="deflate") as dst:  # fmt: skip
        for row in range(0, size, 1024):
            h = min(1024, size - row)
            yy, xx = np.mgrid[row : row + h, 0:size]
            # wavy blob edges: the coarse cell of a position shifted by a smooth (16-px correlated) jitter field
            wave_y = jitter[(yy // 16) % jitter.shape[0], (xx // 16) % jitter.shape[1], 0]
            wave_x = jitter[(yy // 16) % jitter.shape[0], (xx // 16) % jitter.shape[1], 1]
            jy, jx = (yy + wave_y) // 100, (xx + wave_x) // 100
            block = coarse[np.clip(jy, 0, coarse.shape[0] - 1), np.clip(jx, 0, coarse.shape[1] - 1)]
            block[speck[(yy // 4) % speck.shape[0], (xx // 4) % speck.shape[1]]] = 255  # 4 x 4 px nodata holes
            dst.write(block, 1, window=Window(0, row, size, h))


def run(mode: str, path: str, out: str) -> dict:
    import rasterio

    from dinov3_eo.inference.writers import vectorize_classes

    with rasterio.open(path) as src:
        height = src.height
    imported = peak_rss_mib()
    started = time.perf_counter()
    frame = vectorize_classes(path, out, strip_rows=height if mode == "whole" else None)
    per_class = frame.groupby("class_id")["area"].agg(["count", "sum"])
    return {"seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(), "imports_mib": imported,
            "regions": {int(k): [int(v["count"]), round(float(v["sum"]), 1)] for k, v in per_class.iterrows()}}  # fmt: skip


def main() -> None:
    if child_entry(run):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_vectorize_") as tmp:
        tmp = Path(tmp)
        path = tmp / "classes.tif"
        make_map(path, args.size)
        results = {}
        for mode in ("strips", "whole"):
            results[mode] = run_child(__file__, mode, path, tmp / f"{mode}.gpkg")
    base = results["whole"]
    count = sum(c for c, _ in base["regions"].values())
    print(f"{args.size}² map, {count:,} regions; same regions (count and area per class) both ways: "
          f"{results['strips']['regions'] == base['regions']}")
    print(f"{'mode':<8} {'time':>8} {'peak RSS':>10} {'beyond imports':>15} {'vs whole':>16}")
    for mode, r in results.items():
        ratio = f"{r['seconds'] / base['seconds']:.2f}x / {(r['peak_mib'] - r['imports_mib']) / (base['peak_mib'] - base['imports_mib']):.2f}x"
        print(f"{mode:<8} {r['seconds']:7.1f}s {r['peak_mib']:8.0f} MiB {r['peak_mib'] - r['imports_mib']:11.0f} MiB {ratio:>16}")


if __name__ == "__main__":
    main()
