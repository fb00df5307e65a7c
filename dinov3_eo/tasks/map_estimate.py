"""Model-assisted estimates from a value map and a reference sample: the mean (and total) over the mapped area with
a confidence interval.

A map of canopy height or biomass answers "how much in all?" with the sum of its cells, and that sum inherits the
map's bias. Forest inventories correct it with a probability sample of reference plots (field plots, LiDAR strips):
the **difference estimator** (Särndal, Swensson & Wretman 1992, ch. 6; McRoberts et al. 2013 for remote-sensing
maps) adds the mean error of the sample, reference minus map, to the map's mean over every cell::

    mean = mean(map over the N cells) + mean(y - ŷ over the n sample cells)
    SE   = sqrt((1 - n / N) * var(y - ŷ) / n)        (simple random sampling)

It is unbiased whatever the map's bias, provided the sample cells are a random sample of the mapped cells (a
sample of convenience, such as plots along roads, is not). Its standard error shrinks with the map's *error*
spread rather than the values' own spread, so a good map turns a few plots into a tight estimate: the ratio
``var(y) / var(y - ŷ)`` (the relative efficiency) says how many times more plots the sample alone would need.
The interval uses Student's t with ``n - 1`` degrees of freedom.

With **strata** (a class map, forest / non-forest, ecozones), :func:`stratified_difference_estimate` applies the
same correction within each stratum and weighs the strata by their share ``W_h = N_h / N`` of the mapped cells::

    mean = sum_h W_h (mean(map over stratum h) + mean(y - ŷ over its n_h sample cells))

Its variance depends on how the plots were drawn. ``design="stratified"``: a random sample within each stratum
(plots placed per stratum, typically more in rare strata), ``V = sum_h W_h² (1 - n_h / N_h) s²_h / n_h`` with
Satterthwaite's degrees of freedom; ``"post-stratified"``: one random sample of the whole area, sorted into strata
afterwards, ``V = (1 - n / N) (sum_h W_h s²_h / n + sum_h (1 - W_h) s²_h / n²)`` (Cochran 1977, 5A.42) with
``n - H`` degrees of freedom. Where the map's error differs between strata (a map biased in one class), the
strata's own corrections make the estimate tighter; where plots were drawn at different rates per stratum, the
stratified weights are what keeps it unbiased (the unstratified estimator is not).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


def total_unit(unit: str | None, statistic: str = "mean") -> str | None:
    """The unit of a value map's total over its hectares, where its values make one: ``"Mg"`` for a density per
    hectare (``"Mg/ha"``), ``"ha"`` for a share (statistic ``above:`` / ``equal:``), else ``None``."""
    compact = (unit or "").replace(" ", "")
    if compact.lower().endswith("/ha"):
        return compact[: -len("/ha")]
    return "ha" if statistic.startswith(("above:", "equal:")) else None


@dataclass
class MapEstimate:
    """What :func:`difference_estimate` returns (values in the map's unit).

    Attributes:
        mean, standard_error, low, high: the model-assisted mean over the mapped cells, its standard error and its
            ``confidence`` interval.
        map_mean: the map's own mean over its cells (``mean - map_mean`` is the bias correction).
        sample_mean, sample_standard_error: the sample's own mean and standard error (no map): what the plots
            alone would say.
        relative_efficiency: ``var(y) / var(y - ŷ)`` over the sample: how many times more plots the sample alone
            would need for the model-assisted standard error (``nan`` with no error spread).
        cells, n: mapped cells and sample cells. confidence: the interval's level.
        design: ``"simple random"``, ``"stratified"`` or ``"post-stratified"``.
        strata: per stratum (stratified designs), ``{"stratum", "cells", "weight", "n", "map_mean", "mean_error",
            "mean", "standard_error"}``; empty for a simple random sample.
    """

    mean: float
    standard_error: float
    low: float
    high: float
    map_mean: float
    sample_mean: float
    sample_standard_error: float
    relative_efficiency: float
    cells: int
    n: int
    confidence: float
    design: str = "simple random"
    strata: list[dict[str, Any]] = field(default_factory=list)

    def scaled(self, factor: float) -> dict[str, float]:
        """The mean, its standard error and interval times ``factor`` (e.g. a total: the mapped hectares for a
        density per hectare), as ``total``, ``standard_error``, ``low``, ``high``, ``map_total``."""
        return {"total": self.mean * factor, "standard_error": self.standard_error * factor, "low": self.low * factor,
                "high": self.high * factor, "map_total": self.map_mean * factor}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def difference_estimate(
    map_values: np.ndarray,
    sample_predicted: np.ndarray,
    sample_reference: np.ndarray,
    *,
    confidence: float = 0.95,
    finite_population: bool = True,
) -> MapEstimate:
    """The difference estimator of the mean over a map's cells (module docstring).

    Args:
        map_values: ``[N]`` the map's values of every mapped cell (NaN cells are not mapped and are dropped).
        sample_predicted, sample_reference: ``[n]`` the map's value and the reference's at each sample cell (pairs
            with a NaN dropped); a random sample of the mapped cells.
        confidence: the interval's level. finite_population: apply ``1 - n / N`` (a sample drawn without
            replacement from the cells; a sample that covers every cell then has no error).

    Raises:
        ValueError: fewer than two sample pairs, no mapped cell, or ``confidence`` outside (0, 1).
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"The confidence level must lie between 0 and 1, got {confidence}.")
    mapped = np.asarray(map_values, np.float64).reshape(-1)
    mapped = mapped[np.isfinite(mapped)]
    p = np.asarray(sample_predicted, np.float64).reshape(-1)
    y = np.asarray(sample_reference, np.float64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"The sample's predictions {p.shape} and references {y.shape} differ in length.")
    keep = np.isfinite(p) & np.isfinite(y)
    p, y = p[keep], y[keep]
    if not mapped.size:
        raise ValueError("The map has no valued cell to estimate over.")
    n, cells = len(y), mapped.size
    if n < 2:
        raise ValueError(f"A model-assisted estimate needs at least two sample cells with a reference and a map value; "
                         f"got {n}.")  # fmt: skip
    errors = y - p
    correction = (1.0 - min(n / cells, 1.0)) if finite_population else 1.0
    se = math.sqrt(correction * errors.var(ddof=1) / n)
    sample_se = math.sqrt(correction * y.var(ddof=1) / n)
    t = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1))
    mean = float(mapped.mean() + errors.mean())
    error_var = errors.var(ddof=1)
    return MapEstimate(mean=mean, standard_error=se, low=mean - t * se, high=mean + t * se, map_mean=float(mapped.mean()),
                       sample_mean=float(y.mean()), sample_standard_error=sample_se,
                       relative_efficiency=float(y.var(ddof=1) / error_var) if error_var > 0 else math.nan,
                       cells=int(cells), n=int(n), confidence=float(confidence))  # fmt: skip


