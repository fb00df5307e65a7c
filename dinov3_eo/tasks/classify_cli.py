"""``dinov3-eo classify``: the command line of the chip and tile probes.

``fit`` (chips in class folders or a label table, or with ``--scenes`` the tiles of scenes labelled by polygons or a
label raster), ``test``, ``predict`` and ``map``; the work is done by :mod:`~dinov3_eo.tasks.chip_classification`
(probes), :mod:`~dinov3_eo.tasks.chip_embeddings`, :mod:`~dinov3_eo.tasks.chip_finetune`,
:mod:`~dinov3_eo.tasks.tile_classification` (maps) and :mod:`~dinov3_eo.tasks.tile_probe` (probes from scenes).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_eo.data.chip_labels import label_matrix, labelled_chips, stratified_split, table_multilabels
from dinov3_eo.inference.writers import check_distinct_stems, check_overwrite, write_vector
from dinov3_eo.tasks.chip_classification import (
    FEATURES,
    METHODS,
    VECTOR_SUFFIXES,
    ChipClassifier,
    fit_chip_classifier,
    probe_backbone,
    typical_chip_ground,
    typical_chip_size,
    write_prediction_map,
    write_predictions,
)
from dinov3_eo.tasks.chip_embeddings import ChipBackbone, chip_features, embed_chip_views, embed_chips_with, load_chip_backbone
from dinov3_eo.tasks.zone_classification import refuse_zone_probe


def _class_ids(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup[name] for name in labels], dtype=np.int64)


def print_probe_report(probe: ChipClassifier, scores: np.ndarray, y: np.ndarray, out_dir: Path | None, *,
                       threshold: float | None = None, unit: str = "chips") -> dict[str, Any]:  # fmt: skip
    """Print (and with ``out_dir`` write) the scores of ``scores`` against ``y`` (class ids, or ``[N, K]`` targets of
    a multi-label probe, at ``threshold``, default the probe's); ``unit``: what was classified (chips, tiles)."""
    from dinov3_eo.tasks.segmentation_eval import accuracy_report, confusion_matrix, report_table, write_accuracy_report

    classes = probe.classes
    if probe.multi_label:
        from dinov3_eo.tasks.multilabel_metrics import multilabel_report, multilabel_table, write_multilabel_report

        report = multilabel_report(scores, y, classes, threshold=probe.threshold if threshold is None else threshold)
        print(multilabel_table(report))
        if out_dir is not None:
            write_multilabel_report(out_dir, report)
        return report
    confusion = confusion_matrix(scores.argmax(1), y, len(classes))
    report = accuracy_report(confusion, classes)
    recalls = [m["recall"] for m in report["classes"].values() if m["reference_pixels"]]
    report["balanced_accuracy"] = float(np.mean(recalls)) if recalls else float("nan")  # mean recall over classes
    report["confusion"] = confusion.tolist()
    print(report_table(report).replace(" pixels", f" {unit}").replace("reference px", unit))
    print(f"balanced accuracy {report['balanced_accuracy']:.3f} (mean recall over the classes present)")
    if probe.sets is not None:
        from dinov3_eo.tasks.conformal import set_metrics

        sets = report["prediction_sets"] = {**set_metrics(probe.prediction_sets(scores), y, probe.sets["coverage"]),
                                            "threshold": probe.sets["threshold"]}  # fmt: skip
        print(f"{100 * sets['coverage']:.0f} % prediction sets (a class joins at p >= {sets['threshold']:.3g}): "
              f"{100 * sets['covered']:.1f} % of the {sets['n']} {unit} hold their class; mean size "
              f"{sets['mean_size']:.2f}, {100 * sets['singletons']:.0f} % one class, {100 * sets['empty']:.0f} % none")  # fmt: skip
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_accuracy_report(out_dir, report, confusion, classes)
    return report


def classify_main(argv: Sequence[str]) -> int:
    """``dinov3-eo classify fit CHIPS --model BACKBONE -o probe.safetensors`` / ``classify test CHIPS --probe
    probe.safetensors`` / ``classify predict CHIPS --probe probe.safetensors -o predictions.csv``; returns the exit
    code."""
    import argparse
    import sys

    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.tasks.features import BACKBONE_HELP, add_backbone_input_options, add_tile_run_options

    prog = "dinov3-eo classify"
    parser = argparse.ArgumentParser(prog=prog, description="Scene classification of image chips on frozen DINOv3 "
                                     "features: a linear probe or k-NN on chip embeddings.")  # fmt: skip
    sub = parser.add_subparsers(dest="action", required=True)
    fit = sub.add_parser("fit", help="embed labelled chips (one folder per class, or a label table) and fit a probe",
                         description="Embed chips laid out one folder per class (CHIPS/Forest/x.jpg: the folder names "
                         "the class), fit a linear probe (C chosen on held-out chips) or keep them for a k-NN, report "
                         "the held-out accuracy, and save the probe.")  # fmt: skip
    fit.add_argument("chips", nargs="*", help="training chips: folders (searched recursively) or quoted globs; each "
                     "chip's class is its folder's name")  # fmt: skip
    fit.add_argument("--model", default=None, help=BACKBONE_HELP + " (default with --embeddings: the table's)")
    fit.add_argument("--embeddings", default=None, help="a table from 'embed --chips' holding the labelled chips (with "
                     "--scenes: from 'embed SCENE --tiles N'): their embeddings are read, not computed again (the "
                     "table's backbone, size, bands and normalisation hold), so probes fit in seconds")  # fmt: skip
    fit.add_argument("-o", "--output", required=True, help="the probe (.safetensors)")
    fit.add_argument("--zones", nargs="+", default=None, metavar="TABLE", help="instead of chips, polygons embedded by 'embed "
                     "SCENE --zones POLYGONS -o TABLE.parquet' (parcels, crowns): those with a class in --label-column "
                     "are fitted on")  # fmt: skip
    fit.add_argument("--label-column", default="label", help="with --zones, the column naming each polygon's class "
                     "(default 'label'; polygons without one are left out); with --zones and --labels POINTS, the "
                     "points' class column")  # fmt: skip
    fit.add_argument("--labels", default=None, help="instead of class folders, a table (CSV, Parquet, JSONL) of "
                     "'image' (or 'path', relative to the table) and 'label' columns, as benchmarks list their splits; "
                     "with --zones, labelled points (field plots): each polygon takes the most common class of the "
                     "points inside it")  # fmt: skip
    fit.add_argument("--val-labels", default=None, help="held-out chips as such a table (instead of --val folders)")
    fit.add_argument("--multi-label", action="store_true", help="each chip may carry several classes (BigEarthNet): "
                     "the --labels table's label cell is a list, or classes joined by --label-separator; one-vs-rest "
                     "probes, C chosen by held-out mAP")  # fmt: skip
    fit.add_argument("--threshold", type=float, default=0.5, help="multi-label: a class is predicted at probability "
                     ">= THRESHOLD (default 0.5; stored in the probe)")  # fmt: skip
    fit.add_argument("--val", nargs="+", default=None, help="held-out chips (class folders as for CHIPS); default: "
                     "--val-fraction of each class")  # fmt: skip
    fit.add_argument("--val-fraction", type=float, default=0.2, help="share of each class held out (default 0.2)")
    fit.add_argument("--method", choices=METHODS, default="linear", help="linear probe (default) or k-NN")
    fit.add_argument("--coverage", type=float, default=0.9, help="the held-out chips (tiles) calibrate "
                     "split-conformal prediction sets of this coverage (default 0.9: the set holds the true class nine "
                     "times in ten; 0: none): the classes a chip may be, for 'predict' (set column), 'map' "
                     "(<stem>_tile_set_size.tif) and 'test'")  # fmt: skip
    fit.add_argument("--balanced", action="store_true", help="weigh each class's chips by the inverse of its frequency "
                     "and choose C by balanced accuracy (mean recall): rare classes count as much as common ones")  # fmt: skip
    fit.add_argument("--features", choices=FEATURES, default="cls+patch_mean",
                     help="embedding columns fed to the probe (default cls+patch_mean, dino.txt's image embedding)")
    fit.add_argument("-k", type=int, default=20, help="neighbours of the k-NN (default 20)")
    fit.add_argument("--size", type=int, default=224, help="chips resized to SIZE x SIZE (default 224; 0: own size)")
    fit.add_argument("--out-dir", default=None, help="also write metrics.json, confusion.csv and confusion.png of the "
                     "held-out chips here")  # fmt: skip
    fit.add_argument("--seed", type=int, default=0, help="seed of the held-out draw (and of the fine-tuning)")
    tune = fit.add_argument_group("fine-tuning (LP-FT: the fitted linear probe and its backbone trained together)")
    tune.add_argument("--finetune-epochs", type=int, default=0, help="epochs of fine-tuning after the linear probe "
                      "(default 0: none); the best held-out epoch is kept, the backbone exported beside the probe")  # fmt: skip
    tune.add_argument("--finetune-lr", type=float, default=1e-5, help="peak learning rate of the backbone (default 1e-5)")
    tune.add_argument("--finetune-head-lr", type=float, default=1e-3, help="peak learning rate of the head (default 1e-3)")
    tune.add_argument("--finetune-blocks", type=int, default=None, help="train only the last N blocks (default: all)")
    tune.add_argument("--workers", type=int, default=0, help="data-loading processes of the fine-tuning (default 0)")
    add_backbone_input_options(fit)
    _add_scene_label_options(fit, fitting=True)
    predict = sub.add_parser("predict", help="classify chips with a probe: a CSV of classes and probabilities")
    predict.add_argument("chips", nargs="*", help="chips: files, folders or quoted globs")
    predict.add_argument("--zones", nargs="+", default=None, metavar="TABLE", help="instead of chips, polygons embedded by "
                         "'embed --zones' (a probe fitted with --zones): OUTPUT (.gpkg, .geojson, .csv or .parquet) "
                         "holds each polygon with class, score and p_<class>")  # fmt: skip
    predict.add_argument("--raster", default=None, metavar="SCENE", help="with --zones, also burn the polygons' "
                         "classes onto this scene's grid: OUTPUT_classes.tif (class COG) and OUTPUT_classes.png")  # fmt: skip
    predict.add_argument("--probe", required=True, help="a probe from 'classify fit'")
    predict.add_argument("-o", "--output", required=True, help="predictions CSV (path, class, score, p_<class> ...), or "
                         ".gpkg / .geojson: the same on each georeferenced chip's footprint (in the first chip's CRS)")  # fmt: skip
    predict.add_argument("--model", default=None, help="the backbone (default: the one the probe was fitted on)")
    test = sub.add_parser("test", help="score a probe on labelled chips (one folder per class): accuracy, per "
                          "class, confusion",
                          description="Score a probe on held-out chips laid out one folder per class (a benchmark's "
                          "test split): the accuracy table, and with --out-dir metrics.json and confusion.csv/png.")  # fmt: skip
    test.add_argument("chips", nargs="*", help="test chips: folders or quoted globs; each chip's class is its folder's name")
    test.add_argument("--labels", default=None, help="instead of class folders, a table (CSV, Parquet, JSONL) of "
                      "'image' (or 'path', relative to the table) and 'label' columns; with --zones, labelled points "
                      "(each polygon takes the most common class of its points)")  # fmt: skip
    test.add_argument("--probe", required=True, help="a probe from 'classify fit'")
    test.add_argument("--zones", nargs="+", default=None, metavar="TABLE", help="instead of chips, labelled polygons embedded by "
                      "'embed --zones' (a probe fitted with --zones)")  # fmt: skip
    test.add_argument("--label-column", default="label", help="with --zones, the column naming each polygon's class")
    test.add_argument("--out-dir", default=None, help="write metrics.json, confusion.csv and confusion.png here")
    test.add_argument("--model", default=None, help="the backbone (default: the one the probe was fitted on)")
    _add_scene_label_options(test, fitting=False)
    zero = sub.add_parser("zero-shot", help="a probe from text alone (dino.txt zero-shot): class names against a text "
                          "model's image embeddings, for predict / test / map",
                          description="Make a probe without a labelled chip: each class name (free text, ensembled "
                          "over prompt templates) is embedded by a text model ('dinov3-eo text fit'), and chips or tiles "
                          "are classified by the similarity of their image embedding to each, as dino.txt's zero-shot "
                          "classification. 'classify predict', 'test' and 'map' take the probe as any other.")  # fmt: skip
    zero.add_argument("--model", required=True, help="a text model: a 'dinov3-eo text fit' checkpoint or exported model")
    zero.add_argument("--classes", nargs="+", required=True, help='class names, e.g. forest water "solar farm"')
    zero.add_argument("-o", "--output", required=True, help="the probe (.safetensors)")
    zero.add_argument("--templates", default=None, help="prompt templates file (default: the model's)")
    zero.add_argument("--size", type=int, default=224, help="chips resized to SIZE x SIZE (default 224; 0: own size)")
    zero.add_argument("--tile-size", type=int, default=None, help="the tile side in scene pixels 'classify map' cuts "
                      "by default")  # fmt: skip
    zero.add_argument("--normalization", default=None, choices=["none", "imagenet", "sat493m", "chmv2"],
                      help="override the text model's input normalisation")  # fmt: skip
    zero.add_argument("--overwrite", action="store_true", help="replace an existing probe")
    scene = sub.add_parser("map", help="classify georeferenced scenes tile by tile: a class map of tiles (GeoTIFF, "
                           "GeoPackage, quick-look)",
                           description="Cut each scene into a grid of tiles from its origin (by default of the probe's "
                           "training chip size, in scene pixels), classify each tile as a chip, and write "
                           "OUT/<stem>_tile_classes.tif (one pixel per tile, 255 = not classified), <stem>_tiles.gpkg "
                           "(a polygon per tile with class, score and p_<class>) and <stem>_tile_quicklook.png.")  # fmt: skip
    scene.add_argument("scenes", nargs="+", help="georeferenced scenes (GeoTIFF or anything GDAL reads)")
    scene.add_argument("--probe", required=True, help="a probe from 'classify fit'")
    scene.add_argument("-o", "--out-dir", required=True, help="folder for the outputs (created)")
    scene.add_argument("--tile-size", type=int, default=None, help="tile side in scene pixels (default: the probe's "
                       "training chip size; choose it so a tile covers the ground a training chip covered)")  # fmt: skip
    scene.add_argument("--stride", type=int, default=None, help="a finer map: cells of STRIDE scene pixels, each "
                       "classified by the tile centred on it (default: the tile size, one tile per cell)")  # fmt: skip
    scene.add_argument("--min-valid", type=float, default=0.5, help="share of a tile's pixels that must hold data for "
                       "it to be classified (default 0.5; tiles past the scene's edge are padded as no data)")  # fmt: skip
    scene.add_argument("--bands", type=int, nargs="+", default=None, help="1-based scene bands fed to the backbone "
                       "(default: the probe's chip bands, else all)")  # fmt: skip
    scene.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat L1 collar)")
    scene.add_argument("--quicklook-bands", type=int, nargs="+", default=None, help="bands shown as red, green, blue "
                       "in the quick-look (default: the bands classified, else 1 2 3)")  # fmt: skip
    scene.add_argument("--min-score", type=float, default=None, help="map a tile whose most probable class has a lower "
                       "probability as 'unknown' (an extra class): land the probe was not taught is flagged")  # fmt: skip
    scene.add_argument("--probabilities", action="store_true", help="also write <stem>_tile_probabilities.tif, one "
                       "float32 band per class")  # fmt: skip
    scene.add_argument("--suggest", type=int, default=0, metavar="N", help="also write <stem>_suggest.gpkg: the N tiles "
                       "the probe is least sure of (smallest margin between its two most probable classes), the ones to "
                       "label next")  # fmt: skip
    scene.add_argument("--model", default=None, help="the backbone (default: the one the probe was fitted on)")
    for p in (fit, test):
        p.add_argument("--label-separator", default=";", help="multi-label: what joins a chip's classes in a text "
                       "label cell (default ';')")  # fmt: skip
    for p in (predict, test, scene):
        p.add_argument("--tta", choices=("flips", "d4"), default=None, help="test-time augmentation: the mean of the "
                       "class probabilities of the flipped (flips: 4 views) or flipped and quarter-turned (d4: 8) chips; "
                       "one model call per view")  # fmt: skip
    for p in (predict, test):
        p.add_argument("--threshold", type=float, default=None, help="multi-label probe: the probability a class "
                       "needs to be predicted (default: the probe's)")  # fmt: skip
    for p in (fit, predict, test, scene):
        add_tile_run_options(p)
    args = parser.parse_args(list(argv))
    try:
        {"fit": _fit, "predict": _predict, "test": _test, "map": _map, "zero-shot": _zero_shot}[args.action](args)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _add_scene_label_options(parser: Any, *, fitting: bool) -> None:
    """``--scenes`` and how their tiles are labelled: a probe fitted (or scored) on the tiles of scenes that polygons
    or a label raster (``--labels``) label, no chips cut (:mod:`~dinov3_eo.tasks.tile_probe`)."""
    group = parser.add_argument_group("tiles of scenes labelled by polygons or a label raster (instead of chips)")
    group.add_argument("--scenes", nargs="+", default=None, help="georeferenced scenes: their tiles (the grid 'classify "
                       "map' classifies) are labelled by --labels, polygons (GeoPackage, GeoJSON, shapefile ...) or a "
                       "label raster of class ids, in any CRS" + ("; --val-labels: held-out ones" if fitting else ""))  # fmt: skip
    group.add_argument("--tile-size", type=int, default=None, help="tile side in scene pixels" + (
        " (required with --scenes)" if fitting else " (default: the probe's)"))  # fmt: skip
    group.add_argument("--attribute", default="name", help="the polygons' class column (default 'name')")
    group.add_argument("--class-names", nargs="+", default=None, help="names of a label raster's ids 0, 1, ... "
                       "(default: its class_names tag, else 'class <id>')")  # fmt: skip
    group.add_argument("--purity", type=float, default=0.6, help="a tile takes its most common class where that class "
                       "covers this share of its labelled pixels (default 0.6); mixed tiles are left out")  # fmt: skip
    group.add_argument("--presence", type=float, default=0.1, help="multi-label: a tile carries every class covering "
                       "this share of its labelled pixels (default 0.1)")  # fmt: skip
    group.add_argument("--min-labelled", type=float, default=0.5, help="share of a tile's pixels that must be labelled "
                       "(default 0.5)")  # fmt: skip
    group.add_argument("--min-valid", type=float, default=0.9, help="share of a tile's pixels that must hold data "
                       "(default 0.9)")  # fmt: skip
    if fitting:
        group.add_argument("--block", type=int, default=4, help="held-out tiles are whole blocks of BLOCK x BLOCK tiles "
                           "(default 4), --val-fraction of them: neighbouring tiles look alike, and a random split "
                           "would score the probe too kindly")  # fmt: skip
    else:
        group.add_argument("--nodata", type=float, default=None, help="input nodata override (e.g. 0 for a Landsat "
                           "L1 collar)")  # fmt: skip


