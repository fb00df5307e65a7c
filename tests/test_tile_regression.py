"""Tile regressors (``regress fit / map / test``): the ridge regression against its closed form on standardised
features, the k-NN against a loop, the file round trip, and the scene path end to end on real imagery — a NEON
LiDAR canopy height model under its airborne RGB (``tests/data/neon``, CC0) and the Landsat-7 crop
(``tests/data/rgb_byte_crop.tif``) with its own brightness as a reference a random micro ViT can learn.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.transform import Affine

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.chip_classification import ChipClassifier
from dinov3_eo.tasks.chip_embeddings import chip_features, load_chip_backbone, read_chip_embeddings
from dinov3_eo.tasks.tile_classification import embed_tiles, write_tile_embeddings
from dinov3_eo.tasks.conformal import conformal_quantile
from dinov3_eo.tasks.tile_regression import (
    TileRegressor,
    calibrated,
    fit_regressor,
    fit_tile_regressor,
    interval_line,
    interval_metrics,
    knn_moments,
    knn_values,
    regress_tiles,
    regression_metrics,
    score_tile_regressor,
    write_tile_values,
)

from brightness_chips import SCENE, micro_export

NEON = Path(__file__).resolve().parent / "data" / "neon"
PLOTS = ("044", "050", "052")


@pytest.fixture(scope="module")
def backbone_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return micro_export(tmp_path_factory.mktemp("tile_regression"))


@pytest.fixture(scope="module")
def brightness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scene's mean brightness (0..255, NaN in its collar) as a reference raster on its own grid."""
    path = tmp_path_factory.mktemp("brightness") / "brightness.tif"
    with rasterio.open(SCENE) as src:
        pixels = src.read().astype(np.float32)
        profile = dict(driver="GTiff", width=src.width, height=src.height, count=1, dtype="float32", crs=src.crs,
                       transform=src.transform, nodata=float("nan"))  # fmt: skip
    mean = pixels.mean(axis=0)
    mean[(pixels == 0).any(axis=0)] = np.nan
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(mean, 1)
        dst.units = ("DN",)
        dst.descriptions = ("brightness",)
    return path


def test_ridge_is_the_closed_form_on_standardised_features_and_alpha_is_chosen_on_held_out_rows() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 30)) * rng.uniform(0.01, 5.0, 30) + rng.normal(size=30)
    x[:, 7] = 3.0  # a constant feature
    w = rng.normal(size=30)
    y = x @ w + rng.normal(scale=0.5, size=120)
    model = fit_regressor(x[:100], y[:100])
    assert model.alpha == 1.0 and model.weight.shape == (30,)
    mean, std = x[:100].mean(0), x[:100].std(0)
    std[std < 1e-8] = 1.0
    z = (x[:100] - mean) / std
    zc, yc = z - z.mean(0), y[:100] - y[:100].mean()
    beta = np.linalg.solve(zc.T @ zc + 1.0 * np.eye(30), zc.T @ yc)
    expected = ((x[100:] - mean) / std) @ beta + y[:100].mean()
    np.testing.assert_allclose(model.predict(x[100:]), expected, rtol=1e-5, atol=1e-4)

    chosen = fit_regressor(x[:80], y[:80], val=(x[80:], y[80:]), alpha_grid=(0.1, 1000.0, 1e6))
    rmse = {a: regression_metrics(fit_regressor(x[:80], y[:80], alpha_grid=(a,), val=(x[80:], y[80:])).predict(x[80:]),
                                  y[80:])["rmse"] for a in (0.1, 1000.0, 1e6)}  # fmt: skip
    assert chosen.alpha == min(rmse, key=rmse.get) == 0.1
    # clipped to the bounds given (a height stays >= 0, a share within 0..1)
    bounded = fit_regressor(x[:100], y[:100], lower=0.0, upper=1.0)
    assert bounded.predict(x).min() >= 0.0 and bounded.predict(x).max() <= 1.0
    with pytest.raises(ValueError, match="non-finite"):
        fit_regressor(x, np.where(np.arange(120) == 3, np.nan, y))
    with pytest.raises(ValueError, match="at least two rows"):
        fit_regressor(x[:1], y[:1])
    with pytest.raises(ValueError, match="method must be one of"):
        fit_regressor(x, y, method="lasso")


