"""Benchmark the three ways a dense task can treat its backbone: frozen, LoRA, full fine-tuning.

One training step of a segmentation model (a DINOv3 ViT + the official linear head, cross-entropy, AdamW) per
variant, each in a fresh child process so that its peak RSS is its own:

* ``frozen`` — the official protocol: the backbone runs without autograd, only the head trains;
* ``lora`` — rank-``--rank`` updates on every block's q/k/v and output projections (:mod:`dinov3_eo.models.lora`);
* ``full`` — every backbone weight trains (at a lower lr, as ``backbone_lr_mult``).

Printed per variant: trained weights, the bytes of their gradients and AdamW moments, the median step time over
``--steps`` steps after one warm-up step, and the child's peak RSS; ratios against ``frozen`` in the same run.
LoRA trains ~1 % of the weights with optimiser state to match, but it still back-propagates through the whole
backbone (the updates sit in every block), so its step time and activation memory are close to full fine-tuning's.

    python scripts/bench_lora.py [--arch vits16] [--batch 4] [--size 224] [--rank 8] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("frozen", "lora", "full")


def run_variant(variant: str, arch: str, batch: int, size: int, rank: int, steps: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from dinov3_eo.allocator import retain_freed_memory
    from dinov3_eo.models.dense import DenseModel, LinearHead
    from dinov3_eo.models.vit import build_backbone

    retain_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vit = build_backbone(arch)
    model = DenseModel(backbone=vit, head=LinearHead(in_channels=vit.embed_dim, out_channels=6), layers=1,
                       freeze_backbone=variant == "frozen", lora={"rank": rank} if variant == "lora" else None)  # fmt: skip
    model.train()
    groups = model.parameter_groups(lr=1e-3)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    trained = [p for g in groups for p in g["params"]]
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, 6, (batch, size, size))
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    state_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t) and t.dim() > 0)  # fmt: skip
    return {
        "variant": variant,
        "trained_weights": sum(p.numel() for p in trained),
        "total_weights": sum(p.numel() for p in model.parameters()),
        "grad_and_adam_mib": (state_bytes + sum(p.numel() * p.element_size() for p in trained)) / 2**20,
        "step_s": statistics.median(times[1:]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_variant(args.child, args.arch, args.batch, args.size, args.rank, args.steps, args.threads)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--arch", args.arch, "--batch", str(args.batch),
               "--size", str(args.size), "--rank", str(args.rank), "--steps", str(args.steps),
               "--threads", str(args.threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    base = results["frozen"]
    print(f"{args.arch}, batch {args.batch}, {args.size} px, rank {args.rank}, {args.threads} threads, median of "
          f"{args.steps} steps:")
    for variant, r in results.items():
        print(f"  {variant:6s}: {r['trained_weights']:>12,} trained weights ({100 * r['trained_weights'] / r['total_weights']:6.2f} %), "
              f"grads + AdamW {r['grad_and_adam_mib']:8.1f} MiB, step {r['step_s']:.3f} s "
              f"({r['step_s'] / base['step_s']:.2f}x frozen), peak RSS {r['peak_rss_mib']:,.0f} MiB "
              f"({r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x)")


if __name__ == "__main__":
    main()
