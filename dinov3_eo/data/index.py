"""An index of a GeoTIFF archive: what every file is, built once, in parallel, cached on disk.

:class:`RasterIndex` records, for every raster of an archive (paths, globs, folders, or a torchgeo
``RasterDataset``), its CRS, transform, resolution, bounds, size, band count, dtypes, band
descriptions and nodata, plus a coarse thumbnail of its first band (at most 64 px a side, read
through overviews when the file has them) so samplers can skip mostly-empty areas without reading a
pixel. Files that cannot be used — unreadable, corrupt pixel data, no georeferencing, missing a
selected band — are excluded and reported together in one warning (or one error with
``strict=True``): an archive problem never surfaces as a crash in the middle of an epoch.

The on-disk cache holds one small JSON file per raster keyed by (absolute path, mtime, size), so an
unchanged file is never re-opened and a changed one is re-read automatically.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.coords import BoundingBox
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.env import get_gdal_config, set_gdal_config
from rasterio.errors import RasterioError
from rasterio.transform import Affine

from dinov3_eo.data.raster import is_georeferenced

#: File suffixes picked up when a folder is given.
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2", ".img")
#: Longest side of the per-file thumbnail used for nodata-aware sampling.
THUMBNAIL_SIZE = 64
#: GDAL block-cache cap while indexing (bytes).
INDEX_GDAL_CACHE_BYTES = 64 * 1024 * 1024
#: Bump when the cached record layout changes.
_CACHE_VERSION = 1

BandSpec = Sequence[int | str] | None


class RasterArchiveError(ValueError):
    """The archive cannot be used as given (no usable file, or problems with ``strict=True``)."""


class BandMismatchError(RasterArchiveError):
    """Files of the archive have different band counts and no band selection says which to use."""


@dataclass(frozen=True)
class IndexProblem:
    """A file excluded from the index, and why."""

    path: str
    reason: str


@dataclass(frozen=True, eq=False)
class RasterRecord:
    """What the index knows about one raster file.

    ``thumbnail`` is band 1 decimated with nearest resampling to at most 64 px a side (shape (th, tw),
    the file's dtype); ``valid_thumbnail`` turns it into a coarse validity map for a nodata value.
    """

    path: str
    crs_wkt: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    descriptions: tuple[str | None, ...]
    nodata: float | None
    mtime_ns: int
    size_bytes: int
    thumbnail: np.ndarray | None = field(default=None, repr=False)

    @property
    def crs(self) -> CRS:
        return CRS.from_wkt(self.crs_wkt)

    @property
    def affine(self) -> Affine:
        return Affine(*self.transform)

    @property
    def res(self) -> tuple[float, float]:
        a = self.affine
        return (math.hypot(a.a, a.d), math.hypot(a.b, a.e))

    @property
    def bounds(self) -> BoundingBox:
        return BoundingBox(*rasterio.transform.array_bounds(self.height, self.width, self.affine)[:4])

    @property
    def area(self) -> float:
        """Footprint area in squared CRS units."""
        b = self.bounds
        return (b.right - b.left) * (b.top - b.bottom)

    def valid_thumbnail(self, nodata: float | None) -> np.ndarray:
        """(th, tw) bool: coarse validity of band 1 for ``nodata`` (all True without a thumbnail)."""
        if self.thumbnail is None:
            return np.ones((1, 1), dtype=bool)
        thumb = self.thumbnail
        valid = np.ones(thumb.shape, dtype=bool)
        if np.issubdtype(thumb.dtype, np.floating):
            valid &= ~np.isnan(thumb)
        if nodata is not None and not math.isnan(nodata):
            valid &= thumb != nodata
        return valid

    def to_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "thumbnail"}
        d["transform"], d["dtypes"], d["descriptions"] = list(self.transform), list(self.dtypes), list(self.descriptions)
        if self.thumbnail is not None:
            t = np.ascontiguousarray(self.thumbnail)
            d["thumbnail"] = {"dtype": str(t.dtype), "shape": list(t.shape), "data": base64.b64encode(t.tobytes()).decode()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RasterRecord:
        thumb = d.get("thumbnail")
        array = None
        if thumb is not None:
            array = np.frombuffer(base64.b64decode(thumb["data"]), dtype=thumb["dtype"]).reshape(thumb["shape"]).copy()
        return cls(
            path=d["path"], crs_wkt=d["crs_wkt"], transform=tuple(d["transform"]), width=int(d["width"]),
            height=int(d["height"]), count=int(d["count"]), dtypes=tuple(d["dtypes"]),
            descriptions=tuple(d["descriptions"]), nodata=d["nodata"], mtime_ns=int(d["mtime_ns"]),
            size_bytes=int(d["size_bytes"]), thumbnail=array,
        )  # fmt: skip


def expand_sources(sources: str | os.PathLike | Sequence[str | os.PathLike],
                   suffixes: Sequence[str] | None = None, *, what: str = "raster") -> list[str]:
    """Absolute, sorted, de-duplicated raster paths from files, folders (recursive) and glob patterns; a folder
    yields its files with ``suffixes`` (default :data:`RASTER_SUFFIXES`). ``what`` names the files in messages
    (``"GEDI granule"``).

    Raises:
        FileNotFoundError: if a source matches nothing.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    suffixes = tuple(suffixes or RASTER_SUFFIXES)
    found: set[str] = set()
    named = what[:1].upper() + what[1:]
    for source in sources:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if path.is_dir():
            matches = [p for p in path.rglob("*") if p.suffix.lower() in suffixes and p.is_file()]
        elif glob.has_magic(text):
            matches = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(p)]
        elif path.is_file():
            matches = [path]
        else:
            raise FileNotFoundError(f"{named} source {text!r} is neither a file, a folder nor a glob that "
                                    "matches files.")  # fmt: skip
        if not matches:
            raise FileNotFoundError(f"{named} source {text!r} matched no {what} files (suffixes {suffixes}).")
        found.update(os.path.abspath(p) for p in matches)
    return sorted(found)


