"""Windowed raster reads that always say which pixels are real.

Every read in dinov3_eo is a window: memory is flat in raster size. :func:`read_window` is the one
place that turns "a window of an open rasterio dataset" into ``(values, valid)``, so nodata rules
live here and nowhere else:

* a pixel outside the raster is invalid (the read is boundless; outside pixels are filled with the
  nodata value, or 0 when there is none);
* a pixel is invalid when **any** selected band equals the nodata value (the user's override when
  given, else the file's declared nodata) or is NaN — a partly-missing pixel would otherwise feed a
  sentinel such as -99999 into normalisation;
* with no nodata at all, a per-dataset mask or alpha band (e.g. a :class:`~rasterio.vrt.WarpedVRT`
  with ``add_alpha=True``) decides.

The archive index lives in :mod:`dinov3_eo.data.index`; it is re-exported here because the design
names ``raster.py`` as the home of "archive index + windowed reads".
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.transform import Affine
from rasterio.windows import Window

#: GDAL block-cache cap (MiB) of every reading process: random tiles of a big raster rarely revisit a block, and a
#: larger cache grows the memory with the raster (GDAL's default is 5 % of RAM per process, i.e. per worker).
GDAL_CACHE_MB = 64


class PerThread:
    """State made by ``factory()`` once per process and thread, e.g. open rasterio/GDAL handles.

    GDAL handles must not be shared between threads, and a forked DataLoader worker must not use its
    parent's (the forking thread's local comes along): :meth:`get` makes fresh state in each new thread
    and after a fork. Pickling keeps only the factory, so datasets holding one stay pickle-safe.

    ``close(value)``, when given, closes a state that is let go: by :meth:`release`, and at interpreter exit for
    the exiting thread's state. Without that, a dataset kept open by a long-lived object (a Lightning CLI's
    datamodule) was closed only in the interpreter's final teardown, where rasterio's ``__del__`` fails and
    Python prints a bare "Error in sys.excepthook".
    """

    def __init__(self, factory: Callable[[], Any], close: Callable[[Any], None] | None = None) -> None:
        self._factory, self._close = factory, close
        self._local = threading.local()
        _LIVE.add(self)

    def get(self) -> Any:
        """The calling thread's state, made on first use in this process and thread."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            local.value, local.pid = self._factory(), os.getpid()
        return local.value

    def release(self) -> None:
        """Let go of (and ``close``) the calling thread's state; the next :meth:`get` makes a fresh one."""
        local = self._local
        if getattr(local, "pid", None) != os.getpid():
            return  # none made in this thread (or only the parent's, before a fork: not ours to close)
        value = local.value
        del local.value, local.pid
        if self._close is not None:
            self._close(value)

    def __getstate__(self) -> dict[str, Any]:
        # open handles never travel (and a threading.local does not pickle)
        return {"_factory": self._factory, "_close": self._close}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._factory, self._close = state["_factory"], state.get("_close")
        self._local = threading.local()
        _LIVE.add(self)


#: every PerThread of this process, to release the exiting thread's states while the interpreter still works
_LIVE: weakref.WeakSet[PerThread] = weakref.WeakSet()


@atexit.register
def _release_at_exit() -> None:
    # Reading threads have ended by now (their states went with them); what is left is the main thread's.
    for per_thread in list(_LIVE):
        per_thread.release()


def _as_window(window: Window | tuple[tuple[int, int], tuple[int, int]]) -> Window:
    if isinstance(window, Window):
        return window
    try:
        (row_start, row_stop), (col_start, col_stop) = window
    except (TypeError, ValueError) as e:
        raise TypeError(f"read_window: window must be a rasterio Window or ((row_start, row_stop), (col_start, col_stop)), got {window!r}.") from e
    return Window.from_slices((row_start, row_stop), (col_start, col_stop))