def _chip_labels(args: Any, chips: Sequence[str], table: str | None, multi_label: bool) -> tuple[list[str], list[Any]]:
    """Chips and their labels (class names; class-name lists for a multi-label probe)."""
    if not multi_label:
        return labelled_chips(chips, table)
    if chips or not table:
        raise ValueError("Multi-label chips come from a label table (--labels, and --val-labels for held-out chips): "
                         "class folders give one class per chip.")  # fmt: skip
    return table_multilabels(table, args.label_separator)


def _fit(args: Any) -> None:
    if Path(args.output).suffix.lower() != ".safetensors":
        raise ValueError(f"The probe is written as .safetensors, not {args.output!r}.")
    held_given = args.val is not None or args.val_labels is not None
    if not 0.0 < args.val_fraction < 1.0 and not held_given:
        raise ValueError(f"--val-fraction must lie between 0 and 1, got {args.val_fraction}.")
    if args.multi_label and args.val is not None:
        raise ValueError("Multi-label held-out chips come from a table (--val-labels), not --val folders.")
    check_overwrite(args.output, args.overwrite)
    if args.finetune_epochs > 0:
        if args.method != "linear":
            raise ValueError("Only a linear probe can be fine-tuned with its backbone (--method linear), not a k-NN.")
        if not args.size:
            raise ValueError("Fine-tuning batches chips at one size: give --size (e.g. 224), not 0.")
        prefix = Path(args.output).with_suffix("")
        check_overwrite(prefix.with_name(f"{prefix.name}_backbone.pth"), args.overwrite)
    if args.scenes:
        return _fit_scenes(args)
    if args.zones:
        return _fit_zones(args)
    size, multi = args.size or None, args.multi_label
    paths, labels = _chip_labels(args, args.chips, args.labels, multi)
    if held_given:
        val_paths, val_labels = _chip_labels(args, args.val or [], args.val_labels, multi)
        unknown = sorted(set(_flat(val_labels, multi)) - set(_flat(labels, multi)))
        if unknown:
            raise ValueError(f"Held-out chips of classes {unknown} (folder names, or labels) have no training chip.")
        train_idx = np.arange(len(paths))
    elif multi:  # no stratification for label sets: a seeded random share
        order = np.random.default_rng(args.seed).permutation(len(paths))
        n_held = min(max(1, int(round(args.val_fraction * len(paths)))), len(paths) - 1)
        train_idx, val_idx = np.sort(order[n_held:]), np.sort(order[:n_held])
    else:
        train_idx, val_idx = stratified_split(labels, args.val_fraction, args.seed)
    classes = sorted(set(_flat(labels, multi)))
    if multi and not classes:
        raise ValueError(f"The chips of {args.labels} carry no class.")
    if not multi and len(classes) < 2:
        raise ValueError(f"The chips of {args.labels or args.chips} hold {len(classes)} class ({classes}); a classifier "
                         "needs at least two (one folder, or one label, per class).")  # fmt: skip
    embedded_of, backbone, made = chip_embedder(args, size)
    embedded = embedded_of(paths)
    target = (lambda names: label_matrix(names, classes)) if multi else (lambda names: _class_ids(names, classes))  # noqa: E731
    x, y = chip_features(embedded, args.features), target(labels)
    if held_given:
        held = embedded_of(val_paths)
        vx, vy = chip_features(held, args.features), target(val_labels)
    else:
        vx, vy = x[val_idx], y[val_idx]
    val = (vx, vy) if len(vy) else None
    probe = fit_chip_classifier(x[train_idx], y[train_idx], classes, method=args.method, features=args.features,
                                val=val, k=args.k, threshold=args.threshold, balanced=args.balanced)  # fmt: skip
    chip_size = typical_chip_size(embedded.sizes)
    probe.embedding = {**made, "backbone": embedded.metadata.get("backbone"), "chip_size": chip_size,
                       "tile_m": typical_chip_ground(paths, chip_size[0]) if chip_size[0] == chip_size[1] else None}  # fmt: skip
    kind = f"{'multi-label ' if multi else ''}{args.method}"
    print(f"{kind} probe on {len(train_idx)} chips of {len(classes)} classes"
          f"{f' (C = {probe.c:g})' if probe.c is not None else ''}; {len(vy)} held-out chips:")
    scores = probe.scores(vx) if len(vy) else None
    if args.finetune_epochs > 0:
        if len(vy):
            print_probe_report(probe, scores, vy, None)
        held_paths = val_paths if held_given else [paths[i] for i in val_idx]
        probe, scores = finetune_and_export(args, backbone(), probe, [paths[i] for i in train_idx], y[train_idx],
                                            held_paths, vy)  # fmt: skip
    if len(vy):
        probe = _with_sets(args, probe, scores, vy)
        report = print_probe_report(probe, scores, vy, Path(args.out_dir) if args.out_dir else None)
        probe.held_out_accuracy = report["map_macro" if multi else "overall_accuracy"]
    probe.save(args.output, overwrite=args.overwrite)
    Path(f"{args.output}.finetune.ckpt").unlink(missing_ok=True)  # the probe is saved: the checkpoint has served
    print(args.output)


