"""A tile probe fitted and scored straight from scenes and their labels (polygons or a label raster), no chips cut.

``dinov3-eo classify fit --scenes scene.tif --labels polygons.gpkg --tile-size 32 --model M -o probe.safetensors``
labels the scene's tiles (:func:`~dinov3_eo.tasks.tile_labels.label_tiles`: the grid ``classify map`` classifies),
embeds the labelled ones (:func:`~dinov3_eo.tasks.tile_classification.embed_tiles`, exactly as ``classify map`` will
embed them) and fits a linear probe or k-NN on them (:func:`~dinov3_eo.tasks.chip_classification.fit_chip_classifier`)
with ``C`` chosen on held-out blocks of tiles (:func:`~dinov3_eo.tasks.tile_labels.spatial_block_split`), or on the
tiles of separate held-out labels. ``classify test --scenes scene.tif --labels reference.gpkg --probe P`` scores a
probe on the tiles a reference labels. The probe is the same file a chip probe is: ``classify map``, ``predict`` and
``test`` take it unchanged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from dinov3_eo.tasks.chip_classification import ChipClassifier, fit_chip_classifier, probe_backbone
from dinov3_eo.tasks.chip_embeddings import ChipBackbone, ChipEmbeddings, chip_features, load_chip_backbone
from dinov3_eo.tasks.tile_labels import (
    NoLabelledTiles,
    TileLabels,
    label_tiles,
    majority_classes,
    merge_tile_labels,
    present_classes,
    spatial_block_split,
    tiles_of_scenes,
)

log = logging.getLogger(__name__)


@dataclass
class TileProbeFit:
    """What :func:`fit_tile_classifier` made.

    Attributes:
        probe: the fitted probe (its ``embedding`` records the backbone, bands, model input size and the tile size as
            ``chip_size``, so that ``classify map`` cuts the same tiles by default).
        tiles: one ``GeoDataFrame`` row per tile fitted or held out (in the first scene's CRS): ``scene``, ``row``,
            ``col``, ``tile_size``, ``labelled``, ``majority``, ``purity``, ``label`` (the class it was taught, or its classes
            joined by ``;``), ``split`` (``train`` / ``held_out``).
        held_out_scores: ``[M, K]`` the probe's probabilities for the held-out tiles (``None`` without any).
        held_out_targets: their class ids ``[M]`` (``[M, K]`` bool multi-label).
        targets: the class ids (``[N, K]`` bool) of all the tiles, in the order of ``tiles``.
    """

    probe: ChipClassifier
    tiles: Any
    held_out_scores: np.ndarray | None
    held_out_targets: np.ndarray | None
    targets: np.ndarray | None = None


class TileScores(NamedTuple):
    """What :func:`score_tile_classifier` returns."""

    scores: np.ndarray
    """``[N, K]`` the probe's class probabilities of the labelled tiles."""
    targets: np.ndarray
    """``[N]`` the reference's class ids (the probe's numbering), ``[N, K]`` bool for a multi-label probe."""
    tiles: Any
    """a ``GeoDataFrame`` of the tiles (first scene's CRS): ``scene``, ``name`` (``"<scene>#<row>,<col>"``), ``row``,
    ``col``, ``tile_size``, ``labelled``, ``majority``, ``purity``, ``reference``, ``predicted``, ``score``, ``correct``,
    ``p_<class>``."""


def _scene_labels(scenes: Sequence[str | os.PathLike[str]], labels: Any, *, tile_size: int,
                  **kwargs: Any) -> list[TileLabels]:  # fmt: skip
    """:func:`label_tiles` of each scene (:func:`tiles_of_scenes`); where several are missed, the first miss raised."""
    found, missed = tiles_of_scenes(label_tiles, scenes, labels, tile_sizes=[tile_size] * len(scenes), **kwargs)
    if not found:
        raise missed[0]
    return found


def _targets(counts: np.ndarray, *, multi_label: bool, purity: float, presence: float) -> tuple[np.ndarray, np.ndarray]:
    """``(kept [N] bool, targets)`` of tiles with class counts ``[N, K]``: class ids of the tiles whose majority
    class covers ``purity`` of their labelled pixels (:func:`majority_classes`), or ``[N, K]`` bool of the classes
    covering ``presence`` (:func:`present_classes`; a tile with none is not kept)."""
    if multi_label:
        present = present_classes(counts, presence)
        return present.any(axis=1), present
    return majority_classes(counts, purity)


def _label_text(target: np.ndarray, classes: Sequence[str], multi_label: bool) -> str:
    return ";".join(c for c, on in zip(classes, target) if on) if multi_label else classes[int(target)]


def fit_tile_classifier(
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    labels: Any,
    backbone: ChipBackbone | str | os.PathLike[str] | None,
    *,
    tile_size: int,
    embeddings: ChipEmbeddings | None = None,
    attribute: str = "name",
    class_names: Sequence[str] | None = None,
    val_labels: Any = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    size: int | None = 224,
    method: str = "linear",
    features: str = "cls+patch_mean",
    purity: float = 0.6,
    min_labelled: float = 0.5,
    min_valid: float = 0.9,
    multi_label: bool = False,
    presence: float = 0.1,
    threshold: float = 0.5,
    val_fraction: float = 0.2,
    block: int = 4,
    balanced: bool = False,
    k: int = 20,
    seed: int = 0,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    progress: bool = True,
) -> TileProbeFit:
    """Fit a chip probe on the tiles of ``scenes`` that ``labels`` label.

    Args:
        scenes: georeferenced scenes (one or several; tiles of all are fitted together).
        labels: polygons or a label raster over them (:func:`~dinov3_eo.tasks.tile_labels.label_tiles`; ``attribute``
            names the polygons' class column, ``class_names`` a raster's ids).
        backbone: a :class:`~dinov3_eo.tasks.chip_embeddings.ChipBackbone` or a source for
            :func:`~dinov3_eo.tasks.chip_embeddings.load_chip_backbone` (``None`` with ``embeddings``).
        tile_size: tile side in scene pixels (the ground a tile covers is what the probe learns to name).
        embeddings: a table of the scenes' tiles from ``embed --tiles`` (:func:`~dinov3_eo.tasks.tile_classification.write_tile_embeddings`):
            its rows are used, nothing is embedded, and its backbone, bands, size and normalisation hold.
        val_labels: held-out labels over the same scenes (their tiles are left out of training); default: blocks of
            ``block`` x ``block`` tiles, ``val_fraction`` of them, held out (:func:`spatial_block_split`; 0: none).
        bands, nodata, size, batch_size, device, amp: as for :func:`~dinov3_eo.tasks.tile_classification.embed_tiles`.
        method, features, balanced, k, threshold: as for
            :func:`~dinov3_eo.tasks.chip_classification.fit_chip_classifier`.
        purity: a tile is taught its most common class where that class covers at least this share of its labelled
            pixels. multi_label, presence: instead, every class covering ``presence`` of them.
        min_labelled: the share of a tile's pixels that must be labelled; min_valid: the share that must hold data.

    Raises:
        FileNotFoundError, KeyError, ValueError: as :func:`label_tiles` and :func:`embed_tiles` (each in one
        sentence); ValueError also where fewer than two classes (single-label) keep training tiles.
    """
    scenes = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}.")
    if not 0.0 < purity <= 1.0 or not 0.0 < presence <= 1.0:
        raise ValueError(f"purity and presence must lie in (0, 1], got {purity} and {presence}.")
    if block < 1:
        raise ValueError(f"The held-out block must be at least one tile wide, got {block}.")
    common = dict(tile_size=tile_size, attribute=attribute, class_names=class_names, min_labelled=min_labelled)
    train_sets = _scene_labels(scenes, labels, **common)
    held_sets = _scene_labels([t.source for t in train_sets], val_labels, **common) if val_labels is not None else []
    classes, train_counts = merge_tile_labels(train_sets + held_sets)
    held_counts = train_counts[len(train_sets) :]
    train_counts = train_counts[: len(train_sets)]
    embedder = TileEmbedder.make(embeddings, backbone, tile_size=tile_size, bands=bands, size=size, device=device)
    bands, size, source, override = embedder.bands, embedder.size, embedder.source, embedder.override

    # every tile: (scene index, TileLabels row, counts, held out) — labelled, then embedded where it holds data
    sources = [t.source for t in train_sets]
    held_cells = {t.source: set(t.cells) for t in held_sets}  # a tile both label sets reach is held out
    parts = []
    for i, (tiles, counts) in enumerate(zip(train_sets, train_counts)):
        keep = np.array([cell not in held_cells.get(tiles.source, ()) for cell in tiles.cells], bool)
        parts.append((i, tiles.take(keep), counts[keep], False))
    for tiles, counts in zip(held_sets, held_counts):
        parts.append((sources.index(tiles.source), tiles, counts, True))
    x, counts, held, rows_meta, made = _embed_labelled(parts, embedder, tile_size=tile_size, features=features,
                                                       multi_label=multi_label, purity=purity, presence=presence,
                                                       nodata=nodata, min_valid=min_valid, batch_size=batch_size,
                                                       amp=amp, progress=progress)  # fmt: skip
    if not len(x):
        raise ValueError(f"No labelled {tile_size}-px tile of {', '.join(map(str, scenes))} is pure enough (purity "
                         f"{purity:.0%}) and holds data on {min_valid:.0%} of its pixels; lower --purity or --min-valid.")  # fmt: skip
    _, y = _targets(counts, multi_label=multi_label, purity=purity, presence=presence)
    # classes no training tile was taught are dropped (a probe cannot learn them)
    taught = (y[~held].any(axis=0) if multi_label else np.bincount(y[~held], minlength=len(classes)) > 0)
    if not multi_label and taught.sum() < 2:
        raise ValueError(f"The training tiles hold {int(taught.sum())} class ({[c for c, t in zip(classes, taught) if t]}); "
                         "a classifier needs at least two: label more ground, or lower --purity.")  # fmt: skip
    dropped = [c for c, t in zip(classes, taught) if not t]
    if dropped:
        log.warning("Classes %s have no training tile (too mixed, too small or only held out) and are left out.", dropped)
    new_id = np.cumsum(taught) - 1
    classes = [c for c, t in zip(classes, taught) if t]
    if multi_label:
        y = y[:, taught]
    else:
        usable = taught[y]  # held-out tiles of an untaught class cannot be scored
        x, y, held = x[usable], new_id[y[usable]], held[usable]
        rows_meta = _take_rows(rows_meta, usable)
    groups = np.concatenate([np.full(len(t), i) for i, t in rows_meta])
    rows = np.concatenate([t.rows for _, t in rows_meta])
    cols = np.concatenate([t.cols for _, t in rows_meta])
    if val_labels is None and val_fraction > 0:
        _, held_idx = spatial_block_split(rows, cols, y, fraction=val_fraction, block=block, groups=groups, seed=seed)
        held = np.zeros(len(y), bool)
        held[held_idx] = True
    train = ~held
    val = (x[held], y[held]) if held.any() else None
    probe = fit_chip_classifier(x[train], y[train], classes, method=method, features=features, val=val, k=k,
                                threshold=threshold, balanced=balanced)  # fmt: skip
    probe.embedding = {"backbone_source": source, "size": size, "bands": list(bands) if bands is not None else None,
                       "normalization": override, "backbone": made.get("backbone"),
                       "chip_size": [int(tile_size), int(tile_size)], "tile_m": tile_ground(train_sets, tile_size),
                       "tiles": {"scenes": [os.fspath(s) for s in scenes], "labels": describe_labels(labels),
                                 "val_labels": describe_labels(val_labels), "attribute": attribute, "purity": purity,
                                 "presence": presence if multi_label else None, "min_labelled": min_labelled,
                                 "min_valid": min_valid, "block": block, "val_fraction": val_fraction,
                                 "train_tiles": int(train.sum()), "held_out_tiles": int(held.sum())}}  # fmt: skip
    scores = probe.scores(x[held]) if held.any() else None

    frames, start = [], 0
    for index, tiles in rows_meta:
        part = slice(start, start + len(tiles))
        start += len(tiles)
        frame = tiles.to_geodataframe({"scene": [os.fspath(tiles.source)] * len(tiles),
                                       "label": [_label_text(t, classes, multi_label) for t in y[part]],
                                       "split": np.where(held[part], "held_out", "train")})  # fmt: skip
        frames.append(frame.drop(columns=[c for c in frame.columns if c.startswith("f_")]))
    return TileProbeFit(probe=probe, tiles=one_frame(frames), held_out_scores=scores,
                        held_out_targets=y[held] if held.any() else None, targets=y)  # fmt: skip


