"""``dinov3-eo regress``: the command line of the tile regressors (:mod:`~dinov3_eo.tasks.tile_regression`).

``fit`` (the tiles of scenes that a reference raster, points or polygons cover), ``map`` (every tile of a scene as a
float GeoTIFF) and ``test`` (scores on a reference's tiles).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_eo.inference.writers import atomic_output, check_distinct_stems, check_overwrite, write_vector
from dinov3_eo.tasks.tile_regression import (
    COVERAGE,
    METHODS,
    TileRegressor,
    interval_line,
    interval_metrics,
    regression_metrics,
)
from dinov3_eo.tasks.tile_values import STATISTICS


def regress_main(argv: Sequence[str]) -> int:
    """``dinov3-eo regress fit --scenes S --values REF --tile-size N --model M -o regressor.safetensors`` / ``regress
    map SCENE --regressor R -o OUT`` / ``regress test --scenes S --values REF --regressor R``; returns the exit code."""
    import argparse
    import sys

    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.tasks.chip_embeddings import FEATURES
    from dinov3_eo.tasks.features import BACKBONE_HELP, add_backbone_input_options, add_tile_run_options

    prog = "dinov3-eo regress"
    parser = argparse.ArgumentParser(prog=prog, description="Tile regression on frozen DINOv3 features: a number per "
                                     "tile (canopy height, biomass, tree cover) from a reference raster, field plots or "
                                     "polygons.")  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    fit = sub.add_parser("fit", help="fit a regressor on the tiles of scenes that a reference covers",
                         description="Summarise a reference (a raster such as a CHM or biomass map, points with a "
                         "measured value, or polygons carrying one) over each tile of the scenes, embed the tiles, fit "
                         "a ridge regression (alpha chosen on held-out blocks of tiles) or keep them for a k-NN, report "
                         "the held-out MAE, RMSE, R2 and bias, and save the regressor.")  # fmt: skip
    fit.add_argument("--model", default=None, help=BACKBONE_HELP + " (default with --embeddings: the table's)")
    fit.add_argument("--embeddings", default=None, help="a table of the scenes' tiles from 'embed SCENE --tiles N': "
                     "their embeddings are read, not computed again")  # fmt: skip
    fit.add_argument("-o", "--output", required=True, help="the regressor (.safetensors)")
    fit.add_argument("--val-values", nargs="+", default=None, help="a held-out reference over the same scenes (default: "
                     "--val-fraction of the tiles, in blocks)")  # fmt: skip
    fit.add_argument("--val-fraction", type=float, default=0.2, help="share of the tiles held out (default 0.2)")
    fit.add_argument("--block", type=int, default=4, help="held-out tiles are whole blocks of BLOCK x BLOCK tiles "
                     "(default 4): neighbouring tiles look alike, and a random split would score too kindly")  # fmt: skip
    fit.add_argument("--method", choices=METHODS, default="ridge", help="ridge regression (default) or k-NN")
    fit.add_argument("--features", choices=FEATURES, default="cls+patch_mean",
                     help="embedding columns fed to the regressor (default cls+patch_mean)")  # fmt: skip
    fit.add_argument("-k", type=int, default=20, help="neighbours of the k-NN (default 20)")
    fit.add_argument("--refit", action="store_true", help="once alpha is chosen on the held-out tiles (chips), fit "
                     "the regressor saved on them too: every field plot counts (the held-out scores are then those of "
                     "the model before)")  # fmt: skip
    fit.add_argument("--log", action="store_true", help="fit log(1 + value), for a skewed reference (biomass); the "
                     "ridge's predictions are taken back with Duan's smearing factor, so they stay means")  # fmt: skip
    fit.add_argument("--coverage", type=float, default=COVERAGE, help="the held-out tiles (chips) calibrate "
                     "split-conformal prediction intervals of this coverage (default 0.9: nine in ten inside; 0: none); "
                     "'regress map' then writes their ends, 'regress test' measures how many references they hold")  # fmt: skip
    fit.add_argument("--size", type=int, default=224, help="tiles resized to SIZE x SIZE (default 224; 0: own size)")
    fit.add_argument("--target", default=None, help='what the values are, for maps and reports (e.g. "canopy height"; '
                     "default: the attribute, or the raster's band description, else 'value')")  # fmt: skip
    fit.add_argument("--unit", default=None, help="their unit (e.g. m, Mg/ha; default: the raster's declared unit)")
    fit.add_argument("--seed", type=int, default=0, help="seed of the held-out draw")
    fit.add_argument("--val-table", default=None, help="held-out chips as such a table (with --table)")
    add_backbone_input_options(fit)
    scene = sub.add_parser("map", help="the regressor's value of every tile of georeferenced scenes: a float GeoTIFF, "
                           "GeoPackage and picture",
                           description="Cut each scene into a grid of tiles from its origin (by default covering the "
                           "ground the regressor's training tiles covered), predict each tile's value, and write "
                           "OUT/<stem>_tile_values.tif (one float32 pixel per tile, NaN = not predicted), "
                           "<stem>_tile_values.gpkg and <stem>_tile_values.png; for a regressor with prediction "
                           "intervals also <stem>_tile_interval.tif (their lower and upper ends) and "
                           "<stem>_tile_interval.png (their width).")  # fmt: skip
    scene.add_argument("scenes", nargs="+", help="georeferenced scenes (GeoTIFF or anything GDAL reads)")
    scene.add_argument("-o", "--out-dir", required=True, help="folder for the outputs (created)")
    scene.add_argument("--tile-size", type=int, default=None, help="tile side in scene pixels (default: the "
                       "regressor's training tiles' ground, in this scene's pixels)")  # fmt: skip
    scene.add_argument("--stride", type=int, default=None, help="a finer map: cells of STRIDE scene pixels, each "
                       "valued by the tile centred on it (default: the tile size)")  # fmt: skip
    scene.add_argument("--min-valid", type=float, default=0.5, help="share of a tile's pixels that must hold data "
                       "(default 0.5)")  # fmt: skip
    scene.add_argument("--bands", type=int, nargs="+", default=None, help="1-based scene bands fed to the backbone "
                       "(default: the regressor's)")  # fmt: skip
    scene.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat L1 collar)")
    test = sub.add_parser("test", help="score a regressor on the tiles of scenes that a reference covers: MAE, RMSE, "
                          "R2, bias, and how many references its prediction intervals hold")  # fmt: skip
    predict = sub.add_parser("predict", help="a regressor's value of image chips: a CSV (or, for georeferenced "
                             "chips, a GeoPackage of their footprints)")  # fmt: skip
    predict.add_argument("chips", nargs="+", help="chips: files, folders or quoted globs")
    predict.add_argument("-o", "--output", required=True, help="predictions CSV (path, value, and lower, upper for a "
                         "regressor with prediction intervals), or .gpkg / .geojson: the same on each georeferenced "
                         "chip's footprint")  # fmt: skip
    evaluate = sub.add_parser("evaluate", help="score a value map against a reference and estimate the mapped "
                              "area's mean and total with a confidence interval (no backbone)",
                              description="Summarise the reference over each cell of a value map ('regress map' "
                              "output, or any one-band float raster in its units), report MAE, RMSE, R2 and bias, and "
                              "the model-assisted (difference) estimate of the mean over the mapped cells: the map's "
                              "mean plus the reference cells' mean error, with a confidence interval, and the total "
                              "for a density per hectare or a share. The reference cells must be a random sample of "
                              "the mapped area for the estimate to hold.")  # fmt: skip
    evaluate.add_argument("map", help="the value map: OUT/<stem>_tile_values.tif from 'regress map'")
    evaluate.add_argument("values", nargs="+", help="the reference on the map's cells: rasters (files, a folder or a "
                          "quoted glob, one mosaic), or points / polygons with a numeric --attribute, in any CRS")  # fmt: skip
    evaluate.add_argument("--statistic", default=None, help="how a cell's reference values are summarised (default: "
                          "the map's, else mean)")  # fmt: skip
    evaluate.add_argument("--attribute", default=None, help="the points' or polygons' value column")
    evaluate.add_argument("--band", type=int, default=1, help="the reference raster's band (default 1)")
    evaluate.add_argument("--values-nodata", type=float, default=None, help="the reference raster's nodata override")
    evaluate.add_argument("--min-covered", type=float, default=0.5, help="share of a cell the reference raster or "
                          "polygons must cover (default 0.5)")  # fmt: skip
    evaluate.add_argument("--min-points", type=int, default=1, help="points a cell must hold (default 1)")
    evaluate.add_argument("--confidence", type=float, default=0.95, help="the estimate's confidence level (default 0.95)")
    evaluate.add_argument("--strata", default=None, help="a class raster (any CRS and resolution; each map cell takes "
                          "the class at its centre) of the strata the reference cells were drawn in: the stratified "
                          "estimate, each stratum weighed by its share of the mapped cells")  # fmt: skip
    evaluate.add_argument("--design", choices=("stratified", "post-stratified"), default="stratified",
                          help="with --strata: 'stratified' (a random sample within each stratum, the default) or "
                          "'post-stratified' (one random sample of the area, sorted into strata afterwards)")  # fmt: skip
    evaluate.add_argument("--out-dir", default=None, help="also write metrics.json, tiles.gpkg and scatter.png here")
    evaluate.add_argument("--overwrite", action="store_true", help="replace the report files of an earlier evaluation")
    for p in (fit, test):
        group = p.add_argument_group("chips with a value each (instead of --scenes)")
        group.add_argument("--table", default=None, help="a table (CSV, Parquet, JSONL) of 'image' (or 'path', relative "
                           "to the table) and a numeric column, one chip and its value per row"
                           + (" (held out: --val-table, else --val-fraction at random)" if p is fit else ""))  # fmt: skip
        group.add_argument("--value-column", default=None, help="the table's value column (default 'value', else its "
                           "only numeric one)")  # fmt: skip
        p.add_argument("--scenes", nargs="+", default=None, help="georeferenced scenes: their tiles (the grid "
                       "'regress map' predicts) take their values from --values")  # fmt: skip
        p.add_argument("--values", nargs="+", default=None, help="the reference: rasters (CHM, biomass map; files, "
                       "a folder or a quoted glob, read as one mosaic), or points / polygons (GeoPackage, GeoJSON, shapefile, or "
                       "a CSV with lon, lat columns) with a numeric --attribute, in any CRS")  # fmt: skip
        p.add_argument("--statistic", default=None, help=f"how a tile's reference values are summarised: "
                       f"{', '.join(STATISTICS)} (default mean; test: the regressor's)")  # fmt: skip
        p.add_argument("--attribute", default=None, help="the points' or polygons' value column (default: their only "
                       "numeric one)")  # fmt: skip
        p.add_argument("--band", type=int, default=1, help="the reference raster's band (default 1)")
        p.add_argument("--values-nodata", type=float, default=None, help="the reference raster's nodata override")
        p.add_argument("--tile-size", type=int, default=None, help="tile side in scene pixels" + (
            " (required, unless --embeddings records it)" if p is fit else " (default: the regressor's)"))  # fmt: skip
        p.add_argument("--min-covered", type=float, default=0.5, help="share of a tile the reference raster or "
                       "polygons must cover (default 0.5)")  # fmt: skip
        p.add_argument("--min-points", type=int, default=1, help="points a tile must hold (default 1)")
        p.add_argument("--min-valid", type=float, default=0.9, help="share of a tile's pixels that must hold imagery "
                       "(default 0.9)")  # fmt: skip
        p.add_argument("--out-dir", default=None, help="also write metrics.json, tiles.gpkg (each tile's reference "
                       "and prediction) and scatter.png here")  # fmt: skip
    test.add_argument("--regressor", required=True, help="a regressor from 'regress fit'")
    test.add_argument("--embeddings", default=None, help="a table of the scenes' tiles from 'embed SCENE --tiles N' "
                      "with the regressor's backbone: their embeddings are read, not computed again")  # fmt: skip
    test.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat L1 collar)")
    scene.add_argument("--regressor", required=True, help="a regressor from 'regress fit'")
    predict.add_argument("--regressor", required=True, help="a regressor from 'regress fit'")
    for p in (test, scene, predict):
        p.add_argument("--model", default=None, help="the backbone (default: the one the regressor was fitted on)")
        p.add_argument("--tta", choices=("flips", "d4"), default=None, help="test-time augmentation: the mean value of "
                       "the flipped (4 views) or flipped and quarter-turned (8) tiles")  # fmt: skip
    for p in (fit, test, scene, predict):
        add_tile_run_options(p)
    args = parser.parse_args(list(argv))
    try:
        {"fit": _fit, "map": _map, "test": _test, "predict": _predict, "evaluate": _evaluate}[args.action](args)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, ImportError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _report_paths(out_dir: Path | None, items: str = "tiles") -> list[Path]:
    """``metrics.json``, ``tiles.gpkg`` (chips: ``chips.csv``) and ``scatter.png`` in ``out_dir``."""
    table = "tiles.gpkg" if items == "tiles" else "chips.csv"
    return [out_dir / name for name in ("metrics.json", table, "scatter.png")] if out_dir is not None else []


def _check_report(args: Any, items: str = "tiles") -> Path | None:
    """``--out-dir``, its outputs checked for overwriting before anything is computed."""
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None and out_dir.is_dir():
        for path in _report_paths(out_dir, items):
            check_overwrite(path, args.overwrite, inputs=args.scenes or [])
    return out_dir


def _chips_or_scenes(args: Any) -> str:
    """``"chips"`` (``--table``) or ``"scenes"`` (``--scenes`` with ``--values``), refusing a mix or neither."""
    if args.table is not None:
        if args.scenes or args.values:
            raise ValueError("Give chips with their values (--table) or scenes with a reference (--scenes, --values), "
                             "not both.")  # fmt: skip
        return "chips"
    if not args.scenes or not args.values:
        raise ValueError("Give scenes and their reference values (--scenes SCENE --values REFERENCE), or chips with a "
                         "value each (--table chips.csv).")  # fmt: skip
    return "scenes"


def _one_or_many(values: Sequence[str] | None) -> Any:
    """``--values`` as ``value_tiles`` takes it: one path, or several rasters read as one mosaic."""
    if values is None or len(values) != 1:
        from dinov3_eo.data.labels import is_raster_labels

        if values is not None and not all(is_raster_labels(v) for v in values):
            raise ValueError(f"Several references are read as one raster mosaic; {list(values)} are not all rasters "
                             "(merge vector files into one).")  # fmt: skip
        return values
    return values[0]


def metrics_line(metrics: dict[str, float], unit: str | None) -> str:
    """``"n 63: MAE 7.65 m, RMSE 9.42 m, R² 0.12, bias -0.41 m"``."""
    u = f" {unit}" if unit else ""
    fmt = lambda v: "–" if v is None or math.isnan(v) else f"{v:.3g}"  # noqa: E731
    return (f"n {int(metrics['n'])}: MAE {fmt(metrics['mae'])}{u}, RMSE {fmt(metrics['rmse'])}{u}, "
            f"R² {fmt(metrics['r2'])}, bias {fmt(metrics['bias'])}{u}")  # fmt: skip


def _write_report(out_dir: Path, regressor: TileRegressor, tiles: Any, predicted: np.ndarray, target: np.ndarray,
                  metrics: dict[str, Any], overwrite: bool) -> None:  # fmt: skip
    """:func:`_write_scored` of a regressor's scores (its target and unit on the axes)."""
    items = "tiles" if hasattr(tiles, "geometry") else "chips"
    _write_scored(out_dir, tiles, predicted, target, metrics, overwrite, label=regressor.label,
                  title=f"{regressor.method} regressor, {len(predicted)} {items}", counted=items)  # fmt: skip


