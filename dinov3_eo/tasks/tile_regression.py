"""Tile regression on frozen DINOv3 features: one number per tile (canopy height, biomass, tree cover) from a scene.

DINOv3's canopy-height results come from a dense head trained on LiDAR (``dinov3-eo height``); a reference that is
sparse (GEDI footprints, field plots) or coarse (a 30 m biomass map) asks for less: a linear probe on each tile's
embedding, as its classification probes are. ``dinov3-eo regress fit --scenes scene.tif --values chm.tif
--tile-size 16 --model M -o regressor.safetensors`` summarises the reference over the scene's tiles
(:func:`~dinov3_eo.tasks.tile_values.value_tiles`: mean, percentile, cover share...), embeds the tiles
(:func:`~dinov3_eo.tasks.tile_classification.embed_tiles`, as ``regress map`` will) and fits a ridge regression on
standardised features (its ``alpha`` chosen on held-out blocks of tiles:
:func:`~dinov3_eo.tasks.tile_labels.spatial_block_split`) or keeps them for a k-NN (the mean of the ``k`` most
cosine-similar tiles' values, weighted ``exp(cos / T)`` as DINO's k-NN votes). ``regress map`` writes the value of
every tile of a scene as a georeferenced float raster (:func:`regress_tiles`, :func:`write_tile_values`);
``regress test`` scores a regressor on a reference's tiles (MAE, RMSE, R², bias). The held-out tiles also
calibrate a split-conformal prediction interval (:func:`calibrated`): each mapped tile gets a lower and an upper
value that hold its reference nine times in ten (by default) wherever tiles are like the held-out ones, and
``regress test`` measures how often they do elsewhere. The regressor is a safetensors file with JSON metadata, like
a probe: no pickle.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rasterio.transform import Affine

from dinov3_eo.tasks.chip_embeddings import ChipBackbone, ChipEmbeddings, chip_features
from dinov3_eo.tasks.conformal import calibration_needed, conformal_quantile
from dinov3_eo.tasks.map_estimate import total_unit
from dinov3_eo.tasks.tile_values import TileValues, value_tiles

log = logging.getLogger(__name__)

METHODS = ("ridge", "knn")
#: ridge penalties tried on standardised features (chosen by held-out RMSE); wide, since a few hundred tiles of a
#: 768-wide embedding often want a heavy penalty
ALPHA_GRID = (0.01, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)


def knn_values(bank: np.ndarray, bank_values: np.ndarray, x: np.ndarray, *, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:  # fmt: skip
    """``[N]`` k-NN regression: the mean of the values of the ``k`` most cosine-similar bank rows, each weighted
    ``exp(similarity / temperature)`` (DINO's k-NN weights).

    Args:
        bank: ``[M, D]`` training features; bank_values: ``[M]`` their values; x: ``[N, D]`` features to predict.
    """
    return knn_moments(bank, bank_values, x, k=k, temperature=temperature)[0]


def knn_moments(bank: np.ndarray, bank_values: np.ndarray, x: np.ndarray, *, k: int = 20,
                temperature: float = 0.07) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``([N], [N])``: the weighted mean of :func:`knn_values` and the weighted standard deviation of the same
    neighbours' values, ``sqrt(sum w (v - mean)² / sum w)`` — how much the tiles most like a tile disagree, the
    k-NN's own measure of how hard that tile is."""
    import torch

    a = torch.nn.functional.normalize(torch.from_numpy(np.asarray(bank, np.float32)), dim=1)
    b = torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, np.float32)), dim=1)
    values = torch.from_numpy(np.asarray(bank_values, np.float64))
    k = min(k, len(a))
    mean, spread = np.zeros(len(b)), np.zeros(len(b))
    for start in range(0, len(b), 1024):  # [1024, M] similarities at a time
        sim, idx = (b[start : start + 1024] @ a.T).topk(k, dim=1)
        # weights relative to each row's nearest neighbour: exp() cannot overflow, and the ratio is unchanged
        weights = ((sim.double() - sim[:, :1].double()) / temperature).exp()
        weights = weights / weights.sum(dim=1, keepdim=True)
        neighbours = values[idx]
        centre = (weights * neighbours).sum(dim=1)
        mean[start : start + 1024] = centre.numpy()
        spread[start : start + 1024] = (weights * (neighbours - centre[:, None]) ** 2).sum(dim=1).sqrt().numpy()
    return mean, spread


