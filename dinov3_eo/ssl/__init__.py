"""SSL training pieces: multi-crop, iBOT masking, schedules and distributed helpers.

Names are imported lazily (PEP 562) so that ``dinov3_eo.losses``, which needs only ``ssl.distributed``, does not
pay for kornia/torchvision on import (it matters in every spawned distributed worker).
"""

from __future__ import annotations

from dinov3_eo.lazy_exports import lazy_getattr

_EXPORTS = {
    "MultiCrop": "dinov3_eo.ssl.crops",
    "block_mask": "dinov3_eo.ssl.masking",
    "ibot_masks": "dinov3_eo.ssl.masking",
    "apply_optimizer_schedules": "dinov3_eo.ssl.schedules",
    "backbone_layer_id": "dinov3_eo.ssl.schedules",
    "build_param_groups": "dinov3_eo.ssl.schedules",
    "clip_grad_norm_per_module": "dinov3_eo.ssl.schedules",
    "cosine_schedule": "dinov3_eo.ssl.schedules",
    "gram_teacher_refresh_due": "dinov3_eo.ssl.schedules",
    "last_layer_lr": "dinov3_eo.ssl.schedules",
    "linear_warmup_cosine_decay": "dinov3_eo.ssl.schedules",
    "no_weight_decay": "dinov3_eo.ssl.schedules",
    "scale_lr_sqrt_wrt_1024": "dinov3_eo.ssl.schedules",
    "teacher_momentum": "dinov3_eo.ssl.schedules",
    "teacher_temperature": "dinov3_eo.ssl.schedules",
    "warmup_constant": "dinov3_eo.ssl.schedules",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
