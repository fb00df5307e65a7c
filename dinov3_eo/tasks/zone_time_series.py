"""Polygons embedded at several dates: one row per parcel with its features through the season, for crop types and
other classes told apart by how they change (phenology), not by one picture.

``dinov3-eo embed MAY.tif JULY.tif SEPT.tif --zones parcels.gpkg -o parcels.parquet`` embeds every polygon on each
date as ``embed --zones`` does on one (:func:`~dinov3_eo.tasks.zone_embeddings.zone_feature_sums`: the area-weighted
mean patch token), each raster on its own grid and in its own CRS, so the dates need not be co-registered (other
path/rows, other tiles, other sensors of the same bands). Rasters with the same date are one time step: their sums
are pooled, so a date's scenes mosaic over parcels on their seams (where two overlap, both count).

A date comes from ``dates`` or else from the file's path (the first ``YYYYMMDD`` or ``YYYY-MM-DD`` in its name or its
folders' names: Landsat and Sentinel-2 product names start with the acquisition date); files without one are each
their own step, named by their stem. Steps are ordered by date when every one has a date, else as given, so tables of
the same dates in any file order have the same columns.

``temporal="concat"`` (default) makes ``patch_mean`` the steps' means one after the other, ``[T · D]``: what a probe
needs to learn a season's course. A polygon with no features at some step (clouds given as nodata, outside that
date's footprint) is interpolated there linearly in time (days between the dates) from its nearest steps with
features before and after, or takes the nearest one's features at an end of the season, so every polygon seen once
has a whole vector; ``dates_seen`` says how many were real. ``temporal="mean"`` averages the steps with features (``[D]``): a feature that
does not depend on which dates were available, for tables of different dates. Each step's ``coverage_<date>`` and
``patches_<date>`` are columns; ``coverage`` is their mean and ``patches`` their sum.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: how a table's steps become one feature vector per polygon
TEMPORAL_MODES = ("concat", "mean")

# a calendar date not inside a longer run of digits: 20200518, 2020-05-18, 2020_05_18 (then T135111 may follow)
_DATE = re.compile(r"(?<!\d)((?:19|20)\d\d)[-_]?(0[1-9]|1[0-2])[-_]?(0[1-9]|[12]\d|3[01])(?!\d)")
#: a step label that is a date, as date_label writes it
_ISO_DAY = re.compile(r"\d{4}-\d\d-\d\d")


def date_label(path: str | os.PathLike[str]) -> str | None:
    """The first calendar date in ``path``'s file name, else in its folders' names (nearest first), as ``YYYY-MM-DD``;
    None without one. ``LC08_L1TP_224078_20200518_20200527_01_T1.tif`` → ``2020-05-18`` (the acquisition date, the
    first of the two)."""
    for part in reversed(Path(path).parts):
        found = _DATE.search(part)
        if found:
            return "-".join(found.groups())
    return None


def time_steps(rasters: Sequence[str | os.PathLike[str]], dates: Sequence[str] | None = None) -> list[tuple[str, list[str]]]:
    """The rasters grouped into time steps: ``[(label, [paths])]``, in date order when every label is a date
    (``YYYY-MM-DD``), else in the order given (module docstring).

    Raises:
        ValueError: ``dates`` of another length than ``rasters``; two files without a date that share a stem (give
            ``dates``).
    """
    paths = [os.fspath(p) for p in rasters]
    if dates is not None and len(dates) != len(paths):
        raise ValueError(f"--dates gives {len(dates)} dates for {len(paths)} rasters: give one per raster, in order.")
    if dates is not None:
        labels = [str(d).strip() for d in dates]
    else:
        labels = []
        for path in paths:
            label = date_label(path)
            if label is None:
                label = Path(path).stem
                if label in labels:
                    raise ValueError(f"Two rasters are named {label!r} and neither name holds a date: give each its "
                                     "date with --dates (rasters of the same date are mosaicked).")  # fmt: skip
            labels.append(label)
    steps: dict[str, list[str]] = {}
    for label, path in zip(labels, paths):
        steps.setdefault(label, []).append(path)
    order = list(steps)
    if all(_ISO_DAY.fullmatch(label) for label in order):
        order.sort()
    return [(label, steps[label]) for label in order]


def _dates_as_days(labels: Sequence[str]) -> np.ndarray | None:
    """``[T]`` float days since 1970, or None unless every label is a real ``YYYY-MM-DD`` date."""
    if not labels or not all(_ISO_DAY.fullmatch(str(label)) for label in labels):
        return None
    try:
        return np.array([np.datetime64(str(label), "D").astype(np.int64) for label in labels], np.float64)
    except ValueError:  # 2021-02-30: a name that looks like a date and is none
        return None


def step_days(labels: Sequence[str]) -> np.ndarray:
    """``[T]`` float: each step's day (since 1970) when every label is a ``YYYY-MM-DD`` date, else its position."""
    days = _dates_as_days(labels)
    return np.arange(len(labels), dtype=np.float64) if days is None else days


