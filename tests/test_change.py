"""Change between two dates (``dinov3-eo change``): the stacked reader, the feature distance, Otsu's threshold, and
the whole job on the real Landsat sample with land cover pasted in."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import torch
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import calculate_default_transform, reproject
from rasterio.windows import Window

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.stack import RasterStack
from dinov3_eo.inference.writers import vectorize_classes, write_cog
from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.change import (
    FeatureChange,
    _joined,
    detect_change,
    detect_change_series,
    otsu_threshold,
    radiometric_match,
    score_histogram,
)

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
#: rows / columns of the sample cut out for the tests (fields, the river and the 0-valued collar at the top)
ROWS, COLS = slice(0, 320), slice(96, 384)
#: where the after date gets land cover pasted in, in the cut-out's pixels, and where it comes from
BLOCK = (slice(112, 176), slice(96, 160))
DONOR = (slice(240, 304), slice(176, 240))


def _write(path: Path, data: np.ndarray, profile: dict) -> Path:
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def dates(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A real Landsat-8 cut-out as the before date; the after date is the same with a 64-px block of other land
    cover pasted in (a real change of what is on the ground, not noise). Nodata 0 (the collar)."""
    folder = tmp_path_factory.mktemp("dates")
    with rasterio.open(SAMPLE) as src:
        window = Window.from_slices(ROWS, COLS)
        before = src.read(window=window)
        profile = {**src.profile, "height": before.shape[1], "width": before.shape[2], "nodata": 0,
                   "transform": src.window_transform(window), "tiled": False}  # fmt: skip
        profile.pop("blockxsize"), profile.pop("blockysize")
    after = before.copy()
    after[:, BLOCK[0], BLOCK[1]] = before[:, DONOR[0], DONOR[1]]
    valid = (before > 0).all(axis=0)
    mean = [float(b[valid].mean()) for b in before]
    std = [float(b[valid].std()) for b in before]
    return {
        "before": _write(folder / "before.tif", before, profile),
        "after": _write(folder / "after.tif", after, profile),
        "array": before, "profile": profile, "valid": valid,
        "normalization": Normalization.zscore(mean, std),
    }  # fmt: skip


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vitmicro16", in_chans=3).eval()


def _reprojected(src_path: Path, dst_path: Path, crs: str) -> Path:
    """``src_path`` warped to another CRS (its own grid there), nodata 0 outside."""
    with rasterio.open(src_path) as src:
        transform, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = {**src.profile, "crs": CRS.from_user_input(crs), "transform": transform, "width": width, "height": height}
        out = np.zeros((src.count, height, width), dtype=src.dtypes[0])
        reproject(rasterio.band(src, list(range(1, src.count + 1))), out, dst_transform=transform, dst_crs=crs,
                  resampling=Resampling.bilinear, src_nodata=0, dst_nodata=0)  # fmt: skip
    return _write(dst_path, out, profile)


# --------------------------------------------------------------------------------------------- RasterStack
def test_stack_bands_are_the_members_bands_with_nan_for_each_members_nodata(dates: dict, tmp_path: Path) -> None:
    profile = {**dates["profile"], "count": 1, "dtype": "float32", "nodata": -1.0}
    extra = np.full((1, profile["height"], profile["width"]), 7.5, dtype=np.float32)
    extra[0, 10:20, 30:40] = -1.0
    extra_path = _write(tmp_path / "extra.tif", extra, profile)
    window = Window(20, 0, 50, 40)
    with RasterStack([dates["before"], extra_path]) as stack:
        assert (stack.count, stack.counts, stack.dtypes[0], stack.nodata) == (4, [3, 1], "float32", None)
        assert (stack.crs, stack.transform, stack.shape) == (dates["profile"]["crs"], dates["profile"]["transform"], (320, 288))
        values = stack.read(window=window)
        single = stack.read(4, window=window)
    raw = dates["array"][:, 0:40, 20:70].astype(np.float32)
    expected = np.where(raw == 0, np.nan, raw)  # nodata 0 in any band of the first member: its pixel is invalid
    expected[:, ~(raw > 0).all(axis=0)] = np.nan
    np.testing.assert_array_equal(values[:3], expected)
    np.testing.assert_array_equal(values[3], np.where(extra[0, 0:40, 20:70] == -1.0, np.nan, 7.5))
    np.testing.assert_array_equal(single, values[3])