@dataclass
class TileRegressor:
    """A regressor on tile (or chip) embeddings: ``predict(features) -> [N]`` values.

    Attributes:
        method: ``"ridge"`` (``weight`` ``[D]`` and ``bias``: ``x w + b``, the standardisation folded in) or ``"knn"``
            (``bank`` ``[M, D]`` with ``bank_values`` ``[M]``; ``k``, ``temperature``).
        features: :data:`~dinov3_eo.tasks.chip_embeddings.FEATURES` entry the inputs are made of.
        target: what the values are (``"canopy height"``), for maps and reports; unit: their unit (``"m"``).
        statistic: how the reference was summarised per tile (:data:`~dinov3_eo.tasks.tile_values.STATISTICS`).
        lower, upper: predictions are clipped to these (``None``: open): a non-negative reference keeps its
            predictions non-negative, a share stays within 0..1.
        log_values: fitted on ``log(1 + value)`` (skewed references: biomass); predictions are taken back with
            ``smearing`` (Duan's estimator: the mean of the training residuals' ``exp``), so that they are means in
            the reference's units, not medians.
        alpha: the ridge penalty chosen.
        embedding: how tiles are embedded for it (``backbone_source``, ``size``, ``bands``, ``normalization``,
            ``chip_size``, ``tile_m``, and how it was fitted under ``tiles``).
        held_out: the held-out tiles' metrics when fitted (``n``, ``mae``, ``rmse``, ``r2``, ``bias``), for the record.
        interval: the split-conformal prediction interval calibrated on held-out tiles (:func:`calibrated`):
            ``coverage`` (0.9: nine tiles in ten inside), ``quantile`` (of the scores ``|g(y) - g(prediction)| /
            scale``, ``g`` = ``log(1 + ·)`` for a log regressor, else the value itself), ``n`` (tiles it was
            calibrated on), ``floor`` (k-NN: added to the neighbours' spread, so no tile's scale is 0); ``None``:
            none.
    """

    method: str
    features: str
    weight: np.ndarray | None = None
    bias: float = 0.0
    bank: np.ndarray | None = None
    bank_values: np.ndarray | None = None
    k: int = 20
    temperature: float = 0.07
    alpha: float | None = None
    target: str = "value"
    unit: str | None = None
    statistic: str = "mean"
    lower: float | None = None
    upper: float | None = None
    log_values: bool = False
    smearing: float = 1.0
    embedding: dict[str, Any] = field(default_factory=dict)
    held_out: dict[str, float] | None = None
    interval: dict[str, float] | None = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` float64 values of features ``x`` ``[N, D]``, clipped to ``lower``/``upper``."""
        return self._clipped(self._taken_back(self.predict_fitted(x)))

    def _taken_back(self, fitted: np.ndarray) -> np.ndarray:
        """Fitted values in the reference's units: a log regressor's ``exp(fitted) * smearing - 1``."""
        if not self.log_values:
            return fitted
        return np.exp(np.minimum(fitted, 700.0)) * self.smearing - 1.0  # exp(700) is near float64's largest

    def _clipped(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, self.lower, self.upper) if self.lower is not None or self.upper is not None else values

    def predict_interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``([N], [N])`` the lower and upper ends of each row's conformal prediction interval (:attr:`interval`),
        clipped as the predictions are: a ridge's interval has the same width everywhere in the values it fitted
        (a log regressor's: the same ratio), a k-NN's grows with the disagreement of a tile's neighbours.

        Raises:
            ValueError: the regressor has no interval (fitted without held-out tiles, or with too few of them).
        """
        return self.predict_with_interval(x)[1:]

    def predict_with_interval(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``([N], [N], [N])``: :meth:`predict` and :meth:`predict_interval` of ``x`` together (a k-NN's neighbours
        found once for both).

        Raises:
            ValueError: the regressor has no prediction interval.
        """
        if self.interval is None:
            raise ValueError("This regressor has no prediction interval: fit it with held-out tiles (at least 9 for "
                             "90 %; --val-fraction or --val-values) and --coverage.")  # fmt: skip
        centre, spread = self._centre_and_spread(x)
        half = self.interval["quantile"] * self._scale(spread, self.interval.get("floor", 0.0))
        low, high = centre - half, centre + half
        if self.log_values:  # quantiles survive a monotone map: the interval of log(1 + y), taken back
            low, high = np.expm1(np.minimum(low, 700.0)), np.expm1(np.minimum(high, 700.0))
        return self._clipped(self._taken_back(centre)), self._clipped(low), self._clipped(high)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """``[3, N]`` each row's value and interval ends (:meth:`predict_with_interval`), or ``[1, N]`` its value
        where the regressor has no interval: what maps and tables write."""
        return np.stack(self.predict_with_interval(x) if self.interval is not None else [self.predict(x)])

    def interval_scores(self, x: np.ndarray, y: np.ndarray, *, floor: float | None = None) -> np.ndarray:
        """``[N]`` the nonconformity scores of rows ``x`` ``[N, D]`` with values ``y`` ``[N]``: ``|g(y) - centre| /
        scale`` (``g``, centre and scale as :meth:`predict_interval` uses them; ``floor``: the k-NN's, default the
        interval's)."""
        centre, spread = self._centre_and_spread(x)
        floor = floor if floor is not None else (self.interval or {}).get("floor", 0.0)
        return self._scores(centre, spread, y, floor)

    def _scores(self, centre: np.ndarray, spread: np.ndarray | None, y: np.ndarray, floor: float) -> np.ndarray:
        y = np.asarray(y, np.float64).reshape(-1)
        return np.abs((np.log1p(y) if self.log_values else y) - centre) / self._scale(spread, floor)

    def _centre_and_spread(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``([N], [N] or None)`` the interval's centre (the fitted prediction, before smearing and clipping) and,
        for a k-NN, the weighted spread of the neighbours' values (one search for both)."""
        if self.method != "knn":
            return self.predict_fitted(x), None
        return knn_moments(self.bank, self.bank_values, x, k=self.k, temperature=self.temperature)

    @staticmethod
    def _scale(spread: np.ndarray | None, floor: float) -> np.ndarray | float:
        """The interval's scale: 1, or a k-NN's neighbour spread plus ``floor`` (never 0)."""
        return 1.0 if spread is None else spread + max(float(floor), 1e-12)

    def predict_fitted(self, x: np.ndarray) -> np.ndarray:
        """``[N]`` what the regressor fitted (``log(1 + value)`` where ``log_values``), before it is taken back and clipped."""
        if self.method == "knn":
            return knn_values(self.bank, self.bank_values, x, k=self.k, temperature=self.temperature)
        return np.asarray(x, np.float64) @ self.weight.astype(np.float64) + float(self.bias)

    @property
    def label(self) -> str:
        """``"canopy height (m)"``: the target and its unit, for axes and colour bars."""
        return f"{self.target} ({self.unit})" if self.unit else self.target

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Tensors as safetensors, the rest as JSON in its metadata (``dinov3_eo_regressor``), written atomically."""
        from dinov3_eo.tasks.chip_classification import write_tagged_safetensors

        arrays = {"weight": self.weight, "bank": self.bank, "bank_values": self.bank_values}
        meta = {"method": self.method, "features": self.features, "bias": float(self.bias), "k": self.k,
                "temperature": self.temperature, "alpha": self.alpha, "target": self.target, "unit": self.unit,
                "statistic": self.statistic, "lower": self.lower, "upper": self.upper, "log_values": self.log_values,
                "smearing": self.smearing, "embedding": self.embedding,
                "held_out": self.held_out, "interval": self.interval}  # fmt: skip
        return write_tagged_safetensors(path, "dinov3_eo_regressor", arrays, meta, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TileRegressor:
        """A regressor :meth:`save` wrote.

        Raises:
            FileNotFoundError: no such file. ValueError: not a safetensors file, or not a regressor's.
        """
        from dinov3_eo.tasks.chip_classification import read_tagged_safetensors

        info, arrays = read_tagged_safetensors(path, "dinov3_eo_regressor", what="tile regressor",
                                               made_by="dinov3-eo regress fit")  # fmt: skip
        needed = ("weight",) if info["method"] == "ridge" else ("bank", "bank_values")
        missing = [name for name in needed if name not in arrays]
        if missing:
            raise ValueError(f"Regressor {str(path)!r} lacks the tensors {missing} of a {info['method']} regressor.")
        return cls(method=info["method"], features=info["features"], bias=float(info.get("bias", 0.0)),
                   k=int(info.get("k", 20)), temperature=float(info.get("temperature", 0.07)), alpha=info.get("alpha"),
                   target=info.get("target", "value"), unit=info.get("unit"), statistic=info.get("statistic", "mean"),
                   lower=info.get("lower"), upper=info.get("upper"), log_values=bool(info.get("log_values", False)),
                   smearing=float(info.get("smearing", 1.0)), embedding=dict(info.get("embedding") or {}),
                   held_out=info.get("held_out"), interval=info.get("interval"), weight=arrays.get("weight"),
                   bank=arrays.get("bank"),
                   bank_values=arrays.get("bank_values"))  # fmt: skip


def regression_metrics(predicted: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """``n``, ``mae``, ``rmse``, ``r2``, ``bias`` (mean of ``predicted - target``) of the pairs where both are finite
    (:class:`~dinov3_eo.tasks.height_metrics.HeightMetrics`, one group)."""
    from dinov3_eo.tasks.height_metrics import height_metrics

    return height_metrics(predicted, target, bins=())["all"]


def fit_regressor(
    x: np.ndarray,
    y: np.ndarray,
    *,
    method: str = "ridge",
    features: str = "cls+patch_mean",
    val: tuple[np.ndarray, np.ndarray] | None = None,
    alpha_grid: Sequence[float] = ALPHA_GRID,
    k: int = 20,
    temperature: float = 0.07,
    lower: float | None = None,
    upper: float | None = None,
    log_values: bool = False,
    alpha: float = 1.0,
) -> TileRegressor:
    """A ridge regression or k-NN on features ``x`` ``[N, D]`` with values ``y`` ``[N]``; with ``log_values``, on
    ``log(1 + y)`` (``y >= 0``), taken back with Duan's smearing factor (:class:`TileRegressor`). ``alpha``: the
    penalty where no ``val`` chooses one.

    The ridge regression standardises each feature (mean 0, standard deviation 1 over the training rows) and fits
    ``min |y - Zw - b|² + alpha |w|²`` (scikit-learn's ``Ridge``); with ``val`` (features, values) each ``alpha`` of
    ``alpha_grid`` is fitted and the one with the lowest held-out RMSE kept (the largest on a tie), then stored with
    the standardisation folded into ``weight`` and ``bias``; without, ``alpha`` = 1. The k-NN keeps ``x`` as its bank.

    Raises:
        ValueError: an unknown ``method``, fewer than two training rows, shapes that disagree, or a value that is not
        finite.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64).reshape(-1)
    if x.ndim != 2 or len(x) != len(y) or len(y) < 2:
        raise ValueError(f"A regressor needs at least two rows of features [N, D] and values [N]; got {x.shape} and {y.shape}.")
    if not np.isfinite(y).all() or not np.isfinite(x).all():
        raise ValueError("A regressor got non-finite features or values (NaN or inf).")
    if log_values and method == "knn":
        raise ValueError("A k-NN averages its neighbours' values as they are: the log transform (--log) is for the ridge "
                         "regression.")  # fmt: skip
    if log_values and y.min() < 0:
        raise ValueError(f"A log regressor needs values >= 0; the smallest is {y.min():g}.")
    common = dict(method=method, features=features, k=k, temperature=temperature, lower=lower, upper=upper, log_values=log_values)
    if method == "knn":
        return TileRegressor(bank=x.astype(np.float32), bank_values=y.copy(), **common)
    from sklearn.linear_model import Ridge

    fitted_y = np.log1p(y) if log_values else y
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)  # a constant feature stays 0 after centring
    z = (x - mean) / scale

    def fitted(penalty: float) -> TileRegressor:
        model = Ridge(alpha=penalty).fit(z, fitted_y)
        weight = model.coef_ / scale
        return _smeared(TileRegressor(weight=weight.astype(np.float32), bias=float(model.intercept_ - mean @ weight),
                                      alpha=float(penalty), **common), x, fitted_y)  # fmt: skip

    if val is None:
        return fitted(alpha)
    best = min((regression_metrics(model.predict(val[0]), val[1])["rmse"], -a)
               for a, model in ((a, fitted(a)) for a in alpha_grid))  # fmt: skip
    chosen = -best[1]
    if len(alpha_grid) > 1 and chosen in (min(alpha_grid), max(alpha_grid)):
        log.warning("The ridge penalty chosen, alpha = %g, is at the end of the grid %s: a better one may lie "
                    "beyond it (pass a wider alpha_grid).", chosen, list(alpha_grid))  # fmt: skip
    return fitted(chosen)


def refitted(regressor: TileRegressor, x: np.ndarray, y: np.ndarray) -> TileRegressor:
    """``regressor`` fitted again, its ``alpha`` and settings kept, on all of ``x`` ``[N, D]``, ``y`` ``[N]`` (its
    training rows and the held-out ones that chose ``alpha``); target, unit, statistic and records carried over."""
    again = fit_regressor(x, y, method=regressor.method, features=regressor.features, k=regressor.k,
                          temperature=regressor.temperature, lower=regressor.lower, upper=regressor.upper,
                          log_values=regressor.log_values, alpha=regressor.alpha or 1.0)  # fmt: skip
    again.target, again.unit, again.statistic = regressor.target, regressor.unit, regressor.statistic
    again.embedding, again.held_out, again.interval = regressor.embedding, regressor.held_out, regressor.interval
    return again


#: the coverage of the prediction intervals ``regress fit`` calibrates by default
COVERAGE = 0.9


def calibrated(regressor: TileRegressor, x: np.ndarray, y: np.ndarray, coverage: float = COVERAGE) -> TileRegressor:
    """``regressor`` with a split-conformal prediction interval (:attr:`TileRegressor.interval`) calibrated on
    held-out rows ``x`` ``[N, D]``, ``y`` ``[N]`` that it was not trained on: a new tile like them lies inside its
    interval with probability ``coverage`` at least (:func:`conformal_quantile`). Tiles unlike the held-out ones (
    another region, season or sensor) need not: ``regress test`` measures the coverage on a reference of them.

    The held-out rows that chose a ridge's ``alpha`` calibrate it too, which makes the interval a little narrow;
    with few tiles it is worth the rows. A k-NN's scale is the spread of a tile's neighbours' values plus a floor
    of a tenth of the held-out tiles' mean spread, so that neighbours that agree exactly still leave some width.
    Too few rows for ``coverage`` leave ``interval`` as ``None``, with a warning.
    """
    centre, spread = regressor._centre_and_spread(x)
    floor = 0.0 if spread is None else 0.1 * float(spread.mean()) or 0.1 * float(np.std(regressor.bank_values))
    scores = regressor._scores(centre, spread, y, floor)
    quantile = conformal_quantile(scores, coverage)
    if not math.isfinite(quantile):
        log.warning("%d held-out tiles cannot calibrate a %.0f %% prediction interval (%d are needed): the regressor "
                    "is saved without one.", len(scores), 100 * coverage, calibration_needed(coverage))  # fmt: skip
        regressor.interval = None
        return regressor
    regressor.interval = {"coverage": float(coverage), "quantile": quantile, "n": int(len(scores)), "floor": floor}
    return regressor


def interval_line(regressor: TileRegressor, items: str = "tiles") -> str:
    """``"90 % prediction intervals from 120 held-out tiles: ± 8.1 m"`` (log regressor: ``"× / ÷ 1.9 on 1 +
    value"``; k-NN: ``"± 1.6 neighbour spreads + 0.4 m"``); ``items``: what was held out (tiles, chips)."""
    interval = regressor.interval
    if interval is None:
        return "no prediction interval"
    unit = f" {regressor.unit}" if regressor.unit else ""
    q = interval["quantile"]
    if regressor.log_values:
        width = f"× / ÷ {math.exp(q):.3g} on 1 + value"
    elif regressor.method == "knn":
        width = f"± {q:.3g} × (the neighbours' spread + {interval['floor']:.3g}{unit})"
    else:
        width = f"± {q:.3g}{unit}"
    return f"{100 * interval['coverage']:.0f} % prediction intervals from {interval['n']} held-out {items}: {width}"


def interval_metrics(lower: np.ndarray, upper: np.ndarray, target: np.ndarray, coverage: float) -> dict[str, float]:
    """How intervals ``[N]`` ``lower``..``upper`` did on references ``target`` ``[N]`` (pairs with a NaN dropped):
    ``coverage`` (nominal), ``covered`` (the share inside, ends included), ``mean_width``, ``median_width``, ``n``."""
    lower, upper, target = (np.asarray(a, np.float64).reshape(-1) for a in (lower, upper, target))
    keep = np.isfinite(lower) & np.isfinite(upper) & np.isfinite(target)
    lower, upper, target = lower[keep], upper[keep], target[keep]
    inside = (target >= lower) & (target <= upper)
    width = upper - lower
    nan = float("nan")
    return {"coverage": float(coverage), "covered": float(inside.mean()) if inside.size else nan,
            "mean_width": float(width.mean()) if width.size else nan,
            "median_width": float(np.median(width)) if width.size else nan, "n": int(inside.size)}  # fmt: skip


def _smeared(regressor: TileRegressor, x: np.ndarray, fitted_y: np.ndarray) -> TileRegressor:
    """``regressor`` with Duan's smearing factor from its training rows (``x``, ``log(1 + y)``) where it is a log
    regressor: ``E[1 + y] = exp(prediction) * mean(exp(residual))``."""
    if regressor.log_values:
        regressor.smearing = float(np.mean(np.exp(fitted_y - regressor.predict_fitted(x))))
    return regressor


@dataclass
class TileRegressionFit:
    """What :func:`fit_tile_regressor` made.

    Attributes:
        regressor: the fitted regressor (its ``embedding`` records the backbone, bands, input size and the tile size
            as ``chip_size``, so that ``regress map`` cuts the same tiles by default).
        tiles: one ``GeoDataFrame`` row per tile fitted or held out (first scene's CRS): ``scene``, ``row``, ``col``,
            ``tile_size``, ``reference``, ``coverage``, ``count``, ``split`` (``train`` / ``held_out``), and
            ``predicted`` for the held-out ones.
        held_out_predictions, held_out_targets: ``[M]`` the held-out tiles' predictions and references (``None``
            without any).
    """

    regressor: TileRegressor
    tiles: Any
    held_out_predictions: np.ndarray | None
    held_out_targets: np.ndarray | None


def _scene_values(scenes: Sequence[str | os.PathLike[str]], values: Any, *, tile_sizes: Sequence[int],
                  **kwargs: Any) -> list[TileValues]:  # fmt: skip
    """:func:`value_tiles` of each scene at its tile size (:func:`~dinov3_eo.tasks.tile_labels.tiles_of_scenes`: with
    several, one the values do not reach is skipped with a warning)."""
    from dinov3_eo.tasks.tile_labels import NoLabelledTiles, tiles_of_scenes

    found, _ = tiles_of_scenes(value_tiles, scenes, values, tile_sizes=tile_sizes, **kwargs)
    if not found:
        raise NoLabelledTiles(f"The reference values cover no tile of any of the scenes {', '.join(map(str, scenes))}.")
    return found


def fit_tile_regressor(
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    values: Any,
    backbone: ChipBackbone | str | os.PathLike[str] | None,
    *,
    tile_size: int,
    embeddings: ChipEmbeddings | None = None,
    statistic: str = "mean",
    attribute: str | None = None,
    band: int = 1,
    values_nodata: float | None = None,
    val_values: Any = None,
    target: str | None = None,
    unit: str | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    size: int | None = 224,
    method: str = "ridge",
    features: str = "cls+patch_mean",
    log_values: bool = False,
    refit: bool = False,
    coverage: float | None = COVERAGE,
    min_covered: float = 0.5,
    min_points: int = 1,
    min_valid: float = 0.9,
    val_fraction: float = 0.2,
    block: int = 4,
    k: int = 20,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    progress: bool = True,
) -> TileRegressionFit:
    """Fit a regressor on the tiles of ``scenes`` that reference ``values`` cover.

    Args:
        scenes: georeferenced scenes (one or several; tiles of all are fitted together).
        values: a reference raster, or points / polygons with a numeric ``attribute``
            (:func:`~dinov3_eo.tasks.tile_values.value_tiles`; ``band``, ``values_nodata`` for a raster), summarised per
            tile by ``statistic``.
        backbone: a :class:`~dinov3_eo.tasks.chip_embeddings.ChipBackbone` or a source for
            :func:`~dinov3_eo.tasks.chip_embeddings.load_chip_backbone` (``None`` with ``embeddings``).
        tile_size: tile side in scene pixels.
        embeddings: a table of the scenes' tiles from ``embed --tiles``: its rows are used, nothing is embedded.
        val_values: a held-out reference over the same scenes (its tiles are left out of training); default:
            ``val_fraction`` of the tiles held out in blocks of ``block`` x ``block`` tiles (0: none).
        target, unit: what the values are, for maps and reports (default: the points' attribute, or a raster's band
            description and unit, else ``"value"``; ``"cover"`` for a share).
        bands, nodata, size, batch_size, device, amp: as for :func:`~dinov3_eo.tasks.tile_classification.embed_tiles`.
        method, features, k, log_values: as for :func:`fit_regressor` (``log_values``: fit ``log(1 + value)``, for a
            skewed reference such as biomass).
        refit: once ``alpha`` is chosen, fit the regressor saved on the held-out tiles too (scarce field plots all
            count); the held-out metrics are then those of the model before, an estimate for the one saved, and so
            is its prediction interval (a model fitted on more tiles errs less: the interval is then cautious).
        coverage: the held-out tiles calibrate a split-conformal prediction interval of this coverage
            (:func:`calibrated`; ``None``: none).
        min_covered: the share of a tile the reference must cover (raster, polygons); min_points: points per tile;
            min_valid: the share of a tile's pixels that must hold imagery.

    Raises:
        FileNotFoundError, KeyError, ValueError: as :func:`~dinov3_eo.tasks.tile_values.value_tiles` and
        :func:`~dinov3_eo.tasks.tile_classification.embed_tiles` (each in one sentence); ValueError also where fewer
        than two tiles are left to train on.
    """
    from dinov3_eo.tasks.tile_labels import spatial_block_split
    from dinov3_eo.tasks.tile_probe import TileEmbedder, describe_labels, one_frame, tile_ground

    scenes = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
    if block < 1:
        raise ValueError(f"The held-out block must be at least one tile wide, got {block}.")
    if coverage is not None and not 0.0 < coverage < 1.0:
        raise ValueError(f"The interval's coverage must lie between 0 and 1, got {coverage}.")
    common = dict(statistic=statistic, attribute=attribute, band=band, nodata=values_nodata, min_valid=min_covered,
                  min_points=min_points)  # fmt: skip
    train_sets = _scene_values(scenes, values, tile_sizes=[tile_size] * len(scenes), **common)
    held_sets = _scene_values([t.source for t in train_sets], val_values, tile_sizes=[tile_size] * len(train_sets),
                              **common) if val_values is not None else []  # fmt: skip
    embedder = TileEmbedder.make(embeddings, backbone, tile_size=tile_size, bands=bands, size=size, device=device)

    sources = [t.source for t in train_sets]
    held_cells = {t.source: set(t.cells) for t in held_sets}  # a tile both references reach is held out
    parts = [(i, t.take(np.array([c not in held_cells.get(t.source, ()) for c in t.cells], bool)), False)
             for i, t in enumerate(train_sets)]  # fmt: skip
    parts += [(sources.index(t.source), t, True) for t in held_sets]
    xs, kept, made = [], [], {}
    for index, tiles, held in parts:
        if not len(tiles):
            continue
        embedded, taken = embedder.embed(tiles, tile_size=tile_size, nodata=nodata, min_valid=min_valid,
                                         batch_size=batch_size, amp=amp, progress=progress)  # fmt: skip
        made = embedded.metadata
        if taken.any():
            xs.append(chip_features(embedded, features))
            kept.append((index, tiles.take(taken), held))
    if not xs:
        raise ValueError(f"No {tile_size}-px tile of {', '.join(map(str, scenes))} with a reference value holds imagery "
                         f"on {min_valid:.0%} of its pixels; check --nodata, or lower --min-valid.")  # fmt: skip
    x = np.concatenate(xs)
    y = np.concatenate([t.values for _, t, _ in kept])
    held = np.concatenate([np.full(len(t), h) for _, t, h in kept])
    if val_values is None and val_fraction > 0:
        groups = np.concatenate([np.full(len(t), i) for i, t, _ in kept])
        rows = np.concatenate([t.rows for _, t, _ in kept])
        cols = np.concatenate([t.cols for _, t, _ in kept])
        _, held_idx = spatial_block_split(rows, cols, np.zeros(len(y), np.int64), fraction=val_fraction, block=block,
                                          groups=groups, seed=seed)  # fmt: skip
        held = np.zeros(len(y), bool)
        held[held_idx] = True
    train = ~held
    if train.sum() < 2:
        raise ValueError(f"{int(train.sum())} tile is left to train on; cover more ground with the reference, or use "
                         "smaller tiles.")  # fmt: skip
    share = statistic.startswith(("above:", "equal:"))
    lower = 0.0 if y[train].min() >= 0 else None
    regressor = fit_regressor(x[train], y[train], method=method, features=features, k=k,
                              val=(x[held], y[held]) if held.any() else None, lower=lower,
                              upper=1.0 if share else None, log_values=log_values)  # fmt: skip
    described, declared = _values_metadata(values, band)
    regressor.target = target or attribute or ("cover" if share else described or "value")
    regressor.unit = unit if unit is not None else (None if share else declared)
    regressor.statistic = statistic
    predictions = regressor.predict(x[held]) if held.any() else None
    if coverage and held.any():
        regressor = calibrated(regressor, x[held], y[held], coverage)
    if refit and held.any():
        regressor = refitted(regressor, x, y)
    regressor.held_out = regression_metrics(predictions, y[held]) if predictions is not None else None
    regressor.embedding = {
        "backbone_source": embedder.source, "size": embedder.size, "bands": embedder.bands,
        "normalization": embedder.override, "backbone": made.get("backbone"), "chip_size": [int(tile_size), int(tile_size)],
        "tile_m": tile_ground(train_sets, tile_size),
        "tiles": {"scenes": [os.fspath(s) for s in scenes], "values": describe_labels(values),
                  "val_values": describe_labels(val_values), "attribute": attribute, "statistic": statistic,
                  "min_covered": min_covered, "min_points": min_points, "min_valid": min_valid, "block": block,
                  "val_fraction": val_fraction, "train_tiles": int(train.sum()), "held_out_tiles": int(held.sum()),
                  "train_mean": float(y[train].mean()), "refit": bool(refit and held.any())}}  # fmt: skip

    frames, start = [], 0
    predicted = np.full(len(y), np.nan)
    if predictions is not None:
        predicted[held] = predictions
    for _, tiles, _ in kept:
        part = slice(start, start + len(tiles))
        start += len(tiles)
        frames.append(tiles.to_geodataframe({"scene": [os.fspath(tiles.source)] * len(tiles),
                                             "split": np.where(held[part], "held_out", "train"),
                                             "predicted": predicted[part]}))  # fmt: skip
    return TileRegressionFit(regressor=regressor, tiles=one_frame(frames), held_out_predictions=predictions,
                             held_out_targets=y[held] if held.any() else None)  # fmt: skip


def _values_metadata(values: Any, band: int) -> tuple[str | None, str | None]:
    """A raster reference's band description and unit (GDAL's description and unit type), where it has them."""
    import rasterio

    from dinov3_eo.data.labels import is_geodataframe, is_raster_labels

    if isinstance(values, (list, tuple)) and values:  # tiles of one mosaic: the first speaks for them
        values = values[0]
    if is_geodataframe(values) or isinstance(values, (list, tuple)) or not is_raster_labels(values):
        return None, None
    try:
        with rasterio.open(values) as src:
            if not 1 <= band <= src.count:
                return None, None
            return src.descriptions[band - 1] or None, src.units[band - 1] or None
    except rasterio.errors.RasterioIOError:  # a folder or glob of rasters: no one file to ask
        return None, None


@dataclass
class TileValueMap:
    """A regressor's values of a scene's tiles on a grid of cells ``stride`` pixels wide (as
    :class:`~dinov3_eo.tasks.tile_classification.TileClasses`).

    Attributes:
        source: the scene. target, unit: what the values are.
        values: ``[rows, cols]`` float32, NaN where a cell's tile was not predicted.
        valid_fraction: ``[rows, cols]`` share of each cell's tile's pixels that hold data.
        crs, transform: the cell grid's (the scene's transform scaled by ``stride``).
        tile_size, stride: tile and cell side in scene pixels. bands: the scene bands fed to the backbone.
        lower, upper: ``[rows, cols]`` float32 ends of each cell's prediction interval of ``coverage`` (``None``:
            the regressor has none; :meth:`TileRegressor.predict_interval`).
    """

    source: str
    target: str
    values: np.ndarray
    valid_fraction: np.ndarray
    crs: Any
    transform: Affine
    tile_size: int
    stride: int
    unit: str | None = None
    bands: list[int] | None = None
    statistic: str = "mean"
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    coverage: float | None = None

    @property
    def label(self) -> str:
        """The target and its unit (``"canopy height (m)"``)."""
        return f"{self.target} ({self.unit})" if self.unit else self.target

    def total(self) -> tuple[float, str] | None:
        """The map's total over the ground its predicted cells cover, where the values make one
        (:func:`total_unit`): a density per hectare (unit ``"Mg/ha"``) summed over the cells' hectares (``(total,
        "Mg")``), or a share (statistic ``above:`` / ``equal:``) as the hectares it covers (``(area, "ha")``);
        ``None`` for other values, or on a grid in degrees."""
        from dinov3_eo.data.raster import pixel_area_ha

        hectares = pixel_area_ha(self.crs, self.transform)
        unit = total_unit(self.unit, self.statistic)
        if hectares is None or unit is None:
            return None
        return float(self.values[np.isfinite(self.values)].astype(np.float64).sum() * hectares), unit

    def to_geodataframe(self) -> Any:
        """The predicted cells as a ``geopandas.GeoDataFrame`` in the scene's CRS: ``row``, ``col``, ``value``,
        (with an interval) ``lower``, ``upper``, then ``valid_fraction`` and cell polygons."""
        import geopandas as gpd

        from dinov3_eo.data.raster import tile_boxes

        rows, cols = np.nonzero(np.isfinite(self.values))
        frame = {"row": rows.astype(np.int64), "col": cols.astype(np.int64),
                 "value": self.values[rows, cols].astype(np.float64)}  # fmt: skip
        if self.lower is not None:
            frame["lower"] = self.lower[rows, cols].astype(np.float64)
            frame["upper"] = self.upper[rows, cols].astype(np.float64)
        frame["valid_fraction"] = self.valid_fraction[rows, cols].astype(np.float64)
        return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(tile_boxes(self.transform, 1, rows, cols), crs=self.crs))

    def to_xarray(self) -> Any:
        """An ``xarray.DataArray`` named after the target on the cell grid (``x``, ``y`` = cell centres, the CRS set
        through rioxarray; ``units`` and ``long_name`` attributes)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        rows, cols = self.values.shape
        x = (self.transform @ (np.arange(cols) + 0.5, np.full(cols, 0.5)))[0]
        y = (self.transform @ (np.full(rows, 0.5), np.arange(rows) + 0.5))[1]
        array = xr.DataArray(self.values, dims=("y", "x"), coords={"y": y, "x": x}, name=self.target,
                             attrs={"long_name": self.target, "units": self.unit or "", "source": self.source,
                                    "tile_size": self.tile_size, "stride": self.stride})  # fmt: skip
        return array.rio.write_crs(self.crs).rio.write_transform(self.transform).rio.write_nodata(np.nan)

    def to_dataset(self) -> Any:
        """An ``xarray.Dataset`` of ``value`` and, with an interval, its ``lower`` and ``upper`` ends (each as
        :meth:`to_xarray`; the ends' ``long_name`` says the coverage), on the same cell grid."""
        import xarray as xr

        value = self.to_xarray()
        variables = {"value": value}
        if self.lower is not None:
            for name, ends in (("lower", self.lower), ("upper", self.upper)):
                variables[name] = value.copy(data=ends)
                variables[name].attrs["long_name"] = f"{name} end of the {100 * (self.coverage or 0):.0f} % " \
                                                     f"prediction interval of {self.target}"
        return xr.Dataset(variables, attrs={"source": self.source, "target": self.target,
                                            "coverage": self.coverage if self.coverage is not None else "none"})  # fmt: skip


def regress_tiles(
    raster: str | os.PathLike[str],
    regressor: TileRegressor | str | os.PathLike[str],
    *,
    backbone: ChipBackbone | str | os.PathLike[str] | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    min_valid: float = 0.5,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    tta: str | None = None,
    prefetch: int = 2,
    cells: np.ndarray | None = None,
    progress: bool = True,
) -> TileValueMap:
    """The regressor's value of every tile of a georeferenced scene (tiles embedded as its training tiles were).

    Args:
        raster: the scene. regressor: a :class:`TileRegressor` or its ``.safetensors`` file.
        backbone: as for :func:`~dinov3_eo.tasks.tile_classification.classify_tiles` (default: the regressor's).
        tile_size: tile side in scene pixels (default: the ground its training tiles covered, in this scene's
            pixels, else their side). Others as for :func:`~dinov3_eo.tasks.tile_classification.classify_tiles`;
            with ``tta`` a tile's value (and each end of its interval) is the mean over its views. With an
            interval (:attr:`TileRegressor.interval`) the map holds each cell's ``lower`` and ``upper`` ends too.

    Raises:
        FileNotFoundError, ValueError: as :func:`~dinov3_eo.tasks.tile_classification.classify_tiles`.
    """
    from dinov3_eo.tasks.tile_classification import _batch_features, predict_tile_grid

    if not isinstance(regressor, TileRegressor):
        regressor = TileRegressor.load(regressor)

    intervals = regressor.interval is not None

    def head(cls: np.ndarray, patch_mean: np.ndarray) -> np.ndarray:
        return regressor.outputs(_batch_features(cls, patch_mean, regressor.features)).T

    grid = predict_tile_grid(raster, regressor, head, 3 if intervals else 1, backbone=backbone, tile_size=tile_size, stride=stride,
                             bands=bands, nodata=nodata, min_valid=min_valid, batch_size=batch_size, device=device,
                             amp=amp, tta=tta, prefetch=prefetch, cells=cells, progress=progress)  # fmt: skip
    return TileValueMap(source=os.fspath(raster), target=regressor.target, unit=regressor.unit, values=grid.outputs[0],
                        valid_fraction=grid.valid_fraction, crs=grid.crs, transform=grid.transform,
                        tile_size=grid.tile_size, stride=grid.stride, bands=grid.bands, statistic=regressor.statistic,
                        lower=grid.outputs[1] if intervals else None, upper=grid.outputs[2] if intervals else None,
                        coverage=regressor.interval["coverage"] if intervals else None)  # fmt: skip


class TileValueOutputs(NamedTuple):
    """What :func:`write_tile_values` writes for one scene (the interval's two only for a regressor with one)."""

    values: Path
    tiles: Path
    quicklook: Path
    interval: Path | None = None
    interval_quicklook: Path | None = None


def tile_value_outputs(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                       interval: bool = True) -> TileValueOutputs:  # fmt: skip
    """``OUT/<stem>_tile_values.tif``, ``_tile_values.gpkg``, ``_tile_values.png`` and, with ``interval``,
    ``_tile_interval.tif`` and ``_tile_interval.png``."""
    stem, out = Path(src).stem, Path(out_dir)
    ends = (out / f"{stem}_tile_interval.tif", out / f"{stem}_tile_interval.png") if interval else (None, None)
    return TileValueOutputs(out / f"{stem}_tile_values.tif", out / f"{stem}_tile_values.gpkg",
                            out / f"{stem}_tile_values.png", *ends)  # fmt: skip


def write_tile_values(result: TileValueMap, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> TileValueOutputs:
    """Write :func:`tile_value_outputs` for ``result``, each atomically: a float32 COG with one pixel per cell (NaN
    nodata; the band described by the target, ``units`` set), the cells as polygons with their ``value`` (and
    interval ends), and a picture with a labelled colour bar; with an interval, a two-band float32 COG of its
    ``lower`` and ``upper`` ends and a picture of its width (where the map is least sure).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before anything is written).
    """
    from dinov3_eo.inference.writers import check_overwrite, write_cog, write_vector
    from dinov3_eo.tasks.height_plots import value_quicklook

    paths = tile_value_outputs(result.source, out_dir, interval=result.lower is not None)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path is not None:
            check_overwrite(path, overwrite, inputs=[result.source])
    tags = {"tile_size": result.tile_size, "stride": result.stride, "source": Path(result.source).name,
            "target": result.target, "unit": result.unit or "", "statistic": result.statistic}  # fmt: skip
    write_cog(paths.values, result.values.astype(np.float32), crs=result.crs, transform=result.transform,
              nodata=float("nan"), band_descriptions=[result.target], units=[result.unit] if result.unit else None,
              overwrite=overwrite, tags=tags)  # fmt: skip
    write_vector(result.to_geodataframe(), paths.tiles, layer="tile_values", overwrite=overwrite)
    title = f"{Path(result.source).name}: {result.tile_size}-px tiles"
    value_quicklook(paths.quicklook, paths.values, label=result.label, overwrite=overwrite, title=title)
    if result.lower is not None:
        percent = f"{100 * result.coverage:.0f} %"
        write_cog(paths.interval, np.stack([result.lower, result.upper]).astype(np.float32), crs=result.crs,
                  transform=result.transform, nodata=float("nan"),
                  band_descriptions=[f"lower end of the {percent} interval", f"upper end of the {percent} interval"],
                  units=[result.unit] * 2 if result.unit else None, overwrite=overwrite,
                  tags={**tags, "coverage": result.coverage})  # fmt: skip
        value_quicklook(paths.interval_quicklook, result.upper - result.lower,
                        label=f"width of the {percent} interval" + (f" ({result.unit})" if result.unit else ""),
                        overwrite=overwrite, title=title)  # fmt: skip
    return paths


class TileValueScores(NamedTuple):
    """What :func:`score_tile_regressor` returns."""

    predictions: np.ndarray
    """``[N]`` the regressor's values of the reference's tiles."""
    targets: np.ndarray
    """``[N]`` the reference's values (summarised as the regressor's training reference was)."""
    tiles: Any
    """a ``GeoDataFrame`` of the tiles (first scene's CRS): ``scene``, ``row``, ``col``, ``tile_size``,
    ``reference``, ``coverage``, ``count``, ``predicted``, ``error`` (predicted - reference), and with an interval
    ``lower``, ``upper`` and ``inside`` (the reference within them)."""
    lower: np.ndarray | None = None
    """``[N]`` the lower ends of the regressor's prediction intervals (``None``: it has none)."""
    upper: np.ndarray | None = None
    """``[N]`` their upper ends."""


def score_tile_regressor(
    regressor: TileRegressor | str | os.PathLike[str],
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    values: Any,
    *,
    backbone: ChipBackbone | str | os.PathLike[str] | None = None,
    embeddings: ChipEmbeddings | None = None,
    tile_size: int | None = None,
    statistic: str | None = None,
    attribute: str | None = None,
    band: int = 1,
    values_nodata: float | None = None,
    min_covered: float = 0.5,
    min_points: int = 1,
    min_valid: float = 0.9,
    nodata: float | None = None,
    tta: str | None = None,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    progress: bool = True,
) -> TileValueScores:
    """A regressor's values for the tiles of ``scenes`` that a reference covers (summarised per tile by
    ``statistic``, default the regressor's; tile size by default its), to score it (:func:`regression_metrics`).
    With ``embeddings`` (an ``embed --tiles`` table of the scenes made with the regressor's backbone) the tiles' rows
    are read, nothing is embedded; the table's own ``min_valid`` then holds, and ``tta`` cannot apply.

    Raises:
        ValueError: no tile covered by the reference holds enough imagery, or as
        :func:`~dinov3_eo.tasks.tile_values.value_tiles`.
    """
    from dinov3_eo.tasks.chip_classification import probe_backbone
    from dinov3_eo.tasks.tile_classification import probe_tile_size, tile_grid_shape
    from dinov3_eo.tasks.tile_probe import one_frame, scene_shape, tile_table_rows

    if not isinstance(regressor, TileRegressor):
        regressor = TileRegressor.load(regressor)
    scenes = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    if embeddings is not None:
        if tta:
            raise ValueError("Test-time augmentation embeds flipped tiles: leave out the embedding table, or --tta.")
        tile_size = tile_size or embeddings.metadata.get("tile_size")
    elif not isinstance(backbone, ChipBackbone):
        backbone = probe_backbone(regressor, backbone, device=device)
    statistic = statistic or regressor.statistic
    # each scene's tiles cover the ground the regressor's did, in its own pixels
    sizes = [int(tile_size) if tile_size is not None else probe_tile_size(regressor, scene) for scene in scenes]
    found = _scene_values(scenes, values, tile_sizes=sizes, statistic=statistic, attribute=attribute, band=band,
                          nodata=values_nodata, min_valid=min_covered, min_points=min_points)  # fmt: skip
    intervals = regressor.interval is not None
    all_outputs, all_target, frames = [], [], []
    for tiles in found:
        if embeddings is not None:  # rows of an 'embed --tiles' table: nothing embedded here
            embedded, done = tile_table_rows(embeddings, tiles)
            outputs = np.full((3 if intervals else 1, len(tiles)), np.nan)
            if done.any():
                outputs[:, done] = regressor.outputs(chip_features(embedded, regressor.features))
        else:
            cells = np.zeros(tile_grid_shape(*scene_shape(tiles.source), tiles.tile_size), bool)
            cells[tiles.rows, tiles.cols] = True
            result = regress_tiles(tiles.source, regressor, backbone=backbone, tile_size=tiles.tile_size,
                                   nodata=nodata, min_valid=min_valid, batch_size=batch_size, tta=tta, amp=amp,
                                   cells=cells, progress=progress)  # fmt: skip
            maps = [result.values, result.lower, result.upper] if intervals else [result.values]
            outputs = np.stack([m[tiles.rows, tiles.cols] for m in maps]).astype(np.float64)
        done = np.isfinite(outputs[0])
        tiles, outputs = tiles.take(done), outputs[:, done]
        if not len(tiles):
            continue
        columns = {"scene": [os.fspath(tiles.source)] * len(tiles), "predicted": outputs[0],
                   "error": outputs[0] - tiles.values}  # fmt: skip
        if intervals:
            lower, upper = outputs[1:]
            columns.update(lower=lower, upper=upper, inside=(tiles.values >= lower) & (tiles.values <= upper))
        all_outputs.append(outputs)
        all_target.append(tiles.values)
        frames.append(tiles.to_geodataframe(columns))
    if not frames:
        raise ValueError(f"No tile of {', '.join(map(str, scenes))} with a reference value holds imagery on "
                         f"{min_valid:.0%} of its pixels; check --nodata, or lower --min-valid.")  # fmt: skip
    outputs = np.concatenate(all_outputs, axis=1)
    ends = (outputs[1], outputs[2]) if intervals else (None, None)
    return TileValueScores(outputs[0], np.concatenate(all_target), one_frame(frames), *ends)



__all__ = [
    "ALPHA_GRID",
    "COVERAGE",
    "METHODS",
    "TileRegressionFit",
    "TileRegressor",
    "TileValueMap",
    "TileValueOutputs",
    "TileValueScores",
    "calibrated",
    "fit_regressor",
    "fit_tile_regressor",
    "interval_line",
    "interval_metrics",
    "total_unit",
    "knn_moments",
    "knn_values",
    "regress_tiles",
    "refitted",
    "regression_metrics",
    "score_tile_regressor",
    "tile_value_outputs",
    "write_tile_values",
]
