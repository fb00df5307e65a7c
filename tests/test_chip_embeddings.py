"""One embedding per image chip (``dinov3-eo embed --chips``): CLS and mean patch token of each chip, equal to a direct
forward pass of the chip; the Parquet and npz tables round-trip.

The chips are cut from ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0) and saved as plain PNG (no
georeference); the first is mostly the scene's nodata collar.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.chip_embeddings import (
    ChipEmbeddings,
    chip_model_input,
    embed_chip_views,
    embed_chips,
    model_input_size,
    read_chip_embeddings,
    write_chip_embeddings,
)

DATA = Path(__file__).resolve().parent / "data"
ORIGINS = [(0, 0), (0, 125), (115, 0), (115, 125)]
NORM = {"mean": [0.4, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "low": [0, 0, 0], "high": [255, 255, 255], "name": "test"}


@pytest.fixture(scope="module")
def chips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chips")
    with rasterio.open(DATA / "rgb_byte_crop.tif") as src:
        rgb = src.read()
    for k, (r, c) in enumerate(ORIGINS):
        Image.fromarray(np.ascontiguousarray(rgb[:, r : r + 115, c : c + 125].transpose(1, 2, 0))).save(root / f"chip_{k}.png")
    return root


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_backbone("vitmicro16", in_chans=3).eval()
    model.meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, normalization=NORM)
    return model


def direct(backbone: torch.nn.Module, path: Path, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """CLS and mean patch token of one chip, read with PIL and fed alone."""
    image = torch.from_numpy(np.asarray(Image.open(path)).transpose(2, 0, 1).astype(np.float32))
    image = Normalization.from_dict(NORM)(image)
    if tuple(image.shape[1:]) != size:
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    with torch.no_grad():
        out = backbone.forward_features(image[None])
    return out["x_norm_clstoken"][0].numpy(), out["x_norm_patchtokens"][0].mean(dim=0).numpy()


def test_embeddings_are_each_chips_own_forward_pass(chips: Path, backbone: torch.nn.Module) -> None:
    """Resized to 224 or at their own size (115 x 125 -> 112 x 128), batched or not: each row is what the chip alone
    gives the backbone."""
    norm = Normalization.from_dict(NORM)
    assert model_input_size(115, 125, 16, None) == (112, 128) and model_input_size(5, 9, 16, None) == (16, 16)
    for size, shape in ((224, (224, 224)), (None, (112, 128))):
        batched = embed_chips(backbone, chips, normalization=norm, size=size, batch_size=3, progress=False)
        single = embed_chips(backbone, [str(p) for p in sorted(chips.glob("*.png"))], normalization=norm, size=size,
                             batch_size=1, progress=False)  # fmt: skip
        assert batched.paths == single.paths == [str(chips / f"chip_{k}.png") for k in range(4)]
        assert batched.cls.shape == batched.patch_mean.shape == (4, 96) and batched.cls.dtype == np.float32
        assert batched.sizes.tolist() == [[115, 125]] * 4 and batched.metadata["size"] == size
        np.testing.assert_allclose(batched.cls, single.cls, atol=1e-5)
        for k, path in enumerate(batched.paths):
            cls, mean = direct(backbone, Path(path), shape)
            np.testing.assert_allclose(batched.cls[k], cls, atol=1e-5)
            np.testing.assert_allclose(batched.patch_mean[k], mean, atol=1e-5)
    # distinct chips give distinct patch means (a random ViT's CLS token hardly looks at its input)
    assert np.linalg.norm(batched.patch_mean[1] - batched.patch_mean[2]) > 1e-2


def test_views_of_each_chip_come_from_one_read(chips: Path, backbone: torch.nn.Module,
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Test-time augmentation embeds every view of a chip from the pixels read once: each view's rows equal
    ``embed_chips(view=v)``'s, which turns the chip itself (checked here against a forward pass of the flipped chip)."""
    import dinov3_eo.tasks.chip_embeddings as module

    norm = Normalization.from_dict(NORM)
    reads = []
    read = module.read_chip
    monkeypatch.setattr(module, "read_chip", lambda header, *a, **k: reads.append(header.path) or read(header, *a, **k))
    views = embed_chip_views(backbone, chips, views=(0, 3, 5), normalization=norm, size=64, batch_size=3, progress=False)
    assert len(reads) == 4 and sorted(reads) == sorted(str(p) for p in chips.glob("*.png"))
    for view, embedded in zip((0, 3, 5), views):
        alone = embed_chips(backbone, chips, normalization=norm, size=64, view=view, progress=False)
        assert embedded.paths == alone.paths
        np.testing.assert_allclose(embedded.cls, alone.cls, atol=1e-5)
        np.testing.assert_allclose(embedded.patch_mean, alone.patch_mean, atol=1e-5)
    assert not np.allclose(views[0].patch_mean, views[1].patch_mean, atol=1e-3)
    # view 4 is the left-right mirror (inference.tta.dihedral): the same as embedding the mirrored chip
    mirrored = embed_chip_views(backbone, chips, views=(4,), normalization=norm, size=64, progress=False)[0]
    image = torch.from_numpy(np.asarray(Image.open(chips / "chip_0.png")).transpose(2, 0, 1).astype(np.float32))
    image = F.interpolate(norm(image)[None], size=(64, 64), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        out = backbone.forward_features(torch.flip(image, dims=(-1,)))
    np.testing.assert_allclose(mirrored.cls[0], out["x_norm_clstoken"][0].numpy(), atol=1e-5)


def test_pixels_without_data_stay_out_of_the_patch_mean(chips: Path, backbone: torch.nn.Module, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    """An RGBA chip's transparent left half: zeros fed there, its patches left out of the mean; a chip transparent
    everywhere has a NaN mean, with a warning."""
    rgb = np.asarray(Image.open(chips / "chip_3.png"))
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :64] = 0
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / "half.png")
    Image.fromarray(np.dstack([rgb, np.zeros_like(alpha)])).save(tmp_path / "none.png")
    norm = Normalization.from_dict(NORM)
    from dinov3_eo.data.chips import read_chip_header

    image, valid = chip_model_input(read_chip_header(str(tmp_path / "half.png")), patch_size=16, normalization=norm, size=None)
    assert image.shape == (3, 112, 128) and valid.shape == (7, 8)
    assert not valid[:, :4].any() and valid[:, 4:].all() and (image[:, :, :64] == 0).all()
    with caplog.at_level(logging.WARNING):
        table = embed_chips(backbone, tmp_path, normalization=norm, size=None, progress=False)
    with torch.no_grad():
        tokens = backbone.forward_features(image[None])["x_norm_patchtokens"][0].reshape(7, 8, 96)
    np.testing.assert_allclose(table.patch_mean[0], tokens[:, 4:].reshape(-1, 96).mean(dim=0).numpy(), atol=1e-5)
    assert np.isnan(table.patch_mean[1]).all() and np.isfinite(table.cls).all()
    assert "1 of 2 chips have no pixel with data (first: " in caplog.text and "none.png" in caplog.text


