"""Canopy height from image chips against from GeoTIFFs, NEON Teakettle: the same model trained both ways from the CLI.

Evaluation only: ../shared/data/neon_chm (NEON AOP, CC0) is read in place. Each of the 12 plots becomes a chip the
way a chip dataset ships one: its 0.1 m RGB orthophoto as a plain PNG and its 1 m LiDAR CHM brought onto the photo's
pixel grid (bilinear, nodata-aware: ``HeightLabels``) as a float TIFF without georeference, ``<plot>_chm.tif``. Then
``dinov3-eo height fit`` runs twice with ``configs/height/neon_tiny_cpu.yaml``'s model and schedule: once on the
GeoTIFFs (``HeightDataModule``, native 0.1 m, 128-px tiles) and once on the chips (``data.class_path:
ChipHeightDataModule``, 128-px windows), both with z-score statistics of the training plots, the same
validation and test plots; ``height test`` scores each checkpoint on the test plots (MAE, RMSE, bias, pixels).

    python scripts/exp_height_chips_neon.py [--data ../shared/data/neon_chm] [--steps 60] [--work runs/exp_height_chips]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import rasterio
import yaml
from PIL import Image

from dinov3_eo.tasks.height import main as height_main
from dinov3_eo.tasks.height_data import HeightLabels

VAL, TEST = ["TEAK_052"], ["TEAK_053", "TEAK_055"]


def write_chips(data: Path, out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True), (out / "chm").mkdir(exist_ok=True)
    for rgb in sorted((data / "rgb").glob("*.tif")):
        labels = HeightLabels(paths=[str(data / "chm" / f"{rgb.stem}_CHM.tif")])
        with rasterio.open(rgb) as src:
            Image.fromarray(src.read().transpose(1, 2, 0)).save(out / "images" / f"{rgb.stem}.png")
            heights = labels.sample(crs=src.crs, transform=src.transform, shape=src.shape)["target"].numpy()
        labels.close()
        with rasterio.open(out / "chm" / f"{rgb.stem}_chm.tif", "w", driver="GTiff", width=heights.shape[1],
                           height=heights.shape[0], count=1, dtype="float32", nodata=-9999.0) as dst:  # fmt: skip
            dst.write(np.nan_to_num(heights, nan=-9999.0)[None])


def run(config: dict, name: str, work: Path) -> dict:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    start = time.perf_counter()
    assert height_main(["fit", "--config", str(path), f"--trainer.default_root_dir={work / name}"]) == 0
    fit_s = time.perf_counter() - start
    checkpoint = sorted((work / name).rglob("last.ckpt"))[-1]
    assert height_main(["test", "--config", str(path), f"--ckpt_path={checkpoint}",
                        f"--trainer.default_root_dir={work / name / 'test'}", "--trainer.logger=false"]) == 0  # fmt: skip
    metrics = json.loads((work / name / "test" / "test_metrics.json").read_text())["metrics"]["all"]
    return {"fit_s": round(fit_s, 1), **{k: round(float(v), 3) for k, v in metrics.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/neon_chm")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--work", default="runs/exp_height_chips")
    args = parser.parse_args()
    data, work = Path(args.data).resolve(), Path(args.work).resolve()
    write_chips(data, work / "chips")
    base = yaml.safe_load(Path("configs/height/neon_tiny_cpu.yaml").read_text())
    base["trainer"].update(max_steps=args.steps, val_check_interval=args.steps // 2, enable_progress_bar=False)
    common = {"tile_size": 128, "normalization": "zscore", "batch_size": 4, "num_workers": 0}
    geotiffs = {**base, "data": {"paths": str(data / "rgb" / "*.tif"), "labels": str(data / "chm" / "*.tif"),
                                 "val_files": [f"{p}.tif" for p in VAL], "test_files": [f"{p}.tif" for p in TEST],
                                 "min_label_fraction": 0.1, "cache_dir": None, **common}}  # fmt: skip
    chips = {**base, "data": {"class_path": "ChipHeightDataModule", "init_args": {
        "images": str(work / "chips" / "images"), "heights": str(work / "chips" / "chm"), "label_name_suffixes": ["_chm"],
        "val_files": [f"{p}.png" for p in VAL], "test_files": [f"{p}.png" for p in TEST], **common}}}  # fmt: skip
    result = {"steps": args.steps, "val": VAL, "test": TEST, "geotiffs": run(geotiffs, "geotiffs", work),
              "chips": run(chips, "chips", work)}  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
