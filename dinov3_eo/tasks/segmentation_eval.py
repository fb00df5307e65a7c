"""Accuracy assessment of a class map against reference labels: a raster or polygons, in any CRS.

The reference is brought onto the *prediction's* grid block by block (a label raster warped with nearest
resampling, polygons burnt into each block), so memory stays flat whatever the map's size, and every pixel where the
map has a class and the reference a label counts once in a confusion matrix ``[K, K]`` (rows: reference, columns:
map). From it: overall accuracy, Cohen's kappa, and per class IoU, F1, precision (the map maker's "user's
accuracy") and recall ("producer's accuracy"), with mIoU / mean F1 over the classes present in either; and, with the
map's own class areas as strata weights, the error-adjusted class areas with confidence intervals of Olofsson et al.
(2014), the area estimates remote-sensing practice asks for instead of counting the map's pixels.

``dinov3-eo segment evaluate CLASSES.tif REFERENCE.(tif|gpkg) --out-dir eval/`` writes ``metrics.json``,
``confusion.csv``, ``confusion.png`` (row-normalised, with counts) and ``agreement.png`` (where map and reference
agree, disagree, or cannot be compared). Several maps (a test split's, one per image) are evaluated together, into
one confusion matrix, against masks matched by georeference or by name, with ``per_map.csv`` instead of the picture.
Image chips without a georeference (``segment predict --chips``' ``*_classes.png``) are scored against their masks
(:func:`evaluate_chip_maps`, ``--chips``): paired by name, pixel for pixel.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
from rasterio.enums import Resampling
from rasterio.windows import Window

from dinov3_eo.data.labels import VECTOR_SUFFIXES
from dinov3_eo.data.raster import GDAL_CACHE_MB, open_quietly, pixel_area_ha, require_georeferenced, tagged_class_names
from dinov3_eo.inference.writers import atomic_output, check_overwrite, picture_grid, save_figure

log = logging.getLogger(__name__)

GDAL_CACHE_BYTES = GDAL_CACHE_MB * 2**20  # the block cache of every streamed read
#: what ``out_dir`` receives
REPORT_FILES = ("metrics.json", "confusion.csv", "confusion.png", "agreement.png", "per_map.csv")
#: suffix ``segment predict`` gives its class maps, dropped before maps and masks are paired by name
PREDICTED_SUFFIX = "_classes"


def iou_f1_from_confusion(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class IoU and F1 from a confusion matrix ``[K, K]`` (rows = truth, columns = prediction).

    ``IoU_k = TP / (TP + FP + FN)``, ``F1_k = 2 TP / (2 TP + FP + FN)``; a class absent from both truth and
    prediction gets NaN (left out of the means).
    """
    confusion = confusion.double()
    tp = confusion.diag()
    fp = confusion.sum(dim=0) - tp
    fn = confusion.sum(dim=1) - tp
    denom = tp + fp + fn
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), nan)
    f1 = torch.where(denom > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), nan)
    return iou, f1


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, K]`` int64 counts of (reference ``truth``, map ``pred``) pairs over pixels where both are in ``0..K-1``.

    Args:
        pred, truth: integer arrays of the same shape.
    """
    keep = (pred >= 0) & (pred < num_classes) & (truth >= 0) & (truth < num_classes)
    pairs = truth[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(pairs, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def accuracy_report(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Metrics of a confusion matrix ``[K, K]`` (rows: reference, columns: map).

    Returns:
        ``{"pixels", "overall_accuracy", "kappa", "miou", "mean_f1", "classes": {name: {"iou", "f1", "precision",
        "recall", "reference_pixels", "map_pixels"}}}``; a class with neither reference nor map pixels has NaN
        scores and is left out of the means (as is every score when nothing could be compared).
    """
    c = np.asarray(confusion, dtype=np.float64)
    k = c.shape[0]
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    tp = np.diag(c)
    reference, mapped = c.sum(axis=1), c.sum(axis=0)
    total = c.sum()
    iou, f1 = (t.numpy() for t in iou_f1_from_confusion(torch.from_numpy(c)))  # as validation computes them
    precision, recall = _ratio(tp, mapped), _ratio(tp, reference)
    observed = tp.sum() / total if total else float("nan")
    expected = (reference * mapped).sum() / total**2 if total else float("nan")
    kappa = (observed - expected) / (1 - expected) if total and expected < 1 else float("nan")
    present = (reference + mapped) > 0
    return {
        "pixels": int(total),
        "overall_accuracy": float(observed),
        "kappa": float(kappa),
        "miou": float(iou[present].mean()) if present.any() else float("nan"),
        "mean_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "classes": {
            name: {"iou": float(iou[i]), "f1": float(f1[i]), "precision": float(precision[i]),
                   "recall": float(recall[i]), "reference_pixels": int(reference[i]), "map_pixels": int(mapped[i])}
            for i, name in enumerate(names)
        },  # fmt: skip
    }


