"""One embedding per image chip, as a table: the backbone's CLS token and the mean of its patch tokens.

A chip dataset (EuroSAT-style folders, exports of a labelling tool, a benchmark's JPEGs) is searched, clustered and
probed by chip, not by pixel: ``dinov3-eo embed "chips/*.jpg" --chips --model BACKBONE -o embeddings.parquet`` writes
one row per chip (``path``, ``height``, ``width``, ``cls``, ``patch_mean``), ready for a k-NN, a linear probe or a
similarity search in pandas or numpy. DINOv3's own linear probes read the normed CLS token, and its dino.txt image
embedding is the CLS token next to the mean of the patch tokens; both are kept. Chips are read with rasterio (any band
count, alpha and nodata respected), normalised as the backbone was trained, and resized to ``size`` x ``size``
(224 by default: a 64-px EuroSAT chip would otherwise be 4 x 4 patches) or kept at their own size.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3_eo.data.chips import ChipHeader, read_chip, read_chip_header
from dinov3_eo.data.datasets import expand_chips
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.inference.writers import atomic_output, check_overwrite

log = logging.getLogger(__name__)

#: the table formats :func:`write_chip_embeddings` writes
EMBEDDING_SUFFIXES = (".parquet", ".npz")
#: which embedding columns feed a probe or a search (each part L2-normalised, then concatenated; ``"image"``: the two
#: concatenated, then L2-normalised together, as dino.txt's image embedding, which zero-shot text probes compare)
FEATURES = ("cls", "patch_mean", "cls+patch_mean", "image")


@dataclass
class ChipEmbeddings:
    """Embeddings of ``N`` chips, row ``i`` being ``paths[i]``'s.

    Attributes:
        paths: the chips.
        cls: ``[N, D]`` float32 normed CLS tokens.
        patch_mean: ``[N, D]`` float32 means of the normed patch tokens over the patches that saw data (a row of NaN
            for a chip without any).
        sizes: ``[N, 2]`` int (height, width) of each chip as read, before any resize.
        metadata: how they were made (backbone, size, normalisation, bands).
    """

    paths: list[str]
    cls: np.ndarray
    patch_mean: np.ndarray
    sizes: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, paths: Sequence[str | os.PathLike[str]]) -> ChipEmbeddings:
        """The rows of ``paths``, in their order (repeats repeated): chips are embedded once each, in sorted order, and
        a label table lists them in its own.

        Raises:
            KeyError: a path that has no row (named).
        """
        row = {os.path.abspath(p): i for i, p in enumerate(self.paths)}
        try:
            index = np.array([row[os.path.abspath(p)] for p in paths], dtype=np.int64)
        except KeyError as e:
            raise KeyError(f"Chip {e.args[0]} has no embedding in this table.") from None
        return ChipEmbeddings(paths=[self.paths[i] for i in index], cls=self.cls[index], patch_mean=self.patch_mean[index],
                              sizes=self.sizes[index], metadata=dict(self.metadata))  # fmt: skip


def model_input_size(height: int, width: int, patch_size: int, size: int | None) -> tuple[int, int]:
    """The side lengths a chip is fed at: ``size`` x ``size``, or (``size`` = ``None``) its own rounded to the nearest
    multiple of the patch size (at least one patch)."""
    if size is not None:
        return size, size
    return tuple(max(patch_size, round(side / patch_size) * patch_size) for side in (height, width))  # type: ignore[return-value]


def embedding_input(pixels: np.ndarray, valid: np.ndarray, *, patch_size: int, normalization: Normalization | None,
                size: int | None = 224) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Pixels as the backbone reads them: normalised, no-data pixels 0, resized (bilinear, antialiased) to
    :func:`model_input_size`.

    Args:
        pixels: ``[C, H, W]`` raw values; valid: ``[H, W]`` bool, where they hold data.

    Returns:
        ``(image [C, H', W'] float32, patch_valid [H'/p, W'/p] bool)``: a patch is valid where any of its pixels
        holds data (validity resized nearest).
    """
    image = torch.from_numpy(np.asarray(pixels, dtype=np.float32))
    if normalization is not None:
        image = normalization(image)
    mask = torch.from_numpy(np.asarray(valid, dtype=bool))
    image = torch.nan_to_num(image).masked_fill_(~mask, 0.0)
    target = model_input_size(image.shape[1], image.shape[2], patch_size, size)
    if tuple(image.shape[1:]) != target:
        image = F.interpolate(image[None], size=target, mode="bilinear", align_corners=False, antialias=True)[0]
        mask = F.interpolate(mask[None, None].float(), size=target, mode="nearest")[0, 0] > 0.5
    h, w = target[0] // patch_size, target[1] // patch_size
    return image, mask.reshape(h, patch_size, w, patch_size).any(dim=3).any(dim=1)


