"""GEDI granules to shots: the filters against a shot-by-shot loop, the area against rasterio's reprojection, the
values and times against the HDF5 datasets, L4A biomass, clear errors for files that are not (complete) granules, and
the command end to end: shots over a canopy-height map, then that map scored on them.

The granules are written here with h5py in the layout of GEDI's products (``BEAMxxxx`` groups of per-shot datasets,
``rh`` ``[shots, 101]``); their shots lie on eight tracks 150 m apart across a 1.2 km height map in UTM 11N and run
1 km beyond it at both ends, their ``rh98`` the map's height under them plus 0.2 m noise.
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import h5py
import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.transform import from_origin

from dinov3_eo.data.gedi import (
    COVERAGE_BEAMS,
    POWER_BEAMS,
    STEPS,
    ShotArea,
    ShotFilter,
    read_gedi_granule,
    read_gedi_shots,
    value_column,
)

CRS = "EPSG:32611"
LEFT, TOP, RES, SIZE = 320_000.0, 4_100_000.0, 10.0, 120
BEAMS = COVERAGE_BEAMS + POWER_BEAMS
DAY = 86_400.0
#: the first beam's shots are 2020-05-18 (GEDI's delta_time counts seconds from 2018-01-01 UTC); each next beam's
#: 40 days later
START = (np.datetime64("2020-05-18T06:00:00", "s") - np.datetime64("2018-01-01T00:00:00", "s")).astype(float)


def _height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.clip(20 + 15 * np.sin(x / 200.0) * np.cos(y / 300.0), 0, None)


def write_height_map(path: Path) -> Path:
    """A 120 x 120 height map at 10 m (metres, float32), its top-left 10 x 10 pixels nodata."""
    transform = from_origin(LEFT, TOP, RES, RES)
    rows, cols = np.indices((SIZE, SIZE))
    x, y = transform @ (cols + 0.5, rows + 0.5)
    heights = _height(x, y).astype(np.float32)
    heights[:10, :10] = -9999
    with rasterio.open(path, "w", driver="GTiff", width=SIZE, height=SIZE, count=1, dtype="float32", crs=CRS,
                       transform=transform, nodata=-9999) as dst:  # fmt: skip
        dst.write(heights, 1)
    return path


@pytest.fixture(scope="module")
def chm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_height_map(tmp_path_factory.mktemp("gedi_map") / "chm.tif")


def track_datasets(chm: Path, rng: np.random.Generator) -> dict[str, dict[str, np.ndarray]]:
    """The datasets of eight L2A beams (mid-pixel shots every 60 m, 1 km beyond the map at both ends)."""
    to_lonlat = Transformer.from_crs(CRS, "EPSG:4326", always_xy=True)
    beams = {}
    with rasterio.open(chm) as src:
        heights = src.read(1)
    for i, beam in enumerate(BEAMS):
        y = TOP + 1005.0 - 60.0 * np.arange(57)
        x = np.full_like(y, LEFT + 75.0 + 150.0 * i)
        lon, lat = to_lonlat.transform(x, y)
        n = len(y)
        row, col = np.floor((TOP - y) / RES).astype(int), np.floor((x - LEFT) / RES).astype(int)
        on = (row >= 0) & (row < SIZE) & (col >= 0) & (col < SIZE)
        truth = rng.uniform(0, 30, n)
        truth[on] = heights[row[on], col[on]]
        truth[truth < 0] = 5.0  # nodata under the shot: any height (the map has none to compare)
        top = truth + rng.normal(0, 0.2, n)
        rh = np.clip(top[:, None] * np.arange(101)[None, :] / 98.0, None, top[:, None] + 1.0).astype(np.float32)
        quality = (rng.random(n) < 0.8).astype(np.uint8)
        rh[(quality == 0) & (rng.random(n) < 0.5)] = -9999.0
        rh[rng.random(n) < 0.04] = -9999.0  # a few good-flag shots without heights
        ground = 1500 + rng.normal(0, 3, n)
        dem = ground + rng.normal(0, 5, n) + np.where(rng.random(n) < 0.08, 300.0, 0.0)
        beams[beam] = {
            "lat_lowestmode": lat, "lon_lowestmode": lon, "rh": rh, "quality_flag": quality,
            "degrade_flag": np.where(rng.random(n) < 0.05, 3, 0).astype(np.uint8),
            "sensitivity": rng.uniform(0.85, 1.0, n).astype(np.float32),
            "solar_elevation": rng.uniform(-30, 30, n).astype(np.float32),
            "land_cover_data/leaf_off_flag": (rng.random(n) < 0.1).astype(np.uint8),
            "elev_lowestmode": ground.astype(np.float32), "digital_elevation_model": dem.astype(np.float32),
            "delta_time": START + i * 40 * DAY + np.arange(n) * 0.0083,
            "shot_number": ((i + 1) * 10**15 + np.arange(n) * 100 + 7).astype(np.uint64),
        }  # fmt: skip
    return beams


def write_granule(path: Path, beams: dict[str, dict[str, np.ndarray]]) -> Path:
    """An HDF5 file in GEDI's layout: one group per beam, one dataset per column (``a/b`` nested)."""
    with h5py.File(path, "w") as f:
        f.create_group("METADATA")
        for beam, columns in beams.items():
            group = f.create_group(beam)
            for name, values in columns.items():
                group.create_dataset(name, data=values)
    return path


