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

    @pytest.mark.parametrize("window", [Window(100, 300, 64, 64), Window(-20, 900, 64, 64)])  # inside, and boundless
    def test_reads_into_given_buffers(self, window: Window) -> None:
        out = np.full((2, 64, 64), 7, dtype=np.uint16)
        valid_out = np.zeros((64, 64), dtype=bool)
        with rasterio.open(SAMPLE) as src:
            values, valid = read_window(src, window, bands=[3, 1], nodata=0, out=out, valid_out=valid_out)
            want_values, want_valid = read_window(src, window, bands=[3, 1], nodata=0)
        assert values is out and valid is valid_out
        np.testing.assert_array_equal(values, want_values)
        np.testing.assert_array_equal(valid, want_valid)

    def test_rejects_mismatched_buffers(self) -> None:
        with rasterio.open(SAMPLE) as src:
            with pytest.raises(ValueError, match=r"out must be a C-contiguous uint16 array of shape \(3, 8, 8\)"):
                read_window(src, Window(0, 0, 8, 8), out=np.empty((3, 8, 8), dtype=np.float32))
            with pytest.raises(ValueError, match="valid_out must be"):
                read_window(src, Window(0, 0, 8, 8), valid_out=np.empty((8, 16), dtype=bool)[:, ::2])

    def test_bad_band_index(self) -> None:
        with rasterio.open(SAMPLE) as src, pytest.raises(IndexError, match=r"must lie in \[1, 3\]"):
            read_window(src, Window(0, 0, 8, 8), bands=[4])

    def test_empty_window(self) -> None:
        with rasterio.open(SAMPLE) as src, pytest.raises(ValueError, match="non-empty"):
            read_window(src, Window(0, 0, 0, 8))

    def test_a_truncated_file_names_itself_and_the_window(self, tmp_path: Path) -> None:
        """GDAL says only "Read failed"; a user needs the file and where in it (a download cut short, say)."""
        truncated = tmp_path / "cut.tif"
        truncated.write_bytes(SAMPLE.read_bytes()[:60_000])  # the header survives, the pixels do not
        with rasterio.open(truncated) as src:
            with pytest.raises(rasterio.errors.RasterioIOError,
                               match=r"Could not decode rows 600-900, columns 0-448 of .*cut\.tif: the file is corrupt "
                                     r"or truncated \(.*TIFFReadEncodedTile"):
                read_window(src, Window(0, 600, 448, 300))
        with rasterio.open(truncated) as src:  # (GDAL re-raises a failed read's error at the dataset's next call)
            with pytest.raises(rasterio.errors.RasterioIOError, match=r"rows 900-928, columns 400-448 of .*cut\.tif"):
                read_window(src, Window(400, 900, 60, 40))  # partly outside: the part inside is named


# --------------------------------------------------------------------------------------------------
# RasterIndex
# --------------------------------------------------------------------------------------------------
import os  # noqa: E402

from dinov3_eo.data.index import BandMismatchError, RasterArchiveError, RasterIndex, expand_sources, resolve_bands  # noqa: E402

EDGE = Path(__file__).resolve().parent / "data" / "rgb_byte_edge.tif"


def _write(path: Path, *, count: int = 3, dtype: str = "uint16", crs: str | None = "EPSG:32633", size: int = 64,
           descriptions: tuple[str, ...] | None = None, nodata: float | None = None) -> Path:
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    data = rng.integers(1, 1000, size=(count, size, size)).astype(dtype)
    transform = from_origin(400000, 5000000, 10, 10) if crs is not None else rasterio.Affine.identity()
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=count, dtype=dtype, crs=crs,
                       transform=transform, nodata=nodata) as dst:
        dst.write(data)
        if descriptions:
            for i, d in enumerate(descriptions, start=1):
                dst.set_band_description(i, d)
    return path


