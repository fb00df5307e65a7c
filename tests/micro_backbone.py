"""A random micro ViT (``vitmicro16``, 3 bands) exported with its metadata, as the tests that need a backbone file
make one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: the input normalisation those backbones record: 8-bit values clipped to [0, 1], then a z-score
MICRO_NORM = {"mean": [0.4, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "low": [0, 0, 0], "high": [255, 255, 255], "name": "test"}


def micro_backbone_file(folder: Path, *, seed: int | None = None, normalization: dict[str, Any] | None = MICRO_NORM,
                        bands: list[str] | None = None, gsd: float | None = None, **build: Any) -> Path:  # fmt: skip
    """``folder/micro.pth`` (with .safetensors and .json beside it): a random ``vitmicro16`` (``build``: its
    constructor's overrides; ``seed`` seeds torch first) and its metadata."""
    import torch

    from dinov3_eo.models.hub import BackboneMeta, export_backbone
    from dinov3_eo.models.vit import build_backbone

    if seed is not None:
        torch.manual_seed(seed)
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, bands=bands,
                        normalization=normalization, gsd=gsd)  # fmt: skip
    return export_backbone(build_backbone("vitmicro16", in_chans=3, **build), Path(folder) / "micro", meta=meta)["pth"]
