"""Sliding-window grids over a raster and the weights that blend overlapping windows.

A dense predictor sees a raster through square-ish windows of ``window`` pixels that overlap by
``overlap`` pixels, so consecutive windows start ``stride = window - overlap`` pixels apart. Along an
axis of ``length`` pixels the starts are ``0, stride, 2*stride, ...`` and the last start is moved
inward to ``length - window`` so that no window leaves the raster; the window count per axis is

    n = 1                                   if length <= window
    n = ceil((length - window) / stride) + 1 otherwise

and a raster of ``H x W`` pixels gets ``n(H) * n(W)`` windows. A raster smaller than a window along
an axis gets one window there, shrunk to ``length`` rounded up to ``multiple`` (the model's patch
size) — the few pixels past the raster edge are padding that the reader marks invalid and the
predictor crops away. So every window of one grid has the same size, and that size is always a
multiple of ``multiple``, whatever the raster size.

Overlapping predictions are blended with a separable raised-cosine ramp: inside ``overlap`` pixels of
a window edge the weight rises smoothly from almost 0 to 1, elsewhere it is 1. It never reaches 0,
so dividing the accumulated ``sum(weight * prediction)`` by the accumulated ``sum(weight)`` is
defined at every pixel — including the raster border, which only one window covers — and the
normalised weights of the windows covering a pixel sum to exactly 1 there. Seams vanish because a
window's unreliable border pixels get little weight wherever a neighbour covers them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def resolve_overlap(window: int, overlap: float | int) -> int:
    """Overlap in pixels from a fraction of the window (a float in [0, 1)) or a pixel count (an int).

    Raises:
        TypeError: if ``overlap`` is neither an int nor a float.
        ValueError: if the overlap is negative or not smaller than the window.
    """
    if isinstance(overlap, bool) or not isinstance(overlap, int | float):
        raise TypeError(f"overlap must be an int (pixels) or a float (fraction of the window), got {overlap!r}.")
    if isinstance(overlap, float):
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap as a fraction must be in [0, 1), got {overlap}.")
        pixels = int(round(window * overlap))
    else:
        pixels = overlap
    if not 0 <= pixels < window:
        raise ValueError(f"overlap must be in [0, window={window}) pixels, got {pixels}.")
    return pixels


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the windows along one axis of ``length`` pixels (the last one moved inward).

    ``length <= window`` gives ``[0]``: one window that the caller pads past the raster edge.
    """
    if length < 1 or window < 1 or stride < 1:
        raise ValueError(f"length, window and stride must be >= 1, got {length}, {window}, {stride}.")
    if length <= window:
        return [0]
    count = math.ceil((length - window) / stride) + 1
    starts = [i * stride for i in range(count - 1)]
    starts.append(length - window)
    return starts


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Tile:
    """One window of a grid: its position in the grid and its pixel offsets in the raster.

    ``height``/``width`` are the model input size (may extend past the raster for small rasters);
    ``valid_height``/``valid_width`` are the part inside the raster.
    """

    grid_row: int
    grid_col: int
    row_off: int
    col_off: int
    height: int
    width: int
    valid_height: int
    valid_width: int