def test_stack_common_mask_and_boundless_windows(dates: dict, tmp_path: Path) -> None:
    after = dates["array"].copy()
    after[:, 200:210, 50:60] = 0  # nodata in the second member only
    after_path = _write(tmp_path / "holed.tif", after, dates["profile"])
    with RasterStack([dates["before"], after_path], common_mask=True) as stack:
        values = stack.read([1, 4], window=Window(40, 190, 30, 30))
        outside = stack.read([1], window=Window(-8, 300, 32, 32))  # past the left and bottom edges
        masks = stack.read_masks(1, window=Window(40, 190, 30, 30))
    assert np.isnan(values[:, 10:20, 10:20]).all()  # the hole of member 2 masks member 1 too
    assert np.isfinite(values[:, :10]).all()
    np.testing.assert_array_equal(masks == 255, np.isfinite(values[0]))
    assert np.isnan(outside[:, :, :8]).all() and np.isnan(outside[:, 20:]).all()
    np.testing.assert_array_equal(outside[0, :20, 8:], dates["array"][0, 300:320, 0:24].astype(np.float32))


def test_stack_warps_a_member_in_another_crs_onto_the_first_grid(dates: dict, tmp_path: Path) -> None:
    """The warped member reads as GDAL's own WarpedVRT of it reads, NaN outside its footprint."""
    lonlat = _reprojected(dates["before"], tmp_path / "lonlat.tif", "EPSG:4326")
    with RasterStack([dates["before"], lonlat]) as stack:
        assert stack.crs == dates["profile"]["crs"] and stack.count == 6
        warped = stack.read([4, 5, 6])
    with rasterio.open(lonlat) as src, WarpedVRT(
        src, crs=dates["profile"]["crs"], transform=dates["profile"]["transform"], width=288, height=320,
        resampling=Resampling.bilinear, src_nodata=0, nodata=0,
    ) as vrt:  # fmt: skip
        reference = vrt.read().astype(np.float32)
    seen = (reference > 0).all(axis=0)
    np.testing.assert_array_equal(np.isfinite(warped).all(axis=0), seen)
    np.testing.assert_allclose(warped[:, seen], reference[:, seen])
    # and the round trip through degrees stays close to the original pixels (bilinear twice)
    inner = seen & dates["valid"]
    diff = np.abs(warped[:, inner] - dates["array"][:, inner]) / dates["array"][:, inner]
    assert np.median(diff) < 0.02


def test_stack_refuses_what_cannot_be_stacked(dates: dict, tmp_path: Path) -> None:
    far = {**dates["profile"], "transform": dates["profile"]["transform"] @ rasterio.Affine.translation(0, 1e5)}
    far_path = _write(tmp_path / "far.tif", dates["array"], far)
    with pytest.raises(ValueError, match="does not overlap"):
        RasterStack([dates["before"], far_path])
    bare = {k: v for k, v in dates["profile"].items() if k not in ("crs", "transform")}
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning):
        bare_path = _write(tmp_path / "bare.tif", dates["array"], bare)
    with pytest.warns(rasterio.errors.NotGeoreferencedWarning), pytest.raises(ValueError, match="not georeferenced"):
        RasterStack([dates["before"], bare_path])
    with pytest.raises(ValueError, match="2 nodata values for 1 rasters"):
        RasterStack([dates["before"]], nodata=[0, 0])
    with pytest.raises(FileNotFoundError, match=r"Input '.*gone.tif' does not exist"):
        RasterStack([dates["before"], tmp_path / "gone.tif"])
    (tmp_path / "notes.tif").write_text("not a raster")
    with pytest.raises(rasterio.errors.RasterioIOError, match=r"Input '.*notes.tif' cannot be read as a raster"):
        RasterStack([dates["before"], tmp_path / "notes.tif"])


