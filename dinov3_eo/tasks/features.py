"""Patch features of a GeoTIFF as a georeferenced raster, and the familiar 3-component PCA picture of them.

A ViT with 16-pixel patches turns every 16 x 16 block of input pixels into one D-dimensional token, so
its features form a raster of their own: ``ceil(H / 16) x ceil(W / 16)`` cells whose transform is the
input's scaled by the patch size (same origin and CRS). :func:`stream_patch_features` computes that
raster window by window: the raster is cut into core tiles aligned to the patch grid, each read with a
margin of context on every side (a boundless read: outside pixels are invalid and fed as 0, the
normalised mean) and only the core's tokens are kept, so neighbouring windows meet without seams from
missing context and memory stays flat in raster size. A patch with no valid input pixel gets NaN.

``dinov3-eo embed`` writes the features (a float32 COG with one band per channel, or a zarr store via
xarray), ``dinov3-eo pca`` their first three principal components, percentile-stretched to RGB.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rasterio.transform import Affine
from rasterio.windows import Window
from torch import Tensor, nn

from dinov3_eo.cli import EXIT_BAD_INPUT
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import open_quietly, read_window, require_georeferenced
from dinov3_eo.inference.writers import COGWriter, atomic_output, check_overwrite

log = logging.getLogger(__name__)

#: Samples of patch vectors used to fit the PCA (reservoir over the whole raster).
PCA_SAMPLES = 20_000


# ------------------------------------------------------------------------------------------ backbones
def resolve_backbone(source: str | os.PathLike[str], *, in_chans: int | None = None) -> nn.Module:
    """A backbone from a registry name (random weights), any :func:`load_backbone` source, a segmentation ``.ckpt``,
    or a text model (``text fit``): its image side as a :class:`~dinov3_eo.models.text.TextDenseEncoder`, whose patch
    features are the text-aligned ones (``embed``, ``pca``, ``cluster``, ``similar``, ``change`` and ``embed --zones``
    then work in the space the text queries are scored in).

    The returned model has a ``meta`` attribute (:class:`~dinov3_eo.models.hub.BackboneMeta`); for a
    segmentation checkpoint its normalisation is the one the head was trained with.

    Raises:
        FileNotFoundError: if ``source`` is neither a registered name nor an existing path.
    """
    from dinov3_eo.models.hub import BackboneMeta, is_text_model, load_backbone
    from dinov3_eo.models.vit import BACKBONES, build_backbone

    text = os.fspath(source)
    if text in BACKBONES:
        model = build_backbone(text, in_chans=in_chans or 3)
        model.meta = BackboneMeta(name=text, in_chans=model.in_chans, patch_size=model.patch_size, embed_dim=model.embed_dim)
        log.warning("Backbone %r has random weights (a registry name, not a checkpoint).", text)
        return model.eval()
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"Backbone {text!r} is neither a registered name ({sorted(BACKBONES)}) nor an existing path.")
    if is_text_model(path):  # its image side's patch features, aligned with its text embeddings
        from dinov3_eo.models.text import TextDenseEncoder
        from dinov3_eo.tasks.openvocab import load_text_model

        model, meta, _ = load_text_model(path)
        log.info("Text model %s: its image side's adapted patch tokens (unit length) are the features.", text)
        return TextDenseEncoder(model, meta).eval()
    if path.suffix == ".ckpt":
        from dinov3_eo.tasks.segmentation import SegmentationTask, is_segmentation_checkpoint

        if is_segmentation_checkpoint(path):
            task = SegmentationTask.from_checkpoint(path)
            backbone = task.model.backbone
            backbone.meta = task.backbone_meta()
            return backbone.eval()
    return load_backbone(path, in_chans=in_chans).eval()


def input_normalization(meta: Any, override: str | None) -> Normalization | None:
    """The normalisation to feed a backbone: ``override`` (``"none"`` or a preset name) or the metadata's.

    Raises:
        ValueError: if neither exists (a silent guess is the most common failure in this field).
    """
    if override is not None:
        return None if override == "none" else Normalization.preset(override)
    norm = getattr(meta, "normalization", None)
    if norm is None:
        raise ValueError(
            "The backbone carries no input normalisation; pass --normalization (none, imagenet, sat493m, chmv2) "
            "to say how its inputs must be scaled."
        )
    return Normalization.from_dict(norm)


# ------------------------------------------------------------------------------------- streaming
@dataclass(frozen=True)
class FeatureGrid:
    """The patch-resolution raster of a backbone's features over an input raster.

    ``height``/``width`` in patches (``ceil`` of the input size / patch), ``transform`` = input transform
    scaled by the patch size, same CRS.
    """

    height: int
    width: int
    transform: Affine
    crs: Any
    patch_size: int

    @classmethod
    def of(cls, src: Any, patch_size: int) -> FeatureGrid:
        return cls(
            height=math.ceil(src.height / patch_size),
            width=math.ceil(src.width / patch_size),
            transform=src.transform @ Affine.scale(patch_size),
            crs=src.crs,
            patch_size=patch_size,
        )


def _core_tiles(grid: FeatureGrid, tile_patches: int) -> Iterator[Window]:
    """Non-overlapping windows of the patch grid (in patches), row by row."""
    for row in range(0, grid.height, tile_patches):
        for col in range(0, grid.width, tile_patches):
            yield Window(col, row, min(tile_patches, grid.width - col), min(tile_patches, grid.height - row))


def stream_patch_features(
    backbone: nn.Module,
    src: Any,
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    window: int = 512,
    margin: int = 64,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    amp: bool = False,
    progress: bool = True,
    keep: Callable[[Window], bool] | None = None,
) -> Iterator[tuple[Window, np.ndarray]]:
    """Yield ``(patch window, features (D, h, w) float32)`` covering the feature grid of ``src`` once.

    Args:
        backbone: a ViT with ``patch_size``, ``embed_dim`` and ``get_intermediate_layers``.
        src: an open rasterio dataset.
        normalization: applied to raw values (``None``: raw float32); invalid pixels are then set to 0.
        bands: 1-based bands fed to the model (default all); nodata: input nodata override.
        window: core tile side in pixels (rounded down to the patch size).
        margin: context read around each core tile, in pixels (rounded up to the patch size).
        batch_size: tiles per forward pass.
        amp: run the backbone under bf16 autocast (on any device; on a CPU worth it only with bf16
            instructions, see ``scripts/bench_cpu_bf16.py``); features are returned as float32 either way.
        keep: only the core tiles (patch windows) for which it is true are read, embedded and yielded (polygons
            over part of a scene); each tile's features do not depend on which others run.

    Features are the normed last-layer patch tokens; patches without a valid pixel are NaN.

    Raises:
        ValueError: if ``window`` is smaller than a patch or the normalisation's band count differs.
    """
    from tqdm.auto import tqdm

    patch = int(backbone.patch_size)
    core = window // patch
    pad = -(-max(margin, 0) // patch)
    if core < 1:
        raise ValueError(f"window={window} must be at least the patch size {patch}.")
    n_bands = len(bands) if bands is not None else src.count
    if normalization is not None and normalization.num_bands != n_bands:
        raise ValueError(f"Normalisation {normalization.name!r} has {normalization.num_bands} bands, {src.name!r} gives {n_bands}.")
    grid = FeatureGrid.of(src, patch)
    tiles = [tile for tile in _core_tiles(grid, core) if keep is None or keep(tile)]
    side = (core + 2 * pad) * patch  # every read has the same size, so batches stack

    def read(tile: Window) -> tuple[Tensor, np.ndarray]:
        read_win = Window((tile.col_off - pad) * patch, (tile.row_off - pad) * patch, side, side)
        values, valid = read_window(src, read_win, bands=bands, nodata=nodata)
        image = torch.from_numpy(values.astype(np.float32))  # [C, S, S]
        if normalization is not None:
            image = normalization(image)
        image = torch.nan_to_num(image).masked_fill_(~torch.from_numpy(valid), 0.0)
        n = core + 2 * pad
        patch_valid = valid.reshape(n, patch, n, patch).any(axis=(1, 3))  # [S, S] -> [n, n]
        return image, patch_valid

    was_training = backbone.training
    backbone.eval()
    bar = tqdm(total=len(tiles), unit="win", desc=f"features {Path(str(src.name)).name}", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(tiles), batch_size):
                chunk = tiles[start : start + batch_size]
                reads = [read(t) for t in chunk]
                x = torch.stack([r[0] for r in reads]).to(device)  # [B, C, S, S]
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
                    (tokens,) = backbone.get_intermediate_layers(x, n=1, reshape=True, norm=True)  # [B, D, n, n]
                tokens = tokens.float().cpu().numpy()
                for tile, (_, patch_valid), feats in zip(chunk, reads, tokens):
                    h, w = int(tile.height), int(tile.width)
                    out = feats[:, pad : pad + h, pad : pad + w].copy()  # [D, h, w] core only
                    out[:, ~patch_valid[pad : pad + h, pad : pad + w]] = np.nan
                    yield tile, out
                bar.update(len(chunk))
    finally:
        bar.close()
        backbone.train(was_training)


def write_features(
    backbone: nn.Module,
    src_path: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    normalization: Normalization | None,
    bands: Sequence[int] | None = None,
    nodata: float | None = None,
    window: int = 512,
    margin: int = 64,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    amp: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    compress: str = "deflate",
    quicklook: str | os.PathLike[str] | None = None,
    require_georeference: bool = True,
) -> Path:
    """Patch features of ``src_path`` as a D-band float32 COG at patch resolution (nodata NaN).

    ``require_georeference=False`` takes an image chip without one (the features then have none either).

    ``dst`` ending in ``.zarr`` writes a zarr store through xarray instead (needs the ``zarr`` package).
    ``quicklook``: a ``.png`` to draw the features' first three principal components into (:func:`write_pca`), for
    a look at what the backbone separates; left out, with the no-valid-pixel warning, when no patch saw data. The
    other arguments are :func:`stream_patch_features`'s.

    Raises:
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
        ImportError: for ``.zarr`` output without zarr installed.
        ValueError: if ``dst`` is ``src_path``.
    """
    dst = check_overwrite(dst, overwrite, inputs=[src_path])
    if dst.suffix == ".zarr":
        return _write_zarr(backbone, src_path, dst, normalization=normalization, bands=bands, nodata=nodata,
                           window=window, margin=margin, batch_size=batch_size, device=device, amp=amp,
                           overwrite=overwrite, progress=progress, quicklook=quicklook)  # fmt: skip
    dim = int(backbone.embed_dim)
    with open_quietly(src_path) as src:  # one without a georeference is refused below, in one sentence
        if require_georeference:
            require_georeferenced(src)
        grid = FeatureGrid.of(src, int(backbone.patch_size))
        meta = getattr(backbone, "meta", None)
        tags = {"dinov3_eo_output": "patch_features", "patch_size": grid.patch_size,
                "backbone": getattr(meta, "name", getattr(backbone, "name", "custom")), "source": os.fspath(src_path)}  # fmt: skip
        with COGWriter(
            dst, crs=grid.crs, transform=grid.transform, width=grid.width, height=grid.height, count=dim,
            dtype="float32", nodata=float("nan"), overwrite=overwrite, compress=compress, overviews=False,
            band_descriptions=[f"feature_{i}" for i in range(dim)], tags=tags,
        ) as out:  # fmt: skip
            any_valid = False
            for tile, feats in stream_patch_features(
                backbone, src, normalization=normalization, bands=bands, nodata=nodata, window=window,
                margin=margin, batch_size=batch_size, device=device, amp=amp, progress=progress,
            ):  # fmt: skip
                out.write(feats, tile)
                any_valid = any_valid or bool(np.isfinite(feats[0]).any())  # a patch is NaN where it saw no data
        if not any_valid:
            log.warning("%s has no valid pixel in the bands read (nodata everywhere): every feature is NaN; check the "
                        "nodata value and the bands.", src.name)
    if quicklook is not None and any_valid:
        write_pca(dst, quicklook, overwrite=overwrite)
    return dst


def _write_zarr(backbone: nn.Module, src_path: Any, dst: Path, *, overwrite: bool, **kwargs: Any) -> Path:
    try:
        import zarr  # noqa: F401
    except ImportError as e:
        raise ImportError(f"Writing {str(dst)!r} needs the 'zarr' package (pip install zarr); or write a .tif instead.") from e
    import shutil

    import rioxarray

    if dst.exists() and not overwrite:
        raise FileExistsError(f"Output {str(dst)!r} already exists; pass --overwrite to replace it.")
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.stem}.") as tmp:
        # overwrite reaches the quick-look only: the staged features are new
        tif = write_features(backbone, src_path, Path(tmp) / "features.tif", progress=kwargs.pop("progress"),
                             overwrite=overwrite, **kwargs)  # fmt: skip
        array = rioxarray.open_rasterio(tif, masked=True).rename({"band": "feature"})
        staged = Path(tmp) / dst.name
        array.to_dataset(name="features").to_zarr(staged, mode="w")
        array.close()
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(staged, dst)
    return dst


# ------------------------------------------------------------------------------------------- PCA
def _reservoir_sample(blocks: Iterator[np.ndarray], size: int, seed: int) -> np.ndarray:
    """Uniform sample of at most ``size`` rows from (n_i, D) blocks, streaming (Algorithm R, vectorised per block)."""
    rng = np.random.default_rng(seed)
    sample: np.ndarray | None = None
    seen = 0
    for rows in blocks:
        if rows.size == 0:
            continue
        if sample is None:
            sample = np.empty((size, rows.shape[1]), dtype=np.float32)
        take = min(size - min(seen, size), len(rows))
        if take > 0:
            sample[seen : seen + take] = rows[:take]
        later = np.arange(take, len(rows))
        slots = rng.integers(0, seen + later + 1)  # row i replaces a random slot with probability size / (seen + i + 1)
        keep = slots < size
        sample[slots[keep]] = rows[later[keep]]
        seen += len(rows)
    if sample is None:
        raise ValueError("No valid patch: the raster is all nodata.")
    return sample[: min(seen, size)]


def fit_pca(samples: np.ndarray, n_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """``(mean [D], components [k, D])`` of ``samples [N, D]``, each component's sign fixed (largest |loading| > 0)."""
    mean = samples.mean(axis=0)
    _, _, vt = np.linalg.svd(samples - mean, full_matrices=False)
    components = vt[:n_components]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    return mean.astype(np.float32), (components * signs[:, None]).astype(np.float32)


