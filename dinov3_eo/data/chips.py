"""Segmentation training on image chips without a georeference (``images/x.jpg`` + ``masks/x.png``).

Many labelled datasets ship as plain chips rather than GeoTIFFs: JPEG/PNG exports, benchmark folders, tiles cut
by an annotation tool. :class:`ChipSegmentationDataModule` trains ``dinov3-eo segment fit`` on them: images and
masks are paired by file name, every chip is cut into ``tile_size`` windows (the last row and column padded with
unlabelled pixels, so each pixel is read once), and normalisation statistics come from the training chips. The
checkpoint records bands and normalisation as a GeoTIFF fit does, so ``segment predict`` then maps GeoTIFFs of the
same sensor.

Chips are read with rasterio (GDAL reads JPEG, PNG and TIFF alike): any band count and data type, an alpha band
or the file's nodata marking pixels without data.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinov3_eo.data.datamodule import NORMALIZATION_MODES, build_normalization, held_out_files
from dinov3_eo.data.datasets import CHIP_SUFFIXES, collate_samples, expand_chips
from dinov3_eo.data.labels import NamePairing, _raster_legend
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import open_quietly
from dinov3_eo.data.stats import DEFAULT_PERCENTILES, BandStats

#: GDAL colour interpretations named as band names (``ColorInterp.red.name`` is ``"red"``)
_COLOUR_BANDS = ("red", "green", "blue", "gray")


@dataclass(frozen=True)
class ChipHeader:
    """What a chip's header says: data bands (alpha left out), size, and which band is alpha (1-based) if any."""

    path: str
    bands: int
    height: int
    width: int
    alpha: int | None
    band_names: tuple[str, ...]


def read_chip_header(path: str) -> ChipHeader:
    """The header of an image chip.

    Raises:
        ValueError: a file that GDAL cannot open, or a palette image (its pixels are indices into a colour table, not
            colours), each named.
    """
    import rasterio

    try:
        with open_quietly(path) as src:
            interp = [c.name for c in src.colorinterp]
            if "palette" in interp:
                raise ValueError(f"Image chip {path} is a palette image: its pixels are colour-table indices, not "
                                 "colours; save it as RGB (or greyscale) first.")
            alpha = interp.index("alpha") + 1 if "alpha" in interp else None
            names = tuple(
                (src.descriptions[i] or (interp[i] if interp[i] in _COLOUR_BANDS else f"band_{i + 1}"))
                for i in range(src.count) if i + 1 != alpha
            )  # fmt: skip
            return ChipHeader(str(path), src.count - (alpha is not None), src.height, src.width, alpha, names)
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"Image chip {path} could not be opened: {e}") from e


