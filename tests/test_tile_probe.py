"""Tile probes straight from a scene and its labels (``classify fit --scenes ... --labels polygons.gpkg``): tiles
are labelled by the pixels polygons or a label raster put in them (counted here again with rasterio and loops),
held out in whole blocks, embedded exactly as ``classify map`` and ``embed --chips`` embed the same pixels, and the
probe is the same file a chip probe is.

The scene is ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0, nodata 0 in its collar); its 16-px tiles
are labelled ``bright`` or ``dark`` by their mean brightness (``tests/brightness_chips.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from PIL import Image
from rasterio.features import rasterize

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.chip_classification import ChipClassifier
from dinov3_eo.tasks.chip_embeddings import chip_features, embed_chips_with, load_chip_backbone
from dinov3_eo.tasks.chip_finetune import dataset_probabilities
from dinov3_eo.tasks.tile_classification import TileTensorDataset, classify_tiles, embed_tiles, probe_tile_size, tile_name
from dinov3_eo.tasks.tile_labels import NoLabelledTiles, TileLabels, label_tiles, spatial_block_split
from dinov3_eo.tasks.tile_probe import fit_tile_classifier, score_tile_classifier

from brightness_chips import SCENE, brightness_folders, micro_export, scene_cuts


def _tile_box(transform, row: int, col: int, size: int = 16):
    x0, y0 = transform @ (col * size, row * size)
    x1, y1 = transform @ ((col + 1) * size, (row + 1) * size)
    return shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Polygons naming each whole 16-px tile of the scene ``bright`` or ``dark`` (tiles.gpkg), the same as PNG
    chips in class folders, and the micro ViT export."""
    root = tmp_path_factory.mktemp("tile_probe")
    cuts = scene_cuts()
    middle = float(np.median([cut.mean() for cut in cuts.values()]))
    with rasterio.open(SCENE) as src:
        transform, crs = src.transform, src.crs
    truth = {(r // 16, c // 16): "bright" if cut.mean() > middle else "dark" for (r, c), cut in cuts.items()}
    frame = gpd.GeoDataFrame({"name": list(truth.values())}, crs=crs,
                             geometry=[_tile_box(transform, r, c) for r, c in truth])  # fmt: skip
    frame.to_file(root / "tiles.gpkg")
    return {"root": root, "polygons": root / "tiles.gpkg", "truth": truth, "chips": brightness_folders(root / "chips"),
            "backbone": micro_export(root), "transform": transform, "crs": crs}  # fmt: skip


def test_label_tiles_counts_each_class_s_pixels_as_rasterio_burns_them(tmp_path: Path) -> None:
    with rasterio.open(SCENE) as src:
        transform, crs, shape = src.transform, src.crs, (src.height, src.width)
    # three irregular polygons (one overlapping the scene's right edge), handed over in lon/lat
    x0, y0 = transform @ (0, 0)
    res = transform.a
    polygons = [shapely.Polygon([(x0 + 5 * res, y0 - 7 * res), (x0 + 90 * res, y0 - 20 * res), (x0 + 40 * res, y0 - 120 * res)]),
                shapely.Point(x0 + 150 * res, y0 - 150 * res).buffer(45 * res),
                shapely.box(x0 + 200 * res, y0 - 60 * res, x0 + 300 * res, y0 - 10 * res)]  # fmt: skip
    frame = gpd.GeoDataFrame({"name": ["water", "forest", "crop"]}, geometry=polygons, crs=crs)
    frame.to_crs("EPSG:4326").to_file(tmp_path / "polygons.geojson")
    tiles = label_tiles(SCENE, tmp_path / "polygons.geojson", tile_size=16, min_labelled=0.01)
    # the same polygons burnt here in the scene's CRS (ids by sorted name), and counted tile by tile in a loop
    back = gpd.read_file(tmp_path / "polygons.geojson").to_crs(crs)
    ids = {"crop": 0, "forest": 1, "water": 2}
    burnt = rasterize([(g, ids[n]) for g, n in zip(back.geometry, back["name"])], out_shape=shape, transform=transform,
                      fill=-1, dtype="int32")  # fmt: skip
    expected = {}
    for r in range(0, shape[0], 16):
        for c in range(0, shape[1], 16):
            cut = burnt[r : r + 16, c : c + 16]
            counts = np.bincount(cut[cut >= 0], minlength=3)
            if counts.sum() >= 0.01 * 256:
                expected[(r // 16, c // 16)] = counts
    assert tiles.classes == ["crop", "forest", "water"] and tiles.tile_size == 16 and tiles.crs == crs
    assert tiles.cells == sorted(expected) and len(tiles) > 30
    np.testing.assert_array_equal(tiles.counts, np.stack([expected[cell] for cell in tiles.cells]))
    np.testing.assert_allclose(tiles.labelled, tiles.counts.sum(axis=1) / 256)
    # a strip at a time gives the same counts; min_labelled keeps the tiles with enough labelled pixels
    strips = label_tiles(SCENE, tmp_path / "polygons.geojson", tile_size=16, min_labelled=0.01, strip_pixels=3000)
    assert strips.cells == tiles.cells and np.array_equal(strips.counts, tiles.counts)
    half = label_tiles(SCENE, tmp_path / "polygons.geojson", tile_size=16, min_labelled=0.5)
    assert half.cells == [cell for cell, n in zip(tiles.cells, tiles.counts.sum(1)) if n >= 128]

    # a label raster on another grid (60 m, the scene's at 30 m... warped nearest), untagged ids 10 and 20
    coarse = np.where(burnt[::2, ::2] >= 1, 10 + 10 * (burnt[::2, ::2] == 2), 0).astype(np.uint8)
    profile = dict(driver="GTiff", width=coarse.shape[1], height=coarse.shape[0], count=1, dtype="uint8", crs=crs,
                   transform=transform @ rasterio.Affine.scale(2), nodata=0)  # fmt: skip
    with rasterio.open(tmp_path / "classes.tif", "w", **profile) as dst:
        dst.write(coarse, 1)
    raster = label_tiles(SCENE, tmp_path / "classes.tif", tile_size=16, min_labelled=0.01)
    assert raster.classes == ["class 10", "class 20"]
    up = np.kron(coarse, np.ones((2, 2), np.uint8))[: shape[0], : shape[1]]
    for cell, counts in zip(raster.cells, raster.counts):
        cut = up[cell[0] * 16 : cell[0] * 16 + 16, cell[1] * 16 : cell[1] * 16 + 16]
        assert list(counts) == [(cut == 10).sum(), (cut == 20).sum()]
    # named by its class_names tag, or by class_names
    with rasterio.open(tmp_path / "classes.tif", "r+") as dst:
        dst.update_tags(class_names=json.dumps([f"c{i}" for i in range(21)]))
    assert label_tiles(SCENE, tmp_path / "classes.tif", tile_size=16, min_labelled=0.01).classes == ["c10", "c20"]

    far = frame.assign(geometry=frame.geometry.translate(1e6, 0))
    with pytest.raises(NoLabelledTiles, match="No pixel of scene .* is labelled by the GeoDataFrame: they do not overlap"):
        label_tiles(SCENE, far, tile_size=16)
    with pytest.raises(NoLabelledTiles, match=r"No 128-px tile of .* has 95% of its pixels labelled .* \(at most"):
        label_tiles(SCENE, frame, tile_size=128, min_labelled=0.95)


def test_majority_presence_and_spatial_blocks() -> None:
    counts = np.array([[200, 56, 0], [100, 100, 56], [0, 0, 10], [30, 0, 30]])
    tiles = TileLabels(source="s.tif", classes=["a", "b", "c"], rows=np.arange(4), cols=np.zeros(4, np.int64),
                       counts=counts, tile_size=16)  # fmt: skip
    kept, ids = tiles.majority(purity=0.6)
    assert ids.tolist() == [0, 0, 2, 0] and kept.tolist() == [True, False, True, False]  # a tie: the lower id
    assert tiles.present(0.3).tolist() == [[True, False, False], [True, True, False], [False, False, True], [True, False, True]]

    rng = np.random.default_rng(0)
    rows, cols = np.divmod(np.arange(20 * 24), 24)
    y = rng.integers(0, 3, len(rows))
    y[(rows < 4) & (cols < 4)] = 3  # a class only one block holds: never held out
    groups = (cols >= 12).astype(int)
    train, held = spatial_block_split(rows, cols, y, fraction=0.25, block=4, groups=groups, seed=1)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == len(rows)
    assert 0.25 <= len(held) / len(rows) < 0.25 + 16 / len(rows)
    block = groups * 1000 + (rows // 4) * 100 + cols // 4
    assert not set(block[train]) & set(block[held])  # whole blocks
    assert set(y[train]) == {0, 1, 2, 3} and 3 not in set(y[held])
    again = spatial_block_split(rows, cols, y, fraction=0.25, block=4, groups=groups, seed=1)
    assert np.array_equal(again[1], held)
    multi = np.eye(4, dtype=bool)[y]
    assert np.array_equal(spatial_block_split(rows, cols, multi, fraction=0.25, block=4, groups=groups, seed=1)[1], held)


def test_tiles_are_embedded_as_classify_map_and_embed_chips_embed_their_pixels(labelled: dict) -> None:
    backbone = load_chip_backbone(labelled["backbone"])
    fit = fit_tile_classifier(SCENE, labelled["polygons"], backbone, tile_size=16, size=32, progress=False)
    probe, tiles = fit.probe, fit.tiles
    assert probe.classes == ["bright", "dark"] and probe.embedding["chip_size"] == [16, 16]
    assert probe.embedding["size"] == 32 and probe.embedding["backbone_source"] == str(labelled["backbone"])
    assert probe.embedding["tiles"]["train_tiles"] + probe.embedding["tiles"]["held_out_tiles"] == 72
    assert len(tiles) == 72 and tiles.crs == labelled["crs"]
    assert {(r, c): label for r, c, label in zip(tiles["row"], tiles["col"], tiles["label"])} == labelled["truth"]
    held = tiles[tiles["split"] == "held_out"]
    assert 0.2 <= len(held) / 72 < 0.5 and set(held["label"]) == {"bright", "dark"}
    blocks = {(r // 4, c // 4) for r, c in zip(held["row"], held["col"])}
    train = tiles[tiles["split"] == "train"]
    assert not blocks & {(r // 4, c // 4) for r, c in zip(train["row"], train["col"])}
    for tile in tiles.itertuples():
        assert tile.geometry.bounds == pytest.approx(_tile_box(labelled["transform"], tile.row, tile.col).bounds)

    # the held-out tiles' scores are the map's probabilities there, and the PNG chips of their pixels' too
    cells = list(zip(held["row"], held["col"]))
    mapped = classify_tiles(SCENE, probe, backbone=backbone, min_valid=0.9, progress=False)
    expected = np.stack([mapped.probabilities[:, r, c] for r, c in cells])
    np.testing.assert_allclose(fit.held_out_scores, expected, atol=2e-5)
    assert fit.held_out_targets.tolist() == [["bright", "dark"].index(label) for label in held["label"]]
    embedded, taken = embed_tiles(SCENE, backbone, cells, tile_size=16, size=32, progress=False)
    assert taken.all() and embedded.paths == [tile_name(SCENE, r, c) for r, c in cells]
    chips = embed_chips_with(backbone, labelled["chips"], size=32, progress=False)
    as_chips = chips.take([str(next(labelled["chips"].glob(f"*/{r * 16}_{c * 16}.png"))) for r, c in cells])
    np.testing.assert_allclose(chip_features(embedded, probe.features), chip_features(as_chips, probe.features), atol=1e-5)
    np.testing.assert_allclose(probe.scores(chip_features(embedded, probe.features)), fit.held_out_scores, atol=2e-5)
    # what fine-tuning reads: the same tiles through the probe's head give the same probabilities
    dataset = TileTensorDataset([(str(SCENE), r, c) for r, c in cells], fit.targets[tiles["split"] == "held_out"],
                                tile_size=16, patch_size=16, normalization=backbone.normalization, bands=None, size=32)  # fmt: skip
    image, valid, target = dataset[0]
    assert image.shape == (3, 32, 32) and valid.shape == (2, 2) and int(target) == fit.held_out_targets[0]
    np.testing.assert_allclose(dataset_probabilities(backbone, probe, dataset, batch_size=7), fit.held_out_scores, atol=2e-5)

    # scoring: the probe on every labelled tile, as the map classifies them
    scores, targets, frame = score_tile_classifier(probe, SCENE, labelled["polygons"], backbone=backbone, progress=False)
    assert len(frame) == 72 and frame.crs == labelled["crs"]
    rows_cols = list(zip(frame["row"], frame["col"]))
    assert list(frame["name"]) == [tile_name(SCENE, r, c) for r, c in rows_cols]
    np.testing.assert_allclose(scores, np.stack([mapped.probabilities[:, r, c] for r, c in rows_cols]), atol=2e-5)
    assert targets.tolist() == [["bright", "dark"].index(labelled["truth"][cell]) for cell in rows_cols]
    assert list(frame["reference"]) == [labelled["truth"][cell] for cell in rows_cols]
    assert list(frame["predicted"]) == [probe.classes[i] for i in scores.argmax(1)]
    assert list(frame["correct"]) == list(frame["reference"] == frame["predicted"]) and frame["correct"].mean() > 0.85
    np.testing.assert_allclose(frame["p_dark"], scores[:, 1])


def test_classify_fit_and_test_on_scenes_from_the_command_line(labelled: dict, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    probe_path, out = tmp_path / "probe.safetensors", tmp_path / "fit"
    args = ["classify", "fit", "--scenes", str(SCENE), "--labels", str(labelled["polygons"]), "--model",
            str(labelled["backbone"]), "--size", "32", "-o", str(probe_path), "--quiet"]  # fmt: skip
    assert cli_main([*args, "--tile-size", "16", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "linear probe on" in printed and "16-px tiles of 2 classes (bright" in printed and "held-out tiles in blocks of 4 x 4" in printed
    assert "overall accuracy" in printed and "over" in printed and " tiles" in printed
    probe = ChipClassifier.load(probe_path)
    assert probe.held_out_accuracy is not None and probe.embedding["chip_size"] == [16, 16]
    assert json.loads((out / "metrics.json").read_text())["overall_accuracy"] == pytest.approx(probe.held_out_accuracy)
    written = gpd.read_file(out / "tiles.gpkg", layer="tiles")
    assert len(written) == 72 and set(written["split"]) == {"train", "held_out"}
    for name in ("labels", "split"):  # the tiles over the imagery: what they were taught, and which were held out
        assert str(out / f"rgb_byte_crop_tile_{name}.png") in printed
        assert Image.open(out / f"rgb_byte_crop_tile_{name}.png").size[0] > 200

    # the probe records its tiles' ground size: a scene of 2x finer pixels is cut into 32-px tiles of the same ground
    with rasterio.open(SCENE) as src:
        profile, rgb, pixel = src.profile, src.read(), src.res[0]
    assert probe.embedding["tile_m"] == pytest.approx(16 * pixel)
    profile.update(width=2 * profile["width"], height=2 * profile["height"],
                   transform=profile["transform"] @ rasterio.Affine.scale(0.5))  # fmt: skip
    with rasterio.open(tmp_path / "finer.tif", "w", **profile) as dst:
        dst.write(rgb.repeat(2, axis=1).repeat(2, axis=2))
    finer = classify_tiles(tmp_path / "finer.tif", probe, progress=False)
    coarse = classify_tiles(SCENE, probe, progress=False)
    assert finer.tile_size == 32 and probe_tile_size(probe, tmp_path / "finer.tif") == 32
    assert finer.transform == coarse.transform and np.array_equal(finer.classified, coarse.classified)
    assert (finer.class_ids() == coarse.class_ids()).mean() > 0.9  # the same ground, seen at another resolution
    lonlat = tmp_path / "lonlat.tif"
    with rasterio.open(lonlat, "w", **{**profile, "crs": "EPSG:4326", "transform": rasterio.Affine(0.01, 0, 10, 0, -0.01, 50)}) as dst:
        dst.write(rgb.repeat(2, axis=1).repeat(2, axis=2))
    assert probe_tile_size(probe, lonlat) == 16  # degrees: no ground size, the training tiles' pixels

    # classify map cuts the same tiles by default; classify test scores on polygons of held-out ground
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(probe_path), "-o", str(tmp_path / "map"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    # the held-out tiles calibrated 90 % prediction sets: the map counts each tile's classes of p >= the threshold
    assert probe.sets["coverage"] == 0.9 and probe.sets["n"] == len(written[written["split"] == "held_out"])
    assert "90 % prediction sets:" in printed and "rgb_byte_crop_tile_set_size.tif" in printed
    with rasterio.open(tmp_path / "map" / "rgb_byte_crop_tile_set_size.tif") as src:
        sizes = src.read(1)
    expected = (np.nan_to_num(coarse.probabilities, nan=-1) >= probe.sets["threshold"]).sum(axis=0)
    np.testing.assert_array_equal(sizes[coarse.classified], expected[coarse.classified])
    assert (sizes[~coarse.classified] == 255).all()
    cells = gpd.read_file(tmp_path / "map" / "rgb_byte_crop_tiles.gpkg")
    assert (cells["set_size"] == cells["set"].map(lambda v: len(v.split(";")) if v else 0)).all()
    assert cli_main(["classify", "test", "--scenes", str(SCENE), "--labels", str(labelled["polygons"]), "--probe",
                     str(probe_path), "--out-dir", str(tmp_path / "test"), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "linear probe on 72 labelled tiles of 1 scene" in printed and "where the probe errs" in printed
    assert (tmp_path / "test" / "confusion.csv").is_file()
    errors = gpd.read_file(tmp_path / "test" / "tiles.gpkg", layer="tiles")
    assert len(errors) == 72 and {"reference", "predicted", "correct", "score"} <= set(errors.columns)
    assert (tmp_path / "test" / "rgb_byte_crop_tile_errors.png").is_file()
    assert cli_main(["classify", "test", "--scenes", str(SCENE), "--labels", str(labelled["polygons"]), "--probe",
                     str(probe_path), "--out-dir", str(tmp_path / "test"), "--quiet"]) == 2  # fmt: skip
    assert "already exists" in capsys.readouterr().err  # nothing replaced without --overwrite

    # held-out polygons of their own: their tiles are held out, the others fitted
    frame = gpd.read_file(labelled["polygons"])
    frame.iloc[::4].to_file(tmp_path / "val.gpkg")
    assert cli_main([*args, "--tile-size", "16", "--val-labels", str(tmp_path / "val.gpkg"), "--overwrite"]) == 0
    assert f"{len(frame) - len(frame.iloc[::4])} 16-px tiles" in capsys.readouterr().out
    assert ChipClassifier.load(probe_path).embedding["tiles"]["held_out_tiles"] == len(frame.iloc[::4])

    # fine-tuned on the scene's tiles (LP-FT): the backbone exported beside the probe, which classify map then uses
    tuned_path = tmp_path / "tuned.safetensors"
    assert cli_main([*args[:-2], str(tuned_path), "--quiet", "--tile-size", "16", "--finetune-epochs", "1",
                     "--finetune-lr", "1e-4"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "fine-tuned 1 epochs, kept epoch" in printed and "held-out tiles:" in printed
    tuned = ChipClassifier.load(tuned_path)
    assert tuned.embedding["backbone_source"] == str((tmp_path / "tuned_backbone.pth").resolve())
    assert [row["epoch"] for row in tuned.embedding["finetune"]["history"]] == [0, 1]
    assert tuned.held_out_accuracy == max(row["held_out"] for row in tuned.embedding["finetune"]["history"])
    assert not Path(f"{tuned_path}.finetune.ckpt").exists()
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(tuned_path), "-o", str(tmp_path / "tuned_map"),
                     "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()

    # a k-NN on the same tiles, and a balanced linear probe
    for extra, method in ((["--method", "knn"], "knn"), (["--balanced"], "linear")):
        assert cli_main([*args[:-2], str(tmp_path / f"{method}.safetensors"), "--quiet", "--tile-size", "16", *extra]) == 0
        other = ChipClassifier.load(tmp_path / f"{method}.safetensors")
        assert other.method == method and other.held_out_accuracy is not None and other.balanced == ("--balanced" in extra)
    capsys.readouterr()

    # bad input: one sentence each
    for extra, message in ((["--overwrite"], "Give the tile size in scene pixels"),
                           (["--tile-size", "16", "--val", "held/", "--overwrite"], "leave out --val"),
                           (["--tile-size", "16", "--embeddings", "x.parquet", "--overwrite"], "Chip embedding table 'x.parquet' does not exist"),
                           (["--tile-size", "128", "--overwrite"], "No labelled 128-px tile of"),
                           (["--tile-size", "16", "--attribute", "kind", "--overwrite"], "no attribute 'kind'")):  # fmt: skip
        assert cli_main([*args, *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_multi_label_tile_probe_from_a_label_raster(labelled: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # a label raster of three classes by pixel brightness: tiles carry the classes on >= 10 % of their pixels
    with rasterio.open(SCENE) as src:
        rgb, profile = src.read(), src.profile
    brightness = rgb.astype(float).mean(axis=0)
    edges = np.quantile(brightness[(rgb > 0).all(axis=0)], [1 / 3, 2 / 3])
    classes = np.digitize(brightness, edges).astype(np.uint8)
    classes[~(rgb > 0).all(axis=0)] = 255
    profile.update(count=1, dtype="uint8", nodata=255)
    with rasterio.open(tmp_path / "brightness.tif", "w", **profile) as dst:
        dst.write(classes, 1)
        dst.update_tags(class_names=json.dumps(["dark", "medium", "bright"]))
    probe_path = tmp_path / "multi.safetensors"
    assert cli_main(["classify", "fit", "--scenes", str(SCENE), "--labels", str(tmp_path / "brightness.tif"),
                     "--multi-label", "--tile-size", "16", "--size", "32", "--model", str(labelled["backbone"]),
                     "-o", str(probe_path), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "multi-label linear probe on" in printed and "mAP" in printed
    probe = ChipClassifier.load(probe_path)
    assert probe.multi_label and probe.classes == ["dark", "medium", "bright"]
    scores, targets, frame = score_tile_classifier(probe, SCENE, tmp_path / "brightness.tif", progress=False)
    assert targets.dtype == bool and targets.shape == scores.shape and targets.sum(axis=1).min() >= 1
    assert frame["reference"].iloc[0] == ";".join(c for c, on in zip(probe.classes, targets[0]) if on)
    assert frame["predicted"].iloc[0] == ";".join(c for c, p in zip(probe.classes, scores[0]) if p >= probe.threshold)
    cell = (frame["row"].iloc[0], frame["col"].iloc[0])
    cut = classes[cell[0] * 16 : cell[0] * 16 + 16, cell[1] * 16 : cell[1] * 16 + 16]
    shares = np.bincount(cut[cut < 255], minlength=3) / (cut < 255).sum()
    assert targets[0].tolist() == (shares >= 0.1).tolist()


def test_several_scenes_are_fitted_together_and_one_the_labels_miss_is_skipped(labelled: dict, tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    import shutil

    second = shutil.copy(SCENE, tmp_path / "second_date.tif")  # the same ground on another date
    elsewhere = tmp_path / "elsewhere.tif"
    with rasterio.open(SCENE) as src:
        profile, pixels = src.profile, src.read()
    profile.update(transform=profile["transform"] @ rasterio.Affine.translation(100_000, 0))
    with rasterio.open(elsewhere, "w", **profile) as dst:
        dst.write(pixels)
    backbone = load_chip_backbone(labelled["backbone"])
    with caplog.at_level("WARNING"):
        fit = fit_tile_classifier([SCENE, second, elsewhere], labelled["polygons"], backbone, tile_size=16, size=32,
                                  progress=False)  # fmt: skip
    assert "elsewhere.tif" in caplog.text and "The scene is skipped" in caplog.text
    tiles = fit.tiles
    assert len(tiles) == 144 and set(tiles["scene"]) == {str(SCENE), str(second)}
    assert fit.probe.embedding["tiles"]["scenes"] == [str(SCENE), str(second), str(elsewhere)]
    # blocks of each scene are held out on their own
    for scene in (str(SCENE), str(second)):
        part = tiles[tiles["scene"] == scene]
        held = {(r // 4, c // 4) for r, c, s in zip(part["row"], part["col"], part["split"]) if s == "held_out"}
        kept = {(r // 4, c // 4) for r, c, s in zip(part["row"], part["col"], part["split"]) if s == "train"}
        assert not held & kept
    with pytest.raises(NoLabelledTiles, match="No pixel of scene"):
        fit_tile_classifier([elsewhere], labelled["polygons"], backbone, tile_size=16, progress=False)


def test_tile_embeddings_as_geoparquet_and_probes_fitted_from_them(labelled: dict, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    from dinov3_eo.tasks.chip_embeddings import read_chip_embeddings

    table = tmp_path / "tiles.parquet"
    assert cli_main(["embed", str(SCENE), "--tiles", "16", "--size", "32", "--model", str(labelled["backbone"]), "-o",
                     str(table), "--quiet"]) == 0  # fmt: skip
    frame = gpd.read_parquet(table)  # GeoParquet: footprints with their embeddings
    assert frame.crs == labelled["crs"] and {"path", "row", "col", "cls", "patch_mean"} <= set(frame.columns)
    mapped = classify_tiles(SCENE, ChipClassifier.load(_fitted_probe(labelled, tmp_path)), progress=False)
    assert len(frame) == int(mapped.classified.sum())  # the tiles with data on half their pixels, as the map's
    for tile in frame.itertuples():
        assert tile.geometry.bounds == pytest.approx(_tile_box(labelled["transform"], tile.row, tile.col).bounds)
    embedded = read_chip_embeddings(table)
    assert embedded.metadata["tile_size"] == 16 and embedded.metadata["size"] == 32
    cells = list(zip(frame["row"], frame["col"]))
    again, _ = embed_tiles(SCENE, load_chip_backbone(labelled["backbone"]), cells, tile_size=16, size=32, progress=False)
    np.testing.assert_allclose(embedded.cls, again.cls, atol=1e-6)

    # a probe fitted from the table, without the backbone, is the probe fitted by embedding the tiles
    from_table, embedding = tmp_path / "from_table.safetensors", tmp_path / "embedding.safetensors"
    common = ["classify", "fit", "--scenes", str(SCENE), "--labels", str(labelled["polygons"]), "--quiet"]
    assert cli_main([*common, "--embeddings", str(table), "-o", str(from_table)]) == 0
    assert cli_main([*common, "--model", str(labelled["backbone"]), "--tile-size", "16", "--size", "32", "-o",
                     str(embedding)]) == 0  # fmt: skip
    a, b = ChipClassifier.load(from_table), ChipClassifier.load(embedding)
    assert a.c == b.c and a.embedding["backbone_source"] == b.embedding["backbone_source"] and a.embedding["chip_size"] == [16, 16]
    np.testing.assert_allclose(a.weight, b.weight, atol=1e-3)
    capsys.readouterr()
    assert cli_main([*common, "--embeddings", str(table), "--tile-size", "32", "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "holds 16-px tiles, not 32-px ones" in capsys.readouterr().err
    assert cli_main(["embed", str(SCENE), "--tiles", "16", "--model", str(labelled["backbone"]), "-o",
                     str(tmp_path / "tiles.npz"), "--quiet"]) == 0  # fmt: skip
    assert len(read_chip_embeddings(tmp_path / "tiles.npz")) == len(frame)

    # query by example over the tiles: a chip of one tile's pixels finds that tile first, on a map
    r, c = sorted(labelled["truth"])[len(labelled["truth"]) // 2]  # a tile with data throughout, cut as a PNG chip
    example = next(labelled["chips"].glob(f"*/{r * 16}_{c * 16}.png"))
    matches = tmp_path / "matches.gpkg"
    # (the patch mean: a random ViT's CLS token barely looks at its input)
    assert cli_main(["similar", str(example), "--chips", "--table", str(table), "--model", str(labelled["backbone"]),
                     "-o", str(matches), "-k", "5", "--features", "patch_mean"]) == 0  # fmt: skip
    found = gpd.read_file(matches, layer="matches")
    assert list(found["rank"]) == [1, 2, 3, 4, 5] and found["similarity"].is_monotonic_decreasing
    assert found["path"].iloc[0] == tile_name(SCENE, r, c) and found["similarity"].iloc[0] > 0.999
    assert found.crs == labelled["crs"]
    assert found.geometry.iloc[0].bounds == pytest.approx(_tile_box(labelled["transform"], r, c).bounds)


def _fitted_probe(labelled: dict, tmp_path: Path) -> Path:
    probe = tmp_path / "probe.safetensors"
    fit = fit_tile_classifier(SCENE, labelled["polygons"], load_chip_backbone(labelled["backbone"]), tile_size=16,
                              size=32, progress=False)  # fmt: skip
    fit.probe.save(probe)
    return probe
