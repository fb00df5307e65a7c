"""Real-data experiment: linear heads on DINOv3 features vs a per-pixel random forest, North Carolina Landsat-7.

Data (../shared/data/nc_landsat7, GPL-3.0, read in place, never copied): the 5-band Landsat-7 stack
``landsat_multiband.tif`` (float32, nodata -99999, EPSG:32119, 28.5 m) and the 7-class land-class map
``strata.tif`` (classes 1..7, stored in EPSG:3358: warped onto the image grid with nearest resampling).

Region split: the west part of the scene (columns < 240) trains, the east part (columns >= 240) tests; each
part's features are computed from that part alone, so no test pixel is seen by a trained component.

Three models, all evaluated by per-class IoU on the east part's labelled pixels (mIoU over the classes present):

(a) a linear head (official protocol: BatchNorm + 1x1 conv on the frozen last-layer patch tokens, bilinear
    upsampling) on a *pretrained* backbone: the first ``*.pth`` in /work/pretrained (our pretraining stage's
    export; RGB weights are inflated to 5 bands), or, when none is there, a backbone pretrained here for
    ``--ssl-steps`` DINOv3 steps (64-px global crops) on the scene's own unlabelled imagery;
(b) the same head on the same architecture with random weights;
(c) a random forest (scikit-learn, 200 trees) on the five spectral values of each pixel.

With ``--losses``, head (a) is trained again with each training loss named (``ce``, ``ce+dice``, ``focal``,
``lovasz``..., as ``segment fit --model.loss`` takes them; ``SPEC:balanced`` or ``SPEC:balanced_sqrt`` adds class
weights from the west part's class counts, as ``--model.class_weights balanced`` does), on the same features.

    .venv/bin/python scripts/exp_segment_nc.py [--pretrained PATH] [--ssl-steps 150] [--epochs 300]
        [--losses ce ce+dice ce:balanced focal lovasz]
"""

from __future__ import annotations

import argparse
import glob
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F

from dinov3_eo.data.labels import RasterLabels
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.losses.segmentation import class_weights_from_counts, parse_segmentation_loss, segmentation_loss_terms
from dinov3_eo.models.dense import LinearHead
from dinov3_eo.tasks.segmentation import iou_f1_from_confusion

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nc_landsat7"
CLASS_NAMES = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]
SPLIT_COL = 240  # a multiple of 16: the west part's patch grid starts at column 0 like the east part's
IGNORE = 255


def load_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 [5, H, W], valid bool [H, W], labels int64 [H, W] in 0..6 or 255)."""
    with rasterio.open(DATA / "landsat_multiband.tif") as src:
        image = src.read().astype(np.float32)
        valid = ~((image == src.nodata) | np.isnan(image)).any(axis=0)
        crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    labels = RasterLabels(path=DATA / "strata.tif", task="classification", ignore_index=IGNORE)
    mask = labels.sample(crs=crs, transform=transform, shape=shape, valid=valid)["mask"].numpy()
    mask = np.where((mask >= 1) & (mask <= 7), mask - 1, IGNORE)  # classes 1..7 -> ids 0..6
    return image, valid, mask


def miou(truth: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, np.ndarray]:
    keep = truth != IGNORE
    confusion = np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    iou, _ = iou_f1_from_confusion(torch.from_numpy(confusion))
    iou = iou.numpy()
    return float(np.nanmean(iou)), iou


def patch_features(backbone: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """[C, H, W] normalised -> last-layer normed patch tokens [D, ceil(H/16), ceil(W/16)] (zero-padded bottom/right)."""
    c, h, w = image.shape
    padded = F.pad(image, (0, -w % 16, 0, -h % 16))  # [C, Hp, Wp]
    with torch.inference_mode():
        (tokens,) = backbone.get_intermediate_layers(padded[None], n=1, reshape=True, norm=True)
    return tokens[0].clone()


def train_linear_head(feats: torch.Tensor, size: tuple[int, int], mask: np.ndarray, *, epochs: int, seed: int,
                      loss: str = "ce", class_weight: torch.Tensor | None = None) -> LinearHead:
    """Fit the official linear head on frozen features of the training part (full-batch AdamW) with a
    ``segment fit`` loss spec."""
    terms = parse_segmentation_loss(loss)
    torch.manual_seed(seed)
    head = LinearHead(in_channels=feats.shape[0], out_channels=len(CLASS_NAMES))
    target = torch.from_numpy(mask)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    head.train()
    for _ in range(epochs):
        logits = head_logits(head, feats, size)
        values = segmentation_loss_terms(logits[None], target[None], terms, ignore_index=IGNORE, class_weight=class_weight)
        optimizer.zero_grad()
        torch.stack(list(values.values())).sum().backward()
        optimizer.step()
        scheduler.step()
    return head.eval()


def head_logits(head: LinearHead, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[D, h, w] -> [K, H, W]: head on the patch grid, bilinear to the padded pixel grid, cropped to ``size``."""
    h, w = feats.shape[-2:]
    logits = head([feats[None]], output_size=(h * 16, w * 16))[0]  # [K, 16h, 16w]
    return logits[:, : size[0], : size[1]]