def _write_scored(out_dir: Path, tiles: Any, predicted: np.ndarray, target: np.ndarray, metrics: dict[str, Any],
                  overwrite: bool, *, label: str, title: str, counted: str) -> None:  # fmt: skip
    """``metrics.json``, ``tiles.gpkg`` (a table of chips, not a ``GeoDataFrame``: ``chips.csv``) and
    ``scatter.png`` (predicted against reference, axes named ``label``, points ``counted``) in ``out_dir``."""
    from dinov3_eo.tasks.height_plots import scatter_plot

    items = "tiles" if hasattr(tiles, "geometry") else "chips"
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_output(out_dir / "metrics.json", overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    if items == "tiles":
        write_vector(tiles, out_dir / "tiles.gpkg", layer="tiles", overwrite=overwrite)
    else:
        with atomic_output(out_dir / "chips.csv", overwrite=overwrite) as tmp:
            tiles.to_csv(tmp, index=False)
    scatter_plot(out_dir / "scatter.png", predicted, target, label=label, counted=counted, title=title,
                 overwrite=overwrite)  # fmt: skip
    print("\n".join(str(p) for p in _report_paths(out_dir, items)))


def _fit(args: Any) -> None:
    """``regress fit --scenes SCENE ... --values REF --tile-size N --model M -o regressor.safetensors``."""
    from dinov3_eo.tasks.chip_embeddings import load_chip_backbone, read_chip_embeddings
    from dinov3_eo.tasks.tile_regression import fit_tile_regressor

    if Path(args.output).suffix.lower() != ".safetensors":
        raise ValueError(f"The regressor is saved as safetensors: name it '.safetensors', not {args.output!r}.")
    if not 0.0 <= args.coverage < 1.0:
        raise ValueError(f"--coverage is the share of tiles the intervals should hold, in [0, 1) (0: no intervals); got "
                         f"{args.coverage}.")  # fmt: skip
    if _chips_or_scenes(args) == "chips":
        return _fit_chips(args)
    table = read_chip_embeddings(args.embeddings) if args.embeddings is not None else None
    if table is not None:
        args.tile_size = args.tile_size or table.metadata.get("tile_size")
    if args.tile_size is None:
        raise ValueError("Give the tile size in scene pixels (--tile-size): the ground each tile covers is what the "
                         "regressor learns to value, and what 'regress map' will cut.")  # fmt: skip
    if args.model is None and table is None:
        raise ValueError("Give the backbone that embeds the tiles (--model), or a table of them ('embed --tiles', "
                         "--embeddings).")  # fmt: skip
    check_overwrite(args.output, args.overwrite)
    out_dir = _check_report(args)
    backbone = load_chip_backbone(args.model, normalization=args.normalization, device=args.device) if table is None else None
    fit = fit_tile_regressor(
        args.scenes, _one_or_many(args.values), backbone, tile_size=args.tile_size, embeddings=table,
        statistic=args.statistic or "mean", attribute=args.attribute, band=args.band, values_nodata=args.values_nodata,
        val_values=_one_or_many(args.val_values), target=args.target, unit=args.unit, bands=args.bands, nodata=args.nodata,
        size=args.size or None, method=args.method, features=args.features, log_values=args.log, refit=args.refit,
        coverage=args.coverage or None, min_covered=args.min_covered,
        min_points=args.min_points, min_valid=args.min_valid, val_fraction=args.val_fraction, block=args.block,
        k=args.k, seed=args.seed, batch_size=args.batch_size, device=args.device, amp=args.bf16,
        progress=not args.quiet)  # fmt: skip
    regressor, tiles = fit.regressor, fit.tiles
    train = tiles["split"].to_numpy() == "train"
    reference = tiles["reference"].to_numpy(np.float64)
    split = "held out by --val-values" if args.val_values else f"in blocks of {args.block} x {args.block} tiles"
    print(f"{regressor.method} regressor of {'log ' if regressor.log_values else ''}{regressor.label} "
          f"({regressor.statistic} per tile) on {int(train.sum())} "
          f"{args.tile_size}-px tiles (reference {reference[train].min():.3g} to {reference[train].max():.3g}, mean "
          f"{reference[train].mean():.3g}){f'; alpha = {regressor.alpha:g}' if regressor.alpha is not None else ''}; "
          f"{int((~train).sum())} held-out tiles {split}" + (":" if (~train).any() else " (no held-out tiles: no score)"))  # fmt: skip
    if fit.held_out_predictions is not None:
        baseline = regression_metrics(np.full(int((~train).sum()), reference[train].mean()), fit.held_out_targets)
        print(f"  held out: {metrics_line(regressor.held_out, regressor.unit)}")
        print(f"  a constant at the training mean: {metrics_line(baseline, regressor.unit)}")
        if args.coverage:
            print(f"  {interval_line(regressor)}")
        if args.refit:
            print(f"  refitted on the {len(tiles)} training and held-out tiles, alpha kept")
        if out_dir is not None:
            _write_report(out_dir, regressor, tiles, fit.held_out_predictions, fit.held_out_targets,
                          {"held_out": regressor.held_out, "training_mean_baseline": baseline, "alpha": regressor.alpha,
                           "method": regressor.method, "target": regressor.target, "unit": regressor.unit,
                           "statistic": regressor.statistic, "train_tiles": int(train.sum()),
                           "interval": regressor.interval}, args.overwrite)  # fmt: skip
    regressor.save(args.output, overwrite=args.overwrite)
    print(args.output)


def _map(args: Any) -> None:
    """``regress map SCENE ... --regressor R -o OUT``."""
    from dinov3_eo.tasks.chip_classification import probe_backbone
    from dinov3_eo.tasks.tile_regression import regress_tiles, tile_value_outputs, write_tile_values

    check_distinct_stems(args.scenes)
    regressor = TileRegressor.load(args.regressor)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for scene in args.scenes:  # every output is checked before the first scene is predicted
        for path in tile_value_outputs(scene, args.out_dir, interval=regressor.interval is not None):
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=args.scenes)
    backbone = probe_backbone(regressor, args.model, device=args.device)
    for scene in args.scenes:
        result = regress_tiles(scene, regressor, backbone=backbone, tile_size=args.tile_size, stride=args.stride,
                               bands=args.bands, nodata=args.nodata, min_valid=args.min_valid,
                               batch_size=args.batch_size, tta=args.tta, amp=args.bf16, progress=not args.quiet)  # fmt: skip
        outputs = write_tile_values(result, args.out_dir, overwrite=args.overwrite)
        values = result.values[np.isfinite(result.values)]
        unit = f" {result.unit}" if result.unit else ""
        cells = f"{result.tile_size}-px tiles" if result.stride == result.tile_size else f"{result.stride}-px cells"
        total = result.total()
        print(f"{Path(scene).name}: {values.size} of {result.values.size} {cells} predicted: {result.target} mean "
              f"{values.mean():.3g}{unit}, from {values.min():.3g} to {values.max():.3g}{unit}"
              + (f"; in all {total[0]:,.4g} {total[1]}" if total else ""))  # fmt: skip
        if result.lower is not None:
            width = (result.upper - result.lower)[np.isfinite(result.values)]
            print(f"  {100 * result.coverage:.0f} % prediction intervals: width {np.median(width):.3g}{unit} "
                  f"(median), from {width.min():.3g} to {width.max():.3g}{unit}")  # fmt: skip
        print("\n".join(str(p) for p in outputs if p is not None))


