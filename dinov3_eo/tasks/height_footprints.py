"""Canopy heights from footprints: GEDI shots or field plots as sparse reference heights.

A LiDAR CHM covers a few survey areas; GEDI's spaceborne LiDAR samples canopy height almost everywhere between
51.6° N and S, one ~25 m footprint every 60 m along its tracks, each with relative heights (``rh98``, ``rh95``...)
in metres. Global canopy-height maps are trained on exactly that: a dense model, supervised only at the footprints
(Lang et al. 2023 label the 10 m pixel under each footprint's centre). :class:`FootprintHeights` gives a height
model such labels on any tile's grid: each footprint's value on the pixel under its centre, or with
``footprint_m`` on every pixel whose centre lies within that diameter of it, NaN elsewhere, so the loss and the
metrics count the footprints' pixels only. Points in any CRS (a GeoPackage, GeoJSON, shapefile, or a CSV with
``lon``, ``lat`` columns; :func:`~dinov3_eo.tasks.tile_values.vector_values`); polygons (field plots) label the
pixels they hold. Where footprints overlap, a pixel takes their mean.

:func:`evaluate_height_footprints` scores a height map against footprints: each footprint's predicted height is
the mean of the map's pixels under it (read block by block, a footprint cut by a block edge pieced together), so
the metrics count footprints, not pixels.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.crs import CRS
from rasterio.transform import Affine


#: GEDI's footprint diameter (m)
GEDI_FOOTPRINT_M = 25.0


def is_vector_heights(source: Any) -> bool:
    """Whether height ``source`` is footprints (a ``GeoDataFrame``, or one vector / CSV file) rather than rasters."""
    from dinov3_eo.data.labels import is_geodataframe, is_raster_labels

    if is_geodataframe(source):
        return True
    if isinstance(source, (list, tuple)):
        return False
    return Path(source).suffix.lower() in (".gpkg", ".geojson", ".json", ".shp", ".csv", ".parquet", ".fgb") and \
        not is_raster_labels(source)


def _pixels_under(points: Any, transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, cols, inside)`` ``[N]``: the grid pixel under each point of ``points`` (a ``GeoSeries`` in the grid's
    CRS) and whether it lies on the grid."""
    cols, rows = ~transform @ (points.x.to_numpy(), points.y.to_numpy())
    rows, cols = np.floor(rows).astype(np.int64), np.floor(cols).astype(np.int64)
    return rows, cols, (rows >= 0) & (rows < shape[0]) & (cols >= 0) & (cols < shape[1])


def _grid_bounds(transform: Affine, shape: tuple[int, int]) -> tuple[float, float, float, float]:
    xs, ys = zip(*(transform @ corner for corner in ((0, 0), (shape[1], 0), (0, shape[0]), (shape[1], shape[0]))))
    return min(xs), min(ys), max(xs), max(ys)