# ------------------------------------------------------------------------------------------ FeatureChange
def test_feature_change_is_one_minus_cosine_of_each_dates_patch_tokens(backbone: torch.nn.Module) -> None:
    """Against each date run alone and a loop over patches; symmetric; 0 for identical dates; in [0, 2]."""
    torch.manual_seed(1)
    before, after = torch.randn(2, 3, 48, 64), torch.randn(2, 3, 48, 64)
    model = FeatureChange(backbone, in_chans=3, layers=[1, 3])
    with torch.no_grad():
        got = model.patch_distance(torch.cat([before, after], dim=1))[:, 0]  # [2, 1, 3, 4] -> [2, 3, 4]
        fa = [t.numpy() for t in backbone.get_intermediate_layers(before, n=[1, 3], reshape=True)]
        fb = [t.numpy() for t in backbone.get_intermediate_layers(after, n=[1, 3], reshape=True)]
        swapped = model.patch_distance(torch.cat([after, before], dim=1))[:, 0]
        same = model.patch_distance(torch.cat([before, before], dim=1))
        dense = model(torch.cat([before, after], dim=1))
    expected = np.zeros((2, 3, 4))
    for i in range(2):
        for y in range(3):
            for x in range(4):
                for a, b in zip(fa, fb):
                    u, v = a[i, :, y, x], b[i, :, y, x]
                    expected[i, y, x] += (1 - u @ v / np.linalg.norm(u) / np.linalg.norm(v)) / 2
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    torch.testing.assert_close(swapped, got)
    assert same.abs().max() < 1e-5
    assert dense.shape == (2, 1, 48, 64) and 0 <= dense.min() and dense.max() <= 2
    # the patch scores upsampled bilinearly: each 16-px block averages back near its patch's score
    np.testing.assert_allclose(dense[:, 0].reshape(2, 3, 16, 4, 16).mean(dim=(2, 4)).numpy(), got.numpy(), atol=0.15)


def test_feature_change_pads_windows_that_are_not_patch_multiples(backbone: torch.nn.Module) -> None:
    model = FeatureChange(backbone, in_chans=3)
    x = torch.randn(1, 6, 40, 50)
    with torch.no_grad():
        assert model(x).shape == (1, 1, 40, 50)
    with pytest.raises(ValueError, match="expected 2 x 3 bands"):
        model(torch.randn(1, 5, 32, 32))


# ------------------------------------------------------------------------------------------ Otsu
def test_otsu_threshold_maximises_the_between_class_variance_of_the_samples() -> None:
    rng = np.random.default_rng(0)
    samples = np.concatenate([rng.normal(0.1, 0.05, 5000), rng.normal(0.9, 0.1, 800)]).clip(0, 2)
    counts, edges = np.histogram(samples, bins=200, range=(0, 2))
    got = otsu_threshold(counts, edges)
    centres = (edges[:-1] + edges[1:]) / 2
    values = np.repeat(centres, counts)  # every sample at its bin centre, as Otsu on a histogram sees it
    best, best_cut = -1.0, None
    for k in range(len(centres) - 1):  # brute force, straight from the definition
        low, high = values[values <= centres[k]], values[values > centres[k]]
        if len(low) and len(high):
            variance = len(low) * len(high) / len(values) ** 2 * (low.mean() - high.mean()) ** 2
            if variance > best + 1e-15:
                best, best_cut = variance, edges[k + 1]
    assert got == pytest.approx(best_cut)
    assert 0.2 < got < 0.7  # between the two modes (0.1 ± 0.05 and 0.9 ± 0.1)
    with pytest.raises(ValueError, match="fewer than two non-empty bins"):
        otsu_threshold(np.array([0, 5, 0]), np.array([0.0, 1.0, 2.0, 3.0]))


def test_vectorize_keeps_only_the_classes_asked_for(tmp_path: Path) -> None:
    labels = np.zeros((20, 20), dtype=np.uint8)
    labels[5:10, 5:10] = 1
    labels[12:18, 2:6] = 1
    tif = write_cog(tmp_path / "m.tif", labels, crs="EPSG:32621", transform=rasterio.Affine(30, 0, 0, 0, -30, 600),
                    nodata=255, overviews=False)  # fmt: skip
    frame = vectorize_classes(tif, tmp_path / "m.gpkg", keep=[1])
    assert list(frame["class_id"]) == [1, 1]
    assert frame["area"].sum() == pytest.approx((25 + 24) * 900)