def chip_model_input(header: ChipHeader, *, patch_size: int, normalization: Normalization | None,
                     bands: Sequence[int] | None = None, size: int | None = 224) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A chip (:func:`~dinov3_eo.data.chips.read_chip`) as the backbone reads it: :func:`embedding_input`."""
    pixels, valid = read_chip(header, bands)
    return embedding_input(pixels, valid, patch_size=patch_size, normalization=normalization, size=size)


@torch.inference_mode()
def embed_batch(backbone: nn.Module, inputs: Sequence[tuple[Tensor, Tensor]], *, device: str | torch.device = "cpu",
                amp: bool = False, view: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The normed CLS token and the mean normed patch token over the valid patches of model inputs of one size
    (:func:`embedding_input`), through ``backbone.forward_features`` (in whatever mode the backbone is); ``view`` turns
    and mirrors the inputs first (:func:`~dinov3_eo.inference.tta.dihedral`, 0..7; test-time augmentation).

    Returns:
        ``(cls [B, D], patch_mean [B, D])`` float32; a ``patch_mean`` row is NaN where no patch is valid.
    """
    from dinov3_eo.inference.tta import dihedral

    x = dihedral(torch.stack([image for image, _ in inputs]), view).to(device)
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
        out = backbone.forward_features(x)
    tokens = out["x_norm_patchtokens"].float().cpu()  # [B, h*w, D]
    valid = dihedral(torch.stack([v for _, v in inputs]), view).flatten(1).float()  # [B, h*w], in the tokens' order
    counts = valid.sum(dim=1, keepdim=True)
    means = (tokens * valid[..., None]).sum(dim=1) / counts.clamp(min=1)
    means[counts[:, 0] == 0] = float("nan")
    return out["x_norm_clstoken"].float().cpu().numpy(), means.numpy()