def open_quietly(path: str | os.PathLike[str]) -> Any:
    """``rasterio.open`` without the warning rasterio raises for a file with no georeference: image chips and masks
    paired by name have none by design, and the commands that need one refuse it in one sentence of their own
    (:func:`require_georeferenced`). A file GDAL cannot open raises ``RasterioIOError`` naming it."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        try:
            return rasterio.open(os.fspath(path))
        except RasterioIOError as e:
            if os.fspath(path) in str(e):
                raise
            # GDAL's "Cannot open TIFF image" names no file: the sentence a user reads must
            raise RasterioIOError(f"{os.fspath(path)} cannot be read as a raster: {e}") from e


@contextlib.contextmanager
def open_raster(raster: Any) -> Iterator[Any]:
    """An open rasterio dataset for a path, an open dataset, or an ``xarray.DataArray`` (band, y, x) / (y, x).

    A DataArray is copied into an in-memory GeoTIFF keeping its dtype, CRS, transform and nodata (its rioxarray
    nodata, else its encoded nodata, else NaN for floating data), so it is read exactly as the same file would be.

    Raises:
        TypeError: for any other kind of input.
        ValueError: for a DataArray that is not 2-D or 3-D or has no CRS.
    """
    if isinstance(raster, (str, os.PathLike)):
        with open_quietly(raster) as src:  # a chip without georeference is refused later, in one sentence
            yield src
        return
    if hasattr(raster, "read") and hasattr(raster, "transform"):
        yield raster
        return
    try:
        import xarray as xr
    except ImportError:  # pragma: no cover - xarray is a dependency
        xr = None
    if xr is None or not isinstance(raster, xr.DataArray):
        raise TypeError(
            f"raster must be a GeoTIFF path, an open rasterio dataset or an xarray.DataArray, got {type(raster).__name__}."
        )
    import rioxarray  # noqa: F401 - registers the .rio accessor
    from rasterio.io import MemoryFile

    da = raster
    if da.ndim == 2:
        da = da.expand_dims("band")
    if da.ndim != 3:
        raise ValueError(f"A DataArray raster must be (band, y, x) or (y, x), got dims {raster.dims}.")
    if da.rio.crs is None:
        raise ValueError("The DataArray has no CRS, so its answers could not be placed on a map; set one first, e.g. "
                         "da.rio.write_crs('EPSG:32633').")
    band_dim = next(d for d in da.dims if d not in (da.rio.y_dim, da.rio.x_dim))
    da = da.transpose(band_dim, da.rio.y_dim, da.rio.x_dim)
    values = np.asarray(da.values)
    nodata = da.rio.nodata if da.rio.nodata is not None else da.rio.encoded_nodata
    if np.issubdtype(values.dtype, np.floating):
        if values.dtype == np.float64:
            values = values.astype(np.float32)
        if da.rio.nodata is None and (da.rio.encoded_nodata is not None or np.isnan(values).any()):
            nodata = float("nan")  # masked=True arrays carry their nodata as NaN
    profile = {
        "driver": "GTiff", "count": values.shape[0], "height": values.shape[1], "width": values.shape[2],
        "dtype": values.dtype.name, "crs": da.rio.crs, "transform": da.rio.transform(), "nodata": nodata,
    }  # fmt: skip
    with MemoryFile() as memfile:
        with memfile.open(**profile) as dst:
            dst.write(values)
        with memfile.open() as src:
            yield src


def block_windows(height: int, width: int, block: int) -> list[Window]:
    """The ``block`` x ``block`` windows (smaller at the right and bottom edges) that tile a ``height`` x ``width``
    raster, row by row: the blocks a whole-raster job reads one at a time, memory flat in the raster's size."""
    return [Window(col, row, min(block, width - col), min(block, height - row))
            for row in range(0, height, block) for col in range(0, width, block)]  # fmt: skip


def halo_window(window: Window, halo: int, height: int, width: int) -> Window:
    """``window`` grown by ``halo`` pixels on every side, clipped to a ``height`` x ``width`` raster: the read of a
    block whose computation looks that far past its edges (a search window, a buffer, a crown's flooding)."""
    row0, col0 = max(0, int(window.row_off) - halo), max(0, int(window.col_off) - halo)
    row1 = min(height, int(window.row_off + window.height) + halo)
    col1 = min(width, int(window.col_off + window.width) + halo)
    return Window(col0, row0, col1 - col0, row1 - row0)


