"""What a file is and what it holds: ``dinov3-eo info FILE [FILE ...] [--json]``.

Every kind of file the toolkit reads or writes, described without building a model: a checkpoint's stage, backbone,
bands, input normalisation, classes and step; a backbone's architecture and parameter count (any layout
``load_backbone`` reads); a probe's or regressor's method, classes and the embedding it expects (a zone probe's
dates); an ONNX graph's metadata; an embedding table's rows, backbone and dates; a raster's grid, CRS, bands, nodata
and class names; a vector file's layer, features, CRS and fields. The question it answers is the one asked before
most runs that fail: what does this checkpoint expect, and does this file fit it?
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinov3_eo.cli import EXIT_BAD_INPUT

RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
VECTOR_SUFFIXES = (".gpkg", ".geojson", ".json", ".shp", ".fgb")
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


@dataclass
class FileInfo:
    """``kind`` (e.g. ``"segmentation checkpoint"``) and ``details``: name → value, in the order they read best."""

    path: str
    kind: str
    details: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The description as ``key: value`` lines under the path and kind."""
        width = max((len(k) for k in self.details), default=0)
        return [f"{self.path}: {self.kind}"] + [f"  {k:<{width}}  {_short(v)}" for k, v in self.details.items()]


def _short(value: Any, limit: int = 200) -> str:
    """A value on one line: lists and dicts as compact JSON, cut at ``limit`` characters."""
    text = json.dumps(value, default=str) if isinstance(value, list | dict | tuple) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rounded(values: Sequence[float]) -> list[float]:
    """Values to 5 significant digits (a z-score's mean from a whole archive has 16)."""
    return [float(f"{float(v):.5g}") for v in values]


def _normalization_summary(norm: dict[str, Any] | None) -> str:
    if not norm:
        return "none recorded (give --normalization)"
    parts = [str(norm.get("name") or "custom")]
    if norm.get("low") is not None:
        parts.append(f"clip {_rounded(norm['low'])}..{_rounded(norm['high'])} to [0, 1]")
    parts.append(f"mean {_rounded(norm['mean'])}, std {_rounded(norm['std'])}")
    return "; ".join(parts)


def _meta_details(entry: dict[str, Any]) -> dict[str, Any]:
    """The backbone fields of a ``dinov3_eo`` metadata entry (:class:`~dinov3_eo.models.hub.BackboneMeta`)."""
    out = {"backbone": entry.get("model") or entry.get("name"), "bands": entry.get("in_chans"),
           "band names": entry.get("bands"), "patch size": entry.get("patch_size"),
           "embed dim": entry.get("embed_dim"), "gsd (m)": entry.get("gsd")}  # fmt: skip
    out = {k: v for k, v in out.items() if v is not None}
    out["input normalisation"] = _normalization_summary(entry.get("normalization"))
    return out