def test_tables_round_trip(chips: Path, backbone: torch.nn.Module, tmp_path: Path) -> None:
    import pandas as pd

    table = embed_chips(backbone, chips, normalization=Normalization.from_dict(NORM), size=64, progress=False)
    for suffix in (".parquet", ".npz"):
        written = write_chip_embeddings(table, tmp_path / f"e{suffix}")
        back = read_chip_embeddings(written)
        assert back.paths == table.paths and back.metadata == table.metadata and back.metadata["backbone"] == "vitmicro16"
        assert np.array_equal(back.cls, table.cls) and np.array_equal(back.patch_mean, table.patch_mean)
        assert np.array_equal(back.sizes, table.sizes)
        with pytest.raises(FileExistsError):
            write_chip_embeddings(table, written)
    frame = pd.read_parquet(tmp_path / "e.parquet")
    assert list(frame.columns) == ["path", "height", "width", "cls", "patch_mean"] and len(frame) == 4
    assert np.allclose(np.stack(frame["cls"].to_numpy()), table.cls)
    with pytest.raises(ValueError, match="written as .parquet or .npz"):
        write_chip_embeddings(table, tmp_path / "e.csv")
    pd.DataFrame({"path": ["a"]}).to_parquet(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match="lacks the columns \\['cls', 'height'"):
        read_chip_embeddings(tmp_path / "other.parquet")
    for missing in ("none.parquet", "none.npz"):
        with pytest.raises(FileNotFoundError, match=f"Chip embedding table '.*{missing}' does not exist"):
            read_chip_embeddings(tmp_path / missing)


