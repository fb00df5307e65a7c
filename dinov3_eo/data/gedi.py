"""GEDI shots from the mission's HDF5 granules, quality-filtered and clipped to an area, as points (EPSG:4326): the
reference heights of ``height fit`` / ``height evaluate`` (L2A relative heights, metres), and the reference canopy
cover (L2B) or biomass (L4A above-ground biomass density, Mg/ha) of ``regress``.

A granule is a quarter of an ISS orbit: eight beam groups (``BEAM0000`` … ``BEAM1011``), each a table of shots with
the footprint centre of the lowest mode (the ground: ``lat_lowestmode``, ``lon_lowestmode``), ``shot_number``,
``delta_time`` (seconds since 2018-01-01 UTC), ``degrade_flag``, ``sensitivity`` and ``solar_elevation``. L2A holds
``rh`` (``[shots, 101]``: the heights above the ground below which 0, 1, … 100 % of the returned energy lies, metres)
with ``quality_flag``; L2B holds ``cover`` (canopy cover, 0–1), ``pai`` (plant area index), ``fhd_normal`` (foliage
height diversity) and ``rh100`` (in centimetres, read in metres) with ``l2b_quality_flag``, and keeps the shots'
places, times and flags in a ``geolocation`` group; L4A holds ``agbd`` and its standard error ``agbd_se`` with
``l4_quality_flag``. The four
full-power beams (:data:`POWER_BEAMS`) see through denser canopy than the four coverage beams.

The filters are those of GEDI canopy-height work (:class:`ShotFilter`): the product's quality flag, no degraded
pointing or positioning, a minimum beam sensitivity, and optionally power beams only, night shots, leaf-on shots, a
date range and agreement with the granule's DEM. Each is counted (:attr:`GediShots.counts`) so that a user sees what
removed their shots. Only the rows between the first and the last shot inside the area are read from a beam: an orbit
crosses an area once, so that slice is small even in a multi-GB granule.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: the full-power lasers' beams; the other four (:data:`COVERAGE_BEAMS`) split one laser's energy in two
POWER_BEAMS = ("BEAM0101", "BEAM0110", "BEAM1000", "BEAM1011")
COVERAGE_BEAMS = ("BEAM0000", "BEAM0001", "BEAM0010", "BEAM0011")
#: the suffixes a folder of granules is searched for
GRANULE_SUFFIXES = (".h5", ".hdf5", ".he5")
#: the fill value of GEDI's float datasets (a shot without a value)
FILL_VALUE = -9999.0
#: the relative-height percentiles an L2A granule gives by default: rh98 is the usual canopy top (rh100 is noisier)
DEFAULT_PERCENTILES = (50, 75, 95, 98, 100)
#: the order products are joined in (the first gives the shots' common columns)
JOIN_ORDER = ("rh", "cover", "agbd")
#: the columns every product has (kept from the first product in a join)
COMMON_COLUMNS = ("shot_number", "time", "granule", "beam", "power_beam", "sensitivity", "solar_elevation")
#: the filter steps, in the order they are applied and counted
STEPS = ("beams", "area", "dates", "quality", "sensitivity", "night", "leaf-on", "dem", "values")


@dataclass(frozen=True)
class Product:
    """What a GEDI product holds: its name, its quality-flag dataset and its value columns (name -> dataset)."""

    name: str
    quality_flag: str
    values: tuple[tuple[str, str, float], ...]  # (column, dataset, scale to the column's unit)
    unit: str


#: the products read, found by the dataset that only each holds
PRODUCTS = {
    "rh": Product("L2A", "quality_flag", (), "m"),  # rh columns come from the percentiles asked for
    "agbd": Product("L4A", "l4_quality_flag", (("agbd", "agbd", 1.0), ("agbd_se", "agbd_se", 1.0)), "Mg/ha"),
    # L2B's rh100 is in centimetres
    "cover": Product("L2B", "l2b_quality_flag", (("cover", "cover", 1.0), ("pai", "pai", 1.0),
                                                 ("fhd_normal", "fhd_normal", 1.0), ("rh100", "rh100", 0.01)), "share"),
}


@dataclass(frozen=True)
class ShotFilter:
    """Which shots are kept.

    Args:
        quality: the product's quality flag is 1 and ``degrade_flag`` is 0 (no degraded pointing or positioning).
        min_sensitivity: the beam sensitivity (the canopy cover it can see through) at least this; the L2A quality
            flag already asks 0.9 over land, and dense forests want 0.95–0.98. 0 turns it off.
        beams: ``"all"``, ``"power"`` (:data:`POWER_BEAMS`) or ``"coverage"``.
        night: the sun below the horizon (``solar_elevation`` < 0): no solar background noise in the waveform.
        leaf_on: ``land_cover_data/leaf_off_flag`` is 0 (deciduous canopy in leaf).
        max_dem_difference: ``|elev_lowestmode - digital_elevation_model|`` at most this many metres (the ground
            found where the DEM says it is; L2A only). ``None``: off.
        start, end: keep shots from ``start`` to ``end`` (inclusive), ISO dates (``"2020-06-01"``) in UTC.
    """

    quality: bool = True
    min_sensitivity: float = 0.95
    beams: str = "all"
    night: bool = False
    leaf_on: bool = False
    max_dem_difference: float | None = None
    start: str | None = None
    end: str | None = None

    def __post_init__(self) -> None:
        if self.beams not in ("all", "power", "coverage"):
            raise ValueError(f"beams must be 'all', 'power' or 'coverage', not {self.beams!r}.")
        if not 0.0 <= self.min_sensitivity <= 1.0:
            raise ValueError(f"The minimum sensitivity is a fraction in [0, 1], got {self.min_sensitivity}.")
        if self.max_dem_difference is not None and self.max_dem_difference <= 0:
            raise ValueError(f"The largest DEM difference must be positive metres, got {self.max_dem_difference}.")
        start, end = self.time_range()
        if start is not None and end is not None and end < start:
            raise ValueError(f"The date range ends ({self.end}) before it starts ({self.start}).")

    def time_range(self) -> tuple[np.datetime64 | None, np.datetime64 | None]:
        """``start`` and ``end`` as ``datetime64[s]`` (UTC); a bare date's end is the last second of that day."""

        def parse(text: str | None, last: bool) -> np.datetime64 | None:
            if text is None:
                return None
            try:
                value = np.datetime64(text, "s")
            except ValueError as err:
                raise ValueError(f"{text!r} is not an ISO date or time (2020-06-01, 2020-06-01T12:00).") from err
            return value + np.timedelta64(86399, "s") if last and len(text) == 10 else value

        return parse(self.start, False), parse(self.end, True)

    def keeps_beam(self, beam: str) -> bool:
        """Whether shots of ``beam`` (a group name, ``"BEAM0101"``) are read at all."""
        return self.beams == "all" or (beam in POWER_BEAMS) == (self.beams == "power")


