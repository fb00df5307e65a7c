"""iBOT loss: masked patch tokens of the student's global crops predict the teacher's centred patch assignments."""

from __future__ import annotations

from torch import Tensor

from dinov3_eo.losses.cross_entropy import soft_cross_entropy
from dinov3_eo.losses.sinkhorn import SinkhornAssignments


def masks_weight_from_masks(masks: Tensor) -> Tensor:
    """Per-masked-token weight ``1 / (masked tokens in its image)``, in the order of ``masks.nonzero()``.

    Args:
        masks: [N_img, N] bool, True where the student sees a mask token.

    Returns:
        [M] fp32, M = masks.sum(); the weights of one image sum to 1.
    """
    per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [N_img, 1]
    return (1.0 / per_image).expand(masks.shape)[masks]  # [M]


def ibot_loss(
    student_masked_logits: Tensor,
    teacher_masked_probs: Tensor | SinkhornAssignments,
    masks_weight: Tensor,
    n_images: int,
    *,
    student_temp: float = 0.1,
) -> Tensor:
    """Weighted cross-entropy over masked patch tokens.

    ``loss = -Σ_m w_m Σ_k p[m,k] · log_softmax(z[m] / τ_s)[k] / n_images`` with ``w_m = 1/(masked tokens in
    m's image)``, so every masked image contributes the mean CE of its masked tokens and ``n_images`` counts
    *all* global-crop images on this rank (2·B), masked or not (unmasked images contribute 0).

    Args:
        student_masked_logits: [M, K] student iBOT-head logits at the masked positions.
        teacher_masked_probs: [M, K] teacher probabilities at the same positions (``sinkhorn_knopp`` output), or
            the same kept factorised (``sinkhorn_assignments`` output): then the cross-entropy runs as Triton
            kernels that never write the [M, K] assignments (:mod:`~dinov3_eo.losses.logit_kernels`).
        masks_weight: [M] weights (``masks_weight_from_masks`` / the ``masks_weight`` of ``ssl.masking``).
        n_images: number of global-crop images on this rank, 2·B.
        student_temp: student temperature (0.1).

    Returns:
        Scalar fp32 loss (0 when M = 0, still connected to the graph).

    Raises:
        ValueError: on mismatched shapes or ``n_images < 1``.
    """
    if student_masked_logits.shape != teacher_masked_probs.shape or student_masked_logits.ndim != 2:
        raise ValueError(
            "ibot_loss: student_masked_logits and teacher_masked_probs must both be [M, K], got "
            f"{tuple(student_masked_logits.shape)} and {tuple(teacher_masked_probs.shape)}."
        )
    if masks_weight.shape != student_masked_logits.shape[:1]:
        raise ValueError(
            f"ibot_loss: masks_weight must be [M={student_masked_logits.shape[0]}], got {tuple(masks_weight.shape)}."
        )
    if n_images < 1:
        raise ValueError(f"ibot_loss: n_images must be >= 1, got {n_images}.")
    if isinstance(teacher_masked_probs, SinkhornAssignments):
        from dinov3_eo.losses.logit_kernels import assignment_cross_entropy

        t = teacher_masked_probs
        token_ce = assignment_cross_entropy(student_masked_logits.contiguous(), t.logits, t.shift, t.row_scale,
                                            t.col_scale, student_temp=student_temp, teacher_temp=t.temperature)
    else:
        token_ce = soft_cross_entropy(student_masked_logits, teacher_masked_probs, student_temp)  # [M]
    return (token_ce * masks_weight.float()).sum() / n_images


def gather_masked_tokens(tokens: Tensor, mask_indices: Tensor) -> Tensor:
    """Select masked patch tokens with the flat indices of ``ssl.masking``.

    Args:
        tokens: [N_img, N, D] patch tokens (e.g. ``x_norm_patchtokens`` of the global crops).
        mask_indices: [M] long indices into the flattened [N_img·N] positions.

    Returns:
        [M, D] tokens in the order of ``mask_indices``.
    """
    return tokens.flatten(0, 1).index_select(0, mask_indices.to(tokens.device))  # [N_img·N, D] -> [M, D]

