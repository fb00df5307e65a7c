"""GeoTIFF-aware data: archive index, windowed reads, tile samplers, statistics, datasets, datamodules."""

import importlib
from typing import Any

# Lazy exports: importing one submodule (e.g. normalization) must not pull in Lightning.
_EXPORTS: dict[str, str] = {
    "BandMismatchError": "dinov3_eo.data.index",
    "BandStats": "dinov3_eo.data.stats",
    "ChipCrop": "dinov3_eo.data.sampling",
    "ChipFolderDataset": "dinov3_eo.data.datasets",
    "ChipSampler": "dinov3_eo.data.sampling",
    "ChipSegmentationDataModule": "dinov3_eo.data.chips",
    "DenseDataModule": "dinov3_eo.data.datamodule",
    "GridTileSampler": "dinov3_eo.data.sampling",
    "IndexProblem": "dinov3_eo.data.index",
    "InterleavedSampler": "dinov3_eo.data.sampling",
    "MixedDataset": "dinov3_eo.data.datasets",
    "Normalization": "dinov3_eo.data.normalization",
    "PretrainDataModule": "dinov3_eo.data.datamodule",
    "RandomTileSampler": "dinov3_eo.data.sampling",
    "RasterArchiveError": "dinov3_eo.data.index",
    "RasterIndex": "dinov3_eo.data.index",
    "RasterLabels": "dinov3_eo.data.labels",
    "RasterRecord": "dinov3_eo.data.index",
    "RasterStack": "dinov3_eo.data.stack",
    "ThreadedTileLoader": "dinov3_eo.data.loader",
    "Tile": "dinov3_eo.data.sampling",
    "TileDataset": "dinov3_eo.data.datasets",
    "TileGrid": "dinov3_eo.data.sampling",
    "TileListSampler": "dinov3_eo.data.sampling",
    "TileReader": "dinov3_eo.data.datasets",
    "VectorLabels": "dinov3_eo.data.labels",
    "build_normalization": "dinov3_eo.data.datamodule",
    "collate_samples": "dinov3_eo.data.datasets",
    "compute_band_stats": "dinov3_eo.data.stats",
    "files_matching": "dinov3_eo.data.datamodule",
    "grid_tiles": "dinov3_eo.data.sampling",
    "read_window": "dinov3_eo.data.raster",
    "spatial_block_split": "dinov3_eo.data.sampling",
}

__all__ = [
    "BandMismatchError",
    "BandStats",
    "ChipCrop",
    "ChipFolderDataset",
    "ChipSampler",
    "ChipSegmentationDataModule",
    "DenseDataModule",
    "GridTileSampler",
    "IndexProblem",
    "InterleavedSampler",
    "MixedDataset",
    "Normalization",
    "PretrainDataModule",
    "RandomTileSampler",
    "RasterArchiveError",
    "RasterIndex",
    "RasterLabels",
    "RasterRecord",
    "RasterStack",
    "ThreadedTileLoader",
    "Tile",
    "TileDataset",
    "TileGrid",
    "TileListSampler",
    "TileReader",
    "VectorLabels",
    "build_normalization",
    "collate_samples",
    "compute_band_stats",
    "files_matching",
    "grid_tiles",
    "read_window",
    "spatial_block_split",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
