"""Segmentation on image chips without a georeference: reading, pairing, windows, the data module and
``dinov3-eo segment fit/test`` with ``data.class_path: ChipSegmentationDataModule``.

The chips are cut from ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, saved as plain PNG without its
georeference); their masks are brightness classes of the same pixels (0 dark, 1 middle, 2 bright, 255 the nodata
collar), so every label is tied to the imagery. The collar covers chip 0 whole, 94 % of chip 2, 24 % of chip 1 and
1 % of chip 3.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.chips import (
    ChipSegmentationDataModule,
    ChipWindow,
    ChipWindowDataset,
    chip_mask_legend,
    chip_windows,
    pair_chip_masks,
    read_chip,
    read_chip_header,
    read_chip_mask,
)
from dinov3_eo.data.datasets import expand_chips
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.tasks.segmentation import SegmentationTask

ROOT = Path(__file__).resolve().parents[1]
RGB = ROOT / "tests" / "data" / "rgb_byte_crop.tif"
ORIGINS = [(0, 0), (0, 125), (115, 0), (115, 125)]  # four 115 x 125 chips of the 230 x 250 scene
PALETTE = {0: (20, 20, 120), 1: (60, 160, 60), 2: (230, 220, 200)}


def scene_and_classes() -> tuple[np.ndarray, np.ndarray]:
    with rasterio.open(RGB) as src:
        rgb = src.read()
    brightness = rgb.astype(np.float64).mean(axis=0)
    classes = np.digitize(brightness, np.percentile(brightness[brightness > 0], [33, 66])).astype(np.uint8)
    classes[(rgb == 0).all(axis=0)] = 255
    return rgb, classes


def palette_png(values: np.ndarray, path: Path) -> None:
    image = Image.fromarray(values, mode="P")
    flat = [0] * 768
    for i, colour in PALETTE.items():
        flat[3 * i : 3 * i + 3] = colour
    image.putpalette(flat)
    image.save(path)


@pytest.fixture(scope="module")
def chips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``images/chip_k.png`` (RGB) and ``masks/chip_k_mask.png`` (palette PNG of class ids)."""
    root = tmp_path_factory.mktemp("chips")
    (root / "images").mkdir(), (root / "masks").mkdir()
    rgb, classes = scene_and_classes()
    for k, (r, c) in enumerate(ORIGINS):
        Image.fromarray(np.ascontiguousarray(rgb[:, r : r + 115, c : c + 125].transpose(1, 2, 0))).save(root / "images" / f"chip_{k}.png")
        palette_png(classes[r : r + 115, c : c + 125], root / "masks" / f"chip_{k}_mask.png")
    return root


def module(chips: Path, **kwargs) -> ChipSegmentationDataModule:
    settings = dict(images=str(chips / "images"), masks=str(chips / "masks"), label_name_suffixes=["_mask"],
                    tile_size=48, batch_size=4, normalization="none")  # fmt: skip
    return ChipSegmentationDataModule(**{**settings, **kwargs})


