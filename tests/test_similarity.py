"""Query by example with any backbone (``dinov3-eo similar``): the example's geometry, its one-class prototype, and
the similarity map of the bundled Landsat scene against a whole-scene computation."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.features import rasterize
from rasterio.transform import from_origin
from shapely.geometry import LineString, Point, box

from landsat_sample import POLYGONS, SAMPLE, load_sample, micro_vit, whole_scene_pixel_features
from dinov3_eo.cli import main as cli_main
from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.tasks.similarity import GeometryLabels, example_in_crs, similarity_map

backbone = pytest.fixture(scope="module", name="backbone")(micro_vit)
scene = pytest.fixture(scope="module", name="scene")(load_sample)


def test_example_in_crs_and_its_refusals(scene: dict) -> None:
    lonlat = gpd.GeoSeries([Point(-54.56, -25.33)], crs="EPSG:4326")
    here = example_in_crs(Point(-54.56, -25.33), "EPSG:4326", scene["crs"])
    assert here.equals_exact(lonlat.to_crs(scene["crs"]).iloc[0], 1e-6)
    two = example_in_crs(gpd.GeoDataFrame(geometry=[Point(0, 0), Point(1, 1)], crs=scene["crs"]), None, scene["crs"])
    assert two.geom_type == "MultiPoint"
    with pytest.raises(TypeError, match="shapely geometry"):
        example_in_crs((1.0, 2.0), None, scene["crs"])
    with pytest.raises(ValueError, match="points or polygons"):
        example_in_crs(LineString([(0, 0), (1, 1)]), None, scene["crs"])
    with pytest.raises(ValueError, match="empty"):
        example_in_crs(gpd.GeoSeries([], crs=scene["crs"]), None, scene["crs"])


def test_geometry_labels_burn_the_example_on_any_window() -> None:
    transform = from_origin(100.0, 200.0, 10.0, 10.0)
    point = GeometryLabels(Point(125.0, 175.0)).sample(crs=None, transform=transform, shape=(8, 8))["mask"]
    assert list(zip(*np.nonzero(point == 0))) == [(2, 2)] and (point[point != 0] == -1).all()
    square = GeometryLabels(box(120.0, 150.0, 140.0, 180.0)).sample(crs=None, transform=transform, shape=(8, 8))["mask"]
    assert (square == 0).sum() == 2 * 3  # pixel centres inside the 20 x 30 m box
    far = GeometryLabels(Point(1e6, 1e6)).sample(crs=None, transform=transform, shape=(8, 8))["mask"]
    assert (far == -1).all()


def test_similarity_is_the_cosine_to_the_example_s_mean_features(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    water = gpd.read_file(POLYGONS).query("name == 'water'")
    result = similarity_map(backbone, SAMPLE, water, tmp_path / "sim.tif", normalization=scene["normalization"],
                            nodata=0, threshold=0.8, polygons=True, window=1024, progress=False)  # fmt: skip
    # independently: one forward pass over the whole scene (one window holds it), features upsampled to every pixel
    dense = whole_scene_pixel_features(backbone, scene)
    inside = rasterize(water.geometry, out_shape=scene["valid"].shape, transform=scene["transform"]).astype(bool)
    inside &= scene["valid"]
    assert result.example_pixels == int(inside.sum())
    proto = F.normalize(dense[:, torch.from_numpy(inside)].sum(dim=1), dim=0)
    expected = torch.einsum("dyx,d->yx", dense, proto).numpy()
    with rasterio.open(result.similarity) as src:
        similarity = src.read(1)
        assert (src.crs, src.transform) == (scene["crs"], scene["transform"])
    assert np.isnan(similarity[~scene["valid"]]).all()
    np.testing.assert_allclose(similarity[scene["valid"]], expected[scene["valid"]], atol=1e-4)
    assert similarity[inside].mean() > 0.8 > np.nanmean(similarity) + 0.3  # the reservoir is like its own polygon
    with rasterio.open(result.mask) as src:
        mask = src.read(1)
    assert (mask[~scene["valid"]] == 255).all()
    assert np.array_equal(mask[scene["valid"]] == 1, similarity[scene["valid"]] >= 0.8)
    assert result.like_pixels == int((mask == 1).sum()) and result.valid_pixels == int(scene["valid"].sum())
    assert result.like_area_ha == pytest.approx(result.like_pixels * 0.09)
    assert gpd.read_file(result.polygons).area.sum() == pytest.approx(result.like_pixels * 900.0)
    assert result.quicklook.stat().st_size > 0
    array = result.to_xarray()
    assert array.name == "similarity" and array.shape == scene["valid"].shape


def test_refusals(backbone: torch.nn.Module, scene: dict, tmp_path: Path) -> None:
    kwargs = {"normalization": scene["normalization"], "nodata": 0, "progress": False}
    with pytest.raises(ValueError, match="outside the raster"):
        similarity_map(backbone, SAMPLE, Point(0.0, 0.0), tmp_path / "a.tif", crs="EPSG:4326", **kwargs)
    corner = scene["transform"] @ (445.5, 0.5)  # the top-right corner is the Landsat collar (0 = nodata)
    with pytest.raises(ValueError, match="no pixel with data"):
        similarity_map(backbone, SAMPLE, Point(*corner), tmp_path / "b.tif", **kwargs)
    with pytest.raises(ValueError, match="need a threshold"):
        similarity_map(backbone, SAMPLE, Point(*corner), tmp_path / "c.tif", polygons=True, **kwargs)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli(backbone: torch.nn.Module, scene: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=backbone.embed_dim,
                        normalization=scene["normalization"].to_dict())  # fmt: skip
    model = export_backbone(backbone, tmp_path / "bb", meta=meta)["pth"]
    base = ["similar", str(SAMPLE), "--model", str(model), "--nodata", "0", "--quiet"]
    out = tmp_path / "sim.tif"
    assert cli_main([*base, "--point", "-54.56", "-25.33", "--crs", "EPSG:4326", "-o", str(out), "--threshold", "0.8"]) == 0
    printed = capsys.readouterr().out
    assert "example: 1 pixels" in printed and "ha)" in printed
    assert out.exists() and out.with_name("sim_mask.tif").exists() and out.with_suffix(".png").exists()
    assert cli_main([*base, "--example", str(POLYGONS), "-o", str(tmp_path / "poly.tif"), "--no-quicklook"]) == 0
    assert "example: 683 pixels" in capsys.readouterr().out  # all four polygons' valid pixels together
    assert cli_main([*base, "-o", str(tmp_path / "x.tif")]) == 2
    assert "--point X Y" in capsys.readouterr().err
    assert cli_main([*base, "--point", "-54.56", "-25.33", "--crs", "EPSG:4326", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
