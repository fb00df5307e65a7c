"""How to read: datasets that turn tiles (or chip indices) into sample dicts.

A sample is a dict in torchgeo's spirit::

    image   float32 (C, H, W)  normalised; invalid pixels set to 0 after normalisation
    valid   bool (H, W)         False outside the raster, at nodata, NaN, or outside a warped footprint
    bounds  BoundingBox         (left, bottom, right, top) in ``crs``; None for chips
    crs     rasterio CRS        None for chips
    transform  Affine           pixel -> ``crs`` coordinates of this tile; None for chips
    path    str                 the source file
    mask    int64 (H, W)        labelled tiles only: class ids, ``ignore_index`` where unlabelled/invalid
    target  float32 (H, W)      regression labels only: NaN where invalid

Datasets are pickle-safe: files are opened lazily in the process and thread that reads them (each
DataLoader worker process and each :class:`~dinov3_eo.data.loader.ThreadedTileLoader` thread has its own
handles, since GDAL handles must not be shared between threads; they are forgotten on pickling and closed
when their thread ends) and the number of open handles is bounded, so memory stays flat whatever the raster
size. GDAL's block cache is capped per process (``gdal_cache_mb``) for the same reason.
"""

from __future__ import annotations

import functools
import glob
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.env import set_gdal_config
from rasterio.vrt import WarpedVRT
from torch import Tensor
from torch.utils.data import Dataset, default_collate, get_worker_info

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import GDAL_CACHE_MB, PerThread, read_window
from dinov3_eo.data.sampling import ChipCrop, Tile, TileGrid

Sample = dict[str, Any]
CHIP_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


def _per_band(value: float | Sequence[float] | None, num_bands: int, name: str) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, num_bands)
    if arr.size != num_bands:
        raise ValueError(f"{name} must be one number or one per band ({num_bands}), got {list(arr)}.")
    return arr.reshape(-1, 1, 1)


