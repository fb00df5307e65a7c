"""Individual trees from a canopy height model (``dinov3-eo height trees``): tops, crowns and their agreement with
reference trees, on synthetic forests with known trees and on real NEON LiDAR CHMs (CC0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin
from scipy import ndimage

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.tree_detection import WindowRule, delineate_crowns, find_tree_tops, match_trees
from dinov3_eo.tasks.tree_maps import detect_trees, evaluate_trees, stand_table

NEON = Path(__file__).resolve().parent / "data" / "neon"
CHMS = sorted(NEON.glob("TEAK_*_CHM.tif"))  # 40 x 40 m at 1 m each, NEON LiDAR (CC0)


def naive_tops(chm: np.ndarray, pixel_size: float, rule: WindowRule, min_height: float) -> set[tuple[int, int]]:
    """The variable-window rule pixel by pixel, straight from its definition."""
    tops = set()
    height, width = chm.shape
    for r in range(height):
        for c in range(width):
            h = chm[r, c]
            if not np.isfinite(h) or h < min_height:
                continue
            reach2 = max((float(rule.radius(h)) / pixel_size) ** 2, 2.0)
            top = True
            for rr in range(height):
                for cc in range(width):
                    d2 = (rr - r) ** 2 + (cc - c) ** 2
                    if d2 == 0 or d2 > reach2 or not np.isfinite(chm[rr, cc]):
                        continue
                    if chm[rr, cc] > h or (chm[rr, cc] == h and (rr, cc) < (r, c)):
                        top = False
            if top:
                tops.add((r, c))
    return tops


def synthetic_forest(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 60 x 60 CHM at 1 m of cone-shaped crowns whose tops stand at least 7 m apart; the tops' (row, col)."""
    rng = np.random.default_rng(seed)
    centres: list[tuple[int, int]] = []
    while len(centres) < 25:
        r, c = rng.integers(4, 56, size=2)
        if all((r - a) ** 2 + (c - b) ** 2 >= 49 for a, b in centres):
            centres.append((int(r), int(c)))
    rows, cols = np.mgrid[0:60, 0:60]
    chm = np.zeros((60, 60))
    for r, c in centres:
        top = rng.uniform(12, 30)
        chm = np.maximum(chm, top - 3.0 * np.hypot(rows - r, cols - c))  # a cone 3 m lower each metre out
    return np.clip(chm, 0, None), np.asarray(sorted(centres))


def test_tops_are_the_variable_window_rule_pixel_by_pixel() -> None:
    rng = np.random.default_rng(3)
    chm = ndimage.gaussian_filter(rng.random((28, 31)) * 40, 1.2) * 3
    chm[5:8, 10:14] = np.round(chm[5:8, 10:14].max())  # a flat top: one top, the first in row-major order
    chm[20:23, 2:5] = np.nan
    rule = WindowRule(0.5, 0.12, 4.0)
    fast = {tuple(t) for t in find_tree_tops(chm, 1.0, rule=rule, min_height=2.0).tolist()}
    assert fast == naive_tops(chm, 1.0, rule, 2.0) and len(fast) > 3
    # pixel size: the same rule on a 2 m grid reaches half as many pixels
    assert {tuple(t) for t in find_tree_tops(chm, 2.0, rule=rule).tolist()} == naive_tops(chm, 2.0, rule, 2.0)


def test_known_trees_give_their_tops_and_disjoint_connected_crowns() -> None:
    chm, centres = synthetic_forest()
    tops = find_tree_tops(chm, 1.0, rule=WindowRule(1.0, 0.1, 5.0))
    np.testing.assert_array_equal(tops, centres)
    labels = delineate_crowns(chm, tops, 1.0, crown_fraction=0.45, max_radius=6.0)
    assert set(np.unique(labels)) == set(range(len(tops) + 1))
    rows, cols = np.nonzero(labels)
    owner = tops[labels[rows, cols] - 1]
    assert (chm[rows, cols] >= 0.45 * chm[owner[:, 0], owner[:, 1]] - 1e-9).all()
    assert ((rows - owner[:, 0]) ** 2 + (cols - owner[:, 1]) ** 2 <= 36).all()
    for k, (r, c) in enumerate(tops, start=1):
        assert labels[r, c] == k
        assert ndimage.label(labels == k)[1] == 1  # one 4-connected piece
    # a lone cone's crown is the disc where it stands at least 45 % of its height
    lone = np.clip(20.0 - 2.0 * np.hypot(*np.mgrid[-15:16, -15:16]), 0, None)
    crown = delineate_crowns(lone, np.array([[15, 15]]), 1.0, crown_fraction=0.45, max_radius=10.0)
    np.testing.assert_array_equal(crown > 0, lone >= 0.45 * 20.0)
    assert delineate_crowns(lone, np.array([[15, 15]]), 1.0, ids=np.array([7]), max_radius=3.0).max() == 7
    assert (delineate_crowns(lone, np.array([[15, 15]]), 1.0, max_radius=3.0) > 0).sum() == 29  # the 3 m disc


