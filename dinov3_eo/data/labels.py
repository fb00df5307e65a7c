"""Labels on the tile grid: a label raster warped on the fly, or vector polygons rasterised on the fly.

Both sources answer one question — "what are the labels on this tile's pixel grid?" — through
``sample(crs=, transform=, shape=, valid=)``, returning ``{"mask": int64 (H, W)}`` for classes or
``{"target": float32 (H, W)}`` for regression. The tile grid may be in any CRS and resolution: a
label raster is read through a ``WarpedVRT`` onto exactly that grid (nearest for classes, so no class
is ever invented by interpolation), a vector file is reprojected to it and burnt in. Pixels that are
unlabelled, label-nodata, or invalid in the image get ``ignore_index`` (classes) or NaN (regression).

Many label rasters (one mask per image) are matched to the imagery by georeference, or by file name
(``pairing="name"``, :class:`NamePairing`): masks of several dates over the same ground need the latter, and so do
masks without a georeference, which are read on their image's own pixel grid.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.transform import Affine, array_bounds
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from rasterio.vrt import WarpedVRT

from dinov3_eo.data.raster import PerThread, open_quietly, tagged_class_names

log = logging.getLogger(__name__)

TASKS = ("classification", "regression")

#: how many label rasters are matched to the imagery: by footprint, or each image with the mask of its file name
PAIRINGS = ("georeference", "name")

#: suffixes read as label rasters when masks are paired by name (segmentation datasets often ship PNG masks)
MASK_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img", ".png")

#: file suffixes read as vector labels (anything else with a raster suffix is a label raster)
VECTOR_SUFFIXES = (".gpkg", ".shp", ".geojson", ".json", ".fgb", ".parquet", ".gml", ".kml", ".sqlite")

def is_geodataframe(labels: Any) -> bool:
    """Whether ``labels`` is a ``geopandas.GeoDataFrame`` (polygons already in memory) rather than a path."""
    return hasattr(labels, "geometry") and hasattr(labels, "to_crs")


def read_vector(source: Any, what: str, *, layer: str | None = None) -> Any:
    """A ``GeoDataFrame`` as it is, or the vector file at a path read into one (its ``layer``, default the first).

    Args:
        what: what the file holds, plural, naming it in the error (``"Zones"``, ``"Labelled points"``).

    Raises:
        FileNotFoundError: ``"<what> '<path>' do not exist."`` ValueError: a file GDAL cannot read as vectors, or
            without that layer.
    """
    import geopandas as gpd

    if is_geodataframe(source):
        return source
    if not Path(source).exists():
        raise FileNotFoundError(f"{what} {os.fspath(source)!r} do not exist.")
    try:
        return gpd.read_file(source, **({"layer": layer} if layer else {}))
    except Exception as e:  # pyogrio's errors for a file GDAL cannot open or a layer it lacks
        raise ValueError(f"{what} {os.fspath(source)!r} cannot be read as a vector file: "
                         f"{str(e).splitlines()[0].split('; It might help')[0]}") from e


def burn_polygons(geometries: np.ndarray, values: np.ndarray, tree: Any, window: Window, transform: Affine, *,
                  fill: int, dtype: str) -> np.ndarray:  # fmt: skip
    """``[h, w]`` of ``dtype`` on ``window`` of the grid ``transform`` places: the value of the polygon under each
    pixel centre, ``fill`` under none; where polygons overlap, the later one's (``geometries[i]`` carries
    ``values[i]``; ``tree``: their ``shapely.STRtree``, so that only the polygons near the window are burnt)."""
    import shapely
    from rasterio.windows import bounds
    from rasterio.windows import transform as window_transform

    shape = (int(window.height), int(window.width))
    near = np.sort(tree.query(shapely.box(*bounds(window, transform)), predicate="intersects"))
    if not len(near):
        return np.full(shape, fill, dtype)
    return rasterize(zip(geometries[near], values[near]), out_shape=shape, transform=window_transform(window, transform),
                     fill=fill, dtype=dtype)  # fmt: skip


def is_raster_labels(labels: str | os.PathLike) -> bool:
    """Whether ``labels`` names label rasters (a raster file, a folder of them or a glob) rather than a vector file."""
    import glob

    from dinov3_eo.data.index import RASTER_SUFFIXES

    text = os.fspath(labels)
    if text.lower().endswith(VECTOR_SUFFIXES):
        return False
    return text.lower().endswith(RASTER_SUFFIXES) or os.path.isdir(text) or glob.has_magic(text)


#: vector columns read as the class colours when no ``color_attribute`` is named (QGIS and GIS exports name them so)
COLOR_COLUMNS = ("color", "colour")

RGB = tuple[int, int, int]


def parse_color(value: Any, *, where: str) -> RGB:
    """An RGB colour from ``"#rrggbb"``, ``"#rgb"``, ``"r,g,b"``, ``"r g b"`` or three numbers in 0..255.

    Raises:
        ValueError: naming ``where`` (the file and row or class) for anything else.
    """
    channels: list[Any]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("#") and len(text) in (4, 7):
            digits = text[1:] if len(text) == 7 else "".join(c * 2 for c in text[1:])
            try:
                return int(digits[0:2], 16), int(digits[2:4], 16), int(digits[4:6], 16)
            except ValueError:
                pass
            channels = []
        else:
            channels = text.replace(",", " ").split()
    elif isinstance(value, (list, tuple, np.ndarray)):
        channels = list(value)[:3] if len(value) in (3, 4) else []
    else:
        channels = []
    try:
        rgb = tuple(int(float(c)) for c in channels)
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise ValueError(f"{where}: colour {value!r} is not '#rrggbb', '#rgb' or 'r,g,b' with values in 0..255.")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class MosaicFile:
    """One raster of a :class:`RasterMosaic`: where it is and what marks its missing values."""

    path: str
    crs: CRS | None  # None: no georeference (allowed where masks are paired by name)
    bounds: BoundingBox
    nodata: float | None
    dtype: str
    shape: tuple[int, int] = (0, 0)  # (height, width) in pixels
    transform: Affine | None = None  # None: no georeference

    def aligned_offset(self, *, crs: CRS, transform: Affine) -> tuple[int, int] | None:
        """``(col, row)`` of this file's pixel at the grid's pixel (0, 0) where the grid ``(crs, transform)`` is the
        file's own pixel grid shifted by whole pixels (same CRS, pixel size and orientation, no rotation), else
        ``None``."""
        own = self.transform
        if own is None or self.crs is None or self.crs != crs or own.b or own.d or transform.b or transform.d:
            return None
        if not (math.isclose(own.a, transform.a, rel_tol=1e-9) and math.isclose(own.e, transform.e, rel_tol=1e-9)):
            return None
        col, row = ~own @ (transform.c, transform.f)
        if abs(col - round(col)) > 1e-6 or abs(row - round(row)) > 1e-6:
            return None
        return int(round(col)), int(round(row))

    def centres_inside(self, *, crs: CRS, transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        """[H, W] bool: which pixel centres of the grid ``(crs, transform, shape)`` fall inside this file's pixels
        (half-open intervals, so files that abut claim no pixel of each other), the centres reprojected into the
        file's CRS where it has another. The file must be georeferenced."""
        cols, rows = np.meshgrid(np.arange(shape[1]) + 0.5, np.arange(shape[0]) + 0.5)
        xs, ys = transform @ (cols, rows)
        if crs != self.crs:
            from rasterio.warp import transform as transform_points

            moved = transform_points(crs, self.crs, xs.ravel(), ys.ravel())
            xs, ys = np.asarray(moved[0]).reshape(xs.shape), np.asarray(moved[1]).reshape(ys.shape)
        col, row = ~self.transform @ (xs, ys)
        return (col >= 0) & (col < self.shape[1]) & (row >= 0) & (row < self.shape[0])


