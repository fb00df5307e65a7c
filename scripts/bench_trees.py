"""Tree tops and crowns of a large canopy height model (``height trees``) against the usual way to filter tops.

The map: the real 1 m LiDAR CHM of ../shared/data/lidar_chm_nz (278 x 195 px, New Zealand; GPL, read here only),
mirrored and tiled into ``--size`` px a side (float32, tiled, compressed). Two ways to the same tree tops under one
variable window (radius 0.5 + 0.06 h metres, at most 10):

1. ``find_tree_tops``: the 3 x 3 local maxima first, then each candidate against its own window, offset by offset;
2. the focal-maximum way of raster tools (ForestTools' ``vwf``, a ``maximum_filter`` per window size): one
   maximum filter of the whole map per distinct disc the heights call for, each pixel then compared with the
   filter of its own disc.

Both must find the same tops, but for ties: where two equally tall pixels share a window the focal maximum keeps
both and ``find_tree_tops`` the first (the mirrored copies repeat a row or column at each seam, and the map's tiny
noise, which breaks most of those ties, is float32). Then ``detect_trees`` end to end
(tops, crowns, the crown raster, polygons and points; no picture) in one block and in 1,024-px blocks (the
default), each in a
process of its own for its peak memory.

    .venv/bin/python scripts/bench_trees.py [--size 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import child_entry, peak_rss_mib, run_child  # noqa: E402

NZ_CHM = Path(__file__).resolve().parents[2] / "shared" / "data" / "lidar_chm_nz" / "CHM.tif"


def make_map(path: Path, size: int) -> None:
    import rasterio

    with rasterio.open(NZ_CHM) as src:
        chm = src.read(1).astype(np.float32)
        transform, crs = src.transform, src.crs
    tile = np.block([[chm, chm[:, ::-1]], [chm[::-1], chm[::-1, ::-1]]])  # mirrored: no seams between copies
    reps = (-(-size // tile.shape[0]), -(-size // tile.shape[1]))
    big = np.tile(tile, reps)[:size, :size]
    big += np.random.default_rng(0).uniform(0, 1e-3, big.shape).astype(np.float32)  # few ties across the seams
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="float32", crs=crs, transform=transform,
                   nodata=float("nan"), tiled=True, blockxsize=512, blockysize=512, compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(big[None])


def read(path: str) -> np.ndarray:
    import rasterio

    with rasterio.open(path) as src:
        return src.read(1, masked=True).astype(np.float64).filled(np.nan)


def package_tops(path: str) -> dict:
    from dinov3_eo.tasks.tree_detection import WindowRule, find_tree_tops

    chm = read(path)
    start = time.perf_counter()
    tops = find_tree_tops(chm, 1.0, rule=WindowRule(), min_height=2.0)
    return {"seconds": time.perf_counter() - start, "tops": tops.tolist()}


def focal_tops(path: str) -> dict:
    from scipy.ndimage import maximum_filter

    from dinov3_eo.tasks.tree_detection import WindowRule

    chm = read(path)
    start = time.perf_counter()
    heights = np.where(np.isfinite(chm), chm, -np.inf)
    reach2 = np.maximum(WindowRule().radius(np.where(np.isfinite(chm), chm, 0.0)) ** 2, 2.0)  # [H, W] pixels²
    r = int(np.ceil(np.sqrt(reach2.max())))
    di, dj = np.mgrid[-r : r + 1, -r : r + 1]
    sums = np.unique(di**2 + dj**2)  # the discs differ only where r² passes a sum of two squares
    disc = np.searchsorted(sums, reach2, side="right") - 1  # [H, W] index of each pixel's disc
    is_top = np.zeros(chm.shape, bool)
    for k in np.unique(disc[heights >= 2.0]).tolist():
        footprint = (di**2 + dj**2) <= sums[k]
        use = (disc == k) & (heights >= 2.0)
        is_top[use] = heights[use] >= maximum_filter(heights, footprint=footprint, mode="constant", cval=-np.inf)[use]
    rows, cols = np.nonzero(is_top)
    return {"seconds": time.perf_counter() - start, "tops": np.column_stack([rows, cols]).tolist(),
            "filters": int(len(np.unique(disc[heights >= 2.0])))}  # fmt: skip


def end_to_end(path: str, block: str, out: str) -> dict:
    import geopandas  # noqa: F401  (imports before the memory the run uses is counted)
    import skimage.segmentation  # noqa: F401

    from dinov3_eo.tasks.tree_maps import detect_trees

    imports = peak_rss_mib()
    start = time.perf_counter()
    summary = detect_trees(path, out, block=int(block), progress=False)
    seconds = time.perf_counter() - start
    import rasterio

    with rasterio.open(summary.labels) as src:
        crowns = np.bincount(src.read(1).ravel())  # pixels per tree_id, to compare the two runs' crowns
    return {"seconds": seconds, "trees": summary.trees, "imports_mib": imports, "peak_mib": peak_rss_mib(),
            "crown_pixels": crowns.tolist()}  # fmt: skip


def run(case: str, *args: str) -> dict:
    return {"package": package_tops, "focal": focal_tops, "detect": end_to_end}[case](*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=3000)
    if child_entry(run):
        return
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        chm = Path(scratch) / "chm.tif"
        make_map(chm, args.size)
        ours = run_child(__file__, "package", chm)
        focal = run_child(__file__, "focal", chm)
        whole = run_child(__file__, "detect", chm, args.size, Path(scratch) / "whole.gpkg")
        blocks = run_child(__file__, "detect", chm, 1024, Path(scratch) / "blocks.gpkg")
    mine, theirs = {tuple(t) for t in ours["tops"]}, {tuple(t) for t in focal["tops"]}
    mpx = args.size**2 / 1e6
    result = {
        "map_px": args.size, "megapixels": round(mpx, 2), "tops": len(mine),
        "tops_only_focal_max_finds": len(theirs - mine), "tops_only_package_finds": len(mine - theirs),
        "tops_s": {"package": round(ours["seconds"], 2), "focal_max": round(focal["seconds"], 2)},
        "focal_filters": focal["filters"], "speedup_tops": round(focal["seconds"] / ours["seconds"], 1),
        "detect_trees_s": {"one_block": round(whole["seconds"], 2), "blocks_1024": round(blocks["seconds"], 2)},
        "detect_trees_s_per_mpx": round(whole["seconds"] / mpx, 2),
        "detect_mib_above_imports": {"one_block": round(whole["peak_mib"] - whole["imports_mib"], 1),
                                     "blocks_1024": round(blocks["peak_mib"] - blocks["imports_mib"], 1)},
        "same_trees_in_blocks": whole["trees"] == blocks["trees"],
        "same_crown_areas_in_blocks": whole["crown_pixels"] == blocks["crown_pixels"],
    }  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