def test_crowns_hold_their_constraints_on_real_lidar() -> None:
    with rasterio.open(CHMS[0]) as src:
        chm = src.read(1, masked=True).astype(np.float64).filled(np.nan)
    tops = find_tree_tops(chm, 1.0, min_height=2.0)
    labels = delineate_crowns(chm, tops, 1.0, min_height=2.0, crown_fraction=0.5, max_radius=5.0)
    for k, (r, c) in enumerate(tops, start=1):
        mine = labels == k
        assert mine[r, c] and ndimage.label(mine)[1] == 1
        assert (chm[mine] >= max(2.0, 0.5 * chm[r, c]) - 1e-9).all()
    assert ((labels > 0) <= (chm >= 2.0)).all()


def test_matching_pairs_nearest_first_one_to_one() -> None:
    detected = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [50.0, 0.0]])
    reference = np.array([[0.8, 0.0], [10.0, 2.5], [30.0, 0.0]])
    m = match_trees(detected, reference, max_distance=3.0)
    # (1, 0) at 0.2 m goes first, so detection 0 (0.8 m from reference 0) is a commission error
    assert m.pairs.tolist() == [[1, 0], [2, 1]]
    assert (m.true_positives, m.commission, m.omission) == (2, 2, 1)
    assert m.precision == pytest.approx(0.5) and m.recall == pytest.approx(2 / 3) and m.f1 == pytest.approx(4 / 7)
    heights = match_trees(detected, reference, max_distance=3.0, detected_height=np.array([20, 20, 20, 20.0]),
                          reference_height=np.array([20, 30, 20.0]), max_height_difference=5.0)  # fmt: skip
    assert heights.pairs.tolist() == [[1, 0]]
    empty = match_trees(np.zeros((0, 2)), reference, max_distance=1.0)
    assert (empty.true_positives, empty.omission, empty.f1) == (0, 3, 0.0)
    with pytest.raises(ValueError, match="max_distance"):
        match_trees(detected, reference, max_distance=0)


def _copy(path: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, folder / path.name))


def test_detect_trees_writes_tops_crowns_and_picture_of_real_chm(tmp_path: Path) -> None:
    chm_path = _copy(CHMS[0], tmp_path / "in")
    before = chm_path.read_bytes()
    summary = detect_trees(chm_path, tmp_path / "trees.gpkg", smooth_m=1.0, quicklook=tmp_path / "trees.png",
                           progress=False)  # fmt: skip
    assert chm_path.read_bytes() == before and sorted(p.name for p in chm_path.parent.iterdir()) == [chm_path.name]
    trees = gpd.read_file(summary.tops)
    crowns = gpd.read_file(summary.crowns)
    with rasterio.open(chm_path) as src:
        chm = src.read(1, masked=True).astype(np.float64).filled(np.nan)
        transform, crs = src.transform, src.crs
    smooth = ndimage.gaussian_filter(np.nan_to_num(chm), 1.0, mode="constant") / ndimage.gaussian_filter(
        np.isfinite(chm).astype(float), 1.0, mode="constant")  # fmt: skip
    tops = find_tree_tops(smooth, 1.0)
    assert summary.trees == len(trees) == len(tops) > 5 and trees.crs == crs
    rows, cols = rasterio.transform.rowcol(transform, trees.geometry.x, trees.geometry.y)
    np.testing.assert_array_equal(np.column_stack([rows, cols]), tops)
    np.testing.assert_allclose(trees["height_m"], chm[tops[:, 0], tops[:, 1]])
    assert list(trees["tree_id"]) == list(range(1, len(trees) + 1))
    with rasterio.open(summary.labels) as src:
        labels = src.read(1)
        assert src.dtypes[0] == "int32" and src.nodata == 0 and src.transform == transform
    counts = np.bincount(labels.ravel(), minlength=len(trees) + 1)[1:]
    np.testing.assert_allclose(trees["crown_area_m2"], counts.astype(float))
    np.testing.assert_allclose(trees["crown_diameter_m"], 2 * np.sqrt(counts / np.pi))
    assert list(crowns["tree_id"]) == list(trees["tree_id"])
    np.testing.assert_allclose(crowns.geometry.area, crowns["crown_area_m2"])
    assert crowns.geometry.contains(trees.geometry.buffer(0.01).centroid).all()  # each crown holds its top
    assert summary.area_ha == pytest.approx(np.isfinite(chm).sum() / 10_000)
    assert summary.trees_per_ha == pytest.approx(len(trees) / summary.area_ha)
    with Image.open(summary.quicklook) as png:
        assert png.mode in ("RGB", "RGBA") and png.width > 300
    with pytest.raises(FileExistsError):
        detect_trees(chm_path, tmp_path / "trees.gpkg", progress=False)


