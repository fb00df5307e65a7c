"""The pretraining checks that need a GPU, as one prepared script for a lent GPU machine (issue #4, proof 3).

Two steps, because the GPU machine reaches nothing and its copy of the tree is limited to 64 MiB (rasterio's wheel
alone is 39 MB): ``pack`` runs here and writes the learning check's real data into a small folder; ``run`` runs
on the GPU machine, needs only torch, lightning, numpy and kornia, and prints and writes every number.

    .venv/bin/python scripts/gpu_pretrain_check.py pack .gpu/pack
    # on the GPU machine, from the repository root:
    PYTHONPATH=. python3 scripts/gpu_pretrain_check.py run .gpu/pack --minutes 6 --out $OUT/gpu_check.json

``run`` does, in order (cheapest and most likely to fail first; ``--only`` picks stages):

1. correctness: ViT-S/16 on the GPU against the CPU in float32, and bf16 autocast against float32; the iBOT term's
   Triton kernels (``logit_kernels``) against the torch path at a ViT-S batch-64 step's size, and the time of both
   (eager and compiled), with a few tile sizes of each kernel;
2. backbone throughput (images/s, bf16, forward) of ViT-S/B/L at 224 px;
3. step overhead (as ``bench_pretrain.py`` on the CPU): one full SSL step vs the backbone work it cannot avoid,
   ViT-S, batch 64, 2x224 + 8x96 crops, 65,536-prototype heads, bf16; at batch 256; and at batch 64 with every
   block and head compiled (``model.compile: true``, the backbone-only work compiled alike) and with the logit
   losses compiled alone (``model.compile: losses``, the backbone-only work eager), and with the iBOT and DINO terms
   as Triton kernels (``model.logit_kernels: triton``; with the rest of the losses compiled, eager, for ViT-B, and
   at batch 128);
4. the Gram, high-resolution and distillation stages for 4 bf16 steps each (torch and Triton logit losses), kernel
   profiles of one SSL step (every op's extra device and host time in one file per variant), and the crops' time on
   the host vs on the device (``views_profile``);
5. the learning check: ``vits16`` pretrained with Lightning (``bf16-mixed``) for ``--minutes`` on the same data as
   the CPU check (Landsat-8 tiles of the ``_RT`` scene with nodata 0 and percentile normalisation, plus the 1,400
   EuroSAT train chips), then EuroSAT k-NN (k=20) of the teacher's CLS against random weights and colour histograms.
   The tiles are cut on the GPU from the normalised scene held in GPU memory, so the data never limits the step rate.
   ``--knn-every N`` adds the k-NN and the loss terms every N steps (does it learn, and which term?).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dinov3_eo.allocator import retain_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import SHARED, SHORT_RUN, _eurosat_split, _load_chips, backbone_features, colour_features, knn_accuracy  # noqa: E402

TILE = 64  # tile/chip side in pixels, as the CPU learning check


def pack(folder: str) -> None:
    """Write the scene (raw uint16 + the archive's percentile normalisation) and the EuroSAT split as .npz."""
    import glob

    import rasterio

    from dinov3_eo.data.datamodule import build_normalization
    from dinov3_eo.data.index import RasterIndex

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    landsat = sorted(glob.glob(str(SHARED / "landsat8_l1" / "*_RT.TIF")))
    if not landsat or not (SHARED / "eurosat_rgb_dev").is_dir():
        raise SystemExit(f"pack needs the Landsat-8 scene and EuroSAT chips of ../shared/data, not found under {SHARED}.")
    index = RasterIndex.build(landsat, cache_dir=None)
    norm = build_normalization("percentile", index=index, nodata=0)
    with rasterio.open(landsat[0]) as src:
        scene = src.read()  # [3, H, W] uint16 DN
    np.savez_compressed(out / "landsat.npz", scene=scene, normalization=json.dumps(norm.to_dict()), path=landsat[0])
    train, train_y, test, test_y, classes = _eurosat_split(per_class_train=140)
    np.savez_compressed(out / "eurosat.npz", train=_load_chips(train), train_y=np.array(train_y), test=_load_chips(test),
                        test_y=np.array(test_y), classes=np.array(classes))
    sizes = {p.name: f"{p.stat().st_size / 2**20:.1f} MiB" for p in out.iterdir()}
    print(f"packed {out}: {sizes}; scene {scene.shape}, {len(train)} train / {len(test)} test chips")


class GPUTiles(torch.utils.data.IterableDataset):
    """Endless batches ``{"image", "valid"}`` made on the device: half EuroSAT chips, half random scene tiles.

    Scene tiles are drawn uniformly among the positions whose nodata fraction is at most 0.5 (the CPU sampler's
    rejection rule); invalid pixels are 0 after normalisation, as :class:`TileDataset` returns them.
    """

    def __init__(self, pack_dir: str, batch_size: int, device: str, seed: int = 0) -> None:
        from dinov3_eo.data.normalization import Normalization

        super().__init__()
        landsat = np.load(Path(pack_dir) / "landsat.npz")
        euro = np.load(Path(pack_dir) / "eurosat.npz")
        norm = Normalization.from_dict(json.loads(str(landsat["normalization"])))
        scene = torch.from_numpy(landsat["scene"].astype(np.float32)).to(device)
        valid = (scene != 0).all(0)  # nodata 0 in any band: invalid (the L1 collar)
        self.scene = norm(scene) * valid
        self.valid = valid
        nodata_fraction = 1 - torch.nn.functional.avg_pool2d(valid[None, None].float(), TILE, stride=1)[0, 0]
        self.corners = torch.nonzero(nodata_fraction <= 0.5)  # [P, 2] (row, col) of allowed tiles
        self.chips = Normalization.preset("sat493m")(torch.from_numpy(euro["train"]).to(device).permute(0, 3, 1, 2))
        self.batch_size, self.device = batch_size, device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def batch(self) -> dict[str, torch.Tensor]:
        n_chips = self.batch_size // 2
        n_tiles = self.batch_size - n_chips
        g = self.generator
        chips = self.chips[torch.randint(len(self.chips), (n_chips,), generator=g, device=self.device)]
        corner = self.corners[torch.randint(len(self.corners), (n_tiles,), generator=g, device=self.device)]
        offsets = torch.arange(TILE, device=self.device)
        rows = (corner[:, 0:1] + offsets)[:, :, None]  # [n, T, 1]
        cols = (corner[:, 1:2] + offsets)[:, None, :]  # [n, 1, T]
        tiles = self.scene[:, rows, cols].permute(1, 0, 2, 3)  # [n, 3, T, T]
        tile_valid = self.valid[rows, cols]
        image = torch.cat([chips, tiles])
        valid = torch.cat([torch.ones(n_chips, TILE, TILE, dtype=torch.bool, device=self.device), tile_valid])
        return {"image": image.contiguous(), "valid": valid}

    def __iter__(self):  # noqa: ANN204
        while True:
            yield self.batch()


def correctness(device: str) -> dict[str, float]:
    from dinov3_eo.models.hub import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vits16").eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        cpu = model.forward_features(x)["x_norm_patchtokens"]
        model.to(device)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        gpu = model.forward_features(x.to(device))["x_norm_patchtokens"].cpu()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model.forward_features(x.to(device))["x_norm_patchtokens"].float().cpu()
    cos = torch.nn.functional.cosine_similarity(bf16.flatten(1), gpu.flatten(1)).min().item()
    result = {"gpu_vs_cpu_fp32_max_abs": (gpu - cpu).abs().max().item(), "bf16_vs_fp32_min_cosine": cos}
    print(f"[correct] ViT-S/16 GPU vs CPU float32: max |diff| {result['gpu_vs_cpu_fp32_max_abs']:.2e}; "
          f"bf16 autocast vs float32: min cosine {cos:.5f}")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return result


def _cuda_ms(fn, repeats: int = 10) -> float:  # noqa: ANN001
    """Median milliseconds of ``fn()`` between CUDA events (after one untimed call)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def logit_kernels_check(device: str, tokens: int = 3800, prototypes: int = 65536) -> dict:
    """The iBOT term at a ViT-S batch-64 step's size (3,800 masked tokens, 65,536 prototypes, bf16 logits):
    Sinkhorn–Knopp, cross-entropy forward and backward as torch ops (eager, compiled) and as the Triton kernels of
    ``dinov3_eo.losses.logit_kernels``. Agreement with eager, median time and peak memory of each; the DINO terms
    of the same step (640 student crops) eager and fused; then each kernel's time at a few tile sizes (the first of
    each list is the module's default)."""
    from dinov3_eo.losses import SinkhornAssignments, ibot_loss, sinkhorn_assignments, sinkhorn_knopp
    from dinov3_eo.losses import logit_kernels as lk
    from compile_logit_kernels import TILES
    from dinov3_eo.ssl.compilation import compile_logit_losses

    gen = torch.Generator(device).manual_seed(0)
    teacher = (torch.randn(tokens, prototypes, device=device, generator=gen) * 3).bfloat16()
    student = (torch.randn(tokens, prototypes, device=device, generator=gen) * 3).bfloat16().requires_grad_()
    weights = torch.rand(tokens, device=device, generator=gen)
    compiled = compile_logit_losses()
    variants = {"eager": (sinkhorn_knopp, ibot_loss), "compiled": (compiled.sinkhorn_knopp, compiled.ibot_loss),
                "triton": (sinkhorn_assignments, ibot_loss)}

    def term(targets_fn, loss_fn):  # noqa: ANN001, ANN202
        targets = targets_fn(teacher, 0.05)
        loss = loss_fn(student, targets, weights, 128, student_temp=0.1)
        return targets, loss, torch.autograd.grad(loss, student)[0]

    result: dict = {}
    reference = None
    for name, fns in variants.items():
        targets, loss, grad = term(*fns)  # compiles, for "compiled"
        probs = targets.probabilities() if isinstance(targets, SinkhornAssignments) else targets
        if reference is None:
            reference = (probs, loss, grad)
        torch.cuda.synchronize()
        del targets, probs
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        ms = _cuda_ms(lambda fns=fns: term(*fns))
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        sinkhorn_ms = _cuda_ms(lambda fns=fns: fns[0](teacher, 0.05))
        result[name] = {"ms": ms, "sinkhorn_ms": sinkhorn_ms, "peak_gib": peak, "loss": loss.item(),
                        "grad_max_abs_diff": (grad.float() - reference[2].float()).abs().max().item()}
        print(f"[logit_kernels] {name}: Sinkhorn + iBOT loss + backward {ms:.2f} ms (Sinkhorn {sinkhorn_ms:.2f}), "
              f"peak {peak:.2f} GiB beyond the inputs, loss {loss.item():.6f}", flush=True)
        del loss, grad
    fused = sinkhorn_assignments(teacher, 0.05).probabilities()
    result["triton"]["probs_max_abs_diff"] = (fused - reference[0]).abs().max().item()
    result["triton"]["probs_max"] = reference[0].max().item()
    result["grad_max_abs"] = reference[2].float().abs().max().item()
    print(f"[logit_kernels] triton vs eager: probabilities max |diff| {result['triton']['probs_max_abs_diff']:.2e} "
          f"(max {result['triton']['probs_max']:.3f}), loss {result['triton']['loss'] - result['eager']['loss']:+.2e}, "
          f"gradient max |diff| {result['triton']['grad_max_abs_diff']:.2e} of {result['grad_max_abs']:.2e}",
          flush=True)
    del fused, reference
    # the DINO terms of the same step: 2 global + 8 local crops of 64 images against the 2 teacher crops
    from dinov3_eo.losses import dino_losses_fused, dino_losses_stacked

    dino_student = (torch.randn(640, prototypes, device=device, generator=gen) * 3).bfloat16().requires_grad_()
    dino_teacher = sinkhorn_knopp((torch.randn(128, prototypes, device=device, generator=gen) * 3).bfloat16(), 0.05)

    def dino(fn):  # noqa: ANN001, ANN202
        terms = fn(dino_student, dino_teacher, batch_size=64, student_temp=0.1)
        total = terms.global_loss / 9 + terms.local_loss * 8 / 9
        return total, torch.autograd.grad(total, dino_student)[0]

    (eager_total, eager_grad), (fused_total, fused_grad) = dino(dino_losses_stacked), dino(dino_losses_fused)
    result["dino"] = {"eager_ms": _cuda_ms(lambda: dino(dino_losses_stacked)),
                      "triton_ms": _cuda_ms(lambda: dino(dino_losses_fused)),
                      "loss_diff": (fused_total - eager_total).item(),
                      "grad_max_abs_diff": (fused_grad.float() - eager_grad.float()).abs().max().item(),
                      "grad_max_abs": eager_grad.float().abs().max().item()}
    print(f"[logit_kernels] DINO terms + backward: eager {result['dino']['eager_ms']:.2f} ms, triton "
          f"{result['dino']['triton_ms']:.2f} ms; loss {result['dino']['loss_diff']:+.2e}, gradient max |diff| "
          f"{result['dino']['grad_max_abs_diff']:.2e} of {result['dino']['grad_max_abs']:.2e}", flush=True)
    del eager_grad, fused_grad
    # tile sizes: (rows, columns, warps) of each kernel family
    targets = sinkhorn_assignments(teacher, 0.05)
    student_loss = ibot_loss(student, targets, weights, 128, student_temp=0.1)
    timed = {"_MATVEC_BLOCK": lambda: sinkhorn_assignments(teacher, 0.05),
             "_FORWARD_BLOCK": lambda: ibot_loss(student, targets, weights, 128, student_temp=0.1),
             "_BACKWARD_BLOCK": lambda: torch.autograd.grad(student_loss, student, retain_graph=True)}
    for attr, configs in TILES.items():
        default = getattr(lk, attr)
        try:
            times = {}
            for config in configs:
                setattr(lk, attr, config)
                times["x".join(map(str, config))] = _cuda_ms(timed[attr])
        finally:
            setattr(lk, attr, default)
        result[f"tiles{attr.lower()}"] = times
        print(f"[logit_kernels] {attr.strip('_').lower()} (rows x columns x warps): "
              + ", ".join(f"{k} {ms:.2f} ms" for k, ms in times.items()), flush=True)
    torch.cuda.empty_cache()
    return result


def throughput(device: str) -> dict[str, float]:
    from dinov3_eo.models.hub import build_backbone

    result = {}
    for arch, batch in (("vits16", 256), ("vitb16", 256), ("vitl16", 128)):
        model = build_backbone(arch).to(device).eval()
        x = torch.randn(batch, 3, 224, 224, device=device)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):
                model(x)
            torch.cuda.synchronize()
            start, n = time.perf_counter(), 10
            for _ in range(n):
                model(x)
            torch.cuda.synchronize()
        result[f"{arch}_fwd_img_s"] = batch * n / (time.perf_counter() - start)
        print(f"[speed] {arch} forward, 224 px, bf16, batch {batch}: {result[f'{arch}_fwd_img_s']:,.0f} images/s")
        del model
    torch.cuda.empty_cache()
    return result


