"""Load DINOv3 backbones from any common checkpoint layout, and export them.

:func:`load_backbone` reads a path and recognises

* an official hub checkpoint: a plain backbone state dict (web LVD-1689M or SAT-493M, the latter and the
  7B with the training-only ``local_cls_norm``);
* an official training checkpoint ``{"teacher": {"backbone.…", "dino_head.…"}}`` (``module.`` stripped);
* a Hugging Face transformers DINOv3 checkpoint: a state dict, a ``.safetensors`` file or a
  ``save_pretrained`` directory (``config.json`` is read for the head count, LayerNorm eps and RoPE base);
* a timm ``vit_*_patch16_dinov3`` state dict;
* this project's exports (``.pth`` + ``.json`` sidecar, ``.safetensors`` with metadata) and its Lightning
  training checkpoints (``state_dict`` with ``teacher.backbone.`` keys and a top-level ``"dinov3_eo"`` entry), and
  our segmentation / height checkpoints (``model.backbone.`` keys; LoRA updates folded into the weights).

Every layout is first converted to the official key layout and then loaded *strictly*: a missing,
unexpected or mis-shaped tensor raises one :class:`CheckpointError` listing them all. The only tensors
ever filled in are those a format does not store by design and that are fixed functions of the
architecture (RoPE ``periods``, ``bias_mask``, timm's dropped ``mask_token``, the all-zero key bias of
HF/timm attention). The size is inferred from the weights unless ``name`` is given.

Files are read with ``torch.load(weights_only=True)``; exports are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import pathlib
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinov3_eo.cli import EXIT_BAD_INPUT
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.rope import RopePositionEmbedding
from dinov3_eo.models.vit import BACKBONES, DinoVisionTransformer, build_backbone

log = logging.getLogger(__name__)

StateDict = dict[str, Tensor]

#: our registry name -> timm's DINOv3 model name (``_qkvb`` is appended when q/v biases are non-zero)
TIMM_NAMES: dict[str, str] = {
    "vitt16": "vit_tiny_patch16_dinov3_qkvb",
    "vits16": "vit_small_patch16_dinov3",
    "vits16plus": "vit_small_plus_patch16_dinov3",
    "vitb16": "vit_base_patch16_dinov3",
    "vitl16": "vit_large_patch16_dinov3",
    "vith16plus": "vit_huge_plus_patch16_dinov3",
    "vit7b16": "vit_7b_patch16_dinov3",
}

#: SAT-493M imagery is 0.6 m Maxar ortho-imagery (DINOv3 model card)
SAT493M_GSD = 0.6
RGB_BANDS = ["red", "green", "blue"]


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the backbone it is loaded into."""


# --------------------------------------------------------------------------------------------- metadata
@dataclass
class BackboneMeta:
    """What inference needs to know about a backbone besides its weights.

    Attributes:
        name: registry name (``vitl16`` ...).
        in_chans: number of input bands.
        patch_size: patch side in pixels.
        embed_dim: token width.
        bands: band names in input order, or ``None`` if unknown.
        normalization: :meth:`Normalization.to_dict` of the expected input normalisation, or ``None``.
        gsd: ground sample distance of the training imagery in metres, or ``None``.
    """

    name: str
    in_chans: int
    patch_size: int
    embed_dim: int
    bands: list[str] | None = None
    normalization: dict[str, Any] | None = None
    gsd: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; carries the name as both ``"model"`` (checkpoint layout) and ``"name"`` (field)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["bands"] = None if self.bands is None else list(self.bands)
        return {"model": self.name, **out}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BackboneMeta:
        """Inverse of :meth:`to_dict`; accepts ``"model"`` or ``"name"`` for the name.

        Raises:
            CheckpointError: if a required field is missing.
        """
        d = dict(d)
        if "name" not in d and "model" in d:
            d["name"] = d["model"]
        required = ("name", "in_chans", "patch_size", "embed_dim")
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise CheckpointError(f"Backbone metadata lacks {missing} (got keys {sorted(d)}).")
        known = {f.name for f in fields(cls)}
        meta = cls(**{k: v for k, v in d.items() if k in known})
        meta.in_chans, meta.patch_size, meta.embed_dim = int(meta.in_chans), int(meta.patch_size), int(meta.embed_dim)
        return meta

    def get_normalization(self) -> Normalization | None:
        """The stored normalisation as a :class:`Normalization`, or ``None``."""
        return None if self.normalization is None else Normalization.from_dict(self.normalization)

    def rgb_bands(self, selected: Sequence[int]) -> list[int]:
        """Which of the file bands ``selected`` (1-based, in model input order) to show as red, green, blue: found
        by the band names where they are known (a Landsat stack is often blue, green, red), else the first three
        (one, shown as grey, for fewer than three)."""
        chosen = list(selected)
        names = [n.lower() for n in (self.bands or [])]
        if all(c in names for c in ("red", "green", "blue")) and len(names) == len(chosen):
            return [chosen[names.index(c)] for c in ("red", "green", "blue")]
        return _first_three(chosen)


