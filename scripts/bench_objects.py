"""Benchmark ``dinov3-eo objects`` in blocks against the whole scene at once, on the full Landsat-8 scene 224/078.

``image_objects`` segments a scene ``--block`` pixels at a time, each block read with a margin; an object that reaches
into a block is kept whole and later blocks treat its pixels as taken, so that block edges leave no seam. Each case
runs in a fresh child process (its peak RSS its own, imports excluded) on the scene in ../shared/data at ``--size-ha``:

* ``whole``: one block larger than the scene (the baseline of the ratios);
* ``b1024``, ``b512``: blocks of 1,024 and 512 px.

Printed per case: time, peak RSS, the objects' count and mean size, the share of objects under a quarter of the size
asked (slivers), and the seam check: the share of neighbouring valid pixels in different objects across the block
edges against across every other pixel column/row (a straight seam would make the first 1.0).

    python scripts/bench_objects.py [--size-ha 10]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from child_process import child_entry, peak_rss_mib, print_against_baseline, run_child

SCENE = Path(__file__).resolve().parents[2] / "shared" / "data" / "landsat8_l1" / "LC08_L1TP_224078_20200518_20200518_01_RT.TIF"


def boundary_share(ids: np.ndarray, cols: np.ndarray) -> float:
    """Of the valid pixel pairs across ``cols`` (each column with the one left of it), the share in two objects."""
    left, right = ids[:, cols - 1], ids[:, cols]
    both = (left > 0) & (right > 0)
    return float(((left != right) & both).sum() / max(both.sum(), 1))


def run(block: str, size_ha: str, labels: str) -> dict:
    import rasterio

    from dinov3_eo.tasks.image_objects import image_objects

    imported = peak_rss_mib()
    started = time.perf_counter()
    frame = image_objects(SCENE, size_ha=float(size_ha), nodata=0, block=int(block), labels=labels, progress=False)
    seconds = time.perf_counter() - started
    with rasterio.open(labels) as src:
        ids = src.read(1)
        pixel_m2 = abs(src.res[0] * src.res[1])
    step = int(block)
    shares = []
    for grid in (ids, ids.T):
        edges = np.arange(step, grid.shape[1], step)
        others = np.setdiff1d(np.arange(1, grid.shape[1]), edges)
        shares.append((boundary_share(grid, edges) if len(edges) else float("nan"), boundary_share(grid, others)))
    edge = np.nanmean([s[0] for s in shares])
    return {"seconds": seconds, "peak_mib": peak_rss_mib(), "imports_mib": imported,
            "evaluation_mib": peak_rss_mib() - imported, "objects": len(frame),
            "mean_ha": float(frame["area_m2"].mean() / 10_000),
            "slivers": float((frame["pixels"] < float(size_ha) * 10_000 / pixel_m2 / 4).mean()),
            "edge_share": edge, "other_share": float(np.mean([s[1] for s in shares]))}  # fmt: skip


def main() -> None:
    if child_entry(run):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-ha", type=float, default=10.0)
    args = parser.parse_args()
    if not SCENE.is_file():
        raise SystemExit(f"{SCENE} is missing: this benchmark needs ../shared/data (see its MANIFEST.md).")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_objects_") as tmp:
        for name, block in (("whole", 8192), ("b1024", 1024), ("b512", 512)):
            results[name] = run_child(__file__, block, args.size_ha, Path(tmp) / f"{name}.tif")
    print(f"objects of {args.size_ha:g} ha on {SCENE.name}:")
    print_against_baseline(results, "whole", lambda r: (
        f"{r['objects']:,} objects of {r['mean_ha']:.1f} ha, {100 * r['slivers']:.1f} % under a quarter of that, "
        f"boundaries across block edges {r['edge_share']:.3f} vs elsewhere {r['other_share']:.3f}"))


if __name__ == "__main__":
    main()
