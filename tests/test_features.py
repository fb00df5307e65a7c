"""Patch-feature rasters (``dinov3-eo embed``) and their PCA picture (``dinov3-eo pca``) on a real Landsat crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import Affine

from dinov3_eo.cli import main as cli_main
from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.features import (
    FeatureGrid,
    _reservoir_sample,
    fit_pca,
    input_normalization,
    resolve_backbone,
    stream_patch_features,
    write_features,
)

DATA = Path(__file__).resolve().parent / "data"
CROP = DATA / "rgb_byte_crop.tif"  # 250 x 230, uint8 RGB, nodata 0 collar (CC0)


@pytest.fixture(scope="module")
def backbone_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A micro backbone export carrying an 8-bit RGB normalisation."""
    torch.manual_seed(0)
    model = build_backbone("vitmicro16", in_chans=3)
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96,
                        normalization={"mean": [0.4, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "low": [0, 0, 0],
                                       "high": [255, 255, 255], "name": "test"})  # fmt: skip
    return export_backbone(model, tmp_path_factory.mktemp("bb") / "micro", meta=meta)["pth"]


def test_feature_grid_scales_the_transform() -> None:
    with rasterio.open(CROP) as src:
        grid = FeatureGrid.of(src, 16)
        assert (grid.height, grid.width) == (15, 16)  # ceil(230 / 16), ceil(250 / 16)
        assert grid.transform == src.transform @ Affine.scale(16)
        assert grid.crs == src.crs


def test_tiles_without_margin_equal_direct_forward() -> None:
    """With margin 0 each 64-px tile's tokens are exactly the backbone's output on that tile alone."""
    model = build_backbone("vitmicro16").eval()
    with rasterio.open(CROP) as src:
        pieces = dict(
            ((int(w.row_off), int(w.col_off)), f)
            for w, f in stream_patch_features(model, src, normalization=None, window=64, margin=0, batch_size=3, progress=False)
        )
        assert sorted(pieces)[:3] == [(0, 0), (0, 4), (0, 8)]
        window = rasterio.windows.Window(64, 128, 64, 64)  # patch (8, 4)
        values = src.read(window=window).astype(np.float32)
        valid = (values != 0).any(axis=0) & ~(values == 0).any(axis=0)
    x = torch.from_numpy(values).masked_fill(~torch.from_numpy(valid), 0.0)[None]
    with torch.no_grad():
        (direct,) = model.get_intermediate_layers(x, n=1, reshape=True, norm=True)
    got = pieces[(8, 4)]
    finite = np.isfinite(got).all(axis=0)
    assert finite.any()
    np.testing.assert_allclose(got[:, finite], direct[0].numpy()[:, finite], rtol=1e-4, atol=1e-4)


def test_embed_cli_writes_georeferenced_features(backbone_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "feats.tif"
    assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(out), "--window", "96", "--quiet"]) == 0
    with rasterio.open(CROP) as src, rasterio.open(out) as feats:
        assert feats.count == 96 and feats.dtypes[0] == "float32"
        assert (feats.height, feats.width) == (15, 16)
        assert feats.crs == src.crs and feats.transform == src.transform @ Affine.scale(16)
        f = feats.read()
        # a patch is NaN exactly when none of its 16 x 16 input pixels is valid
        pixels = np.zeros((3, 240, 256), dtype=np.uint8)
        pixels[:, :230, :250] = src.read()
        valid = (pixels != 0).all(axis=0).reshape(15, 16, 16, 16).any(axis=(1, 3))
    assert np.array_equal(np.isfinite(f).all(axis=0), valid) and 0 < valid.mean() < 1
    # normed tokens: LayerNorm output has ~zero mean over channels
    assert np.abs(np.nanmean(f[:, valid], axis=0)).max() < 0.5
    assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(out), "--quiet"]) == 2  # no overwrite
    # and a picture of them: the first three principal components, one enlarged block per patch
    from PIL import Image

    with Image.open(tmp_path / "feats_pca.png") as picture:
        assert picture.size == (16 * 16, 15 * 16) and picture.mode == "RGB"
        rgb = np.asarray(picture)
    assert (rgb == 255).all(axis=-1).any() and rgb.std() > 20  # white nodata collar, coloured features


