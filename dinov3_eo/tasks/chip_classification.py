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
(:mod:`~dinov3_eo.tasks.chip_finetune`); ``--embeddings`` reads chips already embedded by ``embed --chips``. The
command line itself is :mod:`~dinov3_eo.tasks.classify_cli`; this module holds the probes.
"""

from __future__ import annotations

import json
import logging
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
from dinov3_eo.inference.writers import VECTOR_FORMATS, atomic_output, check_overwrite, write_vector
from dinov3_eo.tasks.chip_embeddings import FEATURES, chip_features, load_chip_backbone

log = logging.getLogger(__name__)

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
        sets: its split-conformal prediction sets, calibrated on held-out chips or tiles (:func:`calibrate_sets`):
            ``coverage`` (0.9: the set holds the true class nine times in ten), ``threshold`` (the probability a
            class needs to join a set), ``n`` (examples calibrated on); ``None``: none (multi-label probes, or no
            held-out examples).
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
    sets: dict[str, float] | None = None

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
        arrays = {"weight": self.weight, "bias": self.bias, "bank": self.bank, "bank_labels": self.bank_labels}
        meta = {"method": self.method, "classes": self.classes, "features": self.features, "k": self.k,
                "temperature": self.temperature, "c": self.c, "embedding": self.embedding,
                "held_out_accuracy": self.held_out_accuracy, "multi_label": self.multi_label,
                "threshold": self.threshold, "balanced": self.balanced, "sets": self.sets}  # fmt: skip
        return write_tagged_safetensors(path, "dinov3_eo_classifier", arrays, meta, overwrite=overwrite)

    def prediction_sets(self, scores: np.ndarray) -> np.ndarray:
        """``[N, K]`` bool: each example's conformal prediction set from its class probabilities ``scores``
        (:attr:`sets`).

        Raises:
            ValueError: the probe has no prediction sets.
        """
        from dinov3_eo.tasks.conformal import prediction_sets

        if self.sets is None:
            raise ValueError("This probe has no prediction sets: fit it with held-out chips or tiles (a single-label "
                             "probe; at least 9 for 90 %) and --coverage.")  # fmt: skip
        return prediction_sets(scores, self.sets["threshold"])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ChipClassifier:
        """A probe :meth:`save` wrote.

        Raises:
            FileNotFoundError: no such file. ValueError: not a safetensors file, or not a chip classifier's.
        """
        info, arrays = read_tagged_safetensors(path, "dinov3_eo_classifier", what="chip classifier",
                                               made_by="dinov3-eo classify fit")  # fmt: skip
        needed = ("weight", "bias") if info["method"] == "linear" else ("bank", "bank_labels")
        missing = [name for name in needed if name not in arrays]
        if missing:
            raise ValueError(f"Chip classifier {str(path)!r} lacks the tensors {missing} of a {info['method']} probe.")
        return cls(method=info["method"], classes=list(info["classes"]), features=info["features"], k=int(info["k"]),
                   temperature=float(info["temperature"]), c=info.get("c"), embedding=dict(info.get("embedding", {})),
                   held_out_accuracy=info.get("held_out_accuracy"), multi_label=bool(info.get("multi_label", False)),
                   threshold=float(info.get("threshold", 0.5)), balanced=bool(info.get("balanced", False)),
                   sets=info.get("sets"),
                   **{name: arrays.get(name) for name in ("weight", "bias", "bank", "bank_labels")})  # fmt: skip


def write_tagged_safetensors(path: str | os.PathLike[str], key: str, arrays: dict[str, np.ndarray | None],
                             meta: dict[str, Any], *, overwrite: bool = False) -> Path:  # fmt: skip
    """``arrays`` (those not ``None``) as safetensors with ``meta`` as JSON under ``key`` in its metadata, written
    atomically: what :func:`read_tagged_safetensors` reads.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    import torch
    from safetensors.torch import save_file

    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in arrays.items() if a is not None}
    with atomic_output(path, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp), metadata={key: json.dumps(meta)})
    return Path(path)


