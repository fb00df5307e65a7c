"""Zonal statistics against pixel-centre arithmetic with shapely and numpy, zone by zone: value maps (overlapping
zones, zones cut by block edges, zones in another CRS, partly and wholly off the map, percentiles), class maps
(hectares, shares, majority), and the command's outputs and errors."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin
from shapely.geometry import Point, Polygon, box

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.zonal import PERCENTILE_BINS, overlap_free_layers, zonal_statistics

CRS = "EPSG:32611"
LEFT, TOP, RES = 500_000.0, 4_200_000.0, 10.0
H, W = 90, 100


def _grid_centres() -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.indices((H, W))
    return LEFT + (cols + 0.5) * RES, TOP - (rows + 0.5) * RES


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A biomass-like value map (Mg/ha, NaN nodata patch) and a land-cover class map (uint8, named, 255 nodata)."""
    folder = tmp_path_factory.mktemp("zonal")
    rng = np.random.default_rng(0)
    x, y = _grid_centres()
    values = (120 + 80 * np.sin(x / 170.0) * np.cos(y / 130.0) + rng.normal(0, 10, (H, W))).astype(np.float32)
    values[40:50, 60:75] = np.nan
    classes = np.where(values > 150, 2, np.where(values > 90, 1, 0)).astype(np.uint8)
    classes[0:6, :] = 255
    profile = dict(driver="GTiff", width=W, height=H, count=1, crs=CRS, transform=from_origin(LEFT, TOP, RES, RES))
    with rasterio.open(folder / "agb.tif", "w", dtype="float32", nodata=float("nan"), **profile) as dst:
        dst.write(values, 1)
        dst.units = ("Mg/ha",)
    with rasterio.open(folder / "cover.tif", "w", dtype="uint8", nodata=255, **profile) as dst:
        dst.write(classes, 1)
        dst.update_tags(class_names=json.dumps(["open", "shrub", "forest"]))
    zones = gpd.GeoDataFrame(
        {"name": ["stand A", "stand B", "overlaps A", "half off", "off map", "tiny"]},
        geometry=[
            Polygon([(500_013, 4_199_987), (500_377, 4_199_951), (500_402, 4_199_603), (500_061, 4_199_577)]),
            box(500_433.3, 4_199_402.7, 500_951.1, 4_199_131.9),  # across the 16-px block edges
            Point(500_300.7, 4_199_700.2).buffer(140),
            box(500_803.3, 4_199_702.2, 501_245.9, 4_199_450.4),
            box(502_000, 4_190_000, 502_500, 4_189_500),
            box(500_501, 4_199_501, 500_504, 4_199_504),  # smaller than a pixel, off every centre
        ],
        crs=CRS,
    ).to_crs("EPSG:4326")  # zones in another CRS than the map
    zones.to_file(folder / "zones.gpkg")
    return {"folder": folder, "values": values, "classes": classes, "zones": zones}


def _inside(zone: Polygon) -> np.ndarray:
    x, y = _grid_centres()
    return shapely.contains_xy(zone, x, y)


def test_value_statistics_are_each_zones_pixels(maps: dict) -> None:
    frame = zonal_statistics(maps["folder"] / "agb.tif", maps["zones"], percentiles=(10, 50, 95), block=16,
                             progress=False)  # fmt: skip
    assert frame.crs.to_epsg() == 4326 and list(frame["name"]) == list(maps["zones"]["name"])
    assert sorted(p.name for p in maps["folder"].iterdir()) == ["agb.tif", "cover.tif", "zones.gpkg"]  # no .aux.xml
    values = maps["values"].astype(np.float64)
    width = (np.nanmax(values) - np.nanmin(values)) / PERCENTILE_BINS
    local = maps["zones"].to_crs(CRS)
    for i, zone in enumerate(local.geometry):
        inside = _inside(zone)
        pixels = values[inside & np.isfinite(values)]
        row = frame.iloc[i]
        assert row["count"] == pixels.size
        assert row["area_ha"] == pytest.approx(inside.sum() * 0.01)
        if not pixels.size:
            assert np.isnan(row["mean"]) and np.isnan(row["p50"])
            continue
        assert row["coverage"] == pytest.approx(pixels.size / inside.sum())
        assert row["mean"] == pytest.approx(pixels.mean(), rel=1e-9)
        assert row["std"] == pytest.approx(pixels.std(ddof=1), rel=1e-6)
        assert (row["min"], row["max"]) == (pytest.approx(pixels.min()), pytest.approx(pixels.max()))
        assert row["sum"] == pytest.approx(pixels.sum(), rel=1e-9)
        assert row["total_Mg"] == pytest.approx(pixels.sum() * 0.01, rel=1e-9)  # Mg/ha x 0.01 ha a pixel
        for q in (10, 50, 95):
            assert abs(row[f"p{q}"] - np.percentile(pixels, q, method="inverted_cdf")) <= width * 1.001, (i, q)
    assert frame.loc[4, "count"] == 0 and frame.loc[4, "area_ha"] == 0  # off the map
    assert 0 < frame.loc[3, "coverage"] <= 1 and frame.loc[0, "count"] > 100
    # the overlapping zones each count the pixels they share
    shared = _inside(local.geometry[0]) & _inside(local.geometry[2])
    assert shared.sum() > 50
    # a zone smaller than a pixel has none, unless it takes the pixels it touches
    assert frame.loc[5, "count"] == 0
    touched = zonal_statistics(maps["folder"] / "agb.tif", maps["zones"], all_touched=True, progress=False)
    assert touched.loc[5, "count"] == 1 and (touched["count"] >= frame["count"]).all()
    # one block or many: the same sums
    whole = zonal_statistics(maps["folder"] / "agb.tif", maps["zones"], progress=False)
    np.testing.assert_allclose(whole["mean"], frame["mean"], rtol=1e-9)


