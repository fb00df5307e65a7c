"""Open-vocabulary segmentation on the Dubai aerial tiles with the five class names as queries.

Evaluation only: ``../shared/data/dubai_seg`` (licence unconfirmed) is read in place and never copied. Tiles 1–3
train, tiles 4–5 test. A frozen backbone (the /work/pretrained export when present, else random weights) is
aligned with a small text tower from scratch on fixed random 128-px crops of the training images: captions name
the classes covering each crop ("an aerial image of road and building."), and the dense term pulls each patch
token towards its class's text. Test images are then segmented through the streaming predictor
(:meth:`MapQuery.segment`: template-ensembled class names, 128-px windows, 25 % overlap, blended) and scored
by mIoU over the five classes (mask value 5 "unlabelled" ignored). Baselines: chance (uniform random labels)
and a supervised linear head (official linear protocol) on the same frozen features and crops, streamed alike.
The linear head is also trained with the backbone adapted (``--finetune``: LoRA updates of rank ``--lora-rank`` on
every block's q/k/v and output projections, or every weight at a tenth of the head's lr), on the same crops for the
same steps, and with other training losses (``--head-losses ce+dice lovasz ce:balanced``: ``segment fit``'s
``--model.loss`` and ``--model.class_weights``; the baseline head's initial weights, crops and steps, the crops in a
second fixed order, which the baseline ``ce`` head is trained again in when named). Every model is evaluated without
and with each test-time augmentation of ``--tta``.

    python scripts/exp_openvocab_dubai.py [--data ../shared/data/dubai_seg] [--epochs 60] [--tta none flips d4]
        [--finetune lora full] [--head-losses ce ce+dice lovasz ce:balanced]
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from PIL import Image
from rasterio.transform import from_origin

from dinov3_eo.inference.predict import predict_raster
from dinov3_eo.losses.contrastive import dense_text_alignment_loss
from dinov3_eo.losses.segmentation import class_weights_from_counts, parse_segmentation_loss, segmentation_loss_terms
from dinov3_eo.models.dense import DenseModel, LinearHead
from dinov3_eo.tasks.captions import ChipMaskDataset, LabelCaptionDataset
from dinov3_eo.losses.contrastive import grouped_clip_loss
from dinov3_eo.tasks.openvocab import MapQuery, TextAlignmentTask, adapt_tokens
from dinov3_eo.tasks.prompts import REMOTE_SENSING_TEMPLATES

CLASSES = ["building", "land", "road", "vegetation", "water"]
TEXT = {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
CROP = 128


def as_geotiff(image: str, folder: Path) -> Path:
    """The JPEG as a GeoTIFF on an arbitrary 1 m grid: the tiles carry no georeference, which every prediction
    command requires (its outputs must land on a map)."""
    pixels = np.asarray(Image.open(image).convert("RGB")).transpose(2, 0, 1)  # [3, H, W] uint8
    dst = folder / (Path(image).parent.parent.name + "_" + Path(image).stem + ".tif")
    with rasterio.open(dst, "w", driver="GTiff", width=pixels.shape[2], height=pixels.shape[1], count=3,
                       dtype="uint8", crs="EPSG:3857", transform=from_origin(0, pixels.shape[1], 1, 1)) as out:
        out.write(pixels)
    return dst


def miou(pred: np.ndarray, truth: np.ndarray, k: int = 5) -> tuple[float, list[float]]:
    """Mean IoU over classes present in the truth or the prediction, on labelled pixels (truth < k)."""
    keep = truth < k
    p, t = pred[keep], truth[keep]
    ious = []
    for c in range(k):
        union = np.sum((p == c) | (t == c))
        ious.append(float(np.sum((p == c) & (t == c)) / union) if union else float("nan"))
    return float(np.nanmean(ious)), ious


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/dubai_seg")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--crops", type=int, default=8, help="random crops per training image")
    parser.add_argument("--dense-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--finetune", nargs="*", default=["lora", "full"], choices=["lora", "full"],
                        help="also train the linear head with the backbone adapted (LoRA) or fully fine-tuned")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--head-losses", nargs="*", default=[],
                        help="also train the frozen linear head with these losses (ce+dice, lovasz, ce:balanced...)")
    parser.add_argument("--tta", nargs="+", default=["none", "flips", "d4"], choices=["none", "flips", "d4"],
                        help="test-time augmentations to evaluate (none = a single view)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=rasterio.errors.NotGeoreferencedWarning)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    started = time.perf_counter()
    root = Path(args.data)

    pretrained = sorted(glob.glob("/work/pretrained/*.pth"))
    backbone = pretrained[0] if pretrained else "vitmicro16"
    task = TextAlignmentTask(backbone=backbone, text_cfg=TEXT, ffn_layer="mlp", normalization="sat493m", seed=args.seed)
    model, norm = task.model, task.normalization

    def split(tiles: list[int]) -> tuple[list[str], list[str]]:
        images = sorted(str(p) for t in tiles for p in (root / f"tile{t}" / "images").glob("*.jpg"))
        return images, [str(root / Path(p).parent.parent.name / "masks" / (Path(p).stem + ".png")) for p in images]

    train_images, train_masks = split([1, 2, 3])
    test_images, test_masks = split([4, 5])
    chips = ChipMaskDataset(images=train_images, masks=train_masks, crop=CROP, remap={5: 255}, seed=args.seed)
    captioned = LabelCaptionDataset(dataset=chips, class_names=CLASSES, seed=args.seed, min_fraction=0.1)
    samples = []
    for epoch in range(args.crops):  # a fixed set of crops: epoch e of the crop seed = the e-th crop of each image
        chips.set_epoch(epoch)
        captioned.set_epoch(epoch)
        for i in range(len(chips)):
            try:
                samples.append(captioned[i])
            except ValueError:  # a crop of "unlabelled" pixels only: nothing to caption
                continue
    images = torch.stack([s["image"] for s in samples])
    masks = torch.stack([s["mask"] for s in samples])
    keys = [s["caption_key"] for s in samples]
    print(f"backbone: {backbone} ({'pretrained' if pretrained else 'random weights'}); {len(samples)} training crops")

    with torch.no_grad():
        tokens = torch.cat([model.vision.backbone_tokens(norm(images[i : i + 64])) for i in range(0, len(images), 64)])
    grid = (CROP // 16, CROP // 16)

    # ---- text alignment on cached tokens: CLIP term on label captions + dense term on the masks
    params = [p for p in model.parameters() if p.requires_grad]
    batch = 64
    steps = args.epochs * (len(samples) // batch)
    opt = torch.optim.AdamW(params, lr=2e-3, weight_decay=1e-4, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    rng = np.random.default_rng(args.seed)
    model.train()
    for _ in range(args.epochs):
        order = rng.permutation(len(samples))
        for s in range(len(samples) // batch):
            idx = order[s * batch : (s + 1) * batch]
            batch_keys = [keys[i] for i in idx]
            present = sorted(set(batch_keys))
            groups = torch.tensor([present.index(k) for k in batch_keys])
            template = REMOTE_SENSING_TEMPLATES[rng.integers(len(REMOTE_SENSING_TEMPLATES))]
            captions = [template.format(" and ".join(k.split("|"))) for k in present]
            cls, patches = adapt_tokens(model.vision, tokens[idx], grid)
            image_emb = F.normalize(torch.cat([cls, patches.mean(dim=(2, 3))], 1), dim=1)
            loss = grouped_clip_loss(image_emb, model.encode_text(captions), groups, model.logit_scale)
            class_text = model.text_embeddings_for_classes(CLASSES, [template], part="patch")
            loss = loss + args.dense_weight * dense_text_alignment_loss(patches, class_text, masks[idx], model.logit_scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            model.clamp_logit_scale_()
    model.eval()
    print(f"alignment done, last loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")

    # ---- supervised linear head on the same frozen backbone features and crops (official linear protocol)
    backbone_net = model.vision.backbone
    head = LinearHead(in_channels=backbone_net.embed_dim, out_channels=len(CLASSES))
    with torch.no_grad():
        feats = torch.cat([
            backbone_net.get_intermediate_layers(norm(images[i : i + 64]), n=1, reshape=True, norm=True)[0]
            for i in range(0, len(images), 64)
        ])  # [N, D, h, w]  # fmt: skip

    def train_head(head: LinearHead, loss: str, class_weight: torch.Tensor | None, order_rng: np.random.Generator) -> LinearHead:
        terms = parse_segmentation_loss(loss)
        head_opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-3)
        head.train()
        for _ in range(args.epochs):
            order = order_rng.permutation(len(samples))
            for s in range(len(samples) // batch):
                idx = order[s * batch : (s + 1) * batch]
                logits = F.interpolate(head([feats[idx]]), size=(CROP, CROP), mode="bilinear", align_corners=False)
                values = segmentation_loss_terms(logits, masks[idx], terms, ignore_index=255, class_weight=class_weight)
                head_opt.zero_grad()
                torch.stack(list(values.values())).sum().backward()
                head_opt.step()
        return head.eval()

    head_state = copy.deepcopy(head.state_dict())
    linear_models = {"frozen": DenseModel(backbone=backbone_net, head=train_head(head, "ce", None, rng), layers=1)}
    # ---- the same frozen head with other training losses / class weights: same initial head, crops and order
    counts = np.bincount(masks[masks != 255].numpy(), minlength=len(CLASSES))
    for variant in args.head_losses:
        spec, _, weighting = variant.partition(":")
        weight = torch.tensor(class_weights_from_counts(counts, weighting), dtype=torch.float32) if weighting else None
        other = LinearHead(in_channels=backbone_net.embed_dim, out_channels=len(CLASSES))
        other.load_state_dict(head_state)
        other = train_head(other, spec, weight, np.random.default_rng(args.seed + 1))
        linear_models[f"frozen_{variant}"] = DenseModel(backbone=backbone_net, head=other, layers=1)

    # ---- the same head with the backbone adapted: LoRA updates, or every weight (same crops, steps and head lr)
    for variant in args.finetune:
        torch.manual_seed(args.seed)
        tuned = DenseModel(backbone=copy.deepcopy(backbone_net), head=LinearHead(in_channels=backbone_net.embed_dim,
                           out_channels=len(CLASSES)), layers=1, freeze_backbone=variant != "full",
                           lora={"rank": args.lora_rank} if variant == "lora" else None)  # fmt: skip
        tuned_opt = torch.optim.AdamW(tuned.parameter_groups(lr=1e-3, backbone_lr_scale=0.1), lr=1e-3, weight_decay=1e-3)
        tuned.train()
        t0 = time.perf_counter()
        for _ in range(args.epochs):
            order = rng.permutation(len(samples))
            for s in range(len(samples) // batch):
                idx = order[s * batch : (s + 1) * batch]
                loss = F.cross_entropy(tuned(norm(images[idx])), masks[idx], ignore_index=255)
                tuned_opt.zero_grad()
                loss.backward()
                tuned_opt.step()
        linear_models[variant] = tuned.eval()
        print(f"linear head + {variant} backbone trained in {time.perf_counter() - t0:.0f} s")

    # ---- streamed evaluation on the test tiles, once per test-time augmentation
    truths = [np.asarray(Image.open(mask)).astype(np.int64).ravel() for mask in test_masks]
    truth = np.concatenate(truths)
    evaluated: dict[str, dict] = {}
    for mode in args.tta:
        tta = None if mode == "none" else mode
        t0 = time.perf_counter()
        engine = MapQuery(model=model, meta=task.meta(), templates=REMOTE_SENSING_TEMPLATES, window=CROP,
                          overlap=0.25, batch_size=16, device="cpu", tta=tta)  # fmt: skip
        preds_ov, preds_lin = [], {name: [] for name in linear_models}
        with tempfile.TemporaryDirectory() as tmp:
            for n, jpg in enumerate(test_images):
                image = as_geotiff(jpg, Path(tmp))
                preds_ov.append(engine.segment(image, CLASSES).values.astype(np.int64).ravel())
                for name, linear_model in linear_models.items():
                    dst = Path(tmp) / f"linear_{name}_{n}.tif"
                    predict_raster(linear_model, image, dst, out_channels=len(CLASSES), window=CROP, overlap=0.25,
                                   batch_size=16, normalization=norm, output="argmax", tta=tta, progress=False,
                                   overviews=False)  # fmt: skip
                    with rasterio.open(dst) as src:
                        preds_lin[name].append(src.read(1).astype(np.int64).ravel())
        ov, ov_per_class = miou(np.concatenate(preds_ov), truth)
        evaluated[mode] = {
            "open_vocab_miou": round(ov, 4),
            "open_vocab_iou_per_class": dict(zip(CLASSES, [round(v, 4) for v in ov_per_class])),
        }
        for name, preds in preds_lin.items():
            lin, lin_per_class = miou(np.concatenate(preds), truth)
            key = "linear_head" if name == "frozen" else f"linear_head_{name}"
            evaluated[mode][f"{key}_miou"] = round(lin, 4)
            evaluated[mode][f"{key}_iou_per_class"] = dict(zip(CLASSES, [round(v, 4) for v in lin_per_class]))
        evaluated[mode]["evaluation_seconds"] = round(time.perf_counter() - t0, 1)
        heads = ", ".join(f"linear head ({name}) {evaluated[mode][('linear_head' if name == 'frozen' else f'linear_head_{name}') + '_miou']:.4f}"
                          for name in linear_models)  # fmt: skip
        print(f"tta {mode}: open-vocabulary mIoU {ov:.4f}, {heads} ({evaluated[mode]['evaluation_seconds']} s)")
    chance, _ = miou(np.random.default_rng(0).integers(0, len(CLASSES), truth.shape), truth)
    frequencies = np.bincount(truth[truth < 5], minlength=5) / np.sum(truth < 5)
    first = evaluated[args.tta[0]]
    result = {
        "backbone": backbone,
        "weights": "pretrained" if pretrained else "random",
        "train_crops": len(samples),
        "test_images": len(test_images),
        "test_pixels_labelled": int(np.sum(truth < 5)),
        **{k: v for k, v in first.items() if k != "evaluation_seconds"},
        "tta": evaluated,
        "chance_miou_uniform": round(chance, 4),
        "test_class_frequencies": dict(zip(CLASSES, [round(float(v), 4) for v in frequencies])),
        "epochs": args.epochs,
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