def _batches(headers: Sequence[ChipHeader], patch_size: int, size: int | None, batch_size: int) -> Iterator[list[int]]:
    """Indices of consecutive chips fed at one size, at most ``batch_size`` together (so they stack)."""
    batch: list[int] = []
    for i, header in enumerate(headers):
        shape = model_input_size(header.height, header.width, patch_size, size)
        if batch and (len(batch) == batch_size or shape != model_input_size(headers[batch[0]].height,
                                                                          headers[batch[0]].width, patch_size, size)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


class ChipBackbone(NamedTuple):
    """A backbone ready to embed chips (:func:`load_chip_backbone`): the model on its device, its input
    normalisation, and how it was named, so that more chips can be embedded alike."""

    model: nn.Module
    normalization: Normalization | None
    device: str
    source: str
    normalization_override: str | None


def load_chip_backbone(source: str | os.PathLike[str], *, normalization: str | None = None,
                       device: str | None = None) -> ChipBackbone:  # fmt: skip
    """The backbone ``source`` names (:func:`~dinov3_eo.tasks.features.resolve_backbone`: a registry name, an
    export, a segmentation checkpoint; a text model's image side as
    :func:`~dinov3_eo.tasks.chip_classification.text_image_backbone`) on ``device`` (default: cuda when available), with its stored input
    normalisation, or the preset ``normalization`` names (``"none"`` for raw values). ``source`` is recorded as an
    absolute path when it is a file.

    Raises:
        FileNotFoundError: ``source`` is neither a registered name nor a file. ValueError: no normalisation is known.
    """
    from dinov3_eo.models.hub import is_text_model
    from dinov3_eo.tasks.features import input_normalization, resolve_backbone

    text = os.fspath(source)
    if Path(text).is_file() and is_text_model(text):  # chips through a text model: dino.txt's image embedding
        from dinov3_eo.tasks.chip_classification import text_image_backbone

        return text_image_backbone(text, normalization=normalization, device=device)
    model = resolve_backbone(text)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    norm = input_normalization(getattr(model, "meta", None), normalization)
    recorded = os.path.abspath(text) if Path(text).exists() else text
    return ChipBackbone(model.to(device), norm, device, recorded, normalization)


def embed_chips_with(backbone: ChipBackbone, chips: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                     bands: Sequence[int] | None = None, size: int | None = 224, batch_size: int = 32,
                     amp: bool = False, progress: bool = True) -> ChipEmbeddings:  # fmt: skip
    """:func:`embed_chips` through a loaded backbone, its normalisation and device; the table's metadata also
    records ``backbone_source`` and ``normalization_override`` (how ``similar --chips`` embeds its examples alike)."""
    embeddings = embed_chips(backbone.model, chips, normalization=backbone.normalization, bands=bands, size=size,
                             batch_size=batch_size, device=backbone.device, amp=amp, progress=progress)  # fmt: skip
    embeddings.metadata.update(backbone_source=backbone.source, normalization_override=backbone.normalization_override)
    return embeddings


def embed_chips(
    backbone: nn.Module,
    chips: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    size: int | None = 224,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    view: int = 0,
) -> ChipEmbeddings:
    """The CLS token and mean patch token of every chip (:func:`chip_model_input`, then ``forward_features``).

    Args:
        backbone: a ViT with ``forward_features`` (``x_norm_clstoken``, ``x_norm_patchtokens``) and ``patch_size``.
        chips: files, folders (recursive) or globs of JPEG/PNG/TIFF chips, georeferenced or not.
        normalization: applied to the raw values (``None``: fed as read).
        bands: 1-based bands fed to the backbone (default: all).
        size: chips are resized to ``size`` x ``size``; ``None`` keeps each at its own size (rounded to the patch
            size), chips of one size batched together.
        batch_size: chips per forward pass.
        amp: bf16 autocast (returned as float32 either way).
        view: each chip turned and mirrored first (:func:`~dinov3_eo.inference.tta.dihedral`, 0..7: test-time
            augmentation; 0 = as it is).

    Raises:
        FileNotFoundError: no chip. ValueError: an unreadable chip, or one whose band count is not the backbone's
        (each named).
    """
    return embed_chip_views(backbone, chips, views=(view,), normalization=normalization, bands=bands, size=size,
                            batch_size=batch_size, device=device, amp=amp, progress=progress)[0]  # fmt: skip


def embed_chip_views(
    backbone: nn.Module,
    chips: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    views: Sequence[int],
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    size: int | None = 224,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
) -> list[ChipEmbeddings]:
    """:func:`embed_chips` for each of ``views`` (turned and mirrored chips, test-time augmentation), each chip read
    and prepared once: one :class:`ChipEmbeddings` per view, in the order of ``views``."""
    from tqdm.auto import tqdm

    paths = expand_chips(chips if isinstance(chips, (str, os.PathLike)) else [os.fspath(c) for c in chips])
    headers = [read_chip_header(p) for p in tqdm(paths, desc="chip headers", unit="chip", disable=not progress or len(paths) < 1000)]
    patch = int(backbone.patch_size)
    in_chans = int(backbone.patch_embed.proj.weight.shape[1])
    for header in headers:
        count = len(bands) if bands is not None else header.bands
        if count != in_chans:
            raise ValueError(f"Image chip {header.path} gives {count} bands but the backbone takes {in_chans}; "
                             "select bands with --bands.")  # fmt: skip
    dim = int(backbone.embed_dim)
    cls = np.zeros((len(views), len(paths), dim), dtype=np.float32)
    patch_mean = np.full((len(views), len(paths), dim), np.nan, dtype=np.float32)
    was_training = backbone.training
    backbone.eval()
    bar = tqdm(total=len(paths), unit="chip", desc="chip embeddings", disable=not progress)
    try:
        for batch in _batches(headers, patch, size, batch_size):
            inputs = [chip_model_input(headers[i], patch_size=patch, normalization=normalization, bands=bands,
                                       size=size) for i in batch]  # fmt: skip
            for v, view in enumerate(views):
                cls[v, batch], patch_mean[v, batch] = embed_batch(backbone, inputs, device=device, amp=amp, view=view)
            bar.update(len(batch))
    finally:
        bar.close()
        backbone.train(was_training)
    empty = int(np.isnan(patch_mean[0, :, 0]).sum()) if len(views) else 0
    if empty:
        log.warning("%d of %d chips have no pixel with data (first: %s): their patch_mean is NaN.", empty, len(paths),
                    paths[int(np.flatnonzero(np.isnan(patch_mean[0, :, 0]))[0])])  # fmt: skip
    meta = getattr(backbone, "meta", None)
    metadata = {"backbone": getattr(meta, "name", getattr(backbone, "name", "custom")), "size": size,
                "normalization": normalization.name if normalization is not None else None,
                "bands": list(bands) if bands is not None else None, "embed_dim": dim, "patch_size": patch}  # fmt: skip
    sizes = np.array([(h.height, h.width) for h in headers], dtype=np.int64).reshape(-1, 2)
    return [ChipEmbeddings(paths=list(paths), cls=cls[v], patch_mean=patch_mean[v], sizes=sizes.copy(),
                           metadata=dict(metadata)) for v in range(len(views))]  # fmt: skip


def chip_features(embeddings: ChipEmbeddings, features: str = "cls+patch_mean") -> np.ndarray:
    """``[N, D]`` (or ``[N, 2D]``) float32 classifier inputs: the chosen embeddings, each L2-normalised (a chip
    without data, NaN ``patch_mean``, gets zeros there); ``"image"``: ``cls`` and ``patch_mean`` concatenated, then
    L2-normalised together.

    Raises:
        ValueError: an unknown ``features``.
    """
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got {features!r}.")
    if features == "image":
        x = np.nan_to_num(np.concatenate([embeddings.cls, embeddings.patch_mean], axis=1).astype(np.float32))
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    parts = []
    for name in features.split("+"):
        x = np.nan_to_num(getattr(embeddings, name).astype(np.float32))
        parts.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return np.concatenate(parts, axis=1)


def write_chip_embeddings(embeddings: ChipEmbeddings, dst: str | os.PathLike[str], *, overwrite: bool = False,
                          columns: Mapping[str, np.ndarray] | None = None, geometry: Sequence[Any] | None = None,
                          crs: Any = None) -> Path:  # fmt: skip
    """``embeddings`` as a table, written atomically: ``.parquet`` (columns ``path``, ``height``, ``width``, ``cls`` and
    ``patch_mean`` as fixed-size float32 lists; the metadata in the schema's ``dinov3_eo`` key) or ``.npz`` (arrays
    ``paths``, ``sizes``, ``cls``, ``patch_mean`` and ``metadata``, a JSON string).

    ``columns`` adds ``[N]`` columns (arrays of the npz). ``geometry`` (shapely geometries, one per row, in ``crs``)
    makes the Parquet table a GeoParquet one (a WKB ``geometry`` column and the ``geo`` metadata of GeoParquet 1.0):
    ``geopandas.read_parquet`` reads it as a ``GeoDataFrame`` of footprints with their embeddings.

    Raises:
        ValueError: another suffix, or ``geometry`` for an ``.npz``. FileExistsError: ``dst`` exists and ``overwrite``
        is false.
    """
    dst = Path(dst)
    if dst.suffix.lower() not in EMBEDDING_SUFFIXES:
        raise ValueError(f"Chip embeddings are written as {' or '.join(EMBEDDING_SUFFIXES)}, not {str(dst)!r}.")
    if geometry is not None and dst.suffix.lower() != ".parquet":
        raise ValueError(f"Footprints are written in a GeoParquet table (.parquet), not {str(dst)!r}.")
    check_overwrite(dst, overwrite, inputs=embeddings.paths)
    meta = json.dumps(embeddings.metadata)
    extra = {name: np.asarray(values) for name, values in (columns or {}).items()}
    with atomic_output(dst, overwrite=overwrite) as tmp:
        if dst.suffix.lower() == ".npz":
            with open(tmp, "wb") as f:  # (np.savez given a path would add its own .npz)
                np.savez(f, paths=np.array(embeddings.paths), sizes=embeddings.sizes, cls=embeddings.cls,
                         patch_mean=embeddings.patch_mean, metadata=np.array(meta), **extra)  # fmt: skip
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            dim = embeddings.cls.shape[1]
            vectors = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1), pa.float32()), dim)  # noqa: E731
            table = pa.table({"path": pa.array(embeddings.paths, pa.string()),
                              "height": pa.array(embeddings.sizes[:, 0], pa.int32()),
                              "width": pa.array(embeddings.sizes[:, 1], pa.int32()),
                              **{name: pa.array(values) for name, values in extra.items()},
                              "cls": vectors(embeddings.cls), "patch_mean": vectors(embeddings.patch_mean)})  # fmt: skip
            schema = {"dinov3_eo": meta}
            if geometry is not None:
                table, schema["geo"] = _with_geometry(table, geometry, crs)
            pq.write_table(table.replace_schema_metadata(schema), tmp)
    return dst