@dataclass
class TileEmbedder:
    """How a fit on scenes gets its tiles' embeddings: a backbone embeds them (:func:`embed_tiles`), or the rows of an
    ``embed --tiles`` table are read (its backbone, bands, input size and normalisation then hold). Build it with
    :meth:`make`."""

    backbone: ChipBackbone | None
    table: ChipEmbeddings | None
    bands: list[int] | None
    size: int | None
    source: str | None
    override: str | None

    @classmethod
    def make(cls, table: ChipEmbeddings | None, backbone: ChipBackbone | str | os.PathLike[str] | None, *,
             tile_size: int, bands: Sequence[int] | None, size: int | None, device: str | None) -> TileEmbedder:  # fmt: skip
        """From ``table`` (checked to hold ``tile_size``-px tiles) or else ``backbone`` (loaded if a source).

        Raises:
            ValueError: the table holds tiles of another size.
        """
        if table is not None:
            recorded = table.metadata.get("tile_size")
            if recorded is not None and int(recorded) != int(tile_size):
                raise ValueError(f"The embedding table holds {recorded}-px tiles, not {tile_size}-px ones; embed the "
                                 f"scenes again with --tiles {tile_size}, or fit {recorded}-px tiles.")  # fmt: skip
            info = table.metadata
            return cls(None, table, info.get("bands"), info.get("size"), info.get("backbone_source"),
                       info.get("normalization_override"))  # fmt: skip
        if not isinstance(backbone, ChipBackbone):
            backbone = load_chip_backbone(backbone, device=device)
        return cls(backbone, None, list(bands) if bands is not None else None, size, backbone.source,
                   backbone.normalization_override)  # fmt: skip

    def embed(self, tiles: Any, *, tile_size: int, **embedding: Any) -> tuple[ChipEmbeddings, np.ndarray]:
        """The embeddings of ``tiles`` (anything with ``source`` and ``cells``) and ``[N]`` bool, which were taken
        (held data on ``min_valid`` of their pixels, or are rows of the table); ``embedding``: the other arguments
        of :func:`embed_tiles` (ignored for a table, whose own ``min_valid`` held when it was made)."""
        if self.table is not None:
            return tile_table_rows(self.table, tiles)
        from dinov3_eo.tasks.tile_classification import embed_tiles

        return embed_tiles(tiles.source, self.backbone, tiles.cells, tile_size=tile_size, bands=self.bands,
                           size=self.size, **embedding)  # fmt: skip


