"""Scene classification over a GeoTIFF: a chip probe applied to a grid of tiles, as a georeferenced class map.

A probe fitted on EuroSAT-style chips (:mod:`~dinov3_eo.tasks.chip_classification`) answers "what is this chip";
over a scene the question is "where is what". ``dinov3-eo classify map scene.tif --probe probe.safetensors -o out/``
cuts the scene into a regular grid of tiles from its origin (by default of the size of the probe's training chips,
in the scene's pixels), embeds each tile exactly as the probe's chips were embedded (same backbone, bands,
normalisation and model input size: :func:`~dinov3_eo.tasks.chip_embeddings.embedding_input`), and writes

- ``<stem>_tile_classes.tif``: a class-id COG with one pixel per tile (the scene's transform scaled by the tile size,
  colour table and ``class_names`` tag; 255 where a tile was not classified),
- ``<stem>_tiles.gpkg``: one polygon per classified tile with ``row``, ``col``, ``class_id``, ``class_name``,
  ``score``, ``valid_fraction`` and one ``p_<class>`` column per class,
- ``<stem>_tile_quicklook.png``: the tile classes over the imagery,
- with ``--probabilities``, ``<stem>_tile_probabilities.tif``: one float32 band per class.

Tiles at the right and bottom edges extend past the scene and are padded as no data, like any no-data pixel: a tile
is classified where at least ``min_valid`` of its pixels hold data. A ``stride`` below the tile size makes a finer
map of cells, each classified by the tile centred on it; below ``min_score`` a tile is ``"unknown"``. The Python
entry point is :func:`classify_tiles`, which returns a :class:`TileClasses` (``to_geodataframe``, ``to_xarray``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from rasterio.transform import Affine
from rasterio.windows import Window
from torch import Tensor, nn

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import tile_boxes  # re-exported: the grid cells this module classifies
from dinov3_eo.inference.prefetch import Prefetcher
from dinov3_eo.tasks.chip_classification import ChipClassifier, predicted_labels, probe_backbone
from dinov3_eo.tasks.chip_embeddings import (
    ChipBackbone,
    ChipEmbeddings,
    chip_features,
    embed_batch,
    embedding_input,
    load_chip_backbone,
)

#: the tile class map's value where a tile was not classified
TILE_NODATA = 255
#: the class of tiles whose most probable class is below ``min_score``
UNKNOWN = "unknown"


@dataclass
class TileClasses:
    """Class probabilities of a scene's tiles on a regular grid of cells ``stride`` pixels wide: cell ``(row, col)``
    covers scene pixels ``row * stride`` ... ``(row + 1) * stride`` (and the same for columns) and takes the class of
    the ``tile_size`` window centred on it (:func:`tile_window`); with ``stride == tile_size`` (the default) the cells
    are the tiles.

    Attributes:
        source: the scene.
        classes: class names, index = class id.
        probabilities: ``[K, rows, cols]`` float32; NaN where a cell's tile was not classified.
        valid_fraction: ``[rows, cols]`` share of each cell's tile's pixels that hold data (0 past the scene's edge).
        crs: the scene's CRS.
        transform: the cell grid's transform (the scene's scaled by ``stride``): one pixel per cell.
        tile_size: tile side in scene pixels.
        stride: cell side in scene pixels (``None``: ``tile_size``).
        bands: the 1-based scene bands fed to the backbone (``None``: all).
        multi_label: the probe is multi-label (independent class probabilities): a tile carries every class of
            probability at least ``threshold``, and ``class_ids`` is its most probable one.
        set_threshold, set_coverage: the probe's conformal prediction sets (``ChipClassifier.sets``): a class is in a
            tile's set where its probability is at least ``set_threshold`` (``None``: the probe has none).
    """

    source: str
    classes: list[str]
    probabilities: np.ndarray
    valid_fraction: np.ndarray
    crs: Any
    transform: Affine
    tile_size: int
    bands: list[int] | None = None
    stride: int | None = None
    multi_label: bool = False
    threshold: float = 0.5
    min_score: float | None = None
    set_threshold: float | None = None
    set_coverage: float | None = None

    def set_sizes(self, nodata: int = TILE_NODATA) -> np.ndarray:
        """``[rows, cols]`` uint8: the number of classes in each tile's prediction set (0: none, a tile unlike every
        class; 2 or more: classes the probe cannot tell apart there), ``nodata`` where not classified.

        Raises:
            ValueError: the probe has no prediction sets.
        """
        if self.set_threshold is None:
            raise ValueError("These tiles have no prediction sets: the probe was fitted without them (--coverage).")
        from dinov3_eo.tasks.conformal import prediction_sets

        sizes = prediction_sets(np.nan_to_num(self.probabilities, nan=-1.0), self.set_threshold).sum(axis=0).astype(np.uint8)
        sizes[~self.classified] = nodata
        return sizes

    @property
    def class_names(self) -> list[str]:
        """The map's class names: ``classes``, then ``"unknown"`` (tiles below ``min_score``) where one is set."""
        return [*self.classes, UNKNOWN] if self.min_score is not None else list(self.classes)

    @property
    def classified(self) -> np.ndarray:
        """``[rows, cols]`` bool: the tiles that have probabilities."""
        return np.isfinite(self.probabilities).all(axis=0)

    def class_ids(self, nodata: int = TILE_NODATA) -> np.ndarray:
        """``[rows, cols]`` uint8 (uint16 beyond 254 classes) most probable class, ``nodata`` where not classified,
        and ``len(classes)`` (``"unknown"``) where its probability is below ``min_score``."""
        dtype = np.uint8 if len(self.class_names) < 255 else np.uint16
        probabilities = np.nan_to_num(self.probabilities, nan=-1.0)
        ids = probabilities.argmax(axis=0).astype(dtype)
        if self.min_score is not None:
            ids[probabilities.max(axis=0) < self.min_score] = len(self.classes)
        ids[~self.classified] = nodata
        return ids

    def cell_bounds(self, row: int, col: int) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of cell ``(row, col)`` in the CRS (as ``rasterio.windows.bounds``); the tile
        itself where the stride is the tile size."""
        x0, y0 = self.transform @ (col, row)
        x1, y1 = self.transform @ (col + 1, row + 1)
        return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)

    def to_geodataframe(self) -> Any:
        """The classified cells as a ``geopandas.GeoDataFrame`` in the scene's CRS: ``row``, ``col``, ``class_id``,
        ``class_name``, ``score`` (its probability), ``valid_fraction``, ``p_<class>`` per class, cell polygons (the
        tiles, unless a smaller stride was asked for: cells cover the scene without overlap); for a
        multi-label probe also ``labels``, the classes of probability at least ``threshold`` joined by ``;``."""
        import geopandas as gpd

        rows, cols = np.nonzero(self.classified)
        p = self.probabilities[:, rows, cols].T  # [N, K]
        ids = self.class_ids()[rows, cols].astype(np.int64)
        names = self.class_names
        frame = {"row": rows.astype(np.int64), "col": cols.astype(np.int64), "class_id": ids,
                 "class_name": [names[i] for i in ids], "score": p.max(axis=1).astype(np.float64) if len(p) else np.zeros(0),
                 "valid_fraction": self.valid_fraction[rows, cols].astype(np.float64),
                 **{f"p_{name}": p[:, k].astype(np.float64) for k, name in enumerate(self.classes)}}  # fmt: skip
        if self.multi_label:
            frame["labels"] = predicted_labels(p, self.classes, self.threshold)
        if self.set_threshold is not None:
            frame["set"] = predicted_labels(p, self.classes, self.set_threshold)
            frame["set_size"] = self.set_sizes()[rows, cols].astype(np.int64)
        return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(tile_boxes(self.transform, 1, rows, cols), crs=self.crs))

    def least_confident(self, n: int) -> Any:
        """The ``n`` classified cells the probe is least sure of, least sure first: what to label next (uncertainty
        sampling). :meth:`to_geodataframe`'s rows with ``margin`` (the most probable class's probability minus the
        second's; multi-label: the smallest distance of a class's probability to ``threshold``) and ``rank``."""
        frame = self.to_geodataframe()
        p = frame[[f"p_{name}" for name in self.classes]].to_numpy()
        if self.multi_label:
            margin = np.abs(p - self.threshold).min(axis=1) if len(p) else np.zeros(0)
        else:
            top = np.sort(p, axis=1)
            margin = top[:, -1] - (top[:, -2] if p.shape[1] > 1 else 0.0) if len(p) else np.zeros(0)
        frame["margin"] = margin
        chosen = frame.iloc[np.argsort(margin, kind="stable")[: max(0, int(n))]].copy()
        chosen.insert(0, "rank", np.arange(1, len(chosen) + 1))
        return chosen.reset_index(drop=True)

    def to_xarray(self) -> Any:
        """An ``xarray.Dataset`` on the tile grid (``x``, ``y`` = tile centres, the CRS set through rioxarray):
        ``class_id`` (``nodata`` attribute 255) and ``probability`` (``class``, ``y``, ``x``)."""
        import rioxarray  # noqa: F401  (registers the .rio accessor)
        import xarray as xr

        rows, cols = self.valid_fraction.shape
        x = np.array([(self.transform @ (c + 0.5, 0.5))[0] for c in range(cols)])
        y = np.array([(self.transform @ (0.5, r + 0.5))[1] for r in range(rows)])
        ids = xr.DataArray(self.class_ids(), dims=("y", "x"), coords={"y": y, "x": x},
                           attrs={"nodata": TILE_NODATA, "class_names": self.class_names})  # fmt: skip
        prob = xr.DataArray(self.probabilities, dims=("class", "y", "x"), coords={"class": self.classes, "y": y, "x": x})
        ds = xr.Dataset({"class_id": ids, "probability": prob},
                        attrs={"source": self.source, "tile_size": self.tile_size, "stride": self.stride or self.tile_size})  # fmt: skip
        return ds.rio.write_crs(self.crs).rio.write_transform(self.transform)


def tile_grid_shape(height: int, width: int, stride: int) -> tuple[int, int]:
    """``(rows, cols)`` of ``stride``-px cells covering a ``height`` x ``width`` scene from its origin (edge cells
    partly outside)."""
    return math.ceil(height / stride), math.ceil(width / stride)


def tile_window(row: int, col: int, tile_size: int, stride: int | None = None) -> Window:
    """The scene pixel window of cell ``(row, col)``'s tile: ``tile_size`` wide, centred on the cell (``stride``
    wide; default ``tile_size``, where tile and cell are one), ``(tile_size - stride) // 2`` pixels above and left
    of it."""
    stride = tile_size if stride is None else stride
    margin = (tile_size - stride) // 2
    return Window(col * stride - margin, row * stride - margin, tile_size, tile_size)


def probe_tile_size(probe: ChipClassifier, scene: str | os.PathLike[str] | None = None) -> int:
    """The tile side, in ``scene``'s pixels, that covers the ground the probe's training chips covered: the probe's
    ``tile_m`` (recorded when it was fitted on scenes in metres) over the scene's pixel size, so that a probe fitted on
    a 10 m scene cuts tiles of the same size in metres from a 30 m one; else its training chips' side in pixels.

    Raises:
        ValueError: the probe records neither, or non-square chips (the tile size must then be given).
    """
    from dinov3_eo.data.raster import open_quietly, pixel_size_m

    ground = probe.embedding.get("tile_m")
    if ground and scene is not None:
        with open_quietly(scene) as src:
            pixel = pixel_size_m(src.crs, src.transform)
        if pixel:
            return max(1, round(float(ground) / pixel))
    size = probe.embedding.get("chip_size")
    if not size:
        raise ValueError("The probe records no chip size (a zero-shot probe made without --tile-size, or one fitted "
                         "before dinov3_eo recorded it); give the tile size in scene pixels (--tile-size).")  # fmt: skip
    height, width = (int(v) for v in size)
    if height != width:
        raise ValueError(f"The probe's training chips are {height} x {width} pixels, not square; give the tile size "
                         "in scene pixels (--tile-size).")  # fmt: skip
    return height


class _Tile(NamedTuple):
    row: int
    col: int
    valid_fraction: float
    pixels: np.ndarray
    valid: np.ndarray


def _read_tiles(src: Any, cells: Iterator[tuple[int, int]], tile_size: int, stride: int, bands: Sequence[int] | None,
                nodata: float | None) -> Iterator[_Tile]:  # fmt: skip
    from dinov3_eo.data.raster import read_window

    for row, col in cells:
        pixels, valid = read_window(src, tile_window(row, col, tile_size, stride), bands=bands, nodata=nodata)
        yield _Tile(row, col, float(valid.mean()), pixels, valid)


def _tile_batches(src: Any, cells: Iterator[tuple[int, int]], *, tile_size: int, stride: int,
                  bands: Sequence[int] | None, nodata: float | None, min_valid: float, patch_size: int,
                  normalization: Normalization | None, size: int | None,
                  batch_size: int) -> Iterator[tuple[list[tuple[int, int, float, bool]], list[tuple[Tensor, Tensor]]]]:  # fmt: skip
    """``cells`` read and prepared as the model takes them (:func:`embedding_input`), a batch at a time:
    ``((row, col, valid fraction, taken) of every cell read since the last batch, the model inputs of those taken)``;
    a tile is taken where at least ``min_valid`` (> 0) of its pixels hold data."""
    seen: list[tuple[int, int, float, bool]] = []
    inputs: list[tuple[Tensor, Tensor]] = []
    for tile in _read_tiles(src, cells, tile_size, stride, bands, nodata):
        take = tile.valid_fraction >= min_valid
        seen.append((tile.row, tile.col, tile.valid_fraction, take))
        if take:
            inputs.append(embedding_input(tile.pixels, tile.valid, patch_size=patch_size, normalization=normalization,
                                          size=size))  # fmt: skip
        if len(inputs) == batch_size:
            yield seen, inputs
            seen, inputs = [], []
    if seen:
        yield seen, inputs


def _backbone_for(probe_or_none: ChipClassifier | None, backbone: ChipBackbone | nn.Module | str | os.PathLike[str] | None,
                  normalization: Normalization | None, device: str | None) -> ChipBackbone:  # fmt: skip
    """``backbone`` as a :class:`ChipBackbone`: as it is, a model (fed after ``normalization``), a source to load, or
    (``None``) the probe's."""
    if isinstance(backbone, ChipBackbone):
        return backbone
    if isinstance(backbone, nn.Module):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return ChipBackbone(backbone.to(device), normalization, device, type(backbone).__name__, None)
    if probe_or_none is not None:
        return probe_backbone(probe_or_none, backbone, device=device)
    if backbone is None:
        raise ValueError("Give the backbone that embeds the tiles.")
    return load_chip_backbone(backbone, device=device)


