"""A callback the torchrun test names on the command line (it runs in other processes, so it lives in a module)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class KillAt(Callback):
    """Every rank dies before training step ``at``, as a job killed between two steps would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if trainer.global_step == self.at:
            raise SystemExit(f"killed before step {self.at}")
