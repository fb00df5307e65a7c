"""Real-data experiment: segmentation without training (``segment prototypes``) against trained heads.

Same splits as the trained baselines in the README, data read in place from ``../shared/data`` and never copied:

* **NC Landsat-7** (as ``scripts/exp_segment_nc.py``): prototypes from the labels of the west part (columns < 240),
  mIoU on the east part's labelled pixels; the micro ViT pretrained there for 150 steps on the scene, and random;
* **Dubai aerial tiles** (as ``scripts/exp_openvocab_dubai.py``): prototypes from tiles 1–3 (each image with its own
  label raster), mIoU over the five classes on tiles 4–5 (random micro ViT, ImageNet normalisation).

Each with every labelled pixel of the training part, and "few-shot": ``--clicks`` labelled pixels per class drawn at
random (what a user clicking points would give), with one prototype per class and with ``--per-class`` of them.

    .venv/bin/python scripts/exp_prototypes.py [--clicks 20] [--per-class 4] [--datasets nc dubai]
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_openvocab_dubai import as_geotiff  # noqa: E402
from exp_openvocab_dubai import miou as dubai_miou  # noqa: E402
from exp_segment_nc import DATA as NC_DATA  # noqa: E402
from exp_segment_nc import SPLIT_COL, load_scene, pretrain_here  # noqa: E402
from exp_segment_nc import miou as nc_miou  # noqa: E402

from dinov3_eo.data.normalization import Normalization  # noqa: E402
from dinov3_eo.models.vit import build_backbone  # noqa: E402
from dinov3_eo.tasks.clustering import cluster_raster  # noqa: E402
from dinov3_eo.tasks.prototypes import fit_prototypes  # noqa: E402

DUBAI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dubai_seg"


def label_raster(path: Path, ids: np.ndarray, like: Path, names: list[str]) -> Path:
    """Class ids (255 = unlabelled) as a GeoTIFF on ``like``'s grid, names in its tags."""
    with rasterio.open(like) as src:
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "dtype": "uint8",
                   "crs": src.crs, "transform": src.transform, "nodata": 255}  # fmt: skip
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(ids.astype(np.uint8), 1)
        dst.update_tags(class_names=json.dumps(names))
    return path


def few(ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Keep ``n`` random labelled pixels per class (the rest 255)."""
    out = np.full_like(ids, 255)
    for c in np.unique(ids[ids != 255]):
        rows, cols = np.nonzero(ids == c)
        pick = rng.choice(len(rows), min(n, len(rows)), replace=False)
        out[rows[pick], cols[pick]] = c
    return out


def mapped(net: torch.nn.Module, protos, path: Path, work: Path, nodata: float | None) -> np.ndarray:  # noqa: ANN001
    result = cluster_raster(net, protos, path, work, nodata=nodata, quicklook=False, overwrite=True, progress=False)
    with rasterio.open(result.classes) as src:
        return src.read(1).astype(np.int64)


def run_nc(args: argparse.Namespace, work: Path) -> None:
    from exp_segment_nc import CLASS_NAMES

    image, valid, mask = load_scene()
    pixels = image[:, valid]
    norm = Normalization.zscore(pixels.mean(axis=1), pixels.std(axis=1))
    path = NC_DATA / "landsat_multiband.tif"
    west = np.where(np.arange(mask.shape[1])[None] < SPLIT_COL, mask, 255)
    rng = np.random.default_rng(args.seed)
    labels = {"all west labels": label_raster(work / "nc_west.tif", west, path, CLASS_NAMES),
              f"{args.clicks} pixels per class": label_raster(work / "nc_few.tif", few(west, args.clicks, rng), path,
                                                              CLASS_NAMES)}  # fmt: skip
    torch.manual_seed(args.seed)
    nets = {"random micro ViT": build_backbone("vitmicro16", in_chans=5).eval()}
    nets["pretrained here 150 steps"] = pretrain_here(norm, steps=150, seed=args.seed, work=work)[0]
    print("\nNC Landsat-7, mIoU on the east part (trained linear heads: 0.219 pretrained, 0.218 random; random forest 0.202)")
    for net_name, net in nets.items():
        for label_name, label_path in labels.items():
            for per_class in (1, args.per_class):
                started = time.perf_counter()
                protos = fit_prototypes(net, [path], label_path, normalization=norm, per_class=per_class, progress=False)
                pred = mapped(net, protos, path, work, None)
                m, _ = nc_miou(mask[:, SPLIT_COL:], pred[:, SPLIT_COL:], len(CLASS_NAMES))
                print(f"  {net_name:<26} {label_name:<22} {per_class} per class: mIoU {m:.3f}  "
                      f"({protos.samples} labelled px, {time.perf_counter() - started:.1f} s)", flush=True)  # fmt: skip


def run_dubai(args: argparse.Namespace, work: Path) -> None:
    from PIL import Image

    names = ["building", "land", "road", "vegetation", "water"]

    def load(tiles: tuple[int, ...]) -> tuple[list[Path], list[np.ndarray]]:
        paths, masks = [], []
        for tile in tiles:
            for image in sorted(glob.glob(str(DUBAI / f"tile{tile}" / "images" / "*.jpg"))):
                paths.append(as_geotiff(image, work))
                truth = np.asarray(Image.open(Path(image).parent.parent / "masks" / (Path(image).stem + ".png")))
                masks.append(np.where(truth < 5, truth, 255).astype(np.uint8))
        return paths, masks

    train, train_masks = load((1, 2, 3))
    test, test_masks = load((4, 5))
    rng = np.random.default_rng(args.seed)
    label_sets = {
        "all labels of tiles 1-3": [label_raster(work / f"{p.stem}_labels.tif", m, p, names) for p, m in zip(train, train_masks)],
        f"{args.clicks} pixels per class per image": [label_raster(work / f"{p.stem}_few.tif", few(m, args.clicks, rng), p, names)
                                                      for p, m in zip(train, train_masks)],
    }  # fmt: skip
    norm = Normalization.preset("imagenet")
    torch.manual_seed(args.seed)
    net = build_backbone("vitmicro16", in_chans=3).eval()
    print("\nDubai tiles 4-5, mIoU over 5 classes (trained linear head 0.311, text queries 0.342, chance 0.099)")
    for label_name, labels in label_sets.items():
        for per_class in (1, args.per_class):
            started = time.perf_counter()
            protos = fit_prototypes(net, train, labels, normalization=norm, per_class=per_class, progress=False)
            preds = [mapped(net, protos, p, work, None) for p in test]
            truth = np.concatenate([m.ravel() for m in test_masks])
            pred = np.concatenate([p.ravel() for p in preds])
            m, ious = dubai_miou(pred, truth)
            print(f"  random micro ViT  {label_name:<32} {per_class} per class: mIoU {m:.3f} "
                  f"({', '.join(f'{n} {v:.2f}' for n, v in zip(names, ious))}; {protos.samples} labelled px, "
                  f"{time.perf_counter() - started:.0f} s)", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=20, help="labelled pixels per class of the few-shot case")
    parser.add_argument("--per-class", type=int, default=4, help="prototypes per class of the second variant")
    parser.add_argument("--datasets", nargs="+", default=["nc", "dubai"], choices=["nc", "dubai"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="exp_prototypes_") as tmp:
        for name, folder, run in (("nc", NC_DATA, run_nc), ("dubai", DUBAI, run_dubai)):
            if name in args.datasets:
                if folder.is_dir():
                    run(args, Path(tmp))
                else:
                    print(f"skipped {name}: {folder} is not here", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