def season_days(labels: Sequence[str]) -> np.ndarray | None:
    """``[T]`` float: each date's days since 1 January of the season's first year (``2022-05-10, 2022-07-15`` →
    ``129, 195``; a season over the new year counts on: ``2021-11-20, 2022-01-15`` → ``323, 379``), so that seasons
    of different years share one axis; None unless every label is a ``YYYY-MM-DD`` date, in order."""
    days = _dates_as_days(labels)
    if days is None or (np.diff(days) < 0).any():
        return None
    first_year = np.datetime64(str(labels[0])[:4], "Y")
    return days - first_year.astype("datetime64[D]").astype(np.int64)


def resample_steps(means: np.ndarray, times: Sequence[float], new_times: Sequence[float]) -> np.ndarray:
    """Features at other times: linear in time between the nearest steps before and after each new time, the first
    or last step's beyond either end.

    Args:
        means: ``[T, Z, D]`` float (NaN rows: polygons never seen). times: ``[T]`` increasing. new_times: ``[T']``.

    Returns:
        ``[T', Z, D]`` float32.
    """
    means = np.asarray(means, np.float64)
    t = np.asarray(times, np.float64)
    out = []
    for when in np.asarray(new_times, np.float64):
        after = int(np.clip(np.searchsorted(t, when), 0, len(t) - 1))  # the first step at or after it (or the last)
        before = max(after - 1, 0) if t[after] > when else after
        span = t[after] - t[before]
        w = float(np.clip((when - t[before]) / span, 0.0, 1.0)) if span > 0 else 0.0
        out.append((1 - w) * means[before] + w * means[after])
    return np.stack(out).astype(np.float32)


def season_at(x: np.ndarray, dates: Sequence[str], target: Sequence[str]) -> np.ndarray | None:
    """A season's table features at another season's days of the year (:func:`season_days`,
    :func:`resample_steps`): another year, other days, more or fewer dates.

    Args:
        x: ``[Z, T · D]`` each polygon's steps one after the other, at ``dates`` (``T`` labels).
        target: the dates wanted (``T'`` labels).

    Returns:
        ``[Z, T' · D]`` float32, or None where there is nothing to do or nothing to do it with: both the same days,
        fewer than two dates on either side, labels that are not dates, or a width that is not ``T`` steps.
    """
    days, wanted = season_days(list(dates)), season_days(list(target))
    if days is None or wanted is None or len(days) < 2 or len(wanted) < 2 or not len(x) or x.shape[1] % len(days):
        return None
    if len(days) == len(wanted) and np.array_equal(days, wanted):
        return None
    means = x.reshape(len(x), len(days), -1).transpose(1, 0, 2)  # [T, Z, D]
    return resample_steps(means, days, wanted).transpose(1, 0, 2).reshape(len(x), -1)