def read_tagged_safetensors(path: str | os.PathLike[str], key: str, *, what: str,
                            made_by: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """``(metadata, arrays)`` of a safetensors file whose JSON metadata is stored under ``key`` (a probe's, a
    regressor's): no pickle, so a file from anywhere loads safely.

    Raises:
        FileNotFoundError: no such file. ValueError: not a safetensors file, or one without ``key`` (naming the
        ``what`` expected and the command, ``made_by``, that writes one).
    """
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"{what[0].upper() + what[1:]} {str(path)!r} does not exist.")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = (f.metadata() or {}).get(key)
            arrays = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise ValueError(f"{str(path)!r} is not a safetensors file: {e}") from e
    if meta is None:
        raise ValueError(f"{str(path)!r} is a safetensors file but not a {what} (no {key} metadata); '{made_by}' "
                         "writes those.")  # fmt: skip
    return json.loads(meta), arrays


#: the coverage of the prediction sets ``classify fit`` calibrates by default
SET_COVERAGE = 0.9


def calibrate_sets(probe: ChipClassifier, scores: np.ndarray, targets: np.ndarray,
                   coverage: float = SET_COVERAGE) -> ChipClassifier:  # fmt: skip
    """``probe`` with split-conformal prediction sets (:attr:`ChipClassifier.sets`) calibrated on held-out examples
    it did not train on: their class probabilities ``scores`` ``[N, K]`` and class ids ``targets`` ``[N]``
    (:func:`~dinov3_eo.tasks.conformal.class_set_threshold`). A new example like them has its class in its set with
    probability ``coverage`` at least. A multi-label probe, or too few examples, gets none (the latter with a
    warning).
    """
    from dinov3_eo.tasks.conformal import calibration_needed, class_set_threshold

    if probe.multi_label:
        probe.sets = None
        return probe
    threshold = class_set_threshold(scores, targets, coverage)
    if not np.isfinite(threshold):
        log.warning("%d held-out examples cannot calibrate %.0f %% prediction sets (%d are needed): the probe is saved "
                    "without them.", len(targets), 100 * coverage, calibration_needed(coverage))  # fmt: skip
        probe.sets = None
        return probe
    probe.sets = {"coverage": float(coverage), "threshold": float(threshold), "n": int(len(targets))}
    return probe


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
VECTOR_SUFFIXES = VECTOR_FORMATS


def write_prediction_map(dst: str | os.PathLike[str], paths: Sequence[str], scores: np.ndarray, classes: Sequence[str],
                         *, threshold: float | None = None, set_threshold: float | None = None, crs: Any = None,
                         overwrite: bool = False) -> Any:  # fmt: skip
    """:func:`write_predictions`' columns on each georeferenced chip's footprint (:func:`chip_footprints`), as a
    GeoPackage (layer ``predictions``) or GeoJSON (by ``dst``'s suffix), written atomically; returns the
    ``GeoDataFrame``."""
    import geopandas as gpd

    suffix = Path(dst).suffix.lower()
    if suffix not in VECTOR_SUFFIXES:
        raise ValueError(f"Chip predictions on a map are written as {' or '.join(VECTOR_SUFFIXES)}, not {str(dst)!r}.")
    check_overwrite(dst, overwrite)
    frame = gpd.GeoDataFrame(prediction_columns(paths, scores, classes, threshold=threshold,
                                                set_threshold=set_threshold),
                             geometry=chip_footprints(paths, crs))  # fmt: skip
    write_vector(frame, dst, layer="predictions", overwrite=overwrite)
    return frame


def probe_backbone(probe: ChipClassifier, source: str | os.PathLike[str] | None = None, *,
                   device: str | None = None) -> Any:
    """The backbone that embeds chips for ``probe``: ``source`` (``--model``), else the one it was fitted on, with
    the normalisation it recorded (:func:`~dinov3_eo.tasks.chip_embeddings.load_chip_backbone`); for a zero-shot
    probe (:func:`zero_shot_classifier`), the image side of its text model.

    Raises:
        ValueError: no ``source`` and the probe records none.
    """
    source = source or probe.embedding.get("backbone_source")
    if source is None:
        raise ValueError("The probe does not record the backbone it was fitted on; give it (--model).")
    if probe.embedding.get("encoder") == "text":
        return text_image_backbone(source, normalization=probe.embedding.get("normalization"), device=device)
    return load_chip_backbone(source, normalization=probe.embedding.get("normalization"), device=device)