def _embed_labelled(parts: Sequence[tuple[int, TileLabels, np.ndarray, bool]], embedder: TileEmbedder, *,
                    tile_size: int, features: str, multi_label: bool, purity: float, presence: float,
                    **embedding: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, TileLabels]], dict]:  # fmt: skip
    """The features of the tiles of ``parts`` ((scene index, tiles, their class counts, held out)) that carry a label
    (:func:`_targets`) and hold data (:meth:`TileEmbedder.embed`): ``(x [N, F], counts [N, K], held out [N], (scene
    index, tiles) per part kept, the embeddings' metadata)``."""
    xs, kept_counts, held_flags, kept_tiles, made = [], [], [], [], {}
    for index, tiles, counts, held in parts:
        kept, _ = _targets(counts, multi_label=multi_label, purity=purity, presence=presence)
        tiles, counts = tiles.take(kept), counts[kept]
        if not len(tiles):
            continue
        embedded, taken = embedder.embed(tiles, tile_size=tile_size, **embedding)
        made = embedded.metadata
        if taken.any():
            xs.append(chip_features(embedded, features))
            kept_counts.append(counts[taken])
            held_flags.append(np.full(int(taken.sum()), held))
            kept_tiles.append((index, tiles.take(taken)))
    if not xs:
        return np.zeros((0, 0)), np.zeros((0, 0), np.int64), np.zeros(0, bool), [], made
    return np.concatenate(xs), np.concatenate(kept_counts), np.concatenate(held_flags), kept_tiles, made