# ------------------------------------------------------------------------------------------- reading
@pytest.mark.parametrize(("height", "width", "size"), [(115, 125, 48), (48, 48, 48), (10, 7, 16), (97, 64, 32)])
def test_windows_cover_every_pixel_once(height: int, width: int, size: int) -> None:
    covered = np.zeros((height, width), int)
    for top, left in chip_windows(height, width, size):
        covered[top : top + size, left : left + size] += 1
    assert (covered == 1).all()
    assert len(chip_windows(height, width, size)) == -(-height // size) * -(-width // size)


def test_png_chip_reads_as_its_pixels(chips: Path) -> None:
    path = str(chips / "images" / "chip_1.png")
    header = read_chip_header(path)
    assert (header.bands, header.height, header.width, header.alpha) == (3, 115, 125, None)
    assert header.band_names == ("red", "green", "blue")
    pixels, valid = read_chip(header)
    expected = np.asarray(Image.open(path)).transpose(2, 0, 1)
    assert pixels.dtype == np.float32 and np.array_equal(pixels, expected) and valid.all()
    assert np.array_equal(read_chip(header, [3, 1])[0], expected[[2, 0]])
    with pytest.raises(ValueError, match="has 3 bands; bands \\[4\\]"):
        read_chip(header, [4])


def test_alpha_and_nodata_mark_pixels_without_data(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rgba = rng.integers(1, 255, (20, 30, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[:5, :, 3] = 0
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    header = read_chip_header(str(tmp_path / "a.png"))
    assert header.bands == 3 and header.alpha == 4 and header.band_names == ("red", "green", "blue")
    pixels, valid = read_chip(header)
    assert np.array_equal(pixels, rgba[..., :3].transpose(2, 0, 1)) and valid.sum() == 15 * 30 and not valid[:5].any()

    # a 5-band float TIFF without georeference: named bands, nodata in every band and NaN are invalid
    cube = rng.normal(size=(5, 12, 16)).astype(np.float32)
    cube[:, 0, 0] = -9999
    cube[3, 1, 1] = np.nan
    with rasterio.open(tmp_path / "b.tif", "w", driver="GTiff", width=16, height=12, count=5, dtype="float32",
                       nodata=-9999) as dst:  # fmt: skip
        dst.write(cube)
        dst.descriptions = ("blue", "green", "red", "nir", "swir1")
    header = read_chip_header(str(tmp_path / "b.tif"))
    assert header.bands == 5 and header.band_names == ("blue", "green", "red", "nir", "swir1")
    pixels, valid = read_chip(header, [4, 5])
    assert np.array_equal(pixels[:, 2:], cube[3:, 2:]) and not valid[0, 0] and not valid[1, 1] and valid.sum() == 12 * 16 - 2


def test_masks_read_as_class_ids_with_their_colours(chips: Path, tmp_path: Path) -> None:
    _, classes = scene_and_classes()
    mask = read_chip_mask(str(chips / "masks" / "chip_2_mask.png"))
    assert mask.dtype == np.int64 and np.array_equal(mask, classes[115:230, 0:125])
    assert chip_mask_legend(str(chips / "masks" / "chip_2_mask.png"))[1] == PALETTE[1]
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png is a colour \\(RGB\\) image"):
        read_chip_mask(str(tmp_path / "colour.png"))
    with rasterio.open(tmp_path / "f.tif", "w", driver="GTiff", width=2, height=2, count=1, dtype="float32") as dst:
        dst.write(np.array([[[0, 1], [1.5, 2]]], np.float32))
    with pytest.raises(ValueError, match="f.tif holds values that are not class ids"):
        read_chip_mask(str(tmp_path / "f.tif"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match="broken.png could not be"):
        read_chip_header(str(tmp_path / "broken.png"))


def test_pairing_by_name_and_folder(tmp_path: Path) -> None:
    for tile in ("t1", "t2"):
        for kind in ("images", "masks"):
            (tmp_path / tile / kind).mkdir(parents=True)
            (tmp_path / tile / kind / ("a.jpg" if kind == "images" else "a.png")).touch()
    (tmp_path / "t2" / "images" / "lonely.jpg").touch()
    images = expand_chips(str(tmp_path / "*" / "images"))  # a glob of folders
    assert [Path(p).relative_to(tmp_path).as_posix() for p in images] == ["t1/images/a.jpg", "t2/images/a.jpg", "t2/images/lonely.jpg"]
    masks = pair_chip_masks(images, str(tmp_path / "*" / "masks"))
    assert [None if m is None else Path(m).relative_to(tmp_path).as_posix() for m in masks] == [
        "t1/masks/a.png", "t2/masks/a.png", None]  # fmt: skip


def test_windows_reassemble_the_chip(chips: Path) -> None:
    """The windows of a chip put back together are its pixels and mask; padding is unlabelled and zero; ``remap``
    turns a class into ``ignore_index``."""
    header = read_chip_header(str(chips / "images" / "chip_0.png"))
    mask_path = str(chips / "masks" / "chip_0_mask.png")
    windows = [ChipWindow(0, top, left) for top, left in chip_windows(115, 125, 48)]
    dataset = ChipWindowDataset(headers=[header], masks=[mask_path], windows=windows, size=48, remap={1: 255})
    image, mask, valid = np.zeros((3, 144, 144), np.float32), np.full((144, 144), -1), np.zeros((144, 144), bool)
    for i, window in enumerate(windows):
        sample = dataset[i]
        assert sample["image"].shape == (3, 48, 48) and sample["path"] == header.path
        rows, cols = slice(window.top, window.top + 48), slice(window.left, window.left + 48)
        image[:, rows, cols], mask[rows, cols], valid[rows, cols] = sample["image"], sample["mask"], sample["valid"]
    pixels, _ = read_chip(header)
    truth = read_chip_mask(mask_path)
    truth[truth == 1] = 255
    assert np.array_equal(image[:, :115, :125], pixels) and np.array_equal(mask[:115, :125], truth)
    assert (mask[115:] == 255).all() and (mask[:, 125:] == 255).all() and (image[:, 115:] == 0).all()
    assert valid[:115, :125].all() and not valid[115:].any() and not valid[:, 125:].any()


def test_the_cache_decodes_each_chip_once_and_changes_nothing(chips: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dinov3_eo.data.chips as chips_module

    headers = [read_chip_header(str(chips / "images" / f"chip_{k}.png")) for k in range(4)]
    masks = [str(chips / "masks" / f"chip_{k}_mask.png") for k in range(4)]
    windows = [ChipWindow(c, top, left) for c in range(4) for top, left in chip_windows(115, 125, 48)]
    order = np.random.default_rng(0).permutation(len(windows)).tolist() * 2
    reads = []
    real = chips_module.read_chip
    monkeypatch.setattr(chips_module, "read_chip", lambda header, *a, **k: reads.append(header.path) or real(header, *a, **k))
    cached = ChipWindowDataset(headers=headers, masks=masks, windows=windows, size=48)
    plain = ChipWindowDataset(headers=headers, masks=masks, windows=windows, size=48, cache_mb=0)
    for i in order:
        a, b = cached[i], plain[i]
        assert all(torch.equal(a[key], b[key]) for key in ("image", "valid", "mask"))
    assert len(reads) == 4 + len(order)  # the cached dataset read each chip once, the other once per window
    one_chip = sum(a.nbytes for a in cached._cache[0])
    small = ChipWindowDataset(headers=headers, masks=masks, windows=windows, size=48, cache_mb=1.5 * one_chip / 2**20)
    for i in order:
        small[i]
    assert len(small._cache) == 1 and small._cached_bytes == one_chip


def test_colour_class_ids_match_a_pixel_loop() -> None:
    from dinov3_eo.data.chips import colour_class_ids

    rng = np.random.default_rng(0)
    colours = {(255, 0, 0): 3, (0, 0, 255): 0, (12, 200, 7): 1}
    palette = np.array([*colours, (9, 9, 9)], np.uint8)  # the last colour stands for no class
    rgb = palette[rng.integers(0, 4, (17, 23))].transpose(2, 0, 1)  # [3, H, W]
    ids = colour_class_ids(rgb, colours, ignore_index=255)
    expected = np.array([[colours.get(tuple(int(c) for c in rgb[:, r, q]), 255) for q in range(23)] for r in range(17)])
    assert ids.dtype == np.int64 and np.array_equal(ids, expected) and (ids == 255).any()


def test_colour_coded_masks_read_as_their_classes(chips: Path, tmp_path: Path) -> None:
    """The palette masks saved as colour-coded RGB PNGs (plus a colour no class has) give, with ``mask_colors``, the
    windows the id masks give; names and colours come from the mapping."""
    shutil.copytree(chips / "images", tmp_path / "images")
    (tmp_path / "masks").mkdir()
    lut = np.zeros((256, 3), np.uint8)
    for i, colour in PALETTE.items():
        lut[i] = colour
    lut[255] = (255, 0, 255)  # the collar: a colour of no class
    for path in sorted((chips / "masks").iterdir()):
        ids = np.asarray(Image.open(path))
        Image.fromarray(lut[ids]).save(tmp_path / "masks" / path.name)
    hexes = {name: "#%02x%02x%02x" % PALETTE[i] for i, name in enumerate(["dark", "middle", "bright"])}
    coloured = module(tmp_path, mask_colors=hexes, val_fraction=0.0)
    indexed = module(chips, val_fraction=0.0)
    a, b = coloured.dataset("train"), indexed.dataset("train")
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    assert coloured.num_classes == coloured.counted_num_classes() == 3
    assert coloured.class_names == {0: "dark", 1: "middle", 2: "bright"}
    assert coloured.class_colors == PALETTE
    # ids from classes where given; the mapping's mistakes are named
    shuffled = module(tmp_path, mask_colors=hexes, classes={"bright": 0, "dark": 1, "middle": 2})
    assert shuffled.mask_colors == {PALETTE[2]: 0, PALETTE[0]: 1, PALETTE[1]: 2}
    with pytest.raises(ValueError, match="names class 'dark', which classes .* lacks"):
        module(tmp_path, mask_colors=hexes, classes={"bright": 0})
    with pytest.raises(ValueError, match="gives \\(20, 20, 120\\) to two classes"):
        module(tmp_path, mask_colors={"a": "#141478", "b": [20, 20, 120]})
    with pytest.raises(ValueError, match="colour 'blue' is not"):
        module(tmp_path, mask_colors={"a": "blue"})
    with pytest.raises(ValueError, match="chip_0_mask.png is a colour \\(RGB\\) image; give mask_colors"):
        module(tmp_path).dataset("train")[0]
    with pytest.raises(ValueError, match="chip_0_mask.png holds class ids \\(one band\\), not colours"):
        module(chips, mask_colors=hexes).dataset("train")[0]


# ------------------------------------------------------------------------------------------- data module
def test_split_is_seeded_disjoint_and_complete(chips: Path) -> None:
    dm = module(chips, val_fraction=0.25, seed=3)
    dm.setup("fit")
    again = module(chips, val_fraction=0.25, seed=3)
    again.setup("fit")
    assert (dm.train_chips, dm.val_chips) == (again.train_chips, again.val_chips)
    assert len(dm.val_chips) == 1 and sorted(dm.train_chips + dm.val_chips) == [0, 1, 2, 3] and not dm.test_chips
    held = module(chips, val_files=["chip_1.png"], test_files=["*chip_3*"])
    held.setup("fit")
    assert (held.train_chips, held.val_chips, held.test_chips) == ([0, 2], [1], [3])
    # every labelled pixel of a split's chips comes out of its loader once
    labelled = sum(int((batch["mask"] != 255).sum()) for batch in held.val_dataloader())
    assert labelled == int((read_chip_mask(str(chips / "masks" / "chip_1_mask.png")) != 255).sum()) > 0
    assert module(chips, val_fraction=0.0).val_dataloader() == []
    # training windows: one order per (seed, epoch), every window once an epoch, as the tile samplers do
    sampler = held.train_dataloader().sampler
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and sorted(first) == list(range(len(held.dataset("train"))))
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == sorted(first)
    with pytest.raises(ValueError, match="testing needs test_files"):
        module(chips).test_dataloader()
    with pytest.raises(ValueError, match="none is left to train on"):
        module(chips, val_files=["chip_[01].png"], test_files=["chip_[23].png"]).setup("fit")
    with pytest.raises(ValueError, match="matches both val_files"):
        module(chips, val_files=["chip_1.png"], test_files=["*_1.png"]).setup("fit")


def test_zscore_statistics_are_the_training_chips(chips: Path) -> None:
    dm = module(chips, normalization="zscore", val_files=["chip_0.png"])
    dm.setup("fit")
    pixels = np.concatenate([np.asarray(Image.open(chips / "images" / f"chip_{k}.png")).reshape(-1, 3) for k in (1, 2, 3)])
    expected = Normalization.zscore(pixels.mean(axis=0).tolist(), pixels.std(axis=0).tolist())
    assert np.allclose(dm.normalization.mean, expected.mean, rtol=1e-6) and np.allclose(dm.normalization.std, expected.std, rtol=1e-6)
    meta = dm.metadata()
    assert meta["bands"] == ["red", "green", "blue"] and meta["gsd"] is None and meta["normalization"]["name"] == "zscore"
    batch = next(iter(dm.train_dataloader()))
    assert abs(float(batch["image"][batch["valid"][:, None].expand_as(batch["image"])].mean())) < 1.0


def test_band_statistics_of_chips(chips: Path) -> None:
    """Mean, std, min, max over every valid pixel of the drawn chips, accumulated chip by chip; percentiles exact
    while the pixels fit ``max_pixels``, else from an equal share of each chip."""
    from dinov3_eo.data.chips import chip_band_stats

    headers = [read_chip_header(str(chips / "images" / f"chip_{k}.png")) for k in range(4)]
    pixels = np.concatenate([read_chip(h)[0].reshape(3, -1) for h in headers], axis=1).astype(np.float64)
    exact = chip_band_stats(headers, [3, 1])
    assert exact.bands == ["blue", "red"] and exact.count == [pixels.shape[1]] * 2 and exact.exact_percentiles
    assert np.allclose(exact.mean, pixels[[2, 0]].mean(axis=1)) and np.allclose(exact.std, pixels[[2, 0]].std(axis=1))
    assert exact.min == pixels[[2, 0]].min(axis=1).tolist() and exact.max == pixels[[2, 0]].max(axis=1).tolist()
    assert np.allclose(exact.percentile(98), np.percentile(pixels[[2, 0]], 98, axis=1))
    sampled = chip_band_stats(headers, max_pixels=4_000)
    assert not sampled.exact_percentiles and sampled.count == exact.count[:1] * 3
    assert np.allclose(sampled.mean, pixels.mean(axis=1)) and np.allclose(sampled.percentile(50), np.percentile(pixels, 50, axis=1), atol=3)


def test_counts_names_and_colours(chips: Path, caplog: pytest.LogCaptureFixture) -> None:
    dm = module(chips, val_files=["chip_0.png"], classes={"dark": 0, "middle": 1, "bright": 2})
    assert dm.num_classes == 3 and dm.class_names == {0: "dark", 1: "middle", 2: "bright"}
    counts = dm.class_pixel_counts(3, progress=False)
    expected = np.zeros(3, np.int64)
    for k in (1, 2, 3):
        values = read_chip_mask(str(chips / "masks" / f"chip_{k}_mask.png"))
        expected += np.bincount(values[values != 255], minlength=3)
    assert np.array_equal(counts, expected) and counts.sum() > 0
    assert {i: c for i, c in dm.class_colors.items() if i < 3} == PALETTE  # the model keeps its classes' entries
    with pytest.raises(ValueError, match="holds class id 2 but the model has 2 classes"):
        dm.class_pixel_counts(2, progress=False)
    masks = sorted(str(p) for p in (chips / "masks").iterdir())
    assert ChipSegmentationDataModule.count_classes(masks, progress=False) == 3
    assert ChipSegmentationDataModule.count_classes(masks, remap={2: 255}, progress=False) == 2
    # declared where the config declares them, else counted: what segment fit gives a model without num_classes
    assert module(chips, classes={"dark": 0, "bright": 4}).counted_num_classes(progress=False) == 5
    assert module(chips, remap={2: 255}).counted_num_classes(progress=False) == 2


def test_bad_chips_are_named(chips: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(chips, tmp_path / "c")
    grey = np.asarray(Image.open(tmp_path / "c" / "images" / "chip_2.png").convert("L"))
    Image.fromarray(grey).save(tmp_path / "c" / "images" / "chip_2.png")
    with pytest.raises(ValueError, match="chip_0.png has 3, .*chip_2.png 1"):
        module(tmp_path / "c").setup("fit")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "c" / "masks" / "chip_1_mask.png")
    shutil.copy(chips / "images" / "chip_0.png", tmp_path / "c" / "images" / "chip_2.png")
    (tmp_path / "c" / "images" / "orphan.png").write_bytes((chips / "images" / "chip_0.png").read_bytes())
    dm = module(tmp_path / "c", val_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="dinov3_eo.data.chips"):
        dm.setup("fit")
    assert "1 of 5 images have no mask of their name" in caplog.text and "orphan.png" in caplog.text
    dataset = dm.dataset("train")
    with pytest.raises(ValueError, match="chip_1_mask.png is 10x10 px but its image .*chip_1.png is 125x115 px"):
        dataset[next(i for i, w in enumerate(dataset.windows) if w.chip == 1)]
    with pytest.raises(FileNotFoundError, match="no image of .* has a mask of its name"):
        module(tmp_path / "c", label_name_suffixes=None).setup("fit")
    # a palette image is colour-table indices, not colours; JPEG masks are read, with a warning about their edges
    palette_png(np.zeros((8, 8), np.uint8), tmp_path / "indexed.png")
    with pytest.raises(ValueError, match="indexed.png is a palette image"):
        read_chip_header(str(tmp_path / "indexed.png"))
    (tmp_path / "j" / "images").mkdir(parents=True), (tmp_path / "j" / "masks").mkdir()
    shutil.copy(chips / "images" / "chip_1.png", tmp_path / "j" / "images" / "a.png")
    Image.fromarray(np.ones((115, 125), np.uint8)).save(tmp_path / "j" / "masks" / "a.jpg")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dinov3_eo.data.chips"):
        ChipSegmentationDataModule.paired_chips(str(tmp_path / "j" / "images"), str(tmp_path / "j" / "masks"))
    assert "1 masks are JPEGs" in caplog.text and "a.jpg" in caplog.text


# ------------------------------------------------------------------------------------------- command line
def test_segment_fit_test_and_predict_from_chips(chips: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``segment fit`` with ``data.class_path: ChipSegmentationDataModule`` learns the class count from the masks
    and the colours from their palette, records bands and normalisation in the checkpoint; ``segment test`` scores
    the held-out chip; ``segment predict`` then maps the GeoTIFF the chips were cut from, on its georeference."""
    config = tmp_path / "chips.yaml"
    config.write_text(f"""
trainer: {{accelerator: cpu, max_epochs: 2, logger: false, enable_progress_bar: false, default_root_dir: {tmp_path / "fit"}}}
model: {{backbone: vitmicro16, in_chans: 3, head: linear, lr: 0.01}}
data:
  class_path: ChipSegmentationDataModule
  init_args:
    images: {chips / "images"}
    masks: {chips / "masks"}
    label_name_suffixes: [_mask]
    val_files: [chip_1.png]
    test_files: [chip_3.png]
    tile_size: 48
    batch_size: 4
""")
    with caplog.at_level("INFO", logger="dinov3_eo.tasks.segmentation"):
        assert cli_main(["segment", "fit", "--config", str(config)]) == 0
    assert "model.num_classes = 3 from the masks" in caplog.text
    (checkpoint,) = (tmp_path / "fit" / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    meta = state["dinov3_eo"]
    assert meta["bands"] == ["red", "green", "blue"] and meta["normalization"]["name"] == "zscore"
    assert state["hyper_parameters"]["num_classes"] == 3 and state["hyper_parameters"]["class_colors"] == [list(c) for c in PALETTE.values()]
    assert (tmp_path / "fit" / "val_predictions.png").exists()
    saved = (tmp_path / "fit" / "config.yaml").read_text()
    assert "\ndata:\n  class_path: dinov3_eo.data.ChipSegmentationDataModule\n" in saved

    assert cli_main(["segment", "test", "--config", str(config), "--ckpt_path", str(checkpoint),
                     "--trainer.default_root_dir", str(tmp_path / "test")]) == 0  # fmt: skip
    report = json.loads((tmp_path / "test" / "test_metrics.json").read_text())
    assert report["pixels"] == int((read_chip_mask(str(chips / "masks" / "chip_3_mask.png")) != 255).sum())
    assert 0.0 <= report["miou"] <= 1.0

    assert cli_main(["segment", "predict", str(RGB), "--model", str(checkpoint), "-o", str(tmp_path / "pred")]) == 0
    with rasterio.open(tmp_path / "pred" / "rgb_byte_crop_classes.tif") as out, rasterio.open(RGB) as src:
        assert out.crs == src.crs and out.transform == src.transform and out.shape == src.shape
        assert set(np.unique(out.read(1))) <= {0, 1, 2, 255}

    # chips in, PNG class masks out: the same ids as the same pixels predicted as a georeferenced GeoTIFF
    chip = chips / "images" / "chip_3.png"
    pixels = np.asarray(Image.open(chip)).transpose(2, 0, 1)
    twin = tmp_path / "twin" / "chip_3.tif"
    twin.parent.mkdir()
    with rasterio.open(twin, "w", driver="GTiff", width=125, height=115, count=3, dtype="uint8", crs="EPSG:32618",
                       transform=rasterio.transform.from_origin(500000, 4000000, 30, 30)) as dst:  # fmt: skip
        dst.write(pixels)
    window = ["--window", "64", "--overlap", "16", "--quiet"]
    assert cli_main(["segment", "predict", str(chip), "--chips", "--model", str(checkpoint), "-o", str(tmp_path / "png"), *window]) == 0
    assert cli_main(["segment", "predict", str(twin), "--model", str(checkpoint), "-o", str(tmp_path / "tif"), *window]) == 0
    png = Image.open(tmp_path / "png" / "chip_3_classes.png")
    with rasterio.open(tmp_path / "tif" / "chip_3_classes.tif") as reference:
        assert png.mode == "P" and np.array_equal(np.asarray(png), reference.read(1))
    assert png.getpalette()[:9] == [c for colour in PALETTE.values() for c in colour]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["chip_3_classes.png", "chip_3_quicklook.png"]
    # and scored against its mask: the class names travel in the PNG, every labelled pixel counts once
    assert cli_main(["segment", "evaluate", str(tmp_path / "png"), str(chips / "masks"), "--chips", "--name-suffixes",
                     "_mask", "--out-dir", str(tmp_path / "eval")]) == 0  # fmt: skip
    scored = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert scored["pixels"] == report["pixels"] and list(scored["classes"]) == ["class 0", "class 1", "class 2"]


def test_predicting_chips_refuses_what_needs_a_map(chips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A chip without ``--chips`` is refused with the way out; ``--chips`` with polygons or probabilities too."""
    task = SegmentationTask(backbone="vitmicro16", num_classes=3, image_normalization=Normalization.preset("imagenet").to_dict())
    checkpoint = tmp_path / "seg.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "dinov3_eo": task.checkpoint_metadata()}, checkpoint)
    chip = str(chips / "images" / "chip_1.png")
    assert cli_main(["segment", "predict", chip, "--model", str(checkpoint), "-o", str(tmp_path / "a"), "--quiet"]) == 2
    assert "chip_1.png is not georeferenced" in capsys.readouterr().err
    assert cli_main(["segment", "predict", chip, "--chips", "--polygons", "--model", str(checkpoint), "-o", str(tmp_path / "b")]) == 2
    assert "probabilities and polygons need a georeferenced scene" in capsys.readouterr().err
    assert not list((tmp_path / "a").iterdir()) and not list((tmp_path / "b").iterdir())
    # a chip that fails inside the prediction (one band for a 3-band model) leaves no scratch file behind
    grey = tmp_path / "grey.png"
    Image.open(chip).convert("L").save(grey)
    assert cli_main(["segment", "predict", str(grey), "--chips", "--model", str(checkpoint), "-o", str(tmp_path / "c"), "--quiet"]) == 2
    assert "gives 1 bands but the model was trained on 3" in capsys.readouterr().err
    assert not list((tmp_path / "c").iterdir())


def test_segment_fit_takes_a_torchgeo_datamodule(chips: Path, tmp_path: Path) -> None:
    """A torchgeo ``NonGeoDataModule`` (``data.class_path``) trains the head; its ``mean``/``std`` (the ``Normalize``
    its ``aug`` applies on the device) go into the checkpoint, so ``segment predict`` scales a GeoTIFF as training did."""
    root = tmp_path / "fit"
    assert cli_main([
        "segment", "fit", "--model.backbone", "vitmicro16", "--model.in_chans", "3", "--model.num_classes", "3",
        "--data.class_path", "torchgeo_chips.ChipsTorchGeoDataModule", "--data.init_args.root", str(chips),
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(root),
    ]) == 0  # fmt: skip
    (checkpoint,) = (root / "checkpoints").glob("*.ckpt")
    norm = torch.load(checkpoint, map_location="cpu", weights_only=False)["dinov3_eo"]["normalization"]
    assert norm["mean"] == [0.0] * 3 and norm["std"] == [255.0] * 3 and "ChipsTorchGeoDataModule" in norm["name"]
    assert cli_main(["segment", "predict", str(RGB), "--model", str(checkpoint), "-o", str(tmp_path / "pred"), "--quiet"]) == 0
    with rasterio.open(tmp_path / "pred" / "rgb_byte_crop_classes.tif") as out:
        assert set(np.unique(out.read(1))) <= {0, 1, 2, 255}


def test_a_plain_data_block_is_still_geotiffs(capsys: pytest.CaptureFixture) -> None:
    """Configs without ``class_path`` keep meaning DenseDataModule; the printed config names it."""
    with pytest.raises(SystemExit):
        cli_main(["segment", "fit", "--config", str(ROOT / "configs" / "segment" / "sample_linear_cpu.yaml"), "--print_config"])
    printed = capsys.readouterr().out
    assert "\ndata:\n  class_path: dinov3_eo.data.DenseDataModule\n" in printed and "block_tiles:" in printed
    assert "stats_chips" not in printed


# ------------------------------------------------------------------------------------------- text alignment
def test_text_data_from_chips(chips: Path) -> None:
    """``TextDataModule(chips=, chip_masks=)``: windows whose labels name a class, captioned from their masks (an
    id named ``""`` never appears), raw pixel values (the task normalises), the held-out chip validates."""
    from dinov3_eo.tasks.captions import TextDataModule

    data = TextDataModule(chips=str(chips / "images"), chip_masks=str(chips / "masks"), label_name_suffixes=["_mask"],
                          class_names=["dark ground", "", "bright ground"], val_files=["chip_3.png"], size=48,
                          normalization="zscore", min_fraction=0.01, batch_size=4)  # fmt: skip
    data.setup("fit")
    assert data.band_names == ["red", "green", "blue"] and data.normalization.name == "zscore"
    assert len(data.train_set) > 0 and len(data.val_set) > 0
    captions = []
    for batch in data.train_dataloader():
        captions += batch["caption"]
        for mask in batch["mask"]:
            assert (mask == 0).any() or (mask == 2).any()  # a named class in every captioned window
        assert float(batch["image"].max()) > 10  # raw 8-bit values, not z-scores
    assert captions and all("dark ground" in c or "bright ground" in c for c in captions)
    val_paths = {p for batch in data.val_dataloader() for p in batch["path"]}
    assert val_paths == {str(chips / "images" / "chip_3.png")}
    with pytest.raises(ValueError, match="chips= needs chip_masks= .* and class_names="):
        TextDataModule(chips=str(chips / "images"), chip_masks=str(chips / "masks"))


def test_text_data_from_colour_coded_chip_masks(chips: Path, tmp_path: Path) -> None:
    """Colour masks through ``mask_colors`` (names as in ``class_names``) caption the windows the id masks do."""
    from dinov3_eo.tasks.captions import TextDataModule

    (tmp_path / "masks").mkdir()
    lut = np.zeros((256, 3), np.uint8)
    for i, colour in PALETTE.items():
        lut[i] = colour
    for path in sorted((chips / "masks").iterdir()):
        Image.fromarray(lut[np.asarray(Image.open(path))]).save(tmp_path / "masks" / path.name)
    common = dict(chips=str(chips / "images"), label_name_suffixes=["_mask"], class_names=["dark", "", "bright"],
                  val_files=["chip_3.png"], size=48, min_fraction=0.01)  # fmt: skip
    by_ids = TextDataModule(chip_masks=str(chips / "masks"), **common)
    by_colours = TextDataModule(chip_masks=str(tmp_path / "masks"), mask_colors={"dark": list(PALETTE[0]),
                                "bright": list(PALETTE[2])}, **common)  # fmt: skip
    by_ids.setup("fit"), by_colours.setup("fit")
    assert by_ids.train_set.keys == by_colours.train_set.keys and by_ids.train_set.keys
    sample_a, sample_b = by_ids.train_set[(0, 0)], by_colours.train_set[(0, 0)]
    assert sample_a["caption"] == sample_b["caption"]
    # the "middle" class (id 1, named "") has no colour: unlabelled either way once captions skip it
    assert torch.equal(sample_a["mask"] == 0, sample_b["mask"] == 0) and torch.equal(sample_a["mask"] == 2, sample_b["mask"] == 2)


@pytest.mark.slow
def test_text_fit_on_chips_then_query_a_chip(chips: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``text fit`` on chips from the command line, then ``query --chips`` with the checkpoint on a chip."""
    from dinov3_eo.tasks.openvocab import query_main, text_main

    monkeypatch.chdir(ROOT)
    assert text_main([
        "fit", "--config", "configs/text/tiny_cpu.yaml", "--trainer.max_steps", "2", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
        "--trainer.enable_checkpointing=true", "--data.paths=null", "--data.labels=null", "--data.nodata=null",
        f"--data.chips={chips / 'images'}", f"--data.chip_masks={chips / 'masks'}", "--data.label_name_suffixes=[_mask]",
        "--data.class_names=[dark ground, '', bright ground]", "--data.val_files=[chip_3.png]", "--data.size=48",
    ]) == 0  # fmt: skip
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    out = tmp_path / "q" / "chip.tif"
    out.parent.mkdir()
    assert query_main([str(chips / "images" / "chip_1.png"), "dark ground", "bright ground", "--chips", "--model",
                       str(checkpoint), "-o", str(out), "--window", "64"]) == 0  # fmt: skip
    classes = np.asarray(Image.open(out.parent / "chip_classes.png"))
    assert classes.shape == (115, 125) and set(np.unique(classes)) <= {0, 1}


# ------------------------------------------------------------------------------------------- evaluation
NAMES = ["dark", "middle", "bright"]


def chip_class_maps(chips: Path, folder: Path) -> dict[str, np.ndarray]:
    """``<chip>_classes.png`` for chips 1-3 as ``segment predict --chips`` writes them (a class GeoTIFF with its
    ``class_names`` tag through ``write_class_png``): each chip's mask with a known block of wrong classes and the
    nodata collar kept as 255; returns the ids written."""
    from dinov3_eo.inference.writers import COGWriter, write_class_png

    folder.mkdir(parents=True)
    written = {}
    for k in (1, 2, 3):
        ids = read_chip_mask(str(chips / "masks" / f"chip_{k}_mask.png")).astype(np.uint8)
        block = ids[10 : 10 + 20 * k, 30:70]
        block[block != 255] = (block[block != 255] + k) % 3  # chip 3's block unchanged: (id + 3) % 3
        scratch = folder / f"chip_{k}.tif"
        with COGWriter(scratch, crs=None, transform=rasterio.Affine.identity(), width=125, height=115, count=1,
                       dtype="uint8", nodata=255, class_names=NAMES) as out:  # fmt: skip
            out.write(ids[None], rasterio.windows.Window(0, 0, 125, 115))
        write_class_png(scratch, folder / f"chip_{k}_classes.png", colors=list(PALETTE.values()))
        scratch.unlink()
        written[f"chip_{k}"] = ids
    return written


def naive_confusion(pairs: list[tuple[np.ndarray, np.ndarray]], k: int, ignore: int = 255) -> np.ndarray:
    counts = np.zeros((k, k), dtype=np.int64)
    for mapped, truth in pairs:
        for m, t in zip(mapped.ravel().tolist(), truth.ravel().tolist()):
            if m < k and t != ignore:
                counts[t, m] += 1
    return counts


def test_evaluate_chip_maps_against_their_masks(chips: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Chips' PNG class maps against their masks, paired by name: the confusion matrix equals a pixel loop's, the
    class names come back from the PNG's text chunk, several maps add up to their sum, the report files are written;
    colour-coded masks and ``remap`` read as the chip data module reads them."""
    from dinov3_eo.data.raster import open_quietly, tagged_class_names
    from dinov3_eo.tasks.segmentation_eval import evaluate_chip_maps

    written = chip_class_maps(chips, tmp_path / "pred")
    with open_quietly(tmp_path / "pred" / "chip_1_classes.png") as src:
        assert tagged_class_names(src) == NAMES  # the text chunk round trip
    truths = {name: read_chip_mask(str(chips / "masks" / f"{name}_mask.png")) for name in written}
    expected = naive_confusion([(written[n], truths[n]) for n in written], 3)
    assert expected.sum() < expected.trace() + 5000 and expected.sum() > expected.trace()  # some errors, not all

    masks = str(chips / "masks")
    (tmp_path / "pred" / "chip_9_classes.png").write_bytes((tmp_path / "pred" / "chip_1_classes.png").read_bytes())
    with caplog.at_level("WARNING"):
        report = evaluate_chip_maps(tmp_path / "pred", masks, name_suffixes=["_mask"], out_dir=tmp_path / "eval", progress=False)
    assert "1 of 4 class maps have no mask of their name" in caplog.text
    assert report["unpaired"] == [str(tmp_path / "pred" / "chip_9_classes.png")]
    assert np.array_equal(report["confusion"], expected) and list(report["classes"]) == NAMES
    assert report["overall_accuracy"] == pytest.approx(expected.trace() / expected.sum())
    assert report["area"]["unit"] == "pixels" and report["pixels"] == expected.sum()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["confusion.csv", "confusion.png", "metrics.json", "per_map.csv"]
    per_map = (tmp_path / "eval" / "per_map.csv").read_text().splitlines()
    assert len(per_map) == 4 and per_map[3].endswith(",1.000000,1.000000")  # chip 3's map is its mask
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["confusion"] == expected.tolist()
    one = evaluate_chip_maps(tmp_path / "pred" / "chip_2_classes.png", masks, name_suffixes=["_mask"],
                             out_dir=tmp_path / "one", progress=False)  # fmt: skip
    assert np.array_equal(one["confusion"], naive_confusion([(written["chip_2"], truths["chip_2"])], 3))
    assert (tmp_path / "one" / "agreement.png").exists()

    # colour-coded masks with mask_colors give the same matrix; remap drops a class from the reference
    (tmp_path / "colour").mkdir()
    lut = np.full((256, 3), 255, np.uint8)
    for i, colour in PALETTE.items():
        lut[i] = colour
    for name in written:
        Image.fromarray(lut[truths[name]]).save(tmp_path / "colour" / f"{name}_mask.png")
    hexes = {name: "#%02x%02x%02x" % PALETTE[i] for i, name in enumerate(NAMES)}
    coloured = evaluate_chip_maps(tmp_path / "pred", tmp_path / "colour", name_suffixes=["_mask"], mask_colors=hexes, progress=False)
    assert np.array_equal(coloured["confusion"], expected)
    dropped = evaluate_chip_maps(tmp_path / "pred", masks, name_suffixes=["_mask"], remap={2: 255}, progress=False)
    assert np.array_equal(dropped["confusion"][:2], expected[:2]) and not np.any(dropped["confusion"][2])


def test_evaluate_chips_from_the_command_line(chips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``segment evaluate --chips`` prints the table and writes the report; what cannot be scored is one sentence."""
    chip_class_maps(chips, tmp_path / "pred")
    run = lambda *extra: cli_main(["segment", "evaluate", str(tmp_path / "pred"), str(chips / "masks"), "--chips",  # noqa: E731
                                   "--name-suffixes", "_mask", *extra])  # fmt: skip
    assert run("--out-dir", str(tmp_path / "eval")) == 0
    out = capsys.readouterr().out
    assert "middle" in out and "overall accuracy" in out and "per_map.csv" in out
    assert run("--out-dir", str(tmp_path / "eval")) == 2  # the report exists
    assert "already exists" in capsys.readouterr().err
    assert run("--classes", '{"a": 0}') == 2
    assert "--classes is for GeoTIFF maps" in capsys.readouterr().err
    assert run("--ignore-index", "7") == 2  # then 255 is an id the maps lack
    err = capsys.readouterr().err
    assert "holds class ids [255] that the map does not have" in err and "--ignore-index" in err
    # a mask of another size; a map without class names
    (tmp_path / "small").mkdir()
    palette_png(np.zeros((50, 60), np.uint8), tmp_path / "small" / "chip_1_mask.png")
    assert cli_main(["segment", "evaluate", str(tmp_path / "pred" / "chip_1_classes.png"), str(tmp_path / "small"),
                     "--chips", "--name-suffixes", "_mask"]) == 2  # fmt: skip
    assert "chip_1_classes.png is 125x115 px but its mask" in capsys.readouterr().err
    palette_png(np.zeros((115, 125), np.uint8), tmp_path / "plain_classes.png")
    (tmp_path / "m").mkdir()
    palette_png(np.zeros((115, 125), np.uint8), tmp_path / "m" / "plain.png")
    assert cli_main(["segment", "evaluate", str(tmp_path / "plain_classes.png"), str(tmp_path / "m"), "--chips"]) == 2
    assert "does not name its classes" in capsys.readouterr().err
    assert cli_main(["segment", "evaluate", str(tmp_path / "plain_classes.png"), str(tmp_path / "m"), "--chips",
                     "--class-names", "a", "b"]) == 0  # fmt: skip
