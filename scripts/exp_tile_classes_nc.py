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
agree with the map's, and the tiles per second of the two paths are compared in this run. The same split without
chips: ``classify fit --scenes`` on the land-class raster masked to the training blocks, ``classify test --scenes`` on
it masked to the held-out ones (``from_scene``). Then the same as
multi-label chips: each tile carries every land class on at least ``--presence`` (10 %) of it, ``classify fit
--multi-label`` on a shuffled table of the training tiles, ``classify test`` on the held-out ones (mAP), against
colour histograms and the classes' training prevalence.

    python scripts/exp_tile_classes_nc.py [--arch vits16] [--size 64] [--tile 16] [--purity 0.6] [--split blocks|halves] [--balanced] [--finetune-epochs N] [--tta flips|d4]
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
from typing import Any

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
    parser.add_argument("--presence", type=float, default=0.1, help="multi-label: a tile carries each land class on at "
                        "least this share of its labelled pixels (default 0.1)")  # fmt: skip
    parser.add_argument("--balanced", action="store_true", help="classify fit --balanced (and balanced class weights "
                        "for the colour-histogram baseline)")  # fmt: skip
    parser.add_argument("--finetune-epochs", type=int, default=0, help="classify fit --finetune-epochs (default 0)")
    parser.add_argument("--tta", choices=("flips", "d4"), default=None, help="classify map --tta")
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
        start = time.perf_counter()
        _write_chips(stack, train, labels, args.tile, tmp / "train")
        chips_s = time.perf_counter() - start
        _write_chips(stack, test, labels, args.tile, tmp / "test")
        backbone = args.backbone or _random_export(args.arch, tmp)
        probe = tmp / "probe.safetensors"
        start = time.perf_counter()
        assert cli_main(["classify", "fit", str(tmp / "train"), "--model", str(backbone), "-o", str(probe), "--size",
                         str(args.size), "--val-fraction", "0.2", "--quiet", *(["--balanced"] if args.balanced else []),
                         "--finetune-epochs", str(args.finetune_epochs), "--finetune-lr", "1e-4"]) == 0  # fmt: skip
        fit_s = time.perf_counter() - start

        start = time.perf_counter()
        assert cli_main(["classify", "map", str(stack), "--probe", str(probe), "-o", str(tmp / "map"), "--quiet",
                         "--probabilities", *(["--tta", args.tta] if args.tta else [])]) == 0  # fmt: skip
        map_s = time.perf_counter() - start
        with rasterio.open(tmp / "map" / "nc_rgb_tile_classes.tif") as src:
            ids, class_names, shape = src.read(1), json.loads(src.tags()["class_names"]), (src.height, src.width)
        with rasterio.open(tmp / "map" / "nc_rgb_tile_probabilities.tif") as src:
            probabilities = src.read()
        truth = np.array([class_names.index(NAMES[labels[t]]) if NAMES[labels[t]] in class_names else -1 for t in test])
        mapped = np.array([ids[t] for t in test])

        # the whole tile map against the land-class raster (its classes named by a tag), as segment evaluate scores
        # any class map: every tile, held-out or not, at its centre pixel
        reference = tmp / "strata_named.tif"
        with rasterio.open(NC / "strata.tif") as src:
            named = src.profile | {"dtype": "uint8", "nodata": 255}
        with rasterio.open(reference, "w", **named) as out:
            out.write(np.where(strata > 0, strata - 1, 255).astype(np.uint8), 1)
            out.update_tags(class_names=json.dumps([NAMES[k] for k in sorted(NAMES)]))
        assert cli_main(["segment", "evaluate", str(tmp / "map" / "nc_rgb_tile_classes.tif"), str(reference), "--out-dir",
                         str(tmp / "evaluate")]) == 0  # fmt: skip
        evaluated = json.loads((tmp / "evaluate" / "metrics.json").read_text())

        start = time.perf_counter()
        assert cli_main(["classify", "predict", str(tmp / "test"), "--probe", str(probe), "-o", str(tmp / "p.csv"),
                         "--quiet", *(["--tta", args.tta] if args.tta else [])]) == 0  # fmt: skip
        predict_s = time.perf_counter() - start
        diff = 0.0
        for row in csv.DictReader((tmp / "p.csv").open()):
            r, c = (int(part[1:]) for part in Path(row["path"]).stem.split("_"))
            diff = max(diff, float(np.abs(probabilities[:, r, c] - [float(row[f"p_{n}"]) for n in class_names]).max()))

        ytrain = np.array([labels[t] for t in train])
        ytest = np.array([labels[t] for t in test])
        scaler = StandardScaler().fit(_colour_features(pixels, train, args.tile))
        colour = LogisticRegression(max_iter=2000, class_weight="balanced" if args.balanced else None).fit(scaler.transform(_colour_features(pixels, train, args.tile)), ytrain)
        colour_predicted = colour.predict(scaler.transform(_colour_features(pixels, test, args.tile)))
        colour_acc = float((colour_predicted == ytest).mean())
        mean_recall = lambda got, want: float(np.mean([(got[want == k] == k).mean() for k in np.unique(want)]))  # noqa: E731
        majority = int(np.bincount(ytrain).argmax())
        tiles = int(np.prod(shape))
        results = {
            "split": args.split, "balanced": args.balanced, "finetune_epochs": args.finetune_epochs, "tta": args.tta, "tile_px": args.tile, "tile_m": args.tile * 28.5, "model_input": args.size, "arch": args.arch,
            "weights": "export" if args.backbone else "random", "grid": list(shape), "labelled_tiles": len(labels),
            "train_tiles": len(train), "test_tiles": len(test),
            "train_classes": {NAMES[k]: int(v) for k, v in zip(*np.unique(ytrain, return_counts=True))},
            "test_classes": {NAMES[k]: int(v) for k, v in zip(*np.unique(ytest, return_counts=True))},
            "map_test_accuracy": round(float((mapped == truth).mean()), 4),
            "map_test_balanced_accuracy": round(mean_recall(mapped, truth), 4),
            "colour_histogram_logistic_accuracy": round(colour_acc, 4),
            "colour_histogram_balanced_accuracy": round(mean_recall(colour_predicted, ytest), 4),
            "majority_class_accuracy": round(float((ytest == majority).mean()), 4),
            "map_vs_predict_max_abs_diff": diff,
            "segment_evaluate_whole_map": {"tiles": evaluated["pixels"], "overall_accuracy": round(evaluated["overall_accuracy"], 4),
                                           "kappa": round(evaluated["kappa"], 4)},
            "write_train_chips_s": round(chips_s, 2), "fit_s": round(fit_s, 2), "map_s": round(map_s, 2), "map_tiles_per_s": round(tiles / map_s, 1),
            "predict_s": round(predict_s, 2), "predict_chips_per_s": round(len(test) / predict_s, 1),
        }  # fmt: skip
        results["from_scene"] = _from_scene(args, tmp, stack, strata, held, backbone, len(test))
        results["multi_label"] = _multi_label(args, tmp, stack, pixels, strata, held, backbone)
        print(json.dumps(results, indent=1))