def _test(args: Any) -> None:
    """``regress test --scenes SCENE ... --values REF --regressor R``."""
    from dinov3_eo.tasks.tile_regression import score_tile_regressor

    from dinov3_eo.tasks.chip_embeddings import read_chip_embeddings

    if _chips_or_scenes(args) == "chips":
        return _test_chips(args)
    out_dir = _check_report(args)
    regressor = TileRegressor.load(args.regressor)
    table = read_chip_embeddings(args.embeddings) if args.embeddings is not None else None
    scored = score_tile_regressor(
        regressor, args.scenes, _one_or_many(args.values), backbone=args.model, embeddings=table, tile_size=args.tile_size, statistic=args.statistic,
        attribute=args.attribute, band=args.band, values_nodata=args.values_nodata, min_covered=args.min_covered,
        min_points=args.min_points, min_valid=args.min_valid, nodata=args.nodata, tta=args.tta,
        batch_size=args.batch_size, device=args.device, amp=args.bf16, progress=not args.quiet)  # fmt: skip
    metrics = regression_metrics(scored.predictions, scored.targets)
    print(f"{regressor.method} regressor of {regressor.label} on {len(scored.tiles)} tiles of {len(args.scenes)} "
          f"scene{'s' if len(args.scenes) > 1 else ''}: {metrics_line(metrics, regressor.unit)}")  # fmt: skip
    report: dict[str, Any] = {"test": metrics, "target": regressor.target, "unit": regressor.unit,
                              "statistic": args.statistic or regressor.statistic}  # fmt: skip
    _report_baseline_and_interval(report, regressor, scored.targets, scored.lower, scored.upper, "tiles")
    if out_dir is not None:
        _write_report(out_dir, regressor, scored.tiles, scored.predictions, scored.targets, report, args.overwrite)


