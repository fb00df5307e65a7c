"""Text alignment training, open-vocabulary maps of GeoTIFFs, and free-text / by-example map queries.

Three parts, one flow: ``dinov3-eo text fit`` trains a :class:`~dinov3_eo.models.text.TextAlignedModel` on a frozen
backbone (:class:`TextAlignmentTask`); its checkpoint carries everything inference needs (backbone architecture
and weights, bands, normalisation, tokenizer, templates); :class:`MapQuery` and ``dinov3-eo query`` load it and
stream the official dense recipe over a raster of any size through
:func:`~dinov3_eo.inference.predict.predict_raster`:

1. normalised adapted patch tokens ``[B, D, h, w]`` (after the adapter blocks and LayerNorm);
2. the patch half ``[D:]`` of each query's text embedding, ensembled over prompt templates and renormalised;
3. their cosine ``[B, T, h, w]``, bilinearly upsampled to pixels;
4. sliding windows blended with cosine ramps; ``softmax(exp(logit_scale) · cos)`` over the queries when the
   queries compete (``scores="probability"``), the raw cosine otherwise (``scores="cosine"``).

Query by example (:meth:`MapQuery.similar`) compares every pixel's upsampled, normalised adapted feature with the
feature at an example point (or the mean over an example polygon), computed from the very windows the stream
uses — so a point example scores exactly 1 at its own pixel wherever one window covers it (in window overlaps the
value is the blend of per-window cosines, slightly below 1).

Legend for shapes: B batch, C bands, D adapted token width, T queries, h x w patch grid, H x W pixels.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import Tensor, nn

from dinov3_eo.cli import EXIT_BAD_INPUT, run_lightning_cli
from dinov3_eo.data.normalization import RGB_PRESETS, Normalization
from dinov3_eo.data.raster import _data_band_count, open_raster, read_window
from dinov3_eo.inference.predict import add_window_options, window_settings
from dinov3_eo.inference.tiling import centre_pad
from dinov3_eo.inference.tta import TTA, tta_views
from dinov3_eo.inference.writers import SIMPLIFY_HELP
from dinov3_eo.losses.contrastive import dense_text_alignment_loss, grouped_clip_loss
from dinov3_eo.losses.cross_entropy import check_class_labels
from dinov3_eo.models.hub import TEXT_META_KEY, BackboneMeta, load_backbone
from dinov3_eo.models.text import TextAlignedModel
from dinov3_eo.models.vit import BACKBONES, DinoVisionTransformer, build_backbone
from dinov3_eo.tasks.prompts import REMOTE_SENSING_TEMPLATES, load_templates
from dinov3_eo.tasks.similarity import example_in_crs
from dinov3_eo.step_logging import LogsAfterBackward
from dinov3_eo.training_modes import TrainModesAtFitStart

log = logging.getLogger(__name__)

__all__ = [
    "MapQuery",
    "OpenVocabScorer",
    "TEXT_META_KEY",
    "TextAlignmentTask",
    "adapt_tokens",
    "export_text_model",
    "load_text_model",
    "query_main",
    "text_main",
    "zone_query_scores",
]

TOKENIZER_NAME = "openai-clip-bpe"
_MODEL_KWARGS = (
    "text_cfg", "freeze_text", "text_qkv_bias", "n_blocks", "num_heads", "ffn_layer", "ffn_ratio",
    "layerscale_init", "norm_eps",
)  # fmt: skip
ScoreMode = Literal["auto", "probability", "cosine"]
#: class-map nodata value
CLASS_NODATA = 255


# --------------------------------------------------------------------------------------------------------------
# Loss with repeated captions
# --------------------------------------------------------------------------------------------------------------


def _groups_of(keys: Sequence[str]) -> tuple[list[int], list[int]]:
    """Group index per sample and the first sample of each group, groups numbered by first appearance."""
    first: dict[str, int] = {}
    groups = [first.setdefault(k, len(first)) for k in keys]
    leaders = [0] * len(first)
    for i, g in reversed(list(enumerate(groups))):
        leaders[g] = i
    return groups, leaders


# --------------------------------------------------------------------------------------------------------------
# Normalisation and metadata
# --------------------------------------------------------------------------------------------------------------


def _as_normalization(value: str | Mapping[str, Any] | Normalization | None) -> Normalization | None:
    """A :class:`Normalization` from a preset name (on 0..255), a ``to_dict()`` mapping, or ``None``.

    Raises:
        ValueError: for an unknown preset name.
    """
    if value is None or isinstance(value, Normalization):
        return value
    if isinstance(value, str):
        if value not in RGB_PRESETS:
            raise ValueError(
                f"normalization={value!r} is not a preset {sorted(RGB_PRESETS)}; give a Normalization dict instead."
            )
        return Normalization.preset(value)
    return Normalization.from_dict(dict(value))


def _build_backbone(source: str, in_chans: int) -> DinoVisionTransformer:
    """A registry name builds a randomly initialised backbone; anything else is loaded as a checkpoint."""
    if source in BACKBONES:
        model = build_backbone(source, in_chans=in_chans)
        model.meta = BackboneMeta(name=source, in_chans=in_chans, patch_size=model.patch_size, embed_dim=model.embed_dim)
        return model
    return load_backbone(source, in_chans=in_chans)


def _text_model_from_meta(text_meta: Mapping[str, Any]) -> TextAlignedModel:
    """An untrained :class:`TextAlignedModel` of the architecture ``text_meta`` describes."""
    backbone = DinoVisionTransformer(**text_meta["backbone_arch"])
    return TextAlignedModel(backbone=backbone, **text_meta["model"])


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


class TextAlignmentTask(LogsAfterBackward, TrainModesAtFitStart):
    """dino.txt-style alignment of a frozen DINOv3 backbone with a text tower (``dinov3-eo text fit``).

    Each step embeds the batch's images (``concat[CLS, mean patch]`` after the trainable adapter blocks) and its
    distinct captions, and minimises :func:`grouped_clip_loss` (the CLIP loss, with images that share a caption
    key as positives of each other). When the batch carries per-pixel ``mask`` labels and
    ``dense_loss_weight > 0``, :func:`~dinov3_eo.losses.contrastive.dense_text_alignment_loss` pulls every
    patch token towards the patch half of its class's text embedding (one random template per class and step).
    The logit scale is clamped to ``[0, ln 100]`` after every step. With class labels in the validation data
    (class folders), the validation loop reports zero-shot accuracy with template-ensembled class names.

    Images arrive in raw units and are normalised here, on the device, with — in order of precedence —
    ``normalization``, the backbone's stored normalisation, or the data module's.

    Args:
        backbone: a registry name (random initialisation, e.g. ``"vitmicro16"`` for tests) or a checkpoint path
            readable by :func:`~dinov3_eo.models.hub.load_backbone`.
        in_chans: input bands.
        text_cfg, text_checkpoint, freeze_text, text_qkv_bias: the text tower (see ``TextTower``).
        n_blocks, num_heads, ffn_layer, ffn_ratio, layerscale_init, drop_path, norm_eps: the vision adapter.
        init_logit_scale: initial log inverse temperature.
        normalization: a preset name (raw 0..255) or a ``Normalization.to_dict()`` mapping; overrides the rest.
        class_names: class id -> words for the dense term and zero-shot validation (default: the data module's).
        templates: prompt templates stored with the model for queries (``None``: the built-in set).
        lr, weight_decay, betas, eps: AdamW (no decay on biases, norms, LayerScale and the logit scale).
        warmup_steps: linear warm-up, then cosine decay to 0 over the run.
        dense_loss_weight: weight of the dense term (0 switches it off).
        flips: random horizontal/vertical flips of each batch.
        store_backbone: keep the backbone's weights in checkpoints (self-contained); otherwise only its path.
        seed: seeds the flips and the dense-term template draws.

    Raises:
        ValueError: if the normalisation preset is unknown or a stored-backbone-less setup has no backbone path.
    """

    def __init__(
        self,
        *,
        backbone: str = "vitmicro16",
        in_chans: int = 3,
        text_cfg: str | dict[str, Any] = "ViT-B-32",
        text_checkpoint: str | None = None,
        freeze_text: bool = False,
        text_qkv_bias: bool = True,
        n_blocks: int = 2,
        num_heads: int | None = None,
        ffn_layer: str = "swiglu64",
        ffn_ratio: float = 4.0,
        layerscale_init: float = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        init_logit_scale: float = math.log(1 / 0.07),
        normalization: str | dict[str, Any] | None = None,
        class_names: list[str] | None = None,
        templates: list[str] | str | None = None,
        lr: float = 7e-4,
        weight_decay: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        dense_loss_weight: float = 0.0,
        flips: bool = True,
        store_backbone: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if not store_backbone and backbone in BACKBONES:
            raise ValueError(f"store_backbone=False needs a backbone checkpoint path, not the registry name {backbone!r}.")
        net = _build_backbone(backbone, in_chans)
        self.backbone_meta: BackboneMeta = net.meta
        self.model = TextAlignedModel(
            backbone=net, text_cfg=text_cfg, text_checkpoint=text_checkpoint, freeze_text=freeze_text,
            text_qkv_bias=text_qkv_bias, n_blocks=n_blocks, num_heads=num_heads, ffn_layer=ffn_layer,
            ffn_ratio=ffn_ratio, layerscale_init=layerscale_init, drop_path=drop_path, norm_eps=norm_eps,
            init_logit_scale=init_logit_scale,
        )  # fmt: skip
        self.templates = load_templates(templates)
        self.class_names = list(class_names) if class_names is not None else None
        self.normalization = _as_normalization(normalization) or self.backbone_meta.get_normalization()
        self._generator = torch.Generator().manual_seed(seed)
        self._rng = np.random.default_rng(seed)
        self._class_text: Tensor | None = None

    # ---- metadata ---------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        if self.normalization is None:
            self.normalization = getattr(datamodule, "normalization", None)
        if self.class_names is None:
            self.class_names = getattr(datamodule, "class_names", None)
        if self.backbone_meta.bands is None:
            self.backbone_meta.bands = getattr(datamodule, "band_names", None)
        if self.backbone_meta.gsd is None:
            self.backbone_meta.gsd = getattr(datamodule, "gsd", None)

    def _check_normalization(self) -> Normalization:
        if self.normalization is None:
            raise ValueError(
                f"TextAlignmentTask: backbone {self.hparams.backbone!r} carries no normalisation and none was given; "
                "set model.normalization (a preset name or a Normalization dict) or the data module's normalization."
            )
        return self.normalization

    def text_meta(self) -> dict[str, Any]:
        """The checkpoint's ``dinov3_eo_text`` entry (see :func:`load_text_model`)."""
        backbone = self.model.vision.backbone
        return {
            "format": 1,
            "backbone_source": None if self.hparams.backbone in BACKBONES else str(self.hparams.backbone),
            "backbone_arch": dict(backbone.arch),
            "backbone_stored": bool(self.hparams.store_backbone),
            "model": {k: self.hparams[k] for k in _MODEL_KWARGS},
            "tokenizer": {"name": TOKENIZER_NAME, "context_length": self.model.text.context_length},
            "templates": list(self.templates),
            "class_names": self.class_names,
        }

    def meta(self) -> BackboneMeta:
        """Backbone metadata with the normalisation the model was trained with."""
        meta = BackboneMeta(**{**self.backbone_meta.__dict__})
        meta.normalization = None if self.normalization is None else self.normalization.to_dict()
        return meta

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dinov3_eo"] = self.meta().to_dict()
        checkpoint[TEXT_META_KEY] = self.text_meta()
        if not self.hparams.store_backbone:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("model.vision.backbone.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "dinov3_eo" in checkpoint and checkpoint["dinov3_eo"].get("normalization") is not None:
            self.normalization = Normalization.from_dict(checkpoint["dinov3_eo"]["normalization"])
        if not self.hparams.store_backbone:  # the backbone comes from its path, already loaded in __init__
            own = self.model.vision.backbone.state_dict()
            checkpoint["state_dict"].update({f"model.vision.backbone.{k}": v for k, v in own.items()})

    # ---- steps ------------------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.device.type == "cpu" and self.class_names:
            # here, on the host, the check is free; the loss does not read labels back from a GPU
            check_class_labels(mask, len(self.class_names), ignore_index=CLASS_NODATA, owner="TextAlignmentTask")
        return batch

    def _images(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Normalised, optionally flipped images ``[B, C, H, W]`` and masks ``[B, H, W]`` (flipped alike)."""
        x = self._check_normalization()(batch["image"].float())
        if "valid" in batch:
            x = x.masked_fill(~batch["valid"][:, None].bool(), 0.0)  # invalid pixels = 0, as at inference
        mask = batch.get("mask")
        if self.hparams.flips and self.training:
            for dim in (-1, -2):
                if bool(torch.rand((), generator=self._generator) < 0.5):
                    x = x.flip(dim)
                    mask = mask.flip(dim) if mask is not None else None
        return x, mask

    def _step_losses(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        x, mask = self._images(batch)
        captions = list(batch["caption"])
        keys = list(batch.get("caption_key", captions))
        groups, leaders = _groups_of(keys)
        image_emb, dense = self.model.encode_image_and_dense(x)  # [B, 2D], [B, D, h, w]
        text_emb = self.model.encode_text([captions[i] for i in leaders])  # [U, 2D]
        group_index = torch.tensor(groups).to(image_emb.device, non_blocking=True)  # a blocking copy would sync
        losses = {"clip": grouped_clip_loss(image_emb, text_emb, group_index, self.model.logit_scale)}
        if self.hparams.dense_loss_weight > 0 and mask is not None and self.class_names:
            named = [n or "unlabelled" for n in self.class_names]
            template = self.templates[int(self._rng.integers(len(self.templates)))]
            class_text = self.model.text_embeddings_for_classes(named, [template], part="patch")  # [K, D]
            unnamed = [i for i, n in enumerate(self.class_names) if not n]
            if unnamed:  # never teach the model a word for "no label"
                unnamed_ids = torch.tensor(unnamed).to(mask.device, non_blocking=True)
                mask = mask.masked_fill(torch.isin(mask, unnamed_ids), 255)
            losses["dense"] = dense_text_alignment_loss(dense, class_text, mask, self.model.logit_scale)
        losses["loss"] = losses["clip"] + self.hparams.dense_loss_weight * losses.get("dense", 0.0)
        return losses

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        losses = self._step_losses(batch)
        size = len(batch["caption"])
        values = {f"train/{k}": v for k, v in losses.items()}
        values["train/logit_scale"] = self.model.logit_scale.detach().exp().squeeze()
        self.log_after_backward(values, batch_size=size, prog_bar=[f"train/{k}" for k in losses])  # step_logging
        return losses["loss"]

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.model.clamp_logit_scale_()

    def on_validation_epoch_start(self) -> None:
        self._class_text = None
        if self.class_names:
            with torch.no_grad():
                self._class_text = self.model.text_embeddings_for_classes(
                    [n or "unlabelled" for n in self.class_names], self.templates
                )  # [K, 2D]

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        losses = self._step_losses(batch)
        size = len(batch["caption"])
        self.log_dict({f"val/{k}": v for k, v in losses.items()}, batch_size=size)
        if "label" in batch and self._class_text is not None:
            x, _ = self._images(batch)
            predicted = (self.model.encode_image(x) @ self._class_text.T).argmax(dim=1)
            self.log("val/zero_shot_acc", (predicted == batch["label"]).float().mean(), batch_size=size, prog_bar=True)

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # biases, norms, LayerScale gammas and the logit scale are 1-D: no weight decay (official recipe)
            (no_decay if p.ndim <= 1 else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr, betas=tuple(self.hparams.betas), eps=self.hparams.eps,
        )  # fmt: skip
        total = max(int(self.trainer.estimated_stepping_batches), 1) if self._trainer is not None else 1
        warmup = min(self.hparams.warmup_steps, max(total - 1, 0))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def adapt_tokens(vision: Any, tokens: Tensor, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """The adapter half of ``VisionAdapter.forward`` on cached backbone tokens (frozen backbone: cache once, train
    the adapter for many epochs).

    Args:
        vision: the :class:`~dinov3_eo.models.text.VisionAdapter`.
        tokens: ``[B, 1 + R + h·w, D]`` from ``vision.backbone_tokens(x)``.
        grid: ``(h, w)``.

    Returns:
        ``(cls [B, D], patches [B, D, h, w])``, as ``vision(x)`` returns them.
    """
    for block in vision.blocks:
        (tokens,) = block([tokens], [None])  # no RoPE in the adapter
    tokens = vision.ln_final(tokens)
    patches = tokens[:, 1 + vision.n_storage_tokens :]  # [B, hw, D]
    return tokens[:, 0], patches.transpose(1, 2).reshape(tokens.shape[0], -1, *grid)  # [B, D, h, w]


def text_main(argv: Sequence[str]) -> int:
    """``dinov3-eo text fit --config configs/text/<name>.yaml`` (LightningCLI; CLI overrides allowed)."""
    from dinov3_eo.tasks.captions import TextDataModule

    return run_lightning_cli(TextAlignmentTask, TextDataModule, argv, "dinov3-eo text", auto_configure_optimizers=False)


# --------------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------------


def export_text_model(task: TextAlignmentTask, path: str | os.PathLike[str]) -> Path:
    """Write a compact, self-contained text model (no optimiser state) that :func:`load_text_model` reads.

    The file holds ``{"state_dict": TextAlignedModel weights, "dinov3_eo": BackboneMeta, "dinov3_eo_text": ...}``
    and is written atomically.
    """
    from dinov3_eo.inference.writers import atomic_output

    state = {k: v.detach().cpu() for k, v in task.model.state_dict().items()}
    if not task.hparams.store_backbone:
        state = {k: v for k, v in state.items() if not k.startswith("vision.backbone.")}
    payload = {"state_dict": state, "dinov3_eo": task.meta().to_dict(), TEXT_META_KEY: task.text_meta()}
    with atomic_output(path, overwrite=True) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_text_model(path: str | os.PathLike[str]) -> tuple[TextAlignedModel, BackboneMeta, dict[str, Any]]:
    """A trained text model from a ``text fit`` Lightning checkpoint or an :func:`export_text_model` file.

    Returns:
        ``(model in eval mode, backbone metadata, text metadata)``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a dinov3_eo text model, or its weights do not fit its own description.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Text model {str(path)!r} does not exist.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping) or TEXT_META_KEY not in checkpoint or "dinov3_eo" not in checkpoint:
        raise ValueError(
            f"{str(path)!r} is not a dinov3_eo text model (no {TEXT_META_KEY!r} entry); train one with "
            "'dinov3-eo text fit'."
        )
    text_meta = dict(checkpoint[TEXT_META_KEY])
    meta = BackboneMeta.from_dict(checkpoint["dinov3_eo"])
    model = _text_model_from_meta(text_meta)
    state = checkpoint["state_dict"]
    if any(k.startswith("model.") for k in state):  # Lightning checkpoint of TextAlignmentTask
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if not any(k.startswith("vision.backbone.") for k in state):
        source = text_meta.get("backbone_source")
        if source is None or not Path(source).exists():
            raise ValueError(f"{str(path)!r} stores no backbone weights and its backbone {source!r} is not found.")
        backbone = load_backbone(source, in_chans=meta.in_chans)
        state = {**state, **{f"vision.backbone.{k}": v for k, v in backbone.state_dict().items()}}
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{str(path)!r}: weights do not fit the stored architecture (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})."
        )
    return model.eval(), meta, text_meta


