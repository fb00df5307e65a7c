"""Forward throughput of dinov3_eo's ViT-S/16 against timm's ``vit_small_patch16_dinov3`` on this machine.

Both models carry the same weights (ours handed to timm through ``to_timm``, i.e. timm's own checkpoint
filter), run in eval mode under ``torch.inference_mode()``, and are timed pass by pass in alternation
(ours, timm, timm, ours, ...) so that background load hits both alike. The fastest pass of each is
reported, as wall-clock images/s and as images per CPU-second of this process (the steadier number on a
shared machine). Run:

    python scripts/bench_backbone.py [--sizes 224 512] [--batch 8 2] [--repeats 10] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dinov3_eo.models.hub import to_timm
from dinov3_eo.models.vit import build_backbone


def timed_pass(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward pass of ``x`` (B, C, H, W)."""
    wall, cpu = time.perf_counter(), time.process_time()
    model(x)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512], help="square image sides in pixels")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 2], help="batch size per image side")
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per model and size (fastest is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if len(args.batch) != len(args.sizes):
        parser.error(f"--batch needs one value per size ({len(args.sizes)}), got {len(args.batch)}.")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ours = build_backbone("vits16").eval()
    theirs = to_timm(ours).eval()
    models = {"ours": ours, "timm": theirs}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu; fastest of {args.repeats} passes")
    print(f"{'size':>5} {'batch':>5} | {'img/s ours':>10} {'timm':>7} {'ratio':>6} | "
          f"{'img/CPU-s ours':>14} {'timm':>7} {'ratio':>6} | max |CLS diff|")
    with torch.inference_mode():
        for size, batch in zip(args.sizes, args.batch):
            x = torch.randn(batch, 3, size, size)
            diff = (ours(x) - theirs(x)).abs().max().item()  # also the warm-up pass
            best = {name: [float("inf"), float("inf")] for name in models}
            for r in range(args.repeats):
                order = ("ours", "timm") if r % 2 == 0 else ("timm", "ours")
                for name in order:
                    wall, cpu = timed_pass(models[name], x)
                    best[name] = [min(best[name][0], wall), min(best[name][1], cpu)]
            wall_rate = {n: batch / b[0] for n, b in best.items()}
            cpu_rate = {n: batch / b[1] for n, b in best.items()}
            print(
                f"{size:>5} {batch:>5} | {wall_rate['ours']:>10.2f} {wall_rate['timm']:>7.2f} "
                f"{wall_rate['ours'] / wall_rate['timm']:>5.2f}x | {cpu_rate['ours']:>14.2f} {cpu_rate['timm']:>7.2f} "
                f"{cpu_rate['ours'] / cpu_rate['timm']:>5.2f}x | {diff:.1e}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
