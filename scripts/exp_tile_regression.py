"""Tile regressors (``fit_tile_regressor`` / ``score_tile_regressor``) on real data, against two baselines.

Each tile regressor (ridge on the tiles' ``cls+patch_mean`` embeddings, its alpha chosen on 20 % of the training
tiles held out in 4 x 4-tile blocks; and the k-NN one, all training tiles as its bank) is scored on held-out tiles
next to (1) a constant, the mean reference value of the training scenes' tiles, and (2) a ridge regression on
hand-made colour features of each tile (per band: mean, std and an 8-bin histogram over 0..255 of its valid pixels),
fitted with ``fit_regressor`` on the same training tiles and alpha chosen on the same held-out blocks. All rows of a
table are scored on the same test tiles; metrics (MAE, RMSE, R², bias = mean predicted - reference) are pooled over
all of them. The backbone has random weights (``_random_export``) unless ``--backbone`` names an export.

Prediction intervals: the ridge's 90 % split-conformal interval (calibrated on its alpha-choice blocks), that of
a k-NN fitted with the same 20 % of blocks held out to calibrate it (its bank the other 80 %) and that of the colour
ridge (calibrated on the same blocks), scored on the test tiles: the share of references inside (nominal 0.90) and
the median width (better features: a narrower interval at the same coverage).

Model-assisted estimates (B only, where every test tile's forest share is known): the test tiles are the mapped
area; 2,000 random samples of 30 of them play field plots, and each gives the difference estimate of the mean forest
share (``difference_estimate``: the map's mean plus the sample's mean error) with its 95 % interval. Printed: how
often the interval holds the true mean, the estimates' mean error, their mean standard error against the sample
alone's, and the map-only mean's error.

A. NEON Teakettle: 12 RGB plots (400 x 400 px at 0.1 m) with a 1 m LiDAR CHM; 50-px (5 m) tiles, the reference
   the tile's mean height (``--statistics mean p95``); 3 folds by plot (plot i tested in fold i % 3). Every plot's
   tiles are embedded once (``embed_tiles``) and the fits and scores read that table (``embeddings=``, as
   ``regress fit/test --embeddings`` do).
B. North Carolina Landsat-7 (2000, 28.5 m): bands 3, 2, 1 of landsat_multiband.tif; 16-px tiles; the reference is
   the forest share (``equal:5``; class 5 = forest in the GRASS landclass96 strata.tif) of each tile; trained on a
   checkerboard of 4 x 4-tile blocks and tested on the other, each set a copy of strata.tif masked to its blocks.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/exp_tile_regression.py [--arch vits16] [--size 112] [--nc-size 112]
                                                                     [--statistics mean p95] [--backbone export.pth]
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
from bench_pretrain import SHARED  # noqa: E402
from exp_chip_embeddings_eurosat import _random_export  # noqa: E402

from dinov3_eo.data.raster import read_window  # noqa: E402
from dinov3_eo.tasks.chip_embeddings import ChipEmbeddings, load_chip_backbone  # noqa: E402
from dinov3_eo.tasks.tile_classification import embed_tiles, tile_window  # noqa: E402
from dinov3_eo.tasks.tile_regression import (  # noqa: E402
    calibrated,
    fit_regressor,
    fit_tile_regressor,
    interval_metrics,
    regression_metrics,
    score_tile_regressor,
)

NEON = SHARED / "neon_chm"
NC = SHARED / "nc_landsat7"
METHODS = ("tile ridge", "tile k-NN", "colour ridge", "train mean")
INTERVALS = ("tile ridge", "tile k-NN (80 % bank)", "colour ridge")


def colour_features(scenes: list[str], rows: np.ndarray, cols: np.ndarray, tile: int, bands: list[int] | None) -> np.ndarray:
    """Per band: mean, std and an 8-bin histogram over 0..255 (shares) of each tile's valid pixels (the package's
    validity: ``read_window``); zeros for a tile without any."""
    out = []
    handles: dict[str, rasterio.DatasetReader] = {}
    for scene, r, c in zip(scenes, rows, cols):
        src = handles.setdefault(scene, rasterio.open(scene))
        pixels, valid = read_window(src, tile_window(int(r), int(c), tile), bands=bands)
        px = pixels[:, valid].astype(np.float64)
        if not px.shape[1]:
            out.append(np.zeros(len(pixels) * 10))
            continue
        hist = [np.histogram(b, bins=8, range=(0, 256))[0] / b.size for b in px]
        out.append(np.concatenate([px.mean(1), px.std(1), *hist]))
    for src in handles.values():
        src.close()
    return np.array(out)


def run_split(train_scenes, train_values, test_scenes, test_values, backbone, *, tile: int, size: int,
              statistic: str, bands: list[int] | None, embeddings=None) -> tuple[dict, dict, dict]:  # fmt: skip
    """Fit the four methods on the training scenes' tiles, predict the test scenes' tiles: method -> (pred, target),
    the split's record, and the intervals: method -> (lower, upper, target)."""
    common = dict(tile_size=tile, size=size, statistic=statistic, bands=bands, embeddings=embeddings, progress=False)
    start = time.perf_counter()
    fit = fit_tile_regressor(train_scenes, train_values, backbone, val_fraction=0.2, **common)
    knn = fit_tile_regressor(train_scenes, train_values, backbone, method="knn", val_fraction=0.0, **common)
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    scored = score_tile_regressor(fit.regressor, test_scenes, test_values, backbone=backbone, embeddings=embeddings,
                                  progress=False)  # fmt: skip
    knn_scored = score_tile_regressor(knn.regressor, test_scenes, test_values, backbone=backbone, embeddings=embeddings,
                                      progress=False)  # fmt: skip
    score_s = time.perf_counter() - start
    knn_cal = fit_tile_regressor(train_scenes, train_values, backbone, method="knn", val_fraction=0.2, **common)
    knn_cal_scored = score_tile_regressor(knn_cal.regressor, test_scenes, test_values, backbone=backbone,
                                          embeddings=embeddings, progress=False)  # fmt: skip
    intervals = {"tile ridge": (scored.lower, scored.upper, scored.targets),
                 "tile k-NN (80 % bank)": (knn_cal_scored.lower, knn_cal_scored.upper, knn_cal_scored.targets)}  # fmt: skip
    test = scored.tiles
    assert (knn_scored.tiles[["scene", "row", "col"]].to_numpy() == test[["scene", "row", "col"]].to_numpy()).all()
    assert np.array_equal(knn_scored.targets, scored.targets)

    tiles = fit.tiles
    part = {name: tiles[tiles["split"] == name] for name in ("train", "held_out")}
    x = {name: colour_features(list(t["scene"]), t["row"].to_numpy(), t["col"].to_numpy(), tile, bands)
         for name, t in part.items()}  # fmt: skip
    y = {name: t["reference"].to_numpy(np.float64) for name, t in part.items()}
    colour = fit_regressor(x["train"], y["train"], val=(x["held_out"], y["held_out"]) if len(y["held_out"]) else None,
                           lower=fit.regressor.lower, upper=fit.regressor.upper)  # fmt: skip
    x_test = colour_features(list(test["scene"]), test["row"].to_numpy(), test["col"].to_numpy(), tile, bands)
    if len(y["held_out"]):
        colour = calibrated(colour, x["held_out"], y["held_out"])
        intervals["colour ridge"] = (*colour.predict_interval(x_test), scored.targets)
    constant = float(tiles["reference"].mean())  # every tile of the training scenes (train + alpha-choice blocks)
    out = {"tile ridge": (scored.predictions, scored.targets), "tile k-NN": (knn_scored.predictions, scored.targets),
           "colour ridge": (colour.predict(x_test), scored.targets),
           "train mean": (np.full(len(scored.targets), constant), scored.targets)}  # fmt: skip
    info = {"train_tiles": len(part["train"]), "alpha_tiles": len(part["held_out"]), "knn_bank": len(knn.tiles),
            "test_tiles": len(test), "ridge_alpha": fit.regressor.alpha, "colour_alpha": colour.alpha,
            "train_mean": round(constant, 4), "ridge_held_out_rmse": round(fit.regressor.held_out["rmse"], 4),
            "fit_s": round(fit_s, 1), "score_s": round(score_s, 1),
            "ridge_interval": fit.regressor.interval, "knn_interval": knn_cal.regressor.interval}  # fmt: skip
    return out, info, intervals