def tile_table_rows(table: ChipEmbeddings, tiles: Any) -> tuple[ChipEmbeddings, np.ndarray]:
    """The rows of an ``embed --tiles`` table for ``tiles`` (matched by scene file and cell), and ``[N]`` bool, which
    the table holds (it leaves out tiles without enough data)."""
    index = {}
    for i, path in enumerate(table.paths):
        scene, _, cell = path.rpartition("#")
        index[(os.path.abspath(scene), cell)] = i
    scene = os.path.abspath(tiles.source)
    rows = [index.get((scene, f"{r},{c}"), -1) for r, c in tiles.cells]
    taken = np.array([i >= 0 for i in rows], bool)
    return table.take([table.paths[i] for i in rows if i >= 0]), taken


def tile_ground(tiles: Sequence[TileLabels], tile_size: int) -> float | None:
    """The side in metres of the tiles of the scenes ``tiles`` were labelled on (the first scene's pixel size; ``None``
    for a CRS in degrees), which ``classify map`` turns into a tile size in any scene's pixels; a warning where the
    scenes' pixel sizes differ, since a tile of ``tile_size`` pixels then covers different ground in each."""
    from dinov3_eo.data.raster import pixel_size_m

    pixels = [pixel_size_m(t.crs, t.transform) for t in tiles]
    if any(p is None for p in pixels):
        return None
    if max(pixels) > 1.01 * min(pixels):
        log.warning("The scenes' pixels are %s m: a %d-px tile covers %s m of ground in each. The probe records the "
                    "first scene's (%.1f m).", sorted({round(p, 2) for p in pixels}), tile_size,
                    sorted({round(p * tile_size, 1) for p in pixels}), pixels[0] * tile_size)  # fmt: skip
    return float(pixels[0] * tile_size)


