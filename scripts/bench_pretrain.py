"""Pretraining benchmark: (1) SSL step overhead over the irreducible backbone work, (2) a learning check on real data.

(1) One full SSL step (crops, masking, teacher, student, heads, losses, backward, per-module gradient clipping,
    optimiser, EMA) against the backbone work it cannot avoid on the same crops: student forward+backward on all
    crops and teacher forward on the global crops;
    next to the time ratio, the FLOP ratio of the two (``torch.utils.flop_counter``): the floor the heads' own
    products set, which no implementation of the official heads goes below.
(2) Pretrain a small ViT for a fixed wall-clock budget on Landsat-8 tiles and EuroSAT train chips from ../shared/data,
    then k-NN (k=20) accuracy of frozen teacher CLS features on a EuroSAT train/test split, against the same
    architecture with random weights and a k-NN on colour features (per-band mean, std and an 8-bin histogram);
    the two ViTs are evaluated at the training crop size and on the chips upsampled (``--knn-sizes``).
    It trains with ``SHORT_RUN``, the three changes a run of minutes needs (README, "Pretraining learning check").
    The teacher backbone is exported (``--export``) for the dense-task experiments.

    .venv/bin/python scripts/bench_pretrain.py --minutes 8 --export /work/pretrained/vitt16_eurosat_landsat
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import numpy as np

import torch
from PIL import Image

from dinov3_eo.allocator import retain_freed_memory

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: What a run of minutes instead of days changes in the official recipe (README, "Pretraining learning check";
#: measured on an H100 with vits16): LayerScale 0.1 instead of 1e-5, so that images differ at initialisation and
#: the teacher's Sinkhorn targets are not uniform; unit-norm prototypes (DINOv1/v2's weight norm), so that the
#: student cannot shrink them to uniform outputs; a constant teacher temperature of 0.04 (sharper targets).
SHORT_RUN: dict = {"backbone_kwargs": {"layerscale_init": 0.1}, "norm_last_layer": True, "teacher_temp": 0.04}


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def ssl_step_setup(arch: str, batch: int, *, device: str = "cpu", global_size: int = 224, local_size: int = 96,
                   n_local: int = 8, compile: bool | str = False, image_size: int | None = None,
                   **module_kwargs):  # noqa: ANN201 - (module, optimizer, batch dict)
    """A seeded ``DINOv3Pretrain`` in train mode, its optimiser and one random fully valid batch, for one-step checks.

    The images are ``image_size`` (default ``max(256, global_size)``) px square. The batch goes through the
    module's ``on_before_batch_transfer`` on the host before it moves to ``device``, as in a fit: being fully valid,
    it arrives with ``valid=None``, so the crops render no masks (a device-side all-True mask would make them).
    ``compile`` compiles every block and head and the two logit losses (``True``) or the losses alone
    (``"losses"``), as ``model.compile`` does when a fit starts. ``logit_kernels`` is ``"torch"`` unless given (the
    module's ``"auto"`` would pick the Triton kernels on a GPU): each check names the variant it times.
    """
    from dinov3_eo.ssl.module import DINOv3Pretrain

    torch.manual_seed(0)
    module_kwargs.setdefault("logit_kernels", "torch")
    module = DINOv3Pretrain(backbone=arch, global_crop_size=global_size, local_crop_size=local_size,
                            n_local_crops=n_local, compile=compile, **module_kwargs).to(device)
    module._total_steps = lambda: 1000  # type: ignore[method-assign]  # schedules need a length outside a Trainer
    optimizer = module.configure_optimizers()
    module.on_fit_start()  # train/eval modes and compilation, as when a fit starts
    side = image_size or max(256, global_size)
    host = {"image": torch.randn(batch, 3, side, side), "valid": torch.ones(batch, side, side, dtype=torch.bool)}
    host = module.on_before_batch_transfer(host, 0)
    data = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in host.items()}
    return module, optimizer, data


def _step_view_kwargs(module, global_size: int, local_size: int) -> dict:  # noqa: ANN001
    """``make_views`` arguments of the fixed step (step 10, seed 0) both step checks time or count."""
    return dict(seed=0, step=10, global_size=global_size, local_size=local_size, gram_size=None, patch_size=16,
                crop_kwargs=module._crop_kwargs, mask_probability=0.5, mask_ratio_range=(0.1, 0.5))


def backbone_only_work(module, crops: dict, masking: dict, *, autocast=None) -> None:  # noqa: ANN001
    """The backbone work an SSL step cannot avoid on ``crops``: teacher forward on the global crops, student
    forward + backward on all crops (a sum of its outputs stands in for the heads and losses)."""
    student, teacher = module.student["backbone"], module.teacher["backbone"]
    with autocast or contextlib.nullcontext():
        with torch.no_grad():
            teacher.forward_features(crops["global_crops"])
        outs = student.forward_features([crops["global_crops"], crops["local_crops"]], masks=[masking["masks"], None])
        total = sum(o["x_norm_clstoken"].float().sum() + o["x_norm_patchtokens"].float().sum() for o in outs)
    total.backward()
    student.zero_grad(set_to_none=True)


def clip_and_step(module, optimizer) -> None:  # noqa: ANN001
    """What a fit does after the backward: the per-module gradient clipping (``configure_gradient_clipping``,
    without its logging), the optimiser step and ``zero_grad``."""
    module.clip_gradients_per_module()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


#: where :func:`full_ssl_step` reads its losses back: ``after_backward`` (as a fit does: the copy is queued after the
#: forward and waited for once the backward is launched, in ``on_before_optimizer_step``, so the device never runs
#: dry), ``after_forward`` (a blocking read between forward and backward, as fits did up to session 14: the host waits
#: for the forward before it launches the backward) or ``none`` (no read-back: the bound of what moving it can gain)
READBACKS = ("after_backward", "after_forward", "none")


def full_ssl_step(module, optimizer, data: dict, *, autocast=None, readback: str = "after_backward") -> None:  # noqa: ANN001
    """One full SSL step as a fit runs it: the losses (which make their own views) under ``autocast``, their values
    read back to the host (the step's one synchronisation: the non-finite guard and the loggers read them;
    ``readback``, :data:`READBACKS`, says where), backward, :func:`clip_and_step` and the EMA update."""
    from dinov3_eo.ssl.stage import LossReadback

    with autocast or contextlib.nullcontext():
        losses = module.compute_losses(data, step=10)
    if readback == "after_forward":
        LossReadback(losses).values()
    pending = LossReadback(losses) if readback == "after_backward" else None
    losses["total"].backward()
    if pending is not None:
        pending.values()
    clip_and_step(module, optimizer)
    module._ema_update(0.996)


def step_and_backbone_work(module, optimizer, data: dict, *, global_size: int, local_size: int,  # noqa: ANN001
                           autocast=None, readback: str = "after_backward",  # noqa: ANN001
                           ) -> tuple[Callable[[], None], Callable[[], None]]:
    """What every step check compares: one full SSL step (:func:`full_ssl_step`, no synchronize inside but its loss
    read-back, so the host's launches overlap the device's work as in a fit) and the backbone work
    (:func:`backbone_only_work`) on crops made once from the same batch."""
    from dinov3_eo.ssl.stage import make_views

    if readback not in READBACKS:
        raise ValueError(f"readback must be one of {READBACKS}, got {readback!r}.")
    crops, masking = make_views(data["image"], None, **_step_view_kwargs(module, global_size, local_size))
    return (lambda: full_ssl_step(module, optimizer, data, autocast=autocast, readback=readback),
            lambda: backbone_only_work(module, crops, masking, autocast=autocast))


def step_variant(compile: bool | str = False, logit_kernels: str = "torch") -> str:
    """How a timed step runs besides eager torch ops, for its labels ("" when it does not): e.g. ``"logit losses
    compiled, triton logit kernels"`` (``logit_kernels`` as a stage resolved it, ``logit_kernels_in_use``)."""
    parts = [{True: "compiled", "losses": "logit losses compiled"}.get(compile, "")]
    parts.append("triton logit kernels" if logit_kernels == "triton" else "")
    return ", ".join(part for part in parts if part)


def step_overhead(arch: str, batch: int, repeats: int, *, global_size: int = 224, local_size: int = 96,
                  n_local: int = 8, device: str = "cpu", bf16: bool = False, compile: bool | str = False,
                  readback: str = "after_backward", **module_kwargs) -> dict[str, float]:
    """Full SSL step vs the backbone work it cannot avoid, timed alternately (robust to a shared machine).

    On a GPU every timing is bracketed by a synchronize, and nothing synchronizes inside a timed step but its loss
    read-back, where ``readback`` says (a fit's step copies its losses to the host once, waited for after the backward
    is launched); the breakdown comes from separate steps synchronized between
    their parts. ``bf16`` runs both under bf16 autocast (as Lightning's
    ``bf16-mixed``); ``compile`` as ``model.compile`` (``True``: the blocks and heads too, which the
    backbone-only work then uses; ``"losses"``: the logit losses alone). Returns
    the mean seconds of both, the full step's breakdown and the seconds of the untimed warm-up steps (which include
    the compilation). ``readback``: where the full step reads its losses back (:data:`READBACKS`).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from dinov3_eo.ssl.stage import make_views

    module, optimizer, data = ssl_step_setup(arch, batch, device=device, global_size=global_size,
                                             local_size=local_size, n_local=n_local, compile=compile, **module_kwargs)
    images = data["image"]
    view_kwargs = _step_view_kwargs(module, global_size, local_size)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=bf16)
    full_step, backbone_only = step_and_backbone_work(module, optimizer, data, global_size=global_size,
                                                      local_size=local_size, autocast=autocast, readback=readback)
    parts = {"views": 0.0, "forward+heads+losses": 0.0, "backward": 0.0, "clip+optimizer": 0.0, "ema": 0.0}

    def now() -> float:
        if device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter()

    def full_step_parts() -> None:
        """One full step with a synchronize between its parts, for the breakdown only: the syncs cost a launch-bound
        GPU step the overlap of host and device, so these steps are not the ones timed against the backbone work."""
        t0 = now()
        make_views(images, None, **view_kwargs)
        t1 = now()
        with autocast:
            losses = module.compute_losses(data, step=10)  # makes its own views again: subtracted below
        t2 = now()
        losses["total"].backward()
        t3 = now()
        clip_and_step(module, optimizer)
        t4 = now()
        module._ema_update(0.996)
        t5 = now()
        for key, dt in zip(parts, (t1 - t0, t2 - t1 - (t1 - t0), t3 - t2, t4 - t3, t5 - t4)):
            parts[key] += dt

    warm_start = now()
    for _ in range(2 if device != "cpu" else 1):  # warm-up (cuDNN/cuBLAS autotuning on a GPU; compilation)
        full_step(), backbone_only()
    warm_up_s = now() - warm_start
    # the floor: how much more arithmetic the full step does (the heads' products, mostly); a time ratio close to
    # this FLOP ratio means the heads, losses, crops and EMA cost what their arithmetic costs and no more
    flops = {}
    for name, fn in (("full", full_step), ("backbone", backbone_only)):
        with FlopCounterMode(display=False) as counter:
            fn()
        flops[name] = counter.get_total_flops()
    fulls, backbones = [], []
    with python_gc_pauses() as gc_pauses:  # a collection inside a timed step stalls its launches
        for _ in range(repeats):  # alternate, so load from other jobs hits both alike
            start = now()
            full_step()
            fulls.append(now() - start)
            start = now()
            backbone_only()
            backbones.append(now() - start)
    t_full, t_backbone = sum(fulls) / repeats, sum(backbones) / repeats
    steady = {}
    if device != "cpu":  # (on a CPU nothing runs ahead: these would equal the steps above)
        # steady state: steps back to back, synchronized only at both ends, as a fit runs them: the host's work on
        # one step (the crops' draws, the launches) overlaps the device's work on the step before
        totals = {"full": 0.0, "backbone": 0.0}
        for _ in range(2):
            for name, fn in (("full", full_step), ("backbone", backbone_only)):
                start = now()
                for _ in range(repeats):
                    fn()
                totals[name] += now() - start
        steady = {"steady_full_s": totals["full"] / (2 * repeats),
                  "steady_backbone_s": totals["backbone"] / (2 * repeats),
                  "steady_ratio": totals["full"] / totals["backbone"]}
        # how long the host takes to queue one step, from an idle device to the call's return: where that is close
        # to the step's synchronized time while the profile's kernel time is lower, the host bounds the step and
        # only fewer launches (not faster kernels) make it faster
        for name, fn in (("full", full_step), ("backbone", backbone_only)):
            queued = []
            for _ in range(repeats):
                now()
                start = time.perf_counter()
                fn()
                queued.append(time.perf_counter() - start)
            now()
            steady[f"host_queue_{name}_s"] = statistics.median(queued)
    # the breakdown only splits the step's time into parts (it is not the compared number): two steps show it
    breakdown_repeats = min(repeats, 2)
    for _ in range(breakdown_repeats):
        full_step_parts()
    paired = sorted(f / b for f, b in zip(fulls, backbones))
    paired_median = statistics.median(paired)
    heads = module.hparams.dino_out_dim
    variant = step_variant(compile, module.logit_kernels_in_use) or "eager"
    if readback != "after_backward":
        variant += ", no loss read-back" if readback == "none" else f", losses read back {readback.replace('_', ' ')}"
    print(f"[step] {arch}, batch {batch}, 2x{global_size} + {n_local}x{local_size} crops, {heads:,}-prototype heads, "
          f"{device}{' bf16' if bf16 else ''}, {variant}, {repeats} alternating repeats "
          f"(warm-up {warm_up_s:.1f} s):")
    flop_ratio = flops["full"] / flops["backbone"]
    print(f"[step]   full SSL step {t_full:.3f} s | backbone-only work {t_backbone:.3f} s | "
          f"ratio {t_full / t_backbone:.3f}x | FLOP ratio {flop_ratio:.3f}x ({flops['full'] / 1e9:,.0f} vs "
          f"{flops['backbone'] / 1e9:,.0f} GFLOP) | time beyond the arithmetic {t_full / t_backbone / flop_ratio:.3f}x")
    print(f"[step]   full step breakdown ({breakdown_repeats} more steps, synchronized between parts): "
          + ", ".join(f"{k} {v / breakdown_repeats:.3f} s" for k, v in parts.items()))
    print(f"[step]   paired ratios (each full step over the backbone work next to it): "
          f"{', '.join(f'{r:.3f}' for r in paired)}; median {paired_median:.3f}x")
    print(f"[step]   Python garbage collections during the paired steps: {gc_pauses['count']} "
          f"({gc_pauses['oldest']} of the oldest generation), {gc_pauses['seconds'] * 1e3:.1f} ms in all")
    if steady:
        print(f"[step]   back to back (2 x {repeats} in a row each): full SSL step {steady['steady_full_s']:.3f} s | "
              f"backbone-only work {steady['steady_backbone_s']:.3f} s | ratio {steady['steady_ratio']:.3f}x")
        print(f"[step]   host time to queue one step (median, from an idle device): full SSL step "
              f"{steady['host_queue_full_s']:.3f} s | backbone-only work {steady['host_queue_backbone_s']:.3f} s "
              f"(ratio {steady['host_queue_full_s'] / steady['host_queue_backbone_s']:.3f}x)")
    return {"full_s": t_full, "backbone_s": t_backbone, "ratio": t_full / t_backbone, "flop_ratio": flop_ratio,
            "paired_median_ratio": paired_median, "paired_ratios": paired, **steady,
            "gc_collections": gc_pauses["count"], "gc_seconds": gc_pauses["seconds"],
            "warm_up_s": warm_up_s, **{f"part_{k}_s": v / breakdown_repeats for k, v in parts.items()}}


#: what the host-time proxy changes about a backbone: its width (so that the arithmetic all but vanishes), never its
#: depth, heads or tokens (which set how many ops a step dispatches)
HOST_PROXY_WIDTH = {"embed_dim": 48, "num_heads": 6}


def step_host_proxy(arch: str, *, repeats: int = 15, batch: int = 2, global_size: int = 32, local_size: int = 16,
                    n_local: int = 8) -> dict[str, float]:
    """The host's share of a step, measured on a CPU: the full SSL step and the backbone work with every width shrunk
    (``HOST_PROXY_WIDTH``, 256-wide heads, 32/16-px crops of 48-px images, batch 2, one thread), so that what remains
    of their time is
    what a launch-bound GPU step waits on, Python and dispatch per op; the same ops in the same order as the real
    step. Timed alternately (medians), with the full step's parts timed separately.

    A stand-in, not the GPU's host time: a GPU launch costs more than a CPU dispatch, and what arithmetic is left
    (the crops' blur, the tiny products) still runs here. It ranks changes to the host's work without a GPU.
    """
    from dinov3_eo.ssl.stage import make_views

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, optimizer, data = ssl_step_setup(
            arch, batch, global_size=global_size, local_size=local_size, n_local=n_local, image_size=global_size + 16,
            backbone_kwargs=HOST_PROXY_WIDTH, dino_out_dim=256, ibot_out_dim=256, dino_hidden_dim=256,
            ibot_hidden_dim=256)  # fmt: skip
        full_step, backbone_only = step_and_backbone_work(module, optimizer, data, global_size=global_size,
                                                          local_size=local_size)  # fmt: skip
        view_kwargs = _step_view_kwargs(module, global_size, local_size)
        for _ in range(3):
            full_step(), backbone_only()
        times: dict[str, list[float]] = {}

        def timed(name: str, fn: Callable[[], Any]) -> Any:
            start = time.perf_counter()
            out = fn()
            times.setdefault(name, []).append(time.perf_counter() - start)
            return out

        for _ in range(repeats):
            timed("full", full_step)
            timed("backbone", backbone_only)
        for _ in range(repeats):
            timed("views", lambda: make_views(data["image"], None, **view_kwargs))
            losses = timed("forward", lambda: module.compute_losses(data, step=10))
            timed("backward", lambda: losses["total"].backward())
            timed("clip", module.clip_gradients_per_module)
            timed("optimizer", lambda: (optimizer.step(), optimizer.zero_grad(set_to_none=True)))
            timed("ema", lambda: module._ema_update(0.996))
    finally:
        torch.set_num_threads(threads)
    ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    ms["forward"] -= ms["views"]  # compute_losses makes its own views
    print(f"[host] {arch} at {HOST_PROXY_WIDTH['embed_dim']} wide (host-time proxy, one CPU thread, {repeats} "
          f"alternating repeats): full SSL step {ms['full']:.1f} ms | backbone-only work {ms['backbone']:.1f} ms | "
          f"ratio {ms['full'] / ms['backbone']:.3f}x; the full step's parts: "
          + ", ".join(f"{name} {ms[name]:.2f} ms" for name in ("views", "forward", "backward", "clip", "optimizer", "ema")))
    return {f"{name}_ms": value for name, value in ms.items()} | {"ratio": ms["full"] / ms["backbone"]}


#: the two ways a fit's step values are logged that :func:`fits_logging_ab` compares: as shipped since session 20 (on
#: the logger's steps only) and every value at every step (before)
LOGGING_VARIANTS = ("logged_on_logger_steps", "every_value_every_step")


def fits_logging_ab(module_kwargs: dict, data: Any, *, device: str = "cpu", steps: int = 60, warm_up: int = 10,
                    rounds: int = 2, log_every_n_steps: int = 50) -> dict[str, list[float]]:
    """Lightning fits of ``DINOv3Pretrain(**module_kwargs)`` on ``data`` (an iterable of whole batches; a CSV logger
    writing every ``log_every_n_steps``, no progress bar) in each of :data:`LOGGING_VARIANTS`, alternated ``rounds``
    times: variant → each fit's mean seconds per step past ``warm_up`` steps, the device synchronized only at both
    ends (as a fit runs: the host may run ahead). bf16-mixed on CUDA, float32 elsewhere."""
    import tempfile

    import lightning.pytorch as pl

    from dinov3_eo.ssl.module import DINOv3Pretrain
    from dinov3_eo.ssl.stage import SSLStage

    cuda = device == "cuda"

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    class StepTimes(pl.Callback):
        def __init__(self) -> None:
            self.start = float("nan")
            self.seconds = float("nan")

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == warm_up:
                self.start = now()

        def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.seconds = (now() - self.start) / (trainer.global_step - warm_up)

    shipped = SSLStage._to_log
    times: dict[str, list[float]] = {name: [] for name in LOGGING_VARIANTS}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for name in times:
                    SSLStage._to_log = shipped if name == LOGGING_VARIANTS[0] else (lambda self, values: values)  # type: ignore[method-assign]
                    torch.manual_seed(0)
                    timer = StepTimes()
                    trainer = pl.Trainer(max_steps=steps, accelerator="gpu" if cuda else "cpu", devices=1,
                                         precision="bf16-mixed" if cuda else "32-true",
                                         logger=pl.loggers.CSVLogger(tmp), log_every_n_steps=log_every_n_steps,
                                         enable_checkpointing=False, enable_model_summary=False,
                                         enable_progress_bar=False, callbacks=[timer])  # fmt: skip
                    trainer.fit(DINOv3Pretrain(**module_kwargs),
                                train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
                    times[name].append(timer.seconds)
                    del trainer
                    if cuda:
                        torch.cuda.empty_cache()
    finally:
        SSLStage._to_log = shipped  # type: ignore[method-assign]
    return times


class RandomBatches(torch.utils.data.IterableDataset):
    """Endless batches ``{"image" [batch, 3, side, side], "valid" all True}`` of random pixels, made on the host."""

    def __init__(self, batch: int, side: int) -> None:
        super().__init__()
        self.batch, self.side = batch, side

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield {"image": torch.randn(self.batch, 3, self.side, self.side),
                   "valid": torch.ones(self.batch, self.side, self.side, dtype=torch.bool)}


def fit_host_proxy(arch: str, *, steps: int = 60, log_every_n_steps: int = 50, repeats: int = 2) -> dict[str, float]:
    """The host time a Lightning fit adds to each step, on the host-time proxy's model (:func:`step_host_proxy`,
    batches of 2 random 48-px images): the mean step of ``Trainer.fit`` past 10 warm-up steps in each of
    :data:`LOGGING_VARIANTS` (:func:`fits_logging_ab`; each ``self.log`` costs the host about a millisecond, and
    Lightning drops the values of steps its logger does not write), the fits alternated ``repeats`` times, against
    the raw step. One CPU thread."""
    kwargs = dict(backbone=arch, backbone_kwargs=HOST_PROXY_WIDTH, dino_out_dim=256, ibot_out_dim=256,
                  dino_hidden_dim=256, ibot_hidden_dim=256, global_crop_size=32, local_crop_size=16, n_local_crops=8,
                  logit_kernels="torch", preview_every_n_steps=0)  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = fits_logging_ab(kwargs, RandomBatches(2, 48), steps=steps, rounds=repeats,
                                log_every_n_steps=log_every_n_steps)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    raw = step_host_proxy(arch, repeats=15)["full_ms"]
    fit, every = (statistics.median(times[name]) * 1e3 for name in LOGGING_VARIANTS)
    print(f"[host] {arch} at {HOST_PROXY_WIDTH['embed_dim']} wide, a Lightning fit's step (logging every "
          f"{log_every_n_steps} steps): {fit:.1f} ms; with every value logged every step (until session 20) "
          f"{every:.1f} ms; the raw full step {raw:.1f} ms")
    return {"fit_ms": fit, "fit_every_value_logged_ms": every, "raw_ms": raw}


@contextlib.contextmanager
def python_gc_pauses() -> Iterator[dict[str, float]]:
    """Count Python's garbage collections inside the block and the seconds they take (``count``, ``oldest``: those of
    generation 2, ``seconds``), through ``gc.callbacks``: a pause of the host is time the device may sit idle."""
    import gc

    record = {"count": 0, "oldest": 0, "seconds": 0.0}
    started = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            record["count"] += 1
            record["oldest"] += info.get("generation") == 2
            record["seconds"] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    try:
        yield record
    finally:
        gc.callbacks.remove(callback)


# aten ops that only re-describe a tensor (no kernel on a GPU); everything else counts as one launch
_METADATA_OPS = {"view", "_unsafe_view", "as_strided", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
                 "select", "slice", "split", "split_with_sizes", "unbind", "alias", "detach", "_reshape_alias",
                 "lift_fresh"}


def step_op_counts(arch: str, batch: int, *, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                   **module_kwargs) -> dict[str, int]:
    """Aten ops dispatched by each part of one SSL step and by the backbone-only work, metadata ops left out.

    A proxy for GPU kernel launches where a step is launch-bound (ViT-S on an H100), measurable on a CPU. Note that
    the crops' random draws are CPU ops on a GPU too (cheap host work, no launch). Eager only: under the counting
    dispatch mode compiled regions run eagerly, so a compiled module would report the eager count.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    from dinov3_eo.ssl.stage import make_views

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            self.n += func.overloadpacket.__name__ not in _METADATA_OPS
            return func(*args, **(kwargs or {}))

    module, optimizer, data = ssl_step_setup(arch, batch, global_size=global_size, local_size=local_size,
                                             n_local=n_local, **module_kwargs)
    view_kwargs = _step_view_kwargs(module, global_size, local_size)
    crops, masking = make_views(data["image"], None, **view_kwargs)

    def forward_backward() -> None:
        module.compute_losses(data, step=10)["total"].backward()

    def optimizer_step() -> None:
        clip_and_step(module, optimizer)

    parts = {"views": lambda: make_views(data["image"], None, **view_kwargs), "forward+losses+backward": forward_backward,
             "clip+optimizer": optimizer_step, "ema": lambda: module._ema_update(0.996),
             "backbone_only": lambda: backbone_only_work(module, crops, masking)}
    for fn in parts.values():  # warm-up: lazy state (optimiser moments) is created outside the count
        fn()
    counts = {}
    for name, fn in parts.items():
        with _Count() as counter:
            fn()
        counts[name] = counter.n
    full = counts["forward+losses+backward"] + counts["clip+optimizer"] + counts["ema"]  # compute_losses makes the views
    print(f"[ops] {arch}, batch {batch}: full step {full:,} ops vs backbone-only {counts['backbone_only']:,} = "
          f"{full / counts['backbone_only']:.2f}x; " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    launches, copies = crops_device_ops(module, batch, global_size=global_size, local_size=local_size)
    print(f"[ops]   of the views' ops, {launches} run on the device (the rest are host-side random draws) and "
          f"{copies} copies go host-to-device, counted on meta tensors")
    return counts | {"full": full, "crops_device_ops": launches, "crops_host_to_device_copies": copies}


def _unique_tensors(tree) -> list[torch.Tensor]:  # noqa: ANN001
    """The distinct tensors among the leaves of ``tree`` (an op's arguments or outputs)."""
    return list({id(t): t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)}.values())


