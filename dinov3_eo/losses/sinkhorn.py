"""Sinkhorn–Knopp centering of teacher logits (the only centering DINOv3 uses)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dinov3_eo.ssl.distributed import all_reduce_max, all_reduce_sum


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
    # fp32 at least (bf16/fp16 logits are upcast); fp64 input stays fp64
    logits = teacher_logits.to(torch.promote_types(teacher_logits.dtype, torch.float32))
    n_local, n_prototypes = logits.shape
    n_total = all_reduce_sum(torch.tensor(float(n_local), device=logits.device), group)
    if n_total.item() == 0:
        return logits.clone()  # [0, K]: nothing to centre anywhere
    if n_local > 0:
        local_max = logits.max(dim=0).values  # [K]
    else:
        local_max = torch.full((n_prototypes,), float("-inf"), device=logits.device)
    shift = all_reduce_max(local_max, group)  # [K]
    q = torch.exp((logits - shift) / teacher_temp).t()  # [K, B_local]
    tiny = torch.finfo(q.dtype).tiny  # only guards a sample whose every logit underflowed
    q /= all_reduce_sum(q.sum(), group)
    for _ in range(n_iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True), group)  # [K, 1] prototype mass over all ranks
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # [1, B_local] per-sample mass, local by construction
        q /= n_total
    q *= n_total
    return q.t()  # [B_local, K]