def _with_geometry(table: Any, geometry: Sequence[Any], crs: Any) -> tuple[Any, str]:
    """``table`` with a WKB ``geometry`` column, and the GeoParquet 1.0 ``geo`` metadata describing it (the CRS as
    PROJJSON, the geometry types, the bounding box)."""
    import pyarrow as pa
    import shapely
    from pyproj import CRS

    geoms = np.asarray(geometry, dtype=object)
    column = {"encoding": "WKB", "geometry_types": sorted({g.geom_type for g in geoms}),
              "bbox": list(shapely.total_bounds(geoms)) if len(geoms) else []}  # fmt: skip
    if crs is not None:
        column["crs"] = CRS.from_user_input(crs).to_json_dict()
    geo = {"version": "1.0.0", "primary_column": "geometry", "columns": {"geometry": column}}
    return table.append_column("geometry", pa.array(shapely.to_wkb(geoms), pa.binary())), json.dumps(geo)


def read_chip_embeddings(path: str | os.PathLike[str]) -> ChipEmbeddings:
    """A table :func:`write_chip_embeddings` wrote (``.parquet`` or ``.npz``).

    Raises:
        FileNotFoundError: no such file. ValueError: another suffix, or a table without the columns it writes (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Chip embedding table {str(path)!r} does not exist ('embed --chips' or 'embed --tiles' writes one).")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            missing = {"paths", "sizes", "cls", "patch_mean"} - set(data.files)
            if missing:
                raise ValueError(f"{str(path)!r} lacks the arrays {sorted(missing)} of a chip embedding table.")
            meta = json.loads(str(data["metadata"])) if "metadata" in data.files else {}
            return ChipEmbeddings(paths=[str(p) for p in data["paths"]], cls=data["cls"], patch_mean=data["patch_mean"],
                                  sizes=data["sizes"], metadata=meta)  # fmt: skip
    if path.suffix.lower() != ".parquet":
        raise ValueError(f"Chip embeddings are read from {' or '.join(EMBEDDING_SUFFIXES)}, not {str(path)!r}.")
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = {"path", "height", "width", "cls", "patch_mean"} - set(table.column_names)
    if missing:
        raise ValueError(f"{str(path)!r} lacks the columns {sorted(missing)} of a chip embedding table.")
    vectors = lambda name: np.asarray(table[name].combine_chunks().flatten(), dtype=np.float32).reshape(table.num_rows, -1)  # noqa: E731
    meta = (table.schema.metadata or {}).get(b"dinov3_eo")
    return ChipEmbeddings(
        paths=table["path"].to_pylist(), cls=vectors("cls"), patch_mean=vectors("patch_mean"),
        sizes=np.stack([table["height"].to_numpy(), table["width"].to_numpy()], axis=1).astype(np.int64),
        metadata=json.loads(meta) if meta else {},
    )  # fmt: skip


def read_table_footprints(path: str | os.PathLike[str]) -> Any:
    """The footprints of a GeoParquet embedding table (``embed --tiles``) as a ``geopandas.GeoSeries`` indexed by
    ``path``, or ``None`` for a table without them (``embed --chips``, ``.npz``)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix.lower() != ".parquet" or b"geo" not in (pq.read_schema(path).metadata or {}):
        return None
    import geopandas as gpd

    frame = gpd.read_parquet(path, columns=["path", "geometry"])
    return frame.set_index("path").geometry


