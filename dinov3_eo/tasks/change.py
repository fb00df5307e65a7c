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
from dinov3_eo.inference.tta import TTA

log = logging.getLogger(__name__)

#: The change score lies in [0, 2]; its histogram for Otsu's threshold has this many bins (0.001 wide).
HISTOGRAM_BINS = 2000
SCORE_RANGE = (0.0, 2.0)
#: mask values: no change, change, nodata
NO_CHANGE, CHANGE, MASK_NODATA = 0, 1, 255


# ---------------------------------------------------------------------------------------------- the model
class FeatureChange(nn.Module):
    """``[B, 2C, H, W]`` (before bands, then after bands, normalised) -> ``[B, 1, H, W]`` change score ``1 - cos``.

    Args:
        backbone: a ViT with ``patch_size`` and ``get_intermediate_layers`` (any :func:`load_backbone` result).
        in_chans: C, the bands of one date.
        layers: an int takes the last ``layers`` blocks, a sequence those 0-based blocks (official
            ``get_intermediate_layers`` semantics); the score is the mean over them of ``1 - cos`` between the two
            dates' normed patch tokens. The last block (the default) compares what is there; earlier blocks add
            texture and are more sensitive to photometric differences.

    Both dates run through the backbone in one batch of 2B. The score is computed at patch resolution and upsampled
    bilinearly (windows whose side is not a multiple of the patch are zero-padded, centred, and cropped back).
    """

    def __init__(self, backbone: nn.Module, *, in_chans: int, layers: int | Sequence[int] = 1) -> None:
        super().__init__()
        self.backbone = backbone
        self.in_chans = int(in_chans)
        self.layers = layers if isinstance(layers, int) else [int(i) for i in layers]
        self.patch_size = int(backbone.patch_size)

    def patch_distance(self, x: Tensor) -> Tensor:
        """``[B, 2C, H, W]`` with ``H, W`` multiples of the patch -> ``[B, H/p, W/p]`` float32 ``1 - cos``, mean over
        the layers."""
        if x.shape[1] != 2 * self.in_chans:
            raise ValueError(f"FeatureChange: expected 2 x {self.in_chans} bands (before, after), got {x.shape[1]}.")
        batch = x.shape[0]
        both = torch.cat([x[:, : self.in_chans], x[:, self.in_chans :]])  # [2B, C, H, W]: one forward for both dates
        layers = self.backbone.get_intermediate_layers(both, n=self.layers, reshape=True, norm=True)
        total = None
        for tokens in layers:  # [2B, D, h, w]
            tokens = F.normalize(tokens.float(), dim=1)
            distance = 1.0 - (tokens[:batch] * tokens[batch:]).sum(dim=1)  # [B, h, w]
            total = distance if total is None else total + distance
        return total / len(layers)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        ph, pw = -height % self.patch_size, -width % self.patch_size
        top, left = ph // 2, pw // 2
        padded = F.pad(x, (left, pw - left, top, ph - top)) if ph or pw else x
        score = self.patch_distance(padded)[:, None]  # [B, 1, h, w]
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
    """``(counts [bins], edges [bins + 1])`` of the finite values of a one-band raster, read block by block."""
    counts = np.zeros(bins, dtype=np.int64)
    edges = np.linspace(*value_range, bins + 1)
    with rasterio.open(path) as src:
        for _, window in src.block_windows(1):
            values = src.read(1, window=window)
            counts += np.histogram(values[np.isfinite(values)], bins=edges)[0]
    return counts, edges