def _from_scene(args: argparse.Namespace, tmp: Path, stack: Path, strata: np.ndarray, held: Any, backbone: str | Path,
                n_test: int) -> dict[str, Any]:  # fmt: skip
    """The same probe without chips: ``classify fit --scenes`` on the land-class raster masked to the training blocks
    (C chosen on held-out 4 x 4 blocks of them), ``classify test --scenes`` on the raster masked to the held-out
    blocks; tiles with data throughout, one class on >= ``--purity`` of them."""
    rows, cols = np.indices(strata.shape) // args.tile
    in_held = held((rows, cols))
    with rasterio.open(NC / "strata.tif") as src:
        profile = src.profile | {"dtype": "uint8", "nodata": 255}
    paths = {}
    for name, keep in (("train", ~in_held), ("held", in_held)):
        paths[name] = tmp / f"strata_{name}.tif"
        with rasterio.open(paths[name], "w", **profile) as out:
            out.write(np.where((strata > 0) & keep, strata - 1, 255).astype(np.uint8), 1)
            out.update_tags(class_names=json.dumps([NAMES[k] for k in sorted(NAMES)]))
    probe = tmp / "scene_probe.safetensors"
    common = ["--scenes", str(stack), "--tile-size", str(args.tile), "--purity", str(args.purity), "--min-valid", "1",
              "--quiet"]  # fmt: skip
    start = time.perf_counter()
    assert cli_main(["classify", "fit", *common, "--labels", str(paths["train"]), "--model", str(backbone), "-o",
                     str(probe), "--size", str(args.size), *(["--balanced"] if args.balanced else [])]) == 0  # fmt: skip
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    assert cli_main(["classify", "test", *common, "--labels", str(paths["held"]), "--probe", str(probe), "--out-dir",
                     str(tmp / "scene_test")]) == 0  # fmt: skip
    test_s = time.perf_counter() - start
    metrics = json.loads((tmp / "scene_test" / "metrics.json").read_text())
    from dinov3_eo.tasks.chip_classification import ChipClassifier

    info = ChipClassifier.load(probe).embedding["tiles"]
    return {"train_tiles": info["train_tiles"], "c_held_out_tiles": info["held_out_tiles"], "test_tiles": metrics["pixels"],
            "chip_path_test_tiles": n_test, "test_accuracy": round(metrics["overall_accuracy"], 4),
            "test_balanced_accuracy": round(metrics["balanced_accuracy"], 4), "fit_s": round(fit_s, 2),
            "test_s": round(test_s, 2)}  # fmt: skip