def _with_sets(args: Any, probe: ChipClassifier, scores: np.ndarray, targets: np.ndarray) -> ChipClassifier:
    """``probe`` with prediction sets of ``--coverage`` calibrated on the held-out ``scores`` and ``targets``
    (:func:`~dinov3_eo.tasks.chip_classification.calibrate_sets`; none for ``--coverage 0``)."""
    from dinov3_eo.tasks.chip_classification import calibrate_sets

    if not args.coverage:
        probe.sets = None
        return probe
    return calibrate_sets(probe, scores, targets, args.coverage)


def chip_embedder(args: Any, size: int | None) -> tuple[Any, Any, dict[str, Any]]:
    """How ``classify fit`` (and ``regress fit --table``) gets its chips' embeddings: ``(embeddings of paths, in their order; the backbone, loaded
    on first call; how the chips are embedded, for the probe)``, from ``--embeddings`` (a table of ``embed --chips``,
    whose backbone, size, bands and normalisation then hold) or by embedding them with ``--model``.

    Raises:
        ValueError: neither given, or (when called) a chip the table lacks.
    """
    from functools import cache

    from dinov3_eo.tasks.chip_embeddings import read_chip_embeddings

    if args.embeddings is None and args.model is None:
        raise ValueError("Give the backbone that embeds the chips (--model), or a table of their embeddings (--embeddings).")
    table = read_chip_embeddings(args.embeddings) if args.embeddings is not None else None
    info = table.metadata if table is not None else {}
    source = args.model or info.get("backbone_source")
    if source is None:
        raise ValueError(f"{args.embeddings} does not record its backbone; pass --model.")
    normalization = info.get("normalization_override") if table is not None else args.normalization
    made = {"backbone_source": os.path.abspath(source) if Path(source).exists() else source, "size": info.get("size", size),
            "bands": info.get("bands", args.bands), "normalization": normalization}  # fmt: skip

    @cache
    def backbone() -> Any:
        return load_chip_backbone(source, normalization=normalization, device=args.device)

    def embedded_of(paths: Sequence[str]) -> Any:
        if table is None:  # chips embedded in sorted order; rows taken back in the labels' order
            return embed_chips_with(backbone(), paths, bands=args.bands, size=size, batch_size=args.batch_size,
                                    amp=args.bf16, progress=not args.quiet).take(paths)  # fmt: skip
        try:
            return table.take(paths)
        except KeyError:
            missing = next(p for p in paths if os.path.abspath(p) not in {os.path.abspath(q) for q in table.paths})
            raise ValueError(f"Chip {missing} is not in the embedding table {args.embeddings}; embed every labelled chip "
                             "('embed --chips') or leave --embeddings out.") from None  # fmt: skip

    if table is None:
        backbone()  # a bad --model stops here, before any chip is read
    return embedded_of, backbone, made