def step_traffic(arch: str, batch: int, *, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 top: int = 12, **module_kwargs) -> dict[str, float]:
    """Bytes every aten op of one bf16 step reads and writes (its tensors' sizes), full step vs backbone-only work.

    Where a GPU step is memory-bound (the elementwise passes over the [masked tokens, 65,536] logits, copies), its
    time follows these bytes more than its FLOPs; counted on the CPU under bf16 autocast, with no device. Prints the
    totals and the ``top`` ops the full step adds, by bytes.
    """
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Bytes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bytes: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name not in _METADATA_OPS:
                # every input is read once and every output written once: an in-place op reads and writes its
                # tensor (counted twice); an out= tensor is only written
                kwargs_in = {k: v for k, v in (kwargs or {}).items() if k != "out"}
                inputs, outputs = _unique_tensors((args, kwargs_in)), _unique_tensors(out)
                largest = max(inputs + outputs, key=torch.Tensor.numel, default=None)
                shape = tuple(largest.shape) if largest is not None and largest.numel() >= 2**20 else "small"
                self.bytes[(name, shape)] += sum(t.numel() * t.element_size() for t in inputs + outputs)
            return out

    module, optimizer, data = ssl_step_setup(arch, batch, global_size=global_size, local_size=local_size,
                                             n_local=n_local, **module_kwargs)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    full_step, backbone_only = step_and_backbone_work(module, optimizer, data, global_size=global_size,
                                                      local_size=local_size, autocast=autocast)
    full_step(), backbone_only()  # warm-up: optimiser state
    counted = {}
    for name, fn in (("full", full_step), ("backbone", backbone_only)):
        with _Bytes() as counter:
            fn()
        counted[name] = counter.bytes
    totals = {name: sum(c.values()) / 2**30 for name, c in counted.items()}
    print(f"[bytes] {arch}, batch {batch}, bf16: full step {totals['full']:.2f} GiB vs backbone-only "
          f"{totals['backbone']:.2f} GiB read + written = {totals['full'] / totals['backbone']:.2f}x; largest additions:")
    extra = counted["full"].copy()
    extra.subtract(counted["backbone"])
    for (name, shape), value in extra.most_common(top):
        print(f"[bytes]   {value / 2**20:8.1f} MiB  {name} {shape}")
    return {f"{name}_gib": value for name, value in totals.items()}


