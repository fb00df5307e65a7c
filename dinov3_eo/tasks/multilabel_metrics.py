"""Scores of multi-label classification: each chip carries any number of classes (BigEarthNet's land-cover labels,
"cloud" and "water" together).

Benchmarks report the mean average precision over classes (macro mAP, BigEarthNet's headline number), the micro AP
over every (chip, class) pair, and F1 at a probability threshold, micro-, macro- and sample-averaged. Average
precision is the area under the precision-recall step curve, ``sum_n (R_n - R_{n-1}) P_n`` over the distinct
scores from the highest down (as scikit-learn computes it); a class without a positive chip has none and is left out
of the macro mean.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_eo.inference.writers import atomic_output


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ``scores`` ``[N]`` against ``positive`` ``[N]`` bool; NaN without a positive.

    Tied scores form one step of the curve (all of them enter at once), so the result does not depend on their order.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positive = np.asarray(positive, dtype=bool).ravel()
    total = int(positive.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last row of each group of tied scores
    tp = np.cumsum(p)[last]
    precision = tp / (last + 1)
    recall = tp / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2 * tp + fp + fn
    return np.divide(2 * tp, denominator, out=np.full(np.shape(tp), np.nan), where=denominator > 0)


def multilabel_report(scores: np.ndarray, targets: np.ndarray, classes: Sequence[str], *,
                      threshold: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """Metrics of probabilities ``scores`` ``[N, K]`` against ``targets`` ``[N, K]`` bool, a class predicted where
    its probability is at least ``threshold``.

    Returns:
        ``{"chips", "threshold", "map_macro", "map_micro", "f1_micro", "f1_macro", "f1_samples", "precision_micro",
        "recall_micro", "exact_match", "classes": {name: {"ap", "f1", "precision", "recall", "positives",
        "predicted"}}}``; a class without positives has NaN ``ap`` (left out of ``map_macro``), one without
        positives or predictions NaN ``f1`` (left out of ``f1_macro``).
    """
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=bool)
    predicted = scores >= threshold
    tp = (predicted & targets).sum(axis=0).astype(np.float64)
    fp = (predicted & ~targets).sum(axis=0).astype(np.float64)
    fn = (~predicted & targets).sum(axis=0).astype(np.float64)
    ap = np.array([average_precision(scores[:, k], targets[:, k]) for k in range(scores.shape[1])])
    f1 = _f1(tp, fp, fn)
    precision = np.divide(tp, tp + fp, out=np.full(tp.shape, np.nan), where=(tp + fp) > 0)
    recall = np.divide(tp, tp + fn, out=np.full(tp.shape, np.nan), where=(tp + fn) > 0)
    row_tp, row_fp, row_fn = ((a & b).sum(axis=1) for a, b in ((predicted, targets), (predicted, ~targets), (~predicted, targets)))
    per_chip = _f1(row_tp.astype(np.float64), row_fp.astype(np.float64), row_fn.astype(np.float64))
    nan_mean = lambda v: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")  # noqa: E731
    return {
        "chips": int(len(scores)),
        "threshold": float(threshold),
        "map_macro": nan_mean(ap),
        "map_micro": average_precision(scores.ravel(), targets.ravel()),
        "f1_micro": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "f1_macro": nan_mean(f1),
        "f1_samples": float(np.nan_to_num(per_chip, nan=1.0).mean()) if len(scores) else float("nan"),  # none and none agree
        "precision_micro": float(tp.sum() / (tp.sum() + fp.sum())) if tp.sum() + fp.sum() else float("nan"),
        "recall_micro": float(tp.sum() / (tp.sum() + fn.sum())) if tp.sum() + fn.sum() else float("nan"),
        "exact_match": float((predicted == targets).all(axis=1).mean()) if len(scores) else float("nan"),
        "classes": {
            name: {"ap": float(ap[k]), "f1": float(f1[k]), "precision": float(precision[k]), "recall": float(recall[k]),
                   "positives": int(targets[:, k].sum()), "predicted": int(predicted[:, k].sum())}
            for k, name in enumerate(classes)
        },  # fmt: skip
    }


def multilabel_table(report: Mapping[str, Any]) -> str:
    """The report as a fixed-width text table (one row per class, then the averages)."""
    width = max([len("class")] + [len(n) for n in report["classes"]])
    fmt = lambda v: "   n/a" if np.isnan(v) else f"{v:6.3f}"  # noqa: E731
    lines = [f"{'class':<{width}}  {'AP':>6} {'F1':>6} {'precision':>9} {'recall':>6} {'positives':>9} {'predicted':>9}"]
    for name, m in report["classes"].items():
        lines.append(f"{name:<{width}}  {fmt(m['ap'])} {fmt(m['f1'])} {fmt(m['precision']):>9} {fmt(m['recall'])} "
                     f"{m['positives']:>9,} {m['predicted']:>9,}")  # fmt: skip
    lines.append(f"mAP {fmt(report['map_macro']).strip()} (micro {fmt(report['map_micro']).strip()}); at p >= "
                 f"{report['threshold']:g}: F1 micro {fmt(report['f1_micro']).strip()}, macro "
                 f"{fmt(report['f1_macro']).strip()}, samples {fmt(report['f1_samples']).strip()}; exact match "
                 f"{fmt(report['exact_match']).strip()} over {report['chips']:,} chips")  # fmt: skip
    return "\n".join(lines)


def write_multilabel_report(folder: str | Path, report: Mapping[str, Any]) -> None:
    """``metrics.json`` (``report``) and ``per_class.csv`` (class, AP, F1, precision, recall, positives, predicted) in
    ``folder``, each written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_output(folder / "metrics.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_output(folder / "per_class.csv", overwrite=True) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["class", "ap", "f1", "precision", "recall", "positives", "predicted"])
        for name, m in report["classes"].items():
            out.writerow([name, *(f"{m[key]:.6f}" for key in ("ap", "f1", "precision", "recall")), m["positives"],
                          m["predicted"]])  # fmt: skip


__all__ = ["average_precision", "multilabel_report", "multilabel_table", "write_multilabel_report"]