@dataclass(frozen=True)
class ShotArea:
    """Where shots are kept: a box in longitude/latitude (degrees; ``west > east`` crosses the antimeridian) and,
    for a raster's area, its bounds in its own CRS, tested exactly.

    Args:
        west, south, east, north: the box in degrees (EPSG:4326).
        crs, bounds: a CRS and ``(left, bottom, right, top)`` in it (:meth:`of_raster`); ``None``: the box alone.
    """

    west: float
    south: float
    east: float
    north: float
    crs: Any = None
    bounds: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if not (-90 <= self.south < self.north <= 90 and -180 <= self.west <= 180 and -180 <= self.east <= 180):
            raise ValueError(f"The area ({self.west}, {self.south}, {self.east}, {self.north}) is not west, south, "
                             "east, north in degrees with south < north.")  # fmt: skip

    @classmethod
    def of_raster(cls, path: str | os.PathLike[str]) -> ShotArea:
        """The area of a georeferenced raster (a map or a scene): its bounds, and their lon/lat box.

        Raises:
            ValueError: the raster is not georeferenced.
        """
        import rasterio
        from rasterio.warp import transform_bounds

        from dinov3_eo.data.raster import require_georeferenced

        with rasterio.open(path) as src:
            require_georeferenced(src)
            box = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21)
            return cls(*box, crs=src.crs, bounds=tuple(src.bounds))

    def contains(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """``[N]`` bool: which points (degrees) lie in the area."""
        east_of_west, west_of_east = lon >= self.west, lon <= self.east
        across = (east_of_west | west_of_east) if self.west > self.east else (east_of_west & west_of_east)
        inside = across & (lat >= self.south) & (lat <= self.north)
        if self.crs is not None and inside.any():
            from pyproj import Transformer

            candidates = np.flatnonzero(inside)
            transformer = Transformer.from_crs("EPSG:4326", self.crs, always_xy=True)
            x, y = transformer.transform(lon[candidates], lat[candidates])
            left, bottom, right, top = self.bounds
            inside[candidates] = (x >= left) & (x <= right) & (y >= bottom) & (y <= top)
        return inside


@dataclass
class GediShots:
    """Shots read from granules: ``frame`` (a ``GeoDataFrame`` of points in EPSG:4326) and ``counts``, the shots
    each filter step (:data:`STEPS`) removed, after ``counts["read"]`` shots were read."""

    frame: Any
    counts: dict[str, int] = field(default_factory=dict)
    product: str = ""
    unit: str = ""

    def summary(self) -> list[str]:
        """Lines telling how many shots were kept and what removed the others."""
        read = self.counts.get("read", 0)
        lines = [f"{len(self.frame):,} of {read:,} {self.product} shots kept"]
        lines += [f"  {step}: -{n:,}" for step, n in self.counts.items() if step != "read" and n]
        return lines


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - a dependency of the package
        raise ImportError("Reading GEDI granules needs h5py (pip install h5py).") from err
    return h5py


def granule_product(granule: Any, path: str | os.PathLike[str] = "") -> tuple[str, Product]:
    """The product key and :class:`Product` of an open granule (``h5py.File``), from the datasets of its beams.

    Raises:
        ValueError: no beam groups, or none of L2A heights, L2B canopy cover or L4A biomass (an L1B granule).
    """
    beams = [name for name in granule if name.startswith("BEAM")]
    if not beams:
        raise ValueError(f"{str(path)!r} has no BEAM groups: it is not a GEDI granule.")
    for key, product in PRODUCTS.items():
        if key in granule[beams[0]]:
            return key, product
    raise ValueError(f"{str(path)!r} holds none of L2A relative heights ('rh'), L2B canopy cover ('cover') or L4A "
                     "biomass ('agbd'); read a GEDI02_A, GEDI02_B or GEDI04_A granule.")  # fmt: skip


def _find(group: Any, name: str) -> Any | None:
    """A beam's dataset ``name``: in the beam group (L2A, L4A) or its ``geolocation`` group (L2B keeps the shots'
    places, times and flags there)."""
    for candidate in (name, f"geolocation/{name}"):
        if candidate in group:
            return group[candidate]
    return None


def _dataset(group: Any, name: str, path: Any, why: str) -> Any:
    found = _find(group, name)
    if found is None:
        raise KeyError(f"{str(path)!r} {group.name} has no {name!r}, needed {why}; a subset granule must keep it.")
    return found


def _beam_shots(group: Any, path: Any, key: str, product: Product, percentiles: Sequence[int], filters: ShotFilter,
                area: ShotArea | None, counts: dict[str, int]) -> dict[str, np.ndarray] | None:  # fmt: skip
    """The columns of one beam's kept shots, or ``None`` if none is kept; ``counts`` gains what each step removed."""
    lat = np.asarray(_dataset(group, "lat_lowestmode", path, "for where the shots are")[()], np.float64)
    lon = np.asarray(_dataset(group, "lon_lowestmode", path, "for where the shots are")[()], np.float64)
    counts["read"] += len(lat)
    keep = np.isfinite(lat) & np.isfinite(lon)
    if area is not None:
        keep &= area.contains(np.where(keep, lon, 0.0), np.where(keep, lat, 0.0))
    counts["area"] += len(lat) - int(keep.sum())
    if not keep.any():
        return None
    # an orbit crosses an area in one pass: read the rows from the first to the last shot inside it
    first, last = np.flatnonzero(keep)[[0, -1]]
    rows = slice(int(first), int(last) + 1)
    keep = keep[rows]

    def read(name: str, why: str) -> np.ndarray:
        return np.asarray(_dataset(group, name, path, why)[rows])

    def optional(name: str, needed: bool, why: str) -> np.ndarray:
        """A float column, NaN where a subset granule left it out and no filter needs it."""
        if needed or _find(group, name) is not None:
            return read(name, why).astype(np.float32)
        return np.full(len(keep), np.nan, np.float32)

    def drop(step: str, ok: np.ndarray) -> None:
        nonlocal keep
        counts[step] += int((keep & ~ok).sum())
        keep &= ok

    time = np.datetime64("2018-01-01T00:00:00", "ns") + (read("delta_time", "for the shot time") * 1e9).astype(
        "timedelta64[ns]")  # fmt: skip
    start, end = filters.time_range()
    if start is not None or end is not None:
        ok = np.ones(len(time), bool)
        if start is not None:
            ok &= time >= start
        if end is not None:
            ok &= time <= end
        drop("dates", ok)
    if filters.quality:
        why = "for the quality filter (--no-quality-filter keeps every shot)"
        drop("quality", (read(product.quality_flag, why) == 1) & (read("degrade_flag", why) == 0))
    sensitivity = optional("sensitivity", filters.min_sensitivity > 0, "for the sensitivity filter")
    if filters.min_sensitivity > 0:
        drop("sensitivity", sensitivity >= filters.min_sensitivity)
    solar_elevation = optional("solar_elevation", filters.night, "for the night filter")
    if filters.night:
        drop("night", solar_elevation < 0)
    if filters.leaf_on:
        drop("leaf-on", read("land_cover_data/leaf_off_flag", "for the leaf-on filter") == 0)
    if filters.max_dem_difference is not None:
        why = "for the DEM filter"
        difference = np.abs(read("elev_lowestmode", why).astype(np.float64) - read("digital_elevation_model", why))
        drop("dem", difference <= filters.max_dem_difference)
    if key == "rh":
        heights = read("rh", "for the relative heights").astype(np.float32)[:, list(percentiles)]
        values = {f"rh{p}": heights[:, i] for i, p in enumerate(percentiles)}
    else:
        values = {name: read(dataset, f"for {name}").astype(np.float32) for name, dataset, _ in product.values}
    ok = np.ones(len(keep), bool)
    for column in values.values():
        ok &= np.isfinite(column) & (column != FILL_VALUE)
    drop("values", ok)
    scales = {name: scale for name, _, scale in product.values if scale != 1.0}
    values = {name: column * np.float32(scales.get(name, 1.0)) for name, column in values.items()}
    if not keep.any():
        return None
    shot_number = read("shot_number", "for the shot numbers").astype(np.int64)
    beam = group.name.strip("/")
    columns = {"shot_number": shot_number, "time": time, "sensitivity": sensitivity,
               "solar_elevation": solar_elevation, **values}  # fmt: skip
    columns = {name: column[keep] for name, column in columns.items()}
    n = len(columns["shot_number"])
    columns |= {"beam": np.full(n, beam), "power_beam": np.full(n, beam in POWER_BEAMS),
                "lon": lon[rows][keep], "lat": lat[rows][keep]}  # fmt: skip
    return columns


def read_gedi_granule(path: str | os.PathLike[str], *, area: ShotArea | None = None,
                      filters: ShotFilter | None = None,
                      percentiles: Sequence[int] = DEFAULT_PERCENTILES) -> GediShots:  # fmt: skip
    """The kept shots of one GEDI L2A, L2B or L4A granule (:func:`read_gedi_shots`)."""
    return read_gedi_shots([path], area=area, filters=filters, percentiles=percentiles, progress=False)


def read_gedi_shots(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                    area: ShotArea | None = None, filters: ShotFilter | None = None,
                    percentiles: Sequence[int] = DEFAULT_PERCENTILES, progress: bool = True) -> GediShots:  # fmt: skip
    """The shots of GEDI L2A, L2B or L4A granules (files, folders or globs) inside ``area`` that pass ``filters``, as
    points in EPSG:4326. Granules of several products are read product by product and joined by ``shot_number``
    (the shots every product kept: canopy height and biomass of the same footprints; :func:`join_products`).

    Columns: ``shot_number``, ``time`` (UTC), ``granule`` (file name), ``beam``, ``power_beam``, ``sensitivity``,
    ``solar_elevation`` and the values: L2A ``rh<p>`` for each of ``percentiles`` (metres), L2B ``cover``, ``pai``,
    ``fhd_normal``, ``rh100`` (metres), L4A ``agbd`` and
    ``agbd_se`` (Mg/ha).

    Raises:
        FileNotFoundError: a path matches nothing. ValueError: not a GEDI L2A/L2B/L4A granule, a percentile outside
        0–100, an unreadable file. KeyError: a filter's dataset missing from a subset granule.
    """
    import geopandas as gpd
    import pandas as pd
    from tqdm import tqdm

    from dinov3_eo.data.index import expand_sources

    h5py = _require_h5py()
    filters = filters or ShotFilter()
    percentiles = [int(p) for p in percentiles]
    if not percentiles or any(not 0 <= p <= 100 for p in percentiles):
        raise ValueError(f"Relative-height percentiles are integers from 0 to 100, got {percentiles}.")
    files = expand_sources(paths, GRANULE_SUFFIXES, what="GEDI granule")
    kinds = {path: _product_key(h5py, path) for path in files}
    if len(set(kinds.values())) > 1:
        parts = [read_gedi_shots([p for p in files if kinds[p] == key], area=area, filters=filters,
                                 percentiles=percentiles, progress=progress)
                 for key in JOIN_ORDER if key in kinds.values()]  # fmt: skip
        return join_products(parts)
    key = kinds[files[0]]  # one product from here on
    product = PRODUCTS[key]
    counts = {"read": 0} | {step: 0 for step in STEPS}
    tables = []
    for path in tqdm(files, desc="GEDI granules", unit="granule", disable=not progress or len(files) < 2):
        with _open_granule(h5py, path) as granule:
            for beam in sorted(name for name in granule if name.startswith("BEAM")):
                group = granule[beam]
                if not filters.keeps_beam(beam):
                    first = _find(group, "lat_lowestmode")
                    size = 0 if first is None else len(first)
                    counts["read"] += size
                    counts["beams"] += size
                    continue
                columns = _beam_shots(group, path, key, product, percentiles, filters, area, counts)
                if columns is not None:
                    tables.append(pd.DataFrame(columns).assign(granule=Path(path).name))
    value_columns = [f"rh{p}" for p in percentiles] if key == "rh" else [name for name, _, _ in product.values]
    order = [*COMMON_COLUMNS, *value_columns]
    if tables:
        table = pd.concat(tables, ignore_index=True)
    else:
        table = pd.DataFrame({name: [] for name in [*order, "lon", "lat"]})
    table["time"] = pd.to_datetime(table["time"]).dt.tz_localize("UTC")
    frame = gpd.GeoDataFrame(table[order], geometry=gpd.points_from_xy(table["lon"], table["lat"]), crs="EPSG:4326")
    return GediShots(frame=frame, counts=counts, product=product.name, unit=product.unit)


def _open_granule(h5py: Any, path: str) -> Any:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path!r} is not a readable HDF5 file ({err}).") from err


