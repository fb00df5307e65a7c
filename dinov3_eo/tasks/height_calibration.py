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
        n: the pairs fitted. cross_validation: ``{"folds", "before": {"rmse", "bias", "mae"}, "after": {...}}``.
        source: where the pairs came from (for the record).
    """

    method: str
    knots_x: list[float]
    knots_y: list[float]
    n: int
    cross_validation: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def apply(self, heights: np.ndarray) -> np.ndarray:
        """The corrected heights of ``heights`` (any shape, metres; NaN stays NaN), float32."""
        h = np.asarray(heights, np.float64)
        x, y = np.asarray(self.knots_x), np.asarray(self.knots_y)
        if self.method == "linear":
            slope = (y[1] - y[0]) / (x[1] - x[0]) if x[1] != x[0] else 0.0
            out = y[0] + slope * (h - x[0])
        else:
            out = np.interp(h, x, y)
        return np.where(np.isfinite(h), np.maximum(out, 0.0), np.nan).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "knots_x": self.knots_x, "knots_y": self.knots_y, "n": self.n,
                "cross_validation": self.cross_validation, "source": self.source}  # fmt: skip

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
        return cls(method=data["method"], knots_x=[float(v) for v in data["knots_x"]],
                   knots_y=[float(v) for v in data["knots_y"]], n=int(data.get("n", 0)),
                   cross_validation=data.get("cross_validation", {}), source=str(data.get("source", "")))  # fmt: skip


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
    error = predicted - reference
    return {"rmse": float(np.sqrt(np.mean(error**2))), "bias": float(error.mean()), "mae": float(np.abs(error).mean())}


def fit_height_calibration(predicted: np.ndarray, reference: np.ndarray, *, method: str = "linear", folds: int = 5,
                           seed: int = 0, source: str = "") -> HeightCalibration:  # fmt: skip
    """A correction of predicted heights towards reference heights (``[n]`` pairs, metres; pairs with a NaN left
    out), fitted on all pairs, with ``folds``-fold cross-validated scores before and after.

    Raises:
        ValueError: an unknown method, fewer than 10 pairs, or fewer than 2 folds.
    """
    if method not in METHODS:
        raise ValueError(f"The calibration method must be one of {METHODS}, not {method!r}.")
    if folds < 2:
        raise ValueError(f"Cross-validation needs at least 2 folds, got {folds}.")
    p, y = np.asarray(predicted, np.float64).ravel(), np.asarray(reference, np.float64).ravel()
    keep = np.isfinite(p) & np.isfinite(y)
    p, y = p[keep], y[keep]
    if len(p) < 10:
        raise ValueError(f"A height calibration needs at least 10 pairs of a map height and a reference height; got "
                         f"{len(p)}.")  # fmt: skip
    fold = np.random.default_rng(seed).permutation(len(p)) % min(folds, len(p))
    corrected = np.empty_like(p)
    for k in range(min(folds, len(p))):
        test = fold == k
        knots = _fit(p[~test], y[~test], method)
        corrected[test] = HeightCalibration(method, *knots, n=int((~test).sum())).apply(p[test])
    cross_validation = {"folds": int(min(folds, len(p))), "before": _scores(p, y), "after": _scores(corrected, y)}
    return HeightCalibration(method, *_fit(p, y, method), n=len(p), cross_validation=cross_validation, source=source)


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
                         quicklook: str | os.PathLike[str] | None = None, overwrite: bool = False) -> Path:  # fmt: skip
    """``chm`` (a height raster in metres, band 1) corrected by ``calibration``, written window by window as a
    float32 COG (NaN nodata) on its grid; with ``quicklook``, its picture.

    Raises:
        FileExistsError: an output exists and ``overwrite`` is false. ValueError: ``dst`` is ``chm``.
    """
    from dinov3_eo.data.raster import open_quietly
    from dinov3_eo.inference.writers import COGWriter, check_overwrite
    from dinov3_eo.tasks.height_plots import height_quicklook

    check_overwrite(dst, overwrite, inputs=[chm])
    if quicklook is not None:
        check_overwrite(quicklook, overwrite, inputs=[chm])
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
                out.write(calibration.apply(heights)[None], window=window)
    if quicklook is not None:
        height_quicklook(quicklook, dst, title=f"{Path(chm).name}, calibrated", overwrite=overwrite)
    return Path(dst)


def reference_pairs(chm: str | os.PathLike[str], reference: Sequence[str], *, attribute: str | None = None,
                    footprint_m: float | None = None, statistic: str = "mean", max_pairs: int = 200_000,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``[n]`` map heights and reference heights: per footprint for points or polygons (GEDI shots, plots; the map's
    ``statistic`` under each), else per reference-raster pixel (the map resampled onto the reference's grid; at most
    ``max_pairs``, a uniform sample)."""
    from dinov3_eo.tasks.height_footprints import FootprintHeights, footprint_means, is_vector_heights

    if len(reference) == 1 and is_vector_heights(reference[0]):
        heights = FootprintHeights(path=reference[0], attribute=attribute, footprint_m=footprint_m, clip_negative=False)
        return footprint_means(chm, heights, statistic=statistic), heights.frame["_value"].to_numpy(np.float64)
    from dinov3_eo.tasks.height import evaluate_height_raster

    sample = PairSample(max_pairs, seed)
    evaluate_height_raster(chm, list(reference), on_pairs=sample.add)
    return sample.predicted, sample.reference


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
        predicted, reference = reference_pairs(args.map, args.reference, attribute=args.attribute,
                                               footprint_m=args.footprint_m, statistic=args.footprint_statistic)  # fmt: skip
        calibration = fit_height_calibration(predicted, reference, method=args.method, folds=args.folds,
                                             source=", ".join(args.reference))  # fmt: skip
        cv = calibration.cross_validation
        print(f"{calibration.method} correction from {calibration.n:,} pairs; {cv['folds']}-fold cross-validated "
              f"RMSE {cv['before']['rmse']:.2f} -> {cv['after']['rmse']:.2f} m, bias {cv['before']['bias']:+.2f} -> "
              f"{cv['after']['bias']:+.2f} m")  # fmt: skip
        if cv["after"]["rmse"] > cv["before"]["rmse"]:
            print("  the correction does worse than the map on held-out pairs: keep the map as it is")
        if args.save:
            calibration.save(args.save, overwrite=args.overwrite)
            print(f"  correction: {args.save}")
        if picture is not None:
            from dinov3_eo.tasks.height_plots import calibration_plot

            calibration_plot(picture, predicted, reference, calibration.apply, overwrite=args.overwrite,
                             title=f"{Path(args.map).name}: {calibration.method}, {calibration.n:,} pairs")  # fmt: skip
            print(f"  pairs and correction: {picture}")
    calibrate_height_map(args.map, calibration, out, quicklook=quicklook, overwrite=args.overwrite)
    print(f"corrected map: {out}" + (f" (+ {quicklook.name})" if quicklook else ""))
    return 0


__all__ = ["METHODS", "HeightCalibration", "PairSample", "calibrate_height_map", "calibrate_main",
           "fit_height_calibration", "reference_pairs"]
