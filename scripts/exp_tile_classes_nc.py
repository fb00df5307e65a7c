"""A chip probe over a real scene, tile by tile: ``dinov3-eo classify map`` on the North Carolina Landsat-7 scene.

../shared/data/nc_landsat7 holds a Landsat-7 (2000) scene, 489 x 443 px at 28.5 m, and a full 7-class land-class
map on the same grid (GPL data: read here, never copied into the project). Bands 3, 2, 1 (red, green, blue) are
stacked into one GeoTIFF; each 16-px tile (456 m) with data throughout and one land class on at least ``--purity``
of its labelled pixels is labelled by that class. The training tiles (a checkerboard of 4 x 4-tile blocks, or with
``--split halves`` the left half of the scene) are written as GeoTIFF chips, one folder per class, and fitted with
``classify fit`` (linear probe, C chosen on 20 % of them); ``classify map`` then classifies every tile of the scene,
and its classes are scored against the labels of the held-out tiles (the other blocks, or the right half: spatial
splits), next to a logistic regression on colour histograms over the same split and the majority class. The same
held-out tiles are also written as chips and run through ``classify predict``: the probabilities must
agree with the map's, and the tiles per second of the two paths are compared in this run.

    python scripts/exp_tile_classes_nc.py [--arch vits16] [--size 64] [--tile 16] [--purity 0.6] [--split blocks|halves]
                                            [--backbone export.pth] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import SHARED  # noqa: E402
from exp_chip_embeddings_eurosat import _random_export  # noqa: E402

from dinov3_eo.cli import main as cli_main  # noqa: E402

NC = SHARED / "nc_landsat7"
NAMES = {1: "developed", 2: "agriculture", 3: "herbaceous", 4: "shrubland", 5: "forest", 6: "water", 7: "sediment"}
NODATA = -99999.0


def _stack(dst: Path) -> tuple[np.ndarray, np.ndarray]:
    """Bands 30, 20, 10 (red, green, blue) as one float32 GeoTIFF; returns its pixels and the land-class map."""
    bands = []
    for name in ("30", "20", "10"):
        with rasterio.open(NC / f"lsat7_2000_{name}.tif") as src:
            bands.append(src.read(1))
            profile = src.profile
    pixels = np.stack(bands)
    profile.update(count=3, dtype="float32", nodata=NODATA, tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(dst, "w", **profile) as out:
        out.write(pixels)
    with rasterio.open(NC / "strata.tif") as src:
        strata = src.read(1)
    return pixels, strata


def _tile_labels(pixels: np.ndarray, strata: np.ndarray, tile: int, purity: float) -> dict[tuple[int, int], int]:
    """(row, col) -> land class of each whole tile with data throughout and one class on >= ``purity`` of it."""
    labels = {}
    for r in range(pixels.shape[1] // tile):
        for c in range(pixels.shape[2] // tile):
            cut = pixels[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            classes = strata[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            if (cut == NODATA).any():
                continue
            values, counts = np.unique(classes[classes > 0], return_counts=True)
            if len(values) and counts.max() >= purity * tile * tile:
                labels[(r, c)] = int(values[counts.argmax()])
    return labels


def _write_chips(stack: Path, tiles: list[tuple[int, int]], labels: dict, tile: int, root: Path) -> None:
    from rasterio.windows import Window

    with rasterio.open(stack) as src:
        for r, c in tiles:
            window = Window(c * tile, r * tile, tile, tile)
            profile = src.profile | {"width": tile, "height": tile, "transform": src.window_transform(window),
                                     "tiled": False}  # fmt: skip
            profile.pop("blockxsize"), profile.pop("blockysize")
            folder = root / NAMES[labels[(r, c)]]
            folder.mkdir(parents=True, exist_ok=True)
            with rasterio.open(folder / f"r{r:02d}_c{c:02d}.tif", "w", **profile) as out:
                out.write(src.read(window=window))


def _colour_features(pixels: np.ndarray, tiles: list[tuple[int, int]], tile: int) -> np.ndarray:
    """Per-band mean, std and an 8-bin histogram over 0-255 of each tile (bench_pretrain's colour baseline)."""
    rows = []
    for r, c in tiles:
        cut = pixels[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile].reshape(3, -1)
        hist = [np.histogram(b, bins=8, range=(0, 256))[0] / b.size for b in cut]
        rows.append(np.concatenate([cut.mean(1), cut.std(1), *hist]))
    return np.array(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--size", type=int, default=64, help="model input size of a tile (default 64)")
    parser.add_argument("--tile", type=int, default=16, help="tile side in scene pixels (default 16 = 456 m)")
    parser.add_argument("--purity", type=float, default=0.6)
    parser.add_argument("--split", choices=("blocks", "halves"), default="blocks", help="held-out tiles: a checkerboard "
                        "of 4 x 4-tile blocks (default) or the right half of the scene")  # fmt: skip
    parser.add_argument("--keep", default=None, help="keep the chips, probe and map in this folder")
    parser.add_argument("--backbone", default=None, help="an exported backbone (default: random weights)")
    args = parser.parse_args()
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        stack = tmp / "nc_rgb.tif"
        pixels, strata = _stack(stack)
        labels = _tile_labels(pixels, strata, args.tile, args.purity)
        if args.split == "halves":  # left half trains, right half tests
            held = lambda t: t[1] >= pixels.shape[2] // args.tile // 2  # noqa: E731
        else:  # a checkerboard of 4 x 4-tile blocks (1.8 km): spatially apart, both halves of the scene in each
            held = lambda t: (t[0] // 4 + t[1] // 4) % 2 == 1  # noqa: E731
        train = sorted(t for t in labels if not held(t))
        test = sorted(t for t in labels if held(t))
        _write_chips(stack, train, labels, args.tile, tmp / "train")
        _write_chips(stack, test, labels, args.tile, tmp / "test")
        backbone = args.backbone or _random_export(args.arch, tmp)
        probe = tmp / "probe.safetensors"
        start = time.perf_counter()
        assert cli_main(["classify", "fit", str(tmp / "train"), "--model", str(backbone), "-o", str(probe), "--size",
                         str(args.size), "--val-fraction", "0.2", "--quiet"]) == 0  # fmt: skip
        fit_s = time.perf_counter() - start

        start = time.perf_counter()
        assert cli_main(["classify", "map", str(stack), "--probe", str(probe), "-o", str(tmp / "map"), "--quiet",
                         "--probabilities"]) == 0  # fmt: skip
        map_s = time.perf_counter() - start
        with rasterio.open(tmp / "map" / "nc_rgb_tile_classes.tif") as src:
            ids, class_names, shape = src.read(1), json.loads(src.tags()["class_names"]), (src.height, src.width)
        with rasterio.open(tmp / "map" / "nc_rgb_tile_probabilities.tif") as src:
            probabilities = src.read()
        truth = np.array([class_names.index(NAMES[labels[t]]) if NAMES[labels[t]] in class_names else -1 for t in test])
        mapped = np.array([ids[t] for t in test])

        start = time.perf_counter()
        assert cli_main(["classify", "predict", str(tmp / "test"), "--probe", str(probe), "-o", str(tmp / "p.csv"),
                         "--quiet"]) == 0  # fmt: skip
        predict_s = time.perf_counter() - start
        diff = 0.0
        for row in csv.DictReader((tmp / "p.csv").open()):
            r, c = (int(part[1:]) for part in Path(row["path"]).stem.split("_"))
            diff = max(diff, float(np.abs(probabilities[:, r, c] - [float(row[f"p_{n}"]) for n in class_names]).max()))

        ytrain = np.array([labels[t] for t in train])
        ytest = np.array([labels[t] for t in test])
        scaler = StandardScaler().fit(_colour_features(pixels, train, args.tile))
        colour = LogisticRegression(max_iter=2000).fit(scaler.transform(_colour_features(pixels, train, args.tile)), ytrain)
        colour_acc = float((colour.predict(scaler.transform(_colour_features(pixels, test, args.tile))) == ytest).mean())
        majority = int(np.bincount(ytrain).argmax())
        tiles = int(np.prod(shape))
        results = {
            "split": args.split, "tile_px": args.tile, "tile_m": args.tile * 28.5, "model_input": args.size, "arch": args.arch,
            "weights": "export" if args.backbone else "random", "grid": list(shape), "labelled_tiles": len(labels),
            "train_tiles": len(train), "test_tiles": len(test),
            "train_classes": {NAMES[k]: int(v) for k, v in zip(*np.unique(ytrain, return_counts=True))},
            "test_classes": {NAMES[k]: int(v) for k, v in zip(*np.unique(ytest, return_counts=True))},
            "map_test_accuracy": round(float((mapped == truth).mean()), 4),
            "colour_histogram_logistic_accuracy": round(colour_acc, 4),
            "majority_class_accuracy": round(float((ytest == majority).mean()), 4),
            "map_vs_predict_max_abs_diff": diff,
            "fit_s": round(fit_s, 2), "map_s": round(map_s, 2), "map_tiles_per_s": round(tiles / map_s, 1),
            "predict_s": round(predict_s, 2), "predict_chips_per_s": round(len(test) / predict_s, 1),
        }  # fmt: skip
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