@pytest.fixture(scope="module")
def granule(chm: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, np.ndarray]]]:
    beams = track_datasets(chm, np.random.default_rng(0))
    folder = tmp_path_factory.mktemp("granules")
    return write_granule(folder / "GEDI02_A_2020139_O08000_T01234_02_003_01_V002.h5", beams), beams


def _naive(beams: dict[str, dict[str, np.ndarray]], keeps_area, filters: ShotFilter) -> tuple[set[int], dict[str, int]]:
    """Shot by shot, the filters in the documented order: the kept shot numbers and what each step removed."""
    removed = {step: 0 for step in STEPS}
    start, end = filters.time_range()
    kept = set()
    for beam, c in beams.items():
        for k in range(len(c["lat_lowestmode"])):
            time = np.datetime64("2018-01-01T00:00:00", "ns") + np.timedelta64(int(round(c["delta_time"][k] * 1e9)), "ns")
            rh = c["rh"][k, [50, 75, 95, 98, 100]]
            tests = [
                ("beams", filters.keeps_beam(beam)),
                ("area", keeps_area(c["lon_lowestmode"][k], c["lat_lowestmode"][k])),
                ("dates", (start is None or time >= start) and (end is None or time <= end)),
                ("quality", not filters.quality or (c["quality_flag"][k] == 1 and c["degrade_flag"][k] == 0)),
                ("sensitivity", c["sensitivity"][k] >= filters.min_sensitivity),
                ("night", not filters.night or c["solar_elevation"][k] < 0),
                ("leaf-on", not filters.leaf_on or c["land_cover_data/leaf_off_flag"][k] == 0),
                ("dem", filters.max_dem_difference is None
                 or abs(float(c["elev_lowestmode"][k]) - float(c["digital_elevation_model"][k])) <= filters.max_dem_difference),
                ("values", bool(np.all(rh != -9999.0))),
            ]  # fmt: skip
            failed = next((step for step, ok in tests if not ok), None)
            if failed is None:
                kept.add(int(c["shot_number"][k]))
            else:
                removed[failed] += 1
    return kept, removed


def test_filters_keep_what_a_shot_by_shot_loop_keeps(granule, chm: Path) -> None:
    path, beams = granule
    to_map = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)

    def in_map(lon: float, lat: float) -> bool:  # rasterio's reprojection, independently of ShotArea
        (x,), (y,) = rasterio.warp.transform("EPSG:4326", CRS, [lon], [lat])
        return LEFT <= x <= LEFT + SIZE * RES and TOP - SIZE * RES <= y <= TOP

    assert to_map  # the CRS is known to pyproj
    total = sum(len(c["lat_lowestmode"]) for c in beams.values())
    for filters in (ShotFilter(), ShotFilter(beams="power", night=True, leaf_on=True, max_dem_difference=50),
                    ShotFilter(quality=False, min_sensitivity=0.0, start="2020-06-01", end="2020-09-05"),
                    ShotFilter(beams="coverage", min_sensitivity=0.9, end="2020-06-27")):  # fmt: skip
        shots = read_gedi_granule(path, area=ShotArea.of_raster(chm), filters=filters)
        kept, removed = _naive(beams, in_map, filters)
        assert set(shots.frame["shot_number"]) == kept and len(shots.frame) == len(kept) > 0
        assert shots.counts == {"read": total} | removed
        assert shots.counts["area"] > 0 and shots.product == "L2A" and shots.unit == "m"
        assert shots.summary()[0] == f"{len(kept):,} of {total:,} L2A shots kept"
    assert ShotFilter(end="2020-06-27").time_range()[1] == np.datetime64("2020-06-27T23:59:59")
    nowhere = read_gedi_shots(path, area=ShotArea(10, 10, 11, 11), progress=False)
    assert len(nowhere.frame) == 0 and nowhere.counts["area"] == total
    assert list(nowhere.frame.columns[:3]) == ["shot_number", "time", "granule"]


