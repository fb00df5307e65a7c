"""What every self-supervised training stage shares: schedules, optimiser, clipping, EMA, views and exact resumption.

:class:`SSLStage` is the base of :class:`~dinov3_eo.ssl.module.DINOv3Pretrain` (pretraining, Gram anchoring,
high-resolution adaptation) and :class:`~dinov3_eo.ssl.distill.DINOv3Distill`. A subclass provides
``compute_losses(batch, step)`` and ``trained_parts()``; the base turns that into a Lightning training step with
per-step schedules, per-module gradient clipping, a non-finite-loss guard and logging.

Randomness is a function of (seed, step): crops and masks come from generators seeded with it, and the global torch
RNG (RoPE rescaling, drop-path) is re-seeded with it at each step. Together with samplers that skip what an
interrupted epoch already consumed, a run killed at any point resumes exactly as the uninterrupted run.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dinov3_eo.ssl.compilation import (
    LogitLosses,
    check_compile_toolchain,
    compile_regions,
    logit_losses_for,
    resolve_logit_kernels,
)
from dinov3_eo.ssl.crops import MultiCrop, host_to_device
from dinov3_eo.ssl.distributed import world_size
from dinov3_eo.ssl.masking import ibot_masks
from dinov3_eo.ssl.optimizer import GroupedAdamW
from dinov3_eo.step_logging import LossReadback, micro_batch_mean
from dinov3_eo.ssl.schedules import (
    apply_optimizer_schedules,
    build_param_groups,
    clip_grad_norm_per_module,
    cosine_schedule,
    last_layer_lr,
    linear_warmup_cosine_decay,
    scale_lr_sqrt_wrt_1024,
    teacher_temperature,
)
from dinov3_eo.training_modes import TrainModesAtFitStart

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; training stops before the optimiser step so checkpoints stay good."""


def step_seed(seed: int, step: int, stream: int) -> int:
    """A reproducible seed for one random stream (crops, masks, resolution, model) of one step."""
    return (seed * 1_000_003 + step * 97 + stream) % (2**63 - 1)


def step_schedule(hp: Any, step: int, *, total_steps: int, peak_lr: float) -> dict[str, float]:
    """Every scheduled value of a training stage at optimiser step ``step``.

    ``hp`` holds the stage's hyper-parameters (``lr_schedule``, ``min_lr``, ``lr_warmup_steps``, ``weight_decay``,
    ``weight_decay_end``, ``momentum_teacher``, ``final_momentum_teacher``, ``teacher_temp``, ``warmup_teacher_temp``,
    ``teacher_temp_warmup_steps``, ``freeze_last_layer_steps`` and optionally the Gram/local-weight ones). A pure
    function of the step, so a resumed run needs no scheduler state.

    Returns:
        ``lr``, ``last_layer_lr``, ``weight_decay``, ``momentum``, ``teacher_temp``, ``gram_weight``,
        ``local_loss_weight``.
    """
    total = max(int(total_steps), 1)
    warmup = min(hp.lr_warmup_steps, total)
    if hp.lr_schedule == "cosine":
        lr = cosine_schedule(step, base=peak_lr, final=hp.min_lr, total_steps=total, warmup_steps=warmup)
    elif hp.lr_schedule == "constant":
        lr = linear_warmup_cosine_decay(
            step, start=0.0, peak=peak_lr, end=peak_lr, warmup_iterations=warmup, total_iterations=total,
            cosine_iterations=0,
        )
    else:  # "ramp": cosine ramp 0 -> lr, then constant (official high-res adaptation)
        lr = linear_warmup_cosine_decay(
            step, start=0.0, peak=0.0, end=peak_lr, warmup_iterations=0, total_iterations=total,
            cosine_iterations=max(warmup, 1),
        )
    values = {
        "lr": lr,
        "last_layer_lr": last_layer_lr(step, lr, freeze_steps=hp.freeze_last_layer_steps),
        "weight_decay": cosine_schedule(step, base=hp.weight_decay, final=hp.weight_decay_end, total_steps=total),
        "momentum": cosine_schedule(step, base=hp.momentum_teacher, final=hp.final_momentum_teacher, total_steps=total),
        "teacher_temp": teacher_temperature(
            step, warmup_steps=hp.teacher_temp_warmup_steps, start=hp.warmup_teacher_temp, final=hp.teacher_temp
        ),
    }
    gram_warmup = min(getattr(hp, "gram_weight_warmup_steps", 0), total)
    ramp = (
        1.0
        if gram_warmup <= 0
        else linear_warmup_cosine_decay(
            step, start=0.0, peak=0.0, end=1.0, warmup_iterations=0, total_iterations=total, cosine_iterations=gram_warmup
        )
    )
    values["gram_weight"] = getattr(hp, "gram_loss_weight", 0.0) * ramp
    local_end = getattr(hp, "local_loss_weight", 1.0)
    local_start = getattr(hp, "local_loss_weight_start", None)
    values["local_loss_weight"] = local_end if local_start is None else local_start + (local_end - local_start) * ramp
    return values


