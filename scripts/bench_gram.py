"""Benchmark of the Gram-anchoring stage on real imagery: dense-feature quality before/after, agreement, cost, memory.

Data (../shared/data/nc_landsat7, GPL-3.0: read in place, never copied): the 5-band Landsat-7 stack
``landsat_multiband.tif`` (float32, nodata -99999, EPSG:32119, 28.5 m, 443x489 px) and the 7-class land-class map
``strata.tif`` (classes 1..7, stored in EPSG:3358: warped onto the image grid, nearest).

Protocol
--------
Only the blue, green and red bands (Landsat-7 bands 1-3) are used: the order our pretraining sample has
(Landsat-8 B2-B4), so an RGB export needs no band inflation; normalisation: per-band percentile statistics of
the scene, computed by the data module (the same kind the export was trained with).

1. A small backbone pretrained with our pretraining stage: ``--pretrained`` or the first ``/work/pretrained/*.pth``
   (used through ``init_from``: backbone loaded, DINO/iBOT heads fresh); when there is none, ``--backbone``
   pretrained here for ``--pretrain-steps`` DINOv3 steps (64-px global crops of 96-px tiles) on the scene.
2. From it, ``--runs`` seeds of two continuations with identical data order, crops and schedules (``--gram-steps``
   steps, lr 1e-3 constant after a short warm-up, EMA momentum 0.99 so that the EMA teacher moves within such a
   short run — the official 0.999 is meant for tens of thousands of steps): **gram** (Gram weight cosine ramp
   to 2.0, local DINO weight 1 -> 0.5, Gram teacher = EMA-teacher snapshot at the start seeing every global
   crop at 2x resolution, never refreshed so that it stays the reference of (b)) and **control** (the same run
   with Gram weight 0), so that an effect of the Gram term can be told apart from "more training".
3. Measurements, for the EMA teacher (what gets exported) and for the student (what the Gram loss acts on):

   (a) linear-probe mIoU of frozen patch features: last-layer normed patch tokens of the west part
       (columns < 240) and of the east part (columns >= 240), each computed from that part alone, bilinearly
       upsampled to pixels; a multinomial logistic regression (full-batch L-BFGS, standardised features) fitted
       on 20,000 seeded west labelled pixels and scored on every east labelled pixel (per-class IoU, mean over
       the classes present in the east part). At native resolution (x1) and with the input upsampled 2x (x2).
   (b) Gram agreement on held-out east tiles (64 px, stride 32, >= 90 % valid): the network under test sees the
       tile at 64 px, the fixed Gram teacher sees it at 128 px (bilinear), its tokens are resized bicubically to
       the 4x4 student grid; per tile, the Gram matrices of the L2-normalised tokens are compared by the Gram loss
       (MSE over all entries) and by the Pearson correlation of their off-diagonal entries.
   (c) step-time cost of the Gram term: forward + backward + AdamW step of the same module on the same 16 real
       tiles and step seeds, with the Gram term (2x crops rendered, Gram-teacher forward, resize, loss) and
       without it (``gram_loss_weight`` 0: no Gram crops), interleaved; medians and their ratio, plus the
       Gram-teacher forward and the loss forward+backward alone.
   (d) peak memory of the Gram-loss part alone (teacher-token resize + ``gram_loss`` forward + backward) for
       B = 2, student 512/768 px vs teacher 768/1152 px, D = 384 (ViT-S) and 1024 (ViT-L): live CPU tensor bytes
       from the PyTorch profiler's memory timeline (``profile_memory=True``; checked on a known allocation
       pattern first), counting everything allocated inside the region (the input token tensors excluded), for
       our row-blocked ``gram_loss`` and for the plain autograd formulation that materialises the B·P² Grams.

Numbers go to stdout and to ``<work>/bench_gram.json``. Torch runs on 1 thread by default: on the shared 2-core
machine, 2 OpenMP threads made step times swing 10x with other people's jobs.

Measured (2026-11, shared 2-core CPU, 1 thread; ``/work/pretrained/vitt16_eurosat_landsat.pth``, 2 seeds x 100
steps, B = 16; 6 min 17 s in all)
----------------------------------------------------------------------------------------------------------------
                              before   gram (seeds 0, 1)          control (seeds 0, 1)      random init
  (a) teacher mIoU x1         0.160    0.169 (0.169, 0.169)       0.163 (0.165, 0.161)      0.151
  (a) teacher mIoU x2         0.219    0.189 (0.193, 0.184)       0.213 (0.212, 0.214)      0.222
  (a) student mIoU x1         0.160    0.125 (0.095, 0.156)       0.142 (0.141, 0.143)
  (a) student mIoU x2         0.219    0.087 (0.023, 0.152)       0.139 (0.135, 0.143)
  (b) student Gram MSE        0.055    0.0060 (0.0059, 0.0062)    0.317 (0.332, 0.302)
  (b) student Pearson r       0.529    0.428 (0.398, 0.459)       0.382 (0.406, 0.359)
  (b) teacher Gram MSE        0.055    0.0503                     0.220
  (b) teacher Pearson r       0.529    0.512                      0.480
  (c) step 0.849 s with the Gram term vs 0.513 s without: x1.65 (Gram-teacher forward at 128 px 0.29 s,
      loss forward+backward 2 ms: the cost is the teacher's 4x-token forward, not the loss)
  (d) peak MiB, ours vs naive autograd: ViT-S 512/768 28 vs 38; ViT-S 768/1152 63 vs 176;
      ViT-L 512/768 48 vs 48; ViT-L 768/1152 108 vs 198 (inputs 10/22/26/59 MiB not counted)

Reading: the Gram term does what it optimises — the student's Gram matrices stay ~50x closer to the Gram
teacher's than in the control run, where fresh heads pull the features away (MSE 0.055 -> 0.32). It did *not*
improve the linear probe here: the exported EMA teacher gains ~0.006 mIoU at x1 over the control and loses ~0.02
at x2, and one Gram student (seed 0) degenerated at x2. The probe itself is weak on this data: 16-px patches are
456 m on the ground, and a *random* network scores as well as the pretrained one (0.151/0.222), so this
scene cannot show a dense-quality effect either way; 100 CPU steps from an export with fresh heads is also far
from the official 10k+-step Gram stage. In (d) the Grams only dominate at P = 2304; at P = 1024 the peak is the
teacher-token resize and normalised copies, which both formulations share.

    .venv/bin/python scripts/bench_gram.py [--pretrain-steps 300] [--gram-steps 100] [--work runs/bench_gram]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from torch import Tensor, nn

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nc_landsat7"
IMAGE = DATA / "landsat_multiband.tif"
LABELS = DATA / "strata.tif"
CLASS_NAMES = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]
SPLIT_COL = 240  # a multiple of 16: both parts' patch grids start on a patch boundary
IGNORE = 255
PATCH = 16
RGB = (1, 2, 3)  # Landsat-7 bands 1-3 = blue, green, red: the order of our pretraining sample (Landsat-8 B2-B4)

#: model arguments shared by every stage of this benchmark (the heads must match for init_from)
HEADS = dict(
    dino_out_dim=1024, dino_hidden_dim=256, dino_bottleneck_dim=64,
    ibot_out_dim=1024, ibot_hidden_dim=256, ibot_bottleneck_dim=64,
    global_crop_size=64, local_crop_size=32, n_local_crops=2, scale_lr_with_batch=False, layerwise_decay=1.0,
)


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- data


def load_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image float32 [3, H, W] raw blue-green-red, valid bool [H, W], class ids int64 [H, W] in 0..6 or IGNORE)."""
    from dinov3_eo.data.labels import RasterLabels

    with rasterio.open(IMAGE) as src:
        image = src.read(list(RGB)).astype(np.float32)
        valid = ~((image == src.nodata) | np.isnan(image)).any(axis=0)
        crs, transform, shape = src.crs, src.transform, (src.height, src.width)
    labels = RasterLabels(path=LABELS, task="classification", ignore_index=IGNORE)
    mask = labels.sample(crs=crs, transform=transform, shape=shape, valid=valid)["mask"].numpy()
    mask = np.where((mask >= 1) & (mask <= 7), mask - 1, IGNORE)  # classes 1..7 -> ids 0..6
    return image, valid, mask


