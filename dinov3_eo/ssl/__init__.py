"""SSL training pieces: multi-crop, iBOT masking, schedules and distributed helpers."""

from dinov3_eo.ssl.crops import MultiCrop
from dinov3_eo.ssl.masking import block_mask, ibot_masks
from dinov3_eo.ssl.schedules import (
    apply_optimizer_schedules,
    backbone_layer_id,
    build_param_groups,
    clip_grad_norm_per_module,
    cosine_schedule,
    last_layer_lr,
    linear_warmup_cosine_decay,
    no_weight_decay,
    scale_lr_sqrt_wrt_1024,
    teacher_momentum,
    teacher_temperature,
    warmup_constant,
)

__all__ = [
    "MultiCrop",
    "apply_optimizer_schedules",
    "backbone_layer_id",
    "block_mask",
    "build_param_groups",
    "clip_grad_norm_per_module",
    "cosine_schedule",
    "ibot_masks",
    "last_layer_lr",
    "linear_warmup_cosine_decay",
    "no_weight_decay",
    "scale_lr_sqrt_wrt_1024",
    "teacher_momentum",
    "teacher_temperature",
    "warmup_constant",
]
