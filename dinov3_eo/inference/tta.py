"""Test-time augmentation over the symmetries of a nadir image: flips and quarter turns.

Overhead imagery has no "up": a field, a roof or a tree crown seen from above looks the same flipped or turned by
90°. A ViT with RoPE and a dense head is not equivariant to those changes, so its predictions on a flipped window
differ a little from the flipped prediction; averaging the predictions of the transformed windows (each turned back)
removes that part of the error. ``flips`` averages 4 views (identity, horizontal, vertical, both = a half turn),
``d4`` all 8 elements of the dihedral group of the square (the 4 rotations, each with and without a mirror).
Cost: one model call per view.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

TTA = Literal["flips", "d4"]
TTA_MODES: tuple[str, ...] = ("flips", "d4")
#: Help of the prediction commands' ``--tta`` option.
TTA_HELP = ("test-time augmentation: average the predictions of the flipped (flips: 4 views) or flipped and "
            "quarter-turned (d4: 8 views) windows, each turned back; costs one model call per view")

#: The dihedral elements (see :func:`dihedral`) each mode averages over, the identity first: ``flips`` is the
#: identity, the left-right mirror (4), the top-bottom mirror (6) and the half turn (2).
_VIEWS: dict[str, tuple[int, ...]] = {"flips": (0, 4, 6, 2), "d4": tuple(range(8))}


def dihedral(x: Tensor, k: int) -> Tensor:
    """Element ``k`` (0..7) of the dihedral group of the square applied to the last two dims of ``x`` [..., H, W]:
    ``k % 4`` counter-clockwise quarter turns, then a left-right mirror if ``k >= 4``.

    Returns [..., H, W] for an even ``k % 4``, else [..., W, H]. Used for training augmentation (a random ``k``
    per image: :func:`random_dihedral`) and, with :func:`undo_dihedral`, for test-time augmentation.
    """
    x = torch.rot90(x, k % 4, dims=(-2, -1)) if k % 4 else x
    return torch.flip(x, dims=(-1,)) if k >= 4 else x


def undo_dihedral(y: Tensor, k: int) -> Tensor:
    """The inverse of :func:`dihedral`: ``undo_dihedral(dihedral(x, k), k) == x``."""
    y = torch.flip(y, dims=(-1,)) if k >= 4 else y
    return torch.rot90(y, -(k % 4), dims=(-2, -1)) if k % 4 else y


def random_dihedral(*tensors: Tensor, seed: int, step: int) -> tuple[Tensor, ...]:
    """Random elements of the dihedral group (:func:`dihedral`: flips and quarter turns), one per image, applied alike
    to the last two dims of every tensor (an image ``[B, C, H, W]`` and its labels ``[B, H, W]``): training
    augmentation for overhead imagery, which has no up or down.

    Square images each get their own element; where ``H != W`` a quarter turn would change the shape of one image
    but not another's, so the batch shares one element. The elements are drawn from a CPU generator seeded by
    ``(seed, step)``, so a run resumed at a step draws what the uninterrupted run drew, and nothing is copied to or
    read back from a GPU (each image is sliced and moved on its own device).
    """
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    batch = tensors[0].shape[0] if tensors[0].dim() >= 3 else 1
    if batch == 1 or tensors[0].shape[-2] != tensors[0].shape[-1]:
        k = int(torch.randint(8, (1,), generator=gen))
        return tuple(dihedral(t, k) for t in tensors)
    ks = torch.randint(8, (batch,), generator=gen).tolist()
    return tuple(torch.cat([dihedral(t[b : b + 1], k) for b, k in enumerate(ks)]) for t in tensors)


def tta_views(mode: str) -> tuple[int, ...]:
    """The dihedral elements ``k`` (:func:`dihedral`) a TTA mode averages over, the identity first.

    Raises:
        ValueError: for an unknown mode.
    """
    if mode not in _VIEWS:
        raise ValueError(f"tta must be one of {TTA_MODES} (or None), got {mode!r}.")
    return _VIEWS[mode]


def _activate(y: Tensor, activation: str) -> Tensor:
    if activation == "softmax":
        return y.softmax(dim=1)
    if activation == "sigmoid":
        return y.sigmoid()
    return y


class TestTimeAugmented(nn.Module):
    """``model`` averaged over the views of a TTA mode: ``forward(x [B, C, H, W]) -> [B, K, H, W]``.

    Each view's output is activated (``softmax`` over K, ``sigmoid`` or ``none``) in float32 before the average, so
    class probabilities are averaged rather than logits (a confident view cannot outvote the others by its scale);
    the result is already activated, so the caller applies no further activation. Views run one after another:
    memory stays that of one model call.

    Args:
        model: a dense predictor mapping [B, C, h, w] to [B, K, h, w] for any window shape the views make (a
            non-square window is also fed transposed).
        mode: ``flips`` or ``d4`` (see :func:`tta_views`).
        activation: applied to each view's output before averaging.
    """

    __test__ = False  # not a pytest class, despite its name

    def __init__(self, model: Callable[[Tensor], Tensor], mode: TTA, activation: str = "none") -> None:
        super().__init__()
        if activation not in ("softmax", "sigmoid", "none"):
            raise ValueError(f"activation must be 'softmax', 'sigmoid' or 'none', got {activation!r}.")
        self.views = tta_views(mode)
        self.mode = mode
        self.activation = activation
        # registered as a submodule when it is one, so eval()/train() and .parameters() (the device) reach it
        self.model = model if isinstance(model, nn.Module) else _CallableModule(model)
        self.train(self.model.training)  # take the wrapped model's mode, so that restoring ours restores its

    def forward(self, x: Tensor) -> Tensor:
        total: Tensor | None = None
        for k in self.views:
            y = self.model(dihedral(x, k))
            if not isinstance(y, Tensor) or y.ndim != 4:
                return y  # let the caller's shape check name the problem
            y = undo_dihedral(_activate(y.float(), self.activation), k)
            total = y if total is None else total + y  # out of place: y may be the model's own (cached) tensor
        assert total is not None
        return total / len(self.views)


class _CallableModule(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)