def test_rgb_bands_follow_the_band_names() -> None:
    meta = BackboneMeta(name="x", in_chans=3, patch_size=16, embed_dim=8, bands=["blue", "green", "red"])
    assert meta.rgb_bands([4, 5, 6]) == [6, 5, 4]
    assert BackboneMeta(name="x", in_chans=4, patch_size=16, embed_dim=8).rgb_bands([1, 2, 3, 4]) == [1, 2, 3]
    assert BackboneMeta(name="x", in_chans=1, patch_size=16, embed_dim=8).rgb_bands([2]) == [2]


# ------------------------------------------------------------------------------------------ radiometry
@pytest.mark.parametrize("clip", [False, True])
def test_after_affine_normalises_the_corrected_values(clip: bool) -> None:
    """``N.after_affine(g, o)(x) == N(g x + o)``, clip included (values on both sides of the bounds)."""
    kw = {"low": (100.0, 50.0), "high": (900.0, 700.0)} if clip else {}
    norm = Normalization(mean=(0.3, 0.5), std=(0.2, 0.1), **kw)
    gain, offset = np.array([1.3, 0.7]), np.array([-40.0, 25.0])
    x = torch.linspace(-100, 1500, 2 * 64, dtype=torch.float64).reshape(2, 8, 8).float()
    corrected = x * torch.tensor(gain, dtype=torch.float32).view(2, 1, 1) + torch.tensor(offset, dtype=torch.float32).view(2, 1, 1)
    torch.testing.assert_close(norm.after_affine(gain, offset)(x), norm(corrected), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="every scale must be > 0"):
        norm.after_affine([1.0, -1.0], [0.0, 0.0])
    joined = _joined([norm, norm.after_affine(gain, offset)])
    assert joined.num_bands == 4 and joined.mean[:2] == norm.mean and (joined.low is None) == (not clip)


def test_radiometric_match_recovers_a_scene_wide_gain_and_offset(dates: dict, tmp_path: Path) -> None:
    gain, offset = np.array([1.25, 1.1, 0.9]), np.array([600.0, 300.0, -200.0])
    # the after date is before with the inverse change, so matching it back needs exactly (gain, offset)
    after = np.where(dates["valid"], (dates["array"] - offset[:, None, None]) / gain[:, None, None], 0).astype(np.float32)
    path = _write(tmp_path / "dim.tif", after, {**dates["profile"], "dtype": "float32"})
    with RasterStack([dates["before"], path], common_mask=True) as stack:
        got_gain, got_offset = radiometric_match(stack, [1, 2, 3], [4, 5, 6])
    np.testing.assert_allclose(got_gain, gain, rtol=1e-4)
    np.testing.assert_allclose(got_offset, offset, rtol=1e-3, atol=0.5)


def test_matching_keeps_a_change_of_light_from_being_mapped(dates: dict, backbone: torch.nn.Module, tmp_path: Path) -> None:
    """Brighter, hazier after date plus the pasted block: with matching only the block stands out, without it the
    whole scene does."""
    with rasterio.open(dates["after"]) as src:
        after = src.read().astype(np.float64)
    lit = np.where(dates["valid"], after * np.array([1.25, 1.1, 0.9])[:, None, None] + 600, 0).astype(np.uint16)
    path = _write(tmp_path / "lit.tif", lit, dates["profile"])
    block = np.zeros(dates["valid"].shape, dtype=bool)
    block[BLOCK] = True
    rest = ~block & dates["valid"]
    scores = {}
    for radiometry in ("match", "none"):
        summary = detect_change(backbone, dates["before"], path, tmp_path / f"{radiometry}.tif", radiometry=radiometry,
                                normalization=dates["normalization"], window=128, progress=False)  # fmt: skip
        with rasterio.open(summary.score) as src:
            scores[radiometry] = src.read(1)
            tags = src.tags()
    assert tags["radiometry"] == "none"
    assert np.mean(scores["match"][rest]) < 0.1 * np.mean(scores["none"][rest])
    assert np.mean(scores["match"][block]) > 20 * np.mean(scores["match"][rest])
    with rasterio.open(tmp_path / "match_mask.tif") as src:
        changed = src.read(1) == 1
    assert (changed & block).sum() / (changed | block).sum() > 0.7
    with rasterio.open(tmp_path / "match.tif") as src:
        np.testing.assert_allclose(json.loads(src.tags()["gain"]), [0.8, 1 / 1.1, 1 / 0.9], rtol=0.05)
    with pytest.raises(ValueError, match="radiometry must be"):
        detect_change(backbone, dates["before"], path, tmp_path / "x.tif", radiometry="histogram",
                      normalization=dates["normalization"])  # fmt: skip


