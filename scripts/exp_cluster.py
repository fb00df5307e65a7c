"""Real-data experiment: how well do unsupervised clusters (``dinov3-eo cluster``) follow land cover?

Two labelled scenes, read in place from ``../shared/data`` and never copied:

* **NC Landsat-7** (5 bands, 28.5 m, GPL-3.0): ``landsat_multiband.tif`` against the 7-class ``strata.tif`` (loaded
  as in ``scripts/exp_segment_nc.py``);
* **Dubai aerial tiles 4–5** (RGB, sub-metre, licence unconfirmed: evaluation only): every image written as a GeoTIFF
  on an arbitrary grid (as in ``scripts/exp_openvocab_dubai.py``), its mask's classes 0–4 scored, 5 and 255 ignored;
  one set of centroids is fit over all the images, so a cluster means the same thing in each.

Methods, each at k = the number of classes and at twice that:

(a) k-means on the pixels' band values (z-scored; scikit-learn, Euclidean): the classic unsupervised classification;
(b) ``fit_clusters`` + ``cluster_raster`` on a micro ViT with random weights;
(c) the same on a pretrained backbone: ``--pretrained PATH`` (any ``load_backbone`` source, e.g. a SAT-493M export),
    else, for NC only, a micro ViT pretrained here for ``--ssl-steps`` DINOv3 steps on the scene's own imagery.

Scores over the labelled pixels: normalised mutual information and adjusted Rand index (0 = chance, 1 = the labels),
the accuracy of the best one-to-one matching of clusters to classes (k = classes; Hungarian) and of mapping every
cluster to its majority class (many-to-one, which more clusters can only help).

    .venv/bin/python scripts/exp_cluster.py [--pretrained PATH] [--ssl-steps 150] [--datasets nc dubai]
"""

from __future__ import annotations

import argparse
import glob
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_openvocab_dubai import as_geotiff  # noqa: E402
from exp_segment_nc import DATA as NC_DATA  # noqa: E402
from exp_segment_nc import load_scene, pretrain_here  # noqa: E402

from dinov3_eo.data.normalization import Normalization  # noqa: E402
from dinov3_eo.models.vit import build_backbone  # noqa: E402
from dinov3_eo.tasks.clustering import cluster_raster, fit_clusters  # noqa: E402

DUBAI = Path(__file__).resolve().parents[2] / "shared" / "data" / "dubai_seg"


def scores(truth: np.ndarray, pred: np.ndarray, n_classes: int, k: int) -> dict[str, float]:
    """NMI, ARI, one-to-one (k == classes) and many-to-one accuracy of cluster ids against class ids."""
    table = np.zeros((k, n_classes), dtype=np.int64)
    np.add.at(table, (pred, truth), 1)
    out = {"nmi": normalized_mutual_info_score(truth, pred), "ari": adjusted_rand_score(truth, pred),
           "many_to_one": table.max(axis=1).sum() / table.sum()}  # fmt: skip
    if k == n_classes:
        rows, cols = linear_sum_assignment(-table)
        out["one_to_one"] = table[rows, cols].sum() / table.sum()
    return out


def pixel_kmeans(images: list[np.ndarray], valids: list[np.ndarray], k: int, seed: int) -> list[np.ndarray]:
    """k-means on z-scored band values, fit on <= 50,000 valid pixels of all images, every pixel assigned."""
    pixels = np.concatenate([im[:, v].T for im, v in zip(images, valids)]).astype(np.float64)
    mean, std = pixels.mean(axis=0), pixels.std(axis=0) + 1e-9
    rng = np.random.default_rng(seed)
    fit_on = pixels[rng.choice(len(pixels), min(50_000, len(pixels)), replace=False)]
    model = KMeans(k, n_init=4, random_state=seed).fit((fit_on - mean) / std)
    out = []
    for im in images:
        flat = (im.reshape(im.shape[0], -1).T.astype(np.float64) - mean) / std
        out.append(model.predict(np.nan_to_num(flat)).reshape(im.shape[1:]))
    return out


def feature_clusters(backbone: torch.nn.Module, paths: list[Path], norm: Normalization | None, k: int, *, nodata: float | None,
                     work: Path, seed: int, layers: int = 1) -> list[np.ndarray]:  # fmt: skip
    clusters = fit_clusters(backbone, paths, k, normalization=norm, nodata=nodata, seed=seed, layers=layers,
                            progress=False)  # fmt: skip
    out = []
    for path in paths:
        result = cluster_raster(backbone, clusters, path, work, nodata=nodata, quicklook=False, overwrite=True,
                                progress=False)  # fmt: skip
        with rasterio.open(result.classes) as src:
            out.append(src.read(1).astype(np.int64))
    return out