def area_estimates(confusion: np.ndarray, map_pixels: np.ndarray, *, pixel_area: float = 1.0,
                   class_names: Sequence[str] | None = None, z: float = 1.96) -> dict[str, Any]:  # fmt: skip
    """Error-adjusted class areas and accuracies by the stratified estimator of Olofsson et al. (2014, "Good
    practices for estimating area and assessing accuracy of land change"), the map classes being the strata.

    A map's own class areas are biased by its errors (omissions and commissions do not cancel); the reference
    labels, taken as a random sample within each map class, correct them. With ``n_ij`` the labelled pixels mapped
    ``i`` and labelled ``j``, ``n_i.`` those mapped ``i``, and ``W_i`` class ``i``'s share of the *whole* map:
    ``p_ij = W_i n_ij / n_i.``; the estimated area of class ``j`` is ``A · Σ_i p_ij`` with the standard error
    ``A · sqrt(Σ_i W_i² (n_ij/n_i.)(1 − n_ij/n_i.) / (n_i. − 1))``; user's accuracy ``n_ii / n_i.``, producer's
    ``p_jj / p_.j``, overall ``Σ_j p_jj``, each with its standard error, as in the paper (``z`` = 1.96: 95 %
    intervals). The sample must be a probability sample within each map class (simple or stratified random, or a
    wall-to-wall reference); a map class without any labelled pixel makes every estimate biased, and is listed.

    Args:
        confusion: ``[K, K]`` labelled-pixel counts, rows reference, columns map (:func:`confusion_matrix`).
        map_pixels: ``[K]`` pixels of each class in the whole map.
        pixel_area: area of one pixel (e.g. hectares); areas come in its unit.

    Returns:
        ``{"overall_accuracy", "overall_accuracy_ci", "unsampled_map_classes", "classes": {name: {"map_area",
        "estimated_area", "estimated_area_ci", "users_accuracy", "users_accuracy_ci", "producers_accuracy",
        "producers_accuracy_ci"}}}``; ``*_ci`` is the half-width ``z · SE``, NaN where a map class has fewer than two
        labelled pixels.
    """
    n = np.asarray(confusion, dtype=np.float64).T  # rows: map class (stratum), columns: reference class
    k = n.shape[0]
    names = list(class_names) if class_names is not None else [f"class {i}" for i in range(k)]
    mapped = np.asarray(map_pixels, dtype=np.float64)
    total = mapped.sum()
    weight = mapped / total if total else np.zeros(k)
    n_i = n.sum(axis=1)
    sampled = n_i > 0
    share = np.divide(n, n_i[:, None], out=np.zeros_like(n), where=sampled[:, None])  # n_ij / n_i.
    denom = np.where(n_i > 1, n_i - 1, np.nan)[:, None]  # n_i. - 1 (no variance from fewer than two)
    p = weight[:, None] * share  # [K (map), K (reference)]
    p_j = p.sum(axis=0)
    area_var = np.nansum(np.where(sampled[:, None], weight[:, None] ** 2 * share * (1 - share) / denom, 0.0), axis=0)
    users = np.diag(share).copy()
    users[~sampled] = np.nan
    users_var = users * (1 - users) / denom[:, 0]
    producers = _ratio(np.diag(p), p_j)
    overall = float(np.trace(p))
    overall_var = float(np.nansum(np.where(sampled, weight**2 * users * (1 - users) / denom[:, 0], 0.0)))
    # producer's accuracy variance (the paper's eq. 7), in pixel totals N_i. (mapped) and N^_.j (estimated)
    n_hat_j = (mapped[:, None] * share).sum(axis=0)
    producers_var = np.full(k, np.nan)
    for j in range(k):
        if not n_hat_j[j] or not sampled[j] or np.isnan(denom[j, 0]):
            continue
        others = [i for i in range(k) if i != j and sampled[i]]
        off = sum(mapped[i] ** 2 * share[i, j] * (1 - share[i, j]) / denom[i, 0] for i in others)
        own = mapped[j] ** 2 * (1 - producers[j]) ** 2 * users[j] * (1 - users[j]) / denom[j, 0]
        producers_var[j] = (own + producers[j] ** 2 * off) / n_hat_j[j] ** 2
    return {
        "overall_accuracy": overall,
        "overall_accuracy_ci": z * float(np.sqrt(overall_var)),
        "unsampled_map_classes": [names[i] for i in range(k) if mapped[i] > 0 and not sampled[i]],
        "classes": {
            name: {"map_area": float(mapped[i] * pixel_area), "estimated_area": float(p_j[i] * total * pixel_area),
                   "estimated_area_ci": float(z * np.sqrt(area_var[i]) * total * pixel_area),
                   "users_accuracy": float(users[i]), "users_accuracy_ci": float(z * np.sqrt(users_var[i])),
                   "producers_accuracy": float(producers[i]),
                   "producers_accuracy_ci": float(z * np.sqrt(producers_var[i]))}
            for i, name in enumerate(names)
        },  # fmt: skip
    }


def _refuse_other_strata(reference: str | os.PathLike[str]) -> None:
    """Points drawn by ``dinov3-eo sample`` with strata other than the map classes (``--buffer``; its design beside
    them says so) are not a sample within each map class: the error-adjusted areas here would be biased.

    Raises:
        ValueError: such points, naming the command that estimates from them.
    """
    path = Path(reference)
    design = path.with_name(f"{path.stem}_design.json")
    if path.suffix.lower() not in VECTOR_SUFFIXES or not design.is_file():
        return
    try:
        record = json.loads(design.read_text())
    except ValueError:
        return
    if record.get("buffers"):
        raise ValueError(f"{path.name} was drawn with buffer strata ({design.name}), not within the map classes, so "
                         f"the areas here would be biased; estimate with 'dinov3-eo sample estimate {path.name}'.")


