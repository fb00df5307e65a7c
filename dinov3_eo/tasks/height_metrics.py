"""Canopy-height accuracy: MAE, RMSE, R² and bias, overall and per reference-height bin.

Errors are ``pred - target`` (positive bias = over-estimation). A pixel counts when it is valid, its reference
height is finite and so is the prediction. Per-bin rows group pixels by their *reference* height, with
half-open bins ``[low, high)`` in metres (default 0-5, 5-10, 10-20 and 20+ m), the convention of canopy-height
papers that report how error grows with tree height.

:class:`HeightMetrics` accumulates sufficient statistics (counts, sums of errors, squared errors, targets and
squared targets, in float64) so that metrics over a whole validation set are exact however it is batched;
:func:`height_metrics` is the one-shot form for arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

#: Reference-height bins ``(low, high)`` in metres; ``high = inf`` is open-ended.
HEIGHT_BINS: tuple[tuple[float, float], ...] = ((0.0, 5.0), (5.0, 10.0), (10.0, 20.0), (20.0, math.inf))
METRIC_NAMES = ("n", "mae", "rmse", "r2", "bias")


def bin_label(low: float, high: float) -> str:
    """``"0-5"``, ``"20+"``: the name of a height bin in tables and logged metric keys."""
    fmt = lambda v: f"{v:g}"  # noqa: E731
    return f"{fmt(low)}+" if math.isinf(high) else f"{fmt(low)}-{fmt(high)}"


def _as_flat(array: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(array, Tensor):
        array = array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float64).reshape(-1)


@dataclass
class _Sums:
    n: int = 0
    err: float = 0.0  # sum(pred - target)
    abs_err: float = 0.0  # sum|pred - target|
    sq_err: float = 0.0  # sum (pred - target)^2
    tgt: float = 0.0  # sum target
    sq_tgt: float = 0.0  # sum target^2

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        e = pred - target
        self.n += int(e.size)
        self.err += float(e.sum())
        self.abs_err += float(np.abs(e).sum())
        self.sq_err += float((e * e).sum())
        self.tgt += float(target.sum())
        self.sq_tgt += float((target * target).sum())

    def merge(self, other: _Sums) -> None:
        self.n += other.n
        self.err += other.err
        self.abs_err += other.abs_err
        self.sq_err += other.sq_err
        self.tgt += other.tgt
        self.sq_tgt += other.sq_tgt

    def metrics(self) -> dict[str, float]:
        """``n, mae, rmse, r2, bias``; NaN for an empty group and R² NaN when the reference is constant."""
        if self.n == 0:
            return {"n": 0, "mae": math.nan, "rmse": math.nan, "r2": math.nan, "bias": math.nan}
        # total sum of squares about the reference mean, from the running sums
        ss_tot = self.sq_tgt - self.tgt * self.tgt / self.n
        r2 = 1.0 - self.sq_err / ss_tot if ss_tot > 1e-12 * max(self.sq_tgt, 1.0) else math.nan
        return {
            "n": self.n,
            "mae": self.abs_err / self.n,
            "rmse": math.sqrt(self.sq_err / self.n),
            "r2": r2,
            "bias": self.err / self.n,
        }


@dataclass
class HeightMetrics:
    """Streaming height metrics: :meth:`update` with batches, :meth:`compute` at the end.

    Args:
        bins: reference-height bins ``(low, high)`` in metres, half-open ``[low, high)``.

    Raises:
        ValueError: a bin with ``high <= low``.
    """

    bins: Sequence[tuple[float, float]] = HEIGHT_BINS
    _all: _Sums = field(default_factory=_Sums, init=False, repr=False)
    _per_bin: list[_Sums] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bins = tuple((float(lo), float(hi)) for lo, hi in self.bins)
        bad = [(lo, hi) for lo, hi in self.bins if not hi > lo]
        if bad:
            raise ValueError(f"HeightMetrics: every bin needs high > low, got {bad}.")
        self._per_bin = [_Sums() for _ in self.bins]

    def reset(self) -> None:
        self._all = _Sums()
        self._per_bin = [_Sums() for _ in self.bins]

    def update(self, pred: np.ndarray | Tensor, target: np.ndarray | Tensor, valid: np.ndarray | Tensor | None = None) -> None:
        """Add pixels: ``pred`` and ``target`` of any equal size (e.g. ``[B, 1, H, W]`` and ``[B, H, W]``), metres.

        Raises:
            ValueError: the three inputs do not hold the same number of pixels.
        """
        p, t = _as_flat(pred), _as_flat(target)
        if p.size != t.size:
            raise ValueError(f"HeightMetrics.update: pred has {p.size} pixels but target has {t.size}.")
        keep = np.isfinite(t) & np.isfinite(p)
        if valid is not None:
            v = _as_flat(valid).astype(bool)
            if v.size != t.size:
                raise ValueError(f"HeightMetrics.update: valid has {v.size} pixels but target has {t.size}.")
            keep &= v
        p, t = p[keep], t[keep]
        self._all.add(p, t)
        for (lo, hi), sums in zip(self.bins, self._per_bin):
            inside = (t >= lo) & (t < hi)
            sums.add(p[inside], t[inside])

    def merge(self, other: HeightMetrics) -> None:
        """Add another accumulator's pixels (same bins), e.g. from another process."""
        if tuple(other.bins) != tuple(self.bins):
            raise ValueError(f"HeightMetrics.merge: bins differ ({other.bins} vs {self.bins}).")
        self._all.merge(other._all)
        for mine, theirs in zip(self._per_bin, other._per_bin):
            mine.merge(theirs)

    def state_tensor(self) -> Tensor:
        """All sums as one float64 ``[1 + n_bins, 6]`` tensor (for an all-reduce across processes)."""
        rows = [self._all, *self._per_bin]
        return torch.tensor([[s.n, s.err, s.abs_err, s.sq_err, s.tgt, s.sq_tgt] for s in rows], dtype=torch.float64)

    def load_state_tensor(self, state: Tensor) -> None:
        """Inverse of :meth:`state_tensor` (after summing it over processes)."""
        rows = state.double().cpu().tolist()
        if len(rows) != 1 + len(self.bins):
            raise ValueError(f"HeightMetrics: state has {len(rows)} rows, expected {1 + len(self.bins)}.")
        sums = [_Sums(int(round(r[0])), *r[1:]) for r in rows]
        self._all, self._per_bin = sums[0], sums[1:]

    def compute(self) -> dict[str, dict[str, float]]:
        """``{"all": {...}, "0-5": {...}, ...}`` with :data:`METRIC_NAMES` per group."""
        out = {"all": self._all.metrics()}
        for (lo, hi), sums in zip(self.bins, self._per_bin):
            out[bin_label(lo, hi)] = sums.metrics()
        return out


