"""Bands of several rasters read as one, on the grid of the first: two dates of a place, or a stack of sensors.

:class:`RasterStack` opens each raster, warps every one whose grid differs from the first's onto it through a
``WarpedVRT`` (per window, never the whole file), and answers ``read(indexes, window=...)`` like a rasterio dataset
whose bands are the members' bands one after the other. Each member keeps its own nodata: a read returns float32
values with NaN wherever the member it came from has no valid pixel (its nodata, its mask, or outside its
footprint), so :func:`~dinov3_eo.data.raster.read_window` and everything built on it (``predict_raster`` first)
treat the stack as any other raster.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from dinov3_eo.data.raster import _data_band_count, read_window, require_georeferenced


def _open(path: str | os.PathLike[str], name: str) -> Any:
    """``rasterio.open(path)``, a missing local file or an unreadable one named in one sentence."""
    try:
        return rasterio.open(path)
    except RasterioIOError as e:
        if not Path(path).exists():
            raise FileNotFoundError(f"Input {name!r} does not exist.") from e
        raise RasterioIOError(f"Input {name!r} cannot be read as a raster: {e}") from e


def _same_grid(a: Any, b: Any) -> bool:
    return a.crs == b.crs and a.transform.almost_equals(b.transform) and (a.width, a.height) == (b.width, b.height)


def _overlaps(a: Any, b: Any) -> bool:
    """Whether the footprints of two georeferenced datasets intersect (b's bounds taken into a's CRS)."""
    left, bottom, right, top = transform_bounds(b.crs, a.crs, *b.bounds, densify_pts=21)
    return left < a.bounds.right and right > a.bounds.left and bottom < a.bounds.top and top > a.bounds.bottom


class RasterStack:
    """The data bands of ``rasters`` as one read-only raster on the grid (CRS, transform, size) of the first.

    Args:
        rasters: GeoTIFF paths (or anything ``rasterio.open`` takes); the first gives the grid.
        nodata: per raster (or one for all) nodata overriding the file's; ``None`` keeps the file's.
        resampling: how rasters on another grid are warped onto the first's (bilinear by default: imagery).
        names: what to call the members in messages (default: their paths).
        common_mask: a pixel invalid in any member is invalid (NaN) in every band, so that each member is seen
            through the same valid pixels (two dates compared only where both saw the ground).

    Reads return float32 values, NaN where the member of that band (with ``common_mask``: any member) has no valid
    pixel; ``nodata`` is ``None``.
    Use it as a context manager, or :meth:`close` it.

    Raises:
        FileNotFoundError: if a raster does not exist; RasterioIOError: if one cannot be read as a raster.
        ValueError: if a raster is not georeferenced or does not overlap the first one.
    """

    def __init__(
        self,
        rasters: Sequence[str | os.PathLike[str]],
        *,
        nodata: float | None | Sequence[float | None] = None,
        resampling: Resampling = Resampling.bilinear,
        names: Sequence[str] | None = None,
        common_mask: bool = False,
    ) -> None:
        if not rasters:
            raise ValueError("RasterStack needs at least one raster.")
        overrides = list(nodata) if isinstance(nodata, Sequence) else [nodata] * len(rasters)
        if len(overrides) != len(rasters):
            raise ValueError(f"RasterStack: {len(overrides)} nodata values for {len(rasters)} rasters.")
        self.names = [str(n) for n in names] if names is not None else [os.fspath(r) for r in rasters]
        self.common_mask = bool(common_mask)
        self._stack = contextlib.ExitStack()
        #: the opened files, in order (not the warped views): their tags, dtypes and band counts as written
        self.sources: list[Any] = []
        self._members: list[Any] = []
        self._nodata: list[float | None] = []
        self._bands: list[tuple[int, int]] = []  # stack band (0-based) -> (member, member band 1-based)
        try:
            first = None
            for i, (path, override) in enumerate(zip(rasters, overrides)):
                src = self._stack.enter_context(_open(path, self.names[i]))
                self.sources.append(src)
                require_georeferenced(src)
                member_nodata = override if override is not None else src.nodata
                if first is None:
                    first, member = src, src
                elif _same_grid(src, first):
                    member = src
                else:
                    if not _overlaps(first, src):
                        raise ValueError(f"{self.names[i]} does not overlap {self.names[0]}: their footprints (in "
                                         f"{first.crs.to_string() or 'the first CRS'}) do not intersect.")  # fmt: skip
                    member = self._stack.enter_context(WarpedVRT(
                        src, crs=first.crs, transform=first.transform, width=first.width, height=first.height,
                        resampling=resampling, src_nodata=member_nodata, nodata=member_nodata,
                        add_alpha=member_nodata is None,
                    ))  # fmt: skip
                self._members.append(member)
                self._nodata.append(member_nodata)
                self._bands += [(i, b) for b in range(1, _data_band_count(src) + 1)]
        except BaseException:
            self._stack.close()
            raise
        self._first = first
        self.counts = [sum(1 for m, _ in self._bands if m == i) for i in range(len(self._members))]

    # -- the dataset attributes read_window and predict_raster use --------------------------------------------
    @property
    def name(self) -> str:
        return " + ".join(self.names)

    @property
    def count(self) -> int:
        return len(self._bands)

    @property
    def dtypes(self) -> tuple[str, ...]:
        return ("float32",) * self.count

    @property
    def nodata(self) -> None:
        return None

    @property
    def colorinterp(self) -> tuple[ColorInterp, ...]:
        return (ColorInterp.undefined,) * self.count

    @property
    def mask_flag_enums(self) -> tuple[list[MaskFlags], ...]:
        return ([MaskFlags.nodata],) * self.count  # validity travels as NaN

    @property
    def crs(self) -> Any:
        return self._first.crs

    @property
    def transform(self) -> Any:
        return self._first.transform

    @property
    def width(self) -> int:
        return self._first.width

    @property
    def height(self) -> int:
        return self._first.height

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    @property
    def bounds(self) -> Any:
        return self._first.bounds

    @property
    def res(self) -> tuple[float, float]:
        return self._first.res

    def window_transform(self, window: Window) -> Any:
        return self._first.window_transform(window)

    def index(self, x: float, y: float) -> tuple[int, int]:
        return self._first.index(x, y)

    def read(
        self,
        indexes: int | Sequence[int] | None = None,
        *,
        window: Window | None = None,
        out: np.ndarray | None = None,
        out_shape: tuple[int, ...] | None = None,
        resampling: Resampling = Resampling.nearest,
        **_: Any,
    ) -> np.ndarray:
        """``(C, h, w)`` float32 of the stack bands ``indexes`` (1-based; an int gives ``(h, w)``), NaN where invalid.

        ``window`` may extend past the grid (outside is NaN); ``out_shape`` resamples as rasterio's ``read`` does.
        """
        single = isinstance(indexes, int)
        wanted = [indexes] if single else list(indexes) if indexes is not None else list(range(1, self.count + 1))
        bad = [b for b in wanted if not 1 <= b <= self.count]
        if bad:
            raise IndexError(f"Band indexes {bad} are outside 1..{self.count} of {self.name}.")
        window = window if window is not None else Window(0, 0, self.width, self.height)
        h, w = (int(out_shape[-2]), int(out_shape[-1])) if out_shape is not None else (int(window.height), int(window.width))
        if out is None:
            values = np.empty((len(wanted), h, w), dtype=np.float32)
        else:
            values = out[None] if out.ndim == 2 else out
        asked = {self._bands[b - 1][0] for b in wanted}
        members = range(len(self._members)) if self.common_mask else sorted(asked)
        common = np.ones((h, w), dtype=bool)
        for member in members:  # one read per member, of just the bands asked of it (all of them for its mask)
            rows = [k for k, b in enumerate(wanted) if self._bands[b - 1][0] == member]
            member_bands = [self._bands[wanted[k] - 1][1] for k in rows] if rows else None
            data, valid = read_window(
                self._members[member], window, bands=member_bands, nodata=self._nodata[member],
                out_shape=(h, w), resampling=resampling,
            )  # fmt: skip
            if self.common_mask:
                common &= valid
            for row, band in zip(rows, data):
                values[row] = band
                if not self.common_mask:
                    values[row][~valid] = np.nan
        if self.common_mask:
            values[:, ~common] = np.nan
        return values[0] if single else values

    def read_masks(self, indexes: int = 1, *, window: Window | None = None, out_shape: tuple[int, ...] | None = None,
                   **_: Any) -> np.ndarray:  # fmt: skip
        """255 where band ``indexes`` is valid, else 0 (rasterio's convention)."""
        data = self.read(indexes, window=window, out_shape=out_shape)
        return np.where(np.isnan(data), 0, 255).astype(np.uint8)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["RasterStack"]