class FootprintHeights:
    """Reference heights (metres) of footprints, on any tile's grid: the labels of a height model trained on GEDI
    shots or field plots (module docstring).

    Args:
        path: the footprints: points (or polygons) with a height ``attribute``, any CRS.
        attribute: the height column (GEDI: ``rh98``; default: the only numeric column).
        footprint_m: label every pixel whose centre lies within this diameter (metres) of a point; ``None``: the
            pixel under the point only. Polygons always label the pixels whose centres they hold.
        clip_negative: heights below 0 become 0. max_height: heights above it are dropped (outliers).

    Raises:
        FileNotFoundError, KeyError, ValueError: as :func:`~dinov3_eo.tasks.tile_values.vector_values`; ValueError
        also for ``footprint_m`` <= 0.
    """

    pairing = "georeference"

    def __init__(self, *, path: Any, attribute: str | None = None, footprint_m: float | None = None,
                 clip_negative: bool = True, max_height: float | None = None) -> None:  # fmt: skip
        from dinov3_eo.tasks.tile_values import vector_values

        if footprint_m is not None and footprint_m <= 0:
            raise ValueError(f"The footprint diameter must be positive metres, got {footprint_m}.")
        frame = vector_values(path, attribute)
        values = frame["_value"].to_numpy(np.float64)
        if clip_negative:
            values = np.maximum(values, 0.0)
        keep = np.ones(len(values), bool) if max_height is None else values <= max_height
        self.frame = frame.loc[keep, [frame.geometry.name]].assign(_value=values[keep]).reset_index(drop=True)
        self.footprint_m, self.source = footprint_m, path
        self.points = bool(len(self.frame)) and bool(self.frame.geometry.geom_type.isin(["Point"]).all())
        self._by_crs: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def centre_pixels(self) -> bool:
        """Each point labels the pixel under it alone (points without a ``footprint_m``)."""
        return self.points and self.footprint_m is None

    @property
    def files(self) -> list:
        """No raster files (rasters' :class:`~dinov3_eo.tasks.height_data.HeightLabels` list theirs)."""
        return []

    def close(self) -> None:
        """Nothing to close: the footprints are held in memory."""

    def _in_crs(self, crs: CRS) -> Any:
        """The footprints in ``crs`` (each CRS once), points buffered to ``footprint_m`` where asked."""
        key = crs.to_wkt() if crs is not None else ""
        if key not in self._by_crs:
            frame = self.frame.to_crs(crs)
            if self.points and self.footprint_m is not None:
                from dinov3_eo.data.raster import metres_per_unit

                factor = metres_per_unit(crs)
                if factor is None:
                    raise ValueError(f"Footprints of {self.footprint_m:g} m need a grid in metres; this tile's CRS "
                                     f"({crs}) has degrees. Leave out the footprint size (the centre pixel), or "
                                     "reproject the imagery.")  # fmt: skip
                frame = frame.assign(geometry=frame.geometry.buffer(self.footprint_m / 2 / factor, resolution=16))
            self._by_crs[key] = frame
        return self._by_crs[key]

    def _near(self, crs: CRS, transform: Affine, shape: tuple[int, int]) -> Any:
        """The footprints whose geometry meets the grid's bounds."""
        from shapely.geometry import box

        frame = self._in_crs(crs)
        if not len(frame):
            return frame
        return frame.iloc[frame.sindex.query(box(*_grid_bounds(transform, shape)))]

    def read(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], resampling: Any = None,
             path: str | os.PathLike | None = None) -> np.ndarray:  # fmt: skip
        """Heights float32 ``(H, W)`` on the grid: each footprint's value on its pixels (the mean where several
        meet), NaN elsewhere (``resampling`` and ``path`` are accepted for :class:`HeightLabels`' signature)."""
        near = self._near(crs, transform, shape)
        out = np.full(shape, np.nan, np.float32)
        if not len(near):
            return out
        values = near["_value"].to_numpy(np.float64)
        if self.centre_pixels:
            rows, cols, inside = _pixels_under(near.geometry, transform, shape)
            flat = rows[inside] * shape[1] + cols[inside]
            sums = np.bincount(flat, weights=values[inside], minlength=shape[0] * shape[1])
            counts = np.bincount(flat, minlength=shape[0] * shape[1])
        else:
            from rasterio.features import MergeAlg, rasterize

            geometries = list(near.geometry)
            common = dict(out_shape=shape, transform=transform, fill=0, merge_alg=MergeAlg.add, dtype="float64")
            sums = rasterize(zip(geometries, values), **common).reshape(-1)
            counts = rasterize(((g, 1.0) for g in geometries), **common).reshape(-1)
        labelled = counts > 0
        out.reshape(-1)[labelled] = (sums[labelled] / counts[labelled]).astype(np.float32)
        return out

    def sample(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], valid: np.ndarray | None = None,
               path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """``{"target": float32 (H, W)}`` on a tile grid, NaN off the footprints and where the image is invalid."""
        target = self.read(crs=crs, transform=transform, shape=shape)
        if valid is not None:
            target[~valid] = np.nan
        return {"target": torch.from_numpy(target)}

    def count(self, *, crs: CRS, transform: Affine, shape: tuple[int, int]) -> int:
        """The footprints that label at least one pixel of the grid."""
        labelled = np.isfinite(self.read(crs=crs, transform=transform, shape=shape))
        if not labelled.any():
            return 0
        if self.centre_pixels:
            return int(min(len(self._near(crs, transform, shape)), labelled.sum()))
        return len(self._near(crs, transform, shape))

    def coverage(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], max_side: int = 32,
                 path: str | os.PathLike | None = None) -> float:  # fmt: skip
        """The fraction of the grid's pixels the footprints label."""
        return float(np.isfinite(self.read(crs=crs, transform=transform, shape=shape)).mean())


#: how a map's pixels under a footprint are summarised: ``mean`` (a model trained on footprints predicts the
#: footprint's height at every pixel) or ``max`` (a model of a LiDAR CHM, against GEDI's top-of-canopy ``rh98``)
FOOTPRINT_STATISTICS = ("mean", "max")


