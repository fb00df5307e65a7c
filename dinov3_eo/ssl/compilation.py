"""Regional ``torch.compile`` for the SSL stages: every transformer block and projection head, and the logit losses.

The official recipe compiles the model block by block (``train.compile``) rather than as one graph. We do the same:
the blocks of a ViT share one compiled graph (PyTorch ≥ 2.5 inlines ``nn.Module`` instances, so the 12-40 blocks of a
backbone compile once per input shape, not once each), compilation stays short, and the rest of a step (multi-crop,
masking, the small DINO and KoLeo terms) need not be traceable. ``nn.Module.compile`` compiles in place:
state-dict keys, checkpoints and exports are unchanged.

Compilation must come after every ``copy.deepcopy`` of a module (the EMA teacher, the Gram teacher snapshot): a copy
of a compiled module would keep calling the original's forward.

The two losses over the iBOT head's [masked tokens, 65,536] logits, Sinkhorn–Knopp and the iBOT cross-entropy, compile
too (:func:`compile_logit_losses`), with dynamic shapes: their passes over those logits are most of the memory traffic
a step adds to the backbone's (``bench_pretrain.py --traffic``), and fused they run 2.5x (Sinkhorn) and 6x (iBOT
forward and backward) faster on a CPU. Their token count changes every step, the temperature through its warm-up
(floats are not specialised), and neither recompiles.

``model.compile: losses`` compiles the two logit losses alone and leaves the blocks and heads eager: the fusion of
memory-bound passes over [tokens, 65,536] is where compilation clearly pays, while the blocks' compiled kernels
ran from 0.83x to 1.07x the eager time on an H100 (and compile for ~30 s per crop size).

Blocks compile with static shapes (``dynamic=False``): a step feeds them a few fixed token counts (global crops,
local crops, the teacher's eval-mode pass), each of which gets its own graph. With torch's default (a shape-generic
graph from the second token count on) the ViT-S backbone work ran 1.37x slower than eager on an H100 (bf16, batch
64); with static shapes at 0.83-1.07x the eager time (README, "Measured"). The heads keep torch's default: their
input is the masked patch tokens, whose number changes with every step's masks.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dinov3_eo.losses.dino import DinoLossTerms, dino_losses_fused, dino_losses_stacked
from dinov3_eo.losses.ibot import ibot_loss
from dinov3_eo.losses.sinkhorn import sinkhorn_assignments, sinkhorn_knopp
from dinov3_eo.models.heads import DINOHead
from dinov3_eo.models.vit import Block

__all__ = [
    "COMPILE_MODES",
    "CompileMode",
    "LOGIT_KERNELS",
    "LogitLosses",
    "check_compile_mode",
    "check_compile_toolchain",
    "check_logit_kernels",
    "compile_logit_losses",
    "compile_regions",
    "is_compiled",
    "logit_losses_for",
    "resolve_logit_kernels",
]

#: the values of the stages' ``compile`` argument: off, every block and head and the logit losses, the losses alone
CompileMode = bool | Literal["losses"]
COMPILE_MODES: tuple[CompileMode, ...] = (False, True, "losses")

#: module types compiled by :func:`compile_regions`
COMPILED_TYPES: tuple[type[nn.Module], ...] = (Block, DINOHead)

#: graphs a statically compiled block may hold (torch's default is 8), see :func:`compile_regions`
BLOCK_RECOMPILE_LIMIT = 64


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module.compile()`` has been called on this module."""
    return getattr(module, "_compiled_call_impl", None) is not None


def check_compile_mode(mode: Any) -> CompileMode:
    """``mode`` if it is one of :data:`COMPILE_MODES`.

    Raises:
        ValueError: naming the accepted values.
    """
    if not any(mode is value or (isinstance(mode, str) and mode == value) for value in COMPILE_MODES):
        raise ValueError(f"compile must be false, true (every block and head, and the logit losses) or 'losses' "
                         f"(the two logit losses alone), got {mode!r}.")
    return mode


def check_compile_toolchain(device: torch.device | str) -> None:
    """Raise a clear error where ``torch.compile``'s default backend cannot build kernels for ``device``.

    Inductor writes C++ kernels on a CPU (needs a C++ compiler) and Triton kernels on a GPU (needs ``triton``);
    without them the failure would come at the first step, from deep inside torch.

    Raises:
        RuntimeError: naming what is missing and how to turn compilation off.
    """
    kind = torch.device(device).type
    if kind == "cpu" and not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        raise RuntimeError(
            "model.compile=true on a CPU needs a C++ compiler (c++, g++ or clang++ on PATH) for torch.compile's "
            "kernels; install one or set model.compile false."
        )
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            "model.compile=true on a GPU needs the 'triton' package for torch.compile's kernels; install it "
            "(pip install triton) or set model.compile false."
        )


