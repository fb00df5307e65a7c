"""Test-time augmentation on chips (``classify predict/test --tta d4``): every view embedded from one read of each
chip (:func:`~dinov3_eo.tasks.chip_embeddings.embed_chip_views`) against reading each chip once per view
(``embed_chips(view=v)`` for each view, what ``classify`` did before), alternating in one process on EuroSAT dev
chips (../shared/data/eurosat_rgb_dev, 64 x 64 JPEG); the embeddings must be the same.

    python scripts/bench_chip_tta.py [--archs vitmicro16 vits16] [--chips 400] [--size 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrain import SHARED  # noqa: E402

from dinov3_eo.data.datasets import expand_chips  # noqa: E402
from dinov3_eo.data.normalization import Normalization  # noqa: E402
from dinov3_eo.inference.tta import tta_views  # noqa: E402
from dinov3_eo.models.vit import build_backbone  # noqa: E402
from dinov3_eo.tasks.chip_embeddings import embed_chip_views, embed_chips  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vitmicro16", "vits16"])
    parser.add_argument("--chips", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--tta", default="d4")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    paths = expand_chips([str(SHARED / "eurosat_rgb_dev")])[:: max(1, 2000 // args.chips)][: args.chips]
    views = tta_views(args.tta)
    norm = Normalization.preset("imagenet")
    results = {"chips": len(paths), "views": len(views), "size": args.size, "torch_threads": torch.get_num_threads()}
    for arch in args.archs:
        torch.manual_seed(0)
        model = build_backbone(arch, in_chans=3).eval()
        common = dict(normalization=norm, size=args.size, batch_size=64, progress=False)
        times: dict[str, list[float]] = {"per_view_reads": [], "one_read": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            each = [embed_chips(model, paths, view=v, **common) for v in views]
            times["per_view_reads"].append(time.perf_counter() - start)
            start = time.perf_counter()
            once = embed_chip_views(model, paths, views=views, **common)
            times["one_read"].append(time.perf_counter() - start)
        diff = max(float(np.abs(a.cls - b.cls).max()) for a, b in zip(each, once))
        best = {k: min(v) for k, v in times.items()}
        results[arch] = {**{f"{k}_s": round(v, 2) for k, v in best.items()},
                         "speedup": round(best["per_view_reads"] / best["one_read"], 2), "max_abs_diff": diff}  # fmt: skip
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
