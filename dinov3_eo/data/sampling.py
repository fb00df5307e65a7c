"""Where to read: tile grids and tile samplers over a :class:`~dinov3_eo.data.index.RasterIndex`.

The sampler decides *where*, the dataset decides *how to read*. A :class:`TileGrid` fixes, for every
file, the pixel grid tiles live on: the file's own grid, or — when a target GSD and/or CRS is given —
a warped grid read through a ``WarpedVRT`` (resampled per window, never a whole-file read). A
:class:`Tile` is a square window ``(file, row, col, size)`` on that grid, integer-snapped, hashable
and cheap to pickle to DataLoader workers.

Samplers are deterministic for ``(seed, epoch)`` and distributed-aware: every rank builds the same
global list of distinct tiles and takes its own share, so no tile is read twice across ranks. The
rank and world size come from ``torch.distributed`` when it is initialised and can be overridden.
They subclass ``torch.utils.data.DistributedSampler`` only so that Lightning recognises them as
already distributed and does not wrap them a second time; none of its logic is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.transform import Affine
from rasterio.warp import calculate_default_transform, transform_bounds
from rasterio.windows import Window, from_bounds
from torch.utils.data import DistributedSampler

from dinov3_eo.data.index import RasterIndex, RasterRecord

UNITS = ("pixels", "metres")


@dataclass(frozen=True, order=True)
class Tile:
    """A ``size`` × ``size`` window whose top-left pixel is ``(row, col)`` on file ``file``'s grid."""

    file: int
    row: int
    col: int
    size: int

    @property
    def window(self) -> Window:
        return Window(self.col, self.row, self.size, self.size)


@dataclass(frozen=True)
class FileGrid:
    """The pixel grid tiles of one file are cut from; ``warped`` means it differs from the file's own."""

    crs: CRS
    transform: Affine
    width: int
    height: int
    warped: bool


