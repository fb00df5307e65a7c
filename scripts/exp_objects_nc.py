"""Object-based classification on a real scene: ``objects`` → ``embed --zones`` → ``classify fit/test --zones`` on the
North Carolina Landsat-7 scene, next to the tile path of ``exp_tile_classes_nc.py`` on the same split.

../shared/data/nc_landsat7 holds a Landsat-7 (2000) scene, 489 x 443 px at 28.5 m, and a full 7-class land-class
map on the same grid (GPL data: read here, never copied into the project). Bands 3, 2, 1 are stacked into one
GeoTIFF and cut into SLIC objects of ``--size-ha`` (default 20.8 ha: the area of the tile experiment's 16-px tiles);
each object with one land class on at least ``--purity`` of its labelled pixels is labelled by it. The split is the
tile experiment's: a checkerboard of 4 x 4-tile blocks (64 px, 1.8 km), an object on the side of its representative
point. Objects are embedded by a random-weight ``--arch`` (as the tile experiment's) with the scene read ``--upsample``
times finer (4: the tiles' 16 px resized to 64), a linear probe is fitted on the training objects (``C`` on 20 % of
them) and scored on the held-out ones, per object and per pixel (objects differ in size), next to a logistic
regression on the objects' band means, one on their band means, standard deviations, log area and compactness (the
classic OBIA features), and the majority class.

    python scripts/exp_objects_nc.py [--arch vits16] [--size-ha 20.8] [--upsample 4] [--purity 0.6] [--backbone export.pth]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from exp_chip_embeddings_eurosat import _random_export  # noqa: E402
from exp_tile_classes_nc import NAMES, NODATA, _stack  # noqa: E402

from dinov3_eo.cli import main as cli_main  # noqa: E402


def object_classes(ids: np.ndarray, strata: np.ndarray, purity: float) -> dict[int, int]:
    """Each object's land class: the majority of its labelled pixels when it holds at least ``purity`` of them."""
    n = int(ids.max()) + 1
    counts = np.zeros((n, 8), np.int64)
    np.add.at(counts, (ids.ravel().astype(np.int64), np.nan_to_num(strata.ravel()).clip(0, 7).astype(np.int64)), 1)
    labelled = counts[:, 1:].sum(axis=1)
    best = counts[:, 1:].argmax(axis=1) + 1
    share = counts[np.arange(n), best] / np.maximum(labelled, 1)
    return {i: int(best[i]) for i in range(1, n) if labelled[i] > 0 and share[i] >= purity}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--size-ha", type=float, default=20.8)
    parser.add_argument("--upsample", type=int, default=4)
    parser.add_argument("--purity", type=float, default=0.6)
    parser.add_argument("--backbone", default=None, help="an export to use instead of random weights")
    args = parser.parse_args()
    import geopandas as gpd
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        stack = tmp / "nc_rgb.tif"
        pixels, strata = _stack(stack)
        start = time.perf_counter()
        assert cli_main(["objects", str(stack), "-o", str(tmp / "objects.gpkg"), "--size", str(args.size_ha),
                         "--nodata", str(NODATA), "--labels", str(tmp / "ids.tif"), "--quiet", "--no-quicklook"]) == 0  # fmt: skip
        objects_s = time.perf_counter() - start
        with rasterio.open(tmp / "ids.tif") as src:
            ids, transform = src.read(1), src.transform
        classes = object_classes(ids, strata, args.purity)
        objects = gpd.read_file(tmp / "objects.gpkg")
        inner = objects.geometry.representative_point()
        rows, cols = rasterio.transform.rowcol(transform, inner.x.to_numpy(), inner.y.to_numpy())
        held = (np.asarray(rows) // 64 + np.asarray(cols) // 64) % 2 == 1
        label = np.array([NAMES.get(classes.get(int(i), 0), "") for i in objects["object_id"]], dtype=object)
        objects["train_label"] = np.where(~held & (label != ""), label, None)
        objects["test_label"] = np.where(held & (label != ""), label, None)
        objects.to_file(tmp / "labelled.gpkg")
        backbone = args.backbone or _random_export(args.arch, tmp)
        start = time.perf_counter()
        assert cli_main(["embed", str(stack), "--zones", str(tmp / "labelled.gpkg"), "--model", str(backbone),
                         "--nodata", str(NODATA), "--upsample", str(args.upsample), "-o", str(tmp / "objects.parquet"),
                         "--quiet"]) == 0  # fmt: skip
        embed_s = time.perf_counter() - start
        probe = tmp / "probe.safetensors"
        assert cli_main(["classify", "fit", "--zones", str(tmp / "objects.parquet"), "--label-column", "train_label",
                         "--val-fraction", "0.2", "-o", str(probe)]) == 0  # fmt: skip
        assert cli_main(["classify", "predict", "--zones", str(tmp / "objects.parquet"), "--probe", str(probe), "-o",
                         str(tmp / "predicted.parquet")]) == 0  # fmt: skip
        predicted = gpd.read_parquet(tmp / "predicted.parquet")
        test = predicted["test_label"].notna().to_numpy()
        train = predicted["train_label"].notna().to_numpy()
        truth, got = predicted["test_label"][test].to_numpy(), predicted["class"][test].to_numpy()
        weight = predicted["pixels"][test].to_numpy()
        means = predicted[[c for c in predicted.columns if c.startswith("mean_band_")]].to_numpy()
        scaler = StandardScaler().fit(means[train])
        colour = LogisticRegression(max_iter=2000).fit(scaler.transform(means[train]), predicted["train_label"][train])
        colour_got = colour.predict(scaler.transform(means[test]))
        # the classic OBIA classifier: spectral means, their spread within the object (texture) and its shape
        spread = predicted[[c for c in predicted.columns if c.startswith("std_band_")]].to_numpy()
        shape = np.stack([np.log(predicted["area_m2"].to_numpy()), predicted["compactness"].to_numpy()], 1)
        handmade = np.concatenate([means, spread, shape], 1)
        scaler = StandardScaler().fit(handmade[train])
        obia = LogisticRegression(max_iter=2000).fit(scaler.transform(handmade[train]), predicted["train_label"][train])
        obia_got = obia.predict(scaler.transform(handmade[test]))
        majority = predicted["train_label"][train].value_counts().idxmax()
        mean_recall = lambda g, w: float(np.mean([(g[w == k] == k).mean() for k in np.unique(w)]))  # noqa: E731
        results = {
            "arch": args.arch, "weights": "export" if args.backbone else "random", "size_ha": args.size_ha,
            "upsample": args.upsample, "objects": len(objects), "mean_object_ha": round(float(objects["area_m2"].mean()) / 1e4, 2),
            "labelled_objects": int((label != "").sum()), "train_objects": int(train.sum()), "test_objects": int(test.sum()),
            "test_classes": {k: int(v) for k, v in zip(*np.unique(truth, return_counts=True))},
            "object_accuracy": round(float((got == truth).mean()), 4),
            "object_balanced_accuracy": round(mean_recall(got, truth), 4),
            "pixel_weighted_accuracy": round(float(((got == truth) * weight).sum() / weight.sum()), 4),
            "band_mean_logistic_accuracy": round(float((colour_got == truth).mean()), 4),
            "band_mean_logistic_balanced_accuracy": round(mean_recall(colour_got, truth), 4),
            "mean_std_shape_logistic_accuracy": round(float((obia_got == truth).mean()), 4),
            "mean_std_shape_logistic_balanced_accuracy": round(mean_recall(obia_got, truth), 4),
            "majority_class_accuracy": round(float((truth == majority).mean()), 4),
            "objects_s": round(objects_s, 2), "embed_s": round(embed_s, 2),
        }  # fmt: skip
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
