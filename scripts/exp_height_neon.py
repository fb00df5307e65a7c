"""Canopy height on the 12 NEON Teakettle plots: frozen DINOv3 features + dense head vs simple baselines.

Train on some plots and evaluate on the others (split by plot, k-fold so every plot is tested once), at the
CHM's 1 m grid:

* ``mean``: the training-plots' mean height everywhere;
* ``gbm``: a per-pixel gradient-boosting regressor (sklearn ``HistGradientBoostingRegressor``, absolute-error
  loss) on simple image features of each 1 m cell: mean / std / quantiles of R, G, B and brightness over its
  0.1 m pixels, excess green, gradient energy, and brightness statistics of the 3 x 3 and 5 x 5 cell
  neighbourhoods;
* ``dpt`` / ``linear`` heads (L1 loss, 64 mixlog bins) on the frozen features of a backbone with *random*
  weights and, when available, of a *pretrained* backbone (``--pretrained``, default: the first ``*.pth`` in
  /work/pretrained).

The imagery is averaged from 0.1 m to ``--gsd`` (0.2 m: 5 x 5 pixels per 1 m cell); heights are warped onto
that grid with :class:`~dinov3_eo.tasks.height_data.HeightLabels` (bilinear) for training; predictions are
averaged back into 1 m cells for evaluation. Backbone features are computed once per plot and flip/rotation
(the backbone is frozen), so head training only runs the head.

    .venv/bin/python scripts/exp_height_neon.py [--data ../shared/data/neon_chm] [--out runs/exp_height_neon]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from scipy import ndimage

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.dense import DenseModel, DPTHead, LinearHead, LogitsToHeight
from dinov3_eo.models.hub import infer_architecture, load_backbone
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.inference.tta import dihedral
from dinov3_eo.tasks.height import even_layers
from dinov3_eo.tasks.height_data import HeightLabels
from dinov3_eo.tasks.height_metrics import HeightMetrics, metrics_table
from dinov3_eo.tasks.height_plots import scatter_plot

RGB_NODATA = 255
CELL = 1.0  # CHM cell size (m)


def load_plot(rgb_path: str, chm_path: str, gsd: float) -> dict:
    """RGB averaged to ``gsd`` (nodata-aware), heights on that grid (bilinear), CHM at 1 m, and 1 m features."""
    with rasterio.open(rgb_path) as src:
        raw = src.read().astype(np.float32)  # [3, 400, 400] at 0.1 m
        native = abs(src.transform.a)
        crs, transform = src.crs, src.transform
    valid = ~(raw == RGB_NODATA).any(axis=0)
    f = int(round(gsd / native))
    c, h, w = raw.shape
    blocks = raw.reshape(c, h // f, f, w // f, f)
    weight = valid.reshape(h // f, f, w // f, f)
    counts = weight.sum(axis=(1, 3))
    image = (blocks * weight).sum(axis=(2, 4)) / np.maximum(counts, 1)  # [3, h/f, w/f]
    image_valid = counts > 0
    grid = transform @ rasterio.Affine.scale(f)
    heights = HeightLabels(paths=chm_path).read(crs=crs, transform=grid, shape=image.shape[1:])
    with rasterio.open(chm_path) as src:
        chm = src.read(1).astype(np.float32)
        chm[chm == src.nodata] = np.nan
    chm = np.maximum(chm, 0, where=np.isfinite(chm), out=chm)
    return {"name": Path(rgb_path).stem, "image": image, "valid": image_valid, "heights": heights, "chm": chm,
            "features": cell_features(raw, valid, int(round(CELL / native)))}  # fmt: skip


def cell_features(raw: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Simple per-1 m-cell colour and texture features from the 0.1 m RGB: ``[n_features, H/k, W/k]``.

    Cells whose pixels are all nodata get NaN features (the gradient-boosting model handles missing values).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nodata cells: NaN is the intended answer
        return _cell_features(raw, valid, k)


def _cell_features(raw: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    x = np.where(valid, raw, np.nan) / 255.0  # [3, H, W]
    bright = np.nanmean(x, axis=0)  # [H, W]
    exg = 2 * x[1] - x[0] - x[2]
    gy, gx = np.gradient(np.nan_to_num(bright, nan=np.nanmean(bright)))
    grad = np.hypot(gx, gy)
    h, w = bright.shape

    def cells(a: np.ndarray) -> np.ndarray:  # [H, W] -> [H/k, W/k, k*k]
        return a.reshape(h // k, k, w // k, k).transpose(0, 2, 1, 3).reshape(h // k, w // k, k * k)

    feats = []
    for band in (*x, bright):
        cb = cells(band)
        feats += [np.nanmean(cb, -1), np.nanstd(cb, -1), np.nanpercentile(cb, 10, axis=-1), np.nanpercentile(cb, 90, axis=-1)]
    feats += [np.nanmean(cells(exg), -1), np.nanmean(cells(grad), -1), np.nanmean(cells(bright < 0.15), -1)]
    cell_bright = feats[12]  # mean brightness per cell
    filled = np.nan_to_num(cell_bright, nan=np.nanmean(cell_bright))
    for size in (3, 5):
        mean = ndimage.uniform_filter(filled, size, mode="reflect")
        sq = ndimage.uniform_filter(filled**2, size, mode="reflect")
        feats += [mean, np.sqrt(np.maximum(sq - mean**2, 0)), cell_bright - mean]
    return np.stack(feats).astype(np.float32)


def make_backbone(kind: str, pretrained: str | None, arch: str) -> torch.nn.Module:
    if kind == "pretrained":
        return load_backbone(pretrained)
    if pretrained is not None:  # random weights of the pretrained architecture
        ref = load_backbone(pretrained)
        name, overrides = infer_architecture(ref.state_dict())
        torch.manual_seed(0)
        return build_backbone(name, in_chans=ref.in_chans, **overrides).eval()
    torch.manual_seed(0)
    return build_backbone(arch).eval()


@torch.no_grad()
def cache_features(model: DenseModel, plots: list[dict], norm: Normalization) -> dict:
    """Backbone features of every plot under all 8 flips/rotations: ``{(plot, k): [(patch, cls), ...]}``."""
    out = {}
    for i, p in enumerate(plots):
        x = norm(torch.from_numpy(p["image"]))
        x = x.masked_fill(~torch.from_numpy(p["valid"]), 0.0)[None]  # [1, 3, H, W]
        for k in range(8):
            xk = dihedral(x, k)
            left, right, top, bottom = model.padding(*xk.shape[-2:])
            out[(i, k)] = [(f.squeeze(0), c.squeeze(0)) for f, c in model.features(F.pad(xk, (left, right, top, bottom)))]
    return out


def head_forward(model: DenseModel, feats: list[tuple[torch.Tensor, torch.Tensor]], size: tuple[int, int]) -> torch.Tensor:
    """Head + metres on (batched) cached features of a padded input of ``size`` pixels: ``[B, 1, *size]``."""
    out = model.output(model.head(feats))
    return out if tuple(out.shape[-2:]) == size else F.interpolate(out, size=size, mode="bilinear", align_corners=False)


def train_head(model: DenseModel, cache: dict, plots: list[dict], train_ids: list[int], *, steps: int, batch: int,
               crop: int, lr: float, seed: int) -> None:  # fmt: skip
    """L1 on random ``crop`` x ``crop``-patch windows of the cached feature grids (all 8 orientations)."""
    patch = model.patch_size
    params = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    targets = {}
    for i in train_ids:
        t = torch.from_numpy(plots[i]["heights"])
        t[~torch.from_numpy(plots[i]["valid"])] = float("nan")
        targets[i] = t
    model.head.train()
    for _ in range(steps):
        feats_b, tgt_b = [], []
        for _ in range(batch):
            i, k = int(rng.choice(train_ids)), int(rng.integers(8))
            layers = cache[(i, k)]
            t = dihedral(targets[i], k)
            left, _, top, _ = model.padding(*t.shape)
            tp = F.pad(t, (left, left + 64, top, top + 64), value=float("nan"))  # padded grid (extra NaN margin)
            gh, gw = layers[0][0].shape[-2:]
            r, c = int(rng.integers(gh - crop + 1)), int(rng.integers(gw - crop + 1))
            feats_b.append([(f[:, r : r + crop, c : c + crop], cls) for f, cls in layers])
            tgt_b.append(tp[r * patch : (r + crop) * patch, c * patch : (c + crop) * patch])
        feats = [(torch.stack([fb[j][0] for fb in feats_b]), torch.stack([fb[j][1] for fb in feats_b])) for j in range(len(feats_b[0]))]
        target = torch.stack(tgt_b)  # [B, crop*p, crop*p]
        pred = head_forward(model, feats, tuple(target.shape[-2:]))
        keep = torch.isfinite(target)
        loss = (pred[:, 0][keep] - target[keep]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.head.eval()


@torch.no_grad()
def predict_plot(model: DenseModel, cache: dict, i: int, shape: tuple[int, int]) -> np.ndarray:
    """Heights on the plot's ``gsd`` grid from its features in the original orientation (no test-time augmentation)."""
    layers = cache[(i, 0)]
    feats = [(f[None], c[None]) for f, c in layers]
    left, right, top, bottom = model.padding(*shape)
    size = (shape[0] + top + bottom, shape[1] + left + right)
    out = head_forward(model, feats, size)[0, 0]
    return out[top : top + shape[0], left : left + shape[1]].numpy()


