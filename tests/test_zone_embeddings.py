"""One embedding per polygon (``embed --zones``): the area-weighted mean of the patch features under it."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from micro_backbone import micro_backbone_file

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.features import input_normalization, resolve_backbone, write_features
from dinov3_eo.tasks.zone_embeddings import read_zone_embeddings, write_zone_embeddings, zone_embeddings

CROP = Path(__file__).resolve().parent / "data" / "rgb_byte_crop.tif"  # 250 x 230 Landsat RGB at 300 m, nodata 0 (CC0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("zones")
    pth = micro_backbone_file(folder, seed=0)
    backbone = resolve_backbone(pth)
    norm = input_normalization(backbone.meta, None)
    features = write_features(backbone, CROP, folder / "feats.tif", normalization=norm, window=96, progress=False)
    with rasterio.open(features) as src:
        grid, transform, crs = src.read(), src.transform, src.crs
    return {"pth": pth, "backbone": backbone, "norm": norm, "grid": grid, "transform": transform, "crs": crs,
            "folder": folder}  # fmt: skip


def reference_mean(zone: shapely.Geometry, grid: np.ndarray, transform) -> tuple[np.ndarray, float]:
    """The area-weighted mean of the feature raster's cells under ``zone``, cell by cell, and the area with features."""
    total, area = np.zeros(grid.shape[0]), 0.0
    for r in range(grid.shape[1]):
        for c in range(grid.shape[2]):
            (x0, y0), (x1, y1) = transform @ (c, r), transform @ (c + 1, r + 1)
            a = zone.intersection(shapely.box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))).area
            if a > 0 and np.isfinite(grid[0, r, c]):
                total += a * grid[:, r, c]
                area += a
    return total / area if area else np.full(grid.shape[0], np.nan), area


def test_each_zone_is_the_area_weighted_mean_of_its_patches(setup: dict) -> None:
    t, grid = setup["transform"], setup["grid"]
    cell = abs(t.a)
    x0, y0 = t @ (11, 2)  # the scene's data lie east of a nodata collar: cells from column 8 on at row 5
    zones = gpd.GeoDataFrame({"name": ["one patch", "a disc", "small", "half on nodata", "off the map"]}, geometry=[
        shapely.box(x0, y0 - cell, x0 + cell, y0),                         # exactly the cell at row 2, col 11
        shapely.Point(x0 + 0.5 * cell, y0 - 4.5 * cell).buffer(0.8 * cell),  # a disc over several cells
        shapely.box(x0 + 0.1 * cell, y0 - 0.3 * cell, x0 + 0.2 * cell, y0 - 0.2 * cell),  # inside one cell
        shapely.box(t.c + 7.5 * cell, t.f - 6 * cell, t.c + 8.5 * cell, t.f - 5 * cell),  # half over the collar
        shapely.box(t.c - 9 * cell, t.f, t.c - 8 * cell, t.f + cell),
    ], crs=setup["crs"])  # fmt: skip
    table = zone_embeddings(setup["backbone"], CROP, zones, normalization=setup["norm"], window=96, progress=False)
    assert list(table["name"]) == list(zones["name"])
    # zones in another CRS are brought onto the raster's (and keep theirs): the same means, but for the reprojection
    degrees = zone_embeddings(setup["backbone"], CROP, zones.to_crs("EPSG:4326"), normalization=setup["norm"],
                              window=96, progress=False)  # fmt: skip
    assert degrees.crs.to_epsg() == 4326
    np.testing.assert_allclose(np.stack(degrees["patch_mean"][:4]), np.stack(table["patch_mean"][:4]), atol=1e-3)
    assert np.isfinite(grid[:, 2, 11]).all() and np.isnan(grid[:, 5, 7]).all() and np.isfinite(grid[:, 5, 8]).all()
    np.testing.assert_allclose(table["patch_mean"][0], grid[:, 2, 11], rtol=1e-5, atol=1e-6)
    assert table["patches"][0] == 1 and table["coverage"][0] == pytest.approx(1.0, abs=1e-6)
    for k in (1, 2, 3):
        expected, area = reference_mean(zones.geometry[k], grid, t)
        np.testing.assert_allclose(table["patch_mean"][k], expected, rtol=1e-4, atol=1e-5)
        assert table["coverage"][k] == pytest.approx(area / zones.geometry[k].area, abs=1e-6)
    assert table["coverage"][3] == pytest.approx(0.5, abs=1e-6)  # the half on the collar has no features
    np.testing.assert_allclose(table["patch_mean"][3], grid[:, 5, 8], atol=1e-3)  # (a float sliver of row 4)
    assert np.isnan(table["patch_mean"][4]).all() and table["coverage"][4] == 0 and table["patches"][4] == 0
    # GeoParquet round trip
    path = write_zone_embeddings(table, setup["folder"] / "z.parquet")
    back, x = read_zone_embeddings(path)
    assert x.shape == (5, 96) and list(back["name"]) == list(zones["name"])
    np.testing.assert_array_equal(x[:4], np.stack(table["patch_mean"][:4]))
    with pytest.raises(FileExistsError):
        write_zone_embeddings(table, path)
    with pytest.raises(ValueError, match="GeoParquet"):
        write_zone_embeddings(table, setup["folder"] / "z.gpkg")