#: the PCA picture is enlarged by an integer factor until its longer side reaches PNG_MIN_SIDE (at most the patch size)
PNG_MIN_SIDE = 512
PNG_MAX_UPSCALE = 16


def write_pca(
    features: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    low: float = 2.0,
    high: float = 98.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """First 3 principal components of a patch-feature raster as RGB: ``.png`` picture or georeferenced ``.tif``.

    The PCA is fit on a reservoir sample of valid patches; each component is stretched from its ``low``
    to its ``high`` percentile to 1..255 (0 = nodata in the ``.tif``; white in the ``.png``).

    Raises:
        ValueError: for another suffix, or a raster without a valid patch.
    """
    dst = Path(dst)
    if dst.suffix.lower() not in (".png", ".tif", ".tiff"):
        raise ValueError(f"PCA output must end in .png or .tif, got {str(dst)!r}.")
    check_overwrite(dst, overwrite, inputs=[features])
    with open_quietly(features) as src:  # an image chip's features have no georeference
        blocks = [w for _, w in src.block_windows(1)]

        def valid_rows(window: Window) -> np.ndarray:
            f = src.read(window=window)  # [D, h, w]
            rows = f.reshape(f.shape[0], -1).T  # [h*w, D]
            return rows[np.isfinite(rows).all(axis=1)]

        sample = _reservoir_sample((valid_rows(w) for w in blocks), PCA_SAMPLES, seed)
        mean, components = fit_pca(sample)
        projected = (sample - mean) @ components.T  # [N, 3]
        lo, hi = np.percentile(projected, low, axis=0), np.percentile(projected, high, axis=0)
        span = np.maximum(hi - lo, 1e-12)

        def to_rgb(window: Window) -> np.ndarray:
            f = src.read(window=window)  # [D, h, w]
            d, h, w = f.shape
            valid = np.isfinite(f).all(axis=0)
            proj = (np.nan_to_num(f).reshape(d, -1).T - mean) @ components.T  # [h*w, 3]
            rgb = 1 + np.rint(np.clip((proj - lo) / span, 0, 1) * 254)  # 1..255, 0 kept for nodata
            rgb = rgb.T.reshape(3, h, w).astype(np.uint8)
            rgb[:, ~valid] = 0
            return rgb

        if dst.suffix.lower() == ".png":
            from PIL import Image

            rgb = np.zeros((3, src.height, src.width), dtype=np.uint8)
            for w in blocks:
                r0, c0 = int(w.row_off), int(w.col_off)
                rgb[:, r0 : r0 + int(w.height), c0 : c0 + int(w.width)] = to_rgb(w)
            picture = np.moveaxis(rgb, 0, -1).copy()  # [3, h, w] -> [h, w, 3]
            picture[(rgb == 0).all(axis=0)] = 255
            # one pixel per patch is too small to look at: enlarge (nearest, patches stay crisp) to >= 512 px
            factor = max(1, min(PNG_MAX_UPSCALE, -(-PNG_MIN_SIDE // max(picture.shape[:2]))))
            picture = picture.repeat(factor, axis=0).repeat(factor, axis=1)
            with atomic_output(dst, overwrite=overwrite) as tmp:
                Image.fromarray(picture).save(tmp, format="PNG")
            return dst
        with COGWriter(
            dst, crs=src.crs, transform=src.transform, width=src.width, height=src.height, count=3, dtype="uint8",
            nodata=0, overwrite=overwrite, band_descriptions=["pc1", "pc2", "pc3"],
            tags={"dinov3_eo_output": "feature_pca", "stretch_percentiles": f"{low},{high}"},
        ) as out:  # fmt: skip
            for w in blocks:
                out.write(to_rgb(w), w)
    return dst


# ------------------------------------------------------------------------------------------- CLI
#: Help of ``--model`` in the commands that run a bare backbone (:func:`resolve_backbone`).
BACKBONE_HELP = ("backbone: an export (.pth/.safetensors), any load_backbone source, a segmentation .ckpt, or a registry "
                 "name (random weights)")


def add_backbone_input_options(parser: argparse.ArgumentParser) -> None:
    """``--bands``, ``--nodata`` and ``--normalization``: which bands of a raster feed a bare backbone, which value is
    nodata, and how the values are scaled (:func:`input_normalization`)."""
    parser.add_argument("--bands", type=int, nargs="+", default=None, help="1-based bands fed to the backbone (default: all)")
    parser.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat L1 collar)")
    parser.add_argument("--normalization", default=None, choices=["none", "imagenet", "sat493m", "chmv2"],
                        help="override the backbone's stored input normalisation (presets expect 0..255 values)")  # fmt: skip


def add_tile_run_options(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--device``, ``--bf16``, ``--overwrite`` and ``--quiet``: how the commands that embed chips
    or tiles (``classify``, ``regress``) run."""
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the backbone")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _common_parser(prog: str, description: str, output_help: str, *, several: bool = False) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if several:  # embed --zones takes a time series; the other modes one input, checked after parsing
        parser.add_argument("input", nargs="+", help="input GeoTIFF (with --zones: one or more, at one or more dates)")
    else:
        parser.add_argument("input", help="input GeoTIFF (pca to a .png: any image chip, JPEG/PNG/TIFF, georeferenced or not)")
    parser.add_argument("--model", required=True, help=BACKBONE_HELP)
    parser.add_argument("-o", "--output", required=True, help=output_help)
    add_backbone_input_options(parser)
    parser.add_argument("--window", type=int, default=512, help="core window side in pixels (default 512)")
    parser.add_argument("--margin", type=int, default=64, help="context around each window in pixels (default 64)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the backbone (default: float32): ViT "
                        "features ~1.85x faster on CPUs with bf16 instructions (AVX512-BF16/AMX) and on GPUs")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _prepare(args: argparse.Namespace, inputs: Sequence[str] = ()) -> tuple[nn.Module, Normalization | None, str]:
    counts = {}
    for path in inputs or [args.input]:  # every input checked before the first is embedded
        with open_quietly(path) as src:
            counts[path] = len(args.bands) if args.bands else src.count
    backbone = resolve_backbone(args.model, in_chans=None)
    for path, count in counts.items():
        in_chans = int(backbone.patch_embed.proj.weight.shape[1]) if hasattr(backbone, "patch_embed") else count
        if count != in_chans:
            raise ValueError(f"{path} gives {count} bands but the backbone {args.model} takes {in_chans}; select bands "
                             "with --bands.")  # fmt: skip
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return backbone.to(device), input_normalization(getattr(backbone, "meta", None), args.normalization), device


def _run_cli(prog: str, body: Callable[[], Path]) -> int:
    try:
        path = body()
    except (FileExistsError, FileNotFoundError, ValueError, ImportError, IndexError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path)
    return 0


def embed_main(argv: Sequence[str]) -> int:
    """``dinov3-eo embed IN.tif --model BACKBONE -o feats.tif|feats.zarr``, ``embed CHIPS --chips -o
    embeddings.parquet|.npz`` (one row per chip), ``embed IN.tif --tiles 32 -o tiles.parquet`` (one row per tile,
    GeoParquet) or ``embed IN.tif --zones parcels.gpkg -o parcels.parquet`` (one row per polygon, GeoParquet)."""
    from dinov3_eo.tasks.chip_embeddings import EMBEDDING_SUFFIXES

    parser = _common_parser(
        "dinov3-eo embed",
        "Patch features of a GeoTIFF as a georeferenced multi-band float raster at patch resolution "
        "(transform = input transform scaled by the patch size); with --chips, one embedding per image chip "
        "(CLS token and mean patch token) as a Parquet or npz table.",
        "output .tif (float32 COG, one band per channel) or .zarr (needs zarr); with --chips .parquet or .npz",
        several=True,
    )
    parser.add_argument("--quicklook", action=argparse.BooleanOptionalAction, default=True,
                        help="also draw the features' first 3 principal components into OUTPUT_pca.png (default: on)")
    chips = parser.add_argument_group("image chips", "one row per chip: path, height, width, cls, patch_mean")
    chips.add_argument("--chips", action="store_true", help="INPUT is image chips (a folder, a quoted glob or a file; "
                       "JPEG/PNG/TIFF, georeferenced or not): write their embeddings as a table")  # fmt: skip
    chips.add_argument("--size", type=int, default=224, help="with --chips, resize each chip to SIZE x SIZE px "
                       "(default 224); 0 keeps each chip's own size, rounded to the patch size")  # fmt: skip
    tiles = parser.add_argument_group("tiles of a scene", "one row per tile of a GeoTIFF: a GeoParquet table of footprints")
    tiles.add_argument("--tiles", type=int, default=None, metavar="TILE_SIZE", help="embed each TILE_SIZE-px tile of "
                       "INPUT (the grid 'classify map' cuts; resized to --size) as one row: path, row, col, cls, "
                       "patch_mean and its footprint (GeoParquet .parquet, or .npz without footprints)")  # fmt: skip
    tiles.add_argument("--min-valid", type=float, default=0.5, help="with --tiles, share of a tile's pixels that must "
                       "hold data (default 0.5)")  # fmt: skip
    zones = parser.add_argument_group("polygons", "one row per polygon: GeoParquet of the polygons and their features")
    zones.add_argument("--zones", default=None, metavar="POLYGONS", help="embed each polygon of this vector file "
                       "(parcels, crowns, buildings; any CRS): the patch features averaged over it, weighted by its "
                       "area in each patch, as patch_mean in a GeoParquet OUTPUT with coverage and patches; "
                       "several INPUTs: a time series, each polygon's features at every date")  # fmt: skip
    zones.add_argument("--dates", nargs="+", default=None, metavar="DATE", help="with --zones and several INPUTs, "
                       "each one's date, in their order (a quoted glob or a folder: its files sorted by name; "
                       "default: the YYYYMMDD or YYYY-MM-DD in each name); the same date twice: scenes of one date, "
                       "mosaicked")  # fmt: skip
    zones.add_argument("--upsample", type=int, default=1, metavar="K", help="with --zones, read the scene on a grid K "
                       "times finer (bilinear) so that parcels of a few pixels get patches of their own (10-30 m "
                       "imagery; K^2 the compute; default 1)")  # fmt: skip
    zones.add_argument("--temporal", choices=("concat", "mean"), default="concat", help="with several dates, "
                       "patch_mean is the dates' features one after the other (concat, default: a season's course; a date "
                       "without features interpolated in time from the polygon's other dates) or their mean")  # fmt: skip
    args = parser.parse_args(list(argv))
    inputs, args.input = list(args.input), args.input[0]

    def zone_table() -> Path:
        from dinov3_eo.data.index import expand_sources
        from dinov3_eo.tasks.zone_embeddings import write_zone_embeddings, zone_embeddings
        from dinov3_eo.tasks.zone_time_series import zone_time_series

        if args.chips or args.tiles is not None:
            raise ValueError("--zones embeds polygons over a GeoTIFF; leave out --chips and --tiles.")
        if Path(args.output).suffix.lower() != ".parquet":
            raise ValueError(f"With --zones the output is a GeoParquet table (.parquet), not {args.output!r}.")
        # a quoted glob or a folder of a season's scenes: each expands (sorted) where it stands among the inputs
        rasters = [path for item in inputs for path in expand_sources(item)]
        args.input = rasters[0]
        check_overwrite(args.output, args.overwrite, inputs=[*rasters, args.zones])
        backbone, norm, device = _prepare(args, rasters)
        run = {"normalization": norm, "bands": args.bands, "nodata": args.nodata, "window": args.window,
               "margin": args.margin, "batch_size": args.batch_size, "device": device, "amp": args.bf16,
               "progress": not args.quiet, "upsample": args.upsample}  # fmt: skip
        if len(rasters) == 1 and args.dates is None:
            table = zone_embeddings(backbone, args.input, args.zones, **run)
        else:
            table = zone_time_series(backbone, rasters, args.zones, dates=args.dates, temporal=args.temporal, **run)
        seen = int((table["patches"] > 0).sum())
        steps = table.attrs["dinov3_eo"].get("dates")
        print(f"{len(table)} polygons embedded ({seen} with features, mean coverage {table['coverage'].mean():.2f})"
              + (f" at {len(steps)} dates: {', '.join(steps)}" if steps else ""))
        return write_zone_embeddings(table, args.output, overwrite=args.overwrite)

    def tile_table() -> Path:
        from dinov3_eo.tasks.chip_embeddings import load_chip_backbone
        from dinov3_eo.tasks.tile_classification import write_tile_embeddings

        if args.chips:
            raise ValueError("--tiles embeds the tiles of a GeoTIFF; --chips embeds image chips: give one of them.")
        if args.tiles < 1 or args.size < 0:
            raise ValueError(f"--tiles must be a tile side in pixels and --size 0 or a side, got {args.tiles} and {args.size}.")
        check_overwrite(args.output, args.overwrite, inputs=[args.input])
        backbone = load_chip_backbone(args.model, normalization=args.normalization, device=args.device)
        embedded = write_tile_embeddings(args.input, backbone, args.output, tile_size=args.tiles, bands=args.bands,
                                         nodata=args.nodata, size=args.size or None, min_valid=args.min_valid,
                                         batch_size=args.batch_size, amp=args.bf16, progress=not args.quiet,
                                         overwrite=args.overwrite)  # fmt: skip
        print(f"{len(embedded)} tiles of {args.tiles} px embedded")
        return Path(args.output)

    def chip_table() -> Path:
        from dinov3_eo.tasks.chip_embeddings import embed_chips_with, load_chip_backbone, write_chip_embeddings

        if Path(args.output).suffix.lower() not in EMBEDDING_SUFFIXES:
            raise ValueError(f"With --chips the output is a table ({' or '.join(EMBEDDING_SUFFIXES)}), not "
                             f"{args.output!r}.")  # fmt: skip
        if args.nodata is not None:
            raise ValueError("--nodata is for GeoTIFFs; a chip's pixels without data are its alpha band's or its "
                             "file's nodata.")  # fmt: skip
        if args.size < 0:
            raise ValueError(f"--size must be 0 (each chip's own size) or a side in pixels, not {args.size}.")
        check_overwrite(args.output, args.overwrite)
        backbone = load_chip_backbone(args.model, normalization=args.normalization, device=args.device)
        embeddings = embed_chips_with(backbone, args.input, bands=args.bands, size=args.size or None,
                                      batch_size=args.batch_size, amp=args.bf16, progress=not args.quiet)  # fmt: skip
        return write_chip_embeddings(embeddings, args.output, overwrite=args.overwrite)

    def body() -> Path:
        if args.zones is not None:
            return zone_table()
        if len(inputs) > 1:
            raise ValueError(f"{len(inputs)} inputs: embed takes one GeoTIFF or chip folder (a quoted glob for many "
                             "chips); several GeoTIFFs are a time series of polygons, with --zones.")  # fmt: skip
        if args.dates is not None:
            raise ValueError("--dates names the dates of a time series of polygons: use it with --zones.")
        if args.tiles is not None:
            return tile_table()
        if args.chips:
            return chip_table()
        if Path(args.output).suffix.lower() in EMBEDDING_SUFFIXES:
            raise ValueError(f"{args.output!r} is a table of one embedding per image chip or tile: add --chips, or "
                             "--tiles TILE_SIZE (a GeoTIFF's features are written as .tif or .zarr).")  # fmt: skip
        check_overwrite(args.output, args.overwrite, inputs=[args.input])
        output = Path(args.output)
        quicklook = output.with_name(f"{output.stem}_pca.png") if args.quicklook else None
        if quicklook is not None:
            check_overwrite(quicklook, args.overwrite, inputs=[args.input])  # before the features, not after
        backbone, norm, device = _prepare(args)
        written = write_features(
            backbone, args.input, args.output, normalization=norm, bands=args.bands, nodata=args.nodata,
            window=args.window, margin=args.margin, batch_size=args.batch_size, device=device, amp=args.bf16,
            overwrite=args.overwrite, progress=not args.quiet, quicklook=quicklook,
        )  # fmt: skip
        if quicklook is not None and quicklook.exists():
            print(quicklook)
        return written

    return _run_cli("dinov3-eo embed", body)


def pca_main(argv: Sequence[str]) -> int:
    """``dinov3-eo pca IN.tif --model BACKBONE -o pca.png|pca.tif``."""
    parser = _common_parser(
        "dinov3-eo pca",
        "3-component PCA of the patch features of a GeoTIFF, percentile-stretched to RGB (.tif is georeferenced).",
        "output .png or .tif",
    )
    parser.add_argument("--stretch", type=float, nargs=2, default=(2.0, 98.0), metavar=("LOW", "HIGH"),
                        help="percentiles mapped to the colour range (default 2 98)")  # fmt: skip
    args = parser.parse_args(list(argv))

    def body() -> Path:
        return pca_picture(args.input, args.output, args=args)

    return _run_cli("dinov3-eo pca", body)


def pca_picture(
    src_path: str | os.PathLike[str], dst: str | os.PathLike[str], *, args: argparse.Namespace | None = None,
    backbone: nn.Module | None = None, normalization: Normalization | None = None, nodata: float | None = None,
    bands: Sequence[int] | None = None, window: int = 512, margin: int = 64, batch_size: int = 4,
    device: str = "cpu", amp: bool = False, stretch: tuple[float, float] = (2.0, 98.0), overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Features of ``src_path`` (into a temporary patch-resolution raster), then :func:`write_pca` to ``dst``.

    Give either ``backbone`` (+ ``normalization``) or the parsed CLI ``args``. A ``.png`` picture carries no
    georeference, so ``src_path`` may be an image chip without one (JPEG, PNG, TIFF); a ``.tif`` needs one.
    """
    if args is not None:
        check_overwrite(args.output, args.overwrite, inputs=[args.input])
        backbone, normalization, device = _prepare(args)
        nodata, bands, window, margin = args.nodata, args.bands, args.window, args.margin
        batch_size, stretch, overwrite, progress = args.batch_size, tuple(args.stretch), args.overwrite, not args.quiet
        amp = args.bf16
    if backbone is None:
        raise ValueError("pca_picture: give backbone= or args=.")
    dst = check_overwrite(dst, overwrite, inputs=[src_path])
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=f".{dst.stem}.") as tmp:
        feats = write_features(
            backbone, src_path, Path(tmp) / "features.tif", normalization=normalization, bands=bands, nodata=nodata,
            window=window, margin=margin, batch_size=batch_size, device=device, amp=amp, progress=progress,
            compress="none", require_georeference=dst.suffix.lower() != ".png",
        )  # fmt: skip
        return write_pca(feats, dst, low=stretch[0], high=stretch[1], overwrite=overwrite)


__all__ = [
    "FeatureGrid",
    "embed_main",
    "fit_pca",
    "input_normalization",
    "pca_main",
    "pca_picture",
    "resolve_backbone",
    "stream_patch_features",
    "write_features",
    "write_pca",
]
