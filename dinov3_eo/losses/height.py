"""Height (and depth) regression losses that ignore nodata.

All three losses take a prediction ``pred`` ``[B, 1, H, W]`` or ``[B, H, W]`` in metres, a target of the same
spatial shape with NaN where there is no reference height, and an optional boolean ``valid`` mask ``[B, H, W]``
(or ``[B, 1, H, W]``). A pixel counts only if it is valid, its target is finite and (for :func:`sig_loss`) the
target is non-negative. The losses reduce over *all* counted pixels of the batch at once (one mean, not a mean of
per-image means) and return an unweighted scalar. Pixels that do not count are replaced by 0 in both prediction and
target before any arithmetic (``torch.where``, whose gradient there is exactly 0) and weigh 0 in every sum, so
neither their values nor NaNs in them reach the loss or its gradient. Nothing depends on how many pixels count but
the values, so a step reads nothing back from a GPU (boolean indexing would: its output size lives on the device).
With no counted pixel the result is an exact ``0.0`` that still belongs to the autograd graph (``backward()`` works
and gives zero gradients), without a warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _counted(
    pred: Tensor, target: Tensor, valid: Tensor | None, *, where: str, non_negative: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(pred, target, keep, count)``: ``[B, H, W]`` prediction and target with 0 wherever a pixel does not count,
    the ``[B, H, W]`` bool mask of the counted pixels (valid, finite target, and ``>= 0`` with ``non_negative``) and
    their number as a 0-d float tensor; checks shapes."""
    if pred.ndim == 4:
        if pred.shape[1] != 1:
            raise ValueError(f"{where}: pred must have one channel, got shape {tuple(pred.shape)}.")
        pred = pred[:, 0]
    if target.ndim == 4:
        target = target[:, 0]
    if pred.shape != target.shape:
        raise ValueError(f"{where}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape.")
    keep = torch.isfinite(target)
    if valid is not None:
        if valid.ndim == 4:
            valid = valid[:, 0]
        if valid.shape != target.shape:
            raise ValueError(f"{where}: valid {tuple(valid.shape)} does not match target {tuple(target.shape)}.")
        if valid.dtype != torch.bool:
            raise TypeError(f"{where}: valid must be a bool mask, got {valid.dtype}.")
        keep = keep & valid
    if non_negative:
        keep = keep & (target >= 0)
    dtype = torch.promote_types(pred.dtype, torch.float32)  # bf16 predictions (autocast) are summed in fp32
    pred = torch.where(keep, pred.to(dtype), 0.0)
    target = torch.where(keep, target.to(dtype), 0.0)
    return pred, target, keep, keep.sum().to(dtype)


def _masked_mean(values: Tensor, keep: Tensor, count: Tensor) -> Tensor:
    """Mean of ``values`` over ``keep`` (0 when nothing counts; ``values`` must be finite everywhere)."""
    return (values * keep).sum() / count.clamp_min(1.0)


def sig_loss(
    pred: Tensor, target: Tensor, valid: Tensor | None = None, *, lam: float = 0.15, eps: float = 1e-3
) -> Tensor:
    """Scale-invariant log loss of the official depth evaluation (Eigen et al.).

    Over the N counted pixels (targets < 0 are not counted; predictions are clamped at 0)::

        g    = log(pred + eps) - log(target + eps)
        loss = sqrt( var(g) + lam * mean(g)^2 )

    with ``var`` the unbiased variance (divides by N - 1; by N when N == 1). This equals
    ``sqrt(mean(g^2) - (1 - lam) * mean(g)^2)`` up to the N/(N-1) factor, i.e. the classic form with 0.85 = 1 - lam.
    ``eps`` (1e-3 m) keeps ``log`` finite on bare ground (height 0). The square root is taken of ``max(., 1e-12)``
    so a perfect prediction has a finite (zero) gradient.

    Args:
        pred: ``[B, 1, H, W]`` or ``[B, H, W]`` predicted heights in metres.
        target: same shape, reference heights in metres, NaN for nodata.
        valid: optional bool ``[B, H, W]``; False pixels are ignored.
        lam: weight of the squared mean log difference (0.15 in the official configs).
        eps: added to both heights before the logarithm.

    Returns:
        A scalar tensor.
    """
    p, t, keep, n = _counted(pred, target, valid, where="sig_loss", non_negative=True)
    g = torch.log(p.clamp_min(0) + eps) - torch.log(t + eps)  # [B, H, W], 0 where nothing counts
    mean = _masked_mean(g, keep, n)
    var = ((g - mean) ** 2 * keep).sum() / torch.where(n > 1, n - 1, n).clamp_min(1.0)  # unbiased when N > 1
    loss = torch.sqrt((var + lam * mean**2).clamp_min(1e-12))
    return torch.where(n > 0, loss, 0.0)


def masked_l1_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean absolute error over the counted pixels: ``mean(|pred - target|)``; shapes as in :func:`sig_loss`."""
    p, t, keep, n = _counted(pred, target, valid, where="masked_l1_loss")
    return _masked_mean((p - t).abs(), keep, n)


def masked_huber_loss(pred: Tensor, target: Tensor, valid: Tensor | None = None, *, delta: float = 1.0) -> Tensor:
    """Mean Huber loss over the counted pixels; shapes as in :func:`sig_loss`.

    Per pixel with ``r = |pred - target|``: ``0.5 r^2`` if ``r < delta`` else ``delta (r - 0.5 delta)``
    (``delta`` in metres, the scale at which the loss turns from quadratic to linear).

    Raises:
        ValueError: ``delta <= 0``.
    """
    if delta <= 0:
        raise ValueError(f"masked_huber_loss: delta must be > 0, got {delta}.")
    p, t, keep, n = _counted(pred, target, valid, where="masked_huber_loss")
    return _masked_mean(F.huber_loss(p, t, delta=delta, reduction="none"), keep, n)


class SigLoss(nn.Module):
    """Module form of :func:`sig_loss` (for configs): ``forward(pred, target, valid=None) -> scalar``."""

    def __init__(self, *, lam: float = 0.15, eps: float = 1e-3) -> None:
        super().__init__()
        if not 0 <= lam <= 1:
            raise ValueError(f"SigLoss: lam must be in [0, 1], got {lam}.")
        if eps <= 0:
            raise ValueError(f"SigLoss: eps must be > 0, got {eps}.")
        self.lam = lam
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        return sig_loss(pred, target, valid, lam=self.lam, eps=self.eps)


class MaskedL1Loss(nn.Module):
    """Module form of :func:`masked_l1_loss`: ``forward(pred, target, valid=None) -> scalar``."""

    def forward(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        return masked_l1_loss(pred, target, valid)


class MaskedHuberLoss(nn.Module):
    """Module form of :func:`masked_huber_loss`: ``forward(pred, target, valid=None) -> scalar``."""

    def __init__(self, *, delta: float = 1.0) -> None:
        super().__init__()
        if delta <= 0:
            raise ValueError(f"MaskedHuberLoss: delta must be > 0, got {delta}.")
        self.delta = delta

    def forward(self, pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
        return masked_huber_loss(pred, target, valid, delta=self.delta)