def test_blocks_find_the_same_tops_and_crowns_as_one_pass(tmp_path: Path) -> None:
    chm, centres = synthetic_forest(seed=5)
    path = tmp_path / "forest.tif"
    with rasterio.open(path, "w", driver="GTiff", width=60, height=60, count=1, dtype="float32", nodata=-9999,
                       crs="EPSG:32611", transform=from_origin(500_000, 4_100_000, 1.0, 1.0)) as dst:  # fmt: skip
        dst.write(chm.astype(np.float32)[None])
    rule = WindowRule(1.0, 0.1, 5.0)
    whole = detect_trees(path, tmp_path / "whole.gpkg", rule=rule, max_crown_radius_m=6.0, progress=False)
    blocks = detect_trees(path, tmp_path / "blocks.csv", rule=rule, max_crown_radius_m=6.0, block=16, progress=False)
    a, b = gpd.read_file(whole.tops), __import__("pandas").read_csv(blocks.tops)
    assert len(a) == len(b) == len(centres)
    np.testing.assert_allclose(np.column_stack([a.geometry.x, a.geometry.y]), b[["x", "y"]].to_numpy())
    with rasterio.open(whole.labels) as one, rasterio.open(blocks.labels) as many:
        np.testing.assert_array_equal(one.read(1), many.read(1))
    np.testing.assert_allclose(a["crown_area_m2"], b["crown_area_m2"])


