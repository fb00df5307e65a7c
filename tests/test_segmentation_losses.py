"""Segmentation losses against slow references written straight from their formulas (Python loops over pixels and
sets), and their invariants: ignored pixels count nowhere, an empty batch gives 0, Lovász equals 1 − IoU at one-hot
probabilities, focal with γ = 0 is the cross-entropy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dinov3_eo.losses.segmentation import (
    SEGMENTATION_LOSS_TERMS,
    dice_loss,
    focal_loss,
    jaccard_loss,
    lovasz_softmax_loss,
    parse_segmentation_loss,
    segmentation_loss_terms,
    weighted_cross_entropy,
)

IGNORE = 255
LOSSES = {
    "ce": weighted_cross_entropy,
    "focal": focal_loss,
    "dice": dice_loss,
    "jaccard": jaccard_loss,
    "lovasz": lovasz_softmax_loss,
}


def _batch(seed: int = 0, b: int = 2, k: int = 4, h: int = 5, w: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Double logits and a mask with unlabelled pixels and one class (k−1) absent."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, generator=g, dtype=torch.float64) * 2
    mask = torch.randint(0, k - 1, (b, h, w), generator=g)
    mask[torch.rand(b, h, w, generator=g) < 0.2] = IGNORE
    return logits, mask


def _pixels(logits: torch.Tensor, mask: torch.Tensor) -> list[tuple[list[float], int]]:
    """Every labelled pixel as (its softmax probabilities, its class)."""
    probs = torch.softmax(logits, dim=1)
    out = []
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            for j in range(mask.shape[2]):
                if int(mask[b, i, j]) != IGNORE:
                    out.append((probs[b, :, i, j].tolist(), int(mask[b, i, j])))
    return out


def _naive_focal(logits, mask, gamma, weights) -> float:
    num = den = 0.0
    for p, y in _pixels(logits, mask):
        num += weights[y] * (1 - p[y]) ** gamma * -math.log(p[y])
        den += weights[y]
    return num / den


def _naive_overlap(logits, mask, weights, kind: str) -> float:
    k = logits.shape[1]
    pixels = _pixels(logits, mask)
    num = den = 0.0
    for c in range(k):
        inter = sum(p[c] for p, y in pixels if y == c)
        predicted = sum(p[c] for p, _ in pixels)
        labelled = sum(1 for _, y in pixels if y == c)
        if labelled == 0:
            continue
        if kind == "dice":
            loss = 1 - 2 * inter / (predicted + labelled)
        else:
            loss = 1 - inter / (predicted + labelled - inter)
        num += weights[c] * loss
        den += weights[c]
    return num / den


def _naive_lovasz(logits, mask, weights) -> float:
    """The Lovász extension from its definition: sort the errors, and weigh each by the growth of the Jaccard loss
    Δ(S) = |S| / |G ∪ S| of the set S of pixels predicted wrong so far (sets, not running sums)."""
    k = logits.shape[1]
    pixels = _pixels(logits, mask)
    num = den = 0.0
    for c in range(k):
        truth = {i for i, (_, y) in enumerate(pixels) if y == c}
        if not truth:
            continue
        errors = [abs((1.0 if y == c else 0.0) - p[c]) for p, y in pixels]
        order = sorted(range(len(pixels)), key=lambda i: -errors[i])

        def delta(s: set[int]) -> float:
            return len(s) / len(truth | s) if s else 0.0

        loss, wrong = 0.0, set()
        for i in order:
            before = delta(wrong)
            wrong.add(i)
            loss += errors[i] * (delta(wrong) - before)
        num += weights[c] * loss
        den += weights[c]
    return num / den


@pytest.mark.parametrize("weights", [None, [1.0, 3.0, 0.5, 2.0]])
class TestAgainstReferences:
    def test_cross_entropy(self, weights) -> None:
        logits, mask = _batch()
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        torch.testing.assert_close(weighted_cross_entropy(logits, mask, class_weight=w),
                                   F.cross_entropy(logits, mask, weight=w, ignore_index=IGNORE))

    @pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
    def test_focal(self, weights, gamma: float) -> None:
        logits, mask = _batch(1)
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        got = focal_loss(logits, mask, gamma=gamma, class_weight=w)
        assert got.item() == pytest.approx(_naive_focal(logits, mask, gamma, weights or [1.0] * 4), rel=1e-10)

    @pytest.mark.parametrize("kind", ["dice", "jaccard"])
    def test_dice_and_jaccard(self, weights, kind: str) -> None:
        logits, mask = _batch(2)
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        got = LOSSES[kind](logits, mask, class_weight=w)
        assert got.item() == pytest.approx(_naive_overlap(logits, mask, weights or [1.0] * 4, kind), rel=1e-10)

    def test_lovasz(self, weights) -> None:
        logits, mask = _batch(3)
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        got = lovasz_softmax_loss(logits, mask, class_weight=w)
        assert got.item() == pytest.approx(_naive_lovasz(logits, mask, weights or [1.0] * 4), rel=1e-10)


def test_focal_with_gamma_0_is_the_cross_entropy_and_gamma_focuses_on_hard_pixels() -> None:
    logits, mask = _batch(4)
    logits = logits.float()
    torch.testing.assert_close(focal_loss(logits, mask, gamma=0.0), weighted_cross_entropy(logits, mask))
    assert focal_loss(logits, mask, gamma=2.0) < focal_loss(logits, mask, gamma=0.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal_loss(logits, mask, gamma=-1.0)


def test_lovasz_is_one_minus_iou_at_one_hot_predictions() -> None:
    """Berman et al.'s point: at hard predictions the surrogate is the Jaccard loss itself."""
    g = torch.Generator().manual_seed(5)
    k = 3
    pred = torch.randint(0, k, (2, 16, 16), generator=g)
    mask = torch.where(torch.rand(2, 16, 16, generator=g) < 0.7, pred, torch.randint(0, k, (2, 16, 16), generator=g))
    mask[0, :2] = IGNORE
    logits = F.one_hot(pred, k).permute(0, 3, 1, 2).double() * 1e4  # softmax: exactly one-hot
    labelled = mask != IGNORE
    ious = []
    for c in range(k):
        inter = ((pred == c) & (mask == c) & labelled).sum().item()
        union = (((pred == c) | (mask == c)) & labelled).sum().item()
        ious.append(inter / union)
    expected = 1 - sum(ious) / k
    assert lovasz_softmax_loss(logits, mask).item() == pytest.approx(expected, abs=1e-12)
    # and the soft Jaccard agrees there too
    assert jaccard_loss(logits, mask).item() == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("name", SEGMENTATION_LOSS_TERMS)