def pooled_intervals(parts: list[dict]) -> dict[str, dict[str, float]]:
    """Each interval method's coverage on all the test tiles of ``parts`` (one dict per split)."""
    result = {}
    for m in INTERVALS:
        lower, upper, target = (np.concatenate([p[m][i] for p in parts]) for i in range(3))
        result[m] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in
                     interval_metrics(lower, upper, target, 0.9).items()}  # fmt: skip
    return result


def print_intervals(metrics: dict[str, dict[str, float]]) -> None:
    print(f"{'90 % interval':<24}{'inside':>8}{'median width':>14}{'mean width':>12}{'n':>6}")
    for m, r in metrics.items():
        print(f"{m:<24}{r['covered']:>8.3f}{r['median_width']:>14.3f}{r['mean_width']:>12.3f}{r['n']:>6d}")


def pooled(parts: list[dict[str, tuple[np.ndarray, np.ndarray]]]) -> dict[str, dict[str, float]]:
    result = {}
    for m in METHODS:
        pred = np.concatenate([p[m][0] for p in parts])
        target = np.concatenate([p[m][1] for p in parts])
        result[m] = {k: (int(v) if k == "n" else round(float(v), 4)) for k, v in regression_metrics(pred, target).items()}
    return result


def print_table(title: str, metrics: dict[str, dict[str, float]]) -> None:
    print(f"\n{title}\n{'method':<14}{'MAE':>9}{'RMSE':>9}{'R2':>9}{'bias':>9}{'n':>7}")
    for m, r in metrics.items():
        print(f"{m:<14}{r['mae']:>9.3f}{r['rmse']:>9.3f}{r['r2']:>9.3f}{r['bias']:>9.3f}{r['n']:>7d}")


