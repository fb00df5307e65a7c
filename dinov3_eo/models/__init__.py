"""Backbones (DINOv3 ViT with the official weight layout), their weights, and task heads."""

from dinov3_eo.models.hub import BackboneMeta, CheckpointError, export_backbone, load_backbone, to_timm
from dinov3_eo.models.lora import LoRAConfig, add_lora, merge_lora
from dinov3_eo.models.vit import BACKBONES, DinoVisionTransformer, build_backbone

__all__ = [
    "BACKBONES",
    "BackboneMeta",
    "CheckpointError",
    "DinoVisionTransformer",
    "LoRAConfig",
    "add_lora",
    "build_backbone",
    "export_backbone",
    "load_backbone",
    "merge_lora",
    "to_timm",
]
