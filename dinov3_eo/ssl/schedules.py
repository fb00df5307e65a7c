"""Training schedules, optimiser parameter groups and gradient clipping for DINOv3 pretraining.

Schedules are pure functions of the 0-based optimiser step, so resuming at step ``s`` reproduces the values
exactly without any scheduler state. Their values equal the official numpy arrays indexed at ``s``
(``CosineScheduler`` for the v1 recipes, ``linear_warmup_cosine_decay`` for the v2/7B recipes); past the end
every schedule holds its final value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from dinov3_eo.ssl.distributed import all_reduce_sum, is_dist


def cosine_schedule(
    step: int,
    *,
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    start_warmup: float = 0.0,
    freeze_steps: int = 0,
) -> float:
    """v1 schedule (official ``CosineScheduler``): ``freeze_steps`` zeros, linear warm-up, then cosine.

    - ``step < freeze``: 0;
    - warm-up ``i = step − freeze < warmup``: ``start_warmup + (base − start_warmup)·i/(warmup − 1)``
      (``np.linspace`` with its end point, so the last warm-up step already equals ``base``);
    - then ``j = step − freeze − warmup`` of ``n = total − freeze − warmup``: ``final + (base−final)·(1+cos(πj/n))/2``;
    - ``step ≥ total_steps``: ``final``.

    Used for the lr/wd/momentum of the v1 recipes, and with ``base = final`` for the teacher-temperature warm-up.

    Raises:
        ValueError: if the phases do not fit into ``total_steps``.
    """
    if min(warmup_steps, freeze_steps) < 0 or warmup_steps + freeze_steps > total_steps:
        raise ValueError(
            f"cosine_schedule: warmup_steps ({warmup_steps}) + freeze_steps ({freeze_steps}) must be >= 0 and fit in "
            f"total_steps ({total_steps})."
        )
    if step >= total_steps:
        return float(final)
    if step < freeze_steps:
        return 0.0
    i = step - freeze_steps
    if i < warmup_steps:
        if warmup_steps == 1:
            return float(start_warmup)
        return float(start_warmup + (base - start_warmup) * i / (warmup_steps - 1))
    j = i - warmup_steps
    n = total_steps - freeze_steps - warmup_steps
    return float(final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * j / n)))


def linear_warmup_cosine_decay(
    step: int,
    *,
    start: float,
    peak: float,
    end: float,
    warmup_iterations: int,
    total_iterations: int,
    cosine_iterations: int | None = None,
) -> float:
    """v2 schedule (official ``linear_warmup_cosine_decay``): linear start→peak, cosine peak→end, then constant end.

    - ``step < warmup``: ``start + (peak − start)·step/warmup`` (``np.linspace(..., endpoint=False)``);
    - ``j = step − warmup < c`` (``c = cosine_iterations``, default ``total − warmup``):
      ``end + (peak − end)·(1 + cos(π·j/(c − 1)))/2`` (the cosine reaches ``end`` on its last step);
    - afterwards (and past ``total_iterations``): ``end``.

    The 7B recipes: pretrain lr (0, peak, peak) = warm-up then constant; Gram weight (0, 0, 2.0) with
    warm-up 1M and cosine 1000 = a cosine ramp 0 → 2 after 1M steps; high-res lr (0, 0, end) with cosine 10k.

    Raises:
        ValueError: if the phases do not fit into ``total_iterations``.
    """
    cosine = total_iterations - warmup_iterations if cosine_iterations is None else cosine_iterations
    if min(warmup_iterations, cosine) < 0 or warmup_iterations + cosine > total_iterations:
        raise ValueError(
            f"linear_warmup_cosine_decay: warmup_iterations ({warmup_iterations}) + cosine_iterations ({cosine}) "
            f"must be >= 0 and fit in total_iterations ({total_iterations})."
        )
    if step < warmup_iterations:
        return float(start + (peak - start) * step / warmup_iterations)
    j = step - warmup_iterations
    if j >= cosine:
        return float(end)
    if cosine == 1:
        return float(peak)
    return float(end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * j / (cosine - 1))))


def warmup_constant(step: int, *, peak: float, warmup_steps: int, start: float = 0.0) -> float:
    """Linear warm-up ``start → peak`` over ``warmup_steps`` (end point excluded), then constant ``peak``.

    The constant-after-warm-up schedule of the 7B recipe (= ``linear_warmup_cosine_decay`` with ``end = peak``).
    """
    if step < warmup_steps:
        return float(start + (peak - start) * step / warmup_steps)
    return float(peak)


def teacher_temperature(step: int, *, warmup_steps: int, start: float = 0.04, final: float = 0.07) -> float:
    """Teacher temperature: linear ``start → final`` over ``warmup_steps`` (end point included), then ``final``.

    Official: 0.04 → 0.07 over 30 epochs (v1) or 100k steps (7B); constant 0.07 for high-res and distillation.
    """
    if warmup_steps <= 0:
        return float(final)
    return cosine_schedule(step, base=final, final=final, total_steps=warmup_steps, warmup_steps=warmup_steps,
                           start_warmup=start)


def teacher_momentum(step: int, *, total_steps: int, base: float = 0.992, final: float = 1.0) -> float:
    """EMA momentum: cosine ``base → final`` over ``total_steps`` (v1); pass ``base = final`` for a constant."""
    return cosine_schedule(step, base=base, final=final, total_steps=total_steps)


def last_layer_lr(step: int, lr: float, *, freeze_steps: int) -> float:
    """Learning rate of the heads' prototype layers: 0 while ``step < freeze_steps``, else ``lr``."""
    return 0.0 if step < freeze_steps else float(lr)


