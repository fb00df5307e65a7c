"""Segmentation without training (``dinov3-eo segment prototypes``): class prototypes of DINOv3 features from the
bundled scene's land-cover polygons, checked against a whole-scene computation, and the maps they give."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.features import rasterize

import dinov3_eo.tasks.prototypes as prototypes_module
from landsat_sample import POLYGONS, SAMPLE, load_sample, micro_vit, whole_scene_pixel_features
from dinov3_eo.cli import main as cli_main
from dinov3_eo.inference.writers import default_colormap
from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.tasks.clustering import NO_CLASS_SCORE, ClusterScorer, Clusters, cluster_raster
from dinov3_eo.tasks.prototypes import fit_prototypes, pixel_tokens

NAMES = ["crop", "developed", "tree", "water"]  # the polygons' names, sorted: their class ids

backbone = pytest.fixture(scope="module", name="backbone")(micro_vit)


@pytest.fixture(scope="module")
def scene() -> dict:
    """The sample with the polygons burnt in as class ids (255 elsewhere)."""
    sample = load_sample()
    frame = gpd.read_file(POLYGONS)
    ids = rasterize([(g, NAMES.index(n)) for g, n in zip(frame.geometry, frame["name"])], out_shape=sample["shape"],
                    transform=sample["transform"], fill=255, dtype="uint8")  # fmt: skip
    return {**sample, "ids": ids}


def test_pixel_tokens_equal_bilinear_upsampling_everywhere() -> None:
    tokens = torch.randn(6, 5, 7)  # [F, h, w] of a 80 x 112 padded window
    full = F.interpolate(tokens[None], scale_factor=16, mode="bilinear", align_corners=False)[0]  # [F, 80, 112]
    top, left = 3, 5  # the unpadded window starts there
    rows, cols = torch.meshgrid(torch.arange(80 - 6), torch.arange(112 - 9), indexing="ij")
    got = pixel_tokens(tokens, rows.flatten(), cols.flatten(), top=top, left=left, patch_size=16)
    expected = full[:, top : top + 74, left : left + 103].flatten(1).T
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_grouped_scorer_takes_each_class_s_best_prototype_and_a_floor(backbone: torch.nn.Module) -> None:
    centroids = F.normalize(torch.randn(5, backbone.embed_dim), dim=1)
    tokens = F.normalize(torch.randn(2, backbone.embed_dim, 3, 4), dim=1)
    plain = ClusterScorer(backbone, centroids).patch_scores(tokens)  # [2, 5, 3, 4]
    grouped = ClusterScorer(backbone, centroids, groups=[0, 0, 2, 2, 2], num_classes=4, floor=0.1).patch_scores(tokens)
    assert grouped.shape == (2, 5, 3, 4)  # classes 0..3 and "unknown"
    torch.testing.assert_close(grouped[:, 0], plain[:, :2].amax(dim=1))
    torch.testing.assert_close(grouped[:, 2], plain[:, 2:].amax(dim=1))
    assert (grouped[:, 1] == NO_CLASS_SCORE).all() and (grouped[:, 3] == NO_CLASS_SCORE).all()  # no prototype
    assert (grouped[:, 4] == 0.1).all()


def test_prototypes_are_the_mean_features_of_the_labelled_pixels(backbone: torch.nn.Module, scene: dict) -> None:
    protos = fit_prototypes(backbone, [SAMPLE], POLYGONS, normalization=scene["normalization"], nodata=0,
                            window=1024, progress=False)  # fmt: skip
    assert protos.names == NAMES and protos.groups == [0, 1, 2, 3] and protos.kind == "prototypes"
    # independently: one forward pass over the whole scene, upsampled to every pixel
    dense = whole_scene_pixel_features(backbone, scene)  # [D, H, W]
    labelled = (scene["ids"] != 255) & scene["valid"]
    assert protos.samples == int(labelled.sum())
    for c in range(4):
        members = dense[:, torch.from_numpy((scene["ids"] == c) & scene["valid"])]  # [D, n]
        expected = F.normalize(members.sum(dim=1), dim=0)
        torch.testing.assert_close(protos.centroids[c], expected, atol=1e-4, rtol=0)
        share = float(((scene["ids"] == c) & scene["valid"]).sum() / labelled.sum())
        assert protos.shares[c] == pytest.approx(share)
    cosines = F.normalize(dense[:, torch.from_numpy(labelled)].T, dim=1) @ protos.centroids.T  # [n, 4]
    own = cosines.gather(1, torch.from_numpy(scene["ids"][labelled].astype(np.int64))[:, None])
    assert protos.cohesion == pytest.approx(float(own.double().mean()), abs=1e-4)


def test_only_windows_with_labels_run_the_model(backbone: torch.nn.Module, scene: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = prototypes_module.normed_patch_tokens
    monkeypatch.setattr(prototypes_module, "normed_patch_tokens", lambda *a, **k: calls.append(1) or real(*a, **k))
    fit_prototypes(backbone, [SAMPLE], POLYGONS, normalization=scene["normalization"], nodata=0, window=128,
                   progress=False)  # fmt: skip
    labelled = (scene["ids"] != 255) & scene["valid"]
    windows = {(r // 128, c // 128) for r, c in zip(*np.nonzero(labelled))}
    assert len(calls) == len(windows) < (928 // 128 + 1) * (448 // 128 + 1) // 4


def test_prototype_map_follows_the_polygons_and_the_unknown_floor(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    protos = fit_prototypes(backbone, [SAMPLE], POLYGONS, normalization=scene["normalization"], nodata=0,
                            per_class=3, progress=False)  # fmt: skip
    assert protos.k == 12 and protos.groups == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert sum(protos.shares) == pytest.approx(1.0)
    result = cluster_raster(backbone, protos, SAMPLE, tmp_path, nodata=0, polygons=True, progress=False)
    assert result.classes.name == f"{SAMPLE.stem}_classes.tif"
    with rasterio.open(result.classes) as src:
        labels = src.read(1)
        assert json.loads(src.tags()["class_names"]) == NAMES
    assert ((labels == 255) == ~scene["valid"]).all()
    for c, name in enumerate(NAMES):  # the labelled pixels themselves mostly come back as their class
        inside = labels[(scene["ids"] == c) & scene["valid"]]
        assert (inside == c).mean() >= 0.8, (name, np.bincount(inside, minlength=4))
    assert set(gpd.read_file(result.polygons)["class_name"]) <= set(NAMES)
    # a floor above any cosine sends everything to "unknown", one below any cosine nothing
    for floor, unknown_share in ((1.01, 1.0), (-1.01, 0.0)):
        protos.min_similarity = floor
        out = tmp_path / f"floor{floor}"
        out.mkdir()
        mapped = cluster_raster(backbone, protos, SAMPLE, out, nodata=0, quicklook=False, progress=False)
        assert mapped.pixels[-1] / sum(mapped.pixels) == unknown_share
        with rasterio.open(mapped.classes) as src:
            assert json.loads(src.tags()["class_names"]) == [*NAMES, "unknown"]


def test_a_geodataframe_in_memory_gives_the_file_s_prototypes(backbone: torch.nn.Module, scene: dict) -> None:
    """Polygons drawn in a notebook need no file: a GeoDataFrame (here in degrees) gives what its file gives."""
    frame = gpd.read_file(POLYGONS).to_crs("EPSG:4326")
    kwargs = {"normalization": scene["normalization"], "nodata": 0, "progress": False}
    in_memory = fit_prototypes(backbone, [SAMPLE], frame, **kwargs)
    from_file = fit_prototypes(backbone, [SAMPLE], POLYGONS, **kwargs)
    assert in_memory.names == NAMES and in_memory.samples == from_file.samples
    torch.testing.assert_close(in_memory.centroids, from_file.centroids, rtol=0, atol=1e-6)
    assert frame.crs.to_epsg() == 4326  # the caller's frame is left as it was


def test_the_labels_colours_colour_the_map(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    """Polygons with a ``colour`` column (one class left without): the prototypes keep the colours through their
    file, and the map's colour table shows them (the default palette for the rest, grey for unknown)."""
    frame = gpd.read_file(POLYGONS)
    frame["colour"] = [{"crop": "#f0c83c", "tree": "30,140,50", "water": "#1f78b4"}.get(n) for n in frame["name"]]
    frame.to_file(tmp_path / "legend.gpkg")
    protos = fit_prototypes(backbone, [SAMPLE], tmp_path / "legend.gpkg", normalization=scene["normalization"],
                            nodata=0, min_similarity=-1.01, progress=False)  # fmt: skip
    assert protos.colors == [[240, 200, 60], None, [30, 140, 50], [31, 120, 180]]
    protos.save(tmp_path / "p.safetensors")
    assert Clusters.load(tmp_path / "p.safetensors").colors == protos.colors
    result = cluster_raster(backbone, protos, SAMPLE, tmp_path, nodata=0, quicklook=False, progress=False)
    with rasterio.open(result.classes) as src:
        table = src.colormap(1)
    assert [table[i][:3] for i in (0, 2, 3)] == [(240, 200, 60), (30, 140, 50), (31, 120, 180)]
    assert table[1] == default_colormap(5)[1] and table[4][:3] == (128, 128, 128)


