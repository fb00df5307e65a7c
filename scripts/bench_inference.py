"""Benchmark streaming tiled inference: throughput and peak memory against pure compute and a naive baseline.

For each raster size (default 10,000 x 10,000 and 2,000 x 2,000 pixels, 3-band uint8, tiled and
DEFLATE-compressed like a typical scene) and each mode, one fresh child process reports wall time and
peak RSS:

* ``compute`` — the model alone on as many random in-memory batches as ``predict_raster`` feeds it:
  the upper bound on throughput.
* ``predict`` — :func:`dinov3_eo.inference.predict_raster` from the GeoTIFF to a class-map COG.
* ``naive`` — the whole raster read into memory, the same windows and blending on full-size arrays,
  and the whole class map written at the end (what most scripts in this field do).

Targets: ``predict`` throughput >= 0.9 x ``compute`` (reading and writing hidden behind compute) and
peak RSS of the large raster <= 1.2 x that of the small one (memory flat in raster size).

The model (a few 3x3 convolutions, ~2.9k multiply-adds per pixel) runs on ``--threads`` CPU threads
(default 1): with the machine's other core(s) left to reading, decoding, blending and writing, this
stands in for a model on an accelerator with the CPU doing the I/O.

    python scripts/bench_inference.py                      # both sizes, all modes
    python scripts/bench_inference.py --sizes 2000 --json out.json
    python scripts/bench_inference.py --retain-freed-memory    # as the dinov3-eo command runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_process import peak_rss_mib  # noqa: E402  (VmHWM: ru_maxrss would carry the parent's peak over)

WINDOW, OVERLAP, BATCH, CLASSES = 512, 0.25, 4, 4


def build_model(threads: int):  # noqa: ANN201 - torch imported lazily in children
    import torch
    from torch import nn

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, CLASSES, 1),
    )  # fmt: skip
    return model.eval()


def make_raster(path: Path, size: int) -> None:
    """A 3-band uint8 tiled DEFLATE GeoTIFF of smooth structure plus noise, written block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8", "nodata": None,
        "crs": "EPSG:32633", "transform": from_origin(400000, 5000000, 10, 10), "tiled": True,
        "blockxsize": 512, "blockysize": 512, "compress": "deflate", "zlevel": 1,
    }  # fmt: skip
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 512):
            for col in range(0, size, 512):
                h, w = min(512, size - row), min(512, size - col)
                yy, xx = np.mgrid[row : row + h, col : col + w].astype(np.float32)
                base = 96 + 64 * np.sin(yy / 173.0) * np.cos(xx / 211.0)
                bands = [base + 40 * np.sin((yy + 50 * c) / (60.0 + 25 * c)) for c in range(3)]
                noise = rng.integers(0, 24, size=(3, h, w))
                dst.write(np.clip(np.stack(bands) + noise, 0, 255).astype(np.uint8), window=Window(col, row, w, h))