def _kept_epoch(history: Sequence[dict[str, float]]) -> int:
    """The epoch whose weights fine-tuning kept: the first with the best held-out score (0: the probe as fitted), or
    the last without held-out chips."""
    scored = [row for row in history if "held_out" in row]
    return int(max(scored, key=lambda row: (row["held_out"], -row["epoch"]))["epoch"]) if scored else int(history[-1]["epoch"])


def finetune_and_export(args: Any, backbone: Any, probe: ChipClassifier, train: Any, y: np.ndarray, held: Any,
                        held_y: np.ndarray, *, unit: str = "chips") -> tuple[ChipClassifier, np.ndarray | None]:  # fmt: skip
    """``classify fit --finetune-epochs``: LP-FT (:mod:`~dinov3_eo.tasks.chip_finetune`), the probe and its backbone
    trained together on ``train`` (chip paths, or a dataset of tiles) with targets ``y``, the best epoch on ``held``
    kept, the backbone exported beside the probe (``<probe>_backbone.pth``) and recorded as its source; prints which
    epoch was kept and returns the probe and its held-out probabilities (``None`` without held-out items)."""
    from dinov3_eo.models.hub import export_backbone
    from dinov3_eo.tasks.chip_finetune import FinetuneSettings, chip_dataset, dataset_probabilities, finetune_chip_classifier

    settings = FinetuneSettings(epochs=args.finetune_epochs, lr=args.finetune_lr, head_lr=args.finetune_head_lr,
                                blocks=args.finetune_blocks, batch_size=args.batch_size, workers=args.workers,
                                balanced=args.balanced, seed=args.seed, amp=args.bf16)  # fmt: skip
    tuned, model, history = finetune_chip_classifier(backbone, probe, train, y, val=(held, held_y) if len(held_y) else None,
                                                     settings=settings, checkpoint=f"{args.output}.finetune.ckpt",
                                                     progress=not args.quiet)  # fmt: skip
    meta = dataclasses.replace(model.meta) if getattr(model, "meta", None) is not None else None
    if meta is not None and backbone.normalization is not None:
        meta.normalization = backbone.normalization.to_dict()  # what it was tuned with, an override included
    prefix = Path(args.output).with_suffix("")
    exported = export_backbone(model, prefix.with_name(f"{prefix.name}_backbone"), meta=meta)["pth"]
    kept = _kept_epoch(history)
    tuned.embedding = {**probe.embedding, "backbone_source": str(Path(exported).resolve()), "normalization": None,
                       "finetuned_from": probe.embedding.get("backbone_source"),
                       "finetune": {**dataclasses.asdict(settings), "history": history, "kept_epoch": kept}}  # fmt: skip
    scores = None
    if len(held_y):
        dataset = chip_dataset(held, held_y, patch_size=int(model.patch_size), normalization=backbone.normalization,
                               bands=probe.embedding.get("bands"), size=int(probe.embedding["size"]))  # fmt: skip
        scores = dataset_probabilities(backbone._replace(model=model), tuned, dataset, batch_size=args.batch_size,
                                       workers=args.workers, amp=args.bf16)  # fmt: skip
    print(f"fine-tuned {args.finetune_epochs} epochs, kept epoch {kept}{' (the probe as fitted)' if kept == 0 else ''}"
          f"; {len(held_y)} held-out {unit}:")
    return tuned, scores


