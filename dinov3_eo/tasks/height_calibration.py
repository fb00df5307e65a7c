"""Canopy-height maps corrected against reference heights: GEDI shots, field plots, or a LiDAR CHM over part of the
map. A model trained elsewhere, or a satellite signal that saturates under tall canopy, leaves a map with a bias
that depends on the height itself (short stands too tall, tall ones too short); a sample of reference heights over
the map measures that distortion and a monotone correction of the map's values removes it.

* ``linear``: ``reference ≈ a + b · predicted`` (least squares) — a constant offset and a constant stretch;
* ``isotonic``: a non-decreasing function of the predicted height (pool-adjacent-violators), linear between its
  knots and flat beyond them — any monotone distortion, such as a map that stops growing above 30 m.

Both keep the map's ordering (a taller pixel stays at least as tall), so the correction changes heights, never
where the tall trees are. What it is worth is measured by k-fold cross-validation over the pairs (each fold
corrected by a fit on the others): RMSE and bias before and after, so a correction that would not carry to new
ground shows it. The correction is saved as JSON and applied window by window (``height calibrate``); the map's
prediction intervals no longer hold after it (calibrate them again on the corrected map).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: the corrections :func:`fit_height_calibration` fits
METHODS = ("linear", "isotonic")


@dataclass
class HeightCalibration:
    """A monotone correction of canopy heights (module docstring).

    Attributes:
        method: ``"linear"`` or ``"isotonic"``.
        knots_x, knots_y: the predicted heights and their corrected values (linear: two points on the line);
            heights between knots are interpolated linearly, beyond them the line is extended (linear) or the end
            value held (isotonic). Corrected heights below 0 become 0.
        n: the pairs fitted. cross_validation: ``{"folds", "before": {"n", "mae", "rmse", "r2", "bias"}, "after":
            {...}}``.
        source: where the pairs came from (for the record).
        by: a correction of its own per stratum (class id of ``strata``, a class raster such as a land-cover map)
            with enough pairs; pixels of other strata, or without one, take the correction above.
    """

    method: str
    knots_x: list[float]
    knots_y: list[float]
    n: int
    cross_validation: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    by: dict[int, HeightCalibration] = field(default_factory=dict)
    strata: str = ""

    def apply(self, heights: np.ndarray, strata: np.ndarray | None = None) -> np.ndarray:
        """The corrected heights of ``heights`` (any shape, metres; NaN stays NaN), float32; with ``strata`` (the
        same shape, class ids), each stratum of :attr:`by` by its own correction."""
        h = np.asarray(heights, np.float64)
        x, y = np.asarray(self.knots_x), np.asarray(self.knots_y)
        if self.method == "linear":
            slope = (y[1] - y[0]) / (x[1] - x[0]) if x[1] != x[0] else 0.0
            out = y[0] + slope * (h - x[0])
        else:
            out = np.interp(h, x, y)
        out = np.where(np.isfinite(h), np.maximum(out, 0.0), np.nan).astype(np.float32)
        if strata is not None:
            for stratum, own in self.by.items():
                inside = np.asarray(strata) == stratum
                out[inside] = own.apply(h[inside])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "knots_x": self.knots_x, "knots_y": self.knots_y, "n": self.n,
                "cross_validation": self.cross_validation, "source": self.source, "strata": self.strata,
                "by": {str(k): v.to_dict() for k, v in self.by.items()}}  # fmt: skip

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Written atomically as JSON."""
        from dinov3_eo.inference.writers import atomic_output

        with atomic_output(path, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HeightCalibration:
        """Read :meth:`save`'s JSON.

        Raises:
            FileNotFoundError: no such file. ValueError: not a height calibration (named keys missing).
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"Height calibration {os.fspath(path)!r} does not exist.")
        try:
            data = json.loads(source.read_text())
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)!r} is not JSON: {err}.") from err
        missing = [k for k in ("method", "knots_x", "knots_y") if k not in data]
        if missing or data.get("method") not in METHODS:
            raise ValueError(f"{os.fspath(path)!r} is not a height calibration (missing {missing or ['a known method']}; "
                             "'height calibrate --save' writes one).")  # fmt: skip
        return cls._from_dict(data)

    @classmethod
    def _from_dict(cls, data: dict[str, Any]) -> HeightCalibration:
        return cls(method=data["method"], knots_x=[float(v) for v in data["knots_x"]],
                   knots_y=[float(v) for v in data["knots_y"]], n=int(data.get("n", 0)),
                   cross_validation=data.get("cross_validation", {}), source=str(data.get("source", "")),
                   by={int(k): cls._from_dict(v) for k, v in data.get("by", {}).items()},
                   strata=str(data.get("strata", "")))  # fmt: skip


def _fit(predicted: np.ndarray, reference: np.ndarray, method: str) -> tuple[list[float], list[float]]:
    """The knots of a correction fitted on ``[n]`` pairs."""
    if method == "linear":
        if np.ptp(predicted) == 0:  # one predicted value: only an offset can be told
            return [float(predicted[0]), float(predicted[0]) + 1.0], [float(reference.mean()), float(reference.mean()) + 1.0]
        slope, intercept = np.polyfit(predicted, reference, 1)
        lo, hi = float(predicted.min()), float(predicted.max())
        return [lo, hi], [intercept + slope * lo, intercept + slope * hi]
    from sklearn.isotonic import IsotonicRegression

    model = IsotonicRegression(out_of_bounds="clip").fit(predicted, reference)
    return [float(v) for v in model.X_thresholds_], [float(v) for v in model.y_thresholds_]


def _scores(predicted: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """``n``, ``mae``, ``rmse``, ``r2``, ``bias`` of the pairs, as ``height evaluate`` scores a map."""
    from dinov3_eo.tasks.height_metrics import height_metrics

    return height_metrics(predicted, reference, bins=())["all"]


def _fit_correction(p: np.ndarray, y: np.ndarray, strata: np.ndarray | None, method: str,
                    min_pairs: int) -> HeightCalibration:  # fmt: skip
    """One correction on all pairs, and one per stratum with at least ``min_pairs`` pairs."""
    calibration = HeightCalibration(method, *_fit(p, y, method), n=len(p))
    if strata is not None:
        for stratum in np.unique(strata[strata >= 0]).tolist():
            inside = strata == stratum
            if inside.sum() >= min_pairs:
                calibration.by[int(stratum)] = HeightCalibration(method, *_fit(p[inside], y[inside], method),
                                                                 n=int(inside.sum()))  # fmt: skip
    return calibration


def fit_height_calibration(predicted: np.ndarray, reference: np.ndarray, *, method: str = "linear", folds: int = 5,
                           seed: int = 0, source: str = "", strata: np.ndarray | None = None,
                           min_pairs: int = 30) -> HeightCalibration:  # fmt: skip
    """A correction of predicted heights towards reference heights (``[n]`` pairs, metres; pairs with a NaN left
    out), fitted on all pairs, with ``folds``-fold cross-validated scores before and after. With ``strata`` (``[n]``
    class ids of the pairs, -1 for none), each stratum with ``min_pairs`` pairs or more gets a correction of its own
    (:attr:`HeightCalibration.by`), and the cross-validation scores the whole: each stratum's own where it has one.

    Raises:
        ValueError: an unknown method, fewer than 10 pairs, or fewer than 2 folds.
    """
    if method not in METHODS:
        raise ValueError(f"The calibration method must be one of {METHODS}, not {method!r}.")
    if folds < 2:
        raise ValueError(f"Cross-validation needs at least 2 folds, got {folds}.")
    p, y = np.asarray(predicted, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    s = None if strata is None else np.asarray(strata, np.int64).ravel()
    keep = np.isfinite(p) & np.isfinite(y)
    p, y = p[keep], y[keep]
    s = None if s is None else s[keep]
    if len(p) < 10:
        raise ValueError(f"A height calibration needs at least 10 pairs of a map height and a reference height; got "
                         f"{len(p)}.")  # fmt: skip
    fold = np.random.default_rng(seed).permutation(len(p)) % min(folds, len(p))
    corrected = np.empty_like(p)
    for k in range(min(folds, len(p))):
        test = fold == k
        part = _fit_correction(p[~test], y[~test], None if s is None else s[~test], method, min_pairs)
        corrected[test] = part.apply(p[test], None if s is None else s[test])
    calibration = _fit_correction(p, y, s, method, min_pairs)
    calibration.cross_validation = {"folds": int(min(folds, len(p))), "before": _scores(p, y),
                                    "after": _scores(corrected, y)}  # fmt: skip
    calibration.source = source
    for stratum, own in calibration.by.items():
        inside = s == stratum
        own.cross_validation = {"before": _scores(p[inside], y[inside]), "after": _scores(corrected[inside], y[inside])}
    return calibration


class PairSample:
    """A uniform random sample of at most ``size`` (predicted, reference) pixel pairs from any number of blocks
    (each pair keeps a random key; the ``size`` smallest keys win), for :func:`evaluate_height_raster`'s
    ``on_pairs``: memory stays at ``size`` pairs however large the reference."""

    def __init__(self, size: int = 200_000, seed: int = 0) -> None:
        self.size, self.rng = int(size), np.random.default_rng(seed)
        self.predicted, self.reference, self.keys = np.empty(0), np.empty(0), np.empty(0)

    def add(self, predicted: np.ndarray, reference: np.ndarray) -> None:
        p, y = np.asarray(predicted, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
        keep = np.isfinite(p) & np.isfinite(y)
        self.predicted = np.concatenate([self.predicted, p[keep]])
        self.reference = np.concatenate([self.reference, y[keep]])
        self.keys = np.concatenate([self.keys, self.rng.random(int(keep.sum()))])
        if len(self.keys) > self.size:
            kept = np.argpartition(self.keys, self.size)[: self.size]
            self.predicted, self.reference, self.keys = self.predicted[kept], self.reference[kept], self.keys[kept]


def calibrate_height_map(chm: str | os.PathLike[str], calibration: HeightCalibration, dst: str | os.PathLike[str], *,
                         strata: str | os.PathLike[str] | None = None, quicklook: str | os.PathLike[str] | None = None,
                         overwrite: bool = False) -> Path:  # fmt: skip
    """``chm`` (a height raster in metres, band 1) corrected by ``calibration``, written window by window as a
    float32 COG (NaN nodata) on its grid; with ``quicklook``, its picture. A correction per stratum needs
    ``strata``, the class raster it was fitted with (any CRS and grid: read onto each window, nearest).

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false. ValueError: ``dst`` is ``chm``, or a
        correction per stratum without ``strata``.
    """
    if calibration.by and strata is None:
        raise ValueError(f"This correction has one per stratum of {calibration.strata or 'a class raster'}; give that "
                         "raster (--by) to apply it.")  # fmt: skip
    from dinov3_eo.data.raster import open_quietly
    from dinov3_eo.inference.writers import COGWriter, check_overwrite
    from dinov3_eo.tasks.height_plots import height_quicklook

    check_overwrite(dst, overwrite, inputs=[chm])
    if quicklook is not None:
        check_overwrite(quicklook, overwrite, inputs=[chm])
    classes = None
    if calibration.by:
        from dinov3_eo.data.labels import RasterLabels

        classes = RasterLabels(path=strata, ignore_index=-1)
    with open_quietly(chm) as src:
        nodata = src.nodata
        with COGWriter(dst, width=src.width, height=src.height, count=1, dtype="float32", crs=src.crs,
                       transform=src.transform, nodata=float("nan"), overwrite=overwrite,
                       band_descriptions=["canopy height (m), calibrated"], units=["m"],
                       tags={"source": Path(chm).name, "calibration": json.dumps(calibration.to_dict())}) as out:  # fmt: skip
            for _, window in src.block_windows(1):
                heights = src.read(1, window=window).astype(np.float32)
                if nodata is not None and not math.isnan(nodata):
                    heights[heights == np.float32(nodata)] = np.nan
                where = None
                if classes is not None:
                    values, labelled = classes.read(crs=src.crs, transform=src.window_transform(window),
                                                    shape=heights.shape)  # fmt: skip
                    where = np.where(labelled, values.astype(np.int64), -1)
                out.write(calibration.apply(heights, where)[None], window=window)
    if quicklook is not None:
        height_quicklook(quicklook, dst, title=f"{Path(chm).name}, calibrated", overwrite=overwrite)
    return Path(dst)


def strata_at(strata: str | os.PathLike[str], frame: Any) -> np.ndarray:
    """``[n]`` the class of a class raster under each feature of ``frame`` (its centroid; any CRS), -1 where there is
    none (nodata, off the raster)."""
    import rasterio

    with rasterio.open(strata) as src:
        centres = frame.geometry.to_crs(src.crs).centroid
        # one small read per point (memory flat in the raster's size); off the raster and nodata come back masked
        picked = list(src.sample(zip(centres.x.to_numpy(), centres.y.to_numpy()), indexes=1, masked=True))
    classes = np.full(len(frame), -1, np.int64)
    for i, value in enumerate(picked):
        if not np.ma.getmaskarray(value)[0]:
            classes[i] = int(value[0])
    return classes


def reference_pairs(chm: str | os.PathLike[str], reference: Sequence[str], *, attribute: str | None = None,
                    footprint_m: float | None = None, statistic: str = "mean", max_pairs: int = 200_000,
                    seed: int = 0, strata: str | os.PathLike[str] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
    """``[n]`` map heights, reference heights and (with ``strata``, a class raster) each pair's stratum: per
    footprint for points or polygons (GEDI shots, plots; the map's ``statistic`` under each), else per
    reference-raster pixel (the map resampled onto the reference's grid; at most ``max_pairs``, a uniform sample;
    strata only for footprints).

    Raises:
        ValueError: ``strata`` with raster references.
    """
    from dinov3_eo.tasks.height_footprints import FootprintHeights, footprint_means, is_vector_heights

    if len(reference) == 1 and is_vector_heights(reference[0]):
        heights = FootprintHeights(path=reference[0], attribute=attribute, footprint_m=footprint_m, clip_negative=False)
        classes = None if strata is None else strata_at(strata, heights.frame)
        return (footprint_means(chm, heights, statistic=statistic), heights.frame["_value"].to_numpy(np.float64),
                classes)  # fmt: skip
    if strata is not None:
        raise ValueError("A correction per stratum (--by) is fitted on footprints (GEDI shots, plots), not on "
                         "reference rasters.")  # fmt: skip
    from dinov3_eo.tasks.height import evaluate_height_raster

    sample = PairSample(max_pairs, seed)
    evaluate_height_raster(chm, list(reference), on_pairs=sample.add)
    return sample.predicted, sample.reference, None


def calibrate_main(argv: Sequence[str]) -> int:
    """``dinov3-eo height calibrate MAP.tif REFERENCE -o MAP_calibrated.tif``."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo height calibrate",
        description="Correct a canopy-height map against reference heights (GEDI shots or field plots with "
                    "--attribute, or LiDAR CHM rasters over part of it): a linear or isotonic (monotone) correction "
                    "fitted on the pairs, its 5-fold cross-validated RMSE and bias before and after printed, the "
                    "corrected map written as a COG + PNG. --calibration applies a saved correction instead.")  # fmt: skip
    parser.add_argument("map", help="the canopy-height map (metres)")
    parser.add_argument("reference", nargs="*", help="reference heights: points / polygons (any CRS) or rasters (files, "
                        "folders, globs); none with --calibration")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help="the corrected map (.tif); its picture goes to .png")
    parser.add_argument("--method", choices=METHODS, default="linear", help="linear (a + b h) or isotonic (monotone)")
    parser.add_argument("--attribute", default=None, help="the footprints' height column (GEDI: rh98)")
    parser.add_argument("--footprint-m", type=float, default=None, help="footprint diameter (GEDI: 25); default: the "
                        "pixel under each point")  # fmt: skip
    parser.add_argument("--footprint-statistic", choices=("mean", "max"), default="mean",
                        help="the map's pixels under a footprint: mean, or max against GEDI's rh98 (default mean)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    parser.add_argument("--by", default=None, help="a class raster (land cover, forest type; any CRS): a correction of "
                        "its own for each class with --min-pairs footprints, the global one elsewhere")  # fmt: skip
    parser.add_argument("--min-pairs", type=int, default=30, help="footprints a class needs for its own correction "
                        "(default 30)")  # fmt: skip
    parser.add_argument("--save", default=None, help="also write the correction here (JSON)")
    parser.add_argument("--calibration", default=None, help="apply this saved correction (no reference needed)")
    parser.add_argument("--no-quicklook", action="store_true", help="do not write the PNG picture")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(list(argv))

    from dinov3_eo.inference.writers import check_overwrite

    out = Path(args.output)
    quicklook = None if args.no_quicklook else out.with_suffix(".png")
    picture = None if args.no_quicklook else out.with_name(f"{out.stem}_calibration.png")
    if args.calibration:
        if args.reference:
            raise ValueError("Give either reference heights to fit a correction or --calibration to apply a saved one, "
                             "not both.")  # fmt: skip
        calibration = HeightCalibration.load(args.calibration)
    else:
        if not args.reference:
            raise ValueError("Reference heights are needed to fit a correction (GEDI shots, plots or LiDAR CHMs), or "
                             "--calibration to apply a saved one.")  # fmt: skip
        check_overwrite(out, args.overwrite, inputs=[args.map, *args.reference])
        if picture is not None:
            check_overwrite(picture, args.overwrite, inputs=[args.map, *args.reference])
        if args.save:
            check_overwrite(args.save, args.overwrite, inputs=[args.map, *args.reference])
        predicted, reference, strata = reference_pairs(args.map, args.reference, attribute=args.attribute,
                                                       footprint_m=args.footprint_m,
                                                       statistic=args.footprint_statistic, strata=args.by)  # fmt: skip
        calibration = fit_height_calibration(predicted, reference, method=args.method, folds=args.folds,
                                             source=", ".join(args.reference), strata=strata,
                                             min_pairs=args.min_pairs)  # fmt: skip
        calibration.strata = Path(args.by).name if args.by else ""
        cv = calibration.cross_validation
        print(f"{calibration.method} correction from {calibration.n:,} pairs; {cv['folds']}-fold cross-validated "
              f"RMSE {cv['before']['rmse']:.2f} -> {cv['after']['rmse']:.2f} m, bias {cv['before']['bias']:+.2f} -> "
              f"{cv['after']['bias']:+.2f} m")  # fmt: skip
        for stratum, own in calibration.by.items():
            print(f"  class {stratum} of {calibration.strata}: its own correction from {own.n:,} pairs, RMSE "
                  f"{own.cross_validation['before']['rmse']:.2f} -> {own.cross_validation['after']['rmse']:.2f} m")
        if cv["after"]["rmse"] > cv["before"]["rmse"]:
            print("  the correction does worse than the map on held-out pairs: keep the map as it is")
        if args.save:
            calibration.save(args.save, overwrite=args.overwrite)
            print(f"  correction: {args.save}")
        if picture is not None:
            from dinov3_eo.tasks.height_plots import calibration_plot

            calibration_plot(picture, predicted, reference, calibration.apply, overwrite=args.overwrite,  # the global one
                             title=f"{Path(args.map).name}: {calibration.method}, {calibration.n:,} pairs")  # fmt: skip
            print(f"  pairs and correction: {picture}")
    calibrate_height_map(args.map, calibration, out, strata=args.by, quicklook=quicklook, overwrite=args.overwrite)
    print(f"corrected map: {out}" + (f" (+ {quicklook.name})" if quicklook else ""))
    return 0


__all__ = ["METHODS", "HeightCalibration", "PairSample", "calibrate_height_map", "calibrate_main", "strata_at",
           "fit_height_calibration", "reference_pairs"]