def distributed_rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: the overrides when given, else torch.distributed's, else ``(0, 1)``.

    Raises:
        ValueError: if ``rank`` is not in ``[0, world_size)``.
    """
    initialised = dist.is_available() and dist.is_initialized()
    world = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    r = rank if rank is not None else (dist.get_rank() if initialised else 0)
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"Sampler: rank must lie in [0, world_size), got rank={r}, world_size={world}.")
    return r, world


class TileGrid:
    """Per-file tile grids and the tile size in grid pixels.

    Args:
        index: the archive.
        tile_size: tile side, in ``units``.
        units: ``"pixels"`` (of the sampling grid) or ``"metres"``.
        gsd: target ground sampling distance in CRS units per pixel; files are resampled to it on the fly.
        crs: target CRS (e.g. ``"EPSG:3857"``); files in other CRSs are warped to it on the fly.
        resampling: resampling for warped grids (``"bilinear"``, ``"nearest"``, ...).

    Raises:
        ValueError: for unknown ``units``/``resampling``, a non-positive size, metres on a geographic
            CRS, or metres without ``gsd`` on an archive with mixed resolutions.
    """

    def __init__(
        self,
        *,
        index: RasterIndex,
        tile_size: float,
        units: str = "pixels",
        gsd: float | None = None,
        crs: str | None = None,
        resampling: str = "bilinear",
    ) -> None:
        if units not in UNITS:
            raise ValueError(f"TileGrid: units must be one of {UNITS}, got {units!r}.")
        if tile_size <= 0 or (gsd is not None and gsd <= 0):
            raise ValueError(f"TileGrid: tile_size and gsd must be positive, got tile_size={tile_size}, gsd={gsd}.")
        if resampling not in Resampling.__members__:
            raise ValueError(f"TileGrid: unknown resampling {resampling!r}; choose one of {sorted(Resampling.__members__)}.")
        self.index = index
        self.units, self.gsd, self.target_crs = units, gsd, None if crs is None else CRS.from_user_input(crs)
        self.resampling = Resampling[resampling]
        self._thumbs: dict[tuple[int, float | None], np.ndarray] = {}
        self.grids = [self._file_grid(rec) for rec in index.records]
        self.tile_px = self._tile_pixels(tile_size)

    def _file_grid(self, rec: RasterRecord) -> FileGrid:
        src_crs = rec.crs
        dst_crs = self.target_crs or src_crs
        native_res = rec.res
        if dst_crs == src_crs and (self.gsd is None or np.allclose(native_res, (self.gsd, self.gsd))):
            return FileGrid(src_crs, rec.affine, rec.width, rec.height, warped=False)
        # Only metadata is computed here; pixels are warped per window by the dataset's WarpedVRT.
        transform, width, height = calculate_default_transform(
            src_crs, dst_crs, rec.width, rec.height, *rec.bounds, resolution=self.gsd
        )
        return FileGrid(dst_crs, transform, int(width), int(height), warped=True)

    def _tile_pixels(self, tile_size: float) -> int:
        if self.units == "pixels":
            return int(round(tile_size))
        if any(g.crs.is_geographic for g in self.grids):
            raise ValueError("TileGrid: tile sizes in metres need a projected CRS; pass crs= (e.g. a UTM zone).")
        res = {round(abs(g.transform.a), 9) for g in self.grids}
        if self.gsd is None and len(res) > 1:
            raise ValueError(f"TileGrid: files have different resolutions {sorted(res)}; pass gsd= to tile in metres.")
        return max(1, int(round(tile_size / (self.gsd or res.pop()))))

    def __len__(self) -> int:
        return len(self.grids)

    def tile_transform(self, tile: Tile) -> Affine:
        """Affine transform of the tile's pixels (the grid's transform shifted to the tile)."""
        return self.grids[tile.file].transform @ Affine.translation(tile.col, tile.row)

    def tile_bounds(self, tile: Tile) -> BoundingBox:
        """(left, bottom, right, top) of the tile in the grid's CRS."""
        t = self.tile_transform(tile)
        left, top = t @ (0, 0)
        right, bottom = t @ (tile.size, tile.size)
        return BoundingBox(min(left, right), min(bottom, top), max(left, right), max(bottom, top))

    def native_window(self, tile: Tile) -> Window:
        """The tile as a (fractional) window of the file's own pixels."""
        grid = self.grids[tile.file]
        if not grid.warped:
            return tile.window
        rec = self.index.records[tile.file]
        bounds = transform_bounds(grid.crs, rec.crs, *self.tile_bounds(tile))
        return from_bounds(*bounds, transform=rec.affine)

    def valid_fraction(self, tile: Tile, nodata: float | None) -> float:
        """Estimated valid fraction of ``tile`` from the index's coarse thumbnail (no pixel read)."""
        rec = self.index.records[tile.file]
        valid = self._valid_thumbnail(tile.file, nodata)
        th, tw = valid.shape
        w = self.native_window(tile)
        sy, sx = th / rec.height, tw / rec.width
        r0, r1 = math.floor(w.row_off * sy), math.ceil((w.row_off + w.height) * sy)
        c0, c1 = math.floor(w.col_off * sx), math.ceil((w.col_off + w.width) * sx)
        total = max(1, (r1 - r0) * (c1 - c0))
        inside = valid[max(r0, 0) : max(min(r1, th), 0), max(c0, 0) : max(min(c1, tw), 0)]
        return float(inside.sum()) / total

    def file_valid_fraction(self, file: int, nodata: float | None) -> float:
        return float(self._valid_thumbnail(file, nodata).mean())

    def _valid_thumbnail(self, file: int, nodata: float | None) -> np.ndarray:
        key = (file, nodata)
        if key not in self._thumbs:
            rec = self.index.records[file]
            self._thumbs[key] = rec.valid_thumbnail(nodata if nodata is not None else rec.nodata)
        return self._thumbs[key]

    def max_offsets(self, file: int) -> tuple[int, int]:
        """Largest top-left (row, col) keeping the tile inside the grid (0 when the file is smaller)."""
        g = self.grids[file]
        return max(0, g.height - self.tile_px), max(0, g.width - self.tile_px)