class TestRasterIndex:
    def test_records_match_rasterio(self, tmp_path: Path) -> None:
        index = RasterIndex.build([SAMPLE, EDGE], cache_dir=tmp_path / "cache")
        assert len(index) == 2 and not index.problems
        for rec in index:
            with rasterio.open(rec.path) as src:
                assert rec.crs == src.crs and rec.affine == src.transform
                assert rec.bounds == src.bounds and rec.res == src.res
                assert (rec.width, rec.height, rec.count) == (src.width, src.height, src.count)
                assert rec.dtypes == src.dtypes and rec.descriptions == src.descriptions and rec.nodata == src.nodata
        edge = next(r for r in index if r.path.endswith("rgb_byte_edge.tif"))
        # the thumbnail sees the declared-nodata collar (~45 % of this window)
        assert 0.4 < 1 - edge.valid_thumbnail(edge.nodata).mean() < 0.5

    def test_sources_folder_glob_list(self, tmp_path: Path) -> None:
        for name in ("a.tif", "b.TIFF", "sub/c.tif"):
            (tmp_path / name).parent.mkdir(exist_ok=True)
            _write(tmp_path / name)
        (tmp_path / "notes.txt").write_text("not a raster")
        assert len(expand_sources(tmp_path)) == 3
        assert [Path(p).name for p in expand_sources(str(tmp_path / "*.tif"))] == ["a.tif"]
        assert len(expand_sources([tmp_path / "a.tif", str(tmp_path / "sub" / "*.tif")])) == 2
        with pytest.raises(FileNotFoundError, match="matched no raster"):
            expand_sources(str(tmp_path / "*.jp2"))
        with pytest.raises(FileNotFoundError, match="neither a file"):
            expand_sources(tmp_path / "missing.tif")

    def test_cache_reused_and_invalidated(self, tmp_path: Path) -> None:
        a, b = _write(tmp_path / "a.tif"), _write(tmp_path / "b.tif")
        cache = tmp_path / "cache"
        first = RasterIndex.build([a, b], cache_dir=cache, workers=2)
        assert first.cache_hits == 0 and len(list(cache.glob("*.json"))) == 2
        second = RasterIndex.build([a, b], cache_dir=cache, workers=1)
        assert second.cache_hits == 2
        assert [r.to_json() for r in second] == [r.to_json() for r in first]
        np.testing.assert_array_equal(second[0].thumbnail, first[0].thumbnail)
        _write(a, count=3, size=32)  # rewritten: new size and mtime
        os.utime(a, ns=(1, 1))
        third = RasterIndex.build([a, b], cache_dir=cache)
        assert third.cache_hits == 1 and third[0].width == 32

    def test_bad_files_summarised_and_excluded(self, tmp_path: Path) -> None:
        good = _write(tmp_path / "good.tif")
        plain = _write(tmp_path / "plain.tif", crs=None)
        garbage = tmp_path / "garbage.tif"
        garbage.write_bytes(b"II*\x00 this is not a tiff at all" * 10)
        truncated = tmp_path / "truncated.tif"
        data = _write(tmp_path / "full.tif", size=256).read_bytes()
        truncated.write_bytes(data[: len(data) // 3])
        os.remove(tmp_path / "full.tif")
        with pytest.warns(UserWarning, match=r"Excluded 3 raster\(s\)") as record:
            index = RasterIndex.build(tmp_path, cache_dir=None)
        assert len(record) == 1  # one summary, not one warning per file
        assert [r.path for r in index] == [str(good)]
        reasons = {Path(p.path).name: p.reason for p in index.problems}
        assert set(reasons) == {"plain.tif", "garbage.tif", "truncated.tif"}
        assert "not georeferenced" in reasons["plain.tif"]
        assert "unreadable or corrupt" in reasons["garbage.tif"] and "unreadable or corrupt" in reasons["truncated.tif"]
        with pytest.raises(RasterArchiveError, match=r"3 raster\(s\) cannot be used:\n.*garbage.tif"):
            RasterIndex.build(tmp_path, cache_dir=None, strict=True)
        with pytest.raises(RasterArchiveError, match="no usable raster"):
            RasterIndex.build([plain], cache_dir=None)

    def test_band_mismatch_needs_selection(self, tmp_path: Path) -> None:
        three = _write(tmp_path / "three.tif", count=3, descriptions=("blue", "green", "red"))
        one = _write(tmp_path / "one.tif", count=1, descriptions=("red",))
        with pytest.raises(BandMismatchError, match=r"different band counts \[1, 3\].*with bands=\[...\] \(--bands for dinov3-eo stats, --data.bands in a fit\)"):
            RasterIndex.build([three, one], cache_dir=None)
        by_index = RasterIndex.build([three, one], bands=[1], cache_dir=None)
        assert by_index.band_indexes == [[1], [1]]
        by_name = RasterIndex.build([three, one], bands=["Red"], cache_dir=None)
        assert by_name.band_indexes == [[1], [3]] and by_name.band_names == ["red"]
        with pytest.warns(UserWarning, match=r"one.tif: band selection \[3\]"):
            only_three = RasterIndex.build([three, one], bands=[3], cache_dir=None)
        assert len(only_three) == 1

    def test_resolve_bands_errors(self, tmp_path: Path) -> None:
        rec = RasterIndex.build(_write(tmp_path / "x.tif", descriptions=("b", "g", "r")), cache_dir=None)[0]
        assert resolve_bands(rec, ["r", 1]) == [3, 1]
        with pytest.raises(KeyError, match="'nir' is not among"):
            resolve_bands(rec, ["nir"])
        with pytest.raises(IndexError, match=r"outside \[1, 3\]"):
            resolve_bands(rec, [0])
        with pytest.raises(TypeError, match="1-based ints or band names"):
            resolve_bands(rec, [1.5])

    def test_parallel_equals_serial(self, tmp_path: Path) -> None:
        paths = [_write(tmp_path / f"t{i}.tif") for i in range(6)]
        serial = RasterIndex.build(paths, workers=1, cache_dir=None)
        parallel = RasterIndex.build(paths, workers=4, cache_dir=None)
        assert [r.to_json() for r in serial] == [r.to_json() for r in parallel]

    def test_from_torchgeo(self, tmp_path: Path) -> None:
        from torchgeo.datasets import RasterDataset

        class Sample(RasterDataset):
            filename_glob = "landsat8_*.tif"
            all_bands = ("B2", "B3", "B4")

        ds = Sample(paths=str(SAMPLE.parent), bands=["B4", "B2"])
        index = RasterIndex.from_torchgeo(ds, cache_dir=None)
        assert [r.path for r in index] == [str(SAMPLE)] and index.band_indexes == [[3, 1]]
        with pytest.raises(TypeError, match="expects a torchgeo RasterDataset"):
            RasterIndex.from_torchgeo(object(), cache_dir=None)

    def test_reexported_from_raster_module(self) -> None:
        from dinov3_eo.data import raster

        assert raster.RasterIndex is RasterIndex


def test_pixel_area_in_hectares_converts_linear_units() -> None:
    from rasterio.crs import CRS

    from dinov3_eo.data.raster import pixel_area_ha

    transform = from_origin(0, 0, 30, 30)
    assert pixel_area_ha(CRS.from_epsg(32621), transform) == pytest.approx(0.09)
    assert pixel_area_ha(CRS.from_epsg(2264), transform) == pytest.approx(900 * 0.3048006**2 / 10_000)  # US survey feet
    assert pixel_area_ha(CRS.from_epsg(4326), transform) is None and pixel_area_ha(None, transform) is None


def test_tagged_class_names_band_dataset_and_bad_tags(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ``class_names`` tag of a class map: the band's over the dataset's, and a tag someone else wrote that is not
    a JSON list leaves the classes unnamed with a warning, in every command that reads it (here the polygons)."""
    import json

    from dinov3_eo.data.labels import RasterLabels
    from dinov3_eo.data.raster import tagged_class_names
    from dinov3_eo.inference.writers import vectorize_classes

    path = tmp_path / "classes.tif"
    profile = {"driver": "GTiff", "width": 4, "height": 4, "count": 1, "dtype": "uint8", "crs": "EPSG:32633",
               "transform": from_origin(0, 40, 10, 10)}  # fmt: skip
    data = np.zeros((4, 4), dtype=np.uint8)
    data[:, 2:] = 1

    def write(dataset_tag: str | None, band_tag: str | None) -> None:
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data, 1)
            if dataset_tag is not None:
                dst.update_tags(class_names=dataset_tag)
            if band_tag is not None:
                dst.update_tags(1, class_names=band_tag)

    for dataset_tag, band_tag, expected in ((json.dumps(["a", "b"]), None, ["a", "b"]),
                                            (json.dumps(["a", "b"]), json.dumps(["x", 2]), ["x", "2"]),
                                            (None, None, None)):
        write(dataset_tag, band_tag)
        with rasterio.open(path) as src:
            assert tagged_class_names(src) == expected
    write("water;forest", None)
    with caplog.at_level("WARNING", logger="dinov3_eo.data.raster"), rasterio.open(path) as src:
        assert tagged_class_names(src) is None
    assert "classes.tif: its class_names tag is not a JSON list of names (water;forest)" in caplog.text
    assert RasterLabels(path=path).class_names == {}
    frame = vectorize_classes(path, tmp_path / "classes.gpkg")
    assert sorted(frame["class_name"]) == ["0", "1"]  # ids, not a traceback from json
