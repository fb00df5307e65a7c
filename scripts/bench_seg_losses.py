"""Benchmark the segmentation losses (:mod:`dinov3_eo.losses.segmentation`) against the cross-entropy.

Times forward + backward of each loss term on one batch of logits ``[B, K, H, W]`` (float32, a tenth of the pixels
unlabelled), alternating the terms over ``--repeats`` rounds so that any drift of the machine hits each alike, and
prints the median time and its ratio to ``ce`` (the default loss, the baseline). The head and backbone are not
timed: on a frozen ViT-S with a linear head the step's forward alone costs tens of milliseconds per image on a CPU,
so what matters is how a term compares with ``ce`` and with that.

    python scripts/bench_seg_losses.py [--batch 8 --classes 6 --size 256 --repeats 7 --threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinov3_eo.losses.segmentation import SEGMENTATION_LOSS_TERMS, segmentation_loss_terms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.classes, args.size, args.size, generator=g)
    mask = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=g)
    mask[torch.rand(mask.shape, generator=g) < 0.1] = 255

    def run(term: str) -> float:
        x = logits.clone().requires_grad_(True)
        start = time.perf_counter()
        (loss,) = segmentation_loss_terms(x, mask, (term,)).values()
        loss.backward()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {t: [] for t in SEGMENTATION_LOSS_TERMS}
    for term in SEGMENTATION_LOSS_TERMS:
        run(term)  # warm-up
    for _ in range(args.repeats):
        for term in SEGMENTATION_LOSS_TERMS:
            times[term].append(run(term))
    base = statistics.median(times["ce"])
    pixels = args.batch * args.size * args.size
    print(f"logits [{args.batch}, {args.classes}, {args.size}, {args.size}] ({pixels:,} pixels), "
          f"{args.threads} threads, median of {args.repeats}, forward + backward:")
    for term, values in times.items():
        median = statistics.median(values)
        print(f"  {term:8s} {median * 1e3:8.1f} ms   {median / base:5.2f}x ce")


if __name__ == "__main__":
    main()
