
"""GeoTIFF-aware data: archive index, windowed reads, tile samplers, statistics, datasets, datamodules."""

from dinov3_eo.data.datamodule import DenseDataModule, PretrainDataModule, build_normalization
from dinov3_eo.data.datasets import ChipFolderDataset, MixedDataset, TileDataset, TileReader, collate_samples
from dinov3_eo.data.index import BandMismatchError, IndexProblem, RasterArchiveError, RasterIndex, RasterRecord
from dinov3_eo.data.labels import RasterLabels, VectorLabels
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import read_window
from dinov3_eo.data.sampling import (
    ChipSampler,
    GridTileSampler,
    InterleavedSampler,
    RandomTileSampler,
    Tile,
    TileGrid,
    TileListSampler,
    spatial_block_split,
)
from dinov3_eo.data.stats import BandStats, compute_band_stats

__all__ = [
    "BandMismatchError",
    "BandStats",
    "ChipFolderDataset",
    "ChipSampler",
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
    "Tile",
    "TileDataset",
    "TileGrid",
    "TileListSampler",
    "TileReader",
    "VectorLabels",
    "build_normalization",
    "collate_samples",
    "compute_band_stats",
    "read_window",
    "spatial_block_split",
]
