"""Polygons embedded at several dates (``embed A.tif B.tif --zones``): each date as one date alone, dates pooled,
missing dates filled, and probes that refuse a table of other dates."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from micro_backbone import micro_backbone_file
from rasterio.warp import Resampling, calculate_default_transform, reproject
from rasterio.windows import Window

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.features import input_normalization, resolve_backbone
from dinov3_eo.tasks.zone_embeddings import read_zone_embeddings, zone_embeddings, zone_feature_sums
from dinov3_eo.tasks.zone_time_series import (
    combine_steps,
    date_label,
    resample_steps,
    season_days,
    step_days,
    time_steps,
    zone_time_series,
)

CROP = Path(__file__).resolve().parent / "data" / "rgb_byte_crop.tif"  # 250 x 230 Landsat RGB at 300 m, nodata 0 (CC0)


def write_part(dst: Path, window: Window | None = None, scale: float = 1.0) -> Path:
    """A window of the test scene (all of it by default), its values times ``scale``, as its own GeoTIFF."""
    with rasterio.open(CROP) as src:
        window = window or Window(0, 0, src.width, src.height)
        data = src.read(window=window)
        profile = {**src.profile, "width": int(window.width), "height": int(window.height),
                   "transform": src.window_transform(window), "blockxsize": None, "blockysize": None}  # fmt: skip
        profile = {k: v for k, v in profile.items() if v is not None}
    scaled = np.where(data == 0, 0, np.clip(np.round(data * scale), 1, 255)).astype(np.uint8)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(scaled)
    return dst


def write_reprojected(dst: Path, crs: str) -> Path:
    """The test scene warped into another CRS (another grid: the dates need not share one)."""
    with rasterio.open(CROP) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = {**src.profile, "crs": crs, "transform": transform, "width": width, "height": height}
        profile = {k: v for k, v in profile.items() if k not in ("blockxsize", "blockysize")}
        with rasterio.open(dst, "w", **profile) as out:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(out, band), resampling=Resampling.nearest)
    return dst


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("zone_dates")
    pth = micro_backbone_file(folder, seed=0)
    backbone = resolve_backbone(pth)
    with rasterio.open(CROP) as src:
        t, crs = src.transform, src.crs
    cell = 16 * abs(t.a)  # one patch
    zones = gpd.GeoDataFrame({"name": ["west", "across the seam", "east", "off the map"]}, crs=crs, geometry=[
        shapely.box(t.c + 9 * cell, t.f - 6 * cell, t.c + 10.5 * cell, t.f - 4 * cell),
        shapely.box(t.c + 13 * cell, t.f - 9 * cell, t.c + 15 * cell, t.f - 7.5 * cell),  # the seam: column 14 patches
        shapely.box(t.c + 14.5 * cell, t.f - 4 * cell, t.c + 15.5 * cell, t.f - 3 * cell),
        shapely.box(t.c - 9 * cell, t.f, t.c - 8 * cell, t.f + cell)])  # fmt: skip
    return {"pth": pth, "backbone": backbone, "norm": input_normalization(backbone.meta, None), "zones": zones,
            "folder": folder}  # fmt: skip


def test_dates_come_from_file_names_and_order_the_steps(tmp_path: Path) -> None:
    assert date_label("LC08_L1TP_224078_20200518_20200527_01_T1.tif") == "2020-05-18"  # acquisition, not processing
    assert date_label("S2A_MSIL2A_20230704T101031_N0509_R022_T32TQM.tif") == "2023-07-04"
    assert date_label("/data/2021-09-30/scene.tif") == "2021-09-30"  # a folder's date when the name has none
    assert date_label("/data/2021-09-30/s2_2021_10_02.tif") == "2021-10-02"  # the name's before the folder's
    assert date_label("tile_224078.tif") is None and date_label("x_20201340.tif") is None  # no month 13
    steps = time_steps(["b/LC08_20200807.tif", "a/LC08_20200518_east.tif", "LC08_20200518_west.tif"])
    assert steps == [("2020-05-18", ["a/LC08_20200518_east.tif", "LC08_20200518_west.tif"]),
                     ("2020-08-07", ["b/LC08_20200807.tif"])]  # fmt: skip
    assert time_steps(["june.tif", "may.tif"]) == [("june", ["june.tif"]), ("may", ["may.tif"])]  # no dates: as given
    assert [s for s, _ in time_steps(["x.tif", "y.tif"], dates=["t2", "t1"])] == ["t2", "t1"]
    with pytest.raises(ValueError, match="2 dates for 3 rasters"):
        time_steps(["a.tif", "b.tif", "c.tif"], dates=["2020-01-01", "2020-02-01"])
    with pytest.raises(ValueError, match="Two rasters are named 'scene'"):
        time_steps(["y/scene.tif", "z/scene.tif"])


def test_combine_steps_against_a_loop() -> None:
    rng = np.random.default_rng(0)
    means = rng.normal(size=(4, 6, 3))
    means[1:3, 0] = np.nan  # polygon 0 unseen at steps 1 and 2: between steps 0 and 3
    means[:, 2] = np.nan  # polygon 2 never seen
    means[[0, 2, 3], 3] = np.nan  # polygon 3 seen at step 1 only
    means[[0, 3], 4] = np.nan  # polygon 4 unseen at both ends of the season
    days = [0.0, 10.0, 40.0, 100.0]  # uneven dates
    concat, seen = combine_steps(means, "concat", times=days)
    mean, _ = combine_steps(means, "mean")
    assert concat.shape == (6, 12) and mean.shape == (6, 3) and list(seen) == [2, 4, 0, 1, 2, 4]
    for z in range(6):
        have = [t for t in range(4) if np.isfinite(means[t, z]).all()]
        if not have:
            assert np.isnan(concat[z]).all() and np.isnan(mean[z]).all()
            continue
        np.testing.assert_allclose(mean[z], sum(means[t, z] for t in have) / len(have), rtol=1e-6)
        for t in range(4):
            earlier, later = [u for u in have if u <= t], [u for u in have if u >= t]
            if earlier and later:
                a, b = earlier[-1], later[0]
                w = 0.0 if a == b else (days[t] - days[a]) / (days[b] - days[a])
                expected = (1 - w) * means[a, z] + w * means[b, z]
            else:  # before the first or after the last date seen: the nearest one
                expected = means[(earlier or later)[-1 if earlier else 0], z]
            np.testing.assert_allclose(concat[z, 3 * t : 3 * t + 3], expected, rtol=1e-6, atol=1e-7)
    # polygon 0 at day 10 is a tenth of the way from day 0 to day 100: interpolated by days, not by position
    np.testing.assert_allclose(concat[0, 3:6], 0.9 * means[0, 0] + 0.1 * means[3, 0], rtol=1e-6, atol=1e-7)
    by_position, _ = combine_steps(means, "concat")
    np.testing.assert_allclose(by_position[0, 3:6], (2 * means[0, 0] + means[3, 0]) / 3, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="temporal must be one of"):
        combine_steps(means, "max")


def test_resample_steps_against_a_loop_and_season_days() -> None:
    rng = np.random.default_rng(1)
    means = rng.normal(size=(3, 4, 2))
    means[:, 3] = np.nan  # never seen: stays so
    times, new = [10.0, 40.0, 100.0], [0.0, 10.0, 25.0, 70.0, 100.0, 130.0]
    got = resample_steps(means, times, new)
    assert got.shape == (6, 4, 2) and np.isnan(got[:, 3]).all()
    for k, when in enumerate(new):
        if when <= times[0] or when >= times[-1]:  # beyond the ends: the nearest date's
            expected = means[0 if when <= times[0] else -1]
        else:
            j = next(i for i in range(1, 3) if times[i] >= when)
            w = (when - times[j - 1]) / (times[j] - times[j - 1])
            expected = (1 - w) * means[j - 1] + w * means[j]
        np.testing.assert_allclose(got[k, :3], expected[:3], rtol=1e-6)
    np.testing.assert_array_equal(season_days(["2022-05-10", "2022-07-15"]), [129, 195])
    np.testing.assert_array_equal(season_days(["2021-11-20", "2022-01-15"]), [323, 379])  # over the new year
    assert season_days(["may", "july"]) is None and season_days(["2022-07-15", "2022-05-10"]) is None


def test_step_days() -> None:
    np.testing.assert_array_equal(step_days(["2021-05-01", "2021-05-11", "2021-07-01"]) - 18748, [0, 10, 61])
    np.testing.assert_array_equal(step_days(["may", "july"]), [0, 1])  # not dates: positions
    np.testing.assert_array_equal(step_days(["2021-02-30", "2021-03-01"]), [0, 1])


def test_each_date_is_its_own_embedding_and_one_dates_scenes_are_pooled(setup: dict) -> None:
    folder, zones, backbone, norm = setup["folder"], setup["zones"], setup["backbone"], setup["norm"]
    run = {"normalization": norm, "window": 96, "progress": False}
    may = write_part(folder / "LC_20200518.tif")
    august = write_reprojected(folder / "LC_20200807.tif", "EPSG:3857")  # another CRS and grid
    # 2020-09-20 in two scenes, west and east of a seam at pixel column 224 (patch column 14)
    west = write_part(folder / "west_20200920.tif", Window(0, 0, 224, 230), scale=0.7)
    east = write_part(folder / "east_20200920.tif", Window(224, 0, 26, 230), scale=0.7)
    table = zone_time_series(backbone, [august, west, may, east], zones, **run)
    made = table.attrs["dinov3_eo"]
    assert made["dates"] == ["2020-05-18", "2020-08-07", "2020-09-20"] and made["time_steps"] == 3
    assert made["source"] == [[str(may)], [str(august)], [str(west), str(east)]] and made["temporal"] == "concat"
    x = np.stack(table["patch_mean"])
    assert x.shape == (4, 3 * 96) and list(table["name"]) == list(zones["name"])
    # steps 1 and 2 are embed --zones on that date's raster alone (in its own CRS)
    for k, path in enumerate([may, august]):
        alone = zone_embeddings(backbone, path, zones, **run)
        np.testing.assert_allclose(x[:3, 96 * k : 96 * (k + 1)], np.stack(alone["patch_mean"][:3]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(table[f"coverage_{made['dates'][k]}"], alone["coverage"], atol=1e-9)
        assert list(table[f"patches_{made['dates'][k]}"]) == list(alone["patches"])
    # step 3: the two scenes' sums pooled; a zone on one side is that scene's alone, one across is their weighted mean
    parts = [zone_feature_sums(backbone, path, zones, **run) for path in (west, east)]
    with np.errstate(invalid="ignore"):  # the zone off the map: 0 / 0
        pooled = (parts[0].sums + parts[1].sums) / (parts[0].weights + parts[1].weights)[:, None]
    np.testing.assert_allclose(x[:3, 192:], pooled[:3], rtol=1e-5, atol=1e-6)
    assert parts[0].weights[2] == 0 and parts[1].weights[0] == 0 and (parts[0].weights[1] > 0) and (parts[1].weights[1] > 0)
    np.testing.assert_allclose(x[0, 192:], parts[0].means()[0], rtol=1e-5, atol=1e-6)
    assert list(table["coverage_2020-09-20"][:3]) == pytest.approx([1.0, 1.0, 1.0])
    assert list(table["dates_seen"]) == [3, 3, 3, 0] and np.isnan(x[3]).all()
    assert table["patches"][1] == sum(table[f"patches_{d}"][1] for d in made["dates"])
    # the mean over the dates: the three blocks averaged
    mean = zone_time_series(backbone, [may, august, west, east], zones, temporal="mean", **run)
    np.testing.assert_allclose(np.stack(mean["patch_mean"][:3]), x[:3].reshape(3, 3, 96).mean(axis=1), rtol=1e-5, atol=1e-6)


def test_a_date_without_features_takes_the_polygons_other_dates(setup: dict) -> None:
    folder, zones, backbone, norm = setup["folder"], setup["zones"], setup["backbone"], setup["norm"]
    run = {"normalization": norm, "window": 96, "progress": False}
    whole = write_part(folder / "whole_20210601.tif")
    west = write_part(folder / "west_20210701.tif", Window(0, 0, 224, 230), scale=1.3)  # the east zone is outside it
    table = zone_time_series(backbone, [whole, west], zones, **run)
    x = np.stack(table["patch_mean"])
    assert list(table["dates_seen"]) == [2, 2, 1, 0] and table["coverage_2021-07-01"][2] == 0
    np.testing.assert_array_equal(x[2, 96:], x[2, :96])  # july missing: june's features
    assert not np.allclose(x[0, 96:], x[0, :96])


def test_time_series_from_the_command_line_and_probes_that_check_the_dates(
    setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    folder, pth = setup["folder"], str(setup["pth"])
    dates = [write_part(folder / f"cli_{d}.tif", scale=s) for d, s in (("20220510", 1.0), ("20220715", 0.8))]
    with rasterio.open(CROP) as src:
        t, crs = src.transform, src.crs
    cell = 16 * abs(t.a)
    # a grid of small parcels over the test scene, labelled by position, a column of them left to classify
    boxes = [shapely.box(t.c + (10 + c) * cell, t.f - (2 + r) * cell, t.c + (10.8 + c) * cell, t.f - (1.2 + r) * cell)
             for r in range(4) for c in range(6)]  # fmt: skip
    labels = [("north" if k < 12 else "south") if k % 6 else None for k in range(len(boxes))]
    gpd.GeoDataFrame({"zone": labels}, crs=crs, geometry=boxes).to_file(tmp_path / "parcels.gpkg")
    table = tmp_path / "parcels.parquet"
    base = ["--model", pth, "--zones", str(tmp_path / "parcels.gpkg"), "--window", "96", "--quiet"]
    assert cli_main(["embed", *map(str, dates), *base, "-o", str(table)]) == 0
    assert "24 polygons embedded (24 with features, mean coverage 1.00) at 2 dates: 2022-05-10, 2022-07-15" in capsys.readouterr().out
    frame, x = read_zone_embeddings(table)
    assert x.shape == (24, 192) and frame.attrs["dinov3_eo"]["dates"] == ["2022-05-10", "2022-07-15"]
    import pyarrow.parquet as pq

    assert json.loads(pq.read_schema(table).metadata[b"dinov3_eo"])["time_steps"] == 2
    assert {"coverage_2022-05-10", "patches_2022-07-15", "dates_seen"} <= set(frame.columns)
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--zones", str(table), "--label-column", "zone", "--val-fraction", "0.25",
                     "-o", str(probe)]) == 0  # fmt: skip
    from dinov3_eo.tasks.chip_classification import ChipClassifier

    assert ChipClassifier.load(probe).embedding["dates"] == ["2022-05-10", "2022-07-15"]
    out = tmp_path / "predicted.csv"
    assert cli_main(["classify", "predict", "--zones", str(table), "--probe", str(probe), "-o", str(out)]) == 0
    capsys.readouterr()
    # another season's table of the same two steps, named by --dates: the probe applies
    other = tmp_path / "other.parquet"
    assert cli_main(["embed", *map(str, dates[::-1]), *base, "--dates", "2023-07-02", "2023-05-03", "-o", str(other)]) == 0
    assert json.loads(pq.read_schema(other).metadata[b"dinov3_eo"])["dates"] == ["2023-05-03", "2023-07-02"]
    np.testing.assert_allclose(read_zone_embeddings(other)[1], x, rtol=1e-6)  # the same files in date order
    assert cli_main(["classify", "predict", "--zones", str(other), "--probe", str(probe), "-o",
                     str(tmp_path / "other.csv"), "--overwrite"]) == 0  # fmt: skip
    # next year's season on three other days: interpolated to the probe's days of the year (05-10 and 07-15)
    third = write_part(folder / "sep_20220905.tif", scale=0.6)  # (not in the glob below)
    later = tmp_path / "later.parquet"
    assert cli_main(["embed", *map(str, [*dates, third]), *base, "--dates", "2023-04-30", "2023-06-20", "2023-09-01",
                     "-o", str(later)]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli_main(["classify", "predict", "--zones", str(later), "--probe", str(probe), "-o", str(tmp_path / "later.csv")]) == 0
    assert "its 3 dates (2023-04-30, 2023-06-20, 2023-09-01) interpolated to the probe's 2 days of the year (05-10, 07-15)" in capsys.readouterr().err
    x3 = read_zone_embeddings(later)[1].reshape(24, 3, 96)
    april, june, september = 119, 170, 243  # days since 1 January 2023; the probe's: 129 and 195 (2022)
    may = x3[:, 0] + (129 - april) / (june - april) * (x3[:, 1] - x3[:, 0])
    july = x3[:, 1] + (195 - june) / (september - june) * (x3[:, 2] - x3[:, 1])
    from dinov3_eo.tasks.chip_classification import ChipClassifier as Probe

    fitted = Probe.load(probe)
    expected = fitted.scores(np.concatenate([may, july], axis=1))
    written = pd.read_csv(tmp_path / "later.csv")
    np.testing.assert_allclose(written[[f"p_{c}" for c in fitted.classes]].to_numpy(), expected, rtol=1e-4, atol=1e-6)
    # a quoted glob of the season's files: the same table
    globbed = tmp_path / "globbed.parquet"
    assert cli_main(["embed", str(folder / "cli_2022*.tif"), *base, "-o", str(globbed)]) == 0
    np.testing.assert_allclose(read_zone_embeddings(globbed)[1], x, rtol=1e-6)
    # one date, or the dates averaged: refused by a probe of two dates one after the other
    one = tmp_path / "one.parquet"
    assert cli_main(["embed", str(dates[0]), *base, "-o", str(one)]) == 0
    capsys.readouterr()
    assert cli_main(["classify", "predict", "--zones", str(one), "--probe", str(probe), "-o", str(tmp_path / "x.csv")]) == 2
    assert "at 1 date(s) one after the other, the probe's polygons at 2" in capsys.readouterr().err
    # bad input: several inputs without --zones, --dates of the wrong length, a date with other bands
    assert cli_main(["embed", *map(str, dates), "--model", pth, "-o", str(tmp_path / "f.tif")]) == 2
    assert "several GeoTIFFs are a time series of polygons, with --zones" in capsys.readouterr().err
    assert cli_main(["embed", *map(str, dates), *base, "--dates", "2022-05-10", "-o", str(tmp_path / "d.parquet")]) == 2
    assert "1 dates for 2 rasters" in capsys.readouterr().err
    with rasterio.open(CROP) as src:
        profile = {**src.profile, "count": 1, "blockxsize": None, "blockysize": None}
        profile = {k: v for k, v in profile.items() if v is not None}
        with rasterio.open(tmp_path / "one_band_20220901.tif", "w", **profile) as out_band:
            out_band.write(src.read(1), 1)
    assert cli_main(["embed", *map(str, dates), str(tmp_path / "one_band_20220901.tif"), *base, "-o",
                     str(tmp_path / "b.parquet")]) == 2  # fmt: skip
    assert "one_band_20220901.tif gives 1 bands but the backbone" in capsys.readouterr().err
    assert not (tmp_path / "b.parquet").exists() and not (tmp_path / "d.parquet").exists()
