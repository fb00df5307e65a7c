"""``dinov3-eo quickstart``: the whole method end to end on the bundled real Landsat-8 scene, on a CPU, in minutes.

Steps (each with a progress bar), all written into one output folder:

1. per-band statistics of the scene (``stats.json``; the scene's 0-valued collar is nodata);
2. a short DINOv3 pretraining (DINO + iBOT + KoLeo) of a micro ViT on random tiles of the scene, with small
   heads and crops sized for a CPU (:class:`~dinov3_eo.ssl.module.DINOv3Pretrain` + a Lightning ``Trainer``);
3. export of the EMA teacher backbone with its metadata (``backbone.pth`` / ``.safetensors`` / ``.json``);
4. the 3-component PCA picture of its patch features (``pca.png``);
5. a linear segmentation head trained on the four land-cover polygons shipped with the scene (labels burnt
   onto each tile on the fly), saved as ``segmentation.ckpt``;
6. the segmented scene: class COG with colour table, GeoPackage polygons (smoothed by one 30 m pixel, as one
   coverage) and a PNG quick-look.

With the default 200 pretraining steps the run takes a few minutes on two cores. The polygons are few (~15 ha each), so
the head's reported accuracy is measured on the labelled pixels it was trained on: a demonstration of the
pipeline, not a benchmark (see ``scripts/exp_segment_nc.py`` for a held-out evaluation).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from dinov3_eo.cli import EXIT_BAD_INPUT, ignore_expected_lightning_warnings

#: class ids of the shipped polygons' ``name`` attribute
SAMPLE_CLASSES: dict[str, int] = {"water": 0, "crop": 1, "tree": 2, "developed": 3}
#: map colours: water blue, crop yellow-orange, tree green, developed grey-red
SAMPLE_COLORS: list[list[int]] = [[31, 120, 180], [240, 200, 60], [30, 140, 50], [200, 60, 60]]
#: the sample stores Landsat-8 B2, B3, B4 (blue, green, red): red-green-blue for previews is 3, 2, 1
SAMPLE_RGB = (3, 2, 1)
SAMPLE_NODATA = 0.0


def sample_paths() -> tuple[Path, Path]:
    """(scene GeoTIFF, land-cover polygons GeoPackage) bundled in ``dinov3_eo/sample``."""
    root = Path(str(resources.files("dinov3_eo") / "sample"))
    return root / "landsat8_224078_subset.tif", root / "landsat8_224078_polygons.gpkg"


def _labelled_tiles(scene: Path, polygons: Path, *, tile: int, stride: int) -> tuple[list, list]:
    """Tiles (on a ``stride`` grid, for training; on a ``tile`` grid, for the fit report) holding a labelled pixel."""
    import geopandas as gpd
    import rasterio
    from rasterio.features import rasterize

    from dinov3_eo.data.sampling import Tile

    with rasterio.open(scene) as src:
        shape, transform, crs = (src.height, src.width), src.transform, src.crs
    frame = gpd.read_file(polygons).to_crs(crs)
    labelled = rasterize(((g, 1) for g in frame.geometry), out_shape=shape, transform=transform, fill=0, dtype="uint8") > 0

    def tiles(step: int) -> list:
        rows = sorted({*range(0, max(1, shape[0] - tile + 1), step), max(0, shape[0] - tile)})
        cols = sorted({*range(0, max(1, shape[1] - tile + 1), step), max(0, shape[1] - tile)})
        return [Tile(0, r, c, tile) for r in rows for c in cols if labelled[r : r + tile, c : c + tile].any()]

    found = tiles(stride)
    if not found:
        raise ValueError(f"No polygon of {polygons} overlaps {scene}.")
    return found, tiles(tile) or found[:1]


def run(
    out_dir: str | Path,
    *,
    steps: int = 200,
    head_epochs: int = 15,
    backbone: str = "vitmicro16",
    tile_size: int = 128,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Path]:
    """Run the quickstart into ``out_dir``; returns the files written by name.

    Raises:
        FileExistsError: if ``out_dir`` already holds quickstart outputs and ``overwrite`` is false.
    """
    import lightning.pytorch as pl
    import torch

    from dinov3_eo.data.datamodule import DenseDataModule, PretrainDataModule
    from dinov3_eo.data.index import RasterIndex
    from dinov3_eo.data.stats import compute_band_stats
    from dinov3_eo.models.hub import export_backbone, load_backbone
    from dinov3_eo.ssl.module import DINOv3Pretrain
    from dinov3_eo.ssl.preview import FeaturePreview
    from dinov3_eo.tasks.features import pca_picture
    from dinov3_eo.tasks.segmentation import SegmentationTask, segment_scene

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {str(out)!r} is not empty; pass --overwrite (or choose another -o).")
    out.mkdir(parents=True, exist_ok=True)
    scene, polygons = sample_paths()
    files: dict[str, Path] = {}
    started = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    trainer_kw = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
                      enable_progress_bar=progress, default_root_dir=str(out / ".lightning"))  # fmt: skip

    # 1. statistics of the scene, shared by pretraining and the head so they see identical inputs
    _say(progress, "1/6 band statistics")
    index = RasterIndex.build(scene, cache_dir=None)
    stats = compute_band_stats(index, nodata=SAMPLE_NODATA, num_windows=64, window_size=tile_size, seed=seed, progress=progress)
    files["stats"] = out / "stats.json"
    stats.save(files["stats"])

    # 2. short pretraining of a micro ViT: small prototype heads and CPU-sized crops
    _say(progress, f"2/6 DINOv3 pretraining of a {backbone} for {steps} steps")
    pretrain_data = PretrainDataModule(
        paths=str(scene), nodata=SAMPLE_NODATA, normalization="zscore", stats=str(files["stats"]), tile_size=tile_size,
        tiles_per_epoch=max(steps, 1) * batch_size, batch_size=batch_size, cache_dir=None, seed=seed,
    )  # fmt: skip
    ssl = DINOv3Pretrain(
        backbone=backbone, in_chans=3, dino_out_dim=1024, dino_hidden_dim=256, dino_bottleneck_dim=64,
        ibot_out_dim=1024, ibot_hidden_dim=256, ibot_bottleneck_dim=64, global_crop_size=64, local_crop_size=32,
        n_local_crops=2, base_lr=2e-3, lr_warmup_steps=min(30, steps // 10), teacher_temp_warmup_steps=min(30, steps // 10),
        momentum_teacher=0.99, seed=seed, preview_every_n_steps=0,  # its own pictures, below, in true colour
    )  # fmt: skip
    pictures = FeaturePreview(every_n_steps=max(1, steps // 4), bands=SAMPLE_RGB)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|eval mode).*")
        ignore_expected_lightning_warnings()
        pl.Trainer(max_steps=max(steps, 1), limit_val_batches=0, callbacks=[pictures], **trainer_kw).fit(ssl, pretrain_data)

    # the feature pictures of the run (after step 1, every quarter of the run) stay with the outputs
    previews = out / "previews"
    _cleanup(previews)
    (out / ".lightning" / "previews").rename(previews)
    files["feature_pictures"] = previews

    # 3. export the EMA teacher with its metadata (bands, normalisation)
    _say(progress, "3/6 exporting the backbone")
    exported = export_backbone(ssl.teacher["backbone"], out / "backbone", meta=ssl.backbone_meta())
    files.update({f"backbone_{k}": v for k, v in exported.items()})
    net = load_backbone(exported["pth"])

    # 4. PCA picture of its features
    _say(progress, "4/6 PCA of the patch features")
    files["pca"] = pca_picture(
        scene, out / "pca.png", backbone=net, normalization=net.meta.get_normalization(), nodata=SAMPLE_NODATA,
        window=256, margin=32, overwrite=overwrite, progress=progress,
    )  # fmt: skip

    # 5. linear head on the shipped polygons
    _say(progress, f"5/6 linear head on the land-cover polygons ({head_epochs} epochs)")
    head_data = DenseDataModule(
        paths=str(scene), labels=str(polygons), classes=SAMPLE_CLASSES, nodata=SAMPLE_NODATA, normalization="zscore",
        stats=str(files["stats"]), tile_size=tile_size, batch_size=16, cache_dir=None, seed=seed,
    )  # fmt: skip
    head_data.setup("fit")
    # few, small polygons: train on every tile position (stride 32) that holds labels; report on the labelled pixels
    head_data.train_tiles, head_data.val_tiles = _labelled_tiles(scene, polygons, tile=tile_size, stride=32)
    task = SegmentationTask(
        backbone=str(exported["pth"]), head="linear", class_names=list(SAMPLE_CLASSES), class_colors=SAMPLE_COLORS,
        lr=3e-2, weight_decay=0.0,
    )  # fmt: skip
    head_trainer = pl.Trainer(max_epochs=max(head_epochs, 1), num_sanity_val_steps=0, check_val_every_n_epoch=max(head_epochs, 1), **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|eval mode).*")
        head_trainer.fit(task, head_data)
    files["checkpoint"] = out / "segmentation.ckpt"
    head_trainer.save_checkpoint(files["checkpoint"], weights_only=False)  # full checkpoint: optimiser state included
    fit_miou = float(head_trainer.callback_metrics.get("val/mIoU", torch.tensor(float("nan"))))

    # 6. segment the scene from the checkpoint alone
    _say(progress, "6/6 segmenting the scene")
    task = SegmentationTask.from_checkpoint(files["checkpoint"])
    written = segment_scene(
        task, scene, out, polygons=True, min_area=2 * 900.0, simplify=30.0, window=256, overlap=0.25, batch_size=4,
        overwrite=overwrite, progress=progress, preview_bands=SAMPLE_RGB,
    )  # fmt: skip
    files.update({"classes": written.classes, "quicklook": written.quicklook, "polygons": written.polygons})
    _cleanup(out / ".lightning")
    files = {k: v for k, v in files.items() if v is not None}
    print(f"\nquickstart finished in {time.perf_counter() - started:.0f} s; mIoU of the head on its training polygons: {fit_miou:.3f}")
    print(f"outputs in {out.resolve()}:")
    for name, path in files.items():
        listed = f"{Path(path).name}/ ({len(list(Path(path).iterdir()))} pictures)" if Path(path).is_dir() else Path(path).name
        print(f"  {name:>20}: {listed}")
    return files


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"\n== {text}", flush=True)


def _cleanup(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
    """``dinov3-eo quickstart [-o OUT_DIR] [--steps N]``."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo quickstart",
        description="Pretrain a micro ViT on the bundled Landsat-8 scene, export it, map its features (PCA), train a "
        "linear head on the shipped land-cover polygons and segment the scene (COG + GeoPackage + PNG). CPU, minutes.",
    )
    parser.add_argument("-o", "--output", default="dinov3_eo_quickstart", help="output folder (default ./dinov3_eo_quickstart)")
    parser.add_argument("--steps", type=int, default=200, help="pretraining steps (default 200)")
    parser.add_argument("--head-epochs", type=int, default=15, help="epochs of the linear head (default 15)")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder, replacing its files")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    if args.steps < 1 or args.head_epochs < 1:
        parser.error("--steps and --head-epochs must be >= 1")
    import lightning.pytorch  # noqa: F401 - importing it sets its logger to INFO: quiet it after, not before

    # Lightning's accelerator lines and its advertising tip, twice: the quickstart says what it does itself
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    try:
        run(args.output, steps=args.steps, head_epochs=args.head_epochs, overwrite=args.overwrite,
            progress=not args.quiet, seed=args.seed)  # fmt: skip
    except FileExistsError as e:
        print(f"dinov3-eo quickstart: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


__all__ = ["SAMPLE_CLASSES", "main", "run", "sample_paths"]
