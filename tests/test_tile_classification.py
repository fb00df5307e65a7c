"""A chip probe over a georeferenced scene, tile by tile (``dinov3-eo classify map``): each tile's probabilities are
those ``classify predict`` gives a chip file of the same pixels, the tiles sit where rasterio puts their windows, and
the class raster, GeoPackage and xarray agree with each other.

The scene is ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0, nodata 0 in its collar); the probe's chips
are 16 x 16 PNG cuts of it, ``dark`` and ``bright`` by their mean brightness.
"""

from __future__ import annotations

import csv
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine
from rasterio.windows import bounds as window_bounds

from dinov3_eo.cli import main as cli_main
from dinov3_eo.inference.writers import coarse_grid_factor, write_cog, write_quicklook
from dinov3_eo.tasks.chip_classification import ChipClassifier, typical_chip_ground, typical_chip_size
from dinov3_eo.tasks.tile_classification import (
    TILE_NODATA,
    classify_tiles,
    tile_grid_shape,
    tile_window,
    write_tile_classes,
)

from brightness_chips import SCENE, brightness_folders, micro_export


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A probe fitted with ``classify fit`` on the scene's 16-px brightness chips (tiles of the grid); returns the
    probe, the chips' folder and the backbone."""
    root = tmp_path_factory.mktemp("tiles")
    chips, pth = brightness_folders(root / "chips"), micro_export(root)
    probe = root / "probe.safetensors"
    assert cli_main(["classify", "fit", str(chips), "-o", str(probe), "--model", str(pth), "--size", "32",
                     "--quiet"]) == 0  # fmt: skip
    return {"probe": probe, "chips": chips, "backbone": pth}


