"""Query by example with any backbone: "find the places that look like this one" from a clicked point or a polygon.

The example's features (the backbone's patch tokens interpolated to its pixels, averaged over them and normalised:
a one-class prototype, :func:`~dinov3_eo.tasks.prototypes.fit_prototypes`) are compared with every pixel's by cosine,
streamed through :func:`~dinov3_eo.inference.predict.predict_raster`: a float32 similarity COG in ``[-1, 1]``, and
with a threshold a mask of the look-alike places, their polygons and a picture. Unlike
:meth:`~dinov3_eo.tasks.openvocab.MapQuery.similar` it needs no text-aligned model, only a backbone: the first thing
a user with fresh weights (or a ``load_backbone`` export) can ask of a scene. ``dinov3-eo similar`` is the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from torch import nn

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.inference.tta import TTA

log = logging.getLogger(__name__)

#: mask values: not like the example, like it, nodata
UNLIKE, LIKE, MASK_NODATA = 0, 1, 255


def example_in_crs(example: Any, crs: Any, raster_crs: Any) -> Any:
    """One shapely geometry in the raster's CRS from a shapely geometry (+ ``crs``) or a GeoSeries/GeoDataFrame.

    Raises:
        TypeError: for anything else; ValueError: for an empty example, a CRS without a raster CRS, or a geometry
            other than a point or polygon.
    """
    import geopandas as gpd
    from shapely.geometry.base import BaseGeometry

    if isinstance(example, (gpd.GeoDataFrame, gpd.GeoSeries)):
        series = example.geometry if isinstance(example, gpd.GeoDataFrame) else example
        if crs is not None and series.crs is None:
            series = series.set_crs(crs)
    elif isinstance(example, BaseGeometry):
        series = gpd.GeoSeries([example], crs=crs)
    else:
        raise TypeError(f"example must be a shapely geometry or a GeoSeries/GeoDataFrame, got {type(example).__name__}.")
    if series.empty or series.is_empty.all():
        raise ValueError("The example geometry is empty.")
    if series.crs is not None:
        if raster_crs is None:
            raise ValueError(f"The example is in {series.crs} but the raster has no CRS to reproject it to.")
        series = series.to_crs(raster_crs)
    geometry = series.union_all() if len(series) > 1 else series.iloc[0]
    if geometry.geom_type not in ("Point", "MultiPoint", "Polygon", "MultiPolygon"):
        raise ValueError(f"The example must be points or polygons, got {geometry.geom_type}.")
    return geometry


class GeometryLabels:
    """One class (id 0) burnt from a geometry in a raster's CRS onto any window grid: a label source for
    :func:`~dinov3_eo.tasks.prototypes.fit_prototypes` (a point labels the pixel it falls in)."""

    def __init__(self, geometry: Any) -> None:
        self.geometry = geometry

    def sample(self, *, crs: Any, transform: Any, shape: tuple[int, int], valid: np.ndarray | None = None,
               path: Any = None) -> dict[str, Any]:
        from rasterio.features import rasterize
        from rasterio.transform import array_bounds
        from shapely.geometry import box

        west, south, east, north = array_bounds(shape[0], shape[1], transform)
        mask = np.full(shape, -1, dtype=np.int64)
        if self.geometry.intersects(box(west, south, east, north)):
            mask = rasterize([(self.geometry, 0)], out_shape=shape, transform=transform, fill=-1, dtype="int64")
        if valid is not None:
            mask[~valid] = -1
        return {"mask": mask}


@dataclass(frozen=True)
class SimilarityMap:
    """What :func:`similarity_map` wrote: the similarity COG, and with a threshold the mask, polygons, counts."""

    similarity: Path
    mask: Path | None
    polygons: Path | None
    quicklook: Path | None
    example_pixels: int
    threshold: float | None
    like_pixels: int
    valid_pixels: int
    like_area_ha: float | None

    def to_xarray(self) -> Any:
        """The similarity as an ``xarray.DataArray`` (``y × x``, float32, NaN nodata, CRS set), read into memory."""
        import rioxarray

        array = rioxarray.open_rasterio(self.similarity, masked=True).squeeze("band", drop=True).astype(np.float32)
        return array.load().rename("similarity")


def similarity_outputs(dst: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """``<dst stem>_mask.tif``, ``<dst stem>.png`` and ``<dst stem>.gpkg`` next to the similarity COG ``dst``."""
    dst = Path(dst)
    return dst.with_name(f"{dst.stem}_mask.tif"), dst.with_suffix(".png"), dst.with_suffix(".gpkg")


def similarity_map(
    backbone: nn.Module,
    raster: str | os.PathLike[str],
    example: Any,
    dst: str | os.PathLike[str],
    *,
    normalization: Normalization | None,
    crs: Any = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    layers: int | Sequence[int] = 1,
    threshold: float | None = None,
    polygons: bool = False,
    min_area: float = 0.0,
    simplify: float = 0.0,
    quicklook: bool = True,
    window: int = 512,
    overlap: float | int = 0.25,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> SimilarityMap:
    """Cosine similarity of every pixel of ``raster`` to an example place, as a float32 COG (``dst``).

    Args:
        backbone: any ViT (e.g. :func:`~dinov3_eo.tasks.features.resolve_backbone`).
        example: a shapely point / polygon (in ``crs``, default the raster's) or a GeoSeries / GeoDataFrame (its own
            CRS; all its geometries together, e.g. several clicked points).
        normalization: the backbone's input normalisation.
        threshold: with one, ``<stem>_mask.tif`` (uint8: 1 where the similarity reaches it, 0 below, 255 nodata),
            optionally its ``polygons`` (``<stem>.gpkg``; ``min_area``, ``simplify``).
        quicklook: ``<stem>.png``: the imagery with the example drawn, beside the similarity (the mask outlined).
        bands, nodata, layers, window, overlap, batch_size, device, amp, tta: as for
            :func:`~dinov3_eo.tasks.clustering.cluster_raster`.

    Returns:
        A :class:`SimilarityMap`.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before any work).
        ValueError: an example outside the raster or on nodata only, polygons without a threshold.
    """
    from dinov3_eo.data.raster import _data_band_count, pixel_area_ha, require_georeferenced
    from dinov3_eo.inference.predict import predict_raster
    from dinov3_eo.inference.writers import COGWriter, check_overwrite, vectorize_classes
    from dinov3_eo.models.hub import preview_bands
    from dinov3_eo.tasks.clustering import ClusterScorer
    from dinov3_eo.tasks.prototypes import fit_prototypes

    if polygons and threshold is None:
        raise ValueError("Polygons of the look-alike places need a threshold (--threshold).")
    dst = check_overwrite(dst, overwrite, inputs=[raster])
    mask_path, png, gpkg = similarity_outputs(dst)
    for path in (mask_path if threshold is not None else None, png if quicklook else None, gpkg if polygons else None):
        if path is not None:
            check_overwrite(path, overwrite, inputs=[raster])
    with rasterio.open(raster) as src:
        require_georeferenced(src)
        geometry = example_in_crs(example, crs, src.crs)
        from shapely.geometry import box

        if not geometry.intersects(box(*src.bounds)):
            raise ValueError(f"The example {geometry.geom_type} lies outside the raster {str(raster)!r} "
                             f"(bounds {tuple(round(b, 3) for b in src.bounds)} in {src.crs}).")  # fmt: skip
        hectares = pixel_area_ha(src.crs, src.transform)
        bands = list(bands) if bands is not None else list(range(1, _data_band_count(src) + 1))  # alpha is no data
        rgb = preview_bands(backbone, bands)
    try:
        proto = fit_prototypes(backbone, [raster], GeometryLabels(geometry), class_names=["example"],
                               normalization=normalization, bands=bands, nodata=nodata, layers=layers, window=window,
                               device=device, amp=amp, progress=False)  # fmt: skip
    except ValueError as e:
        if "No labelled pixel" in str(e):
            raise ValueError(f"The example covers no pixel with data in {str(raster)!r} (nodata there?).") from e
        raise
    scorer = ClusterScorer(backbone, proto.centroids, layers=layers)
    predict_raster(
        scorer, raster, dst, out_channels=1, output="regression", activation="none", class_names=["similarity"],
        window=window, overlap=overlap, batch_size=batch_size, bands=bands, nodata=nodata, normalization=normalization,
        device=device, amp=amp, tta=tta, multiple=scorer.patch_size, progress=progress, overwrite=overwrite,
        tags={"quantity": "cosine similarity of the backbone's features to the example's", "example": geometry.wkt[:2000],
              "example_pixels": proto.samples, "layers": json.dumps(layers)},
    )  # fmt: skip
    like = valid = 0
    if threshold is not None:
        with rasterio.open(dst) as src, COGWriter(
            mask_path, crs=src.crs, transform=src.transform, width=src.width, height=src.height, count=1, dtype="uint8",
            nodata=MASK_NODATA, class_names=["unlike", "like the example"], overwrite=overwrite,
            colormap={UNLIKE: (240, 240, 240, 255), LIKE: (230, 85, 13, 255)},
        ) as out:  # fmt: skip
            for _, win in src.block_windows(1):
                values = src.read(1, window=win)
                seen = np.isfinite(values)
                block = np.where(values >= threshold, LIKE, UNLIKE).astype(np.uint8)
                block[~seen] = MASK_NODATA
                out.write(block[None], win)
                like += int((block == LIKE).sum())
                valid += int(seen.sum())
        if polygons:
            vectorize_classes(mask_path, gpkg, min_area=min_area, simplify=simplify, keep=[LIKE], layer="like",
                              overwrite=overwrite)  # fmt: skip
    if quicklook:
        similarity_quicklook(png, raster, dst, geometry=geometry, mask=mask_path if threshold is not None else None,
                             bands=rgb, nodata=nodata, overwrite=overwrite)  # fmt: skip
    return SimilarityMap(
        similarity=dst, mask=mask_path if threshold is not None else None, polygons=gpkg if polygons else None,
        quicklook=png if quicklook else None, example_pixels=proto.samples, threshold=threshold, like_pixels=like,
        valid_pixels=valid, like_area_ha=like * hectares if threshold is not None and hectares is not None else None,
    )  # fmt: skip


def similarity_quicklook(
    dst: str | os.PathLike[str],
    raster: str | os.PathLike[str],
    similarity: str | os.PathLike[str],
    *,
    geometry: Any,
    mask: str | os.PathLike[str] | None,
    bands: Sequence[int],
    nodata: float | None = None,
    max_size: int = 768,
    overwrite: bool = False,
) -> Path:
    """The imagery with the example drawn in cyan, beside the similarity (0..1; the mask outlined). ``nodata``: the
    imagery's where the file declares none (white, and left out of the colour stretch)."""
    from matplotlib.figure import Figure

    from dinov3_eo.inference.writers import display_rgb, picture_grid, save_figure

    with rasterio.open(raster) as src:
        shape, picture_transform = picture_grid(src, max_size)
        pixels = src.read(list(bands), out_shape=(len(bands), *shape), resampling=Resampling.average)
        valid = src.read_masks(1, out_shape=shape) > 0
        if nodata is not None:
            valid &= ~(pixels == nodata).all(axis=0)
        to_picture = ~picture_transform  # pixel coordinates of the picture
    rgb = display_rgb(pixels, valid)
    with rasterio.open(similarity) as src:
        values = np.ma.masked_invalid(src.read(1, out_shape=shape, resampling=Resampling.average))
    fig = Figure(figsize=(2 * max(2.5, shape[1] / 100) + 1.5, max(2.5, shape[0] / 100) + 0.6), dpi=100)
    axes = fig.subplots(1, 2)
    axes[0].imshow(rgb, interpolation="nearest")
    parts = getattr(geometry, "geoms", [geometry])
    for part in parts:
        if part.geom_type == "Point":
            col, row = to_picture @ (part.x, part.y)
            axes[0].plot([col - 0.5], [row - 0.5], marker="o", markersize=8, markerfacecolor="none", color="cyan")
        else:
            xs, ys = part.exterior.coords.xy
            cols, rows = zip(*(to_picture @ (x, y) for x, y in zip(xs, ys)))
            axes[0].plot(np.asarray(cols) - 0.5, np.asarray(rows) - 0.5, color="cyan", linewidth=1.2)
    axes[0].set_title(f"{Path(raster).name}, example in cyan", fontsize=9)
    image = axes[1].imshow(values, cmap="magma", vmin=0.0, vmax=1.0, interpolation="nearest")
    if mask is not None:
        with rasterio.open(mask) as src:
            outline = src.read(1, out_shape=shape, resampling=Resampling.nearest) == LIKE
        if outline.any() and not outline.all():
            axes[1].contour(outline.astype(np.uint8), levels=[0.5], colors="cyan", linewidths=0.8)
    axes[1].set_title("similarity to the example (cosine)" + (", mask outlined" if mask is not None else ""), fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes[1], fraction=0.046, pad=0.04)
    return save_figure(fig, dst, overwrite=overwrite)


