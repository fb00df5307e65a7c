"""Gram anchoring: keep the student's patch-to-patch similarity structure close to a frozen Gram teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class _GramSquaredError(torch.autograd.Function):
    """``Σ_b Σ_ij (G_b^S − G_b^T)²_ij`` with ``G_b = X_b X_bᵀ`` (optionally clamped at 0), in row blocks.

    Neither pass ever holds more than ``chunk_rows × P`` Gram entries. The backward pass recomputes each block
    and uses the closed form ``∂L/∂S_b = 4 · (E_b ⊙ M_b) S_b`` with ``E_b = G_b^S − G_b^T`` (both clamped when
    ``remove_neg``) and ``M_b = 1[S_b S_bᵀ > 0]`` (all ones without ``remove_neg``); E and M are symmetric, hence
    the factor 4. Plain autograd would instead keep every P×P block of the batch alive until the backward.
    Inputs: student [B, P, D], teacher [B, P, D] (constant).
    """

    @staticmethod
    def _block(student: Tensor, teacher: Tensor, rows: slice, remove_neg: bool) -> tuple[Tensor, Tensor]:
        """Error block E[rows] [r, P] and its gradient mask M[rows] (or None-equivalent ones)."""
        gram_student = student[rows] @ student.t()  # [r, P]
        gram_teacher = teacher[rows] @ teacher.t()  # [r, P]
        if remove_neg:
            positive = gram_student > 0
            return gram_student.clamp_min(0.0) - gram_teacher.clamp_min(0.0), positive
        return gram_student - gram_teacher, None

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, remove_neg: bool, chunk_rows: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(student, teacher)
        ctx.remove_neg, ctx.chunk_rows = remove_neg, chunk_rows
        total = student.new_zeros((), dtype=torch.float64)  # 10^7+ terms: accumulate blocks in fp64
        for s_b, t_b in zip(student, teacher):
            for start in range(0, s_b.shape[0], chunk_rows):
                error, _ = _GramSquaredError._block(s_b, t_b, slice(start, start + chunk_rows), remove_neg)
                total += error.square().sum().double()
        return total.to(student.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        student, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        for s_b, t_b, g_b in zip(student, teacher, grad):
            for start in range(0, s_b.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                error, positive = _GramSquaredError._block(s_b, t_b, rows, ctx.remove_neg)
                if positive is not None:
                    error = error * positive
                g_b[rows] = 4.0 * (error @ s_b)  # [r, D]
        return grad * grad_output, None, None, None


def gram_loss(
    student_patches: Tensor,
    teacher_patches: Tensor,
    img_level: bool = True,
    remove_neg: bool = False,
    *,
    normalize: bool = True,
    chunk_rows: int = 1024,
) -> Tensor:
    """Mean squared difference between the student's and the Gram teacher's patch Gram matrices.

    With ``x̂ = x / ‖x‖`` (``normalize``) and, per image b, ``G_b = X̂_b X̂_bᵀ`` (P×P)::

        loss = Σ_b ‖G_b^student − G_b^teacher‖²_F / (B · P · P)

    i.e. ``nn.MSELoss()`` over all B·P² entries as the official code does — *not* the paper's Frobenius sum;
    ``‖·‖²_F summed over images = loss · B · P²``. With ``img_level=False`` the batch is flattened into one
    (B·P)×(B·P) Gram and the mean is over (B·P)² entries. ``remove_neg`` zeroes negative similarities in both
    Grams before the difference. The teacher is treated as a constant. Computed in fp32 (fp64 accumulation
    of the blocks), in row blocks with a closed-form backward, so that ViT-L at 768 px (P = 2304, D = 1024) never
    materialises more than ``chunk_rows × P`` Gram entries at once (see ``_GramSquaredError``).

    Args:
        student_patches: [B, P, D] student patch tokens (final-norm ``x_norm_patchtokens`` of the global crops).
        teacher_patches: [B, P, D] Gram-teacher patch tokens on the same grid (see :func:`resize_patch_features`).
        img_level: one Gram per image (official default) or one Gram over the whole batch.
        remove_neg: zero negative similarities in both Grams.
        normalize: L2-normalise tokens first (official ``normalized: true``).
        chunk_rows: Gram rows computed at once (memory knob; the value does not change the result).

    Returns:
        Scalar loss.

    Raises:
        ValueError: if the two inputs are not [B, P, D] of the same shape, or ``chunk_rows < 1``.
    """
    if student_patches.ndim != 3 or student_patches.shape != teacher_patches.shape:
        raise ValueError(
            "gram_loss: student_patches and teacher_patches must both be [B, P, D] of equal shape, got "
            f"{tuple(student_patches.shape)} and {tuple(teacher_patches.shape)}."
        )
    if chunk_rows < 1:
        raise ValueError(f"gram_loss: chunk_rows must be >= 1, got {chunk_rows}.")
    dtype = torch.promote_types(student_patches.dtype, torch.float32)  # bf16/fp16 -> fp32; fp64 stays
    student = student_patches.to(dtype)
    teacher = teacher_patches.detach().to(dtype)
    if normalize:
        student = F.normalize(student, p=2, dim=-1)
        teacher = F.normalize(teacher, p=2, dim=-1)
    batch, n_patches, _ = student.shape
    if not img_level:
        student, teacher = student.reshape(1, batch * n_patches, -1), teacher.reshape(1, batch * n_patches, -1)
    n_entries = student.shape[0] * student.shape[1] ** 2  # B·P² per image, or (B·P)² for one batch Gram
    return _GramSquaredError.apply(student, teacher, remove_neg, chunk_rows) / n_entries


def resize_patch_features(tokens: Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Tensor:
    """Resample patch tokens from one patch grid to another, as the official Gram teacher does.

    Bicubic, ``align_corners=False``, ``antialias=False`` on the [B, D, h, w] feature map.

    Args:
        tokens: [B, h_src·w_src, D] patch tokens in row-major grid order.
        src_hw: (h_src, w_src) grid of ``tokens``.
        dst_hw: (h_dst, w_dst) target grid (the student's).

    Returns:
        [B, h_dst·w_dst, D] tokens, same dtype as the input.

    Raises:
        ValueError: if ``tokens`` does not hold ``h_src·w_src`` patches.
    """
    h_src, w_src = src_hw
    if tokens.ndim != 3 or tokens.shape[1] != h_src * w_src:
        raise ValueError(
            f"resize_patch_features: tokens must be [B, {h_src}·{w_src}={h_src * w_src}, D] for src_hw={src_hw}, "
            f"got {tuple(tokens.shape)}."
        )
    if tuple(src_hw) == tuple(dst_hw):
        return tokens
    batch, _, dim = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, dim, h_src, w_src)  # [B, D, h_src, w_src]
    resized = F.interpolate(grid.float(), size=tuple(dst_hw), mode="bicubic", align_corners=False, antialias=False)
    return resized.flatten(2).transpose(1, 2).to(tokens.dtype)  # [B, h_dst·w_dst, D]
