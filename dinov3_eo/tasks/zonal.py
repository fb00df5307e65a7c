"""Zonal statistics: any map summarised over polygons (stands, parcels, districts, watersheds), the table a report
is made of: the mean canopy height of each stand, the hectares of forest loss in each district, the share of each
land-cover class in each parcel.

:func:`zonal_statistics` reads the raster block by block (memory flat in its size) and rasterises the zones that
meet each block onto it, a pixel belonging to a zone when its centre lies inside (``all_touched``: any pixel the
zone touches). Zones that overlap are rasterised in layers of zones that do not (:func:`overlap_free_layers`), so a
pixel under two zones counts in both. A zone cut by a block edge is summed across blocks, whole again.

* A **value** map (heights, biomass, change in metres) gives per zone its pixel ``count`` with a value, the
  ``coverage`` (that count over the zone's pixels), ``mean``, ``std``, ``min``, ``max``, ``sum``, any percentiles
  (the inverted-CDF percentile, the smallest value with at least q % of the zone's pixels at or below it, read from
  a 1,000-bin histogram over the raster's range: within a thousandth of that range), the zone's ``area_ha``, and for
  a density per hectare (unit ``Mg/ha``) the ``total_Mg``.
* A **class** map (``segment predict``, ``height change``'s classes, ``query``) gives per zone the hectares
  (pixels on a grid in degrees) and share of each class, and its ``majority`` class.

``dinov3-eo zonal MAP.tif ZONES.gpkg -o zones.gpkg`` is the command; the zones keep their own columns.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: what a value map's zones get, in column order (then ``p<q>`` percentiles, ``area_ha`` and ``total_<unit>``)
VALUE_COLUMNS = ("count", "coverage", "mean", "std", "min", "max", "sum")
#: the histogram bins percentiles are read from
PERCENTILE_BINS = 1000


def overlap_free_layers(geometries: Any) -> list[np.ndarray]:
    """Positions of ``geometries`` (a ``GeoSeries``) split into layers whose members do not intersect one another
    (a greedy colouring of the overlap graph): most zones tile the ground and make one layer; GEDI footprints ~60 m
    apart along a track make a second where tracks cross."""
    n = len(geometries)
    if n == 0:
        return []
    left, right = geometries.sindex.query(geometries.to_numpy(), predicate="intersects")
    neighbours: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(left.tolist(), right.tolist()):
        if a != b:
            neighbours[a].append(b)
    colour = np.full(n, -1)
    for i in range(n):
        taken = {colour[j] for j in neighbours[i] if colour[j] >= 0}
        colour[i] = next(c for c in range(len(taken) + 1) if c not in taken)
    return [np.flatnonzero(colour == c) for c in range(colour.max() + 1)]


def read_zones(zones: Any, layer: str | None = None) -> Any:
    """``zones`` (a vector file or a ``GeoDataFrame``) as a ``GeoDataFrame`` with a 0..n-1 index.

    Raises:
        FileNotFoundError: no such file. ValueError: zones without a CRS, none, or other than polygons.
    """
    from dinov3_eo.data.labels import is_geodataframe, read_vector

    frame = read_vector(zones, "Zones", layer=layer)
    if frame.crs is None:
        raise ValueError(f"Zones {os.fspath(zones) if not is_geodataframe(zones) else ''!s} have no CRS; set one "
                         "(e.g. with ogr2ogr -a_srs).")  # fmt: skip
    if not len(frame):
        raise ValueError("There are no zones to summarise the map over.")
    kinds = set(frame.geometry.dropna().geom_type)
    if kinds - {"Polygon", "MultiPolygon"}:
        raise ValueError(f"Zones must be polygons; these hold {sorted(kinds)} (buffer points or lines first).")
    return frame.reset_index(drop=True)


def _is_class_map(src: Any, band: int) -> bool:
    """A raster of classes: named classes (a ``class_names`` tag), or integers with a colour table."""
    from dinov3_eo.data.raster import tagged_class_names

    if tagged_class_names(src, band) is not None:
        return True
    if not np.issubdtype(np.dtype(src.dtypes[band - 1]), np.integer):
        return False
    try:
        src.colormap(band)
    except ValueError:
        return False
    return True


class _ValueSums:
    """Per-zone running sums of a value map (shifted by ``origin`` so that squares keep their precision)."""

    def __init__(self, n: int, origin: float, span: float, percentiles: Sequence[float]) -> None:
        self.count, self.total, self.squares = np.zeros(n, np.int64), np.zeros(n), np.zeros(n)
        self.low, self.high = np.full(n, np.inf), np.full(n, -np.inf)
        self.origin, self.span, self.percentiles = origin, max(span, 1e-12), list(percentiles)
        self.histogram = np.zeros((n, PERCENTILE_BINS), np.int32) if self.percentiles else None

    def add(self, local: np.ndarray, values: np.ndarray, ids: np.ndarray) -> None:
        """``values`` of the pixels of zones ``ids[local]`` (``ids``: distinct zones, ``local``: ``[P]`` positions
        in it): sums over ``len(ids)`` bins, not over every zone, keep a block's cost in its own zones."""
        m = len(ids)
        shifted = values - self.origin
        self.count[ids] += np.bincount(local, minlength=m)
        self.total[ids] += np.bincount(local, weights=shifted, minlength=m)
        self.squares[ids] += np.bincount(local, weights=shifted * shifted, minlength=m)
        low, high = np.full(m, np.inf), np.full(m, -np.inf)
        np.minimum.at(low, local, values)
        np.maximum.at(high, local, values)
        self.low[ids] = np.minimum(self.low[ids], low)
        self.high[ids] = np.maximum(self.high[ids], high)
        if self.histogram is not None:
            cell = np.clip((shifted / self.span * PERCENTILE_BINS).astype(np.int64), 0, PERCENTILE_BINS - 1)
            counts = np.bincount(local * PERCENTILE_BINS + cell, minlength=m * PERCENTILE_BINS)
            self.histogram[ids] += counts.reshape(m, PERCENTILE_BINS).astype(np.int32)

    def columns(self, zone_pixels: np.ndarray) -> dict[str, np.ndarray]:
        seen = self.count > 0
        count = np.maximum(self.count, 1)
        mean = self.total / count
        variance = np.maximum(self.squares / count - mean**2, 0.0) * count / np.maximum(count - 1, 1)
        nan = lambda a: np.where(seen, a, np.nan)  # noqa: E731
        out = {"count": self.count, "coverage": np.where(zone_pixels > 0, self.count / np.maximum(zone_pixels, 1), np.nan),
               "mean": nan(mean + self.origin), "std": np.where(self.count > 1, np.sqrt(variance), np.nan),
               "min": nan(self.low), "max": nan(self.high), "sum": nan(self.total + self.count * self.origin)}  # fmt: skip
        for q in self.percentiles:
            out[f"p{q:g}"] = nan(self._percentile(q))
        return out

    def _percentile(self, q: float, chunk: int = 4096) -> np.ndarray:
        """``[n]`` each zone's q-th percentile from its histogram, ``chunk`` zones at a time (a cumulative histogram
        of every zone at once would double the histogram's memory)."""
        width = self.span / PERCENTILE_BINS
        value = np.empty(len(self.count))
        for start in range(0, len(self.count), chunk):
            part = slice(start, start + chunk)
            histogram = self.histogram[part]
            cumulative = np.cumsum(histogram, axis=1, dtype=np.int64)
            rank = q / 100.0 * self.count[part]  # the value at or below which q % of the zone's pixels lie
            cell = np.minimum((cumulative < rank[:, None]).sum(axis=1), PERCENTILE_BINS - 1)
            rows = np.arange(len(cell))
            before = np.where(cell > 0, cumulative[rows, np.maximum(cell - 1, 0)], 0)
            inside = histogram[rows, cell]
            fraction = np.where(inside > 0, (rank - before) / np.maximum(inside, 1), 0.0)
            value[part] = self.origin + (cell + np.clip(fraction, 0.0, 1.0)) * width
        return np.clip(value, self.low, self.high)


