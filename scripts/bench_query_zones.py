"""Polygons named by text in one pass (``query --zones``, :meth:`MapQuery.zones`) against the two-command way: the
query's probability map (``query``, :meth:`MapQuery.write_scores`) summarised over the polygons (``zonal``, each
query's band: the per-polygon mean probability).

A synthetic 3-band scene (``--size`` px a side at 1 m, as ``bench_zone_embeddings``) and ``--zones`` parcels that tile
it; a random text model on the micro ViT (the work that is not the backbone's shows largest on the smallest one);
three queries. Timed in one process, alternating, medians of ``--repeats``; the two answers differ by design (the
softmax of the mean cosine against the mean of per-pixel softmaxes), so their agreement on the best query is
printed, not asserted.

    .venv/bin/python scripts/bench_query_zones.py [--size 1024] [--zones 900] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_zonal import make_zones  # noqa: E402
from bench_zone_embeddings import make_scene  # noqa: E402

QUERIES = ["water", "forest", "city"]


def main() -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from dinov3_eo.tasks.openvocab import MapQuery, TextAlignmentTask, export_text_model
    from dinov3_eo.tasks.zonal import zonal_statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--zones", type=int, default=900)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_query_zones_") as tmp:
        tmp = Path(tmp)
        make_scene(tmp / "scene.tif", args.size)
        make_zones(tmp / "zones.gpkg", args.size, args.zones)
        torch.manual_seed(0)
        norm = {"mean": [0.4] * 3, "std": [0.2] * 3, "low": [0] * 3, "high": [255] * 3, "name": "bench"}
        task = TextAlignmentTask(backbone="vitmicro16", text_cfg={"width": 32, "heads": 4, "layers": 2},
                                 ffn_layer="mlp", normalization=norm)  # fmt: skip
        engine = MapQuery.from_checkpoint(export_text_model(task, tmp / "text.pt"), window=512, device="cpu")
        times: dict[str, list[float]] = {"zones": [], "map + zonal": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            named = engine.zones(tmp / "scene.tif", tmp / "zones.gpkg", QUERIES)
            times["zones"].append(time.perf_counter() - start)
            start = time.perf_counter()
            engine.write_scores(tmp / "scene.tif", QUERIES, tmp / "scores.tif")
            means = np.stack([zonal_statistics(tmp / "scores.tif", tmp / "zones.gpkg", band=b + 1, classes=False,
                                               progress=False)["mean"].to_numpy() for b in range(len(QUERIES))], 1)  # fmt: skip
            times["map + zonal"].append(time.perf_counter() - start)
    agree = float((np.array(QUERIES)[means.argmax(1)] == named["class"].to_numpy()).mean())
    base = statistics.median(times["map + zonal"])
    print(f"{len(named)} polygons over a {args.size}² scene, {len(QUERIES)} queries, micro-ViT text model, 2 threads:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:12s}: {median:.2f} s (median of {len(values)}; {median / base:.2f}x map + zonal)")
    print(f"  the same best query for {100 * agree:.1f} % of the polygons")


if __name__ == "__main__":
    main()
