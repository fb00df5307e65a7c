"""The small OpenCLIP text-tower config the text tests build (random weights; CLIP's BPE vocabulary and context), and
a tiny text model exported from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TINY_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}


def tiny_text_model(dst: Path, normalization: dict[str, Any]) -> Path:
    """A random micro-ViT text model (seed 0) exported to ``dst``, its adapter's LayerScales raised to 0.5 so that
    different places get different features."""
    import torch

    from dinov3_eo.tasks.openvocab import TextAlignmentTask, export_text_model

    torch.manual_seed(0)
    task = TextAlignmentTask(backbone="vitmicro16", text_cfg=TINY_TEXT, ffn_layer="mlp", normalization=normalization)
    with torch.no_grad():
        for block in task.model.vision.blocks:
            block.ls1.gamma.fill_(0.5)
            block.ls2.gamma.fill_(0.5)
    return export_text_model(task, dst)