def evaluate(name: str, truths: list[np.ndarray], preds: list[np.ndarray], n_classes: int, k: int) -> dict[str, float]:
    keep = [(t >= 0) & (t < n_classes) & (p < k) for t, p in zip(truths, preds)]
    truth = np.concatenate([t[m] for t, m in zip(truths, keep)])
    pred = np.concatenate([p[m] for p, m in zip(preds, keep)])
    result = scores(truth, pred, n_classes, k)
    one = f"{result['one_to_one']:.3f}" if "one_to_one" in result else "  -  "
    print(f"  {name:<44} k={k:<3d} NMI {result['nmi']:.3f}  ARI {result['ari']:.3f}  one-to-one {one}  "
          f"many-to-one {result['many_to_one']:.3f}", flush=True)  # fmt: skip
    return result


def run_nc(args: argparse.Namespace, work: Path) -> None:
    image, valid, mask = load_scene()  # [5, H, W], [H, W], [H, W] (0..6, 255 ignore)
    truth = np.where(mask == 255, -1, mask).astype(np.int64)
    pixels = image[:, valid]
    norm = Normalization.zscore(pixels.mean(axis=1), pixels.std(axis=1))
    path = NC_DATA / "landsat_multiband.tif"
    print(f"\nNC Landsat-7 {image.shape[1]}x{image.shape[2]}, 7 classes, {(truth >= 0).sum()} labelled pixels")
    torch.manual_seed(args.seed)
    random_net = build_backbone("vitmicro16", in_chans=5).eval()
    if args.pretrained:
        from dinov3_eo.models.hub import load_backbone

        pretrained, what = load_backbone(args.pretrained, in_chans=5).eval(), args.pretrained
    else:
        pretrained, what = pretrain_here(norm, steps=args.ssl_steps, seed=args.seed, work=work)
    for k in (7, 14):
        started = time.perf_counter()
        evaluate("(a) pixel k-means (5 bands, z-scored)", [truth], pixel_kmeans([image], [valid], k, args.seed), 7, k)
        for label, net in (("(b) features, random micro ViT", random_net), (f"(c) features, {what[:40]}", pretrained)):
            preds = feature_clusters(net, [path], norm, k, nodata=None, work=work, seed=args.seed, layers=args.layers)
            evaluate(label, [truth], preds, 7, k)
        print(f"  ({time.perf_counter() - started:.1f} s)")


def run_dubai(args: argparse.Namespace, work: Path) -> None:
    images = sorted(glob.glob(str(DUBAI / "tile4" / "images" / "*.jpg")) + glob.glob(str(DUBAI / "tile5" / "images" / "*.jpg")))
    paths, arrays, truths = [], [], []
    for image in images:
        path = as_geotiff(image, work)
        mask_path = Path(image).parent.parent / "masks" / (Path(image).stem + ".png")
        from PIL import Image

        truth = np.asarray(Image.open(mask_path)).astype(np.int64)
        truths.append(np.where(truth < 5, truth, -1))
        with rasterio.open(path) as src:
            arrays.append(src.read())
        paths.append(path)
    n_px = sum(int((t >= 0).sum()) for t in truths)
    print(f"\nDubai tiles 4-5: {len(paths)} images, 5 classes, {n_px} labelled pixels")
    norm = Normalization.preset("imagenet")
    torch.manual_seed(args.seed)
    nets = [("(b) features, random micro ViT", build_backbone("vitmicro16", in_chans=3).eval())]
    if args.pretrained:
        from dinov3_eo.models.hub import load_backbone

        nets.append((f"(c) features, {args.pretrained[:40]}", load_backbone(args.pretrained, in_chans=3).eval()))
    valids = [np.ones(a.shape[1:], dtype=bool) for a in arrays]
    for k in (5, 10):
        started = time.perf_counter()
        evaluate("(a) pixel k-means (RGB, z-scored)", truths, pixel_kmeans(arrays, valids, k, args.seed), 5, k)
        for label, net in nets:
            preds = feature_clusters(net, paths, norm, k, nodata=None, work=work, seed=args.seed, layers=args.layers)
            evaluate(label, truths, preds, 5, k)
        print(f"  ({time.perf_counter() - started:.1f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=None, help="a backbone export to evaluate besides random weights")
    parser.add_argument("--ssl-steps", type=int, default=150, help="steps of the NC pretraining when no --pretrained")
    parser.add_argument("--datasets", nargs="+", default=["nc", "dubai"], choices=["nc", "dubai"])
    parser.add_argument("--layers", type=int, default=1, help="the last LAYERS blocks' features, cosine averaged")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="exp_cluster_") as tmp:
        if "nc" in args.datasets:
            if NC_DATA.is_dir():
                run_nc(args, Path(tmp))
            else:
                print(f"skipped NC: {NC_DATA} is not here", file=sys.stderr)
        if "dubai" in args.datasets:
            if DUBAI.is_dir():
                run_dubai(args, Path(tmp))
            else:
                print(f"skipped Dubai: {DUBAI} is not here", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
