"""Tile grids and samplers: geometry agrees with rasterio, reproducible, disjoint across ranks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch.distributed as dist
from rasterio.transform import from_origin
from rasterio.windows import bounds as window_bounds

from dinov3_eo.data.datasets import TileReader
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.sampling import (
    ChipSampler,
    GridTileSampler,
    InterleavedSampler,
    RandomTileSampler,
    Tile,
    TileGrid,
    TileListSampler,
    distributed_rank_world,
)

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


@pytest.fixture(scope="module")
def index() -> RasterIndex:
    return RasterIndex.build(SAMPLE, cache_dir=None)


@pytest.fixture()
def half_empty(tmp_path: Path) -> Path:
    """A 200x200 raster whose left half is nodata (0)."""
    data = np.full((1, 200, 200), 500, dtype="uint16")
    data[:, :, :100] = 0
    path = tmp_path / "half.tif"
    with rasterio.open(path, "w", driver="GTiff", width=200, height=200, count=1, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(300000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    return path


class TestTileGrid:
    def test_tile_geometry_agrees_with_rasterio(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=128)
        with rasterio.open(SAMPLE) as src:
            for tile in GridTileSampler(grid=grid, stride=100):
                assert grid.tile_transform(tile) == src.window_transform(tile.window)
                assert grid.tile_bounds(tile) == pytest.approx(window_bounds(tile.window, src.transform))
                assert grid.grids[tile.file].crs == src.crs

    def test_metres_and_gsd_use_a_warped_grid(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=3840, units="metres", gsd=60)
        assert grid.tile_px == 64 and grid.grids[0].warped
        g = grid.grids[0]
        assert g.transform.a == 60 and math.isclose(g.width * 60, 448 * 30, abs_tol=60)
        native = TileGrid(index=index, tile_size=3840, units="metres")
        assert native.tile_px == 128 and not native.grids[0].warped

    def test_invalid_arguments(self, index: RasterIndex) -> None:
        with pytest.raises(ValueError, match="units must be one of"):
            TileGrid(index=index, tile_size=10, units="feet")
        with pytest.raises(ValueError, match="need a projected CRS"):
            TileGrid(index=index, tile_size=1000, units="metres", crs="EPSG:4326", gsd=0.001)
        with pytest.raises(ValueError, match="unknown resampling"):
            TileGrid(index=index, tile_size=10, resampling="magic")


class TestRandomTileSampler:
    def test_reproducible_per_seed_and_epoch(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=64)
        a, b = (RandomTileSampler(grid=grid, length=50, seed=3, rank=0, world_size=1) for _ in range(2))
        assert list(a) == list(b) and len(set(a)) == 50
        b.set_epoch(1)
        assert list(b) != list(a)
        a.set_epoch(1)
        assert list(a) == list(b)
        other = RandomTileSampler(grid=grid, length=50, seed=4, rank=0, world_size=1)
        assert list(other) != list(b)

    @pytest.mark.parametrize("world", [2, 3, 4])
    def test_ranks_are_disjoint_and_equal(self, index: RasterIndex, world: int) -> None:
        grid = TileGrid(index=index, tile_size=64)
        per_rank = [list(RandomTileSampler(grid=grid, length=101, seed=0, rank=r, world_size=world)) for r in range(world)]
        assert len({len(p) for p in per_rank}) == 1 and len(per_rank[0]) == math.ceil(101 / world)
        flat = [t for p in per_rank for t in p]
        assert len(flat) == len(set(flat))

    def test_tiles_stay_inside_and_snapped(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=200)
        for tile in RandomTileSampler(grid=grid, length=100, rank=0, world_size=1):
            assert isinstance(tile.row, int) and 0 <= tile.row <= 928 - 200 and 0 <= tile.col <= 448 - 200

    def test_snap_aligns_offsets(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=128)
        tiles = list(RandomTileSampler(grid=grid, length=12, snap=128, rank=0, world_size=1))
        assert all(t.row % 128 == 0 and t.col % 128 == 0 and t.row <= 928 - 128 and t.col <= 448 - 128 for t in tiles)
        assert len(set(tiles)) == 12
        with pytest.raises(ValueError, match="snap must be >= 1"):
            RandomTileSampler(grid=grid, length=1, snap=0)

    def test_rejects_nodata_tiles(self, half_empty: Path) -> None:
        index = RasterIndex.build(half_empty, cache_dir=None)
        grid = TileGrid(index=index, tile_size=40)
        reader = TileReader(grid=grid)
        tiles = list(RandomTileSampler(grid=grid, length=60, max_nodata_fraction=0.25, rank=0, world_size=1))
        fractions = [1 - reader.read(t)[1].mean() for t in tiles]
        assert max(fractions) <= 0.25 + 0.2  # thumbnail cells are 3-4 px here: estimate within a cell column
        assert np.mean([t.col >= 90 for t in tiles]) > 0.9
        strict = list(RandomTileSampler(grid=grid, length=20, max_nodata_fraction=0.0, rank=0, world_size=1))
        assert all(1 - reader.read(t)[1].mean() == 0 for t in strict)

    def test_weighted_by_valid_area(self, tmp_path: Path, half_empty: Path) -> None:
        full = tmp_path / "full.tif"
        with rasterio.open(half_empty) as src:
            profile = src.profile
        with rasterio.open(full, "w", **profile) as dst:
            dst.write(np.full((1, 200, 200), 7, dtype="uint16"))
        index = RasterIndex.build([full, half_empty], cache_dir=None)
        grid = TileGrid(index=index, tile_size=10)
        sampler = RandomTileSampler(grid=grid, length=3000, max_nodata_fraction=1.0, rank=0, world_size=1)
        share_full = np.mean([t.file == 0 for t in sampler])
        assert sampler.weights == pytest.approx([2 / 3, 1 / 3], abs=0.02)
        assert share_full == pytest.approx(2 / 3, abs=0.04)

    def test_impossible_request_is_a_clear_error(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=448)
        with pytest.raises(RuntimeError, match="found only .* distinct tiles"):
            list(RandomTileSampler(grid=grid, length=10_000, rank=0, world_size=1))


class TestGridTileSampler:
    def test_covers_raster_with_edge_tiles(self, index: RasterIndex) -> None:
        grid = TileGrid(index=index, tile_size=256)
        tiles = GridTileSampler(grid=grid, stride=200).tiles
        rows, cols = sorted({t.row for t in tiles}), sorted({t.col for t in tiles})
        assert rows == [0, 200, 400, 600, 672] and cols == [0, 192]
        assert len(tiles) == (math.ceil((928 - 256) / 200) + 1) * (math.ceil((448 - 256) / 200) + 1)
        covered = np.zeros((928, 448), dtype=bool)
        for t in tiles:
            covered[t.row : t.row + 256, t.col : t.col + 256] = True
        assert covered.all()

    @pytest.mark.parametrize("world", [2, 3])
    def test_ranks_partition_the_grid(self, index: RasterIndex, world: int) -> None:
        grid = TileGrid(index=index, tile_size=64)
        full = GridTileSampler(grid=grid, rank=0, world_size=1).tiles
        parts = [list(GridTileSampler(grid=grid, shuffle=True, seed=1, rank=r, world_size=world)) for r in range(world)]
        flat = [t for p in parts for t in p]
        assert sorted(flat) == sorted(full) and len(flat) == len(set(flat))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1

    def test_drops_mostly_nodata_tiles(self, half_empty: Path) -> None:
        index = RasterIndex.build(half_empty, cache_dir=None)
        grid = TileGrid(index=index, tile_size=50)
        assert len(GridTileSampler(grid=grid).tiles) == 16
        kept = GridTileSampler(grid=grid, max_nodata_fraction=0.1).tiles
        assert len(kept) == 8 and all(t.col >= 100 for t in kept)


class TestDistributed:
    def test_rank_world_from_torch_distributed(self, tmp_path: Path) -> None:
        assert distributed_rank_world() == (0, 1)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        try:
            assert distributed_rank_world() == (0, 1)
            assert distributed_rank_world(rank=1, world_size=2) == (1, 2)
        finally:
            dist.destroy_process_group()
        with pytest.raises(ValueError, match=r"rank must lie in \[0, world_size\)"):
            distributed_rank_world(rank=2, world_size=2)

    def test_lightning_keeps_our_samplers(self) -> None:
        from torch.utils.data import DistributedSampler

        assert isinstance(ChipSampler(num_chips=3, rank=0, world_size=1), DistributedSampler)

    def test_chip_and_interleaved_samplers(self) -> None:
        parts = [list(ChipSampler(num_chips=11, seed=2, rank=r, world_size=3)) for r in range(3)]
        assert sorted(i for p in parts for i in p) == list(range(11))
        # crop windows: the same chip order as without them, each window inside its chip, split across ranks alike
        sizes = [(100 + 10 * i, 64 + i) for i in range(11)]
        cropped = [list(ChipSampler(num_chips=11, seed=2, rank=r, world_size=3, crop=64, sizes=sizes)) for r in range(3)]
        assert [[k.chip for k in p] for p in cropped] == parts
        assert all(0 <= k.row <= sizes[k.chip][0] - 64 and 0 <= k.col <= sizes[k.chip][1] - 64 for p in cropped for k in p)
        with pytest.raises(ValueError, match="crop= needs sizes="):
            ChipSampler(num_chips=3, crop=64)
        tiles = TileListSampler(tiles=[Tile(0, r, 0, 8) for r in range(6)], rank=1, world_size=2)
        chips = ChipSampler(num_chips=4, rank=1, world_size=2)
        mixed = InterleavedSampler(samplers=[tiles, chips], seed=5)
        items = list(mixed)
        assert len(items) == len(mixed) == 5 and sorted(map(str, items)) == sorted(map(str, [*tiles, *chips]))
        mixed.set_epoch(1)
        assert chips.epoch == 1
        with pytest.raises(ValueError, match="disagree on"):
            InterleavedSampler(samplers=[tiles, ChipSampler(num_chips=4, rank=0, world_size=1)])