def describe(path: str | os.PathLike[str]) -> FileInfo:
    """What ``path`` is and holds (module docstring).

    Raises:
        FileNotFoundError: no such file. ValueError: a file of no kind the toolkit reads, or one it cannot read.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"No file at {os.fspath(path)!r}.")
    suffix = p.suffix.lower()
    if p.is_dir():
        if (p / "config.json").exists():
            return _describe_backbone(p, "Hugging Face backbone folder")
        raise ValueError(f"{os.fspath(path)} is a folder; give a file (or a Hugging Face model folder).")
    if suffix in TORCH_SUFFIXES:
        return _describe_torch(p)
    if suffix == ".safetensors":
        return _describe_safetensors(p)
    if suffix == ".onnx":
        from dinov3_eo.inference.onnx_export import read_onnx_metadata

        meta = read_onnx_metadata(p)
        details = {"graph": meta.get("kind"), **_meta_details(meta), "input": meta.get("input"),
                   "inputs": meta.get("inputs"), "outputs": meta.get("outputs")}  # fmt: skip
        for key in ("class_names", "queries", "scores", "nodata", "side_multiple", "source"):
            if meta.get(key) is not None:
                details[key.replace("_", " ")] = meta[key]
        return FileInfo(os.fspath(path), "ONNX graph (dinov3-eo export --onnx)", details)
    if suffix == ".parquet":
        return _describe_parquet(p)
    if suffix == ".npz":
        import numpy as np

        with np.load(p, allow_pickle=False) as arrays:
            details = {name: f"{arrays[name].dtype} {list(arrays[name].shape)}" for name in arrays.files}
        return FileInfo(os.fspath(path), "numpy arrays (.npz)", details)
    if suffix == ".json":
        described = _describe_json(p)
        if described is not None:
            return described
    if suffix in VECTOR_SUFFIXES:
        return _describe_vector(p)
    if suffix in RASTER_SUFFIXES or suffix in (".png", ".jpg", ".jpeg"):
        return _describe_raster(p)
    raise ValueError(f"{os.fspath(path)}: dinov3-eo reads no {suffix or 'suffix-less'} files (checkpoints .pth/.ckpt/"
                     ".safetensors/.onnx, rasters .tif, vectors .gpkg/.geojson, tables .parquet/.npz).")  # fmt: skip


def _describe_json(path: Path) -> FileInfo | None:
    """A backbone export's sidecar (its weights described), ``stats``' band statistics, or any other JSON object's
    keys; None for GeoJSON (a vector file)."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is not a JSON file: {e}") from e
    if not isinstance(payload, dict) or payload.get("type") in ("FeatureCollection", "Feature"):
        return None
    if "dinov3_eo" in payload and "layout" in payload:
        weights = next((path.with_suffix(s) for s in (".safetensors", ".pth") if path.with_suffix(s).exists()), None)
        if weights is None:
            raise ValueError(f"{path} is a backbone export's sidecar, but neither its .safetensors nor its .pth is beside it.")
        return _describe_backbone(weights, "backbone export (sidecar)", shown=path)
    if {"bands", "count", "mean", "std"} <= set(payload):
        details = {"bands": payload["bands"], "pixels": payload["count"], "mean": _rounded(payload["mean"]),
                   "std": _rounded(payload["std"]), "percentiles": sorted(payload.get("percentiles", {}), key=float)}  # fmt: skip
        return FileInfo(os.fspath(path), "band statistics (dinov3-eo stats; --data.stats)", details)
    return FileInfo(os.fspath(path), "JSON", {"keys": list(payload)})