def child(mode: str, src: Path, out: Path, threads: int, retain: bool = False) -> dict:
    if retain:
        from dinov3_eo.allocator import retain_freed_memory

        retain_freed_memory()
    import rasterio
    import torch

    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.inference import TileGrid, predict_raster, write_cog

    model = build_model(threads)
    norm = Normalization.preset("sat493m")
    with rasterio.open(src) as ds:
        height, width = ds.height, ds.width
    grid = TileGrid.build(height, width, window=WINDOW, overlap=OVERLAP)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    if mode == "compute":
        x = torch.randn(BATCH, 3, grid.tile_height, grid.tile_width)
        with torch.inference_mode():
            for first in range(0, len(grid), BATCH):
                model(x[: min(BATCH, len(grid) - first)])
    elif mode == "predict":
        summary = predict_raster(
            model, src, out, out_channels=CLASSES, window=WINDOW, overlap=OVERLAP, batch_size=BATCH,
            normalization=norm, progress=False, overwrite=True,
        )  # fmt: skip
        assert summary.model_calls == -(-len(grid) // BATCH)
    elif mode == "naive":
        with rasterio.open(src) as ds:
            pixels, crs, transform = ds.read(), ds.crs, ds.transform  # the whole scene in memory
        acc = np.zeros((CLASSES, height, width), np.float32)
        total = np.zeros((height, width), np.float32)
        weights = grid.blend_weights()
        tiles = list(grid)
        with torch.inference_mode():
            for first in range(0, len(tiles), BATCH):
                group = tiles[first : first + BATCH]
                x = torch.stack([norm(torch.from_numpy(pixels[:, t.row_off : t.row_off + t.height,
                                                            t.col_off : t.col_off + t.width])) for t in group])  # fmt: skip
                y = (model(x).softmax(1) * weights).numpy()
                for t, yt in zip(group, y):
                    acc[:, t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width] += yt
                    total[t.row_off : t.row_off + t.height, t.col_off : t.col_off + t.width] += weights.numpy()
        labels = (acc / total).argmax(0).astype(np.uint8)
        write_cog(out, labels, crs=crs, transform=transform, nodata=255, overwrite=True)
    else:
        raise ValueError(f"Unknown mode {mode!r}; choose compute, predict or naive.")
    seconds = time.perf_counter() - start
    return {
        "mode": mode, "size": height, "windows": len(grid), "seconds": round(seconds, 2),
        "pixels_per_s": round(height * width / seconds), "peak_rss_mb": round(peak_rss_mib(), 1),
        "rss_before_mb": round(rss_before, 1), "threads": threads, "retain_freed_memory": retain,
    }  # fmt: skip


def run_child(mode: str, src: Path, out: Path, threads: int, retain: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", mode, "--src", str(src), "--out", str(out), "--threads", str(threads)]
    command += ["--retain-freed-memory"] if retain else []
    # OpenMP threads are per OS thread: cap them for the reader/blender threads' torch ops too
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"bench child {mode} on {src} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_inference.py", description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 2_000])
    parser.add_argument("--modes", nargs="+", default=["compute", "predict", "naive"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model")
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="every child keeps freed memory mapped, as the dinov3-eo command does "
                             "(dinov3_eo.allocator); without it, plain Python defaults")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of every mode per size, interleaved; the median time is reported (a 2k run is ~1.5 s, "
                        "so one run alone swings by several percent)")
    parser.add_argument("--workdir", type=Path, default=None, help="where rasters go (default: a temp folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--src", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.src, args.out, args.threads, args.retain_freed_memory)))
        return 0

    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for size in args.sizes:
            src = Path(tmp) / f"scene_{size}.tif"
            started = time.perf_counter()
            make_raster(src, size)
            print(f"generated {size} x {size} in {time.perf_counter() - started:.1f} s", flush=True)
            runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
            for _ in range(args.repeats):  # interleaved, so load from other jobs hits every mode alike
                for mode in args.modes:
                    result = run_child(mode, src, Path(tmp) / f"out_{size}_{mode}.tif", args.threads,
                                       args.retain_freed_memory)
                    runs[mode].append(result)
                    print(json.dumps(result), flush=True)
            for mode, done in runs.items():
                median = sorted(done, key=lambda r: r["seconds"])[len(done) // 2]
                results.append({**median, "runs_seconds": [r["seconds"] for r in done],
                                "peak_rss_mb": max(r["peak_rss_mb"] for r in done)})
            src.unlink()
            for p in Path(tmp).glob(f"out_{size}_*"):
                p.unlink()

    by = {(r["mode"], r["size"]): r for r in results}
    print(f"\n{'size':>6} {'mode':>8} {'median s':>9} {'Mpx/s':>8} {'peak RSS MB':>12}  runs (s)")
    for r in results:
        print(f"{r['size']:>6} {r['mode']:>8} {r['seconds']:>9.2f} {r['pixels_per_s'] / 1e6:>8.2f} {r['peak_rss_mb']:>12.0f}  "
              f"{r['runs_seconds']}")
    for size in args.sizes:
        if ("predict", size) in by and ("compute", size) in by:
            ratio = by[("predict", size)]["pixels_per_s"] / by[("compute", size)]["pixels_per_s"]
            print(f"{size}: predict_raster throughput / pure compute = {ratio:.3f} (target >= 0.9)")
    if len(args.sizes) >= 2:
        large, small = max(args.sizes), min(args.sizes)
        for mode in args.modes:
            if (mode, large) in by and (mode, small) in by:
                ratio = by[(mode, large)]["peak_rss_mb"] / by[(mode, small)]["peak_rss_mb"]
                print(f"{mode}: peak RSS {large} / {small} = {ratio:.2f}" + (" (target <= 1.2)" if mode == "predict" else ""))
    if args.json is not None:
        tmp_json = args.json.with_name(f".{args.json.name}.part")
        tmp_json.write_text(json.dumps(results, indent=2))
        os.replace(tmp_json, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