def read_chip(header: ChipHeader, bands: Sequence[int] | None = None, *,
              as_float: bool = True) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The pixels of a chip and where it has data.

    Args:
        header: from :func:`read_chip_header`.
        bands: 1-based data bands to read (alpha not counted); ``None`` = all.
        as_float: float32 pixels; ``False`` keeps the file's data type (a quarter of the memory for 8-bit chips).

    Returns:
        ``([C, H, W] pixels, [H, W] bool valid)``: pixels under alpha 0, equal to the file's nodata in every band, or
        not finite are invalid.

    Raises:
        ValueError: a band outside the chip's, or pixels that cannot be decoded (named).
    """
    import rasterio

    data_bands = [b for b in range(1, header.bands + 2) if b != header.alpha][: header.bands]
    chosen = list(bands) if bands is not None else list(range(1, header.bands + 1))
    if any(not 1 <= b <= header.bands for b in chosen):
        raise ValueError(f"Image chip {header.path} has {header.bands} bands; bands {chosen} asks for others.")
    try:
        with open_quietly(header.path) as src:
            pixels = src.read([data_bands[b - 1] for b in chosen])
            valid = np.isfinite(pixels).all(axis=0) if pixels.dtype.kind == "f" else np.ones(pixels.shape[1:], bool)
            if src.nodata is not None:
                valid &= ~(pixels == np.float32(src.nodata)).all(axis=0)
            if header.alpha is not None:
                valid &= src.read(header.alpha) > 0
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"Image chip {header.path} could not be read: {e}") from e
    return (pixels.astype(np.float32) if as_float else pixels), valid


def colour_class_ids(rgb: np.ndarray, colors: Mapping[tuple[int, int, int], int], ignore_index: int = 255) -> np.ndarray:
    """Class ids of a colour-coded mask: each pixel's class is the one its exact colour stands for.

    Args:
        rgb: ``[3, H, W]`` integer colours (0..255).
        colors: RGB -> class id.
        ignore_index: id of pixels whose colour stands for no class.

    Returns:
        ``[H, W]`` int64 ids.
    """
    keys = (rgb[0].astype(np.int64) << 16) | (rgb[1].astype(np.int64) << 8) | rgb[2].astype(np.int64)
    table = np.array(sorted((r << 16) | (g << 8) | b for r, g, b in colors), dtype=np.int64)
    ids = np.array([colors[((k >> 16) & 255, (k >> 8) & 255, k & 255)] for k in table.tolist()], dtype=np.int64)
    at = np.searchsorted(table, keys).clip(0, len(table) - 1)
    return np.where(table[at] == keys, ids[at], ignore_index)


def read_chip_mask(path: str, colors: Mapping[tuple[int, int, int], int] | None = None,
                   ignore_index: int = 255) -> np.ndarray:  # fmt: skip
    """A class mask as ``[H, W]`` int64 class ids: one id per pixel (first band; a palette PNG's indices) or, with
    ``colors`` (RGB -> id), a colour-coded RGB mask (:func:`colour_class_ids`: other colours are ``ignore_index``).

    Raises:
        ValueError: an unreadable file, a colour mask without ``colors`` (or ``colors`` for a mask of ids), or
        values that are not class ids (each named).
    """
    import rasterio

    try:
        with open_quietly(path) as src:
            interp = [c.name for c in src.colorinterp]
            coloured = src.count >= 3 and interp[:3] == ["red", "green", "blue"]
            if coloured and colors is None:
                raise ValueError(f"Mask {path} is a colour (RGB) image; give mask_colors (class -> colour) to read "
                                 "its colours as classes, or convert them to ids (one class id per pixel).")
            if colors is not None and not coloured:
                raise ValueError(f"Mask {path} holds class ids (one band), not colours; leave out mask_colors.")
            if coloured:
                return colour_class_ids(src.read([1, 2, 3]), colors, ignore_index)
            values = src.read(1)
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"Mask {path} could not be read: {e}") from e
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or (values != np.round(values)).any() or (values < 0).any():
            raise ValueError(f"Mask {path} holds values that are not class ids (negative, fractional or NaN).")
    elif values.dtype.kind == "i" and (values < 0).any():
        raise ValueError(f"Mask {path} holds negative values; class ids are 0, 1, 2 ...")
    return values.astype(np.int64)


def remap_ids(mask: np.ndarray, remap: Mapping[int, int] | None) -> np.ndarray:
    """``mask`` with each id ``remap`` names replaced by its target (all at once: ``{1: 2, 2: 1}`` swaps), the others
    kept; ``mask`` itself when there is nothing to remap."""
    if not remap:
        return mask
    out = mask.copy()
    for value, target in remap.items():
        out[mask == value] = target
    return out


def chip_mask_legend(path: str) -> dict[int, tuple[int, int, int]]:
    """Class id -> RGB from a mask's colour table (a palette PNG), ``{}`` without one."""
    with open_quietly(path) as src:
        return _raster_legend(src, 1)[1]


def pair_chip_masks(images: Sequence[str], masks: str | Sequence[str], name_suffixes: Sequence[str] = ()) -> list[str | None]:
    """The mask of each image, matched by file name (:class:`~dinov3_eo.data.labels.NamePairing`: stems less
    ``name_suffixes``; where several mask folders hold one name, the folder named as the image's wins).

    Args:
        images: image paths.
        masks: mask folders (searched recursively), globs, or files.

    Returns:
        per image, its mask path or ``None``.
    """
    files = [p for p in expand_chips(masks) if p.lower().endswith(CHIP_SUFFIXES)]
    pairing = NamePairing(files, name_suffixes)
    found = [pairing.find(image) for image in images]
    return [None if index is None else files[index] for index in found]


def pairs_by_name(items: Sequence[str], partners: str | Sequence[str], name_suffixes: Sequence[str] = (), *,
                  item: str = "image", partner: str = "mask", hint: str = "", owner: str | None = None) -> list[tuple[str, str]]:  # fmt: skip
    """Each of ``items`` with the file of its name among ``partners`` (:func:`pair_chip_masks`), in item order: the
    items without one are left out, with a warning, and an error says when none has one.

    Args:
        item, partner: what the files are, for the messages (``"class map"``, ``"mask"``).
        hint: how pairs are made, the error's last words.
        owner: who pairs them, the messages' prefix (a data module's name).

    Raises:
        FileNotFoundError: no item has a partner (naming the first item and where its partner was looked for).
    """
    import logging

    found = pair_chip_masks(items, partners, name_suffixes)
    pairs = [(i, p) for i, p in zip(items, found) if p is not None]
    prefix, no = (f"{owner}: ", "no") if owner else ("", "No")
    if not pairs:
        first = f"{items[0]!s}{' ...' if len(items) > 1 else ''}" if items else "(none)"
        raise FileNotFoundError(f"{prefix}{no} {item} of {first} has a {partner} of its name in {partners}; {hint}")
    if len(pairs) < len(items):
        logging.getLogger(__name__).warning("%s%d of %d %ss have no %s of their name and are left out (first: %s).",
                                            prefix, len(items) - len(pairs), len(items), item, partner,
                                            next(i for i, p in zip(items, found) if p is None))  # fmt: skip
    return pairs


def chip_windows(height: int, width: int, size: int) -> list[tuple[int, int]]:
    """``(top, left)`` of the ``size`` x ``size`` windows that cover a ``height`` x ``width`` chip, row by row; the
    last row and column reach past the chip (read as padding), so every pixel lies in exactly one window."""
    return [(top, left) for top in range(0, height, size) for left in range(0, width, size)]


@dataclass(frozen=True)
class ChipWindow:
    """One window of a chip: its index in the dataset's chips and the top-left pixel."""

    chip: int
    top: int
    left: int


class ChipWindowDataset(Dataset):
    """Windows of image chips with their class masks, by int (an index into ``windows``).

    Each sample: ``image`` [C, S, S] float32 (normalised; 0 where invalid), ``valid`` [S, S] bool, ``mask`` [S, S]
    int64 (``ignore_index`` where unlabelled, padded or without data), ``path``.

    Args:
        headers: the chips (:func:`read_chip_header`); masks: their masks, in order.
        windows: the windows to serve; size: window side in pixels.
        bands: 1-based data bands; normalization: applied to the pixels as read; remap: mask value -> class id
        (``{0: 255}`` to ignore a "no label" value); ignore_index: id of unlabelled pixels.
        cache_mb: decoded chips (pixels in the file's data type, validity, mask) kept per process, the least recently
        used dropped first: a chip of several windows is decoded once rather than once per window (JPEG and PNG
        cannot be read a window at a time). 0 turns the cache off.
        mask_colors: RGB -> class id, for colour-coded masks (:func:`read_chip_mask`).
    """

    def __init__(self, *, headers: Sequence[ChipHeader], masks: Sequence[str], windows: Sequence[ChipWindow], size: int,
                 bands: Sequence[int] | None = None, normalization: Normalization | None = None,
                 remap: Mapping[int, int] | None = None, ignore_index: int = 255, cache_mb: float = 512,
                 mask_colors: Mapping[tuple[int, int, int], int] | None = None) -> None:  # fmt: skip
        self.headers, self.masks, self.windows, self.size = list(headers), list(masks), list(windows), int(size)
        self.bands, self.normalization, self.ignore_index = bands, normalization, int(ignore_index)
        self.remap = {int(k): int(v) for k, v in (remap or {}).items()}
        self.cache_bytes, self._cache, self._cached_bytes = int(cache_mb * 2**20), OrderedDict(), 0
        self.mask_colors = None if mask_colors is None else dict(mask_colors)

    def __len__(self) -> int:
        return len(self.windows)

    def read_mask(self, chip: int) -> np.ndarray:
        """Chip ``chip``'s mask as class ids (``remap`` applied), checked against the image's size."""
        header = self.headers[chip]
        mask = read_chip_mask(self.masks[chip], self.mask_colors, self.ignore_index)
        if mask.shape != (header.height, header.width):
            raise ValueError(f"Mask {self.masks[chip]} is {mask.shape[1]}x{mask.shape[0]} px but its image "
                             f"{header.path} is {header.width}x{header.height} px.")
        return remap_ids(mask, self.remap)

    def _decoded(self, chip: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chip ``chip``'s pixels (file data type), validity and mask, from the cache when it holds them."""
        if chip in self._cache:
            self._cache.move_to_end(chip)
            return self._cache[chip]
        pixels, valid = read_chip(self.headers[chip], self.bands, as_float=False)
        entry = (pixels, valid, self._compact(self.read_mask(chip)))
        size = sum(a.nbytes for a in entry)
        if size <= self.cache_bytes:
            self._cache[chip], self._cached_bytes = entry, self._cached_bytes + size
            while self._cached_bytes > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= sum(a.nbytes for a in dropped)
        return entry

    @staticmethod
    def _compact(mask: np.ndarray) -> np.ndarray:
        """The mask as kept in the cache: class ids in the smallest integer type that holds them."""
        small = mask.size == 0 or (mask.min() >= 0 and mask.max() <= 255)
        return mask.astype(np.uint8 if small else np.int32)

    def _cut(self, i: int) -> tuple[ChipHeader, torch.Tensor, np.ndarray, np.ndarray]:
        """Window ``i``: its chip's header, the normalised image ``[C, S, S]`` (0 where invalid or padded), where it
        has data ``[S, S]``, and the chip's labels under it ``[h, w]`` (the window less its padding)."""
        window, s = self.windows[int(i)], self.size
        header = self.headers[window.chip]
        pixels, valid, mask = self._decoded(window.chip)
        rows = slice(window.top, min(window.top + s, header.height))
        cols = slice(window.left, min(window.left + s, header.width))
        h, w = rows.stop - rows.start, cols.stop - cols.start
        image = np.zeros((pixels.shape[0], s, s), np.float32)
        image[:, :h, :w] = pixels[:, rows, cols]
        inside = np.zeros((s, s), bool)
        inside[:h, :w] = valid[rows, cols]
        tensor = torch.from_numpy(image)
        if self.normalization is not None:
            tensor = self.normalization(tensor)
        return header, tensor.masked_fill(~torch.from_numpy(inside), 0.0), inside, mask[rows, cols]

    def labels(self, chip: int) -> np.ndarray:
        """Chip ``chip``'s class ids where it has data, ``ignore_index`` where it has none: ``[H, W]`` int64, the
        labels its windows carry (decoded through the cache, so the windows read after it are decoded no more)."""
        _, valid, mask = self._decoded(chip)
        return np.where(valid, mask, self.ignore_index).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        header, image, inside, under = self._cut(i)
        labels = np.full(inside.shape, self.ignore_index, np.int64)
        labels[: under.shape[0], : under.shape[1]] = under
        labels[~inside] = self.ignore_index
        return {"image": image, "valid": torch.from_numpy(inside), "mask": torch.from_numpy(labels), "path": header.path}


def chip_band_stats(headers: Sequence[ChipHeader], bands: Sequence[int] | None = None, *, num_chips: int = 64,
                    seed: int = 0, max_pixels: int = 1_000_000) -> BandStats:  # fmt: skip
    """Per-band statistics of the valid pixels of up to ``num_chips`` chips drawn at random: count, mean, std, min
    and max over every such pixel (accumulated chip by chip, so memory stays that of one chip), percentiles from at
    most ``max_pixels`` of them (an equal share drawn from each chip).

    Raises:
        ValueError: when the drawn chips hold no valid pixel.
    """
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(headers), size=min(num_chips, len(headers)), replace=False).tolist())
    share = max(1, max_pixels // len(chosen))
    count, total, squares, low, high, sample = 0, 0.0, 0.0, np.inf, -np.inf, []
    for i in chosen:
        pixels, valid = read_chip(headers[i], bands)
        values = pixels[:, valid].astype(np.float64)  # [C, n]
        if values.shape[1] == 0:
            continue
        count += values.shape[1]
        total, squares = total + values.sum(axis=1), squares + (values**2).sum(axis=1)
        low, high = np.minimum(low, values.min(axis=1)), np.maximum(high, values.max(axis=1))
        keep = values.shape[1] <= share
        sample.append(values if keep else values[:, rng.choice(values.shape[1], size=share, replace=False)])
    if count == 0:
        raise ValueError(f"The {len(chosen)} chips drawn for statistics (first {headers[chosen[0]].path}) hold no valid pixel.")
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    drawn = np.concatenate(sample, axis=1)
    names = list(headers[0].band_names)
    names = [names[b - 1] for b in bands] if bands is not None else names
    return BandStats(
        bands=names, count=[int(count)] * len(mean), mean=mean.tolist(), std=std.tolist(), min=low.tolist(),
        max=high.tolist(), percentiles={f"{q:g}": np.percentile(drawn, q, axis=1).tolist() for q in DEFAULT_PERCENTILES},
        files=len(chosen), exact_percentiles=drawn.shape[1] == count,
    )  # fmt: skip


class ChipSegmentationDataModule(pl.LightningDataModule):
    """Image chips without a georeference and their class masks, for ``dinov3-eo segment fit``.

    Select it with ``data: class_path: ChipSegmentationDataModule`` in a segment config (or
    ``--data.class_path ChipSegmentationDataModule`` on the command line); without a ``class_path`` the data is
    GeoTIFFs (:class:`~dinov3_eo.data.datamodule.DenseDataModule`).

    Args:
        images: image chips (JPEG, PNG, TIFF): folders (recursive), globs or a list of them.
        masks: their masks (PNG/TIFF, one class id per pixel), paired by file name: folders, globs or files. Images
            without a mask are left out, with a warning.
        label_name_suffixes: suffixes dropped from image and mask stems before they are compared (``["_mask"]``).
        classes: class name -> id (names for the legend and checkpoint; else the number of classes is the largest
            id found in the masks plus one).
        remap: mask value -> class id, e.g. ``{5: 255}`` to ignore an "unlabelled" class.
        mask_colors: class name -> colour (``"#3c1098"``, ``[60, 16, 152]``) for colour-coded RGB masks (ISPRS,
            DeepGlobe style): each pixel's class is the one of its exact colour, any other colour is unlabelled. Ids
            come from ``classes`` where given, else the order of this mapping; the colours become the legend.
        ignore_index: id of unlabelled pixels (also written where a chip has no data and in padding).
        bands: 1-based bands to read (alpha bands not counted); ``None`` = all.
        normalization: ``"zscore"`` / ``"percentile"`` (statistics of up to ``stats_chips`` training chips, or ``stats``:
            a stats.json), ``"none"``, or an RGB preset (``preset_range`` mapped to [0, 1] first).
        tile_size: window side in pixels (a multiple of the backbone's patch size).
        gsd: metres per pixel of the chips, where known: recorded in the checkpoint so that inference can warn of a
            scene at another scale.
        val_files / test_files: chips held out whole, as globs matched against each image's name or full path
            (``["*/val/*"]``, a benchmark's own split); without ``val_files``, ``val_fraction`` of the chips is drawn at
            random (chips cut from one scene are neighbours: a split by scene, given as ``val_files``, is the honest one).
        cache_mb: decoded chips each loader process keeps (:class:`ChipWindowDataset`), so that a chip of several
            windows is decoded once an epoch rather than once per window.
        batch_size, num_workers, pin_memory, seed: the data loaders (``seed``: the split, statistics and shuffling).

    Raises:
        ValueError: in ``setup``, chips that disagree on band count, a mask of another size than its image, an
        unreadable chip (each named), or no chip left to train on.
    """

    def __init__(
        self,
        *,
        images: str | list[str],
        masks: str | list[str],
        label_name_suffixes: list[str] | None = None,
        classes: dict[str, int] | None = None,
        remap: dict[int, int] | None = None,
        mask_colors: dict[str, str | list[int]] | None = None,
        ignore_index: int = 255,
        bands: list[int] | None = None,
        normalization: str = "zscore",
        stats: str | None = None,
        preset_range: tuple[float, float] = (0.0, 255.0),
        stats_chips: int = 64,
        tile_size: int = 256,
        gsd: float | None = None,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        val_fraction: float = 0.2,
        cache_mb: float = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if normalization not in NORMALIZATION_MODES:
            raise ValueError(f"ChipSegmentationDataModule: normalization must be one of {NORMALIZATION_MODES}, got "
                             f"{normalization!r}.")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"ChipSegmentationDataModule: val_fraction must be in [0, 1), got {val_fraction}.")
        if tile_size < 1:
            raise ValueError(f"ChipSegmentationDataModule: tile_size must be positive, got {tile_size}.")
        self.images, self.masks, self.label_name_suffixes = images, masks, list(label_name_suffixes or [])
        self.classes, self.remap, self.ignore_index = dict(classes or {}), dict(remap or {}), int(ignore_index)
        self.mask_colors = self.colour_table(mask_colors, self.classes)
        if self.mask_colors is not None and not self.classes:
            self.classes = {name: i for i, name in enumerate(mask_colors or {})}
        self.bands, self.normalization_mode, self.stats, self.preset_range = bands, normalization, stats, tuple(preset_range)
        self.stats_chips, self.tile_size, self.gsd = stats_chips, int(tile_size), gsd
        self.val_files, self.test_files, self.val_fraction = list(val_files or []), list(test_files or []), val_fraction
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.cache_mb = cache_mb
        # what a checkpoint records as DenseDataModule's: chips have no nodata value or scale of their own here
        self.nodata, self.scale, self.offset = None, None, None
        self.normalization: Normalization | None = None
        self.headers: list[ChipHeader] | None = None

    @staticmethod
    def colour_table(mask_colors: Mapping[str, Any] | None, classes: Mapping[str, int] | None = None) -> dict[tuple[int, int, int], int] | None:
        """RGB -> class id from ``mask_colors`` (class name -> colour): ids from ``classes``, else mapping order.

        Raises:
            ValueError: a colour that does not parse, two classes of one colour, or a name ``classes`` lacks.
        """
        if not mask_colors:
            return None
        from dinov3_eo.data.labels import parse_color

        table: dict[tuple[int, int, int], int] = {}
        for i, (name, value) in enumerate(mask_colors.items()):
            if classes and name not in classes:
                raise ValueError(f"mask_colors names class {name!r}, which classes {dict(classes)} lacks.")
            rgb = parse_color(value, where=f"mask_colors[{name!r}]")
            if rgb in table:
                raise ValueError(f"mask_colors gives {rgb} to two classes (ids {table[rgb]} and {i}).")
            table[rgb] = classes[name] if classes else i
        return table

    @staticmethod
    def paired_chips(images: str | Sequence[str], masks: str | Sequence[str],
                     name_suffixes: Sequence[str] = ()) -> tuple[list[str], list[str]]:  # fmt: skip
        """The images that have a mask and their masks, in image order (unpaired images logged, then left out).

        Raises:
            FileNotFoundError: no image, or no image with a mask (naming where it looked).
        """
        import logging

        pairs = pairs_by_name(expand_chips(images), masks, name_suffixes, owner="ChipSegmentationDataModule",
                              hint="see label_name_suffixes.")  # fmt: skip
        lossy = [m for _, m in pairs if m.lower().endswith((".jpg", ".jpeg"))]
        if lossy:
            logging.getLogger(__name__).warning(
                "ChipSegmentationDataModule: %d masks are JPEGs (first: %s); lossy compression changes class ids along "
                "class edges, so masks are best saved as PNG or TIFF.", len(lossy), lossy[0])  # fmt: skip
        return [p for p, _ in pairs], [m for _, m in pairs]

    @staticmethod
    def count_classes(masks: Sequence[str], *, ignore_index: int = 255, remap: Mapping[int, int] | None = None,
                      progress: bool = True) -> int:  # fmt: skip
        """The largest class id in ``masks`` (after ``remap``, ``ignore_index`` left out) plus one: one pass.

        Raises:
            ValueError: when the masks hold no class id at all.
        """
        from tqdm.auto import tqdm

        remap = {int(k): int(v) for k, v in (remap or {}).items()}
        largest = -1
        for path in tqdm(masks, desc="classes in the masks", unit="mask", disable=not progress):
            values = {int(v) for v in np.unique(read_chip_mask(path))}
            values = {remap.get(v, v) for v in values} - {ignore_index}
            largest = max([largest, *values])
        if largest < 0:
            raise ValueError(f"The {len(masks)} masks (first {masks[0]}) hold no class id other than ignore_index "
                             f"{ignore_index}.")
        return largest + 1

    def setup(self, stage: str | None = None) -> None:
        if self.headers is not None:
            return
        from tqdm.auto import tqdm

        paths, masks = self.paired_chips(self.images, self.masks, self.label_name_suffixes)
        headers = [read_chip_header(p) for p in tqdm(paths, desc="chip headers", unit="chip", disable=len(paths) < 1000)]
        bands = {h.bands for h in headers}
        if len(bands) > 1:
            odd = next(h for h in headers if h.bands != headers[0].bands)
            raise ValueError(f"Image chips differ in band count: {headers[0].path} has {headers[0].bands}, {odd.path} "
                             f"{odd.bands}; give bands= to read the same bands from each, or keep one sensor per folder.")
        rest, val, test = held_out_files(paths, self.val_files, self.test_files, owner="ChipSegmentationDataModule")
        if not self.val_files and self.val_fraction > 0 and len(rest) > 1:
            rng = np.random.default_rng(self.seed)
            n_val = max(1, round(self.val_fraction * len(rest)))
            val = {rest[j] for j in rng.permutation(len(rest))[:n_val]}
            rest = [i for i in rest if i not in val]
        self.headers, self.mask_paths = headers, masks
        self.train_chips, self.val_chips, self.test_chips = rest, sorted(val), sorted(test)
        if self.normalization_mode in ("zscore", "percentile") and self.stats is None:
            stats = chip_band_stats([headers[i] for i in rest], self.bands, num_chips=self.stats_chips, seed=self.seed)
            self.normalization = stats.normalization(self.normalization_mode)
        else:
            self.normalization = build_normalization(self.normalization_mode, stats=self.stats, preset_range=self.preset_range)
        if self.normalization is not None and self.normalization.num_bands != len(self.band_names):
            raise ValueError(f"ChipSegmentationDataModule: the normalisation has {self.normalization.num_bands} bands, "
                             f"the chips {len(self.band_names)} ({self.band_names}).")

    def _windows(self, chips: Sequence[int]) -> list[ChipWindow]:
        assert self.headers is not None
        return [ChipWindow(c, top, left) for c in chips
                for top, left in chip_windows(self.headers[c].height, self.headers[c].width, self.tile_size)]  # fmt: skip

    def dataset(self, split: str, *, normalize: bool = True) -> ChipWindowDataset:
        """The windows of the ``"train"``, ``"val"`` or ``"test"`` chips; ``normalize=False`` keeps raw pixel values
        (for a task that normalises on its device)."""
        self.setup(split)
        chips = {"train": self.train_chips, "val": self.val_chips, "test": self.test_chips}[split]
        return ChipWindowDataset(headers=self.headers, masks=self.mask_paths, windows=self._windows(chips),
                                 size=self.tile_size, bands=self.bands,
                                 normalization=self.normalization if normalize else None, remap=self.remap,
                                 ignore_index=self.ignore_index, cache_mb=self.cache_mb,
                                 mask_colors=self.mask_colors)  # fmt: skip

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        from dinov3_eo.data.sampling import TileListSampler

        dataset = self.dataset(split)
        # the tile datamodules' sampler, over window indices: shuffled per (seed, epoch), so a fit resumed at an epoch
        # draws what the uninterrupted one drew, and split across the processes of a distributed run
        sampler = TileListSampler(tiles=range(len(dataset)), shuffle=shuffle, seed=self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=collate_samples, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        if not self.val_chips:
            import logging

            logging.getLogger(__name__).info("ChipSegmentationDataModule: no validation chip; the fit runs without validation.")
            return []
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Every window of the ``test_files`` chips.

        Raises:
            ValueError: without ``test_files``.
        """
        if not self.test_files:
            raise ValueError("ChipSegmentationDataModule: testing needs test_files= (--data.test_files): the chips "
                             "held out for the test, which no fit trains or validates on.")
        return self._loader("test", shuffle=False)

    @property
    def band_names(self) -> list[str] | None:
        if not self.headers:
            return None
        names = list(self.headers[0].band_names)
        return [names[b - 1] for b in self.bands] if self.bands is not None else names

    @property
    def training_gsd(self) -> float | None:
        return None if self.gsd is None else float(self.gsd)

    @property
    def num_classes(self) -> int | None:
        """The classes ``classes`` (or ``mask_colors``) declare, ``None`` where neither does."""
        return max(self.classes.values()) + 1 if self.classes else None

    def counted_num_classes(self, *, progress: bool = True) -> int:
        """:attr:`num_classes`, else counted in one pass over the masks (:meth:`count_classes`), before any setup."""
        if self.num_classes is not None:
            return self.num_classes
        _, masks = self.paired_chips(self.images, self.masks, self.label_name_suffixes)
        return self.count_classes(masks, ignore_index=self.ignore_index, remap=self.remap, progress=progress)

    @property
    def class_names(self) -> dict[int, str]:
        """Class id -> name from ``classes``."""
        return {int(i): str(name) for name, i in self.classes.items()}

    @property
    def class_colors(self) -> dict[int, tuple[int, int, int]]:
        """Class id -> RGB: ``mask_colors``, else the first training mask's colour table (palette PNG masks), after
        ``remap``."""
        if self.mask_colors is not None:
            return {i: rgb for rgb, i in self.mask_colors.items()}
        if not self.headers:
            return {}
        table = chip_mask_legend(self.mask_paths[self.train_chips[0]])
        return {self.remap.get(i, i): c for i, c in table.items() if self.remap.get(i, i) != self.ignore_index}

    def class_pixel_counts(self, num_classes: int, *, progress: bool = True) -> np.ndarray:
        """Labelled pixels of each class id ``0..num_classes-1`` over the training chips, as training reads them
        (pixels without data left out): what ``class_weights: balanced`` weighs by.

        Returns:
            [K] int64 counts.

        Raises:
            ValueError: a labelled value outside ``0..num_classes-1`` (naming the mask).
        """
        from tqdm.auto import tqdm

        dataset = self.dataset("train")
        counts = np.zeros(num_classes, dtype=np.int64)
        for chip in tqdm(self.train_chips, desc="class counts", unit="chip", disable=not progress):
            labels = dataset.labels(chip)
            labelled = labels[labels != self.ignore_index]
            if labelled.size and labelled.max() >= num_classes:
                raise ValueError(f"Mask {self.mask_paths[chip]} holds class id {int(labelled.max())} but the model "
                                 f"has {num_classes} classes (ids 0..{num_classes - 1}); set model.num_classes or remap.")
            counts += np.bincount(labelled, minlength=num_classes)
        return counts

    def metadata(self) -> dict[str, Any]:
        """Bands, normalisation and GSD for checkpoint metadata (``BackboneMeta`` fields)."""
        return {"bands": self.band_names, "gsd": self.training_gsd,
                "normalization": None if self.normalization is None else self.normalization.to_dict()}  # fmt: skip


__all__ = [
    "ChipHeader",
    "ChipSegmentationDataModule",
    "ChipWindow",
    "ChipWindowDataset",
    "chip_band_stats",
    "chip_mask_legend",
    "chip_windows",
    "pair_chip_masks",
    "pairs_by_name",
    "read_chip",
    "read_chip_header",
    "read_chip_mask",
    "remap_ids",
]
