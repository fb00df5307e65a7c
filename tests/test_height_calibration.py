"""Canopy-height maps corrected against reference heights: the fits against numpy and scikit-learn, cross-validated
scores, a saturating map straightened by the isotonic correction, the corrected raster, and the command on GEDI-like
shots and on a LiDAR-like raster over part of a map."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.height_calibration import HeightCalibration, PairSample, fit_height_calibration

CRS = "EPSG:32611"


def test_a_linear_correction_is_least_squares_and_helps_on_held_out_pairs() -> None:
    rng = np.random.default_rng(0)
    truth = rng.uniform(0, 45, 400)
    mapped = 0.7 * truth + 3.0 + rng.normal(0, 1.5, 400)  # tall stands too short, short ones too tall
    got = fit_height_calibration(mapped, truth, method="linear")
    slope, intercept = np.polyfit(mapped, truth, 1)
    probe = np.array([0.0, 10.0, 33.3])
    np.testing.assert_allclose(got.apply(probe), np.maximum(intercept + slope * probe, 0), rtol=1e-5)
    cv = got.cross_validation
    assert got.n == 400 and cv["folds"] == 5
    assert cv["before"]["rmse"] > 5 and cv["after"]["rmse"] < 2.5 and abs(cv["after"]["bias"]) < 0.3
    assert cv["before"]["rmse"] == pytest.approx(np.sqrt(np.mean((mapped - truth) ** 2)))
    # NaN stays NaN, nothing below zero, and the line goes on beyond the pairs
    out = got.apply(np.array([np.nan, -20.0, 100.0]))
    assert np.isnan(out[0]) and out[1] == 0.0 and out[2] == pytest.approx(intercept + slope * 100, rel=1e-5)
    with pytest.raises(ValueError, match="at least 10 pairs"):
        fit_height_calibration(mapped[:9], truth[:9])
    with pytest.raises(ValueError, match="must be one of"):
        fit_height_calibration(mapped, truth, method="cubic")


def test_an_isotonic_correction_straightens_a_saturating_map() -> None:
    """A map that stops growing above ~30 m (the optical signal saturates): the line cannot follow it, the
    monotone correction can, and matches scikit-learn's isotonic regression."""
    from sklearn.isotonic import IsotonicRegression

    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 50, 1500)
    mapped = 32 * (1 - np.exp(-truth / 18)) + rng.normal(0, 0.8, 1500)
    iso = fit_height_calibration(mapped, truth, method="isotonic")
    line = fit_height_calibration(mapped, truth, method="linear")
    assert iso.cross_validation["after"]["rmse"] < 0.75 * line.cross_validation["after"]["rmse"]
    reference = IsotonicRegression(out_of_bounds="clip").fit(mapped, truth)
    probe = np.linspace(mapped.min(), mapped.max(), 50)
    np.testing.assert_allclose(iso.apply(probe), np.maximum(reference.predict(probe), 0), atol=1e-4)
    assert (np.diff(iso.apply(np.linspace(-5, 40, 200))) >= 0).all()  # monotone, flat beyond the knots
    assert iso.apply(np.array([100.0]))[0] == pytest.approx(iso.knots_y[-1])