def inner_slices(window: Window, outer: Window) -> tuple[slice, slice]:
    """The rows and columns of ``window`` within an array read at ``outer``, which holds it."""
    row, col = int(window.row_off - outer.row_off), int(window.col_off - outer.col_off)
    return slice(row, row + int(window.height)), slice(col, col + int(window.width))


def tile_boxes(transform: Affine, tile_size: int, rows: np.ndarray, cols: np.ndarray) -> Any:
    """Shapely polygons ``[N]`` of the ``tile_size``-px tiles at cells ``rows``, ``cols`` of a grid with the scene's
    ``transform`` (``tile_size=1``: the cells of a grid)."""
    import shapely

    rows, cols = np.asarray(rows), np.asarray(cols)
    x0, y0 = transform @ (cols * tile_size, rows * tile_size)
    x1, y1 = transform @ ((cols + 1) * tile_size, (rows + 1) * tile_size)
    return shapely.box(np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1))


def is_georeferenced(src) -> bool:
    """Whether an open dataset can be placed on a map: it has a CRS and a geotransform (not the identity that
    rasterio reports for a file without one)."""
    return src.crs is not None and not src.transform.is_identity


def metres_per_unit(crs) -> float | None:
    """Metres in one linear unit of a projected CRS (1 for metres, 0.3048 for feet), or ``None`` for a CRS in
    degrees, no CRS, or units GDAL cannot name (no size rather than a wrong one)."""
    if crs is None or not crs.is_projected:
        return None
    try:
        return float(crs.linear_units_factor[1])
    except Exception:
        return None


def pixel_area_ha(crs: Any, transform: Any) -> float | None:
    """One pixel's area in hectares on a projected grid (linear units converted), ``None`` for degrees or no CRS."""
    factor = metres_per_unit(crs)
    if factor is None:
        return None
    return abs(transform.a * transform.e - transform.b * transform.d) * factor**2 / 10_000


def pixel_size_m(crs, transform) -> float | None:
    """The pixel width in metres of a grid in a projected CRS (feet and other linear units converted), or ``None``
    where a CRS in degrees (or none) gives no such size."""
    factor = metres_per_unit(crs)
    return abs(float(transform.a)) * factor if factor is not None else None


def pixel_size_off_scale(src, trained_gsd: float | None) -> float | None:
    """``src``'s pixel size in metres where it differs from ``trained_gsd`` (the model's, metres) by more than a
    quarter, else ``None`` (also where either is unknown): a model that learnt fields at 10 m sees other things at
    0.5 m or 30 m, and its output would look confident all the same."""
    native = pixel_size_m(src.crs, src.transform)
    if trained_gsd and native and not 0.8 <= native / float(trained_gsd) <= 1.25:
        return native
    return None


def require_georeferenced(src) -> None:
    """Refuse a dataset that :func:`is_georeferenced` says cannot be placed on a map, before anything is computed.

    Raises:
        ValueError: naming the file and how to georeference it.
    """
    if not is_georeferenced(src):
        raise ValueError(
            f"{src.name} is not georeferenced (no CRS or no geotransform), so its outputs could not be placed on a "
            "map; give it both first (gdal_edit.py -a_srs EPSG:32633 -a_ullr ulx uly lrx lry), or warp a file located "
            "by ground control points or RPCs onto a grid (gdalwarp)."
        )


def tagged_class_names(src, band: int = 1) -> list[str] | None:
    """The class names a class raster carries in its ``class_names`` tag (a JSON list, as this package writes it;
    the band's tag, else the dataset's), or ``None`` without one. A tag that is not a JSON list is ignored, with a
    warning naming the file, rather than stopping a command on someone else's tag."""
    import json
    import logging

    text = src.tags(band).get("class_names") or src.tags().get("class_names")
    if not text:
        return None
    try:
        names = json.loads(text)
    except ValueError:
        names = None
    if not isinstance(names, list):
        logging.getLogger(__name__).warning(
            "%s: its class_names tag is not a JSON list of names (%.60s); the classes stay unnamed.", src.name, text)
        return None
    return [str(name) for name in names]


