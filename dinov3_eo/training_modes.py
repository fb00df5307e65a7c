"""Train/eval modes when a Lightning fit starts.

Lightning 2.x does not call ``train()`` when ``fit`` starts: every module keeps the mode it is in, and Lightning only
warns about modules in eval mode. A model loaded for inference (``SegmentationTask.from_checkpoint`` returns it in
eval mode) and then fitted would train with dropout and drop-path off and its RoPE jitter off. Our modules override
``train()`` to keep some parts in eval mode by design (frozen backbones, EMA teachers, a frozen text encoder), so
calling ``train()`` at fit start gives every part its intended mode.
"""

from __future__ import annotations

import warnings

from lightning.pytorch import LightningModule

__all__ = ["TrainModesAtFitStart"]


class TrainModesAtFitStart(LightningModule):
    """A ``LightningModule`` that sets its training modes (its own ``train()``) when every fit starts.

    The parts that stay in eval mode by design would trigger Lightning's "Found N module(s) in eval mode" warning
    in every fit; that exact count is silenced, so a caller's own eval-mode modules would still be reported.
    Subclasses that override :meth:`on_fit_start` call ``super().on_fit_start()`` after any module they create there.
    """

    def on_fit_start(self) -> None:
        self.train()
        in_eval = sum(not module.training for module in self.modules())
        if in_eval:
            warnings.filterwarnings(
                "ignore", message=rf"Found {in_eval} module\(s\) in eval mode at the start of training"
            )
