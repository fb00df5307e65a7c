"""AdamW for the SSL stages: torch's fused AdamW, stepped with less host work.

The stages' parameters fall into ~30 groups (one per layer-wise lr level, with and without weight decay, and the
prototype layers), and ``torch.optim.AdamW(fused=True)`` pays its per-group Python (state lookups, checks, grouping
by device and dtype) and one step-counter launch per group on every step: 2.6 ms of host time a ViT-S step on
``bench_pretrain.py --host-proxy``, host time a launch-bound GPU step waits on. :class:`GroupedAdamW` runs the very
same fused kernel per group, with every step counter advanced in one launch and, in place of the per-group Python,
one state lookup per parameter: 1.1 ms there, bit for bit the same parameters and state (tested), the same
``state_dict`` (checkpoints load into either).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor


class GroupedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW(fused=True)`` with a cheaper :meth:`step` (see the module docstring).

    Where the fast path's assumptions do not hold it defers to torch's own step: AMSGrad, ``maximize``,
    ``capturable``, a tensor learning rate, a gradient scaler's ``grad_scale``/``found_inf`` (fp16 AMP),
    or a group whose parameters differ in device or dtype or are DTensors (FSDP2). (A sparse gradient fails in the
    fused kernel, as it does in torch's.)

    Args: as ``torch.optim.AdamW`` (``fused`` is always on).
    """

    def __init__(self, params: Iterable[Any], **kwargs: Any) -> None:
        kwargs["fused"] = True
        super().__init__(params, **kwargs)
        self._uniform: dict[int, bool] = {}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self.__dict__.get("_uniform", {}).clear()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._uniform.clear()

    def _group_uniform(self, index: int, group: dict[str, Any]) -> bool:
        """Whether one fused call can take group ``index``: plain tensors of one device and dtype (checked once)."""
        if index not in self._uniform:
            params = group["params"]
            first = params[0] if params else None
            self._uniform[index] = all(p.device == first.device and p.dtype == first.dtype
                                       and type(p.data) is Tensor for p in params)  # fmt: skip
        return self._uniform[index]

    def _fast_path(self) -> bool:
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or group["capturable"] or isinstance(group["lr"], Tensor):
                return False
        return True

    def _state_of(self, p: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(exp_avg, exp_avg_sq, step)`` of ``p``, made as torch's fused AdamW makes them on first use. Read from
        ``self.state`` every step (a dict lookup): whoever replaces a state tensor (moving the optimiser to a device,
        say) is followed."""
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["exp_avg"], state["exp_avg_sq"], state["step"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        if not self._fast_path():
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        calls, steps = [], []
        for index, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if not self._group_uniform(index, group):
                return self._torch_step(loss)
            moments = [self._state_of(p) for p in params]
            steps += [m[2] for m in moments]
            calls.append((group, params, moments))
        if steps:
            torch._foreach_add_(steps, 1)  # every group's step counters in one launch, before the kernels read them
        for group, params, moments in calls:
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                params, [p.grad for p in params], [m[0] for m in moments], [m[1] for m in moments], [],
                [m[2] for m in moments], lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"], amsgrad=False, maximize=False,
                grad_scale=None, found_inf=None,
            )  # fmt: skip
        return loss

    def _torch_step(self, loss: Any) -> Any:
        """torch's own step, after this one ran the closure already (a parameter outside the fast path's reach)."""
        super().step()
        return loss
