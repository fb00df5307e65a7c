"""Chip embeddings from the command line feed a k-NN: ``dinov3-eo embed --chips`` on ../shared/data/eurosat_rgb_dev.

Writes a backbone export (random weights unless ``--backbone`` names an export: no pretrained weights reach this
machine) with the SAT-493M normalisation, runs ``dinov3-eo embed DIR --chips -o table.parquet --size S`` for each
size, and reports for each: chips/s, whether its CLS rows equal ``scripts/bench_pretrain.py``'s own feature code
(an independent implementation), and k-NN accuracy (k=20, cosine, DINO vote weights; 140 training chips per class,
the rest tested: bench_pretrain's split) of ``cls``, ``patch_mean`` and both concatenated, against bench_pretrain's
colour-histogram baseline; then ``dinov3-eo classify fit`` (linear probe and k-NN, 30 % of each class held out; the
linear probe again from the embedding table, ``--embeddings``) against a logistic regression on colour histograms
over the same split.

    python scripts/exp_chip_embeddings_eurosat.py [--arch vits16] [--sizes 64 224] [--backbone export.pth]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import SHARED, _eurosat_split, _load_chips, backbone_features, colour_features, knn_accuracy  # noqa: E402

from dinov3_eo.cli import main as cli_main  # noqa: E402
from dinov3_eo.tasks.chip_embeddings import read_chip_embeddings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--backbone", default=None, help="an exported backbone (default: random weights)")
    args = parser.parse_args()
    train, train_y, test, test_y, _ = _eurosat_split(per_class_train=140)
    row = {p: i for i, p in enumerate([str(Path(p).resolve()) for p in [*train, *test]])}
    labels = np.array([*train_y, *test_y])
    n_train = len(train)
    results: dict = {"chips": len(row), "train": n_train, "test": len(row) - n_train,
                     "colour_histogram_knn": knn_accuracy(*_split(colour_features(_load_chips([*train, *test])), labels, n_train))}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        backbone_path = args.backbone or _random_export(args.arch, Path(tmp))
        for size in args.sizes:
            out = Path(tmp) / f"e{size}.parquet"
            start = time.perf_counter()
            assert cli_main(["embed", str(SHARED / "eurosat_rgb_dev"), "--chips", "--model", str(backbone_path), "-o",
                             str(out), "--size", str(size), "--batch-size", "64", "--quiet"]) == 0  # fmt: skip
            seconds = time.perf_counter() - start
            table = read_chip_embeddings(out)
            order = np.array([row[str(Path(p).resolve())] for p in table.paths])
            cls, mean = np.empty_like(table.cls), np.empty_like(table.patch_mean)
            cls[order], mean[order] = table.cls, table.patch_mean  # rows in the split's order
            results[f"size_{size}"] = {"seconds": round(seconds, 1), "chips_per_s": round(len(table) / seconds, 1)}
            results[f"size_{size}"].update(_knn(cls, mean, labels, n_train))
            results[f"size_{size}"]["cls_max_abs_diff_vs_bench_pretrain"] = _independent(backbone_path, cls, train, test, size)
        results["classify_fit"] = _classify(backbone_path, Path(tmp), args.sizes[0])
    print(json.dumps(results, indent=1))


def _classify(backbone_path: Path, tmp: Path, size: int) -> dict:
    """``dinov3-eo classify fit`` on the whole dev set (30 % of each class held out, seed 0): the linear probe's and
    the k-NN's held-out accuracy, and a logistic regression on colour histograms over the same split."""
    from sklearn.linear_model import LogisticRegression

    from dinov3_eo.data.datasets import expand_chips
    from dinov3_eo.tasks.chip_classification import ChipClassifier, folder_labels, stratified_split

    out: dict = {"size": size, "held_out_fraction": 0.3}
    for method in ("linear", "knn"):
        probe = tmp / f"{method}.safetensors"
        start = time.perf_counter()
        assert cli_main(["classify", "fit", str(SHARED / "eurosat_rgb_dev"), "--model", str(backbone_path), "-o", str(probe),
                         "--method", method, "--val-fraction", "0.3", "--size", str(size), "--batch-size", "64",
                         "--quiet"]) == 0  # fmt: skip
        fitted = ChipClassifier.load(probe)
        out[method] = {"held_out_accuracy": round(fitted.held_out_accuracy, 4), "C": fitted.c,
                       "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    # the linear probe again from the embedding table written above (embed --chips), not embedding the chips again
    start = time.perf_counter()
    assert cli_main(["classify", "fit", str(SHARED / "eurosat_rgb_dev"), "--embeddings", str(tmp / f"e{size}.parquet"),
                     "-o", str(tmp / "from_table.safetensors"), "--val-fraction", "0.3", "--quiet"]) == 0  # fmt: skip
    from_table = ChipClassifier.load(tmp / "from_table.safetensors")
    out["linear_from_embedding_table"] = {"held_out_accuracy": round(from_table.held_out_accuracy, 4), "C": from_table.c,
                                          "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    paths = expand_chips(str(SHARED / "eurosat_rgb_dev"))
    labels = np.array(folder_labels(paths))
    train, held = stratified_split(labels.tolist(), 0.3, 0)
    colours = colour_features(_load_chips(paths))
    model = LogisticRegression(max_iter=2000).fit(colours[train], labels[train])
    out["colour_histogram_logistic"] = round(float((model.predict(colours[held]) == labels[held]).mean()), 4)
    return out


def _split(x: np.ndarray, labels: np.ndarray, n_train: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]


def _knn(cls: np.ndarray, mean: np.ndarray, labels: np.ndarray, n_train: int) -> dict[str, float]:
    both = np.concatenate([cls / np.linalg.norm(cls, axis=1, keepdims=True),
                           mean / np.linalg.norm(mean, axis=1, keepdims=True)], axis=1)  # fmt: skip
    return {f"{name}_knn": round(knn_accuracy(*_split(x, labels, n_train)), 4)
            for name, x in (("cls", cls), ("patch_mean", mean), ("cls+patch_mean", both))}  # fmt: skip


def _random_export(arch: str, folder: Path) -> Path:
    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.models.hub import BackboneMeta, export_backbone
    from dinov3_eo.models.vit import build_backbone

    torch.manual_seed(0)
    model = build_backbone(arch, in_chans=3)
    meta = BackboneMeta(name=arch, in_chans=3, patch_size=model.patch_size, embed_dim=model.embed_dim,
                        normalization=Normalization.preset("sat493m").to_dict())  # fmt: skip
    return export_backbone(model, folder / arch, meta=meta)["pth"]


def _independent(backbone_path: Path, cls: np.ndarray, train: list[str], test: list[str], size: int) -> float:
    """Largest difference between the table's CLS rows and bench_pretrain's own CLS code on the first 64 chips."""
    from dinov3_eo.tasks.features import resolve_backbone

    backbone = resolve_backbone(backbone_path)
    theirs = backbone_features(backbone, _load_chips([*train, *test][:64]), size=size)
    return float(np.abs(theirs - cls[:64]).max())


if __name__ == "__main__":
    main()