@dataclass(frozen=True)
class TileGrid:
    """The sliding-window grid over an ``height x width`` raster (see the module docstring).

    Build it with :meth:`TileGrid.build`. ``row_starts``/``col_starts`` are the window offsets,
    ``tile_height``/``tile_width`` the (common) window size and ``overlap`` the nominal overlap in pixels.
    """

    height: int
    width: int
    tile_height: int
    tile_width: int
    overlap: int
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]

    @classmethod
    def build(cls, height: int, width: int, *, window: int, overlap: float | int, multiple: int = 16) -> TileGrid:
        """The grid of ``window``-pixel windows overlapping by ``overlap`` (pixels or a fraction).

        Raises:
            ValueError: if the raster is empty or ``window`` is not a positive multiple of ``multiple``.
        """
        if height < 1 or width < 1:
            raise ValueError(f"Cannot tile an empty raster of {height} x {width} pixels.")
        if multiple < 1 or window < multiple or window % multiple:
            raise ValueError(f"window must be a positive multiple of {multiple} pixels, got {window}.")
        overlap_px = resolve_overlap(window, overlap)
        stride = window - overlap_px
        tile_height = min(window, _round_up(height, multiple))
        tile_width = min(window, _round_up(width, multiple))
        return cls(
            height=height,
            width=width,
            tile_height=tile_height,
            tile_width=tile_width,
            overlap=overlap_px,
            row_starts=tuple(window_starts(height, window, stride)),
            col_starts=tuple(window_starts(width, window, stride)),
        )

    @property
    def shape(self) -> tuple[int, int]:
        """(windows down, windows across)."""
        return len(self.row_starts), len(self.col_starts)

    def __len__(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def tile(self, grid_row: int, grid_col: int) -> Tile:
        r, c = self.row_starts[grid_row], self.col_starts[grid_col]
        return Tile(
            grid_row=grid_row,
            grid_col=grid_col,
            row_off=r,
            col_off=c,
            height=self.tile_height,
            width=self.tile_width,
            valid_height=min(self.tile_height, self.height - r),
            valid_width=min(self.tile_width, self.width - c),
        )

    def __iter__(self) -> Iterator[Tile]:
        """Windows in row-major order (a whole row of windows, then the next row down)."""
        for i in range(len(self.row_starts)):
            for j in range(len(self.col_starts)):
                yield self.tile(i, j)

    def blend_weights(self) -> Tensor:
        """Blending weights (tile_height, tile_width) of every window of this grid."""
        return blend_weights(self.tile_height, self.tile_width, overlap=self.overlap)

    def row_cells(self) -> AxisCells:
        """How the window rows cut the raster's rows into cells (see :class:`AxisCells`)."""
        return AxisCells.build(self.row_starts, self.tile_height, self.height)

    def col_cells(self) -> AxisCells:
        """How the window columns cut the raster's columns into cells (see :class:`AxisCells`)."""
        return AxisCells.build(self.col_starts, self.tile_width, self.width)


@dataclass(frozen=True)
class AxisCells:
    """The window edges along one axis cut it into cells, each covered by a fixed set of windows.

    Cell ``k`` spans ``[cuts[k], cuts[k + 1])``; window ``i`` covers cells ``spans[i][0] <= k < spans[i][1]``
    and cell ``k`` is covered by ``coverage[k]`` windows. A 2-D cell is final — no later window adds to it —
    once ``coverage[row cell] * coverage[col cell]`` windows have been added, which is what lets a
    predictor write it out and free it while the rest of the raster is still being processed.
    """

    cuts: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]
    coverage: tuple[int, ...]

    @classmethod
    def build(cls, starts: tuple[int, ...], size: int, length: int) -> AxisCells:
        ends = [min(s + size, length) for s in starts]
        cuts = sorted({0, length, *starts, *ends})
        index = {cut: k for k, cut in enumerate(cuts)}
        spans = tuple((index[s], index[e]) for s, e in zip(starts, ends))
        coverage = [0] * (len(cuts) - 1)
        for first, stop in spans:
            for k in range(first, stop):
                coverage[k] += 1
        return cls(cuts=tuple(cuts), spans=spans, coverage=tuple(coverage))

    def __len__(self) -> int:
        return len(self.coverage)


def centre_pad(x: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int, int, int]]:
    """Zero-pad ``[..., H, W]`` to multiples of ``multiple`` (a ViT's patch), centred so that the model sees the
    window's content in the middle, an odd extra pixel going right / bottom.

    Returns:
        The padded tensor (``x`` itself when nothing is needed) and ``(left, right, top, bottom)``; crop back with
        ``y[..., top : top + H, left : left + W]``.
    """
    ph, pw = -x.shape[-2] % multiple, -x.shape[-1] % multiple
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return (F.pad(x, pad) if any(pad) else x), pad


def cosine_ramp(size: int, overlap: int, *, floor: float = 1e-3) -> Tensor:
    """1-D weights (size,): a raised cosine over ``overlap`` pixels at both ends, 1 in between.

    The ramp is sampled at pixel centres, ``w(d) = 0.5 - 0.5 * cos(pi * (d + 0.5) / overlap)`` for a
    pixel ``d`` pixels from the nearest end, so it is symmetric and strictly positive; ``floor``
    keeps it away from 0 so that division by accumulated weights stays well conditioned.
    """
    if size < 1 or overlap < 0:
        raise ValueError(f"cosine_ramp needs size >= 1 and overlap >= 0, got {size} and {overlap}.")
    weights = torch.ones(size, dtype=torch.float64)
    if overlap > 0:
        position = torch.arange(size, dtype=torch.float64)
        distance = torch.minimum(position, size - 1 - position)  # pixels to the nearest end
        ramp = 0.5 - 0.5 * torch.cos(math.pi * (distance + 0.5) / overlap)
        weights = torch.where(distance < overlap, ramp, weights)
    return weights.clamp_min(floor).to(torch.float32)


def blend_weights(height: int, width: int, *, overlap: int, floor: float = 1e-3) -> Tensor:
    """Separable blending weights (height, width): the outer product of two :func:`cosine_ramp`."""
    # [H, 1] * [1, W] -> [H, W]
    return cosine_ramp(height, overlap, floor=floor)[:, None] * cosine_ramp(width, overlap, floor=floor)[None, :]