def _check_scene_bands(src: Any, raster: Any, bands: Sequence[int] | None, in_chans: int) -> None:
    count = len(bands) if bands is not None else src.count
    if count != in_chans:
        raise ValueError(f"Scene {str(raster)!r} gives {count} bands ({'--bands ' + str(list(bands)) if bands else 'all'}) "
                         f"but the backbone takes {in_chans}; select bands with --bands.")  # fmt: skip
    if bands is not None and any(not 1 <= b <= src.count for b in bands):
        raise ValueError(f"Scene {str(raster)!r} has {src.count} bands; bands {list(bands)} asks for others.")


def _embedded_tiles(src: Any, raster: Any, cells: Sequence[tuple[int, int]], backbone: ChipBackbone, *, tile_size: int,
                    stride: int, bands: Sequence[int] | None, nodata: float | None, min_valid: float, size: int | None,
                    batch_size: int, amp: bool, views: Sequence[int], prefetch: int,
                    progress: bool) -> Iterator[tuple[list[tuple[int, int, float, bool]], list[tuple[np.ndarray, np.ndarray]]]]:  # fmt: skip
    """``cells`` of the open scene ``src`` embedded a batch at a time (the backbone in eval mode meanwhile, restored
    after): ``((row, col, valid fraction, taken) of each cell read, [(cls, patch_mean) of the taken tiles per view]``,
    an empty list where none was taken); tiles are read and prepared in a background thread (``prefetch`` batches
    ahead; 0: in turn with the model)."""
    from tqdm.auto import tqdm

    model = backbone.model

    def batches() -> Iterator[tuple[list[tuple[int, int, float, bool]], list[tuple[Tensor, Tensor]]]]:
        return _tile_batches(src, iter(cells), tile_size=tile_size, stride=stride, bands=bands, nodata=nodata,
                             min_valid=min_valid, patch_size=int(model.patch_size), normalization=backbone.normalization,
                             size=size, batch_size=batch_size)  # fmt: skip

    was_training = model.training
    model.eval()
    reader = Prefetcher(batches, prefetch=prefetch, name="dinov3_eo-tiles") if prefetch else None
    bar = tqdm(total=len(cells), unit="tile", desc=f"tiles of {Path(raster).name}", disable=not progress)
    try:
        for seen, inputs in reader if reader is not None else batches():
            embedded = [embed_batch(model, inputs, device=backbone.device, amp=amp, view=v) for v in views] if inputs else []
            yield seen, embedded
            bar.update(len(seen))
    finally:
        bar.close()
        if reader is not None:
            reader.close()
        model.train(was_training)