def _multi_label(args: argparse.Namespace, tmp: Path, stack: Path, pixels: np.ndarray, strata: np.ndarray, held: Any,
                 backbone: str | Path) -> dict[str, Any]:  # fmt: skip
    """Every whole tile with data throughout, labelled with each land class on >= ``--presence`` of its labelled
    pixels (BigEarthNet's kind of labels): ``classify fit --multi-label`` on the training blocks' tiles (a table in
    shuffled order), ``classify test`` on the held-out ones, against one-vs-rest logistic regressions on colour
    histograms and the training prevalence of each class as every chip's score."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from dinov3_eo.tasks.multilabel_metrics import multilabel_report

    t = args.tile
    sets: dict[tuple[int, int], list[str]] = {}
    for r in range(pixels.shape[1] // t):
        for c in range(pixels.shape[2] // t):
            if (pixels[:, r * t : (r + 1) * t, c * t : (c + 1) * t] == NODATA).any():
                continue
            classes = strata[r * t : (r + 1) * t, c * t : (c + 1) * t]
            values, counts = np.unique(classes[classes > 0], return_counts=True)
            if counts.sum():
                sets[(r, c)] = [NAMES[int(v)] for v, n in zip(values, counts) if n >= args.presence * counts.sum()]
    chips = tmp / "multi"
    _write_chips(stack, sorted(sets), {k: 1 for k in sets}, t, chips)  # one folder; the tables carry the labels
    rng = np.random.default_rng(0)
    split = {"train": [k for k in sets if not held(k)], "test": [k for k in sets if held(k)]}
    for name, keys in split.items():
        rows = [f"{NAMES[1]}/r{r:02d}_c{c:02d}.tif,{';'.join(sets[(r, c)])}" for r, c in keys]
        (chips / f"{name}.csv").write_text("image,labels\n" + "\n".join(rng.permutation(rows)) + "\n")
    probe = chips / "probe.safetensors"
    start = time.perf_counter()
    assert cli_main(["classify", "fit", "--labels", str(chips / "train.csv"), "--multi-label", "--model", str(backbone),
                     "-o", str(probe), "--size", str(args.size), "--val-fraction", "0.2", "--quiet"]) == 0  # fmt: skip
    fit_s = time.perf_counter() - start
    assert cli_main(["classify", "test", "--labels", str(chips / "test.csv"), "--probe", str(probe), "--out-dir",
                     str(chips / "test"), "--quiet"]) == 0  # fmt: skip
    tested = json.loads((chips / "test" / "metrics.json").read_text())
    classes = list(tested["classes"])
    targets = {n: np.array([[c in sets[k] for c in classes] for k in keys]) for n, keys in split.items()}
    features = {n: _colour_features(pixels, keys, t) for n, keys in split.items()}
    scaler = StandardScaler().fit(features["train"])
    colour = np.zeros(targets["test"].shape)
    for j in range(len(classes)):
        column = targets["train"][:, j]
        if 0 < column.sum() < len(column):
            model = LogisticRegression(max_iter=2000).fit(scaler.transform(features["train"]), column)
            colour[:, j] = model.predict_proba(scaler.transform(features["test"]))[:, 1]
        else:
            colour[:, j] = float(column.any())
    prior = np.broadcast_to(targets["train"].mean(axis=0), targets["test"].shape)
    keep = ("map_macro", "map_micro", "f1_micro", "f1_macro")
    summary = lambda r: {key: round(r[key], 4) for key in keep}  # noqa: E731
    return {
        "presence": args.presence, "tiles": len(sets), "train_tiles": len(split["train"]), "test_tiles": len(split["test"]),
        "labels_per_tile": round(float(np.mean([len(v) for v in sets.values()])), 2),
        "test_positives": {c: tested["classes"][c]["positives"] for c in classes},
        "probe": summary(tested), "probe_ap": {c: round(tested["classes"][c]["ap"], 3) for c in classes},
        "colour_histogram_logistic": summary(multilabel_report(colour, targets["test"], classes)),
        "training_prevalence": summary(multilabel_report(prior, targets["test"], classes)),
        "fit_s": round(fit_s, 2),
    }  # fmt: skip


if __name__ == "__main__":
    main()
