"""Supervised semantic segmentation on DINOv3 features: training, checkpoints that carry their metadata, GeoTIFF prediction.

:class:`SegmentationTask` is a LightningModule around :class:`~dinov3_eo.models.dense.DenseModel`: a backbone
(from any :func:`~dinov3_eo.models.hub.load_backbone` source, or a registry name for random weights), frozen by
default or fine-tuned at a lower learning rate, and one of three heads — ``linear`` (official linear protocol on
the last layer), ``multilayer`` (linear on the last four layers and their class tokens) or ``dpt``. Pixels
labelled ``ignore_index`` (255: unlabelled or nodata) never count. Validation logs the per-class IoU and F1 and
their means over the classes present.

Every checkpoint carries, under ``"dinov3_eo"``, the backbone's metadata (architecture, bands, patch size, and
the input normalisation the head was trained with), the head configuration, class names and colours, and the
data settings (band selection, nodata, DN scale/offset folded into the normalisation), so ``predict`` needs the
``.ckpt`` only: ``dinov3-eo segment predict IN.tif --model seg.ckpt -o OUT`` streams the model over each scene
with :func:`~dinov3_eo.inference.predict.predict_raster` and writes a class COG (colour table, class names,
nodata 255), a PNG quick-look, and optionally per-class probabilities and GeoPackage polygons.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dinov3_eo.cli import EXIT_BAD_INPUT, run_lightning_cli
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import is_georeferenced, open_quietly, pixel_size_off_scale
from dinov3_eo.inference.predict import add_window_options, window_settings
from dinov3_eo.inference.tta import TTA, random_dihedral
from dinov3_eo.inference.writers import SIMPLIFY_HELP, check_distinct_stems
from dinov3_eo.losses.cross_entropy import check_class_labels
from dinov3_eo.losses.segmentation import (
    CLASS_WEIGHTINGS,
    class_weights_from_counts,
    parse_segmentation_loss,
    segmentation_loss_terms,
)
from dinov3_eo.models.dense import DenseModel, DPTHead, LinearHead
from dinov3_eo.models.hub import BackboneMeta
from dinov3_eo.tasks.segmentation_eval import evaluate_main, iou_f1_from_confusion
from dinov3_eo.step_logging import LogsAfterBackward
from dinov3_eo.training_modes import TrainModesAtFitStart

log = logging.getLogger(__name__)

HEADS = ("linear", "multilayer", "dpt")
LR_SCHEDULES = ("cosine", "constant")
#: key of the task's own entry inside the checkpoint's ``"dinov3_eo"`` metadata
CHECKPOINT_KEY = "segmentation"


# --------------------------------------------------------------------------------------------- helpers
def default_layers(head: str, n_blocks: int) -> list[int]:
    """Blocks (0-based) a head reads: the last for ``linear``, the last four for ``multilayer``, four evenly
    spaced ending at the last for ``dpt`` (``[5, 11, 17, 23]`` on 24 blocks, the official choice)."""
    if head == "linear":
        return [n_blocks - 1]
    if head == "multilayer":
        return list(range(max(0, n_blocks - 4), n_blocks))
    if head == "dpt":
        return sorted({max(0, (i + 1) * n_blocks // 4 - 1) for i in range(4)})
    raise ValueError(f"head must be one of {HEADS}, got {head!r}.")


def build_head(kind: str, *, embed_dim: int, n_layers: int, num_classes: int, dropout: float = 0.1) -> nn.Module:
    """The head module for ``kind``.

    ``dpt`` reassembles to ``(D/8, D/4, D/2, D)`` channels (the official (128, 256, 512, 1024) on a ViT-L) with
    a fusion width of ``min(256, D)``; with fewer than four layers the finest resolutions are dropped.
    """
    if kind == "linear":
        return LinearHead(in_channels=[embed_dim] * n_layers, out_channels=num_classes, dropout=dropout)
    if kind == "multilayer":
        return LinearHead(in_channels=[embed_dim] * n_layers, out_channels=num_classes, use_cls_token=True, dropout=dropout)
    if kind == "dpt":
        channels = [max(8, embed_dim // 8), max(8, embed_dim // 4), max(8, embed_dim // 2), embed_dim][-n_layers:]
        factors = [4.0, 2.0, 1.0, 0.5][-n_layers:]
        return DPTHead(
            embed_dim=embed_dim, out_channels=num_classes, post_process_channels=channels,
            channels=min(256, embed_dim), n_hidden_channels=min(128, embed_dim), reassemble_factors=factors,
            use_batchnorm=True,
        )  # fmt: skip
    raise ValueError(f"head must be one of {HEADS}, got {kind!r}.")


def fold_scale_offset(
    normalization: Normalization, scale: float | Sequence[float] | None, offset: float | Sequence[float] | None
) -> Normalization:
    """One normalisation on raw DN equal to ``normalization`` applied to ``DN * scale + offset``.

    ``scale``/``offset`` may be one value for every band; the folding is :meth:`Normalization.after_affine`.

    Raises:
        ValueError: if a scale is not positive or the lengths differ from the band count.
    """
    if scale is None and offset is None:
        return normalization
    n = normalization.num_bands
    s = np.broadcast_to(np.asarray(1.0 if scale is None else scale, dtype=np.float64), (n,))
    o = np.broadcast_to(np.asarray(0.0 if offset is None else offset, dtype=np.float64), (n,))
    if (s <= 0).any():
        raise ValueError(f"fold_scale_offset: scales must be > 0 to fold into a normalisation, got {list(s)}.")
    return normalization.after_affine(s, o)


def _palette(num_classes: int) -> list[list[int]]:
    from dinov3_eo.inference.writers import default_colormap

    return [list(rgba[:3]) for _, rgba in sorted(default_colormap(num_classes).items())]


#: validation / test tiles drawn in ``val_predictions.png`` / ``test_predictions.png``
_PREVIEW_TILES = 4


# ------------------------------------------------------------------------------------------ the task
class SegmentationTask(LogsAfterBackward, TrainModesAtFitStart):
    """A dense segmentation head on a (frozen by default) DINOv3 backbone.

    Args (keyword-only; they mirror the YAML ``model.init_args``):
        backbone: a registry name (``vitmicro16``, ``vits16``, ... random weights) or a path any
            :func:`load_backbone` reads (our exports, Lightning pretraining checkpoints, official/timm/HF weights).
        in_chans: input bands (RGB weights are inflated to it; default: the checkpoint's).
        backbone_kwargs: architecture overrides for a registry name (``depth``, ``drop_path_rate``...).
        head: ``linear``, ``multilayer`` or ``dpt``.
        layers: 0-based blocks the head reads (default: :func:`default_layers`).
        num_classes: number of classes K (default: ``len(class_names)``).
        class_names: names of class ids ``0..K-1`` (default ``class 0``...).
        class_colors: RGB per class for the colour table (default: a fixed colour-blind-friendly palette).
        ignore_index: label value that never counts (255: unlabelled / nodata).
        class_weights: weight per class in every loss term: a list, or ``balanced`` / ``balanced_sqrt`` to
            derive them from the training tiles' class pixel counts when the fit starts (one pass over the training
            labels, :meth:`~dinov3_eo.data.datamodule.DenseDataModule.class_pixel_counts`;
            :func:`~dinov3_eo.losses.segmentation.class_weights_from_counts`), kept in the checkpoint.
        loss: the training loss, terms from :data:`~dinov3_eo.losses.segmentation.SEGMENTATION_LOSS_TERMS` joined by
            ``+`` and summed: ``ce`` (default), ``focal``, ``dice``, ``jaccard``, ``lovasz``, e.g. ``ce+dice`` for
            rare classes (:mod:`dinov3_eo.losses.segmentation`). Each term is logged (``train/loss_dice``...).
        focal_gamma: the focal term's γ.
        augment: a random flip / quarter turn of each training batch (image and mask together; overhead imagery has
            no up or down), seeded by ``augment_seed`` and the step.
        augment_seed: seed of the augmentation stream.
        freeze_backbone: keep the backbone fixed (default, the official protocol) or fine-tune it.
        lora: fine-tune the backbone through low-rank updates instead (a mapping of
            :class:`~dinov3_eo.models.lora.LoRAConfig` fields, e.g. ``{rank: 8, alpha: 16, targets: [qkv, proj]}``):
            the backbone's own weights stay fixed, its updates train at ``lr * lora_lr_mult``.
        lr: head learning rate (AdamW).
        backbone_lr_mult: backbone lr = ``lr * backbone_lr_mult`` when fine-tuning.
        lora_lr_mult: LoRA lr = ``lr * lora_lr_mult``.
        weight_decay: AdamW weight decay.
        lr_schedule: ``cosine`` (to 0 over the run, after ``warmup_steps``) or ``constant``.
        warmup_steps: linear warm-up steps.
        dropout: channel dropout of the linear heads (official 0.1).
        image_normalization: input normalisation (``Normalization.to_dict()``) when no datamodule provides one;
            the datamodule's wins, then this, then the backbone's stored one. (Named so as not to clash with the
            datamodule's ``normalization`` mode in LightningCLI's merged hyper-parameters.)

    Raises:
        ValueError: for an unknown head or schedule, neither ``num_classes`` nor ``class_names``, or lists whose
            length differs from the number of classes.
    """

    def __init__(
        self,
        *,
        backbone: str = "vitmicro16",
        in_chans: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        head: str = "linear",
        layers: list[int] | None = None,
        num_classes: int | None = None,
        class_names: list[str] | None = None,
        class_colors: list[list[int]] | None = None,
        ignore_index: int = 255,
        class_weights: list[float] | str | None = None,
        loss: str = "ce",
        focal_gamma: float = 2.0,
        augment: bool = True,
        augment_seed: int = 0,
        freeze_backbone: bool = True,
        lora: dict[str, Any] | None = None,
        lr: float = 1e-3,
        backbone_lr_mult: float = 0.1,
        lora_lr_mult: float = 1.0,
        weight_decay: float = 1e-4,
        lr_schedule: str = "cosine",
        warmup_steps: int = 0,
        dropout: float = 0.1,
        image_normalization: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"SegmentationTask: head must be one of {HEADS}, got {head!r}.")
        self.loss_terms = parse_segmentation_loss(loss)
        if focal_gamma < 0:
            raise ValueError(f"SegmentationTask: focal_gamma must be >= 0, got {focal_gamma}.")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"SegmentationTask: lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}.")
        if num_classes is None and class_names is None:
            raise ValueError("SegmentationTask: give num_classes or class_names.")
        k = int(num_classes if num_classes is not None else len(class_names or []))
        if k < 1:
            raise ValueError(f"SegmentationTask: num_classes must be >= 1, got {k}.")
        if isinstance(class_weights, str) and class_weights not in CLASS_WEIGHTINGS:
            raise ValueError(f"SegmentationTask: class_weights must be a list of {k} numbers or one of "
                             f"{CLASS_WEIGHTINGS}, got {class_weights!r}.")
        weights_listed = None if isinstance(class_weights, str) else class_weights
        for name, values in (("class_names", class_names), ("class_colors", class_colors), ("class_weights", weights_listed)):
            if values is not None and len(values) != k:
                raise ValueError(f"SegmentationTask: {name} has {len(values)} entries for {k} classes.")
        if class_colors is not None and any(len(c) not in (3, 4) for c in class_colors):
            raise ValueError(f"SegmentationTask: class_colors must be [r, g, b] per class, got {class_colors}.")
        self.save_hyperparameters()
        self.num_classes = k
        self.class_names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
        self.class_colors = [list(c)[:3] for c in class_colors] if class_colors is not None else _palette(k)

        net = self._build_backbone(backbone, in_chans=in_chans, backbone_kwargs=backbone_kwargs)
        self.layers = list(layers) if layers is not None else default_layers(head, int(net.n_blocks))
        self.model = DenseModel(
            backbone=net,
            head=build_head(head, embed_dim=int(net.embed_dim), n_layers=len(self.layers), num_classes=k, dropout=dropout),
            layers=self.layers,
            freeze_backbone=freeze_backbone,
            lora=lora,
        )
        # derived weights start as ones and are counted when the fit starts (or come back with a checkpoint)
        self.register_buffer(
            "class_weight",
            torch.ones(k) if isinstance(class_weights, str)
            else torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None,
        )  # fmt: skip
        self._class_weights_restored = False
        #: data settings recorded in checkpoints: band selection, nodata, normalisation (DN scale/offset folded in)
        self.data_meta: dict[str, Any] = {}
        self._confusion: Tensor | None = None
        #: the epoch's tiles for ``<split>_predictions.png`` (see :meth:`_keep_for_preview`)
        self._preview: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ construction and metadata
    @staticmethod
    def _build_backbone(source: str, *, in_chans: int | None, backbone_kwargs: dict[str, Any] | None) -> nn.Module:
        from dinov3_eo.models.hub import load_backbone
        from dinov3_eo.models.vit import BACKBONES, build_backbone

        if source in BACKBONES:
            net = build_backbone(source, in_chans=in_chans or 3, **(backbone_kwargs or {}))
            net.meta = BackboneMeta(name=source, in_chans=net.in_chans, patch_size=net.patch_size, embed_dim=net.embed_dim)
            return net
        if backbone_kwargs:
            raise ValueError("SegmentationTask: backbone_kwargs apply to registry names only, not to a checkpoint path.")
        if not Path(source).exists():
            raise FileNotFoundError(
                f"SegmentationTask: backbone {source!r} is neither a registered name ({sorted(BACKBONES)}) nor an existing file."
            )
        return load_backbone(source, in_chans=in_chans)

    def input_normalization(self) -> Normalization | None:
        """The normalisation inputs must get: recorded data settings, else the ctor's, else the backbone's."""
        if self.data_meta.get("normalization") is not None:
            return Normalization.from_dict(self.data_meta["normalization"])
        if self.hparams.image_normalization is not None:
            return Normalization.from_dict(self.hparams.image_normalization)
        meta = getattr(self.model.backbone, "meta", None)
        return meta.get_normalization() if isinstance(meta, BackboneMeta) else None

    def backbone_meta(self) -> BackboneMeta:
        """The backbone's metadata with the bands and normalisation this head was trained on."""
        net = self.model.backbone
        stored = getattr(net, "meta", None)
        norm = self.input_normalization()
        return BackboneMeta(
            name=getattr(stored, "name", getattr(net, "name", "custom")),
            in_chans=int(net.in_chans),
            patch_size=int(net.patch_size),
            embed_dim=int(net.embed_dim),
            bands=self.data_meta.get("band_names") or getattr(stored, "bands", None),
            normalization=None if norm is None else norm.to_dict(),
            gsd=self.data_meta.get("gsd") or getattr(stored, "gsd", None),
        )

    def checkpoint_metadata(self) -> dict[str, Any]:
        """The ``"dinov3_eo"`` checkpoint entry: BackboneMeta fields plus the architecture and task settings."""
        entry = self.backbone_meta().to_dict()
        entry["arch"] = dict(getattr(self.model.backbone, "arch", {}))
        entry[CHECKPOINT_KEY] = {
            "backbone_source": self.hparams.backbone,
            "head": self.hparams.head,
            "layers": list(self.layers),
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "class_colors": [list(c) for c in self.class_colors],
            "ignore_index": int(self.hparams.ignore_index),
            "band_selection": self.data_meta.get("band_selection"),
            "nodata": self.data_meta.get("nodata"),
        }
        return entry

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        norm = getattr(datamodule, "normalization", None)
        if norm is not None:
            norm = fold_scale_offset(norm, getattr(datamodule, "scale", None), getattr(datamodule, "offset", None))
        elif self.hparams.get("image_normalization") is None:  # a torchgeo datamodule's mean/std, unless told otherwise
            norm = torchgeo_normalization(datamodule, int(self.model.backbone.in_chans))
        names = getattr(datamodule, "band_names", None)
        self.data_meta = {
            "normalization": None if norm is None else norm.to_dict(),
            "band_names": names,
            "band_selection": getattr(datamodule, "bands", None),
            "nodata": getattr(datamodule, "nodata", None),
            "gsd": getattr(datamodule, "training_gsd", getattr(datamodule, "gsd", None)),
        }
        n_bands = len(names) if names else None
        if n_bands is not None and n_bands != int(self.model.backbone.in_chans):
            raise ValueError(
                f"SegmentationTask: the data has {n_bands} bands {names} but the backbone takes "
                f"{int(self.model.backbone.in_chans)}; set model.in_chans or data.bands."
            )
        num_classes = getattr(datamodule, "num_classes", None)
        if num_classes is not None and num_classes > self.num_classes:
            raise ValueError(
                f"SegmentationTask: the labels hold {num_classes} classes but the model predicts {self.num_classes}."
            )
        self._adopt_legend(getattr(datamodule, "class_names", None) or {}, getattr(datamodule, "class_colors", None) or {})

    def _adopt_legend(self, names: Mapping[int, str], colors: Mapping[int, Sequence[int]]) -> None:
        """Take the class names and colours the labels carry (a vector file's class names and ``color`` column, a
        label raster's ``class_names`` tag and colour table) where the model's config leaves them out; they are saved
        as hyper-parameters, so the checkpoint and every map predicted with it keep them. Names the config gives
        that differ from the labels' are kept, with a warning."""
        names = {i: n for i, n in names.items() if 0 <= i < self.num_classes}
        colors = {i: c for i, c in colors.items() if 0 <= i < self.num_classes}
        if names and self.hparams.get("class_names") is None:
            self.class_names = [names.get(i, f"class {i}") for i in range(self.num_classes)]
            self.hparams["class_names"] = list(self.class_names)
            log.info("Class names from the labels: %s.", ", ".join(f"{i}={n}" for i, n in enumerate(self.class_names)))
        elif names:
            differ = {i: (self.class_names[i], n) for i, n in names.items() if self.class_names[i] != n}
            if differ:
                log.warning("model.class_names differ from the labels' for ids %s (model vs labels); the model's are "
                            "kept, check the ids of data.classes.", differ)
        if colors and self.hparams.get("class_colors") is None:
            self.class_colors = [list(colors[i]) if i in colors else c for i, c in enumerate(self.class_colors)]
            self.hparams["class_colors"] = [list(c) for c in self.class_colors]
            log.info("Class colours from the labels for %d of %d classes.", len(colors), self.num_classes)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dinov3_eo"] = self.checkpoint_metadata()

    def on_fit_start(self) -> None:
        if isinstance(self.hparams.class_weights, str) and not self._class_weights_restored:
            self._count_class_weights(self.hparams.class_weights)
        super().on_fit_start()

    def _count_class_weights(self, method: str) -> None:
        """Sets ``class_weight`` from the datamodule's training class counts (``class_weights: balanced``...)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        counter = getattr(datamodule, "class_pixel_counts", None)
        if counter is None:
            raise ValueError(f"SegmentationTask: class_weights={method!r} counts the training labels' classes, which "
                             "needs a datamodule with class_pixel_counts (DenseDataModule); give a list instead.")
        counts = counter(self.num_classes, progress=self.trainer.is_global_zero)
        weights = class_weights_from_counts(counts, method)
        self.class_weight.copy_(torch.as_tensor(weights, dtype=torch.float32))
        if self.trainer.is_global_zero:
            missing = [self.class_names[i] for i in range(self.num_classes) if counts[i] == 0]
            log.info("Class weights (%s) from %s labelled training pixels: %s.", method, f"{int(counts.sum()):,}",
                     ", ".join(f"{n} {w:.3g}" for n, w in zip(self.class_names, weights)))
            if missing:
                log.warning("No training pixel of class %s: its weight is 0 and the model cannot learn it.",
                            ", ".join(missing))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a resumed fit keeps the class weights counted when it began
        self._class_weights_restored = "class_weight" in checkpoint.get("state_dict", {})
        entry = checkpoint.get("dinov3_eo", {})
        task = entry.get(CHECKPOINT_KEY, {})
        self.data_meta = {
            "normalization": entry.get("normalization"),
            "band_names": entry.get("bands"),
            "band_selection": task.get("band_selection"),
            "nodata": task.get("nodata"),
            "gsd": entry.get("gsd"),
        }

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> SegmentationTask:
        """Rebuild a trained task from its ``.ckpt`` alone (the backbone source file is not needed).

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if it is not a segmentation checkpoint of this project.
        """
        from dinov3_eo.models.vit import BACKBONES

        checkpoint = _load_checkpoint(path, map_location)
        entry = checkpoint.get("dinov3_eo") or {}
        if CHECKPOINT_KEY not in entry or "state_dict" not in checkpoint:
            raise ValueError(f"{str(path)!r} is not a dinov3-eo segmentation checkpoint (no 'dinov3_eo.{CHECKPOINT_KEY}' entry).")
        import inspect

        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        # LightningCLI adds bookkeeping entries (``_instantiator``, ``_class_path``) that are not arguments
        hparams = {k: v for k, v in dict(checkpoint.get("hyper_parameters", {})).items() if k in accepted}
        arch = {k: v for k, v in (entry.get("arch") or {}).items() if k != "in_chans"}
        name = entry.get("model") or entry.get("name")
        # every architecture argument is overridden, so any registered factory rebuilds the exact network
        hparams["backbone"] = name if name in BACKBONES else "vitmicro16"
        hparams["backbone_kwargs"] = arch or hparams.get("backbone_kwargs")
        hparams["in_chans"] = int(entry["in_chans"])
        task = cls(**hparams)
        task.load_state_dict(checkpoint["state_dict"], strict=True)
        task.on_load_checkpoint(checkpoint)
        task.model.backbone.meta = task.backbone_meta()
        return task.eval()

    # ------------------------------------------------------------------ training
    def forward(self, x: Tensor) -> Tensor:
        """Normalised imagery ``[B, C, H, W]`` -> class logits ``[B, K, H, W]``."""
        return self.model(x)

    def check_labels(self, mask: Tensor) -> None:
        """Raise one clear error when a labelled pixel of ``mask`` is not a class (rather than a device-side assert
        inside the loss). Called on the host: in :meth:`on_before_batch_transfer`, and by the loss on CPU tensors."""
        check_class_labels(mask, self.num_classes, ignore_index=self.hparams.ignore_index, owner="SegmentationTask")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        mask = batch.get("mask") if isinstance(batch, Mapping) else None
        if isinstance(mask, Tensor) and mask.device.type == "cpu":
            self.check_labels(mask)  # here, before the transfer, the check reads nothing back from a GPU
        return batch

    def _loss_terms(self, logits: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The configured loss terms over the labelled pixels (each 0 with a gradient path when a batch has none),
        computed without reading anything back from the device; see :mod:`dinov3_eo.losses.segmentation`."""
        if mask.device.type == "cpu":
            self.check_labels(mask)
        return segmentation_loss_terms(logits, mask, self.loss_terms, ignore_index=self.hparams.ignore_index,
                                       class_weight=self.class_weight, focal_gamma=self.hparams.focal_gamma)

    def _loss(self, logits: Tensor, mask: Tensor) -> Tensor:
        """The training loss: the sum of the configured terms (the class-weighted mean cross-entropy by default)."""
        return torch.stack(list(self._loss_terms(logits, mask).values())).sum()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, mask = batch["image"], batch["mask"]
        if self.hparams.augment:
            image, mask = random_dihedral(image, mask, seed=self.hparams.augment_seed, step=self.global_step)
        logits = self(image)  # [B, K, H, W]
        terms = self._loss_terms(logits, mask)
        loss = torch.stack(list(terms.values())).sum()
        logged = {"train/loss": loss}
        if len(terms) > 1:
            logged.update({f"train/loss_{name}": value.detach() for name, value in terms.items()})
        self.log_after_backward(logged, batch_size=batch["image"].shape[0], prog_bar=("train/loss",))  # no sync
        return loss

    def on_validation_epoch_start(self) -> None:
        self._confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)
        self._preview = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score_batch(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")
        if not self.trainer.sanity_checking:
            self._write_preview("val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score_batch(batch, "test")

    def on_test_epoch_end(self) -> None:
        """Logs the ``test/`` metrics and writes ``test_metrics.json`` (overall accuracy, kappa, mIoU and per-class
        IoU/F1/precision/recall, as ``segment evaluate`` reports a map), ``test_confusion.csv``,
        ``test_confusion.png`` and ``test_predictions.png`` to the run's log folder."""
        confusion = self._log_scores("test")
        self._write_preview("test")
        if confusion is None or not self.trainer.is_global_zero:
            return
        from dinov3_eo.tasks.segmentation_eval import accuracy_report, write_accuracy_report

        folder = self._run_folder()
        report = accuracy_report(confusion.numpy(), self.class_names)
        ckpt = getattr(self.trainer, "ckpt_path", None)
        report = {"checkpoint": None if ckpt is None else str(ckpt), **report}
        write_accuracy_report(folder, report, confusion.numpy(), self.class_names, prefix="test_")
        log.info("Test: mIoU %.4f, overall accuracy %.4f over %d labelled pixels; report in %s.",
                 report["miou"], report["overall_accuracy"], report["pixels"], folder / "test_metrics.json")

    def _score_batch(self, batch: dict[str, Any], split: str) -> None:
        """Adds a validation or test batch to the epoch's confusion matrix and logs its loss."""
        logits = self(batch["image"])
        mask = batch["mask"]
        self.log(f"{split}/loss", self._loss(logits, mask), batch_size=mask.shape[0], sync_dist=True)
        labelled = mask != self.hparams.ignore_index
        truth, pred = mask[labelled], logits.argmax(dim=1)[labelled]
        if self._confusion is None:
            self.on_validation_epoch_start()
        assert self._confusion is not None
        self._confusion += torch.bincount(truth * self.num_classes + pred, minlength=self.num_classes**2).view(
            self.num_classes, self.num_classes
        )  # [K*K] -> [K (truth), K (pred)]
        self._keep_for_preview(batch, logits)

    def _keep_for_preview(self, batch: dict[str, Any], logits: Tensor) -> None:
        """Keeps the epoch's first ``_PREVIEW_TILES`` tiles with a label (imagery as RGB, mask, prediction) on the
        first process, for ``<split>_predictions.png``; once they are kept it costs nothing more."""
        preview = self._preview
        if len(preview) >= _PREVIEW_TILES or self._trainer is None or not self.trainer.is_global_zero:
            return
        from dinov3_eo.inference.writers import display_rgb
        from dinov3_eo.models.hub import preview_bands

        mask = batch["mask"].cpu().numpy()
        keep = [b for b in range(len(mask)) if (mask[b] != self.hparams.ignore_index).any()]
        keep = keep[: _PREVIEW_TILES - len(preview)]
        if not keep:
            return
        image = batch["image"][keep].float().cpu().numpy()  # [n, C, H, W]
        valid = batch["valid"][keep].cpu().numpy() if "valid" in batch else np.ones((len(keep), *mask.shape[1:]), bool)
        rgb = [b - 1 for b in preview_bands(self.model.backbone, range(1, image.shape[1] + 1))]
        pred = logits[keep].argmax(dim=1).cpu().numpy()
        paths = batch.get("path")
        for j, b in enumerate(keep):
            name = Path(str(paths[b])).name if isinstance(paths, (list, tuple)) else f"tile {len(preview)}"
            preview.append({"image": display_rgb(image[j][rgb], valid[j]), "mask": mask[b], "pred": pred[j],
                            "valid": valid[j], "title": name})  # fmt: skip

    def _write_preview(self, split: str) -> None:
        """``<split>_predictions.png`` in the run folder (overwritten each validation): imagery, reference and
        prediction of the kept tiles."""
        preview = self._preview
        if not preview or not self.trainer.is_global_zero:
            return
        from dinov3_eo.tasks.segmentation_plots import prediction_panels

        what = "validation" if split == "val" else "test"
        prediction_panels(
            self._run_folder() / f"{split}_predictions.png", np.stack([p["image"] for p in preview]),
            np.stack([p["mask"] for p in preview]), np.stack([p["pred"] for p in preview]),
            class_names=self.class_names, class_colors=self.class_colors, ignore_index=self.hparams.ignore_index,
            valid=np.stack([p["valid"] for p in preview]), titles=[p["title"] for p in preview],
            title=f"{what}, epoch {self.current_epoch}, step {self.global_step}",
        )  # fmt: skip

    def _run_folder(self) -> Path:
        """The run's log folder (the logger's version folder, else ``default_root_dir``), created."""
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _log_scores(self, split: str) -> Tensor | None:
        """Logs ``<split>/mIoU``, ``mF1``, ``accuracy`` and per-class IoU/F1 from the epoch's confusion matrix,
        summed over the processes; returns that matrix ``[K (truth), K (pred)]`` on the CPU (``None`` before any
        batch)."""
        if self._confusion is None:
            return None
        confusion = self.all_gather(self._confusion)
        if confusion.ndim == 3:
            confusion = confusion.sum(dim=0)  # [world, K, K] -> [K, K]
        if int(confusion.sum()) == 0:
            what = "Validation" if split == "val" else "The test"
            log.warning("%s saw no labelled pixel: the metrics are 0 (check the split and the labels' extent).", what)
        iou, f1 = iou_f1_from_confusion(confusion)
        metrics = {
            f"{split}/mIoU": float(np.nanmean(iou.cpu().numpy())) if not torch.isnan(iou).all() else 0.0,
            f"{split}/mF1": float(np.nanmean(f1.cpu().numpy())) if not torch.isnan(f1).all() else 0.0,
            f"{split}/accuracy": float(confusion.diag().sum() / confusion.sum().clamp(min=1)),
        }
        for name, i, f in zip(self.class_names, iou.tolist(), f1.tolist()):
            if not math.isnan(i):
                metrics[f"{split}/IoU/{name}"] = i
                metrics[f"{split}/F1/{name}"] = f
        self.log(f"{split}/mIoU", metrics.pop(f"{split}/mIoU"), prog_bar=True)
        # the confusion matrix is already summed over ranks, so the metrics need no further reduction
        self.log_dict(metrics, prog_bar=False)
        self.last_confusion = confusion.cpu()
        return self.last_confusion

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        groups = self.model.parameter_groups(lr=hp.lr, backbone_lr_scale=hp.backbone_lr_mult,
                                             lora_lr_scale=hp.get("lora_lr_mult", 1.0))
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = 1
        if self._trainer is not None:
            total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else int(self.trainer.estimated_stepping_batches)
        total, warmup = max(int(total), 1), int(hp.warmup_steps)

        def factor(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _load_checkpoint(path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
    import pathlib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {str(path)!r}.")
    # Path objects appear in Lightning hyper-parameters (LightningCLI); they are plain values.
    safe = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    with torch.serialization.safe_globals(safe):
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    return checkpoint


def is_segmentation_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint written by :class:`SegmentationTask`."""
    try:
        checkpoint = _load_checkpoint(path)
    except Exception:  # unreadable files are simply "not ours"; the caller reports its own error
        return False
    return CHECKPOINT_KEY in (checkpoint.get("dinov3_eo") or {})


# ---------------------------------------------------------------------------------------- prediction
@dataclass(frozen=True)
class SceneOutputs:
    """Paths written for one scene (``None`` where an output was not requested)."""

    classes: Path
    quicklook: Path
    probabilities: Path | None
    polygons: Path | None


def torchgeo_normalization(datamodule: Any, num_bands: int) -> Normalization | None:
    """What a torchgeo datamodule divides its batches by: its ``mean`` and ``std`` (the ``Normalize`` of its
    default ``aug``, applied on the device after the transfer), broadcast to ``num_bands``; ``None`` for other
    datamodules. Recorded in the checkpoint, so that ``segment predict`` scales GeoTIFFs as training did (a
    datamodule with augmentations of its own beyond that ``Normalize`` should give ``model.image_normalization``)."""
    try:
        from torchgeo.datamodules.geo import BaseDataModule
    except ImportError:  # pragma: no cover - torchgeo is a dependency
        return None
    if not isinstance(datamodule, BaseDataModule):
        return None
    mean = np.broadcast_to(np.asarray(torch.as_tensor(datamodule.mean).cpu(), dtype=np.float64).reshape(-1), (num_bands,))
    std = np.broadcast_to(np.asarray(torch.as_tensor(datamodule.std).cpu(), dtype=np.float64).reshape(-1), (num_bands,))
    return Normalization(mean=tuple(mean.tolist()), std=tuple(std.tolist()), name=f"torchgeo {type(datamodule).__name__}")


def scene_outputs(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, probabilities: bool, polygons: bool,
                  chip: bool = False) -> SceneOutputs:  # fmt: skip
    """Output paths of one scene: ``OUT/<stem>_classes.tif`` (``.png`` for a ``chip``), ``_quicklook.png``,
    ``_probabilities.tif``, ``_polygons.gpkg``."""
    stem, out = Path(src).stem, Path(out_dir)
    return SceneOutputs(
        classes=out / f"{stem}_classes.{'png' if chip else 'tif'}",
        quicklook=out / f"{stem}_quicklook.png",
        probabilities=out / f"{stem}_probabilities.tif" if probabilities else None,
        polygons=out / f"{stem}_polygons.gpkg" if polygons else None,
    )


def resolve_band_selection(src: Any, selection: Sequence[int | str] | None) -> list[int] | None:
    """1-based band indexes of ``src`` for a selection of indexes or band descriptions (``None``: all bands).

    Raises:
        ValueError: if a named band is not among ``src``'s band descriptions.
    """
    if selection is None:
        return None
    out = []
    descriptions = [d or "" for d in src.descriptions]
    for item in selection:
        if isinstance(item, str) and not item.isdigit():
            if item not in descriptions:
                raise ValueError(f"Band {item!r} (from the checkpoint) is not among the bands {descriptions} of {src.name!r}.")
            out.append(descriptions.index(item) + 1)
        else:
            out.append(int(item))
    return out


def check_input(task: SegmentationTask, src: Any, bands: Sequence[int] | None) -> None:
    """Refuse an input whose band count or normalisation does not fit the checkpoint.

    Raises:
        ValueError: with the file, the counts and the bands the model was trained on.
    """
    in_chans = int(task.model.backbone.in_chans)
    n = len(bands) if bands is not None else src.count
    trained_on = task.backbone_meta().bands
    if n != in_chans:
        raise ValueError(
            f"{src.name!r} gives {n} bands but the model was trained on {in_chans}"
            f"{f' ({trained_on})' if trained_on else ''}; select the bands with --bands."
        )
    norm = task.input_normalization()
    if norm is None:
        raise ValueError(
            "The checkpoint carries no input normalisation, so the imagery cannot be scaled as in training; "
            "retrain with a datamodule (or image_normalization=) so the checkpoint records it."
        )
    if norm.num_bands != n:
        raise ValueError(f"The checkpoint's normalisation has {norm.num_bands} bands but {src.name!r} gives {n}.")


def warn_on_another_scale(src: Any, trained_gsd: float | None) -> None:
    """Warn when ``src``'s pixels differ from the training pixels by more than a quarter
    (:func:`~dinov3_eo.data.raster.pixel_size_off_scale`); segmentation cannot resample, so the warning says how."""
    native = pixel_size_off_scale(src, trained_gsd)
    if native:
        log.warning("%s has %.3g m pixels but the model was trained on %.3g m pixels; its predictions at another "
                    "scale are unreliable: resample the scene first (e.g. gdalwarp -tr %.3g %.3g -r average).",
                    src.name, native, trained_gsd, trained_gsd, trained_gsd)


def segment_scene(
    task: SegmentationTask,
    src_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    probabilities: bool = False,
    polygons: bool = False,
    min_area: float = 0.0,
    simplify: float = 0.0,
    window: int = 512,
    overlap: float | int = 0.25,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    overwrite: bool = False,
    progress: bool = True,
    preview_bands: Sequence[int] | None = None,
    chip: bool = False,
) -> SceneOutputs:
    """Segment one GeoTIFF into ``out_dir``: class COG, PNG quick-look, optional probabilities and polygons.

    ``chip``: the input is an image chip, with or without a georeference (JPEG, PNG, TIFF): the classes are written
    as ``<stem>_classes.png``, a palette PNG of class ids on the chip's pixel grid (255 where it has no data; the
    class colours as its palette), as chip datasets ship their masks; no probabilities or polygons.

    ``bands``/``nodata`` default to what the checkpoint recorded; ``preview_bands`` (1-based, red, green,
    blue) picks the quick-look's background bands (default: the first three model bands); ``amp`` and ``tta`` are
    :func:`~dinov3_eo.inference.predict.predict_raster`'s bf16 switch and test-time augmentation; ``min_area`` and
    ``simplify`` are :func:`~dinov3_eo.inference.writers.vectorize_classes`'. Every output is checked up front, so
    an existing one stops the run before any work (unless ``overwrite``).

    Raises:
        FileExistsError: if an output exists and ``overwrite`` is false.
        ValueError: if the input does not fit the checkpoint (see :func:`check_input`), or ``chip`` with
            probabilities or polygons.
    """
    import contextlib

    from dinov3_eo.inference.predict import predict_raster
    from dinov3_eo.inference.writers import check_overwrite, class_map_as_png, vectorize_classes, write_quicklook

    if chip and (probabilities or polygons):
        raise ValueError("Image chips are segmented into a PNG class mask on their pixel grid; probabilities and "
                         "polygons need a georeferenced scene (leave out --chips for GeoTIFFs).")
    outputs = scene_outputs(src_path, out_dir, probabilities=probabilities, polygons=polygons, chip=chip)
    for path in (outputs.classes, outputs.quicklook, outputs.probabilities, outputs.polygons):
        if path is not None:
            check_overwrite(path, overwrite, inputs=[src_path])
    meta = task.checkpoint_metadata()[CHECKPOINT_KEY]
    # a chip's class map is written where the streaming writer writes (a GeoTIFF), then becomes the PNG
    target = (class_map_as_png(outputs.classes, colors=task.class_colors, overwrite=overwrite) if chip
              else contextlib.nullcontext(outputs.classes))  # fmt: skip
    with target as classes, open_quietly(src_path) as src:
        band_indexes = list(bands) if bands is not None else resolve_band_selection(src, meta.get("band_selection"))
        check_input(task, src, band_indexes)
        if not chip:
            if not is_georeferenced(src):
                raise ValueError(f"{src.name} is not georeferenced (no CRS or no geotransform), so a class map could "
                                 "not be placed on a map: for image chips pass --chips (a PNG class mask per chip), "
                                 "else georeference it first (gdal_edit.py -a_srs ... -a_ullr ...).")
            warn_on_another_scale(src, meta.get("gsd"))
        nodata = nodata if nodata is not None else meta.get("nodata")
        colormap = {i: (*c, 255) for i, c in enumerate(task.class_colors)}
        predict_raster(
            task.model, src, classes, out_channels=task.num_classes, window=window, overlap=overlap,
            batch_size=batch_size, bands=band_indexes, nodata=nodata, normalization=task.input_normalization(),
            output="argmax", probabilities=outputs.probabilities, class_names=task.class_names, colormap=colormap,
            device=device, amp=amp, tta=tta, multiple=int(task.model.pad_multiple), progress=progress,
            overwrite=overwrite, tags={"model": "dinov3_eo segmentation", "head": task.hparams.head},
            require_georeference=not chip, overviews=not chip,
        )  # fmt: skip
        rgb = list(preview_bands) if preview_bands is not None else (band_indexes[:3] if band_indexes is not None else [1, 2, 3])
        write_quicklook(outputs.quicklook, classes=classes, image=src_path, bands=rgb, overwrite=overwrite,
                        title=Path(src_path).name, nodata=nodata)  # fmt: skip
    if outputs.polygons is not None:
        vectorize_classes(outputs.classes, outputs.polygons, min_area=min_area, simplify=simplify, overwrite=overwrite)
    return outputs


def expand_inputs(items: Sequence[str]) -> list[Path]:
    """Files and glob patterns -> sorted unique paths.

    Raises:
        FileNotFoundError: if an item matches nothing.
    """
    found: set[Path] = set()
    for item in items:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else ([item] if Path(item).is_file() else [])
        if not matches:
            raise FileNotFoundError(f"Input {item!r} matches no file.")
        found.update(Path(m).resolve() for m in matches)
    return sorted(found)


def shard_for_rank(items: Sequence[Any], *, rank: int | None = None, world_size: int | None = None) -> list[Any]:
    """This rank's share of ``items`` (round robin): from ``RANK``/``WORLD_SIZE`` (torchrun) unless given.

    Every item goes to exactly one rank, so no two ranks ever write the same output.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"Need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world_size}.")
    return list(items[rank::world_size])


def _predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov3-eo segment predict",
        description="Segment GeoTIFFs with a trained checkpoint: class COG + PNG quick-look (+ probabilities, GeoPackage); "
        "image chips without a georeference with --chips: a PNG class mask per chip + quick-look. "
        "Under torchrun (RANK/WORLD_SIZE set) the scenes are shared out across ranks.",
    )
    parser.add_argument("inputs", nargs="+", help="GeoTIFFs (image chips with --chips) or glob patterns (quote globs)")
    parser.add_argument("--chips", action="store_true",
                        help="the inputs are image chips, with or without a georeference (JPEG, PNG, TIFF): write "
                             "<stem>_classes.png, a palette PNG of class ids on each chip's pixel grid (255 = no data), "
                             "and the quick-look")
    parser.add_argument("--model", required=True, help="segmentation checkpoint (.ckpt from 'segment fit')")
    parser.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    parser.add_argument("--polygons", action="store_true", help="also vectorise the classes into <stem>_polygons.gpkg")
    parser.add_argument("--min-area", type=float, default=0.0, help="drop polygons smaller than this (CRS units^2)")
    parser.add_argument("--simplify", type=float, default=0.0, help=SIMPLIFY_HELP)
    parser.add_argument("--probabilities", action="store_true", help="also write per-class probabilities (uint8, /254)")
    parser.add_argument("--bands", type=int, nargs="+", default=None, help="1-based input bands (default: as in training)")
    parser.add_argument("--nodata", type=float, default=None, help="input nodata override (default: as in training)")
    add_window_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def predict_main(argv: Sequence[str]) -> int:
    """``dinov3-eo segment predict IN.tif [...] --model seg.ckpt -o OUT``; returns the exit code."""
    args = _predict_parser().parse_args(list(argv))
    prog = "dinov3-eo segment predict"
    try:
        scenes = shard_for_rank(expand_inputs(args.inputs))
        task = SegmentationTask.from_checkpoint(args.model)
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        check_distinct_stems(scenes)
        for scene in scenes:  # refuse before any work, not after hours of it
            outputs = scene_outputs(scene, out_dir, probabilities=args.probabilities, polygons=args.polygons, chip=args.chips)
            for path in vars(outputs).values():
                if path is not None and path.exists() and not args.overwrite:
                    raise FileExistsError(f"Output {str(path)!r} already exists; pass --overwrite to replace it.")
        settings = window_settings(args)
        task.to(settings["device"])
        for i, scene in enumerate(scenes, 1):
            if not args.quiet:
                print(f"[{i}/{len(scenes)}] {scene}", file=sys.stderr)
            written = segment_scene(
                task, scene, out_dir, bands=args.bands, nodata=args.nodata, probabilities=args.probabilities,
                polygons=args.polygons, min_area=args.min_area, simplify=args.simplify, **settings,
                overwrite=args.overwrite, progress=not args.quiet, chip=args.chips,
            )  # fmt: skip
            for path in vars(written).values():
                if path is not None:
                    print(path)
    except (FileExistsError, FileNotFoundError, ValueError, IndexError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def classes_of_labels(labels: str | os.PathLike[str], *, attribute: str = "name",
                      classes: Mapping[str, int] | None = None, nodata: float | None = None,
                      pairing: str = "georeference") -> tuple[int, list[str] | None]:
    """The number of classes a label file defines and their names where it gives them.

    A vector file: its classes (``classes``, else the sorted values of ``attribute``); a label raster: its
    ``class_names`` tag, else the largest class id found in one pass over its blocks (``nodata`` and the file's own
    nodata left out) plus one. ``pairing``: how label rasters are matched to the imagery (``"name"`` also reads
    masks without a georeference, and PNG masks in a folder).

    Raises:
        ValueError: for a label raster whose values are not class ids (negative or fractional) or that holds none.
    """
    from dinov3_eo.data.labels import RasterLabels, VectorLabels, is_raster_labels

    path = os.fspath(labels)
    if is_raster_labels(path):
        source = RasterLabels(path=path, nodata=nodata, pairing=pairing)
        names = source.class_names
        if names:
            return max(names) + 1, [names.get(i, f"class {i}") for i in range(max(names) + 1)]
        values = source.present_values()
        if not values:
            raise ValueError(f"The label raster {path} holds no label (every pixel is its nodata).")
        if any(v < 0 or v != int(v) for v in values):
            bad = [v for v in values if v < 0 or v != int(v)][:5]
            raise ValueError(f"The label raster {path} holds values {bad} that are not class ids (0, 1, 2 ...); give "
                             "--model.num_classes, or declare the value that marks unlabelled pixels as its nodata.")
        return int(max(values)) + 1, None
    source = VectorLabels(path=path, attribute=attribute, classes=classes)
    k = max(source.classes.values()) + 1
    return k, [source.class_names.get(i, f"class {i}") for i in range(k)] if source.class_names else None


def _segment_cli_class() -> type:
    from lightning.pytorch.cli import LightningCLI

    class SegmentCLI(LightningCLI):
        """LightningCLI whose data is GeoTIFFs (``DenseDataModule``) unless ``data.class_path`` names another data
        module (``ChipSegmentationDataModule``: chips without a georeference), and whose model learns the classes
        from the labels when the config names none."""

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            model, data = config.get("model"), config.get("data")
            if model is None or data is None or model.get("num_classes") is not None:
                return
            if model.get("class_names") is not None:
                return
            class_path, data = data.get("class_path") or "", data.get("init_args") or data
            if class_path.endswith("ChipSegmentationDataModule"):
                model["num_classes"] = k = _classes_of_chips(data)
                log.info("model.num_classes = %d from the masks %s.", k, data["masks"])
                return
            if not data.get("labels"):
                return
            k, names = classes_of_labels(data["labels"], attribute=data.get("label_attribute") or "name",
                                         classes=data.get("classes"), nodata=data.get("label_nodata"),
                                         pairing=data.get("label_pairing") or "georeference")  # fmt: skip
            model["num_classes"] = k
            log.info("model.num_classes = %d from %s%s.", k, data["labels"],
                     f" ({', '.join(names)})" if names else "")  # fmt: skip

    return SegmentCLI


def _classes_of_chips(data: Any) -> int:
    """The number of classes of a ``ChipSegmentationDataModule`` config (its init arguments): the module's own answer
    (constructing it reads no file)."""
    from dinov3_eo.data.chips import ChipSegmentationDataModule

    arguments = data.as_dict() if hasattr(data, "as_dict") else dict(data)
    return ChipSegmentationDataModule(**arguments).counted_num_classes()


def fit_main(argv: Sequence[str]) -> int:
    """``dinov3-eo segment fit|validate|test --config x.yaml`` through LightningCLI: GeoTIFFs and their labels
    (``DenseDataModule``) or, with ``data.class_path: ChipSegmentationDataModule``, chips without a georeference; a
    config without ``model.num_classes`` and ``model.class_names`` takes the classes of the labels."""
    import lightning.pytorch as pl

    # imported so that a config may name the data modules by class name alone
    from dinov3_eo.data.chips import ChipSegmentationDataModule  # noqa: F401
    from dinov3_eo.data.datamodule import DenseDataModule  # noqa: F401

    return run_lightning_cli(SegmentationTask, pl.LightningDataModule, argv, "dinov3-eo segment",
                             cli_class=_segment_cli_class(), subclass_mode_data=True,
                             default_data_class="dinov3_eo.data.DenseDataModule")  # fmt: skip


def main(argv: Sequence[str]) -> int:
    """``dinov3-eo segment fit --config ...`` (training), ``segment predict ...`` (GeoTIFF inference),
    ``segment prototypes ...`` (no training), ``segment evaluate ...`` (accuracy of a class map) or
    ``segment change ...`` (transitions between two maps)."""
    argv = list(argv)
    if argv and argv[0] == "predict":
        return predict_main(argv[1:])
    if argv and argv[0] == "evaluate":
        return evaluate_main(argv[1:])
    if argv and argv[0] == "change":
        from dinov3_eo.tasks.class_change import change_main

        return change_main(argv[1:])
    if argv and argv[0] == "prototypes":
        from dinov3_eo.tasks.prototypes import prototypes_main

        return prototypes_main(argv[1:])
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: dinov3-eo segment {fit,validate,test,predict,prototypes,evaluate,change} ...\n\n"
            "  fit --config x.yaml       train a head (LightningCLI: model=SegmentationTask, data=DenseDataModule;\n"
            "                            chips without a georeference: --data.class_path ChipSegmentationDataModule)\n"
            "  validate --config x.yaml  evaluate a checkpoint (--ckpt_path)\n"
            "  test --config x.yaml --ckpt_path C.ckpt   score a checkpoint on data.test_files (test_metrics.json)\n"
            "  predict IN.tif ... --model seg.ckpt -o OUT_DIR   segment GeoTIFFs, or chips with --chips (see 'predict --help')\n"
            "  prototypes IN.tif ... --labels L.gpkg --model BACKBONE -o OUT_DIR   segment without training\n"
            "  evaluate CLASSES.tif REFERENCE [--out-dir DIR]   accuracy of a class map (see 'evaluate --help')\n"
            "  change BEFORE.tif AFTER.tif [--out-dir DIR]      from -> to transitions of two class maps, in hectares"
        )
        return 0
    return fit_main(argv)


__all__ = [
    "HEADS",
    "SceneOutputs",
    "SegmentationTask",
    "build_head",
    "check_input",
    "default_layers",
    "evaluate_main",
    "expand_inputs",
    "fit_main",
    "fold_scale_offset",
    "iou_f1_from_confusion",
    "is_segmentation_checkpoint",
    "main",
    "predict_main",
    "resolve_band_selection",
    "scene_outputs",
    "segment_scene",
    "shard_for_rank",
]
