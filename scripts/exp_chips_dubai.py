"""``segment fit`` on chips without a georeference against the GeoTIFF path, on the Dubai aerial tiles.

Evaluation only: ``../shared/data/dubai_seg`` (licence unconfirmed) is read in place and never copied into the
project. The same linear head (frozen ``vitmicro16``, random weights: no pretrained backbone reaches this machine)
is trained twice with the same seed, epochs and window size: once on the JPEG chips and PNG masks through
``ChipSegmentationDataModule``, once on GeoTIFF copies of the JPEGs (an arbitrary 1 m grid) with the same PNG masks
paired by name through ``DenseDataModule``. Tiles 1–3 train, tile 4 validates, tile 5 tests; mask value 5
("unlabelled") is ignored in both. The two data paths read the same pixels and labels, so their scores should
agree up to their windows (chips: each chip cut from its corner, the last row and column padded; GeoTIFFs: the
tile grid's own) and the statistics behind the z-score (chips: every pixel of the training chips; GeoTIFFs: 64
windows sampled).

    python scripts/exp_chips_dubai.py [--data ../shared/data/dubai_seg] [--epochs 4] [--tile-size 256]
"""

from __future__ import annotations

import argparse
import glob
import json
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from dinov3_eo.data.chips import ChipSegmentationDataModule
from dinov3_eo.data.datamodule import DenseDataModule
from dinov3_eo.tasks.segmentation import SegmentationTask

CLASSES = ["building", "land", "road", "vegetation", "water"]


def as_geotiff(image: str, root: Path) -> None:
    """``tileN/images/x.jpg`` -> ``root/tileN/images/x.tif`` on an arbitrary 1 m grid (the same pixels)."""
    pixels = np.asarray(Image.open(image).convert("RGB")).transpose(2, 0, 1)
    dst = root / Path(image).parent.parent.name / "images" / (Path(image).stem + ".tif")
    dst.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(dst, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=3,
                       dtype="uint8", crs="EPSG:3857", transform=from_origin(0, pixels.shape[1], 1, 1)) as out:  # fmt: skip
        out.write(pixels)


def run(datamodule: pl.LightningDataModule, args: argparse.Namespace) -> dict:
    pl.seed_everything(args.seed, verbose=False)
    model = SegmentationTask(backbone="vitmicro16", in_chans=3, head="linear", num_classes=len(CLASSES),
                             class_names=CLASSES, lr=0.01, weight_decay=0.0)  # fmt: skip
    trainer = pl.Trainer(accelerator="cpu", max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tempfile.mkdtemp())  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule)
    seconds = time.perf_counter() - start
    val = trainer.validate(model, datamodule, verbose=False)[0]
    test = trainer.test(model, datamodule, verbose=False)[0]
    loader = datamodule.train_dataloader()
    return {"fit_s": round(seconds, 1), "train_batches": len(loader),
            "val_miou": round(val["val/mIoU"], 4), "val_accuracy": round(val["val/accuracy"], 4),
            "test_miou": round(test["test/mIoU"], 4), "test_accuracy": round(test["test/accuracy"], 4),
            "test_iou": {c: round(test[f"test/IoU/{c}"], 4) for c in CLASSES if f"test/IoU/{c}" in test}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/dubai_seg")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--tile-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    data = Path(args.data)
    split = {"val_files": ["*/tile4/*"], "test_files": ["*/tile5/*"], "tile_size": args.tile_size, "batch_size": 8,
             "seed": args.seed}  # fmt: skip
    chips = ChipSegmentationDataModule(images=str(data / "*" / "images"), masks=str(data / "*" / "masks"),
                                       remap={5: 255}, **split)  # fmt: skip
    results = {"chips": run(chips, args)}
    print("chips:", json.dumps(results["chips"]), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        for image in sorted(glob.glob(str(data / "*" / "images" / "*.jpg"))):
            as_geotiff(image, Path(tmp))
        masks = str(data / "*" / "masks" / "*.png")
        dense = DenseDataModule(paths=str(Path(tmp) / "*" / "images" / "*.tif"), labels=masks, label_pairing="name",
                                label_nodata=5, cache_dir=None, max_nodata_fraction=1.0, **split)  # fmt: skip
        results["geotiffs"] = run(dense, args)
    print("geotiffs:", json.dumps(results["geotiffs"]), flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