def report_table(report: Mapping[str, Any]) -> str:
    """The report as a fixed-width text table (one row per class, then the overall scores)."""
    width = max([len("class")] + [len(n) for n in report["classes"]])
    lines = [f"{'class':<{width}}  {'IoU':>6} {'F1':>6} {'precision':>9} {'recall':>6} {'reference px':>12}"]
    fmt = lambda v: "   n/a" if np.isnan(v) else f"{v:6.3f}"  # noqa: E731
    for name, m in report["classes"].items():
        lines.append(f"{name:<{width}}  {fmt(m['iou'])} {fmt(m['f1'])} {fmt(m['precision']):>9} {fmt(m['recall'])} "
                     f"{m['reference_pixels']:>12,}")  # fmt: skip
    lines.append(f"overall accuracy {fmt(report['overall_accuracy']).strip()}, kappa {fmt(report['kappa']).strip()}, "
                 f"mIoU {fmt(report['miou']).strip()}, mean F1 {fmt(report['mean_f1']).strip()} over "
                 f"{report['pixels']:,} pixels")  # fmt: skip
    area = report.get("area")
    if area:
        unit = area.get("unit", "pixels")
        lines += ["", f"error-adjusted areas (Olofsson et al. 2014; 95 % intervals), {unit}:",
                  f"{'class':<{width}}  {'mapped':>12} {'estimated':>12} {'± 95 %':>10} {'user':>6} {'producer':>8}"]
        for name, m in area["classes"].items():
            ci = "n/a" if np.isnan(m["estimated_area_ci"]) else f"{m['estimated_area_ci']:,.1f}"
            lines.append(f"{name:<{width}}  {m['map_area']:>12,.1f} {m['estimated_area']:>12,.1f} {ci:>10} "
                         f"{fmt(m['users_accuracy'])} {fmt(m['producers_accuracy']):>8}")  # fmt: skip
        lines.append(f"area-weighted overall accuracy {fmt(area['overall_accuracy']).strip()} "
                     f"± {fmt(area['overall_accuracy_ci']).strip()}")  # fmt: skip
        if area["unsampled_map_classes"]:
            lines.append(f"warning: map classes {area['unsampled_map_classes']} have no reference label: every area "
                         f"estimate is biased until they are sampled")  # fmt: skip
    return "\n".join(lines)