def learning_check(pack_dir: str, minutes: float, batch: int, device: str, global_size: int, local_size: int,
                   arch: str = "vits16", knn_every: int = 0, steps: int | None = None) -> dict:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from bench_pretrain import step_overhead
    from dinov3_eo.models.hub import build_backbone
    from dinov3_eo.ssl.module import DINOv3Pretrain

    # the short-run recipe (SHORT_RUN) with the lr that learnt best in three runs side by side on an H100
    # (sqrt-scaled 5e-4 at batch 256; 1e-3 and 2e-3 learnt less, README)
    recipe = {**dict(scale_lr_with_batch=True, base_lr=2.5e-4, layerwise_decay=0.9, clip_grad=3.0, n_local_crops=8,
                     logit_kernels="auto"),  # as a fit: the Triton kernels on a GPU
              **SHORT_RUN, **json.loads(os.environ.get("GPU_CHECK_RECIPE", "{}"))}  # e.g. '{"dino_out_dim": 16384}'
    print(f"[learn] recipe: {recipe}", flush=True)
    # the step time of this exact configuration sets the step count, so the cosine schedules end with the budget
    probe = step_overhead(arch, batch, 4, global_size=global_size, local_size=local_size, device=device,
                          bf16=device == "cuda", n_local=recipe["n_local_crops"],
                          **{k: v for k, v in recipe.items() if k != "n_local_crops"})
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    # a fixed count where the probe cannot know the step time (several runs sharing one GPU)
    steps = steps or max(int(minutes * 60 * 0.9 / probe["full_s"]), 20)
    data = GPUTiles(pack_dir, batch, device)
    module = DINOv3Pretrain(
        backbone=arch, global_crop_size=global_size,
        local_crop_size=local_size, lr_schedule="cosine", lr_warmup_steps=max(steps // 10, 1),
        teacher_temp_warmup_steps=max(steps // 4, 1), momentum_teacher=0.99, final_momentum_teacher=1.0,
        # the official run freezes the prototypes for 1 % of its 125k steps = 10 teacher-momentum horizons; a short
        # run needs the same horizons: unfrozen early, the student's prototypes shrink to uniform outputs before the
        # EMA teacher's features have spread, and DINO/iBOT stay at log K (README, "Pretraining learning check")
        freeze_last_layer_steps=max(steps // 10, 1), **recipe,
    )

    class Budget(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:  # noqa: ANN001, ANN002
            elapsed = time.perf_counter() - start
            if trainer.global_step % 250 == 0:  # a line now and then instead of a progress bar in a log
                print(f"[learn]   step {trainer.global_step}/{steps}, {elapsed:.0f} s, "
                      f"loss {float(trainer.callback_metrics.get('loss', float('nan'))):.3f}", flush=True)
            if elapsed > minutes * 60:
                trainer.should_stop = True

    euro = np.load(Path(pack_dir) / "eurosat.npz")
    tr, te, ytr, yte = euro["train"], euro["test"], euro["train_y"], euro["test_y"]
    curve: list[dict] = []

    class Curve(Callback):
        """k-NN of the EMA teacher and the loss terms every ``knn_every`` steps: does it learn, then drift?"""

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:  # noqa: ANN001, ANN002
            if knn_every and trainer.global_step % knn_every == 0:
                teacher = pl_module.teacher["backbone"]
                acc = knn_accuracy(backbone_features(teacher, tr), ytr, backbone_features(teacher, te), yte)
                terms = {k.split("/")[-1]: round(float(v), 4) for k, v in trainer.callback_metrics.items()
                         if k.startswith("loss/")}
                curve.append({"step": trainer.global_step, "seconds": round(time.perf_counter() - start, 1),
                              "knn_64px": acc, **terms})
                print(f"[curve] {curve[-1]}", flush=True)

    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=0)
    trainer = L.Trainer(max_steps=steps, accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if device == "cuda" else "32",  # CPU bf16 is ~5x slower here
                        logger=False, enable_checkpointing=False, callbacks=[Budget(), Curve()], enable_model_summary=False,
                        enable_progress_bar=False, log_every_n_steps=50, limit_val_batches=0)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    elapsed = time.perf_counter() - start
    done = trainer.global_step
    peak_gib = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")

    teacher = module.teacher["backbone"].to(device)
    acc = {}
    for size in (TILE, global_size):
        acc[f"pretrained_{size}px"] = knn_accuracy(backbone_features(teacher, tr, size=size), ytr,
                                                  backbone_features(teacher, te, size=size), yte)
    torch.manual_seed(0)
    random_backbone = build_backbone(arch, **recipe.get("backbone_kwargs", {})).to(device)  # the trained init
    acc["random_weights"] = knn_accuracy(backbone_features(random_backbone, tr, size=global_size), ytr,
                                         backbone_features(random_backbone, te, size=global_size), yte)
    acc["colour_histograms"] = knn_accuracy(colour_features(tr), ytr, colour_features(te), yte, cosine=False)
    result = {"steps": done, "planned_steps": steps, "minutes": elapsed / 60, "batch": batch,
              "images_per_s": done * batch / elapsed, "peak_gpu_gib": peak_gib, "probe": probe,
              "global_size": global_size, "local_size": local_size, "knn": acc, "curve": curve}
    print(f"[learn] {arch} on {device}: {done} steps (planned {steps}) of batch {batch} in {elapsed / 60:.1f} min "
          f"= {result['images_per_s']:,.0f} images/s (2x{global_size} + {recipe['n_local_crops']}x{local_size} crops each), "
          f"peak GPU memory {peak_gib:.1f} GiB")
    print("[learn] EuroSAT k-NN (k=20), 1400 train / 600 test, chance 0.100: "
          + " | ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    return result


def run(pack_dir: str, minutes: float, batch: int, out: str | None, global_size: int, local_size: int,
        arch: str, only: list[str] | None = None, knn_every: int = 0, steps: int | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}", flush=True)
    results: dict = {"torch": torch.__version__}

    def save() -> None:
        if out:
            Path(out).write_text(json.dumps(results, indent=1))

    out_dir = str(Path(out).parent) if out else None
    stages = [("learning", lambda: learning_check(pack_dir, minutes, batch, device, global_size, local_size, arch,
                                                  knn_every, steps))]
    if device == "cuda":
        import tempfile

        torch.set_float32_matmul_precision("high")
        tmp = tempfile.mkdtemp()
        triton = {"logit_kernels": "triton"}
        stages = [("correctness", lambda: correctness(device)), ("logit_kernels", lambda: logit_kernels_check(device)),
                  ("throughput", lambda: throughput(device)),
                  ("step_overhead_224", lambda: step_overhead_224(device)),
                  ("step_overhead_224_b256", lambda: step_overhead_224(device, batch=256)),
                  ("step_overhead_224_compiled_losses", lambda: step_overhead_224(device, compile="losses")),
                  ("step_overhead_224_compiled", lambda: step_overhead_224(device, compile=True)),
                  ("step_overhead_224_triton", lambda: step_overhead_224(device, compile="losses", **triton)),
                  ("step_overhead_224_triton_eager", lambda: step_overhead_224(device, **triton)),
                  ("step_overhead_224_vitb16_triton", lambda: step_overhead_224(device, arch="vitb16", **triton)),
                  ("step_overhead_224_b128_triton", lambda: step_overhead_224(device, batch=128, **triton)),
                  # the RoPE tables as made up to session 18 (one set of launches per block), in the same process
                  ("step_overhead_224_b128_rope_per_block",
                   lambda: step_overhead_224(device, batch=128, rope_per_block=True, **triton)),
                  # the host's launches are a fixed cost per step: how much of the wall-time gap a larger batch hides
                  ("step_overhead_224_b256_triton", lambda: step_overhead_224(device, batch=256, **triton)),
                  # what reading the losses after the backward's launch (as fits do since session 15) gains over a
                  # blocking read after the forward (before), and what no read at all would (the bound)
                  ("step_overhead_224_b128_readback_after_forward",
                   lambda: step_overhead_224(device, batch=128, readback="after_forward", **triton)),
                  ("step_overhead_224_b128_readback_none",
                   lambda: step_overhead_224(device, batch=128, readback="none", **triton)),
                  ("views_spread", lambda: views_spread(device)),
                  # a fit's own host time per step: self.log of 13 values every step (before session 20) or not
                  ("fit_logging_ab_b128", lambda: fit_logging_ab(pack_dir, device)),
                  ("rope_ab_b128", lambda: rope_ab(device)),
                  ("profile", lambda: step_profile(device, out_dir)),
                  ("profile_compiled_losses", lambda: step_profile(device, out_dir, compile="losses")),
                  ("profile_triton", lambda: step_profile(device, out_dir, compile="losses", **triton)),
                  ("profile_triton_eager", lambda: step_profile(device, out_dir, **triton)),
                  ("profile_b128_triton", lambda: step_profile(device, out_dir, batch=128, **triton)),
                  ("views_profile", lambda: views_profile(device, out_dir)),
                  ("stages", lambda: later_stages(pack_dir, device, tmp)),
                  ("stages_triton", lambda: later_stages(pack_dir, device, tmp, **triton))] + stages
    else:
        import tempfile

        stages = [("profile", lambda: step_profile(device, out_dir, arch, batch=2)),
                  ("stages", lambda: later_stages(pack_dir, device, tempfile.mkdtemp(), arch))] + stages
    if only:
        unknown = sorted(set(only) - {name for name, _ in stages})
        if unknown:  # before any stage runs: a misspelt name would otherwise spend the device's time on nothing
            raise SystemExit(f"--only: no stage {', '.join(unknown)} on {device}; the stages here: "
                             f"{', '.join(name for name, _ in stages)}.")
        stages = [(name, stage) for name, stage in stages if name in only]
    for name, stage in stages:  # one failing stage must not cost the others (the GPU time is scarce)
        try:
            results[name] = stage()
        except Exception as error:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        save()


def later_stages(pack_dir: str, device: str, tmp: str, arch: str = "vits16",
                 logit_kernels: str = "torch") -> dict[str, float]:
    """Gram, high-resolution and distillation stages for a few bf16 steps on the GPU: they run and stay finite (with
    ``logit_kernels`` as the stages' option of that name)."""
    import lightning as L

    from dinov3_eo.ssl.distill import DINOv3Distill
    from dinov3_eo.ssl.module import DINOv3Pretrain

    small = dict(dino_out_dim=4096, ibot_out_dim=4096, global_crop_size=112, local_crop_size=48, n_local_crops=4,
                 scale_lr_with_batch=False, lr_warmup_steps=1, logit_kernels=logit_kernels)
    data = torch.utils.data.DataLoader(GPUTiles(pack_dir, 32, device), batch_size=None, num_workers=0)
    result = {}
    stages = {
        "gram": lambda: DINOv3Pretrain(backbone=arch, gram_loss_weight=1.0, gram_teacher="ema",
                                       gram_first_update=2, gram_update_every=2, gram_max_updates=1, **small),
        "highres": lambda: DINOv3Pretrain(backbone=arch, gram_loss_weight=1.0, gram_teacher="ema",
                                          resolutions=[[112, 48, 224, 0.5], [160, 64, 320, 0.5]], **small),
    }
    on_gpu = dict(accelerator="gpu", precision="bf16-mixed") if device == "cuda" else dict(accelerator="cpu")

    def fit_four_steps(module: L.LightningModule) -> float:
        """The last logged loss of 4 steps."""
        trainer = L.Trainer(max_steps=4, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, **on_gpu)
        trainer.fit(module, train_dataloaders=data)
        return float(trainer.callback_metrics["loss"])

    for name, make in stages.items():
        module = make()
        start = time.perf_counter()
        loss = fit_four_steps(module)
        result[f"{name}_loss"], result[f"{name}_s_per_step"] = loss, (time.perf_counter() - start) / 4
        print(f"[stages] {name} ({logit_kernels} logit losses): 4 bf16 steps, last loss {loss:.3f} (finite: {math.isfinite(loss)})", flush=True)
    teacher = Path(tmp) / "teacher.ckpt"
    torch.save({"state_dict": module.state_dict(), "dinov3_eo": module.backbone_meta().to_dict()}, teacher)
    distill = DINOv3Distill(teacher=str(teacher), students=["vitt16", "vitt16"], global_crop_size=112,
                            local_crop_size=48, n_local_crops=4, scale_lr_with_batch=False,
                            logit_kernels=logit_kernels)
    result["distill_loss"] = fit_four_steps(distill)
    print(f"[stages] distill {arch} -> 2 x ViT-T ({logit_kernels} logit losses): 4 steps, last loss {result['distill_loss']:.3f}", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return result




def step_profile(device: str, out_dir: str | None, arch: str = "vits16", batch: int = 64,
                 compile: bool | str = False, **module_kwargs) -> dict[str, float]:
    """The kernels of one full SSL step (ViT-S, batch 64, 224/96, bf16 on a GPU), grouped, biggest first; the same for
    the backbone-only work on the same crops, and the ops whose device time the full step adds to it (``compile``
    as ``model.compile``)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from bench_pretrain import ssl_step_setup, step_and_backbone_work, step_variant

    cuda = device == "cuda"
    module, optimizer, data = ssl_step_setup(arch, batch, device=device, compile=compile, **module_kwargs)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cuda)
    variant = step_variant(compile, module.logit_kernels_in_use)
    suffix = ("_" + variant.replace(", ", "_").replace(" ", "_") if variant else "") + (f"_b{batch}" if batch != 64 else "")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    work = dict(zip(("full", "backbone"), step_and_backbone_work(module, optimizer, data, global_size=224,
                                                                 local_size=96, autocast=autocast)))
    per_op: dict[str, dict[str, float]] = {}
    host_per_op: dict[str, dict[str, float]] = {}
    calls: dict[str, dict[str, int]] = {}
    tables = []
    totals = {}
    for name, fn in work.items():
        fn(), fn()
        if cuda:
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            fn()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        tables.append(f"{name}:\n" + events.table(sort_by=f"self_{'cuda' if cuda else 'cpu'}_time_total", row_limit=40))
        # a kernel's time shows twice: on its own row and as the self time of the op that launched it; the totals
        # take the kernel rows, the per-op additions the op rows
        kernels = [e for e in events if e.device_type != DeviceType.CPU] if cuda else list(events)
        totals[name] = sum(getattr(e, key, 0) for e in kernels) / 1e3
        ops = [e for e in events if e.device_type == DeviceType.CPU]
        per_op[name] = {e.key: getattr(e, key, 0) / 1e3 for e in ops}
        host_per_op[name] = {e.key: e.self_cpu_time_total / 1e3 for e in ops}
        calls[name] = {e.key: e.count for e in ops}
    added = {op: ms - per_op["backbone"].get(op, 0.0) for op, ms in per_op["full"].items()}
    top = sorted(added.items(), key=lambda item: -abs(item[1]))[:16]
    # every op the full step adds: device time (what the kernel-time ratio counts) and host time (what a launch-bound
    # step's wall time follows), with the extra calls
    rows = []
    for op in set(per_op["full"]) | set(per_op["backbone"]):
        rows.append((per_op["full"].get(op, 0.0) - per_op["backbone"].get(op, 0.0),
                     host_per_op["full"].get(op, 0.0) - host_per_op["backbone"].get(op, 0.0),
                     calls["full"].get(op, 0) - calls["backbone"].get(op, 0), op))
    lines = [f"{'device ms':>10} {'host ms':>9} {'calls':>6}  op (full step minus backbone-only work)"]
    lines += [f"{device_ms:10.3f} {host_ms:9.3f} {extra:6d}  {op}"
              for device_ms, host_ms, extra, op in sorted(rows, key=lambda row: (-abs(row[0]), -abs(row[1])))
              if abs(device_ms) >= 0.005 or abs(host_ms) >= 0.05 or extra]
    host = {name: sum(ms.values()) for name, ms in host_per_op.items()}
    lines.insert(0, f"host time of the ops: full step {host['full']:.1f} ms, backbone-only work {host['backbone']:.1f} ms")
    if out_dir:
        (Path(out_dir) / f"step_profile{suffix}.txt").write_text("\n".join(lines) + "\n\n" + "\n\n".join(tables))
    print(f"[profile] {arch}, batch {batch}{', ' + variant if variant else ''}: {'device' if cuda else 'CPU'} time: full step {totals['full']:.1f} ms, backbone-only work "
          f"{totals['backbone']:.1f} ms; the full step adds: " + ", ".join(f"{op[:50]} {ms:+.2f}" for op, ms in top),
          flush=True)
    unit = "device_ms" if cuda else "cpu_ms"
    print(f"[profile] host time of the ops: full step {host['full']:.1f} ms, backbone-only work {host['backbone']:.1f} ms",
          flush=True)
    result = {unit: totals["full"], f"backbone_{unit}": totals["backbone"], "added_ms": dict(top),
              "host_ms": host["full"], "backbone_host_ms": host["backbone"]}
    if cuda:  # every host-device synchronisation inside the step (a launch-bound step stalls at each), and where
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                work["full"]()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        places = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        print(f"[profile] {len(places)} synchronisations inside the step: {', '.join(places) or 'none'}", flush=True)
        result |= {"syncs": len(places), "sync_places": places}
        torch.cuda.empty_cache()
    return result


def views_profile(device: str, out_dir: str | None) -> dict[str, float]:
    """Where the crops' time goes: host (until ``make_views`` returns) vs device (until it finishes), and its ops,
    for a batch without nodata (``valid=None``, as the stages pass it) and one with a nodata strip (mask path).

    Before the sync-free crops (2026-11-27 evening) the views took 18-35 ms of a 141-186 ms ViT-S step at batch 64
    (224/96 px) and 71 ms of 214 ms at the learning check's batch 256 (112/48 px) on an H100; counted on meta
    tensors they then launched 319 device ops with 35 host-to-device copies and 2 syncs, now 38 ops and 1 copy.
    """
    from torch.profiler import ProfilerActivity, profile

    from bench_pretrain import _step_view_kwargs, ssl_step_setup
    from dinov3_eo.ssl.stage import make_views

    cuda = device == "cuda"
    result = {}
    for batch, global_size, local_size in ((64, 224, 96), (256, 112, 48)):
        module, _, data = ssl_step_setup("vitt16", batch, device=device, global_size=global_size,
                                         local_size=local_size, dino_out_dim=1024, ibot_out_dim=1024)
        kwargs = _step_view_kwargs(module, global_size, local_size)
        images = data["image"]
        nodata = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool, device=images.device)
        nodata[:, :, :20] = False  # a 20-px collar: the mask path
        for name, valid in (("valid", None), ("nodata", nodata)):
            for _ in range(3):
                make_views(data["image"], valid, **kwargs)
            host = total = 0.0
            for _ in range(5):
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                make_views(data["image"], valid, **kwargs)
                host += time.perf_counter() - start
                if cuda:
                    torch.cuda.synchronize()
                total += time.perf_counter() - start
            key = f"b{batch}_{global_size}_{name}"
            result[f"{key}_host_ms"], result[f"{key}_total_ms"] = host / 5 * 1e3, total / 5 * 1e3
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                make_views(data["image"], valid, **kwargs)
                if cuda:
                    torch.cuda.synchronize()
            tables = [prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)]
            if cuda:
                tables.append(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15))
            print(f"[views] batch {batch}, {global_size}/{local_size} px, {name}: returns after "
                  f"{result[f'{key}_host_ms']:.1f} ms, done after {result[f'{key}_total_ms']:.1f} ms", flush=True)
            if out_dir:
                (Path(out_dir) / f"views_profile_{key}.txt").write_text("\n\n".join(tables))
            else:
                print(tables[0])
        del module, data
    return result


def step_overhead_224(device: str, batch: int = 64, compile: bool | str = False, arch: str = "vits16",
                      rope_per_block: bool = False, repeats: int = 5, **module_kwargs) -> dict[str, float]:
    """The step overhead at 2x224 + 8x96 crops, bf16; ``rope_per_block``: each block's RoPE tables made on their own
    (the launches before session 19 batched them), for a comparison in one process."""
    from bench_pretrain import step_overhead

    from dinov3_eo.models.vit import DinoVisionTransformer

    batched = DinoVisionTransformer._rope_tables

    def per_block(self, h: int, w: int, count: int) -> list:  # noqa: ANN001
        return [table for _ in range(count) for table in batched(self, h, w, 1)]

    if rope_per_block:
        DinoVisionTransformer._rope_tables = per_block
    try:
        result = step_overhead(arch, batch, repeats, device=device, bf16=True, compile=compile, **module_kwargs)
    finally:
        DinoVisionTransformer._rope_tables = batched
    torch.cuda.empty_cache()
    return result


def rope_ab(device: str, batch: int = 128, rounds: int = 2, repeats: int = 10) -> dict:
    """The step overhead with the RoPE tables made per block (before session 19) and all at once, alternated
    ``rounds`` times in one process: the machines' wall times drift too much for a comparison across calls."""
    runs: dict[str, list] = {"per_block": [], "batched": []}
    for _ in range(rounds):
        for name in runs:
            runs[name].append(step_overhead_224(device, batch=batch, rope_per_block=name == "per_block",
                                                repeats=repeats, logit_kernels="triton"))
    summary = {}
    for name, results in runs.items():
        paired = sorted(r for result in results for r in result["paired_ratios"])
        summary[name] = {"paired_median_ratio": paired[len(paired) // 2],
                         "steady_ratio": [result.get("steady_ratio", math.nan) for result in results],
                         "backbone_s": [result["backbone_s"] for result in results],
                         "host_queue_full_s": [result.get("host_queue_full_s", math.nan) for result in results],
                         "host_queue_backbone_s": [result.get("host_queue_backbone_s", math.nan) for result in results]}
        print(f"[rope] {name}: median paired ratio {summary[name]['paired_median_ratio']:.3f}x over {len(paired)} "
              f"pairs; back to back {', '.join(f'{r:.3f}' for r in summary[name]['steady_ratio'])}; host queue "
              f"full {', '.join(f'{t * 1e3:.0f}' for t in summary[name]['host_queue_full_s'])} ms, backbone "
              f"{', '.join(f'{t * 1e3:.0f}' for t in summary[name]['host_queue_backbone_s'])} ms", flush=True)
    return {"runs": runs, "summary": summary}


def fit_logging_ab(pack_dir: str | None, device: str, batch: int = 128, steps: int = 120, rounds: int = 2,
                   warm_up: int = 20, data=None, **module_kwargs) -> dict:  # noqa: ANN001
    """Lightning fits of ViT-S (bf16 and the Triton logit kernels on a GPU, a CSV logger writing every 50 steps) as
    shipped since session 20 (the loss terms, schedules and gradient norms logged on the logger's steps only)
    against every value logged at every step (before), alternated ``rounds`` times (``bench_pretrain.fits_logging_ab``):
    the mean step time of each past ``warm_up`` steps. On the CPU's host-time proxy the fit's step fell by ~4 ms a
    step; a host-bound GPU step should gain as much host time. ``data``: batches to train on (default: the pack's
    :class:`GPUTiles`); ``module_kwargs`` override the model (tests use a tiny one)."""
    from bench_pretrain import LOGGING_VARIANTS, fits_logging_ab

    kwargs = {"backbone": "vits16", "logit_kernels": "triton" if device == "cuda" else "torch",
              "preview_every_n_steps": 0, "scale_lr_with_batch": True, "base_lr": 2.5e-4, **SHORT_RUN,
              **module_kwargs}  # fmt: skip
    data = data if data is not None else GPUTiles(pack_dir, batch, device)
    times = fits_logging_ab(kwargs, data, device=device, steps=steps, warm_up=warm_up, rounds=rounds)
    result: dict = {name: float(np.median(times[name])) for name in LOGGING_VARIANTS}
    result["ratio"] = result["logged_on_logger_steps"] / result["every_value_every_step"]
    result["all_s"] = times
    print(f"[fit] {kwargs['backbone']} batch {batch}, Lightning fits, mean step past {warm_up}: logged on the "
          f"logger's steps {result['logged_on_logger_steps'] * 1e3:.1f} ms | every value every step "
          f"{result['every_value_every_step'] * 1e3:.1f} ms ({result['ratio']:.3f}x)", flush=True)
    return result


def views_spread(device: str, batch: int = 128, repeats: int = 30) -> dict:
    """The spread of one step's crops and masks (synchronized before and after), with the garbage collector's
    pauses: the breakdown of the step checks saw them take 13 to 80 ms at batch 128 from one step to the next."""
    from bench_pretrain import _step_view_kwargs, python_gc_pauses, ssl_step_setup

    from dinov3_eo.ssl.stage import make_views

    module, _, data = ssl_step_setup("vits16", batch, device=device, logit_kernels="triton")
    kwargs = _step_view_kwargs(module, 224, 96)
    times = []
    make_views(data["image"], None, **kwargs)
    with python_gc_pauses() as pauses:
        for _ in range(repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            make_views(data["image"], None, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    times.sort()
    result = {"min_s": times[0], "median_s": times[len(times) // 2], "max_s": times[-1], "all_s": times,
              "gc_collections": pauses["count"], "gc_seconds": pauses["seconds"]}
    print(f"[views] batch {batch}, {repeats} synchronized calls: min {times[0] * 1e3:.1f} ms, median "
          f"{result['median_s'] * 1e3:.1f} ms, max {times[-1] * 1e3:.1f} ms; {pauses['count']} garbage "
          f"collections, {pauses['seconds'] * 1e3:.1f} ms", flush=True)
    del module, data
    torch.cuda.empty_cache()
    return result


def main() -> None:
    retain_freed_memory()  # as the dinov3-eo command does, before any large tensor
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the learning check's data (run here, needs ../shared/data)")
    p.add_argument("folder")
    r = sub.add_parser("run", help="the GPU checks (run on the GPU machine)")
    r.add_argument("folder")
    r.add_argument("--minutes", type=float, default=6.0, help="training budget of the learning check (<= 8)")
    r.add_argument("--batch", type=int, default=256)
    r.add_argument("--global-size", type=int, default=112)
    r.add_argument("--local-size", type=int, default=48)
    r.add_argument("--arch", default="vits16")
    r.add_argument("--only", default=None, help="comma-separated stages, in the order of run() (an unknown name "
                   "lists them): e.g. correctness,logit_kernels,step_overhead_224_triton_eager,learning")
    r.add_argument("--knn-every", type=int, default=0, help="k-NN of the teacher every N training steps (0: only at the end)")
    r.add_argument("--steps", type=int, default=None, help="training steps (default: as many as --minutes allow, probed)")
    r.add_argument("--out", default=None, help="write every number to this JSON file")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.folder)
    else:
        run(args.folder, args.minutes, args.batch, args.out, args.global_size, args.local_size, args.arch,
            args.only.split(",") if args.only else None, args.knn_every, args.steps)


if __name__ == "__main__":
    main()