def test_a_calibration_saves_and_loads(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    truth = rng.uniform(0, 40, 100)
    got = fit_height_calibration(truth * 0.8, truth, method="isotonic", source="shots.gpkg")
    back = HeightCalibration.load(got.save(tmp_path / "c.json"))
    assert back.to_dict() == json.loads(json.dumps(got.to_dict()))
    np.testing.assert_array_equal(back.apply(truth), got.apply(truth))
    (tmp_path / "bad.json").write_text(json.dumps({"method": "linear"}))
    with pytest.raises(ValueError, match="is not a height calibration"):
        HeightCalibration.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HeightCalibration.load(tmp_path / "none.json")


def test_a_pair_sample_is_uniform_and_bounded() -> None:
    sample = PairSample(size=1000, seed=0)
    for block in range(20):  # 20 blocks of 500 pairs, predicted = the block's number
        sample.add(np.full(500, float(block)), np.arange(500.0))
    assert len(sample.predicted) == 1000
    counts = np.bincount(sample.predicted.astype(int), minlength=20)
    assert counts.min() > 25 and counts.max() < 80  # ~50 from each block, early or late
    small = PairSample(size=1000)
    small.add(np.array([1.0, np.nan, 3.0]), np.array([1.0, 2.0, np.nan]))
    assert small.predicted.tolist() == [1.0]


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A true canopy (a LiDAR CHM stand-in), a map of it that saturates, is off by 2 m and has 1 m of noise, 300
    GEDI-like shots of the truth, and the truth over the map's western third only."""
    folder = tmp_path_factory.mktemp("calibrate")
    rng = np.random.default_rng(3)
    transform = from_origin(400_000, 4_000_000, 10.0, 10.0)
    rows, cols = np.indices((80, 90))
    truth = np.clip(25 + 20 * np.sin(cols / 9.0) * np.cos(rows / 7.0) + rng.normal(0, 2, (80, 90)), 0, None)
    mapped = (30 * (1 - np.exp(-truth / 20)) + 2.0 + rng.normal(0, 1.0, truth.shape)).astype(np.float32)
    profile = dict(driver="GTiff", width=90, height=80, count=1, dtype="float32", crs=CRS, transform=transform,
                   nodata=float("nan"))  # fmt: skip
    for name, values in (("truth.tif", truth), ("map.tif", mapped)):
        with rasterio.open(folder / name, "w", **profile) as dst:
            dst.write(values.astype(np.float32), 1)
    with rasterio.open(folder / "truth_west.tif", "w", **{**profile, "width": 30}) as dst:
        dst.write(truth[:, :30].astype(np.float32), 1)
    r, c = rng.integers(0, 80, 300), rng.integers(0, 90, 300)
    x, y = transform @ (c + 0.5, r + 0.5)
    shots = gpd.GeoDataFrame({"rh98": truth[r, c]}, geometry=[Point(a, b) for a, b in zip(x, y)], crs=CRS)
    shots.to_crs("EPSG:4326").to_file(folder / "shots.gpkg")
    return {"folder": folder, "truth": truth, "mapped": mapped}


def test_the_command_corrects_a_map_with_shots_or_a_partial_chm(scene: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    folder, truth = scene["folder"], scene["truth"]
    out = tmp_path / "map_calibrated.tif"
    assert cli_main(["height", "calibrate", str(folder / "map.tif"), str(folder / "shots.gpkg"), "--attribute", "rh98",
                     "--method", "isotonic", "-o", str(out), "--save", str(tmp_path / "c.json")]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "isotonic correction from 300 pairs; 5-fold cross-validated RMSE" in printed and "corrected map:" in printed
    with rasterio.open(out) as src:
        corrected = src.read(1)
        assert json.loads(src.tags()["calibration"])["method"] == "isotonic" and src.units == ("m",)
    before = np.sqrt(np.mean((scene["mapped"] - truth) ** 2))
    after = np.sqrt(np.mean((corrected - truth) ** 2))
    assert before > 5 and after < 0.5 * before, (before, after)
    assert out.with_suffix(".png").stat().st_size > 3000
    assert (tmp_path / "map_calibrated_calibration.png").stat().st_size > 3000  # the pairs and the fitted curve
    # the saved correction on another map, without references
    again = tmp_path / "again.tif"
    assert cli_main(["height", "calibrate", str(folder / "map.tif"), "--calibration", str(tmp_path / "c.json"),
                     "-o", str(again), "--no-quicklook"]) == 0  # fmt: skip
    with rasterio.open(again) as src:
        np.testing.assert_array_equal(src.read(1), corrected)
    # a LiDAR CHM over the western third of the map is enough for a line
    assert cli_main(["height", "calibrate", str(folder / "map.tif"), str(folder / "truth_west.tif"),
                     "-o", str(tmp_path / "lidar.tif"), "--no-quicklook"]) == 0  # fmt: skip
    assert "linear correction from 2,400 pairs" in capsys.readouterr().out
    with rasterio.open(tmp_path / "lidar.tif") as src:
        assert np.sqrt(np.mean((src.read(1) - truth) ** 2)) < before
    # bad input: one sentence each
    assert cli_main(["height", "calibrate", str(folder / "map.tif"), "-o", str(tmp_path / "x.tif")]) == 2
    assert "Reference heights are needed" in capsys.readouterr().err
    assert cli_main(["height", "calibrate", str(folder / "map.tif"), str(folder / "shots.gpkg"), "--calibration",
                     str(tmp_path / "c.json"), "-o", str(tmp_path / "y.tif")]) == 2  # fmt: skip
    assert "not both" in capsys.readouterr().err
    assert cli_main(["height", "calibrate", str(folder / "map.tif"), str(folder / "shots.gpkg"), "--attribute", "rh98",
                     "-o", str(out)]) == 2  # fmt: skip
    assert "already exists" in capsys.readouterr().err


def test_a_correction_per_land_cover(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A map too tall on shrubs (+4 m) and too short under forest (x 0.7 + 3): one line for both cannot fix both;
    a line per class of a land-cover raster (another grid: 30 m over the 10 m map) can, and a class with too few
    shots keeps the global line."""
    rng = np.random.default_rng(5)
    transform = from_origin(400_000, 4_000_000, 10.0, 10.0)
    rows, cols = np.indices((90, 90))
    forest = cols >= 45
    truth = np.where(forest, 25 + 10 * np.sin(rows / 8.0), 4 + 2 * np.cos(cols / 5.0)) + rng.normal(0, 0.5, (90, 90))
    mapped = np.where(forest, 0.7 * truth + 3, truth + 4).astype(np.float32)
    profile = dict(driver="GTiff", width=90, height=90, count=1, dtype="float32", crs=CRS, transform=transform,
                   nodata=float("nan"))  # fmt: skip
    with rasterio.open(tmp_path / "map.tif", "w", **profile) as dst:
        dst.write(mapped, 1)
    cover = forest.reshape(30, 3, 30, 3)[:, 0, :, 0].astype(np.uint8)  # the same split on a 30 m grid
    cover[:2, :2] = 2  # a third class with (almost) no shots
    with rasterio.open(tmp_path / "cover.tif", "w", driver="GTiff", width=30, height=30, count=1, dtype="uint8",
                       crs=CRS, transform=from_origin(400_000, 4_000_000, 30.0, 30.0), nodata=255) as dst:  # fmt: skip
        dst.write(cover, 1)
    r, c = rng.integers(6, 90, 400), rng.integers(0, 90, 400)
    x, y = transform @ (c + 0.5, r + 0.5)
    gpd.GeoDataFrame({"rh98": truth[r, c]}, geometry=[Point(a, b) for a, b in zip(x, y)], crs=CRS).to_file(
        tmp_path / "shots.gpkg")  # fmt: skip
    for by, out in (([], "one.tif"), (["--by", str(tmp_path / "cover.tif")], "per_class.tif")):
        assert cli_main(["height", "calibrate", str(tmp_path / "map.tif"), str(tmp_path / "shots.gpkg"), "--attribute",
                         "rh98", "-o", str(tmp_path / out), "--no-quicklook", "--save",
                         str(tmp_path / out.replace(".tif", ".json")), *by]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "class 0 of cover.tif: its own correction" in printed and "class 1 of cover.tif" in printed
    assert "class 2" not in printed  # too few shots: the global line
    rmse = {}
    for out in ("one.tif", "per_class.tif"):
        with rasterio.open(tmp_path / out) as src:
            rmse[out] = float(np.sqrt(np.mean((src.read(1) - truth) ** 2)))
    assert rmse["per_class.tif"] < 0.5 * rmse["one.tif"], rmse
    saved = HeightCalibration.load(tmp_path / "per_class.json")
    assert sorted(saved.by) == [0, 1] and saved.strata == "cover.tif"
    assert saved.cross_validation["after"]["rmse"] < HeightCalibration.load(tmp_path / "one.json").cross_validation["after"]["rmse"]
    from dinov3_eo.tasks.height_calibration import strata_at

    probe = gpd.GeoDataFrame(geometry=[Point(400_015, 3_999_985), Point(400_600, 3_999_500), Point(390_000, 3_990_000)],
                             crs=CRS).to_crs("EPSG:4326")  # class 2, forest (1), off the raster
    assert strata_at(tmp_path / "cover.tif", probe).tolist() == [2, 1, -1]
    # a saved correction per class needs its classes again
    assert cli_main(["height", "calibrate", str(tmp_path / "map.tif"), "--calibration", str(tmp_path / "per_class.json"),
                     "-o", str(tmp_path / "again.tif")]) == 2  # fmt: skip
    assert "give that raster (--by)" in capsys.readouterr().err
    assert cli_main(["height", "calibrate", str(tmp_path / "map.tif"), "--calibration", str(tmp_path / "per_class.json"),
                     "--by", str(tmp_path / "cover.tif"), "-o", str(tmp_path / "again.tif"), "--no-quicklook"]) == 0
    with rasterio.open(tmp_path / "again.tif") as a, rasterio.open(tmp_path / "per_class.tif") as b:
        np.testing.assert_array_equal(a.read(1), b.read(1))
