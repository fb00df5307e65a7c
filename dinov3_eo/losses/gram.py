"""Gram anchoring: keep the student's patch-to-patch similarity structure close to a frozen Gram teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def _chunk_squared_error(
    student_rows: Tensor, student_all: Tensor, teacher_rows: Tensor, teacher_all: Tensor, remove_neg: bool
) -> Tensor:
    """Σ over a block of Gram rows of (G_student − G_teacher)²; inputs [r, D] and [n, D]."""
    gram_student = student_rows @ student_all.t()  # [r, n]
    gram_teacher = teacher_rows @ teacher_all.t()  # [r, n]
    if remove_neg:
        gram_student = gram_student.clamp_min(0.0)
        gram_teacher = gram_teacher.clamp_min(0.0)
    return (gram_student - gram_teacher).square().sum()


def _sum_squared_gram_error(student: Tensor, teacher: Tensor, remove_neg: bool, chunk_rows: int) -> Tensor:
    """Σ_ij (S Sᵀ − T Tᵀ)²_ij for one set of tokens [n, D], never holding more than chunk_rows × n entries.

    Each row block is checkpointed, so autograd keeps only the inputs and recomputes the block's Gram rows in
    the backward pass: peak memory is O(chunk_rows · n) instead of O(n²) per image.
    """
    total = student.new_zeros(())
    needs_grad = torch.is_grad_enabled() and student.requires_grad
    for start in range(0, student.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (student[rows], student, teacher[rows], teacher, remove_neg)
        if needs_grad:
            total = total + checkpoint(_chunk_squared_error, *args, use_reentrant=False)
        else:
            total = total + _chunk_squared_error(*args)
    return total


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
    Grams before the difference. The teacher is treated as a constant. Computed in fp32, in checkpointed
    row blocks so that ViT-L at 768 px (P = 2304, D = 1024) never materialises a full batch of P×P matrices.

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
    student = student_patches.float()
    teacher = teacher_patches.detach().float()
    if normalize:
        student = F.normalize(student, p=2, dim=-1)
        teacher = F.normalize(teacher, p=2, dim=-1)
    batch, n_patches, _ = student.shape
    if not img_level:
        flat_student = student.flatten(0, 1)  # [B·P, D]
        flat_teacher = teacher.flatten(0, 1)
        return _sum_squared_gram_error(flat_student, flat_teacher, remove_neg, chunk_rows) / (batch * n_patches) ** 2
    total = student.new_zeros(())
    for b in range(batch):
        total = total + _sum_squared_gram_error(student[b], teacher[b], remove_neg, chunk_rows)
    return total / (batch * n_patches * n_patches)


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
