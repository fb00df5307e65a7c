"""Real-imagery experiment: change maps from DINOv3 feature distances vs change vector analysis (pixel differences).

No open multi-date pair is at hand, so the *after* date is the bundled Landsat-8 scene (public domain, 448 x 928 px
at 30 m) with real land cover pasted over four 48-80 px blocks (river over fields, fields over the river, one field
over another, town over fields): the change is known pixel for pixel. Three versions of the after date:

* ``pasted``: the blocks alone;
* ``pasted + light``: also a different illumination, haze and response (per band a gamma of 0.8 / 0.9 / 1.15 on
  the values scaled to their 99.9th percentile, a gain of 1.25 / 1.10 / 0.90 and +600 DN), the non-change that
  separates two real acquisitions, not all of it affine;
* ``pasted + shift``: also misregistered by one pixel (30 m) down and right, the other everyday nuisance.

Methods, each with the after date as it is (radiometry ``none``) and moment-matched to the before date per band
(``match``, ``detect_change``'s default), each scored by the ROC AUC of its score (changed block pixels against every other valid pixel) and the IoU
of its Otsu mask with the blocks:

* ``CVA``: change vector analysis, the classical baseline: the Euclidean distance between the two dates' z-scored
  pixel vectors (the before date's statistics for both);
* ``CVA 16 px``: the same averaged over 16 x 16 px (a patch's footprint: a like-for-like resolution);
* ``ViT random``: ``detect_change`` with a micro ViT's random weights;
* ``ViT pretrained``: ``detect_change`` with a micro ViT pretrained by ``dinov3-eo quickstart`` on the before scene
  (``--steps`` DINOv3 steps; or ``--backbone PATH``).

    .venv/bin/python scripts/exp_change_landsat.py [--steps 300] [--backbone PATH]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.hub import load_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.change import detect_change, otsu_threshold

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
#: (target rows, target cols, donor top-left): land cover copied from the donor onto the target
PASTES = [
    ((slice(150, 230), slice(120, 200)), (560, 300)),  # river over fields
    ((slice(560, 624), slice(300, 364)), (120, 100)),  # fields over the river
    ((slice(330, 378), slice(40, 88)), (250, 300)),  # one field over another
    ((slice(800, 864), slice(330, 394)), (860, 40)),  # town (bottom-left) over fields
]


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC from ranks (Mann-Whitney U), ties averaged."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def otsu_iou(scores: np.ndarray, positive: np.ndarray, top: float) -> float:
    counts, edges = np.histogram(scores, bins=2000, range=(0.0, top))
    cut = otsu_threshold(counts, edges)
    flagged = scores > cut
    return float((flagged & positive).sum() / (flagged | positive).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="quickstart pretraining steps (without --backbone)")
    parser.add_argument("--backbone", default=None, help="a pretrained backbone export instead of the quickstart's")
    args = parser.parse_args()
    torch.set_num_threads(2)
    with rasterio.open(SAMPLE) as src:
        before = src.read()
        profile = {**src.profile, "nodata": 0}
    valid = (before > 0).all(axis=0)
    mean = np.array([b[valid].mean() for b in before])[:, None, None]
    std = np.array([b[valid].std() for b in before])[:, None, None]
    normalization = Normalization.zscore(mean.ravel().tolist(), std.ravel().tolist())

    pasted = before.copy()
    changed = np.zeros(valid.shape, dtype=bool)
    for (rows, cols), (r0, c0) in PASTES:
        h, w = rows.stop - rows.start, cols.stop - cols.start
        pasted[:, rows, cols] = before[:, r0 : r0 + h, c0 : c0 + w]
        changed[rows, cols] = True
    gain, offset = np.array([1.25, 1.10, 0.90])[:, None, None], 600.0
    gamma = np.array([0.8, 0.9, 1.15])[:, None, None]  # not affine: moment matching cannot undo all of it
    top = np.array([np.percentile(b[valid], 99.9) for b in pasted])[:, None, None]
    curved = (np.clip(pasted / top, 0, None) ** gamma) * top
    lit = np.where(valid, np.clip(curved * gain + offset, 1, 65535), 0).astype(np.uint16)
    shifted = np.zeros_like(pasted)
    shifted[:, 1:, 1:] = pasted[:, :-1, :-1]
    scenarios = {"pasted": pasted, "pasted + light": lit, "pasted + shift": shifted}

    with tempfile.TemporaryDirectory(prefix="exp_change_") as tmp:
        tmp = Path(tmp)
        if args.backbone is None:
            from dinov3_eo.quickstart import run

            started = time.perf_counter()
            files = run(tmp / "quickstart", steps=args.steps, head_epochs=1, progress=False)
            pretrained = load_backbone(files["backbone_pth"]).eval()
            print(f"pretrained a micro ViT for {args.steps} steps in {time.perf_counter() - started:.0f} s")
        else:
            pretrained = load_backbone(args.backbone).eval()
        torch.manual_seed(0)
        backbones = {"ViT random": build_backbone("vitmicro16", in_chans=3).eval(), "ViT pretrained": pretrained}
        before_path = tmp / "before.tif"
        with rasterio.open(before_path, "w", **profile) as dst:
            dst.write(before)

        rows = []
        for scenario, after in scenarios.items():
            after_path = tmp / f"after_{len(rows)}.tif"
            with rasterio.open(after_path, "w", **profile) as dst:
                dst.write(after)
            both = valid & (after > 0).all(axis=0)
            positive = changed[both]
            za = (before - mean) / std
            results, seconds = {}, {}
            for radiometry in ("none", "match"):
                zb = (after - mean) / std
                if radiometry == "match":  # the after date given the before date's moments, as detect_change does
                    a, b = after[:, both].astype(np.float64), before[:, both].astype(np.float64)
                    gain = b.std(axis=1) / a.std(axis=1)
                    matched = gain[:, None, None] * after + (b.mean(axis=1) - gain * a.mean(axis=1))[:, None, None]
                    zb = (matched - mean) / std
                cva = np.sqrt(((zb - za) ** 2).sum(axis=0))
                cva16 = F.avg_pool2d(torch.from_numpy(np.where(both, cva, 0.0))[None, None], 17, stride=1, padding=8,
                                     count_include_pad=False)[0, 0].numpy()  # fmt: skip
                results[("CVA", radiometry)] = cva[both]
                results[("CVA 16 px", radiometry)] = cva16[both]
                for name, backbone in backbones.items():
                    started = time.perf_counter()
                    summary = detect_change(backbone, before_path, after_path, tmp / f"{name}_{radiometry}_{len(rows)}.tif",
                                            normalization=normalization, radiometry=radiometry, threshold=None,
                                            window=256, progress=False)  # fmt: skip
                    seconds[(name, radiometry)] = time.perf_counter() - started
                    with rasterio.open(summary.score) as src:
                        score = src.read(1)
                    results[(name, radiometry)] = np.nan_to_num(score[both], nan=0.0)
            for (name, radiometry), scores in results.items():
                top = 2.0 if name.startswith("ViT") else float(np.percentile(scores, 99.9)) * 1.01
                rows.append((scenario, name, radiometry, auc(scores, positive), otsu_iou(scores, positive, top),
                             seconds.get((name, radiometry))))  # fmt: skip

    print(f"\n{'after date':<16} {'method':<15} {'radiometry':<10} {'AUC':>6} {'Otsu IoU':>9} {'time':>7}")
    for scenario, name, radiometry, a, iou, sec in rows:
        print(f"{scenario:<16} {name:<15} {radiometry:<10} {a:6.3f} {iou:9.3f} {'' if sec is None else f'{sec:6.1f}s':>7}")


if __name__ == "__main__":
    main()