def _flat(labels: Sequence[Any], multi_label: bool) -> list[str]:
    return [name for names in labels for name in names] if multi_label else list(labels)


def _probe_scores(args: Any, paths: Sequence[str]) -> tuple[ChipClassifier, np.ndarray]:
    """The probe ``args.probe`` and its class probabilities ``[N, K]`` for ``paths``, embedded as it was fitted (with
    ``--tta``, the mean of the probabilities of each turned and mirrored view)."""
    probe = ChipClassifier.load(args.probe)
    refuse_zone_probe(probe, "chips")
    embedded = probe_chip_views(args, probe, paths)
    scores = sum(probe.scores(chip_features(view, probe.features)) for view in embedded) / len(embedded)
    return probe, scores


def probe_chip_views(args: Any, probe: Any, paths: Sequence[str]) -> list[Any]:
    """``paths`` embedded as ``probe``'s (a probe's or a regressor's) chips were, one table per ``--tta`` view (one
    without), rows in the order of ``paths``; each chip is read once, its views embedded from the same pixels."""
    from dinov3_eo.inference.tta import tta_views

    info = probe.embedding
    backbone = probe_backbone(probe, args.model, device=args.device)
    views = tta_views(args.tta) if args.tta else (0,)
    embedded = embed_chip_views(backbone.model, paths, views=views, normalization=backbone.normalization,
                                bands=info.get("bands"), size=info.get("size"), batch_size=args.batch_size,
                                device=backbone.device, amp=args.bf16, progress=not args.quiet)  # fmt: skip
    return [view.take(paths) for view in embedded]


def _kind(probe: ChipClassifier) -> str:
    """How a probe is named in reports: its method, or ``zero-shot`` for one made from text."""
    return "zero-shot" if probe.embedding.get("encoder") == "text" else probe.method


def _test(args: Any) -> None:
    if args.out_dir is not None and Path(args.out_dir).is_dir():
        for name in ("metrics.json", "confusion.csv", "confusion.png", "per_class.csv"):
            check_overwrite(Path(args.out_dir) / name, args.overwrite)
    if args.scenes:
        return _test_scenes(args)
    if args.zones:
        return _test_zones(args)
    loaded = ChipClassifier.load(args.probe)
    classes, multi = loaded.classes, loaded.multi_label
    paths, labels = _chip_labels(args, args.chips, args.labels, multi)
    unknown = sorted(set(_flat(labels, multi)) - set(classes))
    if unknown:
        raise ValueError(f"Test chips of classes {unknown} (folder names, or labels) are not classes of the probe "
                         f"{args.probe} ({classes}).")  # fmt: skip
    probe, scores = _probe_scores(args, paths)
    print(f"{'multi-label ' if multi else ''}{_kind(probe)} probe on {len(paths)} test chips:")
    y = label_matrix(labels, classes) if multi else _class_ids(labels, classes)
    print_probe_report(probe, scores, y, Path(args.out_dir) if args.out_dir else None, threshold=args.threshold)


def _predict(args: Any) -> None:
    from dinov3_eo.data.datasets import expand_chips

    check_overwrite(args.output, args.overwrite)
    if args.zones:
        return _predict_zones(args)
    if args.raster:
        raise ValueError("--raster burns polygons' classes onto a scene: it goes with --zones TABLE.")
    if not args.chips:
        raise ValueError("Give the chips to classify (files, folders or quoted globs), or --zones TABLE.")
    paths = expand_chips(args.chips)
    probe, scores = _probe_scores(args, paths)
    threshold = (probe.threshold if args.threshold is None else args.threshold) if probe.multi_label else None
    sets = dict(threshold=threshold, set_threshold=probe.sets["threshold"] if probe.sets else None)
    if Path(args.output).suffix.lower() in VECTOR_SUFFIXES:
        write_prediction_map(args.output, paths, scores, probe.classes, **sets, overwrite=args.overwrite)
    else:
        write_predictions(args.output, paths, scores, probe.classes, **sets, overwrite=args.overwrite)
    if probe.multi_label:
        counts = (scores >= threshold).sum(axis=0)
    else:
        counts = np.bincount(scores.argmax(1), minlength=len(probe.classes))
    print(", ".join(f"{name} {n}" for name, n in zip(probe.classes, counts) if n))
    print(args.output)


