"""Georeferenced outputs of a dense prediction: Cloud-Optimised GeoTIFF, PNG quick-look, GeoPackage polygons.

Every output is written atomically: into a hidden temporary file in the destination's folder that is
renamed over the destination (``os.replace``) only once it is complete, so an interrupted run never
leaves a half-written file where the user expects a result, and an existing output is kept unless
``overwrite=True``.

A :class:`COGWriter` accepts blocks in any order (a streaming predictor writes each finished block as
soon as it is final), buffers them in a tiled, uncompressed, sparse GeoTIFF, and on a clean exit
converts that into a COG (512-pixel tiles, DEFLATE/LZW/ZSTD, overviews) with GDAL's COG driver.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.transform import Affine
from rasterio.windows import Window

from dinov3_eo.data.raster import open_quietly, tagged_class_names

#: Distinct, colour-blind-friendly class colours (Okabe-Ito, then Tableau 20 for more classes).
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
    (240, 228, 66), (0, 0, 0), (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120),
    (44, 160, 44), (152, 223, 138), (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213),
    (140, 86, 75), (196, 156, 148), (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199),
    (188, 189, 34), (219, 219, 141), (23, 190, 207), (158, 218, 229),
)  # fmt: skip

_COMPRESSIONS = ("deflate", "lzw", "zstd", "none")


def default_colormap(num_classes: int) -> dict[int, tuple[int, int, int, int]]:
    """Class id -> opaque RGBA colour for ``num_classes`` classes (cycles past the palette length)."""
    return {i: (*_PALETTE[i % len(_PALETTE)], 255) for i in range(num_classes)}


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (through links and relative paths too)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return a.resolve() == b.resolve()


def check_overwrite(dst: str | os.PathLike[str], overwrite: bool, *,
                    inputs: Sequence[str | os.PathLike[str] | None] = ()) -> Path:
    """``dst`` as a Path, after checking it may be written.

    ``inputs``: the files the output is made from; none of them may be ``dst``, ``overwrite`` or not (``None``
    entries, e.g. an in-memory source, are skipped).

    Raises:
        ValueError: if ``dst`` is one of ``inputs``.
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
        FileNotFoundError: if the folder that should hold ``dst`` does not exist.
    """
    path = Path(dst)
    for source in inputs:
        if source is not None and _same_file(path, Path(source)):
            raise ValueError(f"Output {str(path)!r} is the input {str(source)!r}: inputs are never overwritten; "
                             "choose another output path.")
    if path.exists() and not overwrite:
        raise FileExistsError(f"Output {str(path)!r} already exists; pass overwrite=True (--overwrite) to replace it.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"Output folder {str(path.parent)!r} for {path.name!r} does not exist.")
    return path


def check_distinct_stems(inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Refuse inputs that share a file name stem: their outputs, named after it in one folder, would collide.

    Raises:
        ValueError: naming the shared stems.
    """
    stems = [Path(p).stem for p in inputs]
    if len(set(stems)) != len(stems):
        raise ValueError(f"Inputs share file names {sorted({s for s in stems if stems.count(s) > 1})}; their outputs "
                         "would collide.")  # fmt: skip


def temporary_sibling(dst: Path) -> Path:
    """A unique hidden path next to ``dst`` with the same suffix (same filesystem, so the rename is atomic)."""
    return dst.with_name(f".{dst.stem}.{uuid.uuid4().hex[:10]}.part{dst.suffix}")