def _first_three(chosen: list[int]) -> list[int]:
    return chosen[:3] if len(chosen) >= 3 else chosen[:1]


def preview_bands(backbone: Any, selected: Sequence[int]) -> list[int]:
    """The file bands ``selected`` feeds ``backbone`` to show as red, green, blue in a picture: its metadata's choice
    (:meth:`BackboneMeta.rgb_bands`), or for a backbone without metadata the first three (one, as grey)."""
    meta = getattr(backbone, "meta", None)
    return meta.rgb_bands(selected) if isinstance(meta, BackboneMeta) else _first_three(list(selected))


# ---------------------------------------------------------------------------------------- reading files
#: checkpoint entry holding a text model's text side (``text fit``), next to the backbone's ``"dinov3_eo"`` entry
TEXT_META_KEY = "dinov3_eo_text"


def is_text_model(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ``text fit`` checkpoint or exported text model, told from its entries alone (the file is
    memory-mapped, its tensors not read); False for anything else, unreadable files included."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (a safetensors file, a legacy pickle, no checkpoint at all)
        return False
    return isinstance(checkpoint, Mapping) and TEXT_META_KEY in checkpoint


def read_checkpoint(source: str | os.PathLike[str], what: str = "Checkpoint", *, hint: str = "") -> Any:
    """A ``torch.load(weights_only=True)`` checkpoint, with errors that name ``what`` it was meant to be (and, for a
    missing file, ``hint``: how to make or give one).

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        CheckpointError: if it cannot be read as a checkpoint.
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist{': ' + hint if hint else ''}.")
    return _torch_load(path)


#: file signatures of what is often given where a checkpoint belongs, to say what a file is instead
_NOT_CHECKPOINTS = {b"II*\x00": "a TIFF image", b"MM\x00*": "a TIFF image", b"\x89PNG": "a PNG image",
                    b"\xff\xd8\xff": "a JPEG image", b"\x89HDF": "an HDF5 file", b"PAR1": "a Parquet table",
                    b"SQLite": "an SQLite/GeoPackage file", b"{": "a JSON file", b"\x08\x07\x12": "an ONNX graph"}  # fmt: skip


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(16)
    # torch.save writes a zip archive (older versions a bare pickle, protocol 2+ starts with 0x80)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        kind = next((name for magic, name in _NOT_CHECKPOINTS.items() if head.lstrip().startswith(magic)), None)
        raise CheckpointError(f"{path} is not a PyTorch checkpoint ({'it is ' + kind if kind else 'torch.save writes a zip archive, this file is none'}).")
    # Path objects appear in Lightning hyper-parameters; they are plain values and safe to allow.
    safe = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        # torch's first line advises weights_only=False; what is wrong is on the unpickler's line
        unsafe = next((line for line in lines if line.startswith("WeightsUnpickler error")), None)
        if unsafe is not None:
            detail = unsafe.split(" Please use")[0].rstrip(".") + " (objects that could run code are not loaded)"
        else:
            detail = lines[0] if lines else repr(e)
        raise CheckpointError(f"Cannot read {path} with torch.load(weights_only=True): {detail}.") from e


def _read_safetensors(path: Path) -> tuple[StateDict, dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:
        raise CheckpointError(f"Cannot read {path} as safetensors: {e}") from e


def _read_hf_directory(path: Path) -> StateDict:
    """Tensors of a ``save_pretrained`` directory (single file or sharded)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: StateDict = {}
        for shard in shards:
            sd.update(_read_safetensors(path / shard)[0])
        return sd
    if (path / "model.safetensors").exists():
        return _read_safetensors(path / "model.safetensors")[0]
    if (path / "pytorch_model.bin").exists():
        return _torch_load(path / "pytorch_model.bin")
    raise CheckpointError(f"Directory {path} holds no model.safetensors or pytorch_model.bin.")


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _tensors_only(sd: dict[str, Any], source: Path) -> StateDict:
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(f"{source}: expected a state dict of tensors, but {bad[:5]} are not tensors.")
    return sd


def _unwrap(obj: Any, source: Path) -> tuple[StateDict, dict[str, Any] | None]:
    """The backbone tensors (prefixes stripped) and our metadata, if any, of a loaded checkpoint object."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict checkpoint, got {type(obj).__name__}.")
    meta = obj.get("dinov3_eo") if isinstance(obj.get("dinov3_eo"), dict) else None
    if isinstance(obj.get("state_dict"), dict):  # Lightning
        sd = _strip(_strip(obj["state_dict"], "_orig_mod."), "module.")
        teacher = {k[len("teacher.backbone.") :]: v for k, v in sd.items() if k.startswith("teacher.backbone.")}
        if not teacher:  # a dense task's (segmentation, height): its backbone, fine-tuned or adapted by LoRA
            dense = {k[len("model.backbone.") :]: v for k, v in sd.items() if k.startswith("model.backbone.")}
            if dense:
                from dinov3_eo.models.lora import merge_lora_state_dict

                lora = (obj.get("hyper_parameters") or {}).get("lora")
                return _tensors_only(merge_lora_state_dict(dense, lora), source), meta
            roots = sorted({k.split(".")[0] for k in sd})
            raise CheckpointError(
                f"{source}: Lightning checkpoint has no 'teacher.backbone.*' (pretraining) or 'model.backbone.*' "
                f"(segmentation, height) weights (top-level prefixes: {roots})."
            )
        return _tensors_only(teacher, source), meta
    if isinstance(obj.get("teacher"), dict):  # official trainer output
        sd = _strip(obj["teacher"], "module.")
        backbone = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        return _tensors_only(backbone or sd, source), meta
    for key in ("model", "model_ema"):  # timm training checkpoints
        if isinstance(obj.get(key), dict):
            return _tensors_only(_strip(obj[key], "module."), source), meta
    sd = _strip(_strip(obj, "_orig_mod."), "module.")
    if all(k.startswith("backbone.") for k in sd):
        sd = _strip(sd, "backbone.")
    return _tensors_only(sd, source), meta


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _read_source(path: Path) -> tuple[StateDict, dict[str, Any] | None, dict[str, Any] | None]:
    """(tensors, our metadata or None, Hugging Face config or None) of a checkpoint path."""
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint {path} does not exist.")
    hf_config = None
    if path.is_dir():
        config = path / "config.json"
        hf_config = json.loads(config.read_text()) if config.exists() else None
        return _read_hf_directory(path), None, hf_config
    if path.suffix == ".safetensors":
        sd, file_meta = _read_safetensors(path)
        meta = json.loads(file_meta["dinov3_eo"]) if "dinov3_eo" in file_meta else None
        config = path.parent / "config.json"
        if meta is None and config.exists():
            hf_config = json.loads(config.read_text())
        return _unwrap(sd, path)[0], meta, hf_config
    sd, meta = _unwrap(_torch_load(path), path)
    if meta is None and _sidecar(path).exists():
        meta = json.loads(_sidecar(path).read_text()).get("dinov3_eo")
    return sd, meta, hf_config


# ----------------------------------------------------------------------------- layout conversions
def detect_layout(sd: StateDict) -> str:
    """``"official"``, ``"timm"`` or ``"hf"`` from the key names of a (prefix-free) state dict.

    Raises:
        CheckpointError: if the keys match none of them.
    """
    keys = set(sd)
    if "embeddings.cls_token" in keys or any(k.startswith(("layer.", "model.layer.")) for k in keys):
        return "hf"
    if "reg_token" in keys or any(".gamma_1" in k or "mlp.fc1_g" in k for k in keys):
        return "timm"
    if "cls_token" in keys and ("storage_tokens" in keys or any(".ls1.gamma" in k for k in keys)):
        return "official"
    sample = sorted(keys)[:6]
    raise CheckpointError(f"Unrecognised checkpoint layout (first keys: {sample}); expected a DINOv3 ViT backbone.")


def official_from_timm(sd: StateDict) -> StateDict:
    """timm ``vit_*_patch16_dinov3`` keys -> official keys (inverse of timm's ``checkpoint_filter_fn``).

    ``q_bias``/``v_bias`` become ``qkv.bias`` with a zero key third; a classifier ``head`` is dropped.
    """
    swiglu = any("mlp.fc1_g" in k for k in sd)
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("head."):
            log.info("Ignoring the timm classifier weight %s.", k)
            continue
        if k.endswith("attn.v_bias"):
            continue  # joined with q_bias below
        if k.endswith("attn.q_bias"):
            v_bias = sd[k[: -len("q_bias")] + "v_bias"]
            out[k[: -len("q_bias")] + "qkv.bias"] = torch.cat((v, torch.zeros_like(v), v_bias))
            continue
        k = k.replace("reg_token", "storage_tokens").replace(".gamma_1", ".ls1.gamma").replace(".gamma_2", ".ls2.gamma")
        if swiglu:
            k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.").replace("mlp.fc2.", "mlp.w3.")
        out[k] = v
    return out


_HF_BLOCK_RENAMES = {
    "attention.o_proj.": "attn.proj.",
    "attention.proj.": "attn.proj.",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
}


def official_from_hf(sd: StateDict) -> StateDict:
    """Hugging Face ``DINOv3ViTModel`` keys -> official keys.

    q/k/v projections are fused into ``qkv`` (a missing key bias becomes zeros); ``up/down/gate_proj``
    become ``fc1/fc2`` (GELU MLP) or ``w2/w3/w1`` (SwiGLU: ``down(act(gate x) * up x)``).
    """
    sd = {(k[len("model.") :] if k.startswith("model.layer.") else k): v for k, v in sd.items()}
    gated = any(".mlp.gate_proj." in k for k in sd)
    mlp_names = {"gate_proj": "w1", "up_proj": "w2", "down_proj": "w3"} if gated else {"up_proj": "fc1", "down_proj": "fc2"}
    out: StateDict = {}
    for k, v in sd.items():
        if k.startswith("rope_embeddings."):
            continue
        if k.startswith("embeddings."):
            name = k[len("embeddings.") :]
            if name == "mask_token":
                out["mask_token"] = v.reshape(1, -1)
            elif name == "register_tokens":
                out["storage_tokens"] = v
            elif name.startswith("patch_embeddings."):
                out["patch_embed.proj." + name.split(".")[-1]] = v
            else:
                out[name] = v
            continue
        if not k.startswith("layer."):
            out[k] = v  # final norm
            continue
        _, i, rest = k.split(".", 2)
        prefix = f"blocks.{i}."
        if rest.startswith("attention.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            continue  # fused below
        for old, new in _HF_BLOCK_RENAMES.items():
            rest = rest.replace(old, new)
        if rest.startswith("mlp."):
            layer, param = rest[len("mlp.") :].split(".", 1)
            rest = f"mlp.{mlp_names.get(layer, layer)}.{param}"
        out[prefix + rest] = v
    n_layers = {int(k.split(".")[1]) for k in sd if k.startswith("layer.")}
    for i in sorted(n_layers):
        attn = f"layer.{i}.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([sd[f"{attn}{p}_proj.weight"] for p in "qkv"])
        if f"{attn}q_proj.bias" in sd:
            q = sd[f"{attn}q_proj.bias"]
            k_bias = sd.get(f"{attn}k_proj.bias", torch.zeros_like(q))
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat((q, k_bias, sd[f"{attn}v_proj.bias"]))
    return out


def to_official_layout(sd: StateDict) -> tuple[StateDict, str]:
    """Convert any supported layout to official keys; returns the converted dict and the source layout."""
    layout = detect_layout(sd)
    if layout == "timm":
        return official_from_timm(sd), layout
    if layout == "hf":
        return official_from_hf(sd), layout
    return dict(sd), layout


# ------------------------------------------------------------------------------ size inference
@cache
def _templates() -> dict[str, dict[str, Any]]:
    """Shape signature of every registered backbone (built on the meta device, no memory)."""
    out = {}
    for name in BACKBONES:
        m = build_backbone(name, device="meta")
        b = m.blocks[0]
        swiglu = hasattr(b.mlp, "w1")
        out[name] = {
            "embed_dim": m.embed_dim,
            "swiglu": swiglu,
            "hidden": (b.mlp.w1 if swiglu else b.mlp.fc1).out_features,
            "num_heads": m.num_heads,
            "depth": m.n_blocks,
            "qkv_bias": b.attn.qkv.bias is not None,
            "n_storage_tokens": m.n_storage_tokens,
            "patch_size": m.patch_size,
        }
    return out


def infer_architecture(
    sd: StateDict, *, num_heads: int | None = None, allow_missing_qkv_bias: bool = False
) -> tuple[str, dict[str, Any]]:
    """Registry name and constructor overrides of an official-layout state dict.

    The template is the registered size with the same width, feed-forward type and hidden width;
    depth, heads (from the RoPE ``periods`` length when stored, else ``num_heads``), register count,
    patch size, q/k/v bias and ``local_cls_norm`` are read from the weights and become overrides when
    they differ.

    Raises:
        CheckpointError: if the weights match no registered size.
    """
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.0.norm1.weight"):
        if key not in sd:
            raise CheckpointError(f"Cannot infer the architecture: key {key!r} is missing.")
    dim = sd["cls_token"].shape[-1]
    swiglu = "blocks.0.mlp.w1.weight" in sd
    ffn_key = "blocks.0.mlp.w1.weight" if swiglu else "blocks.0.mlp.fc1.weight"
    if ffn_key not in sd:
        raise CheckpointError(f"Cannot infer the architecture: no feed-forward weight {ffn_key!r}.")
    hidden = sd[ffn_key].shape[0]
    matches = [
        n for n, t in _templates().items() if (t["embed_dim"], t["swiglu"], t["hidden"]) == (dim, swiglu, hidden)
    ]
    if not matches:
        kind = "SwiGLU" if swiglu else "MLP"
        raise CheckpointError(
            f"No registered backbone has width {dim} with a {kind} of hidden size {hidden}; "
            f"known sizes: {sorted(_templates())}."
        )
    name = matches[0]
    template = _templates()[name]
    if "rope_embed.periods" in sd:
        num_heads = dim // (4 * sd["rope_embed.periods"].numel())
    found = {
        "depth": len({k.split(".")[1] for k in sd if k.startswith("blocks.")}),
        "num_heads": num_heads or template["num_heads"],
        "n_storage_tokens": sd["storage_tokens"].shape[1] if "storage_tokens" in sd else template["n_storage_tokens"],
        "patch_size": sd["patch_embed.proj.weight"].shape[-1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd or (allow_missing_qkv_bias and template["qkv_bias"]),
    }
    overrides = {k: v for k, v in found.items() if v != template[k]}
    if "blocks.0.attn.qkv.bias" in sd and "blocks.0.attn.qkv.bias_mask" not in sd and not allow_missing_qkv_bias:
        overrides["mask_k_bias"] = False
    overrides["untie_global_and_local_cls_norm"] = "local_cls_norm.weight" in sd
    return name, overrides


# ------------------------------------------------------------------------------ channel inflation
def inflate_patch_embed(weight: Tensor, in_chans: int) -> Tensor:
    """Adapt an RGB patch-embedding weight (D, 3, p, p) to ``in_chans`` bands: (D, in_chans, p, p).

    With ``N = in_chans``: for ``N >= 3`` the RGB filters are kept and each extra band gets the mean
    RGB filter; for ``N < 3`` every band gets the mean filter. The whole weight is then scaled by
    ``3 / N`` so that a grey input keeps the activation scale of the RGB model (FINO's
    ``expand_patch_embed``).

    Raises:
        ValueError: if ``weight`` is not 3-band or ``in_chans < 1``.
    """
    if weight.ndim != 4 or weight.shape[1] != 3:
        raise ValueError(f"inflate_patch_embed expects an RGB weight (D, 3, p, p), got {tuple(weight.shape)}.")
    if in_chans < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}.")
    mean_filter = weight.mean(dim=1, keepdim=True)  # [D, 1, p, p]
    keep = weight if in_chans >= 3 else weight[:, :0]  # [D, min(3, N) or 0, p, p]
    extra = mean_filter.expand(-1, in_chans - keep.shape[1], -1, -1)  # [D, N - kept, p, p]
    return torch.cat((keep, extra), dim=1) * (3.0 / in_chans)  # [D, N, p, p]


# ------------------------------------------------------------------------------ strict loading
def _listing(items: list[str], limit: int = 8) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return "[" + ", ".join(items[:limit]) + "]" + more


def check_state_dict(model: nn.Module, sd: StateDict, *, what: str) -> None:
    """Raise one :class:`CheckpointError` naming every missing, unexpected and mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(sd) & set(expected)
        if sd[k].shape != expected[k].shape
    )
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_listing(shapes)}")
    if problems:
        raise CheckpointError(f"{what} does not fit: " + "; ".join(problems) + ".")


