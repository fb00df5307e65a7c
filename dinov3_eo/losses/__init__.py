"""Losses: pure functions, no I/O (DINO, iBOT, KoLeo, Gram, Sinkhorn–Knopp centering here; the segmentation and
height losses in their own modules)."""

from dinov3_eo.losses.cross_entropy import check_class_labels, soft_cross_entropy
from dinov3_eo.losses.dino import (
    DinoLossTerms,
    dino_crop_targets,
    dino_cross_entropy,
    dino_losses,
    dino_losses_fused,
    dino_losses_stacked,
    dino_target_index,
    dino_term_scales,
    dino_total,
)
from dinov3_eo.losses.gram import gram_loss, resize_patch_features
from dinov3_eo.losses.ibot import gather_masked_tokens, ibot_loss, masks_weight_from_masks
from dinov3_eo.losses.koleo import koleo_loss, koleo_loss_distributed
from dinov3_eo.losses.sinkhorn import SinkhornAssignments, sinkhorn_assignments, sinkhorn_knopp

__all__ = [
    "check_class_labels",
    "DinoLossTerms",
    "dino_crop_targets",
    "dino_cross_entropy",
    "dino_losses",
    "dino_losses_fused",
    "dino_losses_stacked",
    "dino_target_index",
    "dino_term_scales",
    "dino_total",
    "gather_masked_tokens",
    "gram_loss",
    "ibot_loss",
    "koleo_loss",
    "koleo_loss_distributed",
    "masks_weight_from_masks",
    "resize_patch_features",
    "SinkhornAssignments",
    "sinkhorn_assignments",
    "sinkhorn_knopp",
    "soft_cross_entropy",
]