def _batch_features(cls: np.ndarray, patch_mean: np.ndarray, features: str) -> np.ndarray:
    """:func:`chip_features` of a batch's embeddings."""
    return chip_features(ChipEmbeddings(paths=[""] * len(cls), cls=cls, patch_mean=patch_mean,
                                        sizes=np.zeros((len(cls), 2), np.int64)), features)  # fmt: skip


def classify_tiles(
    raster: str | os.PathLike[str],
    probe: ChipClassifier | str | os.PathLike[str],
    *,
    backbone: ChipBackbone | nn.Module | str | os.PathLike[str] | None = None,
    normalization: Normalization | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    min_valid: float = 0.5,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    tta: str | None = None,
    min_score: float | None = None,
    prefetch: int = 2,
    cells: np.ndarray | None = None,
    progress: bool = True,
) -> TileClasses:
    """Classify a georeferenced scene tile by tile with a chip probe (``classify fit``).

    Args:
        raster: the scene (a GeoTIFF or anything GDAL reads with a CRS and a geotransform).
        probe: a :class:`~dinov3_eo.tasks.chip_classification.ChipClassifier` or its ``.safetensors`` file.
        backbone: a loaded :class:`~dinov3_eo.tasks.chip_embeddings.ChipBackbone`, a source for
            :func:`~dinov3_eo.tasks.chip_embeddings.load_chip_backbone` (default: the probe's, with its normalisation),
            or a model with ``forward_features``, fed after ``normalization``.
        tile_size: tile side in scene pixels (default: :func:`probe_tile_size`, the ground the probe's training tiles
            covered where it records it, else its training chip size in pixels). Pick it so that a tile covers the
            ground a training chip covered (a 64-px EuroSAT chip at 10 m is 640 m: 64 px of a 10 m scene).
        stride: the map's cell size in scene pixels, at most ``tile_size`` (default: ``tile_size``, one tile per
            cell): a finer map, each cell classified by the tile centred on it (``(tile_size / stride)²`` times the
            tiles to embed).
        bands: 1-based scene bands fed to the backbone (default: the probe's chip bands, else all).
        nodata: no-data value overriding the file's (e.g. ``0`` for a Landsat L1 collar).
        min_valid: the share of a tile's pixels that must hold data for it to be classified.
        batch_size: tiles per forward pass; device, amp: as for :func:`~dinov3_eo.tasks.chip_embeddings.embed_chips`.
        tta: ``"flips"`` or ``"d4"``: each tile's probabilities are the mean over its 4 or 8 flipped and turned views.
        min_score: a tile whose most probable class has a lower probability is mapped as ``"unknown"`` (class id
            ``len(classes)``): land the probe was not taught (cloud, a new crop) is flagged, not forced into a class.
        prefetch: batches of tiles read and prepared ahead in a background thread (0: read in turn with the model).
        cells: a ``[rows, cols]`` bool mask of the grid's cells to classify (default: all); the others are left
            unclassified, with a valid fraction of 0 (scoring a probe on labelled tiles reads only those).

    Raises:
        FileNotFoundError: no such scene or probe. ValueError: a scene without a georeference, a band count the
        backbone does not take, a bad ``tile_size``, ``stride`` or ``min_valid``, or no tile with enough data (each
        in one sentence).
    """
    if not isinstance(probe, ChipClassifier):
        probe = ChipClassifier.load(probe)
    if min_score is not None and not 0.0 <= min_score <= 1.0:
        raise ValueError(f"min_score must lie in [0, 1], got {min_score}.")

    def head(cls: np.ndarray, patch_mean: np.ndarray) -> np.ndarray:
        return probe.scores(_batch_features(cls, patch_mean, probe.features))

    grid = predict_tile_grid(raster, probe, head, len(probe.classes), backbone=backbone, normalization=normalization,
                             tile_size=tile_size, stride=stride, bands=bands, nodata=nodata, min_valid=min_valid,
                             batch_size=batch_size, device=device, amp=amp, tta=tta, prefetch=prefetch, cells=cells,
                             progress=progress)  # fmt: skip
    return TileClasses(source=os.fspath(raster), classes=list(probe.classes), probabilities=grid.outputs,
                       valid_fraction=grid.valid_fraction, crs=grid.crs, transform=grid.transform,
                       tile_size=grid.tile_size, stride=grid.stride, bands=grid.bands, multi_label=probe.multi_label,
                       threshold=probe.threshold, min_score=min_score,
                       set_threshold=probe.sets["threshold"] if probe.sets else None,
                       set_coverage=probe.sets["coverage"] if probe.sets else None)  # fmt: skip


