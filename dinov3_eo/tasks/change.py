"""What changed between two images of a place: the distance between their DINOv3 patch features.

Two dates of a scene differ in ways nobody asked about (sun angle, season, haze, a sensor's calibration) and in
the ways that matter (a cleared forest, a flooded field, a new building). A difference of pixel values mixes both;
the features of a self-supervised backbone are built to stay put under photometric changes and to move with what is
on the ground, so the distance between the features of the two dates is a change map that needs no labels.

:class:`FeatureChange` takes a window holding both dates (the *before* bands, then the *after* bands), runs the
backbone on each, and returns ``1 - cos`` between their L2-normalised patch tokens (0 = the same, 1 = unrelated, up
to 2 = opposite), averaged over the chosen blocks and upsampled bilinearly to pixels. :func:`detect_change` streams
it over a :class:`~dinov3_eo.data.stack.RasterStack` of the two rasters (the *after* raster warped onto the
*before* grid window by window, so the dates may come in different CRSs and resolutions; a pixel is compared only
where both dates have data) through :func:`~dinov3_eo.inference.predict.predict_raster`, then optionally thresholds
the score (Otsu's threshold on the score histogram, or a given value) into a change mask, its polygons and a
before / after / change picture. ``dinov3-eo change`` is its command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.enums import Resampling
from torch import Tensor, nn

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.inference.tiling import centre_pad
from dinov3_eo.inference.tta import TTA
from dinov3_eo.inference.writers import picture_shape

log = logging.getLogger(__name__)

#: The change score lies in [0, 2]; its histogram for Otsu's threshold has this many bins (0.001 wide).
HISTOGRAM_BINS = 2000
SCORE_RANGE = (0.0, 2.0)
#: mask values: no change, change, nodata
NO_CHANGE, CHANGE, MASK_NODATA = 0, 1, 255


# ---------------------------------------------------------------------------------------------- the model
class FeatureChange(nn.Module):
    """``[B, N·C, H, W]`` (N dates' bands one after the other, normalised) -> ``[B, N - 1, H, W]`` change scores
    ``1 - cos`` between each date and the next (``N = 2``: before, after -> one score).

    Args:
        backbone: a ViT with ``patch_size`` and ``get_intermediate_layers`` (any :func:`load_backbone` result).
        in_chans: C, the bands of one date.
        layers: an int takes the last ``layers`` blocks, a sequence those 0-based blocks (official
            ``get_intermediate_layers`` semantics); the score is the mean over them of ``1 - cos`` between the two
            dates' normed patch tokens. The last block (the default) compares what is there; earlier blocks add
            texture and are more sensitive to photometric differences.
        dates: N, the dates in a window (default 2).

    All dates run through the backbone in one batch of N·B. The score is computed at patch resolution and upsampled
    bilinearly (windows whose side is not a multiple of the patch are zero-padded, centred, and cropped back).
    """

    def __init__(self, backbone: nn.Module, *, in_chans: int, layers: int | Sequence[int] = 1, dates: int = 2) -> None:
        super().__init__()
        if dates < 2:
            raise ValueError(f"FeatureChange compares at least 2 dates, got {dates}.")
        self.backbone = backbone
        self.in_chans, self.dates = int(in_chans), int(dates)
        self.layers = layers if isinstance(layers, int) else [int(i) for i in layers]
        self.patch_size = int(backbone.patch_size)

    def patch_distance(self, x: Tensor) -> Tensor:
        """``[B, N·C, H, W]`` with ``H, W`` multiples of the patch -> ``[B, N - 1, H/p, W/p]`` float32 ``1 - cos`` of
        consecutive dates, mean over the layers."""
        if x.shape[1] != self.dates * self.in_chans:
            raise ValueError(f"FeatureChange: expected {self.dates} x {self.in_chans} bands (one set per date), got "
                             f"{x.shape[1]}.")  # fmt: skip
        batch = x.shape[0]
        # [N·B, C, H, W], date-major: one forward for every date
        dates = torch.cat([x[:, d * self.in_chans : (d + 1) * self.in_chans] for d in range(self.dates)])
        layers = self.backbone.get_intermediate_layers(dates, n=self.layers, reshape=True, norm=True)
        total = None
        for tokens in layers:  # [N·B, D, h, w]
            tokens = F.normalize(tokens.float(), dim=1).unflatten(0, (self.dates, batch))  # [N, B, D, h, w]
            distance = 1.0 - (tokens[:-1] * tokens[1:]).sum(dim=2)  # [N - 1, B, h, w]
            total = distance if total is None else total + distance
        return (total / len(layers)).transpose(0, 1)  # [B, N - 1, h, w]

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        padded, (left, _, top, _) = centre_pad(x, self.patch_size)
        score = self.patch_distance(padded)  # [B, N - 1, h, w]
        score = F.interpolate(score, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return score[..., top : top + height, left : left + width]


# ------------------------------------------------------------------------------------------- thresholds
def otsu_threshold(counts: np.ndarray, edges: np.ndarray) -> float:
    """Otsu's threshold of a histogram: the cut that maximises the between-class variance.

    Args:
        counts: ``[N]`` pixel counts per bin.
        edges: ``[N + 1]`` bin edges.

    Returns:
        The upper edge of the last bin of the lower class: values ``> threshold`` form the upper class.

    Raises:
        ValueError: if the histogram has fewer than two non-empty bins (nothing to separate).
    """
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    if counts.ndim != 1 or edges.shape != (counts.size + 1,):
        raise ValueError(f"otsu_threshold: counts [N] and edges [N + 1], got {counts.shape} and {edges.shape}.")
    if np.count_nonzero(counts) < 2:
        raise ValueError("otsu_threshold: the histogram has fewer than two non-empty bins, so there is nothing to separate.")
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)[:-1]  # pixels at or below each cut
    s0 = np.cumsum(counts * centres)[:-1]
    total, total_sum = counts.sum(), (counts * centres).sum()
    w1 = total - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - (total_sum - s0) / w1) ** 2
    between[(w0 == 0) | (w1 == 0)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def score_histogram(path: str | os.PathLike[str], *, bins: int = HISTOGRAM_BINS,
                    value_range: tuple[float, float] = SCORE_RANGE) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``(counts [bins], edges [bins + 1])`` of each pixel's largest score over the bands of a score raster (its one
    score for two dates), over the pixels with finite scores, read block by block."""
    counts = np.zeros(bins, dtype=np.int64)
    edges = np.linspace(*value_range, bins + 1)
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            largest, seen = _largest(src.read(window=window))
            counts += np.histogram(largest[seen], bins=edges)[0]
    return counts, edges


def _largest(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[K, h, w]`` scores -> (the largest score [h, w], where every score is finite [h, w])."""
    seen = np.isfinite(scores).all(axis=0)
    return np.where(seen, scores, -np.inf).max(axis=0), seen


# ------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class ChangeSummary:
    """What :func:`detect_change` (or :func:`detect_change_series`) wrote and found.

    ``changed_pixels`` / ``valid_pixels`` count the mask's change pixels and the pixels seen on every date (0 without
    a threshold); ``changed_area_ha`` is ``None`` without a threshold or on a grid in degrees. ``intervals`` names
    the consecutive pairs of dates (``"a.tif -> b.tif"``), ``changed_per_interval`` counts the pixels whose largest
    change falls in each.
    """

    score: Path
    mask: Path | None
    polygons: Path | None
    quicklook: Path | None
    threshold: float | None
    threshold_method: str | None
    changed_pixels: int
    valid_pixels: int
    changed_area_ha: float | None
    intervals: tuple[str, ...] = ()
    changed_per_interval: tuple[int, ...] = ()

    @property
    def changed_fraction(self) -> float:
        return self.changed_pixels / self.valid_pixels if self.valid_pixels else 0.0

    def to_xarray(self) -> Any:
        """The score (and the mask, when one was written) as an ``xarray.Dataset`` with the CRS and transform set
        (rioxarray), read into memory: ``change`` float32 (NaN nodata; ``y × x`` for two dates, ``interval × y × x``
        for more) and ``mask`` uint8 (0 no change, k: changed most between date k and k + 1, 255 nodata)."""
        import rioxarray
        import xarray as xr

        score = rioxarray.open_rasterio(self.score, masked=True).astype(np.float32).load()
        if score.sizes["band"] == 1:
            score = score.squeeze("band", drop=True)
        else:
            score = score.rename(band="interval").assign_coords(interval=list(self.intervals))
        layers = {"change": score}
        if self.mask is not None:
            layers["mask"] = rioxarray.open_rasterio(self.mask).squeeze("band", drop=True).load()
        dataset = xr.Dataset(layers)
        dataset.attrs.update(threshold=self.threshold if self.threshold is not None else float("nan"),
                             threshold_method=self.threshold_method or "none")  # fmt: skip
        return dataset.rio.write_crs(score.rio.crs)


def change_outputs(score: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The default mask and picture paths of a score raster ``X.tif``: ``X_mask.tif`` and ``X.png``."""
    score = Path(score)
    return score.with_name(f"{score.stem}_mask.tif"), score.with_suffix(".png")


def _joined(norms: Sequence[Normalization | None]) -> Normalization | None:
    """The dates' normalisations as one for their stacked bands (all clip or none: each is the first one or its
    :meth:`~Normalization.after_affine`)."""
    if all(n is None for n in norms):
        return None
    bands = next(n for n in norms if n is not None).num_bands
    norms = [n or Normalization(mean=(0.0,) * bands, std=(1.0,) * bands, name="none") for n in norms]
    join = (lambda name: None if getattr(norms[0], name) is None else sum((tuple(getattr(n, name)) for n in norms), ()))
    return Normalization(mean=join("mean"), std=join("std"), low=join("low"), high=join("high"), name=norms[0].name)


def radiometric_match(stack: Any, before_bands: Sequence[int], after_bands: Sequence[int], *,
                      max_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-band gain and offset giving the after date the before date's mean and standard deviation.

    Relative radiometric normalisation by moment matching: over the pixels both dates see (a nearest-neighbour
    sample of the grid, at most ``max_size`` pixels a side), ``after' = gain * after + offset`` with ``gain =
    std_before / std_after`` and ``offset = mean_before - gain * mean_after``. It removes what a change of sun,
    haze or calibration does to a whole scene (to first order, an affine change per band) and keeps local changes;
    a change covering much of the scene shifts the statistics too, so it is an option, not a rule.

    Args:
        stack: a :class:`~dinov3_eo.data.stack.RasterStack` of the dates (``common_mask=True``).
        before_bands, after_bands: 1-based stack bands of the two dates, in the same band order.

    Returns:
        ``(gain [C], offset [C])`` float64.

    Raises:
        ValueError: if the dates share no valid pixel or a band is constant on one of them.
    """
    [(gain, offset)] = _moment_matches(stack, [before_bands, after_bands], max_size=max_size)
    return gain, offset


def _moment_matches(stack: Any, date_bands: Sequence[Sequence[int]], *, max_size: int = 1024) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`radiometric_match` of every later date to the first, from one decimated read of all of them."""
    shape = picture_shape(stack.height, stack.width, max_size)
    indexes = [b for bands in date_bands for b in bands]
    values = stack.read(indexes, out_shape=(len(indexes), *shape), resampling=Resampling.nearest)
    seen = np.isfinite(values).all(axis=0)
    if not seen.any():
        raise ValueError(f"{stack.name}: the dates share no valid pixel, so their radiometry cannot be matched.")
    pixels = values[:, seen].astype(np.float64).reshape(len(date_bands), len(date_bands[0]), -1)  # [dates, C, N]
    mean, std = pixels.mean(axis=2), pixels.std(axis=2)
    if not (std > 0).all():
        raise ValueError(f"{stack.name}: a band is constant over the pixels both dates see, so its radiometry cannot be "
                         "matched; pass radiometry='none' (--radiometry none).")  # fmt: skip
    gains = std[0] / std[1:]  # [dates - 1, C]
    return [(g, mean[0] - g * m) for g, m in zip(gains, mean[1:])]


def detect_change(
    backbone: nn.Module,
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    after_nodata: float | None = None,
    layers: int | Sequence[int] = 1,
    radiometry: str = "match",
    threshold: str | float | None = "otsu",
    mask: str | os.PathLike[str] | None = None,
    polygons: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    quicklook: str | os.PathLike[str] | None = None,
    resampling: Resampling = Resampling.bilinear,
    window: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ChangeSummary:
    """Map the change between ``before`` and ``after`` on ``before``'s grid: a float32 COG of ``1 - cos`` scores.

    Args:
        backbone: the ViT whose features are compared (e.g. :func:`~dinov3_eo.tasks.features.resolve_backbone`).
        before, after: GeoTIFFs of the same place with the same bands; ``after`` may have another CRS or pixel size
            (it is warped onto ``before``'s grid window by window with ``resampling``). The output covers
            ``before``'s grid; pixels where either date has no data are nodata (NaN).
        dst: the score COG (``.tif``): one band ``change`` in ``[0, 2]``.
        normalization: applied to both dates (the backbone's, e.g. ``input_normalization(backbone.meta, None)``).
        bands: 1-based bands of each raster fed to the backbone (default all).
        nodata: nodata of ``before`` overriding the file's; ``after_nodata`` the same for ``after`` (default:
            ``nodata`` when given, else the file's).
        layers: the blocks compared (see :class:`FeatureChange`).
        radiometry: ``"match"`` (default) gives the after date the before date's per-band mean and standard
            deviation over the pixels both see before the normalisation (:func:`radiometric_match`: a change of sun,
            haze or calibration is not a change on the ground); ``"none"`` feeds both dates as they are.
        threshold: ``"otsu"`` (default), a score, or ``None`` for the score alone. With one, a change mask is
            written (uint8: 0 no change, 1 change, 255 nodata) to ``mask`` (default ``<dst stem>_mask.tif``).
        polygons: also write the change regions (mask value 1) as polygons to this GeoPackage; ``min_area`` (CRS
            units²) and ``simplify`` (CRS units) as for :func:`~dinov3_eo.inference.writers.vectorize_classes`.
        quicklook: a ``.png`` of before, after and the score (the mask's outline on it).
        window, overlap, batch_size, device, amp, tta: as for :func:`~dinov3_eo.inference.predict.predict_raster`.

    Returns:
        A :class:`ChangeSummary`.

    Raises:
        FileExistsError: if an output exists and ``overwrite`` is false (checked before any work).
        ValueError: rasters without georeference, that do not overlap, with different band counts, or with another
            band count than the backbone takes; an unknown threshold; polygons without a threshold.
    """
    return detect_change_series(
        backbone, [before, after], dst, normalization=normalization, bands=bands,
        nodata=[nodata, after_nodata if after_nodata is not None else nodata], layers=layers, radiometry=radiometry,
        threshold=threshold, mask=mask, polygons=polygons, min_area=min_area, simplify=simplify, quicklook=quicklook,
        resampling=resampling, window=window, overlap=overlap, batch_size=batch_size, device=device, amp=amp, tta=tta,
        overwrite=overwrite, progress=progress,
    )  # fmt: skip


def detect_change_series(
    backbone: nn.Module,
    rasters: Sequence[str | os.PathLike[str]],
    dst: str | os.PathLike[str],
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    nodata: float | None | Sequence[float | None] = None,
    layers: int | Sequence[int] = 1,
    radiometry: str = "match",
    threshold: str | float | None = "otsu",
    mask: str | os.PathLike[str] | None = None,
    polygons: str | os.PathLike[str] | None = None,
    min_area: float = 0.0,
    simplify: float = 0.0,
    quicklook: str | os.PathLike[str] | None = None,
    resampling: Resampling = Resampling.bilinear,
    window: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ChangeSummary:
    """Change along a series of dates of a place ("when did it change?"), on the first date's grid.

    Each date is compared with the next (:class:`FeatureChange`; all dates of a window in one forward pass): ``dst``
    gets one band per interval (``"a.tif -> b.tif"``; for two dates the one band ``change``). With a threshold, the
    mask holds, where a pixel's largest score exceeds it, the interval of that largest change (1: between the first
    and second date, ...; 0 no change, 255 nodata), i.e. when it changed most; the threshold (``"otsu"``: Otsu's
    threshold) is taken on the histogram of each pixel's largest score. ``radiometry="match"`` matches every date to
    the first. ``nodata``: one value for every date, or one per date. The other arguments are :func:`detect_change`'s.

    Raises:
        FileExistsError, ValueError: as :func:`detect_change`, and for fewer than two rasters.
    """
    from dinov3_eo.data.raster import pixel_area_ha, pixel_size_off_scale
    from dinov3_eo.data.stack import RasterStack
    from dinov3_eo.inference.predict import predict_raster
    from dinov3_eo.inference.writers import check_overwrite
    from dinov3_eo.models.hub import preview_bands

    rasters = list(rasters)
    if len(rasters) < 2:
        raise ValueError(f"Change needs at least two dates, got {len(rasters)} raster(s).")
    if radiometry not in ("match", "none"):
        raise ValueError(f"radiometry must be 'match' or 'none', got {radiometry!r}.")
    if isinstance(threshold, str) and threshold != "otsu":
        raise ValueError(f"threshold must be 'otsu', a number or None, got {threshold!r}.")
    if threshold is None and (mask is not None or polygons is not None):
        raise ValueError("A change mask or polygons need a threshold ('otsu' or a score).")
    dst = check_overwrite(dst, overwrite, inputs=rasters)
    if threshold is not None:
        mask = check_overwrite(mask if mask is not None else change_outputs(dst)[0], overwrite, inputs=rasters)
    for extra in (polygons, quicklook):
        if extra is not None:
            check_overwrite(extra, overwrite, inputs=rasters)
    outputs = [p for p in (dst, mask, polygons, quicklook) if p is not None]
    if len({Path(p).resolve() for p in outputs}) != len(outputs):
        raise ValueError("The score, mask, polygons and picture outputs must be different files.")

    names = [Path(r).name for r in rasters]
    intervals = ["change"] if len(rasters) == 2 else [f"{a} -> {b}" for a, b in zip(names, names[1:])]
    in_chans = int(backbone.patch_embed.proj.weight.shape[1]) if hasattr(backbone, "patch_embed") else None
    with RasterStack(rasters, nodata=nodata, resampling=resampling, common_mask=True) as stack:
        counts = stack.counts
        if len(set(counts)) > 1 and bands is None:
            listed = ", ".join(f"{r} has {c}" for r, c in zip(rasters, counts))
            raise ValueError(f"The dates have different band counts ({listed}): compare the same bands of each "
                             "(select them with --bands).")  # fmt: skip
        selected = list(bands) if bands is not None else list(range(1, counts[0] + 1))
        bad = [b for b in selected if not all(1 <= b <= c for c in counts)]
        if bad or not selected:
            raise ValueError(f"bands must be 1-based indexes of every raster (1..{min(counts)}), got {bands}.")
        if in_chans is not None and len(selected) != in_chans:
            raise ValueError(f"{rasters[0]} gives {len(selected)} bands but the backbone takes {in_chans}; select bands "
                             "with --bands.")  # fmt: skip
        trained_gsd = getattr(getattr(backbone, "meta", None), "gsd", None)
        metres = pixel_size_off_scale(stack, trained_gsd)
        if metres:
            log.warning("%s has %.3g m pixels but the backbone learnt at %.3g m: its features see other things at "
                        "another scale; resample the dates to its scale for a trustworthy map.", rasters[0], metres,
                        trained_gsd)  # fmt: skip
        offsets = np.cumsum([0, *counts[:-1]])
        date_bands = [[int(o) + b for b in selected] for o in offsets]  # each date's selected bands in the stack
        norms: list[Normalization | None] = [normalization]
        tags = {"radiometry": radiometry}
        base = normalization or Normalization(mean=(0.0,) * len(selected), std=(1.0,) * len(selected), name="none")
        matches = _moment_matches(stack, date_bands) if radiometry == "match" else []
        for d in range(1, len(rasters)):
            if radiometry == "match":
                gain, offset = matches[d - 1]
                norms.append(base.after_affine(gain, offset))
                suffix = "" if len(rasters) == 2 else f"_{d}"
                tags[f"gain{suffix}"] = json.dumps([round(float(g), 6) for g in gain])
                tags[f"offset{suffix}"] = json.dumps([round(float(o), 6) for o in offset])
                log.info("radiometry of %s matched to %s: gain %s, offset %s", rasters[d], rasters[0],
                         np.round(gain, 4), np.round(offset, 2))  # fmt: skip
            else:
                norms.append(normalization)
        model = FeatureChange(backbone, in_chans=len(selected), layers=layers, dates=len(rasters))
        run = predict_raster(
            model, stack, dst, out_channels=len(rasters) - 1, output="regression", activation="none",
            class_names=intervals, window=window, overlap=overlap, batch_size=batch_size,
            bands=[b for group in date_bands for b in group], normalization=_joined(norms), device=device, amp=amp,
            tta=tta, multiple=model.patch_size, progress=progress, overwrite=overwrite,
            tags={"quantity": "feature change, 1 - cosine similarity of consecutive dates' patch features",
                  "dates": json.dumps([os.fspath(r) for r in rasters]), "before": os.fspath(rasters[0]),
                  "after": os.fspath(rasters[-1]), "layers": str(layers), **tags},
        )  # fmt: skip
        rgb = preview_bands(backbone, selected)

        value, method, changed, valid, area, per_interval = None, None, 0, 0, None, ()
        if threshold is not None and run.windows_skipped == run.windows:  # (predict_raster has said so)
            log.warning("%s share no valid pixel: the change map is all nodata, so no mask is written.",
                        " and ".join(map(str, rasters)))  # fmt: skip
            threshold = mask = polygons = None
        if threshold is not None:
            if threshold == "otsu":  # the one threshold that needs a pass over the scores first
                hist, edges = score_histogram(dst)
                try:
                    value, method = otsu_threshold(hist, edges), "otsu"
                except ValueError:  # one score everywhere (e.g. identical dates): nothing stands out
                    value, method = float(edges[np.flatnonzero(hist)[-1] + 1]), "otsu (one score only)"
            else:
                value, method = float(threshold), "given"
            mask_names = ["no change", "change"] if len(rasters) == 2 else ["no change", *intervals]
            pixels = write_change_mask(dst, mask, value, class_names=mask_names, overwrite=overwrite)  # [no change, ...]
            per_interval, changed, valid = tuple(pixels[1:]), sum(pixels[1:]), sum(pixels)
            hectares = pixel_area_ha(stack.crs, stack.transform)
            area = changed * hectares if hectares is not None else None
            if polygons is not None:
                from dinov3_eo.inference.writers import vectorize_classes

                vectorize_classes(mask, polygons, min_area=min_area, simplify=simplify,
                                  keep=list(range(1, len(rasters))), layer="change", overwrite=overwrite)  # fmt: skip
        else:
            mask = None
        if quicklook is not None:
            change_quicklook(quicklook, stack, dst, mask=mask, bands=(rgb, [int(offsets[-1]) + b for b in rgb]),
                             names=(names[0], names[-1]), overwrite=overwrite)  # fmt: skip
    return ChangeSummary(score=dst, mask=mask, polygons=Path(polygons) if polygons is not None else None,
                         quicklook=Path(quicklook) if quicklook is not None else None, threshold=value,
                         threshold_method=method, changed_pixels=changed, valid_pixels=valid, changed_area_ha=area,
                         intervals=tuple(intervals), changed_per_interval=tuple(per_interval))  # fmt: skip


#: mask colours: no change, then one per interval (the first red: the two-date change)
_INTERVAL_COLOURS = [(215, 25, 28, 255), (253, 174, 97, 255), (171, 221, 164, 255), (43, 131, 186, 255),
                     (94, 60, 153, 255), (230, 97, 1, 255)]  # fmt: skip


def write_change_mask(score: str | os.PathLike[str], dst: str | os.PathLike[str], threshold: float, *,
                      class_names: Sequence[str] = ("no change", "change"), overwrite: bool = False) -> list[int]:  # fmt: skip
    """Threshold a score raster block by block into a uint8 COG: where a pixel's largest score (over the bands)
    exceeds ``threshold``, the 1-based band of that score (1 = change, for one band), else 0; 255 nodata.

    Returns:
        the pixels of each value ``[no change, band 1, band 2, ...]``.
    """
    from dinov3_eo.inference.writers import COGWriter

    with rasterio.open(score) as src:
        k = src.count
        counts = np.zeros(k + 1, dtype=np.int64)
        colours = {NO_CHANGE: (235, 235, 235, 255)}
        colours.update({i + 1: _INTERVAL_COLOURS[i % len(_INTERVAL_COLOURS)] for i in range(k)})
        with COGWriter(
            dst, crs=src.crs, transform=src.transform, width=src.width, height=src.height, count=1, dtype="uint8",
            nodata=MASK_NODATA, class_names=list(class_names), colormap=colours, overwrite=overwrite,
            tags={"dinov3_eo_output": "change_mask", "threshold": f"{threshold:.6g}", "score": os.fspath(score)},
        ) as out:  # fmt: skip
            for _, window in src.block_windows(1):
                values = src.read(window=window)  # [k, h, w]
                seen = np.isfinite(values).all(axis=0)
                band = np.where(seen, values, -np.inf).argmax(axis=0)  # [h, w]: each pixel's largest score's band
                largest = np.take_along_axis(values, band[None], axis=0)[0]
                block = np.full(seen.shape, MASK_NODATA, dtype=np.uint8)
                block[seen] = NO_CHANGE
                above = seen & (largest > threshold)
                block[above] = (band[above] + 1).astype(np.uint8)
                out.write(block[None], window)
                counts += np.bincount(block[seen], minlength=k + 1)[: k + 1]
    return counts.tolist()


def change_quicklook(
    dst: str | os.PathLike[str],
    stack: Any,
    score: str | os.PathLike[str],
    *,
    mask: str | os.PathLike[str] | None,
    bands: tuple[Sequence[int], Sequence[int]],
    names: tuple[str, str],
    max_size: int = 768,
    overwrite: bool = False,
) -> Path:
    """The first and the last date (on the first date's grid) and the change score (each pixel's largest, for a
    series) side by side, the mask's outline drawn on the score."""
    from matplotlib.figure import Figure

    from dinov3_eo.inference.writers import display_rgb, save_figure

    shape = picture_shape(stack.height, stack.width, max_size)
    panels = []
    for indexes in bands:
        pixels = stack.read(list(indexes), out_shape=(len(indexes), *shape), resampling=Resampling.average)
        valid = np.isfinite(pixels).all(axis=0)
        panels.append(display_rgb(np.nan_to_num(pixels), valid))
    with rasterio.open(score) as src:
        largest, seen = _largest(src.read(out_shape=(src.count, *shape), resampling=Resampling.average))
        values = np.ma.masked_array(largest, mask=~seen)
    outline = None
    if mask is not None:
        with rasterio.open(mask) as src:
            labels = src.read(1, out_shape=shape, resampling=Resampling.nearest)
            outline = (labels != NO_CHANGE) & (labels != MASK_NODATA)
    finite = values.compressed()
    top = max(float(np.percentile(finite, 99)), 1e-3) if finite.size else 1.0
    fig = Figure(figsize=(3 * max(2.5, shape[1] / 100) + 1.5, max(2.5, shape[0] / 100) + 0.6), dpi=100)
    axes = fig.subplots(1, 3)
    for ax, picture, title in zip(axes[:2], panels, names):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=9)
    image = axes[2].imshow(values, cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
    if outline is not None and outline.any() and not outline.all():
        axes[2].contour(outline.astype(np.uint8), levels=[0.5], colors="cyan", linewidths=0.8)
    axes[2].set_title("change (1 - cos)" + (", mask outlined" if outline is not None else ""), fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes[2], fraction=0.046, pad=0.04)
    return save_figure(fig, dst, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    from dinov3_eo.inference.predict import add_window_options
    from dinov3_eo.inference.writers import SIMPLIFY_HELP

    p = argparse.ArgumentParser(
        prog="dinov3-eo change",
        description="Change between two (or more) images of a place from the distance of their DINOv3 patch features: "
        "a float32 score COG (1 - cosine, on the first date's grid; one band per pair of consecutive dates), a change "
        "mask by Otsu's threshold (for a series: when the largest change happened), polygons and a picture.",
    )
    p.add_argument("dates", nargs="+", metavar="DATE",
                   help="two or more GeoTIFFs of the place with the same bands, oldest first; the first one's grid is "
                   "the output's, the others may have any CRS and pixel size (warped onto it)")  # fmt: skip
    p.add_argument("--model", required=True, help="backbone: an export (.pth/.safetensors), any load_backbone source, "
                   "a segmentation or height .ckpt, or a registry name (random weights)")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="score COG (.tif); the mask goes to OUTPUT_mask.tif, the "
                   "picture to OUTPUT.png")  # fmt: skip
    p.add_argument("--threshold", default="otsu", help="'otsu' (default), a score in [0, 2], or 'none' for the score alone")
    p.add_argument("--polygons", default=None, help="also write the change regions as polygons to this GeoPackage")
    p.add_argument("--min-area", type=float, default=0.0, help="drop change polygons smaller than this (CRS units²)")
    p.add_argument("--simplify", type=float, default=0.0, help=SIMPLIFY_HELP)
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="0-based blocks whose features are compared, score averaged (default: the last block)")
    p.add_argument("--radiometry", default="match", choices=["match", "none"],
                   help="match (default): give each later date the first date's per-band mean and std over the pixels "
                   "both see, so that a change of sun, haze or calibration is not mapped as change; none: feed them as "
                   "they are")  # fmt: skip
    p.add_argument("--bands", type=int, nargs="+", default=None, help="1-based bands of both rasters (default: all)")
    p.add_argument("--nodata", type=float, default=None, help="nodata of every date overriding the files' (unless "
                   "--after-nodata)")  # fmt: skip
    p.add_argument("--after-nodata", type=float, default=None, help="nodata of the dates after the first")
    p.add_argument("--normalization", default=None, choices=["none", "imagenet", "sat493m", "chmv2"],
                   help="override the backbone's stored input normalisation (presets expect 0..255 values)")
    p.add_argument("--resampling", default="bilinear", choices=["bilinear", "cubic", "nearest", "average"],
                   help="how a date is warped onto the first date's grid when the grids differ (default bilinear)")
    add_window_options(p)
    p.add_argument("--no-quicklook", action="store_true", help="do not write the PNG picture")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def change_main(argv: Sequence[str]) -> int:
    """``dinov3-eo change BEFORE.tif AFTER.tif [MORE.tif ...] --model BACKBONE -o change.tif``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.inference.predict import window_settings
    from dinov3_eo.tasks.features import input_normalization, resolve_backbone

    args = _parser().parse_args(list(argv))
    threshold: str | float | None = args.threshold
    if threshold == "none":
        threshold = None
    elif threshold != "otsu":
        try:
            threshold = float(threshold)
        except ValueError:
            print(f"dinov3-eo change: error: --threshold must be 'otsu', 'none' or a number, got {args.threshold!r}.",
                  file=sys.stderr)  # fmt: skip
            return EXIT_BAD_INPUT
    quicklook = None if args.no_quicklook else change_outputs(args.output)[1]
    try:
        if len(args.dates) < 2:
            raise ValueError(f"Change needs at least two dates, got {len(args.dates)}.")
        backbone = resolve_backbone(args.model)
        settings = window_settings(args)
        later = args.after_nodata if args.after_nodata is not None else args.nodata
        summary = detect_change_series(
            backbone.to(settings["device"]), args.dates, args.output,
            normalization=input_normalization(getattr(backbone, "meta", None), args.normalization), bands=args.bands,
            nodata=[args.nodata] + [later] * (len(args.dates) - 1), layers=args.layers if args.layers else 1,
            radiometry=args.radiometry, threshold=threshold, polygons=args.polygons, min_area=args.min_area,
            simplify=args.simplify, quicklook=quicklook, resampling=Resampling[args.resampling], **settings,
            overwrite=args.overwrite, progress=not args.quiet,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError, IndexError) as e:
        print(f"dinov3-eo change: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"change score: {summary.score}")
    if summary.mask is not None:
        area = f", {summary.changed_area_ha:,.1f} ha" if summary.changed_area_ha is not None else ""
        print(f"change mask:  {summary.mask} (threshold {summary.threshold:.3f}, {summary.threshold_method}: "
              f"{summary.changed_fraction:.1%} of {summary.valid_pixels:,} pixels seen on every date{area})")  # fmt: skip
        if len(summary.intervals) > 1:
            for name, pixels in zip(summary.intervals, summary.changed_per_interval):
                print(f"  changed most {name}: {pixels:,} pixels")
    if summary.polygons is not None:
        print(f"polygons:     {summary.polygons}")
    if summary.quicklook is not None:
        print(f"picture:      {summary.quicklook}")
    return 0


__all__ = [
    "ChangeSummary",
    "FeatureChange",
    "change_main",
    "change_outputs",
    "change_quicklook",
    "detect_change",
    "detect_change_series",
    "otsu_threshold",
    "radiometric_match",
    "score_histogram",
    "write_change_mask",
]
