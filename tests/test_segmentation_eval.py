"""Accuracy assessment of class maps (dinov3_eo.tasks.segmentation_eval) against sklearn and hand-built references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from sklearn import metrics as skm

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.segmentation_eval import (
    accuracy_report,
    area_estimates,
    confusion_matrix,
    evaluate_class_raster,
    report_table,
)

NAMES = ["water", "crop", "tree"]
ORIGIN = (500_000.0, 4_200_000.0)  # UTM 33N, metres


def write_map(path: Path, classes: np.ndarray, *, res: float = 10.0, names: list[str] | None = NAMES,
              nodata: int | None = 255, crs: str = "EPSG:32633") -> Path:  # fmt: skip
    with rasterio.open(path, "w", driver="GTiff", width=classes.shape[1], height=classes.shape[0], count=1,
                       dtype="uint8", crs=crs, transform=from_origin(*ORIGIN, res, res), nodata=nodata) as dst:  # fmt: skip
        dst.write(classes.astype(np.uint8), 1)
        if names is not None:
            dst.update_tags(class_names=json.dumps(names))
    return path


@pytest.fixture
def scene() -> tuple[np.ndarray, np.ndarray]:
    """A 60 x 80 class map (with a nodata corner) and its reference at the same 10 m grid (some pixels differ,
    a strip unlabelled)."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.repeat(rng.integers(0, 3, (15, 20)), 4, axis=0), 4, axis=1)
    pred = truth.copy()
    flip = rng.random(truth.shape) < 0.2
    pred[flip] = (pred[flip] + 1) % 3
    pred[:8, :8] = 255  # map nodata
    truth = truth.copy()
    truth[:, 70:] = 255  # reference nodata
    return pred, truth


class TestMetrics:
    def test_against_sklearn(self) -> None:
        rng = np.random.default_rng(1)
        truth, pred = rng.integers(0, 4, 5000), rng.integers(0, 4, 5000)
        pred[truth == 2] = 2  # one easy class
        confusion = confusion_matrix(pred, truth, 4)
        np.testing.assert_array_equal(confusion, skm.confusion_matrix(truth, pred, labels=range(4)))
        report = accuracy_report(confusion)
        precision, recall, f1, support = skm.precision_recall_fscore_support(truth, pred, labels=range(4))
        iou = skm.jaccard_score(truth, pred, labels=range(4), average=None)
        for i, m in enumerate(report["classes"].values()):
            assert m["precision"] == pytest.approx(precision[i]) and m["recall"] == pytest.approx(recall[i])
            assert m["f1"] == pytest.approx(f1[i]) and m["iou"] == pytest.approx(iou[i])
            assert m["reference_pixels"] == support[i]
        assert report["overall_accuracy"] == pytest.approx(skm.accuracy_score(truth, pred))
        assert report["kappa"] == pytest.approx(skm.cohen_kappa_score(truth, pred))
        assert report["miou"] == pytest.approx(iou.mean()) and report["pixels"] == 5000

    def test_out_of_range_values_and_absent_classes(self) -> None:
        pred = np.array([0, 1, 1, -1, 7, 0])
        truth = np.array([0, 1, 0, 1, 1, 255])
        confusion = confusion_matrix(pred, truth, 3)
        np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 1, 0], [0, 0, 0]])
        report = accuracy_report(confusion, ["a", "b", "c"])
        assert np.isnan(report["classes"]["c"]["iou"])  # in neither: left out of the mean
        assert report["miou"] == pytest.approx((0.5 + 0.5) / 2)