def _product_key(h5py: Any, path: str) -> str:
    with _open_granule(h5py, path) as granule:
        return granule_product(granule, path)[0]


def join_products(parts: Sequence[GediShots]) -> GediShots:
    """Shots of several products joined by ``shot_number``: the first's columns and places, then each other's
    values (a name already taken gets the product as suffix: ``rh100_l2b``); only shots every product kept remain,
    and ``counts`` adds how many the first kept that another did not (``"not in L4A"``)."""
    first, *rest = parts
    frame, counts = first.frame, dict(first.counts)
    for other in rest:
        values = other.frame.drop(columns=[*COMMON_COLUMNS[1:], other.frame.geometry.name])
        values = values.rename(columns={c: f"{c}_{other.product.lower()}" for c in values.columns
                                        if c != "shot_number" and c in frame.columns})  # fmt: skip
        joined = frame.merge(values, on="shot_number", how="inner")
        counts[f"not in {other.product}"] = len(frame) - len(joined)
        frame = joined
    return GediShots(frame=frame, counts=counts, product="+".join(p.product for p in parts), unit=first.unit)


def value_column(shots: GediShots) -> str:
    """The column a map is drawn in and a model is fitted to by default: L2A ``rh98`` (else the highest percentile
    read), L2B ``cover``, L4A ``agbd``."""
    if shots.product == "L4A":
        return "agbd"
    if shots.product == "L2B":
        return "cover"
    columns = [c for c in shots.frame.columns if c.startswith("rh")]
    return "rh98" if "rh98" in columns else max(columns, key=lambda c: int(c[2:]))


