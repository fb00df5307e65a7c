"""Unsupervised maps from DINOv3 features: k-means clusters of a scene's patch features, as a georeferenced class map.

No labels and no text: the features of a self-supervised backbone already group what looks alike, so k-means on
them splits a scene into regions a person can name afterwards (water, a field pattern, a town), the usual first
look at a new archive and a starting point for labelling. :func:`fit_clusters` samples patch features from a set of
windows spread over one or more rasters (every read a window: memory flat in raster size) and fits spherical k-means
on them (:mod:`~dinov3_eo.tasks.kmeans`; several ``k`` are compared by their cosine silhouette and the best kept);
:func:`cluster_raster` then streams every window through :class:`ClusterScorer` (cosine of each pixel's upsampled
patch features to each centroid) in :func:`~dinov3_eo.inference.predict.predict_raster` and writes the nearest
centroid per pixel as a class COG (colour table, nodata), a picture over the imagery and, optionally, polygons.

The centroids are saved (:meth:`Clusters.save`, safetensors + metadata) with a fingerprint of the backbone's
weights, the layers and the input normalisation, so that later scenes are mapped into the *same* clusters
(``--centroids``) and centroids are never applied to features of another model. ``dinov3-eo cluster`` is the command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import Tensor, nn

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import block_windows
from dinov3_eo.inference.tiling import centre_pad
from dinov3_eo.inference.tta import TTA
from dinov3_eo.tasks.kmeans import cosine_silhouette, spherical_kmeans

log = logging.getLogger(__name__)

#: feature vectors kept for fitting, and windows read to find them (spread over every raster)
MAX_SAMPLES = 50_000
MAX_WINDOWS = 64
#: the silhouette that compares several k is computed on at most this many of the samples
SILHOUETTE_SAMPLES = 20_000
FORMAT = "dinov3_eo.clusters/1"


# ------------------------------------------------------------------------------------------- features
def normed_patch_tokens(backbone: nn.Module, x: Tensor, layers: int | Sequence[int] = 1) -> Tensor:
    """``[B, C, H, W]`` (``H, W`` multiples of the patch) -> ``[B, L·D, H/p, W/p]`` float32 unit vectors.

    Each of the ``L`` layers' normed patch tokens is L2-normalised and divided by ``sqrt(L)`` before they are
    concatenated, so the vector has unit length and its cosine with another one is the mean of the layers' cosines.
    ``layers``: official ``get_intermediate_layers`` semantics (an int takes the last blocks, a sequence those
    0-based blocks).
    """
    outs = backbone.get_intermediate_layers(x, n=layers, reshape=True, norm=True)
    scale = 1.0 / math.sqrt(len(outs))
    return torch.cat([F.normalize(t.float(), dim=1) * scale for t in outs], dim=1)


#: the score of a class that has no centroid (ids a label file skips): below any cosine, and finite, so that blending
#: never turns it into NaN
NO_CLASS_SCORE = -10.0


class ClusterScorer(nn.Module):
    """``[B, C, H, W]`` normalised images -> ``[B, G, H, W]`` cosine of each pixel's features to each centroid, or
    to the nearest centroid of each class.

    The cosines are computed at patch resolution (:func:`normed_patch_tokens` against the unit centroids) and
    upsampled bilinearly to pixels, so the argmax is the nearest centroid with smooth borders between clusters
    (windows whose side is not a multiple of the patch are zero-padded, centred, and cropped back).

    Args:
        backbone: a ViT with ``patch_size`` and ``get_intermediate_layers``.
        centroids: ``[k, L·D]`` unit vectors (:attr:`Clusters.centroids`).
        layers: the layers the centroids were fit on.
        groups: the class id of each centroid (several centroids may share one; a class scores its best centroid);
            ``None``: each centroid is its own class (``G = k``).
        num_classes: ``G`` with ``groups`` (default ``max(groups) + 1``); a class without a centroid scores
            :data:`NO_CLASS_SCORE`.
        floor: adds class ``G`` ("unknown") with this constant score, so that a pixel whose best cosine is below it
            goes there.
    """

    def __init__(
        self,
        backbone: nn.Module,
        centroids: Tensor,
        *,
        layers: int | Sequence[int] = 1,
        groups: Sequence[int] | None = None,
        num_classes: int | None = None,
        floor: float | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.register_buffer("centroids", F.normalize(centroids.detach().float(), dim=1), persistent=False)
        self.layers = layers if isinstance(layers, int) else [int(i) for i in layers]
        self.patch_size = int(backbone.patch_size)
        if groups is not None and len(groups) != centroids.shape[0]:
            raise ValueError(f"groups has {len(groups)} class ids for {centroids.shape[0]} centroids.")
        self.groups = None if groups is None else torch.as_tensor(list(groups), dtype=torch.int64)
        self.num_classes = int(centroids.shape[0]) if groups is None else int(num_classes or max(groups) + 1)
        self.floor = floor

    @property
    def out_channels(self) -> int:
        return self.num_classes + (self.floor is not None)

    def patch_scores(self, tokens: Tensor) -> Tensor:
        """``[B, F, h, w]`` unit tokens -> ``[B, G (+1), h, w]`` class scores at patch resolution."""
        cosine = torch.einsum("bfyx,kf->bkyx", tokens, self.centroids)  # [B, k, h, w]
        if self.groups is not None:
            index = self.groups.to(cosine.device)[None, :, None, None].expand_as(cosine)
            best = cosine.new_full((cosine.shape[0], self.num_classes, *cosine.shape[2:]), NO_CLASS_SCORE)
            cosine = best.scatter_reduce(1, index, cosine, reduce="amax", include_self=True)  # [B, G, h, w]
        if self.floor is not None:
            cosine = torch.cat([cosine, cosine.new_full((cosine.shape[0], 1, *cosine.shape[2:]), self.floor)], dim=1)
        return cosine

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        padded, (left, _, top, _) = centre_pad(x, self.patch_size)
        tokens = normed_patch_tokens(self.backbone, padded, self.layers)  # [B, F, h, w]
        if tokens.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"The centroids have {self.centroids.shape[1]} dimensions but the backbone's features "
                             f"over layers {self.layers} have {tokens.shape[1]}.")  # fmt: skip
        cosine = self.patch_scores(tokens)  # [B, G, h, w]
        cosine = F.interpolate(cosine, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return cosine[..., top : top + height, left : left + width]


def backbone_fingerprint(backbone: nn.Module) -> str:
    """A short hash of the backbone's patch embedding and final norm weights: equal for the same weights, and
    different for another model of the same shape (whose features the centroids would not describe)."""
    digest = hashlib.sha256()
    state = backbone.state_dict()
    for name in sorted(k for k in state if k.startswith(("patch_embed.", "norm.")) or k == "cls_token"):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------------------------- the fit
@dataclass
class Clusters:
    """Spherical k-means centroids of a backbone's patch features, and how they were made.

    Attributes:
        centroids: ``[k, L·D]`` unit vectors, numbered by their share of the samples, largest first.
        layers: the backbone layers (:func:`normed_patch_tokens`).
        normalization: :meth:`Normalization.to_dict` of the input normalisation the features were computed with.
        bands: 1-based input bands fed to the backbone (``None``: all).
        fingerprint: :func:`backbone_fingerprint` of the backbone.
        backbone: the backbone's name (for messages).
        shares: each cluster's share of the samples.
        cohesion: mean cosine of a sample to its centroid.
        silhouette: cosine silhouette of the samples' partition (``None`` for k = 1).
        candidates: for each ``k`` tried, ``{"silhouette", "cohesion"}``.
        samples: number of feature vectors the fit used.
        sources: the rasters sampled.
        names: class names of prototypes fit from labels (:mod:`~dinov3_eo.tasks.prototypes`): the map's class ``i``
            is ``names[i]``; ``None`` for k-means clusters (``cluster i``).
        groups: the class id of each centroid when they are class prototypes (several may share a class).
        min_similarity: a pixel whose best cosine is below it is mapped to an extra class ``unknown``.
        kind: ``"kmeans"`` or ``"prototypes"``.
        colors: ``[r, g, b]`` (or ``None``) per class of ``names``, from the labels' legend (a ``color`` column, a label
            raster's colour table); the map's colour table uses them, the default palette the rest.
    """

    centroids: Tensor
    layers: int | list[int]
    normalization: dict[str, Any] | None
    bands: list[int] | None
    fingerprint: str
    backbone: str = "custom"
    shares: list[float] = field(default_factory=list)
    cohesion: float = float("nan")
    silhouette: float | None = None
    candidates: dict[int, dict[str, float | None]] = field(default_factory=dict)
    samples: int = 0
    sources: list[str] = field(default_factory=list)
    names: list[str] | None = None
    groups: list[int] | None = None
    min_similarity: float | None = None
    kind: str = "kmeans"
    colors: list[list[int] | None] | None = None

    @property
    def k(self) -> int:
        """Number of centroids."""
        return int(self.centroids.shape[0])

    @property
    def class_names(self) -> list[str]:
        """Names of the map's classes, in id order (``unknown`` last when :attr:`min_similarity` is set)."""
        names = list(self.names) if self.names is not None else [f"cluster {i}" for i in range(self.k)]
        return names + (["unknown"] if self.min_similarity is not None else [])

    def scorer(self, backbone: nn.Module) -> ClusterScorer:
        """The :class:`ClusterScorer` that maps ``backbone``'s features into these classes."""
        return ClusterScorer(backbone, self.centroids, layers=self.layers, groups=self.groups,
                             num_classes=len(self.names) if self.names is not None else None,
                             floor=self.min_similarity)  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        """Everything but the centroids, JSON-ready."""
        return {
            "format": FORMAT, "k": self.k, "layers": self.layers, "normalization": self.normalization,
            "bands": self.bands, "fingerprint": self.fingerprint, "backbone": self.backbone, "shares": self.shares,
            "cohesion": self.cohesion, "silhouette": self.silhouette,
            "candidates": {str(k): v for k, v in self.candidates.items()}, "samples": self.samples,
            "sources": self.sources, "names": self.names, "groups": self.groups, "min_similarity": self.min_similarity,
            "kind": self.kind, "colors": self.colors,
        }  # fmt: skip

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the centroids and :meth:`metadata` to a ``.safetensors`` file (atomically)."""
        from safetensors.torch import save_file

        from dinov3_eo.inference.writers import atomic_output

        with atomic_output(path, overwrite=overwrite) as tmp:
            save_file({"centroids": self.centroids.detach().float().contiguous().cpu()}, str(tmp),
                      metadata={"dinov3_eo": json.dumps(self.metadata())})  # fmt: skip
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Clusters:
        """Read centroids written by :meth:`save`.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            ValueError: if it is not a centroids file of this project.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Centroids file {str(path)!r} does not exist (write one with 'dinov3-eo cluster').")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("dinov3_eo", "{}"))
                centroids = f.get_tensor("centroids") if "centroids" in f.keys() else None
        except Exception as e:  # safetensors raises its own error types for a file of another format
            raise ValueError(f"Cannot read {str(path)!r} as a centroids file: {e}") from e
        if centroids is None or meta.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a centroids file written by 'dinov3-eo cluster' (no 'centroids' "
                             f"tensor with {FORMAT!r} metadata).")  # fmt: skip
        return cls(
            centroids=centroids, layers=meta["layers"], normalization=meta.get("normalization"), bands=meta.get("bands"),
            fingerprint=meta["fingerprint"], backbone=meta.get("backbone", "custom"), shares=list(meta.get("shares", [])),
            cohesion=float(meta.get("cohesion", float("nan"))), silhouette=meta.get("silhouette"),
            candidates={int(k): v for k, v in meta.get("candidates", {}).items()}, samples=int(meta.get("samples", 0)),
            sources=list(meta.get("sources", [])), names=meta.get("names"), groups=meta.get("groups"),
            min_similarity=meta.get("min_similarity"), kind=meta.get("kind", "kmeans"), colors=meta.get("colors"),
        )  # fmt: skip

    def check_backbone(self, backbone: nn.Module) -> None:
        """Refuse a backbone other than the one the centroids were fit on.

        Raises:
            ValueError: if its :func:`backbone_fingerprint` differs.
        """
        mine = backbone_fingerprint(backbone)
        if mine != self.fingerprint:
            raise ValueError(f"The centroids were fit on the features of another backbone ({self.backbone}, weights "
                             f"{self.fingerprint}) than the one given (weights {mine}): its features live elsewhere, "
                             "so fit new centroids for it.")  # fmt: skip