def test_class_statistics_are_hectares_and_shares(maps: dict) -> None:
    frame = zonal_statistics(maps["folder"] / "cover.tif", maps["folder"] / "zones.gpkg", block=32, progress=False)
    assert [c for c in frame.columns if c.endswith(("_ha", "_share"))] == [
        "open_ha", "open_share", "shrub_ha", "shrub_share", "forest_ha", "forest_share"]  # fmt: skip
    local = maps["zones"].to_crs(CRS)
    for i, zone in enumerate(local.geometry):
        inside = _inside(zone) & (maps["classes"] != 255)
        counts = np.bincount(maps["classes"][inside], minlength=3)[:3]
        row = frame.iloc[i]
        for k, name in enumerate(["open", "shrub", "forest"]):
            assert row[f"{name}_ha"] == pytest.approx(counts[k] * 0.01)
            if counts.sum():
                assert row[f"{name}_share"] == pytest.approx(counts[k] / counts.sum())
        if counts.sum():
            assert row["majority"] == ["open", "shrub", "forest"][int(counts.argmax())]
        else:
            assert __import__("pandas").isna(row["majority"])
    assert frame["forest_ha"].sum() > 0 and frame["open_ha"].sum() > 0
    # forced to values, the class ids are numbers
    as_values = zonal_statistics(maps["folder"] / "cover.tif", maps["zones"], classes=False, progress=False)
    assert "mean" in as_values.columns and "majority" not in as_values.columns


def test_overlap_free_layers_never_put_overlapping_zones_together() -> None:
    circles = gpd.GeoSeries([Point(x, 0).buffer(1.0) for x in (0.0, 1.5, 3.0, 4.5, 10.0)])
    layers = overlap_free_layers(circles)
    assert sorted(np.concatenate(layers).tolist()) == [0, 1, 2, 3, 4] and len(layers) == 2
    for layer in layers:
        members = circles.iloc[layer]
        assert not any(a.intersects(b) for i, a in enumerate(members) for b in members.iloc[i + 1 :])


