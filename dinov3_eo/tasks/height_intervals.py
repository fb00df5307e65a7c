"""Prediction intervals for canopy-height maps: split-conformal, one per predicted-height bin.

A height map's errors grow with the trees (a 2 m shrub is off by a metre, a 40 m conifer by ten), so one interval
for every pixel would be too wide on open ground and too narrow in tall forest. Each pixel's interval is therefore
calibrated within its bin of *predicted* height (Mondrian conformal prediction: Vovk et al. 2005): on held-out
plots with a reference CHM, the absolute errors ``|predicted - reference|`` of the pixels predicted in a bin give
that bin's half width, the ``ceil((n + 1) coverage)``-th smallest of its ``n`` errors
(:func:`~dinov3_eo.tasks.conformal.conformal_quantile`). A new pixel like the calibration ones then lies
within ``predicted ± half width`` with probability ``coverage`` at least, in every bin (the lower end clipped at
0 m). The interval knows a pixel's predicted height, nothing else: ground unlike the calibration plots (another
forest type, sensor or season) may be covered less often, which ``height evaluate --intervals`` measures.

Errors are counted in a histogram of 1-cm cells per bin (:class:`ResidualHistogram`), so calibrating on millions of
pixels holds kilobytes, and each half width is rounded *up* to the centimetre (the guarantee kept). Pixels are
calibrated on the reference's grid, the prediction averaged onto it (as :func:`~dinov3_eo.tasks.height.
evaluate_height_raster` scores them): calibrate at the resolution the intervals will be read at.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: predicted-height bins (m) of the intervals: ``[0, 2)``, ``[2, 5)``, ... ``[30, inf)``; a prediction below 0
#: counts in the first
INTERVAL_EDGES: tuple[float, ...] = (0.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, math.inf)
#: a bin with fewer calibration pixels than this takes the widest interval of the bins that have enough
MIN_BIN_PIXELS = 100


def _bin_of(predicted: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """``[N]`` the bin index of each predicted height (``edges[i] <= h < edges[i + 1]``; below the first edge: 0)."""
    return np.clip(np.searchsorted(np.asarray(edges, np.float64), predicted, side="right") - 1, 0, len(edges) - 2)


class ResidualHistogram:
    """Counts of the absolute errors ``|predicted - reference|`` of height pixels, per predicted-height bin, in cells
    of ``resolution`` metres up to ``max_error`` (larger errors in one overflow cell): conformal quantiles exact to
    the cell, memory flat in the number of pixels.

    Cell ``k`` holds errors in ``((k - 1) r, k r]`` (cell 0: exactly 0), so a quantile read as ``k r`` is never below
    the error it stands for.
    """

    def __init__(self, edges: Sequence[float] = INTERVAL_EDGES, *, resolution: float = 0.01,
                 max_error: float = 200.0) -> None:  # fmt: skip
        if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"Height-bin edges must rise, at least two of them; got {list(edges)}.")
        self.edges = [float(e) for e in edges]
        self.resolution = float(resolution)
        self.cells = int(math.ceil(max_error / resolution)) + 2  # 0 .. max, then overflow
        self.counts = np.zeros((len(self.edges) - 1, self.cells), np.int64)

    def add(self, predicted: np.ndarray, reference: np.ndarray) -> None:
        """Count the pairs where both heights are finite (any shape; NaN is nodata)."""
        p = np.asarray(predicted, np.float64).reshape(-1)
        t = np.asarray(reference, np.float64).reshape(-1)
        keep = np.isfinite(p) & np.isfinite(t)
        p, t = p[keep], t[keep]
        cell = np.minimum(np.ceil(np.abs(p - t) / self.resolution - 1e-9), self.cells - 1).astype(np.int64)
        flat = _bin_of(p, self.edges) * self.cells + np.maximum(cell, 0)
        self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)

    def quantile(self, index: int, coverage: float) -> float:
        """Bin ``index``'s conformal quantile of the errors at ``coverage`` (metres, rounded up to the cell;
        ``inf`` where the bin holds too few pixels, or the quantile falls in the overflow cell)."""
        from dinov3_eo.tasks.conformal import conformal_rank

        counts = self.counts[index]
        n = int(counts.sum())
        rank = conformal_rank(n, coverage)
        if rank > n:
            return math.inf
        cell = int(np.searchsorted(np.cumsum(counts), rank))
        return math.inf if cell == self.cells - 1 else cell * self.resolution

    def intervals(self, coverage: float = 0.9, *, min_pixels: int = MIN_BIN_PIXELS, source: Any = None) -> HeightIntervals:
        """The :class:`HeightIntervals` of ``coverage`` these errors calibrate. A bin with fewer than ``min_pixels``
        pixels (tall trees a few plots lack) takes the widest half width of the bins that have enough, and is
        listed in ``borrowed``.

        Raises:
            ValueError: ``coverage`` outside (0, 1), or no bin with ``min_pixels`` pixels.
        """
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"The interval's coverage must lie between 0 and 1, got {coverage}.")
        counts = self.counts.sum(axis=1)
        widths = [self.quantile(i, coverage) if counts[i] >= min_pixels else math.inf for i in range(len(counts))]
        finite = [w for w in widths if math.isfinite(w)]
        if not finite:
            raise ValueError(f"No predicted-height bin holds {min_pixels} calibration pixels (of {int(counts.sum())} "
                             "with both heights): calibrate on more plots, or lower the minimum.")  # fmt: skip
        borrowed = [i for i, w in enumerate(widths) if not math.isfinite(w)]
        widths = [w if math.isfinite(w) else max(finite) for w in widths]
        return HeightIntervals(coverage=float(coverage), edges=list(self.edges), half_widths=widths,
                               pixels=[int(c) for c in counts], borrowed=borrowed, source=source)  # fmt: skip


@dataclass
class HeightIntervals:
    """Split-conformal prediction intervals of a canopy-height map, one half width per predicted-height bin.

    Attributes:
        coverage: the share of pixels the intervals hold (0.9). edges: the bins' edges in metres (``len = bins + 1``).
        half_widths: ``[bins]`` metres each side of a prediction in that bin.
        pixels: ``[bins]`` calibration pixels per bin. borrowed: bins with too few of them, given the widest width.
        source: what calibrated them (prediction and reference paths), for the record.
    """

    coverage: float
    edges: list[float]
    half_widths: list[float]
    pixels: list[int] = field(default_factory=list)
    borrowed: list[int] = field(default_factory=list)
    source: Any = None

    def half_width(self, predicted: np.ndarray) -> np.ndarray:
        """The half width (m) of each predicted height's bin, the array's shape (NaN where the height is NaN)."""
        predicted = np.asarray(predicted)
        out = np.asarray(self.half_widths, np.float32)[_bin_of(np.nan_to_num(predicted, nan=0.0), self.edges)]
        return np.where(np.isfinite(predicted), out, np.nan).astype(np.float32)

    def bounds(self, predicted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lower, upper)`` float32 metres of heights ``predicted`` (any shape): ``predicted ± half width``, the lower
        end clipped at 0; NaN stays NaN."""
        predicted = np.asarray(predicted, np.float32)
        half = self.half_width(predicted)
        return np.maximum(predicted - half, 0.0), predicted + half

    def rows(self) -> list[tuple[str, float, int]]:
        """``(bin label, half width, pixels)`` per bin, for tables."""
        from dinov3_eo.tasks.height_metrics import bin_label

        return [(bin_label(a, b), w, n) for a, b, w, n in zip(self.edges, self.edges[1:], self.half_widths,
                                                                self.pixels or [0] * len(self.half_widths))]  # fmt: skip

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write as JSON, atomically (``inf`` edges as ``null``)."""
        from dinov3_eo.inference.writers import atomic_output

        payload = {"dinov3_eo_height_intervals": 1, "coverage": self.coverage,
                   "edges": [None if math.isinf(e) else e for e in self.edges], "half_widths": self.half_widths,
                   "pixels": self.pixels, "borrowed": self.borrowed, "source": self.source}  # fmt: skip
        with atomic_output(path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(payload, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeightIntervals:
        """Intervals :meth:`save` wrote.

        Raises:
            FileNotFoundError: no such file. ValueError: not JSON, or not height intervals (said in one sentence).
        """
        if not Path(path).is_file():
            raise FileNotFoundError(f"Height intervals {str(path)!r} do not exist (write them with 'height evaluate "
                                    "PRED REF --calibrate intervals.json').")  # fmt: skip
        try:
            info = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"Height intervals {str(path)!r} are not JSON ({e}).") from None
        if not isinstance(info, dict) or "dinov3_eo_height_intervals" not in info:
            raise ValueError(f"{str(path)!r} holds no height intervals ('height evaluate --calibrate' writes them).")
        edges = [math.inf if e is None else float(e) for e in info["edges"]]
        widths = [float(w) for w in info["half_widths"]]
        if len(widths) != len(edges) - 1:
            raise ValueError(f"Height intervals {str(path)!r} have {len(widths)} half widths for {len(edges) - 1} bins.")
        return cls(coverage=float(info["coverage"]), edges=edges, half_widths=widths, pixels=list(info.get("pixels", [])),
                   borrowed=list(info.get("borrowed", [])), source=info.get("source"))  # fmt: skip


class IntervalCoverage:
    """How often intervals held the reference, per predicted-height bin and in all: pairs arrive block by block."""

    def __init__(self, intervals: HeightIntervals) -> None:
        self.intervals = intervals
        bins = len(intervals.half_widths)
        self.n, self.inside, self.width = np.zeros(bins, np.int64), np.zeros(bins, np.int64), np.zeros(bins)

    def add(self, predicted: np.ndarray, reference: np.ndarray) -> None:
        """Count the pairs where both heights are finite."""
        p = np.asarray(predicted, np.float32).reshape(-1)
        t = np.asarray(reference, np.float32).reshape(-1)
        keep = np.isfinite(p) & np.isfinite(t)
        p, t = p[keep], t[keep]
        lower, upper = self.intervals.bounds(p)
        index = _bin_of(p, self.intervals.edges)
        bins = len(self.n)
        self.n += np.bincount(index, minlength=bins)
        self.inside += np.bincount(index, weights=((t >= lower) & (t <= upper)), minlength=bins).astype(np.int64)
        self.width += np.bincount(index, weights=(upper - lower).astype(np.float64), minlength=bins)

    def result(self) -> dict[str, Any]:
        """``{"coverage": nominal, "all": {"n", "covered", "mean_width"}, "bins": {label: {...}}}`` (``covered``
        NaN for an empty bin)."""
        from dinov3_eo.tasks.height_metrics import bin_label

        def row(n: int, inside: int, width: float) -> dict[str, float]:
            return {"n": int(n), "covered": inside / n if n else math.nan, "mean_width": width / n if n else math.nan}

        edges = self.intervals.edges
        return {"coverage": self.intervals.coverage,
                "all": row(int(self.n.sum()), int(self.inside.sum()), float(self.width.sum())),
                "bins": {bin_label(a, b): row(n, i, w) for a, b, n, i, w in
                         zip(edges, edges[1:], self.n, self.inside, self.width)}}  # fmt: skip


def calibrate_height_intervals(
    prediction: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    reference: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    coverage: float = 0.9,
    edges: Sequence[float] = INTERVAL_EDGES,
    min_pixels: int = MIN_BIN_PIXELS,
    reference_nodata: float | None = None,
) -> HeightIntervals:
    """:class:`HeightIntervals` of ``coverage`` from predicted heights on held-out ground and its reference CHM
    (each one raster or several; read block by block on the reference's grid, as
    :func:`~dinov3_eo.tasks.height.evaluate_height_raster` reads them). The plots must be ones the model did not
    train on.

    Raises:
        ValueError: as :meth:`ResidualHistogram.intervals`; FileNotFoundError, ValueError as
        :func:`~dinov3_eo.tasks.height.evaluate_height_raster`.
    """
    from dinov3_eo.tasks.height import evaluate_height_raster

    errors = ResidualHistogram(edges)
    evaluate_height_raster(prediction, reference, reference_nodata=reference_nodata, on_pairs=errors.add)
    return errors.intervals(coverage, min_pixels=min_pixels, source={"prediction": _names(prediction),
                                                                     "reference": _names(reference)})  # fmt: skip


def _names(sources: Any) -> Any:
    return os.fspath(sources) if isinstance(sources, (str, os.PathLike)) else [os.fspath(s) for s in sources]


def write_height_intervals(
    chm: str | os.PathLike[str],
    intervals: HeightIntervals,
    dst: str | os.PathLike[str],
    *,
    quicklook: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """A two-band float32 COG of the ``lower`` and ``upper`` ends of each pixel's interval (metres, NaN nodata) for
    the height raster ``chm`` (``height predict``'s, or any CHM in metres), on its grid, read and written window by
    window; with ``quicklook``, a picture of the interval's width.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false. ValueError: ``dst`` is ``chm``.
    """
    import rasterio

    from dinov3_eo.data.raster import open_quietly
    from dinov3_eo.inference.writers import COGWriter, check_overwrite, picture_shape
    from dinov3_eo.tasks.height_plots import value_quicklook

    check_overwrite(dst, overwrite, inputs=[chm])
    if quicklook is not None:
        check_overwrite(quicklook, overwrite, inputs=[chm])
    percent = f"{100 * intervals.coverage:.0f} %"
    with open_quietly(chm) as src:
        nodata = src.nodata
        with COGWriter(dst, width=src.width, height=src.height, count=2, dtype="float32", crs=src.crs,
                       transform=src.transform, nodata=float("nan"), overwrite=overwrite,
                       band_descriptions=[f"lower end of the {percent} interval", f"upper end of the {percent} interval"],
                       units=["m", "m"], tags={"coverage": intervals.coverage, "source": Path(chm).name,
                                               "half_widths_m": json.dumps(intervals.half_widths)}) as out:  # fmt: skip
            for _, window in src.block_windows(1):
                heights = src.read(1, window=window).astype(np.float32)
                if nodata is not None and not math.isnan(nodata):
                    heights[heights == np.float32(nodata)] = np.nan
                out.write(np.stack(intervals.bounds(heights)), window=window)
    if quicklook is not None:
        with rasterio.open(dst) as done:
            lower, upper = done.read(out_shape=(2, *picture_shape(done.height, done.width)))
        value_quicklook(quicklook, upper - lower, label=f"width of the {percent} interval (m)", title=Path(chm).name,
                        overwrite=overwrite)  # fmt: skip
    return Path(dst)


def interval_table(intervals: HeightIntervals, coverage: dict[str, Any] | None = None) -> str:
    """The intervals per bin as a text table: half width and calibration pixels, and with a ``coverage``
    (:meth:`IntervalCoverage.result`) the share inside and pixels there."""
    lines = [f"{100 * intervals.coverage:.0f} % intervals   {'± m':>8}{'calibrated':>12}"
             + (f"{'inside':>9}{'tested':>9}" if coverage else "")]  # fmt: skip
    for i, (label, width, pixels) in enumerate(intervals.rows()):
        line = f"{label + ' m' + (' *' if i in intervals.borrowed else ''):<17}{width:>8.2f}{pixels:>12d}"
        if coverage:
            row = coverage["bins"][label]
            line += f"{'–' if math.isnan(row['covered']) else f'{100 * row['covered']:.1f} %':>9}{row['n']:>9d}"
        lines.append(line)
    if coverage:
        every = coverage["all"]
        lines.append(f"{'all':<17}{'':>8}{sum(intervals.pixels):>12d}{100 * every['covered']:>7.1f} %{every['n']:>9d}")
    if intervals.borrowed:
        lines.append("* too few calibration pixels: the widest half width of the other bins")
    return "\n".join(lines)


__all__ = [
    "INTERVAL_EDGES",
    "MIN_BIN_PIXELS",
    "HeightIntervals",
    "IntervalCoverage",
    "ResidualHistogram",
    "calibrate_height_intervals",
    "interval_table",
    "write_height_intervals",
]