def to_cells(pred: np.ndarray, valid: np.ndarray, k: int) -> np.ndarray:
    """Average a ``gsd``-grid prediction into 1 m cells (``k`` pixels a side), ignoring invalid pixels."""
    h, w = pred.shape
    p = np.where(valid, pred, np.nan).reshape(h // k, k, w // k, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-nodata cell has no prediction (NaN)
        return np.nanmean(p, axis=(1, 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="../shared/data/neon_chm")
    ap.add_argument("--out", default="runs/exp_height_neon")
    ap.add_argument("--pretrained", default=None, help="backbone weights (default: first *.pth in /work/pretrained)")
    ap.add_argument("--arch", default="vits16", help="random-weight architecture when no pretrained backbone exists")
    ap.add_argument("--gsd", type=float, default=0.2)
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--crop", type=int, default=6, help="training window in patches (even, for the DPT)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--heads", nargs="+", default=["dpt", "linear"])
    ap.add_argument("--backbones", nargs="+", choices=["random", "pretrained"], default=None,
                    help="default: random, plus pretrained when weights are found")
    ap.add_argument("--normalization", default="sat493m",
                    help="a preset for every backbone's input (default sat493m), or 'stored' to use the pretrained "
                         "checkpoint's own normalisation")
    args = ap.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.pretrained is None:
        found = sorted(glob.glob("/work/pretrained/*.pth"))
        args.pretrained = found[0] if found else None

    rgbs = sorted(glob.glob(f"{args.data}/rgb/*.tif"))
    plots = [load_plot(r, f"{args.data}/chm/{Path(r).stem}_CHM.tif", args.gsd) for r in rgbs]
    k_cell = int(round(CELL / args.gsd))
    folds = [list(range(f, len(plots), args.folds)) for f in range(args.folds)]  # plot i -> fold i % folds
    print(f"{len(plots)} plots, folds (test plots) {[[plots[i]['name'] for i in f] for f in folds]}")

    backbones = args.backbones or (["random"] + (["pretrained"] if args.pretrained else []))
    if "pretrained" in backbones and not args.pretrained:
        raise SystemExit("exp_height_neon: --backbones pretrained needs --pretrained (no weights in /work/pretrained).")
    methods = ["mean", "gbm"] + [f"{h} ({b})" for b in backbones for h in args.heads]
    acc = {m: HeightMetrics() for m in methods}
    scatter: dict[str, tuple[list, list]] = {m: ([], []) for m in methods}
    timings: dict[str, float] = {}

    def record(method: str, pred_cells: np.ndarray, chm: np.ndarray) -> None:
        acc[method].update(pred_cells, chm)
        scatter[method][0].append(pred_cells.ravel())
        scatter[method][1].append(chm.ravel())

    from sklearn.ensemble import HistGradientBoostingRegressor

    t0 = time.perf_counter()
    for test in folds:
        train = [i for i in range(len(plots)) if i not in test]
        train_heights = np.concatenate([plots[i]["chm"][np.isfinite(plots[i]["chm"])] for i in train])
        xs = np.concatenate([plots[i]["features"].reshape(plots[i]["features"].shape[0], -1).T for i in train])
        ys = np.concatenate([plots[i]["chm"].ravel() for i in train])
        keep = np.isfinite(ys)
        gbm = HistGradientBoostingRegressor(loss="absolute_error", max_iter=300, learning_rate=0.05, random_state=0)
        gbm.fit(xs[keep], ys[keep])
        for i in test:
            chm = plots[i]["chm"]
            record("mean", np.full_like(chm, train_heights.mean()), chm)
            f = plots[i]["features"]
            record("gbm", gbm.predict(f.reshape(f.shape[0], -1).T).reshape(chm.shape).astype(np.float32), chm)
    timings["baselines"] = time.perf_counter() - t0

    meta_norm = None
    for kind in backbones:
        t0 = time.perf_counter()
        vit = make_backbone(kind, args.pretrained, args.arch)
        meta = getattr(vit, "meta", None)
        # the same input normalisation for every backbone, so only the weights differ
        norm_dict = getattr(meta, "normalization", None) if args.normalization == "stored" else None
        norm = Normalization.from_dict(norm_dict) if norm_dict else Normalization.preset(
            "sat493m" if args.normalization == "stored" else args.normalization
        )
        meta_norm = meta_norm or norm.name
        layers = even_layers(vit.n_blocks)
        probe = DenseModel(backbone=vit, head=torch.nn.Identity(), layers=layers, pad_multiple=32)
        cache = cache_features(probe, plots, norm)
        timings[f"features ({kind})"] = time.perf_counter() - t0
        print(f"{kind}: {vit.name if hasattr(vit, 'name') else meta.name} D={vit.embed_dim}, layers {layers}, "
              f"features in {timings[f'features ({kind})']:.0f} s, normalisation {norm.name}")  # fmt: skip
        for head_kind in args.heads:
            t0 = time.perf_counter()
            method = f"{head_kind} ({kind})"
            for fold, test in enumerate(folds):
                train = [i for i in range(len(plots)) if i not in test]
                torch.manual_seed(fold)
                if head_kind == "dpt":
                    head = DPTHead(embed_dim=vit.embed_dim, out_channels=64, channels=32, post_process_channels=(16, 32, 64, 128),
                                   n_hidden_channels=16)  # fmt: skip
                else:
                    head = LinearHead(in_channels=[vit.embed_dim] * len(layers), out_channels=64, use_cls_token=True)
                model = DenseModel(backbone=vit, head=head, layers=layers, pad_multiple=32,
                                   output=LogitsToHeight(n_bins=64, max_height=96.0))  # fmt: skip
                train_head(model, cache, plots, train, steps=args.steps, batch=args.batch, crop=args.crop, lr=args.lr, seed=fold)
                for i in test:
                    pred = predict_plot(model, cache, i, plots[i]["image"].shape[1:])
                    record(method, to_cells(pred, plots[i]["valid"], k_cell), plots[i]["chm"])
            timings[method] = time.perf_counter() - t0
            print(f"{method}: MAE {acc[method].compute()['all']['mae']:.2f} m ({timings[method]:.0f} s)")

    results = {m: acc[m].compute() for m in methods}
    table = metrics_table(results)
    for m in methods:
        slug = m.replace(" ", "_").replace("(", "").replace(")", "")
        scatter_plot(out / f"scatter_{slug}.png", np.concatenate(scatter[m][0]), np.concatenate(scatter[m][1]), title=m)
    payload = {
        "plots": [p["name"] for p in plots], "folds": [[plots[i]["name"] for i in f] for f in folds],
        "gsd": args.gsd, "pretrained": args.pretrained, "random_arch": args.arch if not args.pretrained else "same as pretrained",
        "steps": args.steps, "batch": args.batch, "crop_patches": args.crop, "lr": args.lr,
        "normalisation": meta_norm, "timings_s": timings, "total_s": time.perf_counter() - started, "results": results,
    }  # fmt: skip
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, out / "results.json")
    print(table)
    print(f"total {time.perf_counter() - started:.0f} s; results in {out}")


if __name__ == "__main__":
    main()