def _describe_torch(path: Path) -> FileInfo:
    from dinov3_eo.models.hub import TEXT_META_KEY, CheckpointError, read_checkpoint

    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from e
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint or a state dict.")
    if "state_dict" not in checkpoint:
        return _describe_backbone(path, "backbone weights")
    state = checkpoint["state_dict"]
    entry = dict(checkpoint.get("dinov3_eo") or {})
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    progress = {"step": checkpoint.get("global_step"), "epoch": checkpoint.get("epoch")}
    progress = {k: v for k, v in progress.items() if v is not None}
    text = checkpoint.get(TEXT_META_KEY)
    if isinstance(text, dict):  # a text fit checkpoint or export_text_model's file
        details = {**_meta_details(entry), "backbone stored": text.get("backbone_stored"),
                   "backbone source": text.get("backbone_source"), "tokenizer": (text.get("tokenizer") or {}).get("name"),
                   "prompt templates": len(text.get("templates") or []), "caption classes": text.get("class_names"),
                   **progress}  # fmt: skip
        return FileInfo(os.fspath(path), "text model (text fit; query --model, classify zero-shot, export --onnx "
                        "--queries)", {k: v for k, v in details.items() if v is not None})  # fmt: skip
    if "segmentation" in entry:
        task = entry["segmentation"]
        details = {"classes": task.get("class_names"), "head": task.get("head"), "layers": task.get("layers"),
                   **_meta_details(entry), "band selection": task.get("band_selection"), "nodata": task.get("nodata"),
                   "ignore index": task.get("ignore_index"), "lora": hparams.get("lora"), **progress}  # fmt: skip
        return FileInfo(os.fspath(path), "segmentation checkpoint (segment fit; segment predict --model)",
                        {k: v for k, v in details.items() if v is not None})  # fmt: skip
    prefixes = {key.split(".")[0] for key in state}
    if "teacher" in prefixes or "student" in prefixes or "students" in prefixes:
        stage = "distillation" if "students" in prefixes or hparams.get("students") else (
            "high-resolution adaptation" if hparams.get("resolutions") else
            "Gram anchoring" if any(k.startswith("gram_teacher.") for k in state) or hparams.get("gram_weight") else
            "pretraining")  # fmt: skip
        details = {"stage": stage, **_meta_details(entry), **progress,
                   "resume": "--ckpt_path (the same stage); 'dinov3-eo export' writes its teacher backbone"}  # fmt: skip
        return FileInfo(os.fspath(path), f"SSL checkpoint ({stage})", details)
    if any(k.startswith("model.head.") for k in state) and "head" in hparams:
        details = {"head": hparams.get("head"), "bins": hparams.get("n_bins"), "max height (m)": hparams.get("max_height"),
                   "loss": hparams.get("loss"), **_meta_details(entry), "lora": hparams.get("lora"), **progress}  # fmt: skip
        return FileInfo(os.fspath(path), "height checkpoint (height fit; height predict --model)",
                        {k: v for k, v in details.items() if v is not None})  # fmt: skip
    if entry:
        details = {**_meta_details(entry), **progress, "class": hparams.get("_class_path")}
        return FileInfo(os.fspath(path), "dinov3-eo checkpoint", {k: v for k, v in details.items() if v is not None})
    return FileInfo(os.fspath(path), "Lightning checkpoint (not written by dinov3-eo)",
                    {"tensors": len(state), **progress})  # fmt: skip


def _describe_backbone(path: Path, kind: str, *, shown: Path | None = None) -> FileInfo:
    """Architecture, layout and size of any weights file ``load_backbone`` reads, without building the model."""
    from dinov3_eo.models.hub import CheckpointError, _read_source, infer_architecture, to_official_layout

    try:
        raw, stored, hf_config = _read_source(path)
        sd, layout = to_official_layout(raw)
        name, overrides = infer_architecture(sd, num_heads=(hf_config or {}).get("num_attention_heads"),
                                             allow_missing_qkv_bias=layout != "official")  # fmt: skip
    except CheckpointError as e:
        raise ValueError(f"{path} is not a backbone dinov3-eo reads: {e}") from e
    weight = sd.get("patch_embed.proj.weight")
    details = {"architecture": name, "layout": layout, "parameters": f"{sum(v.numel() for v in sd.values()) / 1e6:.1f} M",
               "blocks": 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1),
               "embed dim": int(weight.shape[0]) if weight is not None else None,
               "patch size": int(weight.shape[-1]) if weight is not None else None,
               "bands": int(weight.shape[1]) if weight is not None else None,
               "registers": int(sd["storage_tokens"].shape[1]) if "storage_tokens" in sd else 0}  # fmt: skip
    overrides = {k: v for k, v in overrides.items() if not (k == "untie_global_and_local_cls_norm" and not v)}
    if overrides:
        details["differs from the registered size in"] = overrides
    if stored:
        details.update({k: v for k, v in _meta_details(stored).items() if k not in ("embed dim", "patch size", "bands")})
    else:
        details["input normalisation"] = "none recorded (give --normalization)"
    return FileInfo(os.fspath(shown or path), kind, {k: v for k, v in details.items() if v is not None})