def test_a_label_raster_gives_the_same_prototypes_as_its_polygons(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    profile = {**scene["profile"], "count": 1, "dtype": "uint8", "nodata": 255}
    with rasterio.open(tmp_path / "labels.tif", "w", **profile) as dst:
        dst.write(scene["ids"], 1)
        dst.update_tags(class_names=json.dumps(NAMES))
    kwargs = {"normalization": scene["normalization"], "nodata": 0, "progress": False}
    from_raster = fit_prototypes(backbone, [SAMPLE], tmp_path / "labels.tif", **kwargs)
    from_vector = fit_prototypes(backbone, [SAMPLE], POLYGONS, **kwargs)
    assert from_raster.names == NAMES and from_raster.samples == from_vector.samples
    torch.testing.assert_close(from_raster.centroids, from_vector.centroids)
    # one label source per raster: the scene twice, labelled once by the raster, once by the polygons
    copy = tmp_path / "copy.tif"
    copy.write_bytes(SAMPLE.read_bytes())
    paired = fit_prototypes(backbone, [SAMPLE, copy], [tmp_path / "labels.tif", POLYGONS], **kwargs)
    assert paired.samples == 2 * from_vector.samples
    torch.testing.assert_close(paired.centroids, from_vector.centroids)
    with pytest.raises(ValueError, match="one label source per raster"):
        fit_prototypes(backbone, [SAMPLE, copy], [POLYGONS], **kwargs)
    # 255 written as a class where the file declares no nodata: named, with the fix
    with rasterio.open(tmp_path / "undeclared.tif", "w", **{**profile, "nodata": None}) as dst:
        dst.write(scene["ids"], 1)
    with pytest.raises(ValueError, match="a_nodata 255"):
        fit_prototypes(backbone, [SAMPLE], tmp_path / "undeclared.tif", **kwargs)
    far = gpd.read_file(POLYGONS).to_crs("EPSG:32621").translate(xoff=1e6)  # labels nowhere near the scene
    gpd.GeoDataFrame({"name": NAMES}, geometry=far.values, crs="EPSG:32621").to_file(tmp_path / "far.gpkg")
    with pytest.raises(ValueError, match="No labelled pixel"):
        fit_prototypes(backbone, [SAMPLE], tmp_path / "far.gpkg", **kwargs)


@pytest.fixture(scope="module")
def exported(backbone: torch.nn.Module, scene: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=backbone.embed_dim,
                        normalization=scene["normalization"].to_dict(), gsd=30.0)  # fmt: skip
    return export_backbone(backbone, tmp_path_factory.mktemp("bb") / "backbone", meta=meta)["pth"]


def test_cli_fits_maps_and_reuses_prototypes(exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    base = ["segment", "prototypes", "--model", str(exported), "--nodata", "0", "--quiet"]
    assert cli_main([*base, str(SAMPLE), "--labels", str(POLYGONS), "-o", str(out), "--polygons"]) == 0
    assert "4 for 4 classes" in capsys.readouterr().out
    summary = json.loads((out / "prototypes.json").read_text())
    assert summary["names"] == NAMES and set(summary["scenes"][str(SAMPLE)]["hectares"]) == set(NAMES)
    for suffix in (".tif", ".png", ".gpkg"):
        assert (out / f"{SAMPLE.stem}_classes{suffix}").exists()
    copy = tmp_path / "again.tif"
    copy.write_bytes(SAMPLE.read_bytes())
    out2 = tmp_path / "out2"
    assert cli_main([*base, str(copy), "--prototypes", str(out / "prototypes.safetensors"), "-o", str(out2)]) == 0
    with rasterio.open(out / f"{SAMPLE.stem}_classes.tif") as a, rasterio.open(out2 / "again_classes.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
    # refusals, each in one sentence with exit code 2
    assert cli_main([*base, str(SAMPLE), "-o", str(tmp_path / "x")]) == 2
    assert "either --labels" in capsys.readouterr().err
    assert cli_main([*base, str(SAMPLE), "--labels", str(POLYGONS), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main([*base, str(SAMPLE), "--labels", str(POLYGONS), "--attribute", "kind", "-o", str(tmp_path / "y")]) == 2
    assert "no attribute 'kind'" in capsys.readouterr().err
    kmeans = Clusters(centroids=torch.eye(2, 16), layers=1, normalization=None, bands=None, fingerprint="x")
    kmeans.save(tmp_path / "km.safetensors")
    assert cli_main([*base, str(SAMPLE), "--prototypes", str(tmp_path / "km.safetensors"), "-o", str(tmp_path / "z")]) == 2
    assert "k-means clusters" in capsys.readouterr().err


def test_labelled_pixels_in_chunks_give_the_same_prototypes(backbone: torch.nn.Module, scene: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    kwargs = {"normalization": scene["normalization"], "nodata": 0, "per_class": 2, "progress": False}
    whole = fit_prototypes(backbone, [SAMPLE], POLYGONS, **kwargs)
    monkeypatch.setattr(prototypes_module, "PIXEL_CHUNK", 37)
    chunked = fit_prototypes(backbone, [SAMPLE], POLYGONS, **kwargs)
    torch.testing.assert_close(chunked.centroids, whole.centroids, atol=1e-5, rtol=0)
    assert chunked.samples == whole.samples and chunked.cohesion == pytest.approx(whole.cohesion)


def test_clicked_points_are_enough(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    """A point per class (a user's clicks) gives prototypes equal to the features of the clicked pixels."""
    points = gpd.read_file(POLYGONS)
    points["geometry"] = points.geometry.representative_point()
    points.to_crs("EPSG:4326").to_file(tmp_path / "clicks.gpkg")  # in degrees: reprojected onto the scene's grid
    protos = fit_prototypes(backbone, [SAMPLE], tmp_path / "clicks.gpkg", normalization=scene["normalization"],
                            nodata=0, window=1024, progress=False)  # fmt: skip
    assert protos.names == NAMES and protos.samples == 4
    dense = whole_scene_pixel_features(backbone, scene)
    with rasterio.open(SAMPLE) as src:
        for c, name in enumerate(NAMES):
            point = points[points["name"] == name].geometry.iloc[0]
            row, col = src.index(point.x, point.y)
            torch.testing.assert_close(protos.centroids[c], F.normalize(dense[:, row, col], dim=0), atol=1e-4, rtol=0)
