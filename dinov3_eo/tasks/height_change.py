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

With the two dates' prediction intervals (``height predict --intervals`` writes ``<out>_interval.tif``: each pixel's
lower and upper height), the change gets one too, ``[lower_after - upper_before, upper_after - lower_before]``
(``dh_interval.tif``). It holds whenever both dates' intervals hold, so its coverage is at least ``c_before +
c_after - 1`` (Bonferroni: 80 % from two 90 % intervals). Loss then needs the whole interval below zero (the canopy
surely dropped) on top of the thresholds; a pixel past the thresholds whose interval reaches zero is ``loss?``
(unsure), and likewise ``gain?``: the maps cannot tell that change from their own error.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rasterio.enums import Resampling

#: class ids of the change classes (and the class map's nodata); the unsure ones only with intervals
STABLE, LOSS, GAIN, UNSURE_LOSS, UNSURE_GAIN, CLASS_NODATA = 0, 1, 2, 3, 4, 255
CLASS_NAMES = ["stable", "loss", "gain", "loss?", "gain?"]
CLASS_COLOURS = {STABLE: (230, 230, 230, 255), LOSS: (202, 0, 32, 255), GAIN: (5, 113, 176, 255),
                 UNSURE_LOSS: (244, 165, 130, 255), UNSURE_GAIN: (146, 197, 222, 255)}  # fmt: skip


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
    interval: Path | None = None
    coverage: float | None = None
    unsure_loss_pixels: int = 0
    unsure_gain_pixels: int = 0
    unsure_loss_ha: float | None = None
    unsure_gain_ha: float | None = None


