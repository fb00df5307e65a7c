"""Open-vocabulary maps and map queries: georeferencing, path = DataArray, query by example, the CLIs end to end."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import xarray as xr
from meta_device import HostToDeviceCopies, allow_meta_autocast
from shapely.geometry import Point, box
from tiny_text import TINY_TEXT, tiny_text_model

from dinov3_eo.losses.contrastive import clip_loss, grouped_clip_loss
from dinov3_eo.tasks.openvocab import (
    CLASS_NODATA,
    MapQuery,
    TextAlignmentTask,
    load_text_model,
    query_main,
    scores_to_classes,
    text_main,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
#: Landsat-8 L1 DN range of the sample, as a Normalization dict
NORM = {"mean": [0.0] * 3, "std": [1.0] * 3, "low": [6000.0] * 3, "high": [14000.0] * 3, "name": "percentile"}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("model") / "tiny_text.pt", NORM)


@pytest.fixture(scope="module")
def engine(model_path: Path) -> MapQuery:
    return MapQuery.from_checkpoint(model_path, window=128, overlap=0.25, nodata=0, device="cpu")


@pytest.fixture(scope="module")
def crop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The top-right 200 x 160 px of the bundled sample (it holds part of the 0-valued collar)."""
    dst = tmp_path_factory.mktemp("raster") / "crop.tif"
    with rasterio.open(SAMPLE) as src:
        window = rasterio.windows.Window(src.width - 160, 0, 160, 200)
        profile = src.profile | {"width": 160, "height": 200, "transform": src.window_transform(window), "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
        with rasterio.open(dst, "w", **profile) as out:
            out.write(src.read(window=window))
    return dst


# -------------------------------------------------------------------------------------------------- loss
class TestGroupedClipLoss:
    def test_equals_clip_loss_with_unique_captions(self) -> None:
        img = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        txt = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
        ours = grouped_clip_loss(img, txt, torch.arange(6), torch.tensor([2.3]))
        torch.testing.assert_close(ours, clip_loss(img, txt, torch.tensor([2.3])))

    def test_matches_a_loop_with_repeated_captions(self) -> None:
        img = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
        txt = torch.nn.functional.normalize(torch.randn(2, 8), dim=1)
        groups = torch.tensor([0, 1, 0, 0, 1])
        s = math.exp(1.5) * img @ txt.T
        i2t = np.mean([-(s[b, groups[b]] - torch.logsumexp(s[b], 0)).item() for b in range(5)])
        t2i = np.mean([
            -(torch.logsumexp(s[groups == u, u], 0) - torch.logsumexp(s[:, u], 0)).item() for u in range(2)
        ])  # fmt: skip
        torch.testing.assert_close(grouped_clip_loss(img, txt, groups, 1.5).item(), (i2t + t2i) / 2, rtol=1e-5, atol=1e-6)

    def test_rejects_a_text_without_image(self) -> None:
        with pytest.raises(ValueError, match="at least one image"):
            grouped_clip_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]), 1.0)


# -------------------------------------------------------------------------------------------------- model file
def test_export_round_trip(model_path: Path, tmp_path: Path) -> None:
    model, meta, text_meta = load_text_model(model_path)
    assert meta.normalization == NORM and meta.in_chans == 3 and meta.name == "vitmicro16"
    assert text_meta["tokenizer"]["name"] == "openai-clip-bpe" and len(text_meta["templates"]) > 1
    again, _, _ = load_text_model(model_path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_dense(x), again.encode_dense(x))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a dinov3_eo text model"):
        load_text_model(tmp_path / "other.pt")


def test_adapt_tokens_equals_the_adapter(model_path: Path) -> None:
    from dinov3_eo.tasks.openvocab import adapt_tokens

    model, _, _ = load_text_model(model_path)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        cls, patches = model.vision(x)
        cls2, patches2 = adapt_tokens(model.vision, model.vision.backbone_tokens(x), (2, 3))
    torch.testing.assert_close(cls, cls2)
    torch.testing.assert_close(patches, patches2)


def test_logit_scale_clamped_after_each_step() -> None:
    task = TextAlignmentTask(backbone="vitmicro16", text_cfg=TINY_TEXT, ffn_layer="mlp", normalization=NORM)
    with torch.no_grad():
        task.model.logit_scale.fill_(9.0)
    task.on_train_batch_end(None, None, 0)
    assert task.model.logit_scale.item() == pytest.approx(math.log(100.0))