def _close_datasets(handles: dict[int, Any]) -> None:
    for src in handles.values():
        src.close()
    handles.clear()


def pairing_key(path: str | os.PathLike, suffixes: Sequence[str] = ()) -> str:
    """The name a file pairs by: its stem less the first of ``suffixes`` it ends with (longest tried first), e.g.
    ``top_potsdam_2_10_RGB.tif`` and ``top_potsdam_2_10_label.tif`` both give ``top_potsdam_2_10`` with
    ``("_RGB", "_label")``."""
    stem = Path(path).stem
    for suffix in sorted(suffixes, key=len, reverse=True):
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def shared_folders(a: str | os.PathLike, b: str | os.PathLike) -> int:
    """How many folder names two paths share at the same height above their files: ``imgs/2020/t1.tif`` and
    ``masks/2020/t1.tif`` share 1 (``2020``), and so do ``tile1/images/t1.tif`` and ``tile1/masks/t1.tif``
    (``tile1``, one level up), as datasets lay out images and masks."""
    return sum(x == y for x, y in zip(reversed(Path(a).parent.parts), reversed(Path(b).parent.parts)))


@dataclass(frozen=True)
class MaskPair:
    """The mask file (index in a :class:`RasterMosaic`) an image pairs with, and the georeference to read it with
    (the image's own where the mask has none; ``None``: the mask's)."""

    file: int
    src_crs: CRS | None = None
    src_transform: Affine | None = None