# ------------------------------------------------------------------------------------------- command
def _parse_example(args: argparse.Namespace) -> tuple[Any, Any]:
    """(example, crs) from ``--point X Y [--crs]`` or ``--example FILE``."""
    if (args.point is None) == (args.example is None):
        raise ValueError("Give the example as --point X Y (in --crs, default the raster's) or --example FILE "
                         "(points or polygons in any vector format), one of them.")  # fmt: skip
    if args.point is not None:
        from shapely.geometry import Point

        return Point(*args.point), args.crs
    import geopandas as gpd

    path = Path(args.example)
    if not path.exists():
        raise FileNotFoundError(f"Example file {str(path)!r} does not exist.")
    frame = gpd.read_file(path)
    if frame.crs is None and args.crs is None:
        raise ValueError(f"{path} has no CRS: pass --crs.")
    return frame, args.crs


def _parser() -> argparse.ArgumentParser:
    from dinov3_eo.tasks.chip_embeddings import FEATURES
    from dinov3_eo.tasks.clustering import add_map_options

    p = argparse.ArgumentParser(
        prog="dinov3-eo similar",
        description="Find the places that look like an example (a clicked point or polygons) with any backbone: a "
        "float32 COG of cosine similarity to the example's features, OUTPUT.png, and with --threshold a mask "
        "OUTPUT_mask.tif and --polygons OUTPUT.gpkg.",
    )
    p.add_argument("scene", help="input GeoTIFF; with --chips, the example chip(s): a file, folder or quoted glob")
    p.add_argument("-o", "--output", required=True, help="similarity COG to write (.tif); with --chips, a CSV, or a "
                   ".gpkg / .geojson of the matches' footprints (an 'embed --tiles' table's, or georeferenced chips')")  # fmt: skip
    p.add_argument("--point", type=float, nargs=2, metavar=("X", "Y"), default=None,
                   help="the example as a point (in --crs, default the raster's CRS)")
    p.add_argument("--example", default=None, help="the example as a vector file of points or polygons (any CRS)")
    p.add_argument("--crs", default=None, help="CRS of --point, e.g. EPSG:4326 for longitude latitude")
    p.add_argument("--threshold", type=float, default=None, help="also write the mask of the places at least this "
                   "similar (cosine, e.g. 0.8)")  # fmt: skip
    add_map_options(p, polygons_help="also write the mask's places as polygons (OUTPUT.gpkg)")
    chips = p.add_argument_group("image chips", "the chips of an embedding table ('embed --chips') most like the "
                                 "example chip(s), as a CSV of rank, path, similarity")  # fmt: skip
    chips.add_argument("--chips", action="store_true", help="search a chip table instead of mapping a scene")
    chips.add_argument("--table", default=None, help="with --chips, the chips to search: a table from 'embed --chips' "
                       "(or the tiles of a scene: 'embed SCENE --tiles N')")  # fmt: skip
    chips.add_argument("-k", type=int, default=20, help="with --chips, how many chips to list (default 20)")
    chips.add_argument("--features", default="cls+patch_mean", choices=FEATURES,
                       help="with --chips, which embedding columns are compared (default cls+patch_mean)")
    zones = p.add_argument_group("polygons", "dinov3-eo similar --zones TABLE --like COLUMN=VALUE -o matches.gpkg "
                                 "[-k 20]: the polygons of an 'embed --zones' table most like the ones picked, no "
                                 "backbone (see 'similar --zones --help')")  # fmt: skip
    zones.add_argument("--zones", default=None, metavar="TABLE", help="search this zone table instead")
    return p


