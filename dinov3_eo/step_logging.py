"""Training-step values that reach the loggers and the progress bar without stalling a GPU.

Lightning reads a logged device tensor back to the host (a sync) wherever it shows or writes it: the progress bar
at every batch end, a logger at each flush. A step's loss logged as a GPU tensor therefore stops the host until the
device has finished that step's forward pass, and the next launches start from an empty queue. Here the values are
queued to the host behind the forward pass (:class:`LossReadback`) and logged as CPU numbers once the backward is
queued (:class:`LogsAfterBackward`), where waiting for them costs the device nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from dinov3_eo.ssl.distributed import all_reduce_sum, world_size

__all__ = ["LogsAfterBackward", "LossReadback", "micro_batch_mean"]


def micro_batch_mean(values: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """name -> the mean of its values over the micro-batches of one accumulated optimiser step (each a mapping of the
    same names to 0-d tensors), as the step's logged value."""
    return {name: sum(v[name] for v in values) / len(values) for name in values[0]}


class LossReadback:
    """A step's named loss values on their way to the host, for the non-finite guard and the loggers.

    On CUDA the copy is queued behind the losses (into pinned memory, non-blocking) and :meth:`values` waits for that
    copy alone: a caller that queues the backward first never leaves the device idle while the host reads, as a
    blocking ``.cpu()`` after the forward did. On other devices the values are copied when :meth:`values` asks.

    In a distributed run the values are first averaged over the processes (one small all-reduce, queued like the
    copy): every rank then reads the same numbers, so a non-finite term on any rank stops every rank at once (a rank
    stopping alone would leave the others to step on its NaN gradients, then hang in their next collective), and the
    loggers get the global batch's loss rather than rank 0's share.

    Args:
        losses: name → 0-d loss tensor, on any one device.
    """

    def __init__(self, losses: Mapping[str, Tensor]) -> None:
        self.names = list(losses)
        stacked = torch.stack([value.detach().float() for value in losses.values()])  # [n_terms]
        if world_size() > 1:
            stacked = all_reduce_sum(stacked) / world_size()
        self._event: torch.cuda.Event | None = None
        self._on_device: Tensor | None = None
        if stacked.device.type == "cuda":
            self._host = torch.empty(stacked.shape, dtype=stacked.dtype, pin_memory=True)
            self._host.copy_(stacked, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._on_device = stacked

    def values(self) -> dict[str, Tensor]:
        """name → 0-d float32 CPU tensor, once the copy has landed (the only wait)."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        if self._on_device is not None:
            self._host, self._on_device = self._on_device.cpu(), None
        return dict(zip(self.names, self._host))



class LogsAfterBackward(LightningModule):
    """Mixin: :meth:`log_after_backward` in ``training_step`` queues the step's values; they are logged as CPU
    numbers in ``on_before_optimizer_step``, once the backward is queued, averaged over the processes of a
    distributed run and over the micro-batches of an accumulated step."""

    #: (values on their way to the host, batch size, names shown in the progress bar) since the last optimiser step
    _pending_step_values: tuple[tuple[LossReadback, int, Collection[str]], ...] = ()

    def log_after_backward(self, values: Mapping[str, Tensor], *, batch_size: int,
                           prog_bar: bool | Collection[str] = True) -> None:
        """Log ``values`` (name → 0-d tensor) for this training step; ``prog_bar``: all, none, or these names."""
        shown = set(values) if prog_bar is True else set() if prog_bar is False else set(prog_bar)
        self._pending_step_values = (*self._pending_step_values, (LossReadback(values), int(batch_size), shown))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        super().on_before_optimizer_step(optimizer)
        pending, self._pending_step_values = self._pending_step_values, ()
        if not pending:
            return
        batch_size = sum(size for _, size, _ in pending)
        for name, mean in micro_batch_mean([readback.values() for readback, _, _ in pending]).items():
            self.log(name, mean, prog_bar=name in pending[0][2], batch_size=batch_size)

