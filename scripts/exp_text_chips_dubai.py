"""Open vocabulary on image chips from the command line alone, on the Dubai aerial tiles.

Evaluation only: ``../shared/data/dubai_seg`` (licence unconfirmed) is read in place and never copied. Runs exactly
what a user would: ``dinov3-eo text fit --config configs/text/dubai_chips_cpu.yaml`` (chips and masks of tiles 1-4
paired by name, tile 4 validating), then ``dinov3-eo query CHIP.jpg building land road vegetation water --chips``
on every tile-5 JPEG, and scores the PNG class maps against the tile-5 masks: per-class IoU and mIoU over the five
classes (mask value 5, "unlabelled", left out), against chance (a uniformly random class per pixel); then scores them
again with ``dinov3-eo segment evaluate --chips`` and checks its confusion matrix equals this script's count.

    python scripts/exp_text_chips_dubai.py [--data ../shared/data/dubai_seg] [--epochs 8] [--work runs/exp_text_chips]
"""

from __future__ import annotations

import argparse
import glob
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dinov3_eo.cli import main as cli_main

CLASSES = ["building", "land", "road", "vegetation", "water"]


def confusion(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    keep = (truth < k) & (pred < k)  # (a pixel without data, 255, has no class)
    return np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)


def ious(matrix: np.ndarray) -> list[float]:
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    return [float(t / u) if u else float("nan") for t, u in zip(tp, union)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/dubai_seg")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--work", default="runs/exp_text_chips")
    args = parser.parse_args()
    work, data = Path(args.work), Path(args.data)
    start = time.perf_counter()
    assert cli_main([
        "text", "fit", "--config", "configs/text/dubai_chips_cpu.yaml", f"--trainer.max_epochs={args.epochs}",
        f"--trainer.default_root_dir={work / 'fit'}", f"--data.chips={data}/tile[1-4]/images",
        f"--data.chip_masks={data}/tile[1-4]/masks", "--trainer.enable_progress_bar=false",
    ]) == 0  # fmt: skip
    fit_s = time.perf_counter() - start
    checkpoint = sorted((work / "fit").rglob("last.ckpt"))[-1]
    (work / "query").mkdir(parents=True, exist_ok=True)
    k, total, chance = len(CLASSES), np.zeros((len(CLASSES),) * 2, np.int64), np.zeros((len(CLASSES),) * 2, np.int64)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for image in sorted(glob.glob(str(data / "tile5" / "images" / "*.jpg"))):
        out = work / "query" / f"{Path(image).stem}.tif"
        assert cli_main(["query", image, *CLASSES, "--chips", "--model", str(checkpoint), "-o", str(out),
                         "--window", "128", "--overwrite"]) == 0  # fmt: skip
        pred = np.asarray(Image.open(out.with_name(f"{out.stem}_classes.png"))).astype(np.int64)
        truth = np.asarray(Image.open(Path(image).parent.parent / "masks" / f"{Path(image).stem}.png")).astype(np.int64)
        total += confusion(pred, truth, k)
        chance += confusion(rng.integers(0, k, truth.shape), truth, k)
    query_s = time.perf_counter() - start
    # the same score from the command line: the PNG maps against the masks, value 5 ("unlabelled") left out
    start = time.perf_counter()
    assert cli_main(["segment", "evaluate", str(work / "query"), str(data / "tile5" / "masks"), "--chips",
                     "--remap", '{"5": 255}', "--out-dir", str(work / "eval"), "--overwrite"]) == 0  # fmt: skip
    evaluate_s = time.perf_counter() - start
    scored = json.loads((work / "eval" / "metrics.json").read_text())
    assert scored["confusion"] == total.tolist(), "segment evaluate --chips disagrees with this script's count"
    per_class = dict(zip(CLASSES, (round(v, 4) for v in ious(total))))
    result = {"checkpoint": str(checkpoint), "fit_s": round(fit_s, 1), "query_s": round(query_s, 1),
              "evaluate_s": round(evaluate_s, 1), "miou": round(float(np.nanmean(ious(total))), 4),
              "evaluate_miou": round(scored["miou"], 4), "iou": per_class,
              "chance_miou": round(float(np.nanmean(ious(chance))), 4), "pixels": int(total.sum())}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