def gedi_main(argv: Sequence[str]) -> int:
    """``dinov3-eo gedi GRANULE.h5 [MORE ...] --out shots.gpkg``: quality-filtered GEDI shots as points."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo gedi",
        description="GEDI L2A (relative heights, m), L2B (canopy cover, PAI) or L4A (biomass, Mg/ha) granules to a "
                    "GeoPackage of quality-"
                    "filtered shots in an area: the reference of `height fit`/`height evaluate` (--attribute rh98) "
                    "and `regress fit` (agbd). Prints what each filter removed; writes a PNG map of the shots.")  # fmt: skip
    parser.add_argument("granules", nargs="+", help="GEDI02_A / GEDI02_B / GEDI04_A .h5 files, folders or glob patterns")
    parser.add_argument("--out", required=True, help="the shots: .gpkg or .geojson (EPSG:4326), or .csv with lon, lat "
                        "columns (degrees)")  # fmt: skip
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--within", help="keep the shots inside this raster's bounds (the map or scene to train on)")
    where.add_argument("--bounds", nargs=4, type=float, metavar=("WEST", "SOUTH", "EAST", "NORTH"),
                       help="keep the shots inside this box (degrees)")  # fmt: skip
    parser.add_argument("--percentiles", nargs="+", type=int, default=list(DEFAULT_PERCENTILES),
                        help="L2A relative heights to keep, as rh<p> columns (default: %(default)s)")  # fmt: skip
    parser.add_argument("--beams", choices=("all", "power", "coverage"), default="all",
                        help="power: the four full-power beams (denser canopy)")  # fmt: skip
    parser.add_argument("--min-sensitivity", type=float, default=ShotFilter.min_sensitivity,
                        help="keep shots with at least this beam sensitivity (default %(default)s; 0: off)")
    parser.add_argument("--night", action="store_true", help="night shots only (sun below the horizon)")
    parser.add_argument("--leaf-on", action="store_true", help="leaf-on shots only (leaf_off_flag 0)")
    parser.add_argument("--max-dem-difference", type=float, default=None,
                        help="drop shots whose ground is further than this (m) from the DEM (L2A; e.g. 50)")
    parser.add_argument("--start", default=None, help="first date kept (UTC, e.g. 2020-06-01)")
    parser.add_argument("--end", default=None, help="last date kept (UTC, inclusive)")
    parser.add_argument("--no-quality-filter", action="store_true",
                        help="keep shots whatever their quality and degrade flags (they are not columns)")
    parser.add_argument("--no-picture", action="store_true", help="do not write the PNG map of the shots")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)

    from dinov3_eo.inference.writers import check_feature_suffix, check_overwrite, write_features

    out = Path(args.out)
    check_feature_suffix(out, "Shots")
    picture = out.with_suffix(".png")
    check_overwrite(out, args.overwrite)
    if not args.no_picture:
        check_overwrite(picture, args.overwrite)
    filters = ShotFilter(quality=not args.no_quality_filter, min_sensitivity=args.min_sensitivity, beams=args.beams,
                         night=args.night, leaf_on=args.leaf_on, max_dem_difference=args.max_dem_difference,
                         start=args.start, end=args.end)  # fmt: skip
    area = ShotArea.of_raster(args.within) if args.within else ShotArea(*args.bounds) if args.bounds else None
    shots = read_gedi_shots(args.granules, area=area, filters=filters, percentiles=args.percentiles)
    for line in shots.summary():
        print(line)
    if not len(shots.frame):
        raise ValueError("No shot is left to write: widen the area or relax the filters (the counts above say which "
                         "removed them).")  # fmt: skip
    write_features(shots.frame, out, layer="shots", overwrite=args.overwrite)  # a CSV: lon, lat, as plots are read
    print(f"wrote {out}")
    if not args.no_picture:
        from dinov3_eo.tasks.height_plots import shot_map

        column = value_column(shots)
        shot_map(picture, shots.frame, column, label=f"{column} ({shots.unit})", background=args.within,
                 overwrite=args.overwrite)  # fmt: skip
        print(f"wrote {picture}")
    return 0