def _report_baseline_and_interval(report: dict[str, Any], regressor: TileRegressor, targets: np.ndarray,
                                  lower: np.ndarray | None, upper: np.ndarray | None, items: str) -> None:  # fmt: skip
    """Add (and print) the training-mean baseline's scores and, with intervals, how many ``targets`` they held to a
    test's ``report``."""
    mean = regressor.embedding.get("tiles", {}).get("train_mean")
    if mean is not None:
        report["training_mean_baseline"] = regression_metrics(np.full(len(targets), mean), targets)
        print(f"  a constant at the training mean: {metrics_line(report['training_mean_baseline'], regressor.unit)}")
    if lower is not None:
        scores = report["interval"] = interval_metrics(lower, upper, targets, regressor.interval["coverage"])
        unit = f" {regressor.unit}" if regressor.unit else ""
        print(f"  {100 * scores['coverage']:.0f} % prediction intervals: {100 * scores['covered']:.1f} % of the "
              f"{scores['n']} {items} inside, width {scores['median_width']:.3g}{unit} (median), "
              f"{scores['mean_width']:.3g}{unit} (mean)")  # fmt: skip


def _fit_chips(args: Any) -> None:
    """``regress fit --table chips.csv --model M -o regressor.safetensors``: a regressor on chips with a value each."""
    import pandas as pd

    from dinov3_eo.data.chip_labels import table_values
    from dinov3_eo.tasks.chip_classification import typical_chip_ground, typical_chip_size
    from dinov3_eo.tasks.chip_embeddings import chip_features
    from dinov3_eo.tasks.classify_cli import chip_embedder
    from dinov3_eo.tasks.tile_regression import fit_regressor

    given = [name for name, value in (("--val-values", args.val_values), ("--statistic", args.statistic),
                                      ("--attribute", args.attribute), ("--tile-size", args.tile_size)) if value]  # fmt: skip
    if given:
        raise ValueError(f"With --table each chip carries its value: leave out {', '.join(given)} (held-out chips: "
                         "--val-table).")  # fmt: skip
    check_overwrite(args.output, args.overwrite)
    out_dir = _check_report(args, "chips")
    paths, y = table_values(args.table, args.value_column)
    if args.val_table is not None:
        val_paths, val_y = table_values(args.val_table, args.value_column)
        train = np.arange(len(paths))
    else:
        if not 0.0 <= args.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}.")
        order = np.random.default_rng(args.seed).permutation(len(paths))
        n_held = min(int(round(args.val_fraction * len(paths))), len(paths) - 2)
        train, held = np.sort(order[n_held:]), np.sort(order[:n_held])
        val_paths, val_y = [paths[i] for i in held], y[held]
    embedded_of, _, made = chip_embedder(args, args.size or None)
    embedded = embedded_of(paths)
    x = chip_features(embedded, args.features)
    vx = chip_features(embedded_of(val_paths), args.features) if len(val_y) else None
    regressor = fit_regressor(x[train], y[train], method=args.method, features=args.features, k=args.k,
                              val=(vx, val_y) if vx is not None else None, log_values=args.log,
                              lower=0.0 if y[train].min() >= 0 else None)  # fmt: skip
    chip_size = typical_chip_size(embedded.sizes)
    regressor.target = args.target or args.value_column or "value"
    regressor.unit, regressor.statistic = args.unit, "chip"
    regressor.embedding = {**made, "backbone": embedded.metadata.get("backbone"), "chip_size": chip_size,
                           "tile_m": typical_chip_ground(paths, chip_size[0]) if chip_size[0] == chip_size[1] else None,
                           "tiles": {"table": str(Path(args.table).resolve()), "train_tiles": len(train),
                                     "held_out_tiles": int(len(val_y)), "train_mean": float(y[train].mean())}}  # fmt: skip
    print(f"{regressor.method} regressor of {'log ' if regressor.log_values else ''}{regressor.label} on {len(train)} "
          f"chips (values {y[train].min():.3g} to "
          f"{y[train].max():.3g}, mean {y[train].mean():.3g}){f'; alpha = {regressor.alpha:g}' if regressor.alpha is not None else ''}"
          f"; {len(val_y)} held-out chips" + (":" if len(val_y) else " (no held-out chips: no score)"))  # fmt: skip
    if len(val_y):
        predicted = regressor.predict(vx)
        regressor.held_out = regression_metrics(predicted, val_y)
        baseline = regression_metrics(np.full(len(val_y), y[train].mean()), val_y)
        print(f"  held out: {metrics_line(regressor.held_out, regressor.unit)}")
        print(f"  a constant at the training mean: {metrics_line(baseline, regressor.unit)}")
        if args.coverage:
            from dinov3_eo.tasks.tile_regression import calibrated

            regressor = calibrated(regressor, vx, val_y, args.coverage)
            print(f"  {interval_line(regressor, 'chips')}")
        if args.refit:
            from dinov3_eo.tasks.tile_regression import refitted

            regressor = refitted(regressor, np.concatenate([x[train], vx]), np.concatenate([y[train], val_y]))
            regressor.embedding["tiles"]["refit"] = True
            print(f"  refitted on the {len(train) + len(val_y)} training and held-out chips, alpha kept")
        if out_dir is not None:
            rows = pd.DataFrame({"path": val_paths, "reference": val_y, "predicted": predicted, "error": predicted - val_y})
            _write_report(out_dir, regressor, rows, predicted, val_y,
                          {"held_out": regressor.held_out, "training_mean_baseline": baseline, "alpha": regressor.alpha,
                           "method": regressor.method, "target": regressor.target, "unit": regressor.unit,
                           "train_chips": len(train), "interval": regressor.interval}, args.overwrite)  # fmt: skip
    regressor.save(args.output, overwrite=args.overwrite)
    print(args.output)


