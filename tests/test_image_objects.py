"""``dinov3-eo objects``: SLIC image objects of a scene as polygons, never across nodata, each connected."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from shapely.geometry import box
from skimage.measure import label as connected

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.image_objects import image_objects, label_outlines, merge_small_objects, slic_labels

SCENE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"  # 0-valued collar


def test_objects_follow_edges_skip_nodata_and_are_connected() -> None:
    rng = np.random.default_rng(0)
    image = np.full((3, 120, 160), 0.2) + rng.normal(0, 0.02, (3, 120, 160))
    image[:, :, 80:] += 0.6  # a sharp edge at column 80
    valid = np.ones((120, 160), bool)
    valid[50:60] = False  # a band of nodata across the scene
    labels = slic_labels(np.clip(image, 0, 1), valid, pixels_per_object=100)
    assert labels.dtype == np.int32 and (labels[~valid] == 0).all() and (labels[valid] > 0).all()
    ids = np.unique(labels[labels > 0])
    assert np.array_equal(ids, np.arange(1, len(ids) + 1))
    assert connected(labels, background=0, connectivity=1).max() == len(ids)  # each object one connected piece
    assert 0.5 * valid.sum() / 100 <= len(ids) <= 2 * valid.sum() / 100
    for i in ids:  # nothing straddles the edge or the nodata band
        rows, cols = np.nonzero(labels == i)
        assert (cols < 80).all() or (cols >= 80).all()
        assert (rows < 50).all() or (rows >= 60).all()
    assert not slic_labels(image, np.zeros_like(valid), pixels_per_object=100).any()


def test_label_outlines() -> None:
    labels = np.array([[1, 1, 2], [1, 1, 2], [0, 0, 2]])
    expected = np.array([[0, 1, 1], [1, 1, 1], [0, 0, 1]], bool)  # next to another object or to no data
    np.testing.assert_array_equal(label_outlines(labels), expected)


def test_scene_objects_cover_the_valid_pixels_once(tmp_path: Path) -> None:
    frame = image_objects(SCENE, size_ha=20, nodata=0, labels=tmp_path / "ids.tif", progress=False)
    with rasterio.open(SCENE) as src:
        data = src.read().astype(np.float64)
        pixel_m2 = abs(src.res[0] * src.res[1])
    valid = (data != 0).all(axis=0)
    with rasterio.open(tmp_path / "ids.tif") as ids_file:
        ids = ids_file.read(1)
        assert ids_file.nodata == 0 and ids_file.crs == src.crs
    assert ((ids > 0) == valid).all()
    assert frame.crs == src.crs and frame["object_id"].is_unique and frame.geometry.is_valid.all()
    assert frame["pixels"].sum() == valid.sum() and len(frame) == len(np.unique(ids[ids > 0]))
    np.testing.assert_allclose(frame.geometry.area, frame["area_m2"], rtol=1e-9)
    np.testing.assert_allclose(frame["area_m2"], frame["pixels"] * pixel_m2)
    assert 10 <= frame["area_m2"].mean() / 10_000 <= 30  # about the 20 ha asked for
    for _, row in frame.sample(5, random_state=0).iterrows():  # band means and spreads from the id raster itself
        inside = ids == row["object_id"]
        assert row["mean_band_2"] == pytest.approx(data[1][inside].mean())
        assert row["std_band_3"] == pytest.approx(data[2][inside].std(), rel=1e-6, abs=1e-6)
    # shape: the polygons' perimeters, and Polsby-Popper compactness 4 pi A / P^2 (a pixel square: pi / 4)
    np.testing.assert_allclose(frame["perimeter_m"], frame.geometry.length, rtol=1e-9)
    np.testing.assert_allclose(frame["compactness"], 4 * np.pi * frame.geometry.area / frame.geometry.length**2, rtol=1e-9)
    assert (frame["compactness"] > 0).all() and (frame["compactness"] <= np.pi / 4 + 1e-9).all()  # pixel edges: at most a square's
    # in blocks of 128 px: the same objects' sizes, no seam along the block edges, still each object once and connected
    blocked = image_objects(SCENE, size_ha=20, nodata=0, block=128, labels=tmp_path / "blocked.tif", progress=False)
    with rasterio.open(tmp_path / "blocked.tif") as ids_file:
        blocked_ids = ids_file.read(1)
    assert blocked["pixels"].sum() == valid.sum() and ((blocked_ids > 0) == valid).all()
    assert connected(blocked_ids, background=0, connectivity=1).max() == len(blocked) == blocked_ids.max()
    assert abs(len(blocked) - len(frame)) <= 0.1 * len(frame)
    object_px = 20 * 10_000 / pixel_m2
    assert (blocked["pixels"] < object_px / 4).mean() <= (frame["pixels"] < object_px / 4).mean() + 0.01  # no slivers

    def boundary_share(ids: np.ndarray, cols: np.ndarray) -> float:  # of valid pixel pairs across these columns
        left, right = ids[:, cols - 1], ids[:, cols]
        both = (left > 0) & (right > 0)
        return float(((left != right) & both).sum() / both.sum())

    for grid in (blocked_ids, blocked_ids.T):  # block edges as columns, then as rows
        edges = np.arange(128, grid.shape[1], 128)
        others = np.setdiff1d(np.arange(1, grid.shape[1]), edges)
        # a straight seam would put a boundary at every pixel of an edge (share 1); here about as many as elsewhere
        assert boundary_share(grid, edges) < 1.5 * boundary_share(grid, others) < 0.2
    crossing = [i for i in blocked["object_id"] if len(np.unique(np.nonzero(blocked_ids == i)[1] // 128)) > 1]
    assert len(crossing) > 50


def test_objects_within_parcels_never_cross_them(tmp_path: Path) -> None:
    import shapely
    from rasterio.features import rasterize

    with rasterio.open(SCENE) as src:
        (x0, y0, x1, y1), crs, transform, shape = src.bounds, src.crs, src.transform, src.shape
        valid = (src.read() != 0).all(axis=0)
    strips = [shapely.box(x0 + 2000 + 3000 * i, y0 + 3000, x0 + 4500 + 3000 * i, y1 - 3000) for i in range(3)]
    slanted = shapely.Polygon([(x0 + 1000, y0 + 1000), (x1 - 1000, y0 + 5000), (x1 - 1000, y0 + 7000), (x0 + 1000, y0 + 3000)])
    parcels = gpd.GeoDataFrame({"pid": [10, 11, 12, 13]}, geometry=[*strips, slanted], crs=crs).to_crs("EPSG:4326")
    # which parcel each pixel centre lies in (the slanted one over the strips where they overlap), -1 none
    under = rasterize([(g, i) for i, g in enumerate(parcels.to_crs(crs).geometry)], out_shape=shape, transform=transform,
                      fill=-1, dtype="int32")  # fmt: skip
    for block in (4096, 128):
        frame = image_objects(SCENE, size_ha=20, nodata=0, within=parcels, block=block, labels=tmp_path / f"{block}.tif",
                              progress=False)  # fmt: skip
        with rasterio.open(tmp_path / f"{block}.tif") as ids_file:
            ids = ids_file.read(1)
        assert frame["pixels"].sum() == valid.sum() and ((ids > 0) == valid).all()
        assert connected(ids, background=0, connectivity=1).max() == len(frame)
        # every object inside one parcel (or outside all), and its zone says which
        pairs = np.unique(np.stack([ids[valid], under[valid]]), axis=1)
        assert len(pairs[0]) == len(np.unique(pairs[0]))
        zone_of = dict(zip(pairs[0], pairs[1]))
        assert [zone_of[i] for i in frame["object_id"]] == frame["zone"].tolist()
        assert set(frame["zone"]) == {-1, 0, 1, 2, 3}
    with pytest.raises(FileNotFoundError, match="Zones '.*none.gpkg' do not exist"):
        image_objects(SCENE, within=tmp_path / "none.gpkg", progress=False)


def test_small_objects_join_the_closest_neighbour() -> None:
    labels = np.array([[1, 1, 2, 3, 3],
                       [1, 1, 2, 3, 3],
                       [0, 0, 0, 0, 0],
                       [0, 4, 0, 5, 5]])  # fmt: skip
    image = np.zeros((1, 4, 5))
    image[0, :, 3:] = 0.8
    image[0, :, 2] = 0.7  # object 2 (2 px) is closer in colour to 3 than to 1
    merged = merge_small_objects(labels, image, min_pixels=3)
    expected = np.array([[1, 1, 2, 2, 2],
                         [1, 1, 2, 2, 2],
                         [0, 0, 0, 0, 0],
                         [0, 3, 0, 4, 4]])  # fmt: skip
    np.testing.assert_array_equal(merged, expected)  # 4 and 5 have no neighbour: kept; ids renumbered in order
    assert merged.dtype == np.int32
    # two small objects touching only each other become one
    np.testing.assert_array_equal(merge_small_objects(np.array([[1, 2]]), np.zeros((1, 1, 2)), min_pixels=3), [[1, 1]])


def test_objects_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "objects.gpkg"
    assert cli_main(["objects", str(SCENE), "-o", str(out), "--size", "30", "--nodata", "0", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "objects," in printed and " ha on average" in printed
    written = gpd.read_file(out)
    assert {"object_id", "area_m2", "pixels", "mean_band_1"} <= set(written.columns) and out.with_suffix(".png").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with rasterio.open(SCENE) as src:
        left, bottom, right, top = src.bounds
        gpd.GeoDataFrame(geometry=[box(left, bottom, (left + right) / 2, top)], crs=src.crs).to_file(tmp_path / "west.gpkg")
    assert cli_main(["objects", str(SCENE), "-o", str(tmp_path / "split.csv"), "--size", "30", "--nodata", "0",
                     "--within", str(tmp_path / "west.gpkg"), "--quiet", "--no-quicklook"]) == 0  # fmt: skip
    capsys.readouterr()
    assert set(pd.read_csv(tmp_path / "split.csv")["zone"]) == {-1, 0}
    # the objects are zones: one embedding each
    from micro_backbone import micro_backbone_file

    pth = micro_backbone_file(tmp_path, seed=0, normalization=None)
    assert cli_main(["embed", str(SCENE), "--model", str(pth), "--normalization", "none", "--zones", str(out), "-o",
                     str(tmp_path / "objects.parquet"), "--quiet"]) == 0  # fmt: skip
    assert f"{len(written)} polygons embedded ({len(written)} with features" in capsys.readouterr().out
    # bad input: degrees, a size that is no size, an existing output
    with rasterio.open(SCENE) as src:
        profile = src.profile | {"crs": "EPSG:4326", "transform": rasterio.transform.from_origin(-60, -25, 0.0003, 0.0003)}
        with rasterio.open(tmp_path / "degrees.tif", "w", **profile) as dst:
            dst.write(src.read())
    assert cli_main(["objects", str(tmp_path / "degrees.tif"), "-o", str(tmp_path / "d.gpkg")]) == 2
    assert "is in degrees" in capsys.readouterr().err
    assert cli_main(["objects", str(SCENE), "-o", str(tmp_path / "s.gpkg"), "--size", "0"]) == 2
    assert "--size must be a positive area" in capsys.readouterr().err
    assert cli_main(["objects", str(SCENE), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "d.gpkg").exists() and not (tmp_path / "s.gpkg").exists()