# ------------------------------------------------------------------------------------------ the job
def test_detect_change_finds_the_pasted_land_cover(dates: dict, backbone: torch.nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "change.tif"
    summary = detect_change(
        backbone, dates["before"], dates["after"], out, normalization=dates["normalization"],
        polygons=tmp_path / "change.gpkg", quicklook=tmp_path / "change.png", window=128, progress=False,
    )  # fmt: skip
    with rasterio.open(out) as src, rasterio.open(dates["before"]) as ref:
        assert (src.crs, src.transform, src.shape, src.count) == (ref.crs, ref.transform, ref.shape, 1)
        assert src.dtypes[0] == "float32" and np.isnan(src.nodata)
        score = src.read(1)
        assert json.loads(src.tags()["layers"]) == 1
    block = np.zeros(score.shape, dtype=bool)
    block[BLOCK] = True
    valid = dates["valid"]
    np.testing.assert_array_equal(np.isfinite(score), valid)  # the collar (0 in the before date) is nodata
    assert np.nanmean(score[block]) > 20 * np.nanmean(score[~block & valid])
    with rasterio.open(summary.mask) as src:
        mask = src.read(1)
        assert src.nodata == 255 and json.loads(src.tags()["class_names"]) == ["no change", "change"]
    assert set(np.unique(mask)) <= {0, 1, 255}
    np.testing.assert_array_equal(mask == 255, ~valid)
    changed = mask == 1
    assert (changed & block).sum() / (changed | block).sum() > 0.7  # the mask is the pasted block
    assert summary.threshold_method == "otsu" and 0 < summary.threshold < 2
    assert summary.changed_pixels == changed.sum() and summary.valid_pixels == valid.sum()
    assert summary.changed_area_ha == pytest.approx(changed.sum() * 0.09)  # 30 m pixels
    frame = gpd.read_file(summary.polygons)
    assert set(frame["class_name"]) == {"change"} and frame.crs == dates["profile"]["crs"]
    assert frame.geometry.area.sum() == pytest.approx(changed.sum() * 900.0)
    assert summary.quicklook.stat().st_size > 10_000
    ds = summary.to_xarray()
    assert ds.rio.crs == dates["profile"]["crs"] and ds["change"].shape == score.shape
    np.testing.assert_array_equal(ds["change"].values, score)
    np.testing.assert_array_equal(ds["mask"].values, mask)
    assert ds.attrs["threshold_method"] == "otsu" and ds.rio.transform() == dates["profile"]["transform"]


def test_detect_change_across_crss_and_for_identical_dates(dates: dict, backbone: torch.nn.Module, tmp_path: Path) -> None:
    """The after date in degrees is compared on the before grid; no change scores near zero."""
    lonlat = _reprojected(dates["after"], tmp_path / "after_lonlat.tif", "EPSG:4326")
    warped = detect_change(backbone, dates["before"], lonlat, tmp_path / "w.tif", normalization=dates["normalization"],
                           window=128, progress=False)  # fmt: skip
    with rasterio.open(warped.score) as src:
        score = src.read(1)
    block = np.zeros(score.shape, dtype=bool)
    block[BLOCK] = True
    still = ~block & np.isfinite(score)
    assert np.nanmean(score[block]) > 10 * np.mean(score[still])  # resampled twice, still far below the change
    with rasterio.open(warped.mask) as src:
        changed = src.read(1) == 1
    assert (changed & block).sum() / (changed | block).sum() > 0.6

    same = detect_change(backbone, dates["before"], dates["before"], tmp_path / "s.tif",
                         normalization=dates["normalization"], window=128, progress=False)  # fmt: skip
    counts, _ = score_histogram(same.score)
    assert counts[1:].sum() == 0  # every score below 0.001
    assert same.changed_pixels == 0 and same.threshold_method == "otsu (one score only)"


def test_detect_change_refuses_bad_requests_before_any_work(dates: dict, backbone: torch.nn.Module, tmp_path: Path) -> None:
    norm = dates["normalization"]
    two = _write(tmp_path / "two.tif", dates["array"][:2], {**dates["profile"], "count": 2})
    with pytest.raises(ValueError, match=r"different band counts \(.*before.tif has 3, .*two.tif has 2\)"):
        detect_change(backbone, dates["before"], two, tmp_path / "a.tif", normalization=norm, progress=False)
    with pytest.raises(ValueError, match="backbone takes 3"):
        detect_change(backbone, dates["before"], two, tmp_path / "a.tif", normalization=norm, bands=[1, 2], progress=False)
    with pytest.raises(ValueError, match="inputs are never overwritten"):
        detect_change(backbone, dates["before"], dates["after"], dates["after"], normalization=norm, progress=False)
    (tmp_path / "b_mask.tif").write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="b_mask.tif"):
        detect_change(backbone, dates["before"], dates["after"], tmp_path / "b.tif", normalization=norm, progress=False)
    assert not (tmp_path / "b.tif").exists() and (tmp_path / "b_mask.tif").read_bytes() == b"keep"
    with pytest.raises(ValueError, match="threshold must be"):
        detect_change(backbone, dates["before"], dates["after"], tmp_path / "c.tif", normalization=norm, threshold="mean")
    with pytest.raises(ValueError, match="need a threshold"):
        detect_change(backbone, dates["before"], dates["after"], tmp_path / "c.tif", normalization=norm, threshold=None,
                      polygons=tmp_path / "c.gpkg")  # fmt: skip