class _TileSamplerBase(DistributedSampler):
    """Shared epoch/rank bookkeeping; see the module docstring for why this is a DistributedSampler."""

    def __init__(self, *, seed: int, rank: int | None, world_size: int | None) -> None:  # noqa: D107
        # DistributedSampler.__init__ is deliberately not called: it needs a dataset and an initialised group.
        self.seed = int(seed)
        self.epoch = 0
        self.rank, self.num_replicas = distributed_rank_world(rank, world_size)
        self.shuffle, self.drop_last = True, False

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose tiles :meth:`__iter__` yields (Lightning calls this every epoch)."""
        self.epoch = int(epoch)

    def global_tiles(self) -> list:
        """Every rank's tiles for the current epoch, in the order ranks take them round-robin."""
        raise NotImplementedError

    def skip_next(self, n: int) -> None:
        """Leave out this rank's first ``n`` items in the next :meth:`__iter__` only.

        Lightning restarts a dataloader from the beginning when a run resumes mid-epoch; skipping the items the
        interrupted run already consumed makes the resumed run see exactly the tiles the uninterrupted one saw.
        """
        self._skip = int(n)

    def _after_skip(self, items: list) -> Iterator:
        skip, self._skip = getattr(self, "_skip", 0), 0
        return iter(items[skip:])

    def __iter__(self) -> Iterator:
        return self._after_skip(self.global_tiles()[self.rank :: self.num_replicas])