# ------------------------------------------------------------------------------------------- the job
@dataclass(frozen=True)
class ChangeSummary:
    """What :func:`detect_change` wrote and found.

    ``changed_pixels`` / ``valid_pixels`` count the mask's change pixels and the pixels seen on both dates (0 without
    a threshold); ``changed_area_ha`` is ``None`` without a threshold or on a grid in degrees.
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

    @property
    def changed_fraction(self) -> float:
        return self.changed_pixels / self.valid_pixels if self.valid_pixels else 0.0

    def to_xarray(self) -> Any:
        """The score (and the mask, when one was written) as an ``xarray.Dataset`` over ``y × x`` with the CRS and
        transform set (rioxarray), read into memory: ``change`` float32 (NaN nodata) and ``mask`` uint8 (0 no change,
        1 change, 255 nodata)."""
        import rioxarray
        import xarray as xr

        score = rioxarray.open_rasterio(self.score, masked=True).squeeze("band", drop=True).load()
        layers = {"change": score.astype(np.float32)}
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


def _paired(before: Normalization | None, after: Normalization | None) -> Normalization | None:
    """The two dates' normalisations as one for the stacked before + after bands (both clip or neither: the after
    one is the before one, or its :meth:`~Normalization.after_affine`)."""
    if before is None and after is None:
        return None
    n = (before or after).num_bands
    before = before or Normalization(mean=(0.0,) * n, std=(1.0,) * n, name="none")
    after = after or Normalization(mean=(0.0,) * n, std=(1.0,) * n, name="none")
    join = (lambda a, b: None if a is None else tuple(a) + tuple(b))
    return Normalization(mean=join(before.mean, after.mean), std=join(before.std, after.std),
                         low=join(before.low, after.low), high=join(before.high, after.high), name=before.name)  # fmt: skip


def radiometric_match(stack: Any, before_bands: Sequence[int], after_bands: Sequence[int], *,
                      max_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per-band gain and offset giving the after date the before date's mean and standard deviation.

    Relative radiometric normalisation by moment matching: over the pixels both dates see (a nearest-neighbour
    sample of the grid, at most ``max_size`` pixels a side), ``after' = gain * after + offset`` with ``gain =
    std_before / std_after`` and ``offset = mean_before - gain * mean_after``. It removes what a change of sun,
    haze or calibration does to a whole scene (to first order, an affine change per band) and keeps local changes;
    a change covering much of the scene shifts the statistics too, so it is an option, not a rule.

    Args:
        stack: a :class:`~dinov3_eo.data.stack.RasterStack` of the two dates (``common_mask=True``).
        before_bands, after_bands: 1-based stack bands of the two dates, in the same band order.

    Returns:
        ``(gain [C], offset [C])`` float64.

    Raises:
        ValueError: if the dates share no valid pixel or a band is constant on one of them.
    """
    scale = min(1.0, max_size / max(stack.height, stack.width))
    shape = (max(1, round(stack.height * scale)), max(1, round(stack.width * scale)))
    indexes = [*before_bands, *after_bands]
    values = stack.read(indexes, out_shape=(len(indexes), *shape), resampling=Resampling.nearest)
    seen = np.isfinite(values).all(axis=0)
    if not seen.any():
        raise ValueError(f"{stack.name}: the two dates share no valid pixel, so their radiometry cannot be matched.")
    pixels = values[:, seen].astype(np.float64)  # [2C, N]
    n = len(before_bands)
    mean, std = pixels.mean(axis=1), pixels.std(axis=1)
    if not (std > 0).all():
        raise ValueError(f"{stack.name}: a band is constant over the pixels both dates see, so its radiometry cannot be "
                         "matched; pass radiometry='none' (--radiometry none).")  # fmt: skip
    gain = std[:n] / std[n:]
    return gain, mean[:n] - gain * mean[n:]


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
    from dinov3_eo.data.stack import RasterStack
    from dinov3_eo.inference.predict import predict_raster
    from dinov3_eo.inference.writers import check_overwrite

    if radiometry not in ("match", "none"):
        raise ValueError(f"radiometry must be 'match' or 'none', got {radiometry!r}.")
    if isinstance(threshold, str) and threshold != "otsu":
        raise ValueError(f"threshold must be 'otsu', a number or None, got {threshold!r}.")
    if threshold is None and (mask is not None or polygons is not None):
        raise ValueError("A change mask or polygons need a threshold ('otsu' or a score).")
    inputs = [before, after]
    dst = check_overwrite(dst, overwrite, inputs=inputs)
    if threshold is not None:
        mask = check_overwrite(mask if mask is not None else change_outputs(dst)[0], overwrite, inputs=inputs)
    for extra in (polygons, quicklook):
        if extra is not None:
            check_overwrite(extra, overwrite, inputs=inputs)
    if len({Path(p).resolve() for p in (dst, mask, polygons, quicklook) if p is not None}) != sum(
        p is not None for p in (dst, mask, polygons, quicklook)
    ):
        raise ValueError("detect_change: the score, mask, polygons and picture outputs must be different files.")

    in_chans = int(backbone.patch_embed.proj.weight.shape[1]) if hasattr(backbone, "patch_embed") else None
    after_nodata = after_nodata if after_nodata is not None else nodata
    with RasterStack([before, after], nodata=[nodata, after_nodata], resampling=resampling, common_mask=True) as stack:
        n_before, n_after = stack.counts
        if n_before != n_after and bands is None:
            raise ValueError(f"{before} has {n_before} bands but {after} has {n_after}: compare the same bands of "
                             "both (select them with --bands).")  # fmt: skip
        selected = list(bands) if bands is not None else list(range(1, n_before + 1))
        bad = [b for b in selected if not (1 <= b <= n_before and 1 <= b <= n_after)]
        if bad or not selected:
            raise ValueError(f"bands must be 1-based indexes of both rasters ({before}: 1..{n_before}, {after}: "
                             f"1..{n_after}), got {bands}.")  # fmt: skip
        if in_chans is not None and len(selected) != in_chans:
            raise ValueError(f"{before} gives {len(selected)} bands but the backbone takes {in_chans}; select bands with "
                             "--bands.")  # fmt: skip
        from dinov3_eo.data.raster import pixel_area_ha, pixel_size_off_scale

        trained_gsd = getattr(getattr(backbone, "meta", None), "gsd", None)
        metres = pixel_size_off_scale(stack, trained_gsd)
        if metres:
            log.warning("%s has %.3g m pixels but the backbone learnt at %.3g m: its features see other things at "
                        "another scale; resample the dates to its scale for a trustworthy map.", before, metres, trained_gsd)  # fmt: skip
        model = FeatureChange(backbone, in_chans=len(selected), layers=layers)
        after_bands = [n_before + b for b in selected]
        after_normalization, radiometry_tags = normalization, {"radiometry": radiometry}
        if radiometry == "match":
            gain, offset = radiometric_match(stack, selected, after_bands)
            base = normalization or Normalization(mean=(0.0,) * len(selected), std=(1.0,) * len(selected), name="none")
            after_normalization = base.after_affine(gain, offset)
            radiometry_tags.update(gain=json.dumps([round(float(g), 6) for g in gain]),
                                   offset=json.dumps([round(float(o), 6) for o in offset]))  # fmt: skip
            log.info("radiometry of %s matched to %s: gain %s, offset %s", after, before, np.round(gain, 4), np.round(offset, 2))
        predict_raster(
            model, stack, dst, out_channels=1, output="regression", activation="none", class_names=["change"],
            window=window, overlap=overlap, batch_size=batch_size, bands=selected + after_bands,
            normalization=_paired(normalization, after_normalization), device=device, amp=amp, tta=tta,
            multiple=model.patch_size, progress=progress, overwrite=overwrite,
            tags={"quantity": "feature change, 1 - cosine similarity of the two dates' patch features",
                  "before": os.fspath(before), "after": os.fspath(after), "layers": str(layers), **radiometry_tags},
        )  # fmt: skip
        rgb = getattr(getattr(backbone, "meta", None), "rgb_bands", None)
        rgb = rgb(selected) if rgb is not None else (selected[:3] if len(selected) >= 3 else selected[:1])

        value, method, changed, valid, area = None, None, 0, 0, None
        if threshold is not None:
            counts, edges = score_histogram(dst)
            if not counts.any():
                log.warning("%s and %s share no valid pixel: the change map is all nodata, so no mask is written.",
                            before, after)  # fmt: skip
                mask = polygons = None
            else:
                if threshold == "otsu":
                    try:
                        value, method = otsu_threshold(counts, edges), "otsu"
                    except ValueError:  # one score everywhere (e.g. identical dates): nothing stands out
                        value, method = float(edges[np.flatnonzero(counts)[-1] + 1]), "otsu (one score only)"
                else:
                    value, method = float(threshold), "given"
                changed, valid = write_change_mask(dst, mask, value, overwrite=overwrite)
                hectares = pixel_area_ha(stack.crs, stack.transform)
                area = changed * hectares if hectares is not None else None
                if polygons is not None:
                    from dinov3_eo.inference.writers import vectorize_classes

                    vectorize_classes(mask, polygons, min_area=min_area, simplify=simplify, keep=[CHANGE],
                                      layer="change", overwrite=overwrite)  # fmt: skip
        else:
            mask = None
        if quicklook is not None:
            change_quicklook(quicklook, stack, dst, mask=mask, bands=(rgb, [n_before + b for b in rgb]),
                             names=(Path(before).name, Path(after).name), overwrite=overwrite)  # fmt: skip
    return ChangeSummary(score=dst, mask=mask, polygons=Path(polygons) if polygons is not None else None,
                         quicklook=Path(quicklook) if quicklook is not None else None, threshold=value,
                         threshold_method=method, changed_pixels=changed, valid_pixels=valid, changed_area_ha=area)  # fmt: skip