def stratum_variance_terms(sizes: np.ndarray, n: np.ndarray, variances: np.ndarray, *,
                           finite_population: bool = True) -> np.ndarray:  # fmt: skip
    """Each stratum's term of the variance of a stratified random sample's estimate of a total,
    ``N_h² (1 - n_h / N_h) s²_h / n_h`` (the correction ``1 - n_h / N_h`` only with ``finite_population``); divided
    by ``N²`` they are the terms of the estimated mean's. Shapes: ``[H]`` each (``N_h``, ``n_h``, ``s²_h``)."""
    sizes, n, variances = (np.asarray(a, np.float64) for a in (sizes, n, variances))
    correction = (1.0 - np.minimum(n / sizes, 1.0)) if finite_population else 1.0
    return sizes**2 * correction * variances / n


#: the sampling designs :func:`stratified_difference_estimate` knows
DESIGNS = ("stratified", "post-stratified")


def stratified_difference_estimate(
    map_values: np.ndarray,
    map_strata: np.ndarray,
    sample_predicted: np.ndarray,
    sample_reference: np.ndarray,
    sample_strata: np.ndarray,
    *,
    design: str = "stratified",
    confidence: float = 0.95,
    finite_population: bool = True,
) -> MapEstimate:
    """The stratified difference estimator of the mean over a map's cells (module docstring).

    Args:
        map_values, map_strata: ``[N]`` every cell's map value (NaN: not mapped, dropped) and stratum (an integer;
            cells of a negative stratum have none and are dropped).
        sample_predicted, sample_reference, sample_strata: ``[n]`` the map's value, the reference and the stratum at
            each sample cell (pairs with a NaN, or in a stratum without mapped cells, dropped).
        design: ``"stratified"`` (a random sample within each stratum) or ``"post-stratified"`` (one random sample
            of the area, sorted into strata afterwards).
        confidence, finite_population: as :func:`difference_estimate`.

    Raises:
        ValueError: an unknown design, arrays of different lengths, a stratum with mapped cells and fewer than two
        sample cells (merge it with a neighbour), no mapped cell, ``confidence`` outside (0, 1).
    """
    from scipy import stats

    if design not in DESIGNS:
        raise ValueError(f"The design must be one of {DESIGNS}, not {design!r}.")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"The confidence level must lie between 0 and 1, got {confidence}.")
    values = np.asarray(map_values, np.float64).reshape(-1)
    strata = np.asarray(map_strata).reshape(-1)
    p, y = (np.asarray(a, np.float64).reshape(-1) for a in (sample_predicted, sample_reference))
    sample_strata = np.asarray(sample_strata).reshape(-1)
    if values.shape != strata.shape or not p.shape == y.shape == sample_strata.shape:
        raise ValueError(f"The map's values {values.shape} and strata {strata.shape}, and the sample's predictions "
                         f"{p.shape}, references {y.shape} and strata {sample_strata.shape} must pair up.")  # fmt: skip
    mapped = np.isfinite(values) & (strata >= 0)
    values, strata = values[mapped], strata[mapped].astype(np.int64)
    if not values.size:
        raise ValueError("The map has no valued cell with a stratum to estimate over.")
    labels, counts = np.unique(strata, return_counts=True)
    keep = np.isfinite(p) & np.isfinite(y) & np.isin(sample_strata, labels)
    p, y, sample_strata = p[keep], y[keep], sample_strata[keep].astype(np.int64)
    cells, n = int(values.size), int(len(y))
    rows = []
    for label, size in zip(labels.tolist(), counts.tolist()):
        inside = sample_strata == label
        n_h = int(inside.sum())
        if n_h < 2:
            raise ValueError(f"Stratum {label} has {size:,} mapped cells but {n_h} sample cell(s); each stratum needs "
                             "at least two (merge it with a neighbouring stratum).")  # fmt: skip
        errors = y[inside] - p[inside]
        map_mean = float(values[strata == label].mean())
        rows.append({"stratum": int(label), "cells": int(size), "weight": size / cells, "n": n_h,
                     "map_mean": map_mean, "mean_error": float(errors.mean()),
                     "mean": map_mean + float(errors.mean()), "error_var": float(errors.var(ddof=1)),
                     "reference_mean": float(y[inside].mean()), "reference_var": float(y[inside].var(ddof=1))})  # fmt: skip
    weight = np.array([r["weight"] for r in rows])
    n_h = np.array([r["n"] for r in rows], np.float64)
    size = np.array([r["cells"] for r in rows], np.float64)

    def variance(var_h: np.ndarray) -> tuple[float, float]:
        """The estimator's variance from per-stratum variances, and its degrees of freedom."""
        if design == "stratified":
            parts = stratum_variance_terms(size, n_h, var_h, finite_population=finite_population) / cells**2
            total = float(parts.sum())
            df = total**2 / float(np.sum(parts**2 / (n_h - 1))) if total > 0 else float(n - 1)
            return total, df
        correction = (1.0 - min(n / cells, 1.0)) if finite_population else 1.0
        total = correction * float(np.sum(weight * var_h) / n + np.sum((1.0 - weight) * var_h) / n**2)
        return total, float(n - len(rows))

    var, df = variance(np.array([r["error_var"] for r in rows]))
    sample_var, _ = variance(np.array([r["reference_var"] for r in rows]))
    sample_mean = float(np.sum(weight * np.array([r["reference_mean"] for r in rows])))
    se = math.sqrt(var)
    t = float(stats.t.ppf(0.5 + confidence / 2, df=max(df, 1.0)))
    mean = float(np.sum(weight * np.array([r["mean"] for r in rows])))
    for r in rows:  # the report keeps each stratum's estimate and its own standard error
        fpc = (1.0 - min(r["n"] / r["cells"], 1.0)) if finite_population else 1.0
        r["standard_error"] = math.sqrt(fpc * r["error_var"] / r["n"])
        for scratch in ("error_var", "reference_mean", "reference_var"):
            del r[scratch]
    return MapEstimate(mean=mean, standard_error=se, low=mean - t * se, high=mean + t * se,
                       map_mean=float(values.mean()), sample_mean=sample_mean,
                       sample_standard_error=math.sqrt(sample_var),
                       relative_efficiency=sample_var / var if var > 0 else math.nan, cells=cells, n=n,
                       confidence=float(confidence), design=design, strata=rows)  # fmt: skip


__all__ = ["DESIGNS", "MapEstimate", "difference_estimate", "stratified_difference_estimate", "stratum_variance_terms",
           "total_unit"]
