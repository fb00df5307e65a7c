"""Segmentation losses over class logits and integer masks: cross-entropy, focal, soft Dice, soft Jaccard and
Lovász-softmax, and their sums (``"ce+dice"``).

Every loss here takes ``logits`` ``[B, K, H, W]`` (any float dtype; probabilities in float32, float64 for float64
logits) and ``mask`` ``[B, H, W]`` of class ids in ``0..K-1``, with ``ignore_index`` where a pixel has no label (those pixels
count nowhere: neither their logits nor their ids reach the loss or its gradient), and an optional per-class weight
``class_weight`` ``[K]``. Each returns an unweighted scalar, and each reads nothing back from the device: no
boolean indexing, no ``.item()``, so a GPU step does not wait on it. With no labelled pixel in the batch each returns
an exact 0 that still belongs to the autograd graph.

Two families, which users of class-imbalanced maps (buildings, solar panels, flooded fields: a few per cent of the
pixels) combine:

- per-pixel losses (``ce``, ``focal``) average over the labelled pixels, each weighted by its class's weight;
- per-class overlap losses (``dice``, ``jaccard``, ``lovasz``) measure each class over the whole batch at once and
  average over the classes present in the batch's labels (class-weighted), so a rare class weighs as much as a
  common one. A class absent from the batch has no overlap to score; predicting it still costs through the
  other classes' overlaps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: the loss terms a spec like ``"ce+dice"`` may join with ``+``
SEGMENTATION_LOSS_TERMS = ("ce", "focal", "dice", "jaccard", "lovasz")


#: how ``class_weights`` can be derived from the training labels' class counts (:func:`class_weights_from_counts`)
CLASS_WEIGHTINGS = ("balanced", "balanced_sqrt")


def class_weights_from_counts(counts: Sequence[float] | np.ndarray, method: str = "balanced") -> np.ndarray:
    """Per-class loss weights from the classes' labelled pixel counts ``n_k`` [K].

    * ``balanced``: ``N / (K' · n_k)`` (scikit-learn's "balanced"; N pixels, K' classes with a pixel), so every
      class weighs as much in total and the pixel-weighted mean weight is 1;
    * ``balanced_sqrt``: the square root of that, a milder boost for rare classes (a class 100× rarer weighs 10×,
      not 100×).

    Every loss of this module is a weighted mean, so only the weights' ratios matter (median-frequency weights,
    ``median(f) / f_k``, are ``balanced`` times a constant). A class without a pixel gets weight 0.

    Raises:
        ValueError: for an unknown method, negative counts, or no pixel at all.
    """
    if method not in CLASS_WEIGHTINGS:
        raise ValueError(f"class_weights_from_counts: method must be one of {CLASS_WEIGHTINGS}, got {method!r}.")
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or (n < 0).any():
        raise ValueError(f"class_weights_from_counts: counts must be [K] and >= 0, got {n.tolist()}.")
    present = n > 0
    if not present.any():
        raise ValueError("class_weights_from_counts: the labels hold no pixel of any class.")
    weights = np.zeros_like(n)
    weights[present] = n.sum() / (present.sum() * n[present])
    return np.sqrt(weights) if method == "balanced_sqrt" else weights


def parse_segmentation_loss(spec: str) -> tuple[str, ...]:
    """The terms of a loss spec: ``"ce"``, ``"focal"``, ``"ce+dice"``, ``"focal + lovasz"`` (case and spaces free).

    Raises:
        ValueError: for an empty spec, an unknown term or a term named twice.
    """
    terms = tuple(t.strip().lower() for t in str(spec).split("+"))
    unknown = [t for t in terms if t not in SEGMENTATION_LOSS_TERMS]
    if not spec or unknown:
        raise ValueError(f"segmentation loss {spec!r}: terms must be among {SEGMENTATION_LOSS_TERMS}, joined by '+' "
                         f"(e.g. 'ce+dice'); unknown: {unknown or [spec]}.")
    if len(set(terms)) != len(terms):
        raise ValueError(f"segmentation loss {spec!r} names a term twice.")
    return terms


def _at_least_float32(logits: Tensor) -> Tensor:
    """``logits`` in float32, or float64 if they are (half-precision logits from autocast are promoted)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _targets(logits: Tensor, mask: Tensor, ignore_index: int, where: str) -> tuple[Tensor, Tensor]:
    """``(target, labelled)``: ``[B, H, W]`` class ids with unlabelled pixels set to 0 (any valid class, so that
    gathers stay in range) and the bool mask of labelled pixels; checks shapes."""
    if logits.ndim != 4 or mask.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"{where}: logits must be [B, K, H, W] and mask [B, H, W], got {tuple(logits.shape)} "
                         f"and {tuple(mask.shape)}.")
    labelled = mask != ignore_index
    return mask.masked_fill(~labelled, 0).long(), labelled