def test_tiles_are_the_chips_of_their_pixels_and_sit_where_rasterio_puts_them(fitted: dict[str, Path],
                                                                              tmp_path: Path) -> None:  # fmt: skip
    probe = ChipClassifier.load(fitted["probe"])
    assert probe.embedding["chip_size"] == [16, 16]  # the default tile size
    result = classify_tiles(SCENE, probe, progress=False)
    with rasterio.open(SCENE) as src:
        rgb, transform, crs, shape = src.read(), src.transform, src.crs, (src.height, src.width)
    rows, cols = tile_grid_shape(*shape, 16)
    assert (rows, cols) == (15, 16) and result.probabilities.shape == (2, 15, 16)
    assert result.transform == transform @ Affine.scale(16) and result.crs == crs

    # each tile's share of pixels with data, counted here from the pixels (nodata 0 in any band; past the edge: none)
    padded = np.zeros((3, rows * 16, cols * 16), rgb.dtype)
    padded[:, : shape[0], : shape[1]] = rgb
    valid = (padded != 0).all(axis=0).reshape(rows, 16, cols, 16).mean(axis=(1, 3))
    np.testing.assert_allclose(result.valid_fraction, valid, atol=1e-6)
    assert np.array_equal(result.classified, valid >= 0.5) and 0 < result.classified.sum() < rows * cols
    np.testing.assert_allclose(np.nansum(result.probabilities, axis=0)[result.classified], 1.0, atol=1e-5)

    # classify predict on the PNG chips of the same pixels gives the same probabilities
    predictions = tmp_path / "chips.csv"
    assert cli_main(["classify", "predict", str(fitted["chips"]), "--probe", str(fitted["probe"]), "-o",
                     str(predictions), "--quiet"]) == 0  # fmt: skip
    compared = 0
    for row in csv.DictReader(predictions.open()):
        r, c = (int(v) // 16 for v in Path(row["path"]).stem.split("_"))
        np.testing.assert_allclose(result.probabilities[:, r, c], [float(row["p_bright"]), float(row["p_dark"])], atol=2e-5)
        compared += 1
    assert compared == 72
    # and with test-time augmentation, both ways
    flipped = classify_tiles(SCENE, probe, tta="flips", progress=False)
    assert cli_main(["classify", "predict", str(fitted["chips"]), "--probe", str(fitted["probe"]), "-o",
                     str(tmp_path / "tta.csv"), "--tta", "flips", "--quiet"]) == 0  # fmt: skip
    for row in csv.DictReader((tmp_path / "tta.csv").open()):
        r, c = (int(v) // 16 for v in Path(row["path"]).stem.split("_"))
        np.testing.assert_allclose(flipped.probabilities[:, r, c], [float(row["p_bright"]), float(row["p_dark"])], atol=2e-5)
    assert not np.allclose(flipped.probabilities[:, result.classified], result.probabilities[:, result.classified])

    frame = result.to_geodataframe()
    assert len(frame) == result.classified.sum() and frame.crs == crs
    assert list(frame.columns[:6]) == ["row", "col", "class_id", "class_name", "score", "valid_fraction"]
    for tile in frame.itertuples():
        assert tile.geometry.bounds == pytest.approx(window_bounds(tile_window(tile.row, tile.col, 16), transform))
        assert tile.class_id == int(np.nanargmax(result.probabilities[:, tile.row, tile.col]))
        assert tile.score == pytest.approx(max(tile.p_bright, tile.p_dark))
    ids = result.class_ids()
    assert ids.dtype == np.uint8 and (ids[~result.classified] == TILE_NODATA).all()

    grid = result.to_xarray()
    assert grid.rio.transform() == result.transform and grid.rio.crs == crs
    assert grid["class_id"].shape == (15, 16) and list(grid["class"].values) == ["bright", "dark"]
    centre = transform @ (16 * 3 + 8, 16 * 2 + 8)
    assert float(grid.x[3]) == pytest.approx(centre[0]) and float(grid.y[2]) == pytest.approx(centre[1])
    assert np.array_equal(grid["class_id"].values, ids)

    # below min_score a tile is "unknown", an extra class, in the ids, the frame and the written map
    unsure = classify_tiles(SCENE, probe, min_score=0.9, progress=False)
    low = result.classified & (np.nanmax(result.probabilities, axis=0) < 0.9)
    assert 0 < low.sum() < result.classified.sum() and unsure.class_names == ["bright", "dark", "unknown"]
    assert (unsure.class_ids()[low] == 2).all() and np.array_equal(unsure.class_ids()[~low], ids[~low])
    frame = unsure.to_geodataframe()
    assert (frame["class_name"] == "unknown").sum() == low.sum() and (frame.loc[frame["class_id"] == 2, "score"] < 0.9).all()
    with rasterio.open(write_tile_classes(unsure, tmp_path / "unsure").classes) as src:
        assert src.tags()["class_names"] == '["bright", "dark", "unknown"]' and (src.read(1) == 2).sum() == low.sum()
    strict = classify_tiles(SCENE, probe, tile_size=32, min_valid=1.0, progress=False)
    assert strict.probabilities.shape == (2, 8, 8) and np.array_equal(strict.classified, strict.valid_fraction == 1.0)


def test_a_smaller_stride_classifies_each_cell_by_the_tile_centred_on_it(fitted: dict[str, Path], tmp_path: Path) -> None:
    from dinov3_eo.tasks.chip_embeddings import chip_features, embed_chips_with, load_chip_backbone

    probe = ChipClassifier.load(fitted["probe"])
    result = classify_tiles(SCENE, probe, stride=8, progress=False)
    with rasterio.open(SCENE) as src:
        rgb, transform = src.read(), src.transform
    assert result.probabilities.shape == (2, 29, 32) and result.transform == transform @ Affine.scale(8)
    assert tile_window(3, 5, 16, 8) == rasterio.windows.Window(36, 20, 16, 16)  # 4 px above and left of the cell
    # a PNG chip of each of some cells' centred 16-px windows, classified as chips: the same probabilities
    cells = [(r, c) for r in range(1, 28, 3) for c in range(1, 31, 3)
             if (rgb[:, r * 8 - 4 : r * 8 + 12, c * 8 - 4 : c * 8 + 12] > 0).all()]  # fmt: skip
    assert len(cells) > 20
    for r, c in cells:
        cut = rgb[:, r * 8 - 4 : r * 8 + 12, c * 8 - 4 : c * 8 + 12].transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(cut)).save(tmp_path / f"cell_{r:02d}_{c:02d}.png")
    backbone = load_chip_backbone(fitted["backbone"])
    chips = embed_chips_with(backbone, tmp_path, size=probe.embedding["size"], progress=False)
    expected = probe.scores(chip_features(chips, probe.features))
    got = np.stack([result.probabilities[:, r, c] for r, c in sorted(cells)])
    np.testing.assert_allclose(got, expected, atol=2e-5)
    frame = result.to_geodataframe()  # cells, not the overlapping tiles: they cover the scene without overlap
    assert frame.geometry.area.round(3).nunique() == 1 and frame.geometry.area.iloc[0] == pytest.approx(64 * abs(transform.a * transform.e))
    with pytest.raises(ValueError, match="stride must lie between 1 and the tile size"):
        classify_tiles(SCENE, probe, stride=17, progress=False)


def test_prefetched_tiles_give_the_same_map_and_a_read_error_reaches_the_caller(fitted: dict[str, Path],
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import dinov3_eo.tasks.tile_classification as tiles

    probe = ChipClassifier.load(fitted["probe"])
    ahead = classify_tiles(SCENE, probe, prefetch=2, batch_size=7, progress=False)
    in_turn = classify_tiles(SCENE, probe, prefetch=0, batch_size=7, progress=False)
    assert np.array_equal(ahead.probabilities, in_turn.probabilities, equal_nan=True)
    assert np.array_equal(ahead.valid_fraction, in_turn.valid_fraction)
    read = tiles._read_tiles

    def corrupt_after_ten(*args):
        for i, tile in enumerate(read(*args)):
            if i == 10:
                raise ValueError("scene.tif: the window at row 0, col 160 could not be decoded")
            yield tile

    monkeypatch.setattr(tiles, "_read_tiles", corrupt_after_ten)
    for prefetch in (2, 0):  # from the background thread as from the caller's: the reader's own error, as it is
        with pytest.raises(ValueError, match="could not be decoded"):
            classify_tiles(SCENE, probe, prefetch=prefetch, progress=False)


def test_classify_map_from_the_command_line(fitted: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    args = ["classify", "map", str(SCENE), "--probe", str(fitted["probe"]), "-o", str(out), "--quiet"]
    assert cli_main([*args, "--probabilities", "--suggest", "5"]) == 0
    printed = capsys.readouterr().out
    assert "rgb_byte_crop.tif: 104 of 240 16-px tiles classified: bright" in printed
    classes = out / "rgb_byte_crop_tile_classes.tif"
    with rasterio.open(classes) as src, rasterio.open(SCENE) as scene:
        ids = src.read(1)
        assert src.transform == scene.transform @ Affine.scale(16) and src.crs == scene.crs and src.nodata == TILE_NODATA
        assert src.tags()["class_names"] == '["bright", "dark"]' and src.colormap(1)[0][:3] != (0, 0, 0)
    with rasterio.open(out / "rgb_byte_crop_tile_probabilities.tif") as src:
        probabilities = src.read()
        assert src.descriptions == ("bright", "dark")
    assert np.array_equal(np.where(np.isnan(probabilities[0]), TILE_NODATA, probabilities.argmax(0)), ids)
    tiles = gpd.read_file(out / "rgb_byte_crop_tiles.gpkg", layer="tiles")
    assert len(tiles) == 104 and (ids[tiles["row"], tiles["col"]] == tiles["class_id"]).all()
    bright = tiles[tiles["class_name"] == "bright"]
    assert f"bright {len(bright)} ({bright.geometry.area.sum() / 1e4:,.0f} ha)" in printed  # areas of the polygons
    assert Image.open(out / "rgb_byte_crop_tile_quicklook.png").size[0] > 100
    # the tiles to label next: the five with the smallest margin between the two classes, least sure first
    suggested = gpd.read_file(out / "rgb_byte_crop_suggest.gpkg", layer="suggest")
    margins = np.sort(np.abs(tiles["p_bright"] - tiles["p_dark"]).to_numpy())
    assert list(suggested["rank"]) == [1, 2, 3, 4, 5] and suggested["margin"].is_monotonic_increasing
    np.testing.assert_allclose(suggested["margin"], np.abs(suggested["p_bright"] - suggested["p_dark"]), atol=1e-6)
    np.testing.assert_allclose(suggested["margin"], margins[:5], atol=1e-6)

    assert cli_main(args) == 2  # outputs are kept
    assert "already exists" in capsys.readouterr().err
    chip = next(fitted["chips"].rglob("*.png"))
    assert cli_main(["classify", "map", str(chip), "--probe", str(fitted["probe"]), "-o", str(tmp_path / "c")]) == 2
    assert "is not georeferenced" in capsys.readouterr().err
    assert cli_main([*args[:-3], "-o", str(tmp_path / "b"), "--bands", "1", "2"]) == 2
    assert "gives 2 bands (--bands [1, 2]) but the backbone takes 3" in capsys.readouterr().err
    with rasterio.open(SCENE) as src:
        profile = src.profile
    with rasterio.open(tmp_path / "empty.tif", "w", **profile) as dst:
        dst.write(np.zeros((3, profile["height"], profile["width"]), np.uint8))
    assert cli_main(["classify", "map", str(tmp_path / "empty.tif"), "--probe", str(fitted["probe"]), "-o",
                     str(tmp_path / "e"), "--quiet"]) == 2  # fmt: skip
    assert "No tile of" in (err := capsys.readouterr().err) and "holds data on at least 50% of its pixels (nodata 0.0)" in err
    assert not list((tmp_path / "e").glob("*"))  # nothing written
    assert cli_main([*args[:-3], "-o", str(tmp_path / "m"), "--min-valid", "0"]) == 2
    assert "min_valid must lie in (0, 1]" in capsys.readouterr().err
    old = ChipClassifier.load(fitted["probe"])
    old.embedding.pop("chip_size")  # a probe fitted before the chip size was recorded
    old.save(tmp_path / "old.safetensors")
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(tmp_path / "old.safetensors"), "-o", str(tmp_path / "o")]) == 2
    assert "give the tile size in scene pixels (--tile-size)" in capsys.readouterr().err
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(tmp_path / "old.safetensors"), "-o", str(tmp_path / "o"),
                     "--tile-size", "40", "--quiet"]) == 0  # fmt: skip
    with rasterio.open(tmp_path / "o" / "rgb_byte_crop_tile_classes.tif") as src:
        assert (src.height, src.width) == (6, 7)  # ceil(230 / 40), ceil(250 / 40)


