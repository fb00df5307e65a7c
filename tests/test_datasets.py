"""Tile and chip datasets, labels on the tile grid, pickling and DataLoader workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.transform import from_origin
from rasterio.vrt import WarpedVRT
from torch.utils.data import DataLoader

from dinov3_eo.data.datamodule import DenseDataModule
from dinov3_eo.data.datasets import ChipFolderDataset, MixedDataset, TileDataset, collate_samples
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.labels import RasterLabels, VectorLabels, parse_color
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.sampling import GridTileSampler, RandomTileSampler, Tile, TileGrid
from dinov3_eo.tasks.segmentation import classes_of_labels

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_polygons.gpkg"
NC = ROOT.parent / "shared" / "data" / "nc_landsat7"
NORM = Normalization.zscore([7800, 7300, 6600], [200, 330, 620])


@pytest.fixture(scope="module")
def grid() -> TileGrid:
    return TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=128)


class TestTileDataset:
    def test_sample_contract(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0, normalization=NORM)
        tile = Tile(0, 0, 320, 128)  # top-right: part of the 0-valued collar
        s = ds[tile]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 128, 128)
        assert s["valid"].dtype == torch.bool and s["valid"].shape == (128, 128)
        with rasterio.open(SAMPLE) as src:
            raw = src.read(window=tile.window)
            assert s["crs"] == src.crs and s["transform"] == src.window_transform(tile.window)
            assert tuple(s["bounds"]) == pytest.approx(tuple(rasterio.windows.bounds(tile.window, src.transform)))
        valid = (raw != 0).all(axis=0)
        assert 0 < valid.mean() < 1
        np.testing.assert_array_equal(s["valid"].numpy(), valid)
        expected = NORM(torch.from_numpy(raw.astype(np.float32)))
        torch.testing.assert_close(s["image"][:, s["valid"]], expected[:, s["valid"]])
        assert (s["image"][:, ~s["valid"]] == 0).all()
        assert s["path"] == str(SAMPLE)

    def test_nodata_override_flows_into_valid(self, grid: TileGrid) -> None:
        tile = Tile(0, 0, 320, 128)
        assert TileDataset(grid=grid)[tile]["valid"].all()  # nothing declared: the collar looks like data
        assert not TileDataset(grid=grid, nodata=0)[tile]["valid"].all()

    def test_scale_offset_before_normalisation(self, grid: TileGrid) -> None:
        tile = Tile(0, 500, 100, 128)
        raw = TileDataset(grid=grid)[tile]["image"]
        scaled = TileDataset(grid=grid, scale=2.0e-5, offset=[-0.1, -0.1, -0.2])[tile]["image"]
        torch.testing.assert_close(scaled, raw * 2.0e-5 + torch.tensor([-0.1, -0.1, -0.2]).view(3, 1, 1), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match=r"offset must be one number or one per band \(3\)"):
            TileDataset(grid=grid, offset=[1.0, 2.0])
        with pytest.raises(ValueError, match="has 1 bands, the archive selection 3"):
            TileDataset(grid=grid, normalization=Normalization.zscore([0.0], [1.0]))

    @pytest.mark.parametrize(
        "norm", [NORM, Normalization.percentile([7000, 6500, 5900], [9000, 8800, 9500]), Normalization.preset("sat493m", high=20000)]
    )
    def test_fused_normalisation_equals_normalization_call(self, grid: TileGrid, norm: Normalization) -> None:
        tile = Tile(0, 0, 300, 128)  # includes collar pixels
        ds = TileDataset(grid=grid, nodata=0, scale=[1.0, 0.5, 2.0], offset=100.0, normalization=norm)
        s = ds[tile]
        with rasterio.open(SAMPLE) as src:
            raw = torch.from_numpy(src.read(window=tile.window).astype(np.float32))
        expected = norm(raw * torch.tensor([1.0, 0.5, 2.0]).view(3, 1, 1) + 100.0)
        expected[:, ~s["valid"]] = 0
        torch.testing.assert_close(s["image"], expected, rtol=1e-5, atol=1e-4)

    def test_warped_tile_equals_warpedvrt_read(self) -> None:
        grid = TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=3840, units="metres", gsd=60, crs="EPSG:3857")
        ds = TileDataset(grid=grid, nodata=0)
        tile = Tile(0, 100, 40, grid.tile_px)
        s = ds[tile]
        g = grid.grids[0]
        with rasterio.open(SAMPLE) as src, WarpedVRT(src, crs=g.crs, transform=g.transform, width=g.width, height=g.height,
                                                     resampling=Resampling.bilinear, src_nodata=0, nodata=0) as vrt:
            ref = vrt.read(window=tile.window)
            assert s["transform"] == vrt.window_transform(tile.window)
        np.testing.assert_array_equal(s["image"].numpy(), ref.astype(np.float32) * s["valid"].numpy())
        assert s["crs"] == g.crs and s["image"].shape == (3, 64, 64)

    def test_read_errors_name_the_tile(self, dataset_of_a_deleted_file: TileDataset) -> None:
        ds = dataset_of_a_deleted_file
        with pytest.raises(RuntimeError, match=r"Reading Tile\(file=0, row=0, col=0, size=32\) of .*gone.tif failed"):
            ds[Tile(0, 0, 0, 32)]
        with pytest.raises(TypeError, match="indexed by Tile"):
            ds[0]

    def test_pickle_and_workers_match_serial(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0, normalization=NORM)
        ds[Tile(0, 0, 0, 128)]  # opens a handle that must not travel
        clone = pickle.loads(pickle.dumps(ds))
        assert not clone.reader._handles.get()  # the clone starts with no open handle
        sampler = RandomTileSampler(grid=grid, length=8, seed=1, rank=0, world_size=1)
        serial = collate_samples([ds[t] for t in sampler])
        loader = DataLoader(ds, batch_size=4, sampler=sampler, num_workers=2, collate_fn=collate_samples)
        batches = list(loader)
        torch.testing.assert_close(torch.cat([b["image"] for b in batches]), serial["image"])
        assert [p for b in batches for p in b["bounds"]] == serial["bounds"]

        np.testing.assert_array_equal(torch.cat([b["valid"] for b in batches]).numpy(), serial["valid"].numpy())

    def test_batched_read_equals_per_tile_reads(self, grid: TileGrid) -> None:
        labels = VectorLabels(path=POLYGONS, attribute="name")
        ds = TileDataset(grid=grid, nodata=0, normalization=NORM, labels=labels)
        # collar (partly valid), interior, off the bottom-right edge (boundless), a repeat
        tiles = [Tile(0, 0, 320, 128), Tile(0, 500, 100, 128), Tile(0, 850, 400, 128), Tile(0, 0, 320, 128)]
        batched = ds.__getitems__(tiles)
        for tile, got in zip(tiles, batched):
            want = ds[tile]
            assert got.keys() == want.keys()
            for key in want:
                if isinstance(want[key], torch.Tensor):
                    assert got[key].dtype == want[key].dtype
                    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
                else:
                    assert got[key] == want[key]
        assert not batched[2]["valid"].all() and batched[1]["valid"].all()
        # tiles of different sizes cannot share a buffer: read one by one
        mixed_sizes = ds.__getitems__([Tile(0, 0, 0, 128), Tile(0, 0, 0, 64)])
        assert [s["image"].shape[-1] for s in mixed_sizes] == [128, 64]
        with pytest.raises(TypeError, match="indexed by Tile"):
            ds.__getitems__([Tile(0, 0, 0, 128), 3])

    def test_collate_hands_over_a_batch_buffer_without_copy(self, grid: TileGrid) -> None:
        ds = TileDataset(grid=grid, nodata=0, normalization=NORM)
        tiles = [Tile(0, 0, 0, 128), Tile(0, 0, 320, 128), Tile(0, 640, 200, 128)]
        samples = ds.__getitems__(tiles)
        batch = collate_samples(samples)
        assert batch["image"].data_ptr() == samples[0]["image"].data_ptr()
        assert batch["valid"].data_ptr() == samples[0]["valid"].data_ptr()
        torch.testing.assert_close(batch["image"], torch.stack([ds[t]["image"] for t in tiles]))
        # rows out of order, or only some rows of a buffer, must be stacked (copied) in the order given
        for subset in ([samples[2], samples[0], samples[1]], samples[:2]):
            stacked = collate_samples(subset)
            assert stacked["image"].data_ptr() != samples[0]["image"].data_ptr()
            torch.testing.assert_close(stacked["image"], torch.stack([s["image"] for s in subset]))


class TestLabels:
    def test_vector_labels_match_independent_rasterisation(self, grid: TileGrid) -> None:
        labels = VectorLabels(path=POLYGONS, attribute="name")
        assert labels.classes == {"crop": 0, "developed": 1, "tree": 2, "water": 3}
        gdf = gpd.read_file(POLYGONS)
        with rasterio.open(SAMPLE) as src:
            full = rasterize(((g, labels.classes[n]) for g, n in zip(gdf.geometry, gdf["name"])), out_shape=src.shape,
                             transform=src.transform, fill=255, dtype="int64")
        ds = TileDataset(grid=grid, nodata=0, labels=labels)
        seen = set()
        for tile in GridTileSampler(grid=grid, stride=128):
            mask = ds[tile]["mask"].numpy()
            ref = np.full((128, 128), 255)
            part = full[tile.row : tile.row + 128, tile.col : tile.col + 128]
            ref[: part.shape[0], : part.shape[1]] = part
            np.testing.assert_array_equal(mask, ref)
            seen |= set(np.unique(mask).tolist())
        assert seen == {0, 1, 2, 3, 255}
        assert pickle.loads(pickle.dumps(labels)).classes == labels.classes

    def test_vector_background_and_unknown_classes(self) -> None:
        with pytest.raises(ValueError, match=r"values \['water'\] of 'name' are missing"):
            VectorLabels(path=POLYGONS, classes={"crop": 0, "tree": 1, "developed": 2})
        with pytest.raises(KeyError, match="no attribute 'kind'"):
            VectorLabels(path=POLYGONS, attribute="kind")
        labels = VectorLabels(path=POLYGONS, background=4)
        with rasterio.open(SAMPLE) as src:
            out = labels.sample(crs=src.crs, transform=src.transform, shape=(64, 64))["mask"]
        assert (out == 4).all()  # no polygon in the top-left corner

    def test_raster_labels_in_another_crs_and_resolution(self, tmp_path: Path) -> None:
        # Labels: 4 quadrant classes on a 60 m grid in EPSG:32621, written in EPSG:4326 after warping.
        with rasterio.open(SAMPLE) as src:
            left, bottom, right, top = src.bounds
            crs = src.crs
        coarse = np.zeros((464, 224), dtype="uint8")
        coarse[:232, 112:] = 1
        coarse[232:, :112] = 2
        coarse[232:, 112:] = 3
        coarse[:10] = 99  # label nodata
        utm = tmp_path / "labels_utm.tif"
        with rasterio.open(utm, "w", driver="GTiff", width=224, height=464, count=1, dtype="uint8", crs=crs,
                           transform=from_origin(left, top, 60, 60), nodata=99) as dst:
            dst.write(coarse[None])
        ds = TileDataset(grid=TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=128), nodata=0,
                         labels=RasterLabels(path=utm))
        for tile, expected in [(Tile(0, 600, 0, 128), 2), (Tile(0, 100, 300, 128), 1), (Tile(0, 700, 300, 128), 3)]:
            assert (ds[tile]["mask"] == expected).all()
        top_tile = ds[Tile(0, 0, 0, 128)]["mask"]
        assert (top_tile[:20] == 255).all() and (top_tile[20:] == 0).all()  # 10 label px at 60 m = 20 image px
        with pytest.raises(ValueError, match="must be resampled with 'nearest'"):
            RasterLabels(path=utm, resampling="bilinear")

    def test_regression_target_nan_where_invalid(self, tmp_path: Path) -> None:
        path = tmp_path / "height.tif"
        with rasterio.open(SAMPLE) as src:
            profile = src.profile | {"count": 1, "dtype": "float32", "nodata": -9999.0}
            heights = np.full((1, src.height, src.width), 12.5, dtype="float32")
        heights[0, 500:510, 100:110] = -9999.0
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(heights)
        grid = TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=64)
        ds = TileDataset(grid=grid, nodata=0, labels=RasterLabels(path=path, task="regression"))
        target = ds[Tile(0, 480, 96, 64)]["target"]
        assert target.dtype == torch.float32
        assert torch.isnan(target[20:30, 4:14]).all() and (target[:20] == 12.5).all()
        collar = ds[Tile(0, 0, 384, 64)]
        assert torch.isnan(collar["target"][~collar["valid"]]).all()

    @pytest.mark.skipif(not (NC / "strata.tif").exists(), reason="GPL NC Landsat pair lives only in ../shared/data")
    def test_nc_landsat_pair_lines_up_pixel_for_pixel(self) -> None:
        # imagery EPSG:32119, labels EPSG:3358: same grid, different CRS definitions
        grid = TileGrid(index=RasterIndex.build(NC / "landsat_multiband.tif", cache_dir=None), tile_size=128)
        ds = TileDataset(grid=grid, labels=RasterLabels(path=NC / "strata.tif"))
        with rasterio.open(NC / "strata.tif") as lab, rasterio.open(NC / "landsat_multiband.tif") as img:
            assert lab.crs.to_wkt() != img.crs.to_wkt()  # different definitions (EPSG:3358 vs a custom NAD83 LCC)
            strata = lab.read(1)
        mismatches = 0
        for tile in GridTileSampler(grid=grid, stride=100):
            s = ds[tile]
            ref = np.full((128, 128), 255)
            part = strata[tile.row : tile.row + 128, tile.col : tile.col + 128]
            ref[: part.shape[0], : part.shape[1]] = np.where(part == -99999, 255, part)
            ref[~s["valid"].numpy()] = 255
            mismatches += int((s["mask"].numpy() != ref).sum())
        assert mismatches == 0


class TestLabelMosaic:
    """One mask per image (a folder or glob of label rasters) reads as the one label raster they were cut from."""

    @pytest.fixture(scope="class")
    def cut(self, tmp_path_factory: pytest.TempPathFactory) -> dict:
        folder = tmp_path_factory.mktemp("masks")
        with rasterio.open(SAMPLE) as src:
            profile = {"driver": "GTiff", "count": 1, "dtype": "uint8", "nodata": 255, "crs": src.crs}
            shape, transform = (src.height, src.width), src.transform
        frame = gpd.read_file(POLYGONS).to_crs(profile["crs"])
        names = sorted(frame["name"])
        ids = rasterize([(g, names.index(n)) for g, n in zip(frame.geometry, frame["name"])], out_shape=shape,
                        transform=transform, fill=255, dtype="uint8")  # fmt: skip
        with rasterio.open(folder / "whole.tif", "w", width=shape[1], height=shape[0], transform=transform, **profile) as dst:
            dst.write(ids, 1)
        rows, cols = shape[0] // 2 + 7, shape[1] // 2 - 5  # the cut crosses the polygons
        (folder / "tiles").mkdir()
        for name, (r0, r1, c0, c1) in {"a": (0, rows, 0, cols), "b": (0, rows, cols, shape[1]),
                                        "c": (rows, shape[0], 0, cols), "d": (rows, shape[0], cols, shape[1])}.items():
            window = rasterio.windows.Window(c0, r0, c1 - c0, r1 - r0)
            with rasterio.open(folder / "tiles" / f"mask_{name}.tif", "w", width=c1 - c0, height=r1 - r0,
                               transform=rasterio.windows.transform(window, transform), **profile) as dst:
                dst.write(ids[r0:r1, c0:c1], 1)
        return {"folder": folder, "shape": shape, "transform": transform, "crs": profile["crs"], "cut": (rows, cols)}

    def test_tiles_read_as_the_whole_raster(self, cut: dict) -> None:
        whole = RasterLabels(path=cut["folder"] / "whole.tif")
        for source in (cut["folder"] / "tiles", str(cut["folder"] / "tiles" / "mask_*.tif")):
            tiles = RasterLabels(path=source)
            assert len(tiles.paths) == 4
            rows, cols = cut["cut"]
            for r0, c0, size in ((rows - 40, cols - 50, 96), (0, 0, 64), (rows + 3, cols + 3, 40), (-20, -30, 80)):
                transform = cut["transform"] @ rasterio.Affine.translation(c0, r0)
                grid = {"crs": cut["crs"], "transform": transform, "shape": (size, size + 8)}
                assert torch.equal(tiles.sample(**grid)["mask"], whole.sample(**grid)["mask"]), (r0, c0)
            across = {"crs": cut["crs"], "transform": cut["transform"] @ rasterio.Affine.translation(cols - 4, rows - 4),
                      "shape": (8, 8)}  # fmt: skip
            assert len(tiles.mosaic.overlapping(**across)) == 4
        assert classes_of_labels(cut["folder"] / "tiles") == (4, None)  # a folder counts as label rasters

    def test_a_grid_aligned_with_the_file_reads_a_window_as_warping_would(self, cut: dict, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
        """On the file's own pixel grid shifted by whole pixels, labels are read as a window of the file, not warped:
        the same values and validity as the warped read, at the edges, outside the file, with a nodata override, a
        NaN nodata and no nodata at all; a half-pixel shift, another pixel size or CRS still warps."""
        from dinov3_eo.data.labels import MosaicFile, RasterMosaic

        with rasterio.open(cut["folder"] / "whole.tif") as src:
            ids, profile = src.read(1), src.profile
        floats = np.where(ids == 255, np.nan, ids).astype(np.float32)
        bare = {k: v for k, v in profile.items() if k != "nodata"}
        with rasterio.open(tmp_path / "nan.tif", "w", **{**profile, "dtype": "float32", "nodata": float("nan")}) as dst:
            dst.write(floats, 1)
        with rasterio.open(tmp_path / "bare.tif", "w", **bare) as dst:
            dst.write(ids, 1)
        sources = [(cut["folder"] / "whole.tif", None), (cut["folder"] / "whole.tif", 0), (tmp_path / "nan.tif", None),
                   (tmp_path / "bare.tif", None)]  # fmt: skip
        transform, crs = cut["transform"], cut["crs"]
        first = np.argwhere(ids != 255)[0]  # a labelled pixel: the first window holds a polygon's corner
        grids = [(transform @ rasterio.Affine.translation(c0, r0), (h, w))
                 for r0, c0, h, w in ((first[0] - 20, first[1] - 30, 96, 104), (-10, -20, 64, 64),
                                      (cut["shape"][0] - 30, cut["shape"][1] - 9, 48, 48), (0, 0, *cut["shape"]))]  # fmt: skip
        aligned = MosaicFile.aligned_offset
        for path, nodata in sources:
            mosaic = RasterMosaic(path, nodata=nodata)
            labelled = []
            for grid_transform, shape in grids:
                assert mosaic.files[0].aligned_offset(crs=crs, transform=grid_transform) is not None
                fast = mosaic.read(crs=crs, transform=grid_transform, shape=shape, resampling=Resampling.nearest)
                monkeypatch.setattr(MosaicFile, "aligned_offset", lambda self, **kwargs: None)
                warped = mosaic.read(crs=crs, transform=grid_transform, shape=shape, resampling=Resampling.nearest)
                monkeypatch.setattr(MosaicFile, "aligned_offset", aligned)
                assert np.array_equal(fast[1], warped[1]), (path.name, nodata, shape)
                assert np.array_equal(fast[0][fast[1]], warped[0][warped[1]]), (path.name, nodata, shape)
                assert nodata != 0 or not (fast[0][fast[1]] == 0).any()  # the override marks 0 missing
                labelled.append(int((fast[0][fast[1]] != 255).sum()))
            assert labelled[0] > 100 and labelled[-1] > labelled[0]  # windows that hold labels, the whole raster most
        whole = MosaicFile(str(path), crs, None, None, "uint8", cut["shape"], transform)
        assert whole.aligned_offset(crs=crs, transform=transform @ rasterio.Affine.translation(3, -2)) == (3, -2)
        assert whole.aligned_offset(crs=crs, transform=transform @ rasterio.Affine.translation(0.5, 0)) is None
        assert whole.aligned_offset(crs=crs, transform=transform @ rasterio.Affine.scale(2)) is None
        assert whole.aligned_offset(crs="EPSG:4326", transform=transform) is None

    def test_other_crs_and_first_file_wins(self, cut: dict, tmp_path: Path) -> None:
        """A mask in another CRS is found through its footprint; where two masks overlap the first path wins."""
        from rasterio.warp import Resampling as WarpResampling, calculate_default_transform, reproject

        src_path = cut["folder"] / "tiles" / "mask_a.tif"
        with rasterio.open(src_path) as src:
            transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height, *src.bounds)
            data = np.full((height, width), 255, dtype=np.uint8)
            reproject(src.read(1), data, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                      dst_crs="EPSG:3857", resampling=WarpResampling.nearest, src_nodata=255, dst_nodata=255)  # fmt: skip
            profile = {**src.profile, "crs": "EPSG:3857", "transform": transform, "width": width, "height": height}
        with rasterio.open(tmp_path / "1_mercator.tif", "w", **profile) as dst:
            dst.write(data, 1)
        with rasterio.open(tmp_path / "2_fives.tif", "w", **{**profile, "transform": transform}) as dst:
            dst.write(np.where(data == 255, 255, 5).astype(np.uint8), 1)  # the same place, every label 5
        grid = {"crs": cut["crs"], "transform": cut["transform"], "shape": cut["cut"]}  # mask a's own grid
        whole = RasterLabels(path=cut["folder"] / "whole.tif").sample(**grid)["mask"]
        merc = RasterLabels(path=tmp_path).sample(**grid)["mask"]
        labelled = merc != 255
        assert labelled.sum() >= 0.8 * (whole != 255).sum() > 0  # the polygons of mask a, found in EPSG:3857
        assert 5 not in merc.unique().tolist()  # 1_... wins over 2_... where both have labels
        assert (merc[labelled] == whole[labelled]).float().mean() > 0.95  # nearest twice: edges may move a pixel
        (tmp_path / "0_fives.tif").write_bytes((tmp_path / "2_fives.tif").read_bytes())  # now first in path order
        fives = RasterLabels(path=[tmp_path / "1_mercator.tif", tmp_path / "0_fives.tif"]).sample(**grid)["mask"]
        assert set(fives.unique().tolist()) == {5, 255}

    def test_mixed_dtypes_and_non_finite_values(self, tmp_path: Path) -> None:
        """Values keep a dtype that holds every file's, and a NaN or ±inf of the first file leaves the pixel to the
        next (as the CHM tiles of height fit were read before the mosaic served them)."""
        from dinov3_eo.data.labels import RasterMosaic

        grid = {"crs": "EPSG:32633", "transform": from_origin(0, 20, 10, 10), "shape": (2, 2)}
        profile = {"driver": "GTiff", "width": 2, "height": 2, "count": 1, "crs": grid["crs"], "transform": grid["transform"]}
        with rasterio.open(tmp_path / "a.tif", "w", dtype="uint8", nodata=0, **profile) as dst:
            dst.write(np.array([[0, 3], [4, 0]], dtype=np.uint8), 1)
        with rasterio.open(tmp_path / "b.tif", "w", dtype="float32", nodata=None, **profile) as dst:
            dst.write(np.array([[2.5, 9.0], [9.0, 7.5]], dtype=np.float32), 1)
        values, found = RasterMosaic(tmp_path).read(resampling=Resampling.nearest, **grid)
        np.testing.assert_array_equal(values, [[2.5, 3.0], [4.0, 7.5]])
        assert values.dtype == np.float32 and found.all()
        with rasterio.open(tmp_path / "a.tif", "w", dtype="float32", nodata=None, **profile) as dst:
            dst.write(np.array([[np.inf, 1.0], [np.nan, -np.inf]], dtype=np.float32), 1)
        values, found = RasterMosaic(tmp_path).read(resampling=Resampling.nearest, **grid)
        np.testing.assert_array_equal(values, [[2.5, 1.0], [9.0, 7.5]])

    def test_datamodule_takes_a_folder_of_masks(self, cut: dict) -> None:
        kwargs = {"paths": str(SAMPLE), "nodata": 0, "tile_size": 128, "cache_dir": None, "normalization": "none",
                  "val_fraction": 0.25, "block_tiles": 1}  # fmt: skip
        folder = DenseDataModule(labels=str(cut["folder"] / "tiles"), **kwargs)
        single = DenseDataModule(labels=str(cut["folder"] / "whole.tif"), **kwargs)
        folder.setup("fit"), single.setup("fit")
        assert folder.train_tiles == single.train_tiles
        labelled = 0
        for tile in folder.train_tiles + folder.val_tiles:
            mask = folder.dataset[tile]["mask"]
            assert torch.equal(mask, single.dataset[tile]["mask"])
            labelled += int((mask != 255).sum())
        assert labelled > 500  # the four polygons, every labelled pixel compared


def test_datamodule_takes_a_geodataframe(tmp_path: Path) -> None:
    """Polygons already in memory label the tiles as their file does, and only a description of them goes into the
    hyper-parameters a checkpoint keeps (which then load with ``weights_only=True``)."""
    frame = gpd.read_file(POLYGONS)
    kwargs = {"paths": str(SAMPLE), "nodata": 0, "tile_size": 128, "cache_dir": None, "normalization": "none",
              "val_fraction": 0.25, "block_tiles": 1}  # fmt: skip
    in_memory, on_disk = DenseDataModule(labels=frame, **kwargs), DenseDataModule(labels=str(POLYGONS), **kwargs)
    in_memory.setup("fit"), on_disk.setup("fit")
    assert in_memory.num_classes == on_disk.num_classes == 4 and in_memory.class_names == on_disk.class_names
    for tile in in_memory.train_tiles[:6]:
        assert torch.equal(in_memory.dataset[tile]["mask"], on_disk.dataset[tile]["mask"])
    assert in_memory.hparams["labels"] == f"<GeoDataFrame, {len(frame)} rows>"
    torch.save(dict(in_memory.hparams), tmp_path / "hparams.pt")
    assert torch.load(tmp_path / "hparams.pt", weights_only=True)["labels"] == f"<GeoDataFrame, {len(frame)} rows>"
    with pytest.raises(ValueError, match=r"vector labels \(<GeoDataFrame, \d+ rows>\) support task='classification'"):
        DenseDataModule(labels=frame, task="regression", **kwargs).setup("fit")


class TestNamePairing:
    """Masks paired with their images by file name: several dates over one place, masks without a georeference."""

    @staticmethod
    def _write(path: Path, data: np.ndarray, **profile: object) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with rasterio.open(path, "w", width=data.shape[-1], height=data.shape[-2], count=1 if data.ndim == 2 else data.shape[0],
                           dtype=data.dtype, **profile) as dst:  # fmt: skip
            dst.write(data if data.ndim == 3 else data[None])
        return path

    @pytest.fixture(scope="class")
    def dates(self, tmp_path_factory: pytest.TempPathFactory) -> dict:
        """The same 192×160 px of the sample scene as two dates, each with its own mask (all 1 in 2020, all 2 in
        2024, nodata in the top rows), plus a third date whose mask is a PNG without a georeference."""
        root = tmp_path_factory.mktemp("dates")
        window = rasterio.windows.Window(64, 320, 160, 192)
        with rasterio.open(SAMPLE) as src:
            pixels = src.read(window=window)
            geo = {"crs": src.crs, "transform": src.window_transform(window)}
        for year in ("2020", "2024"):
            self._write(root / "imgs" / year / "scene.tif", pixels, driver="GTiff", **geo)
        for year, value in (("2020", 1), ("2024", 2)):
            mask = np.full((192, 160), value, dtype=np.uint8)
            mask[:16] = 255
            self._write(root / "masks" / year / "scene.tif", mask, driver="GTiff", nodata=255, **geo)
        self._write(root / "imgs" / "2022" / "scene_RGB.tif", pixels, driver="GTiff", **geo)
        halves = np.zeros((192, 160), dtype=np.uint8)
        halves[:, 80:] = 3
        (root / "masks" / "2022").mkdir()
        Image.fromarray(halves).save(root / "masks" / "2022" / "scene_label.png")
        return {"root": root, "geo": geo, "halves": halves}

    def test_keys_and_folders(self) -> None:
        from dinov3_eo.data.labels import NamePairing, pairing_key, shared_folders

        assert pairing_key("a/top_potsdam_2_10_RGB.tif", ["_RGB", "_label"]) == "top_potsdam_2_10"
        assert pairing_key("b/top_potsdam_2_10_label.tif", ["_RGB", "_label"]) == "top_potsdam_2_10"
        assert pairing_key("x/_label.tif", ["_label"]) == "_label"  # a suffix is never the whole name
        assert pairing_key("x/t1_mask_v2.tif", ["_v2", "_mask_v2"]) == "t1"  # the longest suffix first
        assert shared_folders("imgs/2020/t1.tif", "masks/2020/t1.tif") == 1
        assert shared_folders("a/x/2020/t1.tif", "b/x/2020/t1.tif") == 2
        assert shared_folders("tile1/images/t1.tif", "tile1/masks/t1.tif") == 1  # the split one level up
        layout = NamePairing([f"/d/tile{i}/masks/image_part_001.png" for i in (1, 2, 3)])
        assert layout.find("/d/tile2/images/image_part_001.tif") == 1
        pairing = NamePairing(["/m/2020/t1.tif", "/m/2024/t1.tif", "/m/t2.tif"])
        assert pairing.find("/i/2024/t1.tif") == 1 and pairing.find("/i/2020/t1.tif") == 0
        assert pairing.find("/i/t2.tif") == 2 and pairing.find("/i/t3.tif") is None
        with pytest.raises(ValueError, match="several masks .*2020/t1.tif, /m/2024/t1.tif"):
            pairing.find("/i/2022/t1.tif")

    def test_each_date_reads_its_own_mask(self, dates: dict) -> None:
        root = dates["root"]
        masks = [root / "masks" / "2020", root / "masks" / "2024"]
        grid = {**{k: dates["geo"][k] for k in ("crs", "transform")}, "shape": (192, 160)}
        by_place = RasterLabels(path=masks)
        by_name = RasterLabels(path=masks, pairing="name")
        for year, value in (("2020", 1), ("2024", 2)):
            image = root / "imgs" / year / "scene.tif"
            mask = by_name.sample(**grid, path=image)["mask"]
            assert (mask[:16] == 255).all() and (mask[16:] == value).all()
            assert (by_place.sample(**grid, path=image)["mask"][16:] == 1).all()  # the first path wins for both
        assert (by_name.sample(**grid, path=root / "imgs" / "2022" / "scene_RGB.tif")["mask"] == 255).all()  # no mask
        with pytest.raises(ValueError, match="paired by name are read for an image"):
            by_name.sample(**grid)
        clone = pickle.loads(pickle.dumps(by_name))  # as DataLoader worker processes get it
        assert (clone.sample(**grid, path=root / "imgs" / "2024" / "scene.tif")["mask"][16:] == 2).all()

    def test_mask_without_georeference_reads_on_its_images_grid(self, dates: dict) -> None:
        root = dates["root"]
        with pytest.raises(ValueError, match="scene_label.png is not georeferenced .*pair them by name"):
            RasterLabels(path=root / "masks" / "2022" / "scene_label.png")
        labels = RasterLabels(path=root / "masks", pairing="name", name_suffixes=["_RGB", "_label"])
        assert len(labels.paths) == 3  # a folder yields the PNG too when masks pair by name
        image = root / "imgs" / "2022" / "scene_RGB.tif"
        own = {**{k: dates["geo"][k] for k in ("crs", "transform")}, "shape": (192, 160)}
        np.testing.assert_array_equal(labels.sample(**own, path=image)["mask"].numpy(), dates["halves"])
        # a coarser grid in another CRS (as a tile grid resampled to a common one) still splits at the same place
        from rasterio.warp import calculate_default_transform

        left, top = dates["geo"]["transform"].c, dates["geo"]["transform"].f
        bounds = (left, top - 192 * 30, left + 160 * 30, top)
        transform, width, height = calculate_default_transform(dates["geo"]["crs"], "EPSG:3857", 80, 96, *bounds)
        coarse = labels.sample(crs="EPSG:3857", transform=transform, shape=(height, width), path=image)["mask"].numpy()
        labelled = coarse != 255
        assert labelled.mean() > 0.8
        west_half = np.zeros_like(coarse, dtype=bool)
        west_half[:, : width // 2 - 2] = True
        east_half = np.zeros_like(west_half)
        east_half[:, width // 2 + 2 :] = True
        assert (coarse[west_half & labelled] == 0).all() and (coarse[east_half & labelled] == 3).all()

    def test_clear_errors(self, dates: dict, tmp_path: Path) -> None:
        root = dates["root"]
        small = np.zeros((10, 10), dtype=np.uint8)
        Image.fromarray(small).save(tmp_path / "scene_label.png")
        labels = RasterLabels(path=tmp_path, pairing="name", name_suffixes=["_RGB", "_label"])
        with pytest.raises(ValueError, match=r"has no georeference and is 10x10 px, but its image .*scene_RGB.tif is 160x192"):
            labels.mosaic.pair(root / "imgs" / "2022" / "scene_RGB.tif")
        far = {"crs": dates["geo"]["crs"], "transform": from_origin(0, 1000, 30, 30)}
        self._write(tmp_path / "far" / "scene.tif", small, driver="GTiff", **far)
        with pytest.raises(ValueError, match=r"far/scene.tif, paired by name with the image .*2020/scene.tif, does not overlap"):
            RasterLabels(path=tmp_path / "far", pairing="name").mosaic.pair(root / "imgs" / "2020" / "scene.tif")
        with pytest.raises(ValueError, match=r"no image has a mask of the same name \(images like scene_RGB.tif, masks "
                                             r"like scene_label.png; compared as 'scene_RGB' and 'scene_label'\)"):
            RasterLabels(path=tmp_path / "scene_label.png", pairing="name").mosaic.pair_all(
                [root / "imgs" / "2022" / "scene_RGB.tif"])
        with pytest.raises(ValueError, match="pairing must be one of"):
            RasterLabels(path=tmp_path, pairing="stem")

    def test_datamodule_pairs_by_name_and_leaves_out_images_without_a_mask(
        self, dates: dict, caplog: pytest.LogCaptureFixture
    ) -> None:
        root = dates["root"]
        kwargs = {"paths": str(root / "imgs"), "labels": str(root / "masks"), "tile_size": 32, "cache_dir": None,
                  "normalization": "none", "val_fraction": 0.25, "block_tiles": 1}  # fmt: skip
        with pytest.raises(ValueError, match="label_pairing must be one of"):
            DenseDataModule(label_pairing="names", **kwargs)
        with pytest.raises(ValueError, match="pairs label rasters with images; the vector labels"):
            DenseDataModule(**{**kwargs, "labels": str(POLYGONS)}, label_pairing="name").setup("fit")
        with caplog.at_level("WARNING", logger="dinov3_eo.data.labels"):
            dm = DenseDataModule(label_pairing="name", **kwargs)  # scene_RGB.tif has no scene_RGB mask
            dm.setup("fit")
        assert "1 of 3 images have no mask of the same name and are left out, e.g. scene_RGB.tif" in caplog.text
        assert "1 of 3 masks pair with no image, e.g. scene_label.png" in caplog.text
        files = {dm.index.records[t.file].path.split("/")[-2] for t in dm.train_tiles + dm.val_tiles}
        assert files == {"2020", "2024"}
        seen = {"2020": set(), "2024": set()}
        for tile in dm.train_tiles + dm.val_tiles:
            sample = dm.dataset[tile]
            seen[sample["path"].split("/")[-2]].update(sample["mask"].unique().tolist())
        assert seen["2020"] - {255} == {1} and seen["2024"] - {255} == {2}  # never the other date's mask
        named = DenseDataModule(label_pairing="name", label_name_suffixes=["_RGB", "_label"], **kwargs)
        named.setup("fit")
        assert len({t.file for t in named.train_tiles + named.val_tiles}) == 3
        assert classes_of_labels(root / "masks", pairing="name") == (4, None)  # the PNG's 3 counts


class TestLegend:
    """The class names and colours label files carry (a vector ``color`` column, a raster's tag and colour table)."""

    @pytest.mark.parametrize("value, rgb", [("#1f78b4", (31, 120, 180)), ("#ABC", (170, 187, 204)),
                                            ("31,120,180", (31, 120, 180)), (" 31 120 180 ", (31, 120, 180)),
                                            ([31, 120, 180], (31, 120, 180)), ((1, 2, 3, 255), (1, 2, 3))])
    def test_parse_color(self, value: object, rgb: tuple) -> None:
        assert parse_color(value, where="x") == rgb

    @pytest.mark.parametrize("value", ["blue", "#12345", "#gggggg", "300,0,0", "1,2", None, 7])
    def test_parse_color_refuses_naming_where(self, value: object) -> None:
        with pytest.raises(ValueError, match="legend.gpkg, row 3"):
            parse_color(value, where="legend.gpkg, row 3")

    def test_vector_colour_column_and_names(self, tmp_path: Path) -> None:
        import pandas as pd

        frame = gpd.read_file(POLYGONS)  # one polygon per class: crop gets two more copies
        frame = gpd.GeoDataFrame(pd.concat([frame] + [frame[frame["name"] == "crop"]] * 2, ignore_index=True),
                                 crs=frame.crs)  # fmt: skip
        colours = {"water": "#1f78b4", "crop": "240,200,60", "tree": "#1e8c32", "developed": None}
        frame["colour"] = [colours[n] for n in frame["name"]]
        first_crop = int(frame.index[frame["name"] == "crop"][0])
        frame.loc[first_crop, "colour"] = "#ff0000"  # one of three disagrees: the class keeps its most frequent
        frame.to_file(tmp_path / "legend.gpkg")
        labels = VectorLabels(path=tmp_path / "legend.gpkg", attribute="name")
        assert labels.class_names == {0: "crop", 1: "developed", 2: "tree", 3: "water"}
        assert labels.class_colors == {0: (240, 200, 60), 2: (30, 140, 50), 3: (31, 120, 180)}  # developed: none
        assert pickle.loads(pickle.dumps(labels)).class_colors == labels.class_colors
        # integer classes have no names; a named colour column must exist; a bad colour names its row
        frame["code"] = [{"crop": 1, "developed": 2, "tree": 3, "water": 4}[n] for n in frame["name"]]
        frame.to_file(tmp_path / "codes.gpkg")
        assert VectorLabels(path=tmp_path / "codes.gpkg", attribute="code").class_names == {}
        with pytest.raises(KeyError, match="no colour column 'rgb'"):
            VectorLabels(path=tmp_path / "codes.gpkg", attribute="code", color_attribute="rgb")
        frame.loc[first_crop, "colour"] = "reddish"
        frame.to_file(tmp_path / "bad.gpkg")
        with pytest.raises(ValueError, match=rf"bad.gpkg, row {first_crop} \(name='crop'\), column 'colour'"):
            VectorLabels(path=tmp_path / "bad.gpkg", attribute="name")
        assert VectorLabels(path=POLYGONS).class_colors == {}  # no colour column
        in_memory = VectorLabels(path=frame.drop(index=first_crop), attribute="name")  # a GeoDataFrame, no file
        assert in_memory.class_colors[0] == (240, 200, 60) and in_memory.path == "the GeoDataFrame"
        with rasterio.open(SAMPLE) as src:
            window = {"crs": src.crs, "transform": src.transform, "shape": (src.height, src.width)}
            from_file = VectorLabels(path=POLYGONS).sample(**window)["mask"]
            assert torch.equal(pickle.loads(pickle.dumps(in_memory)).sample(**window)["mask"], from_file)

    def test_raster_tag_and_colour_table(self, tmp_path: Path) -> None:
        profile = {"driver": "GTiff", "width": 4, "height": 4, "count": 1, "dtype": "uint8", "crs": "EPSG:32618",
                   "transform": from_origin(0, 40, 10, 10), "nodata": 255}
        with rasterio.open(tmp_path / "legend.tif", "w", **profile) as dst:
            dst.write(np.arange(16, dtype=np.uint8).reshape(4, 4) % 3, 1)
            dst.update_tags(class_names='["water", "crop", "tree"]')
            dst.write_colormap(1, {0: (31, 120, 180, 255), 1: (240, 200, 60, 255), 2: (30, 140, 50, 255)})
        labels = RasterLabels(path=tmp_path / "legend.tif")
        assert labels.class_names == {0: "water", 1: "crop", 2: "tree"}
        assert {i: labels.class_colors[i] for i in range(3)} == {0: (31, 120, 180), 1: (240, 200, 60), 2: (30, 140, 50)}
        with rasterio.open(tmp_path / "plain.tif", "w", **profile) as dst:
            dst.write(np.zeros((4, 4), dtype=np.uint8), 1)
        plain = RasterLabels(path=tmp_path / "plain.tif")
        assert plain.class_names == {} and plain.class_colors == {}


class TestChips:
    @pytest.fixture()
    def chips(self, tmp_path: Path) -> Path:
        rng = np.random.default_rng(0)
        for cls in ("Forest", "River"):
            (tmp_path / cls).mkdir()
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / cls / f"{cls}_{i}.jpg")
        return tmp_path

    def test_chip_samples(self, chips: Path) -> None:
        ds = ChipFolderDataset(chips=str(chips / "*" / "*.jpg"))
        assert len(ds) == 6
        s = ds[0]
        ref = np.asarray(Image.open(ds.paths[0]).convert("RGB")).transpose(2, 0, 1)
        np.testing.assert_array_equal(s["image"].numpy(), ref.astype(np.float32))
        assert s["valid"].all() and s["bounds"] is None and s["crs"] is None
        resized = ChipFolderDataset(chips=chips, size=128, normalization=Normalization.preset("sat493m"))[0]
        assert resized["image"].shape == (3, 128, 128)
        with pytest.raises(FileNotFoundError, match="matched no image files"):
            ChipFolderDataset(chips=str(chips / "*.png"))

    def test_mixed_dataset_dispatch(self, chips: Path, grid: TileGrid) -> None:
        mixed = MixedDataset(tiles=TileDataset(grid=grid), chips=ChipFolderDataset(chips=chips, size=128))
        batch = collate_samples([mixed[Tile(0, 0, 0, 128)], mixed[2]])
        assert batch["image"].shape == (2, 3, 128, 128) and batch["crs"][1] is None
        with pytest.raises(TypeError, match="no chip dataset"):
            MixedDataset(tiles=TileDataset(grid=grid))[0]

    def test_mixed_dataset_batches(self, chips: Path, grid: TileGrid) -> None:
        tiles = TileDataset(grid=grid)
        mixed = MixedDataset(tiles=tiles, chips=ChipFolderDataset(chips=chips, size=128))
        only_tiles = mixed.__getitems__([Tile(0, 0, 0, 128), Tile(0, 128, 0, 128)])
        assert collate_samples(only_tiles)["image"].data_ptr() == only_tiles[0]["image"].data_ptr()
        both = collate_samples(mixed.__getitems__([Tile(0, 0, 0, 128), 2]))
        torch.testing.assert_close(both["image"][0], tiles[Tile(0, 0, 0, 128)]["image"])
        assert both["crs"][1] is None