def _pixel_weights(target: Tensor, labelled: Tensor, class_weight: Tensor | None) -> Tensor:
    """``[B, H, W]`` float32 weight of each pixel: its class's weight, 0 where unlabelled."""
    if class_weight is None:
        return labelled.float()
    return class_weight[target] * labelled


def _mean_over(values: Tensor, weights: Tensor) -> Tensor:
    """``Σ w·v / Σ w`` (an exact 0 when every weight is 0)."""
    return (values * weights).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


def weighted_cross_entropy(
    logits: Tensor, mask: Tensor, *, ignore_index: int = 255, class_weight: Tensor | None = None
) -> Tensor:
    """``Σ_pixels w_y · (−log softmax(logits)_y) / Σ_pixels w_y`` over labelled pixels: ``F.cross_entropy``'s
    weighted mean, computed as a sum over a count so that an all-unlabelled batch gives 0, not NaN.

    Args:
        logits: [B, K, H, W].
        mask: [B, H, W] class ids, ``ignore_index`` for unlabelled pixels.
        ignore_index: the unlabelled value.
        class_weight: [K] weights, or ``None`` for 1 each.

    Returns:
        Scalar loss.
    """
    target, labelled = _targets(logits, mask, ignore_index, "weighted_cross_entropy")
    total = F.cross_entropy(logits, mask, weight=class_weight, ignore_index=ignore_index, reduction="sum")
    count = _pixel_weights(target, labelled, class_weight).sum().to(total.dtype)
    return total / count.clamp_min(torch.finfo(total.dtype).tiny)


def focal_loss(
    logits: Tensor, mask: Tensor, *, gamma: float = 2.0, ignore_index: int = 255, class_weight: Tensor | None = None
) -> Tensor:
    """Focal loss (Lin et al. 2017, "Focal Loss for Dense Object Detection"), the class weight in place of α:
    ``Σ_pixels w_y · (1 − p_y)^γ · (−log p_y) / Σ_pixels w_y`` over labelled pixels, ``p = softmax(logits)``.

    Pixels the model already gets right with confidence (``p_y`` near 1) weigh little, so the many easy background
    pixels stop drowning the few hard ones. ``gamma = 0`` is :func:`weighted_cross_entropy`.

    Args:
        logits: [B, K, H, W].
        mask: [B, H, W] class ids, ``ignore_index`` for unlabelled pixels.
        gamma: focusing exponent γ ≥ 0 (2 in the paper).
        ignore_index: the unlabelled value.
        class_weight: [K] weights, or ``None`` for 1 each.

    Returns:
        Scalar loss.

    Raises:
        ValueError: for a negative ``gamma``.
    """
    if gamma < 0:
        raise ValueError(f"focal_loss: gamma must be >= 0, got {gamma}.")
    target, labelled = _targets(logits, mask, ignore_index, "focal_loss")
    log_p = F.log_softmax(_at_least_float32(logits), dim=1).gather(1, target[:, None])[:, 0]  # [B, H, W] log p_y
    per_pixel = -log_p
    if gamma > 0:
        # 1 − p_y as −expm1(log p_y): exact near p_y = 1, where 1 − exp() cancels; floored so that γ < 1 keeps a
        # finite gradient where the model is certain
        per_pixel = (-torch.expm1(log_p)).clamp_min(1e-12).pow(gamma) * per_pixel
    return _mean_over(per_pixel, _pixel_weights(target, labelled, class_weight))