def _zero_shot(args: Any) -> None:
    from dinov3_eo.tasks.chip_classification import zero_shot_classifier

    if Path(args.output).suffix.lower() != ".safetensors":
        raise ValueError(f"The probe is written as .safetensors, not {args.output!r}.")
    check_overwrite(args.output, args.overwrite)
    probe = zero_shot_classifier(args.model, args.classes, templates=args.templates, size=args.size or None,
                                 tile_size=args.tile_size, normalization=args.normalization)  # fmt: skip
    probe.save(args.output, overwrite=args.overwrite)
    print(f"zero-shot probe of {len(probe.classes)} classes ({', '.join(probe.classes)}), each ensembled over "
          f"{len(probe.embedding['templates'])} prompt templates; classify chips with 'classify predict', score them "
          "with 'classify test', map a scene with 'classify map'")  # fmt: skip
    print(args.output)


def _map(args: Any) -> None:
    from dinov3_eo.data.raster import pixel_area_ha
    from dinov3_eo.inference.writers import check_distinct_stems
    from dinov3_eo.tasks.tile_classification import classify_tiles, tile_outputs, write_tile_classes

    check_distinct_stems(args.scenes)
    probe = ChipClassifier.load(args.probe)
    refuse_zone_probe(probe, "a scene's tiles")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    for scene in args.scenes:  # every output is checked before the first scene is classified
        for path in tile_outputs(scene, args.out_dir, probabilities=args.probabilities, suggest=args.suggest > 0,
                                 sets=probe.sets is not None):  # fmt: skip
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=args.scenes)
    backbone = probe_backbone(probe, args.model, device=args.device)
    for scene in args.scenes:
        result = classify_tiles(scene, probe, backbone=backbone, tile_size=args.tile_size, stride=args.stride, bands=args.bands,
                                nodata=args.nodata, min_valid=args.min_valid, batch_size=args.batch_size, tta=args.tta,
                                min_score=args.min_score,
                                amp=args.bf16, progress=not args.quiet)  # fmt: skip
        outputs = write_tile_classes(result, args.out_dir, probabilities=args.probabilities, nodata=args.nodata,
                                     quicklook_bands=args.quicklook_bands, suggest=args.suggest, overwrite=args.overwrite)  # fmt: skip
        ids = result.class_ids()
        counts = np.bincount(ids[result.classified].ravel(), minlength=len(result.class_names))
        cells = f"{result.tile_size}-px tiles" if result.stride == result.tile_size else f"{result.stride}-px cells"
        hectares = pixel_area_ha(result.crs, result.transform)  # None for a CRS in degrees
        area = (lambda n: f" ({n * hectares:,.0f} ha)") if hectares else (lambda n: "")  # noqa: E731
        print(f"{Path(scene).name}: {int(result.classified.sum())} of {ids.size} {cells} classified: "
              + ", ".join(f"{name} {n}{area(n)}" for name, n in zip(result.class_names, counts) if n))
        if result.set_threshold is not None:
            sizes = result.set_sizes()[result.classified]
            print(f"  {100 * result.set_coverage:.0f} % prediction sets: {int((sizes == 1).sum())} {cells} of one "
                  f"class, {int((sizes > 1).sum())} of several (the probe cannot tell them apart), "
                  f"{int((sizes == 0).sum())} of none (unlike every class)")  # fmt: skip
        print("\n".join(str(p) for p in outputs if p is not None))


#: why :func:`_refuse_options` refuses chip options, by the mode that makes them meaningless
REFUSED_BECAUSE = {"--scenes": "the tiles come from the scenes and their labels",
                   "--zones": "the polygons and their classes come from the table"}  # fmt: skip


def _refuse_options(mode: str, names: Sequence[tuple[str, Any]]) -> None:
    """Raise ValueError naming the options of ``names`` (``(name, value)``) that were given, which ``mode``
    (``--scenes`` or ``--zones``) makes meaningless."""
    given = [name for name, value in names if value]
    if given:
        raise ValueError(f"With {mode} {REFUSED_BECAUSE[mode]}: leave out {', '.join(given)}.")


def _fit_scenes(args: Any) -> None:
    """``classify fit --scenes SCENE ... --labels POLYGONS_OR_RASTER --tile-size N --model M -o probe.safetensors``."""
    from dinov3_eo.tasks.tile_probe import fit_tile_classifier

    from dinov3_eo.tasks.chip_embeddings import read_chip_embeddings

    _refuse_options("--scenes", [("CHIPS", args.chips), ("--val", args.val)])
    if args.labels is None:
        raise ValueError("Give the labels of the scenes' tiles: --labels polygons (GeoPackage, GeoJSON ...) or a label "
                         "raster.")  # fmt: skip
    table = read_chip_embeddings(args.embeddings) if args.embeddings is not None else None
    if table is not None:
        if args.finetune_epochs > 0:
            raise ValueError("Fine-tuning trains the backbone on the tiles' pixels: leave out --embeddings.")
        args.tile_size = args.tile_size or table.metadata.get("tile_size")
    if args.tile_size is None:
        raise ValueError("Give the tile size in scene pixels (--tile-size): the ground each tile covers is what the "
                         "probe learns to name, and what 'classify map' will cut.")  # fmt: skip
    if args.model is None and table is None:
        raise ValueError("Give the backbone that embeds the tiles (--model), or a table of them ('embed --tiles', "
                         "--embeddings).")  # fmt: skip
    check_overwrite(args.output, args.overwrite)
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        check_distinct_stems(args.scenes)
        if out_dir.is_dir():
            for path in [out_dir / "tiles.gpkg", *_tile_picture_paths(args, out_dir, "labels"),
                         *_tile_picture_paths(args, out_dir, "split")]:  # fmt: skip
                check_overwrite(path, args.overwrite)
    backbone = load_chip_backbone(args.model, normalization=args.normalization, device=args.device) if table is None else None
    fit = fit_tile_classifier(args.scenes, args.labels, backbone, tile_size=args.tile_size, embeddings=table,
                              attribute=args.attribute,
                              class_names=args.class_names, val_labels=args.val_labels, bands=args.bands,
                              nodata=args.nodata, size=args.size or None, method=args.method, features=args.features,
                              purity=args.purity, min_labelled=args.min_labelled, min_valid=args.min_valid,
                              multi_label=args.multi_label, presence=args.presence, threshold=args.threshold,
                              val_fraction=args.val_fraction, block=args.block, balanced=args.balanced, k=args.k,
                              seed=args.seed, batch_size=args.batch_size, device=args.device, amp=args.bf16,
                              progress=not args.quiet)  # fmt: skip
    probe, tiles = fit.probe, fit.tiles
    train = tiles[tiles["split"] == "train"]
    taught = (train["label"].str.split(";").explode() if probe.multi_label else train["label"]).value_counts()
    held = len(tiles) - len(train)
    split = ("held out by --val-labels" if args.val_labels else f"in blocks of {args.block} x {args.block} tiles")
    print(f"{'multi-label ' if probe.multi_label else ''}{probe.method} probe on {len(train)} {args.tile_size}-px tiles "
          f"of {len(probe.classes)} classes ({', '.join(f'{c} {int(taught.get(c, 0))}' for c in probe.classes)})"
          f"{f'; C = {probe.c:g}' if probe.c is not None else ''}; {held} held-out tiles {split}"
          + (":" if held else " (no held-out tiles: no score)"))  # fmt: skip
    scores = fit.held_out_scores
    if args.finetune_epochs > 0:
        if scores is not None:
            print_probe_report(probe, scores, fit.held_out_targets, None, unit="tiles")
        probe, scores = _finetune_tiles(args, backbone, fit)
    if scores is not None:
        probe = _with_sets(args, probe, scores, fit.held_out_targets)
        report = print_probe_report(probe, scores, fit.held_out_targets, out_dir, unit="tiles")
        probe.held_out_accuracy = report["map_macro" if probe.multi_label else "overall_accuracy"]
    probe.save(args.output, overwrite=args.overwrite)
    Path(f"{args.output}.finetune.ckpt").unlink(missing_ok=True)  # the probe is saved: the checkpoint has served
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_vector(tiles, out_dir / "tiles.gpkg", layer="tiles", overwrite=args.overwrite)
        print(out_dir / "tiles.gpkg")
        pictures = {"split": ((tiles["split"] == "held_out").to_numpy(int), ["train", "held out"], SPLIT_COLOURS)}
        if not probe.multi_label:  # (a multi-label tile's label is a set of classes: the split alone is drawn)
            pictures["labels"] = ([probe.classes.index(v) for v in tiles["label"]], probe.classes, None)
        for name, (ids, names, colours) in pictures.items():
            for path in _tile_pictures(args, tiles, out_dir, name, ids, names, colours):
                print(path)
    print(args.output)