class TestHandlesAtExit:
    def test_release_closes_the_calling_threads_handles_and_exit_releases_all(self, tmp_path: Path) -> None:
        from dinov3_eo.data.raster import _release_at_exit

        sample = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
        grid = TileGrid(index=RasterIndex.build(sample, cache_dir=None), tile_size=32)
        dataset = TileDataset(grid=grid, nodata=0)
        tile = Tile(0, 0, 0, 32)
        dataset[tile]
        (src, _), = dataset.reader._handles.get().values()
        dataset.reader.close()
        assert src.closed
        dataset[tile]  # reopens in a fresh handle cache
        (src, _), = dataset.reader._handles.get().values()
        labels = RasterLabels(path=sample, band=1)
        label_src = labels.mosaic.open(0)
        _release_at_exit()  # what atexit runs: every PerThread lets go of this thread's state
        assert src.closed and label_src.closed
        np.testing.assert_array_equal(dataset[tile]["image"].numpy(), dataset[tile]["image"].numpy())  # still usable

    @pytest.mark.slow
    def test_cli_run_ends_without_teardown_errors(self, tmp_path: Path) -> None:
        # the CLI keeps its datamodule (and its open datasets) until the interpreter's teardown, where rasterio's
        # __del__ used to fail and Python printed a bare "Error in sys.excepthook"
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, "-m", "dinov3_eo", "pretrain", "fit", "--config", str(ROOT / "configs/pretrain/tiny_cpu.yaml"),
             "--trainer.max_steps", "1", "--trainer.default_root_dir", str(tmp_path), "--data.cache_dir",
             str(tmp_path / "cache"), "--trainer.enable_progress_bar", "false", "--data.paths",
             str(ROOT / "dinov3_eo/sample/landsat8_224078_subset.tif")],
            capture_output=True, text=True, cwd=tmp_path, timeout=600,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert "Error in sys.excepthook" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr[-2000:]
