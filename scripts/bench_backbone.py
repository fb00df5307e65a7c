"""Forward throughput of dinov3_eo's ViT-S/16 against timm's ``vit_small_patch16_dinov3`` on this machine.

Both models carry the same random weights (ours converted through timm's own checkpoint filter), run
under ``torch.inference_mode()`` in eval mode, and are timed alternately (A, B, A, B, ...) so that
background load hits both equally; the best of the repeats is reported. Run:

    python scripts/bench_backbone.py [--sizes 224 512] [--batch 8 2] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dinov3_eo.models.hub import to_timm
from dinov3_eo.models.vit import build_backbone


def images_per_second(model: nn.Module, x: torch.Tensor, *, iters: int) -> float:
    """Mean throughput of ``iters`` forward passes of ``x`` (B, C, H, W), after one warm-up pass."""
    with torch.inference_mode():
        model(x)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        elapsed = time.perf_counter() - start
    return iters * x.shape[0] / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="square image sides in pixels")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 2], help="batch size per image side")
    parser.add_argument("--iters", type=int, default=3, help="forward passes per timing")
    parser.add_argument("--repeats", type=int, default=5, help="alternating timings per model (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if len(args.batch) != len(args.sizes):
        parser.error(f"--batch needs one value per size ({len(args.sizes)}), got {len(args.batch)}.")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = build_backbone("vits16").eval()
    theirs = to_timm(ours).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print(f"{'size':>6} {'batch':>5} {'dinov3_eo img/s':>16} {'timm img/s':>11} {'ratio':>6}")
    for size, batch in zip(args.sizes, args.batch):
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            diff = (ours(x) - theirs.forward_features(x)[:, 0]).abs().max().item()
        best = {"ours": 0.0, "timm": 0.0}
        for _ in range(args.repeats):
            best["ours"] = max(best["ours"], images_per_second(ours, x, iters=args.iters))
            best["timm"] = max(best["timm"], images_per_second(theirs, x, iters=args.iters))
        ratio = best["ours"] / best["timm"]
        print(f"{size:>6} {batch:>5} {best['ours']:>16.2f} {best['timm']:>11.2f} {ratio:>5.2f}x  (max |CLS diff| {diff:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