def test_a_log_regressor_fits_log1p_and_takes_its_predictions_back_as_means(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 5))
    y = np.exp(x @ np.array([0.8, -0.5, 0.3, 0.0, 0.2]) + 3.0 + rng.normal(scale=0.6, size=300))  # lognormal
    model = fit_regressor(x[:250], y[:250], log_values=True, lower=0.0)
    plain = fit_regressor(x[:250], np.log1p(y[:250]))  # the same ridge on log(1 + y), by hand
    np.testing.assert_allclose(model.predict_fitted(x), plain.predict(x), rtol=1e-6)
    residuals = np.log1p(y[:250]) - plain.predict(x[:250])
    assert model.smearing == pytest.approx(np.mean(np.exp(residuals)), rel=1e-6) and model.smearing > 1.1
    np.testing.assert_allclose(model.predict(x), np.exp(plain.predict(x)) * model.smearing - 1.0, rtol=1e-6)
    # taken back with the smearing factor, the predictions' mean matches the values' (without, it falls short)
    assert abs(model.predict(x[:250]).mean() / y[:250].mean() - 1) < 0.05
    assert np.expm1(plain.predict(x[:250])).mean() < 0.9 * y[:250].mean()
    back = TileRegressor.load(model.save(tmp_path / "log.safetensors"))
    assert back.log_values and back.smearing == pytest.approx(model.smearing)
    np.testing.assert_allclose(back.predict(x), model.predict(x), rtol=1e-6)
    with pytest.raises(ValueError, match="log transform .* is for the ridge"):
        fit_regressor(x, y, method="knn", log_values=True)
    with pytest.raises(ValueError, match="needs values >= 0"):
        fit_regressor(x, y - 1e6, log_values=True)


def test_knn_regression_is_the_weighted_mean_of_the_nearest_values() -> None:
    rng = np.random.default_rng(1)
    bank, values, x = rng.normal(size=(50, 8)), rng.uniform(0, 30, 50), rng.normal(size=(7, 8))
    got = knn_values(bank, values, x, k=5, temperature=0.1)
    for i, row in enumerate(x):
        cos = bank @ row / np.linalg.norm(bank, axis=1) / np.linalg.norm(row)
        top = np.argsort(-cos)[:5]
        weights = np.exp(cos[top] / 0.1)
        assert got[i] == pytest.approx((weights * values[top]).sum() / weights.sum(), rel=1e-5)
    model = fit_regressor(bank, values, method="knn", k=5, temperature=0.1)
    np.testing.assert_allclose(model.predict(x), got)


def test_the_conformal_quantile_is_the_finite_sample_rank_and_its_intervals_cover_new_tiles(
        caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    scores = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 8.0, 6.0, 10.0, 0.5, 11.0, 12.0, 13.0, 14.0, 15.0, 16.0,
                       17.0, 18.0])  # fmt: skip
    # n = 19: the ceil(20 * 0.9) = 18th smallest; n = 9 is the least that 90 % allows, n = 8 too few
    assert conformal_quantile(scores, 0.9) == np.sort(scores)[17] == 17.0
    assert conformal_quantile(scores[:9], 0.9) == scores[:9].max() and conformal_quantile(scores[:8], 0.9) == np.inf
    assert conformal_quantile(scores, 0.5) == np.sort(scores)[9]  # ceil(20 * 0.5) = 10th
    with pytest.raises(ValueError, match="between 0 and 1"):
        conformal_quantile(scores, 1.0)

    # exchangeable tiles: over many draws of (training, calibration, new) rows, the share of new rows inside their
    # interval averages between the coverage and coverage + 1 / (n + 1), whatever the model (here a poor one)
    rng = np.random.default_rng(7)
    covered = []
    for _ in range(300):
        x = rng.normal(size=(120, 4))
        y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.standard_t(3, size=120) * 2  # heavy tails
        model = calibrated(fit_regressor(x[:30, :2], y[:30], alpha=10.0), x[30:49, :2], y[30:49], 0.8)  # n = 19
        assert model.interval["n"] == 19 and model.interval["coverage"] == 0.8
        low, high = model.predict_interval(x[49:, :2])
        np.testing.assert_allclose(high - low, 2 * model.interval["quantile"])  # a ridge's width is constant
        covered.append(np.mean((y[49:] >= low) & (y[49:] <= high)))
    assert 0.8 - 0.01 < np.mean(covered) < 0.8 + 1 / 20 + 0.01, np.mean(covered)
    # the model's own interval: its centre the prediction, its half width the quantile of the held-out residuals
    residuals = np.abs(y[30:49] - model.predict(x[30:49, :2]))
    assert model.interval["quantile"] == pytest.approx(np.sort(residuals)[15])  # ceil(20 * 0.8) = 16th
    np.testing.assert_allclose((low + high) / 2, model.predict(x[49:, :2]))
    # too few held-out rows: no interval, said in a warning
    with caplog.at_level(logging.WARNING, logger="dinov3_eo.tasks.tile_regression"):
        none = calibrated(fit_regressor(x[:30], y[:30]), x[30:38], y[30:38], 0.9)
    assert none.interval is None and "8 held-out tiles cannot calibrate a 90 % prediction interval (9 are needed)" in caplog.text
    with pytest.raises(ValueError, match="has no prediction interval"):
        none.predict_interval(x)
    ends = interval_metrics(np.array([0.0, 1.0, 2.0, np.nan]), np.array([2.0, 2.0, 3.0, 1.0]),
                            np.array([1.0, 3.0, 2.0, 0.5]), 0.9)  # fmt: skip
    assert ends == {"coverage": 0.9, "covered": pytest.approx(2 / 3), "mean_width": pytest.approx(4 / 3),
                    "median_width": 1.0, "n": 3}  # fmt: skip