def scale_lr_sqrt_wrt_1024(base_lr: float, global_batch_size: int) -> float:
    """Official ``sqrt_wrt_1024`` scaling: ``lr = base · 4 · sqrt(global_batch / 1024)``.

    E.g. base 1e-3 at batch 2048 → 5.66e-3; base 5e-5 at 4096 → 4e-4.

    Raises:
        ValueError: if ``global_batch_size`` is not positive.
    """
    if global_batch_size < 1:
        raise ValueError(f"scale_lr_sqrt_wrt_1024: global_batch_size must be >= 1, got {global_batch_size}.")
    return float(base_lr * 4.0 * math.sqrt(global_batch_size / 1024.0))


def gram_teacher_refresh_due(step: int, *, first_update: int, frequency: int, max_updates: int) -> bool:
    """Whether the Gram teacher is replaced by the EMA teacher after optimiser step ``step`` (official ``rep_update``).

    Due when ``step + 1 ≥ first_update``, ``(step + 1) % frequency == 0`` and fewer than ``max_updates`` refreshes
    happened before (counted from the schedule itself, so it is resume-safe). 7B Gram recipe: first 1,010,000,
    frequency 10,000, max 3 → after steps 1,009,999, 1,019,999 and 1,029,999.

    Raises:
        ValueError: if ``frequency < 1``.
    """
    if frequency < 1:
        raise ValueError(f"gram_teacher_refresh_due: frequency must be >= 1, got {frequency}.")
    done = step + 1
    if done < first_update or done % frequency:
        return False
    lower = max(first_update, 1)
    earlier = (done - 1) // frequency - (lower - 1) // frequency  # multiples of frequency in [lower, done)
    return earlier < max_updates


# --------------------------------------------------------------------------------------------- parameter groups

_LAYER0_PREFIXES = ("patch_embed", "cls_token", "storage_tokens", "register_tokens", "mask_token", "pos_embed")


def backbone_layer_id(name: str, n_blocks: int) -> int:
    """Layer index of a backbone parameter for layer-wise lr decay (official ``get_vit_lr_decay_rate``).

    0 for the patch embedding and the cls/storage/mask tokens; ``i + 1`` for ``blocks.i.*``; ``n_blocks + 1``
    for everything else (final ``norm``, ``local_cls_norm``).

    Args:
        name: parameter name relative to the backbone (``blocks.3.attn.qkv.weight``).
        n_blocks: number of transformer blocks.
    """
    if name.startswith(_LAYER0_PREFIXES):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return n_blocks + 1


def no_weight_decay(name: str) -> bool:
    """Official rule: no weight decay for biases, norms and LayerScale gammas (tokens keep weight decay)."""
    return name.endswith("bias") or "norm" in name or "gamma" in name