def crops_device_ops(module, batch: int, *, global_size: int, local_size: int) -> tuple[int, int]:  # noqa: ANN001
    """Kernels the crops of one batch launch on a device, and their host-to-device copies, without a device: the
    crops run on meta tensors (shapes, no data), and every op that touches one counts as a launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from dinov3_eo.ssl.crops import MultiCrop

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.launches = self.copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN202
            out = func(*args, **(kwargs or {}))
            outs = out if isinstance(out, (tuple, list)) else [out]
            tensors = [t for t in [*args, *(kwargs or {}).values(), *outs] if isinstance(t, torch.Tensor)]
            if func.overloadpacket.__name__ not in _METADATA_OPS and any(t.device.type == "meta" for t in tensors):
                self.launches += 1
                self.copies += any(t.device.type == "cpu" for t in args if isinstance(t, torch.Tensor))
            return out

    side = max(256, global_size)
    crop = MultiCrop(global_size=global_size, local_size=local_size, **module._crop_kwargs)
    images = torch.empty(batch, 3, side, side, device="meta")
    crop(images, generator=torch.Generator().manual_seed(0))  # warm-up
    with _Count() as counter:
        crop(images, generator=torch.Generator().manual_seed(1))
    return counter.launches, counter.copies


def _eurosat_split(per_class_train: int) -> tuple[list[str], list[int], list[str], list[int], list[str]]:
    root = SHARED / "eurosat_rgb_dev"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    train, train_y, test, test_y = [], [], [], []
    for label, name in enumerate(classes):
        files = sorted(root.glob(f"{name}/*.jpg"), key=lambda p: int(p.stem.split("_")[-1]))
        for i, f in enumerate(files):
            (train if i < per_class_train else test).append(str(f))
            (train_y if i < per_class_train else test_y).append(label)
    return train, train_y, test, test_y, classes


def _load_chips(paths: list[str]) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])  # [N, 64, 64, 3] uint8


def knn_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int = 20,
                 cosine: bool = True) -> float:
    """k-NN accuracy; cosine similarity with DINO's exp(s/0.07) vote weights, or Euclidean majority vote."""
    a, b = torch.from_numpy(train_x).float(), torch.from_numpy(test_x).float()
    if cosine:
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        sim = b @ a.T
        vals, idx = sim.topk(k, dim=1)
        weights = (vals / 0.07).exp()
    else:
        dist = torch.cdist(b, a)
        vals, idx = dist.topk(k, dim=1, largest=False)
        weights = torch.ones_like(vals)
    labels = torch.from_numpy(train_y)[idx]
    n_classes = int(train_y.max()) + 1
    votes = torch.zeros(len(b), n_classes).scatter_add_(1, labels, weights)
    return float((votes.argmax(1).numpy() == test_y).mean())