class _ClassCounts:
    """Per-zone pixel counts of each class value seen."""

    def __init__(self, n: int) -> None:
        self.n, self.values, self.counts = n, [], np.zeros((n, 0), np.int64)

    def add(self, local: np.ndarray, classes: np.ndarray, ids: np.ndarray) -> None:
        """As :meth:`_ValueSums.add`, for class values."""
        present, inverse = np.unique(classes, return_inverse=True)
        for value in present.tolist():
            if value not in self.values:
                self.values.append(value)
                self.counts = np.concatenate([self.counts, np.zeros((self.n, 1), np.int64)], axis=1)
        k = len(self.values)
        column = np.array([self.values.index(v) for v in present.tolist()])[inverse]
        self.counts[ids] += np.bincount(local * k + column, minlength=len(ids) * k).reshape(len(ids), k)


def _value_range(src: Any, band: int, block: int) -> tuple[float, float]:
    """The smallest and largest valid value of ``band``, read block by block. GDAL's own statistics would do it in
    one call, but they leave a ``.aux.xml`` beside the user's raster."""
    from dinov3_eo.data.raster import block_windows

    low, high = np.inf, -np.inf
    for window in block_windows(src.height, src.width, block):
        read = src.read(band, window=window, masked=True)
        values = read.compressed().astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    return (low, high) if low <= high else (0.0, 1.0)


