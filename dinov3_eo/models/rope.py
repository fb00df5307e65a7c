"""Axial 2-D rotary position embedding (RoPE) of the DINOv3 ViT.

The embedding has no learnable weights. For a grid of ``H x W`` patches each patch gets the
coordinates of its centre, ``(i + 0.5) / H`` and ``(j + 0.5) / W``, mapped to ``[-1, 1]`` per axis.
With ``D`` the attention head dimension and ``periods[k] = base ** (4k / D)`` (``k < D/4``), the
rotation angles are ``2 pi * coord / period`` for the row coordinate (first ``D/4`` values) then the
column coordinate (next ``D/4``); that ``D/2`` vector is tiled twice to ``D`` and used in the
half-split convention ``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``.

``periods`` is a *persistent* buffer, as in the official checkpoints (so they load strictly and a
checkpoint's stored periods win over recomputed ones); timm keeps it non-persistent instead.

During training only, coordinates may be augmented: ``shift`` adds ``U(-s, s)`` per axis, ``jitter``
multiplies each axis by its own log-uniform factor in ``[1/j, j]``, ``rescale`` multiplies both axes by
one log-uniform factor in ``[1/r, r]`` (``r = 2`` for every released model). In eval mode the embedding
is deterministic. Everything is computed in float32; :func:`rope_apply` casts back to the input dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def rotate_half(x: Tensor) -> Tensor:
    """Half-split rotation ``[a, b] -> [-b, a]`` on the last dimension (..., D) -> (..., D)."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def rope_apply(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Rotate ``x`` (..., N, D) by angles given as ``sin``/``cos`` broadcastable to it (e.g. (N, D)).

    The rotation runs in the dtype of ``sin`` (float32) and the result is cast back to ``x.dtype``.
    """
    dtype = x.dtype
    x = x.to(sin.dtype)
    return (x * cos + rotate_half(x) * sin).to(dtype)


def rotate_by(
    x: Tensor, sin: Tensor, cos: Tensor, *, transpose: bool = False, convert_first: bool | None = None
) -> Tensor:
    """The RoPE rotation ``R x`` of :func:`rope_apply` (``Rᵀ x`` with ``transpose``), in ``cos``'s dtype.

    With halves ``x = [a, b]``: ``R x = x·cos + [−b·sin₁, a·sin₂]`` and ``Rᵀ x = x·cos + [b·sin₂, −a·sin₁]``
    (``sin = [sin₁, sin₂]``); three passes, no ``rotate_half`` copy.

    Args:
        x: [..., N, D] any float dtype; may be a strided view.
        sin, cos: [N, D] (broadcastable), float32 normally.
        transpose: apply ``Rᵀ`` (the backward of ``R``).
        convert_first: copy ``x`` to ``cos``'s dtype before the products (``None``: on a CPU, whose mixed-dtype loops
            are unvectorised); otherwise the first product promotes half-precision ``x`` as it reads it, which saves
            a float32 copy of ``x`` and its second read. The values are the same either way (the conversion is exact).

    Returns:
        [..., N, D], a new dense tensor in ``cos``'s dtype.
    """
    if convert_first is None:
        convert_first = x.device.type == "cpu"
    if convert_first:
        x = x.to(cos.dtype)
    half = x.shape[-1] // 2
    first, second = (sin[..., half:], sin[..., :half]) if transpose else (sin[..., :half], sin[..., half:])
    sign = 1.0 if transpose else -1.0
    out = x * cos
    out[..., :half].addcmul_(x[..., half:], first, value=sign)
    out[..., half:].addcmul_(x[..., :half], second, value=-sign)
    return out


class _RopeRotation(torch.autograd.Function):
    """RoPE with its backward written out: the gradient is ``Rᵀ g``, three passes in float32 and one cast, where
    autograd through the in-place halves would add a cast of ``g``, a zero-filled full-size tensor per half
    (``slice_backward``) and the sums of those."""

    @staticmethod
    def forward(ctx, x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
        ctx.save_for_backward(sin, cos)
        ctx.x_dtype = x.dtype
        return rotate_by(x, sin, cos).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        sin, cos = ctx.saved_tensors
        return rotate_by(grad, sin, cos, transpose=True).to(ctx.x_dtype), None, None


def rope_apply_fast(x: Tensor, sin: Tensor, cos: Tensor) -> Tensor:
    """Same result as :func:`rope_apply` (rotation in ``sin``'s dtype, result in ``x``'s) with less memory traffic:
    no ``rotate_half(x)`` copy, half-precision ``x`` promoted inside the first product on a GPU, and a written-out
    backward (:class:`_RopeRotation`). ``sin``/``cos`` are constants here: if either needs a gradient, the
    rotation runs through autograd instead.
    """
    if sin.requires_grad or cos.requires_grad:
        return rotate_by(x, sin, cos, convert_first=True).to(x.dtype)
    return _RopeRotation.apply(x, sin, cos)


def patch_centre_coords(H: int, W: int, *, device: torch.device | None = None) -> Tensor:
    """Patch-centre coordinates of an ``H x W`` grid in [-1, 1], row-major: (H*W, 2) as (row, col)."""
    rows = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H  # [H]
    cols = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W  # [W]
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1)  # [H, W, 2]
    return 2.0 * grid.flatten(0, 1) - 1.0  # [HW, 2]


class RopePositionEmbedding(nn.Module):
    """Axial 2-D RoPE for heads of dimension ``head_dim`` (see the module docstring for the maths).

    Args:
        head_dim: attention head dimension ``D``; must be divisible by 4.
        base: period base (100 for DINOv3).
        shift_coords: training-only additive coordinate shift ``s`` (``None`` = off).
        jitter_coords: training-only per-axis log-uniform factor bound ``j >= 1`` (``None`` = off).
        rescale_coords: training-only shared log-uniform factor bound ``r >= 1`` (``None`` = off).
        device: where to allocate the ``periods`` buffer.

    Raises:
        ValueError: if ``head_dim`` is not a positive multiple of 4 or an augmentation bound is invalid.
    """

    def __init__(
        self,
        *,
        head_dim: int,
        base: float = 100.0,
        shift_coords: float | None = None,
        jitter_coords: float | None = None,
        rescale_coords: float | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if head_dim <= 0 or head_dim % 4 != 0:
            raise ValueError(f"RopePositionEmbedding: head_dim must be a positive multiple of 4, got {head_dim}.")
        for arg, value in (("jitter_coords", jitter_coords), ("rescale_coords", rescale_coords)):
            if value is not None and value < 1.0:
                raise ValueError(f"RopePositionEmbedding: {arg} is a factor bound and must be >= 1, got {value}.")
        if shift_coords is not None and shift_coords < 0:
            raise ValueError(f"RopePositionEmbedding: shift_coords must be >= 0, got {shift_coords}.")
        self.head_dim = head_dim
        self.base = float(base)
        self.shift_coords = shift_coords
        self.jitter_coords = jitter_coords
        self.rescale_coords = rescale_coords
        # NaN until reset_parameters() so that a forgotten init fails loudly
        self.register_buffer(
            "periods", torch.full((head_dim // 4,), float("nan"), device=device, dtype=torch.float32), persistent=True
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Compute ``periods[k] = base ** (2k / (D/2))`` for ``k < D/4``."""
        if self.periods.is_meta:
            return
        k = torch.arange(self.head_dim // 4, device=self.periods.device, dtype=torch.float32)  # [D/4]
        with torch.no_grad():
            self.periods.copy_(self.base ** (2.0 * k / (self.head_dim // 2)))

    def extra_repr(self) -> str:
        return (
            f"head_dim={self.head_dim}, base={self.base}, shift={self.shift_coords}, "
            f"jitter={self.jitter_coords}, rescale={self.rescale_coords}"
        )

    def _augment(self, coords: Tensor, count: int) -> Tensor:
        """Training-time augmentation of (HW, 2) coordinates, one draw per table: [count, HW, 2] (each table's draw
        is shared by the whole batch)."""
        device, dtype = coords.device, coords.dtype
        coords = coords.expand(count, -1, -1)  # [count, HW, 2]
        if self.shift_coords is not None:
            shift = torch.empty(count, 1, 2, device=device, dtype=dtype).uniform_(-self.shift_coords, self.shift_coords)
            coords = coords + shift
        if self.jitter_coords is not None:
            log_j = math.log(self.jitter_coords)
            jitter = torch.empty(count, 1, 2, device=device, dtype=dtype).uniform_(-log_j, log_j).exp()
            coords = coords * jitter
        if self.rescale_coords is not None:
            log_r = math.log(self.rescale_coords)
            rescale = torch.empty(count, 1, 1, device=device, dtype=dtype).uniform_(-log_r, log_r).exp()
            coords = coords * rescale
        return coords

    def tables(self, *, H: int, W: int, count: int) -> tuple[Tensor, Tensor]:
        """``count`` sine and cosine tables for an ``H x W`` patch grid, each with its own augmentation draw in
        training (all equal in eval mode): two float32 tensors [count, H*W, head_dim].

        A training forward pass wants a fresh table per block (as upstream draws them); made together they cost one
        set of launches instead of one per block, which a GPU step, bound by the host's launches, feels.
        """
        coords = patch_centre_coords(H, W, device=self.periods.device)  # [HW, 2]
        coords = self._augment(coords, count) if self.training else coords.expand(count, -1, -1)  # [count, HW, 2]
        periods = self.periods.to(torch.float32)
        angles = (2.0 * math.pi) * coords[..., None] / periods  # [count, HW, 2, D/4]
        angles = angles.flatten(-2).repeat(1, 1, 2)  # [count, HW, D]: h-frequencies, w-frequencies, repeated
        return angles.sin(), angles.cos()

    def forward(self, *, H: int, W: int) -> tuple[Tensor, Tensor]:
        """Sine and cosine tables for an ``H x W`` patch grid: two float32 tensors of shape (H*W, head_dim)."""
        sin, cos = self.tables(H=H, W=W, count=1)
        return sin[0], cos[0]
