"""Multi-student distillation: one frozen teacher, several students of different sizes in one job.

Per step the frozen teacher runs **once** on the global crops: backbone → DINO head on CLS, iBOT head on the
patch tokens at the iBOT mask positions, Sinkhorn–Knopp centring. Those targets then serve every student in turn.
Each student has its own new DINO/iBOT heads (same prototype count as the teacher's heads), the DINO + iBOT +
KoLeo losses (no Gram term), an **unmasked** input (official: ``masks=None`` for students when distilling; the
iBOT loss is still taken at the mask positions), and its own EMA copy, which is what gets exported.

Multi-GPU: with Lightning's DDP/FSDP strategies every rank runs the teacher on its shard and all students on that
shard (pure data parallelism). The official code instead splits ranks into one sub-group per student and
all-gathers teacher outputs; that saves student memory on very large jobs but needs custom process groups. We
chose the strategy Lightning already provides; students still see the whole global batch through gradient
averaging, and the teacher still runs once per step per rank.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from dinov3_eo.losses.dino import dino_total
from dinov3_eo.losses.ibot import gather_masked_tokens
from dinov3_eo.losses.koleo import koleo_loss
from dinov3_eo.models.heads import DINOHead, checkpoint_norm_last_layer
from dinov3_eo.models.hub import BackboneMeta, build_backbone, load_backbone, read_checkpoint
from dinov3_eo.ssl.compilation import CompileMode, check_compile_mode, check_logit_kernels
from dinov3_eo.ssl.stage import SSLStage, crop_options, ema_update_, make_views

log = logging.getLogger(__name__)


def _head_from_state(state: dict[str, Tensor], prefix: str, *, norm_last_layer: bool = False) -> DINOHead:
    """A :class:`DINOHead` whose sizes are read from the weights under ``prefix`` (``dino_head.``)."""
    linear = sorted(
        (int(k[len(prefix) :].split(".")[1]), v)
        for k, v in state.items()
        if k.startswith(prefix + "mlp.") and k.endswith(".weight")
    )
    last = state.get(prefix + "last_layer.weight")
    if not linear or last is None:
        raise KeyError(f"Teacher checkpoint has no '{prefix}mlp.*' / '{prefix}last_layer.weight' weights.")
    in_dim = linear[0][1].shape[1]
    head = DINOHead(
        in_dim,
        out_dim=last.shape[0],
        hidden_dim=linear[0][1].shape[0],
        bottleneck_dim=last.shape[1],
        nlayers=len(linear),
        norm_last_layer=norm_last_layer,
    )
    head.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return head


def load_teacher_with_heads(source: str, *, name: str | None = None, in_chans: int | None = None) -> nn.ModuleDict:
    """A frozen ``ModuleDict(backbone, dino_head, ibot_head)`` from a checkpoint that holds the teacher's heads.

    Accepts this project's pretraining checkpoints (``teacher.backbone.*``, ``teacher.dino_head.*``, ...) and official
    training checkpoints (``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``).

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        KeyError: if the heads are missing (a plain backbone cannot teach the DINO/iBOT prototypes).
    """
    checkpoint = read_checkpoint(
        source, "Distillation teacher", hint="give a pretraining checkpoint with --model.teacher (e.g. "
        "runs/pretrain_tiny/checkpoints/last.ckpt after dinov3-eo pretrain fit --config configs/pretrain/tiny_cpu.yaml)",
    )
    if "state_dict" in checkpoint:
        state = {k[len("teacher.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("teacher.")}
    elif "teacher" in checkpoint:
        state = {k.removeprefix("module."): v for k, v in checkpoint["teacher"].items()}
    else:
        raise KeyError(
            f"Distillation teacher {source}: expected a training checkpoint with teacher heads "
            "('state_dict' with 'teacher.*' keys, or {'teacher': {...}}), found keys " + str(sorted(checkpoint)[:8])
        )
    # a teacher pretrained with unit-norm prototypes (this project's short-run option) must score with them
    normed = checkpoint_norm_last_layer(checkpoint)
    heads = {key: _head_from_state(state, f"{key}.", norm_last_layer=normed) for key in ("dino_head", "ibot_head")}
    backbone = load_backbone(source, name=name, in_chans=in_chans)
    teacher = nn.ModuleDict({"backbone": backbone, **heads})
    teacher.requires_grad_(False)
    return teacher.eval()


class DINOv3Distill(SSLStage):
    """Distil a frozen teacher into several students at once.

    Args (keyword-only, mirrored by ``configs/distill/*.yaml``):
        teacher: checkpoint with the teacher backbone and its DINO/iBOT heads.
        teacher_name: teacher architecture (inferred from the weights when ``None``).
        students: student architectures, e.g. ``["vits16", "vitb16"]``.
        in_chans: input bands.
        student_kwargs: architecture overrides applied to every student (``drop_path_rate``, ...).
        head_hidden_dim, head_bottleneck_dim, head_nlayers: sizes of the students' new heads; their prototype
            counts always equal the teacher heads' (required to compare assignments).
        global_crop_size, local_crop_size, n_local_crops, global_crops_scale, local_crops_scale,
        horizontal_flips, vertical_flips, augmentation, mask_probability, mask_ratio_range: views, as in pretraining.
        base_lr, scale_lr_with_batch, min_lr, lr_warmup_steps, lr_schedule, weight_decay, weight_decay_end,
        adamw_betas, layerwise_decay, patch_embed_lr_mult, clip_grad, freeze_last_layer_steps: optimisation
            (official distillation: lr ramp then constant, layer decay 0.99, clip 3.0).
        momentum_teacher, final_momentum_teacher: EMA of each student (0.994 → 1.0).
        teacher_temp, warmup_teacher_temp, teacher_temp_warmup_steps, student_temp: temperatures (0.07 constant).
        dino_loss_weight, ibot_loss_weight, koleo_loss_weight, local_loss_weight: loss weights.
        compile: ``True``: ``torch.compile`` every block and head (teacher, students, their EMAs) and the logit
            losses when training starts; ``"losses"``: the logit losses alone, as in
            :class:`~dinov3_eo.ssl.module.DINOv3Pretrain`.
        logit_kernels: ``"triton"``: the iBOT and DINO terms as fused Triton kernels (CUDA only), ``"torch"``:
            torch ops, ``"auto"`` (default): triton on a CUDA device where triton imports, as in
            :class:`~dinov3_eo.ssl.module.DINOv3Pretrain`.
        seed: seed of the per-step random streams.
        preview_every_n_steps: a picture of the patch features' PCA on a few training images every this many steps
            (:class:`~dinov3_eo.ssl.preview.FeaturePreview`, ``<default_root_dir>/previews/``); 0: none.
    """

    def __init__(
        self,
        *,
        teacher: str,
        teacher_name: str | None = None,
        students: Sequence[str] = ("vitmicro16",),
        in_chans: int = 3,
        student_kwargs: dict[str, Any] | None = None,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_nlayers: int = 3,
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
        base_lr: float = 5e-5,
        scale_lr_with_batch: bool = True,
        min_lr: float = 1e-6,
        lr_warmup_steps: int = 0,
        lr_schedule: str = "constant",
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.04,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        layerwise_decay: float = 0.99,
        patch_embed_lr_mult: float = 0.2,
        clip_grad: float = 3.0,
        freeze_last_layer_steps: int = 0,
        momentum_teacher: float = 0.994,
        final_momentum_teacher: float = 1.0,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.07,
        teacher_temp_warmup_steps: int = 0,
        student_temp: float = 0.1,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        local_loss_weight: float = 1.0,
        compile: CompileMode = False,
        logit_kernels: Literal["auto", "torch", "triton"] = "auto",
        seed: int = 0,
        preview_every_n_steps: int = 500,
    ) -> None:
        super().__init__()
        check_compile_mode(compile)
        check_logit_kernels(logit_kernels)
        self.save_hyperparameters()
        if not students:
            raise ValueError("DINOv3Distill needs at least one student architecture.")
        self.teacher = load_teacher_with_heads(teacher, name=teacher_name, in_chans=in_chans)
        dino_k = self.teacher["dino_head"].last_layer.out_features
        ibot_k = self.teacher["ibot_head"].last_layer.out_features
        self.students = nn.ModuleList()
        for arch in students:
            backbone = build_backbone(arch, in_chans=in_chans, **(student_kwargs or {}))
            dim = backbone.embed_dim
            self.students.append(
                nn.ModuleDict(
                    {
                        "backbone": backbone,
                        "dino_head": DINOHead(dim, out_dim=dino_k, hidden_dim=head_hidden_dim,
                                              bottleneck_dim=head_bottleneck_dim, nlayers=head_nlayers),
                        "ibot_head": DINOHead(dim, out_dim=ibot_k, hidden_dim=head_hidden_dim,
                                              bottleneck_dim=head_bottleneck_dim, nlayers=head_nlayers),
                    }
                )
            )
        self.students_ema = copy.deepcopy(self.students).requires_grad_(False)
        self._crop_kwargs = crop_options(
            n_local_crops=n_local_crops, global_crops_scale=global_crops_scale, local_crops_scale=local_crops_scale,
            horizontal_flips=horizontal_flips, vertical_flips=vertical_flips,
            augmentation=augmentation,
        )
        self.data_meta: dict[str, Any] = dict(getattr(self.teacher["backbone"], "meta", None).to_dict()
                                              if getattr(self.teacher["backbone"], "meta", None) else {})
        self.train(self.training)  # teacher and EMAs in eval mode from the start, as in DINOv3Pretrain

    # ------------------------------------------------------------------ Lightning plumbing

    def train(self, mode: bool = True) -> DINOv3Distill:
        super().train(mode)
        self.teacher.eval()
        self.students_ema.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        # the frozen teacher is rebuilt from its own file: keep it out of every checkpoint (as the official code)
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        return {k: v for k, v in state.items() if not k.startswith(prefix + "teacher.")}

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        own_teacher = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        return super().load_state_dict({**own_teacher, **state_dict}, strict=strict, assign=assign)

    def preview_backbones(self) -> dict[str, nn.Module]:
        students = {f"student {i} (EMA)": ema["backbone"] for i, ema in enumerate(self.students_ema)}
        return {"teacher": self.teacher["backbone"], **students}

    def preview_meta(self) -> BackboneMeta:
        return self.student_meta(0)

    def student_meta(self, index: int) -> BackboneMeta:
        backbone = self.students_ema[index]["backbone"]
        return BackboneMeta(
            name=self.hparams.students[index],
            in_chans=self.hparams.in_chans,
            patch_size=backbone.patch_size,
            embed_dim=backbone.embed_dim,
            bands=self.data_meta.get("bands"),
            normalization=self.data_meta.get("normalization"),
            gsd=self.data_meta.get("gsd"),
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["dinov3_eo_students"] = [self.student_meta(i).to_dict() for i in range(len(self.students))]

    def trained_parts(self) -> dict[str, nn.ModuleDict]:
        return {f"{i}.": student for i, student in enumerate(self.students)}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        momentum = self.schedule_values(max(self.global_step - 1, 0))["momentum"]
        ema, live = self.step_parameters(
            "ema", lambda: (list(self.students_ema.parameters()), list(self.students.parameters())))
        ema_update_(ema, live, momentum)

    # ------------------------------------------------------------------ the step

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float) -> dict[str, Any]:
        """The teacher's centred targets, computed once per step for every student.

        Returns:
            ``dino`` [2B, K_dino] and ``ibot`` [M, K_ibot] Sinkhorn–Knopp probabilities (``ibot`` kept factorised,
            a :class:`~dinov3_eo.losses.sinkhorn.SinkhornAssignments`, with ``logit_kernels="triton"``).
        """
        sinkhorn_knopp = self.logit_losses.sinkhorn_knopp  # compiled with model.compile
        out = self.teacher["backbone"].forward_features(global_crops)
        dino = sinkhorn_knopp(self.teacher["dino_head"](out["x_norm_clstoken"]), teacher_temp)
        masked = gather_masked_tokens(out["x_norm_patchtokens"], mask_indices)  # [M, D_teacher]
        ibot = self.logit_losses.ibot_targets(self.teacher["ibot_head"](masked), teacher_temp)
        return {"dino": dino, "ibot": ibot}

    def compute_losses(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        hp = self.hparams
        ibot_loss = self.logit_losses.ibot_loss  # compiled with model.compile
        values = self.schedule_values(step)
        images: Tensor = batch["image"]
        batch_size = images.shape[0]
        crops, masking = make_views(
            images, batch.get("valid"), seed=hp.seed, step=step, global_size=hp.global_crop_size,
            local_size=hp.local_crop_size, gram_size=None, patch_size=self.teacher["backbone"].patch_size,
            crop_kwargs=self._crop_kwargs, mask_probability=hp.mask_probability, mask_ratio_range=hp.mask_ratio_range,
        )
        global_crops, local_crops = crops["global_crops"], crops["local_crops"]
        n_global = global_crops.shape[0] // batch_size
        n_local = local_crops.shape[0] // batch_size
        targets = self.teacher_targets(global_crops, masking["mask_indices"], values["teacher_temp"])

        losses: dict[str, Tensor] = {}
        total = images.new_zeros(())
        for i, student in enumerate(self.students):
            inputs = [global_crops] + ([local_crops] if n_local else [])
            outs = student["backbone"].forward_features(inputs)  # students see unmasked crops
            cls = torch.cat([o["x_norm_clstoken"] for o in outs])  # [(2+nL)·B, D]
            logits = student["dino_head"](cls)
            terms = self.logit_losses.dino_losses(logits, targets["dino"], batch_size=batch_size,
                                                  student_temp=hp.student_temp)
            dino = dino_total(terms, loss_weight=hp.dino_loss_weight, local_loss_weight=values["local_loss_weight"])
            masked = gather_masked_tokens(outs[0]["x_norm_patchtokens"], masking["mask_indices"])  # [M, D]
            ibot = ibot_loss(
                student["ibot_head"](masked), targets["ibot"], masking["masks_weight"], global_crops.shape[0],
                student_temp=hp.student_temp,
            )
            koleo = sum(koleo_loss(c) for c in outs[0]["x_norm_clstoken"].chunk(n_global))
            student_total = dino + hp.ibot_loss_weight * ibot + hp.koleo_loss_weight * koleo
            name = hp.students[i]
            losses.update({f"{i}_{name}/dino": dino, f"{i}_{name}/ibot": ibot, f"{i}_{name}/koleo": koleo})
            total = total + student_total
        losses["total"] = total
        return losses
