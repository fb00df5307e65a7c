"""Benchmark ``dinov3-eo change`` (:func:`dinov3_eo.tasks.change.detect_change`): time and memory against the size of
the scenes, the cost of an after date in another CRS, and a whole-array baseline.

Builds a ``--size``² before date by tiling the bundled Landsat scene (uint16, tiled DEFLATE, 30 m UTM) and an after
date with blocks of other land cover pasted in; a copy of the after date warped to EPSG:4326 (so it must be
resampled onto the before grid). Each case runs in a fresh child process so that its peak RSS is its own; imports
(torch: ~0.8 GB and seconds) are excluded, as the command pays them once whatever the size:

* ``streamed``: ``detect_change`` (512-px windows, 25 % overlap, score + Otsu mask), at ``--size`` and at a quarter
  of the side (16x fewer pixels: does memory stay flat?);
* ``no overlap``: the same with windows that do not overlap, the model work of ``whole``;
* ``warped``: the same with the after date in EPSG:4326 (``RasterStack`` warps it window by window);
* ``whole``: both dates read whole into float32 arrays, normalised and run through the same model as non-overlapping
  windows, the score assembled in memory and written once: what a script would do, the baseline of the ratios.

The model is the micro ViT (random weights) so that the pipeline, not the backbone, is what is measured.

    python scripts/bench_change.py [--size 4096]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from child_process import child_entry, peak_rss_mib, run_child

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
MEAN, STD = [7839.0, 7320.0, 6682.0], [242.0, 365.0, 706.0]


def make_dates(folder: Path, size: int) -> dict[str, Path]:
    import rasterio
    from rasterio.warp import calculate_default_transform, reproject
    from rasterio.windows import Window

    with rasterio.open(SAMPLE) as src:
        scene = src.read()
        profile = {**src.profile, "width": size, "height": size, "nodata": 0, "compress": "deflate",
                   "blockxsize": 512, "blockysize": 512}  # fmt: skip
    scene = np.where(scene == 0, 7000, scene)  # no collar: every pixel counts
    rng = np.random.default_rng(0)
    paths = {}
    for name in ("before", "after"):
        paths[name] = folder / f"{name}_{size}.tif"
        with rasterio.open(paths[name], "w", **profile) as dst:
            for row in range(0, size, 512):
                h = min(512, size - row)
                rows = np.arange(row, row + h) % scene.shape[1]
                block = scene[:, rows][:, :, np.arange(size) % scene.shape[2]]
                if name == "after":  # a 64-px block of other land cover every ~2 windows
                    for col in range(0, size - 64, 1024):
                        r0, c0 = rng.integers(0, scene.shape[1] - 64), rng.integers(0, scene.shape[2] - 64)
                        block[:, : min(64, h), col : col + 64] = scene[:, r0 : r0 + min(64, h), c0 : c0 + 64]
                dst.write(block, window=Window(0, row, size, h))
    paths["after_lonlat"] = folder / f"after_lonlat_{size}.tif"
    with rasterio.open(paths["after"]) as src:
        transform, width, height = calculate_default_transform(src.crs, "EPSG:4326", src.width, src.height, *src.bounds)
        out = {**src.profile, "crs": "EPSG:4326", "transform": transform, "width": width, "height": height}
        with rasterio.open(paths["after_lonlat"], "w", **out) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band), resampling=rasterio.enums.Resampling.bilinear)
    return paths


def run(mode: str, before: str, after: str, out: str) -> dict:
    import rasterio
    import torch

    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.inference.writers import write_cog
    from dinov3_eo.models.vit import build_backbone
    from dinov3_eo.tasks.change import FeatureChange, detect_change

    torch.set_num_threads(2)
    torch.manual_seed(0)
    backbone = build_backbone("vitmicro16").eval()
    norm = Normalization.zscore(MEAN, STD)
    imported = peak_rss_mib()
    started = time.perf_counter()
    if mode in ("streamed", "streamed_no_overlap", "warped"):
        overlap = 0 if mode == "streamed_no_overlap" else 0.25
        summary = detect_change(backbone, before, after, out, normalization=norm, radiometry="none", window=512,
                                overlap=overlap, batch_size=4, progress=False)  # fmt: skip
        changed = summary.changed_pixels
    else:
        with rasterio.open(before) as a, rasterio.open(after) as b:
            crs, transform = a.crs, a.transform
            x = np.concatenate([a.read(), b.read()]).astype(np.float32)  # [6, H, W]
        x = (x - np.array(MEAN * 2, np.float32)[:, None, None]) / np.array(STD * 2, np.float32)[:, None, None]
        model = FeatureChange(backbone, in_chans=3)
        score = np.empty(x.shape[1:], dtype=np.float32)
        with torch.inference_mode():
            for row in range(0, x.shape[1], 512):
                for col in range(0, x.shape[2], 512):
                    tile = torch.from_numpy(np.ascontiguousarray(x[:, row : row + 512, col : col + 512]))[None]
                    score[row : row + 512, col : col + 512] = model(tile)[0, 0].numpy()
        write_cog(out, score, crs=crs, transform=transform, nodata=float("nan"), overviews=True)
        changed = int((score > 0.5).sum())
    return {"seconds": time.perf_counter() - started, "peak_mib": peak_rss_mib(), "imports_mib": imported,
            "changed": changed}  # fmt: skip


def main() -> None:
    if child_entry(run):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    small = max(512, args.size // 4)
    with tempfile.TemporaryDirectory(prefix="bench_change_") as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        big, little = make_dates(tmp, args.size), make_dates(tmp, small)
        print(f"made {args.size}² and {small}² date pairs in {time.perf_counter() - started:.0f} s")
        cases = [
            (f"streamed {small}²", "streamed", little["before"], little["after"]),
            (f"streamed {args.size}²", "streamed", big["before"], big["after"]),
            (f"no overlap {args.size}²", "streamed_no_overlap", big["before"], big["after"]),
            (f"warped {args.size}²", "warped", big["before"], big["after_lonlat"]),
            (f"whole {args.size}²", "whole", big["before"], big["after"]),
        ]
        results = {}
        for label, mode, before, after in cases:
            out = tmp / f"{label.replace(' ', '_').replace('²', '')}.tif"
            results[label] = run_child(__file__, mode, before, after, out)
    base = results[f"whole {args.size}²"]
    print(f"\n{'case':<20} {'time':>8} {'peak RSS':>10} {'beyond imports':>15} {'vs whole':>16}")
    for label, r in results.items():
        extra = r["peak_mib"] - r["imports_mib"]
        ratio = f"{r['seconds'] / base['seconds']:.2f}x / {r['peak_mib'] / base['peak_mib']:.2f}x"
        print(f"{label:<20} {r['seconds']:7.1f}s {r['peak_mib']:8.0f} MiB {extra:11.0f} MiB {ratio:>16}")
    s, w = results[f"streamed {args.size}²"], results[f"warped {args.size}²"]
    print(f"\nwarping the after date: {w['seconds'] / s['seconds']:.2f}x the time of the same-grid pair; "
          f"16x the pixels: {s['seconds'] / results[f'streamed {small}²']['seconds']:.1f}x the time, "
          f"{(s['peak_mib'] - s['imports_mib']) / max(1.0, results[f'streamed {small}²']['peak_mib'] - results[f'streamed {small}²']['imports_mib']):.2f}x the memory beyond imports")  # fmt: skip


if __name__ == "__main__":
    main()