class TileGrid(NamedTuple):
    """What :func:`predict_tile_grid` made: a head's outputs on a scene's grid of cells."""

    outputs: np.ndarray
    """``[K, rows, cols]`` float32, NaN where a cell's tile was not predicted."""
    valid_fraction: np.ndarray
    """``[rows, cols]`` share of each cell's tile's pixels that hold data."""
    crs: Any
    transform: Affine
    """the cell grid's (the scene's scaled by ``stride``)."""
    tile_size: int
    stride: int
    bands: list[int] | None


def predict_tile_grid(
    raster: str | os.PathLike[str],
    probe: Any,
    head: Any,
    outputs: int,
    *,
    backbone: ChipBackbone | nn.Module | str | os.PathLike[str] | None = None,
    normalization: Normalization | None = None,
    tile_size: int | None = None,
    stride: int | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    min_valid: float = 0.5,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    tta: str | None = None,
    prefetch: int = 2,
    cells: np.ndarray | None = None,
    progress: bool = True,
) -> TileGrid:
    """A probe's ``head(cls [N, D], patch_mean [N, D]) -> [N, outputs]`` on every tile of a scene's grid, each tile
    embedded as the probe's training tiles or chips were (its ``embedding`` record: backbone, bands, input size):
    the loop :func:`classify_tiles` and :func:`~dinov3_eo.tasks.tile_regression.regress_tiles` share. Arguments as
    for :func:`classify_tiles`; with ``tta`` a tile's outputs are the mean of its views'.

    Raises:
        FileNotFoundError, ValueError: as :func:`classify_tiles`.
    """
    import rasterio

    from dinov3_eo.data.raster import require_georeferenced
    from dinov3_eo.inference.tta import tta_views

    info = probe.embedding
    if not 0.0 < min_valid <= 1.0:
        raise ValueError(f"min_valid must lie in (0, 1], got {min_valid}.")
    if not Path(raster).is_file():
        raise FileNotFoundError(f"Scene {str(raster)!r} does not exist.")
    tile_size = int(tile_size) if tile_size is not None else probe_tile_size(probe, raster)
    if tile_size < 1:
        raise ValueError(f"The tile size must be a positive number of pixels, got {tile_size}.")
    stride = tile_size if stride is None else int(stride)
    if not 1 <= stride <= tile_size:
        raise ValueError(f"The stride must lie between 1 and the tile size ({tile_size} px), got {stride}.")
    backbone = _backbone_for(probe, backbone, normalization, device)
    in_chans = int(backbone.model.patch_embed.proj.weight.shape[1])
    bands = list(bands) if bands is not None else info.get("bands")
    size = info.get("size", 224)
    views = tta_views(tta) if tta else (0,)

    with rasterio.open(raster) as src:
        require_georeferenced(src)
        _check_scene_bands(src, raster, bands, in_chans)
        rows, cols = tile_grid_shape(src.height, src.width, stride)
        if cells is not None and np.shape(cells) != (rows, cols):
            raise ValueError(f"cells must be a [rows, cols] = {(rows, cols)} mask of the scene's grid, got {np.shape(cells)}.")
        predicted = np.full((outputs, rows, cols), np.nan, dtype=np.float32)
        valid_fraction = np.zeros((rows, cols), dtype=np.float32)
        crs, transform = src.crs, src.transform @ Affine.scale(stride)
        chosen_cells = [(int(r), int(c)) for r, c in np.argwhere(cells)] if cells is not None else \
            [(r, c) for r in range(rows) for c in range(cols)]  # fmt: skip

        # tiles are read and prepared in a background thread while the model runs on the batch before
        for seen, views_embedded in _embedded_tiles(src, raster, chosen_cells, backbone, tile_size=tile_size,
                                                    stride=stride, bands=bands, nodata=nodata, min_valid=min_valid,
                                                    size=size, batch_size=batch_size, amp=amp, views=views,
                                                    prefetch=prefetch, progress=progress):  # fmt: skip
            for row, col, fraction, _ in seen:
                valid_fraction[row, col] = fraction
            if views_embedded:
                p = sum(np.asarray(head(cls, patch_mean), np.float64) for cls, patch_mean in views_embedded)
                chosen = [(row, col) for row, col, _, take in seen if take]
                for (row, col), values in zip(chosen, (p / len(views)).astype(np.float32)):
                    predicted[:, row, col] = values
        if not np.isfinite(predicted).all(axis=0).any():
            declared = nodata if nodata is not None else src.nodata
            raise ValueError(f"No tile of {str(raster)!r} holds data on at least {min_valid:.0%} of its pixels (nodata "
                             f"{declared}); check --nodata, or lower --min-valid.")  # fmt: skip
    return TileGrid(predicted, valid_fraction, crs, transform, tile_size, stride,
                    list(bands) if bands is not None else None)


