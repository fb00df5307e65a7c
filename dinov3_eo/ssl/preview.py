"""Pictures of what an SSL stage's backbone sees while it trains: the first 3 principal components of its patch
features on a few fixed training images, as RGB, written as a PNG every so many steps.

Watching the PCA of the patch features is how DINO-style training is usually judged by eye: at the start the colours
follow position or nothing; as the features learn, fields, water and built-up areas take their own colours and keep
them from picture to picture. The images are the first ones of the first training batch (centre crops), the PCA is
fit jointly on all of them per backbone (so one colour means one thing across the row), and each component is
stretched between its 2nd and 98th percentiles.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

log = logging.getLogger(__name__)

#: a picture's cells are enlarged (nearest) until each is at least this many pixels a side
MIN_CELL = 128


def pca_rgb(tokens: np.ndarray, valid: np.ndarray, *, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """The first 3 principal components of patch features as colours, fit jointly on every image's valid patches.

    Args:
        tokens: [B, h, w, D] patch features.
        valid: [B, h, w] bool, the patches whose pixels are mostly valid (the others are white).
        low, high: percentiles each component is stretched between.

    Returns:
        [B, h, w, 3] uint8 (white where not ``valid``; black everywhere when no patch is valid).
    """
    from dinov3_eo.tasks.features import fit_pca

    b, h, w, d = tokens.shape
    out = np.full((b, h, w, 3), 255, dtype=np.uint8)
    samples = tokens[valid].astype(np.float64)  # [N, D]
    if len(samples) < 2:
        out[...] = 0
        return out
    mean, components = fit_pca(samples, n_components=min(3, d))
    projected = (samples - mean) @ components.T.astype(np.float64)  # [N, k]
    lo, hi = np.percentile(projected, low, axis=0), np.percentile(projected, high, axis=0)
    scaled = np.clip((projected - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)
    colours = np.zeros((len(samples), 3))
    colours[:, : scaled.shape[1]] = scaled
    out[valid] = np.rint(colours * 255).astype(np.uint8)
    return out


def centre_crops(images: Tensor, valid: Tensor | None, size: int) -> tuple[Tensor, Tensor]:
    """Centre ``size × size`` crops (or the whole image where smaller) of ``images`` [B, C, H, W] and their validity
    [B, H', W'] (all True without ``valid``), on the CPU, float32."""
    height, width = images.shape[-2:]
    side_h, side_w = min(size, height), min(size, width)
    top, left = (height - side_h) // 2, (width - side_w) // 2
    crops = images[..., top : top + side_h, left : left + side_w].detach().float().cpu()
    if valid is None:
        mask = torch.ones(crops.shape[0], side_h, side_w, dtype=torch.bool)
    else:
        mask = valid[..., top : top + side_h, left : left + side_w].detach().cpu().bool()
    return crops, mask


class FeaturePreview(Callback):
    """Every ``every_n_steps`` optimiser steps (and after the first and the last), ``<default_root_dir>/previews/
    step_<n>.png``: a row of training images over one row per backbone of the stage
    (:meth:`~dinov3_eo.ssl.stage.SSLStage.preview_backbones`) showing its patch features' PCA (see the module).

    Args:
        every_n_steps: steps between pictures.
        images: how many images of the first training batch to show.
        size: side of their centre crops (default: the stage's global crop size), rounded down to the patch size.
        bands: 1-based input bands to show as red, green, blue (default: found by the data's band names, else the
            first three).
    """

    def __init__(self, every_n_steps: int = 500, images: int = 4, size: int | None = None,
                 bands: Sequence[int] | None = None) -> None:
        if every_n_steps < 1 or images < 1:
            raise ValueError(f"FeaturePreview: every_n_steps and images must be >= 1, got {every_n_steps}, {images}.")
        self.every_n_steps, self.images, self.size = int(every_n_steps), int(images), size
        self.bands = None if bands is None else [int(b) for b in bands]
        self._crops: tuple[Tensor, Tensor] | None = None
        self._last_written = -1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._crops is not None:
            return
        patch = int(next(iter(pl_module.preview_backbones().values())).patch_size)
        size = self.size or int(getattr(pl_module.hparams, "global_crop_size", 224))
        images = batch["image"][: self.images]
        valid = batch.get("valid")
        size = max(patch, min(size, *images.shape[-2:]) // patch * patch)
        self._crops = centre_crops(images, None if valid is None else valid[: self.images], size)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if step == 1 or (step > 0 and step % self.every_n_steps == 0):
            self.write(trainer, pl_module, step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.write(trainer, pl_module, int(trainer.global_step))

    @torch.no_grad()
    def picture(self, pl_module: Any) -> np.ndarray:
        """The picture as [H, W, 3] uint8: the images, then one row of feature colours per backbone."""
        from dinov3_eo.inference.writers import display_rgb

        crops, valid = self._crops
        b, _, side_h, side_w = crops.shape
        shown = self.bands or pl_module.preview_meta().rgb_bands(range(1, crops.shape[1] + 1))
        rgb_bands = [i - 1 for i in shown]
        rows = [np.stack([np.rint(display_rgb(c[rgb_bands].numpy(), v.numpy()) * 255).astype(np.uint8)
                          for c, v in zip(crops, valid)])]  # fmt: skip
        for backbone in pl_module.preview_backbones().values():
            patch = int(backbone.patch_size)
            h, w = side_h // patch, side_w // patch
            device = next(backbone.parameters()).device
            was_training = backbone.training
            backbone.eval()
            try:
                # compiled blocks (model.compile) run eagerly here: this batch's shape would compile another graph
                with torch.autocast(device.type, enabled=False), torch.compiler.set_stance("force_eager"):
                    tokens = backbone.forward_features(crops.to(device))["x_norm_patchtokens"]  # [B, hw, D]
            finally:
                backbone.train(was_training)
            tokens = tokens.float().cpu().numpy().reshape(b, h, w, -1)
            patch_valid = valid.float().reshape(b, h, patch, w, patch).mean(dim=(2, 4)).numpy() >= 0.5
            colours = pca_rgb(tokens, patch_valid)
            rows.append(colours.repeat(patch, axis=1).repeat(patch, axis=2))  # [B, side_h, side_w, 3]
        factor = max(1, -(-MIN_CELL // max(side_h, side_w)))
        gap = 4
        height = len(rows) * (side_h * factor + gap) - gap
        width = b * (side_w * factor + gap) - gap
        canvas = np.full((height, width, 3), 255, dtype=np.uint8)
        for r, row in enumerate(rows):
            for c, cell in enumerate(row):
                y, x = r * (side_h * factor + gap), c * (side_w * factor + gap)
                canvas[y : y + side_h * factor, x : x + side_w * factor] = cell.repeat(factor, 0).repeat(factor, 1)
        return canvas

    def write(self, trainer: Any, pl_module: Any, step: int) -> Path | None:
        """Write ``previews/step_<step>.png`` (once per step) from the first process; returns its path there.

        Every process computes its own picture (of its own first images): under FSDP a backbone's forward pass
        gathers its sharded weights from all processes, so one process alone would wait for the others forever.
        """
        if self._crops is None or step == self._last_written:
            return None
        picture = self.picture(pl_module)
        self._last_written = step
        if not trainer.is_global_zero:
            return None
        from PIL import Image

        from dinov3_eo.inference.writers import atomic_output

        dst = Path(trainer.default_root_dir) / "previews" / f"step_{step:07d}.png"
        dst.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(dst, overwrite=True) as tmp:
            Image.fromarray(picture).save(tmp, format="PNG")
        if step == 1:
            log.info("Feature pictures (PCA of the patch features: %s) every %d steps in %s.",
                     ", ".join(pl_module.preview_backbones()), self.every_n_steps, dst.parent)  # fmt: skip
        return dst