def similar_chips(args: argparse.Namespace) -> Path:
    """``similar EXAMPLE --chips --table T -o matches.csv``: the examples embedded as the table's chips were (its
    size, bands and normalisation, the backbone ``--model``), then :func:`~dinov3_eo.tasks.chip_embeddings.nearest_chips`
    written as a CSV (rank, path, similarity). Returns the CSV's path.

    Raises:
        ValueError: no ``--table``, or a table embedded by another backbone than ``--model`` (named).
    """
    import csv

    from dinov3_eo.data.datasets import expand_chips
    from dinov3_eo.inference.writers import VECTOR_FORMATS, atomic_output, check_overwrite, write_vector
    from dinov3_eo.tasks.chip_classification import chip_footprints
    from dinov3_eo.tasks.chip_embeddings import (
        embed_chips_with,
        load_chip_backbone,
        nearest_chips,
        read_chip_embeddings,
        read_table_footprints,
    )

    if args.table is None:
        raise ValueError("--chips searches a table of chip embeddings: give it with --table (from 'embed --chips').")
    check_overwrite(args.output, args.overwrite)
    table = read_chip_embeddings(args.table)
    info = table.metadata
    backbone = load_chip_backbone(args.model, normalization=args.normalization or info.get("normalization_override"),
                                  device=args.device)  # fmt: skip
    name = getattr(getattr(backbone.model, "meta", None), "name", None)
    if info.get("backbone") not in (None, name):
        raise ValueError(f"{args.table} was embedded with backbone {info['backbone']!r}, but --model is {name!r}: "
                         "compare chips embedded by one backbone.")  # fmt: skip
    examples = embed_chips_with(backbone, expand_chips(args.scene), bands=info.get("bands") or args.bands,
                                size=info.get("size"), progress=False)  # fmt: skip
    matches = nearest_chips(table, examples, k=args.k, features=args.features)
    if Path(args.output).suffix.lower() in VECTOR_FORMATS:  # the matches on a map: tiles' or chips' footprints
        import geopandas as gpd

        paths = [path for path, _ in matches]
        footprints = read_table_footprints(args.table)
        geometry = footprints.loc[paths].reset_index(drop=True) if footprints is not None else chip_footprints(paths)
        frame = gpd.GeoDataFrame({"rank": np.arange(1, len(matches) + 1), "path": paths,
                                  "similarity": [score for _, score in matches]}, geometry=geometry)  # fmt: skip
        return write_vector(frame, args.output, layer="matches", overwrite=args.overwrite)
    with atomic_output(args.output, overwrite=args.overwrite) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["rank", "path", "similarity"])
        out.writerows((rank, path, f"{score:.6f}") for rank, (path, score) in enumerate(matches, start=1))
    return Path(args.output)


