"""Stratified random samples for accuracy assessment: Olofsson et al.'s sample-size example, allocations, a draw that
is uniform within each stratum and never off its class or on nodata, and the loop a user runs: sample, label,
``segment evaluate`` with the error-adjusted areas."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.sample_design import (
    BUFFER_BASE,
    allocate,
    design_estimates,
    sample_size,
    stratified_sample,
)

CRS = "EPSG:32633"


def test_the_sample_size_of_olofssons_example() -> None:
    """Olofsson et al. (2014), section 5.1.1: strata of 2, 1.5, 32 and 64.5 % with expected user's accuracies 0.7,
    0.6, 0.9 and 0.95, a target standard error of 0.01 on the overall accuracy: 641 points."""
    assert sample_size([0.02, 0.015, 0.32, 0.645], [0.7, 0.6, 0.9, 0.95], 0.01) == 641
    assert sample_size([0.5, 0.5], 0.9, 0.02) == 225  # (0.3 / 0.02)²
    with pytest.raises(ValueError, match="one per stratum"):
        sample_size([0.5, 0.5], [0.9, 0.8, 0.7], 0.01)
    with pytest.raises(ValueError, match="fractions between 0 and 1"):
        sample_size([0.5, 0.5], 0.9, 2)


def test_allocations_share_points_by_area_with_a_floor() -> None:
    counts = [1000, 500, 30, 5]
    assert allocate(counts, 100).tolist() == [65, 33, 2, 0]
    floored = allocate(counts, 100, min_per_stratum=10)
    assert floored.tolist() == [57, 28, 10, 5] and floored.sum() == 100  # the 5-pixel class gives all it has
    assert allocate(counts, 100, allocation="equal").tolist() == [33, 32, 30, 5]
    assert allocate([100, 50], 1000).tolist() == [100, 50]  # never more than the pixels
    rng = np.random.default_rng(0)
    for _ in range(200):  # any sizes: the sum, the floor and the caps hold
        sizes = rng.integers(1, 5000, rng.integers(2, 8))
        n, floor = int(rng.integers(20, 3000)), int(rng.integers(0, 4))
        got = allocate(sizes, n, min_per_stratum=floor)
        assert got.sum() == min(n, sizes.sum()) and (got <= sizes).all() and (got >= np.minimum(sizes, floor)).all()
    with pytest.raises(ValueError, match="cannot give every one of the 4 strata 50"):
        allocate(counts, 100, min_per_stratum=50)
    with pytest.raises(ValueError, match="must be one of"):
        allocate(counts, 100, allocation="neyman")


@pytest.fixture(scope="module")
def class_map(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 3-class map with a rare class (about 2 %), named, a nodata band, and the truth it was made from with 10 %
    of the pixels mislabelled."""
    folder = tmp_path_factory.mktemp("sample")
    rng = np.random.default_rng(1)
    rows, cols = np.indices((120, 150))
    truth = np.where(np.hypot(rows - 60, cols - 40) < 9, 2, np.where(cols > 90, 1, 0)).astype(np.uint8)
    mapped = truth.copy()
    wrong = rng.random(truth.shape) < 0.1
    mapped[wrong] = rng.integers(0, 3, int(wrong.sum()))
    mapped[:, :4] = 255
    profile = dict(driver="GTiff", width=150, height=120, count=1, dtype="uint8", nodata=255, crs=CRS,
                   transform=from_origin(500_000, 5_000_000, 30.0, 30.0), tiled=True, blockxsize=64, blockysize=64)
    names = json.dumps(["cropland", "forest", "water"])
    for name, values in (("map.tif", mapped), ("truth.tif", truth)):
        with rasterio.open(folder / name, "w", **profile) as dst:
            dst.write(values, 1)
            dst.update_tags(class_names=names)
    return {"folder": folder, "map": mapped, "truth": truth}