def test_the_command_writes_zones_a_table_and_a_picture(maps: dict, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    folder = maps["folder"]
    out = tmp_path / "stands.gpkg"
    assert cli_main(["zonal", str(folder / "agb.tif"), str(folder / "zones.gpkg"), "-o", str(out),
                     "--percentiles", "50", "95"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "6 zones, 4 with pixels of agb.tif" in printed and "zone means from" in printed
    written = gpd.read_file(out, layer="zones")
    assert {"name", "count", "mean", "p50", "p95", "area_ha", "total_Mg"} <= set(written.columns)
    assert out.with_suffix(".png").stat().st_size > 5000
    assert cli_main(["zonal", str(folder / "cover.tif"), str(folder / "zones.gpkg"), "-o", str(tmp_path / "c.csv")]) == 0
    table = __import__("pandas").read_csv(tmp_path / "c.csv")
    assert "geometry" not in table.columns and "forest_share" in table.columns and "majority" in table.columns
    assert (tmp_path / "c.png").exists()
    # bad input: one sentence each, exit code 2
    assert cli_main(["zonal", str(folder / "agb.tif"), str(folder / "zones.gpkg"), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    gpd.GeoDataFrame({"v": [1]}, geometry=[Point(500_100, 4_199_900)], crs=CRS).to_file(tmp_path / "points.gpkg")
    assert cli_main(["zonal", str(folder / "agb.tif"), str(tmp_path / "points.gpkg"), "-o", str(tmp_path / "p.gpkg")]) == 2
    assert "Zones must be polygons" in capsys.readouterr().err
    assert cli_main(["zonal", str(folder / "agb.tif"), str(folder / "zones.gpkg"), "-o", str(tmp_path / "z.shp")]) == 2
    assert "written as .gpkg, .geojson or .csv" in capsys.readouterr().err
    assert cli_main(["zonal", str(folder / "agb.tif"), str(folder / "zones.gpkg"), "-o", str(tmp_path / "b.gpkg"),
                     "--band", "2"]) == 2  # fmt: skip
    assert "has 1 band(s); there is no band 2" in capsys.readouterr().err
    assert cli_main(["zonal", str(folder / "agb.tif"), str(tmp_path / "none.gpkg"), "-o", str(tmp_path / "n.gpkg")]) == 2
    assert "do not exist" in capsys.readouterr().err
    (tmp_path / "text.gpkg").write_text("not a GeoPackage")
    assert cli_main(["zonal", str(folder / "agb.tif"), str(tmp_path / "text.gpkg"), "-o", str(tmp_path / "t.gpkg")]) == 2
    err = capsys.readouterr().err
    assert "Zones '" in err and "text.gpkg' cannot be read as a vector file: " in err and "It might help" not in err


def test_a_dataarray_and_a_map_in_degrees(maps: dict, tmp_path: Path) -> None:
    """A map answered in Python (a DataArray with a CRS) gives the file's statistics; a class map on a grid in
    degrees counts pixels (no hectares)."""
    import rioxarray

    folder = maps["folder"]
    da = rioxarray.open_rasterio(folder / "agb.tif", masked=True).squeeze("band", drop=True)
    from_file = zonal_statistics(folder / "agb.tif", maps["zones"], progress=False)
    from_array = zonal_statistics(da, maps["zones"], progress=False)
    for column in ("count", "mean", "min", "max"):
        np.testing.assert_allclose(from_array[column], from_file[column], rtol=1e-6)
    profile = dict(driver="GTiff", width=40, height=30, count=1, dtype="uint8", nodata=255, crs="EPSG:4326",
                   transform=from_origin(10.0, 50.0, 0.01, 0.01))  # fmt: skip
    classes = np.zeros((30, 40), np.uint8)
    classes[:, 20:] = 1
    with rasterio.open(tmp_path / "deg.tif", "w", **profile) as dst:
        dst.write(classes, 1)
        dst.update_tags(class_names=json.dumps(["water", "land"]))
    zone = gpd.GeoDataFrame(geometry=[box(10.1, 49.8, 10.3, 49.9)], crs="EPSG:4326")  # 20 x 10 pixels
    got = zonal_statistics(tmp_path / "deg.tif", zone, progress=False)
    assert got.loc[0, "water_px"] == 100 and got.loc[0, "land_px"] == 100 and got.loc[0, "majority"] == "water"
    assert "water_ha" not in got.columns


def test_several_dates_give_each_their_columns_and_the_change(maps: dict, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    folder = maps["folder"]
    later = tmp_path / "agb_2024.tif"
    with rasterio.open(folder / "agb.tif") as src:
        profile, values = src.profile, src.read(1)
    with rasterio.open(later, "w", **profile) as dst:
        dst.write(values + 12.5, 1)  # every pixel grew by 12.5
    out = tmp_path / "both.csv"
    assert cli_main(["zonal", str(folder / "agb.tif"), str(later), str(folder / "zones.gpkg"), "-o", str(out)]) == 0
    table = __import__("pandas").read_csv(out)
    single = zonal_statistics(folder / "agb.tif", maps["zones"], progress=False)
    np.testing.assert_allclose(table["agb_mean"], single["mean"], rtol=1e-9)
    np.testing.assert_allclose(table["agb_2024_mean"], single["mean"] + 12.5, rtol=1e-6)
    changed = table["agb_2024_mean_change"].dropna()
    assert len(changed) == 4 and np.allclose(changed, 12.5, atol=1e-4)
    assert (tmp_path / "both.png").exists() and "name" in table.columns
    assert cli_main(["zonal", str(folder / "agb.tif"), str(folder / "agb.tif"), str(folder / "zones.gpkg"), "-o",
                     str(tmp_path / "same.csv")]) == 2  # fmt: skip
    assert "repeat" in capsys.readouterr().err
