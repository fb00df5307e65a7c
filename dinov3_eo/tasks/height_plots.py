"""PNG pictures for canopy height: a map quick-look with a colour bar, a predicted-vs-reference scatter plot and
an error map. All are drawn on a bare matplotlib ``Figure`` (Agg; pyplot's global state is never touched) and
written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.enums import Resampling

from dinov3_eo.inference.writers import label_outlines, picture_shape, save_figure

#: Perceptually uniform, colour-blind-safe map of heights; diverging map of errors (blue = under, red = over).
HEIGHT_CMAP = "viridis"
ERROR_CMAP = "RdBu_r"
#: a scatter plot of at most this many pairs draws points, not a 2-D histogram
SCATTER_POINTS = 2000


def height_quicklook(
    dst: str | os.PathLike[str],
    chm: str | os.PathLike[str],
    *,
    max_size: int = 1024,
    vmax: float | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A downsampled picture of a one-band height raster (metres) with a labelled colour bar.

    Args:
        dst: destination ``.png``.
        chm: the height GeoTIFF; its nodata (or NaN) is drawn transparent.
        max_size: longer side of the picture in pixels (reads use the COG overviews, averaged).
        vmax: top of the colour scale (default: the 99th percentile of valid heights).

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false.
    """
    return _one_band_picture(dst, chm, cmap=HEIGHT_CMAP, label="height (m)", centred=False, max_size=max_size,
                             vmax=vmax, title=title, overwrite=overwrite)  # fmt: skip