@contextmanager
def atomic_output(dst: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes ``dst`` on success and is removed on any error.

    Raises:
        FileExistsError: if ``dst`` exists and ``overwrite`` is false (checked before and after writing).
    """
    path = check_overwrite(dst, overwrite)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        # another process may have created dst while we wrote; never clobber it silently
        check_overwrite(path, overwrite)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _cog_options(*, compress: str, float_data: bool, overviews: bool, categorical: bool = False) -> dict[str, Any]:
    """GDAL COG creation options; ``categorical`` (class maps) picks nearest overviews, no predictor, DEFLATE 5."""
    if compress not in _COMPRESSIONS:
        raise ValueError(f"compress must be one of {_COMPRESSIONS}, got {compress!r}.")
    options: dict[str, Any] = {
        "compress": compress.upper(),
        "blocksize": 512,
        "overviews": "AUTO" if overviews else "NONE",
        "overview_resampling": "NEAREST" if categorical else "AVERAGE",
        "bigtiff": "IF_SAFER",
        # the conversion is the one step no compute hides: compress and build overviews on every core
        "num_threads": "ALL_CPUS",
    }
    if compress != "none" and not categorical:
        # horizontal differencing: float predictor for float bands, integer predictor otherwise. Not for class
        # maps: differences of class ids are noise to the compressor (measured on a 2k class map: 10 % larger
        # and 6 % slower to write with the predictor)
        options["predictor"] = 3 if float_data else 2
    if compress == "deflate" and categorical:
        # the conversion runs after the last window, where no compute hides it. Level 5 instead of GDAL's 6, on 2k
        # class maps: a speckled one 56 -> 31 ms (+4 % size), a smooth one 18 -> 13 ms (+19 %); level 4 and below
        # double the smooth map's size, 7 doubles the time
        options["level"] = 5
    return options


class COGWriter:
    """Write a raster block by block; on a clean exit it becomes a Cloud-Optimised GeoTIFF at ``dst``.

    Use as a context manager::

        with COGWriter(dst, crs=src.crs, transform=src.transform, width=W, height=H, count=1,
                       dtype="uint8", nodata=255, class_names=["water", "crop"]) as out:
            out.write(block, Window(col_off, row_off, w, h))   # block: (count, h, w) or (h, w)

    Args:
        dst: destination ``.tif`` path.
        crs, transform, width, height: the grid, normally copied from the input raster.
        count, dtype: band count and numpy dtype of the output.
        nodata: the nodata value stored in the file (``nan`` allowed for floats).
        overwrite: replace an existing ``dst`` (otherwise :class:`FileExistsError` at construction).
        compress: ``deflate`` (default), ``lzw``, ``zstd`` or ``none``.
        overviews: build internal overviews (nearest for class maps, average otherwise).
        class_names: names of class ids ``0..n-1`` for a class map: stored as the ``class_names`` tag
            (JSON) and per-class band tags, and a colour table is embedded.
        colormap: class id -> RGB(A) for the colour table; defaults to :func:`default_colormap`.
        band_descriptions: one description per band (e.g. class names of probability bands).
        scales: per-band scale factors stored in the file (``value * scale`` is the physical quantity).
        units: per-band units (``"m"``), as GDAL's unit type (``rasterio``'s ``units``).
        tags: extra dataset tags (values are stored as strings).

    Raises:
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
        ValueError: a path not ending in .tif/.tiff, an unknown compression, or a colour table on a band type that
            cannot hold one.
    """

    def __init__(
        self,
        dst: str | os.PathLike[str],
        *,
        crs: Any,
        transform: Any,
        width: int,
        height: int,
        count: int,
        dtype: str | np.dtype,
        nodata: float | None,
        overwrite: bool = False,
        compress: str = "deflate",
        overviews: bool = True,
        class_names: Sequence[str] | None = None,
        colormap: Mapping[int, Sequence[int]] | None = None,
        band_descriptions: Sequence[str] | None = None,
        scales: Sequence[float] | None = None,
        units: Sequence[str] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> None:
        if Path(dst).suffix.lower() not in (".tif", ".tiff"):
            raise ValueError(f"A GeoTIFF is written to a .tif or .tiff path, not {os.fspath(dst)!r}.")
        self.dst = check_overwrite(dst, overwrite)
        self.overwrite = overwrite
        self.dtype = np.dtype(dtype)
        is_class_map = class_names is not None or colormap is not None
        if is_class_map and (count != 1 or self.dtype not in (np.uint8, np.uint16)):
            raise ValueError(f"A class map with a colour table needs one uint8/uint16 band, got {count} x {self.dtype}.")
        if band_descriptions is not None and len(band_descriptions) != count:
            raise ValueError(f"band_descriptions has {len(band_descriptions)} entries for {count} bands.")
        if scales is not None and len(scales) != count:
            raise ValueError(f"scales has {len(scales)} entries for {count} bands.")
        if units is not None and len(units) != count:
            raise ValueError(f"units has {len(units)} entries for {count} bands.")
        self._cog_options = _cog_options(
            compress=compress,
            float_data=self.dtype.kind == "f",
            overviews=overviews,
            categorical=is_class_map,
        )
        self._profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": count,
            "dtype": self.dtype.name,
            "crs": crs,
            "transform": transform,
            "nodata": nodata,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            # blocks never written stay holes (read as nodata) instead of zero-filled disk
            "sparse_ok": True,
            "bigtiff": "IF_SAFER",
        }
        self._class_names = list(class_names) if class_names is not None else None
        self._colormap = colormap
        self._band_descriptions = band_descriptions
        self._scales = scales
        self._units = units
        self._tags = {k: str(v) for k, v in (tags or {}).items()}
        self._tmp_gtiff = temporary_sibling(self.dst.with_suffix(".tif"))
        self._dataset: Any = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(count, height, width) of the output."""
        return self._profile["count"], self._profile["height"], self._profile["width"]

    def __enter__(self) -> COGWriter:
        with warnings.catch_warnings():
            if self._profile.get("crs") is None:  # an image chip's map: no georeference, by design
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            self._dataset = rasterio.open(self._tmp_gtiff, "w", **self._profile)
        try:
            self._write_metadata(self._dataset)
        except Exception:
            self._abort()
            raise
        return self

    def _write_metadata(self, ds: Any) -> None:
        tags = dict(self._tags)
        if self._class_names is not None:
            tags["class_names"] = json.dumps(self._class_names)
            ds.update_tags(1, **{f"CLASS_{i}": name for i, name in enumerate(self._class_names)})
        if self._class_names is not None or self._colormap is not None:
            n = len(self._class_names) if self._class_names is not None else max(self._colormap or {0: 0}) + 1
            colormap = default_colormap(n) if self._colormap is None else self._colormap
            ds.write_colormap(1, {int(k): tuple(int(c) for c in v) for k, v in colormap.items()})
            if self._class_names is not None:
                ds.set_band_description(1, "class")
        if tags:
            ds.update_tags(**tags)
        if self._band_descriptions is not None:
            for i, text in enumerate(self._band_descriptions, start=1):
                ds.set_band_description(i, text)
        if self._scales is not None:
            ds.scales = tuple(float(s) for s in self._scales)
            ds.offsets = (0.0,) * len(self._scales)
        if self._units is not None:
            ds.units = tuple(str(u) for u in self._units)

    def write(self, block: np.ndarray, window: Window) -> None:
        """Write ``block`` (count, h, w) — or (h, w) for one band — at ``window`` (pixel offsets).

        Raises:
            RuntimeError: if the writer is not open (used outside its ``with`` block).
            ValueError: if the block's shape does not match the window and band count.
        """
        if self._dataset is None:
            raise RuntimeError(f"COGWriter for {str(self.dst)!r} is not open; use it inside a 'with' block.")
        if block.ndim == 2:
            block = block[None]  # [h, w] -> [1, h, w]
        expected = (self._profile["count"], int(window.height), int(window.width))
        if block.shape != expected:
            raise ValueError(f"Block of shape {block.shape} does not fit window {window} of {expected[0]} bands.")
        self._dataset.write(block.astype(self.dtype, copy=False), window=window)

    def close(self) -> None:
        """Finish: close the staging GeoTIFF, convert it to a COG and move that to ``dst``."""
        if self._dataset is None:
            return
        try:
            self._dataset.close()
            self._dataset = None
            with atomic_output(self.dst, overwrite=self.overwrite) as tmp_cog:
                rasterio.shutil.copy(self._tmp_gtiff, tmp_cog, driver="COG", **self._cog_options)
        finally:
            self._abort()

    def _abort(self) -> None:
        if self._dataset is not None:
            self._dataset.close()
            self._dataset = None
        self._tmp_gtiff.unlink(missing_ok=True)
        # GDAL may leave an .aux.xml (statistics, band metadata) beside the staging file
        Path(f"{self._tmp_gtiff}.aux.xml").unlink(missing_ok=True)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()


