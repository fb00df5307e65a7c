"""Window grids and blending weights (dinov3_eo.inference.tiling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinov3_eo.inference.tiling import (
    AxisCells,
    TileGrid,
    blend_weights,
    cosine_ramp,
    resolve_overlap,
    window_starts,
)


class TestResolveOverlap:
    @pytest.mark.parametrize(("overlap", "pixels"), [(0.25, 128), (0.0, 0), (0.5, 256), (100, 100), (0, 0)])
    def test_fraction_or_pixels(self, overlap: float | int, pixels: int) -> None:
        assert resolve_overlap(512, overlap) == pixels

    @pytest.mark.parametrize("overlap", [1.0, -0.1, 512, -3])
    def test_out_of_range(self, overlap: float | int) -> None:
        with pytest.raises(ValueError, match="overlap"):
            resolve_overlap(512, overlap)

    @pytest.mark.parametrize("overlap", ["0.25", None, True])
    def test_wrong_type(self, overlap: object) -> None:
        with pytest.raises(TypeError, match="overlap must be an int"):
            resolve_overlap(512, overlap)  # type: ignore[arg-type]


class TestWindowStarts:
    @pytest.mark.parametrize("length", [1, 15, 16, 100, 511, 512, 513, 1000, 1537, 10_000])
    @pytest.mark.parametrize(("window", "stride"), [(512, 384), (512, 512), (64, 48), (256, 1)])
    def test_cover_inside_and_count(self, length: int, window: int, stride: int) -> None:
        starts = window_starts(length, window, stride)
        expected = 1 if length <= window else math.ceil((length - window) / stride) + 1
        assert len(starts) == expected  # the formula in the module docstring
        assert starts == sorted(set(starts))
        covered = np.zeros(length, dtype=bool)
        for s in starts:
            covered[s : s + window] = True
            if length > window:
                assert 0 <= s <= length - window  # no window leaves the raster
        assert covered.all()
        if length > window:
            assert starts[-1] == length - window
            assert all(b - a <= stride for a, b in zip(starts, starts[1:]))

    def test_invalid(self) -> None:
        with pytest.raises(ValueError, match="must be >= 1"):
            window_starts(0, 512, 384)


class TestTileGrid:
    def test_counts_and_tiles(self) -> None:
        grid = TileGrid.build(1000, 1300, window=512, overlap=0.25)
        assert grid.shape == (3, 4)  # ceil((1000-512)/384)+1 = 3, ceil((1300-512)/384)+1 = 4
        assert len(grid) == 12 == len(list(grid))
        tiles = list(grid)
        assert [(t.grid_row, t.grid_col) for t in tiles[:4]] == [(0, 0), (0, 1), (0, 2), (0, 3)]  # row-major
        assert all(t.height == t.width == 512 == t.valid_height == t.valid_width for t in tiles)
        assert tiles[-1].row_off == 1000 - 512 and tiles[-1].col_off == 1300 - 512

    @pytest.mark.parametrize(("height", "width", "tile"), [(5, 7, (16, 16)), (100, 250, (112, 256)), (1, 600, (16, 512))])
    def test_small_raster_gets_one_padded_window(self, height: int, width: int, tile: tuple[int, int]) -> None:
        grid = TileGrid.build(height, width, window=512, overlap=64)
        assert (grid.tile_height, grid.tile_width) == tile
        assert grid.tile_height % 16 == 0 and grid.tile_width % 16 == 0
        first = grid.tile(0, 0)
        assert (first.valid_height, first.valid_width) == (min(height, tile[0]), min(width, tile[1]))

    @pytest.mark.parametrize("window", [0, 100, 8])
    def test_window_not_multiple(self, window: int) -> None:
        with pytest.raises(ValueError, match="multiple of 16"):
            TileGrid.build(100, 100, window=window, overlap=0)

    def test_empty_raster(self) -> None:
        with pytest.raises(ValueError, match="empty raster"):
            TileGrid.build(0, 10, window=64, overlap=0)


class TestAxisCells:
    @pytest.mark.parametrize(("length", "window", "overlap"), [(1000, 64, 16), (130, 64, 0), (20, 64, 8), (777, 96, 40)])
    def test_against_naive_count(self, length: int, window: int, overlap: int) -> None:
        grid = TileGrid.build(length, 8, window=window, overlap=overlap)
        cells = grid.row_cells()
        naive = np.zeros(length, dtype=int)  # windows covering each pixel, by brute force
        for s in grid.row_starts:
            naive[s : s + grid.tile_height] += 1
        assert cells.cuts[0] == 0 and cells.cuts[-1] == length
        for k in range(len(cells)):
            segment = naive[cells.cuts[k] : cells.cuts[k + 1]]
            assert (segment == cells.coverage[k]).all()
        for (first, stop), s in zip(cells.spans, grid.row_starts):
            assert cells.cuts[first] == s and cells.cuts[stop] == min(s + grid.tile_height, length)

    def test_example(self) -> None:
        cells = AxisCells.build((0, 48, 72), 64, 136)
        assert cells.cuts == (0, 48, 64, 72, 112, 136)
        assert cells.coverage == (1, 2, 1, 2, 1)
        assert cells.spans == ((0, 2), (1, 4), (3, 5))


class TestBlendWeights:
    def test_ramp_values(self) -> None:
        ramp = cosine_ramp(64, 16, floor=0.0)
        assert ramp.shape == (64,)
        assert torch.allclose(ramp, ramp.flip(0))  # symmetric
        assert ramp[0].item() == pytest.approx(0.5 - 0.5 * math.cos(math.pi * 0.5 / 16), rel=1e-6)
        assert (ramp[16:48] == 1).all()
        assert (ramp[:16].diff() > 0).all()  # strictly rising into the window
        assert (ramp > 0).all()

    def test_floor_and_no_overlap(self) -> None:
        assert cosine_ramp(64, 32).min().item() >= 1e-3
        assert (cosine_ramp(10, 0) == 1).all()

    def test_separable(self) -> None:
        w = blend_weights(32, 48, overlap=8)
        assert w.shape == (32, 48)
        assert torch.allclose(w, cosine_ramp(32, 8)[:, None] * cosine_ramp(48, 8)[None, :])

    @pytest.mark.parametrize(
        ("height", "width", "window", "overlap"), [(300, 410, 64, 0.25), (129, 200, 32, 24), (50, 20, 64, 16), (96, 96, 32, 0)]
    )
    def test_normalised_weights_sum_to_one(self, height: int, width: int, window: int, overlap: float | int) -> None:
        grid = TileGrid.build(height, width, window=window, overlap=overlap)
        w = grid.blend_weights().double()
        total = torch.zeros(height, width, dtype=torch.float64)
        parts = []
        for t in grid:
            part = torch.zeros(height, width, dtype=torch.float64)
            part[t.row_off : t.row_off + t.valid_height, t.col_off : t.col_off + t.valid_width] = w[
                : t.valid_height, : t.valid_width
            ]
            parts.append(part)
            total += part
        assert (total > 0).all()  # every pixel, the raster border included, has weight
        normalised = sum(p / total for p in parts)
        assert torch.allclose(normalised, torch.ones_like(total), atol=1e-12)


def test_centre_pad_centres_and_crops_back() -> None:
    from dinov3_eo.inference.tiling import centre_pad

    x = torch.arange(2 * 3 * 37 * 50, dtype=torch.float32).reshape(2, 3, 37, 50)
    padded, (left, right, top, bottom) = centre_pad(x, 16)
    assert padded.shape == (2, 3, 48, 64) and (left, right, top, bottom) == (7, 7, 5, 6)
    assert torch.equal(padded[..., top : top + 37, left : left + 50], x)
    inside = torch.zeros(padded.shape, dtype=torch.bool)
    inside[..., top : top + 37, left : left + 50] = True
    assert (padded[~inside] == 0).all()  # zeros around
    same, pad = centre_pad(x[..., :32, :48], 16)
    assert pad == (0, 0, 0, 0) and same.data_ptr() == x.data_ptr()