def evaluate_backbone(backbone: torch.nn.Module, norm_image: torch.Tensor, mask: np.ndarray, *, epochs: int, seed: int,
                      losses: tuple[str, ...] = ("ce",)) -> list[tuple[float, np.ndarray]]:
    """(mIoU, per-class IoU) on the east part of a linear head trained on the west part with each loss variant
    (``SPEC`` or ``SPEC:WEIGHTING``); the features are computed once."""
    west, east = norm_image[:, :, :SPLIT_COL], norm_image[:, :, SPLIT_COL:]
    west_feats, east_feats = patch_features(backbone, west), patch_features(backbone, east)
    west_mask = mask[:, :SPLIT_COL]
    results = []
    for variant in losses:
        spec, _, weighting = variant.partition(":")
        class_weight = None
        if weighting:
            counts = np.bincount(west_mask[west_mask != IGNORE], minlength=len(CLASS_NAMES))
            class_weight = torch.tensor(class_weights_from_counts(counts, weighting), dtype=torch.float32)
        head = train_linear_head(west_feats, tuple(west.shape[1:]), west_mask, epochs=epochs, seed=seed, loss=spec,
                                 class_weight=class_weight)  # fmt: skip
        with torch.no_grad():
            pred = head_logits(head, east_feats, tuple(east.shape[1:])).argmax(0).numpy()
        results.append(miou(mask[:, SPLIT_COL:], pred, len(CLASS_NAMES)))
    return results


