"""User-facing tasks over the models, data and inference pieces (imported lazily: each pulls in heavy deps)."""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # supervised segmentation
    "SegmentationTask": "dinov3_eo.tasks.segmentation",
    "segment_scene": "dinov3_eo.tasks.segmentation",
    "evaluate_class_raster": "dinov3_eo.tasks.segmentation_eval",
    "evaluate_chip_maps": "dinov3_eo.tasks.segmentation_eval",
    # change between two dates
    "detect_change": "dinov3_eo.tasks.change",
    "detect_change_series": "dinov3_eo.tasks.change",
    "FeatureChange": "dinov3_eo.tasks.change",
    "class_transitions": "dinov3_eo.tasks.class_change",
    "height_change": "dinov3_eo.tasks.height_change",
    # patch features and their PCA picture
    "resolve_backbone": "dinov3_eo.tasks.features",
    "stream_patch_features": "dinov3_eo.tasks.features",
    "write_features": "dinov3_eo.tasks.features",
    "write_pca": "dinov3_eo.tasks.features",
    # one embedding per image chip
    "embed_chips": "dinov3_eo.tasks.chip_embeddings",
    "read_chip_embeddings": "dinov3_eo.tasks.chip_embeddings",
    "write_chip_embeddings": "dinov3_eo.tasks.chip_embeddings",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