def zonal_statistics(
    raster: str | os.PathLike[str] | Any,
    zones: Any,
    *,
    band: int = 1,
    classes: bool | None = None,
    percentiles: Sequence[float] = (),
    all_touched: bool = False,
    layer: str | None = None,
    block: int = 1024,
    progress: bool = True,
) -> Any:
    """The zones (a vector file or ``GeoDataFrame`` of polygons, any CRS) with the statistics of ``raster``'s
    ``band`` under each as new columns (module docstring), in the zones' own CRS and order. ``raster``: a GeoTIFF
    path, an open rasterio dataset, or an ``xarray.DataArray`` with a CRS (a map answered in Python).

    Args:
        classes: summarise classes (``True``) or values (``False``); ``None``: classes for a raster with a
            ``class_names`` tag or an integer raster with a colour table.
        percentiles: value maps: these percentiles (0–100) too, as ``p<q>`` columns.
        all_touched: a zone takes every pixel it touches, not only those whose centre it holds (small zones on a
            coarse map).
        layer: the vector file's layer.
        block: pixels a side read at once.

    Raises:
        FileNotFoundError: the zones do not exist. ValueError: the raster has no georeference or no such band;
        zones without a CRS, empty, or not polygons; a percentile outside 0–100.
    """
    import rasterio
    from rasterio.features import rasterize
    from shapely.geometry import box
    from tqdm import tqdm

    from dinov3_eo.data.raster import (
        GDAL_CACHE_MB,
        block_windows,
        open_raster,
        pixel_area_ha,
        require_georeferenced,
        tagged_class_names,
    )
    from dinov3_eo.tasks.map_estimate import total_unit

    if any(not 0 <= q <= 100 for q in percentiles):
        raise ValueError(f"Percentiles lie from 0 to 100, got {list(percentiles)}.")
    frame = read_zones(zones, layer)
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_raster(raster) as src:
        require_georeferenced(src)
        if not 1 <= band <= src.count:
            where = repr(os.fspath(raster)) if isinstance(raster, (str, os.PathLike)) else "The raster"
            raise ValueError(f"{where} has {src.count} band(s); there is no band {band}.")
        as_classes = _is_class_map(src, band) if classes is None else bool(classes)
        local = frame.to_crs(src.crs)
        geometries = local.geometry.to_numpy()
        n = len(local)
        drawn = np.flatnonzero(local.geometry.notna().to_numpy() & ~local.geometry.is_empty.to_numpy())
        layer_of = np.zeros(n, np.int64)  # zones in one layer never overlap: one rasterisation holds them all
        for k, members in enumerate(overlap_free_layers(local.geometry.iloc[drawn])):
            layer_of[drawn[members]] = k
        zone_pixels = np.zeros(n, np.int64)
        if as_classes:
            sums: Any = _ClassCounts(n)
        else:
            low, high = _value_range(src, band, block) if percentiles else (0.0, 1.0)  # the histogram's range
            sums = _ValueSums(n, low, high - low, percentiles)
        windows = block_windows(src.height, src.width, block)
        for window in tqdm(windows, desc="zonal statistics", unit="block", disable=not progress or len(windows) < 4):
            transform, shape = src.window_transform(window), (int(window.height), int(window.width))
            near = local.sindex.query(box(*rasterio.windows.bounds(window, src.transform)), predicate="intersects")
            if not len(near):
                continue
            read = src.read(band, window=window, masked=True)
            valid = ~np.ma.getmaskarray(read)
            values = read.filled(0)
            if not as_classes:
                values = values.astype(np.float64)
                valid &= np.isfinite(values)
            for k in np.unique(layer_of[near]).tolist():
                ids = np.unique(near[layer_of[near] == k])
                # each zone burnt as its position in ids: the block's sums run over its own zones only
                labels = rasterize(zip(geometries[ids], range(1, len(ids) + 1)), out_shape=shape, transform=transform,
                                   fill=0, dtype="int32", all_touched=all_touched)  # fmt: skip
                inside = labels > 0
                zone_pixels[ids] += np.bincount(labels[inside] - 1, minlength=len(ids))
                ok = inside & valid
                if ok.any():
                    sums.add(labels[ok].astype(np.int64) - 1, values[ok], ids)
        hectares = pixel_area_ha(src.crs, src.transform)
        names = tagged_class_names(src, band) or []
        unit = src.units[band - 1] if src.units else None
    if as_classes:
        columns = _class_columns(sums, names, hectares)
    else:
        columns = sums.columns(zone_pixels)
        if hectares is not None:
            columns["area_ha"] = zone_pixels * hectares
            summed = total_unit(unit)
            if summed is not None and summed != "ha":  # a density per hectare: its total over the valued pixels
                columns[f"total_{summed}"] = columns["sum"] * hectares
    return frame.assign(**columns)