def value_quicklook(
    dst: str | os.PathLike[str],
    raster: str | os.PathLike[str] | np.ndarray,
    *,
    label: str,
    max_size: int = 1024,
    vmax: float | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """:func:`height_quicklook` of any non-negative quantity (biomass, tree cover), its colour bar named ``label``;
    ``raster`` may be a ``[H, W]`` array of it (NaN transparent), drawn every ``ceil(max(H, W) / max_size)``-th pixel."""
    return _one_band_picture(dst, raster, cmap=HEIGHT_CMAP, label=label, centred=False, max_size=max_size, vmax=vmax,
                             title=title, overwrite=overwrite)  # fmt: skip


def _pairs_figure(first: np.ndarray, second: np.ndarray, max_points: int, seed: int) -> tuple[Any, ...]:
    """``(first, second, top, fig, ax)``: the finite pairs (a seeded subsample of ``max_points``, so a picture costs
    the same for any data size), the axes' top (the 99.5th percentile of both, at least 1) and a bare figure."""
    from matplotlib.figure import Figure

    a, b = np.asarray(first, np.float64).ravel(), np.asarray(second, np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if a.size > max_points:
        idx = np.random.default_rng(seed).choice(a.size, size=max_points, replace=False)
        a, b = a[idx], b[idx]
    top = max(1.0, float(np.percentile(np.concatenate([a, b]), 99.5))) if a.size else 1.0
    fig = Figure(figsize=(4.6, 4.0), dpi=100)
    return a, b, top, fig, fig.subplots()


def scatter_plot(
    dst: str | os.PathLike[str],
    pred: np.ndarray,
    target: np.ndarray,
    *,
    title: str | None = None,
    label: str = "height (m)",
    counted: str = "pixels",
    max_points: int = 50_000,
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Predicted vs reference height (metres; or any non-negative quantity, named by ``label``, of ``counted`` items)
    as a 2-D histogram with the 1:1 line; NaN pairs are dropped.

    Up to ``max_points`` pairs are drawn (a seeded subsample), so the picture costs the same for any data size; up
    to :data:`SCATTER_POINTS` are drawn as points instead.
    """
    from matplotlib.colors import LogNorm

    p, t, top, fig, ax = _pairs_figure(pred, target, max_points, seed)
    if 0 < p.size <= SCATTER_POINTS:  # few pairs (tiles, plots) read best as points
        ax.scatter(t, p, s=9, color="#0072b2", alpha=0.6, linewidths=0)
    elif p.size:
        _, _, _, mesh = ax.hist2d(t, p, bins=60, range=[[0, top], [0, top]], cmap="magma_r", norm=LogNorm(), cmin=1)
        fig.colorbar(mesh, ax=ax, label=counted)
    ax.plot([0, top], [0, top], color="0.3", lw=1, ls="--")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"reference {label}")
    ax.set_ylabel(f"predicted {label}")
    ax.set_aspect("equal")
    if title:
        ax.set_title(title)
    return save_figure(fig, dst, overwrite=overwrite)


def calibration_plot(
    dst: str | os.PathLike[str],
    predicted: np.ndarray,
    reference: np.ndarray,
    correction: Any,
    *,
    title: str | None = None,
    max_points: int = 5000,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Reference against map heights (a seeded subsample of ``max_points`` pairs), the 1:1 line and the fitted
    ``correction`` (a function of map heights, e.g. ``HeightCalibration.apply``) drawn across them: where the map
    strays from the 1:1 line and how the correction brings it back."""
    p, t, top, fig, ax = _pairs_figure(predicted, reference, max_points, seed)
    ax.scatter(p, t, s=6, color="#0072b2", alpha=0.35, linewidths=0, label="pairs")
    ax.plot([0, top], [0, top], color="0.3", lw=1, ls="--", label="1:1")
    x = np.linspace(0, top, 200)
    ax.plot(x, correction(x), color="#d55e00", lw=2, label="correction")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("map height (m)")
    ax.set_ylabel("reference height (m)")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, dst, overwrite=overwrite)


def shot_map(
    dst: str | os.PathLike[str],
    shots: Any,
    column: str,
    *,
    label: str,
    background: str | os.PathLike[str] | None = None,
    max_size: int = 1024,
    overwrite: bool = False,
) -> Path:
    """Points (GEDI shots, field plots: a ``GeoDataFrame``) coloured by ``column`` from 0 to its 99th percentile, over ``background`` (a raster: its first three bands, or one in grey, stretched and read down
    to ``max_size``; the points drawn in its CRS), else on longitude/latitude axes."""
    from matplotlib.figure import Figure

    from dinov3_eo.inference.writers import display_rgb

    values = np.asarray(shots[column], np.float64)
    finite = values[np.isfinite(values)]
    top = max(float(np.percentile(finite, 99)) if finite.size else 1.0, 1e-3)
    fig = Figure(figsize=(6.4, 5.2), dpi=100)
    ax = fig.subplots()
    if background is not None:
        with rasterio.open(background) as src:
            shape = picture_shape(src.height, src.width, max_size)
            bands = list(range(1, min(src.count, 3) + 1))
            pixels = src.read(bands, out_shape=(len(bands), *shape), resampling=Resampling.average, masked=True)
            valid = ~np.ma.getmaskarray(pixels).any(axis=0)
            left, bottom, right, top_edge = src.bounds
            points = shots.to_crs(src.crs)
        ax.imshow(display_rgb(np.ma.getdata(pixels), valid), extent=(left, right, bottom, top_edge))
        x, y = points.geometry.x.to_numpy(), points.geometry.y.to_numpy()
        ax.set_xlim(left, right)
        ax.set_ylim(bottom, top_edge)
    else:
        points = shots.to_crs("EPSG:4326")
        x, y = points.geometry.x.to_numpy(), points.geometry.y.to_numpy()
        if len(y):  # a degree of longitude is cos(latitude) of a degree of latitude on the ground
            ax.set_aspect(1.0 / max(np.cos(np.radians(float(np.mean(y)))), 1e-3))
        ax.set_xlabel("longitude (°)")
        ax.set_ylabel("latitude (°)")
    few = len(values) <= 2000
    dots = ax.scatter(x, y, c=values, s=16 if few else 5, cmap=HEIGHT_CMAP, vmin=0.0, vmax=top,
                      edgecolors="white" if few else "none", linewidths=0.4 if few else 0)  # fmt: skip
    ax.ticklabel_format(useOffset=False, style="plain")  # whole coordinates, not an offset in a corner
    ax.tick_params(labelsize=7)
    fig.colorbar(dots, ax=ax, fraction=0.046, pad=0.04, label=label)
    ax.set_title(f"{len(values):,} shots")
    return save_figure(fig, dst, overwrite=overwrite)


def crown_picture(
    dst: str | os.PathLike[str],
    chm: str | os.PathLike[str],
    trees: Any,
    *,
    labels: str | os.PathLike[str] | None = None,
    max_size: int = 1024,
    overwrite: bool = False,
) -> Path:
    """The heights of ``chm`` (a path, open dataset or DataArray) with the crowns of the ``labels`` raster (each pixel's tree id) outlined in white and
    the tree tops (``trees``: points in the CHM's CRS) marked in red, read down to ``max_size``."""
    from matplotlib.figure import Figure

    from dinov3_eo.data.raster import open_raster

    with open_raster(chm) as src:
        shape = picture_shape(src.height, src.width, max_size)
        heights = np.ma.masked_invalid(src.read(1, out_shape=shape, resampling=Resampling.average, masked=True)
                                       .astype(np.float32))  # fmt: skip
        left, bottom, right, top_edge = src.bounds
    finite = heights.compressed()
    top = max(float(np.percentile(finite, 99)) if finite.size else 1.0, 1e-3)
    zoom = max(1, -(-800 // max(shape)))  # a small CHM drawn larger (~800 px), so that crowns' outlines are thin lines
    size = (shape[0] * zoom, shape[1] * zoom)
    fig = Figure(figsize=(max(3.0, size[1] / 100 + 1.5), max(2.5, size[0] / 100)), dpi=100)
    ax = fig.subplots()
    extent = (left, right, bottom, top_edge)
    image = ax.imshow(heights, cmap=HEIGHT_CMAP, vmin=0.0, vmax=top, interpolation="nearest", extent=extent)
    if labels is not None:
        with rasterio.open(labels) as src:
            ids = src.read(1, out_shape=shape, resampling=Resampling.nearest)
        shape = size
        edge = label_outlines(np.repeat(np.repeat(ids, zoom, axis=0), zoom, axis=1))  # next to another crown or none
        overlay = np.zeros((*shape, 4), np.float32)
        overlay[edge] = (1.0, 1.0, 1.0, 0.9)
        ax.imshow(overlay, interpolation="nearest", extent=extent)
    few = len(trees) <= 5000
    ax.scatter(trees.geometry.x, trees.geometry.y, s=6 if few else 1, c="red", linewidths=0)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top_edge)
    ax.set_axis_off()
    ax.set_title(f"{len(trees):,} trees")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="height (m)")
    return save_figure(fig, dst, overwrite=overwrite)


def error_map(
    dst: str | os.PathLike[str],
    pred: np.ndarray,
    target: np.ndarray,
    *,
    titles: list[str] | None = None,
    limit: float | None = None,
    overwrite: bool = True,
) -> Path:
    """Panels of ``pred - target`` (metres) for one or more maps, ``[H, W]`` or ``[N, H, W]``, on a shared
    diverging colour scale (``±limit``, default the 98th percentile of |error|); NaN is drawn transparent."""
    from matplotlib.figure import Figure

    p, t = np.asarray(pred, np.float32), np.asarray(target, np.float32)
    if p.shape != t.shape:
        raise ValueError(f"error_map: pred {p.shape} and target {t.shape} differ in shape.")
    err = (p - t)[None] if p.ndim == 2 else p - t  # [N, H, W]
    finite = np.abs(err[np.isfinite(err)])
    lim = limit if limit is not None else (max(float(np.percentile(finite, 98)), 0.5) if finite.size else 1.0)
    n = err.shape[0]
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(2.6 * cols + 1.0, 2.6 * rows), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    image = None
    for i, ax in enumerate(axes):
        ax.set_axis_off()
        if i < n:
            image = ax.imshow(np.ma.masked_invalid(err[i]), cmap=ERROR_CMAP, vmin=-lim, vmax=lim, interpolation="nearest")
            if titles is not None and i < len(titles):
                ax.set_title(titles[i], fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=list(axes), fraction=0.046, pad=0.04, label="predicted − reference (m)")
    return save_figure(fig, dst, overwrite=overwrite)


def change_quicklook(
    dst: str | os.PathLike[str],
    change: str | os.PathLike[str],
    *,
    max_size: int = 1024,
    vmax: float | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """A downsampled picture of a height-change raster (metres) on a diverging scale centred on 0, blue for loss and
    red for gain, symmetric to ``vmax`` (default: the 99th percentile of the absolute change); nodata transparent."""
    # RdBu: red for negative; the reversed map puts loss (negative) in blue, gain in red
    return _one_band_picture(dst, change, cmap=ERROR_CMAP, label="height change (m)", centred=True, max_size=max_size,
                             vmax=vmax, title=title, overwrite=overwrite)  # fmt: skip


def _one_band_picture(
    dst: str | os.PathLike[str],
    raster: str | os.PathLike[str] | np.ndarray,
    *,
    cmap: str,
    label: str,
    centred: bool,
    max_size: int,
    vmax: float | None,
    title: str | None,
    overwrite: bool,
) -> Path:
    """Band 1 of ``raster`` read down to ``max_size`` (averaged, nodata and NaN transparent) with a labelled colour
    bar: from 0 to ``vmax`` (default: the 99th percentile of the values), or ``centred`` from ``-vmax`` to ``vmax``
    (default: the 99th percentile of the absolute values)."""
    from matplotlib.figure import Figure

    if isinstance(raster, np.ndarray):
        step = max(1, -(-max(raster.shape) // max_size))
        read = np.asarray(raster, np.float32)[::step, ::step]
        shape = read.shape
    else:
        with rasterio.open(raster) as src:
            shape = picture_shape(src.height, src.width, max_size)
            read = src.read(1, out_shape=shape, resampling=Resampling.average, masked=True).astype(np.float32)
    values = np.ma.masked_invalid(read)
    finite = np.abs(values.compressed()) if centred else values.compressed()
    top = max(vmax if vmax is not None else (float(np.percentile(finite, 99)) if finite.size else 1.0), 1e-3)
    fig = Figure(figsize=(max(3.0, shape[1] / 100 + 1.5), max(2.5, shape[0] / 100)), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(values, cmap=cmap, vmin=-top if centred else 0.0, vmax=top, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=label)
    return save_figure(fig, dst, overwrite=overwrite)
