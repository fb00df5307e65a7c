"""Split-conformal prediction: a guarantee on how often a model's answer holds, whatever the model.

Held-out examples the model did not train on give nonconformity scores (how wrong it was on each); the
``ceil((n + 1) coverage)``-th smallest of ``n`` scores bounds the score of a new exchangeable example with
probability ``coverage`` at least (Vovk, Gammerman & Shafer 2005; Angelopoulos & Bates 2021). A regressor's
interval is its prediction plus or minus that bound (:mod:`~dinov3_eo.tasks.tile_regression`,
:mod:`~dinov3_eo.tasks.height_intervals`); a classifier's *prediction set* holds every class whose probability is
at least ``1 - bound`` for the score ``1 - p(true class)`` (least ambiguous set-valued classifiers, Sadinle, Lei &
Wasserman 2019): the smallest sets on average for the coverage. A tile whose set holds several classes is one the
probe cannot tell apart; an empty set, a tile unlike any it learnt.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def conformal_rank(n: int, coverage: float) -> int:
    """The rank ``ceil((n + 1) coverage)`` (1-based) of the calibration score that bounds a new one with probability
    ``coverage``; above ``n`` where ``n`` is too small for ``coverage``."""
    return math.ceil((n + 1) * coverage - 1e-9)  # -1e-9: 0.9 * 10 is 9.000000000000002 in floats


def calibration_needed(coverage: float) -> int:
    """The fewest calibration examples a ``coverage`` can be promised from (9 for 90 %): the smallest ``n`` with
    :func:`conformal_rank` at most ``n``."""
    return math.ceil(coverage / (1.0 - coverage) - 1e-9)


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of ``[n]`` calibration ``scores``: the ``ceil((n + 1) coverage)``-th smallest.

    A new score exchangeable with the calibration ones falls at or below it with probability at least
    ``coverage`` (and below ``coverage + 1 / (n + 1)`` where scores do not tie): Vovk et al.'s finite-sample
    guarantee, which needs no assumption about the regressor. ``inf`` where ``n`` is too small for ``coverage``
    (``ceil((n + 1) coverage) > n``: 9 scores at least for 90 %).

    Raises:
        ValueError: ``coverage`` outside (0, 1), or a score that is not finite.
    """
    scores = np.sort(np.asarray(scores, np.float64).reshape(-1))
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"The interval's coverage must lie between 0 and 1, got {coverage}.")
    if not np.isfinite(scores).all():
        raise ValueError("Conformal scores must be finite.")
    rank = conformal_rank(len(scores), coverage)
    return float(scores[rank - 1]) if rank <= len(scores) else math.inf


def class_set_threshold(scores: np.ndarray, targets: np.ndarray, coverage: float) -> float:
    """The probability a class needs to join a prediction set of ``coverage``: ``1 - q`` for ``q`` the
    :func:`conformal_quantile` of the held-out examples' ``1 - p(true class)`` (``scores`` ``[N, K]`` class
    probabilities, ``targets`` ``[N]`` class ids); ``-inf`` (every class, always) where ``N`` is too small.

    Raises:
        ValueError: shapes that disagree, a class id out of range, or ``coverage`` outside (0, 1).
    """
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets).reshape(-1)
    if scores.ndim != 2 or len(scores) != len(targets):
        raise ValueError(f"Class probabilities [N, K] and class ids [N] must agree; got {scores.shape} and {targets.shape}.")
    if len(targets) and (targets.min() < 0 or targets.max() >= scores.shape[1]):
        raise ValueError(f"Class ids must lie in 0..{scores.shape[1] - 1}.")
    q = conformal_quantile(1.0 - scores[np.arange(len(targets)), targets], coverage)
    return 1.0 - q if math.isfinite(q) else -math.inf


def prediction_sets(scores: np.ndarray, threshold: float) -> np.ndarray:
    """``[N, K]`` bool: the classes of each example's prediction set, those of probability at least ``threshold``."""
    return np.asarray(scores) >= threshold


def set_metrics(sets: np.ndarray, targets: np.ndarray, coverage: float) -> dict[str, Any]:
    """How prediction sets ``[N, K]`` did on class ids ``targets`` ``[N]``: ``coverage`` (nominal), ``covered``
    (the share whose set holds its class), ``mean_size``, ``singletons`` and ``empty`` (shares of sets of one class
    and of none), ``n``."""
    sets, targets = np.asarray(sets, bool), np.asarray(targets).reshape(-1)
    sizes = sets.sum(axis=1)
    n = len(targets)
    share = lambda mask: float(mask.mean()) if n else math.nan  # noqa: E731
    return {"coverage": float(coverage), "covered": share(sets[np.arange(n), targets]) if n else math.nan,
            "mean_size": float(sizes.mean()) if n else math.nan, "singletons": share(sizes == 1),
            "empty": share(sizes == 0), "n": int(n)}  # fmt: skip


__all__ = ["calibration_needed", "class_set_threshold", "conformal_quantile", "conformal_rank", "prediction_sets",
           "set_metrics"]
