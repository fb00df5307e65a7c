"""Benchmark ``dinov3-eo cluster``: what fitting on sampled windows costs and loses against clustering every patch.

Builds a ``--size``² raster by tiling the bundled Landsat scene (as ``scripts/bench_change.py`` does) and runs each
case in a fresh child process (peak memory its own, imports excluded):

* ``fit``: :func:`fit_clusters` (k = 8, the default 64 windows and 50,000 samples);
* ``map``: :func:`cluster_raster` with those centroids (512-px windows, 25 % overlap), at ``--size`` and at a
  quarter of the side (does memory stay flat?);
* ``whole``: the baseline a script would write: read the raster whole, run the same model over non-overlapping
  windows, keep every patch's features, fit the same spherical k-means on all of them, assign every patch, write.

Then the maps are compared (adjusted Rand index over the pixels): what fitting on a sample loses, against how much two
seeds of the in-memory fit already disagree (k-means has many near-equal optima).
The model is the micro ViT (random weights) so that the pipeline, not the backbone, is what is measured.

    python scripts/bench_cluster.py [--size 4096]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_change import MEAN, STD, make_dates  # noqa: E402
from child_process import child_entry, peak_rss_mib, run_child  # noqa: E402


K = 8


def run(mode: str, raster: str, out: str) -> dict:
    import rasterio
    import torch
    import torch.nn.functional as F

    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.inference.writers import write_cog
    from dinov3_eo.models.vit import build_backbone
    from dinov3_eo.tasks.clustering import Clusters, cluster_raster, fit_clusters, normed_patch_tokens
    from dinov3_eo.tasks.kmeans import spherical_kmeans

    torch.set_num_threads(2)
    torch.manual_seed(0)
    backbone = build_backbone("vitmicro16").eval()
    norm = Normalization.zscore(MEAN, STD)
    imported = peak_rss_mib()
    started = time.perf_counter()
    extra: dict = {}
    if mode == "fit":
        clusters = fit_clusters(backbone, [raster], K, normalization=norm, nodata=0, progress=False)
        clusters.save(out, overwrite=True)
        extra["samples"] = clusters.samples
    elif mode == "map":
        clusters = Clusters.load(out)
        result = cluster_raster(backbone, clusters, raster, Path(out).parent, nodata=0, quicklook=False, overwrite=True,
                                progress=False)  # fmt: skip
        extra["map"] = str(result.classes)
    else:
        with rasterio.open(raster) as src:
            crs, transform = src.crs, src.transform
            x = (src.read().astype(np.float32) - np.array(MEAN, np.float32)[:, None, None]) / np.array(STD, np.float32)[:, None, None]
        h, w = x.shape[1] // 16, x.shape[2] // 16
        feats = torch.empty(h, w, backbone.embed_dim)
        with torch.inference_mode():
            for row in range(0, x.shape[1], 512):
                for col in range(0, x.shape[2], 512):
                    tile = torch.from_numpy(np.ascontiguousarray(x[:, row : row + 512, col : col + 512]))[None]
                    tokens = normed_patch_tokens(backbone, tile)[0]  # [D, 32, 32]
                    feats[row // 16 : row // 16 + tokens.shape[1], col // 16 : col // 16 + tokens.shape[2]] = tokens.permute(1, 2, 0)
        points = feats.reshape(-1, feats.shape[-1])
        fit = spherical_kmeans(points, K, generator=torch.Generator().manual_seed(1 if mode == "whole_seed1" else 0))
        cos = points @ fit.centroids.T  # [h*w, K] -> pixels, as the streamed map upsamples its cosines
        cos = F.interpolate(cos.T.reshape(1, K, h, w), scale_factor=16, mode="bilinear", align_corners=False)
        labels = cos[0].argmax(0).numpy().astype(np.uint8)
        write_cog(out, labels, crs=crs, transform=transform, nodata=255)
        extra["samples"] = int(points.shape[0])
        extra["map"] = out
    return {"seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(), "imports_mib": imported, **extra}


def main() -> None:
    if child_entry(run):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    small = max(512, args.size // 4)
    from sklearn.metrics import adjusted_rand_score

    import rasterio

    with tempfile.TemporaryDirectory(prefix="bench_cluster_") as tmp:
        tmp = Path(tmp)
        big, little = make_dates(tmp, args.size)["before"], make_dates(tmp, small)["before"]
        results = {}
        for label, mode, raster, out in [
            (f"fit {args.size}²", "fit", big, tmp / "big" / "c.safetensors"),
            (f"map {args.size}²", "map", big, tmp / "big" / "c.safetensors"),
            (f"fit {small}²", "fit", little, tmp / "small" / "c.safetensors"),
            (f"map {small}²", "map", little, tmp / "small" / "c.safetensors"),
            (f"whole {args.size}²", "whole", big, tmp / "whole.tif"),
            ("whole, seed 1", "whole_seed1", big, tmp / "whole_seed1.tif"),
        ]:
            out.parent.mkdir(exist_ok=True)
            results[label] = run_child(__file__, mode, raster, out)
        maps = {}
        for name in (f"map {args.size}²", f"whole {args.size}²", "whole, seed 1"):
            with rasterio.open(results[name]["map"]) as src:
                maps[name] = src.read(1).ravel()
    rng = np.random.default_rng(0)
    pick = rng.choice(len(maps["whole, seed 1"]), min(2_000_000, len(maps["whole, seed 1"])), replace=False)
    whole = maps[f"whole {args.size}²"][pick]
    ari = adjusted_rand_score(whole, maps[f"map {args.size}²"][pick])
    ari_seeds = adjusted_rand_score(whole, maps["whole, seed 1"][pick])
    base = results[f"whole {args.size}²"]
    print(f"\n{'case':<14} {'time':>8} {'beyond imports':>15} {'samples':>10}")
    for label, r in results.items():
        print(f"{label:<14} {r['seconds']:7.1f}s {r['peak_mib'] - r['imports_mib']:11.0f} MiB {r.get('samples', ''):>10}")
    fit, mapped = results[f"fit {args.size}²"], results[f"map {args.size}²"]
    print(f"\nfit + map {args.size}²: {(fit['seconds'] + mapped['seconds']) / base['seconds']:.2f}x the time of clustering "
          f"every patch in memory, {max(fit['peak_mib'], mapped['peak_mib']) / base['peak_mib']:.2f}x its peak RSS; "
          f"maps agree at ARI {ari:.3f} (two seeds of the in-memory fit: {ari_seeds:.3f}); 16x the pixels: map {mapped['seconds'] / results[f'map {small}²']['seconds']:.1f}x "
          f"the time, {(mapped['peak_mib'] - mapped['imports_mib']) / max(1.0, results[f'map {small}²']['peak_mib'] - results[f'map {small}²']['imports_mib']):.2f}x "
          "the memory beyond imports")  # fmt: skip


if __name__ == "__main__":
    main()