def _take_rows(rows_meta: list[tuple[int, TileLabels]], mask: np.ndarray) -> list[tuple[int, TileLabels]]:
    """``rows_meta``'s tiles where ``mask`` (over all of them, in order) holds."""
    out, start = [], 0
    for index, tiles in rows_meta:
        out.append((index, tiles.take(mask[start : start + len(tiles)])))
        start += len(tiles)
    return out


def describe_labels(labels: Any) -> str | None:
    """How a fit records its labels (or reference values): the file's absolute path, ``"GeoDataFrame"``, or ``None``."""
    if labels is None:
        return None
    if isinstance(labels, (list, tuple)):
        return ";".join(os.path.abspath(os.fspath(item)) for item in labels)
    return "GeoDataFrame" if hasattr(labels, "geometry") else os.path.abspath(os.fspath(labels))


def score_tile_classifier(
    probe: ChipClassifier | str | os.PathLike[str],
    scenes: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    labels: Any,
    *,
    backbone: ChipBackbone | str | os.PathLike[str] | None = None,
    tile_size: int | None = None,
    attribute: str = "name",
    class_names: Sequence[str] | None = None,
    purity: float = 0.6,
    min_labelled: float = 0.5,
    min_valid: float = 0.9,
    presence: float = 0.1,
    nodata: float | None = None,
    tta: str | None = None,
    threshold: float | None = None,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    progress: bool = True,
) -> TileScores:
    """A probe's class probabilities for the tiles of ``scenes`` that reference ``labels`` label (as
    :func:`fit_tile_classifier` labels them; tile size by default the probe's), to score it.

    Reference classes are matched to the probe's by name (case-insensitive); tiles of a class the probe lacks are
    left out with a warning.

    Returns:
        :class:`TileScores`: the probabilities, the reference's targets and a ``GeoDataFrame`` of the tiles (with
        ``reference``, ``predicted`` — classes joined by ``;`` for a multi-label probe, at ``threshold``, default the
        probe's — ``score``, ``correct`` and ``p_<class>``): where the probe errs, on a map.

    Raises:
        ValueError: no reference class is one of the probe's, or no tile is left to score.
    """
    from dinov3_eo.tasks.chip_classification import predicted_labels
    from dinov3_eo.tasks.tile_classification import classify_tiles, probe_tile_size, tile_grid_shape, tile_name

    if not isinstance(probe, ChipClassifier):
        probe = ChipClassifier.load(probe)
    scenes = [scenes] if isinstance(scenes, (str, os.PathLike)) else list(scenes)
    if not isinstance(backbone, ChipBackbone):
        backbone = probe_backbone(probe, backbone, device=device)
    lookup = {name.lower(): i for i, name in enumerate(probe.classes)}
    threshold = probe.threshold if threshold is None else threshold
    all_scores, all_targets, frames = [], [], []
    sizes = [int(tile_size) if tile_size is not None else probe_tile_size(probe, scene) for scene in scenes]
    labelled, _ = tiles_of_scenes(label_tiles, scenes, labels, tile_sizes=sizes, attribute=attribute,
                                  class_names=class_names, min_labelled=min_labelled)  # fmt: skip
    if not labelled:
        raise NoLabelledTiles(f"{describe_labels(labels)} labels no tile of {', '.join(map(str, scenes))}.")
    for tiles in labelled:
        tile_size = tiles.tile_size
        to_probe = np.array([lookup.get(name.lower(), -1) for name in tiles.classes])
        absent = [name for name, i in zip(tiles.classes, to_probe) if i < 0]
        kept, y = _targets(tiles.counts, multi_label=probe.multi_label, purity=purity, presence=presence)
        if probe.multi_label:
            target = np.zeros((len(tiles), len(probe.classes)), bool)
            target[:, to_probe[to_probe >= 0]] = y[:, to_probe >= 0]
            if absent:
                log.warning("Reference classes %s are not classes of the probe %s: they are not scored.", absent, probe.classes)
        else:
            if absent:
                log.warning("Reference classes %s are not classes of the probe %s: their tiles are left out of the "
                            "scores.", absent, probe.classes)  # fmt: skip
            kept &= to_probe[y] >= 0
            target = to_probe[y]
        tiles, target = tiles.take(kept), target[kept]
        if not len(tiles):
            continue
        cells = np.zeros(tile_grid_shape(*scene_shape(tiles.source), tile_size), bool)
        cells[tiles.rows, tiles.cols] = True
        result = classify_tiles(tiles.source, probe, backbone=backbone, tile_size=tile_size, nodata=nodata,
                                min_valid=min_valid, batch_size=batch_size, tta=tta, amp=amp, cells=cells,
                                progress=progress)  # fmt: skip
        scores = result.probabilities[:, tiles.rows, tiles.cols].T
        done = np.isfinite(scores).all(axis=1)
        tiles, scores, target = tiles.take(done), scores[done], target[done]
        all_scores.append(scores)
        all_targets.append(target)
        reference = [_label_text(t, probe.classes, probe.multi_label) for t in target]
        predicted = predicted_labels(scores, probe.classes, threshold) if probe.multi_label else \
            [probe.classes[i] for i in scores.argmax(axis=1)]  # fmt: skip
        frame = tiles.to_geodataframe({
            "scene": [os.fspath(tiles.source)] * len(tiles), "name": [tile_name(tiles.source, r, c) for r, c in tiles.cells],
            "reference": reference, "predicted": predicted, "score": scores.max(axis=1).astype(np.float64),
            "correct": [a == b for a, b in zip(reference, predicted)],
            **{f"p_{name}": scores[:, k].astype(np.float64) for k, name in enumerate(probe.classes)}})  # fmt: skip
        frames.append(frame.drop(columns=[c for c in frame.columns if c.startswith("f_")]))
    if not frames:
        raise ValueError(f"No tile of {', '.join(map(str, scenes))} labelled by the reference with one of the probe's "
                         f"classes {probe.classes} holds enough data to be scored.")  # fmt: skip
    return TileScores(np.concatenate(all_scores), np.concatenate(all_targets), one_frame(frames))


def one_frame(frames: Sequence[Any]) -> Any:
    """Several scenes' tile frames as one, in the first one's CRS."""
    import geopandas as gpd
    import pandas as pd

    crs = frames[0].crs
    return gpd.GeoDataFrame(pd.concat([f.to_crs(crs) for f in frames], ignore_index=True), crs=crs)


def scene_shape(path: str) -> tuple[int, int]:
    """``(height, width)`` of a raster in pixels."""
    import rasterio

    with rasterio.open(path) as src:
        return src.height, src.width


__all__ = ["TileEmbedder", "TileProbeFit", "TileScores", "fit_tile_classifier", "score_tile_classifier"]