def test_a_knn_interval_widens_where_the_neighbours_disagree() -> None:
    rng = np.random.default_rng(4)
    # two kinds of tile: values near 10 that agree closely, values near 30 that scatter widely
    centres = np.repeat(np.eye(6)[:2] * 5, 200, axis=0) + rng.normal(scale=0.3, size=(400, 6))
    y = np.where(np.arange(400) < 200, 10 + rng.normal(scale=0.5, size=400), 30 + rng.normal(scale=6.0, size=400))
    order = rng.permutation(400)
    train, cal, new = order[:200], order[200:300], order[300:]
    model = calibrated(fit_regressor(centres[train], y[train], method="knn", k=10), centres[cal], y[cal], 0.9)
    mean, spread = knn_moments(model.bank, model.bank_values, centres[new], k=10, temperature=0.07)
    np.testing.assert_allclose(mean, model.predict(centres[new]))
    for i in range(3):  # the spread against a loop over the neighbours
        cos = model.bank @ centres[new][i] / np.linalg.norm(model.bank, axis=1) / np.linalg.norm(centres[new][i])
        top = np.argsort(-cos)[:10]
        w = np.exp((cos[top] - cos[top].max()) / 0.07)
        w /= w.sum()
        assert spread[i] == pytest.approx(np.sqrt((w * (y[train][top] - (w * y[train][top]).sum()) ** 2).sum()), rel=1e-4)
    assert model.interval["floor"] == pytest.approx(0.1 * knn_moments(model.bank, model.bank_values, centres[cal], k=10)[1].mean())
    low, high = model.predict_interval(centres[new])
    width = high - low
    quiet, loud = new < 200, new >= 200
    assert np.median(width[loud]) > 5 * np.median(width[quiet])  # the k-NN knows which tiles are hard
    values, low_too, high_too = model.predict_with_interval(centres[new])  # the neighbours found once for both
    np.testing.assert_allclose(values, model.predict(centres[new]))
    np.testing.assert_array_equal(low_too, low)
    np.testing.assert_array_equal(high_too, high)
    inside = (y[new] >= low) & (y[new] <= high)
    assert inside.mean() >= 0.82 and inside[quiet].mean() >= 0.75 and inside[loud].mean() >= 0.75
    np.testing.assert_allclose(model.interval_scores(centres[cal], y[cal]),
                               np.abs(y[cal] - model.predict(centres[cal])) / (
                                   knn_moments(model.bank, model.bank_values, centres[cal], k=10)[1]
                                   + model.interval["floor"]))  # fmt: skip


def test_a_log_regressors_interval_is_its_log_interval_taken_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 5))
    y = np.exp(x @ np.array([0.8, -0.5, 0.3, 0.0, 0.2]) + 3.0 + rng.normal(scale=0.6, size=400))  # lognormal
    model = calibrated(fit_regressor(x[:200], y[:200], log_values=True, lower=0.0), x[200:300], y[200:300])
    q = model.interval["quantile"]
    assert q == pytest.approx(np.sort(np.abs(np.log1p(y[200:300]) - model.predict_fitted(x[200:300])))[90])
    low, high = model.predict_interval(x[300:])
    np.testing.assert_allclose(low, np.maximum(np.expm1(model.predict_fitted(x[300:]) - q), 0.0), rtol=1e-9)
    open_ = low > 0  # the same ratio wherever the lower end is not clipped at 0
    assert open_.mean() > 0.9
    np.testing.assert_allclose((1 + high[open_]) / (1 + low[open_]), np.exp(2 * q), rtol=1e-6)
    inside = (y[300:] >= low) & (y[300:] <= high)
    assert 0.83 <= inside.mean() <= 0.97
    np.testing.assert_allclose(model.predict_with_interval(x[300:])[0], model.predict(x[300:]), rtol=1e-12)
    back = TileRegressor.load(model.save(tmp_path / "log.safetensors"))
    assert back.interval == model.interval
    np.testing.assert_allclose(np.stack(back.predict_interval(x)), np.stack(model.predict_interval(x)), rtol=1e-6)
    assert "90 % prediction intervals from 100 held-out tiles: × / ÷" in interval_line(back)
    back.interval = None
    assert interval_line(back) == "no prediction interval"