def _class_sums(logits: Tensor, mask: Tensor, ignore_index: int, where: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(intersection, predicted, labelled)``, each ``[K]`` over the batch's labelled pixels: ``Σ p_k·[y=k]``,
    ``Σ p_k`` and ``Σ [y=k]`` with ``p = softmax(logits)`` in float32."""
    target, labelled = _targets(logits, mask, ignore_index, where)
    k = logits.shape[1]
    probs = F.softmax(_at_least_float32(logits), dim=1) * labelled[:, None]  # [B, K, H, W], 0 where unlabelled
    # one-hot by comparison, not F.one_hot (which reads the ids' range back from the device)
    onehot = (target[:, None] == torch.arange(k, device=target.device)[None, :, None, None]) & labelled[:, None]
    dims = (0, 2, 3)
    return (probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims).to(probs.dtype)


def _mean_over_present(per_class: Tensor, labelled: Tensor, class_weight: Tensor | None) -> Tensor:
    """Class-weighted mean of ``per_class`` [K] over the classes with a labelled pixel (``labelled`` [K] > 0)."""
    weights = (labelled > 0).to(per_class.dtype)
    if class_weight is not None:
        weights = weights * class_weight
    return _mean_over(per_class, weights)


def dice_loss(
    logits: Tensor, mask: Tensor, *, ignore_index: int = 255, class_weight: Tensor | None = None
) -> Tensor:
    """Soft Dice loss (Milletari et al. 2016, multi-class as in Sudre et al. 2017), per class over the batch:
    ``1 − 2 Σ p_k [y=k] / (Σ p_k + Σ [y=k])``, sums over the labelled pixels of all images, averaged over the
    classes present in ``mask`` (weighted by ``class_weight``).

    Args:
        logits: [B, K, H, W].
        mask: [B, H, W] class ids, ``ignore_index`` for unlabelled pixels.
        ignore_index: the unlabelled value.
        class_weight: [K] weights of the classes in the mean, or ``None`` for 1 each.

    Returns:
        Scalar loss in [0, 1].
    """
    inter, predicted, labelled = _class_sums(logits, mask, ignore_index, "dice_loss")
    # a present class has Σ[y=k] ≥ 1; the floor only keeps absent classes (weight 0) finite
    per_class = 1 - 2 * inter / (predicted + labelled).clamp_min(1e-12)
    return _mean_over_present(per_class, labelled, class_weight)


def jaccard_loss(
    logits: Tensor, mask: Tensor, *, ignore_index: int = 255, class_weight: Tensor | None = None
) -> Tensor:
    """Soft Jaccard (IoU) loss, per class over the batch: ``1 − I / (Σ p_k + Σ [y=k] − I)`` with
    ``I = Σ p_k [y=k]`` over the labelled pixels of all images, averaged over the classes present in ``mask``
    (weighted by ``class_weight``).

    Arguments and result (a scalar in [0, 1]) as for :func:`dice_loss`.
    """
    inter, predicted, labelled = _class_sums(logits, mask, ignore_index, "jaccard_loss")
    per_class = 1 - inter / (predicted + labelled - inter).clamp_min(1e-12)
    return _mean_over_present(per_class, labelled, class_weight)


def lovasz_softmax_loss(
    logits: Tensor, mask: Tensor, *, ignore_index: int = 255, class_weight: Tensor | None = None
) -> Tensor:
    """Lovász-softmax loss (Berman et al. 2018, "The Lovász-Softmax loss"): the Lovász extension of each class's
    Jaccard loss, a convex surrogate that equals ``1 − IoU_k`` exactly when the probabilities are one-hot, over the
    labelled pixels of the whole batch, averaged over the classes present in ``mask`` (weighted by
    ``class_weight``).

    For class k with errors ``m_i = |[y_i=k] − p_{i,k}|`` sorted in decreasing order (``π``), the loss is
    ``Σ_i m_π(i) · (Δ(π(1..i)) − Δ(π(1..i−1)))`` where ``Δ(S) = |S| / |G ∪ S|`` is the Jaccard loss of predicting
    the pixels ``S`` wrong (``G``: the class's labelled pixels). ``Δ`` of a prefix follows from running sums of the
    sorted labels: ``1 − (|G| − cumsum[y=k]) / (|G| + cumsum[y≠k])``.

    Sorts ``K × (B·H·W)`` errors: memory and time grow with the pixels of the batch, not just its logits.

    Arguments and result (a scalar in [0, 1]) as for :func:`dice_loss`.
    """
    target, labelled = _targets(logits, mask, ignore_index, "lovasz_softmax_loss")
    k = logits.shape[1]
    probs = F.softmax(_at_least_float32(logits), dim=1).permute(1, 0, 2, 3).reshape(k, -1)  # [B, K, H, W] -> [K, N]
    labelled = labelled.reshape(1, -1)  # [1, N]
    truth = (target.reshape(1, -1) == torch.arange(k, device=target.device)[:, None]) & labelled  # [K, N]
    # unlabelled pixels sort last (error −1 < every real error) and are multiplied out below: a prefix's Δ only
    # involves the pixels before it, so they change no labelled pixel's weight
    errors = torch.where(labelled, (truth.to(probs.dtype) - probs).abs(), -1.0)  # [K, N]
    errors, order = errors.sort(dim=1, descending=True)  # [K, N]
    truth_sorted = truth.gather(1, order).to(probs.dtype)  # [K, N]
    in_class = truth_sorted.sum(dim=1, keepdim=True)  # [K, 1] |G|
    jaccard = 1 - (in_class - truth_sorted.cumsum(dim=1)) / (in_class + (1 - truth_sorted).cumsum(dim=1))  # [K, N]
    steps = torch.cat([jaccard[:, :1], jaccard[:, 1:] - jaccard[:, :-1]], dim=1)  # [K, N] Δ(1..i) − Δ(1..i−1)
    labelled_sorted = labelled.expand(k, -1).gather(1, order).to(probs.dtype)  # [K, N]
    per_class = (errors * labelled_sorted * steps).sum(dim=1)  # [K]
    return _mean_over_present(per_class, in_class[:, 0], class_weight)


def segmentation_loss_terms(
    logits: Tensor,
    mask: Tensor,
    terms: tuple[str, ...],
    *,
    ignore_index: int = 255,
    class_weight: Tensor | None = None,
    focal_gamma: float = 2.0,
) -> dict[str, Tensor]:
    """Each term of a loss spec (:func:`parse_segmentation_loss`) on one batch; the caller sums them.

    Args:
        logits: [B, K, H, W].
        mask: [B, H, W] class ids, ``ignore_index`` for unlabelled pixels.
        terms: e.g. ``("ce", "dice")``.
        ignore_index: the unlabelled value.
        class_weight: [K] class weights, used by every term.
        focal_gamma: γ of the focal term.

    Returns:
        ``{term: scalar}`` in the order of ``terms``.
    """
    common = {"ignore_index": ignore_index, "class_weight": class_weight}
    out: dict[str, Tensor] = {}
    for term in terms:
        if term == "ce":
            out[term] = weighted_cross_entropy(logits, mask, **common)
        elif term == "focal":
            out[term] = focal_loss(logits, mask, gamma=focal_gamma, **common)
        elif term == "dice":
            out[term] = dice_loss(logits, mask, **common)
        elif term == "jaccard":
            out[term] = jaccard_loss(logits, mask, **common)
        elif term == "lovasz":
            out[term] = lovasz_softmax_loss(logits, mask, **common)
        else:
            raise ValueError(f"segmentation_loss_terms: unknown term {term!r}; terms are {SEGMENTATION_LOSS_TERMS}.")
    return out