#: colours of the tile pictures: training / held-out tiles, and right / wrong ones
SPLIT_COLOURS = {0: (0, 114, 178), 1: (230, 159, 0)}
RIGHT_WRONG_COLOURS = {0: (0, 158, 115), 1: (213, 94, 0)}


def _tile_picture_paths(args: Any, out_dir: Path, name: str) -> list[Path]:
    return [out_dir / f"{Path(scene).stem}_tile_{name}.png" for scene in args.scenes]


def _tile_pictures(args: Any, tiles: Any, out_dir: Path, name: str, ids: Sequence[int], names: Sequence[str],
                   colours: dict[int, Sequence[int]] | None) -> list[Path]:  # fmt: skip
    """``OUT/<stem>_tile_<name>.png`` for each scene among ``tiles``: its tiles coloured by ``ids`` over the imagery."""
    from dinov3_eo.tasks.tile_classification import write_tile_picture

    ids = np.asarray(ids)
    written = []
    for scene in dict.fromkeys(tiles["scene"]):
        here = (tiles["scene"] == scene).to_numpy()
        tile_size = int(tiles["tile_size"].to_numpy()[here][0])
        written.append(write_tile_picture(
            out_dir / f"{Path(scene).stem}_tile_{name}.png", scene, tile_size=tile_size, rows=tiles["row"].to_numpy()[here],
            cols=tiles["col"].to_numpy()[here], ids=ids[here], class_names=names, bands=getattr(args, "bands", None),
            nodata=args.nodata, colormap=colours, overwrite=args.overwrite,
            title=f"{Path(scene).name}: {tile_size}-px tiles, {name.replace('_', ' ')}"))  # fmt: skip
    return written


def _finetune_tiles(args: Any, backbone: ChipBackbone, fit: Any) -> tuple[ChipClassifier, np.ndarray | None]:
    """``classify fit --scenes ... --finetune-epochs N``: the fitted probe and its backbone trained together on the
    training tiles (read from the scenes, :class:`~dinov3_eo.tasks.tile_classification.TileTensorDataset`), the best
    epoch on the held-out tiles kept."""
    from dinov3_eo.tasks.tile_classification import TileTensorDataset

    tiles, targets = fit.tiles, fit.targets
    held = tiles["split"].to_numpy() == "held_out"
    items = list(zip(tiles["scene"], tiles["row"], tiles["col"]))
    data = dict(tile_size=args.tile_size, patch_size=int(backbone.model.patch_size), normalization=backbone.normalization,
                bands=args.bands, size=args.size, nodata=args.nodata)  # fmt: skip
    train = TileTensorDataset([items[i] for i in np.flatnonzero(~held)], targets[~held], **data)
    val = TileTensorDataset([items[i] for i in np.flatnonzero(held)], targets[held], **data)
    return finetune_and_export(args, backbone, fit.probe, train, targets[~held], val, targets[held], unit="tiles")


def _test_scenes(args: Any) -> None:
    """``classify test --scenes SCENE ... --labels REFERENCE --probe probe.safetensors``."""
    from dinov3_eo.tasks.tile_probe import score_tile_classifier

    _refuse_options("--scenes", [("CHIPS", args.chips)])
    if args.labels is None:
        raise ValueError("Give the reference labels of the scenes' tiles: --labels polygons or a label raster.")
    out_dir = Path(args.out_dir) if args.out_dir else None
    if out_dir is not None:
        check_distinct_stems(args.scenes)
        if out_dir.is_dir():
            for path in [out_dir / "tiles.gpkg", *_tile_picture_paths(args, out_dir, "errors")]:
                check_overwrite(path, args.overwrite)
    probe = ChipClassifier.load(args.probe)
    scored = score_tile_classifier(
        probe, args.scenes, args.labels, backbone=args.model, tile_size=args.tile_size, attribute=args.attribute,
        class_names=args.class_names, purity=args.purity, min_labelled=args.min_labelled, min_valid=args.min_valid,
        presence=args.presence, nodata=args.nodata, tta=args.tta, threshold=args.threshold, batch_size=args.batch_size,
        device=args.device, amp=args.bf16, progress=not args.quiet)  # fmt: skip
    print(f"{'multi-label ' if probe.multi_label else ''}{_kind(probe)} probe on {len(scored.tiles)} labelled tiles of "
          f"{len(args.scenes)} scene{'s' if len(args.scenes) > 1 else ''}:")
    print_probe_report(probe, scored.scores, scored.targets, out_dir, threshold=args.threshold, unit="tiles")
    if out_dir is not None:
        write_vector(scored.tiles, out_dir / "tiles.gpkg", layer="tiles", overwrite=args.overwrite)
        print(f"{out_dir / 'tiles.gpkg'} (each tile's reference and predicted class: where the probe errs)")
        wrong = (~scored.tiles["correct"].to_numpy(bool)).astype(int)
        for path in _tile_pictures(args, scored.tiles, out_dir, "errors", wrong, ["right", "wrong"], RIGHT_WRONG_COLOURS):
            print(path)