def test_columns_hold_the_granules_values_times_and_places(granule, chm: Path) -> None:
    path, beams = granule
    shots = read_gedi_shots([path.parent], area=ShotArea.of_raster(chm), percentiles=(0, 98, 100), progress=False)
    frame = shots.frame
    assert frame.crs.to_epsg() == 4326 and value_column(shots) == "rh98"
    assert list(frame.columns) == ["shot_number", "time", "granule", "beam", "power_beam", "sensitivity",
                                   "solar_elevation", "rh0", "rh98", "rh100", "geometry"]  # fmt: skip
    assert frame["shot_number"].dtype == np.int64 and str(frame["time"].dt.tz) == "UTC"
    assert (frame["granule"] == path.name).all()
    for _, shot in frame.sample(20, random_state=0).iterrows():
        c = beams[shot["beam"]]
        k = int(np.flatnonzero(c["shot_number"] == shot["shot_number"])[0])
        assert shot["power_beam"] == (shot["beam"] in POWER_BEAMS)
        assert shot["rh98"] == pytest.approx(c["rh"][k, 98]) and shot["rh100"] == pytest.approx(c["rh"][k, 100])
        assert shot["sensitivity"] == pytest.approx(c["sensitivity"][k])
        assert shot.geometry.x == c["lon_lowestmode"][k] and shot.geometry.y == c["lat_lowestmode"][k]
        expected = np.datetime64("2018-01-01") + np.timedelta64(int(c["delta_time"][k] * 1000), "ms")
        assert abs(shot["time"].tz_convert(None).to_datetime64() - expected) < np.timedelta64(1, "ms")
    # a box in degrees keeps the same shots as the raster's bounds where the box is the bounds' lon/lat extent
    box = ShotArea.of_raster(chm)
    loose = read_gedi_shots(path, area=ShotArea(box.west, box.south, box.east, box.north), progress=False)
    assert set(shots.frame["shot_number"]) <= set(loose.frame["shot_number"])


def test_a_box_across_the_antimeridian() -> None:
    area = ShotArea(170.0, -10.0, -170.0, 10.0)
    lon = np.array([175.0, -175.0, 0.0, 179.9, -169.0, 175.0])
    lat = np.array([0.0, 5.0, 0.0, -9.0, 0.0, 11.0])
    np.testing.assert_array_equal(area.contains(lon, lat), [True, True, False, True, False, False])
    with pytest.raises(ValueError, match="not west, south, east, north"):
        ShotArea(0, 10, 1, 5)


