"""Ask a satellite scene questions in free text and by example, and get georeferenced answers.

    python examples/query_map.py --model runs/eurosat_text.pt \
        [--scene dinov3_eo/sample/landsat8_224078_subset.tif] [--queries "sea or lake" forest "annual crop"] \
        [--out outputs/query_map]

``--model`` is a text model from ``dinov3-eo text fit`` (or ``scripts/exp_text_eurosat.py``). Without it, a tiny
untrained model is made on the spot so the example runs anywhere — its maps then show the pipeline, not
knowledge. The model's stored normalisation is used unless ``--stretch`` re-maps this scene's 2–98 % range onto
the model's expected input range (e.g. Landsat DN onto the 0..255 of EuroSAT chips). Writes, under ``--out``:
per-query scores and a class map (COG), polygons (GeoPackage), a similarity map for a point example, the queries as
the classes of the scene's tiles (a zero-shot probe, ``tiles/``), the bundled polygons named by the queries
(``polygons_named.csv``), and a PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import rasterio
from shapely.geometry import Point

from dinov3_eo.tasks.openvocab import MapQuery, TextAlignmentTask, export_text_model

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--scene", default=str(SAMPLE))
    parser.add_argument("--queries", nargs="+", default=["sea or lake", "forest", "annual crop", "residential buildings"])
    parser.add_argument("--bands", type=int, nargs="+", default=[3, 2, 1], help="file bands as the model's R, G, B")
    parser.add_argument("--nodata", type=float, default=0.0)
    parser.add_argument("--stretch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", default="outputs/query_map")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model_path = args.model
    if model_path is None:
        task = TextAlignmentTask(backbone="vitmicro16", text_cfg={"width": 32, "heads": 4, "layers": 2},
                                 ffn_layer="mlp", normalization="sat493m")  # fmt: skip
        model_path = export_text_model(task, out / "untrained_text.pt")
        print(f"no --model: using an untrained tiny model ({model_path})")
    engine = MapQuery.from_checkpoint(model_path, bands=args.bands, nodata=args.nodata, window=256, progress=True)
    if args.stretch:
        print(f"input normalisation: {engine.stretch_to(args.scene)}")

    # 1. free text: scores per query (query x y x), then the best query per pixel, then polygons
    scores = engine.query(args.scene, args.queries, out=out / "scores.tif")
    print(scores)
    classes = engine.segment(args.scene, args.queries)
    names = classes.attrs["class_names"]
    counts = np.bincount(classes.values[classes.values != 255].ravel(), minlength=len(names))
    for name, n in zip(names, counts):
        print(f"{name:>24}: {n / max(counts.sum(), 1):6.1%} of the valid pixels")
    classes.rio.to_raster(out / "classes.tif")
    frame = engine.polygons(args.scene, args.queries, min_area=10 * abs(classes.rio.resolution()[0]) ** 2)
    frame.to_file(out / "classes.gpkg", driver="GPKG")
    print(f"{len(frame)} polygons in {frame.crs}")

    # 2. by example: how similar is every pixel to the scene centre (a point given in lon/lat)?
    with rasterio.open(args.scene) as src:
        centre = src.xy(src.height // 2, src.width // 2)
        from pyproj import Transformer

        lon, lat = Transformer.from_crs(src.crs, "EPSG:4326", always_xy=True).transform(*centre)
    similar = engine.similar(args.scene, Point(lon, lat), crs="EPSG:4326", out=out / "similar.tif")
    print(f"similarity to ({lon:.4f}, {lat:.4f}): median {float(similar.median()):.3f}, max {float(similar.max()):.3f}")

    # 3. the same queries as the classes of the scene's 16-px tiles (classify zero-shot, then classify map)
    from dinov3_eo.tasks.chip_classification import zero_shot_classifier
    from dinov3_eo.tasks.tile_classification import classify_tiles, write_tile_classes

    probe = zero_shot_classifier(model_path, args.queries, size=32, tile_size=16)
    tiles = classify_tiles(args.scene, probe, bands=args.bands, nodata=args.nodata, progress=False)
    written = write_tile_classes(tiles, out / "tiles", nodata=args.nodata, quicklook_bands=args.bands, overwrite=True)
    print(f"{int(tiles.classified.sum())} tiles named from text: {written.classes}")

    # 4. the queries naming polygons (parcels, image objects, crowns): here the four bundled land-cover polygons
    zones = engine.zones(args.scene, SAMPLE.with_name("landsat8_224078_polygons.gpkg"), args.queries)
    zones.drop(columns="geometry").to_csv(out / "polygons_named.csv", index=False)
    print(zones[["name", "class", "score"]].to_string(index=False))

    # 5. a picture: RGB, class map and the similarity map side by side
    from matplotlib.figure import Figure

    with rasterio.open(args.scene) as src:
        rgb = src.read(args.bands).astype(np.float32)
    valid = np.all(rgb != args.nodata, axis=0)
    lo, hi = np.percentile(rgb[:, valid], [2, 98], axis=1)
    rgb = np.clip((rgb - lo[:, None, None]) / (hi - lo)[:, None, None], 0, 1).transpose(1, 2, 0)
    fig = Figure(figsize=(13, 5))
    axes = fig.subplots(1, 3)
    axes[0].imshow(rgb)
    axes[0].set_title("scene")
    shown = np.where(classes.values == 255, np.nan, classes.values.astype(float))
    im = axes[1].imshow(shown, cmap="tab10", vmin=0, vmax=9, interpolation="nearest")
    axes[1].set_title("best query: " + ", ".join(f"{i}={n}" for i, n in enumerate(names)), fontsize=8)
    axes[2].imshow(similar.values, cmap="magma")
    axes[2].set_title("similarity to the centre point")
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(im, ax=axes[1], fraction=0.04)
    fig.savefig(out / "query_map.png", dpi=100, bbox_inches="tight")
    print(f"outputs in {out}/")


if __name__ == "__main__":
    main()