# --------------------------------------------------------------------------------------------------------------
# Dense scoring module for the streaming predictor
# --------------------------------------------------------------------------------------------------------------


class OpenVocabScorer(nn.Module):
    """``[B, C, H, W]`` normalised images -> ``[B, T, H, W]`` scores against ``T`` embeddings (for predict_raster).

    ``upsample="scores"`` is the official text recipe: cosine between the normalised adapted patch tokens and the
    embeddings at patch resolution, then bilinear upsampling. ``upsample="features"`` upsamples the adapted
    tokens first and normalises them per pixel (query by example: the cosine of a pixel's own feature is 1); the
    channel dimension is processed in chunks so memory stays ``O(chunk · H · W)``.

    Args:
        model: the trained text model.
        embeddings: ``[T, D]`` L2-normalised target embeddings (patch half of text, or example features).
        scale: multiplies the cosine (``exp(logit_scale)`` for softmax probabilities; 1 for raw cosine).
        upsample: ``"scores"`` or ``"features"``.
        chunk: channels upsampled at once in ``"features"`` mode.
    """

    def __init__(
        self, *, model: TextAlignedModel, embeddings: Tensor, scale: float = 1.0, upsample: str = "scores", chunk: int = 64
    ) -> None:
        super().__init__()
        if upsample not in ("scores", "features"):
            raise ValueError(f"OpenVocabScorer: upsample must be 'scores' or 'features', got {upsample!r}.")
        if embeddings.ndim != 2 or embeddings.shape[1] != model.patch_dim:
            raise ValueError(f"OpenVocabScorer: embeddings must be [T, {model.patch_dim}], got {tuple(embeddings.shape)}.")
        self.model = model
        self.register_buffer("embeddings", embeddings.detach().float().clone(), persistent=False)
        self.scale, self.upsample, self.chunk = float(scale), upsample, int(chunk)
        self.patch_size = int(model.vision.patch_size)

    @property
    def out_channels(self) -> int:
        return int(self.embeddings.shape[0])

    def pixel_features(self, x: Tensor) -> Iterator[tuple[slice, Tensor, Tensor]]:
        """Adapted features bilinearly upsampled to pixels, by channel chunk: ``(channels, chunk [B, c, H, W],
        padding-cropped)`` — unnormalised; callers accumulate dot products and squared norms."""
        height, width = x.shape[-2:]
        xp, (left, _, top, _) = centre_pad(x, self.patch_size)
        _, patches = self.model.vision(xp)  # [B, D, h, w]
        for start in range(0, patches.shape[1], self.chunk):
            part = F.interpolate(patches[:, start : start + self.chunk], size=xp.shape[-2:], mode="bilinear", align_corners=False)
            yield slice(start, start + part.shape[1]), part[..., top : top + height, left : left + width]

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        emb = self.embeddings.to(x.dtype)
        if self.upsample == "scores":
            xp, (left, _, top, _) = centre_pad(x, self.patch_size)
            dense = self.model.encode_dense(xp)  # [B, D, h, w], normalised
            cos = torch.einsum("bdyx,td->btyx", dense, emb.to(dense.dtype))  # [B, T, h, w]
            cos = F.interpolate(cos, size=xp.shape[-2:], mode="bilinear", align_corners=False)
            return self.scale * cos[..., top : top + height, left : left + width]
        dot = x.new_zeros((x.shape[0], emb.shape[0], height, width))
        norm2 = x.new_zeros((x.shape[0], 1, height, width))
        for channels, part in self.pixel_features(x):
            dot += torch.einsum("bdyx,td->btyx", part, emb[:, channels].to(part.dtype))
            norm2 += part.square().sum(dim=1, keepdim=True)
        return self.scale * dot / norm2.sqrt().clamp_min(1e-12)