def test_l4a_biomass_granules(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 30
    agbd = rng.gamma(2.0, 60.0, n).astype(np.float32)
    agbd[[3, 7]] = -9999.0
    beam = {"lat_lowestmode": np.linspace(-2.0, -2.1, n), "lon_lowestmode": np.full(n, 20.0), "agbd": agbd,
            "agbd_se": np.full(n, 12.0, np.float32), "l4_quality_flag": np.where(np.arange(n) % 5 == 0, 0, 1),
            "degrade_flag": np.zeros(n, np.uint8), "sensitivity": np.full(n, 0.97, np.float32),
            "solar_elevation": np.full(n, -5.0, np.float32), "delta_time": START + np.arange(n),
            "shot_number": np.arange(n, dtype=np.uint64) + 5}  # fmt: skip
    path = write_granule(tmp_path / "GEDI04_A_2020.h5", {"BEAM0101": beam, "BEAM0000": beam})
    shots = read_gedi_granule(path, filters=ShotFilter(beams="power"))
    expected = [k for k in range(n) if k % 5 and agbd[k] != -9999.0]
    assert shots.product == "L4A" and shots.unit == "Mg/ha" and value_column(shots) == "agbd"
    np.testing.assert_allclose(shots.frame["agbd"], agbd[expected])
    assert (shots.frame["agbd_se"] == 12.0).all() and (shots.frame["beam"] == "BEAM0101").all()
    assert shots.counts == {"read": 2 * n, "beams": n, "area": 0, "dates": 0, "quality": 6, "sensitivity": 0,
                            "night": 0, "leaf-on": 0, "dem": 0, "values": 2}  # fmt: skip
    # an L2A granule of the same shots: both products read and joined by shot number
    heights = np.tile(np.linspace(0, 30, 101, dtype=np.float32), (n, 1)) + np.arange(n, dtype=np.float32)[:, None]
    l2a = {k: v for k, v in beam.items() if k not in ("agbd", "agbd_se", "l4_quality_flag")}
    write_granule(tmp_path / "GEDI02_A.h5", {"BEAM0101": {**l2a, "rh": heights, "quality_flag": np.ones(n, np.uint8)}})
    joined = read_gedi_shots(tmp_path, filters=ShotFilter(beams="power"), progress=False)
    assert joined.product == "L2A+L4A" and value_column(joined) == "rh98"
    np.testing.assert_array_equal(joined.frame["shot_number"], np.array(expected) + 5)  # the shots both kept
    np.testing.assert_allclose(joined.frame["agbd"], agbd[expected])
    np.testing.assert_allclose(joined.frame["rh98"], heights[expected, 98])
    assert joined.counts["not in L4A"] == n - len(expected) and joined.frame.crs.to_epsg() == 4326
    assert joined.summary()[0] == f"{len(expected)} of {n} L2A+L4A shots kept"  # of the first product's shots


def test_l2b_canopy_cover_granules_keep_their_places_in_geolocation(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    n = 25
    rh100 = rng.integers(0, 4000, n).astype(np.int16)  # centimetres
    rh100[4] = -9999
    beam = {"cover": rng.uniform(0, 1, n).astype(np.float32), "pai": rng.uniform(0, 6, n).astype(np.float32),
            "fhd_normal": rng.uniform(0, 3, n).astype(np.float32), "rh100": rh100,
            "l2b_quality_flag": np.where(np.arange(n) % 6 == 0, 0, 1).astype(np.uint8),
            "sensitivity": np.full(n, 0.98, np.float32),
            "geolocation/lat_lowestmode": np.linspace(1.0, 1.1, n), "geolocation/lon_lowestmode": np.full(n, 30.0),
            "geolocation/shot_number": np.arange(n, dtype=np.uint64) + 9,
            "geolocation/delta_time": START + np.arange(n), "geolocation/degrade_flag": np.zeros(n, np.uint8),
            "geolocation/solar_elevation": np.full(n, 10.0, np.float32)}  # fmt: skip
    shots = read_gedi_granule(write_granule(tmp_path / "GEDI02_B.h5", {"BEAM0110": beam}))
    kept = [k for k in range(n) if k % 6 and k != 4]
    assert shots.product == "L2B" and value_column(shots) == "cover"
    assert list(shots.frame.columns[-5:]) == ["cover", "pai", "fhd_normal", "rh100", "geometry"]
    np.testing.assert_allclose(shots.frame["rh100"], rh100[kept] / 100.0, rtol=1e-6)  # metres
    np.testing.assert_allclose(shots.frame["cover"], beam["cover"][kept])
    np.testing.assert_array_equal(shots.frame["shot_number"], np.arange(n)[kept] + 9)
    assert shots.counts["quality"] == 5 and shots.counts["values"] == 1
    night = read_gedi_granule(tmp_path / "GEDI02_B.h5", filters=ShotFilter(night=True))
    assert len(night.frame) == 0 and night.counts["night"] == len(kept) + 1  # (the night filter comes before values)


def test_files_that_are_not_complete_granules_say_so(granule, tmp_path: Path) -> None:
    path, beams = granule
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="notes.h5.* is not a readable HDF5 file"):
        read_gedi_granule(text)
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f.create_group("METADATA")
    with pytest.raises(ValueError, match="has no BEAM groups: it is not a GEDI granule"):
        read_gedi_granule(tmp_path / "empty.h5")
    l1b = write_granule(tmp_path / "l1b.h5", {"BEAM0000": {"rxwaveform": np.zeros(3, np.int16)}})
    with pytest.raises(ValueError, match="holds none of L2A relative heights .* or L4A biomass"):
        read_gedi_granule(l1b)
    subset = {beam: {k: v for k, v in c.items() if k != "sensitivity"} for beam, c in beams.items()}
    write_granule(tmp_path / "subset.h5", subset)
    with pytest.raises(KeyError, match="BEAM0000 has no 'sensitivity', needed for the sensitivity filter"):
        read_gedi_granule(tmp_path / "subset.h5")
    shots = read_gedi_granule(tmp_path / "subset.h5", filters=ShotFilter(min_sensitivity=0))
    assert len(shots.frame) and shots.frame["sensitivity"].isna().all()
    with pytest.raises(FileNotFoundError, match="GEDI granule source .* matched no GEDI granule files"):
        read_gedi_shots(tmp_path / "nothing" / "*.h5")
    with pytest.raises(ValueError, match="percentiles are integers from 0 to 100"):
        read_gedi_granule(path, percentiles=(98, 101))
    with pytest.raises(ValueError, match="ends .* before it starts"):
        ShotFilter(start="2021-01-01", end="2020-01-01")
    with pytest.raises(ValueError, match="'monday' is not an ISO date"):
        ShotFilter(start="monday")
    with pytest.raises(ValueError, match="beams must be"):
        ShotFilter(beams="strong")
    from dinov3_eo.tasks.tile_values import vector_values

    with pytest.raises(ValueError, match="turn GEDI granules into filtered shots first"):
        vector_values(path, "rh98")


def test_the_command_writes_shots_a_height_map_is_scored_on(granule, chm: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from dinov3_eo.cli import main as cli_main

    path, beams = granule
    out = tmp_path / "shots.gpkg"
    assert cli_main(["gedi", str(path), "--within", str(chm), "--out", str(out), "--beams", "power"]) == 0
    printed = capsys.readouterr().out
    expected = read_gedi_granule(path, area=ShotArea.of_raster(chm), filters=ShotFilter(beams="power"))
    assert f"{len(expected.frame):,} of 456 L2A shots kept" in printed and "  beams: -228" in printed
    assert out.with_suffix(".png").stat().st_size > 5000
    written = gpd.read_file(out, layer="shots")
    assert written.crs.to_epsg() == 4326 and len(written) == len(expected.frame)
    np.testing.assert_array_equal(written["shot_number"], expected.frame["shot_number"])
    np.testing.assert_allclose(written["rh98"], expected.frame["rh98"])
    assert cli_main(["gedi", str(path), "--within", str(chm), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert cli_main(["gedi", str(path), "--bounds", "10", "10", "11", "11", "--out", str(tmp_path / "none.gpkg")]) == 2
    assert "No shot is left to write" in capsys.readouterr().err
    assert cli_main(["gedi", str(path), "--out", str(tmp_path / "shots.shp")]) == 2
    assert "written as .gpkg, .geojson or .csv" in capsys.readouterr().err
    # a CSV of lon, lat: read back as the same points
    assert cli_main(["gedi", str(path), "--within", str(chm), "--out", str(tmp_path / "shots.csv"), "--beams", "power",
                     "--no-picture"]) == 0  # fmt: skip
    from dinov3_eo.tasks.tile_values import vector_values

    table = vector_values(tmp_path / "shots.csv", "rh98")
    np.testing.assert_allclose(table.geometry.x, expected.frame.geometry.x)
    np.testing.assert_allclose(table["_value"], expected.frame["rh98"], rtol=1e-6)

    # the map under the shots is their height to the noise (0.2 m), pixel by pixel; shots over its nodata corner
    # are off the map
    every = tmp_path / "every.gpkg"
    assert cli_main(["gedi", str(path), "--within", str(chm), "--out", str(every), "--min-sensitivity", "0",
                     "--no-picture"]) == 0  # fmt: skip
    assert not every.with_suffix(".png").exists()
    assert cli_main(["height", "evaluate", str(chm), str(every), "--attribute", "rh98",
                     "--out-dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    on, off = saved["footprints_on_map"], saved["footprints_off_map"]
    assert on + off == len(gpd.read_file(every)) and on > 80 and 0 < off < 10
    assert saved["metrics"]["all"]["n"] == on
    assert 0.15 < saved["metrics"]["all"]["rmse"] < 0.26 and abs(saved["metrics"]["all"]["bias"]) < 0.07


def test_a_shot_map_without_a_background(granule, tmp_path: Path) -> None:
    from dinov3_eo.tasks.height_plots import shot_map

    shots = read_gedi_granule(granule[0])
    picture = shot_map(tmp_path / "shots.png", shots.frame, "rh98", label="rh98 (m)")
    from PIL import Image

    with Image.open(picture) as image:
        assert image.size[0] > 300 and image.size[1] > 300
