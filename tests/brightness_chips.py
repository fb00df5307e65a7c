"""Chips of a real scene for the chip-classification tests (classify fit / test / predict / map, multi-label,
fine-tuning): 16 x 16 cuts of ``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0; georeferenced, nodata 0 in
its collar) on the grid of 16-px tiles from its origin, those touching the collar left out, and the micro ViT export
the tests embed them with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
from PIL import Image

from dinov3_eo.models.hub import BackboneMeta, export_backbone
from dinov3_eo.models.vit import build_backbone

SCENE = Path(__file__).resolve().parent / "data" / "rgb_byte_crop.tif"


def scene_cuts(size: int = 16) -> dict[tuple[int, int], np.ndarray]:
    """``(row, col)`` pixel offset -> ``[3, size, size]`` uint8 cut, for every cut without a collar pixel."""
    with rasterio.open(SCENE) as src:
        rgb = src.read()
    cuts = {(r, c): rgb[:, r : r + size, c : c + size] for r in range(0, 224, size) for c in range(0, 240, size)}
    return {key: cut for key, cut in cuts.items() if (cut > 0).all()}


def save_chip(cut: np.ndarray, path: Path) -> Path:
    """A ``[3, H, W]`` uint8 cut as an RGB PNG (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(cut.transpose(1, 2, 0))).save(path)
    return path


def brightness_folders(root: Path) -> Path:
    """The cuts as ``root/bright/<r>_<c>.png`` and ``root/dark/<r>_<c>.png``, by mean brightness against the median
    (72 chips, half each): a class a random ViT's mean patch token keeps. Returns ``root``."""
    cuts = scene_cuts()
    middle = float(np.median([cut.mean() for cut in cuts.values()]))
    for (r, c), cut in cuts.items():
        save_chip(cut, root / ("bright" if cut.mean() > middle else "dark") / f"{r}_{c}.png")
    return root


def micro_export(folder: Path) -> Path:
    """A random micro ViT (seed 0) exported as ``folder/micro.pth`` with a 0..255 normalisation."""
    torch.manual_seed(0)
    meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96,
                        normalization={"mean": [0.4] * 3, "std": [0.2] * 3, "low": [0] * 3, "high": [255] * 3, "name": "u8"})  # fmt: skip
    return Path(export_backbone(build_backbone("vitmicro16", in_chans=3), folder / "micro", meta=meta)["pth"])