class _Reference:
    """Reference labels on any grid: ``labels(crs, transform, shape) -> int64 (H, W)``, -1 where there is none."""

    def __init__(self, path: str | os.PathLike[str], *, class_names: Sequence[str] | None, attribute: str,
                 classes: Mapping[str, int] | None, nodata: float | None, background: int | None,
                 pairing: str = "georeference", name_suffixes: Sequence[str] = ()) -> None:  # fmt: skip
        from dinov3_eo.data.labels import RasterLabels, VectorLabels, is_raster_labels

        self.path = Path(path)
        if not is_raster_labels(path) and not self.path.exists():  # rasters: a file, a folder or glob of masks
            raise FileNotFoundError(f"Reference {str(path)!r} does not exist.")
        if self.path.suffix.lower() in VECTOR_SUFFIXES:
            if pairing != "georeference":
                raise ValueError(f"Pairing by {pairing} is for reference masks; the polygons {str(path)!r} are "
                                 "matched by georeference.")
            if classes is None and class_names is not None:
                classes = _classes_by_name(self.path, attribute, class_names)
            self._labels: Any = VectorLabels(path=self.path, attribute=attribute, classes=classes, ignore_index=-1,
                                             background=background)  # fmt: skip
        else:
            if classes is not None:
                raise ValueError("classes= maps the names of a vector reference; a raster reference holds class ids.")
            self._labels = RasterLabels(path=self.path, nodata=nodata, ignore_index=-1, pairing=pairing,
                                        name_suffixes=name_suffixes)
            self._ids = _raster_ids_by_name(self.path, class_names) if class_names is not None else None

    _ids: np.ndarray | None = None

    def labels(self, *, crs: Any, transform: Any, shape: tuple[int, int],
               path: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Labels on the grid of the map at ``path`` (which masks paired by name need), as the map's class ids."""
        labels = self._labels.sample(crs=crs, transform=transform, shape=shape, path=path)["mask"].numpy()
        if self._ids is not None:
            known = (labels >= 0) & (labels < len(self._ids))
            labels = np.where(known, self._ids[np.where(known, labels, 0)], np.where(labels >= 0, labels, -1))
        return labels


def _raster_ids_by_name(path: Path, class_names: Sequence[str]) -> np.ndarray | None:
    """Reference id -> map id where a reference raster names its classes (its ``class_names`` tag) otherwise than
    the map (another order, more or fewer classes: a land-cover product against a map of some of its classes); -1
    for a reference class the map lacks, whose pixels are then left out (with a warning naming them). ``None``
    where the reference names none, or the same ones in the same order: ids are compared as they are."""
    if not path.is_file():  # a folder or glob of masks: ids as they are
        return None
    with open_quietly(path) as src:
        names = tagged_class_names(src)
    if names is None or [n.lower() for n in names] == [n.lower() for n in class_names]:
        return None
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    ids = np.array([lookup.get(name.lower(), -1) for name in names], dtype=np.int64)
    absent = [name for name in names if name.lower() not in lookup]
    if absent:
        log.warning("Reference classes %s of %s are not classes of the map %s: their pixels are left out of the "
                    "scores, which therefore say nothing of how the map does there.", absent, path.name, list(class_names))  # fmt: skip
    return ids


def _classes_by_name(path: Path, attribute: str, class_names: Sequence[str]) -> dict[str, int] | None:
    """Map a vector reference's text labels onto the map's class names (``None`` for integer labels: ids)."""
    import geopandas as gpd

    frame = gpd.read_file(path, ignore_geometry=True)
    if attribute not in frame.columns:
        raise KeyError(f"Reference {str(path)!r} has no attribute {attribute!r}; its columns are {list(frame.columns)}.")
    values = frame[attribute].dropna().unique().tolist()
    if all(isinstance(v, (int, np.integer)) for v in values):
        return None
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    unknown = sorted({str(v) for v in values if str(v).lower() not in lookup})
    if unknown:
        raise ValueError(f"Reference labels {unknown} of {attribute!r} in {str(path)!r} are not classes of the map "
                         f"{list(class_names)}; map them with classes= (--classes on the command line).")  # fmt: skip
    return {str(v): lookup[str(v).lower()] for v in values}


def evaluate_class_raster(
    pred: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    reference: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    attribute: str = "name",
    classes: Mapping[str, int] | None = None,
    reference_nodata: float | None = None,
    background: int | None = None,
    pairing: str = "georeference",
    name_suffixes: Sequence[str] = (),
    block: int = 1024,
    picture_size: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Confusion matrix and accuracy of the class map ``pred`` (or of several maps together) against ``reference``,
    on each map's grid.

    Args:
        pred: a one-band class GeoTIFF (e.g. ``segment predict``'s): its nodata is left out; its ``class_names``
            tag names the classes unless ``class_names`` is given. Or several (files, folders, globs: a test
            split's maps, one per image), counted into one confusion matrix; they must name the same classes.
        reference: a label raster (class ids, any CRS/resolution; its nodata left out), a folder or glob of them
            (one mask per image, read as one :class:`~dinov3_eo.data.labels.RasterMosaic`), or polygons (GeoPackage,
            GeoJSON, shapefile...) whose ``attribute`` holds class names (matched to the map's names, case-blind)
            or ids.
        out_dir: also write ``metrics.json``, ``confusion.csv``, ``confusion.png`` and, for one map,
            ``agreement.png`` (for several, ``per_map.csv``: each map's pixels, accuracy and mIoU); existing ones
            only with ``overwrite`` (checked before any work).
        classes: name -> class id for a vector reference whose names differ from the map's.
        reference_nodata: nodata of a raster reference overriding the file's.
        background: class id of pixels no polygon covers (default: unlabelled, left out).
        pairing: ``"georeference"`` (default) or ``"name"``: each map reads the mask of its own name
            (:class:`~dinov3_eo.data.labels.NamePairing`; ``scene_classes.tif`` takes ``scene.tif``, ``_classes``
            being dropped with ``name_suffixes``), for masks of several dates over one place or without a
            georeference.
        name_suffixes: more suffixes dropped from map and mask stems before they are compared (``["_label"]``).
        block: side of the blocks the map is read in (memory is flat in the map's size).
        picture_size: longer side of ``agreement.png`` in pixels.

    Returns:
        :func:`accuracy_report` (the labelled pixels counted as they are) plus ``"area"`` (:func:`area_estimates`:
        error-adjusted class areas in hectares, or pixels on a grid in degrees, and area-weighted accuracies with 95 %
        intervals, the labelled pixels taken as a random sample within each map class), ``"confusion"`` (a list of
        rows), ``"prediction"`` (a path, or the list of them) and ``"reference"``; for several maps also ``"maps"``
        (each map's ``prediction``, ``pixels``, ``overall_accuracy``, ``miou``).

    Raises:
        FileNotFoundError: a file is missing. FileExistsError: a report file exists and ``overwrite`` is false.
        ValueError: a map is not a georeferenced one-band class raster, the classes cannot be named or differ between
        maps, the reference holds a class id the map does not have, or nothing overlaps.
    """
    preds = _class_maps(pred)
    several = len(preds) > 1
    if out_dir is not None and Path(out_dir).is_dir():  # (a folder still to be made holds no report)
        for name in REPORT_FILES:
            check_overwrite(Path(out_dir) / name, overwrite, inputs=[*preds, reference])
    suffixes = [PREDICTED_SUFFIX, *name_suffixes] if pairing == "name" else list(name_suffixes)
    ref = None
    given, confusion, map_area = class_names, None, None
    maps: list[dict[str, Any]] = []
    units: set[str] = set()
    # every block is read once: GDAL's default block cache (5 % of RAM) would only fill up with blocks never reused
    with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES):
        for path in preds:
            with rasterio.open(path) as src:
                names = _map_classes(src, path, given)
                if ref is None:
                    class_names, k = names, len(names)
                    ref = _Reference(reference, class_names=class_names, attribute=attribute, classes=classes,
                                     nodata=reference_nodata, background=background, pairing=pairing,
                                     name_suffixes=suffixes)  # fmt: skip
                    confusion, map_area = np.zeros((k, k), dtype=np.int64), np.zeros(k, dtype=np.float64)
                elif list(names) != list(class_names):
                    raise ValueError(f"The class maps name different classes ({list(class_names)} in {str(preds[0])!r}, "
                                     f"{list(names)} in {str(path)!r}); evaluate maps of the same classes together.")
                counts, map_pixels = _map_confusion(src, path, ref, k, reference, block)
                hectares = pixel_area_ha(src.crs, src.transform)
                units.add("ha" if hectares is not None else "pixels")
                # each map's class areas, its strata weights, in hectares (maps on different grids add up)
                map_area += map_pixels * (hectares or 1.0)
                confusion += counts
                maps.append(_map_summary(path, counts))
    if confusion.sum() == 0:
        raise ValueError(f"No pixel of {', '.join(repr(str(p)) for p in preds[:3])} has both a class and a reference "
                         f"label in {str(reference)!r}: do they overlap, and is the reference's nodata right?")
    if len(units) > 1:
        raise ValueError("The class maps mix grids in metres and in degrees: their class areas cannot be added up; "
                         "evaluate them separately.")
    report = accuracy_report(confusion, class_names)
    report["area"] = area_estimates(confusion, map_area, pixel_area=1.0, class_names=class_names)
    report["area"]["unit"] = units.pop()
    report.update(confusion=confusion.tolist(), prediction=[str(p) for p in preds] if several else str(preds[0]),
                  reference=str(reference))
    if several:
        report["maps"] = maps
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_accuracy_report(folder, report, confusion, list(class_names))
        if not several:
            with rasterio.Env(GDAL_CACHEMAX=GDAL_CACHE_BYTES), rasterio.open(preds[0]) as src:
                _agreement_of(src, preds[0], ref, folder / "agreement.png", picture_size)
        else:
            _write_per_map(folder, maps)
    return report


def evaluate_chip_maps(
    pred: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    masks: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    mask_colors: Mapping[str, Any] | None = None,
    remap: Mapping[int, int] | None = None,
    ignore_index: int = 255,
    name_suffixes: Sequence[str] = (),
    picture_size: int = 1024,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Confusion matrix and accuracy of class maps of image chips (``segment predict --chips``' ``*_classes.png``,
    or any one-band id images) against the chips' masks, each map with the mask of its own name, pixel for pixel:
    chips carry no georeference, so the map and its mask must have the same size.

    Args:
        pred: class maps: files, folders (recursive; from a folder of ``segment predict --chips`` outputs its
            ``*_classes.png`` alone) or globs. Ids outside ``0..K-1`` (255: no data) are left out. Their
            ``class_names`` text chunk (which ``segment predict --chips`` writes) names the classes unless
            ``class_names`` is given.
        masks: the chips' masks (folders searched recursively, globs, files), read as ``ChipSegmentationDataModule``
            reads them: class ids (a palette PNG's indices), or colours with ``mask_colors``; ``remap`` applied;
            ``ignore_index`` (and any colour ``mask_colors`` lacks) unlabelled.
        mask_colors: class name -> colour of colour-coded masks (names of the map's classes).
        name_suffixes: suffixes dropped from map and mask stems before they are compared (``_classes`` always is):
            ``["_mask"]`` pairs ``x_classes.png`` with ``x_mask.png``.
        out_dir, picture_size, overwrite: as :func:`evaluate_class_raster` (``agreement.png`` for one map,
            ``per_map.csv`` for several).

    Returns:
        :func:`evaluate_class_raster`'s report, with areas in pixels (the chips being the whole map), plus
        ``"unpaired"``: the maps without a mask of their name, which are left out (with a warning).

    Raises:
        FileNotFoundError: no map, or no map with a mask. FileExistsError: a report file exists without
        ``overwrite``. ValueError: a map and its mask differ in size, the maps name different classes or none, or
        a mask holds an id the maps do not have.
    """
    from tqdm.auto import tqdm

    from dinov3_eo.data.chips import ChipSegmentationDataModule, pairs_by_name, read_chip_mask, remap_ids

    preds = _class_maps(pred, extension=".png")
    several = len(preds) > 1
    if out_dir is not None and Path(out_dir).is_dir():
        for name in REPORT_FILES:
            check_overwrite(Path(out_dir) / name, overwrite, inputs=preds)
    pairs = pairs_by_name(preds, masks, [PREDICTED_SUFFIX, *name_suffixes], item="class map",
                          hint="masks pair by file name, less _classes and --name-suffixes.")  # fmt: skip
    paired = {p for p, _ in pairs}
    unpaired = [p for p in preds if p not in paired]
    remap = {int(k): int(v) for k, v in (remap or {}).items()}
    given, names, colours = class_names, None, None
    confusion = map_pixels = None
    maps: list[dict[str, Any]] = []
    last: tuple[np.ndarray, np.ndarray] | None = None
    for path, mask in tqdm(pairs, desc="class maps", unit="map", disable=not progress or len(pairs) < 2):
        with open_quietly(path) as src:  # a PNG has no georeference, and needs none here
            these = _map_classes(src, path, given, require_georeference=False)
            mapped = src.read(1).astype(np.int64)
        if names is None:
            names, k = these, len(these)
            colours = ChipSegmentationDataModule.colour_table(mask_colors, {n: i for i, n in enumerate(names)})
            confusion, map_pixels = np.zeros((k, k), dtype=np.int64), np.zeros(k, dtype=np.int64)
        elif these != names:
            raise ValueError(f"The class maps name different classes ({names} in {str(pairs[0][0])!r}, {these} in "
                             f"{str(path)!r}); evaluate maps of the same classes together.")  # fmt: skip
        truth = remap_ids(read_chip_mask(mask, colours, ignore_index), remap)
        if truth.shape != mapped.shape:
            raise ValueError(f"Class map {path} is {mapped.shape[1]}x{mapped.shape[0]} px but its mask {mask} is "
                             f"{truth.shape[1]}x{truth.shape[0]} px; a chip's map and mask share its pixel grid.")
        truth[truth == ignore_index] = -1
        _check_reference_ids(truth, k, mask, "is its unlabelled id --ignore-index, or should --remap map them?")
        counts = confusion_matrix(mapped, truth, k)
        confusion += counts
        map_pixels += np.bincount(mapped[(mapped >= 0) & (mapped < k)], minlength=k)[:k]
        maps.append(_map_summary(path, counts))
        last = (mapped, truth)
    if confusion.sum() == 0:
        raise ValueError(f"No pixel of the {len(pairs)} class maps has both a class and a label in its mask: are the "
                         f"masks' unlabelled id ({ignore_index}) and remap right?")  # fmt: skip
    report = accuracy_report(confusion, names)
    report["area"] = area_estimates(confusion, map_pixels, class_names=names)
    report["area"]["unit"] = "pixels"
    report.update(confusion=confusion.tolist(), prediction=[str(p) for p, _ in pairs] if several else str(pairs[0][0]),
                  reference=[str(m) for _, m in pairs] if several else str(pairs[0][1]), unpaired=unpaired)  # fmt: skip
    if several:
        report["maps"] = maps
    if out_dir is not None:
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_accuracy_report(folder, report, confusion, names)
        if several:
            _write_per_map(folder, maps)
        else:
            step = max(1, -(-max(last[0].shape) // picture_size))  # every step-th pixel: a picture, not a count
            agreement_plot(folder / "agreement.png", last[0][::step, ::step], last[1][::step, ::step],
                           title=Path(pairs[0][0]).name)  # fmt: skip
    return report


def _map_summary(path: Any, confusion: np.ndarray) -> dict[str, Any]:
    """One map's row of ``per_map.csv``: its path, labelled pixels, overall accuracy and mIoU."""
    report = accuracy_report(confusion)
    return {"prediction": str(path), "pixels": report["pixels"], "overall_accuracy": report["overall_accuracy"],
            "miou": report["miou"]}


def _write_per_map(folder: Path, maps: Sequence[Mapping[str, Any]]) -> None:
    rows = ["prediction,pixels,overall_accuracy,miou"]
    rows += [f"{m['prediction']},{m['pixels']},{m['overall_accuracy']:.6f},{m['miou']:.6f}" for m in maps]
    with atomic_output(folder / "per_map.csv", overwrite=True) as tmp:
        tmp.write_text("\n".join(rows) + "\n")


def _class_maps(pred: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
                extension: str = ".tif") -> list[str]:  # fmt: skip
    """The class maps ``pred`` names (:func:`~dinov3_eo.data.index.expand_sources`; image chips with
    ``extension=".png"``: :func:`~dinov3_eo.data.datasets.expand_chips`); from a folder that holds ``segment
    predict``'s outputs, its ``*_classes<extension>`` alone (not the probabilities or quick-looks beside them)."""
    from dinov3_eo.data.datasets import expand_chips
    from dinov3_eo.data.index import expand_sources

    expand = expand_chips if extension == ".png" else expand_sources
    sources = [pred] if isinstance(pred, (str, os.PathLike)) else list(pred)
    maps: dict[str, None] = {}  # ordered, without repeats
    for source in sources:
        found = [os.fspath(source)] if Path(source).is_file() else expand(source)
        if Path(source).is_dir():
            predicted = [path for path in found if path.endswith(f"{PREDICTED_SUFFIX}{extension}")]
            found = predicted or found
        maps.update(dict.fromkeys(found))
    return list(maps)


def _map_classes(src: Any, path: Any, class_names: Sequence[str] | None, *,
                 require_georeference: bool = True) -> list[str]:  # fmt: skip
    """The class names of the class map ``src`` (``class_names`` where given), after checking it is one."""
    if require_georeference:
        require_georeferenced(src)
    if src.count != 1 or not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
        raise ValueError(f"{str(path)!r} is not a class map: expected one integer band, got {src.count} band(s) of "
                         f"{src.dtypes[0]}.")  # fmt: skip
    names = list(class_names) if class_names is not None else tagged_class_names(src)
    if names is None:
        raise ValueError(f"{str(path)!r} does not name its classes (no 'class_names' tag); pass class_names= "
                         f"(--class-names on the command line).")  # fmt: skip
    return names


def _map_confusion(src: Any, path: Any, ref: _Reference, k: int, reference: Any,
                   block: int) -> tuple[np.ndarray, np.ndarray]:
    """The confusion matrix ``[K, K]`` of one map against the reference and its class pixel counts ``[K]``, read in
    ``block``-px blocks."""
    confusion = np.zeros((k, k), dtype=np.int64)
    map_pixels = np.zeros(k, dtype=np.int64)  # of the whole map: the strata weights of the area estimates
    nodata = src.nodata
    for row in range(0, src.height, block):
        for col in range(0, src.width, block):
            window = Window(col, row, min(block, src.width - col), min(block, src.height - row))
            mapped = src.read(1, window=window).astype(np.int64)
            if nodata is not None:
                mapped[mapped == int(nodata)] = -1
            truth = ref.labels(crs=src.crs, transform=src.window_transform(window), shape=mapped.shape, path=path)
            _check_reference_ids(truth, k, reference)
            confusion += confusion_matrix(mapped, truth, k)
            classed = mapped[(mapped >= 0) & (mapped < k)]
            map_pixels += np.bincount(classed, minlength=k)[:k]
    return confusion, map_pixels


def _agreement_of(src: Any, path: Any, ref: _Reference, dst: Path, picture_size: int) -> None:
    """``agreement.png`` of one map: the map read at most ``picture_size`` px a side, the reference on that grid."""
    shape, transform = picture_grid(src, picture_size)
    mapped = src.read(1, out_shape=shape, resampling=Resampling.nearest).astype(np.int64)
    if src.nodata is not None:
        mapped[mapped == int(src.nodata)] = -1
    truth = ref.labels(crs=src.crs, transform=transform, shape=shape, path=path)
    agreement_plot(dst, mapped, truth, title=Path(path).name)


def _check_reference_ids(truth: np.ndarray, k: int, reference: Any,
                         hint: str = "is its nodata declared (--reference-nodata)?") -> None:  # fmt: skip
    bad = np.unique(truth[truth >= k])
    if bad.size:
        raise ValueError(f"Reference {str(reference)!r} holds class ids {bad[:10].tolist()} that the map does not have "
                         f"(its classes are 0..{k - 1}); {hint}")  # fmt: skip


def write_accuracy_report(folder: Path, report: Mapping[str, Any], confusion: np.ndarray, names: Sequence[str], *,
                          prefix: str = "") -> None:
    """``<prefix>metrics.json`` (``report``), ``<prefix>confusion.csv`` (rows: reference, columns: map) and
    ``<prefix>confusion.png`` in ``folder``, each written atomically (replacing an earlier one)."""
    names = list(names)
    with atomic_output(folder / f"{prefix}metrics.json", overwrite=True) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    rows = ["reference \\ map," + ",".join(names)]
    rows += [f"{name}," + ",".join(str(int(v)) for v in confusion[i]) for i, name in enumerate(names)]
    with atomic_output(folder / f"{prefix}confusion.csv", overwrite=True) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    confusion_plot(folder / f"{prefix}confusion.png", confusion, names)



def confusion_plot(
    dst: str | os.PathLike[str],
    confusion: np.ndarray,
    class_names: Sequence[str],
    *,
    row_label: str = "reference",
    column_label: str = "map",
    cell_text: Sequence[Sequence[str]] | None = None,
    title: str | None = None,
) -> Path:
    """A heat map of the row-normalised confusion matrix (each row class's share per column class), counts (or
    ``cell_text``) printed in the non-empty cells. Also draws class transitions (rows: before, columns: after)."""
    from matplotlib.figure import Figure

    c = np.asarray(confusion, dtype=np.float64)
    shares = c / np.maximum(c.sum(axis=1, keepdims=True), 1)
    k = c.shape[0]
    side = max(3.0, 0.6 * k + 1.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=100)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(k), list(class_names), rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), list(class_names), fontsize=8)
    ax.set_xlabel(column_label)
    ax.set_ylabel(row_label)
    if title:
        ax.set_title(title, fontsize=9)
    for i in range(k):
        for j in range(k):
            if c[i, j]:
                text = cell_text[i][j] if cell_text is not None else f"{int(c[i, j]):,}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="white" if shares[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"share of the {row_label} class")
    return save_figure(fig, dst, overwrite=True)


#: agreement picture colours: agree, disagree, map only (no reference label), nothing to compare
_AGREEMENT_COLOURS = ((0.10, 0.60, 0.25), (0.85, 0.15, 0.15), (0.80, 0.80, 0.80), (1.0, 1.0, 1.0))


def agreement_plot(
    dst: str | os.PathLike[str], mapped: np.ndarray, truth: np.ndarray, *, title: str | None = None
) -> Path:
    """Where the map (``mapped`` [H, W], -1 = no class) agrees with the reference (``truth``, -1 = no label)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    state = np.full(mapped.shape, 3, dtype=np.int8)
    state[mapped >= 0] = 2
    both = (mapped >= 0) & (truth >= 0)
    state[both & (mapped == truth)] = 0
    state[both & (mapped != truth)] = 1
    h, w = state.shape
    fig = Figure(figsize=(max(3.0, w / 100 + 1.5), max(2.5, h / 100)), dpi=100)
    ax = fig.subplots()
    ax.imshow(state, cmap=ListedColormap(_AGREEMENT_COLOURS), vmin=0, vmax=3, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    labels = ("agree", "disagree", "no reference label", "no class")
    ax.legend(handles=[Patch(color=c, label=l) for c, l in zip(_AGREEMENT_COLOURS[:3], labels[:3])],
              loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)  # fmt: skip
    return save_figure(fig, dst, overwrite=True)


def evaluate_main(argv: Sequence[str]) -> int:
    """``dinov3-eo segment evaluate CLASSES.tif [MORE.tif ...] REFERENCE [--out-dir eval/]`` (``--chips``: chips'
    PNG class maps against their masks); returns the exit code."""
    from dinov3_eo.cli import EXIT_BAD_INPUT

    prog = "dinov3-eo segment evaluate"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Accuracy of a class map (or of several together, e.g. a test split's) against reference labels "
        "(a raster of class ids or a folder of such masks, or polygons), on the "
        "map's grid: overall accuracy, kappa, per-class IoU/F1/precision/recall, confusion matrix.",
    )
    parser.add_argument("prediction", nargs="+",
                        help="class map GeoTIFF (e.g. OUT_DIR/<scene>_classes.tif from 'segment predict'), or several "
                        "(files, folders, quoted globs), evaluated together")  # fmt: skip
    parser.add_argument("reference", help="reference labels: a GeoTIFF of class ids (or a folder or quoted glob of "
                        "them, one mask per image), or a vector file (.gpkg, .geojson, .shp ...), any CRS")  # fmt: skip
    parser.add_argument("--out-dir", help="write metrics.json, confusion.csv, confusion.png and agreement.png here")
    parser.add_argument("--attribute", default="name", help="polygon column holding the class (default: name)")
    parser.add_argument("--classes", type=json.loads, default=None,
                        help='JSON map of reference names to class ids, e.g. \'{"lake": 0, "forest": 2}\' '
                        "(default: names matched to the map's class names)")  # fmt: skip
    parser.add_argument("--class-names", nargs="+", default=None, help="names of the map's classes 0..K-1 (default: "
                        "the map's class_names tag)")  # fmt: skip
    parser.add_argument("--reference-nodata", type=float, default=None, help="nodata of a raster reference")
    parser.add_argument("--background", type=int, default=None,
                        help="class id of pixels no polygon covers (default: unlabelled, left out)")
    parser.add_argument("--pairing", choices=("georeference", "name"), default="georeference",
                        help="how maps meet reference masks: by footprint (default), or each map with the mask of "
                        "its own name (<scene>_classes.tif with <scene>.tif; masks of several dates over one place, or "
                        "without a georeference)")  # fmt: skip
    parser.add_argument("--name-suffixes", nargs="+", default=[],
                        help="with --pairing name or --chips, more suffixes dropped from map and mask names before "
                        "they are compared (e.g. _label, _mask)")  # fmt: skip
    chips = parser.add_argument_group(
        "image chips", "class maps of chips without a georeference ('segment predict --chips' writes "
        "<chip>_classes.png) against the chips' masks, each map with the mask of its name, pixel for pixel")
    chips.add_argument("--chips", action="store_true", help="the maps are chips' class maps (PNG or any one-band "
                       "image); REFERENCE is their masks (folders, quoted globs)")  # fmt: skip
    chips.add_argument("--mask-colors", type=json.loads, default=None,
                       help='with --chips, colour-coded masks: JSON class name -> colour, e.g. \'{"water": "#0000ff", '
                       '"building": [255, 0, 0]}\' (other colours unlabelled)')  # fmt: skip
    chips.add_argument("--remap", type=json.loads, default=None,
                       help="with --chips, JSON mask id -> class id applied to the masks, e.g. '{\"5\": 255}'")
    chips.add_argument("--ignore-index", type=int, default=255, help="with --chips, the masks' unlabelled id (255)")
    parser.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier evaluation")
    args = parser.parse_args(list(argv))
    prediction = args.prediction[0] if len(args.prediction) == 1 else args.prediction
    try:
        if args.chips:
            vector = [flag for flag, given in (("--classes", args.classes), ("--background", args.background),
                                               ("--reference-nodata", args.reference_nodata)) if given is not None]
            if vector or args.pairing != "georeference":
                raise ValueError(f"{', '.join(vector) or '--pairing'} is for GeoTIFF maps; with --chips the masks are "
                                 "paired by name, with --ignore-index, --remap and --mask-colors.")  # fmt: skip
            report = evaluate_chip_maps(
                prediction, args.reference, out_dir=args.out_dir, class_names=args.class_names,
                mask_colors=args.mask_colors, remap=args.remap, ignore_index=args.ignore_index,
                name_suffixes=args.name_suffixes, overwrite=args.overwrite,
            )  # fmt: skip
        else:
            if args.mask_colors is not None or args.remap is not None:
                raise ValueError("--mask-colors and --remap read chips' masks: add --chips for class maps of chips.")
            _refuse_other_strata(args.reference)
            report = evaluate_class_raster(
                prediction, args.reference, out_dir=args.out_dir, class_names=args.class_names,
                attribute=args.attribute, classes=args.classes, reference_nodata=args.reference_nodata,
                background=args.background, pairing=args.pairing, name_suffixes=args.name_suffixes,
                overwrite=args.overwrite,
            )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"{prog}: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(report_table(report))
    if args.out_dir:
        picture = "per_map.csv" if "maps" in report else "agreement.png"
        print(f"wrote {Path(args.out_dir) / 'metrics.json'}, confusion.csv, confusion.png, {picture}")
    return 0
