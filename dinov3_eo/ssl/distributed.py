"""The few collective operations the SSL losses need, with single-process fallbacks.

Lightning owns the process group (DDP/FSDP strategies); these helpers only *use* it when one is running,
so every loss also runs, unchanged, in a plain single-process test. All functions take an optional
``group`` (a ``torch.distributed`` process group; ``None`` means the default group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    """True when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_dist() else 1


def rank(group: Any = None) -> int:
    """Rank of this process inside ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_dist() else 0


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Element-wise sum of ``tensor`` over all processes, in a new tensor (the input is untouched); with one process,
    ``tensor`` itself (a copy would be one more device launch per call, several per Sinkhorn–Knopp; callers must
    not write into the result).

    Not autograd-aware: use it on statistics computed under ``no_grad`` (e.g. Sinkhorn–Knopp sums).
    """
    if not is_dist() or world_size(group) == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_max(tensor: Tensor, group: Any = None) -> Tensor:
    """Element-wise maximum of ``tensor`` over all processes, as :func:`all_reduce_sum` (``tensor`` itself with one
    process; not autograd-aware)."""
    if not is_dist() or world_size(group) == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; the backward pass sends each rank its slice of the
    *summed* incoming gradients, i.e. it differentiates ``sum over ranks of each rank's loss``.
    With DDP averaging parameter gradients afterwards, that is exactly the gradient of the mean loss."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.local_rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None]:
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = rank(ctx.group) * ctx.local_rows
        return grad[start : start + ctx.local_rows], None


def all_gather_with_grad(tensor: Tensor, group: Any = None) -> Tensor:
    """Gather ``tensor`` [b, ...] from every rank into [world·b, ...] (rank order), keeping autograd.

    Every rank must pass the same shape. Without a process group this is the identity.
    """
    if not is_dist() or world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)