def pretrain_here(norm_stats: Normalization, *, steps: int, seed: int, work: Path) -> tuple[torch.nn.Module, str]:
    """A vitmicro16 pretrained for ``steps`` DINOv3 steps on the scene's imagery (no labels)."""
    import lightning.pytorch as pl

    from dinov3_eo.data.datamodule import PretrainDataModule
    from dinov3_eo.data.stats import BandStats
    from dinov3_eo.ssl.module import DINOv3Pretrain

    stats_path = work / "nc_stats.json"
    BandStats(bands=[f"B{i}" for i in range(1, 6)], count=[1] * 5, mean=list(norm_stats.mean), std=list(norm_stats.std),
              min=[0.0] * 5, max=[0.0] * 5, percentiles={}).save(stats_path)  # fmt: skip
    data = PretrainDataModule(paths=str(DATA / "landsat_multiband.tif"), normalization="zscore", stats=str(stats_path),
                              tile_size=96, tiles_per_epoch=steps * 8, batch_size=8, cache_dir=None, seed=seed)  # fmt: skip
    module = DINOv3Pretrain(
        backbone="vitmicro16", in_chans=5, dino_out_dim=1024, dino_hidden_dim=256, dino_bottleneck_dim=64,
        ibot_out_dim=1024, ibot_hidden_dim=256, ibot_bottleneck_dim=64, global_crop_size=64, local_crop_size=32,
        n_local_crops=2, base_lr=2e-3, scale_lr_with_batch=False, lr_warmup_steps=min(30, steps // 10),
        teacher_temp_warmup_steps=min(30, steps // 10), momentum_teacher=0.99, seed=seed,
    )  # fmt: skip
    pl.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
               limit_val_batches=0, default_root_dir=str(work)).fit(module, data)  # fmt: skip
    return module.teacher["backbone"].eval(), f"vitmicro16 pretrained here for {steps} DINOv3 steps on the NC imagery"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=None, help="backbone export (default: first /work/pretrained/*.pth)")
    parser.add_argument("--ssl-steps", type=int, default=150, help="steps of the fallback pretraining on the scene")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch epochs of the linear heads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", nargs="+", default=None,
                        help="also train head (a) with these losses (ce+dice, focal, lovasz, ce:balanced...)")
    parser.add_argument("--work", default="runs/exp_segment_nc")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        print(f"skipped: {DATA} is not here", file=sys.stderr)
        return 0
    torch.manual_seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    image, valid, mask = load_scene()
    train_valid = valid[:, :SPLIT_COL]
    train_pixels = image[:, :, :SPLIT_COL][:, train_valid]  # [5, N] statistics of the training part only
    norm = Normalization.zscore(train_pixels.mean(axis=1), train_pixels.std(axis=1))
    norm_image = norm(torch.from_numpy(image)).masked_fill(~torch.from_numpy(valid), 0.0)
    counts = np.bincount(mask[mask != IGNORE], minlength=7)
    print(f"scene {image.shape}, labelled pixels per class {dict(zip(CLASS_NAMES, counts.tolist()))}")
    print(f"train: columns < {SPLIT_COL} ({(mask[:, :SPLIT_COL] != IGNORE).sum()} px), "
          f"test: columns >= {SPLIT_COL} ({(mask[:, SPLIT_COL:] != IGNORE).sum()} px)")  # fmt: skip

    results: dict[str, tuple[float, np.ndarray, str]] = {}
    started = time.perf_counter()
    source = args.pretrained or next(iter(sorted(glob.glob("/work/pretrained/*.pth"))), None)
    if source is not None:
        from dinov3_eo.models.hub import load_backbone

        pretrained = load_backbone(source, in_chans=5).eval()
        what = f"{source} ({pretrained.meta.name})"
    else:
        pretrained, what = pretrain_here(norm, steps=args.ssl_steps, seed=args.seed, work=work)
    variants = ("ce", *(v for v in args.losses or () if v != "ce"))
    for variant, (m, iou) in zip(variants, evaluate_backbone(pretrained, norm_image, mask, epochs=args.epochs,
                                                              seed=args.seed, losses=variants)):  # fmt: skip
        name = "(a) linear head, pretrained backbone" + ("" if variant == "ce" else f", loss {variant}")
        results[name] = (m, iou, what)

    from dinov3_eo.models.vit import DinoVisionTransformer

    arch = {**pretrained.arch, "in_chans": 5}
    torch.manual_seed(args.seed)
    random_net = DinoVisionTransformer(**arch).eval()
    ((m, iou),) = evaluate_backbone(random_net, norm_image, mask, epochs=args.epochs, seed=args.seed)
    results["(b) linear head, random backbone"] = (m, iou, "same architecture, random init")

    from sklearn.ensemble import RandomForestClassifier

    train_mask = mask[:, :SPLIT_COL]
    keep = train_mask != IGNORE
    x_train = image[:, :, :SPLIT_COL][:, keep].T
    rf = RandomForestClassifier(n_estimators=200, n_jobs=2, random_state=args.seed).fit(x_train, train_mask[keep])
    east = image[:, :, SPLIT_COL:]
    pred = rf.predict(east.reshape(5, -1).T).reshape(east.shape[1:])
    m, iou = miou(mask[:, SPLIT_COL:], pred.astype(np.int64), len(CLASS_NAMES))
    results["(c) per-pixel random forest"] = (m, iou, f"200 trees on the 5 bands, {len(x_train)} training pixels")

    print(f"\nmIoU on the east part (classes present), {time.perf_counter() - started:.0f} s:")
    for name, (m, iou, note) in results.items():
        per_class = ", ".join(f"{c} {v:.2f}" for c, v in zip(CLASS_NAMES, iou) if not np.isnan(v))
        print(f"  {name:<56} mIoU {m:.3f}   [{note}]\n      {per_class}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
