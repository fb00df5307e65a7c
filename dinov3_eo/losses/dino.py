"""DINO loss on the class token: student crops predict the teacher's Sinkhorn-centred global-crop assignments.

Crop layout used throughout dinov3_eo: crops are stacked *crop-major*, i.e. a tensor of ``n_crops · B`` rows
holds crop 0 of every image, then crop 1 of every image, ... (the order of ``ssl.crops`` and of the official
collate). ``logits.view(n_crops, B, K)`` therefore recovers [crop, image, prototype].
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from functools import reduce

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3_eo.losses.cross_entropy import scaled_difference


def pair_cross_entropies(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """``pair[s, t] = −Σ_{b,k} p[t,b,k] · log_softmax(z[s,b] / τ_s)[k]``: every student crop against every teacher
    crop, summed over the images.

    Args:
        student_logits: [S, B, K] (any float dtype). teacher_probs: [T, B, K], constants. student_temp: τ_s.

    Returns:
        [S, T] float32 (float64 for float64 logits), whatever the caller's autocast.
    """
    # float32 whatever the caller's autocast: under bf16 the product would round log-probabilities near -log K to
    # steps of 1/16 (a GPU run logged DINO terms such as 11.0625)
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 -> fp32; fp64 stays fp64
        # z / τ promoted in one pass (no separate float32 copy of bf16 logits first)
        scaled = scaled_difference(student_logits, student_logits.new_zeros(1, dtype=dtype), student_temp)
        log_p_student = F.log_softmax(scaled, dim=-1)  # [S, B, K]
        teacher = teacher_probs.detach().to(dtype)
        return -torch.einsum("sbk,tbk->st", log_p_student, teacher)  # [S, T]: summed over images and prototypes


def dino_cross_entropy(
    student_logits: Tensor, teacher_probs: Tensor, *, student_temp: float = 0.1, ignore_diagonal: bool = False
) -> Tensor:
    """Mean cross-entropy between every student crop and every teacher crop of the same image.

    ``loss = -Σ_{s,t,b,k} p[t,b,k] · log_softmax(z[s,b] / τ_s)[k] / n_pairs`` with
    ``n_pairs = B·S·T``, or, with ``ignore_diagonal``, the pairs ``s == t`` (same crop seen by both networks,
    ``s, t < min(S, T)``) left out and ``n_pairs = B·(S·T − min(S, T))``.

    Args:
        student_logits: [S, B, K] student head outputs for S crops (unscaled logits).
        teacher_probs: [T, B, K] teacher assignment probabilities (e.g. ``sinkhorn_knopp`` output viewed as
            [T, B, K]); treated as constants.
        student_temp: student temperature τ_s (0.1 officially).
        ignore_diagonal: leave out same-crop pairs (used for global-vs-global: ``global_ignore_diagonal``).

    Returns:
        Scalar loss (mean over the counted pairs and images), float32, or float64 for float64 logits.

    Raises:
        ValueError: if the shapes are not [S, B, K] and [T, B, K] with matching B and K.
    """
    if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            "dino_cross_entropy: expected student_logits [S, B, K] and teacher_probs [T, B, K] with equal B and K, "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}."
        )
    pair_ce = pair_cross_entropies(student_logits, teacher_probs, student_temp)  # [S, T]
    return mean_over_pairs(pair_ce, student_logits.shape[1], ignore_diagonal=ignore_diagonal)


def crop_pairs(n_student: int, n_teacher: int, *, ignore_diagonal: bool) -> int:
    """Student/teacher crop pairs of one image: ``S·T``, less the ``min(S, T)`` same-crop pairs with
    ``ignore_diagonal``."""
    return n_student * n_teacher - (min(n_student, n_teacher) if ignore_diagonal else 0)


def mean_over_pairs(pair_ce: Tensor, batch: int, *, ignore_diagonal: bool) -> Tensor:
    """Mean of [S, T] pair cross-entropies (each summed over ``batch`` images) over the counted pairs and images.

    Raises:
        ValueError: if no pair is left.
    """
    n_student, n_teacher = pair_ce.shape
    n_pairs = crop_pairs(n_student, n_teacher, ignore_diagonal=ignore_diagonal)
    if n_pairs == 0:
        raise ValueError(f"dino_cross_entropy: no crop pairs left ({n_student} student, {n_teacher} teacher crops).")
    if ignore_diagonal:
        # zeroed, not indexed out: a boolean index would read the mask back from the device (a GPU sync per step)
        same_crop = torch.eye(n_student, n_teacher, dtype=torch.bool, device=pair_ce.device)
        pair_ce = pair_ce.masked_fill(same_crop, 0.0)
    return pair_ce.sum() / (batch * n_pairs)


@dataclass(frozen=True)
class DinoLossTerms:
    """The two unweighted DINO terms and the crop counts needed to weight them (see :func:`dino_total`)."""

    global_loss: Tensor
    local_loss: Tensor | None
    n_global_crops: int
    n_local_crops: int


def dino_losses(
    student_global_logits: Tensor,
    student_local_logits: Tensor | None,
    teacher_probs: Tensor,
    *,
    batch_size: int,
    student_temp: float = 0.1,
) -> DinoLossTerms:
    """DINO global and local terms, unweighted.

    - global: student global crop s vs teacher global crop t for ``s ≠ t`` (mean over B·(G·G − G) pairs);
    - local: every student local crop vs every teacher global crop (mean over B·L·G pairs).

    Args:
        student_global_logits: [G·B, K] student DINO-head logits of the G global crops (crop-major).
        student_local_logits: [L·B, K] logits of the L local crops (crop-major), or ``None`` without local crops.
        teacher_probs: [G·B, K] teacher probabilities of the global crops (``sinkhorn_knopp`` output).
        batch_size: B, images per crop on this rank.
        student_temp: student temperature (0.1).

    Raises:
        ValueError: if a row count is not a multiple of ``batch_size``.
    """
    for name, t in (("student_global_logits", student_global_logits), ("teacher_probs", teacher_probs)):
        if t.ndim != 2 or t.shape[0] % batch_size:
            raise ValueError(f"dino_losses: {name} must be [n_crops·{batch_size}, K], got {tuple(t.shape)}.")
    n_global = teacher_probs.shape[0] // batch_size
    teacher = teacher_probs.view(n_global, batch_size, -1)  # [G, B, K]
    student_global = student_global_logits.view(-1, batch_size, student_global_logits.shape[-1])  # [G, B, K]
    global_loss = dino_cross_entropy(student_global, teacher, student_temp=student_temp, ignore_diagonal=True)
    local_loss = None
    n_local = 0
    if student_local_logits is not None and student_local_logits.shape[0] > 0:
        if student_local_logits.ndim != 2 or student_local_logits.shape[0] % batch_size:
            raise ValueError(
                f"dino_losses: student_local_logits must be [n_crops·{batch_size}, K], "
                f"got {tuple(student_local_logits.shape)}."
            )
        student_local = student_local_logits.view(-1, batch_size, student_local_logits.shape[-1])  # [L, B, K]
        n_local = student_local.shape[0]
        local_loss = dino_cross_entropy(student_local, teacher, student_temp=student_temp)
    return DinoLossTerms(global_loss, local_loss, n_global, n_local)


def stacked_crop_counts(student_logits: Tensor, teacher_probs: Tensor, batch_size: int) -> tuple[int, int]:
    """(G, L): the global and local crops of stacked [(G + L)·B, K] student logits against [G·B, K] teacher targets.

    Raises:
        ValueError: if a row count is not a multiple of ``batch_size``, there are fewer student than teacher rows, or
            a single global crop (no pair left).
    """
    n_rows, n_global_rows = student_logits.shape[0], teacher_probs.shape[0]
    if (student_logits.ndim != 2 or teacher_probs.ndim != 2 or n_rows % batch_size or n_global_rows % batch_size
            or n_rows < n_global_rows):
        raise ValueError(f"dino losses: expected student_logits [(G + L)·{batch_size}, K] and teacher_probs "
                         f"[G·{batch_size}, K], got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}.")
    n_global = n_global_rows // batch_size
    if n_global < 2:
        raise ValueError(f"dino losses: no crop pairs left ({n_global} global crop).")
    return n_global, n_rows // batch_size - n_global


def dino_losses_stacked(
    student_logits: Tensor, teacher_probs: Tensor, *, batch_size: int, student_temp: float = 0.1
) -> DinoLossTerms:
    """:func:`dino_losses` on the student's logits of every crop in one tensor, global crops first.

    One pass over all the crops (:func:`pair_cross_entropies`), whose [G + L, G] pair matrix is then split: slicing
    the [(G + L)·B, K] logits into global and local crops first would give each slice a zero-filled gradient of the
    whole tensor and a sum of the two in the backward (2.5 instead of 2.0 GiB read and written at ViT-S batch 64,
    65,536 prototypes, forward and backward, counted per aten op).

    Args:
        student_logits: [(G + L)·B, K] DINO-head logits of the G global then L local crops (crop-major), G from
            ``teacher_probs``.
        teacher_probs: [G·B, K] teacher probabilities of the global crops.
        batch_size: B. student_temp: τ_s.

    Raises:
        ValueError: see :func:`stacked_crop_counts`.
    """
    n_global, n_local = stacked_crop_counts(student_logits, teacher_probs, batch_size)
    n_crops = n_global + n_local
    pair = pair_cross_entropies(student_logits.view(n_crops, batch_size, -1),
                                teacher_probs.view(n_global, batch_size, -1), student_temp)  # [G + L, G]
    global_loss = mean_over_pairs(pair[:n_global], batch_size, ignore_diagonal=True)
    local_loss = mean_over_pairs(pair[n_global:], batch_size, ignore_diagonal=False) if n_local else None
    return DinoLossTerms(global_loss, local_loss, n_global, n_local)


def dino_crop_targets(teacher_probs: Tensor, batch_size: int) -> Tensor:
    """Each student crop's summed DINO target, as rows of a table, for one cross-entropy per student row.

    Student crop ``s`` of image ``b`` is compared with every teacher global crop ``t ≠ s`` of the image, so its
    summed cross-entropy is one cross-entropy against ``Σ_{t≠s} p[t, b]`` (target mass G − 1 for a global crop,
    G for a local one). The table holds those sums: row ``b`` ``Σ_t p[t, b]`` (local crops), row ``(1 + s)·B + b``
    ``Σ_{t≠s} p[t, b]`` (global crop s; for G = 2 exactly the other crop's row).

    Args:
        teacher_probs: [G·B, K] teacher probabilities of the global crops (crop-major).
        batch_size: B.

    Returns:
        [(1 + G)·B, K] in ``teacher_probs``' dtype, float32 at least; :func:`dino_target_index` gives each student
        row's row.
    """
    n_global = teacher_probs.shape[0] // batch_size
    p = teacher_probs.view(n_global, batch_size, -1).to(torch.promote_types(teacher_probs.dtype, torch.float32))
    # summed crop by crop over views of p: an index list would be copied to the GPU (a sync mid-step)
    rest = [[p[t] for t in range(n_global) if t != s] for s in range(n_global)]
    others = [reduce(operator.add, rows) if rows else torch.zeros_like(p[0]) for rows in rest]  # [B, K] each
    return torch.cat([p.sum(dim=0)] + others)  # [(1 + G)·B, K]


def dino_target_index(n_global: int, batch_size: int, n_local: int = 0, *,
                      device: torch.device | str = "cpu") -> Tensor:
    """Row of :func:`dino_crop_targets`' table for each student row (G global crops, then ``n_local`` local ones,
    crop-major): ``(1 + s)·B + b`` for global crop s, ``b`` for every local crop. [(G + L)·B] int32."""
    image = torch.arange(batch_size, dtype=torch.int32, device=device)
    rows = [(1 + s) * batch_size + image for s in range(n_global)] + [image] * n_local
    return torch.cat(rows)


def dino_losses_fused(
    student_logits: Tensor, teacher_probs: Tensor, *, batch_size: int, student_temp: float = 0.1
) -> DinoLossTerms:
    """:func:`dino_losses_stacked` as one Triton cross-entropy over all the student's crops (CUDA only).

    Every student row is read once against its summed target (:func:`dino_crop_targets`) and its gradient written
    once, into the stacked tensor itself: about 0.7 GiB read and written at ViT-S batch 64 (10 crops, 65,536
    prototypes), forward and backward, against 2.0 GiB for :func:`dino_losses_stacked` (each row's float32 target row
    is read with it, from a table of 3·B rows). Same terms, up to float32 summation order.
    """
    from dinov3_eo.losses.logit_kernels import indexed_cross_entropy

    n_global, n_local = stacked_crop_counts(student_logits, teacher_probs, batch_size)
    n_global_rows = n_global * batch_size
    table = dino_crop_targets(teacher_probs, batch_size)
    index = dino_target_index(n_global, batch_size, n_local, device=student_logits.device)
    ce = indexed_cross_entropy(student_logits.contiguous(), table, index, student_temp=student_temp)  # [(G+L)·B]
    global_loss = ce[:n_global_rows].sum() / (batch_size * crop_pairs(n_global, n_global, ignore_diagonal=True))
    local_loss = (ce[n_global_rows:].sum() / (batch_size * crop_pairs(n_local, n_global, ignore_diagonal=False))
                  if n_local else None)
    return DinoLossTerms(global_loss, local_loss, n_global, n_local)


def dino_term_scales(n_global_crops: int, n_local_crops: int) -> tuple[float, float]:
    """Official weights of the global and local DINO terms: each term's share of the crop pairs.

    ``global pairs = G·(G−1)`` (diagonal ignored), ``local pairs = G·L``; scale = pairs / all pairs.
    For G=2, L=8: (2/18, 16/18) = (1/9, 8/9).
    """
    global_pairs = n_global_crops * (n_global_crops - 1)
    local_pairs = n_global_crops * n_local_crops
    total = global_pairs + local_pairs
    return global_pairs / total, local_pairs / total


def dino_total(terms: DinoLossTerms, *, loss_weight: float = 1.0, local_loss_weight: float = 1.0) -> Tensor:
    """Weighted DINO loss as the official ``compute_losses`` adds it to the total::

        loss_weight · (s_g · global + s_l · local_loss_weight · local),  (s_g, s_l) = dino_term_scales(G, L)

    ``local_loss_weight`` is the ``reweight_dino_local_loss`` schedule value (1 → 0.5 in the Gram stage,
    0.5 in high-resolution adaptation, 1 otherwise).
    """
    global_scale, local_scale = dino_term_scales(terms.n_global_crops, terms.n_local_crops)
    total = global_scale * terms.global_loss
    if terms.local_loss is not None:
        total = total + local_scale * local_loss_weight * terms.local_loss
    return loss_weight * total
