"""Map a GeoTIFF with an exported ONNX graph and nothing of PyTorch: numpy, rasterio and onnxruntime only.

    dinov3-eo export seg.ckpt -o seg --onnx                          # once, where dinov3_eo is installed
    python examples/onnx_map.py seg.onnx scene.tif classes.tif [--nodata 0] [--tile 512] [--margin 64]

What a deployment (an edge box, a server without PyTorch) runs: the graph's metadata says what it is and how its
inputs are scaled (``dinov3-eo info seg.onnx`` shows it); the scene is read window by window with ``--margin`` pixels
of context on each side, raw band values in; each window's centre is written. A segmentation or open-vocabulary
graph gives a uint8 class GeoTIFF (its classes' colours and names, 255 where the scene has no data), a height graph
a float32 one in metres (NaN where no data). Pixels without data are given the value the graph's normalisation maps
to 0 (the normalised mean), as ``segment predict`` fills them, so they pull on their neighbours as little as there.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import rasterio
from rasterio.windows import Window


def graph_metadata(session: ort.InferenceSession) -> dict:
    """The ``dinov3_eo`` metadata ``export --onnx`` stores in the graph (read by onnxruntime, not the onnx package)."""
    meta = session.get_modelmeta().custom_metadata_map.get("dinov3_eo")
    if meta is None:
        raise SystemExit("This ONNX graph was not written by 'dinov3-eo export --onnx' (no dinov3_eo metadata).")
    return json.loads(meta)


def neutral_values(meta: dict) -> np.ndarray:
    """``[C]`` raw values the graph's normalisation maps to 0: what pixels without data are given."""
    norm = meta.get("normalization") if meta["input"] == "raw" else None
    if not norm:
        return np.zeros(meta["in_chans"], np.float32)
    mean = np.asarray(norm["mean"], np.float64)
    if norm.get("low") is None:
        return mean.astype(np.float32)
    low, high = np.asarray(norm["low"], np.float64), np.asarray(norm["high"], np.float64)
    return (low + mean * (high - low)).astype(np.float32)


def band_indexes(src: rasterio.DatasetReader, selection: list | None) -> list[int]:
    """The scene's 1-based bands the graph takes: the checkpoint's selection (indexes, or band names matched against
    the scene's band descriptions), else all. (``segment predict`` resolves it the same way; repeated here because
    this script must run without dinov3_eo, which needs PyTorch.)"""
    if not selection:
        return list(range(1, src.count + 1))
    names = [d or "" for d in src.descriptions]
    out = []
    for item in selection:
        if isinstance(item, str) and not item.isdigit():
            if item not in names:
                raise SystemExit(f"The graph reads band {item!r}; {src.name} has the bands {names}.")
            out.append(names.index(item) + 1)
        else:
            out.append(int(item))
    return out


def map_scene(graph: str, scene: str, out: str, *, nodata: float | None = None, tile: int = 512, margin: int = 64) -> dict:
    """Run ``graph`` over ``scene`` and write ``out`` (module docstring); returns the graph's metadata."""
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    meta = graph_metadata(session)
    if meta["kind"] not in ("segmentation", "query", "height"):
        raise SystemExit(f"A {meta['kind']} graph gives features, not a map: export a segmentation, height or query model.")
    if meta["input"] != "raw":
        raise SystemExit("This graph takes normalised inputs: export it without --normalized-input for raw band values.")
    fill = neutral_values(meta)
    bands = meta.get("band_selection") or None
    dense = meta["kind"] == "height"
    with rasterio.open(scene) as src:
        indexes = band_indexes(src, bands)
        if len(indexes) != meta["in_chans"]:
            raise SystemExit(f"{scene} gives {len(indexes)} bands; the graph takes {meta['in_chans']}.")
        nodata = nodata if nodata is not None else src.nodata
        profile = {"driver": "GTiff", "width": src.width, "height": src.height, "count": 1, "crs": src.crs,
                   "transform": src.transform, "tiled": True, "blockxsize": 256, "blockysize": 256,
                   "compress": "deflate", "dtype": "float32" if dense else "uint8",
                   "nodata": float("nan") if dense else 255}  # fmt: skip
        tmp = Path(out).with_name(f".{Path(out).name}.tmp")
        with rasterio.open(tmp, "w", **profile) as dst:
            for row in range(0, src.height, tile):
                for col in range(0, src.width, tile):
                    core = Window(col, row, min(tile, src.width - col), min(tile, src.height - row))
                    read = Window(col - margin, row - margin, core.width + 2 * margin, core.height + 2 * margin)
                    pixels = src.read(indexes, window=read, boundless=True, fill_value=0).astype(np.float32)
                    valid = np.ones(pixels.shape[1:], bool)
                    if nodata is not None:
                        valid &= ~(pixels == nodata).all(axis=0)
                    valid &= np.isfinite(pixels).all(axis=0)
                    inside = np.zeros_like(valid)  # the boundless read's pixels beyond the scene hold no data
                    top, left = read.row_off, read.col_off
                    inside[max(0, -top) : src.height - top, max(0, -left) : src.width - left] = True
                    valid &= inside
                    pixels = np.where(valid[None], pixels, fill[:, None, None])
                    outputs = session.run(None, {"image": pixels[None]})
                    keep = (slice(margin, margin + core.height), slice(margin, margin + core.width))
                    if dense:
                        result = np.where(valid[keep], outputs[0][0, 0][keep], np.nan).astype(np.float32)
                    else:
                        classes = outputs[1][0] if len(outputs) > 1 else np.zeros(valid.shape, np.uint8)
                        result = np.where(valid[keep], classes[keep], 255).astype(np.uint8)
                    dst.write(result, 1, window=core)
            if not dense:
                names = meta.get("class_names") or meta.get("queries") or []
                colours = meta.get("class_colors") or []
                if colours:
                    dst.write_colormap(1, {i: (*map(int, c), 255) for i, c in enumerate(colours)})
                dst.update_tags(class_names=json.dumps(names))
            else:
                dst.set_band_unit(1, "m")
        os.replace(tmp, out)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("graph", help="an ONNX graph from 'dinov3-eo export CKPT -o PREFIX --onnx'")
    parser.add_argument("scene", help="the GeoTIFF to map (the bands the model was trained on)")
    parser.add_argument("output", help="the map to write (.tif)")
    parser.add_argument("--nodata", type=float, default=None, help="the scene's nodata value (default: the file's)")
    parser.add_argument("--tile", type=int, default=512, help="the window written per run, in pixels (default 512)")
    parser.add_argument("--margin", type=int, default=64, help="context read around each window (default 64)")
    args = parser.parse_args()
    if Path(args.output).exists():
        raise SystemExit(f"{args.output} exists; remove it first.")
    meta = map_scene(args.graph, args.scene, args.output, nodata=args.nodata, tile=args.tile, margin=args.margin)
    print(f"{meta['kind']} graph ({meta['backbone']}) -> {args.output}")


if __name__ == "__main__":
    main()