def _data_band_count(src) -> int:
    """Bands that hold data, i.e. excluding a trailing alpha band."""
    count = src.count
    if count > 1 and src.colorinterp[count - 1] == ColorInterp.alpha:
        count -= 1
    return count


def _check_bands(src, bands: Sequence[int] | None) -> list[int]:
    n = _data_band_count(src)
    if bands is None:
        return list(range(1, n + 1))
    indexes = [int(b) for b in bands]
    bad = [b for b in indexes if not 1 <= b <= n]
    if not indexes or bad:
        raise IndexError(f"read_window: band indexes are 1-based and must lie in [1, {n}] for {src.name}, got {list(bands)}.")
    return indexes


def _valid_into(values: np.ndarray, nodata: float | None, out: np.ndarray) -> np.ndarray:
    """(C, h, w) values -> ``out`` (h, w) bool, False where any band is nodata or NaN.

    Band by band into one reused scratch plane: no (C, h, w) temporary, which mattered at thousands
    of tiles per second.
    """
    check_nan = np.issubdtype(values.dtype, np.floating)
    check_nodata = nodata is not None and not math.isnan(nodata) and _representable(nodata, values.dtype)
    out.fill(True)
    if not (check_nan or check_nodata):
        return out
    scratch = np.empty(values.shape[1:], dtype=bool)
    for band in values:
        if check_nan:
            np.equal(band, band, out=scratch)  # NaN is the only value unequal to itself
            out &= scratch
        if check_nodata:
            np.not_equal(band, values.dtype.type(nodata), out=scratch)
            out &= scratch
    return out


def _representable(value: float, dtype: np.dtype) -> bool:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return float(value).is_integer() and info.min <= value <= info.max
    return True


def _uses_dataset_mask(src, indexes: list[int]) -> bool:
    flags = src.mask_flag_enums[indexes[0] - 1]
    return MaskFlags.per_dataset in flags or MaskFlags.alpha in flags