def test_labels_that_are_not_classes_are_caught_on_the_host() -> None:
    task = TextAlignmentTask(backbone="vitmicro16", text_cfg=TINY_TEXT, ffn_layer="mlp", normalization=NORM,
                             class_names=["water", "forest"], dense_loss_weight=0.5)
    good = {"image": torch.zeros(1, 3, 4, 4), "mask": torch.tensor([[[0, 1, CLASS_NODATA, 1]] * 4])}
    assert task.on_before_batch_transfer(good, 0) is good
    with pytest.raises(ValueError, match=r"TextAlignmentTask: labels \[5\] fall outside 0\.\.1 \(ignore_index=255\)"):
        task.on_before_batch_transfer({**good, "mask": torch.tensor([[[0, 5, 1, 1]] * 4])}, 0)


def test_a_training_step_never_reads_back_from_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """On meta tensors (a stand-in for a GPU) any device-to-host read raises, and the host-to-device copies (caption
    tokens, caption groups, unnamed class ids) do not wait for the device; see tests/meta_device.py."""
    allow_meta_autocast(monkeypatch)
    task = TextAlignmentTask(backbone="vitmicro16", text_cfg=TINY_TEXT, ffn_layer="mlp", normalization=NORM,
                             class_names=["water", "", "forest"], dense_loss_weight=0.5)
    task.on_fit_start()
    task.to_empty(device="meta")
    monkeypatch.setattr(task, "log", lambda *args, **kwargs: None)
    monkeypatch.setattr(task, "log_dict", lambda *args, **kwargs: None)
    batch = {"image": torch.empty(3, 3, 32, 32, device="meta"), "valid": torch.empty(3, 32, 32, dtype=torch.bool,
             device="meta"), "mask": torch.empty(3, 32, 32, dtype=torch.long, device="meta"),
             "caption": ["a lake", "a forest", "a lake"]}  # fmt: skip
    with HostToDeviceCopies() as copies:
        task.training_step(batch, 0).backward()
    assert copies.copies and not copies.blocking