def make_views(
    images: Tensor,
    valid: Tensor | None,
    *,
    seed: int,
    step: int,
    global_size: int,
    local_size: int,
    gram_size: int | None,
    patch_size: int,
    crop_kwargs: dict[str, Any],
    mask_probability: float,
    mask_ratio_range: tuple[float, float],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The crops and iBOT masks of one step, drawn from generators seeded by (seed, step).

    Masks are made here rather than in the collate function (the official place) because the crops are made on
    the device after collation; seeding by step also makes a resumed run draw the same masks.

    Returns:
        (crops, masking): ``crops`` as :class:`MultiCrop` returns them (``global_crops`` [2B,C,G,G], ``local_crops``
        [nL·B,C,L,L], optional ``gram_crops``); ``masking`` as :func:`ibot_masks` (``masks`` [2B,N] bool,
        ``mask_indices`` [M], ``masks_weight`` [M]) moved to the images' device.
    """
    generator = torch.Generator().manual_seed(step_seed(seed, step, 1))
    multicrop = MultiCrop(global_size=global_size, local_size=local_size, gram_teacher_size=gram_size, **crop_kwargs)
    # crops are data, not model compute: float32 even inside Lightning's bf16-mixed autocast (the blur's conv would
    # otherwise come back in bf16 and no longer fit its float32 batch)
    with torch.autocast(device_type=images.device.type, enabled=False):
        crops = multicrop(images.float(), valid, generator=generator)
    grid = (global_size // patch_size, global_size // patch_size)
    masking = ibot_masks(
        crops["global_crops"].shape[0], grid, rng=np.random.default_rng(step_seed(seed, step, 2)),
        mask_probability=mask_probability, ratio_range=tuple(mask_ratio_range),
    )
    masking = host_to_device(masking, images.device)
    return crops, masking


def crop_options(
    *,
    n_local_crops: int,
    global_crops_scale: tuple[float, float],
    local_crops_scale: tuple[float, float],
    horizontal_flips: bool,
    vertical_flips: bool,
    augmentation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:class:`MultiCrop` keyword arguments from a stage's constructor arguments (sizes are chosen per step).

    ``augmentation`` holds further :class:`MultiCrop` options (``brightness``, ``contrast``, ``jitter_prob``,
    ``grayscale_prob``, ``solarize_prob``, ``blur_probs``, ``blur_sigma``, ``min_valid_fraction``, ...), checked
    here so that a misspelt key fails when the module is built, not at the first step.

    Raises:
        ValueError: for a key that is not a :class:`MultiCrop` option or is set by the other arguments.
    """
    options = dict(
        n_local_crops=n_local_crops,
        global_scale=tuple(global_crops_scale),
        local_scale=tuple(local_crops_scale),
        horizontal_flip_prob=0.5 if horizontal_flips else 0.0,
        vertical_flip_prob=0.5 if vertical_flips else 0.0,
    )
    extra = dict(augmentation or {})
    allowed = set(inspect.signature(MultiCrop).parameters) - set(options) - {"global_size", "local_size", "gram_teacher_size"}
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(f"augmentation: unknown option(s) {unknown}; choose from {sorted(allowed)} (crop sizes, "
                         "scales, local-crop count and flips have their own arguments).")
    for key in ("blur_probs", "blur_sigma"):  # YAML gives lists
        if key in extra:
            extra[key] = tuple(extra[key])
    return options | extra


@torch.no_grad()
def ema_update_(ema: Iterable[Tensor], live: Iterable[Tensor], momentum: float) -> None:
    """In place: ``ema ← momentum·ema + (1 − momentum)·live`` over matching parameter lists."""
    ema, live = list(ema), [p.detach() for p in live]
    # as ema + (1 - momentum)·(live - ema): one pass over both lists instead of a multiply pass and an add pass
    torch._foreach_lerp_(ema, live, 1.0 - momentum)


class SSLStage(TrainModesAtFitStart):
    """Shared Lightning plumbing of the SSL stages; subclasses implement :meth:`compute_losses`.

    Subclasses must call ``save_hyperparameters()`` with the schedule/optimiser arguments used by
    :func:`step_schedule` plus ``base_lr``, ``scale_lr_with_batch``, ``adamw_betas``, ``layerwise_decay``,
    ``patch_embed_lr_mult``, ``clip_grad`` and ``seed``; an optional ``compile`` hyper-parameter compiles every block
    and head, and the logit losses, when a fit starts (:mod:`dinov3_eo.ssl.compilation`), and an optional
    ``logit_kernels`` one runs the iBOT and DINO terms as Triton kernels
    (:func:`~dinov3_eo.ssl.compilation.logit_losses_for`).
    """

    #: batches of the interrupted epoch already trained on when resuming (skipped, see on_train_start)
    _resume_batches: int = 0
    #: Sinkhorn–Knopp, the iBOT loss and the DINO terms as a step calls them; :meth:`on_fit_start` sets them up from
    #: ``compile`` and ``logit_kernels``
    logit_losses: LogitLosses = LogitLosses()
    #: ``"torch"`` or ``"triton"``: what the ``logit_kernels`` option (``"auto"`` included) runs on the stage's device,
    #: set when a fit starts
    logit_kernels_in_use: str = "torch"
    #: (step, batch size, :class:`LossReadback`) of each training step since the last optimiser step (more than one
    #: when gradients accumulate); :meth:`on_before_optimizer_step` checks and logs them
    _pending_losses: tuple[tuple[int, int, LossReadback], ...] = ()

    # ------------------------------------------------------------------ what subclasses provide

    def trained_parts(self) -> dict[str, nn.ModuleDict]:
        """name → trained ``ModuleDict(backbone, dino_head, ibot_head)``; each gets its own param groups and clipping."""
        raise NotImplementedError

    def compute_losses(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        """The step's named loss terms and their weighted ``total`` (no backward)."""
        raise NotImplementedError

    def preview_backbones(self) -> dict[str, nn.Module]:
        """name → backbone whose features :class:`~dinov3_eo.ssl.preview.FeaturePreview` pictures (what is exported)."""
        raise NotImplementedError

    def preview_meta(self) -> Any:
        """The :class:`~dinov3_eo.models.hub.BackboneMeta` of the pictured backbones (its band names pick the RGB)."""
        raise NotImplementedError

    def configure_callbacks(self) -> list:
        """:class:`~dinov3_eo.ssl.preview.FeaturePreview` every ``preview_every_n_steps`` steps (unless 0, or the
        trainer has one of its own: Lightning would replace that by this one)."""
        from dinov3_eo.ssl.preview import FeaturePreview

        every = int(getattr(self.hparams, "preview_every_n_steps", 0) or 0)
        own = self._trainer is not None and any(isinstance(c, FeaturePreview) for c in self._trainer.callbacks)
        return [FeaturePreview(every_n_steps=every)] if every > 0 and not own else []

    # ------------------------------------------------------------------ schedules

    def _total_steps(self) -> int:
        if self._trainer is None:
            return 1
        total = self.trainer.max_steps
        if total is None or total < 0:
            total = int(self.trainer.estimated_stepping_batches)
        return max(int(total), 1)

    def _peak_lr(self) -> float:
        hp = self.hparams
        if not hp.scale_lr_with_batch:
            return hp.base_lr
        return scale_lr_sqrt_wrt_1024(hp.base_lr, getattr(self, "_global_batch_size", None) or 1024)

    def schedule_values(self, step: int) -> dict[str, float]:
        """All scheduled quantities at optimiser step ``step`` (pure function of the step and hyper-parameters)."""
        return step_schedule(self.hparams, step, total_steps=self._total_steps(), peak_lr=self._peak_lr())

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        groups: list[dict] = []
        for part in self.trained_parts().values():
            for group in build_param_groups(
                part, n_blocks=part["backbone"].n_blocks, layerwise_decay=hp.layerwise_decay,
                patch_embed_lr_mult=hp.patch_embed_lr_mult,
            ):
                group.pop("names", None)
                groups.append(group)
        # fused AdamW (one kernel per group: 7-8x faster than the per-tensor loop on CPU, also on CUDA), stepped with
        # less host work per group (ssl.optimizer)
        return GroupedAdamW(groups, lr=hp.base_lr, betas=tuple(hp.adamw_betas))

    def step_parameters(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()``, a structure of parameter lists a step walks (the EMA update, the clipping), made once per fit.

        Listing a module tree's parameters is host work in every step (~0.3 ms per tree here, several trees a
        step) that a launch-bound GPU step waits on. The lists are made again at each fit's start, after the
        strategy has wrapped or sharded the modules (which may replace their parameters); between, parameters are
        only changed in place (optimiser steps, ``load_state_dict``, moves between devices).
        """
        cache = self.__dict__.setdefault("_step_parameter_lists", {})
        if key not in cache:
            cache[key] = make()
        return cache[key]

    def clip_gradients_per_module(self) -> dict[str, Tensor]:
        """Clip each trained part's modules separately (``clip_grad``; none when it is 0 or less) and return
        ``"<part prefix><module>"`` → gradient norm before clipping. Under Lightning's ``FSDPStrategy`` each process
        holds a shard of every gradient, so the norms are summed over the processes (one all-reduce) before any
        shard is scaled."""
        if not self.hparams.clip_grad or self.hparams.clip_grad <= 0:
            return {}
        parts = self.step_parameters("clip", lambda: {
            prefix: {name: list(module.parameters()) for name, module in part.items()}
            for prefix, part in self.trained_parts().items()})  # fmt: skip
        sharded = self.step_parameters("clip_sharded", self._gradients_sharded)
        norms = {}
        for prefix, modules in parts.items():
            clipped = clip_grad_norm_per_module(modules, self.hparams.clip_grad, sharded=sharded)
            norms |= {f"{prefix}{name}": norm for name, norm in clipped.items()}
        return norms

    def _gradients_sharded(self) -> bool:
        """Whether the fit's strategy shards the gradients (FSDP): then no process holds a whole gradient."""
        from lightning.pytorch.strategies import FSDPStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, FSDPStrategy)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        norms = {f"grad_norm/{name}": norm for name, norm in self.clip_gradients_per_module().items()}
        for name, norm in self._to_log(norms).items():
            self.log(name, norm, on_step=True, on_epoch=False)

    def _to_log(self, values: dict[str, Any]) -> dict[str, Any]:
        """The step values worth a ``self.log`` now: all of them on the steps a logger writes (every
        ``trainer.log_every_n_steps``; outside a fit, or in a fit without a logger, where ``callback_metrics`` is
        all there is, always), else only those a callback monitors (``ModelCheckpoint``/``EarlyStopping``'s
        ``monitor``). Between logging steps Lightning drops the step values it was given, and each ``self.log`` still
        cost the host about a millisecond (13 values a step: a tenth of a small model's step, host time a GPU step
        waits on; ``bench_pretrain.py --host-proxy``)."""
        trainer = self._trainer
        # as Lightning's own LearningRateMonitor asks it (a Lightning without it: every value, every step)
        connector = getattr(trainer, "_logger_connector", None)
        if trainer is None or not trainer.loggers or getattr(connector, "should_update_logs", True):
            return values
        monitored = {getattr(callback, "monitor", None) for callback in trainer.callbacks}
        return {name: value for name, value in values.items() if name in monitored}

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """A batch without nodata (most batches) is told here, on the host, where the check is free: its validity mask
        is dropped, so that it does not travel and the crops skip their mask work (on a GPU the same check after the
        transfer would cost a sync, so the crops would render masks of all-valid pixels)."""
        valid = batch.get("valid") if isinstance(batch, Mapping) else None
        if isinstance(valid, Tensor) and valid.device.type == "cpu" and bool(valid.all()):
            batch = {**batch, "valid": None}
        return batch

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._global_batch_size = int(batch["image"].shape[0]) * world_size()
        values = self.schedule_values(self.global_step)
        optimizer = self.optimizers()
        apply_optimizer_schedules(
            getattr(optimizer, "optimizer", optimizer),  # unwrap Lightning's optimizer wrapper
            lr=values["lr"], weight_decay=values["weight_decay"], last_layer_lr=values["last_layer_lr"],
        )

    # ------------------------------------------------------------------ compilation

    def on_fit_start(self) -> None:
        # students in training mode and teachers in eval mode (the subclasses' train()), whatever a caller did before
        super().on_fit_start()
        self.__dict__.pop("_step_parameter_lists", None)  # the strategy may have wrapped the modules since
        self._pending_losses = ()  # a fit interrupted between a training step and its optimiser step left these
        # after every deepcopy of a module (subclasses make theirs first, then call this), see ssl.compilation
        mode = getattr(self.hparams, "compile", False)
        kernels = resolve_logit_kernels(getattr(self.hparams, "logit_kernels", "torch"), self.device)
        if mode:
            check_compile_toolchain(self.device)
            count = compile_regions(self) if mode is True else 0  # "losses": the logit losses alone
            log.info("torch.compile: %d blocks and heads and the logit losses compiled (each input shape compiles "
                     "on its first step).", count)
        # set up once (a second fit keeps its compiled graphs), and again where "auto" picks other kernels than last
        # time (a fit on another device: a CPU cannot run the kernels a GPU fit set up)
        if self.logit_losses == LogitLosses() or kernels != self.logit_kernels_in_use:
            self.logit_losses = logit_losses_for(compile=bool(mode), kernels=kernels, device=self.device)
            if kernels == "triton":
                log.info("logit_kernels: the iBOT and DINO terms run as Triton kernels.")
        self.logit_kernels_in_use = kernels

    # ------------------------------------------------------------------ exact resumption

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {})
        self._resume_batches = int(progress.get("current", {}).get("processed", 0))

    def on_train_start(self) -> None:
        # Lightning re-enters an interrupted epoch without on_train_epoch_start and restarts its dataloader from
        # the beginning; the sampler skips what was consumed at its next __iter__
        done, self._resume_batches = self._resume_batches, 0
        loader = self.trainer.train_dataloader
        if not done or loader is None or done >= len(loader):
            return
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "skip_next"):
            sampler.skip_next(done * loader.batch_size)
            log.info("Resumed mid-epoch: skipping the %d batches the interrupted run already trained on.", done)
        else:
            log.warning("Resumed mid-epoch with a sampler that cannot skip: this epoch's first %d batches repeat.", done)

    # ------------------------------------------------------------------ the step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        step = self.global_step
        # model-internal randomness (RoPE rescale, drop-path) reproducible across a kill/resume
        torch.manual_seed(step_seed(self.hparams.seed, step, 0))
        losses = self.compute_losses(batch, step)
        # the values travel to the host while the backward is queued; on_before_optimizer_step reads them
        readback = LossReadback(losses)
        self._pending_losses = (*self._pending_losses, (step, int(batch["image"].shape[0]), readback))
        return losses["total"]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The non-finite guard and the loss logging, after the backward and before clipping and the optimiser step.

        Reading the losses here, not in :meth:`training_step`, is what keeps a GPU busy: the step's one
        device-to-host copy is waited for once the backward is queued, where a read after the forward stalled the
        device until the host had launched the backward's first kernels. A non-finite loss still stops the fit
        before the weights change, so the last saved checkpoint is intact. The loggers get these CPU values: Lightning
        reads a logged progress-bar tensor back at every batch end and every logged tensor at each logger flush (a
        sync each) and copies logged Python floats to the device, blocking (one sync each).
        """
        pending, self._pending_losses = self._pending_losses, ()
        if not pending:  # a step that did not come through training_step (manual loops)
            return
        steps = []
        for step, batch_size, readback in pending:
            host = readback.values()
            if not all(bool(torch.isfinite(value)) for value in host.values()):
                bad = [name for name, value in host.items() if not torch.isfinite(value)]
                raise NonFiniteLossError(
                    f"Non-finite loss at step {step} in {', '.join(bad)} "
                    f"({', '.join(f'{k}={float(v):.4g}' for k, v in host.items())}); training stopped before the "
                    "optimiser step, so the last saved checkpoint is intact. Lower the lr or check the input "
                    "normalisation."
                )
            steps.append((batch_size, host))
        # accumulated gradients: the mean over the micro-batches this optimiser step is made of
        batch_size = sum(size for size, _ in steps)
        mean = micro_batch_mean([host for _, host in steps])
        self.log("loss", mean["total"], prog_bar=True, batch_size=batch_size)  # the progress bar's, every step
        losses = self._to_log({f"loss/{k}": v for k, v in mean.items() if k != "total"})
        if losses:
            self.log_dict(losses, batch_size=batch_size)
        values = self.schedule_values(pending[0][0])
        logged = {f"sched/{k}": values[k] for k in ("lr", "momentum", "teacher_temp", "weight_decay")}
        if getattr(self.hparams, "gram_loss_weight", 0) > 0:
            logged["sched/gram_weight"] = values["gram_weight"]
        logged = self._to_log(logged)
        if logged:
            self.log_dict({k: torch.tensor(v) for k, v in logged.items()}, batch_size=batch_size)  # CPU, see above