def tile_name(raster: str | os.PathLike[str], row: int, col: int) -> str:
    """How a tile is named among chips (``ChipEmbeddings.paths``): ``"<scene>#<row>,<col>"``."""
    return f"{os.fspath(raster)}#{row},{col}"


def embed_tiles(
    raster: str | os.PathLike[str],
    backbone: ChipBackbone | nn.Module | str | os.PathLike[str],
    cells: Sequence[tuple[int, int]],
    *,
    tile_size: int,
    normalization: Normalization | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    size: int | None = 224,
    min_valid: float = 0.5,
    batch_size: int = 32,
    device: str | None = None,
    amp: bool = False,
    prefetch: int = 2,
    progress: bool = True,
) -> tuple[ChipEmbeddings, np.ndarray]:
    """The embeddings of a scene's tiles, each exactly as :func:`classify_tiles` embeds it (and as
    :func:`~dinov3_eo.tasks.chip_embeddings.embed_chips` embeds a chip file of its pixels): what a probe is fitted on
    when its labels come from polygons or a label raster over the scene.

    Args:
        raster: the scene. backbone: as for :func:`classify_tiles`, or a source for
            :func:`~dinov3_eo.tasks.chip_embeddings.load_chip_backbone`.
        cells: distinct ``(row, col)`` of the tiles on the grid of ``tile_size``-px tiles from the scene's origin.
        size: the model input size (``None``: the tile's own, rounded to the patch size).
        min_valid: the share of a tile's pixels that must hold data for it to be embedded.
        Others as for :func:`classify_tiles`.

    Returns:
        ``(embeddings, taken)``: the embeddings of the tiles taken, in the order of ``cells`` (named by
        :func:`tile_name`; metadata as ``embed_chips`` records it), and ``[len(cells)]`` bool, which were.

    Raises:
        ValueError: a scene without a georeference, or a band count the backbone does not take.
    """
    import rasterio

    from dinov3_eo.data.raster import require_georeferenced

    backbone = _backbone_for(None, backbone, normalization, device)
    model = backbone.model
    patch, dim = int(model.patch_size), int(model.embed_dim)
    in_chans = int(model.patch_embed.proj.weight.shape[1])
    cells = [(int(r), int(c)) for r, c in cells]
    cls = np.zeros((len(cells), dim), np.float32)
    patch_mean = np.full((len(cells), dim), np.nan, np.float32)
    taken = np.zeros(len(cells), bool)
    position = {cell: i for i, cell in enumerate(cells)}
    with rasterio.open(raster) as src:
        require_georeferenced(src)
        _check_scene_bands(src, raster, bands, in_chans)

        for seen, views_embedded in _embedded_tiles(src, raster, cells, backbone, tile_size=tile_size, stride=tile_size,
                                                    bands=bands, nodata=nodata, min_valid=min_valid, size=size,
                                                    batch_size=batch_size, amp=amp, views=(0,), prefetch=prefetch,
                                                    progress=progress):  # fmt: skip
            index = [position[(row, col)] for row, col, _, take in seen if take]
            if views_embedded:
                cls[index], patch_mean[index] = views_embedded[0]
                taken[index] = True
    meta = getattr(model, "meta", None)
    metadata = {"backbone": getattr(meta, "name", getattr(model, "name", "custom")), "size": size,
                "normalization": backbone.normalization.name if backbone.normalization is not None else None,
                "bands": list(bands) if bands is not None else None, "embed_dim": dim, "patch_size": patch,
                "backbone_source": backbone.source, "normalization_override": backbone.normalization_override}  # fmt: skip
    kept = np.flatnonzero(taken)
    embeddings = ChipEmbeddings(paths=[tile_name(raster, *cells[i]) for i in kept], cls=cls[kept],
                                patch_mean=patch_mean[kept], sizes=np.full((len(kept), 2), tile_size, np.int64),
                                metadata=metadata)  # fmt: skip
    return embeddings, taken