# --------------------------------------------------------------------------------------------------------------
# Raster sources
# --------------------------------------------------------------------------------------------------------------


def _as_dataarray(path: Path, *, dim: str | None, names: Sequence[str] | None) -> Any:
    """A finished output COG read fully into memory as a DataArray (the file may then be deleted)."""
    import rioxarray

    da = rioxarray.open_rasterio(path).load()
    if dim is None:
        return da.squeeze("band", drop=True)
    da = da.rename(band=dim)
    return da.assign_coords({dim: list(names)}) if names is not None else da


# --------------------------------------------------------------------------------------------------------------
# Map queries
# --------------------------------------------------------------------------------------------------------------


class MapQuery:
    """Free-text and by-example questions to a raster, answered as georeferenced maps.

    Build it with :meth:`from_checkpoint`. Every method takes a GeoTIFF path, an open rasterio dataset or an
    ``xarray.DataArray`` (``band × y × x`` with rioxarray CRS/transform) and streams it window by window.

    Args:
        model: the trained text model.
        meta: backbone metadata (its normalisation is applied to raw pixels).
        templates: prompt templates ensembled for every text query.
        window, overlap, batch_size: sliding-window settings of the streaming predictor.
        device: where the model runs (default: CUDA when available).
        amp: bf16 autocast, as :func:`~dinov3_eo.inference.predict.predict_raster`'s (``None``: on CUDA only;
            ``True``: on a CPU too).
        tta: test-time augmentation of every map, as :func:`~dinov3_eo.inference.predict.predict_raster`'s
            (``"flips"``: 4 views, ``"d4"``: 8; scores are averaged after the softmax).
        bands: 1-based bands fed to the model (default: all bands of the raster).
        nodata: nodata override for inputs (e.g. 0 for a Landsat L1 collar).
        progress: show progress bars.

    Raises:
        ValueError: if the metadata carries no normalisation.
    """

    def __init__(
        self,
        *,
        model: TextAlignedModel,
        meta: BackboneMeta,
        templates: Sequence[str] = REMOTE_SENSING_TEMPLATES,
        window: int = 512,
        overlap: float | int = 0.25,
        batch_size: int = 4,
        device: str | torch.device | None = None,
        amp: bool | None = None,
        tta: TTA | None = None,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
        progress: bool = False,
        require_georeference: bool = True,
    ) -> None:
        if meta.normalization is None:
            raise ValueError(f"MapQuery: the model's metadata ({meta.name}) has no normalisation; it cannot read raw pixels.")
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.normalization = Normalization.from_dict(meta.normalization)
        self.templates = tuple(templates)
        self.window, self.overlap, self.batch_size = window, overlap, batch_size
        self.bands = list(bands) if bands is not None else None
        if tta is not None:
            tta_views(tta)  # an unknown mode fails here, not at the first query
        self.nodata, self.progress, self.amp, self.tta = nodata, progress, amp, tta
        self.require_georeference = require_georeference

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], **kwargs: Any) -> MapQuery:
        """Load a ``text fit`` checkpoint or exported text model; ``kwargs`` as for the constructor."""
        return cls.from_text_model(*load_text_model(path), **kwargs)

    @classmethod
    def from_text_model(cls, model: TextAlignedModel, meta: BackboneMeta, text_meta: Mapping[str, Any],
                        **kwargs: Any) -> MapQuery:  # fmt: skip
        """From what :func:`load_text_model` returns, its prompt templates unless ``kwargs`` give others."""
        kwargs.setdefault("templates", tuple(text_meta.get("templates") or REMOTE_SENSING_TEMPLATES))
        return cls(model=model, meta=meta, **kwargs)

    def stretch_to(self, raster: Any, *, percentiles: tuple[float, float] = (2.0, 98.0), max_size: int = 1024) -> Normalization:
        """Re-map this scene's per-band percentile range onto the range the model was trained on, and use it.

        For a model trained with a clip-and-scale normalisation (presets on 0..255, ``percentile``) applied to
        imagery of another sensor or bit depth — e.g. EuroSAT 8-bit chips vs Landsat DN: the model's ``low``/
        ``high`` are replaced by the scene's percentiles (valid pixels of a decimated read), ``mean``/``std`` kept.

        Returns:
            The normalisation now used.

        Raises:
            ValueError: if the model's normalisation has no clip-and-scale step, or the scene has no valid pixel.
        """
        if self.normalization.low is None:
            raise ValueError(
                f"stretch_to: the model's normalisation {self.normalization.name!r} has no low/high range to re-map."
            )
        with open_raster(raster) as src:
            bands = self._band_indexes(src)
            step = max(1, math.ceil(max(src.height, src.width) / max_size))
            shape = (max(1, src.height // step), max(1, src.width // step))
            pixels, valid = read_window(src, Window(0, 0, src.width, src.height), bands=bands, nodata=self.nodata,
                                        out_shape=shape)  # fmt: skip
        if not valid.any():
            raise ValueError(f"stretch_to: {getattr(src, 'name', raster)!r} has no valid pixel.")
        low, high = np.percentile(pixels[:, valid].astype(np.float64), list(percentiles), axis=1)  # [2, C]
        high = np.maximum(high, low + 1e-6)
        norm = self.normalization
        self.normalization = Normalization(mean=norm.mean, std=norm.std, low=tuple(low), high=tuple(high),
                                           name=f"{norm.name}+stretch")  # fmt: skip
        return self.normalization

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _band_indexes(self, src: Any) -> list[int]:
        # (a trailing alpha band, e.g. of a warped view, holds no data)
        indexes = self.bands if self.bands is not None else list(range(1, _data_band_count(src) + 1))
        if len(indexes) != self.meta.in_chans:
            raise ValueError(
                f"The model takes {self.meta.in_chans} bands ({self.meta.bands}) but {len(indexes)} would be read from "
                f"{src.name!r}; choose them with bands= (1-based; --bands on the command line)."
            )
        return indexes

    @torch.no_grad()
    def text_embeddings(self, queries: Sequence[str]) -> Tensor:
        """``[T, D]`` template-ensembled patch-half text embeddings of ``queries``.

        Raises:
            TypeError: if ``queries`` is a bare string; ValueError: if it is empty or holds an empty query.
        """
        return self.model.text_embeddings_for_classes(_check_queries(queries), self.templates, part="patch")

    def _resolve_scores(self, scores: ScoreMode, n_classes: int) -> str:
        if scores not in ("auto", "probability", "cosine"):
            raise ValueError(f"scores must be 'auto', 'probability' or 'cosine', got {scores!r}.")
        if scores == "auto":
            return "probability" if n_classes > 1 else "cosine"
        return scores

    def _stream(self, src: Any, scorer: OpenVocabScorer, dst: Path, *, names: Sequence[str], activation: str) -> None:
        from dinov3_eo.inference.predict import predict_raster

        predict_raster(
            scorer, src, dst, out_channels=scorer.out_channels, window=self.window, overlap=self.overlap,
            batch_size=self.batch_size, bands=self._band_indexes(src), nodata=self.nodata,
            normalization=self.normalization, output="scores", activation=activation, scores_dtype="float32",
            class_names=list(names), device=self.device, amp=self.amp, tta=self.tta, multiple=self.meta.patch_size,
            progress=self.progress, require_georeference=self.require_georeference,
            overwrite=True, tags={"queries": json.dumps(list(names))},
        )  # fmt: skip

    def write_scores(
        self,
        raster: Any,
        queries: Sequence[str],
        dst: str | os.PathLike[str],
        *,
        scores: ScoreMode = "auto",
        background: str | None = None,
    ) -> tuple[Path, list[str], str]:
        """Stream the per-query score bands of ``raster`` into the float32 COG ``dst`` (NaN nodata).

        Returns:
            ``(dst, class names in band order, score mode used)``.
        """
        names = _check_queries(queries) + ([background] if background else [])
        mode = self._resolve_scores(scores, len(names))
        emb = self.text_embeddings(names)
        scale = float(self.model.logit_scale.detach().exp()) if mode == "probability" else 1.0
        scorer = OpenVocabScorer(model=self.model, embeddings=emb, scale=scale).to(self.device)
        with open_raster(raster) as src:
            self._stream(src, scorer, Path(dst), names=names, activation="softmax" if mode == "probability" else "none")
        return Path(dst), names, mode

    # ---- public queries ---------------------------------------------------------------------------------------
    def query(
        self,
        raster: Any,
        queries: Sequence[str],
        *,
        scores: ScoreMode = "auto",
        background: str | None = None,
        out: str | os.PathLike[str] | None = None,
    ) -> Any:
        """Per-query score maps.

        Args:
            raster: GeoTIFF path, open dataset or DataArray.
            queries: free-text queries (``["water", "solar panels"]``); each is ensembled over the templates.
            scores: ``"probability"`` (softmax over the queries, the official recipe), ``"cosine"`` (raw
                similarity, comparable across runs) or ``"auto"`` (probability for two or more classes).
            background: an extra class competing with the queries (e.g. ``"other"``), returned as the last band.
            out: also keep the scores as this COG (otherwise a temporary file is used).

        Returns:
            float32 ``xarray.DataArray`` (``query × y × x``) with the raster's CRS and transform; NaN where the
            input is nodata.
        """
        with tempfile.TemporaryDirectory(prefix="dinov3_eo_query_") as tmp:
            dst = Path(out) if out is not None else Path(tmp) / "scores.tif"
            _, names, mode = self.write_scores(raster, queries, dst, scores=scores, background=background)
            da = _as_dataarray(dst, dim="query", names=names)
        da.attrs.update(scores=mode, long_name="open-vocabulary scores")
        return da

    def segment(
        self,
        raster: Any,
        queries: Sequence[str],
        *,
        threshold: float | None = None,
        background: str | None = None,
        scores: ScoreMode = "auto",
    ) -> Any:
        """Class map: the best-scoring query per pixel (uint8, nodata 255).

        Args:
            threshold: pixels whose best score is below it get the ``background`` class if one is given, else
                nodata.
            background, scores: as for :meth:`query`.

        Returns:
            ``xarray.DataArray`` (``y × x``) with ``attrs["class_names"]`` (ids in query order, background last).
        """
        da = self.query(raster, queries, scores=scores, background=background)
        names = [str(n) for n in da["query"].values]
        classes = scores_to_classes(da.values, threshold=threshold, background=len(names) - 1 if background else None)
        out = da.isel(query=0, drop=True).copy(data=classes)
        out = out.rio.write_nodata(CLASS_NODATA, encoded=False)
        out.attrs = {"class_names": names, "scores": da.attrs["scores"], "_FillValue": CLASS_NODATA}
        return out.rename("classes")

    def polygons(
        self,
        raster: Any,
        queries: Sequence[str],
        *,
        threshold: float | None = None,
        background: str | None = None,
        scores: ScoreMode = "auto",
        min_area: float = 0.0,
        simplify: float = 0.0,
    ) -> Any:
        """The class map of :meth:`segment` as polygons: a ``GeoDataFrame`` with ``class_id``, ``class_name``,
        ``area`` (squared CRS units) and the raster's CRS; regions smaller than ``min_area`` are dropped, and
        ``simplify`` > 0 smooths the pixel edges as one coverage (see
        :func:`~dinov3_eo.inference.writers.vectorize_classes`)."""
        from dinov3_eo.inference.writers import vectorize_classes, write_cog

        classes = self.segment(raster, queries, threshold=threshold, background=background, scores=scores)
        with tempfile.TemporaryDirectory(prefix="dinov3_eo_polygons_") as tmp:
            tif = write_cog(
                Path(tmp) / "classes.tif", classes.values.astype(np.uint8), crs=classes.rio.crs,
                transform=classes.rio.transform(), nodata=CLASS_NODATA, class_names=classes.attrs["class_names"],
                overviews=False,
            )  # fmt: skip
            return vectorize_classes(tif, Path(tmp) / "classes.gpkg", min_area=min_area, simplify=simplify)

    def zones(
        self,
        raster: Any,
        zones: Any,
        queries: Sequence[str],
        *,
        scores: ScoreMode = "auto",
        background: str | None = None,
        threshold: float | None = None,
        upsample: int = 1,
    ) -> Any:
        """Every polygon of ``zones`` named by the queries (parcels, image objects, crowns, without a label).

        Each polygon's feature is the area-weighted mean of the L2-normalised adapted patch tokens it overlaps
        (:class:`~dinov3_eo.models.text.TextDenseEncoder` streamed as ``embed --zones`` streams a backbone), so its
        cosine to a query is the mean of the query's cosine over those patches; ``"probability"`` is the softmax of
        those means times the model's ``exp(logit_scale)`` over the queries (and ``background``).

        Args:
            raster: GeoTIFF path, open dataset or DataArray, or a list of them (scenes of one date, a mosaic: each
                polygon's patches pooled over all); zones: polygons (a vector file or ``GeoDataFrame``, any CRS).
            queries, scores, background: as for :meth:`query`.
            threshold: a polygon whose best score is below it gets ``background`` if one is given, else no class.
            upsample: read the scene this many times finer first (small polygons on coarse pixels, as
                ``embed --zones --upsample``).

        Returns:
            ``GeoDataFrame``: the zones' columns, ``class`` (the best query; missing without features or below
            ``threshold``), ``score`` (its score), one ``p_<query>`` (or ``cos_<query>``) column per query,
            ``coverage`` and ``patches``; ``attrs["class_names"]`` and ``attrs["scores"]``.

        Raises:
            ValueError: a MapQuery made with ``tta`` (polygons are scored on one view), bad queries or zones.
        """
        from dinov3_eo.models.text import TextDenseEncoder
        from dinov3_eo.tasks.zonal import read_zones
        from dinov3_eo.tasks.zone_embeddings import pool_zone_sums, zone_feature_sums

        if self.tta is not None:
            raise ValueError("MapQuery.zones scores polygons on one view; make the MapQuery without tta.")
        names = _check_queries(queries) + ([background] if background else [])
        mode = self._resolve_scores(scores, len(names))
        frame = read_zones(zones)
        encoder = TextDenseEncoder(self.model, self.meta)
        parts = []
        for scene in raster if isinstance(raster, (list, tuple)) else [raster]:
            with open_raster(scene) as src:
                bands = self._band_indexes(src)
            parts.append(zone_feature_sums(encoder, scene, frame, normalization=self.normalization, bands=bands,
                                           nodata=self.nodata, window=self.window, batch_size=self.batch_size,
                                           device=self.device, amp=bool(self.amp), progress=self.progress,
                                           upsample=upsample))  # fmt: skip
        means, coverage, patches = pool_zone_sums(parts)  # several scenes (a mosaic): a seam's polygon gets both
        out = self._named_zones(frame, self._zone_scores(means, names, mode), names, mode, threshold=threshold,
                                background=background)  # fmt: skip
        out["coverage"], out["patches"] = coverage, patches
        return out

    def zone_table(
        self,
        table: Any,
        queries: Sequence[str],
        *,
        scores: ScoreMode = "auto",
        background: str | None = None,
        threshold: float | None = None,
    ) -> Any:
        """:meth:`zones` on polygons already embedded through this text model (``embed SCENE --zones POLYGONS
        --model text.ckpt -o table.parquet``, a season's too): no scene is read, so many sets of queries cost one
        embedding.

        Args:
            table: the zone table's path, or ``(frame, x)`` as :func:`~dinov3_eo.tasks.zone_embeddings.read_zone_tables`
                gives. queries, scores, background, threshold: as for :meth:`zones`.

        Returns:
            the table's polygons and columns (no ``patch_mean``) with ``class``, ``score`` and a column per query; a
            season's table scores each date (``p_<query>_<date>`` columns) and takes ``class``, ``score`` and
            ``p_<query>`` from the mean of the dates' scores.

        Raises:
            ValueError: a table of a backbone's features or of another model (name, width), bad queries.
        """
        from dinov3_eo.models.text import TextDenseEncoder
        from dinov3_eo.tasks.zone_embeddings import read_zone_tables, same_weights, weights_fingerprint

        frame, x = read_zone_tables(table) if isinstance(table, (str, os.PathLike, list)) else table
        made = frame.attrs.get("dinov3_eo", {})
        where = os.fspath(table) if isinstance(table, (str, os.PathLike)) else "the zone table"
        if made.get("features") != "text_patch_mean" or made.get("backbone") != self.meta.name:
            raise ValueError(f"{where} holds {made.get('features', 'patch_mean')} of {made.get('backbone')!r}, not this "
                             f"text model's aligned patch features ({self.meta.name!r}): embed the polygons with "
                             "'embed SCENE --zones POLYGONS --model TEXT_MODEL'.")  # fmt: skip
        if not same_weights(made, {"weights": weights_fingerprint(TextDenseEncoder(self.model).fingerprint_source)}):
            raise ValueError(f"{where} was embedded through another text model's weights than this one's "
                             f"({self.meta.name!r} both): embed the polygons with this model.")  # fmt: skip
        dim = int(self.model.patch_dim)
        if len(x) and x.shape[1] % dim:
            raise ValueError(f"{where} holds {x.shape[1]} features per polygon, not a multiple of the model's {dim}.")
        names = _check_queries(queries) + ([background] if background else [])
        mode = self._resolve_scores(scores, len(names))
        steps = x.shape[1] // dim if len(x) else 1
        per_date = [self._zone_scores(x[:, k * dim : (k + 1) * dim], names, mode) for k in range(steps)]
        out = self._named_zones(frame.drop(columns="patch_mean"), np.mean(per_date, axis=0), names, mode,
                                threshold=threshold, background=background)  # fmt: skip
        if steps > 1:  # a season: each date's scores too
            dates = made.get("dates") or [str(k) for k in range(steps)]
            prefix = "p_" if mode == "probability" else "cos_"
            for label, scored in zip(dates, per_date):
                for j, name in enumerate(names):
                    out[f"{prefix}{name}_{label}"] = scored[:, j]
        return out

    def _zone_scores(self, features: np.ndarray, names: list[str], mode: str) -> np.ndarray:
        """``[Z, T]`` the queries' scores of polygons' mean unit patch tokens ``features`` ``[Z, D]``."""
        scale = float(self.model.logit_scale.detach().exp()) if mode == "probability" else 1.0
        return zone_query_scores(features, self.text_embeddings(names).cpu().numpy(), scale=scale,
                                 softmax=mode == "probability")  # fmt: skip

    @staticmethod
    def _named_zones(frame: Any, table: np.ndarray, names: list[str], mode: str, *, threshold: float | None = None,
                     background: str | None = None) -> Any:  # fmt: skip
        """``frame`` with ``class``, ``score`` and a ``p_``/``cos_`` column per query from the scores ``table``
        ``[Z, T]`` (NaN rows: no features); ``attrs`` ``class_names`` and ``scores``."""
        classes = scores_to_classes(table.T[:, :, None], threshold=threshold,
                                    background=len(names) - 1 if background else None)[:, 0]  # fmt: skip
        out = frame.copy()
        out["class"] = [names[c] if c != CLASS_NODATA else None for c in classes]
        unseen = np.isnan(table).any(axis=1)
        out["score"] = np.where(unseen, np.nan, np.where(unseen[:, None], 0.0, table).max(axis=1))
        prefix = "p_" if mode == "probability" else "cos_"
        for k, name in enumerate(names):
            out[f"{prefix}{name}"] = table[:, k]
        out.attrs.update(class_names=names, scores=mode)
        return out

    def compare(
        self,
        before: Any,
        after: Any,
        queries: Sequence[str],
        *,
        scores: ScoreMode = "cosine",
        background: str | None = None,
    ) -> Any:
        """How each query's score changed between two dates of a place ("where did *flooded fields* appear?").

        The after date is brought onto the before date's grid window by window (a ``WarpedVRT``, bilinear: any CRS
        and resolution) and both are scored as :meth:`query` scores one raster.

        Args:
            before, after: GeoTIFF paths, open datasets or DataArrays of the same bands.
            queries, background: as for :meth:`query`.
            scores: ``"cosine"`` (default: raw similarity, comparable between the dates) or ``"probability"``.

        Returns:
            ``xarray.Dataset`` over ``query × y × x`` on the before grid (CRS set): ``before``, ``after`` and
            ``change = after - before``; NaN where a date has no data.
        """
        import xarray as xr
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        with contextlib.ExitStack() as stack:
            src = stack.enter_context(open_raster(before))
            later = stack.enter_context(open_raster(after))
            same = (later.crs, later.transform, later.width, later.height) == (src.crs, src.transform, src.width, src.height)
            if not same:
                nodata = self.nodata if self.nodata is not None else later.nodata
                later = stack.enter_context(WarpedVRT(
                    later, crs=src.crs, transform=src.transform, width=src.width, height=src.height,
                    resampling=Resampling.bilinear, src_nodata=nodata, nodata=nodata, add_alpha=nodata is None,
                ))  # fmt: skip
            first = self.query(src, queries, scores=scores, background=background)
            second = self.query(later, queries, scores=scores, background=background)
        second = second.assign_coords(x=first.x, y=first.y)  # the same grid: the coordinates agree to rounding
        out = xr.Dataset({"before": first, "after": second, "change": second - first})
        out["change"].attrs.update(long_name="score change, after - before")
        out.attrs.update(scores=first.attrs.get("scores"))
        return out.rio.write_crs(first.rio.crs)

    def similar(self, raster: Any, example: Any, *, crs: Any = None, out: str | os.PathLike[str] | None = None) -> Any:
        """Similarity of every pixel to an example place (query by example, no text).

        Args:
            raster: GeoTIFF path, open dataset or DataArray.
            example: a shapely Point / Polygon / MultiPolygon (in ``crs``), or a GeoSeries/GeoDataFrame (its own
                CRS; all its geometries together).
            crs: CRS of a shapely ``example`` (default: the raster's).
            out: also keep the map as this COG.

        Returns:
            float32 ``xarray.DataArray`` (``y × x``) of cosine similarities in ``[-1, 1]`` (1 at a point example's
            pixel where one window covers it), NaN where the input is nodata.

        Raises:
            ValueError: if the example lies outside the raster or covers no valid pixel.
        """
        with contextlib.ExitStack() as stack:
            src = stack.enter_context(open_raster(raster))
            geometry = example_in_crs(example, crs, src.crs)
            embedding = self._example_embedding(src, geometry)  # [D]
            scorer = OpenVocabScorer(model=self.model, embeddings=embedding[None], upsample="features").to(self.device)
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="dinov3_eo_similar_"))
            dst = Path(out) if out is not None else Path(tmp) / "similar.tif"
            self._stream(src, scorer, dst, names=["similarity"], activation="none")
            da = _as_dataarray(dst, dim=None, names=None)
        da.attrs.update(long_name="similarity to example")
        return da.rename("similarity")

    @torch.no_grad()
    def _example_embedding(self, src: Any, geometry: Any) -> Tensor:
        """Blend-weighted mean of the normalised pixel features over the example's pixels, from the windows of
        the stream's own grid (read, normalised and padded exactly as the predictor does), renormalised."""
        from rasterio.features import rasterize
        from shapely.geometry import box

        from dinov3_eo.inference.tiling import TileGrid

        bands = self._band_indexes(src)
        grid = TileGrid.build(src.height, src.width, window=self.window, overlap=self.overlap, multiple=self.meta.patch_size)
        weights = grid.blend_weights()  # [th, tw]
        scorer = OpenVocabScorer(model=self.model, embeddings=torch.zeros(1, self.model.patch_dim), upsample="features")
        total = torch.zeros(self.model.patch_dim, dtype=torch.float64)
        is_point = geometry.geom_type == "Point"
        if is_point:
            row, col = src.index(geometry.x, geometry.y)
            if not (0 <= row < src.height and 0 <= col < src.width):
                raise ValueError(f"The example point ({geometry.x}, {geometry.y}) lies outside the raster {src.name!r}.")
        for tile in grid:
            window = Window(tile.col_off, tile.row_off, tile.width, tile.height)
            transform = src.window_transform(window)
            if is_point:
                inside = np.zeros((tile.height, tile.width), dtype=bool)
                r, c = row - tile.row_off, col - tile.col_off
                if not (0 <= r < tile.valid_height and 0 <= c < tile.valid_width):
                    continue
                inside[r, c] = True
            else:
                left, top = transform @ (0, 0)
                right, bottom = transform @ (tile.width, tile.height)
                if not geometry.intersects(box(min(left, right), min(top, bottom), max(left, right), max(top, bottom))):
                    continue
                inside = rasterize([(geometry, 1)], out_shape=(tile.height, tile.width), transform=transform,
                                   all_touched=True, fill=0, dtype="uint8").astype(bool)  # fmt: skip
            pixels, valid = read_window(src, window, bands=bands, nodata=self.nodata)
            inside &= valid
            if not inside.any():
                continue
            image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
            image = torch.nan_to_num(self.normalization(image), nan=0.0, posinf=0.0, neginf=0.0)
            image.masked_fill_(~torch.from_numpy(valid), 0.0)
            rows, cols = np.nonzero(inside)
            feats = torch.zeros(self.model.patch_dim, len(rows))
            for channels, part in scorer.pixel_features(image[None].to(self.device)):
                feats[channels] = part[0][:, rows, cols].float().cpu()  # [c, n]
            feats = F.normalize(feats, dim=0)  # per-pixel unit features [D, n]
            total += (feats * weights[rows, cols]).sum(dim=1).double()
        if not bool(total.abs().sum() > 0):
            raise ValueError(f"The example covers no valid pixel of {src.name!r}.")
        return F.normalize(total.float(), dim=0)