class TestAreaEstimates:
    def test_the_published_example(self) -> None:
        """Olofsson et al. (2014), Remote Sensing of Environment 148, the worked example (tables 8-10): 30 m pixels
        (0.09 ha), the sample's error matrix (rows: map) and the mapped pixel counts; the paper's values to its
        rounding. Left out: the producer's-accuracy intervals of forest gain and stable non-forest, which the paper
        prints as 0.23 and 0.01 where its own formula gives 0.25 and 0.02 (another implementation found the same)."""
        by_map = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
        names = ["deforestation", "forest gain", "stable forest", "stable non-forest"]
        est = area_estimates(by_map.T, np.array([200_000, 150_000, 3_200_000, 6_450_000]), pixel_area=0.09,
                             class_names=names)  # fmt: skip
        c = est["classes"]
        for name, area, ci in zip(names, (21_158, 11_686, 285_770, 581_386), (6_158, 3_756, 15_510, 16_282)):
            assert c[name]["estimated_area"] == pytest.approx(area, abs=1)
            assert c[name]["estimated_area_ci"] == pytest.approx(ci, abs=1)
        for name, users, users_ci in zip(names, (0.88, 0.73, 0.93, 0.96), (0.07, 0.10, 0.04, 0.02)):
            assert c[name]["users_accuracy"] == pytest.approx(users, abs=0.005)
            assert c[name]["users_accuracy_ci"] == pytest.approx(users_ci, abs=0.005)
        for name, producers in zip(names, (0.75, 0.85, 0.93, 0.96)):
            assert c[name]["producers_accuracy"] == pytest.approx(producers, abs=0.005)
        assert c["deforestation"]["producers_accuracy_ci"] == pytest.approx(0.21, abs=0.005)
        assert c["stable forest"]["producers_accuracy_ci"] == pytest.approx(0.03, abs=0.005)
        assert est["overall_accuracy"] == pytest.approx(0.95, abs=0.005)
        assert est["overall_accuracy_ci"] == pytest.approx(0.02, abs=0.005)
        assert c["deforestation"]["map_area"] == pytest.approx(18_000) and not est["unsampled_map_classes"]

    def test_a_wall_to_wall_reference_gives_its_own_areas(self, scene, tmp_path: Path) -> None:
        """When every classed map pixel has a label, the estimator returns the reference's class areas (10 m pixels:
        0.01 ha); a map class without any label is reported as unsampled."""
        pred, truth = scene
        full = truth.copy()
        full[:, 70:] = pred[:, 70:] % 3  # label the strip too
        report = evaluate_class_raster(write_map(tmp_path / "map.tif", pred), write_map(tmp_path / "ref.tif", full, names=None))
        assert report["area"]["unit"] == "ha"
        for i, name in enumerate(NAMES):
            assert report["area"]["classes"][name]["estimated_area"] == pytest.approx(
                np.asarray(report["confusion"])[i].sum() * 0.01)
            assert report["area"]["classes"][name]["map_area"] == pytest.approx(((pred == i)).sum() * 0.01)
        partial = np.full_like(truth, 255)
        partial[pred == 0] = 0  # only map class 0 is labelled
        report = evaluate_class_raster(write_map(tmp_path / "map.tif", pred), write_map(tmp_path / "p.tif", partial, names=None))
        assert report["area"]["unsampled_map_classes"] == ["crop", "tree"]
        assert "no reference label" in report_table(report)