def write_tile_embeddings(raster: str | os.PathLike[str], backbone: ChipBackbone | str | os.PathLike[str],
                          dst: str | os.PathLike[str], *, tile_size: int, bands: Sequence[int] | None = None,
                          nodata: float | None = None, size: int | None = 224, min_valid: float = 0.5,
                          batch_size: int = 32, device: str | None = None, amp: bool = False, progress: bool = True,
                          overwrite: bool = False) -> ChipEmbeddings:  # fmt: skip
    """Every ``tile_size``-px tile of a scene (the grid ``classify map`` cuts) holding data on ``min_valid`` of its
    pixels, embedded (:func:`embed_tiles`) and written as a table (atomically): a GeoParquet ``.parquet`` of the
    tiles' footprints in the scene's CRS with ``path`` (:func:`tile_name`), ``row``, ``col``, ``cls`` and
    ``patch_mean`` (``geopandas.read_parquet`` reads it; ``classify fit --scenes ... --embeddings`` fits probes on it
    without the backbone), or an ``.npz`` without footprints. The metadata also records the scene, the tile size and
    its side in metres. Returns the embeddings.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false (checked first). ValueError: as
        :func:`embed_tiles`, or a table format other than ``.parquet``/``.npz``.
    """
    import rasterio

    from dinov3_eo.data.raster import pixel_size_m
    from dinov3_eo.inference.writers import check_overwrite
    from dinov3_eo.tasks.chip_embeddings import EMBEDDING_SUFFIXES, write_chip_embeddings

    if Path(dst).suffix.lower() not in EMBEDDING_SUFFIXES:
        raise ValueError(f"Tile embeddings are written as {' or '.join(EMBEDDING_SUFFIXES)}, not {str(dst)!r}.")
    check_overwrite(dst, overwrite, inputs=[raster])
    if not Path(raster).is_file():
        raise FileNotFoundError(f"Scene {str(raster)!r} does not exist.")
    with rasterio.open(raster) as src:
        rows, cols = tile_grid_shape(src.height, src.width, tile_size)
        crs, transform = src.crs, src.transform
    cells = [(r, c) for r in range(rows) for c in range(cols)]
    embedded, taken = embed_tiles(raster, backbone, cells, tile_size=tile_size, bands=bands, nodata=nodata, size=size,
                                  min_valid=min_valid, batch_size=batch_size, device=device, amp=amp, progress=progress)  # fmt: skip
    kept = np.array([cells[i] for i in np.flatnonzero(taken)], np.int64).reshape(-1, 2)
    pixel = pixel_size_m(crs, transform)
    embedded.metadata.update(scene=os.fspath(raster), tile_size=int(tile_size), tile_m=pixel * tile_size if pixel else None,
                             min_valid=min_valid)  # fmt: skip
    footprints = tile_boxes(transform, tile_size, kept[:, 0], kept[:, 1])
    parquet = Path(dst).suffix.lower() == ".parquet"
    write_chip_embeddings(embedded, dst, overwrite=overwrite, columns={"row": kept[:, 0], "col": kept[:, 1]},
                          geometry=footprints if parquet else None, crs=crs if parquet else None)  # fmt: skip
    return embedded


