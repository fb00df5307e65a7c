"""KoLeo regulariser: spread the student's class tokens uniformly by pushing each away from its nearest neighbour.

Applied in DINOv3 to the student's pre-head, normed CLS token of each global crop separately; the official total
adds ``0.1 · Σ_crops koleo(crop)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3_eo.ssl.distributed import all_gather_with_grad, rank

_EPS = 1e-8


def _koleo_from_candidates(queries: Tensor, candidates: Tensor, allowed: Tensor) -> Tensor:
    """−mean log distance from each query to its most similar allowed candidate.

    Args:
        queries: [b, D] L2-normalised rows.
        candidates: [n, D] L2-normalised rows.
        allowed: [b, n] bool, False for a query itself and for rows outside its neighbour group.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):  # bf16 would blur near-ties of neighbours
        dots = queries @ candidates.t()  # [b, n]
    dots = dots.masked_fill(~allowed, float("-inf"))
    nearest = dots.argmax(dim=1)  # [b]; neighbour search is not differentiated, like the reference
    # pairwise_distance adds eps to the difference, as nn.PairwiseDistance(eps=1e-8) does in the reference
    distances = F.pairwise_distance(queries, candidates[nearest], p=2, eps=_EPS)  # [b]
    return -torch.log(distances + _EPS).mean()


def koleo_loss(features: Tensor) -> Tensor:
    """Kozachenko–Leonenko entropy estimator on this process's batch.

    ``x̂ = x / max(‖x‖, 1e-8)``; ``nn(i) = argmax_{j≠i} ⟨x̂_i, x̂_j⟩``;
    ``loss = −(1/B) Σ_i log(‖x̂_i − x̂_nn(i)‖₂ + 1e-8)``. Computed in fp32.

    Args:
        features: [B, D] features (pre-head CLS tokens of one crop), B ≥ 2.

    Returns:
        Scalar loss.

    Raises:
        ValueError: if ``features`` is not [B, D] with B ≥ 2.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"koleo_loss: features must be [B, D] with B >= 2, got {tuple(features.shape)}.")
    x = F.normalize(features.float(), p=2, dim=-1, eps=_EPS)
    allowed = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)  # [B, B] everyone but oneself
    return _koleo_from_candidates(x, x, allowed)


def koleo_loss_distributed(features: Tensor, *, group_size: int | None = None, group: Any = None) -> Tensor:
    """KoLeo with neighbours searched across processes ("DKoleo" of the high-resolution stage).

    The L2-normalised features of every rank are all-gathered *with* autograd into the global batch
    (rank order); the global batch is cut into consecutive groups of ``group_size`` rows (``None``: one group),
    and each local row looks for its nearest neighbour inside its own group (self excluded). The loss is the
    mean over the local rows; with equal local batches, the mean of the per-rank losses equals the loss of one
    process holding the whole global batch with the same groups, and so do the gradients (see
    ``all_gather_with_grad``). Without a process group it is :func:`koleo_loss` over groups of the local batch.

    Args:
        features: [b, D] this rank's features (same b on every rank).
        group_size: rows per neighbour group (official high-resolution recipe: 16 = 2 ranks × 8); must divide
            the global batch and be ≥ 2.
        group: process group (``None``: default group).

    Raises:
        ValueError: if the shapes or ``group_size`` do not fit the global batch.
    """
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"koleo_loss_distributed: features must be [b, D], got {tuple(features.shape)}.")
    x = F.normalize(features.float(), p=2, dim=-1, eps=_EPS)
    gathered = all_gather_with_grad(x, group)  # [W·b, D]
    n_local, n_global = x.shape[0], gathered.shape[0]
    size = n_global if group_size is None else group_size
    if size < 2 or n_global % size:
        raise ValueError(
            f"koleo_loss_distributed: group_size must be >= 2 and divide the global batch of {n_global}, got {group_size}."
        )
    first = rank(group) * n_local
    query_index = torch.arange(first, first + n_local, device=x.device)  # [b] global row of each local row
    candidate_index = torch.arange(n_global, device=x.device)  # [W·b]
    same_group = (query_index[:, None] // size) == (candidate_index[None, :] // size)  # [b, W·b]
    not_self = query_index[:, None] != candidate_index[None, :]
    return _koleo_from_candidates(x, gathered, same_group & not_self)

