"""Reference values of a scene's tiles (``regress fit --scenes``' first step): :func:`value_tiles`, a strip of tile
rows at a time, against the obvious numpy/pandas computation, in one run: time (best of two, warm), peak memory of
each (tracemalloc: numpy's allocations), and whether they give the same values.

1. The real GEDI canopy-height raster (3660 x 3660 px at 30 m, float32, NaN nodata on 58% of it) under a synthetic
   scene on its own grid (only the scene's grid is read), 16-px tiles, mean and p95, against the whole CHM read into
   memory, NaN-padded to whole tiles, reshaped to [rows, 16, cols, 16] and summarised with np.nanmean /
   np.nanpercentile where at least half a tile has a value (value_tiles' default ``min_valid``).
2. The same raster under a 90 m scene (1220 x 1220 px), 4-px tiles (12 x 12 GEDI pixels): p95 read 3 times finer
   than the scene (the default ``oversample``) against ``oversample=1`` (the scene's pixels, nearest), and the
   default against the numpy blocks of the 30 m raster.
3. 100,000 random points with a value over the scene, 16-px tiles, mean, against a pandas groupby on the points'
   (row // 16, col // 16).

    python scripts/bench_tile_values.py [--chm /work/shared/data/gedi_chm/GEDI_11SLT.tif] [--points 100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine

from dinov3_eo.tasks.tile_values import value_tiles

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tile_labels import _measure  # noqa: E402  (best-of-N warm time and tracemalloc peak)


def _scene(path: Path, crs, transform: Affine, size: int) -> Path:  # noqa: ANN001
    """An empty 1-band uint8 GeoTIFF on the grid (``value_tiles`` reads only its grid)."""
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=1, dtype="uint8", crs=crs,
                       transform=transform, tiled=True, blockxsize=512, blockysize=512, sparse_ok=True):  # fmt: skip
        pass
    return path


def _blocks(path: Path, tile: int, statistic: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, values)`` of the tiles at least half covered, from the whole raster in memory (NaN past its
    edges), each ``np.nanmean`` or ``np.nanpercentile`` of its pixels."""
    with rasterio.open(path) as src:
        chm = src.read(1)
    rows, cols = -(-chm.shape[0] // tile), -(-chm.shape[1] // tile)
    padded = np.full((rows * tile, cols * tile), np.nan, chm.dtype)
    padded[: chm.shape[0], : chm.shape[1]] = chm
    blocks = padded.reshape(rows, tile, cols, tile).transpose(0, 2, 1, 3).reshape(rows * cols, tile * tile)
    keep = np.flatnonzero(np.isfinite(blocks).sum(axis=1) >= 0.5 * tile * tile)
    kept = blocks[keep]
    values = np.nanmean(kept, axis=1) if statistic == "mean" else np.nanpercentile(kept, float(statistic[1:]), axis=1)
    return keep // cols, keep % cols, values


def _groupby(points, transform: Affine, tile: int, shape: tuple[int, int]):  # noqa: ANN001, ANN202
    """``(rows, cols, values)``: the mean value of the points in each tile, by a pandas groupby."""
    col, row = ~transform @ (points.geometry.x.to_numpy(), points.geometry.y.to_numpy())
    col, row = np.floor(col), np.floor(row)
    inside = (col >= 0) & (row >= 0) & (col < shape[1]) & (row < shape[0])
    table = points[inside].assign(tile_row=(row[inside] // tile).astype(np.int64),
                                  tile_col=(col[inside] // tile).astype(np.int64))  # fmt: skip
    mean = table.groupby(["tile_row", "tile_col"])["height"].mean()
    return mean.index.get_level_values(0).to_numpy(), mean.index.get_level_values(1).to_numpy(), mean.to_numpy()


def _grid(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.full(shape, np.nan)
    out[rows, cols] = values
    return out


def _agree(tiles, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, name: str) -> dict:  # noqa: ANN001
    """Same tiles and close values (asserted); the largest difference."""
    shape = (int(max(tiles.rows.max(), rows.max())) + 1, int(max(tiles.cols.max(), cols.max())) + 1)
    ours, theirs = _grid(tiles.rows, tiles.cols, tiles.values, shape), _grid(rows, cols, values, shape)
    same_tiles = bool(np.array_equal(np.isnan(ours), np.isnan(theirs)))
    diff = float(np.nanmax(np.abs(ours - theirs)))
    assert same_tiles, f"{name}: value_tiles kept {len(tiles)} tiles, the baseline {len(rows)}"
    assert np.allclose(tiles.values, theirs[tiles.rows, tiles.cols], rtol=1e-5, atol=1e-5), f"{name}: max |diff| {diff}"
    return {"tiles": len(tiles), "same_tiles": same_tiles, "max_abs_diff": diff}


def _line(name: str, ours_s: float, ours_mb: float, base_s: float, base_mb: float, agree: dict) -> dict:
    print(f"{name:<22} value_tiles {ours_s:6.2f} s {ours_mb:7.1f} MiB | baseline {base_s:6.2f} s {base_mb:7.1f} MiB | "
          f"time x{ours_s / base_s:.2f}, memory x{ours_mb / base_mb:.2f} | {agree['tiles']} tiles, same tiles "
          f"{agree['same_tiles']}, max |diff| {agree['max_abs_diff']:.2e}")  # fmt: skip
    return {"value_tiles_s": round(ours_s, 3), "value_tiles_peak_mb": round(ours_mb, 1), "baseline_s": round(base_s, 3),
            "baseline_peak_mb": round(base_mb, 1), **agree}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chm", type=Path, default=Path("/work/shared/data/gedi_chm/GEDI_11SLT.tif"))
    parser.add_argument("--tile", type=int, default=16)
    parser.add_argument("--coarse-tile", type=int, default=4)
    parser.add_argument("--points", type=int, default=100_000)
    args = parser.parse_args()
    with rasterio.open(args.chm) as src:
        crs, transform, size = src.crs, src.transform, src.width
        assert src.width == src.height, "a square CHM"
    report: dict = {"chm": str(args.chm), "chm_px": size, "tile_px": args.tile}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scene = _scene(tmp / "scene_30m.tif", crs, transform, size)
        print(f"1. {args.chm.name} ({size} x {size} px, 30 m) under a scene on its grid, {args.tile}-px tiles")
        for statistic in ("mean", "p95"):
            tiles, ours_s, ours_mb = _measure(lambda s=statistic: value_tiles(scene, args.chm, tile_size=args.tile,
                                                                              statistic=s))  # fmt: skip
            (rows, cols, values), base_s, base_mb = _measure(lambda s=statistic: _blocks(args.chm, args.tile, s))
            agree = _agree(tiles, rows, cols, values, f"same grid {statistic}")
            report[f"same_grid_{statistic}"] = _line(f"   {statistic}", ours_s, ours_mb, base_s, base_mb, agree)

        coarse = transform @ Affine.scale(3)
        scene90 = _scene(tmp / "scene_90m.tif", crs, coarse, size // 3)
        print(f"2. under a 90 m scene ({size // 3} x {size // 3} px), {args.coarse_tile}-px tiles "
              f"({3 * args.coarse_tile} x {3 * args.coarse_tile} GEDI px), p95")  # fmt: skip
        fine, fine_s, fine_mb = _measure(lambda: value_tiles(scene90, args.chm, tile_size=args.coarse_tile,
                                                             statistic="p95"))  # fmt: skip
        once, once_s, once_mb = _measure(lambda: value_tiles(scene90, args.chm, tile_size=args.coarse_tile,
                                                             statistic="p95", oversample=1))  # fmt: skip
        (rows, cols, values), base_s, base_mb = _measure(lambda: _blocks(args.chm, 3 * args.coarse_tile, "p95"))
        agree = _agree(fine, rows, cols, values, "oversampled p95")
        factor = int(round(np.sqrt(fine.count[0] / fine.coverage[0]))) // args.coarse_tile  # count / coverage = side²
        oversampled = _line("   default (x3) p95", fine_s, fine_mb, base_s, base_mb, agree)
        shape = (size // 3 // args.coarse_tile + 1,) * 2
        a, b = _grid(fine.rows, fine.cols, fine.values, shape), _grid(once.rows, once.cols, once.values, shape)
        both = np.isfinite(a) & np.isfinite(b)
        mean_abs = float(np.abs(a - b)[both].mean())
        print(f"   (default oversample picked {factor})")
        print(f"   oversample=1 p95     {once_s:6.2f} s {once_mb:7.1f} MiB (default x3: time x{fine_s / once_s:.2f}) | "
              f"{len(once)} tiles vs {len(fine)} (both: {int(both.sum())}) | p95 mean |diff| {mean_abs:.3f} m, "
              f"max {float(np.abs(a - b)[both].max()):.2f} m, mean p95 {float(a[both].mean()):.3f} m (x3) "
              f"vs {float(b[both].mean()):.3f} m (x1)")  # fmt: skip
        report["oversample"] = {**oversampled, "factor_default": factor,
                                "oversample1_s": round(once_s, 3), "oversample1_peak_mb": round(once_mb, 1),
                                "oversample1_tiles": len(once), "tiles_in_both": int(both.sum()),
                                "p95_mean_abs_diff": round(mean_abs, 4)}  # fmt: skip

        import geopandas as gpd
        import pandas as pd

        rng = np.random.default_rng(0)
        left, top = transform @ (0, 0)
        right, bottom = transform @ (size, size)
        x, y = rng.uniform(left, right, args.points), rng.uniform(bottom, top, args.points)
        points = gpd.GeoDataFrame({"height": rng.gamma(2.0, 5.0, args.points)}, crs=crs,
                                  geometry=gpd.points_from_xy(x, y))  # fmt: skip
        print(f"3. {args.points:,} random points over the scene, {args.tile}-px tiles, mean")
        tiles, ours_s, ours_mb = _measure(lambda: value_tiles(scene, points, tile_size=args.tile))
        (rows, cols, values), base_s, base_mb = _measure(lambda: _groupby(points, transform, args.tile, (size, size)))
        agree = _agree(tiles, rows, cols, values, "points mean")
        report["points"] = {"points": args.points, **_line("   points mean", ours_s, ours_mb, base_s, base_mb, agree)}
        # a dense cluster (a GEDI track crossing one tile many times): memory must follow the points, not their
        # count in the fullest tile times the tiles
        cx, cy = transform @ (8.5, 8.5)
        cluster = gpd.GeoDataFrame({"height": rng.gamma(2.0, 5.0, 20_000)}, crs=crs, geometry=gpd.points_from_xy(
            cx + rng.uniform(-200, 200, 20_000), cy + rng.uniform(-200, 200, 20_000)))  # fmt: skip
        clustered = gpd.GeoDataFrame(pd.concat([points, cluster], ignore_index=True), crs=crs)
        print("   + 20,000 points in one tile, p95")
        tiles, ours_s, ours_mb = _measure(lambda: value_tiles(scene, clustered, tile_size=args.tile, statistic="p95"))
        fullest = int(tiles.count.max())
        print(f"   clustered p95       value_tiles {ours_s:6.2f} s {ours_mb:8.1f} MiB | {len(tiles)} tiles, the fullest "
              f"holds {fullest:,} points")  # fmt: skip
        report["clustered_points"] = {"value_tiles_s": round(ours_s, 3), "value_tiles_peak_mb": round(ours_mb, 1),
                                      "fullest_tile_points": fullest}  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