def test_tile_maps_of_two_dates_give_the_transitions_between_them(fitted: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """A tile map is a class map like any other: two dates' maps give the from -> to transitions (segment change),
    here a later date whose top half was brightened."""
    import json

    with rasterio.open(SCENE) as src:
        profile, rgb = src.profile, src.read()
    later = rgb.copy()
    later[:, :112] = np.where(rgb[:, :112] > 0, np.clip(rgb[:, :112].astype(int) + 60, 1, 255), 0).astype(np.uint8)
    with rasterio.open(tmp_path / "later.tif", "w", **profile) as dst:
        dst.write(later)
    out = tmp_path / "maps"
    assert cli_main(["classify", "map", str(SCENE), str(tmp_path / "later.tif"), "--probe", str(fitted["probe"]),
                     "-o", str(out), "--quiet"]) == 0  # fmt: skip
    assert cli_main(["segment", "change", str(out / "rgb_byte_crop_tile_classes.tif"), str(out / "later_tile_classes.tif"),
                     "--out-dir", str(tmp_path / "change")]) == 0  # fmt: skip
    capsys.readouterr()
    report = json.loads((tmp_path / "change" / "transitions.json").read_text())
    with rasterio.open(out / "rgb_byte_crop_tile_classes.tif") as a, rasterio.open(out / "later_tile_classes.tif") as b:
        before, after, transform = a.read(1), b.read(1), a.transform
    both = (before != TILE_NODATA) & (after != TILE_NODATA)
    darkened = int((both & (before == 1) & (after == 0)).sum())  # dark -> bright tiles, counted here
    assert darkened > 0 and (before[7:][both[7:]] == after[7:][both[7:]]).all()  # the bottom half is unchanged
    moved = {(t["from"], t["to"]): t["area"] for t in report["transitions"]}
    assert moved[("dark", "bright")] == pytest.approx(darkened * abs(transform.a * transform.e) / 1e4)


def test_predictions_of_georeferenced_chips_on_a_map(fitted: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """GeoTIFF chips of the scene (one of them warped to EPSG:4326): ``classify predict -o x.gpkg`` puts each chip's
    prediction on its footprint, in the first chip's CRS; a chip without a georeference is refused."""
    from rasterio.warp import calculate_default_transform, reproject

    chips = tmp_path / "chips"
    chips.mkdir()
    windows = {(r, c): rasterio.windows.Window(c * 16, r * 16, 16, 16) for r, c in ((5, 5), (5, 6), (8, 9))}
    with rasterio.open(SCENE) as src:
        crs, transform = src.crs, src.transform
        profile = {"driver": "GTiff", "width": 16, "height": 16, "count": 3, "dtype": "uint8", "crs": crs, "nodata": 0}
        for (r, c), window in windows.items():
            with rasterio.open(chips / f"a_{r}_{c}.tif", "w", **profile, transform=src.window_transform(window)) as dst:
                dst.write(src.read(window=window))
        window = windows[(8, 9)]
        to_4326, width, height = calculate_default_transform(crs, "EPSG:4326", 16, 16, *rasterio.windows.bounds(window, transform))
        warped = profile | {"crs": "EPSG:4326", "width": width, "height": height}
        with rasterio.open(chips / "b_warped.tif", "w", **warped, transform=to_4326) as dst:
            for band in (1, 2, 3):
                reproject(src.read(band, window=window), rasterio.band(dst, band), src_transform=src.window_transform(window),
                          src_crs=crs, dst_transform=to_4326, dst_crs="EPSG:4326")  # fmt: skip
    out = tmp_path / "p.gpkg"
    assert cli_main(["classify", "predict", str(chips), "--probe", str(fitted["probe"]), "-o", str(out), "--quiet"]) == 0
    frame = gpd.read_file(out)
    assert frame.crs == crs and list(frame.columns[:3]) == ["path", "class", "score"] and len(frame) == 4
    by_name = {Path(p).stem: g for p, g in zip(frame["path"], frame.geometry)}
    for (r, c), window in windows.items():
        assert by_name[f"a_{r}_{c}"].bounds == pytest.approx(rasterio.windows.bounds(window, transform))
    original = by_name["a_8_9"]
    assert by_name["b_warped"].intersection(original).area / original.area > 0.9  # back in the scene's CRS
    assert cli_main(["classify", "predict", str(fitted["chips"]), "--probe", str(fitted["probe"]), "-o",
                     str(tmp_path / "png.geojson"), "--quiet"]) == 2  # fmt: skip
    assert "is not georeferenced, so its prediction has no place on a map" in capsys.readouterr().err


def test_typical_chip_size_and_tile_grid_factor(tmp_path: Path) -> None:
    assert typical_chip_size(np.array([[64, 64], [64, 64], [32, 48]])) == [64, 64]
    # the chips' ground size: from georeferenced chips in metres only
    with rasterio.open(SCENE) as src:
        profile, rgb = src.profile, src.read()
    for k in range(3):
        window = rasterio.windows.Window(16 * k, 64, 16, 16)
        with rasterio.open(tmp_path / f"geo_{k}.tif", "w", **{**profile, "width": 16, "height": 16, "tiled": False,
                           "blockxsize": None, "blockysize": None, "transform": rasterio.windows.transform(window, profile["transform"])}) as dst:  # fmt: skip
            dst.write(rgb[:, 64:80, 16 * k : 16 * k + 16])
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "plain.png")
    geo = sorted(str(p) for p in tmp_path.glob("geo_*.tif"))
    assert typical_chip_ground(geo, 16) == pytest.approx(16 * profile["transform"].a)
    assert typical_chip_ground([*geo, str(tmp_path / "plain.png")], 16) is None
    assert typical_chip_ground([str(tmp_path / "gone.tif")], 16) is None
    assert typical_chip_size(np.array([[32, 32], [16, 16]])) == [16, 16]  # the smallest on a tie
    t = Affine(30.0, 0.0, 500000.0, 0.0, -30.0, 4000000.0)
    assert coarse_grid_factor((100, 90, t), (7, 6, t @ Affine.scale(16))) == 16
    assert coarse_grid_factor((100, 90, t), (100, 90, t)) == 1
    assert coarse_grid_factor((100, 90, t), (8, 6, t @ Affine.scale(16))) is None  # a row more than covers the scene
    assert coarse_grid_factor((100, 90, t), (7, 6, Affine.translation(30, 0) @ t @ Affine.scale(16))) is None  # shifted
    assert coarse_grid_factor((100, 90, t), (7, 6, t @ Affine.scale(15.5))) is None

    # a quick-look of a tile map over its scene; a map on another grid is refused in one sentence
    with rasterio.open(SCENE) as src:
        crs, transform = src.crs, src.transform
    ids = np.arange(15 * 16, dtype=np.uint8).reshape(15, 16) % 3
    write_cog(tmp_path / "tiles.tif", ids, crs=crs, transform=transform @ Affine.scale(16), nodata=255, class_names=["a", "b", "c"])
    write_quicklook(tmp_path / "q.png", classes=tmp_path / "tiles.tif", image=SCENE, max_size=230)
    picture = np.asarray(Image.open(tmp_path / "q.png"))
    assert picture.ndim == 3 and picture.shape[0] > 150
    write_cog(tmp_path / "off.tif", ids, crs=crs, transform=transform @ Affine.scale(17), nodata=255)
    with pytest.raises(ValueError, match="not on the grid of class map"):
        write_quicklook(tmp_path / "r.png", classes=tmp_path / "off.tif", image=SCENE)


def test_least_confident_tiles_single_and_multi_label() -> None:
    from dinov3_eo.tasks.tile_classification import TileClasses

    p = np.array([[[0.9, 0.55], [0.3, np.nan]], [[0.1, 0.45], [0.7, np.nan]]], np.float32)  # [2 classes, 2, 2]
    common = dict(source="s.tif", classes=["a", "b"], probabilities=p, valid_fraction=np.ones((2, 2), np.float32),
                  crs="EPSG:32633", transform=Affine(10, 0, 0, 0, -10, 100), tile_size=1)  # fmt: skip
    single = TileClasses(**common).least_confident(5)
    assert list(zip(single["row"], single["col"])) == [(0, 1), (1, 0), (0, 0)]  # margins 0.1, 0.4, 0.8
    np.testing.assert_allclose(single["margin"], [0.1, 0.4, 0.8], atol=1e-6)
    multi = TileClasses(**common, multi_label=True, threshold=0.5).least_confident(2)
    assert list(zip(multi["row"], multi["col"])) == [(0, 1), (1, 0)]  # |p - 0.5|: 0.05, 0.2 (0.4 for (0, 0))
