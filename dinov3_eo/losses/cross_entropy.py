"""Cross-entropies: the soft-target one with a hand-written backward (for the [tokens, 65,536] iBOT logits), and
the check every hard-label one (segmentation, dense text alignment) makes of its class labels."""

from __future__ import annotations

import torch
from torch import Tensor


class _SoftCrossEntropy(torch.autograd.Function):
    """Per-row ``−Σ_k t_k · log_softmax(x / τ)_k`` computed as ``Σ_k t_k · lse(x / τ) − Σ_k t_k x_k / τ``
    (both with the row maximum subtracted from ``x``, which cancels).

    Autograd through ``log_softmax(x / τ) * t`` keeps or rebuilds four [N, K] float32 tensors (the scaled logits,
    the log-probabilities, their product with the targets and its gradient); here the forward keeps one (the
    softmax numerator) and the backward writes one, ``(softmax(x / τ) · Σt − t) / τ``. With K = 65,536 and
    thousands of masked tokens per step that memory traffic, not the arithmetic, is what the loss costs.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float) -> Tensor:  # noqa: ANN001
        with torch.autocast(device_type=logits.device.type, enabled=False):  # float32 whatever the caller's autocast
            dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32; fp64 stays fp64
            t = targets.to(dtype)
            # no fp32 copy of bf16 logits: the maximum is exact in bf16 and the subtraction promotes in its own pass
            shift = logits.amax(dim=-1, keepdim=True).to(dtype)  # [N, 1]
            numerator = logits - shift  # [N, K] in `dtype`, the only new [N, K] tensor: x − shift, then exp in place
            target_mass = t.sum(dim=-1, keepdim=True)  # [N, 1]: 1 for probabilities
            # Σ_k t_k (x_k − shift), read before the exp overwrites it; a product, not an [N, K] tensor
            dot = torch.bmm(t.unsqueeze(1), numerator.unsqueeze(2)).view(-1, 1)  # [N, 1]
            numerator.div_(temperature).exp_()
            partition = numerator.sum(dim=-1, keepdim=True)  # [N, 1]
            # lse(x / τ)·Σt − Σ t·x / τ with the shift cancelled exactly: log(partition)·Σt − Σ t·(x − shift) / τ
            loss = partition.log() * target_mass - dot / temperature  # [N, 1]
        ctx.save_for_backward(numerator, partition, t, target_mass)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return loss.view(-1)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # noqa: ANN001
        numerator, partition, t, target_mass = ctx.saved_tensors
        scale = (grad.to(numerator.dtype) / ctx.temperature).unsqueeze(-1)  # [N, 1]
        grad_logits = numerator * (scale * target_mass / partition)  # softmax · Σt · g / τ
        grad_logits.addcmul_(t, scale, value=-1.0)  # − t · g / τ
        return grad_logits.to(ctx.logits_dtype), None, None


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
