"""Cross-entropies: the soft-target one with a hand-written backward (for the [tokens, 65,536] iBOT logits), and
the check every hard-label one (segmentation, dense text alignment) makes of its class labels."""

from __future__ import annotations

import torch
from torch import Tensor


def scaled_difference(logits: Tensor, shift: Tensor, temperature: float) -> Tensor:
    """``(logits − shift) / temperature`` in one pass over ``logits``, in ``shift``'s dtype.

    Computed as ``logits · (1/T) + shift · (−1/T)``: one new tensor instead of a difference and a division in place
    (two passes over [N, K]), promoting half-precision logits as it goes. Its two rounded products and their sum
    differ from the two-pass form by a few float32 ulps of ``logits / T`` (1e-7 relative).

    ``1/T`` enters as a one-element tensor, not as a Python float parameter of the op (``alpha=``/``value=``):
    a compiled graph with dynamic floats keeps such a parameter from its first call (measured with torch 2.14: a
    teacher temperature warming up from 0.04 gave Sinkhorn targets computed at 0.04; pytorch/pytorch#197889).

    Args:
        logits: [..., K] any float dtype.
        shift: broadcastable to ``logits`` (e.g. [K] or [N, 1]), float32 or float64: the result's dtype.
        temperature: T > 0.

    Returns:
        [..., K] in ``shift``'s dtype.
    """
    inv_temp = 1.0 / temperature
    return torch.addcmul(shift * -inv_temp, logits, shift.new_ones(1) * inv_temp)


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row ``−Σ_k t_k · log_softmax(x / τ)_k`` computed as ``Σ_k t_k · lse(x / τ) − Σ_k t_k x_k / τ``
    (both with the row maximum subtracted from ``x``, which cancels).

    Autograd through ``log_softmax(x / τ) * t`` keeps or rebuilds four [N, K] float32 tensors (the scaled logits,
    the log-probabilities, their product with the targets and its gradient); here the forward keeps one (the
    softmax numerator) and the backward writes one, ``(softmax(x / τ) · Σt − t) / τ``. With K = 65,536 and
    thousands of masked tokens per step that memory traffic, not the arithmetic, is what the loss costs: the
    forward makes five passes over [N, K] (maximum, scaled difference, its product with the targets, exp, sum),
    the backward two on a GPU (the softmax term; the target term, written in the logits' dtype).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:  # noqa: ANN001
        with torch.autocast(device_type=logits.device.type, enabled=False):  # float32 whatever the caller's autocast
            dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32; fp64 stays fp64
            t = targets.to(dtype)
            shift = logits.amax(dim=-1, keepdim=True).to(dtype)  # [N, 1], exact in the logits' own dtype
            numerator = scaled_difference(logits, shift, temperature)  # [N, K]: the only new [N, K] tensor
            target_mass = t.sum(dim=-1, keepdim=True)  # [N, 1]: 1 for probabilities
            # Σ_k t_k (x_k − shift) / τ, read before the exp overwrites it; a product, not an [N, K] tensor
            dot = torch.bmm(t.unsqueeze(1), numerator.unsqueeze(2)).view(-1, 1)  # [N, 1]
            numerator.exp_()
            partition = numerator.sum(dim=-1, keepdim=True)  # [N, 1]
            # lse(x / τ)·Σt − Σ t·x / τ, the shift cancelled exactly: log(partition)·Σt − Σ t·(x − shift) / τ
            loss = partition.log() * target_mass - dot  # [N, 1]
        ctx.save_for_backward(numerator, partition, t, target_mass)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return loss.view(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        numerator, partition, t, target_mass = ctx.saved_tensors
        scale = (grad.to(numerator.dtype) / ctx.temperature).unsqueeze(-1)  # [N, 1]
        softmax_term = numerator * (scale * target_mass / partition)  # softmax · Σt · g / τ
        # a CPU runs mixed-dtype loops unvectorised (the one-pass form measured 1.6x slower than a cast there)
        one_pass = softmax_term.device.type != "cpu"
        return subtract_target_term(softmax_term, t, scale, ctx.logits_dtype, one_pass=one_pass), None, None


def subtract_target_term(softmax_term: Tensor, targets: Tensor, scale: Tensor, dtype: torch.dtype, *,
                         one_pass: bool) -> Tensor:
    """``softmax_term − targets · scale`` computed in ``softmax_term``'s dtype and returned in ``dtype``.

    With ``one_pass`` the difference is written straight in ``dtype`` (one pass over [N, K] instead of a pass and
    a cast pass when ``dtype`` is bf16); otherwise ``softmax_term`` is overwritten, then cast. Same values.

    Args:
        softmax_term: [N, K] float32/float64 (consumed: it may be overwritten).
        targets: [N, K] in ``softmax_term``'s dtype.
        scale: [N, 1] per-row factor of the targets.
        dtype: the gradient's dtype (the logits').
    """
    if one_pass and softmax_term.dtype != dtype:
        out = torch.empty_like(softmax_term, dtype=dtype)
        return torch.addcmul(softmax_term, targets, scale, value=-1.0, out=out)
    return softmax_term.addcmul_(targets, scale, value=-1.0).to(dtype)


def soft_cross_entropy(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """Cross-entropy of each row of ``logits`` at ``temperature`` against soft ``targets``.

    ``ce[n] = −Σ_k targets[n, k] · log_softmax(logits[n] / temperature)[k]``, in float32 at least (bf16 logits
    under autocast included; float64 stays float64). Equal to the autograd expression, value and gradient, with
    less memory traffic (see :class:`_SoftCrossEntropy`). ``targets`` are constants: no gradient reaches them.

    Args:
        logits: [N, K] unscaled logits (any float dtype); the gradient comes back in this dtype.
        targets: [N, K] target weights, normally probabilities (rows summing to 1).
        temperature: τ > 0 dividing the logits.

    Returns:
        [N] per-row cross-entropies (float32, or float64 for float64 logits).

    Raises:
        ValueError: on shapes other than two equal [N, K], or ``temperature <= 0``.
    """
    if logits.ndim != 2 or logits.shape != targets.shape:
        raise ValueError(f"soft_cross_entropy: logits and targets must both be [N, K], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}.")
    if temperature <= 0:
        raise ValueError(f"soft_cross_entropy: temperature must be > 0, got {temperature}.")
    return _SoftCrossEntropy.apply(logits, targets.detach(), float(temperature))


def check_class_labels(labels: Tensor, num_classes: int, *, ignore_index: int = 255, owner: str = "") -> None:
    """Raise one clear error when a labelled value of ``labels`` is not a class id in ``[0, num_classes)``.

    The error names every distinct offending value (the first ten), so a user sees at once whether a label raster
    is off by one, holds an undeclared nodata value or was written with the wrong class table; without it, the
    loss would fail with an index error (CPU) or a device-side assert (GPU). It reads the labels: call it on the
    host, where it is free (the tasks do, in ``on_before_batch_transfer``); on a GPU it would be a sync.

    Args:
        labels: integer labels of any shape.
        num_classes: the number of classes ``K``.
        ignore_index: the value of unlabelled pixels, always allowed.
        owner: who checks, to start the message (e.g. ``"SegmentationTask"``).

    Raises:
        ValueError: if a value other than ``ignore_index`` lies outside ``[0, num_classes)``.
    """
    labelled = labels[labels != ignore_index]
    if labelled.numel() == 0 or (int(labelled.min()) >= 0 and int(labelled.max()) < num_classes):
        return
    bad = labelled[(labelled < 0) | (labelled >= num_classes)].unique().tolist()  # sorted
    shown = f"{bad[:10]}" if len(bad) <= 10 else f"{bad[:10]} and {len(bad) - 10} more"
    raise ValueError(f"{owner + ': ' if owner else ''}labels {shown} fall outside 0..{num_classes - 1} "
                     f"(ignore_index={ignore_index}).")
