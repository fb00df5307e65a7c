"""Canopy height change between two dates: where the forest lost height (harvest, fire, storm) and where it grew.

Given two canopy height rasters in metres (``dinov3-eo height predict`` outputs of two acquisitions, or LiDAR CHMs),
:func:`height_change` writes, on the grid of the earlier one and block by block (the later one warped onto it per
window through a :class:`~dinov3_eo.data.stack.RasterStack`, average-resampled by default so that a finer CHM is
aggregated rather than sampled):

* ``dh.tif``: the change ``after - before`` in metres (float32, NaN where either date has no height);
* ``dh_classes.tif``: 0 stable, 1 loss (the canopy was at least ``min_height`` tall and dropped by at least
  ``threshold``), 2 gain (it rose by at least ``threshold``), 255 nodata; polygons of the loss on request;
* ``dh.png``: the change on a diverging scale (blue = loss, red = gain).

The summary gives the pixels and hectares of loss and gain and the mean change, the numbers a forest-loss report
starts from. ``dinov3-eo height change`` is its command.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.enums import Resampling

#: class ids of the change classes (and the class map's nodata)
STABLE, LOSS, GAIN, CLASS_NODATA = 0, 1, 2, 255
CLASS_NAMES = ["stable", "loss", "gain"]
CLASS_COLOURS = {STABLE: (230, 230, 230, 255), LOSS: (202, 0, 32, 255), GAIN: (5, 113, 176, 255)}


@dataclass(frozen=True)
class HeightChangeSummary:
    """What :func:`height_change` wrote and counted (areas ``None`` on a grid in degrees)."""

    change: Path
    classes: Path
    polygons: Path | None
    quicklook: Path | None
    valid_pixels: int
    loss_pixels: int
    gain_pixels: int
    mean_change_m: float | None
    loss_ha: float | None
    gain_ha: float | None


def classify_height_change(before: np.ndarray, delta: np.ndarray, *, threshold: float, min_height: float) -> np.ndarray:
    """Change classes of ``delta = after - before`` (metres, NaN = no data): uint8 of :data:`STABLE`, :data:`LOSS`
    (``before >= min_height`` and ``delta <= -threshold``), :data:`GAIN` (``delta >= threshold``), :data:`CLASS_NODATA`.
    Shapes: any, the same for both."""
    seen = np.isfinite(delta) & np.isfinite(before)
    classes = np.full(delta.shape, CLASS_NODATA, dtype=np.uint8)
    classes[seen] = STABLE
    with np.errstate(invalid="ignore"):
        classes[seen & (before >= min_height) & (delta <= -threshold)] = LOSS
        classes[seen & (delta >= threshold)] = GAIN
    return classes


def height_change(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    threshold: float = 5.0,
    min_height: float = 5.0,
    before_nodata: float | None = None,
    after_nodata: float | None = None,
    resampling: Resampling = Resampling.average,
    classes: str | os.PathLike[str] | None = None,
    polygons: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    quicklook: str | os.PathLike[str] | None = None,
    block: int = 1024,
    overwrite: bool = False,
) -> HeightChangeSummary:
    """Write the height change ``after - before`` (metres) and its stable / loss / gain classes on ``before``'s grid.

    Args:
        before, after: canopy height GeoTIFFs (band 1, metres); ``after`` in any CRS and resolution.
        dst: the change COG (float32 metres, NaN nodata).
        threshold: metres of change that count as loss or gain (default 5).
        min_height: canopy at least this tall on the before date can be lost (default 5 m, a common tree height).
        before_nodata, after_nodata: override the files' nodata.
        resampling: how ``after`` is brought onto ``before``'s grid (``average`` by default).
        classes: the class map (default ``<dst stem>_classes.tif``).
        polygons: also write the loss regions as polygons (GeoPackage); ``min_area`` in CRS units².
        quicklook: a ``.png`` of the change.
        block: rows and columns processed at once.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before any work).
        ValueError: a negative threshold or min height, rasters that cannot be stacked (see
            :class:`~dinov3_eo.data.stack.RasterStack`).
    """
    from rasterio.windows import Window

    from dinov3_eo.data.raster import pixel_area_ha
    from dinov3_eo.data.stack import RasterStack
    from dinov3_eo.inference.writers import COGWriter, check_overwrite

    if threshold < 0 or min_height < 0:
        raise ValueError(f"threshold and min_height must be >= 0 metres, got {threshold} and {min_height}.")
    inputs = [before, after]
    dst = check_overwrite(dst, overwrite, inputs=inputs)
    classes = check_overwrite(classes if classes is not None else dst.with_name(f"{dst.stem}_classes.tif"), overwrite,
                              inputs=inputs)  # fmt: skip
    for extra in (polygons, quicklook):
        if extra is not None:
            check_overwrite(extra, overwrite, inputs=inputs)
    counts = np.zeros(3, dtype=np.int64)
    total = 0.0
    with RasterStack([before, after], nodata=[before_nodata, after_nodata], resampling=resampling,
                     common_mask=True) as stack:  # fmt: skip
        common = {"crs": stack.crs, "transform": stack.transform, "width": stack.width, "height": stack.height,
                  "overwrite": overwrite}  # fmt: skip
        tags = {"before": os.fspath(before), "after": os.fspath(after), "threshold_m": threshold, "min_height_m": min_height}
        with COGWriter(dst, count=1, dtype="float32", nodata=float("nan"), band_descriptions=["height change (m)"],
                       tags={"quantity": "canopy height change, after - before", "units": "metre", **tags},
                       **common) as out_change, \
             COGWriter(classes, count=1, dtype="uint8", nodata=CLASS_NODATA, class_names=CLASS_NAMES,
                       colormap=CLASS_COLOURS, tags={"dinov3_eo_output": "height_change_classes", **tags},
                       **common) as out_classes:  # fmt: skip
            for row in range(0, stack.height, block):
                for col in range(0, stack.width, block):
                    window = Window(col, row, min(block, stack.width - col), min(block, stack.height - row))
                    pair = stack.read([1, stack.counts[0] + 1], window=window)  # [2, h, w] metres, NaN where unseen
                    delta = pair[1] - pair[0]
                    labels = classify_height_change(pair[0], delta, threshold=threshold, min_height=min_height)
                    out_change.write(delta[None], window)
                    out_classes.write(labels[None], window)
                    counts += np.bincount(labels[labels != CLASS_NODATA], minlength=3)[:3]
                    total += float(np.nansum(delta))
        hectares = pixel_area_ha(stack.crs, stack.transform)
    if polygons is not None:
        from dinov3_eo.inference.writers import vectorize_classes

        vectorize_classes(classes, polygons, keep=[LOSS], min_area=min_area, layer="loss", overwrite=overwrite)
    if quicklook is not None:
        from dinov3_eo.tasks.height_plots import change_quicklook

        change_quicklook(quicklook, dst, title=f"{Path(after).name} - {Path(before).name}", overwrite=overwrite)
    valid = int(counts.sum())
    return HeightChangeSummary(
        change=dst, classes=classes, polygons=Path(polygons) if polygons is not None else None,
        quicklook=Path(quicklook) if quicklook is not None else None, valid_pixels=valid,
        loss_pixels=int(counts[LOSS]), gain_pixels=int(counts[GAIN]), mean_change_m=total / valid if valid else None,
        loss_ha=None if hectares is None else float(counts[LOSS]) * hectares,
        gain_ha=None if hectares is None else float(counts[GAIN]) * hectares,
    )  # fmt: skip


def change_main(argv: Sequence[str]) -> int:
    """``dinov3-eo height change BEFORE_CHM.tif AFTER_CHM.tif -o dh.tif``."""
    p = argparse.ArgumentParser(
        prog="dinov3-eo height change",
        description="Canopy height change between two height rasters (metres): after - before on BEFORE's grid, "
        "stable / loss / gain classes, loss polygons and a picture.",
    )
    p.add_argument("before", help="earlier canopy height GeoTIFF (metres); its grid is the output's")
    p.add_argument("after", help="later canopy height GeoTIFF (metres), any CRS and resolution")
    p.add_argument("-o", "--output", required=True, help="change COG (.tif); classes go to OUTPUT_classes.tif, the "
                   "picture to OUTPUT.png")  # fmt: skip
    p.add_argument("--threshold", type=float, default=5.0, help="metres of change that count as loss or gain (default 5)")
    p.add_argument("--min-height", type=float, default=5.0, help="canopy at least this tall before can be lost (default 5 m)")
    p.add_argument("--polygons", default=None, help="also write the loss regions as polygons to this GeoPackage")
    p.add_argument("--min-area", type=float, default=0.0, help="drop loss polygons smaller than this (CRS units²)")
    p.add_argument("--resampling", default="average", choices=["average", "bilinear", "nearest"],
                   help="how AFTER is brought onto BEFORE's grid (default average)")
    p.add_argument("--before-nodata", type=float, default=None)
    p.add_argument("--after-nodata", type=float, default=None)
    p.add_argument("--no-quicklook", action="store_true", help="do not write the PNG picture")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(list(argv))
    summary = height_change(
        args.before, args.after, args.output, threshold=args.threshold, min_height=args.min_height,
        before_nodata=args.before_nodata, after_nodata=args.after_nodata, resampling=Resampling[args.resampling],
        polygons=args.polygons, min_area=args.min_area,
        quicklook=None if args.no_quicklook else Path(args.output).with_suffix(".png"), overwrite=args.overwrite,
    )  # fmt: skip
    print(f"height change: {summary.change}")
    print(f"classes:       {summary.classes}")
    if summary.valid_pixels:
        area = lambda ha: "" if ha is None else f", {ha:,.2f} ha"  # noqa: E731
        print(f"loss {summary.loss_pixels / summary.valid_pixels:.1%}{area(summary.loss_ha)}, gain "
              f"{summary.gain_pixels / summary.valid_pixels:.1%}{area(summary.gain_ha)} of {summary.valid_pixels:,} "
              f"pixels with a height on both dates; mean change {summary.mean_change_m:+.2f} m")  # fmt: skip
    for label, path in (("polygons:     ", summary.polygons), ("picture:      ", summary.quicklook)):
        if path is not None:
            print(f"{label}{path}")
    return 0


__all__ = ["HeightChangeSummary", "change_main", "classify_height_change", "height_change"]