def test_a_regressor_file_round_trips_and_others_are_refused(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(40, 6)), rng.uniform(0, 20, 40)
    for method in ("ridge", "knn"):
        model = fit_regressor(x, y, method=method, lower=0.0)
        model.target, model.unit, model.statistic = "canopy height", "m", "p95"
        model.embedding = {"chip_size": [16, 16], "backbone_source": "/b.pth"}
        model.held_out = {"n": 3, "rmse": 1.5}
        path = model.save(tmp_path / f"{method}.safetensors")
        back = TileRegressor.load(path)
        np.testing.assert_allclose(back.predict(x), model.predict(x), rtol=1e-6)
        assert (back.target, back.unit, back.statistic, back.lower, back.label) == ("canopy height", "m", "p95", 0.0,
                                                                                   "canopy height (m)")  # fmt: skip
        assert back.embedding == model.embedding and back.held_out == model.held_out
    with pytest.raises(FileExistsError):
        model.save(tmp_path / "knn.safetensors")
    probe = ChipClassifier(method="linear", classes=["a", "b"], features="cls", weight=np.zeros((2, 6), np.float32),
                           bias=np.zeros(2, np.float32))  # fmt: skip
    probe.save(tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match="not a tile regressor"):
        TileRegressor.load(tmp_path / "probe.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        TileRegressor.load(tmp_path / "junk.safetensors")
    with pytest.raises(FileNotFoundError):
        TileRegressor.load(tmp_path / "missing.safetensors")


def test_a_regressor_fitted_on_lidar_heights_maps_the_tiles_it_was_fitted_on_alike(
        backbone_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    backbone = load_chip_backbone(backbone_path)
    scenes = [NEON / f"TEAK_{n}.tif" for n in PLOTS]
    chms = [NEON / f"TEAK_{n}_CHM.tif" for n in PLOTS]
    fit = fit_tile_regressor(scenes, chms, backbone, tile_size=40, size=32, target="canopy height", unit="m",
                             progress=False)  # fmt: skip
    model, tiles = fit.regressor, fit.tiles
    assert model.method == "ridge" and model.alpha is not None and model.lower == 0.0 and model.upper is None
    assert model.embedding["chip_size"] == [40, 40] and model.embedding["tile_m"] == pytest.approx(4.0)
    assert model.embedding["size"] == 32 and model.embedding["backbone_source"] == str(backbone_path)
    record = model.embedding["tiles"]
    assert record["train_tiles"] + record["held_out_tiles"] == len(tiles) > 250
    assert record["train_mean"] == pytest.approx(tiles.loc[tiles["split"] == "train", "reference"].mean())
    held = tiles[tiles["split"] == "held_out"]
    assert 0.2 <= len(held) / len(tiles) < 0.45 and held["predicted"].notna().all()
    assert tiles.loc[tiles["split"] == "train", "predicted"].isna().all()
    np.testing.assert_allclose(fit.held_out_targets, held["reference"])
    assert model.held_out == pytest.approx(regression_metrics(fit.held_out_predictions, fit.held_out_targets))
    # the held-out tiles calibrated a 90 % interval: by construction it holds at least 90 % of them
    assert model.interval["n"] == len(held) and model.interval["coverage"] == 0.9
    low, high = model.predict_interval(chip_features(embed_tiles(scenes[0], backbone, [(0, 0)], tile_size=40, size=32,
                                                                 progress=False)[0], model.features))  # fmt: skip
    assert high[0] - low[0] <= 2 * model.interval["quantile"] + 1e-9

    # the map predicts each tile from its embedding as the fit embedded it, and lies on the scene's grid
    mapped = regress_tiles(scenes[0], model, backbone=backbone, min_valid=0.9, progress=False)
    with rasterio.open(scenes[0]) as src:
        assert mapped.crs == src.crs and mapped.transform == src.transform @ Affine.scale(40)
    assert mapped.values.shape == (10, 10) and mapped.target == "canopy height" and mapped.label == "canopy height (m)"
    first = tiles[tiles["scene"] == str(scenes[0])]
    cells = list(zip(first["row"], first["col"]))
    embedded, taken = embed_tiles(scenes[0], backbone, cells, tile_size=40, size=32, progress=False)
    assert taken.all()
    np.testing.assert_allclose([mapped.values[r, c] for r, c in cells],
                               model.predict(chip_features(embedded, model.features)), rtol=1e-4, atol=1e-3)  # fmt: skip
    on_held = held[held["scene"] == str(scenes[0])]
    np.testing.assert_allclose(on_held["predicted"], [mapped.values[r, c] for r, c in zip(on_held["row"], on_held["col"])],
                               rtol=1e-4, atol=1e-3)  # fmt: skip

    # each cell's interval around its value, a ridge's as wide everywhere (but where clipped at 0)
    finite = np.isfinite(mapped.values)
    assert (mapped.lower[finite] <= mapped.values[finite] + 1e-4).all()
    assert (mapped.upper[finite] >= mapped.values[finite] - 1e-4).all() and mapped.coverage == 0.9
    unclipped = finite & (mapped.lower > 0)
    np.testing.assert_allclose((mapped.upper - mapped.lower)[unclipped], 2 * model.interval["quantile"], rtol=1e-4)
    dataset = mapped.to_dataset()
    assert set(dataset.data_vars) == {"value", "lower", "upper"} and dataset.rio.crs == mapped.crs
    np.testing.assert_array_equal(dataset["upper"].values, mapped.upper)
    assert dataset["lower"].attrs["long_name"] == "lower end of the 90 % prediction interval of canopy height"

    outputs = write_tile_values(mapped, tmp_path / "out")
    with rasterio.open(outputs.interval) as out:
        assert out.count == 2 and out.units == ("m", "m") and out.transform == mapped.transform
        assert out.descriptions == ("lower end of the 90 % interval", "upper end of the 90 % interval")
        np.testing.assert_array_equal(out.read(), np.stack([mapped.lower, mapped.upper]))
    assert outputs.interval_quicklook.stat().st_size > 1000
    with rasterio.open(outputs.values) as out:
        assert out.units == ("m",) and out.descriptions == ("canopy height",) and out.dtypes[0] == "float32"
        assert out.transform == mapped.transform and np.isnan(out.nodata)
        np.testing.assert_array_equal(out.read(1), mapped.values)
        assert out.tags()["tile_size"] == "40"
    import geopandas as gpd

    cells_frame = gpd.read_file(outputs.tiles)
    assert len(cells_frame) == int(np.isfinite(mapped.values).sum())
    np.testing.assert_allclose(cells_frame["value"], mapped.values[cells_frame["row"], cells_frame["col"]], rtol=1e-6)
    np.testing.assert_allclose(cells_frame["upper"], mapped.upper[cells_frame["row"], cells_frame["col"]], rtol=1e-6)
    assert outputs.quicklook.stat().st_size > 1000
    with pytest.raises(FileExistsError):
        write_tile_values(mapped, tmp_path / "out")
    assert mapped.total() is None  # heights in m: no total
    # a density per hectare sums to a stock, a share to the hectares it covers (4 m cells: 0.0016 ha each)
    import dataclasses

    stock = dataclasses.replace(mapped, unit="Mg/ha").total()
    assert stock[1] == "Mg" and stock[0] == pytest.approx(np.nansum(mapped.values.astype(np.float64)) * 0.0016)
    cover = dataclasses.replace(mapped, values=np.full((10, 10), 0.5, np.float32), unit=None, statistic="above:5")
    assert cover.total() == (pytest.approx(100 * 0.5 * 0.0016), "ha")
    array = mapped.to_xarray()
    assert array.name == "canopy height" and array.attrs["units"] == "m" and array.rio.crs == mapped.crs
    x_centre, y_centre = mapped.transform @ (3.5, 2.5)
    assert float(array.x[3]) == pytest.approx(x_centre) and float(array.y[2]) == pytest.approx(y_centre)

    # scoring on the third plot: the map's values of its tiles against the CHM's means there
    scored = score_tile_regressor(model, scenes[2], chms[2], backbone=backbone, progress=False)
    third = regress_tiles(scenes[2], model, backbone=backbone, min_valid=0.9, progress=False)
    rows, cols = scored.tiles["row"].to_numpy(), scored.tiles["col"].to_numpy()
    np.testing.assert_allclose(scored.predictions, third.values[rows, cols], rtol=1e-5)
    np.testing.assert_allclose(scored.lower, third.lower[rows, cols], rtol=1e-5)
    np.testing.assert_array_equal(scored.tiles["inside"], (scored.targets >= scored.lower) & (scored.targets <= scored.upper))
    np.testing.assert_allclose(scored.tiles["error"], scored.predictions - scored.targets)
    # a scene the reference misses is skipped when it is one of several
    with caplog.at_level(logging.WARNING, logger="dinov3_eo.tasks.tile_regression"):
        both = score_tile_regressor(model, [scenes[0], scenes[2]], chms[2], backbone=backbone, progress=False)
    assert set(both.tiles["scene"]) == {str(scenes[2])} and len(both.tiles) == len(scored.tiles)
    assert str(scenes[0]) in caplog.text and "The scene is skipped" in caplog.text


def test_a_reference_the_features_carry_is_learnt(backbone_path: Path, brightness: Path) -> None:
    """The scene's own brightness per 16-px tile: a random micro ViT's tokens carry it (as they carry the
    bright/dark classes of the probe tests), so the held-out tiles are valued far better than by the training mean
    (81 tiles, 26 held out in blocks; the brightest lie beyond the training range, which caps R²)."""
    backbone = load_chip_backbone(backbone_path)
    for method in ("ridge", "knn"):
        fit = fit_tile_regressor(SCENE, brightness, backbone, tile_size=16, size=32, min_covered=0.9, method=method,
                                 progress=False)  # fmt: skip
        model, tiles = fit.regressor, fit.tiles
        assert model.unit == "DN" and model.target == "brightness" and model.held_out["n"] >= 20
        mean = tiles.loc[tiles["split"] == "train", "reference"].mean()
        constant = regression_metrics(np.full(len(fit.held_out_targets), mean), fit.held_out_targets)
        assert model.held_out["r2"] > 0.45 and model.held_out["rmse"] < 0.75 * constant["rmse"], (method, model.held_out)
    # refit: the alpha the held-out blocks chose, now on every tile; the held-out scores are the model's before
    every = fit_tile_regressor(SCENE, brightness, backbone, tile_size=16, size=32, min_covered=0.9, refit=True,
                               progress=False).regressor  # fmt: skip
    first = fit_tile_regressor(SCENE, brightness, backbone, tile_size=16, size=32, min_covered=0.9,
                               progress=False).regressor  # fmt: skip
    assert every.alpha == first.alpha and every.held_out == pytest.approx(first.held_out)
    assert every.embedding["tiles"]["refit"] and not first.embedding["tiles"]["refit"]
    assert not np.allclose(every.weight, first.weight)


def test_regress_fit_map_and_test_from_the_command_line(backbone_path: Path, brightness: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    model = tmp_path / "bright.safetensors"
    fit = ["regress", "fit", "--scenes", str(SCENE), "--values", str(brightness), "--model", str(backbone_path),
           "--size", "32", "--min-covered", "0.9", "--target", "brightness", "-o", str(model), "--quiet"]  # fmt: skip
    assert cli_main(fit) == 2
    assert "Give the tile size in scene pixels (--tile-size)" in capsys.readouterr().err
    assert cli_main([*fit, "--tile-size", "16", "--out-dir", str(tmp_path / "fit")]) == 0
    printed = capsys.readouterr().out
    assert "ridge regressor of brightness (DN) (mean per tile) on" in printed and "held out: n " in printed
    assert "a constant at the training mean" in printed
    saved = TileRegressor.load(model)
    assert f"90 % prediction intervals from {saved.interval['n']} held-out tiles: ± " in printed
    metrics = json.loads((tmp_path / "fit" / "metrics.json").read_text())
    assert metrics["interval"] == saved.interval
    assert metrics["held_out"] == pytest.approx(saved.held_out) and metrics["held_out"]["r2"] > 0.45
    assert metrics["training_mean_baseline"]["rmse"] > metrics["held_out"]["rmse"]
    assert (tmp_path / "fit" / "scatter.png").stat().st_size > 1000 and (tmp_path / "fit" / "tiles.gpkg").is_file()

    assert cli_main(["regress", "map", str(SCENE), "--regressor", str(model), "-o", str(tmp_path / "map"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "16-px tiles predicted: brightness mean" in printed and "rgb_byte_crop_tile_values.tif" in printed
    with rasterio.open(SCENE) as src:
        scene_res = src.res
    assert "90 % prediction intervals: width" in printed and "rgb_byte_crop_tile_interval.png" in printed
    with rasterio.open(tmp_path / "map" / "rgb_byte_crop_tile_values.tif") as out:
        mapped = out.read(1)
        assert out.units == ("DN",) and out.res == pytest.approx((16 * scene_res[0], 16 * scene_res[1]))
    with rasterio.open(tmp_path / "map" / "rgb_byte_crop_tile_interval.tif") as out:
        ends = out.read()
    finite = np.isfinite(mapped)
    assert (ends[0][finite] <= mapped[finite] + 1e-3).all() and (ends[1][finite] >= mapped[finite] - 1e-3).all()
    assert cli_main(["regress", "test", "--scenes", str(SCENE), "--values", str(brightness), "--regressor", str(model),
                     "--min-covered", "0.9", "--out-dir", str(tmp_path / "test"), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "ridge regressor of brightness (DN) on" in printed and "R²" in printed
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())
    import geopandas as gpd

    frame = gpd.read_file(tmp_path / "test" / "tiles.gpkg")
    assert tested["test"]["n"] == len(frame) and tested["statistic"] == "mean"
    assert "90 % prediction intervals: " in printed and f"of the {len(frame)} tiles inside" in printed
    assert tested["interval"]["n"] == len(frame) and tested["interval"]["covered"] == pytest.approx(frame["inside"].mean())
    np.testing.assert_allclose(frame["lower"], ends[0][frame["row"], frame["col"]], rtol=1e-5)
    # at the tiles the map predicted with enough imagery, the test's predictions are the map's values
    np.testing.assert_allclose(frame["predicted"], mapped[frame["row"], frame["col"]], rtol=1e-5)

    # from an 'embed --tiles' table: the same tiles, the same regressor, no backbone run
    table = tmp_path / "tiles.parquet"
    write_tile_embeddings(SCENE, load_chip_backbone(backbone_path), table, tile_size=16, size=32, progress=False)
    from_table = tmp_path / "from_table.safetensors"
    assert cli_main(["regress", "fit", "--scenes", str(SCENE), "--values", str(brightness), "--embeddings", str(table),
                     "--min-covered", "0.9", "--coverage", "0", "-o", str(from_table), "--quiet"]) == 0  # fmt: skip
    assert "prediction intervals" not in capsys.readouterr().out
    again = TileRegressor.load(from_table)
    assert again.alpha == saved.alpha and again.held_out == pytest.approx(saved.held_out, rel=1e-4)
    assert again.interval is None  # --coverage 0: none, and 'regress map' writes none
    assert cli_main(["regress", "map", str(SCENE), "--regressor", str(from_table), "-o", str(tmp_path / "map0"),
                     "--model", str(backbone_path), "--quiet"]) == 0  # fmt: skip
    assert "interval" not in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "map0").iterdir()) == [
        "rgb_byte_crop_tile_values.gpkg", "rgb_byte_crop_tile_values.png", "rgb_byte_crop_tile_values.tif"]
    assert (again.target, again.unit) == ("brightness", "DN")  # the raster's band description and unit
    assert read_chip_embeddings(table).metadata["tile_size"] == 16
    assert cli_main(["regress", "test", "--scenes", str(SCENE), "--values", str(brightness), "--regressor", str(model),
                     "--embeddings", str(table), "--min-covered", "0.9", "--out-dir", str(tmp_path / "test_table"),
                     "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    from_rows = gpd.read_file(tmp_path / "test_table" / "tiles.gpkg")
    both = frame.merge(from_rows, on=["row", "col"], suffixes=("", "_table"))
    assert len(both) >= len(frame) - 2  # the table keeps tiles with data on half their pixels, the test 0.9
    np.testing.assert_allclose(both["predicted_table"], both["predicted"], rtol=1e-4)

    # bad input: one sentence and exit code 2
    for argv, message in [
        ([*fit, "--tile-size", "16", "--statistic", "mode", "--overwrite"], "Unknown tile statistic 'mode'"),
        ([*fit, "--tile-size", "16", "--coverage", "90", "--overwrite"], "--coverage is the share of tiles"),
        (["regress", "map", str(SCENE), "--regressor", str(tmp_path / "no.safetensors"), "-o", str(tmp_path / "m2")],
         "does not exist"),
        ([*fit[:-3], "-o", str(tmp_path / "r.pt"), "--tile-size", "16"], "name it '.safetensors'"),
        (["regress", "fit", "--scenes", str(SCENE), "--values", str(brightness), str(SCENE.with_suffix(".gpkg")),
          "--model", str(backbone_path), "--tile-size", "16", "-o", str(tmp_path / "x.safetensors")], "not all rasters"),
    ]:  # fmt: skip
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err


def read_chip_embeddings_for(backbone_path: Path, paths: list[str]):  # noqa: ANN201
    """The chips embedded as ``regress fit --size 32`` embeds them, in the order of ``paths``."""
    from dinov3_eo.tasks.chip_embeddings import embed_chips_with

    return embed_chips_with(load_chip_backbone(backbone_path), paths, size=32, progress=False).take(paths)


def test_regress_fit_test_and_predict_chips_with_a_value_each(backbone_path: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """Chips and their values in a table (as regression benchmarks ship them): the 16-px cuts of the Landsat crop as
    PNG chips, each valued by its mean brightness; predictions as a CSV, or on georeferenced chips' footprints."""
    import pandas as pd

    from brightness_chips import save_chip, scene_cuts

    rows = []
    for (r, c), cut in scene_cuts().items():
        save_chip(cut, tmp_path / "chips" / f"{r}_{c}.png")
        rows.append({"image": f"chips/{r}_{c}.png", "brightness": float(cut.mean()), "row": r})
    table = pd.DataFrame(rows)
    table.iloc[:54].to_csv(tmp_path / "train.csv", index=False)
    table.iloc[54:].to_csv(tmp_path / "test.csv", index=False)
    model = tmp_path / "chips.safetensors"
    fit = ["regress", "fit", "--table", str(tmp_path / "train.csv"), "--model", str(backbone_path), "--size", "32",
           "-o", str(model), "--quiet"]  # fmt: skip
    assert cli_main(fit) == 2
    assert "numeric columns ['brightness', 'row']: name the one to fit (--value-column)" in capsys.readouterr().err
    assert cli_main([*fit, "--value-column", "brightness", "--unit", "DN", "--out-dir", str(tmp_path / "fit")]) == 0
    printed = capsys.readouterr().out
    assert "ridge regressor of brightness (DN) on 43 chips" in printed and "11 held-out chips:" in printed
    assert cli_main([*fit[:-3], "-o", str(tmp_path / "log.safetensors"), "--value-column", "brightness", "--log",
                     "--quiet"]) == 0  # fmt: skip
    assert "ridge regressor of log brightness on 43 chips" in capsys.readouterr().out
    assert TileRegressor.load(tmp_path / "log.safetensors").log_values
    # refitted on all 54 chips with the alpha the held-out ones chose: the ridge on all of them, by hand
    assert cli_main([*fit[:-3], "-o", str(tmp_path / "all.safetensors"), "--value-column", "brightness", "--refit",
                     "--quiet"]) == 0  # fmt: skip
    assert "refitted on the 54 training and held-out chips, alpha kept" in capsys.readouterr().out
    every, first = TileRegressor.load(tmp_path / "all.safetensors"), TileRegressor.load(model)
    assert every.alpha == first.alpha and every.held_out == pytest.approx(first.held_out)
    train_table = pd.read_csv(tmp_path / "train.csv")
    x_all = chip_features(read_chip_embeddings_for(backbone_path, [str(tmp_path / p) for p in train_table["image"]]),
                          "cls+patch_mean")  # fmt: skip
    by_hand = fit_regressor(x_all, train_table["brightness"].to_numpy(), alpha=first.alpha, lower=0.0)
    np.testing.assert_allclose(every.predict(x_all), by_hand.predict(x_all), rtol=1e-4, atol=1e-3)
    saved = TileRegressor.load(model)
    assert saved.embedding["chip_size"] == [16, 16] and saved.statistic == "chip" and saved.held_out["n"] == 11
    held = pd.read_csv(tmp_path / "fit" / "chips.csv")
    assert len(held) == 11 and set(held.columns) == {"path", "reference", "predicted", "error"}

    assert cli_main(["regress", "test", "--table", str(tmp_path / "test.csv"), "--value-column", "brightness",
                     "--regressor", str(model), "--out-dir", str(tmp_path / "test"), "--quiet"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "ridge regressor of brightness (DN) on 18 chips: n 18:" in printed and "of the 18 chips inside" in printed
    tested = json.loads((tmp_path / "test" / "metrics.json").read_text())
    assert tested["interval"]["n"] == 18 and tested["interval"]["coverage"] == 0.9
    assert tested["test"]["rmse"] < tested["training_mean_baseline"]["rmse"]  # brightness is in the features
    scored = pd.read_csv(tmp_path / "test" / "chips.csv")

    assert cli_main(["regress", "predict", str(tmp_path / "chips"), "--regressor", str(model), "-o",
                     str(tmp_path / "predictions.csv"), "--quiet"]) == 0  # fmt: skip
    assert "72 chips: brightness mean" in capsys.readouterr().out
    predictions = pd.read_csv(tmp_path / "predictions.csv").set_index("path")
    np.testing.assert_allclose(predictions.loc[scored["path"], "value"], scored["predicted"], rtol=1e-5)
    np.testing.assert_allclose(predictions.loc[scored["path"], ["lower", "upper"]], scored[["lower", "upper"]], rtol=1e-5)
    assert saved.interval["n"] == 11 and (predictions["lower"] <= predictions["value"] + 1e-6).all()
    # georeferenced chips (the NEON plots) on a map; PNG chips cannot be
    import geopandas as gpd

    neon = [str(NEON / f"TEAK_{n}.tif") for n in PLOTS]
    assert cli_main(["regress", "predict", *neon, "--regressor", str(model), "-o", str(tmp_path / "p.gpkg"), "--quiet"]) == 0
    capsys.readouterr()
    frame = gpd.read_file(tmp_path / "p.gpkg")
    with rasterio.open(neon[0]) as src:
        assert frame.crs == src.crs and frame.geometry.iloc[0].bounds == pytest.approx(tuple(src.bounds))
    assert cli_main(["regress", "predict", str(tmp_path / "chips"), "--regressor", str(model), "-o",
                     str(tmp_path / "p2.gpkg"), "--quiet"]) == 2  # fmt: skip
    assert "is not georeferenced" in capsys.readouterr().err
    # and maps a scene in tiles of its chips' size
    assert cli_main(["regress", "map", str(SCENE), "--regressor", str(model), "-o", str(tmp_path / "map"), "--quiet"]) == 0
    capsys.readouterr()
    with rasterio.open(tmp_path / "map" / "rgb_byte_crop_tile_values.tif") as out, rasterio.open(SCENE) as src:
        assert out.shape == (-(-src.height // 16), -(-src.width // 16)) and out.units == ("DN",)
    assert cli_main([*fit, "--value-column", "brightness", "--tile-size", "16", "--overwrite"]) == 2
    assert "With --table each chip carries its value: leave out --tile-size" in capsys.readouterr().err
    assert cli_main(["regress", "fit", "--model", str(backbone_path), "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "Give scenes and their reference values" in capsys.readouterr().err