class TileTensorDataset(torch.utils.data.Dataset):
    """Tiles of scenes as the backbone reads them (:func:`embedding_input`, resized to ``size``), with their targets:
    ``(image [C, S, S], patch_valid [S/p, S/p], target)``, what fine-tuning trains on
    (:func:`~dinov3_eo.tasks.chip_finetune.finetune_chip_classifier`) when the labels come from a scene.

    Args:
        tiles: ``(scene, row, col)`` of each tile on the grid of ``tile_size``-px tiles from its scene's origin.
        targets: ``[N]`` class ids, or ``[N, K]`` 0/1 rows.
    """

    def __init__(self, tiles: Sequence[tuple[str, int, int]], targets: np.ndarray, *, tile_size: int, patch_size: int,
                 normalization: Normalization | None, bands: Sequence[int] | None, size: int,
                 nodata: float | None = None) -> None:  # fmt: skip
        self.tiles = [(os.fspath(scene), int(row), int(col)) for scene, row, col in tiles]
        self.targets = np.asarray(targets)
        self.tile_size, self.patch_size, self.normalization = int(tile_size), int(patch_size), normalization
        self.bands, self.size, self.nodata = list(bands) if bands is not None else None, int(size), nodata
        self._open: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": {}}  # each worker opens the scenes itself

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        from dinov3_eo.data.raster import open_quietly, read_window

        scene, row, col = self.tiles[i]
        if scene not in self._open:
            self._open[scene] = open_quietly(scene)
        pixels, valid = read_window(self._open[scene], tile_window(row, col, self.tile_size), bands=self.bands,
                                    nodata=self.nodata)  # fmt: skip
        image, patch_valid = embedding_input(pixels, valid, patch_size=self.patch_size, normalization=self.normalization,
                                             size=self.size)  # fmt: skip
        return image, patch_valid, torch.as_tensor(self.targets[i])


class TileOutputs(NamedTuple):
    """What :func:`write_tile_classes` writes for one scene."""

    classes: Path
    tiles: Path
    quicklook: Path
    probabilities: Path | None
    suggest: Path | None = None
    set_size: Path | None = None


def tile_outputs(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, probabilities: bool = False,
                 suggest: bool = False, sets: bool = False) -> TileOutputs:  # fmt: skip
    """``OUT/<stem>_tile_classes.tif``, ``_tiles.gpkg``, ``_tile_quicklook.png`` (and ``_tile_probabilities.tif``,
    ``_suggest.gpkg``, ``_tile_set_size.tif``)."""
    stem, out = Path(src).stem, Path(out_dir)
    return TileOutputs(out / f"{stem}_tile_classes.tif", out / f"{stem}_tiles.gpkg", out / f"{stem}_tile_quicklook.png",
                       out / f"{stem}_tile_probabilities.tif" if probabilities else None,
                       out / f"{stem}_suggest.gpkg" if suggest else None,
                       out / f"{stem}_tile_set_size.tif" if sets else None)  # fmt: skip


