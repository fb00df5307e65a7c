"""Scene classification of image chips on frozen DINOv3 features: a linear probe or a k-NN on chip embeddings.

EuroSAT, UC Merced, RESISC45 and most labelling exports are folders of chips, one folder per class. DINOv3 is
evaluated on such data with its backbone frozen: a k-NN on the normed CLS tokens (k = 20, votes weighted by
``exp(cosine / 0.07)``) and a linear classifier on them (the dino.txt image embedding adds the mean patch token).
``dinov3-eo classify fit CHIPS/ --model BACKBONE -o probe.safetensors`` embeds the chips
(:mod:`~dinov3_eo.tasks.chip_embeddings`), fits scikit-learn's multinomial logistic regression (its inverse
regularisation ``C`` chosen on a held-out split, as DINOv2's logistic-regression evaluation does) or keeps the
training embeddings for a k-NN, reports accuracy, per-class scores and the confusion matrix of the held-out chips,
and saves the probe as safetensors (weights) with JSON metadata (classes, features, how the chips were embedded):
no pickle, so a probe from anywhere loads safely. ``classify test`` scores it on a labelled test split;
``classify predict`` writes a CSV of each chip's class and probabilities (or, for georeferenced chips, a GeoPackage of
their footprints); ``classify map`` classifies georeferenced scenes tile by tile
(:mod:`~dinov3_eo.tasks.tile_classification`). Chips carrying several classes each (BigEarthNet) are fitted with
``--multi-label`` (one-vs-rest probes, scored by :mod:`~dinov3_eo.tasks.multilabel_metrics`); ``--balanced`` weighs
rare classes up; ``--finetune-epochs`` trains the probe and its backbone together
(:mod:`~dinov3_eo.tasks.chip_finetune`); ``--embeddings`` reads chips already embedded by ``embed --chips``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_eo.data.chip_labels import (
    folder_labels,
    label_matrix,
    labelled_chips,
    stratified_split,
    table_labels,
    table_multilabels,
)
from dinov3_eo.inference.writers import atomic_output, check_overwrite
from dinov3_eo.tasks.chip_embeddings import FEATURES, chip_features, embed_chip_views, embed_chips_with, load_chip_backbone

METHODS = ("linear", "knn")
#: inverse L2 regularisation strengths tried for the linear probe (chosen by held-out accuracy)
C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def knn_scores(bank: np.ndarray, bank_labels: np.ndarray, x: np.ndarray, num_classes: int, *, k: int = 20,
               temperature: float = 0.07) -> np.ndarray:  # fmt: skip
    """DINO's weighted k-NN: each of the ``k`` most cosine-similar bank rows votes ``exp(similarity / temperature)``
    for its class; returns ``[N, K]`` vote shares (rows sum to 1). With multi-label ``bank_labels`` ``[M, K]`` (0/1),
    a class's score is the vote share of the neighbours that carry it.

    Args:
        bank: ``[M, D]`` training features; bank_labels: ``[M]`` class ids (or ``[M, K]`` 0/1); x: ``[N, D]`` features
            to classify.
    """
    import torch

    a = torch.nn.functional.normalize(torch.from_numpy(np.asarray(bank, np.float32)), dim=1)
    b = torch.nn.functional.normalize(torch.from_numpy(np.asarray(x, np.float32)), dim=1)
    k = min(k, len(a))
    labels = torch.from_numpy(np.asarray(bank_labels, np.int64))
    scores = torch.zeros(len(b), num_classes, dtype=torch.float64)
    for start in range(0, len(b), 1024):  # [1024, M] similarities at a time: memory flat in the chips classified
        sim, idx = (b[start : start + 1024] @ a.T).topk(k, dim=1)
        weights = (sim.double() / temperature).exp()  # [n, k]
        if labels.ndim == 2:  # multi-label: the weighted share of neighbours carrying each class, [n, k, K] summed
            votes = (weights[..., None] * labels[idx].double()).sum(dim=1)
        else:  # one class each: votes added into [n, K], no one-hot block
            votes = torch.zeros(len(idx), num_classes, dtype=torch.float64).scatter_add_(1, labels[idx], weights)
        scores[start : start + 1024] = votes / weights.sum(dim=1, keepdim=True)
    return scores.numpy()


@dataclass
class ChipClassifier:
    """A classifier on chip embeddings: ``scores(features) -> [N, K]`` class probabilities.

    Attributes:
        method: ``"linear"`` (``weight`` ``[K, D]``, ``bias`` ``[K]``: softmax of ``x W^T + b``, or each class's
            sigmoid when ``multi_label``) or ``"knn"`` (``bank`` ``[M, D]`` with ``bank_labels`` ``[M]``, or ``[M, K]``
            0/1 when ``multi_label``; ``k``, ``temperature``).
        classes: class names, index = class id.
        features: :data:`FEATURES` entry the inputs are made of.
        embedding: how chips are embedded for it (``backbone_source``, ``size``, ``bands``, ``normalization``).
        c: the linear probe's chosen ``C``.
        held_out_accuracy: accuracy (multi-label: macro mAP) on the held-out chips when fitted, for the record.
        multi_label: each chip may carry any number of classes: ``scores`` are independent probabilities, and a class
            is predicted where its probability is at least ``threshold``.
        balanced: the linear probe was fitted with balanced class weights (for the record).
    """

    method: str
    classes: list[str]
    features: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    bank: np.ndarray | None = None
    bank_labels: np.ndarray | None = None
    k: int = 20
    temperature: float = 0.07
    c: float | None = None
    embedding: dict[str, Any] = field(default_factory=dict)
    held_out_accuracy: float | None = None
    multi_label: bool = False
    threshold: float = 0.5
    balanced: bool = False

    def scores(self, x: np.ndarray) -> np.ndarray:
        """``[N, K]`` class probabilities of features ``x`` ``[N, D]`` (:func:`chip_features`)."""
        if self.method == "knn":
            return knn_scores(self.bank, self.bank_labels, x, len(self.classes), k=self.k, temperature=self.temperature)
        logits = np.asarray(x, np.float64) @ self.weight.T.astype(np.float64) + self.bias.astype(np.float64)
        if self.multi_label:
            return 0.5 * (1.0 + np.tanh(0.5 * logits))  # the sigmoid, without overflow for large |logits|
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Tensors as safetensors, the rest as JSON in its metadata (``dinov3_eo_classifier``), written atomically."""
        import torch
        from safetensors.torch import save_file

        arrays = {"weight": self.weight, "bias": self.bias, "bank": self.bank, "bank_labels": self.bank_labels}
        tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items() if a is not None}
        meta = {"method": self.method, "classes": self.classes, "features": self.features, "k": self.k,
                "temperature": self.temperature, "c": self.c, "embedding": self.embedding,
                "held_out_accuracy": self.held_out_accuracy, "multi_label": self.multi_label,
                "threshold": self.threshold, "balanced": self.balanced}  # fmt: skip
        with atomic_output(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata={"dinov3_eo_classifier": json.dumps(meta)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ChipClassifier:
        """A probe :meth:`save` wrote.

        Raises:
            FileNotFoundError: no such file. ValueError: not a safetensors file, or not a chip classifier's.
        """
        from safetensors import safe_open

        if not Path(path).is_file():
            raise FileNotFoundError(f"Chip classifier {str(path)!r} does not exist.")
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = (f.metadata() or {}).get("dinov3_eo_classifier")
                arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        except Exception as e:  # safetensors raises its own error types for a file that is not one
            raise ValueError(f"{str(path)!r} is not a safetensors file: {e}") from e
        if meta is None:
            raise ValueError(f"{str(path)!r} is a safetensors file but not a chip classifier (no dinov3_eo_classifier "
                             "metadata); 'dinov3-eo classify fit' writes those.")  # fmt: skip
        info = json.loads(meta)
        needed = ("weight", "bias") if info["method"] == "linear" else ("bank", "bank_labels")
        missing = [name for name in needed if name not in arrays]
        if missing:
            raise ValueError(f"Chip classifier {str(path)!r} lacks the tensors {missing} of a {info['method']} probe.")
        return cls(method=info["method"], classes=list(info["classes"]), features=info["features"], k=int(info["k"]),
                   temperature=float(info["temperature"]), c=info.get("c"), embedding=dict(info.get("embedding", {})),
                   held_out_accuracy=info.get("held_out_accuracy"), multi_label=bool(info.get("multi_label", False)),
                   threshold=float(info.get("threshold", 0.5)), balanced=bool(info.get("balanced", False)),
                   **{name: arrays.get(name) for name in ("weight", "bias", "bank", "bank_labels")})  # fmt: skip


def fit_chip_classifier(
    x: np.ndarray,
    y: np.ndarray,
    classes: Sequence[str],
    *,
    method: str = "linear",
    features: str = "cls+patch_mean",
    val: tuple[np.ndarray, np.ndarray] | None = None,
    c_grid: Sequence[float] = C_GRID,
    k: int = 20,
    temperature: float = 0.07,
    threshold: float = 0.5,
    balanced: bool = False,
    max_iter: int = 1000,
) -> ChipClassifier:
    """A linear probe or k-NN on features ``x`` ``[N, D]`` with class ids ``y`` ``[N]``, or multi-label targets ``y``
    ``[N, K]`` bool (each chip any number of classes).

    The linear probe is scikit-learn's multinomial ``LogisticRegression`` (lbfgs, L2); with ``val`` (features, ids)
    each ``C`` of ``c_grid`` is fitted and the one with the best held-out accuracy kept (the smallest on a tie), then
    refitted on the training chips; without, ``C`` = 1. The k-NN keeps ``x`` as its bank. ``balanced`` weighs each
    class's chips by the inverse of its frequency (scikit-learn's ``class_weight="balanced"``) and picks ``C`` by
    balanced accuracy (the mean recall over classes), so that rare land covers are not traded for the common ones;
    multi-label, the positives and negatives of each class are balanced (``C`` still by macro mAP).

    Multi-label, the linear probe is one binary ``LogisticRegression`` per class (one-vs-rest) with one ``C`` for all,
    chosen by held-out macro mAP; a class that every training chip carries is always predicted, one that none carries
    never; a class is predicted at probability ``threshold`` or more (stored in the probe). The k-NN's class scores
    are the vote shares of the neighbours carrying them.

    Raises:
        ValueError: an unknown ``method``, fewer than two classes among the training chips (single-label),
        multi-label targets that are not ``[N, K]``, or ``balanced`` for a k-NN.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if balanced and method != "linear":
        raise ValueError("Balanced class weights are for the linear probe (--method linear), not the k-NN.")
    if np.ndim(y) == 2:
        return _fit_multilabel(x, y, classes, method=method, features=features, val=val, c_grid=c_grid, k=k,
                               temperature=temperature, threshold=threshold, balanced=balanced, max_iter=max_iter)  # fmt: skip
    if len(np.unique(y)) < 2:
        raise ValueError(f"A classifier needs chips of at least two classes; the training chips hold {len(np.unique(y))}.")
    common = dict(method=method, classes=list(classes), features=features, k=k, temperature=temperature)
    if method == "knn":
        return ChipClassifier(bank=np.asarray(x, np.float32), bank_labels=np.asarray(y, np.int64), **common)
    from sklearn.linear_model import LogisticRegression

    weights = "balanced" if balanced else None

    def fitted(c: float) -> ChipClassifier:
        model = LogisticRegression(C=c, class_weight=weights, max_iter=max_iter).fit(x, y)
        weight = np.zeros((len(classes), x.shape[1]), np.float32)
        bias = np.full(len(classes), -1e4, np.float32)  # a class without a training chip is never predicted
        if len(model.classes_) == 2:  # scikit-learn keeps one row for two classes: logit of the second
            weight[model.classes_[1]], bias[model.classes_[1]] = model.coef_[0], model.intercept_[0]
            bias[model.classes_[0]] = 0.0
        else:
            weight[model.classes_], bias[model.classes_] = model.coef_, model.intercept_
        return ChipClassifier(weight=weight, bias=bias, c=float(c), balanced=balanced, **common)

    if val is None:
        return fitted(1.0)
    best = max((held_out_score(probe, probe.scores(val[0]), val[1], balanced=balanced), -c)
               for c, probe in ((c, fitted(c)) for c in c_grid))  # fmt: skip
    return fitted(-best[1])


def _fit_multilabel(x: np.ndarray, targets: np.ndarray, classes: Sequence[str], *, method: str, features: str,
                    val: tuple[np.ndarray, np.ndarray] | None, c_grid: Sequence[float], k: int, temperature: float,
                    threshold: float, balanced: bool, max_iter: int) -> ChipClassifier:  # fmt: skip
    """:func:`fit_chip_classifier` for multi-label targets ``[N, K]``."""
    targets = np.asarray(targets, dtype=bool)
    if targets.shape != (len(x), len(classes)):
        raise ValueError(f"Multi-label targets must be [chips, classes] = {(len(x), len(classes))}, got {targets.shape}.")
    common = dict(method=method, classes=list(classes), features=features, k=k, temperature=temperature,
                  multi_label=True, threshold=threshold)  # fmt: skip
    if method == "knn":
        return ChipClassifier(bank=np.asarray(x, np.float32), bank_labels=targets.astype(np.int64), **common)
    from sklearn.linear_model import LogisticRegression

    def fitted(c: float) -> ChipClassifier:
        weight = np.zeros((len(classes), x.shape[1]), np.float32)
        bias = np.where(targets.all(axis=0), 1e4, -1e4).astype(np.float32)  # always / never, for one-sided classes
        for j in range(len(classes)):
            if 0 < targets[:, j].sum() < len(targets):
                model = LogisticRegression(C=c, class_weight="balanced" if balanced else None,
                                           max_iter=max_iter).fit(x, targets[:, j])  # fmt: skip
                weight[j], bias[j] = model.coef_[0], model.intercept_[0]
        return ChipClassifier(weight=weight, bias=bias, c=float(c), balanced=balanced, **common)

    if val is None:
        return fitted(1.0)
    best = max((held_out_score(probe, probe.scores(val[0]), val[1]), -c) for c, probe in ((c, fitted(c)) for c in c_grid))
    return fitted(-best[1])


def held_out_score(probe: ChipClassifier, scores: np.ndarray, y: np.ndarray, *, balanced: bool = False) -> float:
    """What picks a probe's ``C`` and a fine-tuning's epoch, from held-out probabilities ``scores`` ``[N, K]`` against
    ``y``: accuracy, or with ``balanced`` balanced accuracy (the mean recall over the classes present); for a
    multi-label probe (``y`` ``[N, K]``) the macro mAP at its threshold (-inf where no class has a positive)."""
    if probe.multi_label:
        from dinov3_eo.tasks.multilabel_metrics import multilabel_report

        value = multilabel_report(scores, y, probe.classes, threshold=probe.threshold)["map_macro"]
        return -np.inf if np.isnan(value) else value
    predicted = scores.argmax(1)
    if balanced:
        return float(np.mean([(predicted[y == k] == k).mean() for k in np.unique(y)]))
    return float((predicted == y).mean())


#: vector formats ``classify predict`` writes georeferenced chips' predictions as (their footprints)
VECTOR_SUFFIXES = {".gpkg": "GPKG", ".geojson": "GeoJSON"}


def write_prediction_map(dst: str | os.PathLike[str], paths: Sequence[str], scores: np.ndarray, classes: Sequence[str],
                         *, threshold: float | None = None, crs: Any = None, overwrite: bool = False) -> Any:  # fmt: skip
    """:func:`write_predictions`' columns on each georeferenced chip's footprint (:func:`chip_footprints`), as a
    GeoPackage (layer ``predictions``) or GeoJSON (by ``dst``'s suffix), written atomically; returns the
    ``GeoDataFrame``."""
    import geopandas as gpd

    suffix = Path(dst).suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise ValueError(f"Chip predictions on a map are written as {' or '.join(VECTOR_SUFFIXES)}, not {str(dst)!r}.")
    check_overwrite(dst, overwrite)
    frame = gpd.GeoDataFrame(prediction_columns(paths, scores, classes, threshold=threshold),
                             geometry=chip_footprints(paths, crs))  # fmt: skip
    with atomic_output(dst, overwrite=overwrite) as tmp:
        frame.to_file(tmp, driver=VECTOR_SUFFIXES[suffix], **({"layer": "predictions"} if suffix == ".gpkg" else {}))
    return frame


def probe_backbone(probe: ChipClassifier, source: str | os.PathLike[str] | None = None, *,
                   device: str | None = None) -> Any:
    """The backbone that embeds chips for ``probe``: ``source`` (``--model``), else the one it was fitted on, with
    the normalisation it recorded (:func:`~dinov3_eo.tasks.chip_embeddings.load_chip_backbone`).

    Raises:
        ValueError: no ``source`` and the probe records none.
    """
    source = source or probe.embedding.get("backbone_source")
    if source is None:
        raise ValueError("The probe does not record the backbone it was fitted on; give it (--model).")
    return load_chip_backbone(source, normalization=probe.embedding.get("normalization"), device=device)


def typical_chip_size(sizes: np.ndarray) -> list[int]:
    """The most common ``[height, width]`` of ``[N, 2]`` chip sizes (the smallest on a tie): the tile size
    ``classify map`` cuts a scene into by default."""
    values, counts = np.unique(np.asarray(sizes, np.int64).reshape(-1, 2), axis=0, return_counts=True)
    return [int(v) for v in values[int(np.argmax(counts))]]


def prediction_columns(paths: Sequence[str], scores: np.ndarray, classes: Sequence[str], *,
                       threshold: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The columns of ``classify predict``'s outputs: ``path``, ``class`` (the most probable) and ``score`` (its
    probability), then ``p_<class>`` per class; with a ``threshold`` (a multi-label probe) ``labels``, the classes of
    probability at least ``threshold`` joined by ``;`` (:func:`predicted_labels`), replaces ``class`` and ``score``."""
    scores = np.asarray(scores)
    columns: dict[str, Any] = {"path": list(paths)}
    if threshold is not None:
        columns["labels"] = predicted_labels(scores, classes, threshold)
    else:
        best = scores.argmax(1)
        columns.update({"class": [classes[i] for i in best], "score": scores[np.arange(len(best)), best]})
    columns.update({f"p_{name}": scores[:, k] for k, name in enumerate(classes)})
    return columns


def predicted_labels(scores: np.ndarray, classes: Sequence[str], threshold: float) -> list[str]:
    """Per row of ``scores`` ``[N, K]``, the classes of probability at least ``threshold``, joined by ``;``."""
    return [";".join(name for name, v in zip(classes, row) if v >= threshold) for row in scores]


def write_predictions(dst: str | os.PathLike[str], paths: Sequence[str], scores: np.ndarray, classes: Sequence[str], *,
                      threshold: float | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """:func:`prediction_columns` as a CSV, one row per chip (probabilities to 6 decimals), written atomically."""
    import csv

    columns = prediction_columns(paths, scores, classes, threshold=threshold)
    text = lambda v: f"{v:.6f}" if isinstance(v, (float, np.floating)) else v  # noqa: E731
    with atomic_output(dst, overwrite=overwrite) as tmp, open(tmp, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(list(columns))
        out.writerows([text(v) for v in row] for row in zip(*columns.values()))
    return Path(dst)


def chip_footprints(paths: Sequence[str], crs: Any = None) -> Any:
    """The footprint of each georeferenced chip as a ``geopandas.GeoSeries`` in one CRS: ``crs``, default the first
    chip's (chips in another CRS reprojected, their corners densified along the edges).

    Raises:
        ValueError: a chip without a georeference (named), which has no place on a map.
    """
    import geopandas as gpd
    import shapely

    from dinov3_eo.data.raster import is_georeferenced, open_quietly

    boxes, crss = [], []
    for path in paths:
        with open_quietly(path) as src:
            if not is_georeferenced(src):
                raise ValueError(f"Chip {path} is not georeferenced, so its prediction has no place on a map; write a "
                                 "CSV (-o predictions.csv) for chips without one.")  # fmt: skip
            boxes.append(shapely.box(*src.bounds))
            crss.append(src.crs)
    target = crs if crs is not None else crss[0]
    out = gpd.GeoSeries([None] * len(paths), crs=target)
    for source in {c.to_wkt(): c for c in crss}.values():
        rows = [i for i, c in enumerate(crss) if c == source]
        group = gpd.GeoSeries([boxes[i] for i in rows], crs=source)
        if source != target:
            extent = group.bounds.to_numpy()
            step = float(np.max(extent[:, 2:] - extent[:, :2])) / 16  # edges bend when reprojected: 16 points a side
            group = group.segmentize(step).to_crs(target)
        out.iloc[rows] = group.values
    return out


def _class_ids(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup[name] for name in labels], dtype=np.int64)


def print_probe_report(probe: ChipClassifier, scores: np.ndarray, y: np.ndarray, out_dir: Path | None, *,
                       threshold: float | None = None, unit: str = "chips") -> dict[str, Any]:  # fmt: skip
    """Print (and with ``out_dir`` write) the scores of ``scores`` against ``y`` (class ids, or ``[N, K]`` targets of
    a multi-label probe, at ``threshold``, default the probe's); ``unit``: what was classified (chips, tiles)."""
    from dinov3_eo.tasks.segmentation_eval import accuracy_report, confusion_matrix, report_table, write_accuracy_report

    classes = probe.classes
    if probe.multi_label:
        from dinov3_eo.tasks.multilabel_metrics import multilabel_report, multilabel_table, write_multilabel_report

        report = multilabel_report(scores, y, classes, threshold=probe.threshold if threshold is None else threshold)
        print(multilabel_table(report))
        if out_dir is not None:
            write_multilabel_report(out_dir, report)
        return report
    confusion = confusion_matrix(scores.argmax(1), y, len(classes))
    report = accuracy_report(confusion, classes)
    recalls = [m["recall"] for m in report["classes"].values() if m["reference_pixels"]]
    report["balanced_accuracy"] = float(np.mean(recalls)) if recalls else float("nan")  # mean recall over classes
    report["confusion"] = confusion.tolist()
    print(report_table(report).replace(" pixels", f" {unit}").replace("reference px", unit))
    print(f"balanced accuracy {report['balanced_accuracy']:.3f} (mean recall over the classes present)")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_accuracy_report(out_dir, report, confusion, classes)
    return report


def classify_main(argv: Sequence[str]) -> int:
    """``dinov3-eo classify fit CHIPS --model BACKBONE -o probe.safetensors`` / ``classify test CHIPS --probe
    probe.safetensors`` / ``classify predict CHIPS --probe probe.safetensors -o predictions.csv``; returns the exit
    code."""
    import argparse
    import sys

    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.tasks.features import BACKBONE_HELP, add_backbone_input_options

    prog = "dinov3-eo classify"
    parser = argparse.ArgumentParser(prog=prog, description="Scene classification of image chips on frozen DINOv3 "
                                     "features: a linear probe or k-NN on chip embeddings.")  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    fit = sub.add_parser("fit", help="embed labelled chips (one folder per class, or a label table) and fit a probe",
                         description="Embed chips laid out one folder per class (CHIPS/Forest/x.jpg: the folder names "
                         "the class), fit a linear probe (C chosen on held-out chips) or keep them for a k-NN, report "
                         "the held-out accuracy, and save the probe.")  # fmt: skip
    fit.add_argument("chips", nargs="*", help="training chips: folders (searched recursively) or quoted globs; each "
                     "chip's class is its folder's name")  # fmt: skip
    fit.add_argument("--model", default=None, help=BACKBONE_HELP + " (default with --embeddings: the table's)")
    fit.add_argument("--embeddings", default=None, help="a table from 'embed --chips' holding the labelled chips: their "
                     "embeddings are read, not computed again (the table's backbone, size, bands and normalisation "
                     "hold), so probes fit in seconds")  # fmt: skip
    fit.add_argument("-o", "--output", required=True, help="the probe (.safetensors)")
    fit.add_argument("--labels", default=None, help="instead of class folders, a table (CSV, Parquet, JSONL) of "
                     "'image' (or 'path', relative to the table) and 'label' columns, as benchmarks list their splits")  # fmt: skip
    fit.add_argument("--val-labels", default=None, help="held-out chips as such a table (instead of --val folders)")
    fit.add_argument("--multi-label", action="store_true", help="each chip may carry several classes (BigEarthNet): "
                     "the --labels table's label cell is a list, or classes joined by --label-separator; one-vs-rest "
                     "probes, C chosen by held-out mAP")  # fmt: skip
    fit.add_argument("--threshold", type=float, default=0.5, help="multi-label: a class is predicted at probability "
                     ">= THRESHOLD (default 0.5; stored in the probe)")  # fmt: skip
    fit.add_argument("--val", nargs="+", default=None, help="held-out chips (class folders as for CHIPS); default: "
                     "--val-fraction of each class")  # fmt: skip
    fit.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out (default 0.2)")
    fit.add_argument("--method", choices=METHODS, default="linear", help="linear probe (default) or k-NN")
    fit.add_argument("--balanced", action="store_true", help="weigh each class's chips by the inverse of its frequency "
                     "and choose C by balanced accuracy (mean recall): rare classes count as much as common ones")  # fmt: skip
    fit.add_argument("--features", choices=FEATURES, default="cls+patch_mean",
                     help="embedding columns fed to the probe (default cls+patch_mean, dino.txt's image embedding)")
    fit.add_argument("-k", type=int, default=20, help="neighbours of the k-NN (default 20)")
    fit.add_argument("--size", type=int, default=224, help="chips resized to SIZE x SIZE (default 224; 0: own size)")
    fit.add_argument("--out-dir", default=None, help="also write metrics.json, confusion.csv and confusion.png of the "
                     "held-out chips here")  # fmt: skip
    fit.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (and of the fine-tuning)")
    tune = fit.add_argument_group("fine-tuning (LP-FT: the fitted linear probe and its backbone trained together)")
    tune.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning after the linear probe "
                      "(default 0: none); the best held-out epoch is kept, the backbone exported beside the probe")  # fmt: skip
    tune.add_argument("--finetune-lr", type=float, default=1e-5, help="peak learning rate of the backbone (default 1e-5)")
    tune.add_argument("--finetune-head-lr", type=float, default=1e-3, help="peak learning rate of the head (default 1e-3)")
    tune.add_argument("--finetune-blocks", type=int, default=None, help="train only the last N blocks (default: all)")
    tune.add_argument("--workers", type=int, default=0, help="data-loading processes of the fine-tuning (default 0)")
    add_backbone_input_options(fit)
    _add_scene_label_options(fit, fitting=True)
    predict = sub.add_parser("predict", help="classify chips with a probe: a CSV of classes and probabilities")
    predict.add_argument("chips", nargs="+", help="chips: files, folders or quoted globs")
    predict.add_argument("--probe", required=True, help="a probe from 'classify fit'")
    predict.add_argument("-o", "--output", required=True, help="predictions CSV (path, class, score, p_<class> ...), or "
                         ".gpkg / .geojson: the same on each georeferenced chip's footprint (in the first chip's CRS)")  # fmt: skip
    predict.add_argument("--model", default=None, help="the backbone (default: the one the probe was fitted on)")
    test = sub.add_parser("test", help="score a probe on labelled chips (one folder per class): accuracy, per "
                          "class, confusion",
                          description="Score a probe on held-out chips laid out one folder per class (a benchmark's "
                          "test split): the accuracy table, and with --out-dir metrics.json and confusion.csv/png.")  # fmt: skip
    test.add_argument("chips", nargs="*", help="test chips: folders or quoted globs; each chip's class is its folder's name")
    test.add_argument("--labels", default=None, help="instead of class folders, a table (CSV, Parquet, JSONL) of "
                      "'image' (or 'path', relative to the table) and 'label' columns")  # fmt: skip
    test.add_argument("--probe", required=True, help="a probe from 'classify fit'")
    test.add_argument("--out-dir", default=None, help="write metrics.json, confusion.csv and confusion.png here")
    test.add_argument("--model", default=None, help="the backbone (default: the one the probe was fitted on)")
    _add_scene_label_options(test, fitting=False)
    scene = sub.add_parser("map", help="classify georeferenced scenes tile by tile: a class map of tiles (GeoTIFF, "
                           "GeoPackage, quick-look)",
                           description="Cut each scene into a grid of tiles from its origin (by default of the probe's "
                           "training chip size, in scene pixels), classify each tile as a chip, and write "
                           "OUT/<stem>_tile_classes.tif (one pixel per tile, 255 = not classified), <stem>_tiles.gpkg "
                           "(a polygon per tile with class, score and p_<class>) and <stem>_tile_quicklook.png.")  # fmt: skip
    scene.add_argument("scenes", nargs="+", help="georeferenced scenes (GeoTIFF or anything GDAL reads)")
    scene.add_argument("--probe", required=True, help="a probe from 'classify fit'")
    scene.add_argument("-o", "--out-dir", required=True, help="folder for the outputs (created)")
    scene.add_argument("--tile-size", type=int, default=None, help="tile side in scene pixels (default: the probe's "
                       "training chip size; choose it so a tile covers the ground a training chip covered)")  # fmt: skip
    scene.add_argument("--stride", type=int, default=None, help="a finer map: cells of STRIDE scene pixels, each "
                       "classified by the tile centred on it (default: the tile size, one tile per cell)")  # fmt: skip
    scene.add_argument("--min-valid", type=float, default=0.5, help="share of a tile's pixels that must hold data for "
                       "it to be classified (default 0.5; tiles past the scene's edge are padded as no data)")  # fmt: skip
    scene.add_argument("--bands", type=int, nargs="+", default=None, help="1-based scene bands fed to the backbone "
                       "(default: the probe's chip bands, else all)")  # fmt: skip
    scene.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat L1 collar)")
    scene.add_argument("--quicklook-bands", type=int, nargs="+", default=None, help="bands shown as red, green, blue "
                       "in the quick-look (default: the bands classified, else 1 2 3)")  # fmt: skip
    scene.add_argument("--min-score", type=float, default=None, help="map a tile whose most probable class has a lower "
                       "probability as 'unknown' (an extra class): land the probe was not taught is flagged")  # fmt: skip
    scene.add_argument("--probabilities", action="store_true", help="also write <stem>_tile_probabilities.tif, one "
                       "float32 band per class")  # fmt: skip
    scene.add_argument("--model", default=None, help="the backbone (default: the one the probe was fitted on)")
    for p in (fit, test):
        p.add_argument("--label-separator", default=";", help="multi-label: what joins a chip's classes in a text "
                       "label cell (default ';')")  # fmt: skip
    for p in (predict, test, scene):
        p.add_argument("--tta", choices=("flips", "d4"), default=None, help="test-time augmentation: the mean of the "
                       "class probabilities of the flipped (flips: 4 views) or flipped and quarter-turned (d4: 8) chips; "
                       "one model call per view")  # fmt: skip
    for p in (predict, test):
        p.add_argument("--threshold", type=float, default=None, help="multi-label probe: the probability a class "
                       "needs to be predicted (default: the probe's)")  # fmt: skip
    for p in (fit, predict, test, scene):
        p.add_argument("--batch-size", type=int, default=32)
        p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
        p.add_argument("--bf16", action="store_true", help="bf16 autocast for the backbone")
        p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(list(argv))
    try:
        {"fit": _fit, "predict": _predict, "test": _test, "map": _map}[args.action](args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _add_scene_label_options(parser: Any, *, fitting: bool) -> None:
    """``--scenes`` and how their tiles are labelled: a probe fitted (or scored) on the tiles of scenes that polygons
    or a label raster (``--labels``) label, no chips cut (:mod:`~dinov3_eo.tasks.tile_probe`)."""
    group = parser.add_argument_group("tiles of scenes labelled by polygons or a label raster (instead of chips)")
    group.add_argument("--scenes", nargs="+", default=None, help="georeferenced scenes: their tiles (the grid 'classify "
                       "map' classifies) are labelled by --labels, polygons (GeoPackage, GeoJSON, shapefile ...) or a "
                       "label raster of class ids, in any CRS" + ("; --val-labels: held-out ones" if fitting else ""))  # fmt: skip
    group.add_argument("--tile-size", type=int, default=None, help="tile side in scene pixels" + (
        " (required with --scenes)" if fitting else " (default: the probe's)"))  # fmt: skip
    group.add_argument("--attribute", default="name", help="the polygons' class column (default 'name')")
    group.add_argument("--class-names", nargs="+", default=None, help="names of a label raster's ids 0, 1, ... "
                       "(default: its class_names tag, else 'class <id>')")  # fmt: skip
    group.add_argument("--purity", type=float, default=0.6, help="a tile takes its most common class where that class "
                       "covers this share of its labelled pixels (default 0.6); mixed tiles are left out")  # fmt: skip
    group.add_argument("--presence", type=float, default=0.1, help="multi-label: a tile carries every class covering "
                       "this share of its labelled pixels (default 0.1)")  # fmt: skip
    group.add_argument("--min-labelled", type=float, default=0.5, help="share of a tile's pixels that must be labelled "
                       "(default 0.5)")  # fmt: skip
    group.add_argument("--min-valid", type=float, default=0.9, help="share of a tile's pixels that must hold data "
                       "(default 0.9)")  # fmt: skip
    if fitting:
        group.add_argument("--block", type=int, default=4, help="held-out tiles are whole blocks of BLOCK x BLOCK tiles "
                           "(default 4), --val-fraction of them: neighbouring tiles look alike, and a random split "
                           "would score the probe too kindly")  # fmt: skip
    else:
        group.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat "
                           "L1 collar)")  # fmt: skip


def _chip_labels(args: Any, chips: Sequence[str], table: str | None, multi_label: bool) -> tuple[list[str], list[Any]]:
    """Chips and their labels (class names; class-name lists for a multi-label probe)."""
    if not multi_label:
        return labelled_chips(chips, table)
    if chips or not table:
        raise ValueError("Multi-label chips come from a label table (--labels, and --val-labels for held-out chips): "
                         "class folders give one class per chip.")  # fmt: skip
    return table_multilabels(table, args.label_separator)


def _fit(args: Any) -> None:
    if Path(args.output).suffix.lower() != ".safetensors":
        raise ValueError(f"The probe is written as .safetensors, not {args.output!r}.")
    held_given = args.val is not None or args.val_labels is not None
    if not 0.0 < args.val_fraction < 1.0 and not held_given:
        raise ValueError(f"--val-fraction must lie between 0 and 1, got {args.val_fraction}.")
    if args.multi_label and args.val is not None:
        raise ValueError("Multi-label held-out chips come from a table (--val-labels), not --val folders.")
    check_overwrite(args.output, args.overwrite)
    if args.finetune_epochs > 0:
        if args.method != "linear":
            raise ValueError("Only a linear probe can be fine-tuned with its backbone (--method linear), not a k-NN.")
        if not args.size:
            raise ValueError("Fine-tuning batches chips at one size: give --size (e.g. 224), not 0.")
        prefix = Path(args.output).with_suffix("")
        check_overwrite(prefix.with_name(f"{prefix.name}_backbone.pth"), args.overwrite)
    if args.scenes:
        from dinov3_eo.tasks.tile_probe import fit_scenes_command

        return fit_scenes_command(args)
    size, multi = args.size or None, args.multi_label
    paths, labels = _chip_labels(args, args.chips, args.labels, multi)
    if held_given:
        val_paths, val_labels = _chip_labels(args, args.val or [], args.val_labels, multi)
        unknown = sorted(set(_flat(val_labels, multi)) - set(_flat(labels, multi)))
        if unknown:
            raise ValueError(f"Held-out chips of classes {unknown} (folder names, or labels) have no training chip.")
        train_idx = np.arange(len(paths))
    elif multi:  # no stratification for label sets: a seeded random share
        order = np.random.default_rng(args.seed).permutation(len(paths))
        n_held = min(max(1, int(round(args.val_fraction * len(paths)))), len(paths) - 1)
        train_idx, val_idx = np.sort(order[n_held:]), np.sort(order[:n_held])
    else:
        train_idx, val_idx = stratified_split(labels, args.val_fraction, args.seed)
    classes = sorted(set(_flat(labels, multi)))
    if multi and not classes:
        raise ValueError(f"The chips of {args.labels} carry no class.")
    if not multi and len(classes) < 2:
        raise ValueError(f"The chips of {args.labels or args.chips} hold {len(classes)} class ({classes}); a classifier "
                         "needs at least two (one folder, or one label, per class).")  # fmt: skip
    embedded_of, backbone, made = _embedder(args, size)
    embedded = embedded_of(paths)
    target = (lambda names: label_matrix(names, classes)) if multi else (lambda names: _class_ids(names, classes))  # noqa: E731
    x, y = chip_features(embedded, args.features), target(labels)
    if held_given:
        held = embedded_of(val_paths)
        vx, vy = chip_features(held, args.features), target(val_labels)
    else:
        vx, vy = x[val_idx], y[val_idx]
    val = (vx, vy) if len(vy) else None
    probe = fit_chip_classifier(x[train_idx], y[train_idx], classes, method=args.method, features=args.features,
                                val=val, k=args.k, threshold=args.threshold, balanced=args.balanced)  # fmt: skip
    probe.embedding = {**made, "backbone": embedded.metadata.get("backbone"), "chip_size": typical_chip_size(embedded.sizes)}
    kind = f"{'multi-label ' if multi else ''}{args.method}"
    print(f"{kind} probe on {len(train_idx)} chips of {len(classes)} classes"
          f"{f' (C = {probe.c:g})' if probe.c is not None else ''}; {len(vy)} held-out chips:")
    scores = probe.scores(vx) if len(vy) else None
    if args.finetune_epochs > 0:
        if len(vy):
            print_probe_report(probe, scores, vy, None)
        held_paths = val_paths if held_given else [paths[i] for i in val_idx]
        probe, scores = finetune_and_export(args, backbone(), probe, [paths[i] for i in train_idx], y[train_idx],
                                            held_paths, vy)  # fmt: skip
    if len(vy):
        report = print_probe_report(probe, scores, vy, Path(args.out_dir) if args.out_dir else None)
        probe.held_out_accuracy = report["map_macro" if multi else "overall_accuracy"]
    probe.save(args.output, overwrite=args.overwrite)
    Path(f"{args.output}.finetune.ckpt").unlink(missing_ok=True)  # the probe is saved: the checkpoint has served
    print(args.output)


def _embedder(args: Any, size: int | None) -> tuple[Any, Any, dict[str, Any]]:
    """How ``classify fit`` gets its chips' embeddings: ``(embeddings of paths, in their order; the backbone, loaded
    on first call; how the chips are embedded, for the probe)``, from ``--embeddings`` (a table of ``embed --chips``,
    whose backbone, size, bands and normalisation then hold) or by embedding them with ``--model``.

    Raises:
        ValueError: neither given, or (when called) a chip the table lacks.
    """
    from functools import cache

    from dinov3_eo.tasks.chip_embeddings import read_chip_embeddings

    if args.embeddings is None and args.model is None:
        raise ValueError("Give the backbone that embeds the chips (--model), or a table of their embeddings (--embeddings).")
    table = read_chip_embeddings(args.embeddings) if args.embeddings is not None else None
    info = table.metadata if table is not None else {}
    source = args.model or info.get("backbone_source")
    if source is None:
        raise ValueError(f"{args.embeddings} does not record its backbone; pass --model.")
    normalization = info.get("normalization_override") if table is not None else args.normalization
    made = {"backbone_source": os.path.abspath(source) if Path(source).exists() else source, "size": info.get("size", size),
            "bands": info.get("bands", args.bands), "normalization": normalization}  # fmt: skip

    @cache
    def backbone() -> Any:
        return load_chip_backbone(source, normalization=normalization, device=args.device)

    def embedded_of(paths: Sequence[str]) -> Any:
        if table is None:  # chips embedded in sorted order; rows taken back in the labels' order
            return embed_chips_with(backbone(), paths, bands=args.bands, size=size, batch_size=args.batch_size,
                                    amp=args.bf16, progress=not args.quiet).take(paths)  # fmt: skip
        try:
            return table.take(paths)
        except KeyError:
            missing = next(p for p in paths if os.path.abspath(p) not in {os.path.abspath(q) for q in table.paths})
            raise ValueError(f"Chip {missing} is not in the embedding table {args.embeddings}; embed every labelled chip "
                             "('embed --chips') or leave --embeddings out.") from None  # fmt: skip

    if table is None:
        backbone()  # a bad --model stops here, before any chip is read
    return embedded_of, backbone, made


def _kept_epoch(history: Sequence[dict[str, float]]) -> int:
    """The epoch whose weights fine-tuning kept: the first with the best held-out score (0: the probe as fitted), or
    the last without held-out chips."""
    scored = [row for row in history if "held_out" in row]
    return int(max(scored, key=lambda row: (row["held_out"], -row["epoch"]))["epoch"]) if scored else int(history[-1]["epoch"])


def finetune_and_export(args: Any, backbone: Any, probe: ChipClassifier, train: Any, y: np.ndarray, held: Any,
                        held_y: np.ndarray, *, unit: str = "chips") -> tuple[ChipClassifier, np.ndarray | None]:  # fmt: skip
    """``classify fit --finetune-epochs``: LP-FT (:mod:`~dinov3_eo.tasks.chip_finetune`), the probe and its backbone
    trained together on ``train`` (chip paths, or a dataset of tiles) with targets ``y``, the best epoch on ``held``
    kept, the backbone exported beside the probe (``<probe>_backbone.pth``) and recorded as its source; prints which
    epoch was kept and returns the probe and its held-out probabilities (``None`` without held-out items)."""
    from dinov3_eo.models.hub import export_backbone
    from dinov3_eo.tasks.chip_finetune import FinetuneSettings, chip_dataset, dataset_probabilities, finetune_chip_classifier

    settings = FinetuneSettings(epochs=args.finetune_epochs, lr=args.finetune_lr, head_lr=args.finetune_head_lr,
                                blocks=args.finetune_blocks, batch_size=args.batch_size, workers=args.workers,
                                balanced=args.balanced, seed=args.seed, amp=args.bf16)  # fmt: skip
    tuned, model, history = finetune_chip_classifier(backbone, probe, train, y, val=(held, held_y) if len(held_y) else None,
                                                     settings=settings, checkpoint=f"{args.output}.finetune.ckpt",
                                                     progress=not args.quiet)  # fmt: skip
    meta = dataclasses.replace(model.meta) if getattr(model, "meta", None) is not None else None
    if meta is not None and backbone.normalization is not None:
        meta.normalization = backbone.normalization.to_dict()  # what it was tuned with, an override included
    prefix = Path(args.output).with_suffix("")
    exported = export_backbone(model, prefix.with_name(f"{prefix.name}_backbone"), meta=meta)["pth"]
    kept = _kept_epoch(history)
    tuned.embedding = {**probe.embedding, "backbone_source": str(Path(exported).resolve()), "normalization": None,
                       "finetuned_from": probe.embedding.get("backbone_source"),
                       "finetune": {**dataclasses.asdict(settings), "history": history, "kept_epoch": kept}}  # fmt: skip
    scores = None
    if len(held_y):
        dataset = chip_dataset(held, held_y, patch_size=int(model.patch_size), normalization=backbone.normalization,
                               bands=probe.embedding.get("bands"), size=int(probe.embedding["size"]))  # fmt: skip
        scores = dataset_probabilities(backbone._replace(model=model), tuned, dataset, batch_size=args.batch_size,
                                       workers=args.workers, amp=args.bf16)  # fmt: skip
    print(f"fine-tuned {args.finetune_epochs} epochs, kept epoch {kept}{' (the probe as fitted)' if kept == 0 else ''}"
          f"; {len(held_y)} held-out {unit}:")
    return tuned, scores


def _flat(labels: Sequence[Any], multi_label: bool) -> list[str]:
    return [name for names in labels for name in names] if multi_label else list(labels)


def _probe_scores(args: Any, paths: Sequence[str]) -> tuple[ChipClassifier, np.ndarray]:
    """The probe ``args.probe`` and its class probabilities ``[N, K]`` for ``paths``, embedded as it was fitted (with
    ``--tta``, the mean of the probabilities of each turned and mirrored view)."""
    from dinov3_eo.inference.tta import tta_views

    probe = ChipClassifier.load(args.probe)
    info = probe.embedding
    backbone = probe_backbone(probe, args.model, device=args.device)
    views = tta_views(args.tta) if args.tta else (0,)
    # each chip is read once, its views embedded from the same prepared pixels
    embedded = embed_chip_views(backbone.model, paths, views=views, normalization=backbone.normalization,
                                bands=info.get("bands"), size=info.get("size"), batch_size=args.batch_size,
                                device=backbone.device, amp=args.bf16, progress=not args.quiet)  # fmt: skip
    scores = sum(probe.scores(chip_features(view.take(paths), probe.features)) for view in embedded) / len(views)
    return probe, scores


def _test(args: Any) -> None:
    if args.out_dir is not None and Path(args.out_dir).is_dir():
        for name in ("metrics.json", "confusion.csv", "confusion.png", "per_class.csv"):
            check_overwrite(Path(args.out_dir) / name, args.overwrite)
    if args.scenes:
        from dinov3_eo.tasks.tile_probe import test_scenes_command

        return test_scenes_command(args)
    loaded = ChipClassifier.load(args.probe)
    classes, multi = loaded.classes, loaded.multi_label
    paths, labels = _chip_labels(args, args.chips, args.labels, multi)
    unknown = sorted(set(_flat(labels, multi)) - set(classes))
    if unknown:
        raise ValueError(f"Test chips of classes {unknown} (folder names, or labels) are not classes of the probe "
                         f"{args.probe} ({classes}).")  # fmt: skip
    probe, scores = _probe_scores(args, paths)
    print(f"{'multi-label ' if multi else ''}{probe.method} probe on {len(paths)} test chips:")
    y = label_matrix(labels, classes) if multi else _class_ids(labels, classes)
    print_probe_report(probe, scores, y, Path(args.out_dir) if args.out_dir else None, threshold=args.threshold)


def _predict(args: Any) -> None:
    from dinov3_eo.data.datasets import expand_chips

    check_overwrite(args.output, args.overwrite)
    paths = expand_chips(args.chips)
    probe, scores = _probe_scores(args, paths)
    threshold = (probe.threshold if args.threshold is None else args.threshold) if probe.multi_label else None
    if Path(args.output).suffix.lower() in VECTOR_SUFFIXES:
        write_prediction_map(args.output, paths, scores, probe.classes, threshold=threshold, overwrite=args.overwrite)
    else:
        write_predictions(args.output, paths, scores, probe.classes, threshold=threshold, overwrite=args.overwrite)
    if probe.multi_label:
        counts = (scores >= threshold).sum(axis=0)
    else:
        counts = np.bincount(scores.argmax(1), minlength=len(probe.classes))
    print(", ".join(f"{name} {n}" for name, n in zip(probe.classes, counts) if n))
    print(args.output)


def _map(args: Any) -> None:
    from dinov3_eo.data.raster import pixel_area_ha
    from dinov3_eo.inference.writers import check_distinct_stems
    from dinov3_eo.tasks.tile_classification import classify_tiles, tile_outputs, write_tile_classes

    check_distinct_stems(args.scenes)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for scene in args.scenes:  # every output is checked before the first scene is classified
        for path in tile_outputs(scene, args.out_dir, probabilities=args.probabilities):
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=args.scenes)
    probe = ChipClassifier.load(args.probe)
    backbone = probe_backbone(probe, args.model, device=args.device)
    for scene in args.scenes:
        result = classify_tiles(scene, probe, backbone=backbone, tile_size=args.tile_size, stride=args.stride, bands=args.bands,
                                nodata=args.nodata, min_valid=args.min_valid, batch_size=args.batch_size, tta=args.tta,
                                min_score=args.min_score,
                                amp=args.bf16, progress=not args.quiet)  # fmt: skip
        outputs = write_tile_classes(result, args.out_dir, probabilities=args.probabilities, nodata=args.nodata,
                                     quicklook_bands=args.quicklook_bands, overwrite=args.overwrite)  # fmt: skip
        ids = result.class_ids()
        counts = np.bincount(ids[result.classified].ravel(), minlength=len(result.class_names))
        cells = f"{result.tile_size}-px tiles" if result.stride == result.tile_size else f"{result.stride}-px cells"
        hectares = pixel_area_ha(result.crs, result.transform)  # None for a CRS in degrees
        area = (lambda n: f" ({n * hectares:,.0f} ha)") if hectares else (lambda n: "")  # noqa: E731
        print(f"{Path(scene).name}: {int(result.classified.sum())} of {ids.size} {cells} classified: "
              + ", ".join(f"{name} {n}{area(n)}" for name, n in zip(result.class_names, counts) if n))
        print("\n".join(str(p) for p in outputs if p is not None))


__all__ = [
    "C_GRID",
    "ChipClassifier",
    "VECTOR_SUFFIXES",
    "chip_footprints",
    "FEATURES",
    "chip_features",
    "classify_main",
    "finetune_and_export",
    "fit_chip_classifier",
    "held_out_score",
    "probe_backbone",
    "folder_labels",
    "knn_scores",
    "label_matrix",
    "labelled_chips",
    "stratified_split",
    "table_labels",
    "table_multilabels",
    "typical_chip_size",
    "predicted_labels",
    "prediction_columns",
    "print_probe_report",
    "write_prediction_map",
    "write_predictions",
]