def compile_regions(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile, in place, every transformer :class:`~dinov3_eo.models.vit.Block` and :class:`DINOHead` in ``model``.

    Args:
        model: any module tree (a Lightning module, a backbone, a ``ModuleDict`` of backbone and heads).
        compile_kwargs: passed to ``torch.compile`` (``mode``, ``dynamic``, ``backend``, ...). Blocks default to
            ``dynamic=False`` (one graph per token count, see the module docstring), heads to torch's default.

    Returns:
        The number of modules newly compiled (already compiled ones are left as they are, so calling this twice,
        e.g. when ``fit`` runs again, compiles nothing new).
    """
    count = 0
    block_kwargs = {"dynamic": False, **compile_kwargs}
    for module in model.modules():
        if isinstance(module, COMPILED_TYPES) and not is_compiled(module):
            module.compile(**(block_kwargs if isinstance(module, Block) else compile_kwargs))
            count += 1
    if count and block_kwargs["dynamic"] is False:
        # one graph per token count and train/eval mode: multi-resolution stages and several students of different
        # widths need more than torch's default 8 graphs per compiled function before it falls back to eager
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, BLOCK_RECOMPILE_LIMIT)
    return count


@dataclass(frozen=True)
class LogitLosses:
    """The functions an SSL step runs over the heads' [tokens, K] logits: eager by default, see
    :func:`compile_logit_losses` and :func:`logit_losses_for`."""

    #: the teacher's DINO targets (and the iBOT ones unless ``ibot_targets`` differs)
    sinkhorn_knopp: Callable[..., Any] = sinkhorn_knopp
    ibot_loss: Callable[..., torch.Tensor] = ibot_loss
    #: the teacher's iBOT targets: ``sinkhorn_knopp``'s probabilities, or the factorised
    #: :class:`~dinov3_eo.losses.sinkhorn.SinkhornAssignments` that ``ibot_loss`` reads with Triton kernels
    ibot_targets: Callable[..., Any] = sinkhorn_knopp
    #: the DINO terms from the student's stacked crop logits (torch ops, or one Triton cross-entropy)
    dino_losses: Callable[..., DinoLossTerms] = dino_losses_stacked


def compile_logit_losses(**compile_kwargs: Any) -> LogitLosses:
    """:func:`~dinov3_eo.losses.sinkhorn.sinkhorn_knopp` and :func:`~dinov3_eo.losses.ibot.ibot_loss` compiled with
    dynamic shapes (``compile_kwargs`` go to ``torch.compile`` and win), see the module docstring."""
    kwargs = {"dynamic": True, **compile_kwargs}
    compiled_sinkhorn = torch.compile(sinkhorn_knopp, **kwargs)
    return LogitLosses(compiled_sinkhorn, torch.compile(ibot_loss, **kwargs), compiled_sinkhorn, dino_losses_stacked)


#: the values of the stages' ``logit_kernels`` argument: how the iBOT and DINO terms over the heads' logits run
LOGIT_KERNELS: tuple[str, ...] = ("auto", "torch", "triton")


def check_logit_kernels(kernels: Any) -> str:
    """``kernels`` if it is one of :data:`LOGIT_KERNELS`.

    Raises:
        ValueError: naming the accepted values.
    """
    if kernels not in LOGIT_KERNELS:
        raise ValueError(f"logit_kernels must be 'auto' (triton on a CUDA device where triton imports, else torch), "
                         f"'torch' (eager or compiled torch ops) or 'triton' (fused kernels of the iBOT and DINO "
                         f"terms; CUDA only), got {kernels!r}.")
    return kernels


def resolve_logit_kernels(kernels: str, device: torch.device | str) -> str:
    """``"torch"`` or ``"triton"``: what ``kernels`` (:data:`LOGIT_KERNELS`) runs on ``device``. ``"auto"`` takes the
    Triton kernels on a CUDA device where triton imports (2.4x faster than the compiled torch path and 8x less memory
    on an H100, README), torch ops anywhere else, the CPU included (where triton only runs in its interpreter)."""
    from dinov3_eo.losses.logit_kernels import triton_available

    if check_logit_kernels(kernels) != "auto":
        return kernels
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "torch"


def logit_losses_for(*, compile: bool, kernels: str, device: torch.device | str) -> LogitLosses:
    """The logit losses a stage runs with its ``compile`` and ``logit_kernels`` settings on ``device``.

    ``kernels="triton"``: the iBOT targets stay factorised (:func:`~dinov3_eo.losses.sinkhorn.sinkhorn_assignments`)
    and :func:`~dinov3_eo.losses.ibot.ibot_loss` reads them with the kernels of
    :mod:`~dinov3_eo.losses.logit_kernels`, and the DINO terms are one of those cross-entropies over every crop
    (:func:`~dinov3_eo.losses.dino.dino_losses_fused`), eager (they are fused already); the DINO targets ([2B, K],
    small) keep ``sinkhorn_knopp``, compiled with ``compile``.

    Raises:
        RuntimeError: ``triton`` without the triton package. ValueError: ``triton`` on a device it cannot run on.
    """
    from dinov3_eo.losses.logit_kernels import check_kernels_can_run

    base = compile_logit_losses() if compile else LogitLosses()
    if resolve_logit_kernels(kernels, device) == "torch":
        return base
    check_kernels_can_run(torch.device(device))
    return LogitLosses(base.sinkhorn_knopp, ibot_loss, sinkhorn_assignments, dino_losses_fused)