def height_metrics(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    valid: np.ndarray | Tensor | None = None,
    *,
    bins: Sequence[tuple[float, float]] = HEIGHT_BINS,
) -> dict[str, dict[str, float]]:
    """Metrics of one set of predictions: see :meth:`HeightMetrics.compute`."""
    acc = HeightMetrics(bins=bins)
    acc.update(pred, target, valid)
    return acc.compute()


def flat_metrics(metrics: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """``{"mae": .., "rmse": .., "r2": .., "bias": .., "mae_0-5": .., ...}`` for loggers (overall keys unsuffixed)."""
    out: dict[str, float] = {}
    for group, values in metrics.items():
        for name in ("mae", "rmse", "r2", "bias"):
            key = name if group == "all" else f"{name}_{group}"
            out[f"{prefix}{key}"] = float(values[name])
    return out


def metrics_table(rows: dict[str, dict[str, dict[str, float]]], *, digits: int = 2) -> str:
    """A Markdown table, one line per (method, height group): ``rows[method] = height_metrics(...)``."""
    lines = ["| method | heights (m) | pixels | MAE (m) | RMSE (m) | R² | bias (m) |", "|---|---|---:|---:|---:|---:|---:|"]
    fmt = lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"  # noqa: E731
    for method, metrics in rows.items():
        for group, m in metrics.items():
            lines.append(
                f"| {method} | {group} | {int(m['n'])} | {fmt(m['mae'])} | {fmt(m['rmse'])} | {fmt(m['r2'])} | {fmt(m['bias'])} |"
            )
    return "\n".join(lines)
