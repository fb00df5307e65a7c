"""Reference values of a scene's tiles (what ``regress fit`` fits on), each checked against a loop over the reference
itself: a real NEON LiDAR canopy height model under its airborne RGB (``tests/data/neon``, CC0), the same CHM under
a coarser grid (read finer, not resampled away), points in lon/lat (GeoJSON and CSV) and polygons burnt by rasterio.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.transform import Affine

from dinov3_eo.tasks.tile_labels import NoLabelledTiles
from dinov3_eo.tasks.tile_values import check_statistic, grouped_statistic, tile_statistic, value_tiles

NEON = Path(__file__).resolve().parent / "data" / "neon"
RGB, CHM = NEON / "TEAK_044.tif", NEON / "TEAK_044_CHM.tif"


def _chm() -> tuple[np.ndarray, Affine, object]:
    with rasterio.open(CHM) as src:
        heights = src.read(1).astype(np.float64)
        heights[heights == src.nodata] = np.nan
        return heights, src.transform, src.crs


def test_tile_statistics_match_numpy_over_each_row_s_finite_values() -> None:
    rng = np.random.default_rng(0)
    values = rng.gamma(2.0, 5.0, size=(40, 37))
    values[rng.random(values.shape) < 0.3] = np.nan
    values[3] = np.nan  # a row without a value: NaN
    values[5, :] = 7.0  # a constant row
    rows = [r for r in range(len(values)) if r != 3]
    expected = {"mean": np.nanmean, "median": np.nanmedian, "min": np.nanmin, "max": np.nanmax, "std": np.nanstd,
                "p95": lambda a: np.nanpercentile(a, 95), "p2.5": lambda a: np.nanpercentile(a, 2.5),
                "above:10": lambda a: np.mean(a[np.isfinite(a)] > 10), "equal:7": lambda a: np.mean(a[np.isfinite(a)] == 7)}  # fmt: skip
    for name, reference in expected.items():
        got = tile_statistic(values, name)
        assert np.isnan(got[3]), name
        np.testing.assert_allclose(got[rows], [reference(values[r]) for r in rows], rtol=1e-12, err_msg=name)
    # the same statistics of grouped values (points per tile): one group of 5,000, many of one to three
    groups = np.concatenate([np.full(5000, 7), rng.integers(10, 400, 600), [3]])
    flat = rng.gamma(2.0, 5.0, len(groups))
    flat[:40] = 5.0  # ties
    for name, reference in expected.items():
        ids, got, counts = grouped_statistic(flat, groups, name)
        assert ids.tolist() == sorted(set(groups.tolist())) and counts.tolist() == [int((groups == i).sum()) for i in ids]
        np.testing.assert_allclose(got, [reference(flat[groups == i]) for i in ids], rtol=1e-12, err_msg=name)
    assert check_statistic("p99.5") == "p99.5"
    for bad in ("p101", "mode", "above:x", "equal"):
        with pytest.raises(ValueError, match="Unknown tile statistic"):
            check_statistic(bad)


def test_a_chm_under_finer_imagery_gives_each_tile_its_lidar_pixels_statistic() -> None:
    heights, chm_transform, crs = _chm()
    with rasterio.open(RGB) as src:
        assert src.crs == crs and src.res == (0.1, 0.1) and src.transform.c == chm_transform.c
    tiles = value_tiles(RGB, CHM, tile_size=40)  # 4 m tiles: 4 x 4 CHM pixels each
    assert tiles.tile_size == 40 and tiles.crs == crs and tiles.statistic == "mean"
    expected = {}
    for r in range(10):
        for c in range(10):
            cut = heights[4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
            if np.isfinite(cut).mean() >= 0.5:
                expected[(r, c)] = (np.nanmean(cut), np.isfinite(cut).mean())
    assert tiles.cells == sorted(expected)
    np.testing.assert_allclose(tiles.values, [expected[c][0] for c in tiles.cells], rtol=1e-6)
    np.testing.assert_allclose(tiles.coverage, [expected[c][1] for c in tiles.cells])
    assert (tiles.count == np.round(tiles.coverage * 1600)).all()  # pixels of the scene's grid under each tile
    # the tiles' footprints are the grid classify map and regress map cut
    frame = tiles.to_geodataframe({"extra": np.arange(len(tiles))})
    x0, y0 = src.transform @ (tiles.cols[0] * 40, tiles.rows[0] * 40)
    assert frame.geometry.iloc[0].bounds == pytest.approx((x0, y0 - 4.0, x0 + 4.0, y0))
    assert list(frame.columns[:6]) == ["row", "col", "tile_size", "reference", "coverage", "count"] and "extra" in frame
    # canopy cover (share of the tile above 5 m) and a percentile, strip by strip
    cover = value_tiles(RGB, CHM, tile_size=40, statistic="above:5", strip_pixels=50_000)
    assert cover.cells == tiles.cells
    np.testing.assert_allclose(cover.values, [np.mean(heights[4 * r : 4 * r + 4, 4 * c : 4 * c + 4][
        np.isfinite(heights[4 * r : 4 * r + 4, 4 * c : 4 * c + 4])] > 5) for r, c in cover.cells])  # fmt: skip


def test_a_finer_reference_is_read_finer_than_the_scene_s_pixels(tmp_path: Path) -> None:
    heights, chm_transform, crs = _chm()
    # a 4 m "scene" over the 1 m CHM: one tile = one scene pixel = 4 x 4 CHM pixels, read at 1 m (oversample 4)
    scene = tmp_path / "coarse.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=10, height=10, count=3, dtype="uint8", crs=crs,
                       transform=chm_transform @ Affine.scale(4)) as dst:  # fmt: skip
        dst.write(np.full((3, 10, 10), 100, np.uint8))
    tiles = value_tiles(scene, CHM, tile_size=1, statistic="p90")
    for (r, c), value, count in zip(tiles.cells, tiles.values, tiles.count):
        cut = heights[4 * r : 4 * r + 4, 4 * c : 4 * c + 4]
        assert count == np.isfinite(cut).sum()
        assert value == pytest.approx(np.nanpercentile(cut, 90))
    # read at the scene's own pixels, the tile sees one height: what oversampling keeps from being lost
    one = value_tiles(scene, CHM, tile_size=1, statistic="p90", oversample=1)
    assert (one.count == 1).all()


def test_points_give_each_tile_their_statistic_from_geojson_or_csv(tmp_path: Path) -> None:
    with rasterio.open(RGB) as src:
        transform, crs = src.transform, src.crs
    rng = np.random.default_rng(1)
    cols, rows = rng.uniform(-20, 420, 300), rng.uniform(0, 400, 300)  # some past the scene's left and right edges
    x, y = transform @ (cols, rows)
    value = rng.uniform(0, 40, 300)
    frame = gpd.GeoDataFrame({"rh98": value, "shot": np.arange(300)}, geometry=gpd.points_from_xy(x, y), crs=crs)
    frame.to_crs("EPSG:4326").to_file(tmp_path / "shots.geojson")
    with pytest.raises(ValueError, match=r"numeric columns \['rh98', 'shot'\]: name the one"):
        value_tiles(RGB, tmp_path / "shots.geojson", tile_size=100)
    tiles = value_tiles(RGB, tmp_path / "shots.geojson", tile_size=100, attribute="rh98", statistic="max")
    expected: dict[tuple[int, int], list[float]] = {}
    for c, r, v in zip(cols, rows, value):
        if 0 <= c < 400:
            expected.setdefault((int(r // 100), int(c // 100)), []).append(v)
    assert tiles.cells == sorted(expected) and np.isnan(tiles.coverage).all()
    np.testing.assert_allclose(tiles.values, [max(expected[c]) for c in tiles.cells])
    assert tiles.count.tolist() == [len(expected[c]) for c in tiles.cells]
    few = value_tiles(RGB, tmp_path / "shots.geojson", tile_size=100, attribute="rh98", min_points=25)
    assert few.cells == [c for c in sorted(expected) if len(expected[c]) >= 25]
    # a CSV of plots in lon/lat, its only numeric column taken
    lonlat = frame.to_crs("EPSG:4326")
    (tmp_path / "plots.csv").write_text("Longitude,Latitude,agb\n" + "\n".join(
        f"{p.x:.9f},{p.y:.9f},{v}" for p, v in zip(lonlat.geometry, value)))  # fmt: skip
    plots = value_tiles(RGB, tmp_path / "plots.csv", tile_size=100)
    assert plots.cells == tiles.cells
    np.testing.assert_allclose(plots.values, [np.mean(expected[c]) for c in plots.cells])
    (tmp_path / "bad.csv").write_text("e,n,agb\n1,2,3\n")
    with pytest.raises(ValueError, match="has no longitude/latitude columns"):
        value_tiles(RGB, tmp_path / "bad.csv", tile_size=100)


def test_polygons_are_burnt_with_their_value_and_bad_references_are_refused(tmp_path: Path) -> None:
    with rasterio.open(RGB) as src:
        transform, crs, shape = src.transform, src.crs, src.shape
    x0, y0 = transform @ (0, 0)
    stands = gpd.GeoDataFrame({"height": [12.5, 30.0, 3.0], "name": ["a", "b", "c"]}, crs=crs, geometry=[
        shapely.box(x0 + 1, y0 - 25, x0 + 22, y0 - 3), shapely.Point(x0 + 30, y0 - 30).buffer(9),
        shapely.box(x0 + 25, y0 - 12, x0 + 39.95, y0 - 0.5)])  # fmt: skip
    tiles = value_tiles(RGB, stands, tile_size=50, min_valid=0.2, statistic="mean")
    burnt = rasterize(list(zip(stands.geometry, stands["height"])), out_shape=shape, transform=transform,
                      fill=np.nan, dtype="float64")  # fmt: skip
    expected = {}
    for r in range(8):
        for c in range(8):
            cut = burnt[50 * r : 50 * r + 50, 50 * c : 50 * c + 50]
            if np.isfinite(cut).mean() >= 0.2:
                expected[(r, c)] = np.nanmean(cut)
    assert tiles.cells == sorted(expected) and len(expected) > 5
    np.testing.assert_allclose(tiles.values, [expected[c] for c in tiles.cells])

    with pytest.raises(KeyError, match="no column 'agb'"):
        value_tiles(RGB, stands, tile_size=50, attribute="agb")
    with pytest.raises(ValueError, match="Column 'name' of the GeoDataFrame is not numeric"):
        value_tiles(RGB, stands, tile_size=50, attribute="name")
    with pytest.raises(NoLabelledTiles, match="No pixel of scene .* has a reference value"):
        value_tiles(RGB, stands.assign(geometry=stands.translate(1e5, 0)), tile_size=50)
    with pytest.raises(NoLabelledTiles, match=r"No 200-px tile of .* on 90% of it \(at most"):
        value_tiles(RGB, stands, tile_size=200, min_valid=0.9)
    with pytest.raises(ValueError, match="have no CRS"):
        value_tiles(RGB, stands.set_crs(None, allow_override=True), tile_size=50)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        value_tiles(RGB, tmp_path / "missing.gpkg", tile_size=50)
    with pytest.raises(ValueError, match="Unknown tile statistic 'mode'"):
        value_tiles(RGB, CHM, tile_size=50, statistic="mode")


def test_a_reference_in_another_crs_is_warped_and_a_bad_one_is_named(tmp_path: Path) -> None:
    from rasterio.warp import calculate_default_transform, reproject

    heights, chm_transform, crs = _chm()
    # the CHM in lon/lat at about 0.25 m: each 4-m tile is read from its own pixels, warped (nearest)
    dst_crs = "EPSG:4326"
    with rasterio.open(CHM) as src:
        transform, width, height = calculate_default_transform(src.crs, dst_crs, src.width, src.height, *src.bounds,
                                                               resolution=2.5e-6)  # fmt: skip
        out = np.full((height, width), np.nan, np.float32)
        reproject(src.read(1).astype(np.float32), out, src_transform=src.transform, src_crs=src.crs,
                  src_nodata=src.nodata, dst_transform=transform, dst_crs=dst_crs, dst_nodata=np.nan)  # fmt: skip
    with rasterio.open(tmp_path / "chm_4326.tif", "w", driver="GTiff", width=width, height=height, count=1,
                       dtype="float32", crs=dst_crs, transform=transform, nodata=np.nan) as dst:  # fmt: skip
        dst.write(out, 1)
    native = value_tiles(RGB, CHM, tile_size=40, min_valid=0.9)
    warped = value_tiles(RGB, tmp_path / "chm_4326.tif", tile_size=40, min_valid=0.9)
    both = sorted(set(native.cells) & set(warped.cells))
    assert len(both) >= 0.9 * len(native)
    a = np.array([native.values[native.cells.index(c)] for c in both])
    b = np.array([warped.values[warped.cells.index(c)] for c in both])
    assert np.corrcoef(a, b)[0, 1] > 0.98 and np.abs(a - b).mean() < 1.0  # metres: a resampling's worth

    (tmp_path / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    with pytest.raises(rasterio.errors.RasterioIOError, match="broken.tif cannot be read as a raster"):
        value_tiles(RGB, tmp_path / "broken.tif", tile_size=40)
    with rasterio.open(tmp_path / "bare.tif", "w", driver="GTiff", width=40, height=40, count=1, dtype="float32") as dst:
        dst.write(heights.astype(np.float32), 1)
    with pytest.raises(ValueError, match="bare.tif is not georeferenced"):
        value_tiles(RGB, tmp_path / "bare.tif", tile_size=40)
