"""One embedding per polygon (field parcel, tree crown, building, stand): the backbone's patch features averaged over
each polygon, for object-based classification and search.

A polygon's embedding is the mean of the last-layer patch tokens (normed, as ``embed`` writes them) over the
patches it overlaps, each weighted by the area of the polygon inside it (exact polygon-square intersections), so a
parcel smaller than a patch takes the features of the patches it lies in, in proportion, and one that straddles a
nodata edge is the mean of its patches that saw data. The scene is streamed window by window
(:func:`~dinov3_eo.tasks.features.stream_patch_features`: memory flat in its size; the zones' sums, ``[zones, D]``
float64, are what grows), and only the windows some polygon meets are embedded. Each row also says how much of the
polygon had features (``coverage``) and over how many patches (``patches``).

``dinov3-eo embed SCENE.tif --zones parcels.gpkg --model BACKBONE.pth -o parcels.parquet`` writes the table as
GeoParquet: the zones' own columns and geometry (in their CRS), ``patch_mean`` (a list of D floats), ``coverage``
and ``patches``. A probe fitted on the ``patch_mean`` of labelled zones classifies the others
(:func:`~dinov3_eo.tasks.chip_classification.fit_chip_classifier`, README).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ZoneSums:
    """One raster's patch features summed over each of ``Z`` polygons, weighted by the polygon's area in each patch.

    Attributes:
        sums: ``[Z, D]`` float64, the area-weighted sums of the patch tokens.
        weights: ``[Z]`` the area of each polygon with features (in the raster CRS's units², as ``areas``).
        counts: ``[Z]`` int64, the patches with features each polygon overlaps.
        areas: ``[Z]`` each polygon's area in the raster's CRS.
    """

    sums: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    areas: np.ndarray

    def means(self) -> np.ndarray:
        """``[Z, D]`` float32: each polygon's mean patch token; NaN rows where it saw no features."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (self.sums / self.weights[:, None]).astype(np.float32)

    def coverage(self) -> np.ndarray:
        """``[Z]`` the share of each polygon's area with features (0 for an empty polygon)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.minimum(np.where(self.areas > 0, self.weights / self.areas, 0.0), 1.0)


def pool_zone_sums(parts: Sequence[ZoneSums]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several rasters' sums over the same polygons as one (a date's scenes, a mosaic), so that a polygon over a
    seam is the weighted mean of both sides: ``(means [Z, D] float64, NaN rows without features; coverage [Z];
    counts [Z])``. Sums, weights and patch counts add up; each raster's areas are in its own CRS, so the coverage
    shares add (at most 1) rather than the areas."""
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sum(part.sums for part in parts) / sum(part.weights for part in parts)[:, None]
    return means, np.minimum(sum(part.coverage() for part in parts), 1.0), sum(part.counts for part in parts)


def zone_feature_sums(
    backbone: Any,
    raster: Any,
    frame: Any,
    *,
    normalization: Any = None,
    bands: list[int] | None = None,
    nodata: float | None = None,
    window: int = 512,
    margin: int = 64,
    batch_size: int = 4,
    device: str = "cpu",
    amp: bool = False,
    progress: bool = True,
    upsample: int = 1,
) -> ZoneSums:
    """The polygons of ``frame`` (a ``GeoDataFrame`` with a CRS, as :func:`~dinov3_eo.tasks.zonal.read_zones`
    gives) against ``raster``'s patch features, streamed window by window: :class:`ZoneSums`. ``raster``: a GeoTIFF
    path, an open rasterio dataset or an ``xarray.DataArray`` with a CRS; the other arguments as
    :func:`zone_embeddings`."""
    import contextlib

    import rasterio.windows
    import shapely
    from affine import Affine
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT
    from scipy.sparse import csr_matrix

    from dinov3_eo.data.raster import open_raster, require_georeferenced, tile_boxes
    from dinov3_eo.tasks.features import FeatureGrid, stream_patch_features

    if int(upsample) < 1:
        raise ValueError(f"upsample must be a whole factor of at least 1, not {upsample}.")
    dim = int(backbone.embed_dim)
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(open_raster(raster))
        require_georeferenced(src)
        if upsample > 1:  # the scene read on a k-times finer grid: k^2 patches where one was (small parcels, 30 m)
            bands = list(bands) if bands else list(range(1, src.count + 1))
            fill = nodata if nodata is not None else src.nodata
            src = stack.enter_context(WarpedVRT(
                src, crs=src.crs, transform=src.transform @ Affine.scale(1 / upsample), width=src.width * upsample,
                height=src.height * upsample, resampling=Resampling.bilinear, src_nodata=fill, nodata=fill,
                add_alpha=fill is None,
            ))  # fmt: skip
        grid = FeatureGrid.of(src, int(backbone.patch_size))
        polygons = frame.geometry.to_crs(src.crs).to_numpy()
        areas = shapely.area(polygons)
        shapely.prepare(polygons)  # many containment tests against each
        zone_tree = shapely.STRtree(polygons)
        cell_area = abs(grid.transform.a * grid.transform.e)
        sums = np.zeros((len(frame), dim), np.float64)
        weights = np.zeros(len(frame), np.float64)
        counts = np.zeros(len(frame), np.int64)

        def near_zones(tile: rasterio.windows.Window) -> np.ndarray:
            return zone_tree.query(shapely.box(*rasterio.windows.bounds(tile, grid.transform)), predicate="intersects")

        # windows that no polygon meets are never read nor embedded: parcels over a corner of a tile cost the corner
        for tile, feats in stream_patch_features(backbone, src, normalization=normalization, bands=bands, nodata=nodata,
                                                 window=window, margin=margin, batch_size=batch_size, device=device,
                                                 amp=amp, progress=progress,
                                                 keep=lambda tile: len(near_zones(tile)) > 0):  # fmt: skip
            rows, cols = (a.ravel() for a in np.mgrid[0 : int(tile.height), 0 : int(tile.width)])
            seen = np.isfinite(feats[0, rows, cols])
            rows, cols = rows[seen], cols[seen]  # [K] the tile's cells with features
            if not len(rows):
                continue
            near = near_zones(tile)
            boxes = tile_boxes(grid.transform, 1, rows + int(tile.row_off), cols + int(tile.col_off))
            # every (zone, cell) pair that meets, and the area they share, for all the window's zones at once
            which, cell = shapely.STRtree(boxes).query(polygons[near], predicate="intersects")
            zone = near[which]
            # a cell wholly inside its zone shares its whole area: only the cells on a zone's edge are cut
            overlap = np.full(len(zone), cell_area)
            edge = ~shapely.contains_properly(polygons[zone], boxes[cell])
            overlap[edge] = shapely.area(shapely.intersection(boxes[cell[edge]], polygons[zone[edge]]))
            keep = overlap > 0
            zone, cell, overlap = zone[keep], cell[keep], overlap[keep]
            if not len(zone):
                continue
            present, slot = np.unique(zone, return_inverse=True)
            share = csr_matrix((overlap, (slot, cell)), shape=(len(present), len(rows)))  # [Z_tile, K] m²
            sums[present] += share @ feats[:, rows, cols].T.astype(np.float64)  # [Z_tile, D]
            weights[present] += np.bincount(slot, weights=overlap, minlength=len(present))
            counts[present] += np.bincount(slot, minlength=len(present))
    return ZoneSums(sums=sums, weights=weights, counts=counts, areas=areas)


def weights_fingerprint(module: Any, *, first: int = 4, last: int = 6) -> str:
    """A short digest of a module's first and last weight tensors (a ViT's tokens and patch embedding, its last
    block and norm: any training changes them), so that two checkpoints of one architecture and name are told
    apart without hashing every weight."""
    import hashlib

    state = list(module.state_dict().items())
    digest = hashlib.sha1()
    for name, tensor in state[:first] + state[max(first, len(state) - last) :]:
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def backbone_record(backbone: Any) -> dict[str, Any]:
    """How a zone table's features were made, as its ``attrs["dinov3_eo"]`` (and a probe fitted on it) keep it:
    the backbone's name, sizes, the kind of features and its weights' fingerprint (:func:`weights_fingerprint` of
    the module its ``fingerprint_source`` names, else of itself)."""
    meta = getattr(backbone, "meta", None)
    return {"backbone": getattr(meta, "name", getattr(backbone, "name", "custom")),
            "patch_size": int(backbone.patch_size), "embed_dim": int(backbone.embed_dim),
            "features": getattr(backbone, "feature_kind", "patch_mean"),
            "weights": weights_fingerprint(getattr(backbone, "fingerprint_source", backbone))}  # fmt: skip


def same_weights(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two records (a table's, a probe's) may come from one set of weights: their fingerprints agree, or
    one of them has none (made before fingerprints were recorded)."""
    return not (a.get("weights") and b.get("weights")) or a["weights"] == b["weights"]


def zone_embeddings(
    backbone: Any,
    raster: str | os.PathLike[str],
    zones: Any,
    *,
    normalization: Any = None,
    bands: list[int] | None = None,
    nodata: float | None = None,
    window: int = 512,
    margin: int = 64,
    batch_size: int = 4,
    device: str = "cpu",
    amp: bool = False,
    progress: bool = True,
    upsample: int = 1,
) -> Any:
    """The area-weighted mean patch feature of each polygon of ``zones`` over ``raster`` (module docstring).

    Args:
        backbone: a ViT (``patch_size``, ``embed_dim``, ``get_intermediate_layers``).
        raster: a georeferenced GeoTIFF; zones: a ``GeoDataFrame`` (any CRS) or a vector file's path.
        normalization, bands, nodata, window, margin, batch_size, device, amp: as
            :func:`~dinov3_eo.tasks.features.stream_patch_features`.
        upsample: read the scene on a grid this many times finer (bilinear), so that a patch covers 1/k² of the
            ground it would (parcels of a few pixels on 10-30 m imagery get their own patches; k² the compute).

    Returns:
        ``zones`` (in their CRS, their columns) with ``patch_mean`` (``[D]`` float32 arrays; NaN for a zone with no
        valid patch), ``coverage`` (share of the zone's area with features) and ``patches`` (patches it overlaps that
        had features).

    Raises:
        FileNotFoundError, ValueError: a raster without a georeference, zones that are missing, without a CRS, none,
            or other than polygons (:func:`~dinov3_eo.tasks.zonal.read_zones`).
    """
    from dinov3_eo.tasks.zonal import read_zones

    frame = read_zones(zones)
    summed = zone_feature_sums(backbone, raster, frame, normalization=normalization, bands=bands, nodata=nodata,
                               window=window, margin=margin, batch_size=batch_size, device=device, amp=amp,
                               progress=progress, upsample=upsample)  # fmt: skip
    out = frame.copy()
    out["patch_mean"] = list(summed.means())
    out["coverage"] = summed.coverage()
    out["patches"] = summed.counts
    out.attrs["dinov3_eo"] = {**backbone_record(backbone), "source": os.fspath(raster), "upsample": int(upsample)}
    return out


def write_zone_embeddings(table: Any, dst: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """:func:`zone_embeddings`' table written atomically as GeoParquet (``.parquet``), how it was made (its
    ``attrs["dinov3_eo"]``: backbone, patch size, source raster) in the schema's ``dinov3_eo`` key, as chip tables.

    Raises:
        ValueError: another suffix. FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    import json

    import pyarrow.parquet as pq

    from dinov3_eo.inference.writers import atomic_output

    if Path(dst).suffix.lower() != ".parquet":
        raise ValueError(f"Zone embeddings are written as GeoParquet (.parquet), not {os.fspath(dst)!r}.")
    with atomic_output(dst, overwrite=overwrite) as tmp:
        table.assign(patch_mean=[np.asarray(v, np.float32).tolist() for v in table["patch_mean"]]).to_parquet(tmp)
        written = pq.read_table(tmp)
        schema = {**(written.schema.metadata or {}), b"dinov3_eo": json.dumps(table.attrs.get("dinov3_eo", {})).encode()}
        pq.write_table(written.replace_schema_metadata(schema), tmp)
    return Path(dst)


#: what a table of polygons from a zone table (predictions, matches) is written as
ZONE_ROW_SUFFIXES = (".gpkg", ".geojson", ".csv", ".parquet")


def write_zone_rows(frame: Any, dst: str | os.PathLike[str], *, layer: str, overwrite: bool = False) -> Path:
    """Polygons with their columns (no ``patch_mean``) written atomically by ``dst``'s suffix: GeoPackage, GeoJSON,
    CSV (:func:`~dinov3_eo.inference.writers.write_features`) or GeoParquet.

    Raises:
        ValueError: another suffix. FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    from dinov3_eo.inference.writers import atomic_output, write_features

    if Path(dst).suffix.lower() not in ZONE_ROW_SUFFIXES:
        raise ValueError(f"Polygons are written as {', '.join(ZONE_ROW_SUFFIXES)}, not {os.fspath(dst)!r}.")
    if Path(dst).suffix.lower() != ".parquet":
        return write_features(frame, dst, layer=layer, overwrite=overwrite)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        frame.to_parquet(tmp)
    return Path(dst)


def read_zone_embeddings(path: str | os.PathLike[str]) -> tuple[Any, np.ndarray]:
    """A table written by :func:`write_zone_embeddings`: ``(the GeoDataFrame, its patch_mean as [N, D] float32)``,
    how it was made in the frame's ``attrs["dinov3_eo"]``.

    Raises:
        FileNotFoundError: no such file. ValueError: a file that is not such a table (no ``patch_mean`` column).
    """
    import json

    import geopandas as gpd
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise FileNotFoundError(f"Zone table {os.fspath(path)!r} does not exist: 'embed SCENE --zones POLYGONS -o "
                                "TABLE.parquet' makes one.")  # fmt: skip
    try:
        table = gpd.read_parquet(path)
    except Exception as e:  # pyarrow's and geopandas' errors for a file that is no GeoParquet table
        raise ValueError(f"{os.fspath(path)!r} is not a GeoParquet table of 'embed --zones' ({str(e).splitlines()[0]}).") from e
    if "patch_mean" not in table.columns:
        raise ValueError(f"{os.fspath(path)!r} has no patch_mean column: it is not a table of 'embed --zones'.")
    meta = (pq.read_schema(path).metadata or {}).get(b"dinov3_eo")
    table.attrs["dinov3_eo"] = json.loads(meta) if meta else {}
    x = np.stack([np.asarray(v, np.float32) for v in table["patch_mean"]]) if len(table) else np.zeros((0, 0), np.float32)
    return table, x


def read_zone_tables(paths: str | os.PathLike[str] | list[str | os.PathLike[str]]) -> tuple[Any, np.ndarray]:
    """One or more zone tables (scenes or regions embedded apart) as one: ``(frame, x [N, D])``. Several must come
    from one backbone with as many dates, or be seasons of two or more dates (other years, other days), which are
    interpolated to the first table's days of the year
    (:func:`~dinov3_eo.tasks.zone_time_series.season_at`; said on stderr); their rows are stacked (in the first
    table's CRS) with a ``zone_table`` column naming each row's file, and ``attrs["dinov3_eo"]`` is the first's with
    every file in ``tables``.

    Raises:
        FileNotFoundError: a missing file. ValueError: not zone tables, or tables embedded differently (named).
    """
    import geopandas as gpd
    import pandas as pd

    from dinov3_eo.tasks.zone_time_series import season_at

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if len(paths) == 1:
        return read_zone_embeddings(paths[0])
    frames, arrays = [], []
    for path in paths:
        table, x = read_zone_embeddings(path)
        frames.append(table.assign(zone_table=Path(path).name))
        arrays.append(x)
    first = frames[0].attrs.get("dinov3_eo", {})
    key = ("backbone", "patch_size", "embed_dim", "temporal", "features")
    for i, (path, frame, x) in enumerate(zip(paths[1:], frames[1:], arrays[1:]), start=1):
        made = frame.attrs.get("dinov3_eo", {})
        differs = [k for k in key if made.get(k) != first.get(k)]
        if made.get("upsample", 1) != first.get("upsample", 1):
            differs.append("upsample")
        if not same_weights(made, first):
            differs.append("weights")
        # another year's season (other days, more or fewer dates) at the first table's days of the year
        at_first = None
        if made.get("dates") and first.get("dates") and made.get("temporal", "concat") == "concat" == first.get("temporal", "concat"):
            at_first = season_at(x, made["dates"], first["dates"])
        if at_first is not None:
            x = arrays[i] = at_first
            print(f"{os.fspath(path)}: its {len(made['dates'])} dates interpolated to the days of the year of "
                  f"{os.fspath(paths[0])}'s ({', '.join(d[5:] for d in first['dates'])}).", file=sys.stderr)  # fmt: skip
        elif len(made.get("dates") or []) != len(first.get("dates") or []):
            differs.append("number of dates")
        if differs or (len(x) and len(arrays[0]) and x.shape[1] != arrays[0].shape[1]):
            raise ValueError(f"{os.fspath(path)} was embedded otherwise than {os.fspath(paths[0])} "
                             f"({', '.join(differs) or 'feature width'}): tables used together need one backbone "
                             "and as many dates.")  # fmt: skip
    crs = frames[0].crs
    stacked = gpd.GeoDataFrame(pd.concat([f.to_crs(crs) for f in frames], ignore_index=True), crs=crs)
    width = max((a.shape[1] for a in arrays if a.size), default=0)
    stacked.attrs["dinov3_eo"] = {**first, "tables": [os.fspath(p) for p in paths]}
    return stacked, np.concatenate([a.reshape(len(a), width) for a in arrays]) if width else np.zeros((0, 0), np.float32)


__all__ = ["ZONE_ROW_SUFFIXES", "ZoneSums", "backbone_record", "pool_zone_sums", "read_zone_embeddings", "read_zone_tables",
           "same_weights",
           "weights_fingerprint", "write_zone_embeddings", "write_zone_rows", "zone_embeddings", "zone_feature_sums"]
