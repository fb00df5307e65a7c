"""Map a satellite scene with no labels and no training: clusters, prototypes from a few clicks, places like this one.

    python examples/no_labels_map.py --model quickstart_out/backbone.pth \
        [--scene dinov3_eo/sample/landsat8_224078_subset.tif] [--k 4 6 8] [--out outputs/no_labels_map]

``--model`` is any backbone export (``dinov3-eo quickstart``'s ``backbone.pth``, ``dinov3-eo export``, an official
``.pth`` through ``load_backbone``). Without it a micro ViT with random weights and the scene's own z-score
normalisation is made on the spot, so the example runs anywhere; its maps then show the pipeline, not knowledge.
Writes, under ``--out``: the k-means clusters of the scene (the k with the best silhouette among ``--k``), a map from
one clicked point per land cover (the bundled polygons' representative points, as a user's clicks), and the places
that look like the first click; each a COG with a PNG beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import geopandas as gpd
import rasterio

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models import build_backbone, load_backbone
from dinov3_eo.tasks.clustering import cluster_raster, fit_clusters
from dinov3_eo.tasks.prototypes import fit_prototypes
from dinov3_eo.tasks.similarity import similarity_map

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = SAMPLE.with_name("landsat8_224078_polygons.gpkg")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="backbone export (default: a random micro ViT)")
    parser.add_argument("--scene", default=str(SAMPLE))
    parser.add_argument("--clicks", default=str(POLYGONS), help="labelled points or polygons (their points are used)")
    parser.add_argument("--k", type=int, nargs="+", default=[4, 6, 8])
    parser.add_argument("--nodata", type=float, default=0.0)
    parser.add_argument("--out", default="outputs/no_labels_map")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.model:
        backbone = load_backbone(args.model).eval()
        normalization = backbone.meta.get_normalization()
    else:
        backbone = build_backbone("vitmicro16").eval()
        with rasterio.open(args.scene) as src:
            pixels = src.read()
        valid = (pixels != args.nodata).all(axis=0)
        normalization = Normalization.zscore([float(b[valid].mean()) for b in pixels], [float(b[valid].std()) for b in pixels])
    common = {"nodata": args.nodata, "progress": False}

    # 1. clusters: look-alike regions, for a person to name
    clusters = fit_clusters(backbone, [args.scene], args.k, normalization=normalization, **common)
    clusters.save(out / "centroids.safetensors", overwrite=True)
    mapped = cluster_raster(backbone, clusters, args.scene, out, overwrite=True, **common)
    print(f"{clusters.k} clusters (silhouette {clusters.silhouette:.3f}): {mapped.classes}, {mapped.quicklook}")

    # 2. one click per land cover: prototypes, and every pixel the class of its most similar one
    clicks = gpd.read_file(args.clicks)
    clicks["geometry"] = clicks.geometry.representative_point()
    clicks.to_file(out / "clicks.gpkg")
    prototypes = fit_prototypes(backbone, [args.scene], out / "clicks.gpkg", normalization=normalization, **common)
    classes = cluster_raster(backbone, prototypes, args.scene, out, overwrite=True, **common)
    shares = ", ".join(f"{name} {share:.0%}" for name, share in zip(prototypes.class_names, classes.shares))
    print(f"from {prototypes.samples} clicked pixels: {classes.classes} ({shares}), {classes.quicklook}")

    # 3. the places like the first click
    first = clicks.iloc[[0]]
    like = similarity_map(backbone, args.scene, first, out / "similar.tif", normalization=normalization, threshold=0.8,
                          overwrite=True, **common)  # fmt: skip
    print(f"like the {first['name'].iloc[0]} click: {like.similarity}, {like.like_pixels / max(like.valid_pixels, 1):.0%} "
          f"of the scene at cosine >= 0.8, {like.quicklook}")  # fmt: skip


if __name__ == "__main__":
    main()
