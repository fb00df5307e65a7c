"""Tiles per second of ``classify map`` (:func:`~dinov3_eo.tasks.tile_classification.classify_tiles`) with the tiles
read and prepared in a background thread while the model runs (``prefetch=2``, the default) against in turn with it
(``prefetch=0``), alternating in one process on the bundled Landsat-8 scene (928 x 448 px, 16-px tiles: 1,624).

The probe is a random linear layer (its values do not change the work); backbones are random too.

    python scripts/bench_tile_classification.py [--archs vitmicro16 vits16] [--size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import rasterio
import torch

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.vit import build_backbone
from dinov3_eo.tasks.chip_classification import ChipClassifier
from dinov3_eo.tasks.chip_embeddings import ChipBackbone
from dinov3_eo.tasks.tile_classification import classify_tiles

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vitmicro16", "vits16"])
    parser.add_argument("--size", type=int, default=32, help="model input size of a tile (default 32)")
    parser.add_argument("--tile", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with rasterio.open(SAMPLE) as src:
        tiles = int(np.ceil(src.height / args.tile) * np.ceil(src.width / args.tile))
    for arch in args.archs:
        model = build_backbone(arch, in_chans=3).eval()
        norm = Normalization(mean=(8000.0,) * 3, std=(1500.0,) * 3, name="bench")
        backbone = ChipBackbone(model, norm, "cpu", arch, None)
        dim = 2 * int(model.embed_dim)
        probe = ChipClassifier(method="linear", classes=["a", "b"], features="cls+patch_mean",
                               weight=np.random.default_rng(0).normal(size=(2, dim)).astype(np.float32),
                               bias=np.zeros(2, np.float32), embedding={"size": args.size, "chip_size": [args.tile] * 2})  # fmt: skip
        seconds: dict[int, list[float]] = {0: [], 2: []}
        results = {}
        classify_tiles(SAMPLE, probe, backbone=backbone, nodata=0, progress=False)  # warm-up
        for _ in range(args.repeats):
            for prefetch in (0, 2):
                start = time.perf_counter()
                results[prefetch] = classify_tiles(SAMPLE, probe, backbone=backbone, nodata=0, prefetch=prefetch,
                                                   progress=False)  # fmt: skip
                seconds[prefetch].append(time.perf_counter() - start)
        same = np.array_equal(results[0].probabilities, results[2].probabilities, equal_nan=True)
        inline, ahead = np.median(seconds[0]), np.median(seconds[2])
        print(f"{arch} at {args.size} px, {tiles} tiles, {torch.get_num_threads()} threads: in turn {inline:.2f} s "
              f"({tiles / inline:.0f} tiles/s), prefetched {ahead:.2f} s ({tiles / ahead:.0f} tiles/s): "
              f"{inline / ahead:.2f}x; same probabilities: {same}")


if __name__ == "__main__":
    main()