def build_param_groups(
    model: nn.Module,
    *,
    n_blocks: int,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    backbone_prefix: str = "backbone.",
) -> list[dict]:
    """AdamW parameter groups with lr/wd multipliers, fused by (lr multiplier, wd multiplier, last layer).

    Per parameter: ``lr_multiplier = layerwise_decay ** (n_blocks + 1 − layer_id)`` (``backbone_layer_id``) for
    backbone parameters, 1 for the heads; × ``patch_embed_lr_mult`` for ``patch_embed``;
    ``wd_multiplier = 0`` where :func:`no_weight_decay`, else 1; ``is_last_layer`` for the heads' prototype
    layers (``last_layer``), whose lr follows :func:`last_layer_lr`. Frozen parameters are skipped.
    Apply a step's values with :func:`apply_optimizer_schedules`.

    Args:
        model: the student (e.g. a ``ModuleDict`` with ``backbone``, ``dino_head``, ``ibot_head``), or a bare backbone.
        n_blocks: number of backbone blocks.
        layerwise_decay: 0.9 default, 0.98 for 7B, 0.99 distillation, 1.0 to disable.
        patch_embed_lr_mult: extra multiplier for the patch embedding (0.2).
        backbone_prefix: prefix of backbone parameter names in ``model`` (``""`` when ``model`` is the backbone).

    Returns:
        Groups ``{"params", "lr_multiplier", "wd_multiplier", "is_last_layer", "names"}`` for ``torch.optim.AdamW``.
    """
    groups: dict[tuple[float, float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_backbone = name.startswith(backbone_prefix)
        local_name = name[len(backbone_prefix) :] if is_backbone else name
        if is_backbone:
            lr_mult = layerwise_decay ** (n_blocks + 1 - backbone_layer_id(local_name, n_blocks))
            if local_name.startswith("patch_embed"):
                lr_mult *= patch_embed_lr_mult
        else:
            lr_mult = 1.0
        wd_mult = 0.0 if no_weight_decay(local_name) else 1.0
        is_last = "last_layer" in name
        key = (lr_mult, wd_mult, is_last)
        group = groups.setdefault(
            key, {"params": [], "names": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": is_last}
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def apply_optimizer_schedules(
    optimizer: torch.optim.Optimizer, *, lr: float, weight_decay: float, last_layer_lr: float
) -> None:
    """Set every group's ``lr`` and ``weight_decay`` from this step's schedule values and its multipliers."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_multiplier", 1.0)


def clip_grad_norm_per_module(
    modules: nn.ModuleDict | Mapping[str, nn.Module | Sequence[Tensor]] | Iterable[tuple[str, nn.Module]],
    max_norm: float,
    *,
    sharded: bool = False,
) -> dict[str, Tensor]:
    """Clip each sub-module's gradients separately (official: backbone, dino_head, ibot_head at 3.0; 7B 30.0).

    Args:
        modules: the student ``ModuleDict``, a name → module (or → its parameters, listed once) mapping, or
            (name, module) pairs.
        max_norm: maximum total L2 norm per module.
        sharded: each process holds a disjoint shard of every gradient (FSDP with ``use_orig_params``, Lightning's
            ``FSDPStrategy``): the norms are then of the whole gradients, the shards' squared norms summed over the
            processes in one all-reduce (every process must pass the same module names), so every shard is scaled
            by the same factor. A local norm would clip each shard by its own.

    Returns:
        name → total gradient norm before clipping (for logging).
    """
    items = list(modules.items() if isinstance(modules, (Mapping, nn.ModuleDict)) else modules)
    with_grad = {name: [p for p in (module.parameters() if isinstance(module, nn.Module) else module)
                        if p.grad is not None] for name, module in items}  # fmt: skip
    if not sharded or not is_dist():
        return {name: torch.nn.utils.clip_grad_norm_(params, max_norm) for name, params in with_grad.items() if params}
    device = next((p.grad.device for params in with_grad.values() for p in params), torch.device("cpu"))
    # a process may hold no shard of a module: it still adds its zero to the sum
    local = torch.stack([torch.nn.utils.get_total_norm([p.grad for p in params]).to(device, torch.float32) ** 2
                         if params else torch.zeros((), device=device) for params in with_grad.values()])  # fmt: skip
    totals = all_reduce_sum(local).sqrt()
    norms = dict(zip(with_grad, totals.unbind()))
    for name, params in with_grad.items():
        if params:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[name])
    return norms
