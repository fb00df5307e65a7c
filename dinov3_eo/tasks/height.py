"""Canopy height in metres from imagery: a dense head on frozen DINOv3 features, trained on CHM rasters.

* :class:`HeightTask` (LightningModule): a DPT or linear head (:mod:`dinov3_eo.models.dense`) on a frozen
  (optionally trainable) backbone; output as height bins (CHMv2 "mixlog" bins by default) or direct regression;
  SigLoss, L1 or Huber loss, all ignoring pixels without a reference height; validation MAE/RMSE/R²/bias overall
  and per height bin, with a scatter plot and an error map written to the run folder.
* :func:`load_chmv2_head` / :func:`build_chmv2`: Meta's released CHMv2 head (68 keys) loaded strictly, and the full
  CHMv2 model from (backbone weights, head weights) with the ``chmv2`` input normalisation.
* :func:`load_height_model` / :func:`predict_height`: a trained checkpoint back to a model, and a GeoTIFF of any
  size to a float32 metres COG (input CRS/transform, NaN nodata) plus a PNG quick-look, through the streaming
  predictor (memory flat in raster size).
* ``main``: ``dinov3-eo height fit --config configs/height/<name>.yaml`` (LightningCLI),
  ``dinov3-eo height predict IN.tif --model h.ckpt -o CHM.tif`` and
  ``dinov3-eo height evaluate PRED.tif REF.tif --out-dir DIR``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window
import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinov3_eo.cli import run_lightning_cli
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import pixel_size_off_scale, require_georeferenced
from dinov3_eo.inference.predict import add_window_options, window_settings
from dinov3_eo.inference.tta import TTA, random_dihedral
from dinov3_eo.losses.height import MaskedHuberLoss, MaskedL1Loss, SigLoss
from dinov3_eo.models.dense import (
    CHMV2_LAYERS,
    CHMV2_MAX_HEIGHT,
    CHMV2_MIN_HEIGHT,
    CHMV2_N_BINS,
    DenseModel,
    DPTHead,
    LinearHead,
    LogitsToHeight,
    chmv2_head,
    chmv2_height,
    load_head_state,
    load_head_weights,
    read_head_state,
)
from dinov3_eo.models.hub import BackboneMeta, infer_architecture, load_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.height_metrics import HeightMetrics, flat_metrics
from dinov3_eo.tasks.height_plots import error_map, height_quicklook, scatter_plot
from dinov3_eo.step_logging import LogsAfterBackward
from dinov3_eo.training_modes import TrainModesAtFitStart

log = logging.getLogger(__name__)

HEADS = ("dpt", "linear", "chmv2")
OUTPUTS = ("bins", "regression")
LOSSES = ("sig", "l1", "huber")
#: Validation pixels kept (seeded reservoir) for the scatter plot, and tiles kept for the error map.
_SCATTER_PIXELS = 50_000
_ERROR_MAP_TILES = 8


def even_layers(n_blocks: int, n: int = 4) -> list[int]:
    """``n`` evenly spaced 0-based block indices ending with the last block (ViT-L, n=4: ``[5, 11, 17, 23]``)."""
    if not 1 <= n <= n_blocks:
        raise ValueError(f"even_layers: need 1 <= n <= n_blocks, got n={n}, n_blocks={n_blocks}.")
    return [(i + 1) * n_blocks // n - 1 for i in range(n)]


class HeightTask(LogsAfterBackward, TrainModesAtFitStart):
    """Canopy-height regression: ``forward(image [B, C, H, W]) -> metres [B, 1, H, W]``.

    Args:
        backbone: registry name of the ViT (``vits16``, ``vitl16`` ...), built with random weights unless
            ``weights`` is given.
        in_chans: input bands.
        backbone_kwargs: extra constructor arguments of the backbone (random-weight builds only).
        weights: backbone weights (any layout :func:`~dinov3_eo.models.hub.load_backbone` reads: official, SAT-493M,
            our exports and checkpoints); the architecture is then taken from the weights.
        head: ``"dpt"`` (DPT decoder, sizes below), ``"linear"`` (BatchNorm + 1x1 conv on the concatenated layers)
            or ``"chmv2"`` (the DPT of Meta's CHMv2 release: 256 bins, CLS read-out, 33.7 M parameters on a ViT-L).
        layers: 0-based blocks fed to the head; default: four evenly spaced blocks (DPT/CHMv2; ``[5, 11, 17, 23]``
            on a ViT-L) or the last block (linear).
        output: ``"bins"`` (per-pixel weights over ``n_bins`` height bins, expected value in metres) or
            ``"regression"`` (one channel, ``relu(x) + min_height``).
        n_bins, min_height, max_height, bin_strategy, bin_norm: the height bins (see
            :class:`~dinov3_eo.models.dense.LogitsToHeight`); the CHMv2 values by default.
        dpt_channels, dpt_post_process_channels, dpt_hidden_channels, readout: DPT sizes (official defaults).
        use_cls_token: the linear head concatenates the class token (ignored by DPT, which uses ``readout``).
        head_weights: a head checkpoint loaded strictly after construction (e.g. the released CHMv2 head).
        loss: ``"sig"`` (scale-invariant log, λ ``sig_lambda``), ``"l1"`` or ``"huber"`` (``huber_delta`` metres).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 0 over the run.
        freeze_backbone: keep the backbone frozen (official protocol); otherwise it trains at
            ``lr * backbone_lr_scale``.
        lora: fine-tune the backbone through low-rank updates instead (a mapping of
            :class:`~dinov3_eo.models.lora.LoRAConfig` fields, e.g. ``{rank: 8}``): its own weights stay fixed, the
            updates train at ``lr * lora_lr_scale``.
        augment: random flips / quarter turns of each training batch (image, heights and validity together).
        augment_seed: seed of the augmentation stream.

    Raises:
        ValueError: an unknown ``head``/``output``/``loss``, or a head/output combination that cannot work
            (``chmv2`` needs 256 bins).
    """

    def __init__(
        self,
        *,
        backbone: str = "vitmicro16",
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        weights: str | None = None,
        head: str = "dpt",
        layers: list[int] | None = None,
        output: str = "bins",
        n_bins: int = CHMV2_N_BINS,
        min_height: float = CHMV2_MIN_HEIGHT,
        max_height: float = CHMV2_MAX_HEIGHT,
        bin_strategy: str = "chmv2_mixlog",
        bin_norm: str = "chmv2_mixlog",
        dpt_channels: int = 256,
        dpt_post_process_channels: list[int] | None = None,
        dpt_hidden_channels: int = 128,
        readout: str = "project",
        use_cls_token: bool = False,
        head_weights: str | None = None,
        loss: str = "sig",
        sig_lambda: float = 0.15,
        huber_delta: float = 1.0,
        lr: float = 3e-4,
        weight_decay: float = 1e-4,
        warmup_steps: int = 0,
        freeze_backbone: bool = True,
        backbone_lr_scale: float = 0.1,
        lora: dict[str, Any] | None = None,
        lora_lr_scale: float = 1.0,
        augment: bool = True,
        augment_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if head not in HEADS:
            raise ValueError(f"HeightTask: head must be one of {HEADS}, got {head!r}.")
        if output not in OUTPUTS:
            raise ValueError(f"HeightTask: output must be one of {OUTPUTS}, got {output!r}.")
        if loss not in LOSSES:
            raise ValueError(f"HeightTask: loss must be one of {LOSSES}, got {loss!r}.")
        if head == "chmv2" and (output != "bins" or n_bins != CHMV2_N_BINS):
            raise ValueError(f"HeightTask: head='chmv2' predicts {CHMV2_N_BINS} bins; use output='bins', n_bins={CHMV2_N_BINS}.")

        if weights is not None:
            vit = load_backbone(weights, in_chans=in_chans)
            self.backbone_name = vit.meta.name
        else:
            vit = build_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
            self.backbone_name = backbone
        dim, n_blocks = int(vit.embed_dim), int(vit.n_blocks)
        if layers is None:
            layers = even_layers(n_blocks) if head != "linear" else [n_blocks - 1]
            if head == "chmv2" and n_blocks == 24:
                layers = list(CHMV2_LAYERS)
        k = 1 if output == "regression" else n_bins
        if head == "chmv2":
            head_module: nn.Module = chmv2_head(embed_dim=dim)
        elif head == "dpt":
            if len(layers) != 4 and dpt_post_process_channels is None:
                raise ValueError(f"HeightTask: the default DPT reads 4 layers, got layers={layers}; set dpt_post_process_channels.")
            head_module = DPTHead(
                embed_dim=dim, out_channels=k, channels=dpt_channels,
                post_process_channels=dpt_post_process_channels or (128, 256, 512, 1024),
                n_hidden_channels=dpt_hidden_channels, readout=readout,
                reassemble_factors=_dpt_factors(len(dpt_post_process_channels or layers)),
            )  # fmt: skip
        else:
            head_module = LinearHead(in_channels=[dim] * len(layers), out_channels=k, use_cls_token=use_cls_token)
        if head_weights is not None:
            load_head_weights(head_module, head_weights)
        to_metres = LogitsToHeight(
            n_bins=k, min_height=min_height, max_height=max_height, strategy=bin_strategy, norm=bin_norm
        )
        self.model = DenseModel(
            backbone=vit, head=head_module, layers=list(layers), freeze_backbone=freeze_backbone, lora=lora,
            output=to_metres,
        )
        if loss == "sig":
            self.loss_fn: nn.Module = SigLoss(lam=sig_lambda)
        elif loss == "l1":
            self.loss_fn = MaskedL1Loss()
        else:
            self.loss_fn = MaskedHuberLoss(delta=huber_delta)
        self.val_metrics = HeightMetrics()
        backbone_meta = getattr(vit, "meta", None)
        #: bands, normalisation and GSD of the training data; from the datamodule in ``setup`` (else the weights')
        self.data_meta: dict[str, Any] = {
            "bands": getattr(backbone_meta, "bands", None),
            "normalization": getattr(backbone_meta, "normalization", None),
            "gsd": getattr(backbone_meta, "gsd", None),
        }
        self._val_store: dict[str, list] = {}

    # ------------------------------------------------------------------ model

    def forward(self, image: Tensor) -> Tensor:
        """Normalised imagery ``[B, C, H, W]`` -> heights in metres ``[B, 1, H, W]``."""
        return self.model(image)

    def backbone_meta(self) -> BackboneMeta:
        """Architecture and data metadata stored in every checkpoint (``"dinov3_eo"`` entry)."""
        vit = self.model.backbone
        return BackboneMeta(
            name=self.backbone_name, in_chans=int(vit.in_chans), patch_size=int(vit.patch_size),
            embed_dim=int(vit.embed_dim), bands=self.data_meta.get("bands"),
            normalization=self.data_meta.get("normalization"), gsd=self.data_meta.get("gsd"),
        )  # fmt: skip

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        normalization = getattr(datamodule, "normalization", None)
        expected = self.data_meta.get("normalization")
        if normalization is not None and expected is not None and normalization.to_dict() != expected:
            # a mismatch is legitimate (e.g. new sensor) but is the most common silent failure, so say it
            log.warning(
                "HeightTask: the data are normalised with %r but the backbone weights expect %r.",
                normalization.name, expected.get("name"),
            )
        self.data_meta = {
            "bands": getattr(datamodule, "band_names", None) or self.data_meta.get("bands"),
            "normalization": normalization.to_dict() if normalization is not None else expected,
            "gsd": getattr(datamodule, "training_gsd", getattr(datamodule, "gsd", None)) or self.data_meta.get("gsd"),
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dinov3_eo"] = self.backbone_meta().to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("dinov3_eo") or {}
        self.data_meta = {k: stored.get(k) for k in ("bands", "normalization", "gsd")}

    def _augment(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """The same random flip/rotation of every tensor's last two dims (one per batch, seeded by the step)."""
        if not self.hparams.augment:
            return tensors
        return random_dihedral(*tensors, seed=self.hparams.augment_seed, step=self.global_step)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, target, valid = self._augment(batch["image"], batch["target"], batch["valid"])
        pred = self(image)  # [B, 1, H, W]
        loss = self.loss_fn(pred, target, valid)
        self.log_after_backward({"train/loss": loss}, batch_size=image.shape[0])  # no sync: step_logging
        return loss

    def on_validation_epoch_start(self) -> None:
        from dinov3_eo.tasks.height_intervals import ResidualHistogram

        self.val_metrics.reset()
        self._val_store = {"pred": [], "target": [], "tiles_pred": [], "tiles_target": []}
        self._val_errors = ResidualHistogram()  # every scored pixel's error, for <split>_intervals.json

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score_batch(batch, batch_idx, "val")

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score_batch(batch, batch_idx, "test")

    def _score_batch(self, batch: dict[str, Any], batch_idx: int, split: str) -> None:
        """Adds a validation or test batch to the epoch's metrics and plots, and logs its loss."""
        image, target, valid = batch["image"], batch["target"], batch["valid"]
        pred = self(image)
        self.log(f"{split}/loss", self.loss_fn(pred, target, valid), batch_size=image.shape[0], sync_dist=True)
        self.val_metrics.update(pred, target, valid)
        self._keep_validation_pairs(pred[:, 0], target, valid, batch_idx)

    def _keep_validation_pairs(self, pred: Tensor, target: Tensor, valid: Tensor, batch_idx: int) -> None:
        """Every valid pixel's error into the interval histogram; a subsample of the pairs and the first tiles for
        the scatter plot and error map."""
        p = pred.detach().float().cpu().numpy()
        t = torch.where(valid, target, torch.full_like(target, float("nan"))).cpu().numpy()
        self._val_errors.add(p, t)
        counted = np.isfinite(t)
        # a seeded per-batch subsample keeps the scatter plot's cost fixed whatever the validation size
        rng = np.random.default_rng([int(self.hparams.augment_seed), batch_idx])
        idx = np.flatnonzero(counted)
        take = rng.choice(idx, size=min(idx.size, _SCATTER_PIXELS // 8), replace=False) if idx.size else idx
        self._val_store["pred"].append(p.ravel()[take])
        self._val_store["target"].append(t.ravel()[take])
        for b in range(p.shape[0]):
            if len(self._val_store["tiles_pred"]) < _ERROR_MAP_TILES:
                self._val_store["tiles_pred"].append(p[b])
                self._val_store["tiles_target"].append(t[b])

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        """Logs the ``test/`` metrics and writes ``test_metrics.json``, ``test_scatter.png`` and
        ``test_error_map.png`` to the run's log folder."""
        self._log_scores("test")

    def _log_scores(self, split: str) -> None:
        state = self.val_metrics.state_tensor().to(self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(state)
            self.val_metrics.load_state_tensor(state)
            counts = torch.from_numpy(self._val_errors.counts).to(self.device)
            dist.all_reduce(counts)
            self._val_errors.counts = counts.cpu().numpy()
        metrics = self.val_metrics.compute()
        for key, value in flat_metrics(metrics, prefix=f"{split}/").items():
            self.log(key, value if math.isfinite(value) else float("nan"), prog_bar=key in (f"{split}/mae", f"{split}/rmse"))
        if self.trainer.sanity_checking or not self.trainer.is_global_zero:
            return
        self.write_validation_report(metrics, split=split)

    def write_validation_report(self, metrics: dict[str, dict[str, float]], *, split: str = "val") -> Path | None:
        """``<split>_metrics.json``, ``<split>_scatter.png``, ``<split>_error_map.png`` and ``<split>_intervals.json``
        (90 % prediction intervals per predicted-height bin calibrated on the split's pixels:
        :mod:`~dinov3_eo.tasks.height_intervals`, for ``height predict --intervals``) in the run folder
        (overwritten); ``split`` is ``"val"`` or ``"test"``."""
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        entry: dict[str, Any] = {"epoch": int(self.current_epoch), "step": int(self.global_step), "metrics": metrics}
        if split == "test":
            ckpt = getattr(self.trainer, "ckpt_path", None)
            entry = {"checkpoint": None if ckpt is None else str(ckpt), **entry}
        _write_json(folder / f"{split}_metrics.json", entry)
        errors = getattr(self, "_val_errors", None)
        if errors is not None and errors.counts.sum():
            try:  # 90 % intervals per predicted-height bin from this split's pixels: 'height predict --intervals'
                intervals = errors.intervals(0.9, source={split: f"epoch {self.current_epoch}, step {self.global_step}"})
            except ValueError as e:  # too few pixels in every bin (a short sanity run)
                log.info("HeightTask: no %s intervals written: %s", split, e)
            else:
                intervals.save(folder / f"{split}_intervals.json", overwrite=True)
        store = self._val_store
        what = "validation" if split == "val" else "test"
        if store.get("pred"):
            scatter_plot(folder / f"{split}_scatter.png", np.concatenate(store["pred"]), np.concatenate(store["target"]),
                         title=f"{what}, epoch {self.current_epoch}")  # fmt: skip
        if store.get("tiles_pred"):
            error_map(folder / f"{split}_error_map.png", np.stack(store["tiles_pred"]), np.stack(store["tiles_target"]),
                      titles=[f"tile {i}" for i in range(len(store["tiles_pred"]))])  # fmt: skip
        return folder

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.model.parameter_groups(lr=hp.lr, backbone_lr_scale=hp.backbone_lr_scale,
                                             lora_lr_scale=hp.get("lora_lr_scale", 1.0))
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warmup = int(hp.warmup_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _dpt_factors(n: int) -> tuple[float, ...]:
    """Reassemble factors for ``n`` DPT inputs: the official ``(4, 2, 1, 0.5)`` for four, else x4 ... down."""
    if n == 4:
        return (4, 2, 1, 0.5)
    return tuple(2.0 ** (2 - i) for i in range(n))


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, allow_nan=True))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Loading: our checkpoints and the released CHMv2 head
# ----------------------------------------------------------------------------------------------------------------


def load_height_model(path: str | os.PathLike[str]) -> DenseModel:
    """A trained :class:`HeightTask` checkpoint (``.ckpt``) as an eval-mode :class:`DenseModel` giving metres.

    The returned model has a ``meta`` attribute (:class:`~dinov3_eo.models.hub.BackboneMeta`) with the bands,
    normalisation and GSD of the training data. Nothing but the checkpoint is read: a backbone that was loaded
    from a weights file is rebuilt from the architecture of the stored weights.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a HeightTask checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_height_model: no checkpoint at {str(path)!r}.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise ValueError(f"load_height_model: {str(path)!r} is not a Lightning checkpoint of a HeightTask.")
    accepted = set(inspect.signature(HeightTask.__init__).parameters) - {"self"}
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted}
    state = checkpoint["state_dict"]
    if not any(k.startswith("model.head.") for k in state):
        raise ValueError(f"load_height_model: {str(path)!r} holds no 'model.head.*' weights; is it a HeightTask checkpoint?")
    if hparams.get("weights"):
        prefix = "model.backbone."
        name, overrides = infer_architecture({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        hparams.update(backbone=name, backbone_kwargs=overrides, weights=None)
    hparams["head_weights"] = None
    task = HeightTask(**hparams)
    task.load_state_dict(state, strict=True)
    model = task.model.eval()
    model.meta = BackboneMeta.from_dict(checkpoint.get("dinov3_eo") or task.backbone_meta().to_dict())
    return model


def load_chmv2_head(path: str | os.PathLike[str]) -> DPTHead:
    """The released CHMv2 DPT head (``dinov3_vitl16_chmv2_dpt_head-*.pth``, 68 keys), loaded strictly.

    The width is read from the checkpoint (1024 for the SAT-493M ViT-L release).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the keys or shapes are not the CHMv2 layout.
    """
    state = read_head_state(path)  # read once: the width comes from the weights, then they load strictly
    key = "reassemble_blocks.projects.0.conv.weight"
    if key not in state:
        raise ValueError(f"load_chmv2_head: {str(path)!r} is not a CHMv2 DPT head (no {key!r}).")
    head = chmv2_head(embed_dim=int(state[key].shape[1]))
    return load_head_state(head, state, source=str(path))


def build_chmv2(
    backbone: str | os.PathLike[str] | nn.Module,
    head: str | os.PathLike[str] | DPTHead,
    *,
    pad_multiple: int | None = None,
) -> DenseModel:
    """Meta's CHMv2 canopy-height model from its two released parts: ``[B, 3, H, W] -> metres [B, 1, H, W]``.

    Args:
        backbone: SAT-493M ViT-L weights (path, any layout ``load_backbone`` reads) or a built backbone.
        head: the CHMv2 head checkpoint (path) or a head from :func:`load_chmv2_head`.
        pad_multiple: centre padding multiple (default 32 keeps the output exactly on the input grid; 16 is
            the official notebook's padding).

    The model reads blocks ``[5, 11, 17, 23]`` with the final norm and the class token, and its ``meta``
    carries the ``chmv2`` normalisation (mean 0.420, 0.411, 0.296 on [0, 1] RGB) that inference must apply.

    Raises:
        ValueError: the backbone's width differs from the head's, or it has fewer than 24 blocks.
    """
    vit = load_backbone(backbone) if isinstance(backbone, (str, os.PathLike)) else backbone
    dpt = load_chmv2_head(head) if isinstance(head, (str, os.PathLike)) else head
    if int(vit.embed_dim) != dpt.embed_dim:
        raise ValueError(f"build_chmv2: the backbone is {vit.embed_dim} wide but the head expects {dpt.embed_dim}.")
    if int(vit.n_blocks) <= max(CHMV2_LAYERS):
        raise ValueError(f"build_chmv2: CHMv2 reads blocks {list(CHMV2_LAYERS)}; the backbone has {vit.n_blocks}.")
    if int(vit.embed_dim) != 1024 or int(vit.n_blocks) != 24:
        log.warning("build_chmv2: the released head was trained on the SAT-493M ViT-L; this backbone is not one.")
    model = DenseModel(backbone=vit, head=dpt, layers=list(CHMV2_LAYERS), output=chmv2_height(), pad_multiple=pad_multiple)
    model.meta = BackboneMeta(
        name=getattr(getattr(vit, "meta", None), "name", getattr(vit, "name", "vitl16")),
        in_chans=int(vit.in_chans), patch_size=int(vit.patch_size), embed_dim=int(vit.embed_dim),
        bands=["red", "green", "blue"], normalization=Normalization.preset("chmv2").to_dict(), gsd=None,
    )  # fmt: skip
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Prediction and evaluation on rasters
# ----------------------------------------------------------------------------------------------------------------


def predict_height(
    model: DenseModel,
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    normalization: Normalization | dict[str, Any] | None = None,
    quicklook: str | os.PathLike[str] | None = None,
    window: int = 512,
    overlap: float | int = 0.25,
    batch_size: int = 4,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    device: str | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    gsd: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    require_georeference: bool = True,
) -> Path:
    """Write a float32 canopy-height COG in metres for the GeoTIFF ``src`` (same CRS, transform and size).
    ``require_georeference=False`` takes an image chip without one (JPEG, PNG, TIFF): its heights are then a TIFF on
    the chip's pixel grid, without georeference either.

    Args:
        model: a height model (``[B, C, h, w] -> [B, 1, h, w]`` metres), e.g. from :func:`load_height_model`.
        normalization: input normalisation; default: the model's ``meta.normalization`` (raises when neither).
        quicklook: also write a PNG quick-look with a colour bar here.
        window, overlap, batch_size, bands, nodata, device, amp, tta: see
            :func:`~dinov3_eo.inference.predict.predict_raster` (``tta`` averages the metres of the flipped and
            turned views).
        gsd: resample the input on the fly (average, nodata-aware, same CRS) to this pixel size before the model,
            e.g. the model's training GSD; the output is then on that grid. ``None`` keeps the input grid (a
            warning is logged when it differs from the model's training GSD by more than 25 %).

    Raises:
        ValueError: no normalisation is known for the model; an input without a georeference (unless
            ``require_georeference`` is false), or ``gsd`` for one.
        FileExistsError: an output exists and ``overwrite`` is false.
    """
    from dinov3_eo.data.raster import is_georeferenced, open_quietly
    from dinov3_eo.inference.writers import check_overwrite

    meta = getattr(model, "meta", None)
    if normalization is None:
        normalization = getattr(meta, "normalization", None)
    if normalization is None:
        raise ValueError("predict_height: the model carries no input normalisation; pass normalization= explicitly.")
    check_overwrite(dst, overwrite, inputs=[src])  # (a warped view would hide which file it reads)
    if quicklook is not None:
        check_overwrite(quicklook, overwrite, inputs=[src])  # fail before the (long) prediction, not after
    with open_quietly(src) as dataset:
        if not is_georeferenced(dataset):
            if require_georeference:
                raise ValueError(f"{dataset.name} is not georeferenced (no CRS or no geotransform), so its heights could "
                                 "not be placed on a map: for image chips pass --chips (require_georeference=False: "
                                 "heights on the chip's pixel grid), else georeference it first (gdal_edit.py -a_srs "
                                 "... -a_ullr ...).")  # fmt: skip
            if gsd is not None:
                raise ValueError(f"{dataset.name} has no georeference, so it has no pixel size to resample from; "
                                 "leave out --gsd for image chips.")  # fmt: skip
        native = abs(float(dataset.transform.a))  # CRS units: what gsd= resamples in
        trained = getattr(meta, "gsd", None)
        metres = pixel_size_off_scale(dataset, trained) if gsd is None else None
        if metres:
            log.warning(
                "predict_height: %s has %.3g m pixels but the model was trained at %.3g m; resample with gsd=%.3g "
                "(--gsd model on the command line).", src, metres, trained, trained,
            )
        if gsd is None or math.isclose(gsd, native, rel_tol=1e-6):  # (a chip without georeference always: no gsd)
            return _predict_on(model, dataset, dst, normalization=normalization, quicklook=quicklook,
                               title=Path(src).name, window=window, overlap=overlap, batch_size=batch_size, bands=bands, nodata=nodata,
                               device=device, amp=amp, tta=tta, overwrite=overwrite, progress=progress,
                               require_georeference=require_georeference)  # fmt: skip
        from rasterio.vrt import WarpedVRT

        scale = gsd / native
        width, height = max(1, round(dataset.width / scale)), max(1, round(dataset.height / scale))
        transform = dataset.transform @ rasterio.Affine.scale(dataset.width / width, dataset.height / height)
        src_nodata = nodata if nodata is not None else dataset.nodata
        with WarpedVRT(
            dataset, crs=dataset.crs, transform=transform, width=width, height=height,
            resampling=rasterio.enums.Resampling.average, src_nodata=src_nodata, nodata=src_nodata,
        ) as vrt:  # fmt: skip
            return _predict_on(model, vrt, dst, normalization=normalization, quicklook=quicklook,
                               title=Path(src).name, window=window, overlap=overlap, batch_size=batch_size, bands=bands, nodata=nodata,
                               device=device, amp=amp, tta=tta, overwrite=overwrite, progress=progress)  # fmt: skip


def _predict_on(
    model: DenseModel,
    dataset: Any,
    dst: str | os.PathLike[str],
    *,
    normalization: Normalization | dict[str, Any],
    quicklook: str | os.PathLike[str] | None,
    title: str,
    **kw: Any,
) -> Path:
    """:func:`predict_raster` in regression mode on an open dataset (file or warped view), then the quick-look."""
    from dinov3_eo.inference.predict import predict_raster

    summary = predict_raster(
        model, dataset, dst, out_channels=1,
        normalization=normalization, output="regression", activation="none", class_names=["canopy height (m)"],
        multiple=int(model.patch_size), tags={"units": "metre", "quantity": "canopy height"}, **kw,
    )  # fmt: skip
    if quicklook is not None:
        height_quicklook(quicklook, dst, title=title, overwrite=kw["overwrite"])
    return summary.outputs[0]


def evaluate_height_raster(
    pred: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    reference: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    resampling: str = "average",
    reference_nodata: float | None = None,
    overwrite: bool = False,
    block: int = 1024,
    picture_size: int = 1024,
    max_points: int = 50_000,
    seed: int = 0,
    on_pairs: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of predicted heights against a reference CHM, on the *reference* grid, block by block.

    The reference may be one CHM or many tiles (files, folders, globs: LiDAR CHMs ship as 1 km tiles), each read in
    ``block``-px blocks, and the prediction (one raster or several, read as one mosaic) is resampled onto each block's
    grid (``average`` by default: a finer prediction is aggregated into each reference cell, nodata-aware), so
    memory holds one block whatever the rasters' size. Tiles that overlap (LiDAR tiles with buffers) count each
    ground cell once: a reference pixel whose centre an earlier tile (in path order, any CRS) covers is left to that
    tile, and ``metrics.json`` says how many were (``reference_overlap_pixels``). With ``out_dir``, ``metrics.json``,
    ``scatter.png`` (a uniform sample of ``max_points``
    pairs over all blocks) and ``error_map.png`` (each reference tile, up to 8, at most ``picture_size`` px a side)
    are written there; existing ones only with ``overwrite`` (checked before any work). ``on_pairs(predicted,
    reference)`` is handed every block's two height arrays too (NaN = nodata), e.g. a
    :class:`~dinov3_eo.tasks.height_intervals.ResidualHistogram`'s ``add``.

    Raises:
        FileExistsError: a report file exists in ``out_dir`` and ``overwrite`` is false.
        FileNotFoundError: a source matches no raster. ValueError: a reference tile without a georeference (named).
    """
    from dinov3_eo.data.raster import GDAL_CACHE_MB
    from dinov3_eo.data.index import expand_sources
    from dinov3_eo.data.labels import RasterMosaic
    from dinov3_eo.inference.writers import check_overwrite, picture_grid
    from dinov3_eo.tasks.height_data import HeightLabels

    references = expand_sources(reference)
    if out_dir is not None and Path(out_dir).is_dir():  # (a folder still to be made holds no report)
        for name in ("metrics.json", "scatter.png", "error_map.png"):
            check_overwrite(Path(out_dir) / name, overwrite, inputs=[*expand_sources(pred), *references])
    for path in references:  # every tile placed before any work
        with rasterio.open(path) as ref:
            require_georeferenced(ref)
    placed = RasterMosaic(references, what="reference CHM")  # the tiles' footprints, in the order of references
    predicted = HeightLabels(paths=pred, resampling=resampling, clip_negative=False)
    metrics = HeightMetrics()
    sample = _PairSample(max_points, seed)
    panels, titles = [], []
    overlap_pixels = 0
    # every reference block is read once: GDAL's default block cache (5 % of RAM) would only fill with blocks never
    # reused
    for k, path in enumerate(references):
        with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), rasterio.open(path) as ref:
            nodata = ref.nodata if reference_nodata is None else reference_nodata
            for row in range(0, ref.height, block):
                for col in range(0, ref.width, block):
                    window = Window(col, row, min(block, ref.width - col), min(block, ref.height - row))
                    target = _heights(ref.read(1, window=window), nodata)
                    grid = {"crs": ref.crs, "transform": ref.window_transform(window), "shape": target.shape}
                    for earlier in (i for i in placed.overlapping(**grid) if i < k):
                        covered = placed.files[earlier].centres_inside(**grid)
                        overlap_pixels += int(np.count_nonzero(covered & np.isfinite(target)))
                        target[covered] = np.nan
                    heights = predicted.read(**grid)
                    metrics.update(heights, target)
                    sample.add(heights, target)
                    if on_pairs is not None:
                        on_pairs(heights, target)
            if out_dir is not None and len(panels) < 8:
                shape, transform = picture_grid(ref, picture_size)
                target = _heights(ref.read(1, out_shape=shape, resampling=Resampling.nearest), nodata)
                panels.append((predicted.read(crs=ref.crs, transform=transform, shape=shape), target))
                titles.append(Path(path).name)
    predicted.close()
    result = metrics.compute()
    if overlap_pixels:
        log.info("%d reference pixels lie under an earlier reference tile and were counted with that tile only.",
                 overlap_pixels)
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        names = [f.path for f in predicted.files]
        _write_json(folder / "metrics.json", {"prediction": names[0] if len(names) == 1 else names,
                                              "reference": str(references[0]) if len(references) == 1 else references,
                                              "reference_overlap_pixels": overlap_pixels,
                                              "metrics": result})  # fmt: skip
        _report_pictures(folder, sample, panels, titles, scatter_title=Path(names[0]).name)
    return result


def _report_pictures(folder: Path, sample: _PairSample, panels: Sequence[tuple[np.ndarray, np.ndarray]],
                     titles: Sequence[str], *, scatter_title: str) -> None:  # fmt: skip
    """``scatter.png`` of the sampled (predicted, reference) pairs and ``error_map.png`` of the ``panels``
    (predicted, reference) rasters in ``folder``; panels of other sizes share one figure, padded with nodata."""
    sampled_pred, sampled_target = sample.pairs()
    scatter_plot(folder / "scatter.png", sampled_pred, sampled_target, title=scatter_title)
    height, width = max(p.shape[0] for p, _ in panels), max(p.shape[1] for p, _ in panels)
    padded = np.full((2, len(panels), height, width), np.nan, dtype=np.float32)
    for i, (p, t) in enumerate(panels):
        padded[0, i, : p.shape[0], : p.shape[1]], padded[1, i, : t.shape[0], : t.shape[1]] = p, t
    error_map(folder / "error_map.png", padded[0], padded[1], titles=titles)


def evaluate_chip_heights(
    pred: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    reference: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    name_suffixes: Sequence[str] = (),
    reference_nodata: float | None = None,
    reference_scale: float = 1.0,
    overwrite: bool = False,
    picture_size: int = 1024,
    max_points: int = 50_000,
    seed: int = 0,
    on_pairs: Callable[[np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Metrics of chips' predicted heights (``height predict --chips``' TIFFs) against their CHM chips, each
    prediction with the CHM of its name, pixel for pixel (chips carry no georeference: sizes must agree).

    Args:
        pred: predicted height TIFFs: files, folders (their ``.tif`` files, not the PNG quick-looks) or globs.
        reference: the CHM chips (folders, globs, files), read as ``ChipHeightDataModule`` reads them
            (:func:`~dinov3_eo.tasks.height_data.read_chip_heights` with ``reference_nodata``, ``reference_scale``).
        name_suffixes: dropped from prediction and CHM stems before they are compared (``["_chm"]``).
        out_dir, overwrite, picture_size, max_points, seed, on_pairs: as :func:`evaluate_height_raster`
            (``error_map.png`` shows the first 8 chips; ``on_pairs`` gets each chip's pair).

    Returns:
        :class:`~dinov3_eo.tasks.height_metrics.HeightMetrics` results (overall and per height bin).

    Raises:
        FileNotFoundError: no prediction, or none with a CHM of its name. FileExistsError: a report file exists
        without ``overwrite``. ValueError: a prediction and its CHM differ in size, or an unreadable file (named).
    """
    from dinov3_eo.data.chips import pairs_by_name
    from dinov3_eo.data.datasets import expand_chips
    from dinov3_eo.inference.writers import check_overwrite
    from dinov3_eo.tasks.height_data import read_chip_heights

    sources = [pred] if isinstance(pred, (str, os.PathLike)) else list(pred)
    preds = [p for p in expand_chips([os.fspath(s) for s in sources]) if p.lower().endswith((".tif", ".tiff"))]
    if not preds:
        raise FileNotFoundError(f"No predicted height TIFF in {pred}.")
    if out_dir is not None and Path(out_dir).is_dir():
        for name in ("metrics.json", "scatter.png", "error_map.png"):
            check_overwrite(Path(out_dir) / name, overwrite, inputs=preds)
    pairs = pairs_by_name(preds, reference, name_suffixes, item="predicted height TIFF", partner="CHM chip",
                          hint="pairs are made by file name, less --name-suffixes (e.g. _chm).")  # fmt: skip
    metrics, sample = HeightMetrics(), _PairSample(max_points, seed)
    panels, titles = [], []
    for path, ref in pairs:
        predicted = read_chip_heights(path)
        target = read_chip_heights(ref, nodata=reference_nodata, scale=reference_scale)
        if predicted.shape != target.shape:
            raise ValueError(f"Predicted heights {path} are {predicted.shape[1]}x{predicted.shape[0]} px but the CHM chip "
                             f"{ref} is {target.shape[1]}x{target.shape[0]} px; a chip's prediction and CHM share its "
                             "pixel grid.")  # fmt: skip
        metrics.update(predicted, target)
        sample.add(predicted, target)
        if on_pairs is not None:
            on_pairs(predicted, target)
        if len(panels) < 8:
            step = max(1, -(-max(target.shape) // picture_size))  # every step-th pixel: a picture, not a count
            panels.append((predicted[::step, ::step], target[::step, ::step]))
            titles.append(Path(path).name)
    result = metrics.compute()
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(folder / "metrics.json", {"prediction": [p for p, _ in pairs], "reference": [r for _, r in pairs],
                                              "metrics": result})  # fmt: skip
        _report_pictures(folder, sample, panels, titles, scatter_title=f"{len(pairs)} chips")
    return result


def _heights(values: np.ndarray, nodata: float | None) -> np.ndarray:
    """Reference heights float32, NaN at ``nodata`` and at any non-finite value."""
    out = values.astype(np.float32)
    if nodata is not None:
        out[out == np.float32(nodata)] = np.nan
    out[~np.isfinite(out)] = np.nan
    return out


class _PairSample:
    """A uniform random sample, without replacement, of at most ``size`` (predicted, reference) pairs from pairs that
    arrive block by block: each pair draws a random key and the ``size`` smallest keys stay."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.rng = size, np.random.default_rng(seed)
        self.keys = np.empty(0)
        self.values = np.empty((0, 2), dtype=np.float32)

    def add(self, pred: np.ndarray, target: np.ndarray) -> None:
        p, t = pred.ravel(), target.ravel()
        keep = np.isfinite(p) & np.isfinite(t)
        keys = np.concatenate([self.keys, self.rng.random(int(keep.sum()))])
        values = np.concatenate([self.values, np.stack([p[keep], t[keep]], axis=1)])
        if len(keys) > self.size:
            order = np.argpartition(keys, self.size)[: self.size]
            keys, values = keys[order], values[order]
        self.keys, self.values = keys, values

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        return self.values[:, 0], self.values[:, 1]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinov3-eo height predict",
        description="Canopy height in metres for a GeoTIFF: float32 COG (input CRS/transform, NaN nodata) + PNG quick-look.",
    )
    p.add_argument("input", help="input GeoTIFF (any size; read window by window), or an image chip with --chips")
    p.add_argument("--chips", action="store_true", help="the input is an image chip, with or without a georeference "
                   "(JPEG, PNG, TIFF): heights on its pixel grid, as a TIFF without georeference + PNG")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="output COG (.tif)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="HeightTask checkpoint (.ckpt) from 'dinov3-eo height fit'")
    src.add_argument("--chmv2-head", help="released CHMv2 head (.pth); needs --backbone (SAT-493M ViT-L weights)")
    p.add_argument("--backbone", help="backbone weights for --chmv2-head")
    p.add_argument("--quicklook", help="PNG quick-look path (default: the output with .png)")
    p.add_argument("--no-quicklook", action="store_true", help="do not write the PNG quick-look")
    p.add_argument("--bands", type=int, nargs="+", help="1-based input bands (default: all)")
    p.add_argument("--nodata", type=float, help="input nodata overriding the file's")
    add_window_options(p)
    p.add_argument("--gsd", help="'model' (resample the input to the training GSD) or a pixel size in CRS units; "
                   "default: keep the input grid")
    p.add_argument("--intervals", help="prediction intervals from 'height evaluate --calibrate' (JSON): also write "
                   "OUTPUT_interval.tif (lower and upper ends in m) and OUTPUT_interval.png (their width)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _predict_main(argv: Sequence[str]) -> int:
    args = _predict_parser().parse_args(list(argv))
    if args.chmv2_head is not None:
        if args.backbone is None:
            raise SystemExit("dinov3-eo height predict: --chmv2-head needs --backbone (the SAT-493M ViT-L weights).")
        model = build_chmv2(args.backbone, args.chmv2_head)
    else:
        model = load_height_model(args.model)
    settings = window_settings(args)
    model.to(settings["device"])
    gsd = None
    if args.gsd == "model":
        gsd = getattr(model.meta, "gsd", None)
        if gsd is None:
            raise SystemExit("dinov3-eo height predict: --gsd model, but the model does not record a training GSD.")
    elif args.gsd is not None:
        gsd = float(args.gsd)
    quicklook = None if args.no_quicklook else (args.quicklook or str(Path(args.output).with_suffix(".png")))
    intervals = ends = ends_picture = None
    if args.intervals is not None:
        from dinov3_eo.inference.writers import check_overwrite
        from dinov3_eo.tasks.height_intervals import HeightIntervals

        intervals = HeightIntervals.load(args.intervals)
        output = Path(args.output)
        ends = output.with_name(f"{output.stem}_interval.tif")
        ends_picture = None if args.no_quicklook else ends.with_suffix(".png")
        for path in (ends, ends_picture):  # before the (long) prediction, not after
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=[args.input])
    out = predict_height(
        model, args.input, args.output, quicklook=quicklook, bands=args.bands, nodata=args.nodata, gsd=gsd, **settings,
        overwrite=args.overwrite, progress=not args.quiet, require_georeference=not args.chips,
    )  # fmt: skip
    print(f"wrote {out}" + (f" and {quicklook}" if quicklook else ""))
    if intervals is not None:
        from dinov3_eo.tasks.height_intervals import write_height_intervals

        write_height_intervals(out, intervals, ends, quicklook=ends_picture, overwrite=args.overwrite)
        print(f"wrote {ends}" + (f" and {ends_picture}" if ends_picture else "") + f": {100 * intervals.coverage:.0f} % "
              f"intervals, ± {min(intervals.half_widths):.2f} to {max(intervals.half_widths):.2f} m by predicted height")  # fmt: skip
    return 0


def _evaluate_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dinov3-eo height evaluate",
        description="MAE, RMSE, R² and bias (overall and per height bin) of a height raster against a reference CHM.",
    )
    p.add_argument("prediction", help="predicted height GeoTIFF (metres); with --chips, the chips' predicted TIFFs "
                   "(a folder or quoted glob)")  # fmt: skip
    p.add_argument("reference", nargs="+",
                   help="reference CHM GeoTIFF (metres), any CRS/resolution, or its tiles (files, folders, quoted "
                   "globs), read block by block; with --chips, the CHM chips")  # fmt: skip
    p.add_argument("--out-dir", help="write metrics.json, scatter.png and error_map.png here")
    p.add_argument("--resampling", default="average", choices=["average", "bilinear", "nearest"])
    p.add_argument("--reference-nodata", type=float, help="nodata of the reference overriding the file's")
    p.add_argument("--chips", action="store_true", help="predictions of image chips (height predict --chips) against "
                   "CHM chips of their names, pixel for pixel, without georeference")  # fmt: skip
    p.add_argument("--name-suffixes", nargs="+", default=[], help="with --chips, suffixes dropped from prediction and "
                   "CHM names before they are compared (e.g. _chm)")  # fmt: skip
    p.add_argument("--reference-scale", type=float, default=1.0, help="with --chips, multiplies the CHM chips' values "
                   "into metres (0.1 for decimetres)")  # fmt: skip
    p.add_argument("--attribute", help="footprints (a vector file or CSV of points, e.g. GEDI shots, as the reference): "
                   "their height column (GEDI: rh98; default: the only numeric one)")  # fmt: skip
    p.add_argument("--footprint-m", type=float, default=None, help="footprints: each point covers this diameter "
                   "(GEDI: 25) and the map's pixels under it are summarised by --footprint-statistic (default: the "
                   "pixel under the point)")  # fmt: skip
    p.add_argument("--footprint-statistic", choices=("mean", "max"), default="mean", help="footprints: mean "
                   "(default) or max of the map under each (max for a CHM-trained map against GEDI rh98)")  # fmt: skip
    p.add_argument("--calibrate", metavar="INTERVALS.json", help="also calibrate split-conformal prediction "
                   "intervals per predicted-height bin from these pairs (held-out plots the model did not train on) and "
                   "write them here, for 'height predict --intervals'")  # fmt: skip
    p.add_argument("--coverage", type=float, default=0.9, help="with --calibrate, the share of pixels the intervals "
                   "hold (default 0.9)")  # fmt: skip
    p.add_argument("--intervals", metavar="INTERVALS.json", help="also measure how often these intervals hold the "
                   "reference, per predicted-height bin (with --out-dir: interval_coverage.json)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier evaluation")
    args = p.parse_args(list(argv))
    from dinov3_eo.inference.writers import atomic_output, check_overwrite
    from dinov3_eo.tasks.height_footprints import evaluate_height_footprints, is_vector_heights
    from dinov3_eo.tasks.height_intervals import HeightIntervals, IntervalCoverage, ResidualHistogram, interval_table
    from dinov3_eo.tasks.height_metrics import metrics_table

    if len(args.reference) == 1 and not args.chips and is_vector_heights(args.reference[0]):
        if args.calibrate or args.intervals:
            raise ValueError("Intervals are calibrated and measured on a reference CHM's pixels; footprints are "
                             "scored without them.")  # fmt: skip
        result, frame = evaluate_height_footprints(
            args.prediction, args.reference[0], attribute=args.attribute, footprint_m=args.footprint_m,
            statistic=args.footprint_statistic, out_dir=args.out_dir, overwrite=args.overwrite)  # fmt: skip
        print(f"{len(frame)} footprints on {Path(args.prediction).name}:")
        print(metrics_table({Path(args.prediction).name: result}))
        return 0
    if args.attribute or args.footprint_m:
        raise ValueError("--attribute and --footprint-m are for footprints (points or polygons, e.g. GEDI shots, as "
                         f"the reference); {args.reference[0]} is a CHM raster.")  # fmt: skip

    if args.calibrate is not None:
        if not 0.0 < args.coverage < 1.0:
            raise ValueError(f"--coverage is the share of pixels the intervals should hold, between 0 and 1; got "
                             f"{args.coverage}.")  # fmt: skip
        check_overwrite(args.calibrate, args.overwrite, inputs=[args.prediction, *args.reference])
    scorer = IntervalCoverage(HeightIntervals.load(args.intervals)) if args.intervals is not None else None
    coverage_report = Path(args.out_dir) / "interval_coverage.json" if scorer is not None and args.out_dir else None
    if coverage_report is not None and coverage_report.parent.is_dir():  # (a folder still to be made holds none)
        check_overwrite(coverage_report, args.overwrite)
    errors = ResidualHistogram() if args.calibrate is not None else None
    hooks = [hook.add for hook in (errors, scorer) if hook is not None]

    def on_pairs(predicted: np.ndarray, reference: np.ndarray) -> None:
        for hook in hooks:
            hook(predicted, reference)

    common = dict(out_dir=args.out_dir, reference_nodata=args.reference_nodata, overwrite=args.overwrite,
                  on_pairs=on_pairs if hooks else None)  # fmt: skip
    if args.chips:
        result = evaluate_chip_heights(args.prediction, args.reference, name_suffixes=args.name_suffixes,
                                       reference_scale=args.reference_scale, **common)  # fmt: skip
    else:
        result = evaluate_height_raster(args.prediction, args.reference[0] if len(args.reference) == 1 else args.reference,
                                        resampling=args.resampling, **common)  # fmt: skip
    print(metrics_table({Path(args.prediction).name: result}))
    if scorer is not None:
        measured = scorer.result()
        print(interval_table(scorer.intervals, measured))
        if coverage_report is not None:
            with atomic_output(coverage_report, overwrite=args.overwrite) as tmp:
                tmp.write_text(json.dumps({"intervals": args.intervals, **measured}, indent=1))
            print(coverage_report)
    if errors is not None:
        calibrated = errors.intervals(args.coverage, source={"prediction": args.prediction, "reference": args.reference})
        calibrated.save(args.calibrate, overwrite=args.overwrite)
        print(interval_table(calibrated))
        print(args.calibrate)
    return 0


def _fit_main(argv: Sequence[str]) -> int:
    """``height fit|validate|test`` through LightningCLI: GeoTIFFs and CHM rasters (``HeightDataModule``) or, with
    ``data.class_path: ChipHeightDataModule``, image chips and CHM chips without a georeference."""
    import lightning.pytorch as pl

    # imported so that a config may name the data modules by class name alone
    from dinov3_eo.tasks.height_data import ChipHeightDataModule, HeightDataModule  # noqa: F401

    return run_lightning_cli(HeightTask, pl.LightningDataModule, argv, "dinov3-eo height", subclass_mode_data=True,
                             default_data_class="dinov3_eo.tasks.height_data.HeightDataModule")  # fmt: skip


def main(argv: Sequence[str]) -> int:
    """``dinov3-eo height fit|validate|test --config X.yaml``, ``height predict IN.tif ...``, ``height evaluate PRED REF``,
    ``height change BEFORE AFTER -o dh.tif``, ``height calibrate MAP REFERENCE -o MAP_calibrated.tif``,
    ``height trees CHM.tif -o trees.gpkg``."""
    argv = list(argv)
    if argv and argv[0] == "predict":
        return _predict_main(argv[1:])
    if argv and argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    if argv and argv[0] == "change":
        from dinov3_eo.tasks.height_change import change_main

        return change_main(argv[1:])
    if argv and argv[0] == "trees":
        from dinov3_eo.tasks.tree_maps import trees_main

        return trees_main(argv[1:])
    if argv and argv[0] == "calibrate":
        from dinov3_eo.tasks.height_calibration import calibrate_main

        return calibrate_main(argv[1:])
    return _fit_main(argv)