def datamodule(*, steps: int, batch_size: int, cache: Path, seed: int) -> Any:
    from dinov3_eo.data.datamodule import PretrainDataModule

    return PretrainDataModule(
        paths=str(IMAGE), bands=list(RGB), normalization="percentile", tile_size=96,
        tiles_per_epoch=max(steps, 1) * batch_size,
        batch_size=batch_size, cache_dir=str(cache), seed=seed,
    )


# ---------------------------------------------------------------------------------------------- training


def train_stage(module: nn.Module, *, steps: int, batch_size: int, work: Path, name: str, seed: int) -> Path:
    """Fit ``module`` for ``steps`` steps on the scene; returns the checkpoint path (written atomically)."""
    import lightning.pytorch as pl

    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=False, limit_val_batches=0, default_root_dir=str(work),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule(steps=steps, batch_size=batch_size, cache=work / "cache", seed=seed))
    elapsed = time.perf_counter() - start
    path = work / f"{name}.ckpt"
    tmp = work / f".{name}.ckpt.tmp"
    trainer.save_checkpoint(tmp)
    os.replace(tmp, path)
    log(f"[{name}] {steps} steps in {elapsed:.0f} s ({elapsed / max(steps, 1):.2f} s/step) -> {path}")
    return path


def starting_point(args: argparse.Namespace, work: Path) -> tuple[str, str, str]:
    """(``init_from`` source of the continuations, backbone name, where it comes from)."""
    from dinov3_eo.models.hub import load_backbone
    from dinov3_eo.ssl.module import DINOv3Pretrain

    source = args.pretrained or next(iter(sorted(glob.glob("/work/pretrained/*.pth"))), None)
    if source and source != "none":
        meta = load_backbone(source).meta
        if meta.in_chans != 3:
            raise ValueError(f"bench_gram: {source} has {meta.in_chans} input bands; this benchmark feeds RGB (3).")
        return source, meta.name, f"{source} ({meta.name}, bands {meta.bands}; export of our pretraining stage)"
    module = DINOv3Pretrain(
        backbone=args.backbone, in_chans=3, base_lr=2e-3, lr_warmup_steps=min(30, args.pretrain_steps // 10),
        teacher_temp_warmup_steps=min(50, args.pretrain_steps // 5), momentum_teacher=0.99, seed=args.seed, **HEADS,
    )
    path = train_stage(module, steps=args.pretrain_steps, batch_size=args.batch_size, work=work,
                       name="pretrain", seed=args.seed)
    return str(path), args.backbone, f"{args.backbone} pretrained here for {args.pretrain_steps} steps (random init)"


def starting_backbones(source: str) -> dict[str, nn.Module]:
    """The networks the continuations start from: EMA teacher and student (one backbone for an export)."""
    from dinov3_eo.models.hub import load_backbone

    if source.endswith(".ckpt"):
        return {"teacher": backbone_from(Path(source), "teacher.backbone."),
                "student": backbone_from(Path(source), "student.backbone.")}
    return {"teacher": load_backbone(source).eval().requires_grad_(False)}


def continuation(backbone: str, init_from: str, *, gram_weight: float, steps: int, seed: int) -> nn.Module:
    """The Gram stage (``gram_weight`` > 0) or its control (0): identical except for the Gram term."""
    from dinov3_eo.ssl.module import DINOv3Pretrain

    return DINOv3Pretrain(
        backbone=backbone, in_chans=3, init_from=str(init_from), base_lr=1e-3, lr_schedule="constant",
        lr_warmup_steps=min(10, steps // 10), weight_decay_end=0.04, momentum_teacher=0.99,
        final_momentum_teacher=0.99, teacher_temp_warmup_steps=0,
        gram_loss_weight=gram_weight, gram_weight_warmup_steps=min(20, steps // 5),
        local_loss_weight_start=1.0, local_loss_weight=0.5,
        gram_teacher="ema" if gram_weight > 0 else None, gram_teacher_scale=2.0,
        seed=seed, **HEADS,
    )


def backbone_from(checkpoint: Path, prefix: str) -> nn.Module:
    """A frozen backbone from our Lightning checkpoint (``teacher.backbone.`` / ``student.backbone.``)."""
    from dinov3_eo.models.hub import build_backbone

    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    meta = payload["dinov3_eo"]
    state = {k[len(prefix):]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
    model = build_backbone(meta["model"], in_chans=meta["in_chans"])
    model.load_state_dict(state)
    return model.eval().requires_grad_(False)


def normalization_of(checkpoint: Path) -> Any:
    from dinov3_eo.data.normalization import Normalization

    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return Normalization.from_dict(payload["dinov3_eo"]["normalization"])


# ---------------------------------------------------------------------------------------------- (a) linear probe


def dense_features(backbone: nn.Module, image: Tensor, scale: int) -> Tensor:
    """[C, H, W] normalised -> [D, H, W]: last-layer normed patch tokens, bilinear back to the pixel grid.

    The input is upsampled ``scale``x (bilinear) and zero-padded bottom/right to a patch multiple first.
    """
    _, height, width = image.shape
    x = image[None]
    if scale != 1:
        x = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    x = F.pad(x, (0, -w % PATCH, 0, -h % PATCH))  # [1, C, Hp, Wp]
    with torch.no_grad():  # not inference_mode: the probe's autograd uses these features as inputs
        (tokens,) = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)  # [1, D, Hp/16, Wp/16]
    # the token grid covers the padded input; map it back onto the unpadded original pixels
    padded_h, padded_w = x.shape[-2:]
    full = F.interpolate(tokens, size=(padded_h, padded_w), mode="bilinear", align_corners=False)[..., :h, :w]
    if scale != 1:
        full = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
    return full[0]  # [D, H, W]


def mean_iou(truth: np.ndarray, pred: np.ndarray, k: int) -> tuple[float, list[float]]:
    """mIoU over the classes present in ``truth`` (IGNORE excluded) and the per-class IoUs (NaN if absent)."""
    keep = truth != IGNORE
    confusion = np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k).astype(np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    present = confusion.sum(1) > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), [float(v) for v in iou]


def fit_softmax_regression(x: Tensor, y: Tensor, n_classes: int, *, weight_decay: float = 1e-4) -> nn.Linear:
    """Multinomial logistic regression ``x [N, D] -> y [N]``: full-batch L-BFGS on CE + weight_decay·‖W‖²."""
    linear = nn.Linear(x.shape[1], n_classes)
    nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias)  # convex problem: a deterministic start
    optimizer = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=200, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(linear(x), y) + weight_decay * linear.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return linear


def linear_probe(backbone: nn.Module, image: Tensor, mask: np.ndarray, *, scale: int, seed: int,
                 max_train: int = 20000) -> tuple[float, list[float]]:
    """West-trained, east-scored linear classifier on frozen dense features; (mIoU, per-class IoU)."""
    west, east = image[:, :, :SPLIT_COL], image[:, :, SPLIT_COL:]
    mask_west, mask_east = mask[:, :SPLIT_COL], mask[:, SPLIT_COL:]
    feats_west = dense_features(backbone, west, scale).flatten(1).T  # [Hw·Ww, D]
    feats_east = dense_features(backbone, east, scale).flatten(1).T  # [He·We, D]
    labelled = np.flatnonzero(mask_west.ravel() != IGNORE)
    chosen = torch.from_numpy(np.random.default_rng(seed).choice(labelled, size=min(max_train, labelled.size),
                                                                  replace=False))
    x = feats_west[chosen]  # [N, D]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)  # standardise with the training pixels' statistics
    y = torch.from_numpy(mask_west.ravel()[chosen.numpy()])
    with torch.enable_grad():
        classifier = fit_softmax_regression((x - mean) / std, y, len(CLASS_NAMES))
    with torch.no_grad():
        pred = classifier((feats_east - mean) / std).argmax(1).numpy().reshape(mask_east.shape)
    return mean_iou(mask_east, pred.astype(np.int64), len(CLASS_NAMES))


# ---------------------------------------------------------------------------------------------- (b) agreement


def held_out_tiles(image: Tensor, valid: np.ndarray, *, size: int = 64, stride: int = 32) -> Tensor:
    """East-part tiles [N, C, size, size] with at least 90 % valid pixels."""
    tiles = []
    height, width = valid.shape
    for top in range(0, height - size + 1, stride):
        for left in range(SPLIT_COL, width - size + 1, stride):
            if valid[top : top + size, left : left + size].mean() >= 0.9:
                tiles.append(image[:, top : top + size, left : left + size])
    return torch.stack(tiles)


def gram_matrices(tokens: Tensor) -> Tensor:
    """[N, P, D] -> [N, P, P] Grams of the L2-normalised tokens."""
    unit = F.normalize(tokens.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def gram_agreement(network: nn.Module, gram_teacher: nn.Module, tiles: Tensor, *, scale: int = 2) -> dict[str, float]:
    """Gram MSE and Pearson r (off-diagonal entries, per tile, averaged) of ``network`` vs the Gram teacher."""
    from dinov3_eo.losses.gram import resize_patch_features

    size = tiles.shape[-1]
    grid = (size // PATCH, size // PATCH)
    teacher_grid = (size * scale // PATCH, size * scale // PATCH)
    with torch.inference_mode():
        student = network.forward_features(tiles)["x_norm_patchtokens"]  # [N, P, D]
        big = F.interpolate(tiles, scale_factor=scale, mode="bilinear", align_corners=False)
        teacher = gram_teacher.forward_features(big)["x_norm_patchtokens"]  # [N, P·scale², D]
        teacher = resize_patch_features(teacher, teacher_grid, grid)  # [N, P, D]
        gram_s, gram_t = gram_matrices(student), gram_matrices(teacher)  # [N, P, P]
    mse = (gram_s - gram_t).square().mean(dim=(1, 2))  # [N] = the Gram loss of each tile
    off = ~torch.eye(gram_s.shape[-1], dtype=torch.bool)
    a, b = gram_s[:, off], gram_t[:, off]  # [N, P·(P-1)]
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    pearson = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)  # [N]
    return {"gram_mse": float(mse.mean()), "pearson": float(pearson.mean()), "tiles": int(tiles.shape[0])}


# ---------------------------------------------------------------------------------------------- (c) step cost


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def step_cost(module: nn.Module, batch: dict[str, Tensor], *, repeats: int) -> dict[str, float]:
    """Median seconds of a training step with and without the Gram term (same crops, same step seeds)."""
    from dinov3_eo.losses.gram import gram_loss, resize_patch_features

    module.train()
    module.on_fit_start()
    optimizer = module.configure_optimizers()
    weight = module.hparams.gram_loss_weight

    def step(index: int, with_gram: bool) -> None:
        module.hparams.gram_loss_weight = weight if with_gram else 0.0
        torch.manual_seed(index)
        losses = module.compute_losses(batch, step=100 + index)  # past the ramp: full Gram weight
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        optimizer.step()

    step(0, True), step(0, False)  # warm-up (allocations, lazy inits)
    with_gram, without_gram = [], []
    for index in range(repeats):
        with_gram.append(_timed(lambda: step(index, True)))
        without_gram.append(_timed(lambda: step(index, False)))
    module.hparams.gram_loss_weight = weight

    # the parts of the Gram term alone, on this batch's shapes (2 global crops per image)
    _, _, gram_size = module.crop_sizes(100)
    global_size = module.crop_sizes(100)[0]
    crops = torch.randn(2 * batch["image"].shape[0], batch["image"].shape[1], gram_size, gram_size)
    teacher_forward = []
    for _ in range(repeats):
        with torch.no_grad():
            teacher_forward.append(_timed(lambda: module.gram_teacher.forward_features(crops)))
    dim = module.student["backbone"].embed_dim
    p_student, g_teacher = (global_size // PATCH) ** 2, gram_size // PATCH
    student_tokens = torch.randn(crops.shape[0], p_student, dim, requires_grad=True)
    teacher_tokens = torch.randn(crops.shape[0], g_teacher**2, dim)

    def loss_part() -> None:
        resized = resize_patch_features(teacher_tokens, (g_teacher, g_teacher), (global_size // PATCH,) * 2)
        gram_loss(student_tokens, resized).backward()

    loss_times = [_timed(loss_part) for _ in range(repeats)]
    med_with, med_without = statistics.median(with_gram), statistics.median(without_gram)
    return {
        "step_with_gram_s": med_with, "step_without_gram_s": med_without, "ratio": med_with / med_without,
        "gram_teacher_forward_s": statistics.median(teacher_forward),
        "gram_loss_fwd_bwd_s": statistics.median(loss_times),
        "batch": int(batch["image"].shape[0]), "global_size": global_size, "gram_size": gram_size, "repeats": repeats,
    }


# ---------------------------------------------------------------------------------------------- (d) memory


def cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak live bytes allocated on the CPU inside ``fn`` (tensors alive before it are not counted).

    From the profiler's memory timeline: CREATE adds a tensor's bytes, DESTROY removes them.
    """
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live = peak = 0
    for _, action, (key, _version), size in prof._memory_profile().timeline:
        if key.device.type != "cpu":
            continue
        if action == Action.CREATE:
            live += size
        elif action == Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak


def naive_gram_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """The plain autograd formulation: materialised [B, P, P] Grams, MSE over all entries."""
    s, t = F.normalize(student, dim=-1), F.normalize(teacher.detach(), dim=-1)
    return F.mse_loss(s @ s.transpose(1, 2), t @ t.transpose(1, 2))


def gram_memory(batch: int = 2) -> list[dict[str, Any]]:
    from dinov3_eo.losses.gram import gram_loss, resize_patch_features

    # calibration: two live 4 MiB tensors, one freed, one 1 MiB more -> peak 8 MiB
    def calibration() -> None:
        a, b = torch.empty(1024, 1024), torch.empty(1024, 1024)
        del a
        c = torch.empty(256, 1024)
        del b, c

    assert cpu_peak_bytes(calibration) == 8 * 2**20, "profiler memory timeline does not track CPU tensors"
    rows = []
    for dim, arch in ((384, "ViT-S"), (1024, "ViT-L")):
        for student_px, teacher_px in ((512, 768), (768, 1152)):
            grid, teacher_grid = student_px // PATCH, teacher_px // PATCH
            torch.manual_seed(0)
            student = torch.randn(batch, grid * grid, dim, requires_grad=True)
            teacher = torch.randn(batch, teacher_grid * teacher_grid, dim)
            row: dict[str, Any] = {"arch": arch, "D": dim, "B": batch, "student_px": student_px,
                                   "teacher_px": teacher_px, "P": grid * grid}
            for name, loss_fn in (("ours", gram_loss), ("naive", naive_gram_loss)):
                def part(loss_fn: Callable[[Tensor, Tensor], Tensor] = loss_fn) -> None:
                    student.grad = None
                    resized = resize_patch_features(teacher, (teacher_grid, teacher_grid), (grid, grid))
                    loss_fn(student, resized).backward()

                start = time.perf_counter()
                row[f"{name}_peak_MiB"] = cpu_peak_bytes(part) / 2**20
                row[f"{name}_s"] = time.perf_counter() - start  # includes profiler overhead
            row["inputs_MiB"] = (student.numel() + teacher.numel()) * 4 / 2**20
            rows.append(row)
            log(f"[d] {arch} D={dim} B={batch} student {student_px}px (P={grid * grid}) vs teacher {teacher_px}px: "
                f"peak {row['ours_peak_MiB']:.1f} MiB (ours) vs {row['naive_peak_MiB']:.1f} MiB (naive autograd); "
                f"inputs {row['inputs_MiB']:.1f} MiB not counted")
    return rows


# ---------------------------------------------------------------------------------------------- main


def write_json(path: Path, payload: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=None,
                        help="export to start from (default: first /work/pretrained/*.pth; 'none': pretrain here)")
    parser.add_argument("--backbone", default="vitmicro16", help="architecture pretrained here when none is given")
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--gram-steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2, help="seeds of the gram/control continuations")
    parser.add_argument("--timing-repeats", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine 2 OpenMP threads swung 10x in step time)")
    parser.add_argument("--only-memory", action="store_true", help="run (d) alone")
    parser.add_argument("--work", default="runs/bench_gram")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    started = time.perf_counter()

    if not args.only_memory:
        if not DATA.is_dir():
            print(f"bench_gram: {DATA} is not here; only (d) runs.", file=sys.stderr)
        else:
            results.update(quality_and_cost(args, work))
            write_json(work / "bench_gram.json", results)
    results["memory"] = gram_memory()
    results["total_s"] = time.perf_counter() - started
    write_json(work / "bench_gram.json", results)
    log(f"total {results['total_s']:.0f} s; results in {work / 'bench_gram.json'}")
    return 0


def quality_and_cost(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from dinov3_eo.models.hub import build_backbone

    out: dict[str, Any] = {}
    image_raw, valid, mask = load_scene()
    source, name, origin = starting_point(args, work)
    out["backbone"] = origin
    log(f"backbone: {origin}")

    # the fixed Gram teacher of every gram run = the starting EMA teacher (snapshot at the start, never refreshed)
    before = starting_backbones(source)
    gram_teacher = before["teacher"]
    torch.manual_seed(args.seed)
    networks: dict[str, dict[str, nn.Module]] = {
        "random init": {"teacher": build_backbone(name, in_chans=3).eval().requires_grad_(False)},
        "before": before,
    }
    last_run = None
    for run_seed in range(args.seed, args.seed + args.runs):
        for label, weight in (("gram", 2.0), ("control", 0.0)):
            module = continuation(name, source, gram_weight=weight, steps=args.gram_steps, seed=run_seed)
            last_run = train_stage(module, steps=args.gram_steps, batch_size=args.batch_size, work=work,
                                   name=f"{label}_seed{run_seed}", seed=run_seed + 1)
            if weight > 0:  # the run's Gram teacher really is that snapshot
                state = torch.load(last_run, map_location="cpu", weights_only=True)["state_dict"]
                assert all(torch.equal(state[f"gram_teacher.{k}"], v) for k, v in gram_teacher.state_dict().items())
            networks[f"{label} seed{run_seed}"] = {
                "teacher": backbone_from(last_run, "teacher.backbone."),
                "student": backbone_from(last_run, "student.backbone."),
            }
    # every run normalised the scene with the same statistics (same data module settings)
    norm = normalization_of(last_run)
    image = norm(torch.from_numpy(image_raw)).masked_fill(~torch.from_numpy(valid), 0.0)  # [3, H, W]

    out["linear_probe"], out["agreement"] = {}, {}
    tiles = held_out_tiles(image, valid)
    for label, pair in networks.items():
        for role, network in pair.items():
            row = {}
            for scale in (1, 2):
                miou, per_class = linear_probe(network, image, mask, scale=scale, seed=args.seed)
                row[f"x{scale}"] = {"miou": miou, "iou": dict(zip(CLASS_NAMES, per_class))}
            row["gram_agreement"] = gram_agreement(network, gram_teacher, tiles)
            out["linear_probe"].setdefault(label, {})[role] = row
            agree = row["gram_agreement"]
            log(f"[a,b] {label:15s} {role:7s}  mIoU x1 {row['x1']['miou']:.4f}  x2 {row['x2']['miou']:.4f}  | vs Gram "
                f"teacher on {agree['tiles']} east tiles: Gram MSE {agree['gram_mse']:.5f}  r {agree['pearson']:.4f}")
    out["summary"] = summarise(out["linear_probe"], args)
    for line in out["summary"]["lines"]:
        log(line)

    # (c) on a real batch of tiles, with the Gram stage's configuration
    data = datamodule(steps=1, batch_size=args.batch_size, cache=work / "cache", seed=args.seed + 2)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = continuation(name, source, gram_weight=2.0, steps=args.gram_steps, seed=args.seed)
    module._total_steps = lambda: args.gram_steps  # no trainer attached
    cost = step_cost(module, {"image": batch["image"], "valid": batch["valid"]}, repeats=args.timing_repeats)
    out["step_cost"] = cost
    log(f"[c] step (fwd+bwd+AdamW, B={cost['batch']}, global {cost['global_size']} px, Gram teacher "
        f"{cost['gram_size']} px): with Gram {cost['step_with_gram_s']:.3f} s, "
        f"without {cost['step_without_gram_s']:.3f} s, "
        f"ratio {cost['ratio']:.2f}; Gram-teacher forward {cost['gram_teacher_forward_s']:.3f} s, "
        f"loss fwd+bwd {cost['gram_loss_fwd_bwd_s'] * 1e3:.1f} ms")
    return out


def summarise(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Means over the continuation seeds of the gram and control runs, next to the starting point."""
    summary: dict[str, Any] = {"lines": []}
    for role in ("teacher", "student"):
        if role not in results["before"]:  # an export has one backbone: compare its students with it
            results["before"][role] = results["before"]["teacher"]
        for metric in ("x1", "x2", "gram_mse", "pearson"):
            def value(row: dict[str, Any]) -> float:
                return row[metric]["miou"] if metric.startswith("x") else row["gram_agreement"][metric]

            before = value(results["before"][role])
            means = {}
            for label in ("gram", "control"):
                values = [value(results[f"{label} seed{s}"][role]) for s in range(args.seed, args.seed + args.runs)]
                means[label] = (float(np.mean(values)), values)
            summary[f"{role}/{metric}"] = {"before": before, "gram": means["gram"], "control": means["control"]}
            name = f"mIoU {metric}" if metric.startswith("x") else metric
            summary["lines"].append(
                f"[summary] {role:7s} {name:9s} before {before:.4f} | gram {means['gram'][0]:.4f} "
                f"({', '.join(f'{v:.4f}' for v in means['gram'][1])}) | control {means['control'][0]:.4f} "
                f"({', '.join(f'{v:.4f}' for v in means['control'][1])})"
            )
    return summary


if __name__ == "__main__":
    sys.exit(main())