def _describe_safetensors(path: Path) -> FileInfo:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise ValueError(f"{path} is not a safetensors file: {e}") from e
    if "dinov3_eo_classifier" in meta:
        info = json.loads(meta["dinov3_eo_classifier"])
        embedding = info.get("embedding") or {}
        kind = "zone probe (classify fit --zones)" if embedding.get("kind") == "zones" else "probe (classify fit)"
        details = {"method": info.get("method"), "classes": info.get("classes"), "features": info.get("features"),
                   "width": next((s[1] for n, s in shapes.items() if n in ("weight", "bank")), None),
                   "multi-label": info.get("multi_label") or None, "held-out accuracy": info.get("held_out_accuracy"),
                   "prediction sets": (info.get("sets") or {}).get("coverage"),
                   "backbone": embedding.get("backbone") or embedding.get("backbone_source"),
                   "chip size": embedding.get("size"), "tile size": embedding.get("tile_size"),
                   "dates": embedding.get("dates"), "temporal": embedding.get("temporal")}  # fmt: skip
        return FileInfo(os.fspath(path), kind, {k: v for k, v in details.items() if v is not None})
    if "dinov3_eo_regressor" in meta:
        info = json.loads(meta["dinov3_eo_regressor"])
        embedding = info.get("embedding") or {}
        details = {"method": info.get("method"), "target": info.get("target"), "unit": info.get("unit"),
                   "statistic": info.get("statistic"), "log values": info.get("log_values") or None,
                   "held out": info.get("held_out"), "intervals": (info.get("interval") or {}).get("coverage"),
                   "backbone": embedding.get("backbone") or embedding.get("backbone_source"),
                   "tile size": embedding.get("tile_size")}  # fmt: skip
        return FileInfo(os.fspath(path), "regressor (regress fit)", {k: v for k, v in details.items() if v is not None})
    return _describe_backbone(path, "backbone weights (safetensors)")


def _describe_parquet(path: Path) -> FileInfo:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own error types for a file that is not Parquet
        raise ValueError(f"{path} is not a Parquet file: {e}") from e
    schema = parquet.schema_arrow
    metadata = schema.metadata or {}
    made = json.loads(metadata[b"dinov3_eo"]) if b"dinov3_eo" in metadata else {}
    names = schema.names
    if "coverage" in names and "patch_mean" in names:
        kind = "polygon embeddings (embed --zones)" if not made.get("dates") else "polygons at several dates (embed --zones)"
    elif "row" in names and "col" in names and "patch_mean" in names:
        kind = "tile embeddings (embed --tiles)"
    elif "patch_mean" in names or "cls" in names:
        kind = "chip embeddings (embed --chips)"
    else:
        kind = "GeoParquet table" if b"geo" in metadata else "Parquet table"
    details: dict[str, Any] = {"rows": parquet.metadata.num_rows, "columns": [n for n in names if n != "geometry"]}
    if b"geo" in metadata:
        geo = json.loads(metadata[b"geo"])
        column = geo.get("columns", {}).get(geo.get("primary_column", "geometry"), {})
        crs = column.get("crs")
        details["crs"] = (f"EPSG:{crs['id']['code']}" if isinstance(crs, dict) and "id" in crs else
                          "OGC:CRS84 (lon/lat)" if crs is None and column else crs)  # fmt: skip
        details["geometry"] = column.get("geometry_types")
    for key, label in (("backbone", "backbone"), ("patch_size", "patch size"), ("embed_dim", "embed dim"),
                       ("features", "features"), ("weights", "weights"), ("dates", "dates"), ("temporal", "temporal"),
                       ("upsample", "upsample"), ("tile_size", "tile size"), ("size", "chip size")):  # fmt: skip
        if made.get(key) is not None:
            details[label] = made[key]
    return FileInfo(os.fspath(path), kind, details)