def text_image_backbone(source: str | os.PathLike[str], *, normalization: str | None = None,
                        device: str | None = None) -> Any:
    """A text model's image side (:class:`~dinov3_eo.models.text.TextImageEncoder`) as a
    :class:`~dinov3_eo.tasks.chip_embeddings.ChipBackbone`: chips embedded through it are what its text embeddings
    were aligned with.

    Raises:
        FileNotFoundError, ValueError: as :func:`~dinov3_eo.tasks.openvocab.load_text_model`; ValueError also where
        no normalisation is known.
    """
    import torch

    from dinov3_eo.models.text import TextImageEncoder
    from dinov3_eo.tasks.chip_embeddings import ChipBackbone
    from dinov3_eo.tasks.features import input_normalization
    from dinov3_eo.tasks.openvocab import load_text_model

    model, meta, _ = load_text_model(source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    encoder = TextImageEncoder(model, meta).to(device).eval()
    return ChipBackbone(encoder, input_normalization(meta, normalization), device, os.path.abspath(source), normalization)


def zero_shot_classifier(text_model: str | os.PathLike[str], classes: Sequence[str], *,
                         templates: str | os.PathLike[str] | Sequence[str] | None = None, size: int | None = 224,
                         tile_size: int | None = None, normalization: str | None = None) -> ChipClassifier:  # fmt: skip
    """A probe that names chips (and a scene's tiles) from text, without a labelled chip: dino.txt's zero-shot
    classification. Each class's text embedding (prompt-ensembled over ``templates``, default the model's) is a row
    of a linear layer scaled by the model's ``exp(logit_scale)``, on the image embedding of the text model's image
    side (features ``"image"``: its class token and mean patch token, normalised together), so the softmax of
    :meth:`ChipClassifier.scores` is the zero-shot probability of each class; ``classify predict``, ``test`` and
    ``map`` take the probe as any other.

    Args:
        text_model: a ``text fit`` checkpoint or exported text model.
        classes: the class names, as free text (``"solar farm"``).
        size: the model input size chips are resized to (``None``: each chip's own).
        tile_size: the tile side ``classify map`` cuts a scene into by default (recorded as the probe's chip size).
        normalization: a preset overriding the text model's input normalisation.

    Raises:
        ValueError: no class, a class given twice, or as :func:`~dinov3_eo.tasks.openvocab.load_text_model`.
    """
    import torch

    from dinov3_eo.tasks.openvocab import load_text_model
    from dinov3_eo.tasks.prompts import REMOTE_SENSING_TEMPLATES, load_templates

    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"A zero-shot probe needs distinct class names, got {names}.")
    model, meta, text_meta = load_text_model(text_model)
    temps = load_templates(templates) if templates is not None else tuple(text_meta.get("templates") or REMOTE_SENSING_TEMPLATES)
    with torch.no_grad():
        weight = model.text_embeddings_for_classes(names, temps, part="full") * model.logit_scale.exp()  # [K, 2D]
    embedding = {"backbone_source": os.path.abspath(text_model), "encoder": "text", "size": size, "bands": None,
                 "normalization": normalization, "backbone": getattr(meta, "name", None), "templates": list(temps),
                 "chip_size": [int(tile_size)] * 2 if tile_size else None}  # fmt: skip
    return ChipClassifier(method="linear", classes=names, features="image", weight=weight.numpy().astype(np.float32),
                          bias=np.zeros(len(names), np.float32), embedding=embedding)  # fmt: skip


def typical_chip_size(sizes: np.ndarray) -> list[int]:
    """The most common ``[height, width]`` of ``[N, 2]`` chip sizes (the smallest on a tie): the tile size
    ``classify map`` cuts a scene into by default."""
    values, counts = np.unique(np.asarray(sizes, np.int64).reshape(-1, 2), axis=0, return_counts=True)
    return [int(v) for v in values[int(np.argmax(counts))]]