def test_only_the_windows_under_polygons_are_embedded(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    t, grid, backbone = setup["transform"], setup["grid"], setup["backbone"]
    cell = abs(t.a)
    embedded = []
    forward = backbone.get_intermediate_layers
    monkeypatch.setattr(backbone, "get_intermediate_layers", lambda x, **kw: embedded.append(len(x)) or forward(x, **kw))
    # 96-px windows are 6 x 6 patches: the grid's 16 x 15 patches make 3 x 3 windows; a parcel in the middle one
    zone = shapely.box(t.c + 7.2 * cell, t.f - 10.5 * cell, t.c + 9.5 * cell, t.f - 8.1 * cell)
    frame = gpd.GeoDataFrame({"name": ["middle"]}, geometry=[zone], crs=setup["crs"])
    table = zone_embeddings(backbone, CROP, frame, normalization=setup["norm"], window=96, progress=False)
    assert sum(embedded) == 1  # of the 9 windows
    expected, _ = reference_mean(zone, grid, t)  # from every window's features: the same
    np.testing.assert_allclose(table["patch_mean"][0], expected, rtol=1e-4, atol=1e-5)


def test_upsampling_reads_the_scene_on_a_finer_grid(setup: dict, tmp_path: Path) -> None:
    from rasterio.warp import Resampling, reproject

    t = setup["transform"]
    cell = abs(t.a)
    zones = gpd.GeoDataFrame({"name": ["a", "b"]}, crs=setup["crs"], geometry=[
        shapely.box(t.c + 10 * cell, t.f - 5 * cell, t.c + 12 * cell, t.f - 3 * cell),
        shapely.box(t.c + 11.2 * cell, t.f - 8.6 * cell, t.c + 11.7 * cell, t.f - 8.1 * cell)])  # fmt: skip
    # the same scene warped by hand onto a grid twice as fine: what upsample=2 reads through a WarpedVRT
    with rasterio.open(CROP) as src:
        profile = {k: v for k, v in src.profile.items() if k not in ("blockxsize", "blockysize")}
        profile.update(width=src.width * 2, height=src.height * 2, transform=src.transform @ src.transform.scale(0.5))
        with rasterio.open(tmp_path / "fine.tif", "w", **profile) as fine:
            for b in range(1, src.count + 1):
                reproject(rasterio.band(src, b), rasterio.band(fine, b), resampling=Resampling.bilinear,
                          src_nodata=0, dst_nodata=0)  # fmt: skip
    run = {"normalization": setup["norm"], "window": 96, "progress": False}
    twice = zone_embeddings(setup["backbone"], CROP, zones, upsample=2, **run)
    by_hand = zone_embeddings(setup["backbone"], tmp_path / "fine.tif", zones, **run)
    once = zone_embeddings(setup["backbone"], CROP, zones, **run)
    np.testing.assert_allclose(np.stack(twice["patch_mean"]), np.stack(by_hand["patch_mean"]), atol=1e-4)
    assert list(twice["patches"]) == list(by_hand["patches"]) and twice["patches"][0] > 2 * once["patches"][0]
    assert twice.attrs["dinov3_eo"]["upsample"] == 2
    with pytest.raises(ValueError, match="upsample must be a whole factor"):
        zone_embeddings(setup["backbone"], CROP, zones, upsample=0, **run)


def test_embed_zones_from_the_command_line(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    t = setup["transform"]
    cell = abs(t.a)
    zones = gpd.GeoDataFrame({"crop": ["a", "b"]}, crs=setup["crs"], geometry=[
        shapely.box(t.c + 10 * cell, t.f - 5 * cell, t.c + 13 * cell, t.f - 2 * cell),
        shapely.box(t.c + 12 * cell, t.f - 9 * cell, t.c + 13.5 * cell, t.f - 7 * cell)])  # fmt: skip
    zones.to_file(tmp_path / "parcels.gpkg")
    out = tmp_path / "parcels.parquet"
    assert cli_main(["embed", str(CROP), "--model", str(setup["pth"]), "--zones", str(tmp_path / "parcels.gpkg"),
                     "-o", str(out), "--window", "96", "--quiet"]) == 0  # fmt: skip
    assert "2 polygons embedded (2 with features" in capsys.readouterr().out
    table, x = read_zone_embeddings(out)
    assert list(table["crop"]) == ["a", "b"] and x.shape == (2, 96)
    np.testing.assert_allclose(x[0], setup["grid"][:, 2:5, 10:13].reshape(96, -1).mean(axis=1), atol=1e-4)
    assert cli_main(["embed", str(CROP), "--model", str(setup["pth"]), "--zones", str(tmp_path / "parcels.gpkg"),
                     "-o", str(tmp_path / "p.tif"), "--quiet"]) == 2  # fmt: skip
    assert "GeoParquet" in capsys.readouterr().err
    no_crs = gpd.GeoDataFrame(geometry=[shapely.box(0, 0, 1, 1)])
    with pytest.raises(ValueError, match="no CRS"):
        zone_embeddings(setup["backbone"], CROP, no_crs, progress=False)


SCENE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = SCENE.with_name("landsat8_224078_polygons.gpkg")  # water, crop, tree, developed (~15 ha each)


def parcels_of(polygons: gpd.GeoDataFrame, pieces: int) -> gpd.GeoDataFrame:
    """Each polygon cut into ``pieces`` strips west to east, with its class in ``label`` on all but the last strip."""
    rows = []
    for name, shape in zip(polygons["name"], polygons.geometry):
        x0, y0, x1, y1 = shape.bounds
        edges = np.linspace(x0, x1, pieces + 1)
        for k, (a, b) in enumerate(zip(edges, edges[1:])):
            rows.append({"truth": name, "label": name if k < pieces - 1 else None,
                         "geometry": shape & shapely.box(a, y0, b, y1)})  # fmt: skip
    return gpd.GeoDataFrame(rows, crs=polygons.crs)


def test_classify_zones_fit_test_predict(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parcels = parcels_of(gpd.read_file(POLYGONS), 6)
    off = gpd.GeoDataFrame({"truth": ["nowhere"], "label": [None]}, geometry=[shapely.box(0, 0, 10, 10)],
                           crs=parcels.crs)  # fmt: skip
    parcels = gpd.GeoDataFrame(__import__("pandas").concat([parcels, off], ignore_index=True), crs=parcels.crs)
    parcels.to_file(tmp_path / "parcels.gpkg")
    table = tmp_path / "parcels.parquet"
    assert cli_main(["embed", str(SCENE), "--model", str(setup["pth"]), "--normalization", "none", "--zones",
                     str(tmp_path / "parcels.gpkg"), "-o", str(table), "--quiet"]) == 0  # fmt: skip
    frame, x = read_zone_embeddings(table)
    assert frame.attrs["dinov3_eo"]["backbone"] == "vitmicro16" and frame.attrs["dinov3_eo"]["patch_size"] == 16
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--zones", str(table), "--label-column", "label", "--method", "knn", "-k", "1",
                     "--val-fraction", "0.25", "-o", str(probe)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "knn probe on 16 polygons of 4 classes; 4 held-out polygons" in out
    out_path = tmp_path / "predicted.gpkg"
    assert cli_main(["classify", "predict", "--zones", str(table), "--probe", str(probe), "-o", str(out_path)]) == 0
    assert "1 polygons without features" in capsys.readouterr().out
    predicted = gpd.read_file(out_path)
    assert len(predicted) == len(parcels) and "patch_mean" not in predicted.columns
    assert {"class", "score", "p_water", "p_crop"} <= set(predicted.columns)
    assert predicted["class"].iloc[-1] in ("", None) and np.isnan(predicted["score"].iloc[-1])
    unlabelled = predicted.iloc[:-1][parcels["label"].iloc[:-1].isna().to_numpy()]
    assert len(unlabelled) == 4 and set(unlabelled["class"]) <= {"water", "crop", "tree", "developed"}
    np.testing.assert_allclose(predicted[["p_crop", "p_developed", "p_tree", "p_water"]].iloc[:-1].sum(axis=1), 1.0)
    # test on every polygon, the truth as the label column (the one off the scene has no features: left out)
    assert cli_main(["classify", "test", "--zones", str(table), "--label-column", "truth", "--probe", str(probe)]) == 0
    assert "on 24 test polygons" in capsys.readouterr().out
    # a zone probe classifies no chips, and a chip table is no zone table
    assert cli_main(["classify", "predict", str(SCENE), "--probe", str(probe), "-o", str(tmp_path / "c.csv")]) == 2
    assert "fitted on polygon embeddings" in capsys.readouterr().err
    assert cli_main(["classify", "fit", "--zones", str(table), "--label-column", "crop_type", "-o",
                     str(tmp_path / "p2.safetensors")]) == 2  # fmt: skip
    assert "no column 'crop_type'" in capsys.readouterr().err
    # the same polygons embedded by another checkpoint of the same backbone (same name, other weights): refused
    (tmp_path / "other").mkdir()
    other_pth = micro_backbone_file(tmp_path / "other", seed=1)
    other = tmp_path / "other.parquet"
    assert cli_main(["embed", str(SCENE), "--model", str(other_pth), "--normalization", "none", "--zones",
                     str(tmp_path / "parcels.gpkg"), "-o", str(other), "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    assert read_zone_embeddings(other)[0].attrs["dinov3_eo"]["weights"] != frame.attrs["dinov3_eo"]["weights"]
    assert cli_main(["classify", "predict", "--zones", str(other), "--probe", str(probe), "-o", str(tmp_path / "o.csv")]) == 2
    assert "was embedded by other weights of 'vitmicro16' than the probe's polygons" in capsys.readouterr().err


def test_weights_fingerprint_tells_checkpoints_of_one_architecture_apart(setup: dict) -> None:
    import torch

    from dinov3_eo.models import build_backbone
    from dinov3_eo.tasks.zone_embeddings import same_weights, weights_fingerprint

    backbone = setup["backbone"]
    fingerprint = weights_fingerprint(backbone)
    copy = build_backbone("vitmicro16", in_chans=3)
    copy.load_state_dict(backbone.state_dict())
    assert weights_fingerprint(copy) == fingerprint and len(fingerprint) == 16
    with torch.no_grad():
        copy.norm.weight.add_(1e-3)  # the last norm: a fine-tuned checkpoint
    assert weights_fingerprint(copy) != fingerprint
    copy.load_state_dict(backbone.state_dict())
    with torch.no_grad():
        copy.cls_token.add_(1e-3)
    assert weights_fingerprint(copy) != fingerprint
    assert same_weights({"weights": "a"}, {}) and same_weights({}, {"weights": "a"}) and not same_weights({"weights": "a"}, {"weights": "b"})


def test_zone_probes_and_tables_must_match() -> None:
    from types import SimpleNamespace

    from dinov3_eo.tasks.zone_classification import check_zone_table, refuse_zone_probe

    zone_probe = SimpleNamespace(embedding={"kind": "zones", "backbone": "vitmicro16"})
    chip_probe = SimpleNamespace(embedding={"backbone": "vitmicro16"})
    table = gpd.GeoDataFrame(geometry=[])
    table.attrs["dinov3_eo"] = {"backbone": "vits16"}
    with pytest.raises(ValueError, match="embedded by 'vits16'"):
        check_zone_table(zone_probe, table, "t.parquet")
    with pytest.raises(ValueError, match="fitted on chips"):
        check_zone_table(chip_probe, table, "t.parquet")
    with pytest.raises(ValueError, match="cannot classify a scene's tiles"):
        refuse_zone_probe(zone_probe, "a scene's tiles")
    refuse_zone_probe(chip_probe, "chips")  # a chip probe passes
    table.attrs["dinov3_eo"] = {"backbone": "vitmicro16"}
    check_zone_table(zone_probe, table, "t.parquet")
    table.attrs["dinov3_eo"] = {"backbone": "vitmicro16", "upsample": 4}
    with pytest.raises(ValueError, match="embedded with --upsample 4, the probe's polygons with 1"):
        check_zone_table(zone_probe, table, "t.parquet")