def cosine_to_mean(bank: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """``[N]``: the cosine similarity of each row of ``bank`` ``[N, D]`` to the mean of ``examples`` ``[M, D]`` (a
    query by several examples); NaN rows of ``bank`` give NaN."""
    query = np.asarray(examples, np.float64).mean(axis=0)
    bank = np.asarray(bank, np.float64)
    return bank @ (query / max(float(np.linalg.norm(query)), 1e-12)) / np.maximum(np.linalg.norm(bank, axis=1), 1e-12)


def nearest_chips(table: ChipEmbeddings, examples: ChipEmbeddings, *, k: int = 20,
                  features: str = "cls+patch_mean") -> list[tuple[str, float]]:  # fmt: skip
    """The ``k`` chips of ``table`` most like the ``examples`` (one chip, or several: their mean), by cosine
    similarity of :func:`chip_features`, most similar first; the examples themselves are left out.

    Returns:
        ``[(path, similarity)]``.
    """
    similarity = cosine_to_mean(chip_features(table, features), chip_features(examples, features))
    shown = {os.path.realpath(p) for p in examples.paths}
    order = [i for i in np.argsort(-similarity, kind="stable") if os.path.realpath(table.paths[i]) not in shown]
    return [(table.paths[i], float(similarity[i])) for i in order[:k]]


__all__ = [
    "FEATURES",
    "ChipBackbone",
    "ChipEmbeddings",
    "chip_features",
    "chip_model_input",
    "cosine_to_mean",
    "embed_batch",
    "embed_chips",
    "embed_chip_views",
    "embed_chips_with",
    "load_chip_backbone",
    "embedding_input",
    "model_input_size",
    "nearest_chips",
    "read_chip_embeddings",
    "read_table_footprints",
    "write_chip_embeddings",
]
