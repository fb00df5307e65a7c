"""Zonal statistics of a map over many polygons (``zonal_statistics``) against the usual per-zone loop.

A synthetic canopy-height map (``--size`` px a side at 1 m, float32, tiled and compressed; ``bench_footprints``') and ``--zones`` forest stands:
a jittered grid of quadrilaterals covering the map, so every pixel lies in one stand. Two ways to get each stand's
count, mean, std, min, max and median:

1. ``zonal_statistics`` (block by block: each 1,024-px block rasterises the stands it meets and adds their pixels'
   sums, squares, extremes and a histogram for the median);
2. a loop over the stands, each read as its own window with ``rasterio.mask.mask`` and summarised with numpy (what a
   user scripting with rasterio, or rasterstats' zonal_stats, does), for ``--loop-zones`` of them.

Each runs in its own process (``child_process``) for its peak memory; the statistics must agree (the median within
the histogram's resolution).

    .venv/bin/python scripts/bench_zonal.py [--size 6000] [--zones 3600] [--loop-zones 600]
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
from bench_footprints import make_map  # noqa: E402  (the same 1 m canopy-height map)
from child_process import child_entry, peak_rss_mib, run_child  # noqa: E402

ORIGIN = (300_000.0, 4_100_000.0)


def make_zones(path: Path, size: int, n: int, seed: int = 1) -> None:
    import geopandas as gpd
    from shapely.geometry import Polygon

    rng = np.random.default_rng(seed)
    side = int(round(np.sqrt(n)))
    step = size / side
    corners = np.stack(np.meshgrid(np.arange(side + 1) * step, np.arange(side + 1) * step, indexing="ij"), -1)
    inner = (slice(1, -1), slice(1, -1))
    corners[inner] += rng.uniform(-0.3, 0.3, corners[inner].shape) * step  # irregular stands that still tile
    polygons = []
    for i in range(side):
        for j in range(side):
            ring = [corners[i, j], corners[i + 1, j], corners[i + 1, j + 1], corners[i, j + 1]]
            polygons.append(Polygon([(ORIGIN[0] + x, ORIGIN[1] - y) for x, y in ring]))
    gpd.GeoDataFrame({"stand": np.arange(len(polygons))}, geometry=polygons, crs="EPSG:32611").to_file(path)


def package_way(map_path: str, zones: str) -> dict:
    import geopandas  # noqa: F401  (the imports both ways make, before the memory they use is counted)
    import rasterio.features  # noqa: F401

    from dinov3_eo.tasks.zonal import zonal_statistics

    imports = peak_rss_mib()
    start = time.perf_counter()
    frame = zonal_statistics(map_path, zones, percentiles=(50,), progress=False)
    columns = {k: frame[k].tolist() for k in ("count", "mean", "std", "min", "max", "p50")}
    return {"seconds": time.perf_counter() - start, **columns, "imports_mib": imports, "peak_mib": peak_rss_mib()}


def loop_way(map_path: str, zones: str, limit: str) -> dict:
    import geopandas as gpd
    import rasterio
    from rasterio.mask import mask

    imports = peak_rss_mib()
    start = time.perf_counter()
    frame = gpd.read_file(zones).iloc[: int(limit)]
    out: dict[str, list] = {k: [] for k in ("count", "mean", "std", "min", "max", "p50")}
    with rasterio.open(map_path) as src:
        for zone in frame.geometry:
            values, _ = mask(src, [zone], crop=True, filled=False)
            pixels = values.compressed()
            pixels = pixels[np.isfinite(pixels)].astype(np.float64)
            out["count"].append(int(pixels.size))
            out["mean"].append(float(pixels.mean()))
            out["std"].append(float(pixels.std(ddof=1)))
            out["min"].append(float(pixels.min()))
            out["max"].append(float(pixels.max()))
            out["p50"].append(float(np.percentile(pixels, 50, method="inverted_cdf")))
    return {"seconds": time.perf_counter() - start, **out, "imports_mib": imports, "peak_mib": peak_rss_mib()}


def run(case: str, *args: str) -> dict:
    return package_way(*args) if case == "package" else loop_way(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=6000)
    parser.add_argument("--zones", type=int, default=3600)
    parser.add_argument("--loop-zones", type=int, default=600, help="zones the loop reads (it is slow)")
    if child_entry(run):
        return
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        map_path, zones = Path(scratch) / "chm.tif", Path(scratch) / "stands.gpkg"
        make_map(map_path, args.size)
        make_zones(zones, args.size, args.zones)
        ours = run_child(__file__, "package", map_path, zones)
        loop = run_child(__file__, "loop", map_path, zones, args.loop_zones)
    n = args.loop_zones
    difference = {k: float(np.max(np.abs(np.array(ours[k][:n]) - np.array(loop[k])))) for k in
                  ("count", "mean", "std", "min", "max", "p50")}  # fmt: skip
    zones_made = len(ours["mean"])
    per_zone = {"package_ms": 1000 * ours["seconds"] / zones_made, "loop_ms": 1000 * loop["seconds"] / n}
    result = {"map_px": args.size, "zones": zones_made, "loop_zones": n, "package_s": round(ours["seconds"], 2),
              "package_mib_above_imports": round(ours["peak_mib"] - ours["imports_mib"], 1),
              "loop_s": round(loop["seconds"], 2),
              "loop_mib_above_imports": round(loop["peak_mib"] - loop["imports_mib"], 1),
              "per_zone_ms": {k: round(v, 2) for k, v in per_zone.items()},
              "speedup_per_zone": round(per_zone["loop_ms"] / per_zone["package_ms"], 1),
              "max_abs_diff": difference}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