def _chip_values(args: Any, paths: Sequence[str]) -> tuple[TileRegressor, np.ndarray, np.ndarray | None]:
    """The regressor ``--regressor``, its values ``[N]`` of chips ``paths``, embedded as its chips or tiles were,
    and their prediction intervals ``[N, 2]`` (``None`` without; with ``--tta``, each the mean over the views)."""
    from dinov3_eo.tasks.chip_embeddings import chip_features
    from dinov3_eo.tasks.classify_cli import probe_chip_views

    regressor = TileRegressor.load(args.regressor)
    views = probe_chip_views(args, regressor, paths)
    outputs = sum(regressor.outputs(chip_features(v, regressor.features)) for v in views) / len(views)  # [1 or 3, N]
    return regressor, outputs[0], outputs[1:].T if regressor.interval is not None else None


def _test_chips(args: Any) -> None:
    """``regress test --table chips.csv --regressor R``."""
    import pandas as pd

    from dinov3_eo.data.chip_labels import table_values

    out_dir = _check_report(args, "chips")
    paths, y = table_values(args.table, args.value_column)
    regressor, predicted, ends = _chip_values(args, paths)
    metrics = regression_metrics(predicted, y)
    print(f"{regressor.method} regressor of {regressor.label} on {len(paths)} chips: {metrics_line(metrics, regressor.unit)}")
    report: dict[str, Any] = {"test": metrics, "target": regressor.target, "unit": regressor.unit}
    lower, upper = (ends[:, 0], ends[:, 1]) if ends is not None else (None, None)
    _report_baseline_and_interval(report, regressor, y, lower, upper, "chips")
    if out_dir is not None:
        rows = pd.DataFrame({"path": paths, "reference": y, "predicted": predicted, "error": predicted - y})
        if ends is not None:
            rows["lower"], rows["upper"], rows["inside"] = lower, upper, (y >= lower) & (y <= upper)
        _write_report(out_dir, regressor, rows, predicted, y, report, args.overwrite)