def typical_chip_ground(paths: Sequence[str], chip_side: int, *, sample: int = 32) -> float | None:
    """The ground side in metres of a ``chip_side``-px chip, from the pixel size of (up to ``sample`` of) the chips
    where every one read is georeferenced in a projected CRS and they agree within 1 %, else ``None`` (JPEG chips,
    degrees, mixed resolutions): what lets ``classify map`` cut tiles of the same ground from a scene of another
    pixel size (:func:`~dinov3_eo.tasks.tile_classification.probe_tile_size`)."""
    from dinov3_eo.data.raster import is_georeferenced, open_quietly, pixel_size_m

    import rasterio

    pixels = []
    for path in list(paths)[:sample]:
        try:
            with open_quietly(path) as src:
                pixel = pixel_size_m(src.crs, src.transform) if is_georeferenced(src) else None
        except rasterio.errors.RasterioIOError:  # a chip known only from its embedding table: no ground size
            return None
        if pixel is None:
            return None
        pixels.append(pixel)
    if not pixels or max(pixels) > 1.01 * min(pixels):
        return None
    return float(np.median(pixels) * chip_side)


def prediction_columns(paths: Sequence[str], scores: np.ndarray, classes: Sequence[str], *,
                       threshold: float | None = None, set_threshold: float | None = None) -> dict[str, Any]:  # fmt: skip
    """The columns of ``classify predict``'s outputs: ``path``, ``class`` (the most probable) and ``score`` (its
    probability), then ``p_<class>`` per class; with a ``threshold`` (a multi-label probe) ``labels``, the classes of
    probability at least ``threshold`` joined by ``;`` (:func:`predicted_labels`), replaces ``class`` and ``score``;
    with a ``set_threshold`` (a probe's conformal prediction sets, :attr:`ChipClassifier.sets`) ``set``, the classes
    of its set joined by ``;`` (empty: none), and ``set_size`` follow ``score``."""
    scores = np.asarray(scores)
    columns: dict[str, Any] = {"path": list(paths)}
    if threshold is not None:
        columns["labels"] = predicted_labels(scores, classes, threshold)
    else:
        best = scores.argmax(1)
        columns.update({"class": [classes[i] for i in best], "score": scores[np.arange(len(best)), best]})
        if set_threshold is not None:
            from dinov3_eo.tasks.conformal import prediction_sets

            columns["set"] = predicted_labels(scores, classes, set_threshold)
            columns["set_size"] = prediction_sets(scores, set_threshold).sum(axis=1)
    columns.update({f"p_{name}": scores[:, k] for k, name in enumerate(classes)})
    return columns


def predicted_labels(scores: np.ndarray, classes: Sequence[str], threshold: float) -> list[str]:
    """Per row of ``scores`` ``[N, K]``, the classes of probability at least ``threshold``, joined by ``;``."""
    return [";".join(name for name, v in zip(classes, row) if v >= threshold) for row in scores]


def write_predictions(dst: str | os.PathLike[str], paths: Sequence[str], scores: np.ndarray, classes: Sequence[str], *,
                      threshold: float | None = None, set_threshold: float | None = None,
                      overwrite: bool = False) -> Path:  # fmt: skip
    """:func:`prediction_columns` as a CSV, one row per chip (probabilities to 6 decimals), written atomically."""
    import csv

    columns = prediction_columns(paths, scores, classes, threshold=threshold, set_threshold=set_threshold)
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


__all__ = [
    "C_GRID",
    "SET_COVERAGE",
    "ChipClassifier",
    "calibrate_sets",
    "VECTOR_SUFFIXES",
    "chip_footprints",
    "FEATURES",
    "chip_features",
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
    "typical_chip_ground",
    "typical_chip_size",
    "predicted_labels",
    "prediction_columns",
    "write_prediction_map",
    "write_predictions",
    "text_image_backbone",
    "zero_shot_classifier",
]