# -------------------------------------------------------------------------------------------------- queries
class TestQuery:
    def test_bf16_scores_follow_float32(self, model_path: Path, crop: Path) -> None:
        fp32, bf16 = (MapQuery.from_checkpoint(model_path, window=128, overlap=0.25, nodata=0, device="cpu", amp=amp)
                      .query(crop, ["water", "forest"]) for amp in (None, True))  # fmt: skip
        assert np.array_equal(np.isnan(fp32.values), np.isnan(bf16.values))
        np.testing.assert_allclose(bf16.values, fp32.values, atol=0.02)
        assert not np.array_equal(bf16.values, fp32.values)  # bf16 ran

    def test_tta_averages_probabilities(self, model_path: Path, crop: Path) -> None:
        plain, tta = (MapQuery.from_checkpoint(model_path, window=128, overlap=0.25, nodata=0, device="cpu", tta=mode)
                      .query(crop, ["water", "forest"]) for mode in (None, "d4"))  # fmt: skip
        assert np.array_equal(np.isnan(plain.values), np.isnan(tta.values))
        ok = ~np.isnan(tta.values[0])
        np.testing.assert_allclose(tta.values[:, ok].sum(axis=0), 1.0, atol=1e-5)
        assert np.abs(tta.values[:, ok] - plain.values[:, ok]).max() > 1e-4
        with pytest.raises(ValueError, match="tta must be one of"):
            MapQuery.from_checkpoint(model_path, tta="rotate")

    def test_georeferencing_and_nodata(self, engine: MapQuery, crop: Path) -> None:
        da = engine.query(crop, ["water", "forest"])
        with rasterio.open(crop) as src:
            collar = (src.read() == 0).all(axis=0)
            assert da.dims == ("query", "y", "x") and da.shape == (2, src.height, src.width)
            assert da.rio.crs == src.crs and da.rio.transform() == src.transform
            x0, y0 = src.xy(0, 0)
        assert list(da["query"].values) == ["water", "forest"] and da.attrs["scores"] == "probability"
        assert da.x.values[0] == pytest.approx(x0) and da.y.values[0] == pytest.approx(y0)  # pixel centres
        assert collar.any() and np.array_equal(np.isnan(da.values[0]), collar)
        np.testing.assert_allclose(da.sum("query").values[~collar], 1.0, atol=1e-5)  # softmax over the queries

    def test_a_dataarray_without_crs_is_refused(self, engine: MapQuery, crop: Path) -> None:
        import rioxarray

        opened = rioxarray.open_rasterio(crop)
        plain = xr.DataArray(opened.values.copy(), dims=("band", "y", "x"), coords={"y": opened.y, "x": opened.x})
        with pytest.raises(ValueError, match=r"DataArray has no CRS.*rio\.write_crs"):
            engine.query(plain, ["water"])

    def test_path_equals_in_memory_dataarray(self, engine: MapQuery, crop: Path) -> None:
        import rioxarray

        from_path = engine.query(crop, ["water", "crop land"], scores="cosine")
        opened = rioxarray.open_rasterio(crop)
        from_file_array = engine.query(opened, ["water", "crop land"], scores="cosine")
        plain = xr.DataArray(opened.values.copy(), dims=("band", "y", "x"), coords={"y": opened.y, "x": opened.x})
        plain = plain.rio.write_crs(opened.rio.crs).rio.write_transform(opened.rio.transform())
        from_numpy = engine.query(plain, ["water", "crop land"], scores="cosine")
        for other in (from_file_array, from_numpy):
            np.testing.assert_allclose(other.values, from_path.values, rtol=0, atol=1e-6)
            assert other.rio.crs == from_path.rio.crs and other.rio.transform() == from_path.rio.transform()
        masked = engine.query(rioxarray.open_rasterio(crop, masked=True).fillna(np.nan), ["water", "crop land"], scores="cosine")
        assert np.array_equal(np.isnan(masked.values), np.isnan(from_path.values))

    def test_segment_and_polygons(self, engine: MapQuery, crop: Path) -> None:
        scores = engine.query(crop, ["water", "forest"], background="other")
        assert list(scores["query"].values) == ["water", "forest", "other"]
        classes = engine.segment(crop, ["water", "forest"], background="other")
        assert classes.dims == ("y", "x") and classes.dtype == np.uint8
        assert classes.rio.crs == scores.rio.crs and classes.rio.transform() == scores.rio.transform()
        assert classes.attrs["class_names"] == ["water", "forest", "other"] and classes.rio.nodata == CLASS_NODATA
        valid = ~np.isnan(scores.values[0])
        np.testing.assert_array_equal(classes.values[valid], scores.values.argmax(axis=0)[valid])
        assert (classes.values[~valid] == CLASS_NODATA).all()
        everything_low = engine.segment(crop, ["water", "forest"], background="other", threshold=1.01)
        assert set(np.unique(everything_low.values)) == {2, CLASS_NODATA}
        frame = engine.polygons(crop, ["water", "forest"], background="other")
        assert frame.crs == classes.rio.crs and set(frame["class_name"]) <= {"water", "forest", "other"}
        pixel_area = abs(classes.rio.transform().a * classes.rio.transform().e)
        assert frame["area"].sum() == pytest.approx(valid.sum() * pixel_area)

    def test_bad_queries_and_bands(self, engine: MapQuery, crop: Path, model_path: Path) -> None:
        with pytest.raises(TypeError, match="single string"):
            engine.query(crop, "water")
        with pytest.raises(ValueError, match="non-empty strings"):
            engine.query(crop, ["water", " "])
        with pytest.raises(ValueError, match="takes 3 bands"):
            MapQuery.from_checkpoint(model_path, bands=[1, 2]).query(crop, ["water"])

    def test_stretch_to_the_scene(self, model_path: Path, crop: Path) -> None:
        engine = MapQuery.from_checkpoint(model_path, nodata=0)
        norm = engine.stretch_to(crop, percentiles=(0.0, 100.0))
        with rasterio.open(crop) as src:
            data = src.read().reshape(3, -1)
        valid = (data != 0).all(axis=0)
        assert norm.low == tuple(float(v) for v in data[:, valid].min(axis=1))
        assert norm.high == tuple(float(v) for v in data[:, valid].max(axis=1))
        assert norm.mean == tuple(NORM["mean"]) and engine.normalization is norm

    def test_scores_to_classes(self) -> None:
        scores = np.array([[[0.2, 0.9, np.nan]], [[0.8, 0.1, np.nan]]], dtype=np.float32)  # [K=2, 1, 3]
        assert scores_to_classes(scores).tolist() == [[1, 0, CLASS_NODATA]]
        assert scores_to_classes(scores, threshold=0.85, background=2).tolist() == [[2, 0, CLASS_NODATA]]
        assert scores_to_classes(scores, threshold=0.85).tolist() == [[CLASS_NODATA, 0, CLASS_NODATA]]