class RandomTileSampler(_TileSamplerBase):
    """Random distinct tiles, weighted by valid area, rejecting mostly-nodata tiles.

    A file is drawn with probability proportional to its valid pixel count on the sampling grid (from
    the index thumbnail), then a pixel-snapped top-left uniformly inside it; the tile is rejected when
    its estimated nodata fraction exceeds ``max_nodata_fraction``. All ranks generate the same global
    list of ``length`` distinct tiles (rounded up to a multiple of the world size) and take every
    ``world_size``-th one, so each rank gets the same count and no tile twice.

    Args:
        grid: the tile grid.
        length: tiles per epoch over all ranks.
        nodata: nodata override used to judge validity (default: each file's declared nodata).
        max_nodata_fraction: reject tiles with a larger estimated nodata fraction.
        snap: top-left offsets are multiples of ``snap`` grid pixels. Setting it to the files' block size
            (256 for most COGs) when the tile size is a multiple of it makes every tile decode exactly its
            own blocks instead of up to four partial neighbours — the positional variety lost is what
            pre-chipped datasets lose too, and random crops downstream restore it.
        seed: base seed; the epoch is mixed in (see :meth:`set_epoch`).
        rank, world_size: overrides of the torch.distributed values.

    Raises:
        ValueError: if ``length`` < 1, the fraction is outside [0, 1], or no file has valid pixels.
        RuntimeError: if ``length`` distinct acceptable tiles cannot be found.
    """

    def __init__(
        self,
        *,
        grid: TileGrid,
        length: int,
        nodata: float | None = None,
        max_nodata_fraction: float = 0.5,
        snap: int = 1,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if snap < 1:
            raise ValueError(f"RandomTileSampler: snap must be >= 1, got {snap}.")
        self.snap = int(snap)
        if length < 1:
            raise ValueError(f"RandomTileSampler: length must be >= 1, got {length}.")
        if not 0.0 <= max_nodata_fraction <= 1.0:
            raise ValueError(f"RandomTileSampler: max_nodata_fraction must lie in [0, 1], got {max_nodata_fraction}.")
        self.grid, self.nodata, self.max_nodata_fraction = grid, nodata, float(max_nodata_fraction)
        self.per_rank = math.ceil(length / self.num_replicas)
        sizes = np.array([g.width * g.height for g in grid.grids], dtype=np.float64)
        valid = np.array([grid.file_valid_fraction(i, nodata) for i in range(len(grid))])
        weights = sizes * valid
        if weights.sum() <= 0:
            raise ValueError("RandomTileSampler: no file has valid pixels for the given nodata value.")
        self.weights = weights / weights.sum()

    def __len__(self) -> int:
        return self.per_rank

    def global_tiles(self) -> list[Tile]:
        rng = np.random.default_rng([self.seed, self.epoch])
        wanted = self.per_rank * self.num_replicas
        chosen: dict[Tile, None] = {}  # insertion-ordered set
        attempts, budget = 0, 50 * wanted + 1000
        while len(chosen) < wanted and attempts < budget:
            batch = max(64, 2 * (wanted - len(chosen)))
            files = rng.choice(len(self.weights), size=batch, p=self.weights)
            u = rng.random((batch, 2))
            for f, (ur, uc) in zip(files.tolist(), u.tolist()):
                attempts += 1
                max_r, max_c = self.grid.max_offsets(f)
                k = self.snap
                tile = Tile(f, k * int(ur * (max_r // k + 1)), k * int(uc * (max_c // k + 1)), self.grid.tile_px)
                if tile in chosen:
                    continue
                if 1.0 - self.grid.valid_fraction(tile, self.nodata) > self.max_nodata_fraction:
                    continue
                chosen[tile] = None
                if len(chosen) == wanted:
                    break
        if len(chosen) < wanted:
            raise RuntimeError(
                f"RandomTileSampler: found only {len(chosen)} of {wanted} distinct tiles with nodata fraction <= "
                f"{self.max_nodata_fraction} after {attempts} draws; lower length or tile size, or raise max_nodata_fraction."
            )
        return list(chosen)


class _FixedTilesSampler(_TileSamplerBase):
    """A sampler over a fixed list ``self.tiles``, optionally shuffled per (seed, epoch)."""

    tiles: list[Tile]

    def __len__(self) -> int:
        return len(range(self.rank, len(self.tiles), self.num_replicas))

    def global_tiles(self) -> list[Tile]:
        if not self.shuffle:
            return list(self.tiles)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.tiles))
        return [self.tiles[i] for i in order]


class GridTileSampler(_FixedTilesSampler):
    """Every tile of a regular grid with ``stride``, in file/row/column order (for evaluation and inference).

    Rows start at ``0, stride, 2·stride, ...``; a last row/column flush with the far edge is added so the
    whole grid is covered (``ceil((H - size) / stride) + 1`` tiles per column; one when H <= size, padded
    by the boundless read). Overlap is ``size - stride`` pixels. Ranks take tiles round-robin, so counts
    differ by at most one and no tile is repeated; ``shuffle=True`` permutes the order with ``(seed, epoch)``.

    Args:
        grid: the tile grid.
        stride: step between tiles in grid pixels (default: the tile size, i.e. no overlap).
        nodata, max_nodata_fraction: as for :class:`RandomTileSampler` (default keeps every tile).
        shuffle, seed, rank, world_size: order and distribution.
    """

    def __init__(
        self,
        *,
        grid: TileGrid,
        stride: int | None = None,
        nodata: float | None = None,
        max_nodata_fraction: float = 1.0,
        shuffle: bool = False,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        stride = grid.tile_px if stride is None else int(stride)
        if stride < 1:
            raise ValueError(f"GridTileSampler: stride must be >= 1, got {stride}.")
        self.grid, self.stride, self.shuffle = grid, stride, shuffle
        tiles = []
        for f in range(len(grid)):
            max_r, max_c = grid.max_offsets(f)
            for r in _starts(max_r, stride):
                for c in _starts(max_c, stride):
                    tile = Tile(f, r, c, grid.tile_px)
                    if max_nodata_fraction >= 1.0 or 1.0 - grid.valid_fraction(tile, nodata) <= max_nodata_fraction:
                        tiles.append(tile)
        self.tiles = tiles


def _starts(max_offset: int, stride: int) -> list[int]:
    starts = list(range(0, max_offset + 1, stride))
    if starts[-1] != max_offset:
        starts.append(max_offset)
    return starts


@dataclass(frozen=True)
class ChipCrop:
    """A ``size`` x ``size`` window of chip ``chip`` at its own resolution, top-left pixel ``(row, col)``."""

    chip: int
    row: int
    col: int
    size: int


class ChipSampler(_TileSamplerBase):
    """Indices ``0..n-1`` of a chip folder, shuffled per ``(seed, epoch)`` and split round-robin across ranks.

    With ``crop`` and the chips' ``sizes`` (``(height, width)`` each) it yields :class:`ChipCrop` keys instead: one
    window of ``crop`` pixels per chip, placed uniformly at random per ``(seed, epoch)`` (at ``(0, 0)`` along a side
    shorter than ``crop``), so a resumed run draws the windows the uninterrupted one drew.
    """

    def __init__(self, *, num_chips: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, crop: int | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None) -> None:  # fmt: skip
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        if num_chips < 1:
            raise ValueError(f"ChipSampler: num_chips must be >= 1, got {num_chips}.")
        if crop is not None and (sizes is None or len(sizes) != num_chips):
            raise ValueError("ChipSampler: crop= needs sizes= (height, width) for each of the num_chips chips.")
        self.num_chips, self.shuffle = int(num_chips), shuffle
        self.crop, self.sizes = crop, None if sizes is None else [tuple(map(int, s)) for s in sizes]

    def __len__(self) -> int:
        return len(range(self.rank, self.num_chips, self.num_replicas))

    def global_tiles(self) -> list[int] | list[ChipCrop]:
        order = (np.random.default_rng([self.seed, self.epoch, 1]).permutation(self.num_chips).tolist()
                 if self.shuffle else list(range(self.num_chips)))  # fmt: skip
        if self.crop is None:
            return order
        rng = np.random.default_rng([self.seed, self.epoch, 2])
        spans = np.array([[max(h - self.crop, 0) + 1, max(w - self.crop, 0) + 1] for h, w in self.sizes])  # [n, 2]
        offsets = (rng.random((self.num_chips, 2)) * spans).astype(np.int64)  # one window per chip, by chip index
        return [ChipCrop(i, int(offsets[i, 0]), int(offsets[i, 1]), self.crop) for i in order]


class InterleavedSampler(_TileSamplerBase):
    """Several samplers' rank-local streams merged into one shuffled stream (tiles and chips together).

    Each part keeps its own distinct-per-rank guarantee; the merge order is seeded by ``(seed, epoch)``.
    """

    def __init__(self, *, samplers: Sequence[_TileSamplerBase], seed: int = 0) -> None:
        if not samplers:
            raise ValueError("InterleavedSampler: give at least one sampler.")
        ranks = {(s.rank, s.num_replicas) for s in samplers}
        if len(ranks) != 1:
            raise ValueError(f"InterleavedSampler: the samplers disagree on (rank, world_size): {sorted(ranks)}.")
        rank, world = ranks.pop()
        super().__init__(seed=seed, rank=rank, world_size=world)
        self.samplers = list(samplers)

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        for s in self.samplers:
            s.set_epoch(epoch)

    def __len__(self) -> int:
        return sum(len(s) for s in self.samplers)

    def __iter__(self) -> Iterator:
        items = [item for s in self.samplers for item in s]
        order = np.random.default_rng([self.seed, self.epoch, 2]).permutation(len(items))
        return self._after_skip([items[i] for i in order])


class TileListSampler(_FixedTilesSampler):
    """A fixed list of tiles, optionally shuffled per ``(seed, epoch)``, split round-robin across ranks."""

    def __init__(self, *, tiles: Sequence[Tile], shuffle: bool = False, seed: int = 0, rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__(seed=seed, rank=rank, world_size=world_size)
        self.tiles, self.shuffle = list(tiles), shuffle


def grid_tiles(
    grid: TileGrid, *, files: Iterable[int] | None = None, nodata: float | None = None, max_nodata_fraction: float = 0.9
) -> list[Tile]:
    """Every file's tiles on a grid with stride = tile size (no overlap; the last row and column may run past the
    file's edge, where they read nodata), less those with more than ``max_nodata_fraction`` estimated nodata.

    Args:
        grid: the tile grid.
        files: indices of the files to tile (default: all of them), in the order tiles are returned.
        nodata, max_nodata_fraction: the nodata test (on each file's valid-pixel thumbnail).
    """
    size, tiles = grid.tile_px, []
    for f in range(len(grid)) if files is None else files:
        g = grid.grids[f]
        for r in range(0, max(1, math.ceil(g.height / size)) * size, size):
            for c in range(0, max(1, math.ceil(g.width / size)) * size, size):
                tile = Tile(f, r, c, size)
                if 1.0 - grid.valid_fraction(tile, nodata) <= max_nodata_fraction:
                    tiles.append(tile)
    return tiles


def spatial_block_split(
    grid: TileGrid, *, block_tiles: int, val_fraction: float, seed: int = 0, nodata: float | None = None,
    max_nodata_fraction: float = 0.9, files: Iterable[int] | None = None,
) -> tuple[list[Tile], list[Tile]]:
    """Non-overlapping tiles split into train/val by spatial block, never by pixel or tile.

    Tiles sit on a grid with stride = tile size (no overlap); blocks of ``block_tiles`` × ``block_tiles``
    tiles go wholly to one split, chosen by a seeded shuffle so that about ``val_fraction`` of the
    blocks are validation (at least one block each when there are two or more). Neighbouring pixels
    therefore share a split except along block edges, which limits spatial leakage.

    Blocks are places on the ground, not parts of a file: they are laid on the first file's grid, and a tile of any
    file (another date over the same place, an overlapping scene, a file in another CRS) belongs to the block its
    centre falls in, so the same ground never sits in both splits. (Until session 20 each file had blocks of its own,
    and two images of one place could put it in both.)

    ``files`` limits the split to those files' tiles (a test set held out by file stays out of both).

    Raises:
        ValueError: if ``val_fraction`` is not in (0, 1) or ``block_tiles`` < 1.
    """
    from rasterio.warp import transform as transform_points

    if not 0.0 < val_fraction < 1.0 or block_tiles < 1:
        raise ValueError(f"spatial_block_split: need 0 < val_fraction < 1 and block_tiles >= 1, got {val_fraction}, {block_tiles}.")
    size = grid.tile_px
    side = size * block_tiles  # a block's side in pixels of the first file's grid
    first = grid.grids[0] if len(grid) else None
    to_first = ~first.transform if first is not None else None
    blocks: dict[tuple[int, int], list[Tile]] = {}
    for f in range(len(grid)) if files is None else files:
        g = grid.grids[f]
        tiles = grid_tiles(grid, files=[f], nodata=nodata, max_nodata_fraction=max_nodata_fraction)
        if not tiles:
            continue
        # tile centres on the ground, in the first file's CRS, then in its pixels
        xs, ys = zip(*(g.transform @ (t.col + size / 2, t.row + size / 2) for t in tiles))
        if g.crs != first.crs:
            xs, ys = transform_points(g.crs, first.crs, list(xs), list(ys))
        for tile, x, y in zip(tiles, xs, ys):
            col, row = to_first @ (x, y)
            blocks.setdefault((math.floor(row / side), math.floor(col / side)), []).append(tile)
    keys = sorted(blocks)
    order = np.random.default_rng(seed).permutation(len(keys))
    n_val = int(round(val_fraction * len(keys)))
    if len(keys) >= 2:
        n_val = min(max(n_val, 1), len(keys) - 1)
    val_keys = {keys[i] for i in order[:n_val]}
    train = [t for k in keys if k not in val_keys for t in blocks[k]]
    val = [t for k in keys if k in val_keys for t in blocks[k]]
    return train, val
