"""Windowed reads: equal to rasterio's own reads, boundless, nodata and overrides flow into ``valid``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_origin
from rasterio.vrt import WarpedVRT
from rasterio.windows import Window

from dinov3_eo.data.raster import read_window

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


@pytest.fixture()
def float_nodata_tif(tmp_path: Path) -> Path:
    """A 2-band float32 raster with nodata -99999 in a known block and a NaN pixel."""
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, size=(2, 40, 50)).astype("float32")
    data[:, :10, :10] = -99999
    data[1, 20, 30] = -99999  # only one band missing: still invalid
    data[0, 5, 40] = np.nan
    path = tmp_path / "f.tif"
    with rasterio.open(path, "w", driver="GTiff", width=50, height=40, count=2, dtype="float32",
                       crs="EPSG:32618", transform=from_origin(500000, 4000000, 10, 10), nodata=-99999) as dst:
        dst.write(data)
    return path


class TestReadWindow:
    @pytest.mark.parametrize("window", [Window(0, 0, 256, 256), Window(100, 300, 200, 150), Window(250, 700, 198, 228)])
    def test_equals_rasterio(self, window: Window) -> None:
        with rasterio.open(SAMPLE) as src:
            values, valid = read_window(src, window)
            expected = src.read(window=window)
        np.testing.assert_array_equal(values, expected)
        assert values.dtype == np.uint16 and valid.shape == expected.shape[1:]
        assert valid.all()  # no nodata declared: the collar counts as data unless overridden

    def test_band_selection_order(self) -> None:
        with rasterio.open(SAMPLE) as src:
            values, _ = read_window(src, Window(10, 20, 30, 40), bands=[3, 1])
            np.testing.assert_array_equal(values, src.read([3, 1], window=Window(10, 20, 30, 40)))

    def test_nodata_override_marks_collar(self) -> None:
        window = Window(200, 0, 248, 128)  # the top-right collar of the Landsat scene
        with rasterio.open(SAMPLE) as src:
            values, valid = read_window(src, window, nodata=0)
        collar = (values == 0).all(axis=0)
        assert collar.any() and not collar.all()
        np.testing.assert_array_equal(valid, ~collar)

    def test_boundless_matches_rasterio(self) -> None:
        window = Window(-20, 900, 100, 60)  # off the left and bottom edges
        with rasterio.open(SAMPLE) as src:
            values, valid = read_window(src, window)
            expected = src.read(window=window, boundless=True, fill_value=0)
        np.testing.assert_array_equal(values, expected)
        assert not valid[:, :20].any() and not valid[28:].any() and valid[:28, 20:].all()

    def test_declared_nodata_and_nan(self, float_nodata_tif: Path) -> None:
        with rasterio.open(float_nodata_tif) as src:
            values, valid = read_window(src, Window(0, 0, 50, 40))
        assert not valid[:10, :10].any()
        assert not valid[20, 30] and not valid[5, 40]
        assert valid.sum() == 50 * 40 - 100 - 2

    def test_resampled_read(self) -> None:
        window = Window(0, 256, 256, 256)
        with rasterio.open(SAMPLE) as src:
            values, valid = read_window(src, window, out_shape=(64, 64), resampling=Resampling.average)
            expected = src.read(window=window, out_shape=(3, 64, 64), resampling=Resampling.average)
        np.testing.assert_array_equal(values, expected)
        assert valid.shape == (64, 64)

    def test_warped_vrt_alpha_marks_outside_footprint(self) -> None:
        with rasterio.open(SAMPLE) as src, WarpedVRT(src, crs="EPSG:4326", add_alpha=True) as vrt:
            values, valid = read_window(vrt, Window(0, 0, vrt.width, vrt.height))
            assert values.shape[0] == 3  # the alpha band is a mask, not data
            alpha = vrt.read(4)
        np.testing.assert_array_equal(valid, alpha > 0)
        assert 0 < valid.mean() < 1

    def test_bad_band_index(self) -> None:
        with rasterio.open(SAMPLE) as src, pytest.raises(IndexError, match=r"must lie in \[1, 3\]"):
            read_window(src, Window(0, 0, 8, 8), bands=[4])

    def test_empty_window(self) -> None:
        with rasterio.open(SAMPLE) as src, pytest.raises(ValueError, match="non-empty"):
            read_window(src, Window(0, 0, 0, 8))