def fused_affine(
    normalization: Normalization | None, scale: np.ndarray | None, offset: np.ndarray | None, num_bands: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Scale/offset and a :class:`Normalization` folded into ``clip(x * s + o, lo, hi) * a + b``.

    Returns ``(pre, post, clip_low, clip_high)`` where ``pre`` = (s, o) stacked as (2, C, 1, 1), or ``None``
    without a scale/offset, and ``post`` = (a, b) likewise, all float32; the clip bounds are ``None`` without a
    clip-and-scale.
    One fused pass per tile in numpy is several times cheaper than the generic torch path, and
    ``tests/test_datasets.py`` checks it against ``Normalization.__call__``.
    """
    ones, zeros = np.ones(num_bands, np.float64), np.zeros(num_bands, np.float64)
    s = ones if scale is None else scale.reshape(-1).astype(np.float64)
    o = zeros if offset is None else offset.reshape(-1).astype(np.float64)
    low = high = None
    a, b = ones, zeros
    if normalization is not None:
        mean, std = np.asarray(normalization.mean, np.float64), np.asarray(normalization.std, np.float64)
        if normalization.low is not None and normalization.high is not None:
            low, high = np.asarray(normalization.low, np.float64), np.asarray(normalization.high, np.float64)
            # ((clip(x) - low) / (high - low) - mean) / std
            a = 1.0 / ((high - low) * std)
            b = (-low / (high - low) - mean) / std
        else:
            a, b = 1.0 / std, -mean / std
    shape = (-1, 1, 1)
    pre = None if scale is None and offset is None else np.stack([s, o]).astype(np.float32).reshape(2, *shape)
    post = np.stack([a, b]).astype(np.float32).reshape(2, *shape)
    as_bound = (lambda v: None if v is None else v.astype(np.float32).reshape(shape))
    return pre, post, as_bound(low), as_bound(high)


def apply_fused_affine(
    values: np.ndarray,
    valid: np.ndarray,
    affine: tuple[np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray | None],
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Raw (C, H, W) values -> float32 (C, H, W) through a :func:`fused_affine`, 0 where ``valid`` (H, W) is False.

    ``out`` is an optional float32 (C, H, W) array to write into (and return).
    """
    pre, post, low, high = affine
    x = np.empty(values.shape, dtype=np.float32) if out is None else out
    if pre is None and low is None:
        # The common case (z-score or none) in one pass that converts while it multiplies.
        np.multiply(values, post[0], out=x, dtype=np.float32)
    else:
        np.copyto(x, values, casting="unsafe")  # float32 first, as astype would
        if pre is not None:
            x *= pre[0]
            x += pre[1]
        if low is not None:
            np.clip(x, low, high, out=x)
        x *= post[0]
    x += post[1]
    if not valid.all():  # most tiles are fully valid: skip the masked write
        np.copyto(x, np.float32(0.0), where=~valid)  # NaN/nodata never reach the model
    return x


def model_input(
    values: np.ndarray, valid: np.ndarray, affine: tuple[np.ndarray | None, np.ndarray, np.ndarray | None, np.ndarray | None]
) -> np.ndarray:
    """What a model is fed for a window's raw (C, H, W) values at inference: :func:`apply_fused_affine` (0 where
    ``valid`` is False), and ±inf of float data, which the validity mask lets through, set to 0 too."""
    image = apply_fused_affine(values, valid, affine)
    if np.issubdtype(values.dtype, np.floating):
        np.nan_to_num(image, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return image


def _close_handle(src: Any, vrt: Any) -> None:
    if vrt is not None:
        vrt.close()
    src.close()


def _close_handles(handles: OrderedDict[int, tuple[Any, Any]]) -> None:
    for src, vrt in handles.values():
        _close_handle(src, vrt)
    handles.clear()


def _new_handle_cache(gdal_cache_mb: int) -> OrderedDict[int, tuple[Any, Any]]:
    """An empty handle cache for a new reading thread or process, with the process's GDAL cache capped."""
    set_gdal_config("GDAL_CACHEMAX", gdal_cache_mb * 1024 * 1024)
    return OrderedDict()


class TileReader:
    """Raw windowed reads of tiles: lazily opened, bounded per-thread handle cache, per-process GDAL cache cap.

    Args:
        grid: the tile grid (and through it the index and band selection).
        nodata: nodata override for every file (default: each file's declared nodata).
        max_open: most files kept open per process and thread.
        gdal_cache_mb: GDAL block-cache cap applied in each reading process (the cache is shared by its threads).
    """

    def __init__(self, *, grid: TileGrid, nodata: float | None = None, max_open: int = 32, gdal_cache_mb: int = GDAL_CACHE_MB) -> None:
        self.grid, self.nodata, self.max_open, self.gdal_cache_mb = grid, nodata, max_open, gdal_cache_mb
        # each thread's open ``file -> (src, vrt)`` handles, most recently used last
        self._handles = PerThread(functools.partial(_new_handle_cache, gdal_cache_mb), close=_close_handles)

    def close(self) -> None:
        """Close the handles the calling thread opened (other threads' handles close when those threads end)."""
        self._handles.release()

    def _nodata_for(self, file: int) -> float | None:
        return self.nodata if self.nodata is not None else self.grid.index.records[file].nodata

    def _dataset(self, file: int):
        handles = self._handles.get()
        if file in handles:
            handles.move_to_end(file)
            src, vrt = handles[file]
            return vrt if vrt is not None else src
        src = rasterio.open(self.grid.index.records[file].path)
        vrt = None
        grid = self.grid.grids[file]
        if grid.warped:
            nodata = self._nodata_for(file)
            vrt = WarpedVRT(
                src, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height,
                resampling=self.grid.resampling, src_nodata=nodata, nodata=nodata, add_alpha=nodata is None,
            )  # fmt: skip
        handles[file] = (src, vrt)
        while len(handles) > self.max_open:
            _close_handle(*handles.popitem(last=False)[1])
        return vrt if vrt is not None else src

    def dtype(self, file: int) -> np.dtype:
        """The dtype :meth:`read` returns for ``file`` (that of its first selected band)."""
        rec = self.grid.index.records[file]
        return np.dtype(rec.dtypes[self.grid.index.band_indexes[file][0] - 1])

    def read(self, tile: Tile, *, out: np.ndarray | None = None, valid_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (C, size, size) values in the file dtype and (size, size) validity of ``tile``.

        ``out``/``valid_out`` are optional buffers to read into (see :func:`~dinov3_eo.data.raster.read_window`).

        Raises:
            RuntimeError: naming the tile and file when the read fails (the cause is chained).
        """
        rec = self.grid.index.records[tile.file]
        try:
            ds = self._dataset(tile.file)
            return read_window(
                ds, tile.window, bands=self.grid.index.band_indexes[tile.file], nodata=self._nodata_for(tile.file),
                out=out, valid_out=valid_out,
            )  # fmt: skip
        except Exception as e:
            raise RuntimeError(f"Reading {tile} of {rec.path} failed: {e}") from e


class TileDataset(Dataset):
    """Sample dicts for :class:`~dinov3_eo.data.sampling.Tile` keys (use with a tile sampler).

    Args:
        grid: the tile grid.
        nodata: nodata override for every file.
        scale, offset: optional DN -> physical conversion ``x * scale + offset`` (one value or one per band),
            applied before ``normalization``.
        normalization: per-band normalisation (``None`` leaves values as float32 physical units).
        labels: optional :class:`~dinov3_eo.data.labels.RasterLabels` or ``VectorLabels`` adding ``mask``/``target``
            (anything with ``sample(crs=, transform=, shape=, valid=, path=)``; ``path`` is the tile's image).
        gdal_cache_mb, max_open: see :class:`TileReader`.

    Raises:
        ValueError: if ``normalization``/``scale``/``offset`` do not match the number of selected bands.
    """

    def __init__(
        self,
        *,
        grid: TileGrid,
        nodata: float | None = None,
        scale: float | Sequence[float] | None = None,
        offset: float | Sequence[float] | None = None,
        normalization: Normalization | None = None,
        labels: Any | None = None,
        gdal_cache_mb: int = GDAL_CACHE_MB,
        max_open: int = 32,
    ) -> None:
        num_bands = grid.index.num_bands
        if normalization is not None and normalization.num_bands != num_bands:
            raise ValueError(f"TileDataset: normalisation {normalization.name!r} has {normalization.num_bands} bands, the archive selection {num_bands}.")
        self.grid = grid
        self.reader = TileReader(grid=grid, nodata=nodata, max_open=max_open, gdal_cache_mb=gdal_cache_mb)
        self.scale = _per_band(scale, num_bands, "scale")
        self.offset = _per_band(offset, num_bands, "offset")
        self.normalization = normalization
        self.labels = labels
        self._affine = fused_affine(normalization, self.scale, self.offset, num_bands)

    def normalise(self, values: np.ndarray, valid: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
        """Raw (C, H, W) values -> float32 (C, H, W): scale/offset, normalisation, 0 where invalid.

        ``out`` is an optional float32 (C, H, W) array to write into (and return).
        """
        return apply_fused_affine(values, valid, self._affine, out=out)

    def __getitem__(self, tile: Tile) -> Sample:
        if not isinstance(tile, Tile):
            raise TypeError(f"TileDataset is indexed by Tile (use a tile sampler), got {type(tile).__name__}.")
        values, valid = self.reader.read(tile)
        return self._sample(tile, torch.from_numpy(self.normalise(values, valid)), torch.from_numpy(valid), valid)

    def __getitems__(self, tiles: Sequence[Tile]) -> list[Sample]:
        """``[self[t] for t in tiles]``, read into one (B, C, H, W) image and one (B, H, W) valid buffer.

        Each sample's ``image``/``valid`` is a view of row ``i`` of those buffers. A ``DataLoader`` with
        automatic batching calls this instead of ``__getitem__``; inside a worker the buffers are allocated
        in shared memory, so :func:`collate_samples` hands them to the main process as they are. Per-tile
        allocations, the collate copy and a second shared-memory batch were most of the cost of a
        DataLoader over cached tiles (``scripts/bench_data.py``). Tiles of different sizes fall back to
        one read each.
        """
        tiles = list(tiles)
        if not tiles or not all(isinstance(t, Tile) for t in tiles) or len({t.size for t in tiles}) != 1:
            return [self[t] for t in tiles]  # __getitem__ raises the TypeError for a wrong key
        size, num_bands = tiles[0].size, self.grid.index.num_bands
        image = _batch_tensor((len(tiles), num_bands, size, size), torch.float32)
        valid = _batch_tensor((len(tiles), size, size), torch.bool)
        image_np, valid_np = image.numpy(), valid.numpy()
        raw: dict[np.dtype, np.ndarray] = {}  # one scratch read buffer per file dtype, reused across the batch
        samples = []
        for i, tile in enumerate(tiles):
            dtype = self.reader.dtype(tile.file)
            if dtype not in raw:
                raw[dtype] = np.empty((num_bands, size, size), dtype=dtype)
            values, _ = self.reader.read(tile, out=raw[dtype], valid_out=valid_np[i])
            self.normalise(values, valid_np[i], out=image_np[i])
            samples.append(self._sample(tile, image[i], valid[i], valid_np[i]))
        return samples

    def _sample(self, tile: Tile, image: Tensor, valid: Tensor, valid_np: np.ndarray) -> Sample:
        grid = self.grid.grids[tile.file]
        sample: Sample = {
            "image": image,
            "valid": valid,
            "bounds": self.grid.tile_bounds(tile),
            "crs": grid.crs,
            "transform": self.grid.tile_transform(tile),
            "path": self.grid.index.records[tile.file].path,
        }
        if self.labels is not None:
            shape = (tile.size, tile.size)
            sample.update(self.labels.sample(crs=grid.crs, transform=sample["transform"], shape=shape, valid=valid_np,
                                             path=sample["path"]))
        return sample


def _batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised tensor, in shared memory when called inside a DataLoader worker.

    A worker must move every tensor it returns into shared memory; allocating it there directly (as
    ``default_collate`` does) saves the copy. ``UntypedStorage._new_shared`` is the allocator
    ``default_collate`` itself uses; without it the tensor is moved once with the public ``share_memory_``.
    """
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
    if new_shared is None:
        return torch.empty(shape, dtype=dtype).share_memory_()
    storage = new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def expand_chips(chips: str | Sequence[str]) -> list[str]:
    """Sorted image paths from a glob (of files or folders), a folder (recursive) or a list of them.

    Raises:
        FileNotFoundError: if nothing matches.
    """
    sources = [chips] if isinstance(chips, (str, os.PathLike)) else list(chips)
    found: set[str] = set()
    for source in sources:
        source = os.fspath(source)
        matches = []
        for match in [source] if os.path.isdir(source) else glob.glob(source, recursive=True):
            if os.path.isdir(match):  # a folder, or a glob of folders (tile*/images)
                matches += [os.path.join(d, f) for d, _, fs in os.walk(match) for f in fs if f.lower().endswith(CHIP_SUFFIXES)]
            elif os.path.isfile(match):
                matches.append(match)
        if not matches:
            raise FileNotFoundError(f"Chip source {source!r} matched no image files ({CHIP_SUFFIXES}).")
        found.update(os.path.abspath(p) for p in matches)
    return sorted(found)


class ChipFolderDataset(Dataset):
    """Plain image chips without georeferencing (EuroSAT-style JPEG/PNG folders), indexed by int (the whole chip,
    resized to ``size``) or by :class:`~dinov3_eo.data.sampling.ChipCrop` (a window at the chip's own resolution;
    a chip smaller than the window along a side is resized whole instead).

    Args:
        chips: glob, folder or list of them.
        normalization: per-band normalisation of the raw 0..255 values.
        size: resize every chip to ``size`` × ``size`` (bilinear) so they batch with tiles; ``None`` keeps it.
        num_bands: 3 (RGB) or 1 (greyscale); chips are converted to this.

    Raises:
        ValueError: if ``num_bands`` is not 1 or 3 or the normalisation has another band count.
    """

    def __init__(self, *, chips: str | Sequence[str], normalization: Normalization | None = None, size: int | None = None, num_bands: int = 3) -> None:
        if num_bands not in (1, 3):
            raise ValueError(f"ChipFolderDataset: num_bands must be 1 or 3, got {num_bands}.")
        if normalization is not None and normalization.num_bands != num_bands:
            raise ValueError(f"ChipFolderDataset: normalisation has {normalization.num_bands} bands, chips {num_bands}.")
        self.paths = expand_chips(chips)
        self.normalization, self.size, self.num_bands = normalization, size, num_bands

    def __len__(self) -> int:
        return len(self.paths)

    def sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every chip, from the file headers (no pixels decoded)."""
        from PIL import Image

        out = []
        for path in self.paths:
            try:
                with Image.open(path) as img:
                    out.append((img.height, img.width))
            except OSError as e:
                raise RuntimeError(f"Reading chip {path} failed: {e}") from e
        return out

    def __getitem__(self, i: int | ChipCrop) -> Sample:
        from PIL import Image

        crop = i if isinstance(i, ChipCrop) else None
        path = self.paths[crop.chip if crop is not None else int(i)]
        try:
            with Image.open(path) as img:
                if crop is not None and img.height >= crop.size and img.width >= crop.size:
                    img = img.crop((crop.col, crop.row, crop.col + crop.size, crop.row + crop.size))
                array = np.asarray(img.convert("RGB" if self.num_bands == 3 else "L"))
        except OSError as e:
            raise RuntimeError(f"Reading chip {i} ({path}) failed: {e}") from e
        image = torch.from_numpy(np.ascontiguousarray(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1))).float()
        if self.size is not None and tuple(image.shape[1:]) != (self.size, self.size):
            image = F.interpolate(image[None], size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)[0]
        if self.normalization is not None:
            image = self.normalization(image)
        valid = torch.ones(image.shape[1:], dtype=torch.bool)
        return {"image": image, "valid": valid, "bounds": None, "crs": None, "transform": None, "path": path}


class MixedDataset(Dataset):
    """Tiles and chips behind one key space: :class:`Tile` keys go to ``tiles``, ints to ``chips``."""

    def __init__(self, *, tiles: TileDataset | None = None, chips: ChipFolderDataset | None = None) -> None:
        if tiles is None and chips is None:
            raise ValueError("MixedDataset: give tiles, chips or both.")
        self.tiles, self.chips = tiles, chips

    def __getitems__(self, keys: Sequence[Tile | int]) -> list[Sample]:
        """A batch: all-tile batches go through :meth:`TileDataset.__getitems__`, others key by key."""
        keys = list(keys)
        if self.tiles is not None and keys and all(isinstance(k, Tile) for k in keys):
            return self.tiles.__getitems__(keys)
        return [self[k] for k in keys]

    def __getitem__(self, key: Tile | int) -> Sample:
        if isinstance(key, Tile):
            if self.tiles is None:
                raise TypeError("MixedDataset: got a Tile key but no tile dataset.")
            return self.tiles[key]
        if self.chips is None:
            raise TypeError(f"MixedDataset: got chip index {key!r} but no chip dataset.")
        return self.chips[key]


def collate_samples(batch: Sequence[Sample]) -> dict[str, Any]:
    """Stack tensor fields into (B, ...) tensors and keep everything else as per-sample lists.

    Tensors of different shapes stay a list (e.g. chips kept at their own size). When a field's tensors
    are already the consecutive rows of one (B, ...) buffer (as :meth:`TileDataset.__getitems__` returns
    them) that buffer is returned without a copy; it then shares memory with the samples.
    """
    out: dict[str, Any] = {}
    for key in batch[0]:
        values = [s[key] for s in batch]
        if all(isinstance(v, Tensor) for v in values) and len({tuple(v.shape) for v in values}) == 1:
            base = _rows_of_one_buffer(values)
            out[key] = base if base is not None else default_collate(values)  # stacks into shared memory in workers
        else:
            out[key] = values
    return out


def _rows_of_one_buffer(values: Sequence[Tensor]) -> Tensor | None:
    """The (B, ...) tensor whose rows 0..B-1 are exactly ``values`` (same storage, in order, nothing else), or None."""
    first = values[0]
    storage = first.untyped_storage()
    numel = first.numel()
    if numel == 0 or storage.nbytes() != len(values) * numel * first.element_size():
        return None
    for i, v in enumerate(values):
        if (
            v.dtype != first.dtype
            or not v.is_contiguous()
            or v.storage_offset() != i * numel
            or v.untyped_storage().data_ptr() != storage.data_ptr()
        ):
            return None
    return first.new_empty(0).set_(storage, 0, (len(values), *first.shape))