def neon(args: argparse.Namespace, backbone) -> dict:
    rgbs = sorted(str(p) for p in (NEON / "rgb").glob("TEAK_*.tif"))
    chms = [str(NEON / "chm" / f"{Path(p).stem}_CHM.tif") for p in rgbs]
    folds = [list(range(f, len(rgbs), 3)) for f in range(3)]
    start = time.perf_counter()  # every plot's tiles embedded once, for the fits and the scores
    tables = [embed_tiles(p, backbone, [(r, c) for r in range(8) for c in range(8)], tile_size=50, size=args.size,
                          min_valid=0.9, progress=False)[0] for p in rgbs]  # fmt: skip
    table = ChipEmbeddings(paths=[p for t in tables for p in t.paths], cls=np.concatenate([t.cls for t in tables]),
                           patch_mean=np.concatenate([t.patch_mean for t in tables]),
                           sizes=np.concatenate([t.sizes for t in tables]), metadata=tables[0].metadata | {"tile_size": 50})  # fmt: skip
    results = {"embed_all_tiles_s": round(time.perf_counter() - start, 1), "tiles_embedded": len(table)}
    for statistic in args.statistics:
        start = time.perf_counter()
        parts, infos, ends = [], [], []
        for test in folds:
            train = [i for i in range(len(rgbs)) if i not in test]
            out, info, interval = run_split([rgbs[i] for i in train], [chms[i] for i in train], [rgbs[i] for i in test],
                                  [chms[i] for i in test], backbone, tile=50, size=args.size,
                                  statistic=statistic, bands=None, embeddings=table)  # fmt: skip
            parts.append(out)
            ends.append(interval)
            infos.append({"test_plots": [Path(rgbs[i]).stem for i in test], **info})
        metrics, intervals = pooled(parts), pooled_intervals(ends)
        elapsed = time.perf_counter() - start
        print_table(f"A. NEON Teakettle, 5 m tiles, canopy height {statistic} (m), 3 folds by plot ({elapsed:.0f} s)",
                    metrics)  # fmt: skip
        print_intervals(intervals)
        results[statistic] = {"metrics": metrics, "intervals": intervals, "folds": infos, "seconds": round(elapsed, 1)}
    return results