def write_change_mask(score: str | os.PathLike[str], dst: str | os.PathLike[str], threshold: float, *,
                      overwrite: bool = False) -> tuple[int, int]:  # fmt: skip
    """Threshold a score raster block by block into a uint8 COG (0 no change, 1 change: score > threshold; 255
    nodata); returns ``(changed pixels, valid pixels)``."""
    from dinov3_eo.inference.writers import COGWriter

    changed = valid = 0
    with rasterio.open(score) as src, COGWriter(
        dst, crs=src.crs, transform=src.transform, width=src.width, height=src.height, count=1, dtype="uint8",
        nodata=MASK_NODATA, class_names=["no change", "change"], colormap={NO_CHANGE: (235, 235, 235, 255),
        CHANGE: (215, 25, 28, 255)}, overwrite=overwrite,
        tags={"dinov3_eo_output": "change_mask", "threshold": f"{threshold:.6g}", "score": os.fspath(score)},
    ) as out:  # fmt: skip
        for _, window in src.block_windows(1):
            values = src.read(1, window=window)
            seen = np.isfinite(values)
            above = seen & (values > threshold)
            block = np.full(values.shape, MASK_NODATA, dtype=np.uint8)
            block[seen] = NO_CHANGE
            block[above] = CHANGE
            out.write(block[None], window)
            changed += int(above.sum())
            valid += int(seen.sum())
    return changed, valid


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
    """Before, after (on the before grid) and the change score side by side, the mask's outline drawn on the score."""
    from matplotlib.figure import Figure

    from dinov3_eo.inference.writers import atomic_output, stretch_to_unit

    scale = min(1.0, max_size / max(stack.height, stack.width))
    shape = (max(1, round(stack.height * scale)), max(1, round(stack.width * scale)))
    panels = []
    for indexes in bands:
        pixels = stack.read(list(indexes), out_shape=(len(indexes), *shape), resampling=Resampling.average)
        valid = np.isfinite(pixels).all(axis=0)
        rgb = stretch_to_unit(np.nan_to_num(pixels), valid)
        rgb = np.moveaxis(np.repeat(rgb[:1], 3, axis=0) if len(indexes) < 3 else rgb[:3], 0, -1).copy()
        rgb[~valid] = 1.0
        panels.append(rgb)
    with rasterio.open(score) as src:
        values = np.ma.masked_invalid(src.read(1, out_shape=shape, resampling=Resampling.average))
    outline = None
    if mask is not None:
        with rasterio.open(mask) as src:
            outline = src.read(1, out_shape=shape, resampling=Resampling.nearest) == CHANGE
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
    with atomic_output(dst, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return Path(dst)


# ---------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    from dinov3_eo.inference.predict import BF16_HELP
    from dinov3_eo.inference.tta import TTA_HELP, TTA_MODES
    from dinov3_eo.inference.writers import SIMPLIFY_HELP

    p = argparse.ArgumentParser(
        prog="dinov3-eo change",
        description="Change between two images of a place from the distance of their DINOv3 patch features: a float32 "
        "score COG (1 - cosine, on BEFORE's grid), a change mask by Otsu's threshold, polygons and a picture.",
    )
    p.add_argument("before", help="the earlier GeoTIFF (its grid is the output's)")
    p.add_argument("after", help="the later GeoTIFF, same bands; any CRS and pixel size (warped onto BEFORE's grid)")
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
                   help="match (default): give AFTER the per-band mean and std of BEFORE over the pixels both see, so "
                   "that a change of sun, haze or calibration is not mapped as change; none: feed both as they are")
    p.add_argument("--bands", type=int, nargs="+", default=None, help="1-based bands of both rasters (default: all)")
    p.add_argument("--nodata", type=float, default=None, help="nodata of BEFORE (and of AFTER unless --after-nodata)")
    p.add_argument("--after-nodata", type=float, default=None, help="nodata of AFTER overriding the file's")
    p.add_argument("--normalization", default=None, choices=["none", "imagenet", "sat493m", "chmv2"],
                   help="override the backbone's stored input normalisation (presets expect 0..255 values)")
    p.add_argument("--resampling", default="bilinear", choices=["bilinear", "cubic", "nearest", "average"],
                   help="how AFTER is warped onto BEFORE's grid when the grids differ (default bilinear)")
    p.add_argument("--window", type=int, default=512, help="window size in pixels (default 512)")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap, fraction of the window (default 0.25)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--bf16", action="store_true", help=BF16_HELP)
    p.add_argument("--tta", choices=TTA_MODES, default=None, help=TTA_HELP)
    p.add_argument("--no-quicklook", action="store_true", help="do not write the PNG picture")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def change_main(argv: Sequence[str]) -> int:
    """``dinov3-eo change BEFORE.tif AFTER.tif --model BACKBONE -o change.tif``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
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
        for path in (args.before, args.after):
            if not Path(path).exists():
                raise FileNotFoundError(f"Input {path!r} does not exist.")
        backbone = resolve_backbone(args.model)
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        summary = detect_change(
            backbone.to(device), args.before, args.after, args.output,
            normalization=input_normalization(getattr(backbone, "meta", None), args.normalization), bands=args.bands,
            nodata=args.nodata, after_nodata=args.after_nodata, layers=args.layers if args.layers else 1,
            radiometry=args.radiometry,
            threshold=threshold, polygons=args.polygons, min_area=args.min_area, simplify=args.simplify,
            quicklook=quicklook, resampling=Resampling[args.resampling], window=args.window, overlap=args.overlap,
            batch_size=args.batch_size, device=device, amp=True if args.bf16 else None, tta=args.tta,
            overwrite=args.overwrite, progress=not args.quiet,
        )  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError, IndexError) as e:
        print(f"dinov3-eo change: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"change score: {summary.score}")
    if summary.mask is not None:
        area = f", {summary.changed_area_ha:,.1f} ha" if summary.changed_area_ha is not None else ""
        print(f"change mask:  {summary.mask} (threshold {summary.threshold:.3f}, {summary.threshold_method}: "
              f"{summary.changed_fraction:.1%} of {summary.valid_pixels:,} pixels seen on both dates{area})")  # fmt: skip
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
    "otsu_threshold",
    "radiometric_match",
    "score_histogram",
    "write_change_mask",
]