class NamePairing:
    """Each image with the mask of the same file name: ``pairing_key`` equal (stems, less ``suffixes``), and where
    several masks share the name (one per date or per area), the one whose folders match the image's most closely
    (:func:`shared_folders`: ``imgs/2020/t1.tif`` takes ``masks/2020/t1.tif``, not ``masks/2024/t1.tif``, and
    ``tile2/images/t1.tif`` takes ``tile2/masks/t1.tif``).

    Raises (from :meth:`find`):
        ValueError: two masks tie for one image (both named).
    """

    def __init__(self, masks: Sequence[str], suffixes: Sequence[str] = ()) -> None:
        self.masks, self.suffixes = list(masks), tuple(suffixes)
        self.by_key: dict[str, list[int]] = {}
        for i, mask in enumerate(self.masks):
            self.by_key.setdefault(pairing_key(mask, self.suffixes), []).append(i)

    def find(self, image: str | os.PathLike) -> int | None:
        """Index of ``image``'s mask, or ``None`` when no mask has its name."""
        candidates = self.by_key.get(pairing_key(image, self.suffixes), [])
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        scores = [shared_folders(image, self.masks[i]) for i in candidates]
        best = [i for i, score in zip(candidates, scores) if score == max(scores)]
        if len(best) > 1:
            raise ValueError(f"Image {image} pairs by name with several masks ({', '.join(self.masks[i] for i in best)}) "
                             "and no folder tells them apart: keep one mask per name, or name each date's (or area's) "
                             "mask folder as its images' folder.")
        return best[0]


