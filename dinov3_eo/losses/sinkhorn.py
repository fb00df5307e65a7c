"""Sinkhorn–Knopp centering of teacher logits (the only centering DINOv3 uses)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dinov3_eo.losses.cross_entropy import scaled_difference
from dinov3_eo.ssl.distributed import all_reduce_max, all_reduce_sum, is_dist, world_size


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, *, group: Any = None) -> Tensor:
    """Turn teacher logits into balanced soft assignments to the K prototypes.

    With ``Q = exp(logits / T)ᵀ`` (K×B, B = rows summed over every rank of ``group``)::

        Q /= sum(Q)                              # global sum, all-reduced
        repeat n_iterations:
            Q /= row_sums(Q) (all-reduced); Q /= K   # every prototype gets mass 1/K
            Q /= column_sums(Q);            Q /= B   # every sample gets mass 1/B
        return (Q * B)ᵀ                          # each sample's assignment sums to 1

    For DINO pass the teacher CLS logits of *both* global crops together ([2b, K]) so they are centred
    jointly; for iBOT pass the masked-patch logits (ranks may hold different numbers of rows).

    Deviation from the reference, numerically only: each prototype's maximum logit over the whole batch
    (all-reduced) is subtracted before ``exp``. That scales each row of Q by a constant, which the first row
    normalisation removes exactly, and it keeps ``exp(logit / 0.04)`` from overflowing in fp32 and every
    prototype's row from underflowing to all zeros (which would make the reference divide 0 by 0).

    Args:
        teacher_logits: [B_local, K] teacher head outputs (half precision is computed in fp32).
        teacher_temp: teacher temperature (0.04 → 0.07 warm-up in the official recipe).
        n_iterations: Sinkhorn iterations (3 officially).
        group: process group over which the batch is shared (``None``: default group, or none at all).

    Returns:
        [B_local, K] probabilities (fp32, or fp64 for fp64 input), rows summing to 1. No gradient flows through.

    Raises:
        ValueError: if ``teacher_logits`` is not 2-D or ``teacher_temp`` is not positive.
    """
    dtype, n_total, shift = _check_and_shift(teacher_logits, teacher_temp, group)
    if n_total == 0:
        return teacher_logits.to(dtype, copy=True)  # [0, K]: nothing to centre anywhere
    e = scaled_difference(teacher_logits, shift, teacher_temp).exp_()  # [B_local, K] in `dtype`, entries in [0, 1]
    # autocast off: under the caller's bf16 autocast the products would round e to bf16 each time
    with torch.autocast(device_type=e.device.type, enabled=False):
        row_scale, col_scale = _balance(lambda c: e.t() @ c, lambda r: e @ r, teacher_logits.shape, n_total,
                                        n_iterations, group, e.dtype, e.device)
    return e.mul_(row_scale[:, None]).mul_(col_scale[None, :])  # [B_local, K], rows sum to 1


@dataclass(frozen=True)
class SinkhornAssignments:
    """Sinkhorn–Knopp assignments kept factorised: the teacher's logits and three vectors, not an [M, K] matrix.

    ``probs[i, k] = exp((logits[i, k] − shift[k]) / temperature) · row_scale[i] · col_scale[k]``, what
    :func:`sinkhorn_knopp` returns for the same logits; :func:`~dinov3_eo.losses.ibot.ibot_loss` reads it with the
    Triton kernels of :mod:`~dinov3_eo.losses.logit_kernels`, which recompute the exponential as they go.
    """

    logits: Tensor  # [M, K], the teacher head's output in its own dtype
    shift: Tensor  # [K] float32: each prototype's maximum logit over the (global) batch
    temperature: float
    row_scale: Tensor  # [M] float32
    col_scale: Tensor  # [K] float32

    @property
    def shape(self) -> torch.Size:
        return self.logits.shape

    def probabilities(self) -> Tensor:
        """The [M, K] float32 assignment matrix (rows summing to 1), as :func:`sinkhorn_knopp` returns it."""
        e = scaled_difference(self.logits, self.shift, self.temperature).exp_()
        return e.mul_(self.row_scale[:, None]).mul_(self.col_scale[None, :])


@torch.no_grad()
def sinkhorn_assignments(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, *,
                         group: Any = None) -> SinkhornAssignments:
    """:func:`sinkhorn_knopp` without its [B, K] result: the balancing scales, computed by Triton kernels that
    read the logits once per half-iteration (the prototypes' maxima in the first read) and never write
    ``exp(logits / T)`` (see :mod:`~dinov3_eo.losses.logit_kernels`).

    Same arguments, errors and distributed behaviour as :func:`sinkhorn_knopp`; computed in float32 (float64 logits
    too). Needs CUDA tensors (or Triton's interpreter on a CPU).

    Returns:
        :class:`SinkhornAssignments` whose :meth:`~SinkhornAssignments.probabilities` equal
        :func:`sinkhorn_knopp`'s result to float32 rounding.
    """
    from dinov3_eo.losses.logit_kernels import exp_column_sums, exp_matvec

    _check_logits_and_temperature(teacher_logits, teacher_temp)
    n_total = _total_rows(teacher_logits, group)
    logits = teacher_logits.contiguous()
    n_local, n_prototypes = logits.shape
    if n_total == 0:
        ones = torch.ones(n_prototypes, dtype=torch.float32, device=logits.device)
        return SinkhornAssignments(logits, torch.zeros_like(ones), float(teacher_temp), ones.new_empty(0), ones)
    # the prototypes' maxima and the first prototype sums (Eᵀ·1) in one read of the logits, the sums relative to
    # this rank's maxima, then rescaled to the maxima over every rank
    if n_local > 0:
        local_max, local_sums = exp_column_sums(logits, teacher_temp)  # [K], [K]
    else:
        local_max = torch.full((n_prototypes,), float("-inf"), device=logits.device)
        local_sums = torch.zeros(n_prototypes, device=logits.device)
    shift = all_reduce_max(local_max, group)  # [K]
    first_sums = local_sums * torch.exp((local_max - shift) / teacher_temp) if n_local > 0 else local_sums
    row_scale, col_scale = _balance(
        lambda c: exp_matvec(logits, shift, teacher_temp, c, transpose=True),
        lambda r: exp_matvec(logits, shift, teacher_temp, r, transpose=False),
        logits.shape, n_total, n_iterations, group, torch.float32, logits.device, first_cols=first_sums,
    )
    return SinkhornAssignments(logits, shift, float(teacher_temp), row_scale, col_scale)


def _check_logits_and_temperature(teacher_logits: Tensor, teacher_temp: float) -> None:
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be [B, K], got shape {tuple(teacher_logits.shape)}.")
    if teacher_temp <= 0:
        raise ValueError(f"sinkhorn_knopp: teacher_temp must be > 0, got {teacher_temp}.")


def _total_rows(teacher_logits: Tensor, group: Any) -> float:
    """The number of rows over every rank of ``group``."""
    n_local = teacher_logits.shape[0]
    if is_dist() and world_size(group) > 1:
        return float(all_reduce_sum(torch.tensor(float(n_local), device=teacher_logits.device), group).item())
    return float(n_local)  # no process group: no device-to-host sync for a count the host already knows


def _check_and_shift(teacher_logits: Tensor, teacher_temp: float, group: Any) -> tuple[torch.dtype, float, Tensor]:
    """The computation's dtype, the number of rows over ``group`` and each prototype's maximum logit [K]."""
    _check_logits_and_temperature(teacher_logits, teacher_temp)
    # fp32 at least (bf16/fp16 logits are upcast); fp64 input stays fp64. Half-precision logits are not copied to
    # fp32 first: the maximum is exact in their own dtype, and the subtraction promotes them in the same pass
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    n_local, n_prototypes = teacher_logits.shape
    n_total = _total_rows(teacher_logits, group)
    if n_total == 0:
        return dtype, n_total, teacher_logits.new_zeros(n_prototypes, dtype=dtype)
    if n_local > 0:
        local_max = teacher_logits.amax(dim=0).to(dtype)  # [K] (amax: no argmax, ~7x faster than max(dim=0) on a CPU)
    else:
        local_max = torch.full((n_prototypes,), float("-inf"), dtype=dtype, device=teacher_logits.device)
    return dtype, n_total, all_reduce_max(local_max, group)  # [K]


def _balance(cols_times: Callable[[Tensor], Tensor], rows_times: Callable[[Tensor], Tensor], shape: torch.Size,
             n_total: float, n_iterations: int, group: Any, dtype: torch.dtype, device: torch.device, *,
             first_cols: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Sinkhorn's alternating normalisations of ``Q = diag(c) · E · diag(r)`` kept as the two scale vectors.

    Each half-iteration is one matrix-vector product over E ([B_local, K], read through ``cols_times(c) = Eᵀc``
    and ``rows_times(r) = E r``) instead of a sum plus two divisions of the whole matrix (3x less memory traffic).
    The reference's initial division by the global sum is a scalar that the first prototype normalisation cancels
    exactly, so it is left out. ``first_cols``: ``Eᵀ·1`` on this rank when the caller has it already.

    Returns:
        ``row_scale`` [B_local] and ``col_scale`` [K] (``r · n_total``) with ``diag(row_scale) · E ·
        diag(col_scale)`` the assignments, rows summing to 1.
    """
    n_local, n_prototypes = shape
    tiny = torch.finfo(dtype).tiny  # only guards a sample whose every logit underflowed
    c = torch.ones(n_local, dtype=dtype, device=device)  # [B_local] per-sample scale
    r = torch.ones(n_prototypes, dtype=dtype, device=device)
    for iteration in range(n_iterations):
        cols = first_cols if iteration == 0 and first_cols is not None else cols_times(c)  # c = 1 at first
        r = 1.0 / (n_prototypes * all_reduce_sum(cols, group))  # [K]: every prototype's mass -> 1/K
        c = 1.0 / (n_total * rows_times(r).clamp_min(tiny))  # [B_local]: every sample's mass -> 1/B
    return c, r * n_total
