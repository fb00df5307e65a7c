"""An exported ONNX graph (``export --onnx``) in ONNX Runtime against the same model in PyTorch, on this machine's CPU.

A random-weight ``--arch`` backbone (default ViT-S/16) is written as an official ``.pth`` and exported as its
backbone graph (normalisation inside); then, for each input shape, PyTorch eager (``inference_mode``) and ONNX Runtime
(CPU provider, all graph optimisations, as many threads as torch uses) are timed alternately, ``--repeats`` times
each after a warm-up, and the medians compared. Also printed: the export's time, the graph's size, and the largest
difference between the two outputs. A segmentation model would add only its head and padding to both sides.

    .venv/bin/python scripts/bench_onnx.py [--arch vits16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vits16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", default="8x224x224,2x512x512", help="BxHxW,... (default 8x224x224,2x512x512)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import onnxruntime as ort
    import torch

    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.inference.onnx_export import export_onnx
    from dinov3_eo.models.hub import BackboneMeta, export_backbone
    from dinov3_eo.models.vit import build_backbone

    torch.manual_seed(0)
    norm = Normalization.preset("sat493m")
    backbone = build_backbone(args.arch, in_chans=3).eval()
    meta = BackboneMeta(name=args.arch, in_chans=3, patch_size=int(backbone.patch_size), embed_dim=int(backbone.embed_dim),
                        normalization=norm.to_dict())  # fmt: skip
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {ort.__version__}, {args.arch}")
    with tempfile.TemporaryDirectory() as tmp:
        pth = export_backbone(backbone, Path(tmp) / "backbone", meta=meta)["pth"]
        done = export_onnx(pth, Path(tmp) / "backbone.onnx")
        size_mib = done.path.stat().st_size / 2**20
        print(f"export {done.seconds:.1f} s (traced, written, checked on two sizes: max |diff| {done.max_difference:.2g}), "
              f"graph {size_mib:.1f} MiB vs {pth.stat().st_size / 2**20:.1f} MiB of .pth")  # fmt: skip
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        session = ort.InferenceSession(str(done.path), options, providers=["CPUExecutionProvider"])

        def torch_run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                ((patch, _cls),) = backbone.get_intermediate_layers(norm(torch.from_numpy(x)), n=1, reshape=True,
                                                                    return_class_token=True, norm=True)  # fmt: skip
            return patch.numpy()

        def onnx_run(x: np.ndarray) -> np.ndarray:
            return session.run(["patch_features"], {"image": x})[0]

        for shape in args.shapes.split(","):
            b, h, w = (int(v) for v in shape.split("x"))
            x = (np.random.default_rng(0).random((b, 3, h, w)) * 255).astype(np.float32)
            gap = float(np.abs(torch_run(x) - onnx_run(x)).max())  # (also the warm-up of both)
            times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
            for _ in range(args.repeats):
                for name, fn in (("torch", torch_run), ("onnxruntime", onnx_run)):
                    start = time.perf_counter()
                    fn(x)
                    times[name].append(time.perf_counter() - start)
            t, o = statistics.median(times["torch"]), statistics.median(times["onnxruntime"])
            print(f"{b} x {h} x {w}: torch {t:.3f} s ({b / t:.1f} img/s), onnxruntime {o:.3f} s ({b / o:.1f} img/s): "
                  f"onnxruntime takes {o / t:.2f}x torch's time; max |diff| {gap:.2g}")  # fmt: skip


if __name__ == "__main__":
    main()