def test_embed_chips_from_the_command_line(chips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    torch.manual_seed(0)
    model = build_backbone("vitmicro16", in_chans=3)
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, normalization=NORM)
    pth = export_backbone(model, tmp_path / "micro", meta=meta)["pth"]
    out = tmp_path / "embeddings.parquet"
    common = ["--model", str(pth), "--quiet"]
    assert cli_main(["embed", str(chips / "*.png"), "--chips", "-o", str(out), "--size", "0", *common]) == 0
    assert capsys.readouterr().out.strip().endswith("embeddings.parquet")
    table = read_chip_embeddings(out)
    assert len(table) == 4 and table.metadata["size"] is None and table.metadata["normalization"] == "test"
    cls, _ = direct(model.eval(), chips / "chip_2.png", (112, 128))
    np.testing.assert_allclose(table.cls[2], cls, atol=1e-5)

    assert cli_main(["embed", str(chips), "--chips", "-o", str(out), *common]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["embed", str(chips), "--chips", "-o", str(tmp_path / "f.tif"), *common]) == 2
    assert "With --chips the output is a table (.parquet or .npz)" in capsys.readouterr().err
    assert cli_main(["embed", str(chips / "chip_1.png"), "-o", str(tmp_path / "e.npz"), *common]) == 2
    assert "add --chips" in capsys.readouterr().err
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.open(chips / "chip_1.png").convert("L").save(grey / "g.png")
    assert cli_main(["embed", str(grey), "--chips", "-o", str(tmp_path / "g.npz"), *common]) == 2
    assert "g.png gives 1 bands but the backbone" in capsys.readouterr().err
    assert cli_main(["embed", str(tmp_path / "nothing"), "--chips", "-o", str(tmp_path / "n.npz"), *common]) == 2
    assert "matched no image files" in capsys.readouterr().err
    assert not (tmp_path / "g.npz").exists() and not (tmp_path / "n.npz").exists()


def test_similar_chips_from_a_table(chips: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``similar EXAMPLE --chips --table``: the other chips by cosine similarity of their features to the example's
    (embedded as the table's were, so equal to its own row), most similar first; several examples count as their
    mean; mistakes are one sentence."""
    import csv

    from dinov3_eo.tasks.chip_embeddings import chip_features, nearest_chips

    torch.manual_seed(0)
    model = build_backbone("vitmicro16", in_chans=3)
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, normalization=NORM)
    pth = export_backbone(model, tmp_path / "micro", meta=meta)["pth"]
    table_path = tmp_path / "t.parquet"
    assert cli_main(["embed", str(chips), "--chips", "-o", str(table_path), "--model", str(pth), "--size", "64", "--quiet"]) == 0
    table = read_chip_embeddings(table_path)
    assert table.metadata["backbone_source"] == str(pth.resolve())
    out = tmp_path / "matches.csv"
    example = chips / "chip_1.png"
    assert cli_main(["similar", str(example), "--chips", "--table", str(table_path), "--model", str(pth), "-o", str(out),
                     "-k", "2", "--quiet"]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    x = chip_features(table)
    own = x[table.paths.index(str(example))]
    expected = sorted(((float(x[i] @ own / np.linalg.norm(x[i]) / np.linalg.norm(own)), p) for i, p in enumerate(table.paths)
                       if p != str(example)), reverse=True)[:2]  # fmt: skip
    assert [r["rank"] for r in rows] == ["1", "2"] and [r["path"] for r in rows] == [p for _, p in expected]
    np.testing.assert_allclose([float(r["similarity"]) for r in rows], [s for s, _ in expected], atol=1e-5)
    # two examples: the search for their mean; neither is listed
    both = ChipEmbeddings(paths=table.paths[:2], cls=table.cls[:2], patch_mean=table.patch_mean[:2], sizes=table.sizes[:2])
    found = nearest_chips(table, both, k=5)
    mean = x[:2].mean(axis=0)
    ranked = sorted(((float(x[i] @ mean / np.linalg.norm(x[i]) / np.linalg.norm(mean)), table.paths[i]) for i in (2, 3)),
                    reverse=True)  # fmt: skip
    assert [p for p, _ in found] == [p for _, p in ranked]  # the two others, the examples left out
    np.testing.assert_allclose([s for _, s in found], [s for s, _ in ranked], atol=1e-5)
    capsys.readouterr()
    assert cli_main(["similar", str(example), "--chips", "--model", str(pth), "-o", str(tmp_path / "x.csv")]) == 2
    assert "give it with --table" in capsys.readouterr().err
    other = export_backbone(model, tmp_path / "other", meta=BackboneMeta(name="vits16", in_chans=3, patch_size=16,
                                                                          embed_dim=96, normalization=NORM))["pth"]  # fmt: skip
    assert cli_main(["similar", str(example), "--chips", "--table", str(table_path), "--model", str(other), "-o",
                     str(tmp_path / "y.csv")]) == 2  # fmt: skip
    assert "was embedded with backbone 'vitmicro16'" in capsys.readouterr().err
