"""Image objects (superpixels) of a scene: polygons for object-based work where no parcels exist,
``dinov3-eo objects SCENE.tif -o objects.gpkg --size 1``.

Object-based image analysis (OBIA) first cuts a scene into small homogeneous regions, then classifies the regions
rather than pixels. Here the regions come from SLIC (Achanta et al. 2012, scikit-image; SLICO's adaptive compactness
unless ``compactness`` is given) on the bands stretched to [0, 1] by their 2–98 % percentiles over the whole scene,
about ``size_ha`` hectares each, never across nodata, each one connected; slivers under a quarter of that join the
touching object of the closest colour (:func:`merge_small_objects`). Large scenes are segmented in ``block``-pixel
blocks, row by row, each read with a margin (:func:`object_halo`) around it: a block keeps every object that reaches
into it whole, margin included, and the next blocks treat those pixels as taken, so objects cross block edges and no
straight seam marks them (an object longer than the margin is still cut at the margin's edge).

The objects are written as polygons with ``object_id``, ``area_m2``, ``pixels``, ``perimeter_m``, ``compactness``
(Polsby-Popper, 4πA/P²) and each band's mean and standard deviation (the spectral, texture and shape features OBIA
classifies on) and, with ``labels``, as an int32 COG of object ids; ``<output>.png`` shows their outlines over the
image. ``embed SCENE --zones objects.gpkg`` then gives each object an embedding, and ``classify fit --zones``
classifies them from a few you name.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_eo.inference.writers import label_outlines


def slic_labels(image: np.ndarray, valid: np.ndarray, *, pixels_per_object: float, compactness: float | None = None,
                regions: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """SLIC superpixels of one block.

    Args:
        image: ``[C, H, W]`` float, each band in [0, 1]. valid: ``[H, W]`` bool, the pixels with data.
        pixels_per_object: the objects' mean size in pixels (sets how many seeds).
        compactness: SLIC's trade between colour and space (scikit-image's scale); None: SLICO, adaptive.
        regions: ``[H, W]`` int (parcels burnt in, 0 outside them): no object crosses from one value to another.

    Returns:
        ``[H, W]`` int32: objects 1..n, each connected, 0 where there is no data.
    """
    from skimage.measure import label as connected
    from skimage.segmentation import slic

    if not valid.any():
        return np.zeros(valid.shape, np.int32)
    # scikit-image's masked SLIC seeds ~70x slower (28 s against 0.4 s for 0.4 Mpx): segment everything with the
    # pixels without data far from any colour, so that boundaries follow the data's edge, then cut them out
    filled = np.where(valid[None], image, -1.0)
    seeds = max(1, round(valid.size / max(pixels_per_object, 1.0)))
    labels = slic(np.moveaxis(filled, 0, -1).astype(np.float64), n_segments=seeds, start_label=1, channel_axis=-1,
                  slic_zero=compactness is None, compactness=0.1 if compactness is None else compactness,
                  enforce_connectivity=True)  # fmt: skip
    labels = labels.astype(np.int64)
    if regions is not None:  # an object over a parcel's edge becomes one object on each side
        labels = labels * (int(regions.max()) + 1) + regions
    labels[~valid] = 0
    # an object the data's edge cut in two becomes two, each connected; the slivers such cuts leave join a neighbour
    labels = connected(labels, background=0, connectivity=1)
    return merge_small_objects(labels, image, min_pixels=pixels_per_object / 4, regions=regions)


def merge_small_objects(labels: np.ndarray, image: np.ndarray, *, min_pixels: float, passes: int = 3,
                        regions: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Objects under ``min_pixels`` joined to the touching object (4-neighbours) of the closest mean colour.

    Args:
        labels: ``[H, W]`` int, objects ``1..n``, each connected; 0: no data. image: ``[C, H, W]`` float.
        min_pixels: the smallest object kept on its own. passes: rounds (a small object may join another small one).
        regions: ``[H, W]`` int, one value under each object: an object joins only a neighbour of its own region.

    Returns:
        ``[H, W]`` int32, objects renumbered ``1..m`` (m <= n), each still connected; an object with no neighbour
        stays, however small.
    """
    labels = labels.astype(np.int64, copy=False)
    for _ in range(passes):
        n = int(labels.max())
        sizes = np.bincount(labels.ravel(), minlength=n + 1)
        small = sizes < min_pixels
        small[0] = False
        if not small.any():
            break
        pairs = []  # (small object, its neighbour), once per shared pixel edge
        for first, second in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1], np.s_[1:])):  # left-right, up-down
            a, b = labels[first], labels[second]
            touching = (a != b) & (a > 0) & (b > 0)
            if regions is not None:
                touching &= regions[first] == regions[second]
            a, b = a[touching], b[touching]
            pairs += [np.stack([a, b], 1)[small[a]], np.stack([b, a], 1)[small[b]]]
        pair = np.unique(np.concatenate(pairs) @ np.array([n + 1, 1]))
        pair = np.stack([pair // (n + 1), pair % (n + 1)], 1)
        if not len(pair):
            break
        means = np.stack([np.bincount(labels.ravel(), weights=band.ravel(), minlength=n + 1) for band in image], 1)
        means /= np.maximum(sizes, 1)[:, None]
        distance = ((means[pair[:, 0]] - means[pair[:, 1]]) ** 2).sum(1)
        pair = pair[np.lexsort((distance, pair[:, 0]))]
        first = np.unique(pair[:, 0], return_index=True)[1]
        target = np.arange(n + 1)
        target[pair[first, 0]] = pair[first, 1]
        # two small objects that chose each other: the larger id stays, the smaller joins it (not a swap)
        mutual = target[target] == np.arange(n + 1)
        target[mutual & (target < np.arange(n + 1))] = np.flatnonzero(mutual & (target < np.arange(n + 1)))
        labels = target[labels]
    _, renumbered = np.unique(labels, return_inverse=True)
    renumbered = renumbered.reshape(labels.shape)
    if not (labels == 0).any():
        renumbered += 1  # no zero among the values: the first object must be 1, not 0
    return renumbered.astype(np.int32)


def object_halo(pixels_per_object: float, block: int) -> int:
    """How far (pixels) past its block an object may reach: five mean object sides, 16 to ``block // 2``."""
    return int(min(max(block // 2, 1), max(16, math.ceil(5 * math.sqrt(max(pixels_per_object, 1.0))))))


def image_objects(
    raster: str | os.PathLike[str],
    *,
    size_ha: float = 1.0,
    compactness: float | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    block: int = 2048,
    labels: str | os.PathLike[str] | None = None,
    within: Any = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Any:
    """The image objects of ``raster`` (module docstring) as a ``GeoDataFrame`` in its CRS.

    Args:
        raster: a georeferenced GeoTIFF in a projected CRS (metres).
        size_ha: the objects' mean size in hectares. compactness: as :func:`slic_labels`.
        bands, nodata: the bands read (default all) and a nodata override.
        block: the side of the blocks segmented one at a time, in pixels (memory: a strip of ``block`` + margin rows).
        labels: also write the object ids as this int32 COG (0: no data).
        within: polygons (parcels, stands; a vector file or ``GeoDataFrame``, any CRS) no object crosses: the scene is
            cut inside each one and outside them alike, and each object's ``zone`` is the row of the polygon it lies
            in (-1: none; a pixel under two overlapping polygons goes to the later one).

    Raises:
        ValueError: a raster without a georeference or in degrees, a size or block that is not positive, no valid
            pixel. FileExistsError: ``labels`` exists and ``overwrite`` is false.
    """
    import geopandas as gpd
    import rasterio
    from rasterio.windows import Window
    from tqdm.auto import tqdm

    from dinov3_eo.data.labels import burn_polygons
    from dinov3_eo.data.raster import open_quietly, read_window, require_georeferenced
    from dinov3_eo.inference.writers import COGWriter, check_overwrite, picture_grid, region_polygons

    if size_ha <= 0 or block < 16:
        raise ValueError(f"--size must be a positive area in hectares and --block at least 16 px, got {size_ha} and {block}.")
    if labels is not None:
        check_overwrite(labels, overwrite, inputs=[raster])
    with open_quietly(raster) as src:
        require_georeferenced(src)
        if src.crs.is_geographic:
            raise ValueError(f"{os.fspath(raster)} is in degrees ({src.crs.to_string()}): reproject it to a projected "
                             "CRS in metres (gdalwarp -t_srs EPSG:...) so that --size means hectares.")  # fmt: skip
        pixel_m2 = abs(src.transform.a * src.transform.e - src.transform.b * src.transform.d) * src.crs.linear_units_factor[1] ** 2
        # one stretch for the whole scene (from a small read), so that blocks cut alike
        shape, _ = picture_grid(src, 1024)
        sample, sample_valid = read_window(src, Window(0, 0, src.width, src.height), bands=bands, nodata=nodata,
                                           out_shape=shape)  # fmt: skip
        if not sample_valid.any():
            raise ValueError(f"{os.fspath(raster)} has no valid pixel in the bands read: nothing to cut into objects.")
        low = np.array([np.percentile(b[sample_valid], 2) for b in sample], np.float64)
        high = np.array([np.percentile(b[sample_valid], 98) for b in sample], np.float64)
        span = np.maximum(high - low, 1e-12)
        n_bands = len(sample)
        pixels_per_object = size_ha * 10_000 / pixel_m2
        parcels = None
        if within is not None:
            import shapely

            from dinov3_eo.tasks.zonal import read_zones

            parcels = read_zones(within).geometry.to_crs(src.crs).to_numpy()
            parcel_ids, parcel_tree = np.arange(1, len(parcels) + 1), shapely.STRtree(parcels)  # 0: outside all
        halo = object_halo(pixels_per_object, block)
        n_blocks = -(-src.height // block) * -(-src.width // block)
        sums: list[np.ndarray] = []  # per object: its pixel count, band sums and sums of squares
        zones_of: list[np.ndarray] = []  # per object with ``within``: 1 + the row of its polygon, 0 outside
        with tempfile.TemporaryDirectory(prefix=".objects_", dir=Path(labels).parent if labels else None) as tmp:
            ids_path = Path(labels) if labels is not None else Path(tmp) / "objects.tif"
            writer = COGWriter(ids_path, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                               count=1, dtype="int32", nodata=0, overwrite=overwrite)  # fmt: skip
            offset = 0
            bar = tqdm(total=n_blocks, desc=f"objects {Path(os.fspath(raster)).name}", unit="block", disable=not progress)
            with writer as out, bar:
                # a strip of blocks at a time, with the `halo` rows below it that its objects may already own
                carried = np.zeros((0, src.width), np.int32)
                for r0 in range(0, src.height, block):
                    core_h = min(block, src.height - r0)
                    strip = np.zeros((min(core_h + halo, src.height - r0), src.width), np.int32)
                    strip[: len(carried)] = carried
                    for c0 in range(0, src.width, block):
                        core_w = min(block, src.width - c0)
                        x0, x1 = max(0, c0 - halo), min(src.width, c0 + core_w + halo)
                        owners = strip[:, x0:x1]  # a view: the objects kept below are written into the strip
                        window = Window(x0, r0, x1 - x0, len(strip))
                        values, valid = read_window(src, window, bands=bands, nodata=nodata)
                        values = values.astype(np.float64)
                        image = np.clip((values - low[:, None, None]) / span[:, None, None], 0.0, 1.0)
                        regions = None if parcels is None else burn_polygons(
                            parcels, parcel_ids, parcel_tree, window, src.transform, fill=0, dtype="int32").astype(np.int64)
                        # pixels that objects of earlier blocks own are no data here, so that the new objects end
                        # where those do rather than on a straight block edge
                        block_ids = slic_labels(image, valid & (owners == 0), pixels_per_object=pixels_per_object,
                                                compactness=compactness, regions=regions)  # fmt: skip
                        # the objects that reach into the core are kept whole
                        local = _core_objects(block_ids, np.s_[:core_h, c0 - x0 : c0 - x0 + core_w])
                        bar.update(1)
                        n = int(local.max())
                        if not n:
                            continue
                        sums.append(_object_sums(local, values))
                        if regions is not None:  # one polygon under each object: any of its pixels says which
                            zone = np.zeros(n + 1, np.int64)
                            zone[local.ravel()] = regions.ravel()
                            zones_of.append(zone[1:])
                        owners[local > 0] = (local[local > 0] + offset).astype(np.int32)
                        offset += n
                    out.write(strip[None, :core_h], Window(0, r0, src.width, core_h))
                    carried = strip[core_h:]
            with rasterio.open(ids_path) as ids:
                polygons, values_of = region_polygons(ids)
                crs = ids.crs
    if not sums:
        raise ValueError(f"{os.fspath(raster)}: no object could be made (no valid pixel in any block).")
    stats = np.concatenate(sums)  # [objects, 1 + 2C]: row i is object i + 1
    frame = gpd.GeoDataFrame({"object_id": np.asarray(values_of, np.int64)}, geometry=gpd.GeoSeries(polygons, crs=crs))
    if frame["object_id"].duplicated().any():  # a region cut by the polygoniser's strips comes back whole
        frame = frame.dissolve(by="object_id", as_index=False)
    frame = frame.sort_values("object_id").reset_index(drop=True)
    rows = frame["object_id"].to_numpy() - 1
    count = np.maximum(stats[rows, 0], 1)
    frame["pixels"] = stats[rows, 0].astype(np.int64)
    frame["area_m2"] = frame["pixels"] * pixel_m2
    metres = crs.linear_units_factor[1]
    frame["perimeter_m"] = frame.geometry.length.to_numpy() * metres
    # Polsby-Popper: 1 for a disc, about 0.785 for a square, towards 0 for a thin or ragged object
    frame["compactness"] = 4 * np.pi * frame["area_m2"] / np.maximum(frame["perimeter_m"], 1e-12) ** 2
    names = [f"band_{b}" for b in (bands or range(1, n_bands + 1))]
    for b, name in enumerate(names):
        mean = stats[rows, 1 + b] / count
        frame[f"mean_{name}"] = mean
        frame[f"std_{name}"] = np.sqrt(np.maximum(stats[rows, 1 + n_bands + b] / count - mean**2, 0.0))
    bands_columns = [f"{kind}_{n}" for n in names for kind in ("mean", "std")]
    zone_column = []
    if parcels is not None:
        frame["zone"] = np.concatenate(zones_of)[rows] - 1
        zone_column = ["zone"]
    return frame[["object_id", *zone_column, "area_m2", "pixels", "perimeter_m", "compactness", *bands_columns, "geometry"]]


def _core_objects(ids: np.ndarray, core: Any) -> np.ndarray:
    """``[h, w]`` int64: the objects of ``ids`` with a pixel in ``ids[core]`` renumbered ``1..n``, the others 0."""
    inside = ids[core]
    kept = np.unique(inside[inside > 0])
    renumber = np.zeros(int(ids.max()) + 1, np.int64)
    renumber[kept] = np.arange(1, len(kept) + 1)
    return renumber[ids]


def _object_sums(local: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``[n, 1 + 2C]`` float64 for objects ``1..n`` of ``local`` (``[h, w]``): pixel count, then each band's sum of
    ``values`` (``[C, h, w]``), then each band's sum of squares."""
    flat, n = local.ravel(), int(local.max())
    columns = [np.bincount(flat, minlength=n + 1)]
    columns += [np.bincount(flat, weights=band.ravel(), minlength=n + 1) for band in values]
    columns += [np.bincount(flat, weights=(band * band).ravel(), minlength=n + 1) for band in values]
    return np.stack(columns, 1)[1:]


def objects_picture(dst: str | os.PathLike[str], raster: str | os.PathLike[str], labels: str | os.PathLike[str], *,
                    bands: Sequence[int] | None = None, nodata: float | None = None, count: int | None = None,
                    overwrite: bool = False) -> Path:  # fmt: skip
    """The image (its first three bands, or ``bands``) with the objects of the ``labels`` raster outlined in white."""
    import rasterio
    from matplotlib.figure import Figure
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    from dinov3_eo.data.raster import open_quietly, read_window
    from dinov3_eo.inference.writers import display_rgb, picture_grid, save_figure

    with open_quietly(raster) as src:
        shape, _ = picture_grid(src, 1024)
        rgb = list(bands)[:3] if bands else list(range(1, min(3, src.count) + 1))
        pixels, valid = read_window(src, Window(0, 0, src.width, src.height), bands=rgb, nodata=nodata, out_shape=shape)
    with rasterio.open(labels) as ids:
        ids = ids.read(1, out_shape=shape, resampling=Resampling.nearest)
    zoom = max(1, -(-800 // max(shape)))  # a small scene drawn larger, so that the outlines stay thin
    picture = np.repeat(np.repeat(display_rgb(pixels, valid), zoom, axis=0), zoom, axis=1)
    picture[label_outlines(np.repeat(np.repeat(ids, zoom, axis=0), zoom, axis=1))] = (1.0, 1.0, 1.0)
    fig = Figure(figsize=(max(3.0, picture.shape[1] / 100), max(2.5, picture.shape[0] / 100)), dpi=100)
    ax = fig.subplots()
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    if count is not None:
        ax.set_title(f"{count:,} objects")
    return save_figure(fig, dst, overwrite=overwrite)


def objects_main(argv: Sequence[str]) -> int:
    """``dinov3-eo objects SCENE.tif -o objects.gpkg [--size 1] [--labels objects.tif]``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.inference.writers import check_feature_suffix, check_overwrite, write_features

    parser = argparse.ArgumentParser(prog="dinov3-eo objects", description="Cut a scene into image objects "
                                     "(SLIC superpixels of about --size hectares, never across nodata) and write "
                                     "them as polygons with their area and band means, for 'embed --zones' and "
                                     "'classify --zones' (object-based classification without parcels).")  # fmt: skip
    parser.add_argument("scene", help="a georeferenced GeoTIFF in a projected CRS")
    parser.add_argument("-o", "--output", required=True, help="the objects: .gpkg, .geojson or .csv (+ OUTPUT.png)")
    parser.add_argument("--size", type=float, default=1.0, help="the objects' mean size in hectares (default 1)")
    parser.add_argument("--compactness", type=float, default=None, help="SLIC's colour/space trade (scikit-image "
                        "scale: larger is more square; default: SLICO, adaptive)")  # fmt: skip
    parser.add_argument("--bands", type=int, nargs="+", default=None, help="1-based bands to segment (default all)")
    parser.add_argument("--nodata", type=float, default=None, help="nodata value overriding the file's")
    parser.add_argument("--block", type=int, default=2048, help="blocks segmented one at a time, in pixels (default 2048)")
    parser.add_argument("--labels", default=None, help="also write the object ids as this int32 GeoTIFF")
    parser.add_argument("--within", default=None, metavar="POLYGONS", help="parcels or stands no object crosses "
                        "(objects inside each and outside them; column zone: the polygon's row, -1 outside)")  # fmt: skip
    parser.add_argument("--preview-bands", type=int, nargs=3, default=None, metavar=("R", "G", "B"),
                        help="1-based bands drawn as red, green, blue in OUTPUT.png (default: the first three; "
                        "Landsat B2 B3 B4 stacks: 3 2 1)")  # fmt: skip
    parser.add_argument("--no-quicklook", action="store_true", help="do not draw OUTPUT.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))
    try:
        output = Path(args.output)
        check_feature_suffix(output, "Image objects")
        picture = None if args.no_quicklook else output.with_suffix(".png")
        for path in (output, picture):
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=[args.scene, args.within])
        with tempfile.TemporaryDirectory(prefix=".objects_", dir=output.parent) as tmp:
            ids = Path(args.labels) if args.labels else Path(tmp) / "ids.tif"
            frame = image_objects(args.scene, size_ha=args.size, compactness=args.compactness, bands=args.bands,
                                  nodata=args.nodata, block=args.block, labels=ids, within=args.within,
                                  overwrite=args.overwrite, progress=not args.quiet)  # fmt: skip
            write_features(frame, output, layer="objects", overwrite=args.overwrite)
            if picture is not None:
                objects_picture(picture, args.scene, ids, bands=args.preview_bands or args.bands, nodata=args.nodata,
                                count=len(frame), overwrite=args.overwrite)  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"dinov3-eo objects: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{len(frame):,} objects, {frame['area_m2'].mean() / 10_000:.2f} ha on average")
    for path in (output, picture, Path(args.labels) if args.labels else None):
        if path is not None:
            print(path)
    return 0


__all__ = ["image_objects", "label_outlines", "merge_small_objects", "object_halo", "objects_main", "objects_picture", "slic_labels"]
