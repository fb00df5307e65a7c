"""Scoring a height map per GEDI footprint (``footprint_means``) against the usual per-footprint loop.

A synthetic 1 m canopy-height map (``--size`` px a side, float32 COG-like tiled GeoTIFF, smooth crowns plus noise)
and ``--shots`` 25 m footprints at random places (along tracks 60 m apart, as GEDI's, so some overlap where tracks
cross). Two ways to get each footprint's mean and max height:

1. ``footprint_means`` (block by block: each 1,024-px block rasterises the footprints it meets, in overlap-free
   layers, and adds their pixels' sums, counts and maxima);
2. a loop over the footprints, each read as its own window and masked with ``rasterio.mask.mask`` (what a user
   scripting with rasterio, or rasterstats' zonal statistics, does).

Each runs in its own process (``child_process``) for its peak memory; the values must agree.

    .venv/bin/python scripts/bench_footprints.py [--size 6000] [--shots 20000] [--loop-shots 4000]
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


def make_map(path: Path, size: int, seed: int = 0) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=1, dtype="float32", crs="EPSG:32611",
                   transform=from_origin(300_000, 4_100_000, 1.0, 1.0), nodata=float("nan"), tiled=True,
                   blockxsize=512, blockysize=512, compress="deflate")  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 512):
            h = min(512, size - row)
            r, c = np.mgrid[row : row + h, 0:size]
            crowns = 20 + 15 * np.sin(r / 7.0) * np.cos(c / 9.0) + rng.normal(scale=3, size=(h, size))
            dst.write(np.maximum(crowns, 0).astype(np.float32)[None], window=((row, row + h), (0, size)))


def make_shots(path: Path, size: int, n: int, seed: int = 1) -> None:
    import geopandas as gpd
    from shapely.geometry import Point

    rng = np.random.default_rng(seed)
    points, heights = [], []
    while len(points) < n:  # tracks of shots 60 m apart, at random headings
        x0, y0 = rng.uniform(50, size - 50, 2)
        heading = rng.uniform(0, 2 * np.pi)
        for k in range(50):
            x, y = x0 + 60 * k * np.cos(heading), y0 + 60 * k * np.sin(heading)
            if 20 < x < size - 20 and 20 < y < size - 20 and len(points) < n:
                points.append(Point(300_000 + x, 4_100_000 - y))
                heights.append(float(rng.uniform(0, 50)))
    gpd.GeoDataFrame({"rh98": heights}, geometry=points, crs="EPSG:32611").to_file(path)


def package_way(map_path: str, shots: str) -> dict:
    import geopandas  # noqa: F401  (the imports both ways make, before the memory they use is counted)
    import rasterio.features  # noqa: F401

    from dinov3_eo.tasks.height_footprints import FootprintHeights, footprint_means
    from dinov3_eo.tasks.tile_values import vector_values  # noqa: F401

    imports = peak_rss_mib()
    start = time.perf_counter()
    heights = FootprintHeights(path=shots, attribute="rh98", footprint_m=25.0, clip_negative=False)
    mean = footprint_means(map_path, heights)
    top = footprint_means(map_path, heights, statistic="max")
    return {"seconds": time.perf_counter() - start, "mean": mean.tolist(), "max": top.tolist(),
            "imports_mib": imports, "peak_mib": peak_rss_mib()}


def loop_way(map_path: str, shots: str, limit: int | str) -> dict:
    import geopandas as gpd
    import rasterio
    from rasterio.mask import mask

    imports = peak_rss_mib()
    start = time.perf_counter()
    frame = gpd.read_file(shots).iloc[: int(limit)]
    discs = frame.geometry.buffer(12.5, resolution=16)
    means, tops = [], []
    with rasterio.open(map_path) as src:
        for disc in discs:
            values, _ = mask(src, [disc], crop=True, filled=False)
            pixels = values.compressed()
            pixels = pixels[np.isfinite(pixels)]
            means.append(float(pixels.mean()) if pixels.size else float("nan"))
            tops.append(float(pixels.max()) if pixels.size else float("nan"))
    return {"seconds": time.perf_counter() - start, "mean": means, "max": tops, "imports_mib": imports,
            "peak_mib": peak_rss_mib()}


def run(case: str, *args: str) -> dict:
    return package_way(*args) if case == "package" else loop_way(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--shots", type=int, default=20000)
    parser.add_argument("--loop-shots", type=int, default=4000, help="footprints the loop reads (it is slow)")
    if child_entry(run):
        return
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        map_path, shots = Path(scratch) / "chm.tif", Path(scratch) / "shots.gpkg"
        make_map(map_path, args.size)
        make_shots(shots, args.size, args.shots)
        ours = run_child(__file__, "package", map_path, shots)
        loop = run_child(__file__, "loop", map_path, shots, args.loop_shots)
    ours_mem, loop_mem = ours["peak_mib"] - ours["imports_mib"], loop["peak_mib"] - loop["imports_mib"]
    n = args.loop_shots
    mean_diff = float(np.nanmax(np.abs(np.array(ours["mean"][:n]) - np.array(loop["mean"]))))
    max_diff = float(np.nanmax(np.abs(np.array(ours["max"][:n]) - np.array(loop["max"]))))
    per_shot = {"package_ms": 1000 * ours["seconds"] / args.shots, "loop_ms": 1000 * loop["seconds"] / n}
    result = {"map_px": args.size, "shots": args.shots, "loop_shots": n,
              "package_s": round(ours["seconds"], 2), "package_mib_above_imports": round(ours_mem, 1),
              "loop_s": round(loop["seconds"], 2), "loop_mib_above_imports": round(loop_mem, 1),
              "per_shot_ms": {k: round(v, 3) for k, v in per_shot.items()},
              "speedup_per_shot": round(per_shot["loop_ms"] / per_shot["package_ms"], 1),
              "max_abs_diff_mean": mean_diff, "max_abs_diff_max": max_diff}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