def test_ignored_pixels_count_nowhere_and_an_empty_batch_is_0(name: str) -> None:
    loss = LOSSES[name]
    logits, mask = _batch(6)
    logits = logits.float().requires_grad_(True)
    changed = logits.detach().clone()
    changed[:, :, :, :2] = torch.where((mask == IGNORE)[:, None, :, :2], changed[:, :, :, :2] + 50.0,
                                       changed[:, :, :, :2])
    value = loss(logits, mask)
    torch.testing.assert_close(value, loss(changed, mask))
    (grad,) = torch.autograd.grad(value, logits)
    assert torch.isfinite(grad).all() and (grad.permute(0, 2, 3, 1)[mask == IGNORE] == 0).all()
    empty_logits = logits.detach().clone().requires_grad_(True)
    empty = loss(empty_logits, torch.full_like(mask, IGNORE))
    empty.backward()
    assert empty.item() == 0.0 and (empty_logits.grad == 0).all()


@pytest.mark.parametrize("name", ["focal", "dice", "jaccard", "lovasz"])
def test_gradients_match_finite_differences(name: str) -> None:
    logits, mask = _batch(7, b=1, k=3, h=3, w=4)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, mask), (logits,))


@pytest.mark.parametrize("name", ["dice", "jaccard", "lovasz"])
def test_a_zero_class_weight_drops_the_class_from_the_mean(name: str) -> None:
    logits, mask = _batch(8, k=3)
    mask[mask == 2] = 1  # classes 0 and 1 present, 2 absent
    only_zero = LOSSES[name](logits, mask, class_weight=torch.tensor([1.0, 0.0, 5.0], dtype=torch.float64))
    # class 0 alone: one class's loss, read back from the two-class mean and the class-1 weight-only mean
    only_one = LOSSES[name](logits, mask, class_weight=torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64))
    both = LOSSES[name](logits, mask)
    torch.testing.assert_close(both, (only_zero + only_one) / 2)


def test_losses_fall_when_predictions_improve() -> None:
    """Moving the logits towards the labels lowers every term (a sanity check of sign and direction)."""
    logits, mask = _batch(9)
    target = F.one_hot(mask.masked_fill(mask == IGNORE, 0), 4).permute(0, 3, 1, 2).double()
    better = logits + 3 * target
    for name, loss in LOSSES.items():
        assert loss(better, mask) < loss(logits, mask), name


def test_parse_and_combine() -> None:
    assert parse_segmentation_loss("ce") == ("ce",)
    assert parse_segmentation_loss(" CE + Dice ") == ("ce", "dice")
    for bad, match in [("", "terms must be among"), ("ce+tversky", r"unknown: \['tversky'\]"),
                       ("dice+dice", "names a term twice")]:
        with pytest.raises(ValueError, match=match):
            parse_segmentation_loss(bad)
    logits, mask = _batch(10)
    terms = segmentation_loss_terms(logits, mask, ("ce", "lovasz"), focal_gamma=1.0)
    assert list(terms) == ["ce", "lovasz"]
    torch.testing.assert_close(terms["lovasz"], lovasz_softmax_loss(logits, mask))


def test_half_precision_logits_are_promoted() -> None:
    logits, mask = _batch(11)
    for name, loss in LOSSES.items():
        got = loss(logits.bfloat16(), mask)
        assert got.dtype == torch.float32 or name == "ce", name
        torch.testing.assert_close(got.float(), loss(logits.bfloat16().float(), mask).float(), rtol=1e-2, atol=1e-2)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(ValueError, match=r"dice_loss: logits must be \[B, K, H, W\] and mask \[B, H, W\]"):
        dice_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, dtype=torch.long))


def test_class_weights_from_counts() -> None:
    from sklearn.utils.class_weight import compute_class_weight

    from dinov3_eo.losses.segmentation import class_weights_from_counts

    labels = np.repeat([0, 1, 3], [700, 250, 50])  # class 2 absent
    counts = np.bincount(labels, minlength=4)
    balanced = class_weights_from_counts(counts, "balanced")
    np.testing.assert_allclose(balanced[[0, 1, 3]], compute_class_weight("balanced", classes=np.array([0, 1, 3]), y=labels))
    assert balanced[2] == 0 and (balanced * counts).sum() == pytest.approx(counts.sum())  # pixel-weighted mean 1
    np.testing.assert_allclose(class_weights_from_counts(counts, "balanced_sqrt"), np.sqrt(balanced))
    mild = class_weights_from_counts([1000, 10], "balanced_sqrt")
    assert mild[1] / mild[0] == pytest.approx(10.0)  # 100x rarer weighs 10x
    for counts, method, match in [([1, 2], "inverse", "method must be one of"), ([1, -2], "balanced", ">= 0"),
                                  ([0, 0], "balanced", "no pixel of any class")]:
        with pytest.raises(ValueError, match=match):
            class_weights_from_counts(counts, method)