def _check_queries(queries: Sequence[str]) -> list[str]:
    """``queries`` as a list after checking it is a non-empty list of non-empty strings.

    Raises:
        TypeError: for a bare string; ValueError: for an empty list or an empty query.
    """
    if isinstance(queries, str):
        raise TypeError(f"queries must be a list of strings, not the single string {queries!r}.")
    names = list(queries)
    if not names or any(not isinstance(q, str) or not q.strip() for q in names):
        raise ValueError(f"queries must be a non-empty list of non-empty strings, got {names!r}.")
    return names


def zone_query_scores(features: np.ndarray, embeddings: np.ndarray, *, scale: float = 1.0, softmax: bool = False) -> np.ndarray:
    """Polygons' scores against text queries.

    Args:
        features: ``[Z, D]`` each polygon's mean of unit-length patch tokens (NaN rows: no features).
        embeddings: ``[T, D]`` L2-normalised patch-half text embeddings.
        scale: multiplies the dot products (``exp(logit_scale)`` for probabilities).
        softmax: a softmax over the queries (probabilities) instead of the scaled dot products.

    Returns:
        ``[Z, T]`` float32: the mean cosines (times ``scale``), or their softmax; NaN rows for NaN features.
    """
    logits = scale * np.asarray(features, np.float64) @ np.asarray(embeddings, np.float64).T  # [Z, T]
    if softmax:
        logits = np.exp(logits - logits.max(axis=1, keepdims=True))
        logits /= logits.sum(axis=1, keepdims=True)
    return logits.astype(np.float32)