def write_cog(
    dst: str | os.PathLike[str],
    array: np.ndarray,
    *,
    crs: Any,
    transform: Any,
    nodata: float | None,
    **options: Any,
) -> Path:
    """Write a whole in-memory array (count, H, W) or (H, W) as a COG; ``options`` as for :class:`COGWriter`."""
    data = array[None] if array.ndim == 2 else array  # [H, W] -> [1, H, W]
    count, height, width = data.shape
    with COGWriter(
        dst, crs=crs, transform=transform, width=width, height=height, count=count, dtype=data.dtype,
        nodata=nodata, **options,
    ) as out:  # fmt: skip
        out.write(data, Window(0, 0, width, height))
    return out.dst


def write_class_png(classes: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                    colors: Sequence[Sequence[int]], overwrite: bool = False) -> Path:  # fmt: skip
    """A one-band class raster as a palette PNG of the same ids (``colors[i]`` for class ``i``, black for the rest),
    written atomically; more than 256 ids are written as a 16-bit greyscale PNG without palette. The raster's
    ``class_names`` tag goes along as a PNG text chunk of that name, which GDAL reads back as the PNG's tag (so
    ``segment evaluate --chips`` names the classes as for a GeoTIFF).

    Raises:
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
    """
    from PIL import Image, PngImagePlugin

    with open_quietly(classes) as src:
        ids = src.read(1)
        names = tagged_class_names(src)
    text = PngImagePlugin.PngInfo()
    if names is not None:
        text.add_text("class_names", json.dumps(names))
    if ids.dtype == np.uint8:
        image = Image.fromarray(ids, mode="P")
        palette = [0] * 768
        for i, color in enumerate(colors[:256]):
            palette[3 * i : 3 * i + 3] = [int(c) for c in color[:3]]
        image.putpalette(palette)
    else:
        image = Image.fromarray(ids.astype(np.uint16))
    with atomic_output(dst, overwrite=overwrite) as tmp:
        image.save(tmp, format="PNG", pnginfo=text)
    return Path(dst)


