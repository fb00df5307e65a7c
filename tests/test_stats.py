"""Per-band statistics: exact on small rasters, nodata ignored, CLI writes JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.stats import BandStats, compute_band_stats

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


def _write(path: Path, data: np.ndarray, nodata: float | None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype=data.dtype, crs="EPSG:32633", transform=from_origin(0, 0, 10, 10), nodata=nodata) as dst:
        dst.write(data)
    return path


@pytest.fixture()
def with_nodata(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    data = rng.integers(100, 5000, size=(2, 64, 64)).astype("uint16")
    data[:, :20] = 65535  # declared nodata: would dominate mean/std if counted
    data[1, 30, 30] = 65535  # a pixel missing in one band is invalid in all
    valid = (data != 65535).all(axis=0)
    return _write(tmp_path / "nd.tif", data, 65535), data, valid


class TestComputeBandStats:
    def test_ignores_nodata_exactly(self, with_nodata) -> None:
        path, data, valid = with_nodata
        stats = compute_band_stats(RasterIndex.build(path, cache_dir=None), window_size=64, num_windows=5, progress=False)
        assert stats.num_windows == 1  # the only distinct 64-px window is the whole raster
        for b in range(2):
            v = data[b][valid].astype(np.float64)
            assert stats.count[b] == v.size
            assert stats.mean[b] == pytest.approx(v.mean(), rel=1e-12)
            assert stats.std[b] == pytest.approx(v.std(), rel=1e-9)
            assert (stats.min[b], stats.max[b]) == (v.min(), v.max())
            for q in (1, 2, 50, 98, 99):
                assert stats.percentile(q)[b] == np.percentile(v, q, method="inverted_cdf")
        assert stats.exact_percentiles

    def test_nodata_override(self, tmp_path: Path) -> None:
        data = np.full((1, 32, 32), 10, dtype="uint16")
        data[0, :16] = 0
        path = _write(tmp_path / "z.tif", data, None)
        index = RasterIndex.build(path, cache_dir=None)
        assert compute_band_stats(index, window_size=32, progress=False).mean == [5.0]
        overridden = compute_band_stats(index, window_size=32, nodata=0, progress=False)
        assert overridden.mean == [10.0] and overridden.std == [0.0] and overridden.count == [512]

    def test_float_reservoir_and_scale_offset(self, tmp_path: Path) -> None:
        rng = np.random.default_rng(1)
        data = rng.normal(50, 5, size=(1, 128, 128)).astype("float32")
        data[0, :8] = np.nan
        path = _write(tmp_path / "f.tif", data, None)
        index = RasterIndex.build(path, cache_dir=None)
        stats = compute_band_stats(index, window_size=128, reservoir_size=2000, progress=False)
        v = data[0][~np.isnan(data[0])].astype(np.float64)
        assert not stats.exact_percentiles and stats.count == [v.size]
        assert stats.mean[0] == pytest.approx(v.mean(), rel=1e-9)
        assert stats.percentile(50)[0] == pytest.approx(np.median(v), abs=0.5)
        assert stats.percentile(2)[0] == pytest.approx(np.percentile(v, 2), abs=1.0)
        scaled = compute_band_stats(index, window_size=128, reservoir_size=2000, scale=-2.0, offset=3.0, progress=False)
        assert scaled.mean[0] == pytest.approx(-2 * v.mean() + 3)
        assert scaled.std[0] == pytest.approx(2 * v.std())
        assert scaled.min[0] == pytest.approx(-2 * v.max() + 3)
        assert scaled.percentile(2)[0] == pytest.approx(-2 * stats.percentile(98)[0] + 3)

    def test_real_landsat_collar_ignored(self) -> None:
        index = RasterIndex.build(SAMPLE, cache_dir=None)
        with_collar = compute_band_stats(index, num_windows=16, window_size=128, progress=False)
        without = compute_band_stats(index, num_windows=16, window_size=128, nodata=0, progress=False)
        assert min(with_collar.min) == 0 and min(without.min) > 5000
        assert all(m2 > m1 for m1, m2 in zip(with_collar.mean, without.mean))

    def test_all_nodata_is_an_error(self, tmp_path: Path) -> None:
        path = _write(tmp_path / "empty.tif", np.zeros((1, 16, 16), dtype="uint8"), 0)
        with pytest.raises(ValueError, match="no file has valid pixels"):
            compute_band_stats(RasterIndex.build(path, cache_dir=None), window_size=16, progress=False)


class TestBandStatsIO:
    def test_roundtrip_and_normalisations(self, with_nodata, tmp_path: Path) -> None:
        path, data, valid = with_nodata
        stats = compute_band_stats(RasterIndex.build(path, cache_dir=None), window_size=64, progress=False)
        out = tmp_path / "sub" / "stats.json"
        stats.save(out)
        loaded = BandStats.load(out)
        assert loaded == stats
        z = loaded.normalization("zscore")
        assert isinstance(z, Normalization) and z.mean == tuple(stats.mean) and z.name == "zscore"
        p = loaded.normalization("percentile", low=2, high=98)
        assert p.low == tuple(stats.percentile(2)) and p.high == tuple(stats.percentile(98))
        with pytest.raises(ValueError, match="mode must be 'zscore' or 'percentile'"):
            loaded.normalization("minmax")
        with pytest.raises(KeyError, match="percentile 5 was not computed"):
            loaded.percentile(5)
        with pytest.raises(KeyError, match="lack"):
            BandStats.from_dict({"bands": []})


def test_cli_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stats.json"
    code = cli_main(["stats", str(SAMPLE), "-o", str(out), "--nodata", "0", "--windows", "8", "--window-size", "128",
                     "--bands", "3", "1", "--no-cache"])
    assert code == 0
    d = json.loads(out.read_text())
    assert d["bands"] == ["B3", "B1"] and d["nodata"] == 0 and d["num_windows"] == 8
    assert d["mean"][0] < d["mean"][1]  # red is darker than blue DN in this scene
    assert "wrote" in capsys.readouterr().out
