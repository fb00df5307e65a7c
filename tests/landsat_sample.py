"""The bundled Landsat-8 scene as the feature-map tests use it (cluster, segment prototypes, similar), and the
independent reference they compare against: one forward pass over the whole scene, upsampled to every pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.clustering import normed_patch_tokens

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = SAMPLE.with_name("landsat8_224078_polygons.gpkg")


def micro_vit() -> torch.nn.Module:
    """The micro ViT with the same random weights in every test module."""
    torch.manual_seed(0)
    return build_backbone("vitmicro16", in_chans=3).eval()


def load_sample() -> dict:
    """``array`` [3, 928, 448] uint16, ``profile``, ``transform``, ``crs``, ``shape``, ``valid`` (the 0-valued
    collar, which the file does not declare, is invalid) and the scene's z-score ``normalization``."""
    with rasterio.open(SAMPLE) as src:
        array, profile = src.read(), src.profile
    valid = (array > 0).all(axis=0)
    norm = Normalization.zscore([float(b[valid].mean()) for b in array], [float(b[valid].std()) for b in array])
    return {"array": array, "profile": profile, "transform": profile["transform"], "crs": profile["crs"],
            "shape": array.shape[1:], "valid": valid, "normalization": norm}  # fmt: skip


def whole_scene_tokens(backbone: torch.nn.Module, sample: dict) -> torch.Tensor:
    """Normed patch tokens ``[D, 58, 28]`` of one forward pass over the whole normalised scene (928 x 448 px,
    multiples of the patch; invalid pixels fed as 0)."""
    image = sample["normalization"](torch.from_numpy(sample["array"].astype(np.float32))[None])
    image = image.masked_fill(~torch.from_numpy(sample["valid"])[None, None], 0.0)
    with torch.no_grad():
        return normed_patch_tokens(backbone, image)[0]


def whole_scene_pixel_features(backbone: torch.nn.Module, sample: dict) -> torch.Tensor:
    """:func:`whole_scene_tokens` bilinearly upsampled to every pixel: ``[D, 928, 448]``."""
    tokens = whole_scene_tokens(backbone, sample)
    return F.interpolate(tokens[None], scale_factor=16, mode="bilinear", align_corners=False)[0]