def north_carolina(args: argparse.Namespace, backbone, tmp: Path) -> dict:
    start = time.perf_counter()
    scene, tile = str(NC / "landsat_multiband.tif"), 16
    with rasterio.open(NC / "strata.tif") as src:
        strata, profile = src.read(1), src.profile
    rows, cols = np.indices(strata.shape) // tile
    held = (rows // 4 + cols // 4) % 2 == 1  # a checkerboard of 4 x 4-tile blocks (1.8 km)
    paths = {}
    for name, keep in (("train", ~held), ("test", held)):
        paths[name] = str(tmp / f"strata_{name}.tif")
        with rasterio.open(paths[name], "w", **profile) as out:
            out.write(np.where(keep & (strata > 0), strata, profile["nodata"]).astype(profile["dtype"]), 1)
    out, info, interval = run_split([scene], paths["train"], [scene], paths["test"], backbone, tile=tile,
                                    size=args.nc_size, statistic="equal:5", bands=[3, 2, 1])  # fmt: skip
    # the package's forest share of the test tiles against one computed here from the array (grid alignment check)
    target = out["tile ridge"][1]
    from dinov3_eo.tasks.tile_values import value_tiles

    found = value_tiles(scene, paths["test"], tile_size=tile, statistic="equal:5")
    direct = np.array([_share(strata, r, c, tile) for r, c in found.cells])
    info["reference_vs_numpy_max_abs_diff"] = float(np.abs(direct - found.values).max())
    info["test_forest_share_mean"] = round(float(target.mean()), 4)
    metrics, intervals = pooled([out]), pooled_intervals([interval])
    info["model_assisted"] = model_assisted(out)
    elapsed = time.perf_counter() - start
    print_table(f"B. North Carolina Landsat-7, 456 m tiles, forest share (0..1), checkerboard blocks ({elapsed:.0f} s)",
                metrics)  # fmt: skip
    print_intervals(intervals)
    return {"metrics": metrics, "intervals": intervals, "split": info, "seconds": round(elapsed, 1)}


def model_assisted(out: dict, n: int = 30, draws: int = 2000, seed: int = 0) -> dict:
    """Difference estimates of the mean over the test tiles from ``draws`` random samples of ``n`` of them."""
    from dinov3_eo.tasks.map_estimate import difference_estimate

    rng = np.random.default_rng(seed)
    result = {}
    print(f"{'model-assisted, ' + str(n) + ' plots':<24}{'95 % holds':>11}{'mean error':>12}{'SE':>8}{'SE alone':>10}"
          f"{'map-only error':>16}")  # fmt: skip
    for m in ("tile ridge", "tile k-NN", "colour ridge"):
        pred, target = out[m]
        truth = float(target.mean())
        estimates = [difference_estimate(pred, pred[s], target[s]) for s in
                     (rng.choice(len(target), n, replace=False) for _ in range(draws))]  # fmt: skip
        row = {"covered": float(np.mean([e.low <= truth <= e.high for e in estimates])),
               "mean_error": float(np.mean([e.mean for e in estimates]) - truth),
               "standard_error": float(np.mean([e.standard_error for e in estimates])),
               "sample_alone_standard_error": float(np.mean([e.sample_standard_error for e in estimates])),
               "map_only_error": float(pred.mean() - truth), "n": n, "draws": draws, "true_mean": truth}  # fmt: skip
        result[m] = row
        print(f"{m:<24}{100 * row['covered']:>10.1f}%{row['mean_error']:>12.4f}{row['standard_error']:>8.4f}"
              f"{row['sample_alone_standard_error']:>10.4f}{row['map_only_error']:>16.4f}")  # fmt: skip
    return result


def _share(strata: np.ndarray, r: int, c: int, tile: int) -> float:
    cut = strata[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
    cut = cut[cut > 0]
    return float((cut == 5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vits16", help="random-weight architecture (default vits16)")
    parser.add_argument("--backbone", default=None, help="an exported backbone (default: random weights of --arch)")
    parser.add_argument("--size", type=int, default=112, help="model input size of a NEON tile (default 112)")
    parser.add_argument("--nc-size", type=int, default=112, help="model input size of a Landsat tile (default 112)")
    parser.add_argument("--statistics", nargs="+", default=["mean", "p95"], help="NEON tile statistics")
    parser.add_argument("--skip", choices=("neon", "nc"), default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        source = args.backbone or _random_export(args.arch, tmp)
        backbone = load_chip_backbone(source)
        results = {"arch": args.arch, "weights": "export" if args.backbone else "random", "size": args.size,
                   "nc_size": args.nc_size, "device": backbone.device}  # fmt: skip
        if args.skip != "neon":
            results["neon"] = neon(args, backbone)
        if args.skip != "nc":
            results["north_carolina"] = north_carolina(args, backbone, tmp)
    results["total_s"] = round(time.perf_counter() - started, 1)
    print(f"\ntotal {results['total_s']:.0f} s")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
