"""Labels on the tile grid: a label raster warped on the fly, or vector polygons rasterised on the fly.

Both sources answer one question — "what are the labels on this tile's pixel grid?" — through
``sample(crs=, transform=, shape=, valid=)``, returning ``{"mask": int64 (H, W)}`` for classes or
``{"target": float32 (H, W)}`` for regression. The tile grid may be in any CRS and resolution: a
label raster is read through a ``WarpedVRT`` onto exactly that grid (nearest for classes, so no class
is ever invented by interpolation), a vector file is reprojected to it and burnt in. Pixels that are
unlabelled, label-nodata, or invalid in the image get ``ignore_index`` (classes) or NaN (regression).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.features import rasterize
from rasterio.transform import Affine, array_bounds
from rasterio.vrt import WarpedVRT

from dinov3_eo.data.raster import PerThread

TASKS = ("classification", "regression")


def _close_dataset(src: Any) -> None:
    src.close()


class RasterLabels:
    """Labels from a raster in any CRS/resolution, warped to each tile's grid.

    Args:
        path: the label raster (band ``band``).
        task: ``"classification"`` (values are class ids) or ``"regression"`` (values are targets).
        nodata: label nodata override (default: the file's declared nodata).
        ignore_index: class id written where there is no label.
        resampling: ``"nearest"`` for classes (enforced); any rasterio name for regression.
        band: 1-based band of the label raster.

    Raises:
        ValueError: for an unknown task, a non-nearest resampling for classes, or a raster without CRS.
        IndexError: if ``band`` is not a band of the raster.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike,
        task: str = "classification",
        nodata: float | None = None,
        ignore_index: int = 255,
        resampling: str = "nearest",
        band: int = 1,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"RasterLabels: task must be one of {TASKS}, got {task!r}.")
        if resampling not in Resampling.__members__:
            raise ValueError(f"RasterLabels: unknown resampling {resampling!r}.")
        if task == "classification" and resampling != "nearest":
            raise ValueError(f"RasterLabels: class labels must be resampled with 'nearest', got {resampling!r}.")
        self.path, self.task, self.ignore_index, self.band = os.fspath(path), task, int(ignore_index), int(band)
        self.resampling = Resampling[resampling]
        with rasterio.open(self.path) as src:
            if src.crs is None:
                raise ValueError(f"RasterLabels: {self.path} is not georeferenced (no CRS).")
            if not 1 <= self.band <= src.count:
                raise IndexError(f"RasterLabels: band {band} is outside [1, {src.count}] for {self.path}.")
            self.nodata = src.nodata if nodata is None else nodata
        self._src = PerThread(functools.partial(rasterio.open, self.path), close=_close_dataset)  # one per process and thread

    def read(self, *, crs: CRS, transform: Affine, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Label values (H, W) on the given grid and where they exist (bool (H, W))."""
        src = self._src.get()
        height, width = shape
        # A nodata value is needed so pixels outside the label raster are recognisable after warping.
        nodata = self.nodata
        with WarpedVRT(
            src, crs=crs, transform=transform, width=width, height=height, resampling=self.resampling,
            src_nodata=nodata, nodata=nodata, add_alpha=nodata is None,
        ) as vrt:  # fmt: skip
            values = vrt.read(self.band)
            labelled = vrt.read_masks(self.band) > 0
        if np.issubdtype(values.dtype, np.floating):
            labelled &= ~np.isnan(values)
        return values, labelled

    def sample(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], valid: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``{"mask": int64 (H, W)}`` or ``{"target": float32 (H, W)}`` for a tile grid."""
        import torch

        values, labelled = self.read(crs=crs, transform=transform, shape=shape)
        if valid is not None:
            labelled &= valid
        if self.task == "regression":
            target = np.where(labelled, values.astype(np.float32), np.float32(np.nan))
            return {"target": torch.from_numpy(target)}
        mask = np.where(labelled, values.astype(np.int64), self.ignore_index)
        return {"mask": torch.from_numpy(mask)}


class VectorLabels:
    """Labels from polygons (GeoPackage, GeoJSON, shapefile...) burnt onto each tile's grid.

    Args:
        path: the vector file.
        attribute: column holding the class (names or integer ids).
        classes: mapping class name/value -> id; default: sorted unique values of ``attribute``
            numbered from 0 (integer columns keep their values).
        layer: layer of a multi-layer file.
        ignore_index: id where no polygon lies (and where the image is invalid).
        background: id for pixels inside the image that no polygon covers; ``None`` means ignore them
            (labels are sparse, as for the bundled land-cover polygons).
        all_touched: burn every pixel a polygon touches, not only those whose centre it covers.

    Raises:
        KeyError: if ``attribute`` is not a column.
        ValueError: if an attribute value is missing from ``classes``.
    """

    def __init__(
        self,
        *,
        path: str | os.PathLike,
        attribute: str = "name",
        classes: Mapping[Any, int] | None = None,
        layer: str | None = None,
        ignore_index: int = 255,
        background: int | None = None,
        all_touched: bool = False,
    ) -> None:
        self.path, self.attribute, self.layer = os.fspath(path), attribute, layer
        self.ignore_index, self.background, self.all_touched = int(ignore_index), background, all_touched
        gdf = self._load()
        if attribute not in gdf.columns:
            raise KeyError(f"VectorLabels: {self.path} has no attribute {attribute!r}; columns are {list(gdf.columns)}.")
        if gdf.crs is None:
            raise ValueError(f"VectorLabels: {self.path} has no CRS.")
        values = gdf[attribute].dropna().unique().tolist()
        if classes is None:
            if all(isinstance(v, (int, np.integer)) for v in values):
                classes = {int(v): int(v) for v in values}
            else:
                classes = {v: i for i, v in enumerate(sorted(str(v) for v in values))}
        unknown = sorted({str(v) for v in values} - {str(k) for k in classes})
        if unknown:
            raise ValueError(f"VectorLabels: values {unknown} of {attribute!r} are missing from classes {dict(classes)}.")
        self.classes = {str(k): int(v) for k, v in classes.items()}
        self._by_crs: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_by_crs"] = {}  # reloaded lazily in each worker
        return state

    def _load(self):
        import geopandas as gpd

        return gpd.read_file(self.path, layer=self.layer)

    def _in_crs(self, crs: CRS):
        key = crs.to_wkt()
        if key not in self._by_crs:
            gdf = self._load()
            gdf = gdf[gdf[self.attribute].notna()]
            self._by_crs[key] = gdf.to_crs(crs)
        return self._by_crs[key]

    def sample(self, *, crs: CRS, transform: Affine, shape: tuple[int, int], valid: np.ndarray | None = None) -> dict[str, Any]:
        """``{"mask": int64 (H, W)}`` of class ids on the tile grid."""
        import torch

        gdf = self._in_crs(crs)
        west, south, east, north = array_bounds(shape[0], shape[1], transform)
        hits = gdf.iloc[gdf.sindex.query(_box(west, south, east, north))]
        fill = self.ignore_index if self.background is None else int(self.background)
        shapes = [(geom, self.classes[str(v)]) for geom, v in zip(hits.geometry, hits[self.attribute]) if geom is not None]
        if shapes:
            mask = rasterize(shapes, out_shape=shape, transform=transform, fill=fill, all_touched=self.all_touched, dtype="int64")
        else:
            mask = np.full(shape, fill, dtype=np.int64)
        if valid is not None:
            mask[~valid] = self.ignore_index
        return {"mask": torch.from_numpy(mask)}


def _box(west: float, south: float, east: float, north: float):
    from shapely.geometry import box

    return box(west, south, east, north)
