"""One embedding per polygon (``embed --zones``) against the backbone work it cannot avoid: the scene's patch features.

A synthetic 3-band scene (``--size`` px a side at 1 m, uint8, tiled) and ``--zones`` parcels that tile it (the
jittered quadrilaterals of ``bench_zonal``). Timed in one process, alternating, with a random ``--arch`` (default the
micro ViT: the zones' cost does not depend on the backbone, so the smallest one shows it largest):

1. ``stream_patch_features`` over the scene, features discarded (the backbone work, the baseline);
2. ``zone_embeddings`` (the same stream, plus each parcel's exact overlap with its patches and the weighted sums;
   with ``--corner F`` the parcels cover only that share of the scene, and only the windows under them are embedded).

Then ``zone_embeddings`` alone in a fresh process for its peak memory above the imports.

    .venv/bin/python scripts/bench_zone_embeddings.py [--size 2048] [--zones 3600]
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
from bench_zonal import make_zones  # noqa: E402  (parcels that tile a map at 1 m from the same origin)
from child_process import child_entry, peak_rss_mib, run_child  # noqa: E402


def make_scene(path: Path, size: int, seed: int = 0) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(seed)
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", crs="EPSG:32611",
                   transform=from_origin(300_000, 4_100_000, 1.0, 1.0), tiled=True, blockxsize=256, blockysize=256)  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        for row in range(0, size, 256):
            h = min(256, size - row)
            r, c = np.mgrid[row : row + h, 0:size]
            base = 120 + 60 * np.sin(r / 40.0) * np.cos(c / 55.0)
            image = np.stack([base + rng.normal(0, 10, base.shape) for _ in range(3)])
            dst.write(np.clip(image, 0, 255).astype(np.uint8), window=((row, row + h), (0, size)))


def backbone(arch: str):
    import torch

    from dinov3_eo.models import build_backbone

    torch.manual_seed(0)
    return build_backbone(arch, in_chans=3)


def timed(scene: str, zones: str, repeats: int, arch: str) -> dict:
    import geopandas as gpd
    import rasterio

    from dinov3_eo.tasks.features import stream_patch_features
    from dinov3_eo.tasks.zone_embeddings import zone_embeddings

    vit, parcels = backbone(arch), gpd.read_file(zones)
    features, embeddings = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        with rasterio.open(scene) as src:
            for _ in stream_patch_features(vit, src, normalization=None, progress=False):
                pass
        features.append(time.perf_counter() - start)
        start = time.perf_counter()
        table = zone_embeddings(vit, scene, parcels, progress=False)
        embeddings.append(time.perf_counter() - start)
    return {"features_s": features, "zones_s": embeddings, "coverage": float(table["coverage"].mean())}


def memory(scene: str, zones: str, arch: str) -> dict:
    import geopandas as gpd

    from dinov3_eo.tasks.zone_embeddings import zone_embeddings

    vit, parcels = backbone(arch), gpd.read_file(zones)
    imports = peak_rss_mib()
    zone_embeddings(vit, scene, parcels, progress=False)
    return {"mib_above_imports": peak_rss_mib() - imports}


def run(case: str, *args: str) -> dict:
    return timed(args[0], args[1], int(args[2]), args[3]) if case == "timed" else memory(*args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--zones", type=int, default=3600)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arch", default="vitmicro16", help="the backbone (random weights): vitmicro16, vits16 ...")
    parser.add_argument("--corner", type=float, default=1.0, help="keep only the parcels in this share of the scene's "
                        "area, a square at its top-left (default 1: all); the baseline stays the whole scene's features")  # fmt: skip
    if child_entry(run):
        return
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        scene, zones = Path(scratch) / "scene.tif", Path(scratch) / "parcels.gpkg"
        make_scene(scene, args.size)
        make_zones(zones, args.size, args.zones)
        if args.corner < 1:
            import geopandas as gpd
            import rasterio

            with rasterio.open(scene) as src:
                left, _, _, top = src.bounds
            side = args.size * args.corner**0.5  # metres: the scene is at 1 m
            parcels = gpd.read_file(zones)
            centres = parcels.geometry.centroid
            parcels[(centres.x < left + side) & (centres.y > top - side)].to_file(zones)
        count = len(__import__("geopandas").read_file(zones))
        times = run_child(__file__, "timed", scene, zones, args.repeats, args.arch)
        peak = run_child(__file__, "memory", scene, zones, args.arch)
    features, zones_s = np.median(times["features_s"]), np.median(times["zones_s"])
    print(json.dumps({"arch": args.arch, "scene_px": args.size, "zones": count, "corner": args.corner,
                      "features_s": round(float(features), 2),
                      "zone_embeddings_s": round(float(zones_s), 2), "ratio": round(float(zones_s / features), 3),
                      "ms_per_zone_added": round(1000 * float(zones_s - features) / count, 3),
                      "mean_coverage": round(times["coverage"], 4),
                      "mib_above_imports": round(peak["mib_above_imports"], 1)}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
