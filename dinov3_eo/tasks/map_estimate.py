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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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


__all__ = ["MapEstimate", "difference_estimate"]