def combine_steps(means: np.ndarray, temporal: str = "concat", times: Sequence[float] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Each polygon's step means as one vector (module docstring).

    Args:
        means: ``[T, Z, D]`` float, NaN rows where a polygon had no features at a step.
        temporal: ``"concat"`` (``[Z, T · D]``) or ``"mean"`` (``[Z, D]``, the mean of the steps with features).
            In ``"concat"`` a step without features is interpolated linearly in time between the polygon's nearest
            steps with features before and after it, and takes the nearest one's at either end of the season.
        times: ``[T]`` increasing, the steps' times (days: :func:`step_days`); default their positions.

    Returns:
        ``(features, dates_seen)``: float32 features (NaN rows for polygons never seen) and ``[Z]`` int64 counts.
    """
    if temporal not in TEMPORAL_MODES:
        raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, not {temporal!r}.")
    means = np.asarray(means, np.float64)
    steps, zones, dim = means.shape
    seen = np.isfinite(means).all(axis=2)  # [T, Z]
    count = seen.sum(axis=0)
    if temporal == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            average = np.where(seen[..., None], means, 0.0).sum(axis=0) / count[:, None]  # NaN where never seen
        return average.astype(np.float32), count.astype(np.int64)
    t = np.arange(steps, dtype=np.float64) if times is None else np.asarray(times, np.float64)
    position = np.arange(steps)[:, None]
    # each step's nearest seen step at or before it and at or after it (-1 / steps: none)
    before = np.maximum.accumulate(np.where(seen, position, -1), axis=0)  # [T, Z]
    after = np.minimum.accumulate(np.where(seen, position, steps)[::-1], axis=0)[::-1]
    before_or_after = np.where(before >= 0, before, after)  # an end of the season: the nearest side only
    after_or_before = np.where(after < steps, after, before)
    lo, hi = np.clip(before_or_after, 0, steps - 1), np.clip(after_or_before, 0, steps - 1)
    span = t[hi] - t[lo]
    weight = np.divide(t[:, None] - t[lo], span, out=np.zeros_like(span), where=span > 0)[..., None]  # [T, Z, 1]
    zone = np.arange(zones)[None]
    filled = (1 - weight) * means[lo, zone] + weight * means[hi, zone]  # [T, Z, D]; NaN where never seen
    filled = np.where(seen[..., None], means, filled)
    return filled.transpose(1, 0, 2).reshape(zones, steps * dim).astype(np.float32), count.astype(np.int64)


def zone_time_series(
    backbone: Any,
    rasters: Sequence[str | os.PathLike[str]],
    zones: Any,
    *,
    dates: Sequence[str] | None = None,
    temporal: str = "concat",
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
    """Each polygon of ``zones`` embedded at every date of ``rasters`` (module docstring).

    Args:
        backbone: a ViT (``patch_size``, ``embed_dim``, ``get_intermediate_layers``).
        rasters: georeferenced GeoTIFFs with the backbone's bands, one or more per date; zones: a ``GeoDataFrame``
            (any CRS) or a vector file's path.
        dates: one label per raster (default: the date in its name, :func:`date_label`).
        temporal: ``"concat"`` or ``"mean"`` (:func:`combine_steps`).
        normalization, bands, nodata, window, margin, batch_size, device, amp, progress, upsample: as
            :func:`~dinov3_eo.tasks.zone_embeddings.zone_embeddings`, for every raster.

    Returns:
        ``zones`` with ``patch_mean``, ``dates_seen``, ``coverage``, ``patches`` and each step's ``coverage_<date>``,
        ``patches_<date>``; how it was made (backbone, dates, their files, ``temporal``, ``time_steps``) in
        ``attrs["dinov3_eo"]``.

    Raises:
        FileNotFoundError, ValueError: as :func:`~dinov3_eo.tasks.zone_embeddings.zone_embeddings` and
            :func:`time_steps`; an unknown ``temporal``; no rasters.
    """
    from dinov3_eo.tasks.zonal import read_zones
    from dinov3_eo.tasks.zone_embeddings import backbone_record, pool_zone_sums, zone_feature_sums

    if not len(rasters):
        raise ValueError("No rasters to embed the polygons on.")
    if temporal not in TEMPORAL_MODES:
        raise ValueError(f"temporal must be one of {TEMPORAL_MODES}, not {temporal!r}.")
    steps = time_steps(rasters, dates)
    frame = read_zones(zones)
    means, coverage, patches = [], {}, {}
    for label, paths in steps:
        parts = []
        for path in paths:
            if progress:
                print(f"{label}: {path}")
            parts.append(zone_feature_sums(backbone, path, frame, normalization=normalization, bands=bands,
                                           nodata=nodata, window=window, margin=margin, batch_size=batch_size,
                                           device=device, amp=amp, progress=progress, upsample=upsample))  # fmt: skip
        # one date's scenes pooled: a parcel on their seam gets both sides
        pooled, coverage[label], patches[label] = pool_zone_sums(parts)
        means.append(pooled)
    features, seen = combine_steps(np.stack(means), temporal, step_days([label for label, _ in steps]))
    out = frame.copy()
    out["patch_mean"] = list(features)
    out["dates_seen"] = seen
    out["coverage"] = np.mean(list(coverage.values()), axis=0)
    out["patches"] = np.sum(list(patches.values()), axis=0)
    for label, _ in steps:
        out[f"coverage_{label}"] = coverage[label]
        out[f"patches_{label}"] = patches[label]
    out.attrs["dinov3_eo"] = {**backbone_record(backbone), "upsample": int(upsample), "temporal": temporal,
                              "time_steps": len(steps),
                              "dates": [label for label, _ in steps], "source": [paths for _, paths in steps]}  # fmt: skip
    return out


__all__ = ["TEMPORAL_MODES", "combine_steps", "date_label", "resample_steps", "season_at", "season_days", "step_days",
           "time_steps", "zone_time_series"]