def test_embed_refuses_a_raster_that_is_not_georeferenced(backbone_file: Path, tmp_path: Path, capsys) -> None:
    with rasterio.open(CROP) as src:
        profile, pixels = src.profile | {"crs": None}, src.read()
    plain = tmp_path / "plain.tif"
    with rasterio.open(plain, "w", **profile) as dst:
        dst.write(pixels)
    out = tmp_path / "feats.tif"
    assert cli_main(["embed", str(plain), "--model", str(backbone_file), "-o", str(out), "--quiet"]) == 2
    assert "plain.tif is not georeferenced" in capsys.readouterr().err and not out.exists()


def test_embed_says_when_a_raster_has_no_valid_pixel(backbone_file: Path, tmp_path: Path, caplog) -> None:
    with rasterio.open(CROP) as src:
        profile = src.profile | {"nodata": 0}
    blank = tmp_path / "blank.tif"
    with rasterio.open(blank, "w", **profile) as dst:
        dst.write(np.zeros((profile["count"], profile["height"], profile["width"]), dtype=profile["dtype"]))
    with caplog.at_level("WARNING", logger="dinov3_eo.tasks.features"):
        assert cli_main(["embed", str(blank), "--model", str(backbone_file), "-o", str(tmp_path / "f.tif"), "--quiet"]) == 0
    ours = [r.getMessage() for r in caplog.records if r.name == "dinov3_eo.tasks.features"]
    assert any("blank.tif has no valid pixel" in message for message in ours), ours
    with rasterio.open(tmp_path / "f.tif") as feats:
        assert np.isnan(feats.read(1)).all()
    assert not (tmp_path / "f_pca.png").exists()  # nothing to picture


def test_embed_bf16_follows_float32(backbone_file: Path, tmp_path: Path) -> None:
    """``--bf16``: the backbone runs under bf16 autocast; features stay float32 and within bf16 rounding."""
    feats = {}
    for flag in ([], ["--bf16"]):
        out = tmp_path / f"feats{len(flag)}.tif"
        assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(out), "--quiet", *flag]) == 0
        with rasterio.open(out) as f:
            assert f.dtypes[0] == "float32"
            feats[bool(flag)] = f.read()
    valid = np.isfinite(feats[False]).all(axis=0)
    assert (np.isfinite(feats[True]).all(axis=0) == valid).all()
    a, b = feats[False][:, valid], feats[True][:, valid]
    cosine = (a * b).sum(0) / np.linalg.norm(a, axis=0) / np.linalg.norm(b, axis=0)
    assert cosine.min() > 0.999 and not np.array_equal(a, b)


def test_stream_patch_features_autocast_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_backbone("vitmicro16").eval()
    seen = []
    layers = model.get_intermediate_layers

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(torch.is_autocast_enabled("cpu"))
        return layers(*args, **kwargs)

    monkeypatch.setattr(model, "get_intermediate_layers", spy)
    with rasterio.open(CROP) as src:
        for amp in (False, True):
            for _, f in stream_patch_features(model, src, normalization=None, window=128, amp=amp, progress=False):
                assert f.dtype == np.float32
    assert seen and seen == sorted(seen) and seen[0] is False and seen[-1] is True


def test_pca_cli_tif_and_png(backbone_file: Path, tmp_path: Path) -> None:
    tif, png = tmp_path / "pca.tif", tmp_path / "pca.png"
    for out in (tif, png):
        assert cli_main(["pca", str(CROP), "--model", str(backbone_file), "-o", str(out), "--window", "128", "--quiet"]) == 0
    with rasterio.open(CROP) as src, rasterio.open(tif) as pca:
        assert pca.count == 3 and pca.dtypes[0] == "uint8" and pca.nodata == 0
        assert pca.crs == src.crs and pca.transform == src.transform @ Affine.scale(16)
        rgb = pca.read()
    valid = (rgb > 0).all(axis=0)
    assert valid.any() and (~valid).any()  # the collar is nodata
    spread = [np.percentile(band[valid], 95) - np.percentile(band[valid], 5) for band in rgb]
    assert min(spread) > 100  # a 2-98 % stretch fills most of the range
    from PIL import Image

    with Image.open(png) as picture:
        assert picture.size == (16 * 16, 15 * 16) and picture.mode == "RGB"  # enlarged x16, one block per patch