def test_points_lie_on_their_stratum_and_are_drawn_uniformly(class_map: dict) -> None:
    path = class_map["folder"] / "map.tif"
    mapped = class_map["map"]
    frame = stratified_sample(path, n=300, min_per_stratum=50, block=64, seed=3)
    counts = np.bincount(mapped[mapped != 255], minlength=3)
    design = frame.attrs["design"]
    assert [d["points"] for d in design] == allocate(counts, 300, min_per_stratum=50).tolist()
    assert [d["stratum"] for d in design] == ["cropland", "forest", "water"] and design[2]["points"] == 50
    assert design[0]["area_ha"] == pytest.approx(counts[0] * 0.09)
    with rasterio.open(path) as src:
        rows, cols = rasterio.transform.rowcol(src.transform, frame.geometry.x, frame.geometry.y)
    rows, cols = np.asarray(rows), np.asarray(cols)
    assert (mapped[rows, cols] == frame["class_id"].to_numpy()).all()  # every point on its own class, none on nodata
    assert len(set(zip(rows.tolist(), cols.tolist()))) == 300  # without replacement
    points_of = {x["stratum_id"]: x["points"] for x in design}
    assert (frame["pixels_per_point"] == [counts[c] / points_of[c] for c in frame["class_id"]]).all()
    assert (frame["stratum_id"] == frame["class_id"]).all()  # without buffers the strata are the map classes
    assert (frame["reference"] == "").all() and frame.crs.to_epsg() == 32633
    # over many draws each water pixel is picked about equally often (uniform within the stratum)
    water = np.flatnonzero((mapped == 2).ravel())
    hits = np.zeros(mapped.size)
    for seed in range(150):
        draw = stratified_sample(path, per_stratum={2: 20}, block=64, seed=seed)
        r, c = rasterio.transform.rowcol(rasterio.open(path).transform, draw.geometry.x, draw.geometry.y)
        hits[np.ravel_multi_index((np.asarray(r), np.asarray(c)), mapped.shape)] += 1
    expected = 150 * 20 / len(water)
    assert hits[water].mean() == pytest.approx(expected) and hits.sum() == hits[water].sum()
    assert hits[water].std() < 2.0 * np.sqrt(expected)  # binomial spread, no favoured corner of the class
    same = stratified_sample(path, n=300, min_per_stratum=50, block=64, seed=3)
    assert same.geometry.equals(frame.geometry)  # a seed gives the same points
    with pytest.raises(ValueError, match="more points than they have pixels"):
        stratified_sample(path, per_stratum={2: 10_000})
    # a target standard error: sample_size of the strata's shares, counted in the same pass as the draw
    sized = stratified_sample(path, target_se=0.02, expected_accuracy=[0.8, 0.9, 0.7], block=64)
    assert len(sized) == sized.attrs["points_asked"] == sample_size(counts / counts.sum(), [0.8, 0.9, 0.7], 0.02)
    with pytest.raises(ValueError, match="one of the three"):
        stratified_sample(path, n=10, target_se=0.02)