def test_change_command(dates: dict, backbone: torch.nn.Module, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, bands=["blue", "green", "red"],
                        normalization=dates["normalization"].to_dict())  # fmt: skip
    model = export_backbone(backbone, tmp_path / "micro", meta=meta)["pth"]
    out = tmp_path / "out" / "change.tif"
    out.parent.mkdir()
    args = ["change", str(dates["before"]), str(dates["after"]), "--model", str(model), "-o", str(out),
            "--polygons", str(tmp_path / "out" / "change.gpkg"), "--window", "128", "--quiet"]  # fmt: skip
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert "threshold" in printed and "otsu" in printed and " ha)" in printed
    assert sorted(p.name for p in out.parent.iterdir()) == ["change.gpkg", "change.png", "change.tif", "change_mask.tif"]
    assert cli_main(args) == 2  # nothing is overwritten without --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli_main([*args, "--overwrite", "--threshold", "0.5", "--no-quicklook"]) == 0
    with rasterio.open(out.parent / "change_mask.tif") as src:
        assert src.tags()["threshold"] == "0.5"
    only = tmp_path / "only.tif"
    assert cli_main(["change", str(dates["before"]), str(dates["after"]), "--model", str(model), "-o", str(only),
                     "--threshold", "none", "--no-quicklook", "--quiet"]) == 0  # fmt: skip
    assert not (tmp_path / "only_mask.tif").exists()
    assert cli_main(["change", str(dates["before"]), str(dates["after"]), "--model", str(model), "-o", str(only),
                     "--threshold", "high", "--quiet"]) == 2  # fmt: skip
    assert "--threshold must be" in capsys.readouterr().err
    assert cli_main(["change", str(dates["before"]), str(tmp_path / "missing.tif"), "--model", str(model), "-o",
                     str(tmp_path / "m.tif"), "--quiet"]) == 2  # fmt: skip
    assert "missing.tif" in capsys.readouterr().err


def test_a_backbone_that_learnt_at_another_scale_is_named(dates: dict, backbone: torch.nn.Module, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, gsd=10.0)
    monkeypatch.setattr(backbone, "meta", meta, raising=False)
    with caplog.at_level("WARNING", logger="dinov3_eo.tasks.change"):
        detect_change(backbone, dates["before"], dates["after"], tmp_path / "c.tif", normalization=dates["normalization"],
                      threshold=None, window=128, progress=False)  # fmt: skip
    assert "has 30 m pixels but the backbone learnt at 10 m" in caplog.text