def write_tile_classes(result: TileClasses, out_dir: str | os.PathLike[str], *, probabilities: bool = False,
                       quicklook_bands: Sequence[int] | None = None, nodata: float | None = None,
                       suggest: int = 0, overwrite: bool = False) -> TileOutputs:  # fmt: skip
    """Write :func:`tile_outputs` for ``result``, each atomically; the quick-look draws the tile classes over
    ``result.source``'s ``quicklook_bands`` as red, green, blue (default: the bands the tiles were classified on, in
    the order the probe's chips had them, else 1, 2, 3) with ``nodata`` shown white. ``suggest``: also that many
    tiles the probe is least sure of (:meth:`TileClasses.least_confident`), the ones to label next, as
    ``<stem>_suggest.gpkg``.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before anything is written).
    """
    import rasterio

    from dinov3_eo.inference.writers import check_overwrite, default_colormap, write_cog, write_quicklook, write_vector

    paths = tile_outputs(result.source, out_dir, probabilities=probabilities, suggest=suggest > 0,
                         sets=result.set_threshold is not None)  # fmt: skip
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path is not None:
            check_overwrite(path, overwrite, inputs=[result.source])
    ids = result.class_ids()
    colormap = default_colormap(len(result.class_names))
    write_cog(paths.classes, ids, crs=result.crs, transform=result.transform, nodata=TILE_NODATA,
              class_names=result.class_names, colormap=colormap, overwrite=overwrite,
              tags={"tile_size": result.tile_size, "stride": result.stride or result.tile_size,
                    "source": Path(result.source).name})  # fmt: skip
    if paths.probabilities is not None:
        write_cog(paths.probabilities, result.probabilities, crs=result.crs, transform=result.transform,
                  nodata=float("nan"), band_descriptions=result.classes, overwrite=overwrite)  # fmt: skip
    if paths.set_size is not None:
        write_cog(paths.set_size, result.set_sizes(), crs=result.crs, transform=result.transform, nodata=TILE_NODATA,
                  band_descriptions=[f"classes in the {100 * (result.set_coverage or 0):.0f} % prediction set"],
                  overwrite=overwrite, tags={"set_threshold": result.set_threshold, "coverage": result.set_coverage})  # fmt: skip
    frame = result.to_geodataframe()
    write_vector(frame, paths.tiles, layer="tiles", overwrite=overwrite)
    if paths.suggest is not None:
        write_vector(result.least_confident(suggest), paths.suggest, layer="suggest", overwrite=overwrite)
    with rasterio.open(result.source) as src:
        bands = _shown_bands(quicklook_bands or result.bands, src.count)
    write_quicklook(paths.quicklook, classes=paths.classes, image=result.source, bands=bands, nodata=nodata,
                    title=f"{Path(result.source).name}: {result.tile_size}-px tiles"
                    + (f" every {result.stride} px" if result.stride and result.stride != result.tile_size else ""),
                    overwrite=overwrite)  # fmt: skip
    return paths


def _shown_bands(bands: Sequence[int] | None, count: int) -> list[int]:
    """The bands a quick-look draws as red, green, blue: ``bands`` (default 1, 2, 3) that a ``count``-band scene has,
    at most three; band 1 (grey) where none is left."""
    return [b for b in (bands or (1, 2, 3)) if b <= count][:3] or [1]


def write_tile_picture(dst: str | os.PathLike[str], scene: str | os.PathLike[str], *, tile_size: int,
                       rows: np.ndarray, cols: np.ndarray, ids: np.ndarray, class_names: Sequence[str],
                       bands: Sequence[int] | None = None, nodata: float | None = None, title: str | None = None,
                       colormap: dict[int, Sequence[int]] | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """A PNG of some of a scene's ``tile_size``-px tiles (cells ``rows``, ``cols``) coloured by ``ids`` (into
    ``class_names``) over its imagery (``bands`` as red, green, blue; default 1, 2, 3): which tiles were labelled
    what, held out or mistaken, at a glance (:func:`~dinov3_eo.inference.writers.write_quicklook`)."""
    import tempfile

    import rasterio

    from dinov3_eo.inference.writers import write_cog, write_quicklook

    with rasterio.open(scene) as src:
        shape, crs, transform, count = tile_grid_shape(src.height, src.width, tile_size), src.crs, src.transform, src.count
    grid = np.full(shape, TILE_NODATA, np.uint8)
    grid[np.asarray(rows), np.asarray(cols)] = np.asarray(ids, np.uint8)
    shown = _shown_bands(bands, count)
    with tempfile.TemporaryDirectory() as tmp:
        classes = write_cog(Path(tmp) / "tiles.tif", grid, crs=crs, transform=transform @ Affine.scale(tile_size),
                            nodata=TILE_NODATA, class_names=list(class_names))  # fmt: skip
        return write_quicklook(dst, classes=classes, image=scene, bands=shown, nodata=nodata, title=title,
                               colormap=colormap, overwrite=overwrite)  # fmt: skip


__all__ = [
    "TILE_NODATA",
    "UNKNOWN",
    "TileClasses",
    "TileGrid",
    "TileOutputs",
    "TileTensorDataset",
    "classify_tiles",
    "embed_tiles",
    "predict_tile_grid",
    "probe_tile_size",
    "tile_grid_shape",
    "tile_boxes",
    "tile_name",
    "tile_outputs",
    "tile_window",
    "write_tile_classes",
    "write_tile_embeddings",
    "write_tile_picture",
]
