"""Image-caption data for text alignment: caption tables, class folders and labels turned into captions.

Three sources, one sample layout (see :mod:`dinov3_eo.data.datasets` for the common keys)::

    image        float32 (C, H, W)  raw pixel values (DN / 0..255) unless a ``normalization`` is given:
                                    the text task normalises on its device with the backbone's statistics
    valid        bool (H, W)
    caption      str                the text paired with the image
    caption_key  str                images with equal keys show the same thing (same class set): the
                                    contrastive loss treats them as positives of each other, not negatives
    path         str
    label        int64 ()           class folders only: the class index
    mask         int64 (H, W)       labelled sources only: class ids, ``ignore_index`` where unlabelled

* :class:`CaptionTableDataset` — a CSV / Parquet / JSONL table of ``image`` (a chip, or a GeoTIFF plus a pixel
  ``window`` or map ``bounds``) and ``caption``;
* :class:`ClassFolderCaptionDataset` — EuroSAT-style ``root/<Class>/*.jpg`` with captions from prompt templates,
  and a seeded, stratified train/test split;
* :class:`LabelCaptionDataset` — wraps any dataset whose samples carry a ``mask`` (labelled GeoTIFF tiles, image +
  mask chips) and writes a caption naming the classes that cover the sample, largest first.

:class:`TextDataModule` wires one of them into a Lightning data module for ``dinov3-eo text fit``.
Captions drawn from templates are reproducible: the template is drawn with a generator seeded by
``(seed, epoch, sample)``, and :meth:`set_epoch` moves to the next epoch's draw.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.warp import transform_bounds
from rasterio.windows import Window, from_bounds
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from dinov3_eo.data.datasets import CHIP_SUFFIXES, collate_samples
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import read_window
from dinov3_eo.losses.cross_entropy import check_class_labels
from dinov3_eo.tasks.prompts import humanize_class_name, load_templates

__all__ = [
    "CaptionRecord",
    "CaptionTableDataset",
    "ChipMaskDataset",
    "ClassFolderCaptionDataset",
    "LabelCaptionDataset",
    "TextDataModule",
    "caption_from_mask",
    "read_caption_table",
]

Sample = dict[str, Any]
_PLAIN_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------------------------------


def _read_plain_image(path: str, num_bands: int = 3) -> np.ndarray:
    """A JPEG/PNG as ``(C, H, W)`` uint8 (RGB or greyscale)."""
    from PIL import Image

    with Image.open(path) as img:
        array = np.asarray(img.convert("RGB" if num_bands == 3 else "L"))
    return np.ascontiguousarray(array.reshape(*array.shape[:2], -1).transpose(2, 0, 1))  # [H, W, C] -> [C, H, W]


def _resize(image: Tensor, valid: Tensor, size: int | None) -> tuple[Tensor, Tensor]:
    """Resize ``image`` (C, H, W) bilinearly and ``valid`` (H, W) by nearest to ``size`` x ``size``."""
    if size is None or tuple(image.shape[-2:]) == (size, size):
        return image, valid
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    valid = F.interpolate(valid[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5
    return image, valid


def _finish(image: Tensor, valid: Tensor, normalization: Normalization | None) -> Tensor:
    """Normalise (optionally) and zero the invalid pixels, so NaN/nodata never reach a model."""
    if normalization is not None:
        image = normalization(image)
    image = torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
    return image.masked_fill(~valid, 0.0)


def _sample_seed(seed: int, epoch: int, key: Any) -> np.random.Generator:
    """A generator for one sample's random choices, stable across processes (no Python hash randomisation)."""
    return np.random.default_rng((seed, epoch, zlib.crc32(repr(key).encode())))


# --------------------------------------------------------------------------------------------------------------
# Caption tables
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRecord:
    """One row of a caption table.

    Attributes:
        path: the image (a chip, or a GeoTIFF), absolute.
        caption: its text.
        window: ``(col_off, row_off, width, height)`` pixel window of a GeoTIFF, or ``None``.
        bounds: ``(left, bottom, right, top)`` map bounds of a GeoTIFF region, or ``None``.
        bounds_crs: CRS of ``bounds`` (default: the raster's own).
    """

    path: str
    caption: str
    window: tuple[int, int, int, int] | None = None
    bounds: tuple[float, float, float, float] | None = None
    bounds_crs: str | None = None


