"""The DINOv3 training stages as one Lightning module: pretraining, Gram anchoring, high-resolution adaptation.

One step (``training_step``), following the official ``SSLMetaArch`` but in a short, readable form:

1. multi-crop on the device (``ssl.crops``): 2 global + N local crops (+ the Gram teacher's view of each global crop);
2. iBOT block masks for half of the global crops (``ssl.masking``);
3. the EMA teacher (eval mode, no grad) runs **once** on the global crops: DINO head on CLS, iBOT head on the
   masked positions, Sinkhorn–Knopp centring of both;
4. the student runs on ``[global (masked), local]`` in one call; DINO loss (global pairs without the diagonal,
   global→local pairs), iBOT loss, KoLeo on each global crop's pre-head CLS, and, in the Gram stage, the Gram loss
   against a frozen Gram teacher;
5. backward, per-module gradient clipping, AdamW with layer-wise lr decay, then the EMA update.

Stages are configs of the same class (``configs/pretrain``, ``configs/gram``, ``configs/highres``); each stage
starts from the previous stage's checkpoint with ``init_from`` (weights only, fresh step counter), so no stage
re-runs the iterations of the one before — the pain point of the official configs (issues #102, #293).

Schedules, optimiser groups, clipping, the non-finite-loss guard and exact resumption live in
:class:`~dinov3_eo.ssl.stage.SSLStage`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from dinov3_eo.losses.dino import dino_total
from dinov3_eo.losses.gram import gram_loss, resize_patch_features
from dinov3_eo.losses.ibot import gather_masked_tokens
from dinov3_eo.losses.koleo import koleo_loss, koleo_loss_distributed
from dinov3_eo.models.heads import DINOHead, checkpoint_norm_last_layer
from dinov3_eo.models.hub import BackboneMeta, build_backbone, load_backbone, read_checkpoint
from dinov3_eo.ssl.compilation import CompileMode, check_compile_mode, check_logit_kernels
from dinov3_eo.ssl.schedules import gram_teacher_refresh_due
from dinov3_eo.ssl.stage import NonFiniteLossError, SSLStage, crop_options, ema_update_, make_views, step_seed

__all__ = ["DINOv3Pretrain", "NonFiniteLossError"]

log = logging.getLogger(__name__)


class DINOv3Pretrain(SSLStage):
    """DINOv3 self-supervised training on image tiles of any band count.

    Args (all keyword-only; they mirror the YAML ``model.init_args``):
        backbone: architecture name for :func:`build_backbone` (``vitmicro16``, ``vits16``, ``vitl16``, ...).
        in_chans: number of input bands.
        backbone_kwargs: overrides for the architecture (``drop_path_rate``, ``layerscale_init``, ...).
        init_from: weights to start from: a previous stage's Lightning checkpoint (student, teacher and heads are
            restored, step counter fresh) or any backbone source :func:`load_backbone` reads (official ``.pth``,
            timm/HF weights, our exports; heads start fresh).
        grad_checkpointing: activation checkpointing in the student's blocks (memory for compute).
        compile: ``True``: ``torch.compile`` every transformer block and head of the student, teacher and Gram
            teacher when training starts (regional compilation, as the official ``train.compile``), and the two
            losses over the iBOT logits; ``"losses"``: those two losses alone (see :mod:`dinov3_eo.ssl.compilation`).
            The first steps take longer while each input shape compiles.
        logit_kernels: ``"triton"``: the iBOT term's Sinkhorn–Knopp and cross-entropy run as fused Triton kernels
            that never write the [masked tokens, K] assignments, and the DINO terms as one of those cross-entropies
            over every crop (CUDA only, :mod:`dinov3_eo.losses.logit_kernels`); ``"torch"``: torch ops, eager or
            compiled with ``compile``; ``"auto"`` (default): triton on a CUDA device where triton imports, else torch
            (:func:`~dinov3_eo.ssl.compilation.resolve_logit_kernels`).
        dino_out_dim, dino_hidden_dim, dino_bottleneck_dim: DINO head (official 65,536 / 2048 / 256).
        ibot_out_dim, ibot_hidden_dim, ibot_bottleneck_dim: iBOT head (separate head, same defaults).
        head_nlayers: MLP layers of both heads (3).
        norm_last_layer: unit-norm prototypes in both heads (DINOv1/v2 weight norm; off as in DINOv3, on for short runs).
        global_crop_size, local_crop_size, n_local_crops: multi-crop sizes (224 / 96 / 8 officially).
        global_crops_scale, local_crops_scale: area ranges of the random-resized crops.
        horizontal_flips: random flips (also vertical flips when ``vertical_flips``: north-up is not special in
            satellite imagery).
        vertical_flips: random vertical flips.
        augmentation: further :class:`~dinov3_eo.ssl.crops.MultiCrop` options, e.g. ``{"brightness": 0.1,
            "contrast": 0.1, "grayscale_prob": 0.0}`` for weaker photometric changes where band values are
            physical (reflectance) and the spectrum is part of what the features should keep.
        mask_probability, mask_ratio_range: iBOT masking (half of global crops, ratios over (0.1, 0.5]).
        base_lr: lr before the sqrt batch-size scaling (``lr = base·4·sqrt(global_batch/1024)`` when
            ``scale_lr_with_batch``), else the peak lr itself.
        min_lr, lr_warmup_steps, lr_schedule: ``cosine`` (v1: warm-up then cosine to ``min_lr``) or ``constant``
            (7B: warm-up then constant) or ``ramp`` (high-res: cosine ramp 0 → lr over ``lr_warmup_steps``).
        weight_decay, weight_decay_end: cosine weight-decay schedule (0.04 → 0.4 v1; equal for constant).
        adamw_betas: AdamW betas ((0.9, 0.999); 7B (0.9, 0.99)).
        layerwise_decay, patch_embed_lr_mult: per-layer lr multipliers (0.9 / 0.2).
        clip_grad: per-module gradient-norm clip (backbone, dino_head, ibot_head separately; 3.0).
        freeze_last_layer_steps: prototype layers frozen (lr 0) for this many steps.
        momentum_teacher, final_momentum_teacher: EMA momentum cosine schedule (0.992 → 1.0).
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup_steps: teacher temperature warm-up 0.04 → 0.07.
        student_temp: 0.1.
        dino_loss_weight, ibot_loss_weight, koleo_loss_weight: loss weights (1, 1, 0.1).
        local_loss_weight: extra weight of the global→local DINO term (Gram stage 1 → 0.5; high-res 0.5).
        local_loss_weight_start: if set, the local weight moves from this value to ``local_loss_weight`` with a cosine
            over ``gram_weight_warmup_steps`` (official reweighting in the Gram stage).
        koleo_group_size: ``None``: KoLeo within each device's batch (pretrain/Gram); an int: distributed KoLeo
            over groups of this many images across ranks (high-res stage: 16).
        gram_loss_weight: final Gram-loss weight (0 disables the Gram teacher; 2.0 Gram stage; 1.5 high-res).
        gram_weight_warmup_steps: cosine ramp 0 → ``gram_loss_weight`` over these steps (0: constant).
        gram_teacher: where the Gram teacher comes from: ``"ema"`` (snapshot of the EMA teacher when training
            starts) or a checkpoint path (ours or an official backbone).
        gram_teacher_scale: the Gram teacher sees each global crop at this × resolution (2.0 Gram; 1.5 high-res).
        gram_first_update, gram_update_every, gram_max_updates: refresh schedule: after step ``s`` (0-based) with
            ``s+1 >= first`` and ``(s+1) % every == 0`` and fewer than ``max`` refreshes so far, the Gram teacher
            is replaced by a copy of the EMA teacher.
        resolutions: high-res adaptation: list of ``[global, local, gram_teacher, probability]``; one row drawn per
            step from a generator seeded by (seed, step), so every rank picks the same.
        seed: seed of every per-step random stream.
        preview_every_n_steps: a picture of the patch features' PCA on a few training images every this many steps
            (:class:`~dinov3_eo.ssl.preview.FeaturePreview`, ``<default_root_dir>/previews/``); 0: none.
    """

    def __init__(
        self,
        *,
        backbone: str = "vitmicro16",
        in_chans: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        init_from: str | None = None,
        grad_checkpointing: bool = False,
        compile: CompileMode = False,
        logit_kernels: Literal["auto", "torch", "triton"] = "auto",
        dino_out_dim: int = 65536,
        dino_hidden_dim: int = 2048,
        dino_bottleneck_dim: int = 256,
        ibot_out_dim: int = 65536,
        ibot_hidden_dim: int = 2048,
        ibot_bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        norm_last_layer: bool = False,
        global_crop_size: int = 224,
        local_crop_size: int = 96,
        n_local_crops: int = 8,
        global_crops_scale: tuple[float, float] = (0.32, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.32),
        horizontal_flips: bool = True,
        vertical_flips: bool = True,
        augmentation: dict[str, Any] | None = None,
        mask_probability: float = 0.5,
        mask_ratio_range: tuple[float, float] = (0.1, 0.5),
        base_lr: float = 1e-3,
        scale_lr_with_batch: bool = True,
        min_lr: float = 1e-6,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "cosine",
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        clip_grad: float = 3.0,
        freeze_last_layer_steps: int = 0,
        momentum_teacher: float = 0.992,
        final_momentum_teacher: float = 1.0,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        teacher_temp_warmup_steps: int = 0,
        student_temp: float = 0.1,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        local_loss_weight: float = 1.0,
        local_loss_weight_start: float | None = None,
        koleo_group_size: int | None = None,
        gram_loss_weight: float = 0.0,
        gram_weight_warmup_steps: int = 0,
        gram_teacher: str | None = None,
        gram_teacher_scale: float = 2.0,
        gram_first_update: int | None = None,
        gram_update_every: int | None = None,
        gram_max_updates: int = 0,
        resolutions: Sequence[Sequence[float]] | None = None,
        seed: int = 0,
        preview_every_n_steps: int = 500,
    ) -> None:
        super().__init__()
        check_compile_mode(compile)
        check_logit_kernels(logit_kernels)
        self.save_hyperparameters()
        if lr_schedule not in ("cosine", "constant", "ramp"):
            raise ValueError(f"lr_schedule must be 'cosine', 'constant' or 'ramp', got {lr_schedule!r}.")
        if gram_loss_weight > 0 and gram_teacher is None:
            raise ValueError("gram_loss_weight > 0 needs gram_teacher: 'ema' or a checkpoint path.")
        if resolutions is not None:
            probs = [float(r[3]) for r in resolutions]
            if any(len(r) != 4 for r in resolutions) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6):
                raise ValueError(
                    f"resolutions must be rows [global, local, gram_teacher, probability] with probabilities summing "
                    f"to 1, got {resolutions}."
                )

        student_backbone = build_backbone(backbone, in_chans=in_chans, **(backbone_kwargs or {}))
        student_backbone.grad_checkpointing = grad_checkpointing
        dim = student_backbone.embed_dim
        self.student = nn.ModuleDict(
            {
                "backbone": student_backbone,
                "dino_head": DINOHead(
                    dim, out_dim=dino_out_dim, hidden_dim=dino_hidden_dim, bottleneck_dim=dino_bottleneck_dim,
                    nlayers=head_nlayers, norm_last_layer=norm_last_layer,
                ),
                "ibot_head": DINOHead(
                    dim, out_dim=ibot_out_dim, hidden_dim=ibot_hidden_dim, bottleneck_dim=ibot_bottleneck_dim,
                    nlayers=head_nlayers, norm_last_layer=norm_last_layer,
                ),
            }
        )
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.gram_teacher: nn.Module | None = None
        # refreshes done so far; a buffer so that it is saved and restored with the checkpoint
        self.register_buffer("gram_updates", torch.zeros((), dtype=torch.long))
        self._crop_kwargs = crop_options(
            n_local_crops=n_local_crops, global_crops_scale=global_crops_scale, local_crops_scale=local_crops_scale,
            horizontal_flips=horizontal_flips, vertical_flips=vertical_flips,
            augmentation=augmentation,
        )
        #: metadata of the data the model is trained on (bands, normalisation, gsd); filled from the datamodule
        self.data_meta: dict[str, Any] = {}
        if init_from is not None:
            self._init_from(init_from)
        if gram_loss_weight > 0 and gram_teacher not in (None, "ema"):
            self.gram_teacher = self._frozen_backbone_from(gram_teacher)
        # the teachers in eval mode from the start (train() below): Lightning (2.x) does not call train() when a fit
        # starts, and a teacher left in training mode puts RoPE rescaling and drop-path into the targets
        self.train(self.training)

    # ------------------------------------------------------------------ weights

    def _init_from(self, source: str) -> None:
        """Start from a previous stage's checkpoint (all weights) or from any backbone source (backbone only)."""
        checkpoint = read_checkpoint(source, "init_from") if str(source).endswith(".ckpt") else None
        if checkpoint is not None and "state_dict" in checkpoint:
            state = {
                k: v for k, v in checkpoint["state_dict"].items() if k.startswith(("student.", "teacher.", "gram_teacher."))
            }
            own = {k: v for k, v in state.items() if not k.startswith("gram_teacher.")}
            expected = {k: v for k, v in self.state_dict().items() if k.startswith(("student.", "teacher."))}
            missing = sorted(set(expected) - set(own))
            unexpected = sorted(set(own) - set(expected))
            wrong = [f"{k} {tuple(own[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                     if k in own and own[k].shape != v.shape]
            if missing or unexpected or wrong:
                raise KeyError(
                    f"init_from {source}: checkpoint does not match this model (missing {missing[:5]}, unexpected "
                    f"{unexpected[:5]}, shape checkpoint vs model {wrong[:5]}); set the backbone and head sizes of "
                    "the previous stage's config."
                )
            was_normed = checkpoint_norm_last_layer(checkpoint)
            if was_normed != self.hparams.norm_last_layer:
                raise ValueError(
                    f"init_from {source}: the checkpoint was trained with norm_last_layer={was_normed}, this model has "
                    f"norm_last_layer={self.hparams.norm_last_layer}; set model.norm_last_layer as the previous stage did."
                )
            self.load_state_dict(own, strict=False)
            self.data_meta = dict(checkpoint.get("dinov3_eo", {}))
            log.info("Initialised student, teacher and heads from %s (step counter starts at 0).", source)
            return
        loaded = load_backbone(source, name=self.hparams.backbone, in_chans=self.hparams.in_chans)
        for part in (self.student, self.teacher):
            part["backbone"].load_state_dict(loaded.state_dict())
        log.info("Initialised student and teacher backbones from %s (heads start fresh).", source)

    def _frozen_backbone_from(self, source: str) -> nn.Module:
        if str(source).endswith(".ckpt"):
            checkpoint = read_checkpoint(source, "gram_teacher")
            prefix = "teacher.backbone."
            state = {k[len(prefix):]: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith(prefix)}
            if not state:
                raise KeyError(f"gram_teacher {source}: no '{prefix}*' weights in this checkpoint.")
            model = copy.deepcopy(self.teacher["backbone"])
            model.load_state_dict(state)
        else:
            model = load_backbone(source, name=self.hparams.backbone, in_chans=self.hparams.in_chans)
        model.requires_grad_(False)
        return model.eval()

    def preview_backbones(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher["backbone"]}  # the EMA teacher: what `dinov3-eo export` writes

    def preview_meta(self) -> BackboneMeta:
        return self.backbone_meta()

    def backbone_meta(self) -> BackboneMeta:
        """Metadata that travels with every checkpoint and export (architecture, bands, normalisation, GSD)."""
        backbone = self.teacher["backbone"]
        return BackboneMeta(
            name=self.hparams.backbone,
            in_chans=self.hparams.in_chans,
            patch_size=backbone.patch_size,
            embed_dim=backbone.embed_dim,
            bands=self.data_meta.get("bands"),
            normalization=self.data_meta.get("normalization"),
            gsd=self.data_meta.get("gsd"),
        )

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "metadata"):
            # the data statistics travel with every checkpoint trained on them
            fresh = {k: v for k, v in datamodule.metadata().items() if v is not None}
            self.data_meta = {**self.data_meta, **fresh}

    def on_fit_start(self) -> None:
        if self.hparams.gram_loss_weight > 0 and self.gram_teacher is None:
            # "ema": the Gram teacher starts as a frozen copy of the EMA teacher
            self.gram_teacher = copy.deepcopy(self.teacher["backbone"]).requires_grad_(False).eval()
        super().on_fit_start()  # training/eval modes and compilation, after the copy above

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dinov3_eo"] = self.backbone_meta().to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.data_meta = dict(checkpoint.get("dinov3_eo", {}))
        if self.gram_teacher is None and any(k.startswith("gram_teacher.") for k in checkpoint["state_dict"]):
            self.gram_teacher = copy.deepcopy(self.teacher["backbone"]).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DINOv3Pretrain:
        super().train(mode)
        # teachers always run in eval mode: no RoPE rescale, no drop-path, no local_cls_norm
        self.teacher.eval()
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    # ------------------------------------------------------------------ schedules

    def crop_sizes(self, step: int) -> tuple[int, int, int | None]:
        """(global, local, gram-teacher) crop sizes of this step; the gram size is None without a Gram term."""
        hp = self.hparams
        if hp.resolutions is not None:
            rng = np.random.default_rng(step_seed(hp.seed, step, 3))
            probs = np.array([float(r[3]) for r in hp.resolutions])
            row = hp.resolutions[int(rng.choice(len(probs), p=probs / probs.sum()))]
            global_size, local_size, gram_size = int(row[0]), int(row[1]), int(row[2])
        else:
            global_size, local_size = hp.global_crop_size, hp.local_crop_size
            patch = self.student["backbone"].patch_size
            gram_size = int(round(global_size * hp.gram_teacher_scale / patch)) * patch
        if hp.gram_loss_weight <= 0:
            gram_size = None
        return global_size, local_size, gram_size

    # ------------------------------------------------------------------ optimisation

    def trained_parts(self) -> dict[str, nn.ModuleDict]:
        return {"": self.student}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step has already advanced; the step just taken is global_step - 1
        step = self.global_step - 1
        self._ema_update(self.schedule_values(max(step, 0))["momentum"])
        self._maybe_refresh_gram_teacher(step)

    def _ema_update(self, momentum: float) -> None:
        teacher, student = self.step_parameters(
            "ema", lambda: (list(self.teacher.parameters()), list(self.student.parameters())))
        ema_update_(teacher, student, momentum)

    @torch.no_grad()
    def _maybe_refresh_gram_teacher(self, step: int) -> None:
        hp = self.hparams
        if self.gram_teacher is None or not hp.gram_update_every or hp.gram_first_update is None:
            return
        if gram_teacher_refresh_due(
            step, first_update=hp.gram_first_update, frequency=hp.gram_update_every, max_updates=hp.gram_max_updates
        ):
            self.gram_teacher.load_state_dict(self.teacher["backbone"].state_dict())
            self.gram_updates += 1
            log.info("Gram teacher refreshed from the EMA teacher after step %d (%d/%d).", step,
                     int(self.gram_updates), hp.gram_max_updates)

    # ------------------------------------------------------------------ the step

    def compute_losses(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        """One SSL step's loss terms and the weighted ``total`` (no backward)."""
        hp = self.hparams
        sinkhorn_knopp, ibot_loss = self.logit_losses.sinkhorn_knopp, self.logit_losses.ibot_loss  # see model.compile
        values = self.schedule_values(step)
        images: Tensor = batch["image"]
        valid: Tensor | None = batch.get("valid")
        batch_size = images.shape[0]
        global_size, local_size, gram_size = self.crop_sizes(step)
        patch = self.student["backbone"].patch_size
        crops, masking = make_views(
            images, valid, seed=hp.seed, step=step, global_size=global_size, local_size=local_size, gram_size=gram_size,
            patch_size=patch, crop_kwargs=self._crop_kwargs, mask_probability=hp.mask_probability,
            mask_ratio_range=hp.mask_ratio_range,
        )
        global_crops, local_crops = crops["global_crops"], crops["local_crops"]  # [2B,C,G,G], [nL·B,C,L,L]
        n_global = global_crops.shape[0] // batch_size
        n_local = local_crops.shape[0] // batch_size
        grid = (global_size // patch, global_size // patch)
        masks = masking["masks"]  # [2B, N]
        mask_indices = masking["mask_indices"]  # [M]
        masks_weight = masking["masks_weight"]  # [M]

        # teacher: once per step, on the unmasked global crops
        with torch.no_grad():
            teacher_out = self.teacher["backbone"].forward_features(global_crops)
            teacher_cls = teacher_out["x_norm_clstoken"]  # [2B, D]
            teacher_dino = sinkhorn_knopp(self.teacher["dino_head"](teacher_cls), values["teacher_temp"])  # [2B, K]
            teacher_masked = gather_masked_tokens(teacher_out["x_norm_patchtokens"], mask_indices)  # [M, D]
            teacher_ibot = self.logit_losses.ibot_targets(  # [M, K], or kept factorised for the Triton kernels
                self.teacher["ibot_head"](teacher_masked), values["teacher_temp"])

        # student: global (masked) and local crops in one call
        inputs = [global_crops] + ([local_crops] if n_local else [])
        student_out = self.student["backbone"].forward_features(inputs, masks=[masks] + ([None] if n_local else []))
        student_global = student_out[0]
        student_cls = torch.cat([o["x_norm_clstoken"] for o in student_out])  # [(2+nL)·B, D]
        student_dino = self.student["dino_head"](student_cls)  # [(2+nL)·B, K]
        student_masked = gather_masked_tokens(student_global["x_norm_patchtokens"], mask_indices)  # [M, D]
        student_ibot = self.student["ibot_head"](student_masked)  # [M, K]

        terms = self.logit_losses.dino_losses(  # global crops vs the other teacher crop, local crops vs both
            student_dino, teacher_dino, batch_size=batch_size, student_temp=hp.student_temp
        )
        losses: dict[str, Tensor] = {"dino_global": terms.global_loss}
        if terms.local_loss is not None:
            losses["dino_local"] = terms.local_loss
        dino = dino_total(terms, loss_weight=hp.dino_loss_weight, local_loss_weight=values["local_loss_weight"])
        losses["ibot"] = ibot_loss(
            student_ibot, teacher_ibot, masks_weight, global_crops.shape[0], student_temp=hp.student_temp
        )
        # KoLeo on each global crop's pre-head (normed) CLS separately, summed over crops (official weighting)
        cls_per_crop = student_global["x_norm_clstoken"].chunk(n_global)
        if hp.koleo_group_size is None:
            losses["koleo"] = sum(koleo_loss(c) for c in cls_per_crop)
        else:
            losses["koleo"] = sum(koleo_loss_distributed(c, group_size=hp.koleo_group_size) for c in cls_per_crop)
        total = dino + hp.ibot_loss_weight * losses["ibot"] + hp.koleo_loss_weight * losses["koleo"]

        if gram_size is not None and self.gram_teacher is not None:
            with torch.no_grad():
                gram_out = self.gram_teacher.forward_features(crops["gram_crops"])["x_norm_patchtokens"]
                gram_grid = (gram_size // patch, gram_size // patch)
                if gram_grid != grid:
                    gram_out = resize_patch_features(gram_out, gram_grid, grid)  # [2B, N, D]
            losses["gram"] = gram_loss(student_global["x_norm_patchtokens"], gram_out)
            total = total + values["gram_weight"] * losses["gram"]
        losses["total"] = total
        return losses

    # ------------------------------------------------------------------ features

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tensor:
        """Normed CLS features [B, D] of the EMA teacher (what gets exported and evaluated)."""
        return self.teacher["backbone"](images)
