"""Segmentation without training: class prototypes of DINOv3 features from a few labelled polygons or a label raster.

A user who has drawn a handful of polygons ("water", "crop", "forest") wants a map now, not after a training run.
:func:`fit_prototypes` reads only the windows that hold labels, takes the backbone's features at every labelled pixel
(the patch tokens bilinearly interpolated to the pixel, exactly as the map upsamples them) and averages them per class
into a prototype: the unit vector that maximises the mean cosine to the class's pixels (the spherical mean). Classes
that look different in different places (a crop at two growth stages) can get several prototypes each, fit by
spherical k-means within the class. :func:`~dinov3_eo.tasks.clustering.cluster_raster` then gives every pixel the
class of its most similar prototype, optionally "unknown" when even that one is less similar than
``min_similarity`` (the open-set case: a class nobody labelled). The prototypes are saved like k-means centroids
(:class:`~dinov3_eo.tasks.clustering.Clusters`: safetensors, the backbone's fingerprint, layers, normalisation,
class names), so more scenes can be mapped with them later. ``dinov3-eo segment prototypes`` is the command.

This is the nearest-class-mean classifier on frozen features; unlike a trained linear head it needs no epochs and no
validation split, and it is the natural baseline a trained head must beat.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3_eo.data.labels import VECTOR_SUFFIXES
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import block_windows
from dinov3_eo.inference.tiling import centre_pad
from dinov3_eo.tasks.clustering import (
    Clusters,
    _backbone_in_chans,
    _device_and_amp,
    backbone_fingerprint,
    normed_patch_tokens,
)
from dinov3_eo.tasks.kmeans import spherical_kmeans

log = logging.getLogger(__name__)

#: labelled pixels kept per class for the per-class k-means (the mean itself uses every labelled pixel)
MAX_PIXELS_PER_CLASS = 20_000
IGNORE = -1
#: labelled pixels interpolated at once (memory ~ PIXEL_CHUNK x feature width floats)
PIXEL_CHUNK = 65_536


def pixel_tokens(tokens: Tensor, rows: Tensor, cols: Tensor, *, top: int = 0, left: int = 0, patch_size: int = 16) -> Tensor:
    """Patch tokens bilinearly interpolated at pixels, as ``F.interpolate(tokens, scale_factor=patch_size,
    mode="bilinear", align_corners=False)`` would give there, without upsampling the whole window.

    Args:
        tokens: ``[F, h, w]`` patch tokens of a (centre-padded) window.
        rows, cols: ``[N]`` pixel indexes in the unpadded window; ``top``/``left``: its padding.

    Returns:
        ``[N, F]``.
    """
    height, width = tokens.shape[-2] * patch_size, tokens.shape[-1] * patch_size
    # pixel centres in grid_sample's [-1, 1] coordinates; "border" clamps as interpolate clamps at the edges
    y = (rows.float() + top + 0.5) / height * 2 - 1
    x = (cols.float() + left + 0.5) / width * 2 - 1
    grid = torch.stack([x, y], dim=-1)[None, None]  # [1, 1, N, 2]
    sampled = F.grid_sample(tokens[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled[0, :, 0].T  # [1, F, 1, N] -> [N, F]


def open_labels(
    labels: Any, *, attribute: str = "name", class_names: Sequence[str] | None = None
) -> tuple[Any, list[str]]:
    """A label source (``sample(crs=, transform=, shape=)``, unlabelled pixels :data:`IGNORE`) and the class names by id.

    ``labels``: a vector file (GeoPackage, shapefile, GeoJSON ...; classes from ``attribute``, names sorted to ids
    0, 1, ... or integer values kept) or a ``GeoDataFrame`` in memory (the same), a label raster (class ids; names from its ``class_names`` tag, else
    ``class_names``, else ``class i``), or an object with ``sample`` (then ``class_names`` is required).

    Raises:
        FileNotFoundError: a missing file; KeyError: a vector file without ``attribute``; ValueError: an object
            without class names.
    """
    from dinov3_eo.data.labels import RasterLabels, VectorLabels

    if hasattr(labels, "geometry") and hasattr(labels, "to_crs"):  # a GeoDataFrame (its .sample is pandas')
        source = VectorLabels(path=labels, attribute=attribute, ignore_index=IGNORE)
        return source, _vector_class_names(source)
    if hasattr(labels, "sample"):
        if class_names is None:
            raise ValueError("Give class_names with a label object.")
        return labels, list(class_names)
    path = Path(labels)
    if not path.exists():
        raise FileNotFoundError(f"Labels {str(path)!r} do not exist.")
    if path.suffix.lower() in VECTOR_SUFFIXES:
        source = VectorLabels(path=path, attribute=attribute, ignore_index=IGNORE)
        return source, _vector_class_names(source)
    source = RasterLabels(path=path, ignore_index=IGNORE)
    tagged = source.class_names  # id -> name from the raster's class_names tag
    if tagged:
        names = [tagged.get(i, f"class {i}") for i in range(max(tagged) + 1)]
    else:
        names = list(class_names) if class_names is not None else None
    return source, names  # None: named by the ids found (see fit_prototypes)


def _vector_class_names(source: Any) -> list[str]:
    """Names by class id of vector labels (their values; ``class i`` for an id no value has)."""
    by_id = {v: k for k, v in source.classes.items()}
    if min(by_id) < 0 or max(by_id) > 254:
        raise ValueError(f"Class ids of {source.path} must lie in 0..254, got {sorted(by_id)}.")
    return [by_id.get(i, f"class {i}") for i in range(max(by_id) + 1)]


def fit_prototypes(
    backbone: nn.Module,
    rasters: Sequence[str | os.PathLike[str]],
    labels: Any,
    *,
    normalization: Normalization | None,
    attribute: str = "name",
    class_names: Sequence[str] | None = None,
    per_class: int = 1,
    min_similarity: float | None = None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    layers: int | Sequence[int] = 1,
    window: int = 512,
    max_pixels: int = MAX_PIXELS_PER_CLASS,
    seed: int = 0,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    progress: bool = True,
) -> Clusters:
    """Class prototypes of ``backbone``'s features at the labelled pixels of ``rasters``.

    Args:
        backbone: the ViT (e.g. :func:`~dinov3_eo.tasks.features.resolve_backbone`).
        rasters: GeoTIFFs with the same bands; only their windows that hold a label are read.
        labels: polygons (a file or a ``GeoDataFrame``) or a label raster in any CRS (:func:`open_labels`;
            ``attribute``, ``class_names``), or a
            list of them, one per raster (e.g. scenes that each come with their own label file); they must name the
            same classes.
        normalization: the backbone's input normalisation (stored with the prototypes).
        per_class: prototypes per class: 1 is the spherical mean of the class's pixel features; more are fit by
            spherical k-means on at most ``max_pixels`` of them (a class with fewer labelled pixels gets fewer).
        min_similarity: stored with the prototypes: pixels less similar than this to every prototype are mapped
            to ``unknown``.
        bands, nodata, layers, window, seed, device, amp, progress: as for
            :func:`~dinov3_eo.tasks.clustering.fit_clusters`.

    Returns:
        :class:`~dinov3_eo.tasks.clustering.Clusters` with ``names`` (by class id), ``groups`` (the class of each
        prototype), ``shares`` (each prototype's share of the labelled pixels) and ``cohesion`` (the mean cosine of
        a labelled pixel's features to its class's nearest prototype).

    Raises:
        ValueError: no labelled valid pixel in any raster; a band count the backbone does not take; per_class < 1.
    """
    from tqdm.auto import tqdm

    from dinov3_eo.data.datasets import fused_affine, model_input
    from dinov3_eo.data.raster import _data_band_count, read_window, require_georeferenced

    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}.")
    rasters = list(rasters)
    if isinstance(labels, (list, tuple)):
        if len(labels) != len(rasters):
            raise ValueError(f"Give one label source per raster: {len(labels)} for {len(rasters)} rasters.")
        opened = [open_labels(item, attribute=attribute, class_names=class_names) for item in labels]
        if any(n != opened[0][1] for _, n in opened):
            raise ValueError(f"The label sources name different classes: {[n for _, n in opened]}.")
        sources, names = [s for s, _ in opened], opened[0][1]
    else:
        source, names = open_labels(labels, attribute=attribute, class_names=class_names)
        sources = [source] * len(rasters)
    patch = int(backbone.patch_size)
    side = max(patch, window // patch * patch)
    in_chans = _backbone_in_chans(backbone)
    run_device, use_amp = _device_and_amp(backbone, device, amp)
    generator = torch.Generator().manual_seed(seed)
    # the score of a pixel is a prototype's cosine with its interpolated (unnormalised) tokens, so the sum of those
    # gives the prototype with the best mean score; the sum of their unit vectors gives the mean cosine (cohesion)
    sums: dict[int, Tensor] = {}
    unit_sums: dict[int, Tensor] = {}
    counts: dict[int, int] = {}
    kept: dict[int, tuple[Tensor, Tensor]] = {}  # class -> (random keys, features): the max_pixels smallest keys
    was_training = backbone.training
    backbone.eval()
    try:
        for raster, source in zip(rasters, sources):
            with rasterio.open(raster) as src:
                require_georeferenced(src)
                count = len(bands) if bands is not None else _data_band_count(src)  # alpha is no data
                if in_chans is not None and count != in_chans:
                    raise ValueError(f"{raster} gives {count} bands but the backbone takes {in_chans}; select bands "
                                     "with --bands.")  # fmt: skip
                affine = fused_affine(normalization, None, None, count)  # normalised as the map's windows are
                windows = block_windows(src.height, src.width, side)
                for win in tqdm(windows, unit="win", desc=f"prototypes {Path(raster).name}", disable=not progress):
                    shape = (int(win.height), int(win.width))
                    mask = source.sample(crs=src.crs, transform=src.window_transform(win), shape=shape)["mask"]
                    mask = mask.numpy() if hasattr(mask, "numpy") else np.asarray(mask)
                    labelled = mask >= 0
                    if not labelled.any():
                        continue  # most windows of a large scene: no model work for them
                    values, valid = read_window(src, win, bands=bands, nodata=nodata)
                    labelled &= valid
                    if not labelled.any():
                        continue
                    image = torch.from_numpy(model_input(values, valid, affine))
                    padded, (left, _, top, _) = centre_pad(image[None], patch)
                    with torch.inference_mode(), torch.autocast(run_device.type, dtype=torch.bfloat16, enabled=use_amp):
                        tokens = normed_patch_tokens(backbone, padded.to(run_device), layers)[0].float().cpu()
                    all_rows, all_cols = (torch.from_numpy(a) for a in np.nonzero(labelled))
                    all_ids = torch.from_numpy(mask[labelled].astype(np.int64))
                    if int(all_ids.max()) > 254:
                        raise ValueError(f"Label id {int(all_ids.max())} for {raster}: class ids must lie in 0..254 (255 is "
                                         "the map's nodata); if it marks unlabelled pixels, declare it as the label "
                                         "raster's nodata (gdal_edit.py -a_nodata 255).")  # fmt: skip
                    for start in range(0, len(all_ids), PIXEL_CHUNK):  # a window of labels at ViT-L width: GBs at once
                        part = slice(start, start + PIXEL_CHUNK)
                        feats = pixel_tokens(tokens, all_rows[part], all_cols[part], top=top, left=left, patch_size=patch)
                        ids = all_ids[part]
                        for c in ids.unique().tolist():
                            members = feats[ids == c]  # [n, F]
                            sums[c] = sums.get(c, 0) + members.double().sum(dim=0)
                            unit_sums[c] = unit_sums.get(c, 0) + F.normalize(members.double(), dim=1).sum(dim=0)
                            counts[c] = counts.get(c, 0) + len(members)
                            if per_class > 1:
                                keys = torch.rand(len(members), generator=generator)
                                old_keys, old = kept.get(c, (keys[:0], members[:0]))
                                keys, members = torch.cat([old_keys, keys]), torch.cat([old, members])
                                if len(keys) > max_pixels:
                                    keep = torch.topk(keys, max_pixels, largest=False).indices
                                    keys, members = keys[keep], members[keep]
                                kept[c] = (keys, members)
    finally:
        backbone.train(was_training)
    if not counts:
        raise ValueError(f"No labelled pixel with valid data in {', '.join(map(str, rasters))}: check that the labels "
                         "overlap the rasters (any CRS is fine), the attribute and the nodata value.")  # fmt: skip
    present = sorted(counts)
    if names is None:
        names = [f"class {i}" for i in range(max(present) + 1)]
    elif max(present) >= len(names):
        raise ValueError(f"Label id {max(present)} has no name among the {len(names)} class names {names}.")
    missing = [names[i] for i in range(len(names)) if i not in counts and not names[i].startswith("class ")]
    if missing:
        log.warning("Classes %s have no labelled pixel with data in the rasters: they are not mapped.", missing)
    centroids, groups, shares, cohesion_sum = [], [], [], 0.0
    total = sum(counts.values())
    for c in present:
        if per_class == 1 or counts[c] <= per_class:
            mean = F.normalize(sums[c].float()[None], dim=1)
            centroids.append(mean)
            groups.append(c)
            shares.append(counts[c] / total)
            cohesion_sum += float(unit_sums[c].float() @ mean[0])
        else:
            sample = kept[c][1]
            fit = spherical_kmeans(sample, min(per_class, len(sample)), generator=generator)
            sizes = torch.bincount(fit.labels, minlength=fit.centroids.shape[0]).double()
            centroids.append(fit.centroids)
            groups += [c] * fit.centroids.shape[0]
            shares += (sizes / sizes.sum() * counts[c] / total).tolist()
            # the pixel features are unnormalised interpolations: their cosine is taken after normalising
            cohesion_sum += float((F.normalize(sample, dim=1) @ fit.centroids.T).max(dim=1).values.double().mean()) * counts[c]
    label_colors: dict[int, tuple[int, int, int]] = {}  # the labels' own legend (colour column, colour table)
    for source in sources:
        for i, rgb in (getattr(source, "class_colors", None) or {}).items():
            label_colors.setdefault(int(i), rgb)
    colors = [list(label_colors[i]) if i in label_colors else None for i in range(len(names))]
    meta = getattr(backbone, "meta", None)
    log.info("prototypes of %s from %d labelled pixels: %s", [names[c] for c in present], total,
             {names[c]: counts[c] for c in present})  # fmt: skip
    return Clusters(
        centroids=torch.cat(centroids), layers=layers if isinstance(layers, int) else [int(i) for i in layers],
        normalization=normalization.to_dict() if normalization is not None else None,
        bands=list(bands) if bands is not None else None, fingerprint=backbone_fingerprint(backbone),
        backbone=getattr(meta, "name", "custom"), shares=shares, cohesion=cohesion_sum / total, samples=total,
        sources=[os.fspath(r) for r in rasters], names=list(names), groups=groups, min_similarity=min_similarity,
        kind="prototypes", candidates={}, silhouette=None, colors=colors if any(colors) else None,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- command
def _parser() -> argparse.ArgumentParser:
    from dinov3_eo.tasks.clustering import add_map_options

    p = argparse.ArgumentParser(
        prog="dinov3-eo segment prototypes",
        description="Segment GeoTIFFs without training: each class's prototype is the mean of a backbone's features "
        "over its labelled pixels (polygons or a label raster), and every pixel gets the class of its most similar "
        "prototype. Writes OUT/<stem>_classes.tif (class COG), _classes.png, optional _classes.gpkg, and "
        "OUT/prototypes.safetensors with a summary OUT/prototypes.json; --prototypes maps more scenes with them.",
    )
    p.add_argument("inputs", nargs="+", help="GeoTIFFs, folders or glob patterns (quote globs)")
    p.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    p.add_argument("--labels", default=None, help="labelled polygons (GeoPackage, shapefile, GeoJSON ...) or a label "
                   "raster of class ids, in any CRS")  # fmt: skip
    p.add_argument("--attribute", default="name", help="the polygons' class column (default 'name')")
    p.add_argument("--class-names", nargs="+", default=None, help="names of a label raster's ids 0, 1, ... (default: "
                   "its class_names tag)")  # fmt: skip
    p.add_argument("--prototypes", default=None, help="map with these saved prototypes instead of fitting new ones")
    p.add_argument("--per-class", type=int, default=1, help="prototypes per class (k-means within the class; default 1)")
    p.add_argument("--min-similarity", type=float, default=None,
                   help="pixels less similar (cosine) than this to every prototype become 'unknown'")
    p.add_argument("--seed", type=int, default=0)
    add_map_options(p, polygons_help="also vectorise the classes into <stem>_classes.gpkg")
    return p


def prototypes_main(argv: Sequence[str]) -> int:
    """``dinov3-eo segment prototypes SCENE.tif [...] --labels polygons.gpkg --model BACKBONE -o OUT_DIR``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.inference.predict import window_settings
    from dinov3_eo.inference.writers import atomic_output
    from dinov3_eo.tasks.clustering import map_scenes, plan_scene_outputs
    from dinov3_eo.tasks.features import input_normalization, resolve_backbone

    args = _parser().parse_args(list(argv))
    prog = "dinov3-eo segment prototypes"
    try:
        if (args.labels is None) == (args.prototypes is None):
            raise ValueError("Give either --labels (to fit prototypes) or --prototypes (saved ones), not both or neither.")
        if args.prototypes is not None:
            given = [n for n, v in (("--layers", args.layers), ("--normalization", args.normalization),
                                    ("--min-similarity", args.min_similarity)) if v is not None]  # fmt: skip
            if given:
                raise ValueError(f"--prototypes carry their own layers, normalisation and threshold: leave out "
                                 f"{', '.join(given)}.")  # fmt: skip
        shared = ["prototypes.json"] + ([] if args.prototypes else ["prototypes.safetensors"])
        scenes, out_dir = plan_scene_outputs(args, suffix="classes", shared=shared,
                                             sources=[args.labels] if args.labels else [])  # fmt: skip
        saved, summary_path = out_dir / "prototypes.safetensors", out_dir / "prototypes.json"
        backbone = resolve_backbone(args.model)
        settings = window_settings(args)
        backbone.to(settings["device"])
        if args.prototypes:
            prototypes = Clusters.load(args.prototypes)
            if prototypes.names is None:
                raise ValueError(f"{args.prototypes} holds k-means clusters, not class prototypes: map with "
                                 "'dinov3-eo cluster --centroids'.")  # fmt: skip
            prototypes.check_backbone(backbone)
        else:
            prototypes = fit_prototypes(
                backbone, scenes, args.labels, attribute=args.attribute, class_names=args.class_names,
                per_class=args.per_class, min_similarity=args.min_similarity,
                normalization=input_normalization(getattr(backbone, "meta", None), args.normalization), bands=args.bands,
                nodata=args.nodata, layers=args.layers if args.layers else 1, window=args.window, seed=args.seed,
                device=settings["device"], amp=settings["amp"], progress=not args.quiet,
            )  # fmt: skip
            prototypes.save(saved, overwrite=args.overwrite)
            print(f"prototypes: {saved} ({prototypes.k} for {len(set(prototypes.groups or []))} classes from "
                  f"{prototypes.samples:,} labelled pixels; mean cosine to their class {prototypes.cohesion:.3f})")  # fmt: skip
        names = prototypes.class_names
        maps = {
            scene: {"pixels": dict(zip(names, r.pixels)), "hectares": dict(zip(names, r.hectares)) if r.hectares else None}
            for scene, r in map_scenes(backbone, prototypes, scenes, out_dir, args, settings, hide_empty=True).items()
        }  # fmt: skip
        with atomic_output(summary_path, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps({**prototypes.metadata(), "prototypes_file": os.fspath(args.prototypes or saved),
                                       "labels": args.labels, "scenes": maps}, indent=2))  # fmt: skip
        print(summary_path)
    except (FileExistsError, FileNotFoundError, ValueError, KeyError, IndexError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


__all__ = ["fit_prototypes", "open_labels", "pixel_tokens", "prototypes_main"]
