"""Conformal prediction sets of the chip probes (``classify fit --coverage``) on real chips: EuroSAT RGB.

The 2,000 EuroSAT dev chips (10 classes, 200 each; ../shared/data/eurosat_rgb_dev) in ``--draws`` random splits per
feature set: 800 chips fit a linear probe (``fit_chip_classifier``, C chosen on 400 more), those 400 calibrate 90 %
sets (``calibrate_sets``), and the other 800 test them. Two feature sets: the colour features of
``bench_pretrain.colour_features`` (per-band mean, std, 8-bin histograms) and a random-weight ViT's CLS
and mean patch tokens (``--arch``, SAT-493M normalisation, chips at ``--size`` px). Printed per feature set: the test accuracy of the top
class, the share of test chips whose set holds their class (nominal 0.90), the mean set size, the share of
one-class sets and the accuracy on those.

    .venv/bin/python scripts/exp_prediction_sets_eurosat.py [--arch vits16] [--size 64] [--draws 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import _eurosat_split, _load_chips, colour_features  # noqa: E402

from dinov3_eo.models.hub import build_backbone  # noqa: E402
from dinov3_eo.tasks.chip_classification import calibrate_sets, fit_chip_classifier  # noqa: E402
from dinov3_eo.tasks.conformal import set_metrics  # noqa: E402


@torch.no_grad()
def vit_features(backbone: torch.nn.Module, chips: np.ndarray, size: int) -> np.ndarray:
    """``[N, 2D]``: each chip's CLS token and mean patch token (``cls+patch_mean``, what the probes read), chips
    at ``size`` px with the SAT-493M normalisation."""
    from dinov3_eo.data.normalization import Normalization

    norm, out = Normalization.preset("sat493m"), []
    backbone.eval()
    for i in range(0, len(chips), 64):
        x = norm(torch.from_numpy(chips[i : i + 64]).permute(0, 3, 1, 2).float())
        if size != x.shape[-1]:
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        tokens = backbone.forward_features(x)
        out.append(torch.cat([tokens["x_norm_clstoken"], tokens["x_norm_patchtokens"].mean(1)], 1).numpy())
    return np.concatenate(out)


def draws(x: np.ndarray, y: np.ndarray, classes: list[str], n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        order = rng.permutation(len(y))
        fit, cal, test = order[:800], order[800:1200], order[1200:]
        probe = fit_chip_classifier(x[fit], y[fit], classes, features="cls+patch_mean", val=(x[cal], y[cal]))
        calibrate_sets(probe, probe.scores(x[cal]), y[cal], 0.9)
        scores = probe.scores(x[test])
        sets = probe.prediction_sets(scores)
        got = set_metrics(sets, y[test], 0.9)
        single = sets.sum(1) == 1
        got["top1_accuracy"] = float((scores.argmax(1) == y[test]).mean())
        got["singleton_accuracy"] = float((scores.argmax(1)[single] == y[test][single]).mean()) if single.any() else None
        rows.append(got)
    keys = ("top1_accuracy", "covered", "mean_size", "singletons", "singleton_accuracy", "empty")
    values = {k: np.array([np.nan if r[k] is None else r[k] for r in rows], float) for k in keys}
    return {k: {stat: float(f(v)) if np.isfinite(v).any() else None for stat, f in
                (("mean", np.nanmean), ("min", np.nanmin), ("max", np.nanmax))} for k, v in values.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()
    started = time.perf_counter()
    train, train_y, test, test_y, classes = _eurosat_split(per_class_train=200)
    paths, y = train + test, np.array(train_y + test_y)
    chips = _load_chips(paths)
    torch.manual_seed(0)
    backbone = build_backbone(args.arch)
    features = {"colour": colour_features(chips), f"random {args.arch}": vit_features(backbone, chips, args.size)}
    results = {"chips": len(y), "draws": args.draws, "arch": args.arch, "size": args.size}
    print(f"{'features':<22}{'top-1':>8}{'in set':>9}{'size':>7}{'one class':>11}{'its acc.':>10}{'none':>7}")
    for name, x in features.items():
        got = results[name] = draws(x, y, classes, args.draws)
        m = {k: np.nan if v["mean"] is None else v["mean"] for k, v in got.items()}
        print(f"{name:<22}{m['top1_accuracy']:>8.3f}{m['covered']:>9.3f}{m['mean_size']:>7.2f}{m['singletons']:>11.3f}"
              f"{m['singleton_accuracy']:>10.3f}{m['empty']:>7.3f}   (in set {got['covered']['min']:.3f}-"
              f"{got['covered']['max']:.3f} over the draws)")  # fmt: skip
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
