"""Labelling the tiles of a Sentinel-2-sized scene (``classify fit --scenes``' first step): :func:`label_tiles`, a
strip of tile rows at a time, against counting from the whole label raster read into memory at once (the obvious
way), in one run: time (best of two, warm), peak memory of each (tracemalloc: numpy's allocations), the same counts;
and, with the grid-aligned window read of the labels switched off, the warped read every label raster took before.

The scene is a 10,980 x 10,980 px GeoTIFF at 10 m (only its grid is read); the labels a land-cover raster on the same
grid (ESA WorldCover-like ids 10..100 in 500-m patches, nodata 0 on a tenth of it), and polygons of 200 fields.

    python scripts/bench_tile_labels.py [--size 10980] [--tile 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import from_origin

from dinov3_eo.tasks.tile_labels import label_tiles


def _measure(run, repeats: int = 2):  # noqa: ANN001, ANN202
    """``(result, best seconds of repeats after a warm-up run, peak MiB of numpy's allocations in a traced run)``: the
    traced run is timed apart, tracing slows allocations."""
    run()  # warm-up: the file into the page cache, GDAL's block cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        seconds.append(time.perf_counter() - start)
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, min(seconds), peak / 2**20


def _whole(path: Path, tile: int) -> dict[tuple[int, int], np.ndarray]:
    """Counts per tile from the whole raster in memory (no warping: the grids are the same here)."""
    with rasterio.open(path) as src:
        ids = src.read(1)
    rows, cols = -(-ids.shape[0] // tile), -(-ids.shape[1] // tile)
    padded = np.zeros((rows * tile, cols * tile), ids.dtype)
    padded[: ids.shape[0], : ids.shape[1]] = ids
    blocks = padded.reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3).reshape(rows * cols, -1)
    out = {}
    for index in np.flatnonzero((blocks > 0).any(axis=1)):
        counts = np.bincount(blocks[index], minlength=256)[1:]
        out[(int(index // cols), int(index % cols))] = counts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10980)
    parser.add_argument("--tile", type=int, default=64)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        transform = from_origin(500_000, 5_000_000, 10, 10)
        common = dict(driver="GTiff", width=args.size, height=args.size, count=1, dtype="uint8", crs="EPSG:32633",
                      transform=transform, tiled=True, blockxsize=512, blockysize=512, compress="deflate")  # fmt: skip
        with rasterio.open(tmp / "scene.tif", "w", **common, sparse_ok=True):
            pass
        patches = -(-args.size // 50)
        coarse = rng.choice(np.arange(10, 101, 10, dtype=np.uint8), size=(patches, patches))
        labels = np.kron(coarse, np.ones((50, 50), np.uint8))[: args.size, : args.size]
        labels[rng.random((patches, patches)).repeat(50, 0).repeat(50, 1)[: args.size, : args.size] < 0.1] = 0
        with rasterio.open(tmp / "landcover.tif", "w", **common, nodata=0) as dst:
            dst.write(labels, 1)
        del labels, coarse

        tiles, strip_s, strip_mb = _measure(lambda: label_tiles(tmp / "scene.tif", tmp / "landcover.tif", tile_size=args.tile,
                                                                min_labelled=1e-9))  # fmt: skip
        whole, whole_s, whole_mb = _measure(lambda: _whole(tmp / "landcover.tif", args.tile))
        from dinov3_eo.data.labels import MosaicFile

        aligned = MosaicFile.aligned_offset
        MosaicFile.aligned_offset = lambda self, **kwargs: None  # every read through a WarpedVRT, as before
        try:
            warped, warped_s, _ = _measure(lambda: label_tiles(tmp / "scene.tif", tmp / "landcover.tif",
                                                               tile_size=args.tile, min_labelled=1e-9), repeats=1)  # fmt: skip
        finally:
            MosaicFile.aligned_offset = aligned
        same_warped = np.array_equal(warped.counts, tiles.counts)
        ids = [int(name.split()[1]) for name in tiles.classes]
        same = len(whole) == len(tiles) and all(
            np.array_equal(whole[cell][np.array(ids) - 1], counts) for cell, counts in zip(tiles.cells, tiles.counts))

        import geopandas as gpd
        import shapely

        x = rng.uniform(500_000, 500_000 + 10 * args.size, 200)
        y = rng.uniform(5_000_000 - 10 * args.size, 5_000_000, 200)
        fields = gpd.GeoDataFrame({"name": rng.choice(["wheat", "maize", "forest", "water"], 200)}, crs="EPSG:32633",
                                  geometry=[shapely.Point(a, b).buffer(800) for a, b in zip(x, y)])  # fmt: skip
        vector, vector_s, vector_mb = _measure(lambda: label_tiles(tmp / "scene.tif", fields, tile_size=args.tile))
    print(json.dumps({
        "scene_px": args.size, "tile_px": args.tile, "grid_tiles": (-(-args.size // args.tile)) ** 2,
        "raster": {"tiles_labelled": len(tiles), "label_tiles_s": round(strip_s, 2), "label_tiles_peak_mb": round(strip_mb, 1),
                   "whole_array_s": round(whole_s, 2), "whole_array_peak_mb": round(whole_mb, 1), "same_counts": bool(same),
                   "warped_read_s": round(warped_s, 2), "warped_same_counts": bool(same_warped),
                   "aligned_speedup": round(warped_s / strip_s, 2)},
        "polygons": {"fields": 200, "tiles_labelled": len(vector), "label_tiles_s": round(vector_s, 2),
                     "label_tiles_peak_mb": round(vector_mb, 1)},
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
