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
from dinov3_eo.tasks.sample_design import allocate, sample_size, stratified_sample

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
    assert (frame["pixels_per_point"] == [counts[c] / d for c, d in zip(frame["class_id"],
            [dict((x["class_id"], x["points"]) for x in design)[c] for c in frame["class_id"]])]).all()  # fmt: skip
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
