"""Lightning data modules: tiles (and chips) for pretraining, labelled tiles for dense tasks.

Both take plain keyword arguments, so a YAML ``data: class_path: ... init_args: ...`` block maps
one-to-one onto the constructor (LightningCLI / jsonargparse). Each wires one sampler per split; the
samplers are distributed-aware themselves (see :mod:`dinov3_eo.data.sampling`), so Lightning keeps
them as they are under DDP.

Normalisation is decided once in ``setup`` and exposed as :attr:`normalization` (with
:attr:`band_names` and :attr:`gsd`) for the training module to store in every checkpoint.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from dinov3_eo.data.datasets import ChipFolderDataset, MixedDataset, TileDataset, collate_samples
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.labels import PAIRINGS, RasterLabels, VectorLabels, is_geodataframe, is_raster_labels
from dinov3_eo.data.loader import ThreadedTileLoader
from dinov3_eo.data.normalization import RGB_PRESETS, Normalization
from dinov3_eo.data.raster import pixel_size_m
from dinov3_eo.data.sampling import (
    ChipSampler,
    InterleavedSampler,
    RandomTileSampler,
    TileGrid,
    TileListSampler,
    _TileSamplerBase,
    grid_tiles,
    spatial_block_split,
)
from dinov3_eo.data.stats import BandStats, compute_band_stats

NORMALIZATION_MODES = ("zscore", "percentile", "none", *RGB_PRESETS)
WORKER_TYPES = ("process", "thread")


def build_normalization(
    mode: str,
    *,
    index: RasterIndex | None = None,
    stats: str | BandStats | None = None,
    nodata: float | None = None,
    scale: float | Sequence[float] | None = None,
    offset: float | Sequence[float] | None = None,
    preset_range: tuple[float, float] = (0.0, 255.0),
    stats_windows: int = 64,
    seed: int = 0,
) -> Normalization | None:
    """The :class:`Normalization` for ``mode``: statistics-based modes use ``stats`` (a stats.json path
    or :class:`BandStats`), computing them from ``index`` when absent; presets map ``preset_range`` to [0, 1].

    Raises:
        ValueError: for an unknown mode, or a statistics mode with neither ``stats`` nor ``index``.
    """
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"normalization must be one of {NORMALIZATION_MODES}, got {mode!r}.")
    if mode == "none":
        return None
    if mode in RGB_PRESETS:
        return Normalization.preset(mode, low=preset_range[0], high=preset_range[1])
    if stats is None:
        if index is None:
            raise ValueError(f"normalization={mode!r} needs stats= (a stats.json) or an archive to compute them from.")
        stats = compute_band_stats(index, nodata=nodata, scale=scale, offset=offset, num_windows=stats_windows, seed=seed, progress=False)
    elif not isinstance(stats, BandStats):
        stats = BandStats.load(stats)
    return stats.normalization(mode)


def files_matching(paths: Sequence[str], patterns: Sequence[str], what: str = "patterns") -> list[int]:
    """Indices of the ``paths`` whose file name or full path matches one of the glob ``patterns``.

    Raises:
        ValueError: if ``patterns`` are given and match none of ``paths`` (named: ``what`` says which setting).
    """
    if not patterns:
        return []
    found = [i for i, path in enumerate(paths)
             if any(fnmatch.fnmatch(os.path.basename(path), p) or fnmatch.fnmatch(path, p) for p in patterns)]  # fmt: skip
    if not found:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        raise ValueError(f"{what} {list(patterns)} match none of the images ({shown}).")
    return found


def held_out_files(paths: Sequence[str], val_files: Sequence[str], test_files: Sequence[str], *,
                   owner: str) -> tuple[list[int], set[int], set[int]]:  # fmt: skip
    """Indices of the ``paths`` to train on, and the sets that ``val_files`` and ``test_files`` (globs, as
    :func:`files_matching`) hold out.

    Raises:
        ValueError: a path both match, or none left to train on (``owner`` names the data module).
    """
    val = set(files_matching(paths, val_files, "val_files"))
    test = set(files_matching(paths, test_files, "test_files"))
    if both := sorted(val & test):
        raise ValueError(f"{owner}: {paths[both[0]]} matches both val_files {list(val_files)} and test_files "
                         f"{list(test_files)}.")
    training = [i for i in range(len(paths)) if i not in val | test]
    if not training:
        raise ValueError(f"{owner}: val_files {list(val_files)} and test_files {list(test_files)} hold out every "
                         "image; none is left to train on.")
    return training, val, test


class _TileDataModuleBase(pl.LightningDataModule):
    def _check_worker_type(self) -> None:
        if self.worker_type not in WORKER_TYPES:
            raise ValueError(f"worker_type must be one of {WORKER_TYPES}, got {self.worker_type!r}.")

    def _dataloader(self, dataset, sampler) -> DataLoader | ThreadedTileLoader:
        if self.worker_type == "thread" and self.num_workers > 0:
            return ThreadedTileLoader(
                dataset, sampler=sampler, batch_size=self.batch_size, num_threads=self.num_workers,
                collate_fn=collate_samples, pin_memory=self.pin_memory,
            )  # fmt: skip
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _build_grid(self) -> TileGrid:
        self.index = RasterIndex.build(self.paths, bands=self.bands, strict=self.strict, cache_dir=self.cache_dir)
        return TileGrid(index=self.index, tile_size=self.tile_size, units=self.units, gsd=self.gsd, crs=self.crs, resampling=self.resampling)

    @property
    def band_names(self) -> list[str] | None:
        index = getattr(self, "index", None)
        return None if index is None else index.band_names

    @property
    def training_gsd(self) -> float | None:
        """Metres per pixel of what the model sees: ``gsd`` where tiles are resampled to it, else the archive's own
        pixel size when every file shares one in a projected CRS (``None`` otherwise, or before :meth:`setup`).
        Checkpoints record it, so that inference can tell a scene at another scale."""
        if self.gsd is not None:
            return float(self.gsd)
        index = getattr(self, "index", None)
        if index is None:
            return None
        # one CRS parse per distinct (CRS, pixel width), not per file: archives hold tens of thousands of files
        grids = {(record.crs_wkt, record.transform[0]): record for record in index.records}
        sizes = {pixel_size_m(record.crs, record.affine) for record in grids.values()}
        if len(sizes) != 1 or None in sizes:
            return None
        (size,) = sizes
        return round(size, 6)

    def metadata(self) -> dict[str, Any]:
        """Bands, normalisation and GSD for checkpoint metadata (``BackboneMeta`` fields)."""
        return {
            "bands": self.band_names,
            "normalization": None if self.normalization is None else self.normalization.to_dict(),
            "gsd": self.training_gsd,
        }


class PretrainDataModule(_TileDataModuleBase):
    """Unlabelled tiles from a GeoTIFF archive, optionally mixed with plain image chips.

    Args:
        paths: GeoTIFF files, folders or globs (``None`` for chips only).
        chips: glob/folder of non-georeferenced image chips (EuroSAT-style) to mix in; resized to the tile size.
        chips_crop: instead of resizing each chip, cut one tile-size window of it at its own resolution, placed at
            random anew each epoch (large aerial photos keep their detail; a chip smaller than the tile is still
            resized whole).
        bands: 1-based band indexes or band names to read (needed for archives with mixed band counts).
        nodata: nodata override for every file (e.g. 0 for a Landsat L1 collar).
        scale, offset: DN -> physical conversion before normalisation.
        normalization: ``zscore``/``percentile`` (from ``stats`` or computed in ``setup``), a preset
            (``sat493m``, ``imagenet``, ``chmv2``; raw values in ``preset_range`` map to [0, 1]) or ``none``.
        stats: path to a ``dinov3-eo stats`` JSON.
        preset_range: raw value range for presets, e.g. ``[0, 10000]`` for reflectance ×10⁴.
        chips_normalization: normalisation of 8-bit chips (a preset name, on 0..255).
        tile_size, units, gsd, crs, resampling: the tile grid (see :class:`~dinov3_eo.data.sampling.TileGrid`).
        tiles_per_epoch: random tiles per epoch over all ranks.
        max_nodata_fraction: reject tiles with more estimated nodata.
        snap: snap random tile offsets to multiples of this many pixels (e.g. the GeoTIFF block size,
            256, for ~2-4x less decoding per tile; see :class:`~dinov3_eo.data.sampling.RandomTileSampler`).
        batch_size, num_workers, pin_memory: DataLoader settings.
        worker_type: ``"thread"`` (default: a :class:`~dinov3_eo.data.loader.ThreadedTileLoader` with
            ``num_workers`` reading threads in the training process, no shared-memory hand-over per batch) or
            ``"process"`` (a ``DataLoader`` with ``num_workers`` worker processes); ``num_workers=0`` reads in the
            main thread either way. Threads are the default because they read 1.5-2.3x more tiles/s and, beside a
            training thread that holds the GIL (as eager GPU kernel launches do), slowed it no more than worker
            processes did (``scripts/bench_data.py``, README "Measured").
        seed: seeds the samplers (mixed with the epoch).
        strict: fail on unusable archive files instead of skipping them.
        cache_dir: index cache location (``"default"``, a path, or ``None`` for no cache).
        stats_windows: windows used when statistics are computed in ``setup``.
        rank, world_size: overrides of torch.distributed (normally left unset).
    """

    def __init__(
        self,
        *,
        paths: str | list[str] | None = None,
        chips: str | list[str] | None = None,
        bands: list[int | str] | None = None,
        nodata: float | None = None,
        scale: float | list[float] | None = None,
        offset: float | list[float] | None = None,
        normalization: str = "zscore",
        stats: str | None = None,
        preset_range: tuple[float, float] = (0.0, 255.0),
        chips_normalization: str = "sat493m",
        chips_crop: bool = False,
        tile_size: float = 256,
        units: str = "pixels",
        gsd: float | None = None,
        crs: str | None = None,
        resampling: str = "bilinear",
        tiles_per_epoch: int = 1024,
        max_nodata_fraction: float = 0.5,
        snap: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_type: str = "thread",
        seed: int = 0,
        strict: bool = False,
        cache_dir: str | None = "default",
        stats_windows: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if paths is None and chips is None:
            raise ValueError("PretrainDataModule: give paths= (GeoTIFFs), chips= (image chips) or both.")
        self.save_hyperparameters()
        self.paths, self.chips, self.bands, self.nodata = paths, chips, bands, nodata
        self.scale, self.offset, self.normalization_mode, self.stats = scale, offset, normalization, stats
        self.preset_range, self.chips_normalization = tuple(preset_range), chips_normalization
        self.chips_crop = chips_crop
        self.tile_size, self.units, self.gsd, self.crs, self.resampling = tile_size, units, gsd, crs, resampling
        self.tiles_per_epoch, self.max_nodata_fraction, self.snap = tiles_per_epoch, max_nodata_fraction, snap
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.worker_type = worker_type
        self._check_worker_type()
        self.strict, self.cache_dir, self.stats_windows = strict, cache_dir, stats_windows
        self.rank, self.world_size = rank, world_size
        self.normalization: Normalization | None = None
        self.dataset: MixedDataset | None = None
        self.sampler: _TileSamplerBase | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        tiles = chips = None
        samplers: list[_TileSamplerBase] = []
        if self.paths is not None:
            grid = self._build_grid()
            self.normalization = build_normalization(
                self.normalization_mode, index=self.index, stats=self.stats, nodata=self.nodata, scale=self.scale,
                offset=self.offset, preset_range=self.preset_range, stats_windows=self.stats_windows, seed=self.seed,
            )  # fmt: skip
            tiles = TileDataset(grid=grid, nodata=self.nodata, scale=self.scale, offset=self.offset, normalization=self.normalization)
            samplers.append(
                RandomTileSampler(
                    grid=grid, length=self.tiles_per_epoch, nodata=self.nodata, max_nodata_fraction=self.max_nodata_fraction,
                    snap=self.snap, seed=self.seed, rank=self.rank, world_size=self.world_size,
                )  # fmt: skip
            )
            chip_size = grid.tile_px
        else:
            chip_size = int(self.tile_size)
        if self.chips is not None:
            chip_norm = Normalization.preset(self.chips_normalization) if self.chips_normalization != "none" else None
            chips = ChipFolderDataset(chips=self.chips, normalization=chip_norm, size=chip_size)
            if tiles is not None and tiles.grid.index.num_bands != 3:
                raise ValueError(f"PretrainDataModule: chips are RGB but the archive selection has {tiles.grid.index.num_bands} bands.")
            if self.normalization is None and tiles is None:
                self.normalization = chip_norm
            crop = {"crop": chip_size, "sizes": chips.sizes()} if self.chips_crop else {}
            samplers.append(ChipSampler(num_chips=len(chips), seed=self.seed, rank=self.rank, world_size=self.world_size, **crop))
        self.dataset = MixedDataset(tiles=tiles, chips=chips)
        self.sampler = samplers[0] if len(samplers) == 1 else InterleavedSampler(samplers=samplers, seed=self.seed)

    def train_dataloader(self) -> DataLoader | ThreadedTileLoader:
        self.setup("fit")
        return self._dataloader(self.dataset, self.sampler)


class DenseDataModule(_TileDataModuleBase):
    """Labelled tiles for segmentation or regression, split into train/val by spatial blocks.

    Args:
        paths: GeoTIFF files, folders or globs (the imagery).
        labels: a label raster (any CRS/resolution), a folder or glob of label rasters (one mask per image, matched
            to the imagery by georeference or by name: :class:`~dinov3_eo.data.labels.RasterLabels`), a vector file
            (``.gpkg``, ``.geojson``, ``.shp``...) or, from Python, a ``geopandas.GeoDataFrame`` (with a CRS; the
            hyper-parameters a checkpoint keeps then say ``"<GeoDataFrame, N rows>"``, not the frame).
        label_pairing: ``"georeference"`` (default: a tile reads every mask whose footprint meets it) or ``"name"``
            (each image reads the mask of its own file name: masks of several dates over one place, masks without
            a georeference; images without a mask are left out, with a warning).
        label_name_suffixes: with ``label_pairing="name"``, suffixes dropped from image and mask stems before they
            are compared (``["_RGB", "_label"]``).
        task: ``"classification"`` (``mask`` key) or ``"regression"`` (``target`` key; raster labels only).
        label_attribute: vector column with the class; ``classes`` maps its values to ids.
        classes: class name/value -> id for vector labels (default: sorted unique values).
        background: id for image pixels no polygon covers (``None`` = ignore them).
        label_nodata: nodata override of a label raster.
        ignore_index: id written where there is no label.
        bands, nodata, scale, offset, normalization, stats, preset_range: as for :class:`PretrainDataModule`.
        tile_size, units, gsd, crs, resampling: the tile grid.
        block_tiles: side of a spatial block in tiles; val_fraction: share of blocks used for validation.
        val_files: imagery files held out whole for validation, as globs matched against each file's name or full
            path (``["TEAK_052.tif"]``, ``["*/val/*"]``: a benchmark's own split, a region split by plot); when
            ``None``, validation is spatial blocks of ``block_tiles`` tiles (``val_fraction`` of them).
        test_files: imagery files held out whole for testing, as ``val_files``: no fit reads them, ``test`` (``dinov3-eo
            segment test --ckpt_path ...``) scores on them. Statistics for the normalisation come from the training
            files alone where files are held out.
        max_nodata_fraction: drop tiles with more estimated image nodata.
        batch_size, num_workers, pin_memory, worker_type, seed, strict, cache_dir, stats_windows, rank, world_size: as above.

    Raises:
        ValueError: in ``setup``, ``val_files``/``test_files`` that match no image, or an image both match.
    """

    def __init__(
        self,
        *,
        paths: str | list[str],
        labels: str | Any,
        label_pairing: str = "georeference",
        label_name_suffixes: list[str] | None = None,
        task: str = "classification",
        label_attribute: str = "name",
        classes: dict[str, int] | None = None,
        background: int | None = None,
        label_nodata: float | None = None,
        ignore_index: int = 255,
        bands: list[int | str] | None = None,
        nodata: float | None = None,
        scale: float | list[float] | None = None,
        offset: float | list[float] | None = None,
        normalization: str = "zscore",
        stats: str | None = None,
        preset_range: tuple[float, float] = (0.0, 255.0),
        tile_size: float = 256,
        units: str = "pixels",
        gsd: float | None = None,
        crs: str | None = None,
        resampling: str = "bilinear",
        block_tiles: int = 4,
        val_fraction: float = 0.2,
        val_files: list[str] | None = None,
        test_files: list[str] | None = None,
        max_nodata_fraction: float = 0.9,
        batch_size: int = 8,
        num_workers: int = 0,
        pin_memory: bool = False,
        worker_type: str = "thread",
        seed: int = 0,
        strict: bool = False,
        cache_dir: str | None = "default",
        stats_windows: int = 64,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        if is_geodataframe(labels):
            # a frame would travel into every checkpoint's hyper-parameters (and not load with weights_only)
            self.save_hyperparameters(ignore=["labels"])
            self.hparams["labels"] = f"<GeoDataFrame, {len(labels)} rows>"
        else:
            self.save_hyperparameters()
        self.paths, self.labels_path, self.task, self.label_attribute = paths, labels, task, label_attribute
        self.classes, self.background, self.label_nodata, self.ignore_index = classes, background, label_nodata, ignore_index
        if label_pairing not in PAIRINGS:
            raise ValueError(f"DenseDataModule: label_pairing must be one of {PAIRINGS}, got {label_pairing!r}.")
        self.label_pairing, self.label_name_suffixes = label_pairing, list(label_name_suffixes or [])
        self.bands, self.nodata, self.scale, self.offset = bands, nodata, scale, offset
        self.normalization_mode, self.stats, self.preset_range = normalization, stats, tuple(preset_range)
        self.tile_size, self.units, self.gsd, self.crs, self.resampling = tile_size, units, gsd, crs, resampling
        self.block_tiles, self.val_fraction, self.max_nodata_fraction = block_tiles, val_fraction, max_nodata_fraction
        self.val_files, self.test_files = list(val_files or []), list(test_files or [])
        self.batch_size, self.num_workers, self.pin_memory, self.seed = batch_size, num_workers, pin_memory, seed
        self.worker_type = worker_type
        self._check_worker_type()
        self.strict, self.cache_dir, self.stats_windows = strict, cache_dir, stats_windows
        self.rank, self.world_size = rank, world_size
        self.normalization: Normalization | None = None
        self.dataset: TileDataset | None = None

    def _labels(self) -> RasterLabels | VectorLabels:
        if not is_geodataframe(self.labels_path) and is_raster_labels(self.labels_path):
            return RasterLabels(path=self.labels_path, task=self.task, nodata=self.label_nodata,
                                ignore_index=self.ignore_index, pairing=self.label_pairing,
                                name_suffixes=self.label_name_suffixes)  # fmt: skip
        if self.label_pairing != "georeference":
            raise ValueError(f"DenseDataModule: label_pairing={self.label_pairing!r} pairs label rasters with images; "
                             f"the vector labels {self.hparams['labels']} are matched by georeference.")
        if self.task != "classification":
            raise ValueError(f"DenseDataModule: vector labels ({self.hparams['labels']}) support task='classification' "
                             "only.")
        return VectorLabels(
            path=self.labels_path, attribute=self.label_attribute, classes=self.classes,
            ignore_index=self.ignore_index, background=self.background,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        grid = self._build_grid()
        self.label_source = self._labels()
        paths = [record.path for record in self.index.records]
        training, val_files, test_files = held_out_files(paths, self.val_files, self.test_files, owner="DenseDataModule")
        # statistics of the files the model trains on: held-out files would leak into the normalisation
        stats_index = self.index if len(training) == len(paths) else self.index.subset(training)
        self.normalization = build_normalization(
            self.normalization_mode, index=stats_index, stats=self.stats, nodata=self.nodata, scale=self.scale,
            offset=self.offset, preset_range=self.preset_range, stats_windows=self.stats_windows, seed=self.seed,
        )  # fmt: skip
        self.dataset = TileDataset(
            grid=grid, nodata=self.nodata, scale=self.scale, offset=self.offset, normalization=self.normalization, labels=self.label_source
        )
        tiles = {"nodata": self.nodata, "max_nodata_fraction": self.max_nodata_fraction}
        if val_files:
            self.train_tiles = grid_tiles(grid, files=training, **tiles)
            self.val_tiles = grid_tiles(grid, files=sorted(val_files), **tiles)
        else:
            self.train_tiles, self.val_tiles = spatial_block_split(
                grid, block_tiles=self.block_tiles, val_fraction=self.val_fraction, seed=self.seed, files=training, **tiles
            )  # fmt: skip
        self.test_tiles = grid_tiles(grid, files=sorted(test_files), **tiles)
        if getattr(self.label_source, "pairing", "georeference") == "name":
            # an image without a mask of its name has no labels at all: its tiles would only cost reading time
            pairs = self.label_source.mosaic.pair_all(paths)
            paired = {i for i, pair in enumerate(pairs) if pair is not None}
            self.train_tiles = [t for t in self.train_tiles if t.file in paired]
            self.val_tiles = [t for t in self.val_tiles if t.file in paired]
            self.test_tiles = [t for t in self.test_tiles if t.file in paired]

    @property
    def num_classes(self) -> int | None:
        source = getattr(self, "label_source", None)
        if isinstance(source, VectorLabels):
            return max(source.classes.values()) + 1
        return None

    @property
    def class_names(self) -> dict[int, str]:
        """Class id -> name as the labels give them (vector class names, a label raster's ``class_names`` tag)."""
        return dict(getattr(getattr(self, "label_source", None), "class_names", {}) or {})

    @property
    def class_colors(self) -> dict[int, tuple[int, int, int]]:
        """Class id -> RGB as the labels give them (a ``color`` column, a label raster's colour table)."""
        return dict(getattr(getattr(self, "label_source", None), "class_colors", {}) or {})

    def class_pixel_counts(self, num_classes: int, *, progress: bool = True) -> np.ndarray:
        """Labelled pixels of each class id ``0..num_classes-1`` over every training tile, as training reads them
        (pixels of image nodata and unlabelled pixels left out): what ``class_weights: balanced`` weighs by.

        One pass over the training tiles (images and labels, read by ``num_workers`` as training reads them; every
        process of a multi-GPU run counts all tiles, so all get the same counts).

        Returns:
            [K] int64 counts.

        Raises:
            ValueError: for regression labels, or a labelled value outside ``0..num_classes-1``.
        """
        from tqdm.auto import tqdm

        from dinov3_eo.losses.cross_entropy import check_class_labels

        if self.task != "classification":
            raise ValueError("DenseDataModule: class counts need task='classification' labels.")
        self.setup("fit")
        sampler = TileListSampler(tiles=self.train_tiles, shuffle=False, seed=self.seed, rank=0, world_size=1)
        counts = np.zeros(num_classes, dtype=np.int64)
        for batch in tqdm(self._dataloader(self.dataset, sampler), total=-(-len(self.train_tiles) // self.batch_size),
                          unit="batch", desc="class counts", disable=not progress):  # fmt: skip
            mask = batch["mask"]
            check_class_labels(mask, num_classes, ignore_index=self.ignore_index, owner=f"DenseDataModule ({self.labels_path})")
            labelled = mask[mask != self.ignore_index].long()
            counts += torch.bincount(labelled, minlength=num_classes).numpy()
        return counts

    def train_dataloader(self) -> DataLoader | ThreadedTileLoader:
        self.setup("fit")
        sampler = TileListSampler(tiles=self.train_tiles, shuffle=True, seed=self.seed, rank=self.rank, world_size=self.world_size)
        return self._dataloader(self.dataset, sampler)

    def val_dataloader(self) -> DataLoader | ThreadedTileLoader:
        self.setup("fit")
        sampler = TileListSampler(tiles=self.val_tiles, shuffle=False, seed=self.seed, rank=self.rank, world_size=self.world_size)
        return self._dataloader(self.dataset, sampler)

    def test_dataloader(self) -> DataLoader | ThreadedTileLoader:
        """Every tile of the ``test_files``.

        Raises:
            ValueError: without ``test_files``, or where they have no tile left (all nodata, or no mask of their name).
        """
        self.setup("test")
        if not self.test_files:
            raise ValueError("DenseDataModule: testing needs test_files= (--data.test_files): the imagery files held "
                             "out for the test, which no fit trains or validates on.")
        if not self.test_tiles:
            raise ValueError(f"DenseDataModule: the test_files {self.test_files} have no tile with image data "
                             f"{'and a mask of their name ' if self.label_pairing == 'name' else ''}to test on.")
        sampler = TileListSampler(tiles=self.test_tiles, shuffle=False, seed=self.seed, rank=self.rank, world_size=self.world_size)
        return self._dataloader(self.dataset, sampler)
