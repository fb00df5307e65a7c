"""Reference values of a scene's tiles: what a tile regressor is fitted and scored on.

Continuous references come as a raster (a LiDAR canopy height model, a biomass or tree-cover map), as field plots
(points with a measured value: GEDI footprints, inventory plots) or as polygons carrying a value (forest stands).
:func:`value_tiles` lays the grid of ``tile_size``-px tiles that ``classify map`` and ``regress map`` cut over the
scene (from its origin) and gives each tile one number:

- a raster is read onto the tiles at the scene's resolution, or finer where the raster is finer (a 1 m CHM under
  10 m imagery is read at 1.25 m, not resampled away; ``oversample``), nearest, and each tile's valid values are
  summarised by a :data:`STATISTICS` entry (mean height, 95th percentile, canopy cover ``above:5``, forest share of a
  land-cover map ``equal:5``), where at least ``min_valid`` of the tile has a value;
- polygons are burnt onto the same grid with their value, then summarised the same way;
- points give each tile the statistic of the points inside it (``min_points`` of them at least).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.transform import Affine

from dinov3_eo.tasks.tile_labels import NoLabelledTiles

#: tile statistics: ``pNN`` is the NN-th percentile (0-100), ``above:T`` the share of a tile's values above ``T``
#: (canopy cover), ``equal:V`` the share equal to ``V`` (a class's cover in a land-cover map)
STATISTICS = ("mean", "median", "min", "max", "std", "pNN", "above:T", "equal:V")
#: the most a tile is read finer than the scene's pixels (a 10 m tile read at 1.25 m under a 1 m CHM)
MAX_OVERSAMPLE = 8


def check_statistic(statistic: str) -> str:
    """``statistic`` if it is a :data:`STATISTICS` entry (``"p95"``, ``"above:2"``), else a ``ValueError`` that lists
    them."""
    if statistic in ("mean", "median", "min", "max", "std"):
        return statistic
    match = re.fullmatch(r"p(\d+(?:\.\d+)?)", statistic)
    if match and 0.0 <= float(match.group(1)) <= 100.0:
        return statistic
    kind, _, number = statistic.partition(":")
    if kind in ("above", "equal"):
        try:
            float(number)
            return statistic
        except ValueError:
            pass
    raise ValueError(f"Unknown tile statistic {statistic!r}; use one of mean, median, min, max, std, pNN (a percentile, "
                     "p95), above:T (share of values above T, canopy cover above:5) or equal:V (share equal to V).")  # fmt: skip


def _sorted_quantile(ordered: np.ndarray, start: np.ndarray, n: np.ndarray, q: float) -> np.ndarray:
    """The ``q``-th percentile (numpy's linear interpolation) of groups of sorted values: group ``i`` is
    ``ordered[start[i] : start[i] + n[i]]`` (``n >= 1``)."""
    position = (n - 1) * q / 100.0
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    a, b = ordered[start + low].astype(np.float64), ordered[start + high].astype(np.float64)
    return a + (position - low) * (b - a)


def tile_statistic(values: np.ndarray, statistic: str) -> np.ndarray:
    """``[N]`` float64 ``statistic`` (:data:`STATISTICS`) of each row of ``values`` ``[N, P]`` over its finite
    entries (NaN: no value); NaN for a row without one. Float32 rows stay float32 (sums accumulate in float64)."""
    values = np.asarray(values)
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    check_statistic(statistic)
    finite = np.isfinite(values)
    n = finite.sum(axis=1)
    out = np.full(len(values), np.nan)
    has = n > 0
    if not has.any():
        return out
    v, f, n = values[has], finite[has], n[has]
    kind, _, number = statistic.partition(":")
    if kind == "above":
        out[has] = ((v > float(number)) & f).sum(axis=1) / n
    elif kind == "equal":
        out[has] = ((v == float(number)) & f).sum(axis=1) / n
    elif statistic == "mean":
        out[has] = np.where(f, v, 0.0).sum(axis=1, dtype=np.float64) / n
    elif statistic == "std":
        mean = np.where(f, v, 0.0).sum(axis=1, dtype=np.float64, keepdims=True) / n[:, None]
        out[has] = np.sqrt(np.where(f, (v - mean) ** 2, 0.0).sum(axis=1) / n)
    elif statistic == "min":
        out[has] = np.where(f, v, np.inf).min(axis=1)
    elif statistic == "max":
        out[has] = np.where(f, v, -np.inf).max(axis=1)
    else:  # median and percentiles: NaN sorts last, so each row's q-th value lies among its first n
        q = 50.0 if statistic == "median" else float(statistic[1:])
        out[has] = _sorted_quantile(np.sort(v, axis=1).ravel(), np.arange(len(v)) * v.shape[1], n, q)
    return out


def grouped_statistic(values: np.ndarray, groups: np.ndarray, statistic: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(group ids [G] ascending, statistic [G] float64, counts [G])`` of finite ``values`` ``[M]`` grouped by
    integer ``groups`` ``[M]`` (:data:`STATISTICS`, as :func:`tile_statistic` computes them): memory in ``M``,
    however many values one group holds (a GEDI track's shots in one tile)."""
    check_statistic(statistic)
    values, groups = np.asarray(values, np.float64), np.asarray(groups, np.int64)
    order = np.lexsort((values, groups))  # by group, then value: each group's values sorted and contiguous
    v, g = values[order], groups[order]
    ids, start, n = np.unique(g, return_index=True, return_counts=True)
    if not len(ids):
        return ids, np.zeros(0), n

    def mean_of(x: np.ndarray) -> np.ndarray:
        return np.add.reduceat(x, start) / n

    kind, _, number = statistic.partition(":")
    if kind == "above":
        out = mean_of((v > float(number)).astype(np.float64))
    elif kind == "equal":
        out = mean_of((v == float(number)).astype(np.float64))
    elif statistic == "mean":
        out = mean_of(v)
    elif statistic == "std":
        out = np.sqrt(mean_of((v - np.repeat(mean_of(v), n)) ** 2))
    elif statistic == "min":
        out = v[start]
    elif statistic == "max":
        out = v[start + n - 1]
    else:
        out = _sorted_quantile(v, start, n, 50.0 if statistic == "median" else float(statistic[1:]))
    return ids, out, n


@dataclass
class TileValues:
    """One reference value per tile of a scene, on the grid of ``tile_size``-px tiles from the scene's origin (cell
    ``(row, col)`` = :func:`~dinov3_eo.tasks.tile_classification.tile_window`).

    Attributes:
        source: the scene.
        rows, cols: ``[N]`` int64 grid cells of the tiles.
        values: ``[N]`` float64 each tile's reference value (``statistic`` of what covers it).
        coverage: ``[N]`` share of the tile with a reference value (raster and polygons; NaN for points).
        count: ``[N]`` int64 values summarised per tile (pixels of the read grid, or points).
        tile_size: tile side in scene pixels.
        statistic: how each tile's values were summarised.
        crs, transform: the scene's.
    """

    source: str
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray
    coverage: np.ndarray
    count: np.ndarray
    tile_size: int
    statistic: str = "mean"
    crs: Any = None
    transform: Affine | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def cells(self) -> list[tuple[int, int]]:
        """``(row, col)`` of each tile."""
        return list(zip(self.rows.tolist(), self.cols.tolist()))

    def take(self, index: np.ndarray) -> TileValues:
        """The tiles at ``index`` (an index array or a bool mask)."""
        return TileValues(source=self.source, rows=self.rows[index], cols=self.cols[index], values=self.values[index],
                          coverage=self.coverage[index], count=self.count[index], tile_size=self.tile_size,
                          statistic=self.statistic, crs=self.crs, transform=self.transform)  # fmt: skip

    def to_geodataframe(self, columns: dict[str, Any] | None = None) -> Any:
        """The tiles as a ``geopandas.GeoDataFrame`` in the scene's CRS: ``row``, ``col``, ``tile_size``,
        ``reference`` (the value), ``coverage``, ``count``, plus ``columns`` (name -> ``[N]`` values)."""
        import geopandas as gpd

        from dinov3_eo.data.raster import tile_boxes

        frame = {"row": self.rows, "col": self.cols, "tile_size": np.full(len(self), self.tile_size),
                 "reference": self.values, "coverage": self.coverage, "count": self.count, **(columns or {})}  # fmt: skip
        return gpd.GeoDataFrame(frame, geometry=gpd.GeoSeries(tile_boxes(self.transform, self.tile_size, self.rows, self.cols),
                                                              crs=self.crs))  # fmt: skip


def _describe_values(values: Any) -> str:
    if hasattr(values, "geometry"):
        return "the GeoDataFrame"
    if isinstance(values, (list, tuple)):
        return f"the rasters {[os.fspath(v) for v in values]}"
    return repr(os.fspath(values))


#: the columns a CSV of points is read from: longitude and latitude in degrees (EPSG:4326)
CSV_COORDINATES = (("lon", "lat"), ("longitude", "latitude"))


def _read_points_csv(path: str | os.PathLike[str]) -> Any:
    """A CSV of points (field plots) as a ``GeoDataFrame``: longitude and latitude in degrees (:data:`CSV_COORDINATES`,
    any case)."""
    import geopandas as gpd
    import pandas as pd

    table = pd.read_csv(path)
    lower = {c.lower(): c for c in table.columns}
    for x, y in CSV_COORDINATES:
        if x in lower and y in lower:
            points = gpd.points_from_xy(table[lower[x]], table[lower[y]])
            return gpd.GeoDataFrame(table.drop(columns=[lower[x], lower[y]]), geometry=points, crs="EPSG:4326")
    raise ValueError(f"CSV {str(path)!r} has no longitude/latitude columns (lon, lat or longitude, latitude, in degrees); "
                     f"its columns are {list(table.columns)}. Other CRSs: write the points as a GeoPackage.")  # fmt: skip


def vector_values(values: Any, attribute: str | None) -> Any | None:
    """``values`` (a vector file, a CSV of ``lon``, ``lat`` points, or a ``GeoDataFrame``) as a ``GeoDataFrame`` with
    a float ``_value`` column from ``attribute`` (default: its only numeric column; rows without a finite value or a
    geometry dropped), or ``None`` for a raster."""
    import glob

    import geopandas as gpd

    from dinov3_eo.data.labels import is_geodataframe, is_raster_labels

    if is_geodataframe(values):
        frame = values
    elif isinstance(values, (list, tuple)) or is_raster_labels(values):
        return None
    elif not Path(values).is_file() and not glob.has_magic(os.fspath(values)):
        raise FileNotFoundError(f"Reference values {str(values)!r} do not exist.")
    elif os.fspath(values).lower().endswith(".csv"):
        frame = _read_points_csv(values)
    elif os.fspath(values).lower().endswith((".h5", ".hdf5", ".he5")):
        raise ValueError(f"Reference values {str(values)!r} are an HDF5 file: turn GEDI granules into filtered shots "
                         "first (dinov3-eo gedi GRANULES --within MAP.tif --out shots.gpkg) and give shots.gpkg.")
    else:
        frame = gpd.read_file(values)
    where = _describe_values(values)
    if frame.crs is None:
        raise ValueError(f"Reference values {where} have no CRS; set one (e.g. with ogr2ogr -a_srs).")
    from dinov3_eo.data.tables import numeric_columns

    numeric = numeric_columns(frame, exclude=(frame.geometry.name,))
    if attribute is None:
        if len(numeric) != 1:
            raise ValueError(f"Reference values {where} have the numeric columns {numeric}: name the one to fit "
                             "(--attribute).")  # fmt: skip
        attribute = numeric[0]
    if attribute not in frame.columns:
        raise KeyError(f"Reference values {where} have no column {attribute!r} (numeric columns: {numeric}).")
    value = np.asarray(frame[attribute], dtype=np.float64) if attribute in numeric else None
    if value is None:
        raise ValueError(f"Column {attribute!r} of {where} is not numeric; reference values must be numbers.")
    frame = frame.assign(_value=value)
    return frame[np.isfinite(value) & ~frame.geometry.is_empty & frame.geometry.notna()]


def value_tiles(
    scene: str | os.PathLike[str],
    values: Any,
    *,
    tile_size: int,
    statistic: str = "mean",
    attribute: str | None = None,
    band: int = 1,
    nodata: float | None = None,
    min_valid: float = 0.5,
    min_points: int = 1,
    oversample: int | None = None,
    strip_pixels: int = 4_000_000,
) -> TileValues:
    """The reference value of each ``tile_size``-px tile of ``scene`` that ``values`` cover.

    Args:
        scene: a georeferenced scene (its grid, not its pixels, is read).
        values: a raster (or several, files, folders or globs read as one
            :class:`~dinov3_eo.data.labels.RasterMosaic`), or a vector file / ``GeoDataFrame`` of points or polygons
            with a numeric ``attribute`` (default: its only numeric column), in any CRS.
        statistic: a :data:`STATISTICS` entry summarising each tile's values.
        band, nodata: the raster's band and a nodata value overriding its own (NaN is always missing).
        min_valid: the share of a tile that must have a value (raster, polygons), in ``(0, 1]``; a tile's part past
            the scene's edge has none (as ``classify map`` counts it as no data), so an edge tile only half inside
            the scene needs ``min_valid`` <= 0.5.
        min_points: points a tile must hold (points).
        oversample: the tile is read on a grid this many times finer than the scene's pixels (default: the scene's
            pixel over the raster's, 1 to :data:`MAX_OVERSAMPLE`); polygons: as for a raster of the scene's pixels.
        strip_pixels: values read at a time (whole rows of tiles): memory holds a strip, whatever the scene's size.

    Returns:
        The tiles with a value, row-major.

    Raises:
        FileNotFoundError: no such scene or values. KeyError: no column ``attribute``. ValueError: a scene without a
        georeference, an unknown ``statistic``, a bad ``tile_size``/``min_valid``, a vector without CRS or with a
        column that is not numeric, or (:class:`~dinov3_eo.tasks.tile_labels.NoLabelledTiles`) values that cover no
        tile of the scene enough (each in one sentence).
    """
    import rasterio

    from dinov3_eo.data.raster import require_georeferenced
    from dinov3_eo.tasks.tile_classification import tile_grid_shape

    check_statistic(statistic)
    if tile_size < 1:
        raise ValueError(f"The tile size must be a positive number of pixels, got {tile_size}.")
    if not 0.0 < min_valid <= 1.0:
        raise ValueError(f"min_valid must lie in (0, 1], got {min_valid}.")
    if not Path(scene).is_file():
        raise FileNotFoundError(f"Scene {str(scene)!r} does not exist.")
    with rasterio.open(scene) as src:
        require_georeferenced(src)
        crs, transform, height, width = src.crs, src.transform, src.height, src.width
    grid = tile_grid_shape(height, width, tile_size)
    frame = vector_values(values, attribute)
    what = _describe_values(values)
    common = dict(source=os.fspath(scene), tile_size=int(tile_size), statistic=statistic, crs=crs, transform=transform)
    if frame is not None and len(frame) and frame.geometry.geom_type.isin(["Point", "MultiPoint"]).all():
        found = _point_tiles(frame.to_crs(crs), transform, tile_size, (height, width), statistic, min_points)
        if not len(found[0]):
            raise NoLabelledTiles(f"No {tile_size}-px tile of scene {str(scene)!r} holds {min_points} point(s) of "
                                  f"{what}: they do not overlap (check both CRSs).")  # fmt: skip
        return TileValues(rows=found[0], cols=found[1], values=found[2], coverage=np.full(len(found[0]), np.nan),
                          count=found[3], **common)  # fmt: skip
    if frame is not None:
        frame = frame.to_crs(crs)
        factor = int(oversample or 1)
        read = _burner(frame)
    else:
        from dinov3_eo.data.labels import RasterMosaic

        mosaic = RasterMosaic(values, nodata=nodata, band=band, what="Reference values")
        factor = int(oversample) if oversample else _oversample_factor(mosaic, crs, transform)
        read = _mosaic_reader(mosaic, crs)
    if factor < 1:
        raise ValueError(f"oversample must be at least 1, got {factor}.")
    side = tile_size * factor
    rows, cols = grid
    per_strip = max(1, strip_pixels // (side * side * cols))
    fine = transform @ Affine.scale(1.0 / factor)
    found_rows, found_cols, found_values, found_cover, found_count = [], [], [], [], []
    best = 0.0
    for top in range(0, rows, per_strip):
        n = min(per_strip, rows - top)
        strip = read(fine @ Affine.translation(0, top * side), (n * side, cols * side))
        strip[max(0, (height - top * tile_size) * factor) :, :] = np.nan  # past the scene's edges: no value
        strip[:, width * factor :] = np.nan
        per_tile = strip.reshape(n, side, cols, side).transpose(0, 2, 1, 3).reshape(n * cols, side * side)
        count = np.isfinite(per_tile).sum(axis=1)
        cover = count / float(side * side)
        best = max(best, float(cover.max(initial=0.0)))
        keep = np.flatnonzero(cover >= min_valid)
        found_rows.append(top + keep // cols)
        found_cols.append(keep % cols)
        found_values.append(tile_statistic(per_tile[keep], statistic))
        found_cover.append(cover[keep])
        found_count.append(count[keep])
    kept_rows = np.concatenate(found_rows).astype(np.int64)
    if not len(kept_rows):
        if best == 0.0:
            raise NoLabelledTiles(f"No pixel of scene {str(scene)!r} has a reference value in {what}: they do not "
                                  "overlap (check both CRSs, and the raster's nodata).")  # fmt: skip
        raise NoLabelledTiles(f"No {tile_size}-px tile of {str(scene)!r} has a value from {what} on {min_valid:.0%} of "
                              f"it (at most {best:.0%}); lower --min-valid, or use smaller tiles.")  # fmt: skip
    return TileValues(rows=kept_rows, cols=np.concatenate(found_cols).astype(np.int64),
                      values=np.concatenate(found_values), coverage=np.concatenate(found_cover),
                      count=np.concatenate(found_count).astype(np.int64), **common)  # fmt: skip


def _oversample_factor(mosaic: Any, crs: Any, transform: Affine) -> int:
    """How many times finer than the scene's pixels a tile is read to keep the finest raster's detail: the scene's
    pixel over the raster's (both in metres, or in one CRS's units), 1 to :data:`MAX_OVERSAMPLE`."""
    from dinov3_eo.data.raster import pixel_size_m

    scene_pixel = pixel_size_m(crs, transform)
    ratios = []
    for f in mosaic.files:
        file_pixel = pixel_size_m(f.crs, f.transform) if f.transform is not None else None
        if scene_pixel and file_pixel:
            ratios.append(scene_pixel / file_pixel)
        elif f.crs == crs and f.transform is not None:
            ratios.append(abs(transform.a) / abs(f.transform.a))
    return int(min(MAX_OVERSAMPLE, max(1, round(max(ratios, default=1.0)))))


def _mosaic_reader(mosaic: Any, crs: Any) -> Any:
    """``read(transform, shape) -> float32 [H, W]`` (NaN: no value) of a raster mosaic on a grid in ``crs``."""
    from rasterio.enums import Resampling

    def read(transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        values, found = mosaic.read(crs=crs, transform=transform, shape=shape, resampling=Resampling.nearest)
        # float32 holds a CHM's, a biomass map's or a class map's values exactly enough, at half float64's memory
        return np.where(found, values.astype(np.float32), np.float32(np.nan))

    return read


def _burner(frame: Any) -> Any:
    """``read(transform, shape) -> float32 [H, W]``: polygons burnt with their ``_value`` (pixel centres inside; a
    later polygon over an earlier one)."""
    from rasterio.features import rasterize

    shapes = list(zip(frame.geometry, frame["_value"].astype(np.float64)))

    def read(transform: Affine, shape: tuple[int, int]) -> np.ndarray:
        if not shapes:
            return np.full(shape, np.nan, np.float32)
        return rasterize(shapes, out_shape=shape, transform=transform, fill=np.nan, dtype="float32")

    return read


def _point_tiles(frame: Any, transform: Affine, tile_size: int, shape: tuple[int, int], statistic: str,
                 min_points: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``(rows, cols, values, counts)`` of the tiles holding at least ``min_points`` of ``frame``'s points (in the
    scene's CRS), each tile's value the ``statistic`` of its points' (:func:`grouped_statistic`)."""
    points = frame.explode(index_parts=False)
    col, row = ~transform @ (points.geometry.x.to_numpy(), points.geometry.y.to_numpy())
    col, row = np.floor(np.asarray(col)), np.floor(np.asarray(row))
    inside = (col >= 0) & (row >= 0) & (col < shape[1]) & (row < shape[0])
    grid_cols = -(-shape[1] // tile_size)
    cell = (row[inside] // tile_size).astype(np.int64) * grid_cols + (col[inside] // tile_size).astype(np.int64)
    ids, value, counts = grouped_statistic(points["_value"].to_numpy(np.float64)[inside], cell, statistic)
    keep = counts >= max(1, min_points)
    rows, cols = np.divmod(ids[keep], grid_cols)
    return rows, cols, value[keep], counts[keep].astype(np.int64)


__all__ = ["MAX_OVERSAMPLE", "STATISTICS", "TileValues", "check_statistic", "grouped_statistic", "tile_statistic",
           "value_tiles", "vector_values"]