def _four_numbers(value: Any, *, column: str, row: int, source: Path) -> tuple[float, ...] | None:
    """``None`` for an empty cell; else four numbers from a list or a ``"a,b,c,d"`` / JSON string."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        text = value.strip()
        parts = json.loads(text) if text.startswith("[") else text.replace(";", ",").split(",")
    else:
        parts = list(value)
    try:
        numbers = tuple(float(p) for p in parts)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: row {row}: column {column!r} = {value!r} is not four numbers.") from e
    if len(numbers) != 4:
        raise ValueError(f"{source}: row {row}: column {column!r} needs four numbers, got {len(numbers)} ({value!r}).")
    return numbers


def read_caption_table(path: str | os.PathLike[str]) -> list[CaptionRecord]:
    """Rows of a caption table: CSV, Parquet or JSON Lines (``.jsonl``; ``.json`` holding a list of objects).

    Columns: ``image`` (or ``path``) and ``caption`` are required; optional ``window`` (``col_off, row_off,
    width, height`` in pixels) or ``bounds`` (``left, bottom, right, top`` in map units) pick a region of a
    GeoTIFF, with ``bounds_crs`` (e.g. ``EPSG:4326``) when the bounds are not in the raster's CRS. A region cell
    is a list or a comma-separated string. Relative image paths are resolved against the table's folder.

    Raises:
        FileNotFoundError: if the table does not exist.
        ValueError: for an unknown format, missing columns, an empty caption, a row with both a window and
            bounds, or a malformed region.
    """
    from dinov3_eo.data.tables import read_table, table_path

    source = Path(path)
    frame = read_table(source, what="Caption table")
    image_column = "image" if "image" in frame.columns else "path" if "path" in frame.columns else None
    if image_column is None or "caption" not in frame.columns:
        raise ValueError(
            f"Caption table {str(source)!r} needs columns 'image' (or 'path') and 'caption'; it has {list(frame.columns)}."
        )
    records = []
    for i, row in enumerate(frame.to_dict(orient="records")):
        caption = row["caption"]
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{source}: row {i}: the caption is empty.")
        image = table_path(source, row[image_column])
        window = _four_numbers(row.get("window"), column="window", row=i, source=source)
        bounds = _four_numbers(row.get("bounds"), column="bounds", row=i, source=source)
        if window is not None and bounds is not None:
            raise ValueError(f"{source}: row {i}: give a window or bounds, not both.")
        crs = row.get("bounds_crs")
        records.append(
            CaptionRecord(
                path=str(image.resolve()),
                caption=caption.strip(),
                window=None if window is None else tuple(int(round(v)) for v in window),  # type: ignore[arg-type]
                bounds=bounds,  # type: ignore[arg-type]
                bounds_crs=crs if isinstance(crs, str) and crs.strip() else None,
            )
        )
    if not records:
        raise ValueError(f"Caption table {str(source)!r} has no rows.")
    return records


class CaptionTableDataset(Dataset):
    """(image, caption) pairs from :func:`read_caption_table` rows, indexed by int.

    Chips (JPEG/PNG) are read whole; GeoTIFFs are read at the row's window or bounds (boundless: pixels outside
    the raster are invalid), or whole when the row names no region.

    Args:
        table: a caption table path, or records.
        size: resize every image to ``size`` x ``size`` (needed to batch images of different sizes).
        bands: 1-based GeoTIFF bands to read (default: all).
        nodata: nodata override for GeoTIFFs (e.g. 0 for a Landsat L1 collar).
        normalization: applied to raw values; ``None`` returns raw values (the text task normalises).

    Raises:
        FileNotFoundError / ValueError: see :func:`read_caption_table`.
    """

    def __init__(
        self,
        *,
        table: str | os.PathLike[str] | Sequence[CaptionRecord],
        size: int | None = None,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
        normalization: Normalization | None = None,
    ) -> None:
        self.records = read_caption_table(table) if isinstance(table, (str, os.PathLike)) else list(table)
        self.size, self.bands, self.nodata, self.normalization = size, bands, nodata, normalization

    def __len__(self) -> int:
        return len(self.records)

    def _read_geotiff(self, record: CaptionRecord) -> tuple[np.ndarray, np.ndarray]:
        with rasterio.open(record.path) as src:
            if record.window is not None:
                window = Window(*record.window)
            elif record.bounds is not None:
                bounds = record.bounds
                if record.bounds_crs is not None:
                    if src.crs is None:
                        raise ValueError(f"{record.path} has no CRS, so bounds in {record.bounds_crs} cannot be placed.")
                    bounds = transform_bounds(record.bounds_crs, src.crs, *bounds)
                window = from_bounds(*bounds, transform=src.transform).round_offsets().round_lengths()
            else:
                window = Window(0, 0, src.width, src.height)
            return read_window(src, window, bands=self.bands, nodata=self.nodata)

    def __getitem__(self, i: int) -> Sample:
        record = self.records[int(i)]
        try:
            if record.path.lower().endswith(_PLAIN_IMAGE_SUFFIXES) and record.window is None and record.bounds is None:
                pixels = _read_plain_image(record.path)
                valid_np = np.ones(pixels.shape[1:], dtype=bool)
            else:
                pixels, valid_np = self._read_geotiff(record)
        except Exception as e:
            raise RuntimeError(f"Reading caption sample {i} ({record.path}) failed: {e}") from e
        image = torch.from_numpy(pixels.astype(np.float32))
        image, valid = _resize(image, torch.from_numpy(valid_np), self.size)
        return {
            "image": _finish(image, valid, self.normalization),
            "valid": valid,
            "caption": record.caption,
            "caption_key": record.caption.lower(),
            "path": record.path,
        }


# --------------------------------------------------------------------------------------------------------------
# Class folders (EuroSAT style)
# --------------------------------------------------------------------------------------------------------------


class ClassFolderCaptionDataset(Dataset):
    """Chips in ``root/<Class>/<image>`` with captions made from the class name and prompt templates.

    The split is stratified and seeded: within each class the files (sorted by name) are shuffled with
    ``split_seed`` and the first ``round(test_fraction * n)`` go to ``"test"``, the rest to ``"train"``.

    Args:
        root: the folder holding one sub-folder per class.
        templates: prompt templates (``None``: the built-in remote-sensing set; a list; or a file).
        split: ``"train"``, ``"test"`` or ``"all"``.
        test_fraction: share of each class held out for ``"test"``.
        split_seed: seed of the split.
        class_names: folder name -> words (default: :func:`humanize_class_name`, ``"SeaLake" -> "sea lake"``).
        size: resize chips to ``size`` x ``size``.
        normalization: applied to the 0..255 values; ``None`` keeps them raw.
        seed: seed of the per-sample template draws.

    Raises:
        FileNotFoundError: if ``root`` has no class folder with images.
        ValueError: for an unknown ``split`` or a ``test_fraction`` outside (0, 1).
    """

    def __init__(
        self,
        *,
        root: str | os.PathLike[str],
        templates: Sequence[str] | str | None = None,
        split: Literal["train", "test", "all"] = "all",
        test_fraction: float = 0.25,
        split_seed: int = 0,
        class_names: dict[str, str] | None = None,
        size: int | None = None,
        normalization: Normalization | None = None,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"ClassFolderCaptionDataset: split must be 'train', 'test' or 'all', got {split!r}.")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"ClassFolderCaptionDataset: test_fraction must be in (0, 1), got {test_fraction}.")
        root = Path(root)
        folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        files_by_class = {
            f.name: sorted(str(p) for p in f.iterdir() if p.suffix.lower() in CHIP_SUFFIXES) for f in folders
        }
        files_by_class = {k: v for k, v in files_by_class.items() if v}
        if not files_by_class:
            raise FileNotFoundError(f"ClassFolderCaptionDataset: {str(root)!r} holds no class folders with images.")
        self.folders = sorted(files_by_class)
        names = class_names or {}
        #: class index -> caption words
        self.classes = [names.get(f, humanize_class_name(f)) for f in self.folders]
        self.templates = load_templates(templates)
        self.paths: list[str] = []
        self.labels: list[int] = []
        for label, folder in enumerate(self.folders):
            files = files_by_class[folder]
            order = np.random.default_rng((split_seed, label)).permutation(len(files))
            n_test = int(round(test_fraction * len(files)))
            chosen = {"test": order[:n_test], "train": order[n_test:], "all": order}[split]
            for j in sorted(chosen.tolist()):
                self.paths.append(files[j])
                self.labels.append(label)
        self.size, self.normalization, self.seed, self.epoch = size, normalization, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's templates."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Sample:
        i = int(i)
        path, label = self.paths[i], self.labels[i]
        try:
            pixels = _read_plain_image(path) if path.lower().endswith(_PLAIN_IMAGE_SUFFIXES) else _read_tif(path)
        except Exception as e:
            raise RuntimeError(f"Reading chip {i} ({path}) failed: {e}") from e
        image = torch.from_numpy(pixels.astype(np.float32))
        image, valid = _resize(image, torch.ones(image.shape[1:], dtype=torch.bool), self.size)
        rng = _sample_seed(self.seed, self.epoch, i)
        template = self.templates[int(rng.integers(len(self.templates)))]
        return {
            "image": _finish(image, valid, self.normalization),
            "valid": valid,
            "caption": template.format(self.classes[label]),
            "caption_key": self.classes[label],
            "label": torch.tensor(label, dtype=torch.int64),
            "path": path,
        }


def _read_tif(path: str) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read()


# --------------------------------------------------------------------------------------------------------------
# Labels as captions
# --------------------------------------------------------------------------------------------------------------


def _join_names(names: Sequence[str]) -> str:
    """``["water"] -> "water"``, ``["a", "b"] -> "a and b"``, ``["a", "b", "c"] -> "a, b and c"``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def caption_from_mask(
    mask: np.ndarray | Tensor,
    class_names: Sequence[str],
    templates: Sequence[str],
    rng: np.random.Generator,
    *,
    min_fraction: float = 0.1,
    max_classes: int = 3,
    ignore_index: int = 255,
) -> tuple[str, tuple[str, ...]] | None:
    """A caption naming the classes that cover a labelled sample, largest first.

    Classes covering at least ``min_fraction`` of the labelled pixels are kept (always at least the largest),
    at most ``max_classes`` of them, ordered by decreasing area and joined as ``"a, b and c"``; one template
    drawn with ``rng`` turns the phrase into the caption.

    Args:
        mask: ``(H, W)`` class ids in ``[0, K)`` or ``ignore_index``; ids with an empty name are not named.
        class_names: ``K`` names (id -> words).
        templates: templates with one ``{}`` each.
        rng: the sample's generator.
        min_fraction, max_classes: which classes are named.
        ignore_index: unlabelled pixels.

    Returns:
        ``(caption, names)`` or ``None`` when the sample has no named labelled pixel.

    Raises:
        ValueError: if ``mask`` holds an id outside ``[0, K)`` other than ``ignore_index``.
    """
    values = np.asarray(mask).reshape(-1)
    values = values[values != ignore_index]
    check_class_labels(torch.from_numpy(values.astype(np.int64)), len(class_names), ignore_index=ignore_index,
                       owner="caption_from_mask")
    named = np.array([bool(n) for n in class_names])
    values = values[named[values]] if values.size else values
    if values.size == 0:
        return None
    counts = np.bincount(values, minlength=len(class_names))  # [K]
    order = np.argsort(-counts, kind="stable")
    keep = [int(k) for k in order[:max_classes] if counts[k] >= min_fraction * values.size and counts[k] > 0]
    keep = keep or [int(order[0])]
    names = tuple(class_names[k] for k in keep)
    template = templates[int(rng.integers(len(templates)))]
    return template.format(_join_names(names)), names