def _class_columns(counts: _ClassCounts, names: Sequence[str], hectares: float | None) -> dict[str, np.ndarray]:
    """``<class>_ha`` (or ``_px``) and ``<class>_share`` per class seen, in class order, and ``majority``."""
    order = sorted(range(len(counts.values)), key=lambda i: counts.values[i])
    classed = counts.counts.sum(axis=1)
    out: dict[str, np.ndarray] = {}
    label = [names[v] if 0 <= v < len(names) else f"class_{v}" for v in counts.values]
    for i in order:
        key = label[i]
        out[f"{key}_ha" if hectares is not None else f"{key}_px"] = (
            counts.counts[:, i] * hectares if hectares is not None else counts.counts[:, i])
        out[f"{key}_share"] = np.where(classed > 0, counts.counts[:, i] / np.maximum(classed, 1), np.nan)
    majority = np.array([label[i] for i in counts.counts.argmax(axis=1)], dtype=object) if label else np.array(
        [None] * len(classed), dtype=object)  # fmt: skip
    out["majority"] = np.where(classed > 0, majority, None)
    return out


def zonal_picture(dst: str | os.PathLike[str], frame: Any, column: str, *, raster: str | os.PathLike[str] | None = None,
                  title: str | None = None, outline: Any = None, overwrite: bool = False) -> Path:  # fmt: skip
    """A map of the zones filled by ``column`` (numbers on a colour bar; names as categories with a legend) around
    the zones that have a value, zones without one hatched grey; with ``raster``, drawn in its CRS over its first
    band in grey; ``outline``: polygons (a GeoDataFrame in the zones' CRS) drawn over them in red."""
    from matplotlib.figure import Figure
    from pandas.api.types import is_numeric_dtype
    from rasterio.enums import Resampling

    from dinov3_eo.inference.writers import picture_grid, save_figure

    fig = Figure(figsize=(6.4, 5.2), dpi=100)
    ax = fig.subplots()
    if raster is not None:
        import rasterio

        with rasterio.open(raster) as src:
            shape, _ = picture_grid(src, 1024)
            grey = src.read(1, out_shape=shape, resampling=Resampling.nearest, masked=True).astype(np.float64)
            frame = frame.to_crs(src.crs)
            left, bottom, right, top = src.bounds
        ax.imshow(grey, cmap="Greys_r", alpha=0.45, extent=(left, right, bottom, top), interpolation="nearest")
    values = frame[column]
    missing = values.isna()
    numeric = is_numeric_dtype(values)
    if missing.any():
        frame[missing].plot(ax=ax, color="0.85", edgecolor="0.5", linewidth=0.3, hatch="//")
    if (~missing).any():
        frame[~missing].plot(ax=ax, column=column, cmap="viridis" if numeric else "tab20", legend=True,
                             categorical=not numeric, edgecolor="0.3", linewidth=0.3,
                             legend_kwds={"label": column, "shrink": 0.7} if numeric else {"fontsize": 7})  # fmt: skip
        if outline is not None and len(outline):
            outline.to_crs(frame.crs).boundary.plot(ax=ax, color="red", linewidth=1.2)
        x0, y0, x1, y1 = frame[~missing].total_bounds  # zones far off the map would shrink the ones on it to dots
        pad = 0.05 * max(x1 - x0, y1 - y0, 1e-9)
        ax.set_xlim(x0 - pad, x1 + pad)
        ax.set_ylim(y0 - pad, y1 + pad)
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    return save_figure(fig, dst, overwrite=overwrite)