def _fill_format_gaps(sd: StateDict, model: DinoVisionTransformer, layout: str) -> StateDict:
    """Add the tensors timm/HF checkpoints leave out by design (fixed functions of the architecture)."""
    if layout == "official":
        return sd
    sd = dict(sd)
    # `model` may live on the meta device: the values are computed here from shapes
    for key, value in model.state_dict().items():
        if key in sd:
            continue
        if key == "rope_embed.periods":
            sd[key] = RopePositionEmbedding(head_dim=4 * value.numel(), base=model.rope_embed.base).periods
        elif key.endswith(".bias_mask"):
            n = value.numel()
            sd[key] = torch.ones(n)
            sd[key][n // 3 : 2 * n // 3] = 0.0
        elif key == "mask_token" and layout == "timm":
            sd[key] = torch.zeros(value.shape)  # timm drops the pretraining-only mask token
        elif key.endswith("attn.qkv.bias"):
            sd[key] = torch.zeros(value.shape)  # bias-free q/k/v in the source is an all-zero bias here
    return sd


def _default_normalization(path: Path, name: str, sd: StateDict) -> tuple[str, float | None]:
    """Preset name and GSD for RGB weights that carry no metadata: SAT-493M or web (ImageNet)."""
    text = str(path).lower()
    if "sat493m" in text or "sat-493m" in text:
        return "sat493m", SAT493M_GSD
    if "lvd1689m" not in text and name == "vitl16" and "local_cls_norm.weight" in sd:
        return "sat493m", SAT493M_GSD  # only the SAT ViT-L carries local_cls_norm among the L models
    return "imagenet", None


def load_backbone(
    source: str | os.PathLike[str], name: str | None = None, in_chans: int | None = None
) -> DinoVisionTransformer:
    """Load a backbone from any supported checkpoint (see the module docstring), in eval mode.

    Args:
        source: path to a ``.pth``/``.pt``/``.ckpt``/``.bin``/``.safetensors`` file or an HF directory.
        name: registry name to build; inferred from the weights when ``None``.
        in_chans: input bands; RGB weights are inflated to it (see :func:`inflate_patch_embed`).

    Returns:
        the model, with a ``meta`` attribute (:class:`BackboneMeta`).

    Raises:
        FileNotFoundError: if ``source`` does not exist.
        CheckpointError: if the file cannot be read, its layout is unknown, or its tensors do not fit.
    """
    path = Path(source)
    raw, stored_meta, hf_config = _read_source(path)
    sd, layout = to_official_layout(raw)
    hf_config = hf_config or {}

    ckpt_chans = sd["patch_embed.proj.weight"].shape[1] if "patch_embed.proj.weight" in sd else None
    target_chans = in_chans or ckpt_chans or 3
    extra: dict[str, Any] = {}
    if "layer_norm_eps" in hf_config:
        extra["norm_eps"] = float(hf_config["layer_norm_eps"])
    if "rope_theta" in hf_config:
        extra["pos_embed_rope_base"] = float(hf_config["rope_theta"])
    if name is None:
        name, overrides = infer_architecture(
            sd, num_heads=hf_config.get("num_attention_heads"), allow_missing_qkv_bias=layout != "official"
        )
    else:
        overrides = {"untie_global_and_local_cls_norm": "local_cls_norm.weight" in sd}
    try:
        # on the meta device: no time spent on a random init that the checkpoint overwrites
        model = build_backbone(name, in_chans=target_chans, device="meta", **overrides, **extra)
    except ValueError as e:
        raise CheckpointError(f"{path}: cannot build backbone {name!r} for these weights: {e}") from e

    sd = _fill_format_gaps(sd, model, layout)
    inflated = False
    if ckpt_chans is not None and ckpt_chans != target_chans:
        if ckpt_chans != 3:
            raise CheckpointError(
                f"{path}: weights take {ckpt_chans} bands; only RGB (3-band) weights can be adapted to {target_chans}."
            )
        sd["patch_embed.proj.weight"] = inflate_patch_embed(sd["patch_embed.proj.weight"], target_chans)
        inflated = True
        log.warning(
            "Inflated the RGB patch embedding of %s to %d bands (new bands = mean RGB filter, weight x 3/%d).",
            path, target_chans, target_chans,
        )
    check_state_dict(model, sd, what=f"{path} ({layout} layout) for backbone {name!r}")
    # float32 and contiguous, as a freshly built model would be (checkpoints may hold bf16 or views)
    sd = {k: (v.to(torch.float32) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    model.eval()
    model.meta = _meta_for(model, name, path, sd, stored_meta, inflated=inflated)
    log.info("Loaded %s backbone %r from %s (%d bands).", layout, name, path, target_chans)
    return model


def _meta_for(
    model: DinoVisionTransformer,
    name: str,
    path: Path,
    sd: StateDict,
    stored: dict[str, Any] | None,
    *,
    inflated: bool,
) -> BackboneMeta:
    meta = BackboneMeta(name=name, in_chans=model.in_chans, patch_size=model.patch_size, embed_dim=model.embed_dim)
    if stored is not None:
        meta.name = str(stored.get("name") or stored.get("model") or name)
        meta.bands = None if stored.get("bands") is None else list(stored["bands"])
        meta.normalization = stored.get("normalization")
        meta.gsd = None if stored.get("gsd") is None else float(stored["gsd"])
    elif model.in_chans == 3:
        preset, meta.gsd = _default_normalization(path, name, sd)
        meta.normalization = Normalization.preset(preset).to_dict()
        meta.bands = list(RGB_BANDS)
        log.info("No metadata in %s: assuming RGB input with the %r normalisation.", path, preset)
    else:
        log.warning("%s has no metadata for its %d bands%s: set meta.bands and meta.normalization.",
                    path, model.in_chans, " (inflated from RGB)" if inflated else "")
    # band-dependent metadata cannot survive a change of band count
    if meta.bands is not None and len(meta.bands) != model.in_chans:
        meta.bands = None
    if meta.normalization is not None and len(meta.normalization.get("mean", ())) != model.in_chans:
        log.warning("Dropping the %d-band normalisation of %s: the model now takes %d bands; set one for your data.",
                    len(meta.normalization["mean"]), path, model.in_chans)
        meta.normalization = None
    return meta


# ------------------------------------------------------------------------------------- exporting
def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _default_meta(model: DinoVisionTransformer) -> BackboneMeta:
    meta = getattr(model, "meta", None)
    if isinstance(meta, BackboneMeta):
        return meta
    return BackboneMeta(
        name=getattr(model, "name", "custom"), in_chans=model.in_chans, patch_size=model.patch_size,
        embed_dim=model.embed_dim,
    )


def export_backbone(
    model: DinoVisionTransformer, path: str | os.PathLike[str], *, meta: BackboneMeta | None = None
) -> dict[str, Path]:
    """Write ``<path>.pth`` (official layout), ``<path>.safetensors`` (with metadata) and ``<path>.json``.

    Args:
        model: the backbone.
        path: output prefix; a ``.pth``/``.safetensors``/``.json`` suffix is dropped.
        meta: metadata to store; defaults to ``model.meta`` or one derived from the model.

    Returns:
        ``{"pth": ..., "safetensors": ..., "json": ...}`` paths written.
    """
    from safetensors.torch import save_file

    prefix = Path(path)
    if prefix.suffix in (".pth", ".safetensors", ".json"):
        prefix = prefix.with_suffix("")
    meta = meta or _default_meta(model)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta_json = json.dumps(meta.to_dict())
    out = {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("pth", "safetensors", "json")}
    _atomic_write(out["pth"], lambda tmp: torch.save(sd, tmp))
    _atomic_write(out["safetensors"], lambda tmp: save_file(sd, tmp, metadata={"format": "pt", "dinov3_eo": meta_json}))
    sidecar = {
        "dinov3_eo": meta.to_dict(),
        "arch": getattr(model, "arch", None),
        "layout": "official DINOv3 backbone state dict",
        "files": {k: v.name for k, v in out.items() if k != "json"},
    }
    _atomic_write(out["json"], lambda tmp: Path(tmp).write_text(json.dumps(sidecar, indent=2) + "\n"))
    return out


def to_timm(model: DinoVisionTransformer) -> nn.Module:
    """The same network as a timm ``vit_*_patch16_dinov3`` model (CLS pooling, no classifier).

    The weights go through timm's own ``checkpoint_filter_fn``, so the result is what timm would build
    from an official checkpoint of this model; use it with torchgeo / TerraTorch. RGB normalisation in
    ``model.meta`` on a [0, 255] or [0, 1] scale is copied into ``pretrained_cfg``.
    """
    import timm
    from timm.layers import LayerNorm
    from timm.models.eva import checkpoint_filter_fn

    block = model.blocks[0]
    swiglu = hasattr(block.mlp, "w1")
    hidden = (block.mlp.w1 if swiglu else block.mlp.fc1).out_features
    qkv_bias = block.attn.qkv.bias
    # timm's default DINOv3 variants have no q/v bias (the released distilled models' are all zero)
    has_bias = qkv_bias is not None and any(bool(b.attn.qkv.bias.detach().abs().amax() > 0) for b in model.blocks)
    base = TIMM_NAMES.get(getattr(model, "name", ""), "vit_small_plus_patch16_dinov3" if swiglu else "vit_small_patch16_dinov3")
    variant = base if base.endswith("_qkvb") or not has_bias else base + "_qkvb"
    kwargs: dict[str, Any] = {
        "pretrained": False,
        "num_classes": 0,
        "global_pool": "token",
        "in_chans": model.in_chans,
        "patch_size": model.patch_size,
        "embed_dim": model.embed_dim,
        "depth": model.n_blocks,
        "num_heads": model.num_heads,
        "num_reg_tokens": model.n_storage_tokens,
        "qkv_bias": has_bias,
        "mlp_ratio": (hidden + 0.5) / model.embed_dim,  # + 0.5: int(dim * ratio) must give `hidden` exactly
        "rope_temperature": model.rope_embed.base,
        "norm_layer": partial(LayerNorm, eps=model.norm.eps),
    }
    if swiglu:
        kwargs.update(swiglu_mlp=True, swiglu_align_to=1)
    # built on the meta device: timm's random init of a large model would be thrown away anyway
    timm_model = timm.create_model(variant, device="meta", **kwargs).to_empty(device="cpu")
    with contextlib.redirect_stdout(io.StringIO()):  # the filter prints when it skips an absent q/v bias
        sd = checkpoint_filter_fn({k: v.detach().cpu() for k, v in model.state_dict().items()}, timm_model)
    timm_model.load_state_dict(sd, strict=True)
    for module in timm_model.modules():  # RoPE periods and the zero key bias are non-persistent in timm
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    meta = getattr(model, "meta", None)
    norm = meta.get_normalization() if isinstance(meta, BackboneMeta) else None
    if norm is not None and norm.low is not None and norm.high is not None and set(norm.low) == {0.0}:
        if set(norm.high) in ({255.0}, {1.0}):
            timm_model.pretrained_cfg = {**timm_model.pretrained_cfg, "mean": norm.mean, "std": norm.std}
    return timm_model.eval() if not model.training else timm_model


# ----------------------------------------------------------------------------------------- CLI
def export_main(argv: Iterable[str]) -> int:
    """``dinov3-eo export CKPT -o OUT_PREFIX``: write any supported checkpoint's backbone as an export."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo export",
        description="Export a checkpoint's backbone (a pretraining teacher, or a segmentation / height model's with its "
        "LoRA updates folded in) as official-layout .pth + .safetensors + .json metadata.",
    )
    parser.add_argument("checkpoint", help="official/timm/HF/Lightning/dinov3_eo checkpoint file or HF directory")
    parser.add_argument("-o", "--output", required=True, help="output prefix (writes PREFIX.pth, .safetensors, .json)")
    parser.add_argument("--name", default=None, choices=sorted(BACKBONES), help="backbone size (default: inferred)")
    parser.add_argument("--in-chans", type=int, default=None, help="input bands (RGB weights are inflated)")
    onnx = parser.add_argument_group("ONNX", "one graph for ONNX Runtime, TensorRT, edge devices: PREFIX.onnx")
    onnx.add_argument("--onnx", action="store_true", help="write PREFIX.onnx instead: a segmentation or height "
                      "checkpoint's whole model (image -> probabilities and classes, or metres), else the backbone "
                      "(image -> cls_token, patch_features); batch and sides dynamic, its metadata inside")  # fmt: skip
    onnx.add_argument("--queries", nargs="+", default=None, metavar="QUERY", help="with --onnx and a text model "
                      "('text fit'): the graph maps these free-text classes (fixed at export), as 'query' does")  # fmt: skip
    onnx.add_argument("--normalized-input", action="store_true", help="with --onnx, the graph takes normalised "
                      "inputs (default: raw band values, normalised inside by the checkpoint's recorded normalisation)")  # fmt: skip
    onnx.add_argument("--no-check", action="store_true", help="with --onnx, skip running the graph in ONNX Runtime "
                      "against PyTorch on two input sizes")  # fmt: skip
    onnx.add_argument("--overwrite", action="store_true", help="with --onnx, replace an existing PREFIX.onnx")
    args = parser.parse_args(list(argv))
    if args.onnx:
        return _export_onnx_cli(args)
    if args.normalized_input or args.no_check or args.queries:
        print("dinov3-eo export: error: --queries, --normalized-input and --no-check are options of --onnx.", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        model = load_backbone(args.checkpoint, name=args.name, in_chans=args.in_chans)
        written = export_backbone(model, args.output, meta=model.meta)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"dinov3-eo export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for kind, p in written.items():
        print(f"{kind:>12}: {p}")
    return 0


def _export_onnx_cli(args: argparse.Namespace) -> int:
    """``export CKPT -o PREFIX --onnx``: :func:`~dinov3_eo.inference.onnx_export.export_onnx`, its check printed."""
    from dinov3_eo.inference.onnx_export import export_onnx

    prefix = Path(args.output)
    dst = prefix if prefix.suffix.lower() == ".onnx" else prefix.with_name(prefix.name + ".onnx")
    try:
        done = export_onnx(args.checkpoint, dst, name=args.name, in_chans=args.in_chans,
                           normalized_input=args.normalized_input, queries=args.queries, check=not args.no_check,
                           overwrite=args.overwrite)  # fmt: skip
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"dinov3-eo export: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    meta = done.metadata
    print(f"{meta['kind']} graph ({meta['backbone']}, {meta['in_chans']} bands, {meta['input']} input) -> "
          f"{', '.join(meta['outputs'])} in {done.seconds:.1f} s")  # fmt: skip
    if done.max_difference is not None:
        agree = "" if done.class_disagreement is None else f", classes differing on {done.class_disagreement:.2%} of pixels"
        print(f"checked in ONNX Runtime against PyTorch on two input sizes: max |difference| {done.max_difference:.2g}{agree}")
    print(f"{'onnx':>12}: {done.path}")
    return 0


__all__ = [
    "BackboneMeta",
    "CheckpointError",
    "check_state_dict",
    "detect_layout",
    "export_backbone",
    "export_main",
    "infer_architecture",
    "inflate_patch_embed",
    "is_text_model",
    "load_backbone",
    "official_from_hf",
    "official_from_timm",
    "read_checkpoint",
    "to_official_layout",
    "to_timm",
]