def _strata_on_grid(path: str, *, crs: Any, transform: Any, shape: tuple[int, int]) -> tuple[np.ndarray, dict[int, str]]:
    """A class raster's class at each cell centre of a grid (``-1``: nodata or outside it), and its class names."""
    from dinov3_eo.data.labels import RasterLabels

    source = RasterLabels(path=path, ignore_index=-1)
    classes, labelled = source.read(crs=crs, transform=transform, shape=shape)
    return np.where(labelled, classes.astype(np.int64), -1), dict(source.class_names)


def _evaluate(args: Any) -> None:
    """``regress evaluate MAP.tif REFERENCE``: a written value map scored on a reference's cells, and the
    model-assisted mean (and total) of the mapped area."""
    import rasterio

    from dinov3_eo.data.raster import open_quietly, pixel_area_ha
    from dinov3_eo.tasks.map_estimate import difference_estimate, stratified_difference_estimate, total_unit
    from dinov3_eo.tasks.tile_values import value_tiles

    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None and out_dir.is_dir():
        for path in _report_paths(out_dir):
            check_overwrite(path, args.overwrite, inputs=[args.map, *args.values])
    with open_quietly(args.map) as src:
        if src.count != 1:
            raise ValueError(f"{args.map} has {src.count} bands; a value map has one ('regress map' writes "
                             "<stem>_tile_values.tif).")  # fmt: skip
        values = src.read(1, masked=True).astype(np.float64).filled(np.nan)
        tags, crs, transform = src.tags(), src.crs, src.transform
        target = src.descriptions[0] or tags.get("target") or "value"
        unit = src.units[0] or tags.get("unit") or None
    statistic = args.statistic or tags.get("statistic") or "mean"
    cells = value_tiles(args.map, _one_or_many(args.values), tile_size=1, statistic=statistic, attribute=args.attribute,
                        band=args.band, nodata=args.values_nodata, min_valid=args.min_covered,
                        min_points=args.min_points)  # fmt: skip
    predicted = values[cells.rows, cells.cols]
    mapped = np.isfinite(predicted)
    if mapped.sum() < 2:
        raise ValueError(f"{int(mapped.sum())} of the {len(cells)} cells with a reference value hold a map value; "
                         f"check that {args.map} and the reference cover the same ground.")  # fmt: skip
    cells, predicted = cells.take(mapped), predicted[mapped]
    metrics = regression_metrics(predicted, cells.values)
    if args.strata:
        strata, names = _strata_on_grid(args.strata, crs=crs, transform=transform, shape=values.shape)
        estimate = stratified_difference_estimate(values, strata, predicted, cells.values, strata[cells.rows, cells.cols],
                                                  design=args.design, confidence=args.confidence)  # fmt: skip
        for row in estimate.strata:
            row["name"] = names.get(row["stratum"], str(row["stratum"]))
        if (left := int((np.isfinite(values) & (strata < 0)).sum())):
            print(f"  {left:,} mapped cells outside every stratum of {Path(args.strata).name} are left out")
    else:
        estimate = difference_estimate(values, predicted, cells.values, confidence=args.confidence)
    u = f" {unit}" if unit else ""
    print(f"{Path(args.map).name}: {target}{f' ({unit})' if unit else ''} on {len(cells)} reference cells: "
          f"{metrics_line(metrics, unit)}")  # fmt: skip
    percent = f"{100 * estimate.confidence:.0f} %"
    print(f"  mean over the {estimate.cells:,} mapped cells: the map's {estimate.map_mean:.4g}{u}; model-assisted "
          f"{estimate.mean:.4g}{u} (SE {estimate.standard_error:.3g}, {percent} interval {estimate.low:.4g} to "
          f"{estimate.high:.4g}{u}); the reference cells alone {estimate.sample_mean:.4g}{u} (SE "
          f"{estimate.sample_standard_error:.3g})" + (f", the map {estimate.relative_efficiency:.2g}x as efficient"
                                                       if math.isfinite(estimate.relative_efficiency) else ""))  # fmt: skip
    for row in estimate.strata:
        print(f"    {row['name']}: {row['cells']:,} cells ({100 * row['weight']:.1f} %), {row['n']} reference cells, "
              f"map {row['map_mean']:.4g}{u}, model-assisted {row['mean']:.4g}{u} (SE {row['standard_error']:.3g})")
    report: dict[str, Any] = {"map": str(args.map), "target": target, "unit": unit, "statistic": statistic,
                              "test": metrics, "estimate": estimate.to_dict()}  # fmt: skip
    hectares, summed = pixel_area_ha(crs, transform), total_unit(unit, statistic)
    if hectares is not None and summed is not None:
        area = hectares * estimate.cells
        total = report["total"] = {**estimate.scaled(area), "hectares": area, "unit": summed}
        print(f"  in all over {area:,.4g} ha: the map's {total['map_total']:,.4g} {total['unit']}; model-assisted "
              f"{total['total']:,.4g} {total['unit']} ({percent} interval {total['low']:,.4g} to {total['high']:,.4g})")  # fmt: skip
    ends_path = Path(args.map).with_name(Path(args.map).name.replace("_tile_values.tif", "_tile_interval.tif"))
    if ends_path != Path(args.map) and ends_path.is_file():  # 'regress map' wrote the regressor's intervals beside it
        with rasterio.open(ends_path) as ends:
            lower, upper = (ends.read(b)[cells.rows, cells.cols].astype(np.float64) for b in (1, 2))
            coverage = float(ends.tags().get("coverage", "nan"))
        report["interval"] = interval_metrics(lower, upper, cells.values, coverage)
        print(f"  {100 * coverage:.0f} % prediction intervals ({ends_path.name}): "
              f"{100 * report['interval']['covered']:.1f} % of the {report['interval']['n']} reference cells inside")  # fmt: skip
    if out_dir is not None:
        frame = cells.to_geodataframe({"predicted": predicted, "error": predicted - cells.values})
        _write_scored(out_dir, frame, predicted, cells.values, report, args.overwrite,
                      label=f"{target}{f' ({unit})' if unit else ''}", title=f"{Path(args.map).name}, {len(cells)} cells",
                      counted="cells")  # fmt: skip


