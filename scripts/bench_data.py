"""Benchmark the GeoTIFF data layer: tiles/s against torchgeo, and peak memory vs raster size.

What it measures, in one run:

1. **Throughput** — 256-px random tiles per second through a ``DataLoader`` with the same number of
   workers and batch size, for dinov3_eo (``RandomTileSampler`` + ``TileDataset``: nodata mask and
   z-score included) and for torchgeo 0.10 (``RasterDataset`` + ``RandomPatchSampler``), on the real
   Landsat-8 scene from ``../shared/data`` and on a large synthetic tiled GeoTIFF (20,000 × 20,000 ×
   4 bands uint16, ZSTD, written once into ``--workdir``). The page cache is warmed for each file
   before either library reads it, and the first batch (worker start-up) is not timed. Our optional
   block-snapped sampling (``snap=256``) is timed too and reported separately.
2. **Peak memory** — each of the small and the large raster is read (index + N random tiles, no
   workers) in its own child process, which reports its peak RSS (``VmHWM``).

Usage: ``python scripts/bench_data.py [--workers 2] [--tiles 512] [--json out.json]``

Measured (2026-11-26, 2 shared CPU cores under load average ~7 from other jobs, 2 workers, batch 16,
512 tiles; two runs, so read the spread as noise):

=========================================  ===========  ===========
                                            Landsat-8    20k x 20k
=========================================  ===========  ===========
dinov3_eo tiles/s                           474 / 351    134 / 111
torchgeo RasterDataset + RandomPatchSampler 136 / 135     35 / 51
speed-up (like for like)                    3.5x / 2.6x  3.9x / 2.2x
dinov3_eo, snap=256 (block-aligned)         321 / 494    167 / 205
peak RSS (index + 300 tiles, MiB)           756          813 (ratio 1.07)
=========================================  ===========  ===========
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
LANDSAT = REPO.parent / "shared" / "data" / "landsat8_l1" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"
SAMPLE = REPO / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


def write_large_raster(path: Path, size: int) -> None:
    """A tiled, ZSTD-compressed ``size``² × 4-band uint16 GeoTIFF with smooth structure and noise."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(
        driver="GTiff", width=size, height=size, count=4, dtype="uint16", crs="EPSG:32633",
        transform=from_origin(300000, 6000000, 10, 10), tiled=True, blockxsize=256, blockysize=256,
        compress="zstd", zstd_level=1, predictor=2, nodata=0, BIGTIFF="YES",
    )  # fmt: skip
    rng = np.random.default_rng(0)
    x = np.arange(size, dtype=np.float32)[None, :]
    tmp = path.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, 1024):
            h = min(1024, size - row)
            y = np.arange(row, row + h, dtype=np.float32)[:, None]
            base = 3000 + 1000 * np.sin(x / 700.0) * np.cos(y / 900.0)  # [h, size]
            for band in range(4):
                noise = rng.integers(0, 32, size=(h, size), dtype=np.uint16)
                dst.write((base + 500 * band).astype(np.uint16) + noise, band + 1, window=Window(0, row, size, h))
    os.replace(tmp, path)


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def bench_ours(path: Path, *, tiles: int, workers: int, batch_size: int, seed: int, snap: int = 1) -> float:
    from torch.utils.data import DataLoader

    from dinov3_eo.data import Normalization, RandomTileSampler, RasterIndex, TileDataset, TileGrid, collate_samples

    index = RasterIndex.build(path, cache_dir=None)
    grid = TileGrid(index=index, tile_size=256)
    norm = Normalization.zscore([5000.0] * index.num_bands, [1000.0] * index.num_bands)
    dataset = TileDataset(grid=grid, nodata=0, normalization=norm)
    wanted = tiles + batch_size
    if snap == 1:
        sampler = RandomTileSampler(grid=grid, length=wanted, seed=seed, max_nodata_fraction=1.0, rank=0, world_size=1)
    else:
        # a small scene has few block-aligned tiles: take successive epochs until enough are drawn
        distinct = sum((grid.max_offsets(f)[0] // snap + 1) * (grid.max_offsets(f)[1] // snap + 1) for f in range(len(grid)))
        epoch_sampler = RandomTileSampler(grid=grid, length=min(wanted, distinct), seed=seed, max_nodata_fraction=1.0, snap=snap, rank=0, world_size=1)
        sampler = []
        while len(sampler) < wanted:
            epoch_sampler.set_epoch(len(sampler))
            sampler += list(epoch_sampler)
        sampler = sampler[:wanted]
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_samples)
    return _time_loader(loader)


def bench_torchgeo(path: Path, *, tiles: int, workers: int, batch_size: int, seed: int) -> float:
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomPatchSampler

    class Archive(RasterDataset):
        filename_glob = path.name

    dataset = Archive(paths=str(path.parent))
    sampler = RandomPatchSampler(dataset, size=256, length=tiles + batch_size, generator=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=stack_samples)
    return _time_loader(loader)


def _time_loader(loader) -> float:
    it = iter(loader)
    next(it)  # worker start-up and first reads are not timed
    count, start = 0, time.perf_counter()
    for batch in it:
        count += batch["image"].shape[0]
    return count / (time.perf_counter() - start)


def rss_child(path: str, tiles: int, seed: int) -> None:
    """Runs in its own process: index + read ``tiles`` random 256-px tiles; prints peak RSS in MiB."""
    from dinov3_eo.data import RandomTileSampler, RasterIndex, TileDataset, TileGrid

    index = RasterIndex.build(path, cache_dir=None)
    grid = TileGrid(index=index, tile_size=256)
    dataset = TileDataset(grid=grid, nodata=0)
    for tile in RandomTileSampler(grid=grid, length=tiles, seed=seed, max_nodata_fraction=1.0, rank=0, world_size=1):
        dataset[tile]
    print(json.dumps({"peak_rss_mib": _peak_rss_mib()}))


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). ``ru_maxrss`` is not used: Linux carries it over from
    the parent across fork/exec, so a child would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_rss(path: Path, tiles: int, seed: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss-child", str(path), "--tiles", str(tiles), "--seed", str(seed)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/dinov3_eo_bench", help="where the synthetic raster is written (kept)")
    parser.add_argument("--landsat", default=str(LANDSAT if LANDSAT.exists() else SAMPLE), help="the real small raster")
    parser.add_argument("--large-size", type=int, default=20000, help="side of the synthetic raster in pixels")
    parser.add_argument("--tiles", type=int, default=512, help="timed tiles per library and file")
    parser.add_argument("--rss-tiles", type=int, default=300, help="tiles read in each memory child")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torchgeo", action="store_true")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.tiles, args.seed)
        return 0

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    large = workdir / f"synthetic_{args.large_size}_4band_uint16.tif"
    if not large.exists():
        t0 = time.perf_counter()
        write_large_raster(large, args.large_size)
        print(f"wrote {large} ({large.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    small = Path(args.landsat)
    results: dict[str, object] = {"workers": args.workers, "batch_size": args.batch_size, "tile": 256, "tiles": args.tiles,
                                  "cpu_count": os.cpu_count(), "files": {"small": str(small), "large": str(large)}}
    for label, path in (("small", small), ("large", large)):
        warm_page_cache(path)
        kw = dict(tiles=args.tiles, workers=args.workers, batch_size=args.batch_size, seed=args.seed)
        row = {"ours_tiles_per_s": bench_ours(path, **kw)}
        if not args.skip_torchgeo:
            row["torchgeo_tiles_per_s"] = bench_torchgeo(path, tiles=args.tiles, workers=args.workers, batch_size=args.batch_size, seed=args.seed)
            row["speedup"] = row["ours_tiles_per_s"] / row["torchgeo_tiles_per_s"]
        # our optional block-snapped sampling (both files use 256-px blocks): not like-for-like, reported apart
        row["ours_snapped_tiles_per_s"] = bench_ours(path, snap=256, **kw)
        if "torchgeo_tiles_per_s" in row:
            row["speedup_snapped"] = row["ours_snapped_tiles_per_s"] / row["torchgeo_tiles_per_s"]
        results[f"throughput_{label}"] = row
        print(label, json.dumps(row), flush=True)
    rss_small = measure_rss(small, args.rss_tiles, args.seed)
    rss_large = measure_rss(large, args.rss_tiles, args.seed)
    results["peak_rss_mib"] = {"small": rss_small, "large": rss_large, "ratio": rss_large / rss_small}
    print("peak RSS", json.dumps(results["peak_rss_mib"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