# ------------------------------------------------------------------------------------------ a series of dates
SECOND = (slice(224, 272), slice(176, 240))  # changed between the second and the third date


def test_feature_change_of_a_series_is_the_pairs_of_consecutive_dates(backbone: torch.nn.Module) -> None:
    torch.manual_seed(2)
    a, b, c = (torch.randn(2, 3, 32, 48) for _ in range(3))
    with torch.no_grad():
        series = FeatureChange(backbone, in_chans=3, dates=3).patch_distance(torch.cat([a, b, c], dim=1))
        pair = FeatureChange(backbone, in_chans=3)
        first, second = (pair.patch_distance(torch.cat(x, dim=1))[:, 0] for x in ((a, b), (b, c)))
    assert series.shape == (2, 2, 2, 3)
    torch.testing.assert_close(series[:, 0], first, atol=1e-5, rtol=0)
    torch.testing.assert_close(series[:, 1], second, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="at least 2 dates"):
        FeatureChange(backbone, in_chans=3, dates=1)


def test_a_series_says_when_each_place_changed(dates: dict, backbone: torch.nn.Module, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    with rasterio.open(dates["after"]) as src:
        third = src.read()
    third[:, SECOND[0], SECOND[1]] = dates["array"][:, 20:68, 120:184]
    third_path = _write(tmp_path / "third.tif", third, dates["profile"])
    series = [dates["before"], dates["after"], third_path]
    summary = detect_change_series(backbone, series, tmp_path / "s.tif", normalization=dates["normalization"],
                                   polygons=tmp_path / "s.gpkg", window=128, progress=False)  # fmt: skip
    assert summary.intervals == ("before.tif -> after.tif", "after.tif -> third.tif")
    with rasterio.open(summary.score) as src:
        assert src.count == 2 and list(src.descriptions) == list(summary.intervals)
    with rasterio.open(summary.mask) as src:
        when = src.read(1)
        assert json.loads(src.tags()["class_names"]) == ["no change", *summary.intervals]
    first, second = np.zeros(when.shape, bool), np.zeros(when.shape, bool)
    first[BLOCK], second[SECOND] = True, True
    for block, value in ((first, 1), (second, 2)):
        hit = when == value
        assert (hit & block).sum() / (hit | block).sum() > 0.6  # each block flagged with the interval it changed in
    assert summary.changed_per_interval == ((when == 1).sum(), (when == 2).sum())
    assert summary.changed_pixels == sum(summary.changed_per_interval)
    assert set(gpd.read_file(summary.polygons)["class_name"]) == set(summary.intervals)
    ds = summary.to_xarray()
    assert ds["change"].dims == ("interval", "y", "x") and list(ds["interval"].values) == list(summary.intervals)

    out = tmp_path / "cli" / "s.tif"
    out.parent.mkdir()
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96,
                        normalization=dates["normalization"].to_dict())  # fmt: skip
    model = export_backbone(backbone, tmp_path / "micro", meta=meta)["pth"]
    assert cli_main(["change", *map(str, series), "--model", str(model), "-o", str(out), "--window", "128", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "changed most after.tif -> third.tif:" in printed
    assert cli_main(["change", str(dates["before"]), "--model", str(model), "-o", str(tmp_path / "one.tif")]) == 2
    assert "at least two dates" in capsys.readouterr().err


def test_dates_that_share_no_valid_pixel_give_no_mask(dates: dict, backbone: torch.nn.Module, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    top, bottom = dates["array"].copy(), dates["array"].copy()
    top[:, 160:], bottom[:, :160] = 0, 0  # each date has data where the other has none
    paths = [_write(tmp_path / f"{n}.tif", a, dates["profile"]) for n, a in (("top", top), ("bottom", bottom))]
    with caplog.at_level("WARNING", logger="dinov3_eo.tasks.change"):
        summary = detect_change(backbone, *paths, tmp_path / "c.tif", normalization=dates["normalization"],
                                radiometry="none", threshold=0.5, window=128, progress=False)  # fmt: skip
    assert summary.mask is None and summary.valid_pixels == 0 and not (tmp_path / "c_mask.tif").exists()
    assert "share no valid pixel" in caplog.text
    with rasterio.open(summary.score) as src:
        assert np.isnan(src.read(1)).all()