class TestRasterReference:
    def test_same_grid_blocks_and_outputs(self, scene, tmp_path: Path) -> None:
        pred, truth = scene
        map_path = write_map(tmp_path / "map.tif", pred)
        ref_path = write_map(tmp_path / "ref.tif", truth, names=None)
        out = tmp_path / "eval"
        report = evaluate_class_raster(map_path, ref_path, out_dir=out, block=32)  # 32-px blocks: 2 x 3 partial ones
        keep = (pred != 255) & (truth != 255)
        expected = skm.confusion_matrix(truth[keep], pred[keep], labels=range(3))
        np.testing.assert_array_equal(report["confusion"], expected)
        assert list(report["classes"]) == NAMES and report["pixels"] == keep.sum()
        assert report == evaluate_class_raster(map_path, ref_path, block=1024) | {"confusion": report["confusion"]}
        assert json.loads((out / "metrics.json").read_text())["pixels"] == keep.sum()
        lines = (out / "confusion.csv").read_text().splitlines()
        assert lines[0] == "reference \\ map,water,crop,tree" and lines[1] == "water," + ",".join(map(str, expected[0]))
        assert (out / "confusion.png").stat().st_size > 1000 and (out / "agreement.png").stat().st_size > 1000

    def test_a_folder_or_glob_of_reference_masks_counts_as_their_mosaic(self, scene, tmp_path: Path) -> None:
        """Reference masks cut in two (one per image, as datasets ship them) evaluate as the raster they came from."""
        pred, truth = scene
        map_path = write_map(tmp_path / "map.tif", pred)
        whole = evaluate_class_raster(map_path, write_map(tmp_path / "ref.tif", truth, names=None))
        (tmp_path / "masks").mkdir()
        write_map(tmp_path / "masks" / "left.tif", truth[:, :37], names=None)
        right = truth[:, 37:]
        with rasterio.open(tmp_path / "masks" / "right.tif", "w", driver="GTiff", width=right.shape[1],
                           height=right.shape[0], count=1, dtype="uint8", crs="EPSG:32633", nodata=255,
                           transform=from_origin(ORIGIN[0] + 370, ORIGIN[1], 10, 10)) as dst:  # fmt: skip
            dst.write(right.astype(np.uint8), 1)
        for reference in (tmp_path / "masks", str(tmp_path / "masks" / "*.tif")):
            report = evaluate_class_raster(map_path, reference, block=32)
            np.testing.assert_array_equal(report["confusion"], whole["confusion"])
        with pytest.raises(FileNotFoundError, match="matched no"):
            evaluate_class_raster(map_path, str(tmp_path / "masks" / "*.jp2"))

    def test_finer_reference_is_resampled_onto_the_map(self, scene, tmp_path: Path) -> None:
        """A 5 m reference (each class cell 2 x 2 pixels) gives the same counts as the 10 m one."""
        pred, truth = scene
        fine = np.repeat(np.repeat(truth, 2, axis=0), 2, axis=1)
        report = evaluate_class_raster(write_map(tmp_path / "map.tif", pred),
                                       write_map(tmp_path / "fine.tif", fine, res=5.0, names=None))  # fmt: skip
        keep = (pred != 255) & (truth != 255)
        np.testing.assert_array_equal(report["confusion"], skm.confusion_matrix(truth[keep], pred[keep], labels=range(3)))

    def test_a_reference_naming_its_classes_otherwise_is_matched_by_name(self, scene, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
        """A reference raster whose ``class_names`` tag orders the classes otherwise, and holds one the map lacks
        (a land-cover product against a map of some of its classes): ids are translated by name, and the extra
        class's pixels are left out with a warning naming it."""
        pred, truth = scene
        other = ["Tree", "bare", "water", "crop"]  # reference ids: tree 0, bare 1, water 2, crop 3
        to_other = np.array([2, 3, 0])  # map id -> reference id
        coded = np.where(truth == 255, 255, to_other[np.minimum(truth, 2)]).astype(np.uint8)
        coded[50:, :10] = 1  # bare ground, which the map has no class for
        report = evaluate_class_raster(write_map(tmp_path / "map.tif", pred), write_map(tmp_path / "ref.tif", coded, names=other))
        keep = (pred != 255) & (truth != 255)
        keep[50:, :10] = False
        np.testing.assert_array_equal(report["confusion"], skm.confusion_matrix(truth[keep], pred[keep], labels=range(3)))
        assert "Reference classes ['bare'] of ref.tif are not classes of the map" in caplog.text

    def test_errors(self, scene, tmp_path: Path) -> None:
        pred, truth = scene
        map_path = write_map(tmp_path / "map.tif", pred)
        bad = truth.copy()
        bad[0, 0] = 7
        with pytest.raises(ValueError, match=r"class ids \[7\]"):
            evaluate_class_raster(map_path, write_map(tmp_path / "bad.tif", bad, names=None))
        with pytest.raises(ValueError, match="does not name its classes"):
            evaluate_class_raster(write_map(tmp_path / "anon.tif", pred, names=None), map_path)
        far = tmp_path / "far.tif"
        with rasterio.open(far, "w", driver="GTiff", width=10, height=10, count=1, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(0, 0, 10, 10), nodata=255) as dst:  # fmt: skip
            dst.write(np.zeros((1, 10, 10), np.uint8))
        with pytest.raises(ValueError, match="do they overlap"):
            evaluate_class_raster(map_path, far)
        with pytest.raises(FileNotFoundError):
            evaluate_class_raster(map_path, tmp_path / "missing.tif")


def write_at(path: Path, classes: np.ndarray, *, col: int = 0, names: list[str] | None = NAMES) -> Path:
    """``write_map`` for the part of the scene that starts ``col`` pixels east of its origin."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=classes.shape[1], height=classes.shape[0], count=1,
                       dtype="uint8", crs="EPSG:32633", transform=from_origin(ORIGIN[0] + 10 * col, ORIGIN[1], 10, 10),
                       nodata=255) as dst:  # fmt: skip
        dst.write(classes.astype(np.uint8), 1)
        if names is not None:
            dst.update_tags(class_names=json.dumps(names))
    return path


class TestSeveralMaps:
    """A test split's maps (one per image) evaluated together: one confusion matrix, as if they were one map."""

    def test_two_halves_count_as_the_whole_map(self, scene, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        pred, truth = scene
        reference = write_map(tmp_path / "ref.tif", truth, names=None)
        whole = evaluate_class_raster(write_map(tmp_path / "map.tif", pred), reference)
        left, right = write_at(tmp_path / "maps" / "a.tif", pred[:, :45]), write_at(tmp_path / "maps" / "b.tif",
                                                                                     pred[:, 45:], col=45)
        for preds in ([left, right], tmp_path / "maps", str(tmp_path / "maps" / "*.tif")):
            report = evaluate_class_raster(preds, reference, out_dir=tmp_path / "eval", overwrite=True, block=16)
            np.testing.assert_array_equal(report["confusion"], whole["confusion"])
            assert report["area"]["overall_accuracy"] == pytest.approx(whole["area"]["overall_accuracy"])
            for name in NAMES:  # the two maps' class areas add up to the whole map's strata
                for key in ("map_area", "estimated_area", "estimated_area_ci"):
                    assert report["area"]["classes"][name][key] == pytest.approx(whole["area"]["classes"][name][key])
            assert report["prediction"] == [str(left), str(right)]
            assert [m["pixels"] for m in report["maps"]] == [
                int(np.asarray(evaluate_class_raster(p, reference)["confusion"]).sum()) for p in (left, right)]
        # segment predict's output folder: its class maps, not the probabilities beside them
        predicted = tmp_path / "predicted"
        for name, part in (("a", pred[:, :45]), ("b", pred[:, 45:])):
            write_at(predicted / f"{name}_classes.tif", part, col=0 if name == "a" else 45)
            with rasterio.open(predicted / f"{name}_probabilities.tif", "w", driver="GTiff", width=part.shape[1],
                               height=part.shape[0], count=3, dtype="uint8", crs="EPSG:32633",
                               transform=from_origin(ORIGIN[0], ORIGIN[1], 10, 10)) as dst:  # fmt: skip
                dst.write(np.zeros((3, *part.shape), np.uint8))
        from_folder = evaluate_class_raster(predicted, reference)
        assert [Path(p).name for p in from_folder["prediction"]] == ["a_classes.tif", "b_classes.tif"]
        np.testing.assert_array_equal(from_folder["confusion"], whole["confusion"])
        lines = (tmp_path / "eval" / "per_map.csv").read_text().splitlines()
        assert lines[0] == "prediction,pixels,overall_accuracy,miou" and lines[1].startswith(f"{left},")
        assert not (tmp_path / "eval" / "agreement.png").exists()  # a picture of one map only
        assert cli_main(["segment", "evaluate", str(left), str(right), str(reference), "--out-dir",
                         str(tmp_path / "cli")]) == 0  # fmt: skip
        assert "per_map.csv" in capsys.readouterr().out
        assert json.loads((tmp_path / "cli" / "metrics.json").read_text())["confusion"] == whole["confusion"]

    def test_dates_paired_with_their_masks_by_name(self, scene, tmp_path: Path) -> None:
        """Two dates over the same ground, each map (``<scene>_classes.tif``, as ``segment predict`` names them)
        against its own date's mask: by name each counts against its own; by georeference both would read the
        first mask."""
        pred, truth = scene
        later_truth = np.where(truth == 255, 255, (truth + 1) % 3)
        later_pred = np.where(pred == 255, 255, (pred + 1) % 3)
        maps = [write_at(tmp_path / "pred" / "2020" / "scene_classes.tif", pred),
                write_at(tmp_path / "pred" / "2024" / "scene_classes.tif", later_pred)]
        masks = [write_at(tmp_path / "masks" / "2020" / "scene.tif", truth, names=None),
                 write_at(tmp_path / "masks" / "2024" / "scene.tif", later_truth, names=None)]
        each = [np.asarray(evaluate_class_raster(m, r)["confusion"]) for m, r in zip(maps, masks)]
        paired = evaluate_class_raster(maps, tmp_path / "masks", pairing="name")
        np.testing.assert_array_equal(paired["confusion"], each[0] + each[1])
        by_place = evaluate_class_raster(maps, tmp_path / "masks")
        assert by_place["overall_accuracy"] < 0.5 < paired["overall_accuracy"]  # 2024 scored against 2020's mask
        import geopandas as gpd
        from shapely.geometry import box

        gpd.GeoDataFrame({"name": ["water"]}, geometry=[box(ORIGIN[0], ORIGIN[1] - 100, ORIGIN[0] + 100, ORIGIN[1])],
                         crs="EPSG:32633").to_file(tmp_path / "ref.gpkg")  # fmt: skip
        with pytest.raises(ValueError, match="matched by georeference"):
            evaluate_class_raster(maps, tmp_path / "ref.gpkg", pairing="name")

    def test_maps_of_other_classes_are_refused(self, scene, tmp_path: Path) -> None:
        pred, truth = scene
        maps = [write_at(tmp_path / "a.tif", pred), write_at(tmp_path / "b.tif", pred, names=["x", "y", "z"])]
        with pytest.raises(ValueError, match=r"name different classes \(\['water', 'crop', 'tree'\] in .*a.tif.*"
                                             r"\['x', 'y', 'z'\] in .*b.tif"):
            evaluate_class_raster(maps, write_map(tmp_path / "ref.tif", truth, names=None))


class TestVectorReference:
    def polygons(self, path: Path, names: list[str]) -> Path:
        import geopandas as gpd
        from shapely.geometry import box

        x0, y0 = ORIGIN
        shapes = [box(x0 + 100, y0 - 300, x0 + 400, y0 - 100), box(x0 + 500, y0 - 500, x0 + 700, y0 - 300)]
        gpd.GeoDataFrame({"name": names}, geometry=shapes, crs="EPSG:32633").to_crs("EPSG:4326").to_file(path)
        return path

    def test_names_are_matched_to_the_maps_classes(self, scene, tmp_path: Path) -> None:
        pred, _ = scene
        report = evaluate_class_raster(write_map(tmp_path / "map.tif", pred),
                                       self.polygons(tmp_path / "ref.gpkg", ["Water", "tree"]))  # fmt: skip
        # pixel centres inside the boxes (reprojected through EPSG:4326, so allow a pixel's worth at the edges)
        first, second = pred[10:30, 10:40], pred[30:50, 50:70]
        assert report["classes"]["water"]["reference_pixels"] == pytest.approx(first.size, abs=60)
        assert report["classes"]["tree"]["reference_pixels"] == pytest.approx(second.size, abs=60)
        assert report["classes"]["crop"]["reference_pixels"] == 0
        assert report["classes"]["water"]["recall"] == pytest.approx((first == 0).mean(), abs=0.05)

    def test_unknown_names_need_classes(self, scene, tmp_path: Path) -> None:
        pred, _ = scene
        map_path = write_map(tmp_path / "map.tif", pred)
        ref = self.polygons(tmp_path / "ref.gpkg", ["lake", "forest"])
        with pytest.raises(ValueError, match=r"\['forest', 'lake'\].*classes="):
            evaluate_class_raster(map_path, ref)
        report = evaluate_class_raster(map_path, ref, classes={"lake": 0, "forest": 2})
        assert report["classes"]["water"]["reference_pixels"] > 0 and report["classes"]["tree"]["reference_pixels"] > 0


def test_command_line(scene, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pred, truth = scene
    map_path, ref_path = write_map(tmp_path / "map.tif", pred), write_map(tmp_path / "ref.tif", truth, names=None)
    assert cli_main(["segment", "evaluate", str(map_path), str(ref_path), "--out-dir", str(tmp_path / "e")]) == 0
    printed = capsys.readouterr().out
    assert "overall accuracy" in printed and "water" in printed and (tmp_path / "e" / "metrics.json").exists()
    assert cli_main(["segment", "evaluate", str(map_path), str(tmp_path / "nope.gpkg")]) == 2
    assert "does not exist" in capsys.readouterr().err
    # an earlier report is kept unless --overwrite
    again = ["segment", "evaluate", str(map_path), str(ref_path), "--out-dir", str(tmp_path / "e")]
    assert cli_main(again) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main([*again, "--overwrite"]) == 0
