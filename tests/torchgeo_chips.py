"""A torchgeo ``NonGeoDataModule`` over image chips, for the test that ``segment fit`` takes torchgeo datamodules
through ``data.class_path`` (importable by that name because pytest puts ``tests/`` on the path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchgeo.datamodules import NonGeoDataModule
from torchgeo.datasets import NonGeoDataset

from dinov3_eo.data.chips import ChipSegmentationDataModule


class ChipWindows(NonGeoDataset):
    """torchgeo-style samples (``image`` float in raw 0..255, ``mask`` int64) of the chip windows of one split."""

    def __init__(self, root: str, split: str = "train", size: int = 48) -> None:
        chips = ChipSegmentationDataModule(images=str(Path(root) / "images"), masks=str(Path(root) / "masks"),
                                           label_name_suffixes=["_mask"], val_files=["chip_1.png"],
                                           test_files=["chip_3.png"], tile_size=size, normalization="none")  # fmt: skip
        self.windows = chips.dataset(split)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.windows[index]
        return {"image": sample["image"], "mask": sample["mask"]}


class ChipsTorchGeoDataModule(NonGeoDataModule):
    """The chips as torchgeo ships a benchmark: ``mean`` 0 and ``std`` 255, so its ``aug`` divides by 255."""

    def __init__(self, root: str, size: int = 48, batch_size: int = 4, num_workers: int = 0) -> None:
        super().__init__(ChipWindows, batch_size, num_workers, root=root, size=size)