@contextmanager
def class_map_as_png(dst: str | os.PathLike[str], *, colors: Sequence[Sequence[int]],
                     overwrite: bool = False) -> Iterator[Path]:  # fmt: skip
    """A scratch path for a one-band class GeoTIFF (what the streaming writers write) that becomes ``dst``, a palette
    PNG of the same ids (:func:`write_class_png`), when the block ends without an error; the scratch is removed
    either way. Image chips get their class maps so, as chip datasets ship their masks."""
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.stem}.") as tmp:
        scratch = Path(tmp) / "classes.tif"
        yield scratch
        write_class_png(scratch, dst, colors=colors, overwrite=overwrite)


def save_figure(fig: Any, dst: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """A matplotlib ``Figure`` written atomically as a PNG at its own dpi, cropped to what it draws.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    with atomic_output(dst, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight", dpi=fig.dpi)
    return Path(dst)


def stretch_to_unit(image: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-band 2-98 % stretch of (C, h, w) to [0, 1] over the valid pixels, for display only."""
    out = np.zeros(image.shape, dtype=np.float32)
    for c, band in enumerate(image.astype(np.float32)):
        values = band[valid]
        if values.size == 0:
            continue
        low, high = np.percentile(values, [2, 98])
        out[c] = np.clip((band - low) / max(high - low, 1e-12), 0.0, 1.0)
    return out


def picture_shape(height: int, width: int, max_size: int = 1024) -> tuple[int, int]:
    """A ``height`` x ``width`` raster's shape scaled down to at most ``max_size`` a side: what its picture reads."""
    scale = min(1.0, max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def picture_grid(src: Any, max_size: int = 1024) -> tuple[tuple[int, int], Affine]:
    """The shape (:func:`picture_shape`) and transform of ``src``'s picture grid (anything with ``height``, ``width``
    and ``transform``: a dataset, a stack): the grid another raster is read onto to be drawn beside it."""
    shape = picture_shape(src.height, src.width, max_size)
    return shape, src.transform @ Affine.scale(src.width / shape[1], src.height / shape[0])


def label_outlines(labels: np.ndarray) -> np.ndarray:
    """``[H, W]`` bool: the labelled pixels (> 0) next to a pixel of another label, or of none (4-neighbours): the
    outlines of crowns or image objects drawn over a picture."""
    edge = np.zeros(labels.shape, bool)
    across = labels[:, :-1] != labels[:, 1:]
    edge[:, :-1] |= across
    edge[:, 1:] |= across
    down = labels[:-1] != labels[1:]
    edge[:-1] |= down
    edge[1:] |= down
    return edge & (labels > 0)


def display_rgb(pixels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """``[C, h, w]`` imagery (the red, green, blue bands, or one band) as an ``[h, w, 3]`` float picture in [0, 1]:
    :func:`stretch_to_unit`, one band repeated as grey, invalid pixels white (not black "data")."""
    rgb = stretch_to_unit(pixels, valid)
    picture = np.moveaxis(np.repeat(rgb[:1], 3, axis=0) if len(rgb) < 3 else rgb[:3], 0, -1).copy()
    picture[~valid] = 1.0
    return picture


def coarse_grid_factor(fine: tuple[int, int, Any], coarse: tuple[int, int, Any]) -> int | None:
    """``k`` where grid ``coarse`` (height, width, transform) is ``fine``'s with pixels of ``k`` x ``k`` of its own
    from the same origin, covering it (a tile map of the scene), else ``None``."""
    (fh, fw, ft), (ch, cw, ct) = fine, coarse
    if ft.a == 0 or ft.b or ft.d:  # rotated grids are not compared
        return None
    k = round(ct.a / ft.a)
    if k < 1 or not ct.almost_equals(ft @ Affine.scale(k)):
        return None
    return k if (ch - 1) * k < fh <= ch * k and (cw - 1) * k < fw <= cw * k else None


def write_quicklook(
    dst: str | os.PathLike[str],
    *,
    classes: str | os.PathLike[str],
    image: str | os.PathLike[str] | None = None,
    bands: Sequence[int] = (1, 2, 3),
    class_names: Sequence[str] | None = None,
    colormap: Mapping[int, Sequence[int]] | None = None,
    max_size: int = 1024,
    alpha: float = 0.5,
    title: str | None = None,
    nodata: float | None = None,
    overwrite: bool = False,
) -> Path:
    """A downsampled PNG of a class map drawn semi-transparently over the imagery, with a legend.

    Args:
        dst: destination ``.png``.
        classes: a one-band class-map GeoTIFF (e.g. from :class:`COGWriter`); its nodata stays transparent. With
            ``image`` it lies on the image's grid, or on one of whole ``k`` x ``k`` blocks of its pixels from the
            same origin (a tile map: :func:`coarse_grid_factor`).
        image: the imagery it was predicted from (same grid); ``bands`` (1-based) are shown as RGB
            (one band as grey) with a 2-98 % stretch. Without it the classes are drawn on white.
        class_names: legend labels; default: the ``class_names`` tag of ``classes``, else ``class i``.
        colormap: class id -> RGB(A); default: the file's colour table, else :func:`default_colormap`.
        max_size: the longer side of the picture in pixels (reads use the COG overviews).
        alpha: opacity of the class colours.
        nodata: the imagery's nodata where the file declares none (e.g. a Landsat collar of 0 given as
            ``--nodata 0``): such pixels are shown white, not as black data.

    Raises:
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
        ValueError: if ``classes`` lies neither on ``image``'s pixel grid nor on one of whole blocks of them.
    """
    # a bare Figure renders with Agg without touching pyplot's global backend or figure registry
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    check_overwrite(dst, overwrite)
    image_grid = None
    if image is not None:
        with open_quietly(image) as img_src:
            image_grid = (img_src.height, img_src.width, img_src.transform)
    with open_quietly(classes) as cls_src:  # an image chip's map has no georeference, and needs none here
        grid = (cls_src.height, cls_src.width, cls_src.transform)
        factor = 1 if image_grid is None or grid == image_grid else coarse_grid_factor(image_grid, grid)
        if factor is None:
            raise ValueError(f"Quick-look image {str(image)!r} is not on the grid of class map {str(classes)!r} (nor is "
                             "the map on a grid of whole blocks of its pixels).")  # fmt: skip
        base_h, base_w = image_grid[:2] if image_grid is not None else grid[:2]
        shape = picture_shape(base_h, base_w, max_size)
        if factor == 1:
            labels = cls_src.read(1, out_shape=shape, resampling=rasterio.enums.Resampling.nearest)
        else:  # a tile map: each picture pixel takes the tile its centre falls in
            rows = np.minimum(((np.arange(shape[0]) + 0.5) * base_h / shape[0]).astype(np.int64) // factor, grid[0] - 1)
            cols = np.minimum(((np.arange(shape[1]) + 0.5) * base_w / shape[1]).astype(np.int64) // factor, grid[1] - 1)
            labels = cls_src.read(1)[np.ix_(rows, cols)]
        cls_nodata = cls_src.nodata
        if class_names is None:
            class_names = tagged_class_names(cls_src)
        if colormap is None:
            try:
                colormap = cls_src.colormap(1)
            except ValueError:  # no colour table in the file
                colormap = None
    labelled = np.ones(shape, dtype=bool) if cls_nodata is None else labels != cls_nodata
    present = sorted(int(v) for v in np.unique(labels[labelled]))
    num_classes = max([len(class_names or []), *(v + 1 for v in present)])
    colours = dict(default_colormap(num_classes))
    colours.update({int(k): tuple(v) for k, v in (colormap or {}).items()})

    background = np.ones((*shape, 3), dtype=np.float32)
    if image is not None:
        with open_quietly(image) as img_src:
            indexes = [b for b in bands if b <= img_src.count] or [1]
            pixels = img_src.read(indexes, out_shape=(len(indexes), *shape), resampling=rasterio.enums.Resampling.average)
            valid = img_src.read_masks(1, out_shape=shape) > 0
            if nodata is not None:  # an average over a pixel block that is all nodata is nodata too
                valid &= ~(pixels == nodata).all(axis=0)
        background = display_rgb(pixels, valid)

    overlay = np.zeros((*shape, 4), dtype=np.float32)
    for value in present:
        rgba = colours.get(value, (127, 127, 127, 255))
        overlay[labels == value] = (*(np.asarray(rgba[:3]) / 255.0), alpha)

    height_in = max(2.0, shape[0] / 100)
    fig = Figure(figsize=(shape[1] / 100 + 2.5, height_in), dpi=100)
    ax = fig.subplots()
    ax.imshow(background, interpolation="nearest")
    ax.imshow(overlay, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    handles = [
        Patch(facecolor=np.asarray(colours.get(v, (127, 127, 127))[:3]) / 255.0,
              label=class_names[v] if class_names is not None and v < len(class_names) else f"class {v}")
        for v in present
    ]  # fmt: skip
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
    return save_figure(fig, dst, overwrite=overwrite)


def geojson_polygons(features: Sequence[Mapping[str, Any]]) -> list[Any]:
    """Shapely polygons of GeoJSON-like polygon mappings (``rasterio.features.shapes``' output), built together:
    every ring's coordinates go to shapely at once, 3-4x faster than ``shapely.geometry.shape`` one by one, which
    dominated the polygonising of a map of many small regions (tree crowns)."""
    import shapely

    rings = [np.asarray(ring, np.float64) for feature in features for ring in feature["coordinates"]]
    if not rings:
        return []
    ring_index = np.repeat(np.arange(len(rings)), [len(ring) for ring in rings])
    polygon_index = np.repeat(np.arange(len(features)), [len(feature["coordinates"]) for feature in features])
    # with indices, each polygon's first ring is its shell and the others its holes, as in GeoJSON
    return list(shapely.polygons(shapely.linearrings(np.concatenate(rings), indices=ring_index), indices=polygon_index))


def region_polygons(src: Any, *, connectivity: int = 4, strip_rows: int | None = None) -> tuple[list[Any], list[int]]:
    """Polygons (in the raster's CRS) of the connected regions of each value of band 1, and their values.

    The raster is polygonised strip by strip of ``strip_rows`` rows (default: ~64 MiB of pixels, at least 256 rows)
    and the pieces of one region cut by a strip boundary are joined again: two pieces join when a pixel of the last
    row of one strip and the pixel below it, first row of the next, have the same value (which piece holds a pixel
    is found by its centre, through an R-tree of the strip's pieces). Regions that span many strips, or ring
    around a hole across strips, come out as the one polygon a whole-raster polygonisation gives. The pieces live
    in pixel coordinates (exact integers) until the end, then take the raster's transform. With ``connectivity=8``
    the raster is read whole: GDAL's 8-connected polygons touch themselves at corners, which overlay operations
    cannot join reliably.

    Returns:
        ``(polygons, values)``, nodata pixels (the file's nodata) left out.
    """
    import shapely
    from rasterio.features import shapes

    height, width = src.height, src.width
    if strip_rows is None:
        strip_rows = max(256, (64 << 20) // max(1, width * np.dtype(src.dtypes[0]).itemsize))
    if connectivity == 8 or height <= strip_rows:
        strip_rows = height
    pieces: list[Any] = []
    values: list[int] = []
    parent: list[int] = []

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    above: tuple[np.ndarray, np.ndarray] | None = None  # the last row of the previous strip and its pixels' pieces
    for row0 in range(0, height, strip_rows):
        rows = min(strip_rows, height - row0)
        labels = src.read(1, window=Window(0, row0, width, rows))
        valid = np.ones(labels.shape, dtype=bool) if src.nodata is None else labels != src.nodata
        first = len(pieces)
        regions = shapes(labels, mask=valid, connectivity=connectivity, transform=Affine.translation(0, row0))
        while found := list(itertools.islice(regions, 10_000)):  # GeoJSON mappings are bulky: a batch at a time
            pieces.extend(geojson_polygons([geojson for geojson, _ in found]))
            values.extend(int(value) for _, value in found)
            parent.extend(range(len(parent), len(parent) + len(found)))
        if first == len(pieces) or rows == height:  # no piece, or one strip: nothing to join
            above = None
            continue
        tree = shapely.STRtree(pieces[first:])

        def owners(row: int) -> np.ndarray:
            """The piece (index into ``pieces``) holding each pixel of strip row ``row``; -1 at nodata."""
            cols = np.flatnonzero(valid[row])
            owner = np.full(width, -1, dtype=np.int64)
            points = shapely.points(cols + 0.5, np.full(len(cols), row0 + row + 0.5))
            hit, piece = tree.query(points, predicate="within")
            owner[cols[hit]] = first + piece
            return owner

        if above is not None:
            last_labels, last_owner = above
            top_owner = owners(0)
            touching = (last_owner >= 0) & (top_owner >= 0) & (last_labels == labels[0])
            for a, b in set(zip(last_owner[touching].tolist(), top_owner[touching].tolist())):
                parent[root(a)] = root(b)
        above = (labels[-1].copy(), owners(rows - 1)) if row0 + rows < height else None

    groups: dict[int, list[int]] = {}
    for i in range(len(pieces)):
        groups.setdefault(root(i), []).append(i)
    polygons, ids = [], []
    for members in sorted(groups.values(), key=lambda m: m[0]):  # scan order of each region's first piece
        if len(members) == 1:
            polygons.append(pieces[members[0]])
        else:  # joined along the strip boundaries; tolerance 0 drops only the vertices the cuts left on straight edges
            polygons.append(shapely.simplify(shapely.union_all([pieces[m] for m in members]), 0.0))
        ids.append(values[members[0]])
    if not polygons:
        return [], []
    t = src.transform
    to_crs = lambda xy: np.column_stack([t.a * xy[:, 0] + t.b * xy[:, 1] + t.c, t.d * xy[:, 0] + t.e * xy[:, 1] + t.f])  # noqa: E731
    return list(shapely.transform(np.asarray(polygons, dtype=object), to_crs)), ids


#: Help of the commands' ``--simplify`` option (:func:`vectorize_classes`' ``simplify``).
SIMPLIFY_HELP = ("smooth the polygons' pixel staircases with this tolerance in CRS units (e.g. one pixel), all "
                 "polygons together so that neighbours keep one shared edge (default 0: pixel edges)")


#: vector formats written by suffix (:func:`write_vector`)
VECTOR_FORMATS = {".gpkg": "GPKG", ".geojson": "GeoJSON"}


def write_vector(frame: Any, dst: str | os.PathLike[str], *, layer: str, overwrite: bool = False) -> Path:
    """A ``GeoDataFrame`` written atomically as a GeoPackage (layer ``layer``) or GeoJSON, by ``dst``'s suffix
    (:data:`VECTOR_FORMATS`); an empty frame is written as a layer of polygons.

    Raises:
        ValueError: another suffix. FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    suffix = Path(dst).suffix.lower()
    if suffix not in VECTOR_FORMATS:
        raise ValueError(f"Vector outputs are written as {' or '.join(VECTOR_FORMATS)}, not {str(dst)!r}.")
    with atomic_output(dst, overwrite=overwrite) as tmp:
        frame.to_file(tmp, driver=VECTOR_FORMATS[suffix], geometry_type="Polygon" if frame.empty else None,
                      **({"layer": layer} if suffix == ".gpkg" else {}))  # fmt: skip
    return Path(dst)


#: what :func:`write_features` writes: the vector formats and a CSV table
FEATURE_SUFFIXES = (*VECTOR_FORMATS, ".csv")


def check_feature_suffix(dst: str | os.PathLike[str], what: str) -> None:
    """Raises ValueError unless ``dst`` is a GeoPackage, GeoJSON or CSV (``what``: "Points", for the message)."""
    if Path(dst).suffix.lower() not in FEATURE_SUFFIXES:
        raise ValueError(f"{what} are written as .gpkg, .geojson or .csv, not {os.fspath(dst)!r}.")


def write_features(frame: Any, dst: str | os.PathLike[str], *, layer: str, overwrite: bool = False) -> Path:
    """A ``GeoDataFrame`` written atomically by ``dst``'s suffix: a GeoPackage / GeoJSON (:func:`write_vector`), or a
    CSV table without the geometry, points keeping their place as ``lon``, ``lat`` (degrees) and, in a projected
    CRS, ``x``, ``y`` too.

    Raises:
        ValueError: another suffix. FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    check_feature_suffix(dst, "Features")
    if Path(dst).suffix.lower() != ".csv":
        return write_vector(frame, dst, layer=layer, overwrite=overwrite)
    geometry = frame.geometry
    table = frame.drop(columns=geometry.name)
    if len(frame) and (geometry.geom_type == "Point").all():
        if frame.crs is not None and not frame.crs.is_geographic:
            table = table.assign(x=geometry.x, y=geometry.y)
        degrees = frame.to_crs("EPSG:4326").geometry if frame.crs is not None else geometry
        table = table.assign(lon=degrees.x, lat=degrees.y)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        table.to_csv(tmp, index=False)
    return Path(dst)


def vectorize_classes(
    classes: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    class_names: Sequence[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    connectivity: int = 4,
    keep: Sequence[int] | None = None,
    strip_rows: int | None = None,
    layer: str = "classes",
    overwrite: bool = False,
) -> Any:
    """Polygons of the connected regions of each class of a class map, written to a GeoPackage.

    Each polygon carries ``class_id``, ``class_name`` and ``area`` (in squared CRS units); polygons with
    ``area < min_area`` are dropped, nodata pixels give no polygon. The class map is read in strips of rows
    (:func:`region_polygons`), so memory holds one strip and the polygons, not the raster.

    ``simplify`` > 0 smooths the pixel staircases away: the polygons are simplified together as one coverage
    (``shapely.coverage_simplify``, tolerance in CRS units, e.g. one pixel), so neighbours keep sharing exactly the
    same edge (no gaps or overlaps appear between classes, as simplifying each polygon alone would make), and
    the areas (and ``min_area``) are those of the simplified polygons.

    Returns:
        The written ``geopandas.GeoDataFrame`` (in the raster's CRS).

    Raises:
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
        ValueError: if ``connectivity`` is not 4 or 8, or ``min_area`` or ``simplify`` is negative.
    """
    import geopandas as gpd
    import shapely

    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}.")
    if min_area < 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}.")
    if simplify < 0:
        raise ValueError(f"simplify must be >= 0 (a tolerance in CRS units), got {simplify}.")
    check_overwrite(dst, overwrite)
    with rasterio.open(classes) as src:
        if class_names is None:
            class_names = tagged_class_names(src)
        crs = src.crs
        geometries, ids = region_polygons(src, connectivity=connectivity, strip_rows=strip_rows)
    if simplify > 0 and geometries:
        geometries = list(shapely.coverage_simplify(np.asarray(geometries, dtype=object), simplify))
    names = [class_names[i] if class_names is not None and 0 <= i < len(class_names) else str(i) for i in ids]
    frame = gpd.GeoDataFrame(
        {"class_id": np.asarray(ids, dtype=np.int64), "class_name": names},
        geometry=gpd.GeoSeries(geometries, crs=crs),
    )
    frame["area"] = frame.geometry.area
    kept = frame["area"] >= min_area
    if keep is not None:
        kept &= frame["class_id"].isin([int(k) for k in keep])
    frame = frame[kept].reset_index(drop=True)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        frame.to_file(tmp, driver="GPKG", layer=layer, geometry_type="Polygon" if frame.empty else None)
    return frame
