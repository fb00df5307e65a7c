"""bf16 autocast on a CPU: what it buys, and why attention stays in float32 there.

CPUs with bf16 instructions (AVX512-BF16, AMX) multiply bf16 matrices several times faster than float32 ones, so
Lightning's ``--trainer.precision bf16-mixed`` pays off on them too. PyTorch's CPU attention kernels do not: their
bf16 forward is no faster than float32 and their bf16 backward several times slower for the short sequences of
small crops, so :class:`~dinov3_eo.models.vit.SelfAttention` runs attention in float32 under CPU autocast. This
script measures, in one process, alternating the variants:

1. matrix products, float32 vs bf16 (GFLOP/s);
2. attention forward + backward at ViT crop shapes: bf16 kernel vs float32 kernel on the same bf16 inputs
   (what ``SelfAttention`` does under CPU autocast);
3. one SSL step of the learning check (ViT-T/16, batch 32, 2x64 + 4x32-px crops, 4,096-prototype heads):
   float32 vs bf16 autocast;
4. backbone inference (ViT-S/16, 4 windows of 512 px): float32 vs bf16 autocast, and how close the features stay;
5. ``predict_raster`` end to end (a ViT-S/16 + linear head class map of a 1,536 x 1,536 RGB GeoTIFF, 512-px windows,
   overlap 0.25): ``amp=False`` vs ``amp=True``, and how many pixels change class.

    .venv/bin/python scripts/bench_cpu_bf16.py
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_pretrain as bp  # noqa: E402

from dinov3_eo.allocator import retain_freed_memory  # noqa: E402


def _ms(fn: Callable[[], object], repeats: int) -> float:
    return bp._time(fn, repeats) * 1e3


def matmul_rates(n: int = 2048, repeats: int = 10) -> None:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for dtype in (torch.float32, torch.bfloat16):
        x, y = a.to(dtype), b.to(dtype)
        ms = _ms(lambda: x @ y, repeats)
        print(f"[matmul] {n}x{n} {str(dtype).removeprefix('torch.')}: {2 * n**3 / ms / 1e6:,.0f} GFLOP/s")


def attention(shapes: list[tuple[int, int, int, int]], repeats: int = 5) -> None:
    for batch, heads, tokens, head_dim in shapes:
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

        def bf16_kernel() -> None:
            F.scaled_dot_product_attention(q, k, v).float().sum().backward()

        def float32_kernel() -> None:
            F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype).float().sum().backward()

        times = {"bf16": 0.0, "float32": 0.0}
        for _ in range(2):  # alternate
            times["bf16"] += _ms(bf16_kernel, repeats) / 2
            times["float32"] += _ms(float32_kernel, repeats) / 2
        print(f"[attention] B={batch} heads={heads} N={tokens} d={head_dim}, forward+backward: bf16 kernel "
              f"{times['bf16']:.2f} ms | float32 kernel {times['float32']:.2f} ms | "
              f"{times['bf16'] / times['float32']:.2f}x")


def ssl_step(repeats: int = 5) -> None:
    kwargs = dict(dino_out_dim=4096, dino_hidden_dim=512, dino_bottleneck_dim=128, ibot_out_dim=4096,
                  ibot_hidden_dim=512, ibot_bottleneck_dim=128) | bp.SHORT_RUN
    module, optimizer, data = bp.ssl_step_setup("vitt16", 32, global_size=64, local_size=32, n_local=4, **kwargs)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = module.compute_losses(data, step=10)
        losses["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = {False: 0.0, True: 0.0}
    for _ in range(2):
        for bf16 in (False, True):
            times[bf16] += _ms(lambda: step(bf16), repeats) / 2
    print(f"[ssl step] ViT-T/16, batch 32, 2x64 + 4x32 crops: float32 {times[False]:.0f} ms | bf16 autocast "
          f"{times[True]:.0f} ms | {times[False] / times[True]:.2f}x faster")


@torch.no_grad()
def inference(repeats: int = 3) -> None:
    from dinov3_eo.models.vit import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vits16").eval()
    x = torch.randn(4, 3, 512, 512)

    def run(bf16: bool) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return model.forward_features(x)["x_norm_patchtokens"].float()

    times = {False: 0.0, True: 0.0}
    for _ in range(2):
        for bf16 in (False, True):
            times[bf16] += _ms(lambda: run(bf16), repeats) / 2
    cosine = F.cosine_similarity(run(False), run(True), dim=-1)
    print(f"[inference] ViT-S/16, 4 x 512 px: float32 {times[False]:.0f} ms | bf16 autocast {times[True]:.0f} ms | "
          f"{times[False] / times[True]:.2f}x faster | patch-feature cosine to float32: min {cosine.min():.4f}, "
          f"mean {cosine.mean():.5f}")


def predict(repeats: int = 2) -> None:
    import tempfile

    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.inference.predict import predict_raster
    from dinov3_eo.models.dense import DenseModel, LinearHead
    from dinov3_eo.models.vit import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("vits16")
    model = DenseModel(backbone=backbone, head=LinearHead(in_channels=backbone.embed_dim, out_channels=6), layers=1).eval()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "scene.tif"
        side = 1536
        yy, xx = np.mgrid[0:side, 0:side]
        pixels = np.stack([(127 + 100 * np.sin(xx / (40 + 30 * b)) * np.cos(yy / 55)) for b in range(3)]).astype(np.uint8)
        with rasterio.open(src, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(300000, 6000000, 10, 10), tiled=True) as dst:
            dst.write(pixels)
        times: dict[bool, float] = {False: 0.0, True: 0.0}
        for r in range(repeats):
            for amp in (False, True):
                start = time.perf_counter()
                predict_raster(model, src, Path(tmp) / f"{amp}.tif", out_channels=6, window=512, overlap=0.25,
                               normalization=Normalization.preset("sat493m"), amp=amp, progress=False, overwrite=True)
                times[amp] += (time.perf_counter() - start) / repeats
        with rasterio.open(Path(tmp) / "False.tif") as a, rasterio.open(Path(tmp) / "True.tif") as b:
            changed = float((a.read(1) != b.read(1)).mean())
    print(f"[predict_raster] ViT-S/16 + linear head, {side}^2 px, 512-px windows: amp=False {times[False]:.1f} s | "
          f"amp=True {times[True]:.1f} s | {times[False] / times[True]:.2f}x faster | {changed:.2%} of pixels change class")


def main() -> None:
    retain_freed_memory()  # as the dinov3-eo command runs
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=["matmul", "attention", "ssl", "inference", "predict"])
    args = parser.parse_args()
    if not torch.cpu._is_avx512_bf16_supported() and not torch.cpu._is_amx_tile_supported():
        print("[note] this CPU has no bf16 instructions (AVX512-BF16/AMX): bf16 is emulated and slower here.")
    if "matmul" not in args.skip:
        matmul_rates()
    if "attention" not in args.skip:
        attention([(64, 3, 17, 64), (128, 3, 5, 64), (128, 6, 37, 64), (32, 6, 197, 64), (4, 6, 1029, 64)])
    if "ssl" not in args.skip:
        ssl_step()
    if "inference" not in args.skip:
        inference()
    if "predict" not in args.skip:
        predict()


if __name__ == "__main__":
    main()