def _backbone_in_chans(backbone: nn.Module) -> int | None:
    proj = getattr(getattr(backbone, "patch_embed", None), "proj", None)
    return int(proj.weight.shape[1]) if proj is not None else None


def _device_and_amp(backbone: nn.Module, device: str | torch.device | None, amp: bool | None) -> tuple[torch.device, bool]:
    """Where the backbone runs (``device``, else where its weights are) and whether under bf16 autocast (``amp``,
    else on CUDA only), as :func:`~dinov3_eo.inference.predict.predict_raster` decides."""
    run_device = torch.device(device) if device is not None else next(backbone.parameters()).device
    return run_device, run_device.type == "cuda" if amp is None else bool(amp)


def sample_features(
    backbone: nn.Module,
    rasters: Sequence[str | os.PathLike[str]],
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    layers: int | Sequence[int] = 1,
    window: int = 512,
    max_windows: int = MAX_WINDOWS,
    max_samples: int = MAX_SAMPLES,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    progress: bool = True,
) -> Tensor:
    """Feature vectors of patches whose every pixel is valid, from at most ``max_windows`` windows drawn at random
    among all the rasters' non-overlapping windows (each raster's own grid), at most ``max_samples`` in all.

    Returns:
        ``[N, L·D]`` float32 unit vectors (:func:`normed_patch_tokens`).

    Raises:
        ValueError: a raster without georeference, with another band count than the backbone takes, or no valid
            patch anywhere.
    """
    from tqdm.auto import tqdm

    from dinov3_eo.data.datasets import fused_affine, model_input
    from dinov3_eo.data.raster import _data_band_count, read_window, require_georeferenced

    patch = int(backbone.patch_size)
    side = max(patch, window // patch * patch)
    in_chans = _backbone_in_chans(backbone)
    run_device, use_amp = _device_and_amp(backbone, device, amp)
    candidates: list[tuple[int, Window]] = []
    for i, raster in enumerate(rasters):
        with rasterio.open(raster) as src:
            require_georeferenced(src)
            count = len(bands) if bands is not None else _data_band_count(src)  # a trailing alpha band is no data
            if in_chans is not None and count != in_chans:
                raise ValueError(f"{raster} gives {count} bands but the backbone takes {in_chans}; select bands with --bands.")
            if normalization is not None and normalization.num_bands != count:
                raise ValueError(f"The normalisation {normalization.name!r} has {normalization.num_bands} bands, "
                                 f"{raster} gives {count}.")  # fmt: skip
            candidates += [(i, w) for w in block_windows(src.height, src.width, side)]
    affine = fused_affine(normalization, None, None, count)  # the windows are normalised as the map's are
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.permutation(len(candidates))[:max_windows].tolist())  # raster by raster, row by row
    quota = max(1, -(-max_samples // len(chosen)))
    picked: list[Tensor] = []
    was_training = backbone.training
    backbone.eval()
    sources = [rasterio.open(r) for r in rasters]
    bar = tqdm(total=len(chosen), unit="win", desc="cluster samples", disable=not progress)
    try:
        for start in range(0, len(chosen), batch_size):
            images, masks = [], []
            for j in chosen[start : start + batch_size]:
                raster_id, win = candidates[j]
                values, valid = read_window(sources[raster_id], win, bands=bands, nodata=nodata)
                image, _ = centre_pad(torch.from_numpy(model_input(values, valid, affine))[None], patch)  # [1, C, h, w]
                valid_t, _ = centre_pad(torch.from_numpy(valid)[None, None].float(), patch)  # padding counts as invalid
                images.append(image)
                masks.append(valid_t)
            # equal shapes batch together; a raster's edge windows run alone
            groups: dict[tuple[int, ...], list[int]] = {}
            for n, image in enumerate(images):
                groups.setdefault(tuple(image.shape), []).append(n)
            for members in groups.values():
                x = torch.cat([images[n] for n in members]).to(run_device)
                with torch.inference_mode(), torch.autocast(run_device.type, dtype=torch.bfloat16, enabled=use_amp):
                    tokens = normed_patch_tokens(backbone, x, layers).float().cpu()  # [b, F, h, w]
                full = F.avg_pool2d(torch.cat([masks[n] for n in members]), patch) >= 1.0  # [b, 1, h, w]: all valid
                for feats, ok in zip(tokens, full):
                    rows = feats.flatten(1).T[ok.flatten()]  # [n_valid, F]
                    if len(rows) > quota:
                        rows = rows[torch.from_numpy(rng.choice(len(rows), quota, replace=False))]
                    picked.append(rows)
            bar.update(len(images))
    finally:
        bar.close()
        for src in sources:
            src.close()
        backbone.train(was_training)
    samples = torch.cat(picked) if picked else torch.empty(0)
    if samples.shape[0] == 0:
        raise ValueError(f"No patch of {patch} x {patch} valid pixels in the {len(chosen)} windows read from "
                         f"{', '.join(map(str, rasters))}: check the nodata value and the bands.")  # fmt: skip
    if samples.shape[0] > max_samples:
        samples = samples[torch.from_numpy(rng.choice(samples.shape[0], max_samples, replace=False))]
    return samples


def fit_clusters(
    backbone: nn.Module,
    rasters: Sequence[str | os.PathLike[str]],
    k: int | Sequence[int] = 8,
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    layers: int | Sequence[int] = 1,
    window: int = 512,
    max_windows: int = MAX_WINDOWS,
    max_samples: int = MAX_SAMPLES,
    n_init: int = 4,
    seed: int = 0,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    progress: bool = True,
) -> Clusters:
    """Fit spherical k-means centroids to the patch features of ``rasters`` (:func:`sample_features`).

    Args:
        backbone: the ViT whose features are clustered (e.g. :func:`~dinov3_eo.tasks.features.resolve_backbone`).
        rasters: GeoTIFFs with the same bands; every one is sampled, so the clusters are shared by all of them.
        k: the number of clusters, or several to compare: each is fit and the one with the highest cosine
            silhouette (:func:`~dinov3_eo.tasks.kmeans.cosine_silhouette`, on at most 20,000 samples) is kept;
            every candidate's silhouette and cohesion are in :attr:`Clusters.candidates`.
        normalization: the backbone's input normalisation (stored with the centroids).
        layers: the blocks whose features are clustered (:func:`normed_patch_tokens`; default the last).
        n_init: k-means++ restarts per ``k``; seed: makes sampling and seeding repeatable.
        window, max_windows, max_samples, batch_size, device, amp: :func:`sample_features`'.

    Raises:
        ValueError: as :func:`sample_features`; a ``k`` below 1 or above the samples found.
    """
    ks = [int(k)] if isinstance(k, int) else sorted({int(v) for v in k})
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    samples = sample_features(
        backbone, rasters, normalization=normalization, bands=bands, nodata=nodata, layers=layers, window=window,
        max_windows=max_windows, max_samples=max_samples, batch_size=batch_size, seed=seed, device=device, amp=amp,
        progress=progress,
    )  # fmt: skip
    if max(ks) > samples.shape[0]:
        raise ValueError(f"Only {samples.shape[0]} valid patches were found for k={max(ks)} clusters: use a smaller k "
                         "or a larger raster.")  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    subset = torch.randperm(samples.shape[0], generator=generator)[:SILHOUETTE_SAMPLES]
    fits, candidates = {}, {}
    for value in ks:
        fit = spherical_kmeans(samples, value, n_init=n_init, generator=generator)
        occupied = int((torch.bincount(fit.labels, minlength=value) > 0).sum())
        if occupied < value:
            log.warning("k-means found only %d distinct cluster(s) for k=%d: the %d sampled features are (nearly) all "
                        "alike; check the input normalisation (--normalization) and the nodata value.", occupied, value,
                        samples.shape[0])  # fmt: skip
        sub_occupied = int((torch.bincount(fit.labels[subset], minlength=value) > 0).sum())
        silhouette = cosine_silhouette(samples[subset], fit.labels[subset], value) if sub_occupied > 1 else None
        fits[value] = fit
        candidates[value] = {"silhouette": silhouette, "cohesion": fit.cohesion}
        log.info("k=%d: silhouette %s, cohesion %.4f", value, "-" if silhouette is None else f"{silhouette:.4f}", fit.cohesion)
    best = max(ks, key=lambda v: -math.inf if candidates[v]["silhouette"] is None else candidates[v]["silhouette"])
    fit = fits[best]
    counts = torch.bincount(fit.labels, minlength=best).double()
    meta = getattr(backbone, "meta", None)
    return Clusters(
        centroids=fit.centroids, layers=layers if isinstance(layers, int) else [int(i) for i in layers],
        normalization=normalization.to_dict() if normalization is not None else None,
        bands=list(bands) if bands is not None else None, fingerprint=backbone_fingerprint(backbone),
        backbone=getattr(meta, "name", "custom"), shares=(counts / counts.sum()).tolist(), cohesion=fit.cohesion,
        silhouette=candidates[best]["silhouette"], candidates=candidates, samples=int(samples.shape[0]),
        sources=[os.fspath(r) for r in rasters],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the maps
@dataclass(frozen=True)
class ClusterMap:
    """What :func:`cluster_raster` wrote for one scene, and each cluster's pixels and hectares there."""

    classes: Path
    quicklook: Path | None
    polygons: Path | None
    pixels: tuple[int, ...]
    hectares: tuple[float, ...] | None

    @property
    def shares(self) -> tuple[float, ...]:
        total = sum(self.pixels)
        return tuple(p / total if total else 0.0 for p in self.pixels)

    def to_xarray(self) -> Any:
        """The class map as an ``xarray.DataArray`` (``y × x``, uint8, CRS and transform set through rioxarray, read
        into memory) whose ``class_names`` attribute names its ids; 255 is nodata."""
        import rioxarray

        with rasterio.open(self.classes) as src:
            names = json.loads(src.tags().get("class_names", "[]"))
        array = rioxarray.open_rasterio(self.classes).squeeze("band", drop=True).load()
        array.attrs["class_names"] = names
        return array.rename("clusters" if self.classes.stem.endswith("_clusters") else "classes")

    def to_geodataframe(self) -> Any:
        """The polygons as a ``geopandas.GeoDataFrame`` (``class_id``, ``class_name``, ``area``).

        Raises:
            ValueError: if no polygons were written (``polygons=True``).
        """
        import geopandas as gpd

        if self.polygons is None:
            raise ValueError("No polygons were written for this map: run it with polygons=True (--polygons).")
        return gpd.read_file(self.polygons)


def cluster_outputs(src: str | os.PathLike[str], out_dir: str | os.PathLike[str], suffix: str = "clusters") -> tuple[Path, Path, Path]:
    """``OUT/<stem>_<suffix>.tif``, ``.png`` and ``.gpkg`` of one scene (suffix ``clusters``, or ``classes`` for
    prototypes)."""
    stem, out = Path(src).stem, Path(out_dir)
    return out / f"{stem}_{suffix}.tif", out / f"{stem}_{suffix}.png", out / f"{stem}_{suffix}.gpkg"


def _class_counts(path: Path, k: int) -> np.ndarray:
    counts = np.zeros(k, dtype=np.int64)
    with rasterio.open(path) as src:
        for _, win in src.block_windows(1):
            block = src.read(1, window=win)
            counts += np.bincount(block[block != src.nodata].ravel(), minlength=k)[:k]
    return counts


def cluster_raster(
    backbone: nn.Module,
    clusters: Clusters,
    raster: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    polygons: bool = False,
    min_area: float = 0.0,
    simplify: float = 0.0,
    quicklook: bool = True,
    preview_bands: Sequence[int] | None = None,
    window: int = 512,
    overlap: float | int = 0.25,
    batch_size: int = 4,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    tta: TTA | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ClusterMap:
    """Map every pixel of ``raster`` to its nearest centroid: ``OUT/<stem>_clusters.tif`` (uint8, colour table,
    names ``cluster i``, nodata 255), a picture over the imagery (``_clusters.png``) and optional polygons
    (``_clusters.gpkg``; ``min_area``, ``simplify`` as for :func:`~dinov3_eo.inference.writers.vectorize_classes`).
    Class prototypes (:attr:`Clusters.names`) map to their classes instead, into ``<stem>_classes.*``.

    The scene is normalised with the centroids' normalisation and read in ``bands`` (default: the centroids'
    bands, else all); ``window``, ``overlap``, ``batch_size``, ``device``, ``amp``, ``tta`` are
    :func:`~dinov3_eo.inference.predict.predict_raster`'s. Every output is checked before any work.

    Raises:
        FileExistsError: if an output exists and ``overwrite`` is false.
        ValueError: centroids of another backbone (:meth:`Clusters.check_backbone`), a raster without georeference
            or with another band count.
    """
    from dinov3_eo.data.raster import _data_band_count, pixel_area_ha, pixel_size_off_scale, require_georeferenced
    from dinov3_eo.inference.predict import predict_raster
    from dinov3_eo.inference.writers import check_overwrite, default_colormap, vectorize_classes, write_quicklook
    from dinov3_eo.models.hub import preview_bands as backbone_preview_bands

    classes_path, png, gpkg = cluster_outputs(raster, out_dir, "clusters" if clusters.names is None else "classes")
    for path in (classes_path, png if quicklook else None, gpkg if polygons else None):
        if path is not None:
            check_overwrite(path, overwrite, inputs=[raster])
    clusters.check_backbone(backbone)
    bands = list(bands) if bands is not None else clusters.bands
    normalization = Normalization.from_dict(clusters.normalization) if clusters.normalization else None
    with rasterio.open(raster) as src:
        require_georeferenced(src)
        if bands is None:  # every data band: a trailing alpha band is the mask, not an input
            bands = list(range(1, _data_band_count(src) + 1))
        count = len(bands)
        in_chans = _backbone_in_chans(backbone)
        if in_chans is not None and count != in_chans:
            raise ValueError(f"{raster} gives {count} bands but the backbone takes {in_chans}; select bands with --bands.")
        meta = getattr(backbone, "meta", None)
        trained_gsd = getattr(meta, "gsd", None)
        metres = pixel_size_off_scale(src, trained_gsd)
        if metres:
            log.warning("%s has %.3g m pixels but the backbone learnt at %.3g m: its features see other things at "
                        "another scale.", raster, metres, trained_gsd)  # fmt: skip
        hectares_per_pixel = pixel_area_ha(src.crs, src.transform)
        rgb = list(preview_bands) if preview_bands is not None else backbone_preview_bands(backbone, bands)
        scorer = clusters.scorer(backbone)
        names = clusters.class_names
        colours = default_colormap(len(names))
        for i, rgb in enumerate(clusters.colors or []):
            if rgb is not None:
                colours[i] = (*rgb[:3], 255)
        if clusters.min_similarity is not None:
            colours[len(names) - 1] = (128, 128, 128, 255)  # unknown: grey
        predict_raster(
            scorer, src, classes_path, out_channels=scorer.out_channels, output="argmax", activation="none",
            class_names=names, colormap=colours, window=window, overlap=overlap,
            batch_size=batch_size, bands=bands, nodata=nodata, normalization=normalization, device=device, amp=amp,
            tta=tta, multiple=scorer.patch_size, progress=progress, overwrite=overwrite,
            tags={"quantity": "k-means cluster of DINOv3 patch features (nearest centroid by cosine)"
                  if clusters.names is None else "class of the nearest prototype of DINOv3 features (cosine)",
                  "k": clusters.k, "layers": json.dumps(clusters.layers), "backbone": clusters.backbone,
                  "centroids_fingerprint": clusters.fingerprint},
        )  # fmt: skip
    pixels = _class_counts(classes_path, len(names))
    if quicklook:
        title = f"{clusters.k} clusters" if clusters.names is None else f"{clusters.k} prototypes"
        write_quicklook(png, classes=classes_path, image=raster, bands=rgb, class_names=names,
                        title=f"{Path(raster).name}: {title}", nodata=nodata, overwrite=overwrite)  # fmt: skip
    if polygons:
        vectorize_classes(classes_path, gpkg, class_names=names, min_area=min_area, simplify=simplify,
                          layer="clusters" if clusters.names is None else "classes", overwrite=overwrite)  # fmt: skip
    return ClusterMap(
        classes=classes_path, quicklook=png if quicklook else None, polygons=gpkg if polygons else None,
        pixels=tuple(int(p) for p in pixels),
        hectares=tuple(float(p) * hectares_per_pixel for p in pixels) if hectares_per_pixel is not None else None,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- command
def add_map_options(parser: argparse.ArgumentParser, *, polygons_help: str) -> None:
    """The options of the commands that map scenes through a bare backbone's features (``cluster``, ``segment
    prototypes``, ``similar``): ``--model``, the input bands, nodata and scaling, ``--layers``, polygons
    (``--polygons``, ``--min-area``, ``--simplify``), the windows (``add_window_options``), ``--no-quicklook``,
    ``--overwrite`` and ``--quiet``."""
    from dinov3_eo.inference.predict import add_window_options
    from dinov3_eo.inference.writers import SIMPLIFY_HELP
    from dinov3_eo.tasks.features import BACKBONE_HELP, add_backbone_input_options

    parser.add_argument("--model", required=True, help=BACKBONE_HELP)
    add_backbone_input_options(parser)
    parser.add_argument("--layers", type=int, nargs="+", default=None,
                        help="0-based blocks whose features are used, cosine averaged (default: the last block)")
    parser.add_argument("--polygons", action="store_true", help=polygons_help)
    parser.add_argument("--min-area", type=float, default=0.0, help="drop polygons smaller than this (CRS units²)")
    parser.add_argument("--simplify", type=float, default=0.0, help=SIMPLIFY_HELP)
    add_window_options(parser)
    parser.add_argument("--no-quicklook", action="store_true", help="do not write the PNG pictures")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def plan_scene_outputs(args: argparse.Namespace, *, suffix: str, shared: Sequence[str],
                       sources: Sequence[str | os.PathLike[str]] = ()) -> tuple[list[Path], Path]:  # fmt: skip
    """The scenes of ``args.inputs`` (files, folders, globs) and the output folder ``args.output`` (created), after
    checking, before any work, that no output exists without ``--overwrite``: each scene's ``<stem>_<suffix>`` map,
    picture and polygons as asked, and the ``shared`` files of the folder. ``sources``: other inputs (labels).

    Raises:
        FileNotFoundError, FileExistsError, ValueError: a missing input, an existing output, scenes with one stem.
    """
    from dinov3_eo.data.index import expand_sources
    from dinov3_eo.inference.writers import check_distinct_stems, check_overwrite

    scenes = [Path(s) for s in expand_sources(args.inputs)]
    check_distinct_stems(scenes)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    planned = [out_dir / name for name in shared]
    for scene in scenes:
        classes, png, gpkg = cluster_outputs(scene, out_dir, suffix)
        planned += [classes] + ([] if args.no_quicklook else [png]) + ([gpkg] if args.polygons else [])
    for path in planned:
        check_overwrite(path, args.overwrite, inputs=[*scenes, *sources])
    return scenes, out_dir


def map_scenes(backbone: nn.Module, clusters: Clusters, scenes: Sequence[Path], out_dir: Path, args: argparse.Namespace,
               settings: dict[str, Any], *, hide_empty: bool = False) -> dict[str, ClusterMap]:  # fmt: skip
    """:func:`cluster_raster` of each scene with the command's options (``settings``: ``window_settings(args)``),
    printing what it wrote and each class's share (``hide_empty``: only classes present); by scene path."""
    results = {}
    for i, scene in enumerate(scenes, 1):
        if not args.quiet:
            print(f"[{i}/{len(scenes)}] {scene}", file=sys.stderr)
        result = cluster_raster(
            backbone, clusters, scene, out_dir, bands=args.bands, nodata=args.nodata, polygons=args.polygons,
            min_area=args.min_area, simplify=args.simplify, quicklook=not args.no_quicklook, **settings,
            overwrite=args.overwrite, progress=not args.quiet,
        )  # fmt: skip
        for path in (result.classes, result.quicklook, result.polygons):
            if path is not None:
                print(path)
        shares = zip(clusters.class_names, result.shares)
        print("  " + ", ".join(f"{name} {share:.1%}" for name, share in shares if share > 0 or not hide_empty))
        results[os.fspath(scene)] = result
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dinov3-eo cluster",
        description="Unsupervised map of GeoTIFFs: k-means clusters of a backbone's patch features (no labels, no "
        "text). Writes OUT/<stem>_clusters.tif (class COG), _clusters.png (over the imagery), optional "
        "_clusters.gpkg, and the centroids OUT/centroids.safetensors with a summary OUT/clusters.json; "
        "--centroids maps more scenes into the same clusters.",
    )
    p.add_argument("inputs", nargs="+", help="GeoTIFFs, folders or glob patterns (quote globs); all are sampled for "
                   "the fit, so the clusters are shared")  # fmt: skip
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("-k", "--clusters", type=int, nargs="+", default=None,
                   help="number of clusters (default 8); several (e.g. -k 4 6 8 12) are compared by their cosine "
                   "silhouette and the best is kept")  # fmt: skip
    p.add_argument("--centroids", default=None, help="map into these saved centroids instead of fitting new ones")
    p.add_argument("--samples", type=int, default=MAX_SAMPLES, help=f"feature vectors fit on (default {MAX_SAMPLES:,})")
    p.add_argument("--sample-windows", type=int, default=MAX_WINDOWS,
                   help=f"windows read for the fit, drawn over all inputs (default {MAX_WINDOWS})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling and k-means++ (default 0)")
    add_map_options(p, polygons_help="also vectorise the clusters into <stem>_clusters.gpkg")
    return p


def cluster_main(argv: Sequence[str]) -> int:
    """``dinov3-eo cluster SCENE.tif [MORE.tif ...] --model BACKBONE -o OUT_DIR [-k 8]``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.inference.predict import window_settings
    from dinov3_eo.inference.writers import atomic_output
    from dinov3_eo.tasks.features import input_normalization, resolve_backbone

    args = _parser().parse_args(list(argv))
    prog = "dinov3-eo cluster"
    try:
        shared = ["clusters.json"] + ([] if args.centroids else ["centroids.safetensors"])
        scenes, out_dir = plan_scene_outputs(args, suffix="clusters", shared=shared)
        centroids_path, summary_path = out_dir / "centroids.safetensors", out_dir / "clusters.json"
        backbone = resolve_backbone(args.model)
        settings = window_settings(args)
        backbone.to(settings["device"])
        if args.centroids:
            given = [name for name, value in (("-k", args.clusters), ("--layers", args.layers),
                                              ("--normalization", args.normalization)) if value is not None]  # fmt: skip
            if given:
                raise ValueError(f"--centroids maps into saved clusters, which carry their own k, layers and "
                                 f"normalisation: leave out {', '.join(given)}.")  # fmt: skip
            clusters = Clusters.load(args.centroids)
            clusters.check_backbone(backbone)
        else:
            clusters = fit_clusters(
                backbone, scenes, args.clusters or [8],
                normalization=input_normalization(getattr(backbone, "meta", None), args.normalization), bands=args.bands,
                nodata=args.nodata, layers=args.layers if args.layers else 1, window=args.window,
                max_windows=args.sample_windows, max_samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                device=settings["device"], amp=settings["amp"], progress=not args.quiet,
            )  # fmt: skip
            clusters.save(centroids_path, overwrite=args.overwrite)
            if len(clusters.candidates) > 1:
                print("k   silhouette  cohesion")
                for value, score in sorted(clusters.candidates.items()):
                    mark = "  <- kept" if value == clusters.k else ""
                    print(f"{value:<3d} {score['silhouette'] or float('nan'):10.4f}  {score['cohesion']:8.4f}{mark}")
            print(f"centroids: {centroids_path} (k={clusters.k}, {clusters.samples:,} patches, silhouette "
                  f"{clusters.silhouette if clusters.silhouette is not None else float('nan'):.3f})")  # fmt: skip
        maps = {
            scene: {"pixels": list(r.pixels), "hectares": list(r.hectares) if r.hectares else None,
                    "shares": [round(s, 6) for s in r.shares]}
            for scene, r in map_scenes(backbone, clusters, scenes, out_dir, args, settings).items()
        }  # fmt: skip
        with atomic_output(summary_path, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps({**clusters.metadata(), "centroids_file": os.fspath(args.centroids or centroids_path),
                                       "scenes": maps}, indent=2))  # fmt: skip
        print(summary_path)
    except (FileExistsError, FileNotFoundError, ValueError, IndexError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


__all__ = [
    "ClusterMap",
    "ClusterScorer",
    "Clusters",
    "backbone_fingerprint",
    "cluster_main",
    "cluster_outputs",
    "cluster_raster",
    "add_map_options",
    "fit_clusters",
    "map_scenes",
    "normed_patch_tokens",
    "plan_scene_outputs",
    "sample_features",
]