def footprint_means(raster: str | os.PathLike[str], footprints: FootprintHeights, *, statistic: str = "mean",
                    block: int = 1024) -> np.ndarray:  # fmt: skip
    """``[N]`` the mean (or ``max``) of ``raster``'s band 1 under each footprint (NaN and nodata pixels left out;
    NaN where none is left), read in ``block``-px blocks so that memory stays flat. Discs and polygons are the zones
    of :func:`~dinov3_eo.tasks.zonal.zonal_statistics` (a footprint cut by a block edge is whole again, overlapping
    ones each count their pixels); points without a footprint take the pixel under them.

    Raises:
        ValueError: the raster has no georeference.
    """
    import rasterio

    from dinov3_eo.data.raster import GDAL_CACHE_MB, block_windows, open_quietly, require_georeferenced

    if statistic not in FOOTPRINT_STATISTICS:
        raise ValueError(f"A footprint's pixels are summarised by one of {FOOTPRINT_STATISTICS}, not {statistic!r}.")
    n = len(footprints)
    with open_quietly(raster) as src:
        require_georeferenced(src)
        crs = src.crs
    if not n:
        return np.empty(0)
    if not footprints.centre_pixels:
        from dinov3_eo.tasks.zonal import zonal_statistics

        zones = footprints._in_crs(crs)
        zones = zones[[zones.geometry.name]]
        return zonal_statistics(raster, zones, classes=False, block=block, progress=False)[statistic].to_numpy(float)
    sums, counts, maxima = np.zeros(n), np.zeros(n, np.int64), np.full(n, -np.inf)
    # each block is read once: GDAL's default block cache (5 % of RAM) would only fill with blocks never reused
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_MB * 2**20), open_quietly(raster) as src:
        for window in block_windows(src.height, src.width, block):
            transform, shape = src.window_transform(window), (int(window.height), int(window.width))
            near = footprints._near(src.crs, transform, shape)
            if not len(near):
                continue
            values = src.read(1, window=window, masked=True).astype(np.float64).filled(np.nan)
            ids = near.index.to_numpy()  # the footprints' rows (the frame's index is 0..n-1)
            rows, cols, inside = _pixels_under(near.geometry, transform, shape)
            picked = values[rows[inside], cols[inside]]
            ok = np.isfinite(picked)
            np.add.at(sums, ids[inside][ok], picked[ok])
            np.add.at(counts, ids[inside][ok], 1)
            np.maximum.at(maxima, ids[inside][ok], picked[ok])
    summary = maxima if statistic == "max" else sums / np.maximum(counts, 1)
    return np.where(counts > 0, summary, np.nan)


def evaluate_height_footprints(
    prediction: str | os.PathLike[str],
    footprints: Any,
    *,
    attribute: str | None = None,
    footprint_m: float | None = None,
    statistic: str = "mean",
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    bins: Sequence[tuple[float, float]] | None = None,
) -> tuple[dict[str, dict[str, float]], Any]:
    """Metrics (overall and per reference-height bin) of a height map against footprints, one pair per footprint:
    the map's ``statistic`` under it (:func:`footprint_means`) against its height.

    Args:
        prediction: a height raster in metres (``height predict``'s).
        footprints: points (GEDI shots: ``attribute`` ``rh98``) or polygons with heights; any CRS.
        footprint_m: the footprints' diameter (GEDI: 25 m); ``None``: the pixel under each point (as a model trained
            on footprints was labelled).
        statistic: ``mean`` or ``max`` of the map's pixels under a footprint (:data:`FOOTPRINT_STATISTICS`).
        out_dir: also write ``metrics.json``, ``footprints.gpkg`` (each footprint's reference and predicted height)
            and ``scatter.png`` here.

    Returns:
        The metrics and the footprints as a ``GeoDataFrame`` with ``reference``, ``predicted``, ``error``.

    Raises:
        FileExistsError: a report file exists without ``overwrite``. ValueError: no footprint falls on the map.
    """
    from dinov3_eo.inference.writers import atomic_output, check_overwrite, write_vector
    from dinov3_eo.tasks.height_metrics import HEIGHT_BINS, height_metrics
    from dinov3_eo.tasks.height_plots import scatter_plot

    names = ("metrics.json", "footprints.gpkg", "scatter.png")
    if out_dir is not None and Path(out_dir).is_dir():
        for name in names:
            check_overwrite(Path(out_dir) / name, overwrite, inputs=[prediction])
    heights = footprints if isinstance(footprints, FootprintHeights) else FootprintHeights(
        path=footprints, attribute=attribute, footprint_m=footprint_m, clip_negative=False)  # fmt: skip
    predicted = footprint_means(prediction, heights, statistic=statistic)
    reference = heights.frame["_value"].to_numpy(np.float64)
    found = np.isfinite(predicted)
    if not found.any():
        raise ValueError(f"No footprint of {heights.source} falls on a valued pixel of {prediction}; check that they "
                         "cover the same ground.")  # fmt: skip
    metrics = height_metrics(predicted[found], reference[found], bins=HEIGHT_BINS if bins is None else bins)
    frame = heights.frame.loc[found, [heights.frame.geometry.name]].assign(
        reference=reference[found], predicted=predicted[found], error=predicted[found] - reference[found])
    if out_dir is not None:
        import json

        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_output(folder / "metrics.json", overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps({"prediction": os.fspath(prediction), "footprints": str(heights.source),
                                       "footprint_m": footprint_m, "statistic": statistic,
                                       "footprints_on_map": int(found.sum()),
                                       "footprints_off_map": int((~found).sum()), "metrics": metrics}, indent=2))  # fmt: skip
        write_vector(frame, folder / "footprints.gpkg", layer="footprints", overwrite=overwrite)
        scatter_plot(folder / "scatter.png", predicted[found], reference[found], counted="footprints",
                     title=f"{Path(prediction).name}: {int(found.sum())} footprints", overwrite=overwrite)  # fmt: skip
    return metrics, frame


__all__ = [
    "FOOTPRINT_STATISTICS",
    "GEDI_FOOTPRINT_M",
    "FootprintHeights",
    "evaluate_height_footprints",
    "footprint_means",
    "is_vector_heights",
]
