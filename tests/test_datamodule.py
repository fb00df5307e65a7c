"""Lightning data modules: batches, chips mixed in, spatial-block splits, YAML configuration."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import rasterio
import torch
import yaml
from PIL import Image

from dinov3_eo.data.datamodule import DenseDataModule, PretrainDataModule, build_normalization
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.sampling import Tile, TileGrid, spatial_block_split
from dinov3_eo.data.stats import compute_band_stats

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_polygons.gpkg"


def grid_tiles_minus(full: tuple[list, list], kept: tuple[list, list]) -> list:
    """Tiles of ``full`` (train, val) that are in neither list of ``kept``."""
    kept_set = set(kept[0]) | set(kept[1])
    return [t for t in full[0] + full[1] if t not in kept_set]


@pytest.fixture()
def chips(tmp_path: Path) -> str:
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"chip_{i}.jpg")
    return str(tmp_path / "*.jpg")


class TestPretrainDataModule:
    def test_tiles_and_chips(self, chips: str) -> None:
        dm = PretrainDataModule(paths=str(SAMPLE), chips=chips, nodata=0, tile_size=64, tiles_per_epoch=11, batch_size=4, cache_dir=None)
        loader = dm.train_dataloader()
        batches = list(loader)
        assert sum(len(b["path"]) for b in batches) == 16 and len(loader) == 4
        images = torch.cat([b["image"] for b in batches])
        assert images.shape == (16, 3, 64, 64) and torch.isfinite(images).all()
        crs = [c for b in batches for c in b["crs"]]
        assert sum(c is None for c in crs) == 5  # the chips
        meta = dm.metadata()
        assert meta["bands"] == ["B1", "B2", "B3"] and meta["normalization"]["name"] == "zscore"
        assert meta["gsd"] == 30.0  # the scene's own 30 m pixels, tiles not resampled: checkpoints record the scale
        assert Normalization.from_dict(meta["normalization"]) == dm.normalization

    def test_chips_crop_keeps_each_chips_own_resolution(self, tmp_path: Path) -> None:
        """``chips_crop``: one tile-size window per chip at its own resolution, placed anew each epoch and the same
        for the same (seed, epoch) (a resumed run draws what the uninterrupted one drew); a chip smaller than the
        tile is resized whole, as without ``chips_crop``."""
        from dinov3_eo.data.sampling import ChipCrop

        rng = np.random.default_rng(0)
        big = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
        Image.fromarray(big).save(tmp_path / "big.png")
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "small.png")
        dm = PretrainDataModule(chips=str(tmp_path / "*.png"), chips_crop=True, chips_normalization="none", tile_size=64,
                                batch_size=2, seed=3)  # fmt: skip
        dm.setup("fit")
        sampler = dm.sampler
        windows = {}
        for epoch in (0, 1, 0):
            sampler.set_epoch(epoch)
            keys = list(sampler)
            assert all(isinstance(k, ChipCrop) and k.size == 64 for k in keys) and sorted(k.chip for k in keys) == [0, 1]
            windows.setdefault(epoch, keys)
            assert keys == windows[epoch]
        (first,) = [k for k in windows[0] if dm.dataset.chips.paths[k.chip].endswith("big.png")]
        (second,) = [k for k in windows[1] if k.chip == first.chip]
        assert (first.row, first.col) != (second.row, second.col)
        assert 0 <= first.row <= 150 - 64 and 0 <= first.col <= 200 - 64
        sample = dm.dataset[first]
        window = big[first.row : first.row + 64, first.col : first.col + 64].transpose(2, 0, 1)
        assert torch.equal(sample["image"], torch.from_numpy(window.astype(np.float32)))  # no resampling at all
        (small,) = [k for k in windows[0] if k.chip != first.chip]
        assert small.row == small.col == 0 and dm.dataset[small]["image"].shape == (3, 64, 64)  # resized whole
        batch = next(iter(dm.train_dataloader()))
        assert tuple(batch["image"].shape) == (2, 3, 64, 64)

    def test_training_gsd_is_the_resampling_target_or_the_archive_pixel_size(self, tmp_path: Path) -> None:
        from dinov3_eo.data.raster import pixel_size_m

        assert PretrainDataModule(paths=str(SAMPLE), nodata=0, cache_dir=None).training_gsd is None  # before setup
        dm = PretrainDataModule(paths=str(SAMPLE), nodata=0, cache_dir=None, units="m", tile_size=1920, gsd=60.0)
        assert dm.training_gsd == 60.0
        with rasterio.open(SAMPLE) as src:
            assert pixel_size_m(src.crs, src.transform) == 30.0
            assert pixel_size_m(rasterio.crs.CRS.from_epsg(4326), src.transform) is None  # degrees: no metres
            assert pixel_size_m(rasterio.crs.CRS.from_epsg(2264), src.transform) == pytest.approx(30 * 0.3048006)  # US ft

    def test_stats_file_and_presets(self, tmp_path: Path) -> None:
        index = RasterIndex.build(SAMPLE, cache_dir=None)
        stats_path = tmp_path / "stats.json"
        compute_band_stats(index, nodata=0, num_windows=4, window_size=128, progress=False).save(stats_path)
        dm = PretrainDataModule(paths=str(SAMPLE), nodata=0, normalization="percentile", stats=str(stats_path), cache_dir=None,
                                tile_size=64, tiles_per_epoch=2, batch_size=2)
        dm.setup()
        assert dm.normalization.name == "percentile" and dm.normalization.low is not None
        preset = build_normalization("sat493m", preset_range=(0, 10000))
        assert preset.name == "sat493m" and preset.high == (10000.0,) * 3
        with pytest.raises(ValueError, match="normalization must be one of"):
            build_normalization("minmax")
        with pytest.raises(ValueError, match="needs stats="):
            build_normalization("zscore")

    def test_ranks_get_disjoint_tiles(self) -> None:
        tiles = []
        for rank in range(2):
            dm = PretrainDataModule(paths=str(SAMPLE), nodata=0, tile_size=64, tiles_per_epoch=20, normalization="none",
                                    cache_dir=None, rank=rank, world_size=2)
            dm.setup()
            tiles.append(set(dm.sampler))
        assert len(tiles[0]) == len(tiles[1]) == 10 and not tiles[0] & tiles[1]

    def test_yaml_config_maps_onto_constructor(self, tmp_path: Path) -> None:
        from jsonargparse import ArgumentParser

        config = {"data": {"paths": str(SAMPLE), "nodata": 0, "tile_size": 64, "tiles_per_epoch": 4, "batch_size": 2,
                           "normalization": "sat493m", "preset_range": [0, 20000], "cache_dir": None}}
        path = tmp_path / "data.yaml"
        path.write_text(yaml.safe_dump(config))
        parser = ArgumentParser()
        parser.add_class_arguments(PretrainDataModule, "data")
        cfg = parser.parse_path(str(path))
        dm = PretrainDataModule(**cfg.data.as_dict())
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape == (2, 3, 64, 64)

    def test_needs_a_source(self) -> None:
        with pytest.raises(ValueError, match="give paths="):
            PretrainDataModule()

    @pytest.mark.slow
    def test_trainer_fast_dev_run(self, chips: str) -> None:
        class Tiny(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 1, 1)

            def training_step(self, batch, batch_idx):
                return self.conv(batch["image"]).mean()

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

        dm = PretrainDataModule(paths=str(SAMPLE), chips=chips, nodata=0, tile_size=32, tiles_per_epoch=4, batch_size=2, cache_dir=None)
        trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.fit(Tiny(), datamodule=dm)
        assert trainer.state.finished


class TestDenseDataModule:
    def test_vector_labels_and_block_split(self) -> None:
        dm = DenseDataModule(paths=str(SAMPLE), labels=str(POLYGONS), nodata=0, tile_size=64, block_tiles=2, val_fraction=0.25,
                             batch_size=4, cache_dir=None)
        dm.setup()
        assert dm.num_classes == 4
        train_blocks = {(t.file, t.row // 128, t.col // 128) for t in dm.train_tiles}
        val_blocks = {(t.file, t.row // 128, t.col // 128) for t in dm.val_tiles}
        assert train_blocks and val_blocks and not train_blocks & val_blocks
        assert not {(t.row, t.col) for t in dm.train_tiles} & {(t.row, t.col) for t in dm.val_tiles}
        batch = next(iter(dm.val_dataloader()))
        assert batch["mask"].dtype == torch.int64 and batch["mask"].shape == (4, 64, 64)
        labels = torch.cat([b["mask"].flatten() for b in dm.train_dataloader()] + [b["mask"].flatten() for b in dm.val_dataloader()])
        assert set(labels.unique().tolist()) == {0, 1, 2, 3, 255}

    def test_class_pixel_counts_are_the_training_tiles_labels(self) -> None:
        dm = DenseDataModule(paths=str(SAMPLE), labels=str(POLYGONS), nodata=0, tile_size=64, block_tiles=2, val_fraction=0.25,
                             batch_size=4, cache_dir=None)
        counts = dm.class_pixel_counts(4, progress=False)
        expected = np.zeros(4, dtype=np.int64)
        for tile in dm.train_tiles:  # one tile at a time, straight from the dataset
            mask = dm.dataset[tile]["mask"].numpy()
            expected += np.bincount(mask[mask != 255], minlength=4)
        assert counts.dtype == np.int64 and (counts == expected).all() and (counts > 0).all()
        threaded = DenseDataModule(paths=str(SAMPLE), labels=str(POLYGONS), nodata=0, tile_size=64, block_tiles=2,
                                   val_fraction=0.25, batch_size=3, num_workers=2, cache_dir=None)
        assert (threaded.class_pixel_counts(4, progress=False) == counts).all()
        with pytest.raises(ValueError, match=r"labels \[3\] fall outside 0\.\.2"):
            dm.class_pixel_counts(3, progress=False)

    def test_split_is_deterministic_and_covers_valid_area(self) -> None:
        grid = TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=64)
        a = spatial_block_split(grid, block_tiles=3, val_fraction=0.3, seed=1, nodata=0)
        b = spatial_block_split(grid, block_tiles=3, val_fraction=0.3, seed=1, nodata=0)
        assert a == b
        assert len(a[0]) + len(a[1]) == 7 * 15  # ceil(448/64) x ceil(928/64): the collar is < 90 % of any tile
        train, val = spatial_block_split(grid, block_tiles=3, val_fraction=0.3, seed=1, nodata=0, max_nodata_fraction=0.0)
        with rasterio.open(SAMPLE) as src:
            invalid = np.ones((15 * 64, 7 * 64), dtype=bool)  # pixels past the raster edge are invalid too
            invalid[: src.height, : src.width] = (src.read() == 0).all(axis=0)
        dropped = grid_tiles_minus(a, (train, val))
        assert len(dropped) == 12
        for tile in dropped:
            assert invalid[tile.row : tile.row + 64, tile.col : tile.col + 64].mean() > 0
        with pytest.raises(ValueError, match="0 < val_fraction < 1"):
            spatial_block_split(grid, block_tiles=3, val_fraction=1.0)

    def test_blocks_are_places_on_the_ground(self, tmp_path: Path) -> None:
        """One file splits as it always did (blocks of its own grid); two dates of one place put the same ground in
        the same split, and so does a copy of the scene reprojected to another CRS (tile centres decide)."""
        import math
        import shutil

        from rasterio.warp import Resampling, calculate_default_transform, reproject

        single = TileGrid(index=RasterIndex.build(SAMPLE, cache_dir=None), tile_size=64)
        train, val = spatial_block_split(single, block_tiles=3, val_fraction=0.3, seed=1, nodata=0)
        # the split before blocks were laid on the ground: per file, keyed (file, block row, block column)
        old_blocks: dict = {}
        for tile in train + val:
            old_blocks.setdefault((tile.file, tile.row // 64 // 3, tile.col // 64 // 3), []).append(tile)
        keys = sorted(old_blocks)
        order = np.random.default_rng(1).permutation(len(keys))
        old_val = {keys[i] for i in order[: min(max(int(round(0.3 * len(keys))), 1), len(keys) - 1)]}
        assert val == [t for k in keys if k in old_val for t in old_blocks[k]]

        for year in ("2020", "2024"):
            (tmp_path / year).mkdir()
            shutil.copy(SAMPLE, tmp_path / year / "scene.tif")
        with rasterio.open(SAMPLE) as src:
            transform, width, height = calculate_default_transform(src.crs, "EPSG:3857", src.width, src.height,
                                                                   *src.bounds)  # fmt: skip
            data = np.zeros((src.count, height, width), dtype=src.dtypes[0])
            reproject(src.read(), data, src_transform=src.transform, src_crs=src.crs, dst_transform=transform,
                      dst_crs="EPSG:3857", resampling=Resampling.nearest, src_nodata=0, dst_nodata=0)  # fmt: skip
            profile = {**src.profile, "crs": "EPSG:3857", "transform": transform, "width": width, "height": height}
        with rasterio.open(tmp_path / "mercator.tif", "w", **profile) as dst:
            dst.write(data)
        grid = TileGrid(index=RasterIndex.build(tmp_path, cache_dir=None), tile_size=64)
        names = [Path(r.path).parent.name + "/" + Path(r.path).name for r in grid.index.records]
        train, val = spatial_block_split(grid, block_tiles=3, val_fraction=0.3, seed=1, nodata=0)
        split = {t: "val" for t in val} | {t: "train" for t in train}
        dates = [names.index("2020/scene.tif"), names.index("2024/scene.tif")]
        same_place = [(split.get(Tile(dates[0], t.row, t.col, 64)), split.get(Tile(dates[1], t.row, t.col, 64)))
                      for t in split if t.file == dates[0]]
        assert same_place and all(a == b for a, b in same_place)  # never the same ground in both splits
        assert {a for a, _ in same_place} == {"train", "val"}
        # the reprojected copy: each tile's split is the split of the original's tile under its centre
        merc = next(i for i, n in enumerate(names) if n.endswith("/mercator.tif"))
        g0, gm = grid.grids[dates[0]], grid.grids[merc]
        from rasterio.warp import transform as transform_points

        agree = total = 0
        for tile in (t for t in split if t.file == merc):
            x, y = gm.transform @ (tile.col + 32, tile.row + 32)
            (x,), (y,) = transform_points(gm.crs, g0.crs, [x], [y])
            col, row = (~g0.transform) @ (x, y)
            under = Tile(dates[0], math.floor(row / 64) * 64, math.floor(col / 64) * 64, 64)
            if under in split:
                total += 1
                agree += split[under] == split[tile]
        assert total > 20 and agree == total

    def test_files_held_out_for_validation_and_test(self, tmp_path: Path) -> None:
        """A benchmark's own split (``*/val/*``, ``*/test/*`` folders): whole files are held out, no fit reads the
        test files, and the normalisation's statistics come from the training files alone."""
        import shutil

        for split in ("train", "val", "test"):
            (tmp_path / split).mkdir()
            shutil.copy(SAMPLE, tmp_path / split / "scene.tif")
        with rasterio.open(SAMPLE) as src:  # brighter test scene: statistics over every file would move
            profile, values = src.profile, src.read()
        with rasterio.open(tmp_path / "test" / "scene.tif", "w", **profile) as dst:
            dst.write(np.where(values > 0, values * 2, 0).astype(values.dtype))
        common = dict(paths=str(tmp_path), labels=str(POLYGONS), nodata=0, tile_size=64, batch_size=4, cache_dir=None)
        dm = DenseDataModule(**common, val_files=["*/val/*"], test_files=["*/test/*"])
        dm.setup()
        folders = [Path(r.path).parent.name for r in dm.index.records]
        assert {folders[t.file] for t in dm.train_tiles} == {"train"} and {folders[t.file] for t in dm.val_tiles} == {"val"}
        assert {folders[t.file] for t in dm.test_tiles} == {"test"}
        assert len(dm.train_tiles) == len(dm.val_tiles) == len(dm.test_tiles) == 7 * 15  # whole files
        alone = build_normalization("zscore", index=RasterIndex.build(tmp_path / "train", cache_dir=None), nodata=0)
        everything = build_normalization("zscore", index=dm.index, nodata=0)
        assert dm.normalization.to_dict() == alone.to_dict() != everything.to_dict()
        batch = next(iter(dm.test_dataloader()))
        assert batch["mask"].shape == (4, 64, 64)

        # a test set alone: validation stays spatial blocks, over the other files only
        blocks = DenseDataModule(**common, test_files=["*/test/*"], block_tiles=2, val_fraction=0.25)
        blocks.setup()
        folders = [Path(r.path).parent.name for r in blocks.index.records]
        assert {folders[t.file] for t in blocks.train_tiles + blocks.val_tiles} == {"train", "val"}
        assert {folders[t.file] for t in blocks.test_tiles} == {"test"} and blocks.val_tiles

        with pytest.raises(ValueError, match=r"val_files \['\*/nothing/\*'\] match none of the images"):
            DenseDataModule(**common, val_files=["*/nothing/*"]).setup()
        with pytest.raises(ValueError, match="matches both val_files"):
            DenseDataModule(**common, val_files=["*/val/*"], test_files=["*/val/*"]).setup()
        with pytest.raises(ValueError, match="none is left to train on"):
            DenseDataModule(**common, val_files=["*/val/*", "*/train/*"], test_files=["*/test/*"]).setup()
        with pytest.raises(ValueError, match="testing needs test_files"):
            DenseDataModule(**common).test_dataloader()

    def test_regression_from_raster(self, tmp_path: Path) -> None:
        with rasterio.open(SAMPLE) as src:
            profile = src.profile | {"count": 1, "dtype": "float32", "nodata": -1.0}
            data = src.read(1).astype("float32") / 1000
        path = tmp_path / "target.tif"
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data[None])
        dm = DenseDataModule(paths=str(SAMPLE), labels=str(path), task="regression", nodata=0, tile_size=128, block_tiles=1,
                             normalization="none", batch_size=2, cache_dir=None)
        batch = next(iter(dm.train_dataloader()))
        target, image = batch["target"], batch["image"]
        valid = batch["valid"]
        torch.testing.assert_close(target[valid], image[:, 0][valid] / 1000)
        with pytest.raises(ValueError, match="vector labels .* support task='classification' only"):
            DenseDataModule(paths=str(SAMPLE), labels=str(POLYGONS), task="regression", cache_dir=None).setup()