def _describe_vector(path: Path) -> FileInfo:
    import pyogrio

    try:
        layers = pyogrio.list_layers(path)
        info = pyogrio.read_info(path)
    except Exception as e:  # GDAL's errors for a file that is not a vector dataset
        raise ValueError(f"{path} is not a vector file GDAL reads: {e}") from e
    crs = info.get("crs")
    details = {"layer": layers[0][0] if len(layers) else None, "features": int(info.get("features", -1)),
               "geometry": info.get("geometry_type"), "crs": crs or "none (the toolkit will refuse it)",
               "fields": list(info.get("fields", [])), "bounds": [round(float(v), 6) for v in info.get("total_bounds", [])] or None}  # fmt: skip
    if len(layers) > 1:
        details["other layers"] = [str(name) for name, _ in layers[1:]]
    return FileInfo(os.fspath(path), "vector file", {k: v for k, v in details.items() if v is not None})


def _describe_raster(path: Path) -> FileInfo:
    from rasterio.errors import RasterioIOError

    from dinov3_eo.data.raster import is_georeferenced, open_quietly, tagged_class_names

    try:
        with open_quietly(path) as src:
            georeferenced = is_georeferenced(src)
            details: dict[str, Any] = {"size": f"{src.width} x {src.height} px", "bands": src.count,
                                       "dtype": sorted(set(src.dtypes)), "nodata": src.nodata}  # fmt: skip
            if georeferenced:
                details.update({"crs": src.crs.to_string() if src.crs.to_epsg() is None else f"EPSG:{src.crs.to_epsg()}",
                                "pixel size": [round(abs(src.res[0]), 6), round(abs(src.res[1]), 6)],
                                "bounds": [round(v, 6) for v in src.bounds]})  # fmt: skip
            else:
                details["georeference"] = "none (an image chip: give --chips)"
            descriptions = [d for d in src.descriptions if d]
            if descriptions:
                details["band names"] = list(src.descriptions)
            names = tagged_class_names(src)
            if names is not None:
                details["classes"] = names
            tags = src.tags()
            for key in ("model", "head", "statistic"):
                if key in tags:
                    details[key] = tags[key]
            if any(src.units):
                details["units"] = list(src.units)
            try:
                colormap = src.colormap(1)
                details["colour table"] = f"{len(colormap)} entries"
            except ValueError:
                pass
            details["layout"] = (f"tiled {src.block_shapes[0][1]} x {src.block_shapes[0][0]}" if src.profile.get("tiled")
                                 else "striped") + (f", {len(src.overviews(1))} overviews" if src.overviews(1) else "")  # fmt: skip
            if src.compression is not None:
                details["compression"] = src.compression.value
    except RasterioIOError as e:
        raise ValueError(f"{path} is not a raster GDAL reads: {str(e).splitlines()[0]}") from e
    kind = "GeoTIFF" if path.suffix.lower() in (".tif", ".tiff") and georeferenced else "raster" if georeferenced else "image"
    return FileInfo(os.fspath(path), kind, {k: v for k, v in details.items() if v is not None})


def info_main(argv: Sequence[str]) -> int:
    """``dinov3-eo info FILE [FILE ...] [--json]``; exit 2 if any file could not be described."""
    parser = argparse.ArgumentParser(prog="dinov3-eo info", description="What a file is and what it holds: "
                                     "checkpoints, backbones, probes, ONNX graphs, embedding tables, rasters, vectors.")  # fmt: skip
    parser.add_argument("files", nargs="+", help="files to describe")
    parser.add_argument("--json", action="store_true", help="one JSON object per file, one per line")
    args = parser.parse_args(list(argv))
    failed = False
    for path in args.files:
        try:
            info = describe(path)
        except (FileNotFoundError, ValueError, ImportError) as e:
            print(f"dinov3-eo info: error: {e}", file=sys.stderr)
            failed = True
            continue
        if args.json:
            print(json.dumps({"path": info.path, "kind": info.kind, **info.details}, default=str))
        else:
            print("\n".join(info.lines()))
    return EXIT_BAD_INPUT if failed else 0


__all__ = ["FileInfo", "describe", "info_main"]