def test_sample_label_evaluate(class_map: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The user's loop: draw the points, label them (here from the truth), and evaluate the map on them: the
    error-adjusted areas bracket the true areas."""
    folder = class_map["folder"]
    out = tmp_path / "points.gpkg"
    assert cli_main(["sample", str(folder / "map.tif"), "-n", "400", "--min-per-class", "60", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 400 points" in printed and "water" in printed
    design = json.loads((tmp_path / "points_design.json").read_text())
    assert design["points"] == 400 and [s["points"] for s in design["strata"]][2] == 60
    points = gpd.read_file(out)
    with rasterio.open(folder / "truth.tif") as src:
        truth = [int(v[0]) for v in src.sample(zip(points.geometry.x, points.geometry.y))]
    points["reference"] = [["cropland", "forest", "water"][t] for t in truth]
    points.to_file(tmp_path / "labelled.gpkg")
    assert cli_main(["segment", "evaluate", str(folder / "map.tif"), str(tmp_path / "labelled.gpkg"), "--attribute",
                     "reference", "--out-dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["pixels"] == 400  # the labelled points are what is compared
    mapped, truth = class_map["map"], class_map["truth"]
    valid = mapped != 255
    areas = metrics["area"]["classes"]
    for k, name in enumerate(["cropland", "forest", "water"]):  # 30 m pixels: 0.09 ha
        true_area = ((truth == k) & valid).sum() * 0.09
        assert abs(areas[name]["estimated_area"] - true_area) <= areas[name]["estimated_area_ci"], name
    # the map's own count of water (its errors spill into the rare class) lies outside the interval; the estimate not
    assert abs(areas["water"]["map_area"] - ((truth == 2) & valid).sum() * 0.09) > areas["water"]["estimated_area_ci"]
    true_accuracy = (mapped[valid] == truth[valid]).mean()
    assert abs(metrics["area"]["overall_accuracy"] - true_accuracy) <= metrics["area"]["overall_accuracy_ci"]
    # --target-se: the sample size from the expected accuracy, and CSV output
    assert cli_main(["sample", str(folder / "map.tif"), "--target-se", "0.02", "--expected-accuracy", "0.9",
                     "-o", str(tmp_path / "p.csv"), "--min-per-class", "20"]) == 0  # fmt: skip
    assert "225 points for a standard error of 0.02" in capsys.readouterr().out
    table = __import__("pandas").read_csv(tmp_path / "p.csv")
    assert len(table) == 225 and {"x", "y", "lon", "lat", "stratum", "reference"} <= set(table.columns)
    # only some classes, by name
    assert cli_main(["sample", str(folder / "map.tif"), "-n", "30", "--classes", "water", "-o", str(tmp_path / "w.gpkg"),
                     "--min-per-class", "0"]) == 0  # fmt: skip
    assert set(gpd.read_file(tmp_path / "w.gpkg")["stratum"]) == {"water"}
    # bad input: one sentence each
    assert cli_main(["sample", str(folder / "map.tif"), "-n", "30", "--classes", "ocean", "-o", str(tmp_path / "o.gpkg")]) == 2
    assert "has no classes ['ocean']" in capsys.readouterr().err
    assert cli_main(["sample", str(folder / "map.tif"), "-n", "10", "-o", str(tmp_path / "few.gpkg")]) == 2
    assert "cannot give every one of the 3 strata 50" in capsys.readouterr().err


def test_with_the_map_classes_as_strata_the_design_estimates_are_olofssons() -> None:
    from dinov3_eo.tasks.segmentation_eval import area_estimates

    rng = np.random.default_rng(4)
    map_pixels = {0: 60_000, 1: 25_000, 2: 4_000}
    strata = np.repeat([0, 1, 2], [120, 80, 60])
    reference = np.where(rng.random(260) < 0.85, strata, rng.integers(0, 3, 260))
    got = design_estimates(strata, strata, reference, map_pixels, map_pixels, ["a", "b", "c"], pixel_area=0.09,
                           finite_population=False)  # fmt: skip
    confusion = np.bincount(reference * 3 + strata, minlength=9).reshape(3, 3)  # rows reference, columns map
    expected = area_estimates(confusion, np.array(list(map_pixels.values())), pixel_area=0.09, class_names=["a", "b", "c"])
    assert got["overall_accuracy"] == pytest.approx(expected["overall_accuracy"])
    assert got["overall_accuracy_ci"] == pytest.approx(expected["overall_accuracy_ci"])
    for name in "abc":
        for key, value in expected["classes"][name].items():
            assert got["classes"][name][key] == pytest.approx(value, rel=1e-9), (name, key)
    shares = np.array(got["area_matrix"]["shares"])  # Olofsson's p_ij = W_i n_ij / n_i.
    weights = np.array(list(map_pixels.values())) / sum(map_pixels.values())
    np.testing.assert_allclose(shares, weights[:, None] * confusion.T / confusion.T.sum(axis=1, keepdims=True))
    assert shares.sum() == pytest.approx(1.0) and got["area_matrix"]["classes"] == ["a", "b", "c"]
    with_fpc = design_estimates(strata, strata, reference, map_pixels, map_pixels, ["a", "b", "c"], pixel_area=0.09)
    assert with_fpc["classes"]["c"]["estimated_area_ci"] < got["classes"]["c"]["estimated_area_ci"]


def _lake_maps(folder: Path) -> Path:
    """A forest map with lakes it draws 2 px too small all round (the omissions ring each lake), and its truth."""
    rows, cols = np.indices((200, 200))
    truth = np.zeros((200, 200), np.uint8)
    mapped = np.zeros((200, 200), np.uint8)
    for r, c, radius in ((40, 50, 9), (120, 150, 12), (160, 40, 7), (70, 130, 6)):
        distance = np.hypot(rows - r, cols - c)
        truth[distance <= radius] = 1
        mapped[distance <= radius - 2] = 1
    profile = dict(driver="GTiff", width=200, height=200, count=1, dtype="uint8", nodata=255, crs=CRS,
                   transform=from_origin(600_000, 4_000_000, 10.0, 10.0))  # fmt: skip
    for name, values in (("lakes_map.tif", mapped), ("lakes_truth.tif", truth)):
        with rasterio.open(folder / name, "w", **profile) as dst:
            dst.write(values, 1)
            dst.update_tags(class_names=json.dumps(["forest", "water"]))
    return folder


def test_a_buffer_stratum_finds_the_omissions_the_map_classes_miss(tmp_path: Path) -> None:
    """Over 120 draws of 200 points (40 at least a stratum): with the map classes as strata the water area's 95 %
    interval holds the truth too seldom (the ring of missed water is 1 % of the huge forest stratum, which often
    gets no point on it); with a 3-px buffer stratum around the mapped water it holds, the estimate is unbiased and
    its error a fraction of the other's."""
    folder = _lake_maps(tmp_path)
    with rasterio.open(folder / "lakes_truth.tif") as src:
        truth = src.read(1)
    true_water = truth.sum() * 0.01  # 10 m pixels: 0.01 ha
    results = {}
    for name, buffers in (("classes", ()), ("buffer", ((1, 3),))):
        held, estimates = [], []
        for seed in range(120):
            points = stratified_sample(folder / "lakes_map.tif", n=200, min_per_stratum=40, buffers=buffers, seed=seed)
            design = points.attrs["design"]
            rows, cols = rasterio.transform.rowcol(from_origin(600_000, 4_000_000, 10.0, 10.0), points.geometry.x,
                                                   points.geometry.y)  # fmt: skip
            got = design_estimates(points["stratum_id"], points["class_id"], truth[np.asarray(rows), np.asarray(cols)],
                                   {d["stratum_id"]: d["pixels"] for d in design},
                                   {c["class_id"]: c["pixels"] for c in points.attrs["map_classes"]},
                                   ["forest", "water"], pixel_area=0.01)["classes"]["water"]  # fmt: skip
            estimates.append(got["estimated_area"])
            held.append(abs(got["estimated_area"] - true_water) <= got["estimated_area_ci"])
        results[name] = (np.mean(held), np.mean(estimates), np.sqrt(np.mean((np.array(estimates) - true_water) ** 2)))
    assert results["classes"][0] < 0.85 and results["buffer"][0] >= 0.88, results
    assert abs(results["buffer"][1] - true_water) < 0.05 * true_water, (results, true_water)
    assert results["buffer"][2] < 0.3 * results["classes"][2], results  # 300 draws: 0.41 vs 2.91 ha
    # the buffer's points lie within 3 px of mapped water and are not water on the map
    points = stratified_sample(folder / "lakes_map.tif", n=200, min_per_stratum=40, buffers=((1, 3),), seed=0)
    ring = points[points["stratum_id"] == BUFFER_BASE]
    assert set(ring["stratum"]) == {"water buffer"} and (ring["class_id"] == 0).all() and len(ring) >= 40
    with rasterio.open(folder / "lakes_map.tif") as src:
        mapped = src.read(1)
        r, c = rasterio.transform.rowcol(src.transform, ring.geometry.x, ring.geometry.y)
    water_r, water_c = np.nonzero(mapped == 1)
    nearest = np.min(np.hypot(np.asarray(r)[:, None] - water_r[None], np.asarray(c)[:, None] - water_c[None]), axis=1)
    assert (nearest <= 3).all() and (nearest > 0).all()


def test_sample_estimate_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = _lake_maps(tmp_path)
    out = tmp_path / "points.gpkg"
    assert cli_main(["sample", str(folder / "lakes_map.tif"), "-n", "200", "--min-per-class", "40", "--buffer",
                     "water:3", "-o", str(out)]) == 0  # fmt: skip
    assert "water buffer" in capsys.readouterr().out
    design = json.loads((tmp_path / "points_design.json").read_text())
    assert [s["stratum"] for s in design["strata"]] == ["forest", "water", "water buffer"]
    assert design["class_names"] == ["forest", "water"] and design["pixel_area_ha"] == pytest.approx(0.01)
    points = gpd.read_file(out)
    assert cli_main(["sample", "estimate", str(out)]) == 2
    assert "200 of the 200 points have no label in 'reference'" in capsys.readouterr().err
    with rasterio.open(folder / "lakes_truth.tif") as src:
        points["reference"] = [["forest", "water"][int(v[0])] for v in src.sample(zip(points.geometry.x, points.geometry.y))]
    points.to_file(out, layer="points")
    assert cli_main(["segment", "evaluate", str(folder / "lakes_map.tif"), str(out), "--attribute", "reference"]) == 2
    assert "was drawn with buffer strata (points_design.json)" in capsys.readouterr().err  # its areas would be biased
    assert cli_main(["sample", "estimate", str(out), "--out", str(tmp_path / "estimates.json")]) == 0
    printed = capsys.readouterr().out
    assert "200 labelled points, 3 strata; areas in ha" in printed and "overall accuracy" in printed
    assert "error matrix, shares of the area (rows: map, columns: reference):" in printed
    saved = json.loads((tmp_path / "estimates.json").read_text())
    assert saved["unit"] == "ha" and saved["classes"]["water"]["estimated_area"] > saved["classes"]["water"]["map_area"]
    points.loc[0, "reference"] = "lava"
    points.to_file(out, layer="points")
    assert cli_main(["sample", "estimate", str(out)]) == 2
    assert "has no classes ['lava']" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a usage error, as argparse reports it
        cli_main(["sample", str(folder / "lakes_map.tif"), "-n", "50", "--buffer", "water", "-o", str(tmp_path / "x.gpkg")])
    assert "--buffer takes CLASS:PIXELS (e.g. water:3), not 'water'" in capsys.readouterr().err


def test_a_value_map_binned_into_strata_for_regress_evaluate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Plots for a biomass map: strata cut from its values (``--bins``), points drawn in each, measured (here: the
    truth under them), then ``regress evaluate --strata`` on the strata raster the sample wrote."""
    from dinov3_eo.tasks.sample_design import bin_names, bin_raster

    assert bin_names([10, 20.5]) == ["<10", "10-20.5", ">=20.5"]
    rng = np.random.default_rng(6)
    rows, cols = np.indices((90, 100))
    truth = 80 + 60 * np.sin(cols / 15.0) * np.cos(rows / 11.0) + rng.normal(0, 8, (90, 100))
    mapped = (0.8 * truth + 25).astype(np.float32)  # a biased biomass map, Mg/ha
    mapped[:5, :5] = np.nan
    profile = dict(driver="GTiff", width=100, height=90, count=1, dtype="float32", nodata=float("nan"), crs=CRS,
                   transform=from_origin(700_000, 4_100_000, 30.0, 30.0))  # fmt: skip
    with rasterio.open(tmp_path / "agb.tif", "w", **profile) as dst:
        dst.write(mapped, 1)
        dst.units = ("Mg/ha",)
    strata = bin_raster(tmp_path / "agb.tif", [60, 100, 140], tmp_path / "bins.tif")
    with rasterio.open(strata) as src:
        classes = src.read(1)
        assert json.loads(src.tags()["class_names"]) == ["<60", "60-100", "100-140", ">=140"]
    finite = np.isfinite(mapped)
    np.testing.assert_array_equal(classes[finite], np.digitize(mapped[finite], [60, 100, 140]))
    assert (classes[~finite] == 255).all()
    with pytest.raises(ValueError, match="must increase"):
        bin_raster(tmp_path / "agb.tif", [100, 60], tmp_path / "bad.tif")

    out = tmp_path / "plots.gpkg"
    assert cli_main(["sample", str(tmp_path / "agb.tif"), "--bins", "140", "60", "100", "-n", "80", "--min-per-class",
                     "12", "-o", str(out)]) == 0  # fmt: skip
    assert "cut at [60.0, 100.0, 140.0]" in capsys.readouterr().out
    plots = gpd.read_file(out)
    r, c = rasterio.transform.rowcol(profile["transform"], plots.geometry.x, plots.geometry.y)
    r, c = np.asarray(r), np.asarray(c)
    assert (np.digitize(mapped[r, c], [60, 100, 140]) == plots["class_id"]).all() and len(plots) == 80
    assert plots["stratum"].value_counts().min() >= 12
    plots["agb"] = truth[r, c]  # the field crew's measurement
    plots.to_file(tmp_path / "measured.gpkg")
    assert cli_main(["regress", "evaluate", str(tmp_path / "agb.tif"), str(tmp_path / "measured.gpkg"), "--attribute",
                     "agb", "--strata", str(tmp_path / "plots_strata.tif"), "--out-dir", str(tmp_path / "eval")]) == 0
    estimate = json.loads((tmp_path / "eval" / "metrics.json").read_text())["estimate"]
    assert estimate["design"] == "stratified" and [s["name"] for s in estimate["strata"]] == bin_names([60, 100, 140])
    true_mean = truth[finite].mean()
    assert estimate["low"] <= true_mean <= estimate["high"] and abs(estimate["map_mean"] - true_mean) > 5