def read_window(
    src,
    window: Window | tuple[tuple[int, int], tuple[int, int]],
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    out_shape: tuple[int, int] | None = None,
    resampling: Resampling = Resampling.nearest,
    out: np.ndarray | None = None,
    valid_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``window`` of an open rasterio dataset with a validity mask.

    Args:
        src: an open ``rasterio`` dataset (a file or a ``WarpedVRT``).
        window: the pixel window to read; it may extend past the raster (boundless read).
        bands: 1-based band indexes to read, in output order (default: every data band).
        nodata: nodata value overriding the file's declared one (e.g. ``0`` for a Landsat L1 collar).
        out_shape: ``(h, w)`` of the output when it differs from the window size (resampled read).
        resampling: resampling used when ``out_shape`` differs from the window size.
        out: optional C-contiguous (C, h, w) array of the file's dtype to read into (e.g. a reused buffer);
            it is returned as ``values``.
        valid_out: optional C-contiguous (h, w) bool array to write the validity into; returned as ``valid``.

    Returns:
        ``values`` of shape (C, h, w) in the file's dtype, and ``valid`` of shape (h, w), bool.

    Raises:
        IndexError: if a band index is outside ``[1, count]``.
        ValueError: if the window or ``out_shape`` is empty, or ``out``/``valid_out`` have the wrong shape or dtype.
        RasterioIOError: if GDAL cannot decode the window (a corrupt or truncated file), naming file and window.
    """
    window = _as_window(window)
    indexes = _check_bands(src, bands)
    if window.width <= 0 or window.height <= 0:
        raise ValueError(f"read_window: the window must be non-empty, got {window!r} for {src.name}.")
    if out_shape is None:
        out_h, out_w = int(round(window.height)), int(round(window.width))
    else:
        out_h, out_w = (int(v) for v in out_shape)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(f"read_window: out_shape must be positive, got {out_shape!r}.")

    declared = src.nodata if nodata is None else nodata
    dtype = np.dtype(src.dtypes[indexes[0] - 1])
    values = _output(out, (len(indexes), out_h, out_w), dtype, "out")
    inside = _output(valid_out, (out_h, out_w), np.dtype(bool), "valid_out")
    use_mask = declared is None and _uses_dataset_mask(src, indexes)

    row0, col0 = max(window.row_off, 0), max(window.col_off, 0)
    row1 = min(window.row_off + window.height, src.height)
    col1 = min(window.col_off + window.width, src.width)
    if (row0, col0, row1, col1) == (window.row_off, window.col_off, window.row_off + window.height, window.col_off + window.width):
        # The usual case, a window inside the raster: one read straight into the output, no fill or paste.
        _decode(src.read, src, window, indexes, out=values, resampling=resampling)
        _valid_into(values, declared, inside)
        if use_mask:
            mask = _decode(src.read_masks, src, window, indexes[0], out_shape=(out_h, out_w), resampling=Resampling.nearest)
            inside &= mask > 0
        return values, inside

    fill = declared if declared is not None and _representable(declared, dtype) else 0
    values.fill(fill)
    inside.fill(False)
    # Read only the part of the window that overlaps the raster and paste it in place: cheaper than
    # rasterio's boundless read, which builds a VRT per call.
    if row1 > row0 and col1 > col0:
        scale_y, scale_x = out_h / window.height, out_w / window.width
        dst_r0 = int(round((row0 - window.row_off) * scale_y))
        dst_c0 = int(round((col0 - window.col_off) * scale_x))
        dst_r1 = int(round((row1 - window.row_off) * scale_y))
        dst_c1 = int(round((col1 - window.col_off) * scale_x))
        if dst_r1 > dst_r0 and dst_c1 > dst_c0:
            inner = Window(col0, row0, col1 - col0, row1 - row0)
            shape = (dst_r1 - dst_r0, dst_c1 - dst_c0)
            part = _decode(src.read, src, inner, indexes, out_shape=(len(indexes), *shape), resampling=resampling)
            values[:, dst_r0:dst_r1, dst_c0:dst_c1] = part
            part_valid = _valid_into(part, declared, np.empty(shape, dtype=bool))
            if use_mask:
                mask = _decode(src.read_masks, src, inner, indexes[0], out_shape=shape, resampling=Resampling.nearest)
                part_valid &= mask > 0
            inside[dst_r0:dst_r1, dst_c0:dst_c1] = part_valid
    return values, inside


def _decode(read: Callable[..., np.ndarray], src, window: Window, *args: Any, **kwargs: Any) -> np.ndarray:
    """``read(*args, window=window, **kwargs)`` (``src.read`` or ``src.read_masks``), naming the file and the
    window when GDAL cannot decode them, where GDAL says only "Read failed"."""
    try:
        return read(*args, window=window, **kwargs)
    except RasterioIOError as e:
        cause = e.__cause__ or e.__context__ or e
        raise RasterioIOError(
            f"Could not decode rows {int(window.row_off)}-{int(window.row_off + window.height)}, columns "
            f"{int(window.col_off)}-{int(window.col_off + window.width)} of {src.name}: the file is corrupt or "
            f"truncated ({cause})."
        ) from e


def _output(buffer: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype, name: str) -> np.ndarray:
    """``buffer`` checked against the expected shape/dtype, or a fresh uninitialised array."""
    if buffer is None:
        return np.empty(shape, dtype=dtype)
    if buffer.shape != shape or buffer.dtype != dtype or not buffer.flags.c_contiguous:
        raise ValueError(
            f"read_window: {name} must be a C-contiguous {dtype} array of shape {shape}, "
            f"got {buffer.dtype} {buffer.shape} (contiguous={buffer.flags.c_contiguous})."
        )
    return buffer


def __getattr__(name: str):
    # Lazy re-export (see module docstring) without an import cycle at module load.
    if name in {"RasterIndex", "RasterRecord"}:
        from dinov3_eo.data import index

        return getattr(index, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