def classify_height_change(before: np.ndarray, delta: np.ndarray, *, threshold: float, min_height: float,
                           lower: np.ndarray | None = None, upper: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Change classes of ``delta = after - before`` (metres, NaN = no data): uint8 of :data:`STABLE`, :data:`LOSS`
    (``before >= min_height`` and ``delta <= -threshold``), :data:`GAIN` (``delta >= threshold``), :data:`CLASS_NODATA`.
    With the change's interval (``lower``, ``upper``): loss also needs ``upper < 0`` and gain ``lower > 0``, else
    :data:`UNSURE_LOSS` / :data:`UNSURE_GAIN` (an interval end of NaN counts as unsure). Shapes: any, all the same."""
    seen = np.isfinite(delta) & np.isfinite(before)
    classes = np.full(delta.shape, CLASS_NODATA, dtype=np.uint8)
    classes[seen] = STABLE
    with np.errstate(invalid="ignore"):
        loss = seen & (before >= min_height) & (delta <= -threshold)
        gain = seen & (delta >= threshold)
        if upper is not None:
            classes[loss & ~(upper < 0)] = UNSURE_LOSS
            loss &= upper < 0
        if lower is not None:
            classes[gain & ~(lower > 0)] = UNSURE_GAIN
            gain &= lower > 0
        classes[loss] = LOSS
        classes[gain] = GAIN
    return classes


def change_interval(before: np.ndarray, after: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interval of ``after - before`` from each date's ``[2, ...]`` (lower, upper) interval: ``(lower_after -
    upper_before, upper_after - lower_before)``; it holds wherever both hold."""
    return after[0] - before[1], after[1] - before[0]


def interval_coverage(path: str | os.PathLike[str]) -> float:
    """The coverage an interval raster (``height predict --intervals``) was calibrated for, from its tags.

    Raises:
        ValueError: a raster without two bands or without a ``coverage`` tag.
    """
    from dinov3_eo.data.raster import open_quietly

    with open_quietly(path) as src:
        count, coverage = src.count, src.tags().get("coverage")
    if count != 2 or coverage is None:
        raise ValueError(f"{os.fspath(path)!r} is not a height interval raster (two bands, lower and upper, with a "
                         "'coverage' tag, as 'height predict --intervals' writes).")  # fmt: skip
    return float(coverage)


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
    intervals: tuple[str | os.PathLike[str], str | os.PathLike[str]] | None = None,
    interval_dst: str | os.PathLike[str] | None = None,
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
        intervals: the before and after dates' interval rasters (module docstring; each on its date's grid, brought
            onto ``before``'s like the heights): writes the change's interval to ``interval_dst`` (default
            ``<dst stem>_interval.tif``) and classes loss / gain only where it excludes zero.
        block: rows and columns processed at once.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false (checked before any work).
        ValueError: a negative threshold or min height, rasters that cannot be stacked (see
            :class:`~dinov3_eo.data.stack.RasterStack`).
    """
    from dinov3_eo.data.raster import block_windows, pixel_area_ha
    from dinov3_eo.data.stack import RasterStack
    from dinov3_eo.inference.writers import COGWriter, check_overwrite

    if threshold < 0 or min_height < 0:
        raise ValueError(f"threshold and min_height must be >= 0 metres, got {threshold} and {min_height}.")
    inputs = [before, after, *(intervals or ())]
    dst = check_overwrite(dst, overwrite, inputs=inputs)
    classes = check_overwrite(classes if classes is not None else dst.with_name(f"{dst.stem}_classes.tif"), overwrite,
                              inputs=inputs)  # fmt: skip
    coverage = None
    if intervals is not None:
        interval_dst = check_overwrite(interval_dst if interval_dst is not None
                                       else dst.with_name(f"{dst.stem}_interval.tif"), overwrite, inputs=inputs)  # fmt: skip
        coverage = max(0.0, sum(interval_coverage(p) for p in intervals) - 1.0)
    for extra in (polygons, quicklook):
        if extra is not None:
            check_overwrite(extra, overwrite, inputs=inputs)
    counts = np.zeros(len(CLASS_NAMES), dtype=np.int64)
    total = 0.0
    # the intervals are masked with the heights (common_mask): a pixel without a height has no change interval
    with RasterStack([before, after, *(intervals or ())], nodata=[before_nodata, after_nodata, None, None][: len(inputs)],
                     resampling=resampling, common_mask=True) as stack, contextlib.ExitStack() as outputs:  # fmt: skip
        common = {"crs": stack.crs, "transform": stack.transform, "width": stack.width, "height": stack.height,
                  "overwrite": overwrite}  # fmt: skip
        tags = {"before": os.fspath(before), "after": os.fspath(after), "threshold_m": threshold, "min_height_m": min_height}
        names = CLASS_NAMES if intervals is not None else CLASS_NAMES[:3]
        out_change = outputs.enter_context(COGWriter(
            dst, count=1, dtype="float32", nodata=float("nan"), band_descriptions=["height change (m)"],
            tags={"quantity": "canopy height change, after - before", "units": "metre", **tags}, **common))  # fmt: skip
        out_classes = outputs.enter_context(COGWriter(
            classes, count=1, dtype="uint8", nodata=CLASS_NODATA, class_names=names,
            colormap={k: v for k, v in CLASS_COLOURS.items() if k < len(names)},
            tags={"dinov3_eo_output": "height_change_classes", **tags}, **common))  # fmt: skip
        out_interval = None
        if intervals is not None:
            percent = f"{100 * coverage:.0f} %"
            out_interval = outputs.enter_context(COGWriter(
                interval_dst, count=2, dtype="float32", nodata=float("nan"), units=["m", "m"],
                band_descriptions=[f"lower end of the change's interval (at least {percent})",
                                   f"upper end of the change's interval (at least {percent})"],
                tags={"coverage": coverage, "before_interval": os.fspath(intervals[0]),
                      "after_interval": os.fspath(intervals[1]), **tags}, **common))  # fmt: skip
        first = np.cumsum([0, *stack.counts])  # each member's first band in the stack, 0-based
        bands = [1, first[1] + 1] + ([first[2] + 1, first[2] + 2, first[3] + 1, first[3] + 2] if intervals else [])
        for window in block_windows(stack.height, stack.width, block):
            read = stack.read(bands, window=window)  # [2 or 6, h, w] metres, NaN where unseen
            delta = read[1] - read[0]
            lower = upper = None
            if out_interval is not None:
                lower, upper = change_interval(read[2:4], read[4:6])
                out_interval.write(np.stack([lower, upper]), window)
            labels = classify_height_change(read[0], delta, threshold=threshold, min_height=min_height,
                                            lower=lower, upper=upper)  # fmt: skip
            out_change.write(delta[None], window)
            out_classes.write(labels[None], window)
            counts += np.bincount(labels[labels != CLASS_NODATA], minlength=len(CLASS_NAMES))[: len(CLASS_NAMES)]
            total += float(np.nansum(delta))
        hectares = pixel_area_ha(stack.crs, stack.transform)
    if polygons is not None:
        from dinov3_eo.inference.writers import vectorize_classes

        vectorize_classes(classes, polygons, keep=[LOSS], min_area=min_area, layer="loss", overwrite=overwrite)
    if quicklook is not None:
        from dinov3_eo.tasks.height_plots import change_quicklook

        change_quicklook(quicklook, dst, title=f"{Path(after).name} - {Path(before).name}", overwrite=overwrite)
    valid = int(counts.sum())
    area = lambda k: None if hectares is None else float(counts[k]) * hectares  # noqa: E731
    return HeightChangeSummary(
        change=dst, classes=classes, polygons=Path(polygons) if polygons is not None else None,
        quicklook=Path(quicklook) if quicklook is not None else None, valid_pixels=valid,
        loss_pixels=int(counts[LOSS]), gain_pixels=int(counts[GAIN]), mean_change_m=total / valid if valid else None,
        loss_ha=area(LOSS), gain_ha=area(GAIN), interval=Path(interval_dst) if intervals is not None else None,
        coverage=coverage, unsure_loss_pixels=int(counts[UNSURE_LOSS]), unsure_gain_pixels=int(counts[UNSURE_GAIN]),
        unsure_loss_ha=area(UNSURE_LOSS), unsure_gain_ha=area(UNSURE_GAIN),
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
    p.add_argument("--intervals", nargs="*", default=None, metavar="INTERVAL.tif",
                   help="the two dates' prediction intervals ('height predict --intervals'; none given: BEFORE's and "
                   "AFTER's <stem>_interval.tif beside them): writes OUTPUT_interval.tif and classes loss / gain only "
                   "where the change's interval excludes zero (else 'loss?' / 'gain?')")  # fmt: skip
    p.add_argument("--no-quicklook", action="store_true", help="do not write the PNG picture")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(list(argv))
    intervals = None
    if args.intervals is not None:
        if len(args.intervals) not in (0, 2):
            raise ValueError(f"--intervals takes the before and after dates' interval rasters, or none (the "
                             f"<stem>_interval.tif beside each height raster); got {len(args.intervals)}.")  # fmt: skip
        intervals = tuple(args.intervals) or tuple(Path(h).with_name(f"{Path(h).stem}_interval.tif")
                                                   for h in (args.before, args.after))  # fmt: skip
        for path in intervals:
            if not Path(path).is_file():
                raise FileNotFoundError(f"Interval raster {os.fspath(path)!r} does not exist; write it with 'dinov3-eo "
                                        "height predict ... --intervals intervals.json'.")  # fmt: skip
    summary = height_change(
        args.before, args.after, args.output, threshold=args.threshold, min_height=args.min_height,
        before_nodata=args.before_nodata, after_nodata=args.after_nodata, resampling=Resampling[args.resampling],
        polygons=args.polygons, min_area=args.min_area, intervals=intervals,
        quicklook=None if args.no_quicklook else Path(args.output).with_suffix(".png"), overwrite=args.overwrite,
    )  # fmt: skip
    print(f"height change: {summary.change}")
    print(f"classes:       {summary.classes}")
    if summary.valid_pixels:
        area = lambda ha: "" if ha is None else f", {ha:,.2f} ha"  # noqa: E731
        print(f"loss {summary.loss_pixels / summary.valid_pixels:.1%}{area(summary.loss_ha)}, gain "
              f"{summary.gain_pixels / summary.valid_pixels:.1%}{area(summary.gain_ha)} of {summary.valid_pixels:,} "
              f"pixels with a height on both dates; mean change {summary.mean_change_m:+.2f} m")  # fmt: skip
        if summary.interval is not None:
            print(f"unsure (the change's interval, at least {100 * summary.coverage:.0f} %, reaches zero): loss? "
                  f"{summary.unsure_loss_pixels / summary.valid_pixels:.1%}{area(summary.unsure_loss_ha)}, gain? "
                  f"{summary.unsure_gain_pixels / summary.valid_pixels:.1%}{area(summary.unsure_gain_ha)}")  # fmt: skip
    for label, path in (("interval:     ", summary.interval), ("polygons:     ", summary.polygons),
                        ("picture:      ", summary.quicklook)):  # fmt: skip
        if path is not None:
            print(f"{label}{path}")
    return 0


__all__ = ["HeightChangeSummary", "change_interval", "change_main", "classify_height_change", "height_change",
           "interval_coverage"]