def similar_main(argv: Sequence[str]) -> int:
    """``dinov3-eo similar SCENE.tif --point X Y [--crs EPSG:4326] --model BACKBONE -o similar.tif``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.inference.predict import window_settings
    from dinov3_eo.tasks.features import input_normalization, resolve_backbone

    if any(a == "--zones" or a.startswith("--zones=") for a in argv):  # a zone table holds its features: no scene,
        from dinov3_eo.tasks.zone_search import similar_zones_main  # no backbone, its own options

        return similar_zones_main(argv)
    args = _parser().parse_args(list(argv))
    prog = "dinov3-eo similar"
    if args.chips:
        try:
            written = similar_chips(args)
        except (FileExistsError, FileNotFoundError, ValueError) as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(written)
        return 0
    try:
        example, crs = _parse_example(args)
        backbone = resolve_backbone(args.model)
        settings = window_settings(args)
        result = similarity_map(
            backbone.to(settings["device"]), args.scene, example, args.output, crs=crs,
            normalization=input_normalization(getattr(backbone, "meta", None), args.normalization), bands=args.bands,
            nodata=args.nodata, layers=args.layers if args.layers else 1, threshold=args.threshold,
            polygons=args.polygons, min_area=args.min_area, simplify=args.simplify, quicklook=not args.no_quicklook,
            **settings, overwrite=args.overwrite, progress=not args.quiet,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError, TypeError, IndexError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"similarity: {result.similarity} (example: {result.example_pixels} pixels)")
    if result.mask is not None:
        share = result.like_pixels / result.valid_pixels if result.valid_pixels else 0.0
        area = f", {result.like_area_ha:,.1f} ha" if result.like_area_ha is not None else ""
        print(f"mask:       {result.mask} (similarity >= {result.threshold}: {share:.1%} of {result.valid_pixels:,} "
              f"pixels{area})")  # fmt: skip
    for label, path in (("polygons:  ", result.polygons), ("picture:   ", result.quicklook)):
        if path is not None:
            print(f"{label} {path}")
    return 0


__all__ = [
    "GeometryLabels",
    "SimilarityMap",
    "example_in_crs",
    "similar_chips",
    "similar_main",
    "similarity_map",
    "similarity_outputs",
    "similarity_quicklook",
]
