"""Labels of a scene's tiles from polygons or a label raster: what a tile probe is fitted and scored on.

Remote-sensing labels rarely come as chips in class folders: they are polygons drawn over a scene, or a land-cover
raster. :func:`label_tiles` lays the grid of ``tile_size``-px tiles that ``classify map`` classifies over the scene
(from its origin), burns the polygons (or warps the raster, nearest) onto the scene's pixels, and counts each
tile's labelled pixels per class. A tile then takes the class that covers most of its labelled pixels where that
class covers at least ``purity`` of them (:meth:`TileLabels.majority`), or, multi-label, every class on at least
``presence`` of them (:meth:`TileLabels.present`).

Neighbouring tiles look alike (spatial autocorrelation), so a random split of one scene's tiles scores a probe far
too kindly; :func:`spatial_block_split` holds out whole blocks of tiles instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine

log = logging.getLogger(__name__)

#: class ids a label source may use (one byte: the class maps this package writes)
MAX_CLASS_ID = 254


class NoLabelledTiles(ValueError):
    """The labels do not reach a scene, or no tile of it has enough labelled pixels (a scene among several is
    skipped for it; alone, it is the error)."""


def class_fractions(counts: np.ndarray) -> np.ndarray:
    """``[N, K]`` share of each tile's labelled pixels per class (rows sum to 1; 0 for a tile without labels), from
    pixel counts ``[N, K]``."""
    return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)


def majority_classes(counts: np.ndarray, purity: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``(kept [N] bool, class ids [N] int64)`` of tiles with pixel counts ``[N, K]``: each tile's most common class
    (the lowest id on a tie), kept where it covers at least ``purity`` of the tile's labelled pixels (a mixed tile
    teaches no class)."""
    fractions = class_fractions(counts)
    ids = fractions.argmax(axis=1).astype(np.int64)
    return fractions[np.arange(len(ids)), ids] >= purity, ids


def present_classes(counts: np.ndarray, presence: float = 0.1) -> np.ndarray:
    """``[N, K]`` bool: the classes covering at least ``presence`` (> 0) of each tile's labelled pixels, from pixel
    counts ``[N, K]`` (multi-label targets)."""
    return (class_fractions(counts) >= presence) & (counts > 0)


@dataclass
class TileLabels:
    """Labelled pixels per class of a scene's tiles (those with enough labelled pixels), on the grid of
    ``tile_size``-px tiles from the scene's origin (cell ``(row, col)`` = :func:`~dinov3_eo.tasks.tile_classification.tile_window`).

    Attributes:
        source: the scene.
        classes: class names, index = column of ``counts``.
        rows, cols: ``[N]`` int64 grid cells of the tiles.
        counts: ``[N, K]`` int64 pixels of each class in each tile.
        tile_size: tile side in scene pixels.
        crs, transform: the scene's.
    """

    source: str
    classes: list[str]
    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray
    tile_size: int
    crs: Any = None
    transform: Affine | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """``(row, col)`` of each tile."""
        return list(zip(self.rows.tolist(), self.cols.tolist()))

    @property
    def labelled(self) -> np.ndarray:
        """``[N]`` share of each tile's pixels that are labelled (pixels past the scene's edge count as unlabelled)."""
        return self.counts.sum(axis=1) / float(self.tile_size**2)

    @property
    def fractions(self) -> np.ndarray:
        """``[N, K]`` share of each tile's labelled pixels per class (rows sum to 1)."""
        return class_fractions(self.counts)

    def majority(self, purity: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """:func:`majority_classes` of these tiles."""
        return majority_classes(self.counts, purity)

    def present(self, presence: float = 0.1) -> np.ndarray:
        """:func:`present_classes` of these tiles."""
        return present_classes(self.counts, presence)

    def take(self, index: np.ndarray) -> TileLabels:
        """The tiles at ``index`` (an index array or a bool mask)."""
        return TileLabels(source=self.source, classes=list(self.classes), rows=self.rows[index], cols=self.cols[index],
                          counts=self.counts[index], tile_size=self.tile_size, crs=self.crs, transform=self.transform)  # fmt: skip

    def to_geodataframe(self, columns: dict[str, Any] | None = None) -> Any:
        """The tiles as a ``geopandas.GeoDataFrame`` in the scene's CRS: ``row``, ``col``, ``tile_size``, ``labelled``
        (share of pixels), ``majority`` (class name) and its ``purity`` (share of labelled pixels), one ``f_<class>`` column per
        class, plus ``columns`` (name -> ``[N]`` values)."""
        import geopandas as gpd

        from dinov3_eo.data.raster import tile_boxes

        _, ids = self.majority()
        fractions = self.fractions
        geometry = tile_boxes(self.transform, self.tile_size, self.rows, self.cols)
        frame = {"row": self.rows, "col": self.cols, "tile_size": np.full(len(self), self.tile_size), "labelled": self.labelled,
                 "majority": [self.classes[i] for i in ids],
                 "purity": fractions[np.arange(len(self)), ids] if len(self) else np.zeros(0),
                 **{f"f_{name}": fractions[:, k] for k, name in enumerate(self.classes)}, **(columns or {})}  # fmt: skip
        return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(geometry, crs=self.crs))