class TestSimilar:
    def test_one_at_a_point_example_in_any_crs(self, engine: MapQuery, crop: Path) -> None:
        with rasterio.open(crop) as src:
            x, y = src.xy(150, 40)  # rows 128+ are covered by one window only (stride 96, window 128)
            crs = src.crs
        sim = engine.similar(crop, Point(x, y))
        assert sim.dims == ("y", "x") and sim.rio.crs == crs
        assert float(sim[150, 40]) == pytest.approx(1.0, abs=1e-5)
        assert float(sim.max()) == pytest.approx(1.0, abs=1e-5) and float(sim.min()) < 0.99
        from pyproj import Transformer

        lon, lat = Transformer.from_crs(crs, "EPSG:4326", always_xy=True).transform(x, y)
        in_lonlat = engine.similar(crop, Point(lon, lat), crs="EPSG:4326")
        assert float(in_lonlat[150, 40]) == pytest.approx(1.0, abs=1e-5)
        in_overlap = engine.similar(crop, Point(*rasterio.open(crop).xy(100, 40)))  # two windows blend here
        assert float(in_overlap[100, 40]) > 0.9

    def test_polygon_and_errors(self, engine: MapQuery, crop: Path) -> None:
        with rasterio.open(crop) as src:
            (left, top), (right, bottom) = src.xy(140, 20), src.xy(160, 40)
            bounds = src.bounds
        sim = engine.similar(crop, box(left, bottom, right, top))
        inside = sim.values[140:161, 20:41]
        assert np.nanmean(inside) > np.nanmean(sim.values)
        with pytest.raises(ValueError, match="outside the raster"):
            engine.similar(crop, Point(bounds.left - 100, bounds.top))
        with pytest.raises(TypeError, match="shapely geometry"):
            engine.similar(crop, (left, top))


# -------------------------------------------------------------------------------------------------- CLIs
@pytest.mark.slow
def test_text_fit_then_query_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = text_main([
        "fit", "--config", "configs/text/tiny_cpu.yaml", "--trainer.max_steps", "2",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[]", "--trainer.enable_checkpointing=true",
    ])  # fmt: skip
    assert code == 0
    (checkpoint,) = tmp_path.rglob("*.ckpt")
    stored = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert stored["dinov3_eo"]["normalization"]["name"] == "percentile"  # the data module's, the backbone had none
    assert stored["dinov3_eo_text"]["class_names"] and stored["dinov3_eo"]["bands"] is not None

    out = tmp_path / "out.tif"
    args = [str(SAMPLE), "water", "crop land", "-o", str(out), "--model", str(checkpoint), "--nodata", "0",
            "--polygons", str(tmp_path / "out.gpkg"), "--background", "other", "--threshold", "0.2", "--window", "256"]  # fmt: skip
    assert query_main(args) == 0
    with rasterio.open(SAMPLE) as src, rasterio.open(out) as scores, rasterio.open(tmp_path / "out_classes.tif") as cls:
        for result in (scores, cls):
            assert result.crs == src.crs and result.transform == src.transform and result.shape == src.shape
        assert scores.count == 3 and scores.descriptions == ("water", "crop land", "other")
        assert json.loads(cls.tags()["class_names"]) == ["water", "crop land", "other"] and cls.nodata == CLASS_NODATA
        assert cls.colormap(1)[0][:3] != (0, 0, 0) or cls.colormap(1)[1][:3] != (0, 0, 0)
    import geopandas as gpd

    frame = gpd.read_file(tmp_path / "out.gpkg")
    assert frame.crs == rasterio.open(SAMPLE).crs and len(frame) > 0
    assert (tmp_path / "out.png").stat().st_size > 1000
    assert query_main(args) == 2  # outputs exist and --overwrite was not given


# -------------------------------------------------------------------------------------------------- polygons
def test_the_dense_encoder_is_encode_dense(model_path: Path) -> None:
    from dinov3_eo.models.text import TextDenseEncoder

    model, meta, _ = load_text_model(model_path)
    encoder = TextDenseEncoder(model, meta)
    x = torch.randn(2, 3, 64, 48)
    (tokens,) = encoder.get_intermediate_layers(x, n=1, reshape=True, norm=True)
    torch.testing.assert_close(tokens, model.encode_dense(x))
    assert tokens.shape == (2, model.patch_dim, 4, 3) and encoder.embed_dim == model.patch_dim
    torch.testing.assert_close(tokens.norm(dim=1), torch.ones(2, 4, 3))
    with pytest.raises(ValueError, match="n=1, reshape=True"):
        encoder.get_intermediate_layers(x, n=2)


