"""Caption data: tables (CSV / JSONL / Parquet, windows and bounds), class folders, labels as captions."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from dinov3_eo.tasks.captions import (
    CaptionTableDataset,
    ChipMaskDataset,
    ClassFolderCaptionDataset,
    LabelCaptionDataset,
    TextDataModule,
    caption_from_mask,
    read_caption_table,
)
from dinov3_eo.tasks.prompts import REMOTE_SENSING_TEMPLATES

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = SAMPLE.with_name("landsat8_224078_polygons.gpkg")


@pytest.fixture
def chip(tmp_path: Path) -> Path:
    """A real 48 x 40 RGB chip cut from the bundled Landsat sample (8-bit stretch), saved as PNG."""
    with rasterio.open(SAMPLE) as src:
        raw = src.read(window=Window(100, 200, 40, 48)).astype(np.float32)
    rgb = np.clip((raw[::-1] - 6000) / 6000 * 255, 0, 255).astype(np.uint8).transpose(1, 2, 0)
    path = tmp_path / "chips" / "a.png"
    path.parent.mkdir()
    Image.fromarray(rgb).save(path)
    return path


class TestCaptionTable:
    def _rows(self, chip: Path) -> list[dict]:
        return [
            {"image": f"chips/{chip.name}", "caption": "a river"},
            {"image": str(SAMPLE), "caption": "farmland", "window": "10,20,32,48"},
            {"image": str(SAMPLE), "caption": "city", "bounds": [737145, -2789595, 739065, -2787675]},
        ]

    def test_formats_agree(self, tmp_path: Path, chip: Path) -> None:
        import pandas as pd

        rows = self._rows(chip)
        pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        tables = [read_caption_table(tmp_path / f"t.{ext}") for ext in ("csv", "jsonl")]
        assert tables[0] == tables[1]
        first = tables[0]
        assert first[0].path == str(chip.resolve())  # relative to the table's folder
        assert first[1].window == (10, 20, 32, 48) and first[1].bounds is None
        assert first[2].bounds == (737145.0, -2789595.0, 739065.0, -2787675.0)

    def test_parquet(self, tmp_path: Path, chip: Path) -> None:
        import pandas as pd

        frame = pd.DataFrame(self._rows(chip))
        frame["bounds"] = frame["bounds"].map(lambda b: None if not isinstance(b, list) else ",".join(map(str, b)))
        frame.to_csv(tmp_path / "t.csv", index=False)
        try:
            frame.to_parquet(tmp_path / "t.parquet")
        except ImportError:
            (tmp_path / "t.parquet").write_bytes(b"PAR1")
            with pytest.raises(ImportError, match="needs pyarrow"):
                read_caption_table(tmp_path / "t.parquet")
            return
        assert read_caption_table(tmp_path / "t.parquet") == read_caption_table(tmp_path / "t.csv")

    def test_reads_match_rasterio(self, tmp_path: Path, chip: Path) -> None:
        import pandas as pd

        pd.DataFrame(self._rows(chip)).to_csv(tmp_path / "t.csv", index=False)
        ds = CaptionTableDataset(table=tmp_path / "t.csv")
        plain = ds[0]
        assert plain["image"].shape == (3, 48, 40) and plain["caption"] == "a river" and plain["valid"].all()
        assert torch.equal(plain["image"], torch.from_numpy(np.asarray(Image.open(chip)).transpose(2, 0, 1).astype(np.float32)))
        with rasterio.open(SAMPLE) as src:
            expected = src.read(window=Window(10, 20, 32, 48)).astype(np.float32)
            by_bounds = src.read(window=src.window(737145, -2789595, 739065, -2787675)).astype(np.float32)
        assert torch.equal(ds[1]["image"], torch.from_numpy(expected))
        assert torch.equal(ds[2]["image"], torch.from_numpy(by_bounds)) and ds[2]["image"].shape == (3, 64, 64)

    def test_bounds_in_another_crs(self, tmp_path: Path) -> None:
        box = (737145, -2789595, 739065, -2787675)
        lonlat = transform_bounds("EPSG:32621", "EPSG:4326", *box)
        rows = [{"image": str(SAMPLE), "caption": "x", "bounds": list(box)},
                {"image": str(SAMPLE), "caption": "x", "bounds": list(lonlat), "bounds_crs": "EPSG:4326"}]  # fmt: skip
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        ds = CaptionTableDataset(table=tmp_path / "t.jsonl", size=32)
        a, b = ds[0]["image"], ds[1]["image"]
        assert a.shape == b.shape == (3, 32, 32)
        # the round trip through lon/lat grows the box by at most a pixel or two; the pictures stay alike
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9

    def test_window_past_the_edge_is_invalid(self, tmp_path: Path) -> None:
        (tmp_path / "t.jsonl").write_text(json.dumps({"image": str(SAMPLE), "caption": "x", "window": [-16, 0, 32, 32]}))
        sample = CaptionTableDataset(table=tmp_path / "t.jsonl")[0]
        assert not sample["valid"][:, :16].any() and sample["valid"][:, 16:].all()
        assert (sample["image"][:, :, :16] == 0).all()

    @pytest.mark.parametrize(
        ("rows", "match"),
        [
            ([{"file": "a.png", "caption": "x"}], "needs columns 'image'"),
            ([{"image": "a.png", "caption": " "}], "row 0: the caption is empty"),
            ([{"image": "a.tif", "caption": "x", "window": "1,2,3,4", "bounds": "1,2,3,4"}], "not both"),
            ([{"image": "a.tif", "caption": "x", "window": "1,2,3"}], "needs four numbers"),
            ([{"image": "a.tif", "caption": "x", "window": "1,2,b,4"}], "is not four numbers"),
        ],
    )
    def test_bad_tables(self, tmp_path: Path, rows: list[dict], match: str) -> None:
        (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        with pytest.raises(ValueError, match=match):
            read_caption_table(tmp_path / "t.jsonl")

    def test_missing_and_unknown_format(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="does not exist"):
            read_caption_table(tmp_path / "nope.csv")
        (tmp_path / "t.txt").write_text("x")
        with pytest.raises(ValueError, match="unknown format"):
            read_caption_table(tmp_path / "t.txt")


class TestClassFolders:
    @pytest.fixture
    def root(self, tmp_path: Path) -> Path:
        rng = np.random.default_rng(0)
        for name in ("SeaLake", "AnnualCrop", "Forest"):
            (tmp_path / name).mkdir()
            for i in range(8):
                Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / name / f"{name}_{i}.png")
        return tmp_path

    def test_split_is_stratified_disjoint_and_seeded(self, root: Path) -> None:
        train = ClassFolderCaptionDataset(root=root, split="train", test_fraction=0.25)
        test = ClassFolderCaptionDataset(root=root, split="test", test_fraction=0.25)
        assert train.classes == ["annual crop", "forest", "sea lake"]
        assert not set(train.paths) & set(test.paths) and len(train) + len(test) == 24
        assert np.bincount(test.labels).tolist() == [2, 2, 2]
        assert ClassFolderCaptionDataset(root=root, split="test").paths == test.paths
        assert ClassFolderCaptionDataset(root=root, split="test", split_seed=1).paths != test.paths

    def test_captions_from_templates(self, root: Path) -> None:
        ds = ClassFolderCaptionDataset(root=root, size=32)
        sample = ds[0]
        assert sample["image"].shape == (3, 32, 32) and sample["label"].item() == 0
        assert sample["caption_key"] == "annual crop" and "annual crop" in sample["caption"]
        assert sample["caption"] in [t.format("annual crop") for t in REMOTE_SENSING_TEMPLATES]
        first = [ds[i]["caption"] for i in range(len(ds))]
        assert first == [ds[i]["caption"] for i in range(len(ds))]  # reproducible
        ds.set_epoch(1)
        assert first != [ds[i]["caption"] for i in range(len(ds))]  # a new epoch draws new templates
        assert pickle.loads(pickle.dumps(ds))[0]["caption"] == ds[0]["caption"]

    def test_errors(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="no class folders"):
            ClassFolderCaptionDataset(root=tmp_path)
        with pytest.raises(ValueError, match="split must be"):
            ClassFolderCaptionDataset(root=tmp_path, split="val")  # type: ignore[arg-type]


class TestLabelsAsCaptions:
    def test_caption_from_mask(self) -> None:
        mask = np.full((10, 10), 255)
        mask[:5] = 2  # 50 pixels
        mask[5:8] = 0  # 30
        mask[8, :4] = 1  # 4 -> below 10 % of the 84 labelled pixels
        names = ["water", "crop", "tree", ""]
        rng = np.random.default_rng(0)
        caption, picked = caption_from_mask(mask, names, ["{}"], rng)
        assert picked == ("tree", "water") and caption == "tree and water"
        assert caption_from_mask(mask, names, ["{}"], rng, min_fraction=0.0)[0] == "tree, water and crop"
        assert caption_from_mask(mask, names, ["{}"], rng, max_classes=1)[0] == "tree"
        only_unnamed = np.full((4, 4), 3)
        assert caption_from_mask(only_unnamed, names, ["{}"], rng) is None
        with pytest.raises(ValueError, match=r"caption_from_mask: labels \[7\] fall outside 0\.\.3"):
            caption_from_mask(np.full((2, 2), 7), names, ["{}"], rng)

    def test_datamodule_on_the_bundled_polygons(self, caplog: pytest.LogCaptureFixture) -> None:
        dm = TextDataModule(paths=str(SAMPLE), labels=str(POLYGONS), nodata=0, size=32, batch_size=4,
                            min_fraction=0.05, normalization="percentile")  # fmt: skip
        with caplog.at_level("WARNING", logger="dinov3_eo.tasks.captions"):
            dm.setup("fit")
        # the four small polygons all fall in training blocks: no validation, and the user is told so
        assert dm.val_dataloader() == [] and "no validation tile" in caplog.text
        assert sorted(dm.class_names) == ["crop", "developed", "tree", "water"]
        assert dm.normalization is not None and dm.normalization.num_bands == 3
        batch = next(iter(dm.train_dataloader()))
        assert batch["image"].shape[1:] == (3, 32, 32) and batch["mask"].shape[1:] == (32, 32)
        for caption, key, mask in zip(batch["caption"], batch["caption_key"], batch["mask"]):
            present = {dm.class_names[i] for i in mask.unique().tolist() if i != 255}
            named = set(key.split("|"))
            assert named <= present and named
            assert all(n in caption for n in named)
        assert batch["image"].max() > 255  # raw DN: the task normalises with the backbone's statistics

    def test_datamodule_names_a_label_rasters_classes_from_its_tag(self, tmp_path: Path) -> None:
        """A label raster that carries a ``class_names`` tag (as class maps from this package and many land-cover
        products do) needs no ``class_names=``; one without names the classes it lacks."""
        import geopandas as gpd
        from rasterio.features import rasterize

        names = ["water", "crop_land", "tree", "developed"]
        with rasterio.open(SAMPLE) as src:
            frame = gpd.read_file(POLYGONS).to_crs(src.crs)
            ids = rasterize([(g, ["water", "crop", "tree", "developed"].index(n)) for g, n in
                             zip(frame.geometry, frame["name"])], out_shape=src.shape, transform=src.transform,
                            fill=255, dtype="uint8")  # fmt: skip
            profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                       "crs": src.crs, "transform": src.transform, "nodata": 255}  # fmt: skip
        for name, tag in (("tagged.tif", json.dumps(names)), ("bare.tif", None)):
            with rasterio.open(tmp_path / name, "w", **profile) as dst:
                dst.write(ids, 1)
                if tag:
                    dst.update_tags(class_names=tag)
        common = {"paths": str(SAMPLE), "nodata": 0, "size": 32, "batch_size": 4, "min_fraction": 0.05}
        dm = TextDataModule(labels=str(tmp_path / "tagged.tif"), **common)
        dm.setup("fit")
        assert dm.class_names == ["water", "crop land", "tree", "developed"]  # in words, as captions read them
        with pytest.raises(ValueError, match=r"bare.tif names no classes \(no class_names tag\): give class_names="):
            TextDataModule(labels=str(tmp_path / "bare.tif"), **common).setup("fit")

    def test_label_dataset_requires_masks(self) -> None:
        ds = LabelCaptionDataset(dataset=[{"image": torch.zeros(3, 4, 4)}], class_names=["a"])
        with pytest.raises(KeyError, match="has no 'mask'"):
            ds[0]

    def test_chip_mask_dataset(self, tmp_path: Path, chip: Path) -> None:
        (tmp_path / "masks").mkdir()
        mask = np.zeros((48, 40), np.uint8)
        mask[:, 20:] = 5
        Image.fromarray(mask).save(tmp_path / "masks" / "a.png")
        ds = ChipMaskDataset(images=str(chip.parent), masks=str(tmp_path / "masks"), crop=64, remap={5: 1})
        sample = ds[0]
        assert sample["image"].shape == (3, 64, 64) and sample["mask"].shape == (64, 64)
        assert not sample["valid"][48:].any() and (sample["mask"][48:] == 255).all()  # padding past the chip
        assert set(sample["mask"][sample["valid"]].unique().tolist()) == {0, 1}
        captioned = LabelCaptionDataset(dataset=ds, class_names=["sand", "sea"], templates=["{}"])
        assert captioned[0]["caption"] in ("sand and sea", "sea and sand")

    def test_chip_masks_of_one_name_in_several_folders(self, tmp_path: Path, chip: Path) -> None:
        """``tile<N>/images/a.png`` with ``tile<N>/masks/a.png`` (the Dubai dataset's layout): the tile folder tells
        the masks apart."""
        import shutil

        for tile, value in (("tile1", 1), ("tile2", 2)):
            (tmp_path / tile / "images").mkdir(parents=True), (tmp_path / tile / "masks").mkdir()
            shutil.copy(chip, tmp_path / tile / "images" / "a.png")
            Image.fromarray(np.full((48, 40), value, np.uint8)).save(tmp_path / tile / "masks" / "a.png")
        ds = ChipMaskDataset(images=str(tmp_path / "tile*" / "images" / "*.png"),
                             masks=[str(tmp_path / t / "masks") for t in ("tile1", "tile2")])  # fmt: skip
        assert [Path(m).parent.parent.name for m in ds.masks] == ["tile1", "tile2"]
        assert [set(ds[i]["mask"].unique().tolist()) for i in range(2)] == [{1}, {2}]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({}, "exactly one of"), ({"captions": "a.csv", "class_folders": "b"}, "exactly one of"), ({"labels": "l.gpkg"}, "needs paths=")],
)
def test_datamodule_sources(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)