def test_trees_refuse_bad_rasters_before_writing(tmp_path: Path) -> None:
    profile = {"driver": "GTiff", "width": 8, "height": 8, "dtype": "float32"}
    degrees = tmp_path / "degrees.tif"
    with rasterio.open(degrees, "w", count=1, crs="EPSG:4326", transform=from_origin(10, 50, 1e-5, 1e-5), **profile) as d:
        d.write(np.ones((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="degrees"):
        detect_trees(degrees, tmp_path / "t.gpkg", progress=False)
    two = tmp_path / "two.tif"
    with rasterio.open(two, "w", count=2, crs="EPSG:32611", transform=from_origin(0, 80, 1, 1), **profile) as d:
        d.write(np.ones((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="2 bands"):
        detect_trees(two, tmp_path / "t.gpkg", progress=False)
    with pytest.raises(ValueError, match=r"\.gpkg, \.geojson or \.csv"):
        detect_trees(CHMS[0], tmp_path / "t.shp", progress=False)
    with pytest.raises(ValueError, match="crown_fraction"):
        detect_trees(CHMS[0], tmp_path / "t.gpkg", crown_fraction=1.5, progress=False)
    empty = tmp_path / "empty.tif"
    with rasterio.open(empty, "w", count=1, crs="EPSG:32611", transform=from_origin(0, 80, 1, 1), nodata=-9999,
                       **profile) as d:  # fmt: skip
        d.write(np.full((1, 8, 8), -9999, np.float32))
    with pytest.raises(ValueError, match="no height: every pixel is nodata"):
        detect_trees(empty, tmp_path / "t.gpkg", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["degrees.tif", "empty.tif", "two.tif"]


def test_evaluate_trees_scores_detections_against_reference(tmp_path: Path) -> None:
    chm, centres = synthetic_forest(seed=2)
    transform = from_origin(500_000, 4_100_000, 1.0, 1.0)
    xs, ys = rasterio.transform.xy(transform, centres[:, 0], centres[:, 1])
    reference = gpd.GeoDataFrame({"height": chm[centres[:, 0], centres[:, 1]]},
                                 geometry=gpd.points_from_xy(xs, ys), crs="EPSG:32611").to_crs("EPSG:4326")  # fmt: skip
    # detections: every tree but the first two, 1 m east and 0.5 m too tall, and one spurious tree
    detected = gpd.GeoDataFrame({"height_m": chm[centres[2:, 0], centres[2:, 1]] + 0.5},
                                geometry=gpd.points_from_xy(np.asarray(xs[2:]) + 1.0, ys[2:]), crs="EPSG:32611")  # fmt: skip
    detected = gpd.GeoDataFrame(
        __import__("pandas").concat([detected, gpd.GeoDataFrame({"height_m": [15.0]}, geometry=gpd.points_from_xy(
            [499_990.0], [4_099_990.0]), crs="EPSG:32611")], ignore_index=True), crs="EPSG:32611")  # fmt: skip
    s = evaluate_trees(detected, reference, out_dir=tmp_path / "eval")
    n = len(centres)
    assert (s.matched, s.commission, s.omission) == (n - 2, 1, 2)
    assert s.precision == pytest.approx((n - 2) / (n - 1)) and s.recall == pytest.approx((n - 2) / n)
    assert s.mean_distance_m == pytest.approx(1.0, abs=1e-6)
    assert s.height_bias_m == pytest.approx(0.5) and s.height_rmse_m == pytest.approx(0.5)
    written = json.loads((tmp_path / "eval" / "tree_match.json").read_text())
    assert written["matched"] == n - 2 and written["f1"] == pytest.approx(s.f1)
    rows = gpd.read_file(tmp_path / "eval" / "tree_match.gpkg")
    assert rows["status"].value_counts().to_dict() == {"matched": 2 * (n - 2), "commission": 1, "omission": 2}
    # too strict a height tolerance matches nothing; an area leaves out the trees outside it
    assert evaluate_trees(detected, reference, max_height_difference=0.1).matched == 0
    area = gpd.GeoDataFrame(geometry=[__import__("shapely").box(499_980, 4_099_980, 500_000, 4_100_000)],
                            crs="EPSG:32611")  # fmt: skip
    assert evaluate_trees(detected, reference, area=area).detected == 1
    with pytest.raises(ValueError, match="degrees"):
        evaluate_trees(reference, detected)
    with pytest.raises(ValueError, match="no column 'dbh'"):
        evaluate_trees(detected, reference, reference_height="dbh")


def test_cli_trees_and_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["height", "trees", str(CHMS[1]), "-o", str(tmp_path / "trees.gpkg"), "--smooth", "1"]) == 0
    out = capsys.readouterr().out
    assert "trees (" in out and "per ha" in out and "mean crown" in out
    for name in ("trees.gpkg", "trees_crowns.gpkg", "trees_crowns.tif", "trees.png"):
        assert (tmp_path / name).is_file()
    assert cli_main(["height", "trees", str(CHMS[1]), "-o", str(tmp_path / "tops.csv"), "--no-crowns",
                     "--no-quicklook", "--window", "1", "0.1"]) == 0  # fmt: skip
    assert sorted(p.name for p in tmp_path.glob("tops*")) == ["tops.csv"]
    assert cli_main(["height", "trees", "evaluate", str(tmp_path / "trees.gpkg"), str(tmp_path / "trees.gpkg"),
                     "--out-dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    assert "precision 1.000, recall 1.000, F1 1.000" in capsys.readouterr().out


def test_stand_table_counts_each_zones_trees_heights_and_cover() -> None:
    import shapely

    crs = "EPSG:32611"
    heights = np.array([30.0, 20.0, 10.0, 25.0, 5.0])
    trees = gpd.GeoDataFrame({"height_m": heights, "crown_area_m2": [20.0, 10.0, 5.0, 30.0, 2.0]},
                             geometry=gpd.points_from_xy([10, 30, 50, 150, 250], [50, 50, 50, 50, 50]), crs=crs)  # fmt: skip
    zones = gpd.GeoDataFrame({"stand": ["west", "east", "empty"]}, crs=crs, geometry=[
        shapely.box(0, 0, 100, 100), shapely.box(100, 0, 200, 100), shapely.box(300, 0, 320, 100)])  # fmt: skip
    crowns = gpd.GeoDataFrame(geometry=[shapely.box(5, 45, 15, 55), shapely.box(95, 0, 105, 10)], crs=crs)
    table = stand_table(trees, zones.to_crs("EPSG:4326"), crowns=crowns, top_trees_per_ha=2)
    west, east, empty = (table.iloc[k] for k in range(3))
    assert list(table["stand"]) == ["west", "east", "empty"] and table.crs == crs
    assert (west["trees"], east["trees"], empty["trees"]) == (3, 1, 0)  # the tree at x=250 is in no zone
    assert west["area_ha"] == pytest.approx(1.0, rel=1e-6) and west["trees_per_ha"] == pytest.approx(3.0, rel=1e-6)
    assert west["mean_height_m"] == pytest.approx(20.0) and west["max_height_m"] == 30.0
    assert west["top_height_m"] == pytest.approx(25.0)  # the 2 tallest of a 1 ha zone at 2 per ha
    assert west["mean_crown_area_m2"] == pytest.approx(35 / 3)
    # crown cover: the 10 x 10 m crown and half of the one across the edge, in 1 ha; the east stand the other half
    assert west["crown_cover"] == pytest.approx(150 / 10_000, rel=1e-4)
    assert east["crown_cover"] == pytest.approx(50 / 10_000, rel=1e-4)
    assert empty["trees"] == 0 and np.isnan(empty["mean_height_m"]) and empty["crown_cover"] == 0
    with pytest.raises(ValueError, match="projected CRS"):
        stand_table(trees.to_crs("EPSG:4326"), zones)


def test_cli_trees_with_zones_writes_a_stand_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import shapely

    with rasterio.open(CHMS[2]) as src:
        left, bottom, right, top = src.bounds
    middle = (left + right) / 2
    zones = gpd.GeoDataFrame({"plot": ["a", "b"]}, crs="EPSG:32611", geometry=[
        shapely.box(left, bottom, middle, top), shapely.box(middle, bottom, right, top)])  # fmt: skip
    zones.to_file(tmp_path / "plots.gpkg")
    for name in ("trees.gpkg", "table.csv"):
        out = tmp_path / name
        assert cli_main(["height", "trees", str(CHMS[2]), "-o", str(out), "--smooth", "1", "--zones",
                         str(tmp_path / "plots.gpkg"), "--no-quicklook"]) == 0  # fmt: skip
        assert f"{out.stem}_zones{out.suffix}" in capsys.readouterr().out
    table = gpd.read_file(tmp_path / "trees_zones.gpkg")
    trees = gpd.read_file(tmp_path / "trees.gpkg")
    assert table["trees"].sum() == len(trees) and list(table["plot"]) == ["a", "b"]
    assert table["area_ha"].to_numpy() == pytest.approx([0.08, 0.08])
    crown_pixels = trees["crown_area_m2"].sum()
    assert (table["crown_cover"] * 800).sum() == pytest.approx(crown_pixels)  # crowns tile into the two halves
    csv = __import__("pandas").read_csv(tmp_path / "table_zones.csv")
    assert csv["trees"].tolist() == table["trees"].tolist()


def test_detect_trees_takes_a_dataarray(tmp_path: Path) -> None:
    import rioxarray

    chm = rioxarray.open_rasterio(CHMS[0], masked=True).squeeze("band", drop=True)  # NaN where nodata
    from_array = detect_trees(chm, tmp_path / "a.gpkg", smooth_m=1.0, quicklook=tmp_path / "a.png", progress=False)
    from_file = detect_trees(CHMS[0], tmp_path / "f.gpkg", smooth_m=1.0, progress=False)
    a, f = gpd.read_file(from_array.tops), gpd.read_file(from_file.tops)
    assert len(a) == len(f) and a.geometry.equals(f.geometry)
    np.testing.assert_allclose(a["crown_area_m2"], f["crown_area_m2"])
    assert from_array.quicklook.is_file()
