"""Every fit starts with each part in its intended train/eval mode, whatever mode the caller left the model in.

Lightning 2.x does not call ``train()`` when a fit starts, and ``SegmentationTask.from_checkpoint`` returns a model in
eval mode: without ``TrainModesAtFitStart`` such a model would fine-tune with its head's dropout off.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import lightning as L
import pytest
import torch
from lightning.pytorch import LightningModule
from tiny_text import TINY_TEXT

from dinov3_eo.tasks.height import HeightTask
from dinov3_eo.tasks.openvocab import TextAlignmentTask
from dinov3_eo.tasks.segmentation import SegmentationTask
from dinov3_eo.training_modes import TrainModesAtFitStart

TINY_DPT = dict(dpt_channels=16, dpt_post_process_channels=[8, 16, 32, 32], dpt_hidden_channels=8, n_bins=32,
                max_height=64.0, loss="l1")

TASKS: dict[str, Callable[[], LightningModule]] = {
    "segmentation, frozen backbone": lambda: SegmentationTask(backbone="vitmicro16", head="linear", num_classes=3),
    "segmentation, fine-tuned backbone": lambda: SegmentationTask(backbone="vitmicro16", head="linear", num_classes=3,
                                                                  freeze_backbone=False),
    "height, frozen backbone": lambda: HeightTask(backbone="vitmicro16", **TINY_DPT),
    "height, fine-tuned backbone": lambda: HeightTask(backbone="vitmicro16", freeze_backbone=False, **TINY_DPT),
    "text alignment, frozen text encoder": lambda: TextAlignmentTask(backbone="vitmicro16", text_cfg=TINY_TEXT,
                                                                     ffn_layer="mlp", freeze_text=True),
}


def _modes(module: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


@pytest.mark.parametrize("make", TASKS.values(), ids=TASKS.keys())
def test_fit_start_restores_the_construction_modes_of_a_model_left_in_eval_mode(make: Callable[[], LightningModule]) -> None:
    torch.manual_seed(0)
    fresh = make()
    assert isinstance(fresh, TrainModesAtFitStart)
    expected = _modes(fresh)  # the modes each part is built in (tested per model in test_dense / test_text)
    assert expected[""]  # the task itself trains
    task = make().eval()
    task.on_fit_start()
    assert _modes(task) == expected


def test_a_segmentation_model_loaded_for_inference_fine_tunes_in_training_mode() -> None:
    """A real fit: the head trains with dropout on, the frozen backbone stays in eval mode, no eval-mode warning."""
    task = SegmentationTask(backbone="vitmicro16", head="linear", num_classes=3, freeze_backbone=True).eval()
    seen: list[tuple[bool, bool]] = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            seen.append((pl_module.model.head.training, pl_module.model.backbone.training))

    data = [{"image": torch.randn(2, 3, 32, 32), "mask": torch.randint(0, 3, (2, 32, 32))}] * 2
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Spy()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(task, torch.utils.data.DataLoader(data, batch_size=None))
    assert seen == [(True, False), (True, False)]
    assert not [w for w in caught if "in eval mode at the start of training" in str(w.message)]


def test_only_the_count_left_in_eval_by_design_is_silenced() -> None:
    """A caller's own eval-mode module (here one more) is still reported by Lightning."""

    class Extra(TrainModesAtFitStart):
        def __init__(self) -> None:
            super().__init__()
            self.part = torch.nn.Linear(2, 2)

        def train(self, mode: bool = True) -> Extra:
            super().train(mode)
            self.part.eval()  # by design, as a frozen backbone
            return self

    module = Extra()
    module.on_fit_start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", append=True)  # after the installed "ignore" filter, which must win
        warnings.warn("Found 1 module(s) in eval mode at the start of training. x", UserWarning, stacklevel=1)
        warnings.warn("Found 2 module(s) in eval mode at the start of training. x", UserWarning, stacklevel=1)
    assert [str(w.message)[:7] for w in caught] == ["Found 2"]
