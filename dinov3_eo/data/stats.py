"""Per-band statistics of an archive, streamed over a random sample of windows, ignoring nodata.

Only valid pixels count (see :func:`~dinov3_eo.data.raster.read_window`). Mean and standard deviation
are accumulated exactly in float64 (sums merged window by window, so memory is flat). Percentiles
are exact for 8/16-bit integer data (a full histogram over the integer range) and approximate for
other types (a seeded reservoir of at most ``reservoir_size`` values per band). A DN scale/offset is
applied to the results (it is affine, so statistics of raw values transform exactly).

``dinov3-eo stats ARCHIVE -o stats.json`` writes the result as JSON; the pretraining data module
turns it into a z-score or percentile :class:`~dinov3_eo.data.normalization.Normalization`, which
every checkpoint then carries.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from dinov3_eo.data.datasets import TileReader
from dinov3_eo.data.index import RasterIndex
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.sampling import RandomTileSampler, TileGrid

DEFAULT_PERCENTILES = (1.0, 2.0, 50.0, 98.0, 99.0)


@dataclass
class BandStats:
    """Statistics of the selected bands (lists are per band, in band order), JSON-serialisable."""

    bands: list[str]
    count: list[int]
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    percentiles: dict[str, list[float]]
    nodata: float | None = None
    scale: list[float] | None = None
    offset: list[float] | None = None
    num_windows: int = 0
    window_size: int = 0
    files: int = 0
    exact_percentiles: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BandStats:
        missing = {"bands", "count", "mean", "std", "min", "max", "percentiles"} - set(d)
        if missing:
            raise KeyError(f"BandStats: statistics lack {sorted(missing)}.")
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".stats-", suffix=".json")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=2)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> BandStats:
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def percentile(self, q: float) -> list[float]:
        key = _pkey(q)
        if key not in self.percentiles:
            raise KeyError(f"BandStats: percentile {q} was not computed; available {sorted(self.percentiles, key=float)}.")
        return self.percentiles[key]

    def normalization(self, mode: str = "zscore", *, low: float = 2.0, high: float = 98.0) -> Normalization:
        """``"zscore"`` (mean/std) or ``"percentile"`` (clip to [low, high] percentiles, scale to [0, 1]).

        Raises:
            ValueError: for another mode.
        """
        if mode == "zscore":
            return Normalization.zscore(self.mean, self.std)
        if mode == "percentile":
            lo, hi = self.percentile(low), self.percentile(high)
            hi = [h if h > l else l + 1e-6 for l, h in zip(lo, hi)]  # a constant band must not divide by zero
            return Normalization.percentile(lo, hi)
        raise ValueError(f"BandStats.normalization: mode must be 'zscore' or 'percentile', got {mode!r}.")


def _pkey(q: float) -> str:
    return f"{float(q):g}"


class _BandAccumulator:
    """Streaming sums and a histogram (integers) or reservoir (floats) for one band."""

    def __init__(self, dtype: np.dtype, reservoir_size: int, rng: np.random.Generator) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf
        integer = np.dtype(dtype).kind in "ui" and np.dtype(dtype).itemsize <= 2
        self.offset = int(np.iinfo(dtype).min) if integer else 0
        self.hist = np.zeros(int(np.iinfo(dtype).max) - self.offset + 1, dtype=np.int64) if integer else None
        self.reservoir = np.empty(0, dtype=np.float64)
        self.seen, self.reservoir_size, self.rng = 0, reservoir_size, rng

    def add(self, values: np.ndarray) -> None:
        """``values``: 1-D valid pixel values of this band."""
        if values.size == 0:
            return
        v = values.astype(np.float64)
        # Chan et al.'s pairwise merge of (count, mean, M2): exact and stable for large DNs.
        n_b, mean_b = v.size, float(v.mean())
        m2_b = float(((v - mean_b) ** 2).sum())
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.count * n_b / n
        self.count = n
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        if self.hist is not None:
            self.hist += np.bincount(values.astype(np.int64) - self.offset, minlength=self.hist.size)
        else:
            self._reservoir_add(v)

    def _reservoir_add(self, v: np.ndarray) -> None:
        # Algorithm R, vectorised: item t (0-based overall) replaces a random slot with prob k / (t + 1).
        k = self.reservoir_size
        room = max(0, k - self.reservoir.size)
        if room:
            self.reservoir = np.concatenate([self.reservoir, v[:room]])
        rest = v[room:]
        if rest.size:
            t = self.seen + room + np.arange(rest.size)
            slots = (self.rng.random(rest.size) * (t + 1)).astype(np.int64)
            keep = slots < k
            self.reservoir[slots[keep]] = rest[keep]
        self.seen += v.size

    def result(self, percentiles: Sequence[float]) -> tuple[float, float, list[float]]:
        if self.count == 0:
            return float("nan"), float("nan"), [float("nan")] * len(percentiles)
        std = float(np.sqrt(self.m2 / self.count))
        if self.hist is not None:
            cdf = np.cumsum(self.hist)
            # Nearest-rank percentile on the exact histogram (matches numpy's "inverted_cdf").
            ranks = [max(1, int(np.ceil(q / 100.0 * self.count))) for q in percentiles]
            ps = [float(np.searchsorted(cdf, r) + self.offset) for r in ranks]
        else:
            ps = [float(p) for p in np.percentile(self.reservoir, percentiles)]
        return self.mean, std, ps


def compute_band_stats(
    index: RasterIndex,
    *,
    nodata: float | None = None,
    scale: float | Sequence[float] | None = None,
    offset: float | Sequence[float] | None = None,
    num_windows: int = 256,
    window_size: int = 256,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    reservoir_size: int = 200_000,
    seed: int = 0,
    progress: bool = True,
) -> BandStats:
    """Per-band statistics over ``num_windows`` random windows (weighted by valid area), ignoring nodata.

    Windows are drawn by :class:`~dinov3_eo.data.sampling.RandomTileSampler` (no nodata rejection), so a
    file contributes in proportion to its valid area; a small archive is capped at its distinct windows.

    Raises:
        ValueError: if no valid pixel was found.
    """
    grid = TileGrid(index=index, tile_size=window_size)
    max_windows = sum((grid.max_offsets(f)[0] + 1) * (grid.max_offsets(f)[1] + 1) for f in range(len(grid)))
    sampler = RandomTileSampler(
        grid=grid, length=min(num_windows, max_windows), nodata=nodata, max_nodata_fraction=1.0, seed=seed, rank=0, world_size=1
    )
    reader = TileReader(grid=grid, nodata=nodata)
    rng = np.random.default_rng([seed, 7])
    dtypes = [np.dtype(index.records[0].dtypes[b - 1]) for b in index.band_indexes[0]]
    accs = [_BandAccumulator(dt, reservoir_size, rng) for dt in dtypes]
    tiles = sampler.global_tiles()
    for tile in tqdm(tiles, desc="band statistics", unit="window", disable=not progress):
        values, valid = reader.read(tile)
        for acc, band in zip(accs, values):
            acc.add(band[valid])
    reader.close()
    if all(a.count == 0 for a in accs):
        raise ValueError(f"compute_band_stats: no valid pixel in {len(tiles)} windows (nodata={nodata}).")
    s = np.ones(len(accs)) if scale is None else np.broadcast_to(np.asarray(scale, dtype=np.float64), (len(accs),))
    o = np.zeros(len(accs)) if offset is None else np.broadcast_to(np.asarray(offset, dtype=np.float64), (len(accs),))
    means, stds, pcts = zip(*(a.result(percentiles) for a in accs))
    return BandStats(
        bands=index.band_names,
        count=[a.count for a in accs],
        mean=[float(m * si + oi) for m, si, oi in zip(means, s, o)],
        std=[float(sd * abs(si)) for sd, si in zip(stds, s)],
        min=[float(min(a.lo * si, a.hi * si) + oi) for a, si, oi in zip(accs, s, o)],
        max=[float(max(a.lo * si, a.hi * si) + oi) for a, si, oi in zip(accs, s, o)],
        percentiles={
            _pkey(q): [float(p[i] * si + oi) if si >= 0 else float(p[len(percentiles) - 1 - i] * si + oi) for p, si, oi in zip(pcts, s, o)]
            for i, q in enumerate(percentiles)
        },
        nodata=nodata,
        scale=None if scale is None else [float(v) for v in s],
        offset=None if offset is None else [float(v) for v in o],
        num_windows=len(tiles),
        window_size=window_size,
        files=len(index),
        exact_percentiles=all(a.hist is not None for a in accs),
    )


def _band_arg(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def main(argv: list[str]) -> int:
    """``dinov3-eo stats ARCHIVE [ARCHIVE ...] -o stats.json``: per-band statistics ignoring nodata."""
    parser = argparse.ArgumentParser(prog="dinov3-eo stats", description="Per-band statistics of a GeoTIFF archive, ignoring nodata.")
    parser.add_argument("archive", nargs="+", help="GeoTIFF files, folders or glob patterns")
    parser.add_argument("-o", "--output", required=True, help="where to write the JSON statistics")
    parser.add_argument("--bands", nargs="+", type=_band_arg, default=None, help="1-based band indexes or band names")
    parser.add_argument("--nodata", type=float, default=None, help="nodata override (e.g. 0 for a Landsat L1 collar)")
    parser.add_argument("--scale", type=float, nargs="+", default=None, help="DN scale (one, or one per band)")
    parser.add_argument("--offset", type=float, nargs="+", default=None, help="DN offset (one, or one per band)")
    parser.add_argument("--windows", type=int, default=256, help="number of random windows to read")
    parser.add_argument("--window-size", type=int, default=256, help="window side in pixels")
    parser.add_argument("--percentiles", type=float, nargs="+", default=list(DEFAULT_PERCENTILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=8, help="threads used to index the archive")
    parser.add_argument("--no-cache", action="store_true", help="do not use the on-disk index cache")
    parser.add_argument("--strict", action="store_true", help="fail on any unusable file instead of skipping it")
    args = parser.parse_args(argv)
    index = RasterIndex.build(
        args.archive, bands=args.bands, strict=args.strict, workers=args.workers, cache_dir=None if args.no_cache else "default"
    )
    stats = compute_band_stats(
        index, nodata=args.nodata, scale=args.scale, offset=args.offset, num_windows=args.windows,
        window_size=args.window_size, percentiles=args.percentiles, seed=args.seed,
    )  # fmt: skip
    stats.save(args.output)
    for name, m, sd, n in zip(stats.bands, stats.mean, stats.std, stats.count):
        print(f"{name}: mean {m:.4g} std {sd:.4g} ({n} valid pixels)")
    print(f"wrote {args.output}")
    return 0
