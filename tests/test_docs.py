"""The README's self-contained Python examples and the shipped example script run as written, so that the front door
stays true (the others need a user's checkpoint or scene, and their calls are tested where they are built)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def run_readme_block(marker: str, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Run the one README Python block that contains ``marker``; returns its variables."""
    (block,) = [b for b in readme_python_blocks() if marker in b]
    monkeypatch.chdir(ROOT)  # the examples use paths relative to the repository
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    return scope


def test_the_readme_allocator_example_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    run_readme_block("retain_freed_memory()   # once", monkeypatch)


def test_the_readme_datamodule_example_gives_what_its_comment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = run_readme_block("dm = PretrainDataModule(paths=", monkeypatch)["batch"]
    assert tuple(batch["image"].shape) == (16, 3, 96, 96) and str(batch["image"].dtype) == "torch.float32"
    assert tuple(batch["valid"].shape) == (16, 96, 96)
    assert {"bounds", "crs", "path"} <= set(batch)


def test_the_readme_dense_datamodule_example_gives_what_its_comments_say(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("dense = DenseDataModule(paths=", monkeypatch)
    sample, tile = scope["sample"], scope["tile"]
    assert tuple(sample["image"].shape) == (3, 128, 128) and tuple(sample["mask"].shape) == (128, 128)
    assert str(sample["mask"].dtype) == "torch.int64" and set(sample["mask"].unique().tolist()) <= {0, 1, 255}
    # the PNG's halves, on the image's own grid: columns east of 224 are class 1 where labelled
    import torch

    east = (tile.col + torch.arange(128) >= 224)[None, :]
    labelled = sample["mask"] != 255
    assert ((sample["mask"] == 1) == (east & labelled)).all()


def test_the_readme_chips_example_gives_what_its_comments_say(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("chips = ChipSegmentationDataModule(", monkeypatch)
    chips, batch = scope["chips"], scope["batch"]
    assert (chips.train_chips, chips.val_chips) == ([0, 1, 2], [3]) and chips.normalization.name == "zscore"
    assert tuple(batch["image"].shape) == (8, 3, 128, 128) and tuple(batch["mask"].shape) == (8, 128, 128)
    assert set(batch["mask"].unique().tolist()) <= {0, 1, 255} and (batch["mask"] == 255).any()
    assert chips.band_names == ["red", "green", "blue"] and chips.class_names == {0: "dark", 1: "bright"}


def test_the_readme_losses_example_runs_after_the_dense_datamodule_one(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    scope = run_readme_block("dense = DenseDataModule(paths=", monkeypatch)
    (block,) = [b for b in readme_python_blocks() if "segmentation_loss_terms(logits" in b]
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["counts"].shape == (2,) and (scope["counts"] > 0).all()
    weights = scope["weights"].numpy()
    assert (weights * scope["counts"]).sum() == pytest.approx(scope["counts"].sum(), rel=1e-5)  # balanced: mean 1
    assert list(scope["terms"]) == ["ce", "dice"] and np.isfinite(scope["loss"].item())
    assert scope["logits"].grad is not None


def test_the_readme_tta_example_gives_what_its_comment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    probs = run_readme_block("smooth = TestTimeAugmented(", monkeypatch)["probs"]
    assert tuple(probs.shape) == (2, 5, 64, 64)
    assert (probs.sum(dim=1) - 1).abs().max() < 1e-5


def test_the_readme_lora_example_gives_what_its_comments_say(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("names = add_lora(vit,", monkeypatch)
    assert len(scope["names"]) == 8 and scope["merged"] == 8
    assert 0 < scope["trainable"] < sum(p.numel() for p in scope["vit"].parameters()) / 10
    assert not any(".lora." in k for k in scope["vit"].state_dict())


def test_the_query_map_example_runs_without_a_model(tmp_path: Path) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "query_map.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert {"scores.tif", "classes.tif", "classes.gpkg", "similar.tif", "query_map.png"} <= {
        p.name for p in tmp_path.iterdir()
    }
    assert (tmp_path / "tiles" / "landsat8_224078_subset_tile_classes.tif").is_file()  # the zero-shot tile map
    assert "tiles named from text" in done.stdout
    import pandas as pd

    named = pd.read_csv(tmp_path / "polygons_named.csv")  # the four bundled polygons, each named by a query
    assert list(named["name"]) == ["water", "crop", "tree", "developed"] and named["class"].notna().all()


def test_the_no_labels_example_runs_without_a_model(tmp_path: Path) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "no_labels_map.py"), "--out", str(tmp_path), "--k", "3",
                           "4"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stem = "landsat8_224078_subset"
    assert {f"{stem}_clusters.tif", f"{stem}_clusters.png", f"{stem}_classes.tif", f"{stem}_classes.png", "similar.tif",
            "similar_mask.tif", "similar.png", "centroids.safetensors", "clicks.gpkg"} <= {p.name for p in tmp_path.iterdir()}
    assert "from 4 clicked pixels" in done.stdout and "like the water click" in done.stdout


def test_the_tile_probe_example_maps_the_scene_from_its_polygons(tmp_path: Path) -> None:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "tile_probe_from_polygons.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    stem = "landsat8_224078_subset"
    assert {"tiles.gpkg", f"{stem}_tile_labels.png", f"{stem}_tile_split.png", "metrics.json"} <= {
        p.name for p in (tmp_path / "fit").iterdir()}  # fmt: skip
    assert {f"{stem}_tile_classes.tif", f"{stem}_tiles.gpkg", f"{stem}_tile_quicklook.png"} <= {
        p.name for p in (tmp_path / "map").iterdir()}  # fmt: skip
    assert "4 classes (crop" in done.stdout and "6-px tiles classified: crop" in done.stdout
    from dinov3_eo.tasks.chip_classification import ChipClassifier

    fitted, refitted = ChipClassifier.load(tmp_path / "probe.safetensors"), ChipClassifier.load(tmp_path / "refit.safetensors")
    assert fitted.classes == refitted.classes == ["crop", "developed", "tree", "water"]
    np.testing.assert_allclose(fitted.weight, refitted.weight, atol=1e-3)  # the table gives the probe the scene gave


def test_the_readme_change_example_flags_the_pasted_river(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("summary = detect_change(", monkeypatch)
    summary = scope["summary"]
    assert summary.threshold_method == "otsu" and {p.name for p in scope["out"].iterdir()} == {
        "after.tif", "change.tif", "change_mask.tif", "change.gpkg", "change.png"}
    assert 0.5 * 80 * 80 * 0.09 < summary.changed_area_ha < 1.5 * 80 * 80 * 0.09  # the 80 x 80 block of 30 m pixels
    maps = scope["maps"]
    assert set(maps.data_vars) == {"change", "mask"} and int((maps["mask"] == 1).sum()) == summary.changed_pixels


def test_the_readme_height_and_class_change_example_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("loss = height_change(", monkeypatch)
    loss, report = scope["loss"], scope["report"]
    assert loss.loss_pixels > 50 and loss.gain_pixels == 0
    top = report["transitions"][0]
    assert (top["from"], top["to"]) == ("tree", "open")
    # every tree pixel lost is a >= 5 m canopy cut to 0.5 m: a height loss too
    assert top["area"] == pytest.approx(report["classes"]["tree"]["gross_loss"])
    assert top["area"] >= loss.loss_ha


def test_the_readme_cluster_example_maps_the_scene(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("clusters = fit_clusters(", monkeypatch)
    clusters, result = scope["clusters"], scope["result"]
    assert clusters.k in (3, 4, 6) and set(clusters.candidates) == {3, 4, 6}
    assert {p.name for p in scope["out"].iterdir()} == {
        "centroids.safetensors", "landsat8_224078_subset_clusters.tif", "landsat8_224078_subset_clusters.png",
        "landsat8_224078_subset_clusters.gpkg", "landsat8_224078_subset_classes.tif",
        "landsat8_224078_subset_classes.png"}  # fmt: skip
    assert len(result.hectares) == clusters.k and sum(result.hectares) == pytest.approx(sum(result.pixels) * 0.09)
    assert scope["array"].shape == (928, 448) and scope["array"].rio.crs is not None
    assert scope["protos"].class_names == ["crop", "developed", "tree", "water", "unknown"]
    assert sum(scope["classes"].pixels) == sum(result.pixels)  # the same valid pixels, now named


def test_the_readme_chip_classification_example_classifies(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("probe = fit_chip_classifier(x[train], y[train], classes, val=", monkeypatch)
    table, x, probe = scope["table"], scope["x"], scope["probe"]
    assert len(table) == 406 and x.shape == (406, 192) and probe.classes == ["bright", "dark"]
    assert (scope["root"] / "embeddings.parquet").exists() and probe.c in (0.01, 0.1, 1.0, 10.0, 100.0)
    assert scope["accuracy"] >= 0.8  # brightness classes, which a random ViT's mean patch token keeps
    tiles, frame, grid = scope["tiles"], scope["frame"], scope["grid"]
    assert grid["class_id"].shape == (29, 14) and grid["probability"].shape == (2, 29, 14)
    assert frame.crs.to_epsg() == 32621 and len(frame) == int(tiles.classified.sum()) == 29 * 14  # no nodata declared
    assert abs(tiles.transform.a) == 960 and all(path.exists() for path in scope["outputs"] if path is not None)
    # every tile is one of the chips the probe was fitted on: the map agrees with the chips' own classes
    index = [int(Path(path).stem.split("_")[1]) for path in table.paths]  # chip_<i>.png is tile i, row by row
    assert np.array_equal(tiles.class_ids().ravel()[index], probe.scores(x).argmax(1))
    history, tuned = scope["history"], scope["tuned"]
    assert [row["epoch"] for row in history] == [0, 1] and history[0]["held_out"] == pytest.approx(scope["accuracy"])
    assert tuned.held_out_accuracy == max(row["held_out"] for row in history) >= scope["accuracy"]
    fit = scope["fit"]  # the same classes straight from the scene and polygons over it
    assert fit.probe.classes == ["bright", "dark"] and fit.probe.embedding["chip_size"] == [32, 32]
    assert len(fit.tiles) == 406 and set(fit.tiles["split"]) == {"train", "held_out"}
    assert scope["scene_accuracy"] >= 0.8
    tile_table, again = scope["tile_table"], scope["again"]  # the tile table, and the probe fitted from it
    assert len(tile_table) == 406 and tile_table.crs.to_epsg() == 32621
    assert {"row", "col", "cls", "patch_mean"} <= set(tile_table.columns)
    np.testing.assert_allclose(again.probe.weight, fit.probe.weight, atol=1e-3)


def test_the_readme_tile_regression_example_maps_heights(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("fit = fit_tile_regressor(", monkeypatch)
    top, fit, mapped, heights, scored = scope["top"], scope["fit"], scope["mapped"], scope["heights"], scope["scored"]
    assert len(top) == 100 and top.statistic == "p95" and top.values.max() > 20  # tall conifers at Teakettle
    assert fit.regressor.target == "canopy height" and fit.regressor.unit == "m" and fit.regressor.lower == 0.0
    assert scope["held_out"]["n"] == len(fit.held_out_targets) > 20
    assert mapped.values.shape == (10, 10) and (mapped.values >= 0).all()
    assert heights.name == "canopy height" and heights.attrs["units"] == "m" and heights.rio.crs.to_epsg() == 32611
    assert all(path.exists() for path in scope["outputs"]) and scope["outputs"].interval.name == "TEAK_052_tile_interval.tif"
    assert len(scored.tiles) == len(scored.predictions) > 50 and "error" in scored.tiles
    assert scope["interval"]["coverage"] == 0.9 and scope["interval"]["n"] == scope["held_out"]["n"]
    bounds = scope["bounds"]
    assert set(bounds.data_vars) == {"value", "lower", "upper"} and (bounds["upper"] >= bounds["lower"]).all()
    assert 0.0 <= scope["inside"] <= 1.0
    estimate = scope["estimate"]  # every tile of the plot with a reference: the CHM's own mean, with little error
    assert estimate.cells == 100 and estimate.n == len(scored.targets) and estimate.low <= estimate.mean <= estimate.high
    assert estimate.mean - estimate.map_mean == pytest.approx(np.mean(scored.targets - scored.predictions))


def test_the_readme_height_interval_example_calibrates_and_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio

    scope = run_readme_block("intervals = calibrate_height_intervals(", monkeypatch)
    intervals, widths = scope["intervals"], scope["widths"]
    assert intervals.coverage == 0.9 and sum(intervals.pixels) == 3200
    assert list(widths) == ["0-2", "2-5", "5-10", "10-15", "15-20", "20-30", "30+"] and widths["0-2"] < widths["20-30"]
    with rasterio.open(scope["ends"]) as ends:
        assert ends.count == 2 and ends.units == ("m", "m")
    assert 0.6 <= scope["covered"] <= 1.0 and scope["check"].result()["all"]["n"] == 1600


def test_the_readme_footprint_example_scores_shots_and_labels_their_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("evaluate_height_footprints(chm, shots", monkeypatch)
    assert scope["metrics"]["all"]["n"] == 3 and len(scope["errors"]) == 3
    labels = scope["labels"]
    assert labels.shape == (40, 40) and sorted(labels[np.isfinite(labels)].tolist()) == [18.0, 30.0, 42.0]



def test_the_readme_gedi_example_reads_filtered_shots(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """In a folder holding ``scene.tif`` and ``granules/``, as the example expects: a granule of July 2021."""
    from test_gedi import BEAMS, POWER_BEAMS, track_datasets, write_granule, write_height_map

    scene = write_height_map(tmp_path / "scene.tif")
    beams = track_datasets(scene, np.random.default_rng(0))
    july = (np.datetime64("2021-07-01T00:00:00", "s") - np.datetime64("2018-01-01T00:00:00", "s")).astype(float)
    for columns in beams.values():
        columns["delta_time"] = july + np.arange(len(columns["delta_time"])) * 0.0083
    (tmp_path / "granules").mkdir()
    write_granule(tmp_path / "granules" / "GEDI02_A_2021182_O14000_02_T05678_02_003_02_V002.h5", beams)
    (block,) = [b for b in readme_python_blocks() if "read_gedi_shots(" in b]
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    frame = scope["shots"].frame
    assert 0 < len(frame) and set(frame["beam"]) <= set(POWER_BEAMS) and (frame["solar_elevation"] < 0).all()
    assert scope["shots"].counts["beams"] == 57 * (len(BEAMS) - len(POWER_BEAMS))
    import geopandas as gpd

    assert len(gpd.read_file(tmp_path / "gedi_shots.gpkg")) == len(frame)


def test_the_readme_zonal_example_gives_each_stands_heights(monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio

    heights = run_readme_block("zonal_statistics(\"tests/data/neon/TEAK_044_CHM.tif\"", monkeypatch)["heights"]
    with rasterio.open(ROOT / "tests/data/neon/TEAK_044_CHM.tif") as src:
        chm = src.read(1, masked=True).astype(np.float64).filled(np.nan)
    for row, half in zip(heights.itertuples(), (chm[:20], chm[20:])):
        assert row.mean == pytest.approx(np.nanmean(half)) and row.area_ha == pytest.approx(0.08)
        assert np.nanmin(half) <= row.p95 <= np.nanmax(half)


def test_the_readme_sample_example_draws_points_on_their_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    import rasterio

    scope = run_readme_block("points = stratified_sample(", monkeypatch)
    points, chm = scope["points"], scope["chm"]
    assert len(points) == 40 and points["stratum"].value_counts().min() >= 15
    with rasterio.open(ROOT / "tests/data/neon/TEAK_050_CHM.tif") as src:
        tall = [v[0] >= 5 for v in src.sample(zip(points.geometry.x, points.geometry.y))]
    assert tall == (points["stratum"] == "tree").tolist() and chm.shape == (40, 40)


def test_the_readme_calibration_example_corrects_the_heights(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("correction = fit_height_calibration(mapped, truth", monkeypatch)
    cv = scope["correction"].cross_validation
    assert cv["before"]["rmse"] > 5 and cv["after"]["rmse"] < 1.5
    corrected = scope["corrected"]
    assert corrected.shape == (2, 2) and np.isnan(corrected[1, 0])
    assert corrected[0, 1] == pytest.approx((20 - 2) / 0.7, abs=1.0)  # the map's 20 m is ~25.7 m of truth


def test_the_readme_trees_example_finds_the_plots_trees(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("detect_trees(\"tests/data/neon/TEAK_052_CHM.tif\"", monkeypatch)
    summary, coarse, scores = scope["summary"], scope["coarse"], scope["scores"]
    assert 10 <= summary.trees <= 60 and summary.trees_per_ha == pytest.approx(summary.trees / summary.area_ha)
    assert summary.area_ha == pytest.approx(0.16) and summary.mean_crown_area_m2 > 5
    assert coarse.trees < summary.trees and coarse.crowns is None
    assert scores.detected == coarse.trees and scores.reference == summary.trees and scores.precision > 0.8


def test_the_readme_zone_embeddings_example_maps_held_out_parcels(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("table = zone_embeddings(backbone,", monkeypatch)
    table, x, predicted = scope["table"], scope["x"], scope["predicted"]
    assert len(table) == 16 and x.shape == (16, 96) and np.isfinite(x).all()
    assert (table["coverage"] > 0.99).all() and (table["patches"] >= 1).all()
    assert len(predicted) == 8 and set(predicted) <= set(table["name"])
    series, x_season = scope["series"], scope["x_season"]
    assert x_season.shape == (16, 192) and series.attrs["dinov3_eo"]["dates"] == ["2020-05-18", "2020-08-22"]
    np.testing.assert_allclose(x_season[:, :96], x, rtol=1e-5, atol=1e-6)  # each date is that raster's embedding
    np.testing.assert_array_equal(x_season[:, 96:], x_season[:, :96])
    assert (series["dates_seen"] == 2).all() and list(series["name"]) == list(table["name"])


def test_the_readme_onnx_example_runs_the_graph_on_the_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("done = export_onnx(", monkeypatch)
    info, cls_token, patch_features = scope["info"], scope["cls_token"], scope["patch_features"]
    assert info["kind"] == "backbone" and info["input"] == "raw" and info["normalization"]["name"] == "percentile"
    assert cls_token.shape == (1, 96) and patch_features.shape == (1, 96, 20, 14)
    assert scope["done"].max_difference < 1e-4


def test_the_readme_image_objects_example_classifies_every_object(monkeypatch: pytest.MonkeyPatch) -> None:
    scope = run_readme_block("objects = image_objects(scene", monkeypatch)
    objects, train, x = scope["objects"], scope["train"], scope["x"]
    assert len(objects) > 100 and x.shape == (len(objects), 96) and 4 <= train.sum() < len(objects)
    assert set(objects["class"]) <= {"water", "crop", "tree", "developed"}
    assert (objects["class"][train].to_numpy() == scope["named"][train].to_numpy()).all()  # k = 1 on its own rows