def test_polygons_are_scored_by_their_mean_cosine_over_the_patches(model_path: Path, crop: Path) -> None:
    """Against the dense recipe written out: the crop read as the stream reads it (one window, 4 patches of context
    filled with zeros), the model's encode_dense, each patch cell's area inside the polygon from shapely, the mean
    cosine over the cells with data, then the softmax of the scaled means."""
    import geopandas as gpd
    from shapely.geometry import box as shapely_box

    from dinov3_eo.data.raster import read_window

    engine = MapQuery.from_checkpoint(model_path, window=256, nodata=0, device="cpu")
    queries = ["water", "bare soil"]
    with rasterio.open(crop) as src:
        t = src.transform
        values, valid = read_window(src, rasterio.windows.Window(-64, -64, 384, 384), bands=[1, 2, 3], nodata=0)
        polygons = [shapely_box(*(t @ (10, 100)), *(t @ (70, 70))),  # rows 70-100, cols 10-70 px: parts of 3 x 5 patches
                    shapely_box(*(t @ (32, 48)), *(t @ (48, 32))),  # exactly one patch cell
                    shapely_box(*(t @ (100, 60)), *(t @ (150, 10))),  # over the 0-valued collar (top right) in part
                    shapely_box(*(t @ (-500, -400)), *(t @ (-450, -450)))]  # off the crop
        zones = gpd.GeoDataFrame({"id": range(4)}, geometry=polygons, crs=src.crs)
        h, w = -(-src.height // 16), -(-src.width // 16)
    image = engine.normalization(torch.from_numpy(values.astype(np.float32)))
    image = torch.nan_to_num(image).masked_fill_(~torch.from_numpy(valid), 0.0)
    with torch.no_grad():
        dense = engine.model.encode_dense(image[None])[0, :, 4 : 4 + h, 4 : 4 + w].numpy()  # [D, h, w]
    patch_valid = valid.reshape(24, 16, 24, 16).any(axis=(1, 3))[4 : 4 + h, 4 : 4 + w]
    text = engine.text_embeddings(queries).numpy()  # [T, D]
    scale = float(engine.model.logit_scale.exp())
    named = engine.zones(crop, zones, queries)
    for z, polygon in enumerate(polygons[:3]):
        weights = np.zeros((h, w))
        for r in range(h):
            for c in range(w):
                cell = shapely_box(*(t @ (16 * c, 16 * (r + 1))), *(t @ (16 * (c + 1), 16 * r)))
                weights[r, c] = cell.intersection(polygon).area if patch_valid[r, c] else 0.0
        mean = (dense * weights).sum(axis=(1, 2)) / weights.sum()
        logits = scale * mean @ text.T
        expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(named.loc[z, ["p_water", "p_bare soil"]].to_numpy(float), expected, rtol=1e-4, atol=1e-6)
        assert named.loc[z, "class"] == queries[int(expected.argmax())] and named.loc[z, "score"] == pytest.approx(expected.max(), rel=1e-4)
    assert 0 < named.loc[2, "coverage"] < 1 and named.loc[1, "patches"] == 1 and named.loc[1, "coverage"] == pytest.approx(1.0)
    assert named["class"].isna().tolist() == [False, False, False, True]  # off the crop: no class, no score
    assert np.isnan(named.loc[3, "score"]) and named.loc[3, "patches"] == 0
    # the same scene as an xarray.DataArray: the same answers
    import rioxarray

    as_array = engine.zones(rioxarray.open_rasterio(crop), zones, queries)
    np.testing.assert_allclose(as_array[["p_water", "p_bare soil"]].to_numpy(float), named[["p_water", "p_bare soil"]].to_numpy(float), rtol=1e-5)
    # the crop cut into a west and an east scene (a mosaic): the pooled answer; polygons on one side that side's
    with rasterio.open(crop) as src:
        for name, window in (("west", rasterio.windows.Window(0, 0, 80, 200)), ("east", rasterio.windows.Window(80, 0, 80, 200))):
            profile = {**src.profile, "width": 80, "height": 200, "transform": src.window_transform(window)}
            with rasterio.open(crop.with_name(f"{name}.tif"), "w", **profile) as out:
                out.write(src.read(window=window))
    halves = engine.zones([crop.with_name("west.tif"), crop.with_name("east.tif")], zones, queries, scores="cosine")
    west_only = engine.zones(crop.with_name("west.tif"), zones, queries, scores="cosine")
    np.testing.assert_allclose(halves.loc[:1, "cos_water"], west_only.loc[:1, "cos_water"], rtol=1e-6)  # both in the west
    assert halves.loc[2, "patches"] > west_only.loc[2, "patches"] and halves["class"].isna().tolist() == [False] * 3 + [True]
    # raw cosine: the mean of the cosine map over the one-patch polygon is that patch's cosine
    cosine = engine.zones(crop, zones, queries, scores="cosine")
    np.testing.assert_allclose(cosine.loc[1, ["cos_water", "cos_bare soil"]].to_numpy(float), dense[:, 2, 2] @ text.T, rtol=1e-4)
    assert cosine.attrs == {"class_names": queries, "scores": "cosine"}
    # a background class, and a threshold no polygon reaches: every polygon with features is "other"
    other = engine.zones(crop, zones, ["water"], background="other", threshold=1.01)
    assert list(other["class"][:3]) == ["other"] * 3 and {"p_water", "p_other"} <= set(other.columns)


def test_query_polygons_from_the_command_line(model_path: Path, crop: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    import geopandas as gpd

    with rasterio.open(crop) as src:
        t, crs = src.transform, src.crs
    parcels = gpd.GeoDataFrame({"parcel": ["a", "b", "off"]}, geometry=[
        box(*(t @ (0, 96)), *(t @ (64, 0))), box(*(t @ (64, 192)), *(t @ (160, 96))),
        box(*(t @ (-900, -600)), *(t @ (-800, -700)))], crs=crs)  # fmt: skip
    parcels.to_file(tmp_path / "parcels.gpkg")
    out = tmp_path / "named.csv"
    args = [str(crop), "water", "field", "--model", str(model_path), "--zones", str(tmp_path / "parcels.gpkg"),
            "-o", str(out), "--nodata", "0", "--window", "128"]  # fmt: skip
    assert query_main(args) == 0
    printed = capsys.readouterr().out
    assert "3 polygons: " in printed and "1 without a class" in printed and "map: " in printed
    assert f"polygons (probability): {out}" in printed and "classes: " in printed
    import pandas as pd

    table = pd.read_csv(out)
    assert list(table["parcel"]) == ["a", "b", "off"] and set(table["class"][:2]) <= {"water", "field"}
    assert table["class"].isna().tolist() == [False, False, True]
    np.testing.assert_allclose((table["p_water"] + table["p_field"])[:2], 1.0, rtol=1e-5)
    assert out.with_suffix(".png").stat().st_size > 1000
    # the classes burnt onto the scene's grid: parcel a's pixels carry its class, pixels under no parcel none
    with rasterio.open(tmp_path / "named_classes.tif") as classes, rasterio.open(crop) as src:
        assert classes.transform == src.transform and classes.crs == src.crs and classes.nodata == 255
        burnt = classes.read(1)
        assert json.loads(classes.tags()["class_names"]) == ["water", "field"]
    assert (burnt[:96, :64] == ["water", "field"].index(table["class"][0])).all() and (burnt[:96, 64:] == 255).all()
    # bad input: a raster name for the polygons, with --chips, existing outputs
    for extra, message in ((["-o", str(tmp_path / "named.tif")], "Polygons named by the queries are written as"),
                           (["--chips"], "leave out --chips and --polygons"), (["--tta", "flips"], "leave out --tta"),
                           ([], "already exists")):  # fmt: skip
        assert query_main([*args, *extra]) == 2
        assert message in capsys.readouterr().err


def test_a_text_model_goes_wherever_a_backbone_does(model_path: Path, crop: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """``--model text.pt`` in embed (a GeoTIFF, polygons, chips): its aligned features; a zone table of them scores
    the queries as ``query --zones`` does, and a probe of backbone features refuses it."""
    import geopandas as gpd

    from dinov3_eo.cli import main as cli_main
    from dinov3_eo.models.text import TextDenseEncoder
    from dinov3_eo.tasks.features import resolve_backbone
    from dinov3_eo.tasks.zone_embeddings import read_zone_embeddings

    assert isinstance(resolve_backbone(model_path), TextDenseEncoder)
    assert cli_main(["embed", str(crop), "--model", str(model_path), "--nodata", "0", "-o", str(tmp_path / "f.tif"),
                     "--no-quicklook"]) == 0  # fmt: skip
    with rasterio.open(tmp_path / "f.tif") as features:
        norms = np.linalg.norm(features.read(), axis=0)
    np.testing.assert_allclose(norms[np.isfinite(norms)], 1.0, rtol=1e-5)  # unit-length aligned patch tokens
    with rasterio.open(crop) as src:
        t, crs = src.transform, src.crs
    parcels = gpd.GeoDataFrame({"parcel": ["a", "b", "c"]}, crs=crs, geometry=[
        box(*(t @ (0, 96)), *(t @ (64, 32))), box(*(t @ (64, 192)), *(t @ (160, 96))), box(*(t @ (0, 200)), *(t @ (60, 150)))])  # fmt: skip
    parcels.to_file(tmp_path / "parcels.gpkg")
    table = tmp_path / "parcels.parquet"
    assert cli_main(["embed", str(crop), "--model", str(model_path), "--nodata", "0", "--zones",
                     str(tmp_path / "parcels.gpkg"), "-o", str(table), "--window", "128", "--quiet"]) == 0  # fmt: skip
    frame, x = read_zone_embeddings(table)
    assert frame.attrs["dinov3_eo"]["features"] == "text_patch_mean"
    engine = MapQuery.from_checkpoint(model_path, window=128, nodata=0, device="cpu")
    named = engine.zones(crop, parcels, ["water", "field"], scores="cosine")
    np.testing.assert_allclose(x @ engine.text_embeddings(["water", "field"]).numpy().T,
                               named[["cos_water", "cos_field"]].to_numpy(float), rtol=1e-4, atol=1e-6)  # fmt: skip
    # the table queried without the scene: the same scores, from Python and the command line
    again = engine.zone_table(table, ["water", "field"], scores="cosine")
    np.testing.assert_allclose(again[["cos_water", "cos_field"]].to_numpy(float), named[["cos_water", "cos_field"]].to_numpy(float), rtol=1e-5)
    assert "patch_mean" not in again.columns and list(again["parcel"]) == ["a", "b", "c"]
    assert cli_main(["query", str(table), "water", "field", "--model", str(model_path), "-o", str(tmp_path / "t.csv")]) == 0
    assert "3 polygons: " in capsys.readouterr().out
    import pandas as pd

    np.testing.assert_allclose(pd.read_csv(tmp_path / "t.csv")["p_water"], engine.zone_table(table, ["water", "field"])["p_water"], rtol=1e-5)
    # another text model of the same backbone (its adapter trained further): refused by its weights' fingerprint
    other_model, other_meta, _ = load_text_model(model_path)
    with torch.no_grad():
        other_model.vision.ln_final.weight.add_(0.01)
    with pytest.raises(ValueError, match="through another text model's weights"):
        MapQuery(model=other_model, meta=other_meta).zone_table(table, ["water"])
    # a season's table: each date scored, the class from the mean of the dates' scores
    later = tmp_path / "crop_20200807.tif"
    with rasterio.open(crop) as src:
        with rasterio.open(later, "w", **src.profile) as out:
            out.write((src.read().astype(np.float32) * 0.9).astype(src.dtypes[0]))
    season = tmp_path / "season.parquet"
    assert cli_main(["embed", str(crop), str(later), "--dates", "2020-05-18", "2020-08-07", "--model", str(model_path),
                     "--nodata", "0", "--zones", str(tmp_path / "parcels.gpkg"), "-o", str(season), "--window", "128",
                     "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    dated = engine.zone_table(season, ["water", "field"])
    for name in ("water", "field"):
        np.testing.assert_allclose(dated[f"p_{name}"], (dated[f"p_{name}_2020-05-18"] + dated[f"p_{name}_2020-08-07"]) / 2, rtol=1e-6)
    np.testing.assert_allclose(dated["p_water_2020-05-18"], engine.zone_table(table, ["water", "field"])["p_water"], rtol=1e-5)
    # chips through a text model: its image embedding (class token and mean patch token of the adapter)
    chips = tmp_path / "chips"
    chips.mkdir()
    with rasterio.open(crop) as src:
        for k in range(2):
            window = rasterio.windows.Window(0, 64 * k + 64, 64, 64)
            profile = {**src.profile, "width": 64, "height": 64, "transform": src.window_transform(window)}
            with rasterio.open(chips / f"chip{k}.tif", "w", **profile) as out:
                out.write(src.read(window=window))
    assert cli_main(["embed", str(chips), "--chips", "--model", str(model_path), "-o", str(tmp_path / "chips.parquet"),
                     "--size", "64", "--quiet"]) == 0  # fmt: skip
    rows = pd.read_parquet(tmp_path / "chips.parquet")
    assert len(rows) == 2 and len(rows["cls"][0]) == engine.model.patch_dim
    # a probe of a backbone's polygon features refuses the text model's table
    from micro_backbone import micro_backbone_file

    pth = micro_backbone_file(tmp_path, seed=0)
    plain = tmp_path / "plain.parquet"
    assert cli_main(["embed", str(crop), "--model", str(pth), "--nodata", "0", "--zones", str(tmp_path / "parcels.gpkg"),
                     "-o", str(plain), "--window", "128", "--quiet"]) == 0  # fmt: skip
    gpd.read_parquet(plain).assign(kind=["x", "y", "x"]).to_parquet(tmp_path / "plain_labelled.parquet")
    import pyarrow.parquet as pq

    labelled = pq.read_table(tmp_path / "plain_labelled.parquet")
    pq.write_table(labelled.replace_schema_metadata({**labelled.schema.metadata,
                                                     b"dinov3_eo": pq.read_schema(plain).metadata[b"dinov3_eo"]}),
                   tmp_path / "plain_labelled.parquet")  # fmt: skip
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--zones", str(tmp_path / "plain_labelled.parquet"), "--label-column", "kind",
                     "--method", "knn", "-k", "1", "-o", str(probe)]) == 0  # fmt: skip
    capsys.readouterr()
    assert cli_main(["classify", "predict", "--zones", str(table), "--probe", str(probe), "-o", str(tmp_path / "p.csv")]) == 2
    assert "holds a text model's aligned patch features, the probe's polygons backbone features" in capsys.readouterr().err
    assert cli_main(["query", str(plain), "water", "--model", str(model_path), "-o", str(tmp_path / "q.csv")]) == 2
    assert "not this text model's aligned patch features" in capsys.readouterr().err


# -------------------------------------------------------------------------------------------------- two dates
def test_compare_maps_where_a_querys_score_changed(engine: MapQuery, crop: Path, tmp_path: Path) -> None:
    """The after date: the crop with a 48-px block of other land cover pasted in; same grid, then in degrees."""
    from rasterio.warp import calculate_default_transform, reproject

    with rasterio.open(crop) as src:
        pixels, profile = src.read(), src.profile
    pixels[:, 120:168, 40:88] = pixels[:, 20:68, 100:148]
    after = tmp_path / "after.tif"
    with rasterio.open(after, "w", **profile) as dst:
        dst.write(pixels)
    ds = engine.compare(crop, after, ["water", "forest"])
    assert set(ds.data_vars) == {"before", "after", "change"} and ds["change"].dims == ("query", "y", "x")
    assert ds.rio.crs == profile["crs"] and ds.attrs["scores"] == "cosine"
    np.testing.assert_allclose(ds["change"].values, ds["after"].values - ds["before"].values)
    block = np.zeros(ds["change"].shape[1:], dtype=bool)
    block[120:168, 40:88] = True
    moved = np.abs(ds["change"].values)
    assert np.nanmean(moved[:, block]) > 5 * np.nanmean(moved[:, ~block])

    with rasterio.open(after) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        lonlat = tmp_path / "after_lonlat.tif"
        with rasterio.open(lonlat, "w", **(profile | {"crs": "EPSG:4326", "transform": transform, "width": width,
                                                      "height": height, "nodata": 0})) as dst:  # fmt: skip
            for band in range(1, 4):
                reproject(rasterio.band(src, band), rasterio.band(dst, band), src_nodata=0, dst_nodata=0)
    warped = engine.compare(crop, lonlat, ["water", "forest"])
    assert warped["change"].shape == ds["change"].shape
    np.testing.assert_array_equal(warped["x"].values, ds["x"].values)
    moved = np.abs(warped["change"].values)
    assert np.nanmean(moved[:, block]) > 3 * np.nanmean(moved[:, ~block])


# -------------------------------------------------------------------------------------------------- image chips
def test_query_on_a_chip_gives_the_class_ids_of_its_georeferenced_twin(model_path: Path, crop: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """``query --chips``: a TIFF chip without georeference (the crop's pixels) gets ``OUT_classes.png``, a palette PNG
    whose ids are exactly those of the georeferenced crop's class map; without ``--chips`` it is refused, naming it."""
    from PIL import Image

    with rasterio.open(crop) as src:
        pixels, dtype = src.read(), src.dtypes[0]
    chip = tmp_path / "chip.tif"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(chip, "w", driver="GTiff", width=160, height=200, count=3, dtype=dtype) as dst:
            dst.write(pixels)
    common = ["water", "forest", "--model", str(model_path), "--window", "128", "--nodata", "0"]
    for folder in ("geo", "chip", "refused"):
        (tmp_path / folder).mkdir()
    assert query_main([str(crop), *common, "-o", str(tmp_path / "geo" / "q.tif")]) == 0
    assert query_main([str(chip), *common, "--chips", "-o", str(tmp_path / "chip" / "q.tif")]) == 0
    png = Image.open(tmp_path / "chip" / "q_classes.png")
    with rasterio.open(tmp_path / "geo" / "q_classes.tif") as reference:
        assert png.mode == "P" and np.array_equal(np.asarray(png), reference.read(1))
    assert sorted(p.name for p in (tmp_path / "chip").iterdir()) == ["q.png", "q.tif", "q_classes.png"]
    capsys.readouterr()
    assert query_main([str(chip), *common, "-o", str(tmp_path / "refused" / "q.tif")]) == 2
    assert "chip.tif is not georeferenced" in capsys.readouterr().err
    assert query_main([str(chip), *common, "--chips", "--polygons", str(tmp_path / "p.gpkg"), "-o", str(tmp_path / "q.tif")]) == 2
    assert "polygons need a georeferenced scene" in capsys.readouterr().err


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "text").glob("*.yaml")), ids=lambda p: p.name)
def test_text_configs_parse(config: Path, capsys: pytest.CaptureFixture) -> None:
    """Every text config maps one-to-one onto TextAlignmentTask / TextDataModule arguments."""
    from dinov3_eo.cli import main as cli

    with pytest.raises(SystemExit) as done:
        cli(["text", "fit", "--config", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "\nmodel:\n" in printed and "\ndata:\n" in printed
