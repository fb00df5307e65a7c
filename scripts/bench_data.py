"""Benchmark the GeoTIFF data layer: tiles/s against torchgeo, interference with a training thread, peak memory.

What it measures, in one run:

1. **Throughput** — 256-px random tiles per second (and per CPU-second of the main process and its
   workers, which other jobs' load on a shared machine barely moves) with the same number of workers
   (``--workers``) and batch size, for dinov3_eo (``RandomTileSampler`` + ``TileDataset``: nodata mask and
   z-score included) and for torchgeo 0.10 (``RasterDataset`` + ``RandomPatchSampler`` in a ``DataLoader``),
   on the real Landsat-8 scene from ``../shared/data`` and on a large synthetic tiled GeoTIFF (20,000 ×
   20,000 × 4 bands uint16, ZSTD, written once into ``--workdir``). Ours is timed with its default
   :class:`~dinov3_eo.data.loader.ThreadedTileLoader` (as many reading threads as torchgeo has worker
   processes) and with a ``DataLoader`` of worker processes like torchgeo's; our optional block-snapped
   sampling (``snap=256``) is reported apart (other sampling). Every timing runs in a fresh child process
   (no GDAL cache setting or content carried from one library to the other); the page cache is warmed for
   each file first, and the first batch (worker start-up) and ``--warmup-tiles`` more are not timed: GDAL's default
   block cache, which torchgeo's workers use (5 % of RAM each), reads 2-4x slower while it fills (183-435 page
   faults per tile as its fresh memory is touched) and faster once full (re-visited blocks hit), so a short timing
   would catch torchgeo in its slowest phase. The steady state is reported, with each variant's peak RSS. The
   decode floor — plain ``rasterio`` reads of the same windows in one process, with our reader's GDAL cache —
   bounds what a loader could reach: its tiles per CPU-second over torchgeo's is the largest possible speed-up
   on that file.
2. **A training thread beside the loader** — a Python thread that issues ``--launch-ops`` tiny torch ops per
   batch (each holds the GIL, as eager GPU kernel launches do), fed by worker processes or by reading
   threads: the seconds per step against the same loop fed a ready batch. Where the loop is short, the
   loader limits it; where it is long, the difference is what the loader's threads (GIL) or processes
   (hand-over, CPU) take from it.
3. **Peak memory** — each of the small and the large raster is read (index + N random tiles, no
   workers) in its own child process, which reports its peak RSS (``VmHWM``).

Each throughput is timed ``--repeats`` times, the variants interleaved so that drifting load from
other jobs hits all alike; the medians and their ratio are reported (and every run in ``--json``).
The numbers measured are in README.md ("Measured").

Usage: ``python scripts/bench_data.py [--workers 2] [--tiles 2048] [--warmup-tiles 3072] [--repeats 3] [--json out.json]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from child_process import peak_rss_mib

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


def random_tiles(path: Path | str, *, length: int, seed: int, snap: int = 1):  # noqa: ANN201 - (TileGrid, [Tile])
    """The 256-px grid of ``path`` and ``length`` random tiles on it (no nodata rejection), as every timing uses them.

    With ``snap`` > 1 the tile origins are block-aligned; a small scene has few such tiles, so successive epochs are
    drawn until there are enough.
    """
    from dinov3_eo.data import RandomTileSampler, RasterIndex, TileGrid

    grid = TileGrid(index=RasterIndex.build(path, cache_dir=None), tile_size=256)
    common = dict(grid=grid, seed=seed, max_nodata_fraction=1.0, rank=0, world_size=1)
    if snap == 1:
        return grid, list(RandomTileSampler(length=length, **common))
    distinct = sum((grid.max_offsets(f)[0] // snap + 1) * (grid.max_offsets(f)[1] // snap + 1) for f in range(len(grid)))
    epoch_sampler = RandomTileSampler(length=min(length, distinct), snap=snap, **common)
    tiles = []
    while len(tiles) < length:
        epoch_sampler.set_epoch(len(tiles))
        tiles += list(epoch_sampler)
    return grid, tiles[:length]


def bench_ours(
    path: Path, *, tiles: int, workers: int, batch_size: int, seed: int, warmup: int = 0, snap: int = 1,
    threads: bool = False,
) -> tuple[float, float, float]:
    """Our loader: ``workers`` DataLoader worker processes, or with ``threads`` a ThreadedTileLoader of as many threads."""
    loader = _make_loader(path, tiles=warmup + tiles + batch_size, workers=workers, batch_size=batch_size, seed=seed,
                          snap=snap, threads=threads)
    try:
        return _time_loader(loader, warmup // batch_size)
    finally:
        if threads:
            loader.close()


def _make_loader(path: Path, *, tiles: int, workers: int, batch_size: int, seed: int, threads: bool,
                 snap: int = 1):  # noqa: ANN202
    """``tiles`` random tiles of ``path`` (nodata 0, a z-score) through ``workers`` worker processes or threads."""
    from torch.utils.data import DataLoader

    from dinov3_eo.data import Normalization, TileDataset, collate_samples
    from dinov3_eo.data.loader import ThreadedTileLoader

    grid, sampler = random_tiles(path, length=tiles, seed=seed, snap=snap)
    bands = grid.index.num_bands
    dataset = TileDataset(grid=grid, nodata=0, normalization=Normalization.zscore([5000.0] * bands, [1000.0] * bands))
    if threads:
        return ThreadedTileLoader(dataset, sampler=sampler, batch_size=batch_size, num_threads=workers)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_samples)


def bench_launch_bound(path: Path, *, batches: int, workers: int, batch_size: int, seed: int,
                       ops_per_batch: int) -> dict[str, float]:
    """Seconds per step of a Python thread that issues ``ops_per_batch`` tiny torch ops per batch, fed three ways.

    What a GPU training loop's main thread does: eager kernel launches hold the GIL, so reading threads in the same
    process could slow it where worker processes would not. The tiny CPU ops stand in for the launches (each holds
    the GIL for its whole dispatch, the worst case for threads). Fed by: one batch reused (no loader: the loop
    alone), ``workers`` DataLoader worker processes, ``workers`` threads of a ThreadedTileLoader. Both loaders read
    ahead, so a slower step with a loader is interference (CPU and, for threads, the GIL), or the loader falling
    behind when the step is short.
    """
    import torch

    def run(loader) -> float:  # noqa: ANN001
        it = iter(loader)
        next(it)
        acc = torch.zeros(1)
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            acc += batch["image"][0, 0, 0, 0]
            for _ in range(ops_per_batch):
                acc.add_(1.0)
        seconds = (time.perf_counter() - start) / batches
        if hasattr(loader, "close"):
            loader.close()
        return seconds

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # one launching thread, as a GPU loop's
    try:
        kw = dict(tiles=(batches + 3) * batch_size, workers=workers, batch_size=batch_size, seed=seed)
        loader = _make_loader(path, threads=True, **kw)
        one = next(iter(loader))
        loader.close()
        alone = run(itertools.repeat(one, batches + 1))
        processes = run(_make_loader(path, threads=False, **kw))
        threads = run(_make_loader(path, threads=True, **kw))
    finally:
        torch.set_num_threads(previous)
    return {"ops_per_batch": ops_per_batch, "alone_s": alone, "processes_s": processes, "threads_s": threads,
            "processes_over_alone": processes / alone, "threads_over_alone": threads / alone}


def bench_bare_reads(path: Path, *, tiles: int, seed: int) -> float:
    """The decode floor: tiles per CPU-second of plain ``rasterio`` reads of the same random windows, one process.

    No nodata mask, normalisation, batching or hand-over: what reading alone costs, with the GDAL block cache our
    reader uses (``gdal_cache_mb``, 64 MiB; a larger cache turns re-visited blocks of a big raster into hits, and
    costs memory in proportion to the raster). ``floor / torchgeo`` (per CPU-second) bounds the speed-up a loader
    with that cache could reach on that file.
    """
    import rasterio
    from rasterio.env import set_gdal_config

    from dinov3_eo.data.datasets import GDAL_CACHE_MB

    windows = [tile.window for tile in random_tiles(path, length=tiles, seed=seed)[1]]
    set_gdal_config("GDAL_CACHEMAX", GDAL_CACHE_MB * 1024 * 1024)
    with rasterio.open(path) as src:
        src.read(window=windows[0])
        cpu0 = _cpu_seconds([os.getpid()])
        for window in windows:
            src.read(window=window)
        return len(windows) / (_cpu_seconds([os.getpid()]) - cpu0)


def bench_torchgeo(path: Path, *, tiles: int, workers: int, batch_size: int, seed: int,
                   warmup: int = 0) -> tuple[float, float, float]:
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomPatchSampler

    class Archive(RasterDataset):
        filename_glob = path.name

    dataset = Archive(paths=str(path.parent))
    sampler = RandomPatchSampler(dataset, size=256, length=warmup + tiles + batch_size, generator=seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=stack_samples)
    return _time_loader(loader, warmup // batch_size)


def _time_loader(loader, warmup_batches: int = 0) -> tuple[float, float, float]:
    """(tiles/s, tiles per CPU-second of the main process and its workers, their summed peak RSS in MiB), timed
    after the first ``1 + warmup_batches`` batches.

    A thread loader's threads are part of the main process, so its CPU seconds count in full.
    """
    it = iter(loader)
    for _ in range(1 + warmup_batches):  # worker start-up, first reads and the warm-up are not timed
        next(it)
    # Worker pids from the iterator (a private attribute, fine in a benchmark): their CPU must be read before
    # the last batch, after which the DataLoader shuts them down.
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    count, start, cpu0 = 0, time.perf_counter(), _cpu_seconds(pids)
    for _ in range(len(loader) - 2 - warmup_batches):
        count += next(it)["image"].shape[0]
    cpu, wall = _cpu_seconds(pids) - cpu0, time.perf_counter() - start
    rss = sum(peak_rss_mib(pid) for pid in pids)
    for batch in it:  # the last batch: drained, not counted
        pass
    return count / wall, count / cpu, rss


def _summary(label: str, row: dict[str, object], workers: int) -> str:
    """The throughput medians as a small table that names which comparison is like for like."""
    lines = [f"{label}: median tiles/s (tiles per CPU-second) [peak RSS of the process and its workers, summed], "
             "speed-up over torchgeo in tiles/s"]
    for variant, (name, remark) in VARIANT_LABELS.items():
        if f"{variant}_tiles_per_s" in row:
            speedup = "" if variant == "torchgeo" else f"  {row[f'speedup_{variant}_tiles_per_s']:.2f}x"
            lines.append(f"  {name.format(workers=workers):48s} {row[f'{variant}_tiles_per_s']:7.0f} "
                         f"({row[f'{variant}_tiles_per_cpu_s']:.0f}) [{row[f'{variant}_peak_rss_mib']:,.0f} MiB]"
                         f"{speedup}{remark}")
    lines.append(f"  {'plain rasterio reads of the same windows, 1 process':48s}         "
                 f"({row['bare_reads_tiles_per_cpu_s']:.0f})  {row['speedup_bound_per_cpu_s']:.2f}x per CPU-second: "
                 "the most any loader with our GDAL cache could reach")
    return "\n".join(lines)


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of ``pids`` from /proc: unlike wall time, barely moved by other jobs' load."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return ticks / os.sysconf("SC_CLK_TCK")


#: what each throughput variant runs, in a child process of its own
VARIANTS = {
    "torchgeo": lambda path, kw: bench_torchgeo(path, **kw),
    "ours": lambda path, kw: bench_ours(path, threads=True, **kw),
    "ours_processes": lambda path, kw: bench_ours(path, **kw),
    "ours_snapped": lambda path, kw: bench_ours(path, threads=True, snap=256, **kw),
}
#: the summary's name of each variant, and what sets it apart
VARIANT_LABELS = {
    "torchgeo": ("torchgeo, {workers} worker processes", ""),
    "ours": ("ours, {workers} reading threads (default)", "  (like for like)"),
    "ours_processes": ("ours, {workers} worker processes", "  (like for like, processes)"),
    "ours_snapped": ("ours, {workers} reading threads, snap=256", "  (block-aligned sampling)"),
}


def measure(variant: str, path: Path, *, tiles: int, workers: int, batch_size: int, seed: int,
            warmup: int = 0) -> tuple[float, float, float]:
    """(tiles/s, tiles per CPU-second, peak RSS in MiB of the process and its workers) of ``variant`` on ``path``,
    timed in a fresh Python process after ``warmup`` untimed tiles.

    A fresh process per timing, so that no library inherits another's state: GDAL's block cache is process-wide
    (our reader caps it at 64 MiB, GDAL's default is 5 % of RAM), and worker processes forked from a parent
    holding a large filled cache were measurably slower (torchgeo on the 20k raster: ~310 instead of ~385
    tiles/s, 2026-11-26).
    """
    return tuple(_run_child("--child", variant, str(path), "--tiles", str(tiles), "--workers", str(workers),
                            "--batch-size", str(batch_size), "--seed", str(seed), "--warmup-tiles", str(warmup)))


def _run_child(*argv: str):  # noqa: ANN202 - the child's JSON answer
    """Run this script with ``argv`` in a fresh Python process; the JSON its last output line holds."""
    out = subprocess.run([sys.executable, __file__, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_child(path: str, tiles: int, seed: int) -> None:
    """Runs in its own process: index + read ``tiles`` random 256-px tiles; prints peak RSS in MiB."""
    from dinov3_eo.data import TileDataset

    grid, sample = random_tiles(path, length=tiles, seed=seed)
    dataset = TileDataset(grid=grid, nodata=0)
    for tile in sample:
        dataset[tile]
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def measure_rss(path: Path, tiles: int, seed: int) -> float:
    return _run_child("--rss-child", str(path), "--tiles", str(tiles), "--seed", str(seed))["peak_rss_mib"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/dinov3_eo_bench", help="where the synthetic raster is written (kept)")
    parser.add_argument("--landsat", default=str(LANDSAT if LANDSAT.exists() else SAMPLE), help="the real small raster")
    parser.add_argument("--large-size", type=int, default=20000, help="side of the synthetic raster in pixels")
    parser.add_argument("--tiles", type=int, default=2048, help="timed tiles per library, file and repeat")
    parser.add_argument("--warmup-tiles", type=int, default=3072,
                        help="untimed tiles before each timing: GDAL's default block cache (torchgeo's; 5 %% of RAM "
                             "per worker) reads slower while it fills, ~1,000 tiles per worker on the 20k raster")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per library and file, interleaved; medians are reported")
    parser.add_argument("--rss-tiles", type=int, default=300, help="tiles read in each memory child")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-torchgeo", action="store_true")
    parser.add_argument("--launch-ops", type=int, nargs="*", default=[2000, 20000],
                        help="tiny torch ops per batch of the launch-bound loop (threads vs processes beside a "
                        "GIL-holding training thread); none to skip")
    parser.add_argument("--launch-batches", type=int, default=60, help="timed batches of each launch-bound loop")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.tiles, args.seed)
        return 0
    if args.child:
        variant, path = args.child
        kw = dict(tiles=args.tiles, workers=args.workers, batch_size=args.batch_size, seed=args.seed,
                  warmup=args.warmup_tiles)
        print(json.dumps(VARIANTS[variant](Path(path), kw)))
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
                                  "warmup_tiles": args.warmup_tiles,
                                  "cpu_count": os.cpu_count(), "files": {"small": str(small), "large": str(large)}}
    for label, path in (("small", small), ("large", large)):
        warm_page_cache(path)
        kw = dict(tiles=args.tiles, workers=args.workers, batch_size=args.batch_size, seed=args.seed,
                  warmup=args.warmup_tiles)
        runs: dict[str, list[tuple[float, float, float]]] = {variant: [] for variant in VARIANTS}
        # Interleaved, so that load from other jobs drifting during the run hits every variant alike. Besides the
        # like-for-like pairs (our default thread loader, and worker processes like torchgeo's): our optional
        # block-snapped sampling (both files use 256-px blocks; other sampling, reported apart).
        for _ in range(args.repeats):
            for variant in runs:
                if variant != "torchgeo" or not args.skip_torchgeo:
                    runs[variant].append(measure(variant, path, **kw))
        row: dict[str, object] = {"bare_reads_tiles_per_cpu_s": bench_bare_reads(path, tiles=args.tiles, seed=args.seed)}
        for k, v in runs.items():
            if v:
                row[f"{k}_tiles_per_s"] = float(np.median([r for r, _, _ in v]))
                row[f"{k}_tiles_per_cpu_s"] = float(np.median([c for _, c, _ in v]))
                row[f"{k}_peak_rss_mib"] = float(np.median([m for _, _, m in v]))
        row["runs"] = {k: [{"tiles_per_s": r, "tiles_per_cpu_s": c, "peak_rss_mib": m} for r, c, m in v]
                       for k, v in runs.items()}
        if runs["torchgeo"]:
            for variant in VARIANTS:
                for unit in ("tiles_per_s", "tiles_per_cpu_s"):
                    row[f"speedup_{variant}_{unit}"] = row[f"{variant}_{unit}"] / row[f"torchgeo_{unit}"]
                row[f"speedup_{variant}_per_run"] = [o[0] / t[0] for o, t in zip(runs[variant], runs["torchgeo"])]
            row["speedup_bound_per_cpu_s"] = row["bare_reads_tiles_per_cpu_s"] / row["torchgeo_tiles_per_cpu_s"]
        results[f"throughput_{label}"] = row
        print(label, json.dumps(row), flush=True)
        if runs["torchgeo"]:
            print(_summary(label, row, args.workers), flush=True)
        launch = [bench_launch_bound(path, batches=args.launch_batches, workers=args.workers, batch_size=args.batch_size,
                                     seed=args.seed, ops_per_batch=ops) for ops in args.launch_ops]
        for r in launch:
            print(f"{label}: launch-bound step of {r['ops_per_batch']:,} GIL-holding ops: alone {r['alone_s'] * 1e3:.1f} ms, "
                  f"fed by {args.workers} processes {r['processes_s'] * 1e3:.1f} ms ({r['processes_over_alone']:.2f}x), "
                  f"by {args.workers} threads {r['threads_s'] * 1e3:.1f} ms ({r['threads_over_alone']:.2f}x)", flush=True)
        results[f"launch_bound_{label}"] = launch
    rss_small = measure_rss(small, args.rss_tiles, args.seed)
    rss_large = measure_rss(large, args.rss_tiles, args.seed)
    results["peak_rss_mib"] = {"small": rss_small, "large": rss_large, "ratio": rss_large / rss_small}
    print("peak RSS", json.dumps(results["peak_rss_mib"]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
