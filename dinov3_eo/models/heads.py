"""DINO / iBOT projection heads (one class; DINOv3 trains two separate instances)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """MLP → bottleneck → L2-normalise → bias-free prototype layer (no weight norm by default, unlike DINOv2).

    Layout for ``nlayers=3`` (state-dict keys ``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer.weight``)::

        Linear(in, hidden) GELU Linear(hidden, hidden) GELU Linear(hidden, bottleneck) → normalise → last_layer

    Official sizes: 65,536 prototypes / hidden 2048 / bottleneck 256 (default); 7B recipe DINO 262,144 / 8192 / 512
    and iBOT 98,304 / 4096 / 384.

    Args:
        in_dim: backbone embedding size D.
        out_dim: number of prototypes K.
        hidden_dim: width of the hidden layers.
        bottleneck_dim: size of the normalised bottleneck.
        nlayers: number of Linear layers in the MLP (≥ 1; 1 means a single in→bottleneck projection).
        norm_last_layer: L2-normalise every prototype at use, so logits are cosines (DINOv1/v2's weight norm with
            the gain fixed at 1). DINOv3 drops it; short runs need it: free prototypes shrink towards uniform
            outputs before the teacher's features have spread (README, "Pretraining learning check").
        device: where to allocate the parameters.

    Raises:
        ValueError: if a size is not positive.
    """

    def __init__(
        self,
        in_dim: int,
        *,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("bottleneck_dim", bottleneck_dim), ("nlayers", nlayers)):
            if value < 1:
                raise ValueError(f"DINOHead: {name} must be >= 1, got {value}.")
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim
        self.norm_last_layer = norm_last_layer
        if nlayers == 1:
            layers: list[nn.Module] = [nn.Linear(in_dim, bottleneck_dim, device=device)]
        else:
            layers = [nn.Linear(in_dim, hidden_dim, device=device), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim, device=device), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, device=device))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False, device=device)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated normal (std 0.02) weights, zero biases, for every Linear including the prototypes."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor, no_last_layer: bool = False, only_last_layer: bool = False) -> Tensor:
        """Project tokens to prototype logits.

        Args:
            x: [..., in_dim] tokens, or [..., bottleneck_dim] bottleneck vectors when ``only_last_layer``.
            no_last_layer: stop after the normalised bottleneck (returns [..., bottleneck_dim]).
            only_last_layer: apply only the prototype layer to an already normalised bottleneck.

        Returns:
            [..., out_dim] logits (or the bottleneck, see above).
        """
        if not only_last_layer:
            x = self.mlp(x)
            eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows in fp16
            x = F.normalize(x, p=2, dim=-1, eps=eps)
        if not no_last_layer:
            if self.norm_last_layer:
                x = F.linear(x, F.normalize(self.last_layer.weight, dim=1))
            else:
                x = self.last_layer(x)
        return x


def checkpoint_norm_last_layer(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a training checkpoint's heads were trained with unit-norm prototypes (``norm_last_layer``).

    Same weights, other meaning: read as raw prototypes they would change every logit. Checkpoints from before the
    option, and official ones, have raw prototypes.
    """
    return bool(checkpoint.get("hyper_parameters", {}).get("norm_last_layer", False))