def _read_thumbnail(src) -> np.ndarray:
    scale = max(src.width, src.height) / THUMBNAIL_SIZE
    shape = (max(1, round(src.height / scale)), max(1, round(src.width / scale))) if scale > 1 else (src.height, src.width)
    return src.read(1, out_shape=shape, resampling=Resampling.nearest)


def inspect_raster(path: str) -> RasterRecord:
    """Open ``path`` and describe it.

    Raises:
        RasterioError: if the file cannot be opened or its pixels cannot be decoded.
        ValueError: if the file is not georeferenced (no CRS, or an identity transform).
    """
    stat = os.stat(path)
    with rasterio.open(path) as src:
        if not is_georeferenced(src):
            raise ValueError("not georeferenced (no CRS or no geotransform)")
        # Decoding a thumbnail also catches truncated or corrupt pixel data at index time.
        thumbnail = _read_thumbnail(src)
        return RasterRecord(
            path=path, crs_wkt=src.crs.to_wkt(), transform=tuple(src.transform)[:6], width=src.width,
            height=src.height, count=src.count, dtypes=tuple(src.dtypes), descriptions=tuple(src.descriptions),
            nodata=None if src.nodata is None else float(src.nodata), mtime_ns=stat.st_mtime_ns,
            size_bytes=stat.st_size, thumbnail=thumbnail,
        )  # fmt: skip


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dinov3_eo/raster_index`` (``~/.cache/...`` by default)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dinov3_eo" / "raster_index"


def _cache_file(cache_dir: Path, path: str, stat: os.stat_result) -> Path:
    key = f"{_CACHE_VERSION}|{path}|{stat.st_mtime_ns}|{stat.st_size}"
    return cache_dir / f"{hashlib.sha1(key.encode()).hexdigest()}.json"