def test_pca_png_of_a_chip_without_georeference(backbone_file: Path, tmp_path: Path, capsys) -> None:
    """A PNG picture needs no georeference: the crop saved as a plain PNG chip gives the same picture as the
    GeoTIFF (``--nodata 0`` for both: a PNG declares no nodata); a .tif output of the chip is refused."""
    from PIL import Image

    with rasterio.open(CROP) as src:
        pixels = src.read()
    chip = tmp_path / "chip.png"
    Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0))).save(chip)
    common = ["--model", str(backbone_file), "--window", "128", "--quiet", "--nodata", "0"]
    assert cli_main(["pca", str(chip), "-o", str(tmp_path / "chip_pca.png"), *common]) == 0
    assert cli_main(["pca", str(CROP), "-o", str(tmp_path / "crop_pca.png"), *common]) == 0
    with Image.open(tmp_path / "chip_pca.png") as a, Image.open(tmp_path / "crop_pca.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert cli_main(["pca", str(chip), "-o", str(tmp_path / "chip_pca.tif"), *common]) == 2
    assert "chip.png is not georeferenced" in capsys.readouterr().err


def test_embed_to_zarr_is_georeferenced_like_the_tif(backbone_file: Path, tmp_path: Path) -> None:
    import rioxarray  # noqa: F401
    import xarray as xr

    tif, store = tmp_path / "f.tif", tmp_path / "f.zarr"
    assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(tif), "--quiet"]) == 0
    # the tif's quick-look is f_pca.png already: without --no-quicklook the zarr would stop on it (no overwrite)
    assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(store), "--quiet"]) == 2
    assert not store.exists()
    assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(store), "--quiet",
                     "--no-quicklook"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.tif", "f.zarr", "f_pca.png"]
    features = xr.open_zarr(store, decode_coords="all")["features"]  # "all": the spatial_ref grid mapping
    with rasterio.open(tif) as ref:
        assert features.shape == (ref.count, ref.height, ref.width)
        np.testing.assert_allclose(features.values, ref.read(masked=True).filled(np.nan), equal_nan=True)
        assert features.rio.crs == ref.crs
        assert features.rio.transform().almost_equals(ref.transform)
    assert cli_main(["embed", str(CROP), "--model", str(backbone_file), "-o", str(store), "--quiet"]) == 2  # no overwrite


def test_fit_pca_matches_sklearn() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(400, 6)) * [5, 3, 2, 1, 0.5, 0.1]).astype(np.float32)
    mean, components = fit_pca(x, 3)
    reference = PCA(3).fit(x)
    np.testing.assert_allclose(mean, reference.mean_, atol=1e-5)
    np.testing.assert_allclose(np.abs(components), np.abs(reference.components_), atol=1e-4)
    assert (components[np.arange(3), np.abs(components).argmax(axis=1)] > 0).all()  # deterministic signs


def test_reservoir_sample_takes_rows_from_every_block() -> None:
    blocks = [np.full((1000, 2), i, dtype=np.float32) for i in range(5)]
    sample = _reservoir_sample(iter(blocks), 500, seed=0)
    counts = np.bincount(sample[:, 0].astype(int), minlength=5)
    assert sample.shape == (500, 2) and counts.min() > 60  # ~100 each when uniform
    assert _reservoir_sample(iter([np.ones((3, 2), np.float32)]), 10, seed=0).shape == (3, 2)
    with pytest.raises(ValueError, match="all nodata"):
        _reservoir_sample(iter([np.empty((0, 2), np.float32)]), 10, seed=0)


def test_backbone_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a registered name"):
        resolve_backbone(str(tmp_path / "missing.pth"))
    meta = resolve_backbone("vitmicro16").meta
    with pytest.raises(ValueError, match="carries no input normalisation"):
        input_normalization(meta, None)
    assert input_normalization(meta, "none") is None


def test_write_features_band_mismatch(tmp_path: Path) -> None:
    model = build_backbone("vitmicro16", in_chans=3)
    from dinov3_eo.data.normalization import Normalization

    with pytest.raises(ValueError, match="has 2 bands"):
        write_features(model, CROP, tmp_path / "f.tif", normalization=Normalization.zscore([0, 0], [1, 1]), progress=False)