def _tables_named(paths: list[str]) -> str:
    """Zone tables as messages name them: one path, or the paths joined."""
    return ", ".join(os.fspath(p) for p in paths)


def _zone_labels(args: Any, table: Any, x: Any) -> tuple[Any, list[str]]:
    """The labelled polygons of a zone table: by its ``--label-column``, or with ``--labels POINTS`` by the points
    inside them (their ``--label-column``)."""
    from dinov3_eo.tasks.zone_classification import labelled_zones, labels_from_points

    if not args.labels:
        return labelled_zones(table, x, args.label_column, where=_tables_named(args.zones))
    labels, counts = labels_from_points(table, args.labels, args.label_column)
    print(f"{counts['points']} labelled points of {args.labels}: {counts['labelled']} polygons take their class"
          + (f"; {counts['outside']} points lie in no polygon" if counts["outside"] else "")
          + (f"; {counts['tied']} polygons with tied classes left out" if counts["tied"] else ""))  # fmt: skip
    return labelled_zones(table.assign(_point_class=labels.to_numpy()), x, "_point_class", where=os.fspath(args.labels))


def _fit_zones(args: Any) -> None:
    """``classify fit --zones parcels.parquet --label-column crop -o probe.safetensors``."""
    from dinov3_eo.tasks.zone_classification import zone_probe_record
    from dinov3_eo.tasks.zone_embeddings import read_zone_tables

    _refuse_options("--zones", [("CHIPS", args.chips), ("--val", args.val), ("--val-labels", args.val_labels),
                              ("--multi-label", args.multi_label), ("--finetune-epochs", args.finetune_epochs),
                              ("--embeddings", args.embeddings)])  # fmt: skip
    table, x = read_zone_tables(args.zones)
    x, labels = _zone_labels(args, table, x)
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise ValueError(f"The polygons of {_tables_named(args.zones)} with a {args.label_column!r} and features hold "
                         f"{len(classes)} class ({classes}); a classifier needs at least two.")  # fmt: skip
    train, held = stratified_split(labels, args.val_fraction, args.seed)
    y = _class_ids(labels, classes)
    val = (x[held], y[held]) if len(held) else None
    probe = fit_chip_classifier(x[train], y[train], classes, method=args.method, features="patch_mean", val=val,
                                k=args.k, balanced=args.balanced)  # fmt: skip
    probe.embedding = zone_probe_record(table.attrs.get("dinov3_eo", {}), _tables_named(args.zones))
    print(f"{args.method} probe on {len(train)} polygons of {len(classes)} classes"
          f"{f' (C = {probe.c:g})' if probe.c is not None else ''}; {len(held)} held-out polygons:")
    if len(held):
        scores = probe.scores(x[held])
        probe = _with_sets(args, probe, scores, y[held])
        report = print_probe_report(probe, scores, y[held], Path(args.out_dir) if args.out_dir else None, unit="polygons")
        probe.held_out_accuracy = report["overall_accuracy"]
    probe.save(args.output, overwrite=args.overwrite)
    print(args.output)


def _test_zones(args: Any) -> None:
    """``classify test --zones parcels.parquet --label-column crop --probe probe.safetensors``."""
    from dinov3_eo.tasks.zone_classification import check_zone_table, season_for_probe
    from dinov3_eo.tasks.zone_embeddings import read_zone_tables

    _refuse_options("--zones", [("CHIPS", args.chips), ("--tta", args.tta)])
    probe = ChipClassifier.load(args.probe)
    table, x = read_zone_tables(args.zones)
    table, x = season_for_probe(probe, table, x, _tables_named(args.zones))
    check_zone_table(probe, table, _tables_named(args.zones), x)
    x, labels = _zone_labels(args, table, x)
    unknown = sorted(set(labels) - set(probe.classes))
    if unknown:
        raise ValueError(f"Polygons of classes {unknown} are not classes of the probe {args.probe} ({probe.classes}).")
    print(f"{probe.method} probe on {len(labels)} test polygons:")
    print_probe_report(probe, probe.scores(x), _class_ids(labels, probe.classes),
                       Path(args.out_dir) if args.out_dir else None, unit="polygons")  # fmt: skip


def _predict_zones(args: Any) -> None:
    """``classify predict --zones parcels.parquet --probe probe.safetensors -o parcels_classes.gpkg``."""
    from dinov3_eo.inference.writers import check_overwrite, default_colormap, write_quicklook
    from dinov3_eo.tasks.zone_classification import check_zone_table, season_for_probe, zone_class_map, zone_predictions
    from dinov3_eo.tasks.zone_embeddings import ZONE_ROW_SUFFIXES, read_zone_tables, write_zone_rows

    _refuse_options("--zones", [("CHIPS", args.chips), ("--tta", args.tta)])
    if Path(args.output).suffix.lower() not in ZONE_ROW_SUFFIXES:
        raise ValueError(f"Polygon predictions are written as .gpkg, .geojson, .csv or .parquet, not {args.output!r}.")
    output = Path(args.output)
    class_map = output.with_name(f"{output.stem}_classes.tif") if args.raster else None
    for path in (output, class_map, class_map.with_suffix(".png") if class_map else None):
        if path is not None:
            check_overwrite(path, args.overwrite, inputs=[*args.zones, *([args.raster] if args.raster else [])])
    probe = ChipClassifier.load(args.probe)
    table, x = read_zone_tables(args.zones)
    table, x = season_for_probe(probe, table, x, _tables_named(args.zones))
    check_zone_table(probe, table, _tables_named(args.zones), x)
    predicted = zone_predictions(table, x, probe)
    write_zone_rows(predicted, args.output, layer="predictions", overwrite=args.overwrite)
    if class_map is not None:
        zone_class_map(predicted, list(probe.classes), args.raster, class_map, overwrite=args.overwrite)
        write_quicklook(class_map.with_suffix(".png"), classes=class_map, image=args.raster, class_names=list(probe.classes),
                        colormap=default_colormap(len(probe.classes)), title=Path(args.raster).name,
                        overwrite=args.overwrite)  # fmt: skip
        print(f"{class_map}\n{class_map.with_suffix('.png')}")
    named = predicted["class"][predicted["class"] != ""]
    counts = named.value_counts()
    print(", ".join(f"{name} {counts.get(name, 0)}" for name in probe.classes if counts.get(name, 0))
          + (f"; {len(predicted) - len(named)} polygons without features" if len(named) < len(predicted) else ""))
    print(args.output)


__all__ = ["chip_embedder", "classify_main", "finetune_and_export", "print_probe_report", "probe_chip_views"]
