"""Models as ONNX graphs, for deployment where PyTorch is not (ONNX Runtime, TensorRT, OpenVINO, edge devices,
other languages): ``dinov3-eo export CKPT -o PREFIX --onnx``.

What the graph computes depends on the checkpoint:

* a backbone (any checkpoint :func:`~dinov3_eo.models.hub.load_backbone` reads): ``image [B, C, H, W]`` →
  ``cls_token [B, D]`` and ``patch_features [B, D, H/p, W/p]``, the last block's normed tokens (what ``embed``
  writes); sides should be multiples of the patch size ``p``.
* a segmentation checkpoint (``segment fit``): ``image`` → ``probabilities [B, K, H, W]`` (softmax) and
  ``classes [B, H, W]`` uint8, any ``H, W`` (the model pads inside, as ``segment predict`` does).
* a height checkpoint (``height fit``): ``image`` → ``height_m [B, 1, H, W]``, metres, any ``H, W``.
* a text model (``text fit``) with ``queries``: their open-vocabulary map, as ``query`` draws it: ``probabilities
  [B, T, H, W]`` (softmax over the queries) and ``classes [B, H, W]`` uint8, or ``cosine [B, 1, H, W]`` for one
  query. The queries' text embeddings are computed at export, so the graph needs no tokenizer or text tower.

Batch and sides are dynamic. By default the graph takes **raw band values** (float32, as read from the GeoTIFF, in
the checkpoint's band order) and applies the recorded input normalisation itself, so a deployment cannot feed a
model inputs scaled the wrong way; ``normalized_input=True`` leaves it out. Pixels without data are not handled by
the graph: mask them with the recorded ``nodata``. Everything needed to use the file (kind, bands, normalisation,
classes and colours, nodata, patch size, GSD, the inputs' and outputs' shapes) is in the model's metadata under
``dinov3_eo`` (:func:`read_onnx_metadata`). Each export is run in ONNX Runtime against the PyTorch model on two
input sizes before it is kept (:class:`OnnxExport` holds the largest difference).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

#: the ONNX ``metadata_props`` key holding the JSON that describes a graph
ONNX_METADATA_KEY = "dinov3_eo"
#: the kinds of graph a checkpoint becomes
ONNX_KINDS = ("backbone", "segmentation", "height", "query")
#: protobuf's 2 GiB limit: larger graphs keep their weights in a ``.onnx.data`` file beside them
_PROTO_LIMIT = 2**31 - 2**26


class InputNormalization(nn.Module):
    """:class:`~dinov3_eo.data.normalization.Normalization` as a module (its constants as buffers, so they become
    initialisers of an exported graph): ``[B, C, H, W]`` raw values → normalised float32."""

    def __init__(self, normalization: Any) -> None:
        super().__init__()
        shape = (1, -1, 1, 1)
        self.clip = normalization.low is not None
        if self.clip:
            self.register_buffer("low", torch.tensor(normalization.low, dtype=torch.float32).view(shape))
            self.register_buffer("high", torch.tensor(normalization.high, dtype=torch.float32).view(shape))
        self.register_buffer("mean", torch.tensor(normalization.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(normalization.std, dtype=torch.float32).view(shape))

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(torch.float32)
        if self.clip:
            x = (torch.minimum(torch.maximum(x, self.low), self.high) - self.low) / (self.high - self.low)
        return (x - self.mean) / self.std


class _ModelGraph(nn.Module):
    """``model`` behind the input normalisation, when one is given (the graph then takes raw band values)."""

    def __init__(self, model: nn.Module, normalization: Any = None) -> None:
        super().__init__()
        self.normalize = InputNormalization(normalization) if normalization is not None else nn.Identity()
        self.model = model


def _probabilities_and_classes(logits: Tensor) -> tuple[Tensor, Tensor]:
    """``[B, K, H, W]`` logits → their softmax and ``[B, H, W]`` uint8 argmax."""
    probabilities = logits.softmax(dim=1)
    return probabilities, probabilities.argmax(dim=1).to(torch.uint8)


class BackboneGraph(_ModelGraph):
    """``image [B, C, H, W]`` → ``(cls_token [B, D], patch_features [B, D, H/p, W/p])``: the last block, normed."""

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        ((patch, cls),) = self.model.get_intermediate_layers(self.normalize(image), n=1, reshape=True,
                                                             return_class_token=True, norm=True)  # fmt: skip
        return cls, patch


class SegmentationGraph(_ModelGraph):
    """``image [B, C, H, W]`` → ``(probabilities [B, K, H, W], classes [B, H, W] uint8)``."""

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return _probabilities_and_classes(self.model(self.normalize(image)))


class HeightGraph(_ModelGraph):
    """``image [B, C, H, W]`` → ``height_m [B, 1, H, W]``."""

    def forward(self, image: Tensor) -> Tensor:
        return self.model(self.normalize(image))


class QueryGraph(_ModelGraph):
    """``image [B, C, H, W]`` → open-vocabulary scores of a scorer (``OpenVocabScorer``) against queries fixed at
    export: ``(probabilities [B, T, H, W], classes [B, H, W] uint8)`` for two or more (the softmax of ``query``),
    ``cosine [B, 1, H, W]`` for one (``softmax=False``)."""

    def __init__(self, scorer: nn.Module, normalization: Any = None, *, softmax: bool = True) -> None:
        super().__init__(scorer, normalization)
        self.softmax = softmax

    def forward(self, image: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        scores = self.model(self.normalize(image))
        return _probabilities_and_classes(scores) if self.softmax else scores


@dataclass(frozen=True)
class OnnxExport:
    """A written graph: its ``path``, its ``metadata``, the largest absolute difference between ONNX Runtime and
    PyTorch over the check's inputs and outputs (None when not checked; a uint8 class output counts the share of
    pixels whose class differs instead), and the seconds the export took."""

    path: Path
    metadata: dict[str, Any]
    max_difference: float | None
    class_disagreement: float | None
    seconds: float


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX export needs the onnx and onnxscript packages ({e.name} is missing): "
                          "pip install 'dinov3_eo[onnx]'.") from e  # fmt: skip


def _text_model(checkpoint: str | os.PathLike[str]) -> tuple[Any, Any, dict[str, Any]] | None:
    """What :func:`~dinov3_eo.tasks.openvocab.load_text_model` returns for ``checkpoint``, or None if it is no text
    model (loaded once: a text model's graph is built from it)."""
    from dinov3_eo.tasks.openvocab import load_text_model

    try:
        return load_text_model(checkpoint)
    except Exception:  # any file that is not one
        return None


def onnx_graph_for(checkpoint: str | os.PathLike[str], *, name: str | None = None, in_chans: int | None = None,
                   normalized_input: bool = False, queries: Sequence[str] | None = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """The graph module for ``checkpoint`` and the metadata describing it (module docstring): a segmentation or
    height checkpoint becomes its whole model, a text model with ``queries`` their open-vocabulary map, anything
    else its backbone (``name`` and ``in_chans`` as :func:`~dinov3_eo.models.hub.load_backbone`).

    Raises:
        FileNotFoundError: no such file. CheckpointError, ValueError: a file no loader reads; ``queries`` for a
            model without text, or a text model without them.
    """
    from dinov3_eo.data.normalization import Normalization
    from dinov3_eo.models.hub import CheckpointError, load_backbone
    from dinov3_eo.tasks.height import load_height_model
    from dinov3_eo.tasks.segmentation import CHECKPOINT_KEY, SegmentationTask, is_segmentation_checkpoint

    if not Path(checkpoint).exists():
        raise FileNotFoundError(f"No checkpoint at {os.fspath(checkpoint)!r}.")
    if queries is not None:
        return _query_graph(checkpoint, list(queries), normalized_input=normalized_input)
    normalization: Normalization | None
    extra: dict[str, Any] = {}
    if is_segmentation_checkpoint(checkpoint):
        task = SegmentationTask.from_checkpoint(checkpoint)
        model, meta, kind = task.model.eval(), task.backbone_meta(), "segmentation"
        normalization = task.input_normalization()
        entry = task.checkpoint_metadata()[CHECKPOINT_KEY]
        extra = {"class_names": list(task.class_names), "class_colors": [list(c) for c in task.class_colors],
                 "nodata": entry.get("nodata"), "band_selection": entry.get("band_selection"),
                 "outputs": {"probabilities": "[batch, classes, height, width] float32 (softmax)",
                             "classes": "[batch, height, width] uint8 (class ids)"}}  # fmt: skip
    else:
        try:
            model, kind = load_height_model(checkpoint), "height"
        except Exception:  # not a height checkpoint: the backbone loader reports what it is not, in its own words
            model, kind = None, "backbone"
        if model is not None:
            meta = model.meta
            extra = {"outputs": {"height_m": "[batch, 1, height, width] float32 (metres)"}}
        else:
            try:
                model = load_backbone(checkpoint, name=name, in_chans=in_chans).eval()
            except CheckpointError:
                if _text_model(checkpoint) is not None:
                    raise ValueError(f"{os.fspath(checkpoint)} is a text model: give the queries its graph maps "
                                     "(--queries water forest ...), fixed at export.") from None  # fmt: skip
                raise
            meta = model.meta
            extra = {"outputs": {"cls_token": "[batch, embed_dim] float32",
                                 "patch_features": "[batch, embed_dim, height / patch_size, width / patch_size] float32"}}  # fmt: skip
        normalization = meta.get_normalization()
    model.eval()
    inside = None if normalized_input else normalization
    graph = {"backbone": BackboneGraph, "segmentation": SegmentationGraph, "height": HeightGraph}[kind](model, inside)
    metadata = {
        "kind": kind, "backbone": meta.name, "in_chans": int(meta.in_chans), "patch_size": int(meta.patch_size),
        "embed_dim": int(meta.embed_dim), "bands": meta.bands, "gsd": meta.gsd,
        "input": "raw" if inside is not None else "normalized",
        "normalization": None if normalization is None else normalization.to_dict(),
        "inputs": {"image": "[batch, bands, height, width] float32 "
                            + ("(raw band values: the graph normalises them)" if inside is not None
                               else "(already normalised with 'normalization')")},
        # a dense model pads inside to its multiple; a backbone wants whole patches
        "side_multiple": 1 if kind != "backbone" else int(meta.patch_size),
        "source": os.fspath(checkpoint),
        **extra,
    }  # fmt: skip
    return graph.eval(), metadata


def _query_graph(checkpoint: str | os.PathLike[str], queries: list[str], *, normalized_input: bool) -> tuple[nn.Module, dict[str, Any]]:
    """A text model's open-vocabulary map for ``queries`` (their text embeddings computed now, template-ensembled as
    ``query`` does, so the graph needs no tokenizer): probabilities over two or more, the cosine of one."""
    from dinov3_eo.tasks.openvocab import MapQuery, OpenVocabScorer

    loaded = _text_model(checkpoint)
    if loaded is None:
        raise ValueError(f"--queries map text onto images with a text model ('text fit'); {os.fspath(checkpoint)} "
                         "is not one.")  # fmt: skip
    engine = MapQuery.from_text_model(*loaded, device="cpu")
    embeddings = engine.text_embeddings(queries)
    softmax = len(queries) > 1
    scale = float(engine.model.logit_scale.detach().exp()) if softmax else 1.0
    scorer = OpenVocabScorer(model=engine.model.eval(), embeddings=embeddings, scale=scale)
    graph = QueryGraph(scorer, None if normalized_input else engine.normalization, softmax=softmax)
    meta = engine.meta
    outputs = ({"probabilities": "[batch, queries, height, width] float32 (softmax over the queries)",
                "classes": "[batch, height, width] uint8 (query ids)"} if softmax
               else {"cosine": "[batch, 1, height, width] float32 (cosine similarity to the query)"})  # fmt: skip
    metadata = {
        "kind": "query", "backbone": meta.name, "in_chans": int(meta.in_chans), "patch_size": int(meta.patch_size),
        "embed_dim": int(meta.embed_dim), "bands": meta.bands, "gsd": meta.gsd,
        "input": "normalized" if normalized_input else "raw", "normalization": engine.normalization.to_dict(),
        "inputs": {"image": "[batch, bands, height, width] float32 "
                            + ("(already normalised with 'normalization')" if normalized_input
                               else "(raw band values: the graph normalises them)")},
        "queries": queries, "templates": list(engine.templates), "scores": "probability" if softmax else "cosine",
        "side_multiple": 1, "source": os.fspath(checkpoint), "outputs": outputs,
    }  # fmt: skip
    return graph.eval(), metadata


def _example(metadata: dict[str, Any], batch: int, height: int, width: int) -> Tensor:
    """An input the graph expects: raw values in the normalisation's range, else unit noise."""
    generator = torch.Generator().manual_seed(height * 1000 + width)
    x = torch.rand(batch, metadata["in_chans"], height, width, generator=generator)
    norm = metadata.get("normalization") if metadata["input"] == "raw" else None
    if norm and norm.get("low") is not None:
        low, high = torch.tensor(norm["low"]).view(1, -1, 1, 1), torch.tensor(norm["high"]).view(1, -1, 1, 1)
        return low + x * (high - low)
    noise = torch.randn(x.shape, generator=generator)
    if norm:  # z-scores only: raw values around the recorded mean
        return torch.tensor(norm["mean"]).view(1, -1, 1, 1) + noise * torch.tensor(norm["std"]).view(1, -1, 1, 1)
    return noise


def export_onnx(
    checkpoint: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    name: str | None = None,
    in_chans: int | None = None,
    normalized_input: bool = False,
    queries: Sequence[str] | None = None,
    check: bool = True,
    overwrite: bool = False,
) -> OnnxExport:
    """``checkpoint`` as an ONNX graph at ``dst`` (module docstring), written atomically, its metadata inside.

    Args:
        checkpoint: a backbone, segmentation or height checkpoint; name, in_chans: as ``load_backbone``.
        dst: the ``.onnx`` file. normalized_input: leave the input normalisation out of the graph.
        queries: with a text model (``text fit``), the free-text classes its graph maps (fixed at export).
        check: run the written graph in ONNX Runtime on two input sizes and compare with PyTorch (needs
            onnxruntime; skipped without it).

    Raises:
        ImportError: onnx or onnxscript missing. FileExistsError: ``dst`` exists and ``overwrite`` is false.
        ValueError: ``dst`` is not ``.onnx``, or the graph disagrees with PyTorch beyond float32 rounding.
    """
    from dinov3_eo.inference.writers import atomic_output, check_overwrite

    _require_onnx()
    import onnx

    dst = Path(dst)
    if dst.suffix.lower() != ".onnx":
        raise ValueError(f"An ONNX graph is written to a .onnx file, not {os.fspath(dst)!r}.")
    check_overwrite(dst, overwrite, inputs=[checkpoint])
    start = time.perf_counter()
    graph, metadata = onnx_graph_for(checkpoint, name=name, in_chans=in_chans, normalized_input=normalized_input,
                                     queries=queries)  # fmt: skip
    output_names = list(metadata["outputs"])
    p, odd = int(metadata["patch_size"]), int(metadata["side_multiple"]) == 1
    # batch 2 and unequal sides: an example of 1 or of equal sides would be fixed into the graph; a dense model is
    # traced on sides it must pad (traced on whole patches, the graph would leave its padding out for every size)
    example = _example(metadata, 2, 4 * p + (5 if odd else 0), 6 * p + (3 if odd else 0))
    dynamic = torch.export.Dim.DYNAMIC
    metadata["dinov3_eo_version"] = __import__("dinov3_eo").__version__
    with atomic_output(dst, overwrite=overwrite) as tmp:
        raw = tmp.with_name(tmp.name + ".raw.onnx")
        try:
            with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():  # the exporter narrates each step
                torch.onnx.export(graph, (example,), raw, dynamo=True, input_names=["image"], output_names=output_names,
                                  dynamic_shapes=({0: dynamic, 2: dynamic, 3: dynamic},))  # fmt: skip
            proto = onnx.load(raw)  # (with its weights, from a .data file beside it for a large model)
        finally:
            for part in raw.parent.glob(raw.name + "*"):
                part.unlink(missing_ok=True)
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(metadata)
        proto.producer_name = "dinov3_eo"
        large = proto.ByteSize() > _PROTO_LIMIT
        onnx.save(proto, tmp, save_as_external_data=large, location=f"{dst.name}.data" if large else None)
        difference = disagreement = None
        if check:
            difference, disagreement = _check_against_torch(tmp, graph, metadata)
    return OnnxExport(path=dst, metadata=metadata, max_difference=difference, class_disagreement=disagreement,
                      seconds=time.perf_counter() - start)  # fmt: skip


def _check_against_torch(path: Path, graph: nn.Module, metadata: dict[str, Any]) -> tuple[float | None, float | None]:
    """Run ``path`` in ONNX Runtime and ``graph`` in PyTorch on two input sizes other than the export's."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None, None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    p = int(metadata["patch_size"])
    multiple = int(metadata["side_multiple"])
    sizes = [(1, 3 * p, 5 * p), (3, 6 * p + (5 if multiple == 1 else 0), 2 * p + (3 if multiple == 1 else 0))]
    difference, disagreement = 0.0, None
    for batch, height, width in sizes:
        x = _example(metadata, batch, height, width)
        with torch.no_grad():
            expected = graph(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, {"image": x.numpy()})
        for want, have in zip(expected, got):
            want = want.numpy()
            if want.shape != have.shape:
                raise ValueError(f"The ONNX graph gives shape {have.shape} where PyTorch gives {want.shape} for an "
                                 f"input of {batch} x {height} x {width}; it was not kept.")  # fmt: skip
            if want.dtype == np.uint8:
                disagreement = max(disagreement or 0.0, float((want != have).mean()))
            else:
                scale = max(1.0, float(np.abs(want).max()))
                gap = float(np.abs(want - have).max())
                if not gap <= 1e-3 * scale:
                    raise ValueError(f"The ONNX graph differs from PyTorch by {gap:.3g} (outputs up to {scale:.3g}) "
                                     f"on an input of {batch} x {height} x {width}; it was not kept.")  # fmt: skip
                difference = max(difference, gap)
    return difference, disagreement


def read_onnx_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``dinov3_eo`` metadata of a graph written by :func:`export_onnx` (needs onnx; the weights are not read).

    Raises:
        ValueError: a graph without it.
    """
    _require_onnx()
    import onnx

    proto = onnx.load(os.fspath(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == ONNX_METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{os.fspath(path)} holds no {ONNX_METADATA_KEY!r} metadata: it was not written by dinov3-eo export --onnx.")


__all__ = ["BackboneGraph", "HeightGraph", "InputNormalization", "ONNX_KINDS", "ONNX_METADATA_KEY", "OnnxExport",
           "QueryGraph", "SegmentationGraph", "export_onnx", "onnx_graph_for", "read_onnx_metadata"]