def _write_json_atomic(target: Path, payload: dict[str, Any]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _describe(path: str, cache_dir: Path | None) -> tuple[RasterRecord | None, str | None, bool]:
    """(record, problem, from_cache) for one path; never raises for a bad file."""
    try:
        stat = os.stat(path)
    except OSError as e:
        return None, f"cannot stat: {e}", False
    cached = None if cache_dir is None else _cache_file(cache_dir, path, stat)
    if cached is not None and cached.is_file():
        try:
            return RasterRecord.from_json(json.loads(cached.read_text())), None, True
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is simply rebuilt
    try:
        record = inspect_raster(path)
    except RasterioError as e:
        return None, f"unreadable or corrupt: {e}", False
    except ValueError as e:
        return None, str(e), False
    if cached is not None:
        try:
            _write_json_atomic(cached, record.to_json())
        except OSError:
            pass  # a read-only cache location must not stop training
    return record, None, False


def resolve_bands(record: RasterRecord, bands: BandSpec) -> list[int]:
    """1-based band indexes of ``record`` for a selection by index or by description (case-insensitive).

    Raises:
        IndexError: if an index is outside ``[1, count]``.
        KeyError: if a name is not among the file's band descriptions.
        TypeError: if an entry is neither an int nor a str.
    """
    if bands is None:
        return list(range(1, record.count + 1))
    names = [(d or "").strip().lower() for d in record.descriptions]
    out = []
    for band in bands:
        if isinstance(band, bool) or not isinstance(band, (int, str)):
            raise TypeError(f"Band selection entries must be 1-based ints or band names, got {band!r}.")
        if isinstance(band, int):
            if not 1 <= band <= record.count:
                raise IndexError(f"band {band} is outside [1, {record.count}]")
            out.append(band)
        elif band.strip().lower() in names:
            out.append(names.index(band.strip().lower()) + 1)
        else:
            raise KeyError(f"band {band!r} is not among the band descriptions {list(record.descriptions)}")
    return out


class RasterIndex:
    """The usable rasters of an archive, with their selected bands.

    Build it with :meth:`build` (paths, globs, folders) or :meth:`from_torchgeo`.

    Attributes:
        records: one :class:`RasterRecord` per usable file, sorted by path.
        band_indexes: for each record, the 1-based band indexes to read, in output order.
        problems: excluded files and why.
        bands: the band selection the index was built with (``None`` = all bands).
    """

    def __init__(
        self, *, records: Sequence[RasterRecord], band_indexes: Sequence[Sequence[int]], problems: Sequence[IndexProblem] = (), bands: BandSpec = None
    ) -> None:
        if len(records) != len(band_indexes):
            raise ValueError(f"RasterIndex: {len(records)} records but {len(band_indexes)} band selections.")
        if not records:
            raise RasterArchiveError("RasterIndex: no usable raster in the archive" + _summary_suffix(problems))
        self.records = list(records)
        self.band_indexes = [list(b) for b in band_indexes]
        self.problems = list(problems)
        self.bands = None if bands is None else list(bands)
        #: how many records :meth:`build` took from the on-disk cache instead of opening the file
        self.cache_hits = 0

    @classmethod
    def build(
        cls,
        sources: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        bands: BandSpec = None,
        strict: bool = False,
        workers: int = 8,
        cache_dir: str | os.PathLike | None = "default",
    ) -> RasterIndex:
        """Index every raster under ``sources``.

        Args:
            sources: files, folders (searched recursively for GeoTIFF/VRT/JP2) and glob patterns.
            bands: bands to use, by 1-based index or by band description; required when files have
                different band counts.
            strict: raise on the first look at any problem file instead of excluding it with a warning.
            workers: threads opening files in parallel (GDAL releases the GIL while reading).
            cache_dir: where per-file records are cached; ``"default"`` is :func:`default_cache_dir`,
                ``None`` disables the cache.

        Raises:
            FileNotFoundError: if a source matches nothing.
            RasterArchiveError: with ``strict=True`` when any file is excluded, or when none is usable.
            BandMismatchError: if band counts differ and ``bands`` is ``None``.
        """
        paths = expand_sources(sources)
        cache = default_cache_dir() if cache_dir == "default" else (None if cache_dir is None else Path(cache_dir))
        # Thumbnails of files without overviews stream every block through GDAL's cache; cap it while
        # indexing so memory stays flat in raster size, then restore the caller's setting.
        previous_cache = get_gdal_config("GDAL_CACHEMAX")
        set_gdal_config("GDAL_CACHEMAX", min(int(previous_cache), INDEX_GDAL_CACHE_BYTES))
        try:
            with ThreadPoolExecutor(max_workers=max(1, min(workers, len(paths)))) as pool:
                results = list(pool.map(lambda p: _describe(p, cache), paths))
        finally:
            set_gdal_config("GDAL_CACHEMAX", int(previous_cache))
        problems = [IndexProblem(p, why) for p, (_, why, _) in zip(paths, results) if why is not None]
        records = [rec for rec, _, _ in results if rec is not None]
        index = cls._assemble(records, problems, bands=bands, strict=strict)
        index.cache_hits = sum(hit for _, _, hit in results)
        return index

    @classmethod
    def from_torchgeo(cls, dataset, *, strict: bool = False, workers: int = 8, cache_dir: str | os.PathLike | None = "default") -> RasterIndex:
        """Index the files of a torchgeo ``RasterDataset`` with its band selection.

        Raises:
            TypeError: if ``dataset`` has no file index (not a torchgeo ``RasterDataset``).
            NotImplementedError: for ``separate_files`` datasets (one file per band); stack them into a
                VRT (``gdalbuildvrt -separate``) and index that instead.
        """
        index = getattr(dataset, "index", None)
        if index is None or "filepath" not in getattr(index, "columns", ()):
            raise TypeError(f"from_torchgeo expects a torchgeo RasterDataset, got {type(dataset).__name__}.")
        if getattr(dataset, "separate_files", False):
            raise NotImplementedError(
                f"{type(dataset).__name__} stores one band per file; stack the bands into a VRT and index that."
            )
        band_indexes = getattr(dataset, "band_indexes", None)
        return cls.build(list(dict.fromkeys(index["filepath"])), bands=band_indexes, strict=strict, workers=workers, cache_dir=cache_dir)

    @classmethod
    def _assemble(cls, records: list[RasterRecord], problems: list[IndexProblem], *, bands: BandSpec, strict: bool) -> RasterIndex:
        usable, selections = [], []
        for rec in records:
            try:
                selections.append(resolve_bands(rec, bands))
                usable.append(rec)
            except (IndexError, KeyError) as e:
                problems.append(IndexProblem(rec.path, f"band selection {list(bands or [])}: {e.args[0]}"))
        if bands is None:
            counts = sorted({rec.count for rec in usable})
            if len(counts) > 1:
                examples = {c: next(r.path for r in usable if r.count == c) for c in counts}
                raise BandMismatchError(
                    f"Files have different band counts {counts} (e.g. {examples}); select the same bands from each with bands=[...] "
                    "(--bands for dinov3-eo stats, --data.bands in a fit)."
                )
        problems.sort(key=lambda p: p.path)
        if problems and strict:
            raise RasterArchiveError(f"{len(problems)} raster(s) cannot be used" + _summary_suffix(problems))
        if problems and usable:
            warnings.warn(f"Excluded {len(problems)} raster(s) from the index" + _summary_suffix(problems), stacklevel=3)
        return cls(records=usable, band_indexes=selections, problems=problems, bands=bands)

    # --- container protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> RasterRecord:
        return self.records[i]

    def __iter__(self) -> Iterator[RasterRecord]:
        return iter(self.records)

    def subset(self, indices: Sequence[int]) -> RasterIndex:
        """The index of the records at ``indices`` (in that order), with their band selections; no file is opened.

        Raises:
            RasterArchiveError: if ``indices`` is empty.
        """
        return RasterIndex(records=[self.records[i] for i in indices], band_indexes=[self.band_indexes[i] for i in indices],
                           bands=self.bands)  # fmt: skip

    def __repr__(self) -> str:
        return f"RasterIndex({len(self)} rasters, {self.num_bands} bands, {len(self.problems)} excluded)"

    # --- archive-level facts ------------------------------------------------------------------
    @property
    def num_bands(self) -> int:
        return len(self.band_indexes[0])

    @property
    def band_names(self) -> list[str]:
        """Names of the selected bands: descriptions of the first file, else ``B<index>``."""
        rec, sel = self.records[0], self.band_indexes[0]
        return [rec.descriptions[i - 1] or f"B{i}" for i in sel]

    @property
    def crs_set(self) -> list[str]:
        return sorted({rec.crs.to_string() for rec in self.records})

    def summary(self) -> str:
        """One human-readable paragraph: counts, CRSs, bands, excluded files."""
        lines = [f"{len(self)} rasters, bands {self.band_names}, CRS {self.crs_set}"]
        lines += [f"  excluded {p.path}: {p.reason}" for p in self.problems]
        return "\n".join(lines)


def _summary_suffix(problems: Sequence[IndexProblem]) -> str:
    if not problems:
        return "."
    return ":\n" + "\n".join(f"  {p.path}: {p.reason}" for p in problems)
