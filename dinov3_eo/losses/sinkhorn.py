"""Sinkhorn–Knopp centering of teacher logits (the only centering DINOv3 uses)."""

from __future__ import annotations

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
    if teacher_logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp: teacher_logits must be [B, K], got shape {tuple(teacher_logits.shape)}.")
    if teacher_temp <= 0:
        raise ValueError(f"sinkhorn_knopp: teacher_temp must be > 0, got {teacher_temp}.")
    # fp32 at least (bf16/fp16 logits are upcast); fp64 input stays fp64. Half-precision logits are not copied to
    # fp32 first: the maximum is exact in their own dtype, and the subtraction below promotes them in the same pass
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    logits = teacher_logits
    n_local, n_prototypes = logits.shape
    if is_dist() and world_size(group) > 1:
        n_total = float(all_reduce_sum(torch.tensor(float(n_local), device=logits.device), group).item())
    else:
        n_total = float(n_local)  # no process group: no device-to-host sync for a count the host already knows
    if n_total == 0:
        return logits.to(dtype, copy=True)  # [0, K]: nothing to centre anywhere
    if n_local > 0:
        local_max = logits.amax(dim=0).to(dtype)  # [K] (amax: no argmax, ~7x faster than max(dim=0) on a CPU)
    else:
        local_max = torch.full((n_prototypes,), float("-inf"), dtype=dtype, device=logits.device)
    shift = all_reduce_max(local_max, group)  # [K]
    e = scaled_difference(logits, shift, teacher_temp).exp_()  # [B_local, K] in `dtype`, entries in [0, 1]
    # Q = diag(c) · e · diag(r) is kept as two scale vectors, so each half-iteration is one matrix-vector product
    # over e instead of a sum plus two divisions of the whole [B, K] matrix (3x less memory traffic; the teacher's
    # iBOT assignments are [masked tokens, 65,536]). The reference's initial division by the global sum is a
    # scalar that the first prototype normalisation cancels exactly, so it is left out.
    tiny = torch.finfo(e.dtype).tiny  # only guards a sample whose every logit underflowed
    c = torch.ones(n_local, dtype=e.dtype, device=e.device)  # [B_local] per-sample scale
    # autocast off: under the caller's bf16 autocast the products below would round e to bf16 each time
    with torch.autocast(device_type=e.device.type, enabled=False):
        for _ in range(n_iterations):
            r = 1.0 / (n_prototypes * all_reduce_sum(e.t() @ c, group))  # [K]: every prototype's mass -> 1/K
            c = 1.0 / (n_total * (e @ r).clamp_min(tiny))  # [B_local]: every sample's mass -> 1/B
    return e.mul_(c[:, None]).mul_((r * n_total)[None, :])  # [B_local, K], rows sum to 1