def _predict(args: Any) -> None:
    """``regress predict CHIPS --regressor R -o predictions.csv|.gpkg``."""
    import pandas as pd

    from dinov3_eo.data.datasets import expand_chips
    from dinov3_eo.inference.writers import VECTOR_FORMATS

    check_overwrite(args.output, args.overwrite)
    paths = expand_chips(args.chips)
    regressor, predicted, ends = _chip_values(args, paths)
    frame = pd.DataFrame({"path": paths, "value": predicted})
    if ends is not None:
        frame["lower"], frame["upper"] = ends[:, 0], ends[:, 1]
    if Path(args.output).suffix.lower() in VECTOR_FORMATS:
        import geopandas as gpd

        from dinov3_eo.tasks.chip_classification import chip_footprints

        write_vector(gpd.GeoDataFrame(frame, geometry=chip_footprints(paths)), args.output, layer="predictions",
                     overwrite=args.overwrite)  # fmt: skip
    else:
        with atomic_output(args.output, overwrite=args.overwrite) as tmp:
            frame.to_csv(tmp, index=False)
    unit = f" {regressor.unit}" if regressor.unit else ""
    print(f"{len(paths)} chips: {regressor.target} mean {predicted.mean():.3g}{unit}, from {predicted.min():.3g} to "
          f"{predicted.max():.3g}{unit}")  # fmt: skip
    print(args.output)


__all__ = ["metrics_line", "regress_main"]