def zonal_main(argv: Sequence[str]) -> int:
    """``dinov3-eo zonal MAP.tif [MORE.tif ...] ZONES.gpkg -o zones.gpkg``."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo zonal",
        description="Summarise maps over polygons: per zone the count, mean, std, min, max, sum (and percentiles, "
                    "area and a per-hectare total) of a value map, or the hectares and share of each class of a class "
                    "map and its majority class. Several maps (dates) give each its columns, prefixed by the map's "
                    "name, and for value maps the change of the mean from the first. Writes the zones with these "
                    "columns (GeoPackage, GeoJSON or CSV) and a PNG map of one of them.")  # fmt: skip
    parser.add_argument("rasters", nargs="+", metavar="raster", help="the maps: value rasters (heights, biomass, "
                        "change) or class rasters; several for several dates")  # fmt: skip
    parser.add_argument("zones", help="polygons (any vector format, any CRS): stands, parcels, districts")
    parser.add_argument("-o", "--output", required=True, help="the zones with their statistics: .gpkg, .geojson or .csv")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--classes", dest="classes", action="store_true", default=None,
                      help="summarise classes (default: for a raster with class names or a colour table)")
    kind.add_argument("--values", dest="classes", action="store_false", help="summarise values (numbers)")
    parser.add_argument("--percentiles", nargs="+", type=float, default=[], help="value maps: also these percentiles")
    parser.add_argument("--band", type=int, default=1, help="the raster's band (default 1)")
    parser.add_argument("--layer", default=None, help="the zones file's layer")
    parser.add_argument("--all-touched", action="store_true", help="a zone takes every pixel it touches")
    parser.add_argument("--no-picture", action="store_true", help="do not write the PNG map of the zones")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(list(argv))

    from dinov3_eo.inference.writers import check_feature_suffix, check_overwrite, write_features

    out = Path(args.output)
    check_feature_suffix(out, "Zonal statistics")
    picture = out.with_suffix(".png")
    inputs = [*args.rasters, args.zones]
    check_overwrite(out, args.overwrite, inputs=inputs)
    if not args.no_picture:
        check_overwrite(picture, args.overwrite, inputs=inputs)
    stems = [Path(r).stem for r in args.rasters]
    if len(set(stems)) < len(stems):
        raise ValueError(f"The maps' names {stems} repeat; their columns are prefixed by them, so rename one.")
    zones = read_zones(args.zones, args.layer)
    frame = zones
    for raster, stem in zip(args.rasters, stems):
        one = zonal_statistics(raster, zones, band=args.band, classes=args.classes, percentiles=args.percentiles,
                               all_touched=args.all_touched, progress=len(args.rasters) == 1)  # fmt: skip
        added = one.drop(columns=[*zones.columns])
        prefix = f"{stem}_" if len(args.rasters) > 1 else ""
        frame = frame.assign(**{f"{prefix}{c}": added[c] for c in added.columns})
    first = "" if len(stems) == 1 else f"{stems[0]}_"
    shown = f"{first}majority" if f"{first}majority" in frame.columns else f"{first}mean"
    if len(stems) > 1 and shown.endswith("mean"):  # a value map over dates: how each zone's mean moved
        for stem in stems[1:]:
            frame[f"{stem}_mean_change"] = frame[f"{stem}_mean"] - frame[f"{stems[0]}_mean"]
        shown = f"{stems[-1]}_mean_change"
    write_features(frame, out, layer="zones", overwrite=args.overwrite)
    counted = frame[f"{first}majority"].notna() if shown.endswith("majority") else frame[f"{first}count"] > 0
    print(f"{len(frame):,} zones, {int(counted.sum()):,} with pixels of {Path(args.rasters[0]).name}: wrote {out}")
    if f"{first}mean" in frame.columns and counted.any():
        mean = frame[f"{first}mean"]
        print(f"  zone means from {np.nanmin(mean):.4g} to {np.nanmax(mean):.4g}; over all their pixels "
              f"{np.nansum(frame[f'{first}sum']) / max(int(frame[f'{first}count'].sum()), 1):.4g}")  # fmt: skip
    if not args.no_picture:
        zonal_picture(picture, frame, shown, raster=args.rasters[-1], title=f"{Path(args.rasters[-1]).name}: {shown}",
                      overwrite=args.overwrite)  # fmt: skip
        print(f"  picture: {picture}")
    return 0


__all__ = ["VALUE_COLUMNS", "overlap_free_layers", "read_zones", "zonal_main", "zonal_picture", "zonal_statistics"]