def _tile_counts(ids: np.ndarray, tile_size: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Class counts of a strip of whole tile rows: ``ids`` ``[n * tile_size, cols * tile_size]`` int (-1: no label)
    -> ``(tiles with a label [M] (index within the strip, row-major), counts [M, MAX_CLASS_ID + 1])``."""
    height, width = ids.shape
    bins = MAX_CLASS_ID + 2  # bin 0: no label
    tile_of = (np.arange(height, dtype=np.int32)[:, None] // tile_size) * cols + np.arange(width, dtype=np.int32) // tile_size
    # one bincount over every pixel (no masking copy): tile * bins + id + 1
    combined = tile_of * np.int32(bins) + (ids.astype(np.int32, copy=False) + np.int32(1))
    counts = np.bincount(combined.ravel(), minlength=(height // tile_size) * cols * bins).reshape(-1, bins)[:, 1:]
    present = np.flatnonzero(counts.any(axis=1))
    return present, counts[present]


def label_tiles(
    scene: str | os.PathLike[str],
    labels: Any,
    *,
    tile_size: int,
    attribute: str = "name",
    class_names: Sequence[str] | None = None,
    min_labelled: float = 0.5,
    strip_pixels: int = 4_000_000,
) -> TileLabels:
    """The labelled pixels per class of each ``tile_size``-px tile of ``scene`` on which ``labels`` lie.

    Args:
        scene: a georeferenced scene (its grid, not its pixels, is read).
        labels: polygons (a vector file or a ``GeoDataFrame``, classes in ``attribute``) or a label raster of class
            ids (named by its ``class_names`` tag, else ``class_names``, else ``class <id>``), in any CRS
            (:func:`~dinov3_eo.tasks.prototypes.open_labels`): polygons are burnt on the scene's pixels (those whose
            centre they cover), a raster warped onto them (nearest).
        tile_size: tile side in scene pixels.
        min_labelled: the share of a tile's pixels that must be labelled for it to be kept (in ``(0, 1]``).
        strip_pixels: pixels labelled at a time (whole rows of tiles): memory holds a strip, whatever the scene's size.

    Returns:
        The kept tiles, row-major; ``classes`` are those at least one kept tile holds, in id order.

    Raises:
        FileNotFoundError: no such scene or labels. ValueError: a scene without a georeference, a bad
        ``tile_size``/``min_labelled``, class ids beyond 0..254, labels that do not meet the scene, or no tile with
        enough labelled pixels (each in one sentence). KeyError: polygons without ``attribute``.
    """
    import rasterio

    from dinov3_eo.data.raster import require_georeferenced
    from dinov3_eo.tasks.prototypes import open_labels
    from dinov3_eo.tasks.tile_classification import tile_grid_shape

    if tile_size < 1:
        raise ValueError(f"The tile size must be a positive number of pixels, got {tile_size}.")
    if not 0.0 < min_labelled <= 1.0:
        raise ValueError(f"min_labelled must lie in (0, 1], got {min_labelled}.")
    if not Path(scene).is_file():
        raise FileNotFoundError(f"Scene {str(scene)!r} does not exist.")
    source, names = open_labels(labels, attribute=attribute, class_names=class_names)
    what = "the GeoDataFrame" if hasattr(labels, "geometry") else repr(os.fspath(labels))
    with rasterio.open(scene) as src:
        require_georeferenced(src)
        crs, transform, height, width = src.crs, src.transform, src.height, src.width
    rows, cols = tile_grid_shape(height, width, tile_size)
    per_strip = max(1, strip_pixels // (tile_size * tile_size * cols))
    found_rows, found_cols, found_counts = [], [], []
    for top in range(0, rows, per_strip):
        n = min(per_strip, rows - top)
        grid = transform @ Affine.translation(0, top * tile_size)
        ids = source.sample(crs=crs, transform=grid, shape=(n * tile_size, cols * tile_size))["mask"].numpy()
        ids = ids.astype(np.int64, copy=False)
        ids[max(0, height - top * tile_size) :, :] = -1  # past the scene's bottom and right edges: not labelled
        ids[:, width:] = -1
        ids[ids == 255] = -1  # 255 marks unlabelled pixels in byte class maps (this package's too), declared or not
        if ids.max(initial=-1) > MAX_CLASS_ID:
            raise ValueError(f"Labels {what} hold class id {int(ids.max())}; class ids must lie in 0..{MAX_CLASS_ID} "
                             "(declare the value that marks unlabelled pixels as the raster's nodata).")  # fmt: skip
        present, counts = _tile_counts(ids, tile_size, cols)
        found_rows.append(top + present // cols)
        found_cols.append(present % cols)
        found_counts.append(counts)
    counts = np.concatenate(found_counts) if found_counts else np.zeros((0, MAX_CLASS_ID + 1), np.int64)
    if not len(counts):
        raise NoLabelledTiles(f"No pixel of scene {str(scene)!r} is labelled by {what}: they do not overlap (check "
                              "both CRSs, and the polygons' class column).")  # fmt: skip
    share = counts.sum(axis=1) / float(tile_size**2)
    keep = share >= min_labelled
    if not keep.any():
        raise NoLabelledTiles(f"No {tile_size}-px tile of {str(scene)!r} has {min_labelled:.0%} of its pixels labelled "
                              f"by {what} (at most {share.max():.0%}); lower --min-labelled, or use smaller tiles.")  # fmt: skip
    counts = counts[keep]
    used = np.flatnonzero(counts.any(axis=0))
    named = list(names) if names is not None else []
    classes = [named[i] if i < len(named) else f"class {i}" for i in used]
    return TileLabels(source=os.fspath(scene), classes=classes, rows=np.concatenate(found_rows)[keep].astype(np.int64),
                      cols=np.concatenate(found_cols)[keep].astype(np.int64), counts=counts[:, used].astype(np.int64),
                      tile_size=int(tile_size), crs=crs, transform=transform)  # fmt: skip


def tiles_of_scenes(read: Callable[..., Any], scenes: Sequence[str | os.PathLike[str]], reference: Any, *,
                    tile_sizes: Sequence[int], **kwargs: Any) -> tuple[list[Any], list[NoLabelledTiles]]:  # fmt: skip
    """``read(scene, reference, tile_size=..., **kwargs)`` (:func:`label_tiles`, or
    :func:`~dinov3_eo.tasks.tile_values.value_tiles`) of each scene at its tile size: ``(found, missed)``. With one
    scene, a reference that misses it raises :class:`NoLabelledTiles`; with several, a scene it misses is skipped
    with a warning and its error kept in ``missed`` (the caller decides what to raise where none is found)."""
    found, missed = [], []
    for scene, tile_size in zip(scenes, tile_sizes, strict=True):
        try:
            found.append(read(scene, reference, tile_size=tile_size, **kwargs))
        except NoLabelledTiles as e:
            if len(scenes) == 1:
                raise
            missed.append(e)
            log.warning("%s The scene is skipped.", e)
    return found, missed


def merge_tile_labels(labels: Sequence[TileLabels]) -> tuple[list[str], list[np.ndarray]]:
    """The union of several scenes' classes (in order of first appearance) and each scene's counts ``[N_i, K]`` on
    it, so that tiles of all the scenes can be fitted together."""
    classes: list[str] = []
    for item in labels:
        classes += [name for name in item.classes if name not in classes]
    merged = []
    for item in labels:
        counts = np.zeros((len(item), len(classes)), np.int64)
        counts[:, [classes.index(name) for name in item.classes]] = item.counts
        merged.append(counts)
    return classes, merged


def spatial_block_split(rows: np.ndarray, cols: np.ndarray, y: np.ndarray, *, fraction: float, block: int = 4,
                        groups: np.ndarray | None = None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Indices ``(train, held_out)`` of tiles, holding out whole ``block`` x ``block``-tile blocks.

    Blocks are drawn in a seeded random order and held out until at least ``fraction`` of the tiles are, skipping a
    block that would take the last training tile of a class (so every class keeps training tiles). ``groups`` ``[N]``
    keeps blocks of different scenes apart.

    Args:
        rows, cols: ``[N]`` grid cells of the tiles. y: ``[N]`` class ids, or ``[N, K]`` bool (multi-label).

    Returns:
        Sorted index arrays; ``held_out`` is empty where no block can be spared.
    """
    rows, cols = np.asarray(rows), np.asarray(cols)
    groups = np.zeros(len(rows), np.int64) if groups is None else np.asarray(groups)
    keys = np.stack([groups, rows // block, cols // block], axis=1)
    _, block_of = np.unique(keys, axis=0, return_inverse=True)
    block_of = block_of.reshape(-1)
    onehot = np.asarray(y, bool) if np.ndim(y) == 2 else np.eye(int(np.max(y, initial=0)) + 1, dtype=bool)[np.asarray(y)]
    left = onehot.sum(axis=0)  # training tiles per class
    held = np.zeros(len(rows), bool)
    target = fraction * len(rows)
    for b in np.random.default_rng(seed).permutation(int(block_of.max(initial=-1)) + 1):
        if held.sum() >= target:
            break
        members = block_of == b
        taken = onehot[members].sum(axis=0)
        if ((left - taken) <= 0)[left > 0].any():
            continue
        held |= members
        left -= taken
    return np.flatnonzero(~held), np.flatnonzero(held)


__all__ = ["MAX_CLASS_ID", "NoLabelledTiles", "TileLabels", "class_fractions", "majority_classes", "present_classes", "label_tiles", "merge_tile_labels", "spatial_block_split"]