class RasterMosaic:
    """Rasters in any CRS read as one layer onto any grid (a label raster split into tiles, one mask per image, CHM
    tiles): a grid reads the files whose footprint meets it, warped onto it, the first in path order winning where
    two overlap with values. Files are opened when a grid first needs them, once per process and thread.

    With ``pairing="name"`` a grid reads only the file paired with its image by name (:class:`NamePairing`;
    :meth:`read` then needs the image's path): masks of several dates over the same place stay apart, and a mask
    without a georeference is read on its image's own pixel grid (it must have the image's width and height).

    Args:
        paths: files, folders (recursive) or glob patterns.
        nodata: nodata override for every file (default: each file's declared nodata; NaN and ±inf are always
            missing).
        band: 1-based band to read.
        what: what the files are, for messages (``"label raster"``, ``"CHM"``).
        pairing: ``"georeference"`` (default) or ``"name"``.
        name_suffixes: with ``pairing="name"``, suffixes dropped from image and mask stems before they are compared
            (``["_RGB", "_label"]``).

    Raises:
        FileNotFoundError: a source matches no raster.
        ValueError: an unknown ``pairing``, a file without CRS (unless paired by name), or ``band`` outside a file's
            bands (both name the file).
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike], *, nodata: float | None = None,
                 band: int = 1, what: str = "raster", pairing: str = "georeference",
                 name_suffixes: Sequence[str] = ()) -> None:
        from dinov3_eo.data.index import expand_sources

        if pairing not in PAIRINGS:
            raise ValueError(f"{what}: pairing must be one of {PAIRINGS}, got {pairing!r}.")
        self.band, self.what, self.pairing = int(band), what, pairing
        files = []
        for path in expand_sources(paths, suffixes=MASK_SUFFIXES if pairing == "name" else None):
            with open_quietly(path) as src:
                georeferenced = src.crs is not None
                if not georeferenced and pairing != "name":
                    raise ValueError(f"{what} {path} is not georeferenced (no CRS); to read masks without a "
                                     "georeference on their images' grids, pair them by name.")
                if not 1 <= self.band <= src.count:
                    raise ValueError(f"{what}: band {band} is outside [1, {src.count}] for {path}.")
                files.append(MosaicFile(str(path), src.crs if georeferenced else None, src.bounds,
                                        src.nodata if nodata is None else nodata, src.dtypes[self.band - 1],
                                        (src.height, src.width), src.transform if georeferenced else None))  # fmt: skip
        self.files = files
        # per CRS, the files' bounds as one array: a grid is taken into each CRS once, not once per file
        groups: dict[Any, list[int]] = {}
        for i, f in enumerate(files):
            if f.crs is not None:
                groups.setdefault(f.crs, []).append(i)
        self._groups = [(crs, np.asarray(idx), np.asarray([tuple(files[i].bounds) for i in idx], dtype=np.float64))
                        for crs, idx in groups.items()]  # fmt: skip
        self.names = NamePairing([f.path for f in files], name_suffixes) if pairing == "name" else None
        self._pairs: dict[str, MaskPair | None] = {}
        # file index -> open dataset, one dict per process and thread (GDAL handles must not be shared between
        # reading threads), closed when let go or at exit: never in the interpreter's final teardown
        self._handles = PerThread(dict, close=_close_datasets)

    def open(self, i: int) -> Any:
        """The calling thread's open dataset of file ``i``."""
        handles = self._handles.get()
        if i not in handles:
            handles[i] = open_quietly(self.files[i].path)
        return handles[i]

    def close(self) -> None:
        """Close the files the calling thread opened (they reopen on the next read)."""
        self._handles.release()

    def pair(self, image: str | os.PathLike) -> MaskPair | None:
        """The mask paired with ``image`` by name (``pairing="name"``), checked once per image: ``None`` when no mask
        has its name.

        Raises:
            ValueError: two masks tie for it; a mask without georeference whose size differs from the image's; a
                georeferenced mask whose footprint misses the image's (each names both files).
        """
        key = os.path.abspath(os.fspath(image))
        if key in self._pairs:
            return self._pairs[key]
        assert self.names is not None, "pair() is for masks paired by name"
        index = self.names.find(key)
        pair = None
        if index is not None:
            f = self.files[index]
            with rasterio.open(key) as img:
                if f.crs is None:
                    if f.shape != (img.height, img.width):
                        raise ValueError(
                            f"{self.what} {f.path} has no georeference and is {f.shape[1]}x{f.shape[0]} px, but its "
                            f"image {key} is {img.width}x{img.height} px: a mask without georeference must share its "
                            "image's pixel grid.")
                    pair = MaskPair(index, img.crs, img.transform)
                else:
                    if index not in self.overlapping(crs=img.crs, transform=img.transform, shape=img.shape):
                        raise ValueError(f"{self.what} {f.path}, paired by name with the image {key}, does not "
                                         "overlap it: check both files' georeference.")
                    pair = MaskPair(index)
        self._pairs[key] = pair
        return pair

    def pair_all(self, images: Sequence[str | os.PathLike]) -> list[MaskPair | None]:
        """:meth:`pair` for every image, in their order; logs the images without a mask and the masks no image took.

        Raises:
            ValueError: no image has a mask (naming an image, a mask and the suffixes compared), or as :meth:`pair`.
        """
        pairs = [self.pair(image) for image in images]
        unpaired = [os.fspath(image) for image, pair in zip(images, pairs) if pair is None]
        if len(unpaired) == len(pairs) and pairs:
            raise ValueError(
                f"{self.what}: no image has a mask of the same name (images like {os.path.basename(unpaired[0])}, "
                f"masks like {os.path.basename(self.files[0].path)}; compared as "
                f"{pairing_key(unpaired[0], self.names.suffixes)!r} and "
                f"{pairing_key(self.files[0].path, self.names.suffixes)!r}): name the suffixes to drop "
                "(name_suffixes), or pair by georeference.")
        if unpaired:
            log.warning("%d of %d images have no mask of the same name and are left out, e.g. %s.", len(unpaired),
                        len(pairs), ", ".join(os.path.basename(p) for p in unpaired[:3]))
        taken = {pair.file for pair in pairs if pair is not None}
        unused = [f.path for i, f in enumerate(self.files) if i not in taken]
        if unused:
            log.warning("%d of %d masks pair with no image, e.g. %s.", len(unused), len(self.files),
                        ", ".join(os.path.basename(p) for p in unused[:3]))
        return pairs

    def overlapping(self, *, crs: CRS, transform: Affine, shape: tuple[int, int]) -> list[int]:
        """Indexes (in path order) of the files whose footprint meets the grid ``(crs, transform, shape)``."""
        west, south, east, north = array_bounds(shape[0], shape[1], transform)
        hits = []
        for file_crs, idx, b in self._groups:
            w, s_, e, n = (west, south, east, north) if file_crs == crs else transform_bounds(crs, file_crs, west, south, east, north)
            meets = (b[:, 0] < e) & (b[:, 2] > w) & (b[:, 1] < n) & (b[:, 3] > s_)
            hits.extend(idx[meets].tolist())
        return sorted(hits)

    def read(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], resampling: Resampling,
             source: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Values (H, W) on the grid, in a dtype that holds every file's, and where they exist (bool (H, W); NaN and
        ±inf never do). ``source``: the image the grid was cut from (needed, and only read, when paired by name).

        Raises:
            ValueError: paired by name and no ``source`` given, or as :meth:`pair`.
        """
        values = np.zeros(shape, dtype=np.result_type(*(f.dtype for f in self.files)))
        found = np.zeros(shape, dtype=bool)
        if self.pairing == "name":
            if source is None:
                raise ValueError(f"{self.what}: masks paired by name are read for an image: pass its path (source=).")
            pair = self.pair(source)
            reads = [] if pair is None else [pair]
        else:
            reads = [MaskPair(i) for i in self.overlapping(crs=crs, transform=transform, shape=shape)]
        for read in reads:
            f = self.files[read.file]
            offset = f.aligned_offset(crs=crs, transform=transform) if resampling == Resampling.nearest and \
                read.src_crs is None else None  # fmt: skip
            if offset is not None:  # the grid is the file's own, shifted by whole pixels: a window, nothing to warp
                part, has = self._read_aligned(read.file, offset, shape, values.dtype)
            else:
                part, has = self._read_warped(read, crs=crs, transform=transform, shape=shape, resampling=resampling)
            if np.issubdtype(part.dtype, np.floating):
                has &= np.isfinite(part)
            take = has & ~found  # the first file (in path order) wins where two overlap
            values[take] = part[take]
            found |= take
            if found.all():
                break
        return values, found

    def _read_aligned(self, i: int, offset: tuple[int, int], shape: tuple[int, int],
                      dtype: Any) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """File ``i``'s values and validity on a grid whose pixel (0, 0) is its pixel ``offset`` = (col, row), read
        as a window of the file (zeros and invalid outside it)."""
        f = self.files[i]
        col, row = offset
        top, left = max(row, 0), max(col, 0)
        bottom, right = min(row + shape[0], f.shape[0]), min(col + shape[1], f.shape[1])
        part = np.zeros(shape, dtype=dtype)
        has = np.zeros(shape, dtype=bool)
        if bottom > top and right > left:
            src = self.open(i)
            window = Window(left, top, right - left, bottom - top)
            block = src.read(self.band, window=window)
            if f.nodata is None:  # the file's own mask (an internal mask or alpha band), as the warped path uses
                inside = src.read_masks(self.band, window=window) > 0
            elif np.isnan(f.nodata):
                inside = ~np.isnan(block)
            else:
                inside = block != f.nodata
            target = np.s_[top - row : bottom - row, left - col : right - col]
            part[target], has[target] = block, inside
        return part, has

    def _read_warped(self, read: MaskPair, *, crs: CRS, transform: Affine, shape: tuple[int, int],
                     resampling: Resampling) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """File ``read.file`` warped onto the grid: its values and where they exist."""
        f = self.files[read.file]
        height, width = shape
        # a nodata value (or an alpha band) tells pixels outside the file after warping
        with WarpedVRT(
            self.open(read.file), crs=crs, transform=transform, width=width, height=height, resampling=resampling,
            src_nodata=f.nodata, nodata=f.nodata, add_alpha=f.nodata is None,
            **({"src_crs": read.src_crs, "src_transform": read.src_transform} if read.src_crs is not None else {}),
        ) as vrt:  # fmt: skip
            return vrt.read(self.band), vrt.read_masks(self.band) > 0


class RasterLabels:
    """Labels from a raster in any CRS/resolution, or from many label rasters read as one :class:`RasterMosaic`,
    warped to each tile's grid.

    A folder, glob or list of label rasters (one mask per image, as segmentation datasets ship them, each in its own
    CRS if need be) is matched to the imagery by georeference: a tile reads the label rasters whose footprint meets
    it, the first in path order winning where two overlap with labels. With ``pairing="name"`` each image takes the
    mask of its own file name instead (:class:`NamePairing`): the way to keep masks of several dates over the same
    place apart, and to use masks without a georeference (PNG masks too), read on their image's pixel grid.

    Args:
        path: the label raster, or a folder (searched recursively), glob pattern or list of them.
        task: ``"classification"`` (values are class ids) or ``"regression"`` (values are targets).
        nodata: label nodata override (default: each file's declared nodata).
        ignore_index: class id written where there is no label.
        resampling: ``"nearest"`` for classes (enforced); any rasterio name for regression.
        band: 1-based band of the label raster(s).
        pairing: ``"georeference"`` (default) or ``"name"`` (see above).
        name_suffixes: with ``pairing="name"``, suffixes dropped from image and mask stems before they are compared
            (``["_RGB", "_label"]`` pairs ``top_potsdam_2_10_RGB.tif`` with ``top_potsdam_2_10_label.tif``).

    Attributes:
        class_names: class id -> name from the first raster's ``class_names`` tag (a JSON list, as this package's
            class maps carry it), empty without one; class_colors: class id -> RGB from its colour table, empty
            without one.

    Raises:
        FileNotFoundError: if ``path`` matches no raster.
        ValueError: for an unknown task or pairing, a non-nearest resampling for classes, a raster without CRS
            (unless paired by name) or without ``band`` (named).
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike | Sequence[str | os.PathLike],
        task: str = "classification",
        nodata: float | None = None,
        ignore_index: int = 255,
        resampling: str = "nearest",
        band: int = 1,
        pairing: str = "georeference",
        name_suffixes: Sequence[str] = (),
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"RasterLabels: task must be one of {TASKS}, got {task!r}.")
        if resampling not in Resampling.__members__:
            raise ValueError(f"RasterLabels: unknown resampling {resampling!r}.")
        if task == "classification" and resampling != "nearest":
            raise ValueError(f"RasterLabels: class labels must be resampled with 'nearest', got {resampling!r}.")
        self.mosaic = RasterMosaic(path, nodata=nodata, band=band, what="RasterLabels: label raster", pairing=pairing,
                                   name_suffixes=name_suffixes)
        self.paths = [f.path for f in self.mosaic.files]
        given = [path] if isinstance(path, (str, os.PathLike)) else list(path)
        self.path = self.paths[0] if len(self.paths) == 1 else ", ".join(os.fspath(p) for p in given)  # for messages
        self.task, self.ignore_index, self.band = task, int(ignore_index), int(band)
        self.resampling = Resampling[resampling]
        self.nodata = self.mosaic.files[0].nodata
        self.class_names: dict[int, str] = {}
        self.class_colors: dict[int, RGB] = {}
        if task == "classification":
            with open_quietly(self.paths[0]) as src:
                self.class_names, self.class_colors = _raster_legend(src, self.band)

    @property
    def pairing(self) -> str:
        """``"georeference"`` or ``"name"``: how the label rasters are matched to the imagery."""
        return self.mosaic.pairing

    def present_values(self) -> list[int | float]:
        """The distinct label values of the whole raster(s) (nodata, the override or each file's, and NaN or ±inf
        left out), read block by block: memory holds one block, whatever the rasters' size."""
        seen: set = set()
        for f in self.mosaic.files:
            with open_quietly(f.path) as src:
                for _, window in src.block_windows(self.band):
                    values = src.read(self.band, window=window).ravel()
                    if f.nodata is not None:
                        values = values[values != f.nodata]
                    if np.issubdtype(values.dtype, np.floating):
                        values = values[np.isfinite(values)]
                    seen.update(np.unique(values).tolist())
        return sorted(seen)

    def read(self, *, crs: CRS, transform: Affine, shape: tuple[int, int],
             path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Label values (H, W) on the given grid and where they exist (bool (H, W)); ``path``: the image the grid was
        cut from (needed where masks are paired by name)."""
        return self.mosaic.read(crs=crs, transform=transform, shape=shape, resampling=self.resampling, source=path)

    def sample(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], valid: np.ndarray | None = None,
               path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
        """``{"mask": int64 (H, W)}`` or ``{"target": float32 (H, W)}`` for a tile grid cut from the image at
        ``path``."""
        import torch

        values, labelled = self.read(crs=crs, transform=transform, shape=shape, path=path)
        if valid is not None:
            labelled &= valid
        if self.task == "regression":
            target = np.where(labelled, values.astype(np.float32), np.float32(np.nan))
            return {"target": torch.from_numpy(target)}
        mask = np.where(labelled, values.astype(np.int64), self.ignore_index)
        return {"mask": torch.from_numpy(mask)}


def _raster_legend(src: Any, band: int) -> tuple[dict[int, str], dict[int, RGB]]:
    """Class names (``class_names`` tag, dataset or band) and colours (colour table) of a class raster."""
    names = dict(enumerate(tagged_class_names(src, band) or []))
    try:
        table = src.colormap(band)
    except ValueError:  # no colour table
        table = {}
    return names, {int(i): tuple(int(c) for c in rgba[:3]) for i, rgba in table.items()}


class VectorLabels:
    """Labels from polygons (GeoPackage, GeoJSON, shapefile...) burnt onto each tile's grid.

    Args:
        path: the vector file, or a ``geopandas.GeoDataFrame`` already in memory (with a CRS).
        attribute: column holding the class (names or integer ids).
        classes: mapping class name/value -> id; default: sorted unique values of ``attribute``
            numbered from 0 (integer columns keep their values).
        layer: layer of a multi-layer file.
        ignore_index: id where no polygon lies (and where the image is invalid).
        background: id for pixels inside the image that no polygon covers; ``None`` means ignore them
            (labels are sparse, as for the bundled land-cover polygons).
        all_touched: burn every pixel a polygon touches, not only those whose centre it covers.
        color_attribute: column with each polygon's colour (``"#rrggbb"`` or ``"r,g,b"``); default: a ``color`` or
            ``colour`` column when there is one. A class whose polygons disagree takes its most frequent colour.

    Attributes:
        classes: class value (as text) -> id; class_names: id -> name where the classes are names (not integer
            ids); class_colors: id -> RGB from the colour column (empty without one).

    Raises:
        KeyError: if ``attribute`` (or a named ``color_attribute``) is not a column.
        ValueError: if an attribute value is missing from ``classes``, or a colour cannot be read.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike | Any,
        attribute: str = "name",
        classes: Mapping[Any, int] | None = None,
        layer: str | None = None,
        ignore_index: int = 255,
        background: int | None = None,
        all_touched: bool = False,
        color_attribute: str | None = None,
    ) -> None:
        in_memory = is_geodataframe(path)
        self._frame = path.copy() if in_memory else None
        self.path = "the GeoDataFrame" if in_memory else os.fspath(path)
        self.attribute, self.layer = attribute, layer
        self.ignore_index, self.background, self.all_touched = int(ignore_index), background, all_touched
        gdf = self._load()
        if attribute not in gdf.columns:
            raise KeyError(f"VectorLabels: {self.path} has no attribute {attribute!r}; columns are {list(gdf.columns)}.")
        if gdf.crs is None:
            raise ValueError(f"VectorLabels: {self.path} has no CRS.")
        values = gdf[attribute].dropna().unique().tolist()
        if classes is None:
            if all(isinstance(v, (int, np.integer)) for v in values):
                classes = {int(v): int(v) for v in values}
            else:
                classes = {v: i for i, v in enumerate(sorted(str(v) for v in values))}
        unknown = sorted({str(v) for v in values} - {str(k) for k in classes})
        if unknown:
            raise ValueError(f"VectorLabels: values {unknown} of {attribute!r} are missing from classes {dict(classes)}.")
        self.classes = {str(k): int(v) for k, v in classes.items()}
        named = not all(isinstance(k, (int, np.integer)) or str(k).lstrip("-").isdigit() for k in classes)
        self.class_names = {i: k for k, i in self.classes.items()} if named else {}
        self.class_colors = self._colors(gdf, color_attribute)
        self._by_crs: dict[str, Any] = {}

    def _colors(self, gdf: Any, color_attribute: str | None) -> dict[int, RGB]:
        """Class id -> its polygons' most frequent colour, from ``color_attribute`` or a :data:`COLOR_COLUMNS` column."""
        from collections import Counter

        if color_attribute is not None and color_attribute not in gdf.columns:
            raise KeyError(f"VectorLabels: {self.path} has no colour column {color_attribute!r}; columns are "
                           f"{list(gdf.columns)}.")
        column = color_attribute or next((c for c in gdf.columns if str(c).lower() in COLOR_COLUMNS), None)
        if column is None:
            return {}
        votes: dict[int, Counter] = {}
        for row, (value, color) in enumerate(zip(gdf[self.attribute], gdf[column])):
            if value is None or color is None or (isinstance(value, float) and np.isnan(value)):
                continue
            if isinstance(color, float) and np.isnan(color):
                continue
            rgb = parse_color(color, where=f"{self.path}, row {row} ({self.attribute}={value!r}), column {column!r}")
            votes.setdefault(self.classes[str(value)], Counter())[rgb] += 1
        return {i: counter.most_common(1)[0][0] for i, counter in sorted(votes.items())}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_by_crs"] = {}  # reloaded lazily in each worker
        return state

    def _load(self):
        import geopandas as gpd

        if self._frame is not None:
            return self._frame
        return gpd.read_file(self.path, layer=self.layer)

    def _in_crs(self, crs: CRS):
        key = crs.to_wkt()
        if key not in self._by_crs:
            gdf = self._load()
            gdf = gdf[gdf[self.attribute].notna()]
            self._by_crs[key] = gdf.to_crs(crs)
        return self._by_crs[key]

    def sample(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], valid: np.ndarray | None = None,
               path: str | os.PathLike | None = None) -> dict[str, Any]:
        """``{"mask": int64 (H, W)}`` of class ids on the tile grid (``path``, the tile's image, is not needed)."""
        import torch

        gdf = self._in_crs(crs)
        west, south, east, north = array_bounds(shape[0], shape[1], transform)
        hits = gdf.iloc[gdf.sindex.query(_box(west, south, east, north))]
        fill = self.ignore_index if self.background is None else int(self.background)
        shapes = [(geom, self.classes[str(v)]) for geom, v in zip(hits.geometry, hits[self.attribute]) if geom is not None]
        if shapes:
            mask = rasterize(shapes, out_shape=shape, transform=transform, fill=fill, all_touched=self.all_touched, dtype="int64")
        else:
            mask = np.full(shape, fill, dtype=np.int64)
        if valid is not None:
            mask[~valid] = self.ignore_index
        return {"mask": torch.from_numpy(mask)}


def _box(west: float, south: float, east: float, north: float):
    from shapely.geometry import box

    return box(west, south, east, north)
