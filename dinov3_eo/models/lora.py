"""Low-rank adaptation (LoRA, Hu et al. 2021) of a backbone's linear layers, for fine-tuning at a fraction of the cost.

A LoRA layer adds a trainable low-rank update to a frozen linear map: ``y = W x + b + (alpha / r) · B A x`` with
``A`` [r, in] and ``B`` [out, r]. ``B`` starts at zero, so an adapted backbone computes exactly what the frozen one
did until training moves it; ``A`` starts Kaiming-uniform, as in the paper's code and PEFT. Only ``A`` and ``B``
train: a ViT-S/16 with rank 8 on every block's q/k/v and output projections trains 0.22 M weights instead of 21.6 M,
and its optimiser state is as small, while the features still adapt to the imagery (where a frozen backbone's
cannot).

The update is attached to each adapted ``nn.Linear`` (any subclass, e.g. the q/k/v projection with its masked key
bias) as a child module ``lora`` plus a forward hook, rather than by replacing the layer: the base weights keep
their official key names (``blocks.0.attn.qkv.weight``), so released checkpoints load into an adapted backbone and
:func:`merge_lora` gives back the plain official layout. In a state dict the update adds ``...qkv.lora.A`` and
``...qkv.lora.B``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: what ``targets`` may name in a DINOv3 ViT block: attention q/k/v and output projections, MLP layers
#: (``fc1``/``fc2``; ``w1``/``w2``/``w3`` in SwiGLU blocks)
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2", "w1", "w2", "w3")


@dataclass(frozen=True)
class LoRAConfig:
    """Where and how large the low-rank updates are.

    Args:
        rank: r, the rank of each update.
        alpha: the update is scaled by ``alpha / rank`` (so changing the rank keeps the update's initial scale).
        targets: the linear layers of every block to adapt, by their last name (:data:`LORA_TARGETS`). Default:
            the attention's q/k/v and output projections (the paper adapts the query and value projections; the
            fused q/k/v layer holds both).
        dropout: dropout on the input of the update only (0: none).
        blocks: 0-based block indices to adapt (default: all).
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("qkv", "proj")
    dropout: float = 0.0
    blocks: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}.")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets must be names among {LORA_TARGETS}, got {list(self.targets)}.")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))

    @classmethod
    def from_any(cls, value: LoRAConfig | Mapping[str, Any] | None) -> LoRAConfig | None:
        """A config from itself, a mapping of its fields (YAML ``lora: {rank: 8}``) or ``None``.

        Raises:
            ValueError: for a key that is not a field (the valid ones are named).
        """
        if value is None or isinstance(value, LoRAConfig):
            return value
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"Unknown LoRA option(s) {unknown}; valid: {sorted(cls.__dataclass_fields__)}.")
        return cls(**dict(value))


class LoRA(nn.Module):
    """The low-rank update of one linear layer: ``forward(x [..., in]) -> (alpha / r) · B A dropout(x)``, [..., out]."""

    def __init__(self, in_features: int, out_features: int, *, rank: int, alpha: float, dropout: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own initialisation, as the paper's code
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scaling

    def delta_weight(self) -> Tensor:
        """``(alpha / r) · B A`` [out, in]: what merging adds to the base weight."""
        return (self.B @ self.A) * self.scaling


def _add_update(module: nn.Linear, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return output + module.lora(args[0])


def _adapted_layers(backbone: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Linear]]:
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ValueError("add_lora: the backbone has no 'blocks' (a DINOv3 ViT is expected).")
    chosen = range(len(blocks)) if config.blocks is None else config.blocks
    bad = [b for b in chosen if not 0 <= b < len(blocks)]
    if bad:
        raise ValueError(f"add_lora: block indices {bad} are not in [0, {len(blocks)}).")
    found = []
    for b in chosen:
        for name, module in blocks[b].named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in config.targets:
                found.append((f"blocks.{b}.{name}", module))
    if not found:
        raise ValueError(f"add_lora: no linear layer named {list(config.targets)} in the chosen blocks.")
    return found


def add_lora(backbone: nn.Module, config: LoRAConfig | Mapping[str, Any]) -> list[str]:
    """Attach a zero-initialised low-rank update to the ``config.targets`` layers of ``backbone``'s blocks, in place,
    and freeze every other backbone weight. Returns the adapted layers' names.

    The backbone's outputs are unchanged until the updates train (``B`` = 0). Adapting a layer twice is an error.

    Raises:
        ValueError: for a bad config, a backbone without blocks, or a layer already adapted.
    """
    config = LoRAConfig.from_any(config)
    assert config is not None
    layers = _adapted_layers(backbone, config)
    for name, layer in layers:
        if hasattr(layer, "lora"):
            raise ValueError(f"add_lora: {name} already has a LoRA update.")
    backbone.requires_grad_(False)
    for _, layer in layers:
        w = layer.weight
        layer.lora = LoRA(layer.in_features, layer.out_features, rank=config.rank, alpha=config.alpha,
                          dropout=config.dropout, device=w.device, dtype=w.dtype)  # fmt: skip
        layer.register_forward_hook(_add_update)
    return [name for name, _ in layers]


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of every LoRA update inside ``module``."""
    return [p for m in module.modules() if isinstance(m, LoRA) for p in m.parameters()]


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoRA) for m in module.modules())


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA update inside ``module`` into its base weight (``W += (alpha / r) · B A``) and remove it, in
    place; returns how many were merged. Outputs are unchanged (to float rounding) and the state dict is back to the
    plain layout (no ``lora`` keys), e.g. to export or to run inference without the extra matrix products."""
    merged = 0
    adapted = [m for m in module.modules() if isinstance(m, nn.Linear) and isinstance(getattr(m, "lora", None), LoRA)]
    for layer in adapted:
        layer.weight.add_(layer.lora.delta_weight().to(layer.weight.dtype))
        for key in [k for k, hook in layer._forward_hooks.items() if hook is _add_update]:
            del layer._forward_hooks[key]
        del layer.lora
        merged += 1
    return merged



def merge_lora_state_dict(
    state: Mapping[str, Tensor], config: LoRAConfig | Mapping[str, Any] | None = None
) -> dict[str, Tensor]:
    """A state dict with its LoRA updates folded into the base weights (``X.weight += (alpha / r) · X.lora.B @
    X.lora.A``) and their keys dropped: the plain layout :func:`merge_lora` gives a module, from the tensors alone
    (e.g. a checkpoint's backbone, to export it). ``config`` gives ``alpha`` (default: :class:`LoRAConfig`'s); the
    rank is read from the tensors.

    Raises:
        ValueError: an update without its base weight or without both of its matrices.
    """
    alpha = (LoRAConfig.from_any(config) or LoRAConfig()).alpha
    out = {k: v for k, v in state.items() if ".lora." not in k}
    prefixes = sorted({k.rsplit(".lora.", 1)[0] for k in state if ".lora." in k})
    for prefix in prefixes:
        a, b, weight = state.get(f"{prefix}.lora.A"), state.get(f"{prefix}.lora.B"), state.get(f"{prefix}.weight")
        if a is None or b is None or weight is None:
            raise ValueError(f"LoRA update {prefix!r} is incomplete (needs {prefix}.lora.A, .lora.B and .weight).")
        delta = (b.double() @ a.double()) * (alpha / a.shape[0])
        out[f"{prefix}.weight"] = (weight.double() + delta).to(weight.dtype)
    return out