def scores_to_classes(scores: np.ndarray, *, threshold: float | None = None, background: int | None = None) -> np.ndarray:
    """Class ids from per-class scores.

    Args:
        scores: ``[K, H, W]`` float scores, NaN where there is no data.
        threshold: pixels whose best score is below it get ``background`` (or nodata when it is ``None``).
        background: the class id of "none of the queries".

    Returns:
        ``[H, W]`` uint8 class ids, :data:`CLASS_NODATA` where the scores are NaN.
    """
    invalid = np.isnan(scores).any(axis=0)  # [H, W]
    filled = np.where(np.isnan(scores), -np.inf, scores)
    classes = filled.argmax(axis=0).astype(np.uint8)  # [K, H, W] -> [H, W]
    if threshold is not None:
        low = filled.max(axis=0) < threshold
        classes[low] = CLASS_NODATA if background is None else background
    classes[invalid] = CLASS_NODATA
    return classes


def write_class_map(
    scores_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    class_names: Sequence[str],
    threshold: float | None = None,
    background: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Stream a scores COG block by block into a class-map COG (:func:`scores_to_classes`; colour table, names)."""
    from dinov3_eo.inference.writers import COGWriter

    with rasterio.open(scores_path) as src:
        with COGWriter(
            dst, crs=src.crs, transform=src.transform, width=src.width, height=src.height, count=1, dtype="uint8",
            nodata=CLASS_NODATA, class_names=list(class_names), overwrite=overwrite,
        ) as out:  # fmt: skip
            for _, window in src.block_windows(1):
                block = src.read(window=window).astype(np.float32)
                out.write(scores_to_classes(block, threshold=threshold, background=background), window)
    return Path(dst)


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------


def _query_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov3-eo query",
        description="Open-vocabulary maps of a GeoTIFF from free text: per-query score bands (COG), an argmax class "
        "map (COG with colour table), optional polygons (GeoPackage) and a PNG quick-look.",
    )
    parser.add_argument("scene", help="input GeoTIFF (an image chip with --chips; or a zone table .parquet embedded "
                        "through the text model: 'embed SCENE --zones POLYGONS --model TEXT_MODEL')")  # fmt: skip
    parser.add_argument("--chips", action="store_true",
                        help="the scene is an image chip, with or without a georeference (JPEG, PNG, TIFF): the class "
                             "map is OUT_classes.png, a palette PNG of class ids on its pixel grid (255 = no data)")
    parser.add_argument("queries", nargs="+", help='free-text queries, e.g. "solar panels" "water"')
    parser.add_argument("-o", "--output", required=True, help="scores COG to write (OUT.tif); the class map goes to OUT_classes.tif")
    parser.add_argument("--model", required=True, help="text model: a 'dinov3-eo text fit' checkpoint or an exported text model")
    parser.add_argument("--polygons", default=None, help="also write the class map as polygons to this GeoPackage")
    parser.add_argument("--threshold", type=float, default=None, help="best score below this -> background (or nodata)")
    parser.add_argument("--background", default=None, help="an extra class competing with the queries, e.g. 'other'")
    parser.add_argument("--scores", choices=("auto", "probability", "cosine"), default="auto",
                        help="softmax probabilities over the classes (official recipe) or raw cosine similarity")  # fmt: skip
    parser.add_argument("--png", default=None, help="quick-look PNG (default: OUT.png); 'none' to skip")
    parser.add_argument("--rgb-bands", type=int, nargs=3, default=None, help="1-based bands shown in the PNG")
    parser.add_argument("--bands", type=int, nargs="+", default=None, help="1-based bands fed to the model (default: all)")
    parser.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat L1 collar)")
    parser.add_argument("--stretch", action="store_true",
                        help="re-map this scene's 2-98 %% range onto the model's input range (another sensor / bit depth)")
    parser.add_argument("--templates", default=None, help="prompt templates file (default: the model's)")
    add_window_options(parser)
    parser.add_argument("--min-area", type=float, default=0.0, help="drop polygons smaller than this (CRS units²)")
    parser.add_argument("--simplify", type=float, default=0.0, help=SIMPLIFY_HELP)
    zones = parser.add_argument_group("polygons", "name each polygon of a vector file instead of each pixel: -o is "
                                      "then the polygons (.gpkg, .geojson, .csv or .parquet) with class, score and "
                                      "p_<query> columns (+ OUT.png)")  # fmt: skip
    zones.add_argument("--zones", default=None, metavar="POLYGONS", help="parcels, image objects ('objects') or "
                       "crowns: each is scored by the mean of the queries' cosine over its patches")  # fmt: skip
    zones.add_argument("--upsample", type=int, default=1, metavar="K", help="with --zones, read the scene K times "
                       "finer first (polygons of a few pixels on 10-30 m imagery)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return parser


def _query_polygons(args: argparse.Namespace, engine: MapQuery, classes_path: Path | None, png: Path | None) -> list[str]:
    """``query SCENE QUERIES --zones POLYGONS -o named.gpkg`` (:meth:`MapQuery.zones`; the classes also burnt onto the
    scene's grid, ``classes_path``) or ``query TABLE.parquet QUERIES -o named.gpkg`` (a zone table embedded through
    the text model, :meth:`MapQuery.zone_table`): the polygons named, written and mapped; returns the lines to print."""
    from dinov3_eo.tasks.zonal import zonal_picture
    from dinov3_eo.tasks.zone_classification import zone_class_map
    from dinov3_eo.tasks.zone_embeddings import write_zone_rows

    asked = {"scores": args.scores, "background": args.background, "threshold": args.threshold}
    scene = None if classes_path is None else args.scene
    if scene is None:
        named = engine.zone_table(args.scene, args.queries, **asked)
    else:
        named = engine.zones(scene, args.zones, args.queries, upsample=args.upsample, **asked)
    write_zone_rows(named, args.output, layer="queries", overwrite=args.overwrite)
    counts, missing = named["class"].value_counts(), int(named["class"].isna().sum())
    lines = [f"{len(named)} polygons: " + ", ".join(f"{n} {name}" for name, n in counts.items())
             + (f", {missing} without a class" if missing else ""), f"polygons ({named.attrs['scores']}): {args.output}"]  # fmt: skip
    if scene is not None:
        zone_class_map(named, named.attrs["class_names"], scene, classes_path, overwrite=args.overwrite)
        lines.append(f"classes: {classes_path}")
    if png is not None:
        zonal_picture(png, named, "class", raster=scene, title=", ".join(named.attrs["class_names"]), overwrite=args.overwrite)
        lines.append(f"map: {png}")
    return lines


def query_main(argv: Sequence[str]) -> int:
    """``dinov3-eo query SCENE.tif "solar panels" "water" -o OUT.tif --model text.ckpt [...]``."""

    from dinov3_eo.data.raster import open_quietly
    from dinov3_eo.inference.writers import (
        check_overwrite,
        class_map_as_png,
        default_colormap,
        vectorize_classes,
        write_quicklook,
    )

    from dinov3_eo.tasks.zone_embeddings import ZONE_ROW_SUFFIXES

    args = _query_parser().parse_args(list(argv))
    out = Path(args.output)
    table = Path(args.scene).suffix.lower() == ".parquet"  # a zone table embedded through the text model
    classes_path = None if table else out.with_name(f"{out.stem}_classes.{'png' if args.chips else 'tif'}")
    png = None if (args.png or "").lower() == "none" else Path(args.png) if args.png else out.with_suffix(".png")
    try:
        if args.chips and args.polygons:
            raise ValueError("polygons need a georeferenced scene; an image chip (--chips) gets a PNG class map.")
        if args.zones is not None or table:
            if args.chips or args.polygons or (table and (args.zones or args.stretch)):
                raise ValueError("--zones names the polygons of a georeferenced scene, and a zone table is already "
                                 "embedded; leave out --chips and --polygons (and with a table --zones, --stretch).")  # fmt: skip
            if out.suffix.lower() not in ZONE_ROW_SUFFIXES:
                raise ValueError(f"Polygons named by the queries are written as {', '.join(ZONE_ROW_SUFFIXES)}, not "
                                 f"{args.output!r}.")  # fmt: skip
            if args.tta:
                raise ValueError("--tta averages a map's views; polygons are scored on one view (leave out --tta).")
        for path in (out, classes_path, png, Path(args.polygons) if args.polygons else None):
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=[args.scene, args.zones])
        kwargs: dict[str, Any] = {**window_settings(args), "bands": args.bands, "nodata": args.nodata, "progress": True,
                                  "require_georeference": not args.chips}  # fmt: skip
        if args.templates is not None:
            kwargs["templates"] = load_templates(args.templates)
        engine = MapQuery.from_checkpoint(args.model, **kwargs)
        if args.stretch:
            engine.stretch_to(args.scene)
        if args.zones is not None or table:
            for line in _query_polygons(args, engine, classes_path, png):
                print(line)
            return 0
        _, names, mode = engine.write_scores(args.scene, args.queries, out, scores=args.scores, background=args.background)
        background = len(names) - 1 if args.background else None
        # a chip's class map is written as a scratch GeoTIFF, then becomes the PNG
        colours = [c[:3] for c in default_colormap(len(names)).values()]
        target = (class_map_as_png(classes_path, colors=colours, overwrite=args.overwrite) if args.chips
                  else contextlib.nullcontext(classes_path))  # fmt: skip
        with target as classes_tif:
            write_class_map(out, classes_tif, class_names=names, threshold=args.threshold, background=background,
                            overwrite=args.overwrite)  # fmt: skip
            written = [f"scores ({mode}): {out}", f"classes: {classes_path}"]
            if args.polygons:
                frame = vectorize_classes(classes_path, args.polygons, class_names=names, min_area=args.min_area,
                                          simplify=args.simplify, overwrite=args.overwrite)  # fmt: skip
                written.append(f"polygons ({len(frame)}): {args.polygons}")
            if png is not None:
                with open_quietly(args.scene) as src:
                    rgb = engine.meta.rgb_bands(args.bands or range(1, src.count + 1))
                write_quicklook(png, classes=classes_tif, image=args.scene, bands=rgb, class_names=names,
                                title=", ".join(names), nodata=args.nodata, overwrite=args.overwrite)  # fmt: skip
                written.append(f"quick-look: {png}")
    except (FileExistsError, FileNotFoundError, ValueError, TypeError) as e:
        print(f"dinov3-eo query: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for line in written:
        print(line)
    return 0