def colour_features(chips: np.ndarray) -> np.ndarray:
    feats = [chips.mean(axis=(1, 2)), chips.std(axis=(1, 2))]
    for c in range(3):
        hist = np.stack([np.histogram(x[..., c], bins=8, range=(0, 256))[0] for x in chips]) / (64 * 64)
        feats.append(hist)
    x = np.concatenate(feats, axis=1)
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


@torch.no_grad()
def backbone_features(backbone: torch.nn.Module, chips: np.ndarray, *, size: int | None = None) -> np.ndarray:
    """Normed CLS features [N, D] of ``chips`` [N, H, W, 3] uint8 (SAT-493M preset), resized to ``size`` if given."""
    from dinov3_eo.data.normalization import Normalization

    norm = Normalization.preset("sat493m")
    backbone.eval()
    device = next(backbone.parameters()).device
    out = []
    for i in range(0, len(chips), 64):
        x = norm(torch.from_numpy(chips[i : i + 64]).to(device).permute(0, 3, 1, 2).float())
        if size is not None and size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(backbone(x).float().cpu().numpy())
    return np.concatenate(out)


def learning_check(arch: str, minutes: float, export: str | None, batch: int, steps: int | None = None, *,
                   global_size: int = 64, local_size: int = 32, recipe: dict | None = None,
                   precision: str = "32-true", knn_sizes: list[int] | None = None) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from dinov3_eo.data.datamodule import PretrainDataModule
    from dinov3_eo.models.hub import build_backbone, export_backbone
    from dinov3_eo.ssl.module import DINOv3Pretrain

    train, train_y, test, test_y, classes = _eurosat_split(per_class_train=140)
    landsat = sorted(glob.glob(str(SHARED / "landsat8_l1" / "*_RT.TIF")))
    datamodule = PretrainDataModule(
        paths=landsat or None, chips=train, nodata=0, normalization="percentile", tile_size=64,
        tiles_per_epoch=batch * 50, batch_size=batch, num_workers=2, cache_dir=None,
    )
    # a fixed step count gets the v1 recipe's cosine schedules (lr, wd 0.04 -> 0.4, momentum 0.994 -> 1);
    # a wall-clock budget alone gets constant ones
    schedules = (
        dict(lr_schedule="cosine", lr_warmup_steps=max(steps // 10, 1), teacher_temp_warmup_steps=max(steps // 4, 1),
             momentum_teacher=0.994, final_momentum_teacher=1.0)
        if steps else
        dict(lr_schedule="constant", lr_warmup_steps=30, weight_decay_end=0.04, teacher_temp_warmup_steps=100,
             momentum_teacher=0.994, final_momentum_teacher=0.994)
    )  # fmt: skip
    model_kwargs = dict(
        backbone=arch, dino_out_dim=4096, dino_hidden_dim=512, dino_bottleneck_dim=128, ibot_out_dim=4096,
        ibot_hidden_dim=512, ibot_bottleneck_dim=128, global_crop_size=global_size, local_crop_size=local_size,
        n_local_crops=4, base_lr=5e-4, scale_lr_with_batch=False, layerwise_decay=1.0,
    ) | SHORT_RUN | schedules | (recipe or {})
    module = DINOv3Pretrain(**model_kwargs)

    class _Budget(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN002
            if time.perf_counter() - start > minutes * 60:
                trainer.should_stop = True

    start = time.perf_counter()
    trainer = L.Trainer(max_steps=steps or 100_000, accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False,
                        callbacks=[_Budget()], enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(module, datamodule=datamodule)
    steps, elapsed = trainer.global_step, time.perf_counter() - start

    train_chips, test_chips = _load_chips(train), _load_chips(test)
    ytr, yte = np.array(train_y), np.array(test_y)
    learned = module.teacher["backbone"]
    # chips are resized to the global-crop size the backbone was trained at
    acc_learned = knn_accuracy(backbone_features(learned, train_chips, size=global_size), ytr,
                               backbone_features(learned, test_chips, size=global_size), yte)
    torch.manual_seed(0)
    # the trained architecture and initialisation
    random_backbone = build_backbone(arch, **model_kwargs["backbone_kwargs"])
    acc_random = knn_accuracy(backbone_features(random_backbone, train_chips, size=global_size), ytr,
                              backbone_features(random_backbone, test_chips, size=global_size), yte)
    acc_colour = knn_accuracy(colour_features(train_chips), ytr, colour_features(test_chips), yte, cosine=False)
    print(f"[learn] {arch}: {steps} steps in {elapsed / 60:.1f} min (batch {batch}, 64-px tiles/chips, "
          f"{global_size}/{local_size}-px global/local crops, CPU, {precision})")
    print(f"[learn] EuroSAT k-NN (k=20), {len(train)} train / {len(test)} test chips, {len(classes)} classes, chance "
          f"{1 / len(classes):.3f}:")
    print(f"[learn]   pretrained {acc_learned:.3f} | random weights {acc_random:.3f} | colour histograms {acc_colour:.3f}")
    for size in [s for s in knn_sizes or [] if s != global_size]:  # the same chips upsampled: more patch tokens
        accs = [knn_accuracy(backbone_features(m, train_chips, size=size), ytr, backbone_features(m, test_chips, size=size),
                             yte) for m in (learned, random_backbone)]  # fmt: skip
        print(f"[learn]   at {size} px: pretrained {accs[0]:.3f} | random weights {accs[1]:.3f} | colour histograms "
              f"{acc_colour:.3f}")
    if export:
        meta = module.backbone_meta()
        export_backbone(learned, export, meta=meta)
        print(f"[learn] teacher backbone exported to {export}.pth/.safetensors/.json")


def main() -> None:
    retain_freed_memory()  # as the dinov3-eo command does, before any large tensor
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vitt16")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the learning check")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=None, help="fixed step count with cosine schedules (budget still caps)")
    parser.add_argument("--global-size", type=int, default=64, help="global crop side (k-NN features at this size)")
    parser.add_argument("--local-size", type=int, default=32, help="local crop side")
    parser.add_argument("--recipe", type=json.loads, default=None,
                        help="DINOv3Pretrain arguments over the check's own and SHORT_RUN, as JSON, e.g. "
                        "'{\"dino_out_dim\": 1024, \"augmentation\": {\"brightness\": 0.1}}'")
    parser.add_argument("--precision", default="32-true",
                        help="Lightning precision of the learning check: 32-true, or bf16-mixed on a CPU with bf16 "
                        "instructions (AVX512-BF16/AMX: ~2x the steps in the same minutes)")
    parser.add_argument("--knn-sizes", type=int, nargs="*", default=[128, 224],
                        help="also run the k-NN with the chips upsampled to these sides (a 64-px chip is 4x4 tokens at "
                        "patch 16; ViT evaluations of EuroSAT resize to 224); give none to skip")
    parser.add_argument("--export", default=None, help="export prefix for the pretrained teacher backbone")
    parser.add_argument("--step-repeats", type=int, default=3, help="alternating repeats of the step-overhead check")
    parser.add_argument("--step-batch", type=int, nargs="+", default=[16, 4],
                        help="batch sizes of the step-overhead check (16: the official 7B recipe's images per GPU, the "
                        "smallest per-device batch of any official recipe; 4: a CPU-sized batch where the per-step "
                        "optimiser and EMA work over the 65,536-prototype heads weigh more)")
    parser.add_argument("--step-arch", nargs="+", default=["vits16"],
                        help="backbones of the step-overhead check (the heads are the same size for all, so their "
                        "share falls as the backbone grows)")
    parser.add_argument("--op-counts", action="store_true",
                        help="also count the aten ops of each part of the step (a proxy for GPU kernel launches)")
    parser.add_argument("--host-proxy", action="store_true",
                        help="also time each --step-arch's step with every width shrunk, on one CPU thread: the host's "
                        "work per step, which a launch-bound GPU step waits on (Python and dispatch per op)")
    parser.add_argument("--traffic", action="store_true",
                        help="also count the bytes every op of a bf16 step reads and writes (memory traffic, GPU-style)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the step with every block and head compiled (model.compile: true)")
    parser.add_argument("--compile-losses", action="store_true",
                        help="also time the step with the two logit losses compiled alone (model.compile: losses)")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-learning", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.host_proxy:
        for arch in args.step_arch:
            step_host_proxy(arch)
            fit_host_proxy(arch)
    if not args.skip_step:
        for arch in args.step_arch:
            for batch in args.step_batch:
                eager = step_overhead(arch, batch=batch, repeats=args.step_repeats)
                for mode in [True] * args.compile + ["losses"] * args.compile_losses:
                    compiled = step_overhead(arch, batch=batch, repeats=args.step_repeats, compile=mode)
                    print(f"[step]   {step_variant(mode)} vs eager: full step "
                          f"{compiled['full_s'] / eager['full_s']:.3f}x, backbone-only work "
                          f"{compiled['backbone_s'] / eager['backbone_s']:.3f}x the time")
                if args.op_counts:
                    step_op_counts(arch, batch)
                if args.traffic:
                    step_traffic(arch, batch)
    if not args.skip_learning:
        if not (SHARED / "eurosat_rgb_dev").exists():
            raise SystemExit(f"The learning check needs {SHARED}/eurosat_rgb_dev (../shared/data).")
        learning_check(args.arch, args.minutes, args.export, args.batch, args.steps, global_size=args.global_size,
                       local_size=args.local_size, recipe=args.recipe, precision=args.precision,
                       knn_sizes=args.knn_sizes)


if __name__ == "__main__":
    main()