class LabelCaptionDataset(Dataset):
    """Adds a caption made from the sample's ``mask`` to every sample of ``dataset`` (labels as captions).

    Keys are passed through, so it wraps a :class:`~dinov3_eo.data.datasets.TileDataset` (``Tile`` keys) as well
    as an int-indexed dataset. ``caption_key`` is the sorted set of named classes, so samples showing the same
    classes are positives of each other in the contrastive loss.

    Args:
        dataset: yields samples with ``mask`` (int64 (H, W)).
        class_names: id -> words (``""`` for ids that must never be named, e.g. "unlabelled").
        templates: prompt templates (``None``: built-in set).
        min_fraction, max_classes, ignore_index: see :func:`caption_from_mask`.
        seed: seed of the template draws.

    Raises:
        KeyError: (on access) if a sample has no ``mask``; ValueError: if it has no named labelled pixel.
    """

    def __init__(
        self,
        *,
        dataset: Any,
        class_names: Sequence[str],
        templates: Sequence[str] | str | None = None,
        min_fraction: float = 0.1,
        max_classes: int = 3,
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        if not any(class_names):
            raise ValueError("LabelCaptionDataset: class_names has no non-empty name.")
        self.dataset, self.class_names = dataset, list(class_names)
        self.templates = load_templates(templates)
        self.min_fraction, self.max_classes, self.ignore_index = min_fraction, max_classes, ignore_index
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the next epoch's templates."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Sample:
        sample = dict(self.dataset[key])
        if "mask" not in sample:
            raise KeyError(f"LabelCaptionDataset: sample {key!r} has no 'mask'; wrap a labelled dataset.")
        made = caption_from_mask(
            sample["mask"], self.class_names, self.templates, _sample_seed(self.seed, self.epoch, key),
            min_fraction=self.min_fraction, max_classes=self.max_classes, ignore_index=self.ignore_index,
        )  # fmt: skip
        if made is None:
            raise ValueError(f"LabelCaptionDataset: sample {key!r} ({sample.get('path')}) has no named labelled pixel.")
        sample["caption"], names = made
        sample["caption_key"] = "|".join(sorted(names))
        return sample


class ChipMaskDataset(Dataset):
    """Non-georeferenced image chips with per-pixel class masks (``images/x.jpg`` + ``masks/x.png``), by int.

    Pairs are matched by file stem (:class:`~dinov3_eo.data.labels.NamePairing`: where several mask folders hold one
    stem, the one named as the image's folder wins). Optionally a random ``crop`` x ``crop`` window is cut per access (seeded by
    ``(seed, epoch, index)``), otherwise the chip is resized to ``size``.

    Args:
        images: glob, folder or list of image paths.
        masks: the mask folder (or folders) holding ``<stem>.png`` per image, or a list of mask files paired with
            a list of ``images`` in order.
        crop: random crop side in pixels (padded with invalid pixels where the chip is smaller).
        size: resize the image (bilinear) and mask (nearest) to ``size`` x ``size`` after the crop.
        remap: mask value -> class id (e.g. ``{5: 255}`` to ignore an "unlabelled" value).
        ignore_index: id for invalid pixels.
        normalization: applied to 0..255 values; ``None`` keeps them raw.
        seed: crop seed.

    Raises:
        FileNotFoundError: if an image has no mask. ValueError: masks that no folder tells apart (both named).
    """

    def __init__(
        self,
        *,
        images: str | Sequence[str],
        masks: str | Sequence[str],
        crop: int | None = None,
        size: int | None = None,
        remap: dict[int, int] | None = None,
        ignore_index: int = 255,
        normalization: Normalization | None = None,
        seed: int = 0,
    ) -> None:
        from dinov3_eo.data.datasets import expand_chips

        mask_sources = [masks] if isinstance(masks, (str, os.PathLike)) else [str(m) for m in masks]
        if all(Path(m).is_file() for m in mask_sources) and not isinstance(images, (str, os.PathLike)):
            # explicit pairs: masks[i] labels images[i]
            if len(mask_sources) != len(images):
                raise ValueError(f"ChipMaskDataset: {len(images)} images but {len(mask_sources)} mask files.")
            self.images, self.masks = [str(Path(p).resolve()) for p in images], [str(Path(m).resolve()) for m in mask_sources]
        else:
            from dinov3_eo.data.chips import pair_chip_masks

            self.images = expand_chips(images)
            # by file stem; where several folders hold one stem (tile1/masks/a.png, tile2/masks/a.png), the folder
            # named as the image's (tile2/images/a.jpg) decides, as label rasters paired by name do
            found = pair_chip_masks(self.images, mask_sources)
            missing = [image for image, mask in zip(self.images, found) if mask is None]
            if missing:
                raise FileNotFoundError(f"ChipMaskDataset: no mask for {missing[:3]} in {mask_sources}.")
            self.masks = [str(mask) for mask in found]
        self.crop, self.size, self.remap, self.ignore_index = crop, size, dict(remap or {}), ignore_index
        self.normalization, self.seed, self.epoch = normalization, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Sample:
        from PIL import Image

        i = int(i)
        pixels = _read_plain_image(self.images[i])
        with Image.open(self.masks[i]) as img:
            mask = np.asarray(img.convert("L") if img.mode not in ("L", "P", "I") else img).astype(np.int64)
        if mask.shape != pixels.shape[1:]:
            raise ValueError(f"ChipMaskDataset: mask {self.masks[i]} is {mask.shape}, image {pixels.shape[1:]}.")
        for value, target in self.remap.items():
            mask[mask == value] = target
        valid = np.ones(mask.shape, dtype=bool)
        if self.crop is not None:
            rng = _sample_seed(self.seed, self.epoch, i)
            c = self.crop
            top = int(rng.integers(max(mask.shape[0] - c, 0) + 1))
            left = int(rng.integers(max(mask.shape[1] - c, 0) + 1))
            out_p = np.zeros((pixels.shape[0], c, c), pixels.dtype)
            out_m = np.full((c, c), self.ignore_index, np.int64)
            out_v = np.zeros((c, c), bool)
            h, w = min(c, mask.shape[0] - top), min(c, mask.shape[1] - left)
            out_p[:, :h, :w] = pixels[:, top : top + h, left : left + w]
            out_m[:h, :w] = mask[top : top + h, left : left + w]
            out_v[:h, :w] = True
            pixels, mask, valid = out_p, out_m, out_v
        image = torch.from_numpy(pixels.astype(np.float32))
        mask_t = torch.from_numpy(mask)
        image, valid_t = _resize(image, torch.from_numpy(valid), self.size)
        if self.size is not None and tuple(mask_t.shape) != (self.size, self.size):
            mask_t = F.interpolate(mask_t[None, None].float(), size=(self.size, self.size), mode="nearest")[0, 0].long()
        mask_t[~valid_t] = self.ignore_index
        return {
            "image": _finish(image, valid_t, self.normalization),
            "valid": valid_t,
            "mask": mask_t,
            "path": self.images[i],
        }


# --------------------------------------------------------------------------------------------------------------
# Data module
# --------------------------------------------------------------------------------------------------------------


class _EpochSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` keys, shuffled with ``(seed, epoch)``; the epoch travels with each key so that
    template draws advance per epoch even inside DataLoader workers (which hold copies of the dataset)."""

    def __init__(self, *, length: int, shuffle: bool, seed: int) -> None:
        self.length, self.shuffle, self.seed, self.epoch = length, shuffle, seed, 0

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        order = rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter([(epoch, int(i)) for i in order])


class _EpochKeyed(Dataset):
    """Reads ``(epoch, index)`` keys: sets the dataset's epoch (template draws), then maps the index to a key."""

    def __init__(self, dataset: Any, keys: Sequence[Any] | None = None) -> None:
        self.dataset, self.keys = dataset, None if keys is None else list(keys)

    def __len__(self) -> int:
        return len(self.keys) if self.keys is not None else len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        epoch, i = key
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        return self.dataset[self.keys[i] if self.keys is not None else i]


class TextDataModule(pl.LightningDataModule):
    """Image-caption batches for ``dinov3-eo text fit`` from exactly one source.

    * ``captions``: a caption table (:func:`read_caption_table`);
    * ``class_folders``: an EuroSAT-style folder; the ``"train"`` split trains, ``"test"`` validates;
    * ``paths`` + ``labels``: labelled GeoTIFF tiles (a label raster or a vector file, as for segmentation)
      whose classes become captions and whose masks feed the optional dense loss; spatial-block train/val split;
    * ``chips`` + ``chip_masks``: image chips without a georeference and their class masks, paired by name and cut
      into ``size`` windows as :class:`~dinov3_eo.data.chips.ChipSegmentationDataModule` does; ``class_names`` is
      required (masks carry no names; ``""`` for an id never to be named, e.g. "unlabelled"); ``val_files`` (globs)
      or a random ``test_fraction`` of the chips validates.

    Images are returned in raw units: the text task normalises them on its device with the backbone's
    normalisation (or ``model.normalization``), so data and model can never disagree.

    Args:
        captions, class_folders, paths, labels, chips, chip_masks: the source (exactly one of the four kinds).
        templates: prompt templates for label sources (``None``: built-in set; list; or a file).
        class_names: label sources: class id -> words. The default: for vector labels the class values in id
            order, for label rasters their ``class_names`` tag (required where they have none).
        label_attribute, classes, background: vector-label settings (see ``DenseDataModule``).
        label_pairing, label_name_suffixes: how label rasters meet the imagery, by georeference or by name (see
            ``DenseDataModule``).
        ignore_index: id of unlabelled pixels.
        min_fraction, max_classes: which classes a label caption names (see :func:`caption_from_mask`).
        test_fraction: class folders: held-out share per class; chips: held-out share of the chips.
        val_files: chips: the chips held out for validation, as globs matched against names or paths.
        mask_colors: chips: class name (as in ``class_names``) -> colour, for colour-coded RGB masks (see
            :class:`~dinov3_eo.data.chips.ChipSegmentationDataModule`).
        bands, nodata: GeoTIFF bands (1-based) and nodata override.
        normalization: the data's own normalisation, used by the task only when neither the task nor the backbone
            gives one: ``zscore``/``percentile`` (from ``stats``, or computed from the GeoTIFFs), a preset name on
            ``preset_range`` raw values, or ``None``.
        stats, preset_range: see ``PretrainDataModule``.
        size: image side fed to the model (chips resized; tiles cut at this size).
        batch_size, num_workers, seed: loader settings.
        cache_dir: raster index cache (labels source).

    Raises:
        ValueError: if not exactly one source is given, or label rasters neither tag nor are given ``class_names``.
    """

    def __init__(
        self,
        *,
        captions: str | None = None,
        class_folders: str | None = None,
        paths: str | list[str] | None = None,
        labels: str | None = None,
        chips: str | list[str] | None = None,
        chip_masks: str | list[str] | None = None,
        templates: list[str] | str | None = None,
        class_names: list[str] | None = None,
        label_attribute: str = "name",
        classes: dict[str, int] | None = None,
        background: int | None = None,
        label_pairing: str = "georeference",
        label_name_suffixes: list[str] | None = None,
        ignore_index: int = 255,
        min_fraction: float = 0.1,
        max_classes: int = 3,
        test_fraction: float = 0.25,
        val_files: list[str] | None = None,
        mask_colors: dict[str, str | list[int]] | None = None,
        bands: list[int] | None = None,
        nodata: float | None = None,
        normalization: str | None = None,
        stats: str | None = None,
        preset_range: tuple[float, float] = (0.0, 255.0),
        size: int = 64,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        given = [name for name, v in (("captions", captions), ("class_folders", class_folders), ("labels", labels),
                                      ("chips", chips)) if v]  # fmt: skip
        if len(given) != 1:
            raise ValueError("TextDataModule: give exactly one of captions=, class_folders=, paths= + labels= or chips= + "
                             f"chip_masks=; got {given or 'none'}.")
        if labels is not None and paths is None:
            raise ValueError("TextDataModule: labels= needs paths= (the imagery it labels).")
        if chips is not None and (chip_masks is None or class_names is None):
            raise ValueError("TextDataModule: chips= needs chip_masks= (their class masks) and class_names= (the words "
                             "for each class id: masks carry no names).")
        # not logged: names such as `normalization`/`templates` also exist on the task, with their own meaning
        self.save_hyperparameters(logger=False)
        self.captions, self.class_folders, self.paths, self.labels_path = captions, class_folders, paths, labels
        self.chips, self.chip_masks, self.val_files = chips, chip_masks, list(val_files or [])
        self.mask_colors = mask_colors
        self.templates = load_templates(templates)
        self.class_names = list(class_names) if class_names is not None else None
        self.label_attribute, self.classes, self.background = label_attribute, classes, background
        self.label_pairing, self.label_name_suffixes = label_pairing, label_name_suffixes
        self.ignore_index, self.min_fraction, self.max_classes = ignore_index, min_fraction, max_classes
        self.test_fraction, self.bands, self.nodata, self.size = test_fraction, bands, nodata, size
        self.normalization_mode, self.stats, self.preset_range = normalization, stats, tuple(preset_range)
        self.batch_size, self.num_workers, self.seed, self.cache_dir = batch_size, num_workers, seed, cache_dir
        #: the data's own normalisation, if it has one (raw units otherwise; the task decides)
        self.normalization: Normalization | None = None
        self.band_names: list[str] | None = None
        self.gsd: float | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.captions is not None:
            self.train_set = CaptionTableDataset(table=self.captions, size=self.size, bands=self.bands, nodata=self.nodata)
        elif self.class_folders is not None:
            common = {"root": self.class_folders, "templates": self.templates, "test_fraction": self.test_fraction,
                      "split_seed": self.seed, "size": self.size, "seed": self.seed}  # fmt: skip
            self.train_set = ClassFolderCaptionDataset(split="train", **common)
            self.val_set = ClassFolderCaptionDataset(split="test", **common)
            self.class_names = list(self.train_set.classes)
            self.band_names = ["red", "green", "blue"]
        elif self.chips is not None:
            self._setup_chips()
            return
        else:
            self._setup_labels()
            return
        if self.normalization_mode is not None:
            from dinov3_eo.data.datamodule import build_normalization

            self.normalization = build_normalization(self.normalization_mode, stats=self.stats, preset_range=self.preset_range)

    def _setup_labels(self) -> None:
        from dinov3_eo.data.datamodule import DenseDataModule
        from dinov3_eo.data.labels import VectorLabels

        dense = DenseDataModule(
            paths=self.paths, labels=self.labels_path, label_attribute=self.label_attribute, classes=self.classes,
            background=self.background, label_pairing=self.label_pairing, label_name_suffixes=self.label_name_suffixes,
            ignore_index=self.ignore_index, bands=self.bands, nodata=self.nodata,
            normalization="none", tile_size=self.size, batch_size=self.batch_size, seed=self.seed, cache_dir=self.cache_dir,
            max_nodata_fraction=0.5,
        )  # fmt: skip
        dense.setup("fit")
        if self.normalization_mode is not None:
            from dinov3_eo.data.datamodule import build_normalization

            self.normalization = build_normalization(
                self.normalization_mode, index=dense.index, stats=self.stats, nodata=self.nodata,
                preset_range=self.preset_range, seed=self.seed,
            )  # fmt: skip
        source = dense.label_source
        if self.class_names is None:
            if isinstance(source, VectorLabels):
                by_id = {v: k for k, v in source.classes.items()}
            elif source.class_names:  # the label raster's own class_names tag
                by_id = source.class_names
            else:
                raise ValueError(f"TextDataModule: label raster {self.labels_path} names no classes (no class_names "
                                 "tag): give class_names= (id -> words).")
            self.class_names = [humanize_class_name(by_id.get(i, "")) for i in range(max(by_id) + 1)]
            log.info("Class names from the labels: %s.", ", ".join(self.class_names))
        captioned = LabelCaptionDataset(
            dataset=dense.dataset, class_names=self.class_names, templates=self.templates, min_fraction=self.min_fraction,
            max_classes=self.max_classes, ignore_index=self.ignore_index, seed=self.seed,
        )  # fmt: skip
        train = [t for t in dense.train_tiles if self._has_named_label(dense, t)]
        val = [t for t in dense.val_tiles if self._has_named_label(dense, t)]
        if not train:
            raise ValueError(f"TextDataModule: no tile of {self.paths} holds a named label from {self.labels_path}.")
        self.train_set = _EpochKeyed(captioned, train)
        self.val_set = _EpochKeyed(captioned, val) if val else None
        if not val:
            log.warning("TextDataModule: no validation tile of %s holds a named label (the spatial split put every "
                        "labelled tile in training); the fit runs without validation.", self.paths)
        self.band_names = dense.band_names
        self.num_classes = len(self.class_names)

    def _setup_chips(self) -> None:
        from dinov3_eo.data.chips import ChipSegmentationDataModule

        chips = ChipSegmentationDataModule(
            images=self.chips, masks=self.chip_masks, label_name_suffixes=self.label_name_suffixes,
            ignore_index=self.ignore_index, bands=self.bands, normalization=self.normalization_mode or "none",
            stats=self.stats, preset_range=self.preset_range, tile_size=self.size, val_files=self.val_files,
            val_fraction=self.test_fraction, seed=self.seed, mask_colors=self.mask_colors,
            classes={name: i for i, name in enumerate(self.class_names) if name} if self.mask_colors else None,
        )  # fmt: skip
        chips.setup("fit")
        self.normalization, self.band_names = chips.normalization, chips.band_names
        for split in ("train", "val"):
            windows = chips.dataset(split, normalize=False)  # raw units: the task normalises on its device
            named = self._named_windows(windows)
            captioned = LabelCaptionDataset(
                dataset=windows, class_names=self.class_names, templates=self.templates, min_fraction=self.min_fraction,
                max_classes=self.max_classes, ignore_index=self.ignore_index, seed=self.seed,
            )  # fmt: skip
            keyed = _EpochKeyed(captioned, named) if named else None
            if split == "train":
                if keyed is None:
                    raise ValueError(f"TextDataModule: no window of the chips {self.chips} holds a class named in "
                                     f"class_names {self.class_names}.")
                self.train_set = keyed
            else:
                self.val_set = keyed
        self.num_classes = len(self.class_names)

    def _named_windows(self, windows: Any) -> list[int]:
        """Indices of the chip windows whose labelled pixels with data hold a class ``class_names`` names (the others
        could not be captioned); each chip decoded once, through the windows' own cache."""
        from tqdm.auto import tqdm

        named, s, chip, labels = [], windows.size, None, None
        progress = tqdm(windows.windows, desc="windows with a named class", unit="window", mininterval=2.0)
        for i, window in enumerate(progress):  # a chip's windows are consecutive
            if window.chip != chip:
                chip, labels = window.chip, windows.labels(window.chip)
            part = labels[window.top : window.top + s, window.left : window.left + s]
            ids = np.unique(part[part != self.ignore_index])
            if any(0 <= k < len(self.class_names) and self.class_names[k] for k in ids):
                named.append(i)
        return named

    def _has_named_label(self, dense: Any, tile: Any) -> bool:
        grid = dense.dataset.grid
        labels = dense.label_source.sample(
            crs=grid.grids[tile.file].crs, transform=grid.tile_transform(tile), shape=(tile.size, tile.size)
        )["mask"].numpy()
        ids = np.unique(labels[labels != self.ignore_index])
        return any(0 <= i < len(self.class_names) and self.class_names[i] for i in ids)

    def _loader(self, dataset: Dataset, *, shuffle: bool) -> DataLoader:
        keyed = dataset if isinstance(dataset, _EpochKeyed) else _EpochKeyed(dataset)
        return DataLoader(
            keyed,
            batch_size=self.batch_size,
            sampler=_EpochSampler(length=len(keyed), shuffle=shuffle, seed=self.seed),
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            drop_last=shuffle and len(keyed) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup("fit")
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def metadata(self) -> dict[str, Any]:
        """Bands, normalisation and GSD of the data (``BackboneMeta`` fields)."""
        return {
            "bands": self.band_names,
            "normalization": None if self.normalization is None else self.normalization.to_dict(),
            "gsd": self.gsd,
        }
