"""The ``dinov3-eo`` command.

Each sub-command lives in the module that owns its job; this file only dispatches, importing the
module lazily so that ``dinov3-eo --help`` stays fast and a sub-command's heavy imports are paid
only when it runs. A command's entry point takes the remaining argv and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dinov3_eo import __version__
from dinov3_eo.allocator import retain_freed_memory_unless_disabled

#: errors that stop a command with their message alone (bad input, a missing or unreadable file, a failed read, a
#: NaN loss, a checkpoint or label file without the keys or attributes asked for, a band index out of range): each of
#: ours already says what and where in one sentence, and a traceback through Lightning and torch would bury it.
#: ``DINOV3_EO_TRACEBACK=1`` shows the traceback instead.
USER_ERRORS = (ValueError, OSError, RuntimeError, FloatingPointError, KeyError, IndexError)

#: the exit code of a command stopped by bad input (argparse's code for a usage error, too); every sub-command that
#: reports its own errors returns it, so that scripts can tell bad input (2) from a crash (1)
EXIT_BAD_INPUT = 2

#: what Lightning says at every fit about choices made on purpose, which a user would read as mistakes: a task's
#: ``on_before_batch_transfer`` (host-side checks before a batch travels) takes precedence over the datamodule's
#: default hook; without TensorBoard installed, metrics go to the CSV logger; a datamodule whose split left no
#: validation tile returns an empty list (the one way a datamodule tells Lightning so; it logs that itself)
EXPECTED_LIGHTNING_WARNINGS = (
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a",
    r"Starting from v1.9.0, `tensorboardX` has been removed as a dependency",
    r"Total length of `list` across ranks is zero",
)

#: sub-command -> (module, function, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "quickstart": ("dinov3_eo.quickstart", "main", "pretrain, segment and map the bundled real scene end to end"),
    "stats": ("dinov3_eo.data.stats", "main", "per-band statistics of a GeoTIFF archive (ignores nodata)"),
    "info": ("dinov3_eo.file_info", "info_main", "what a file is and holds: a checkpoint's stage, backbone, bands, normalisation and classes; probes, ONNX graphs, embedding tables, rasters, vectors"),
    "pretrain": ("dinov3_eo.ssl.cli", "pretrain_main", "DINOv3 pretraining (DINO + iBOT + KoLeo): fit --config ..."),
    "gram": ("dinov3_eo.ssl.cli", "gram_main", "Gram anchoring stage: fit --config ..."),
    "highres": ("dinov3_eo.ssl.cli", "highres_main", "high-resolution adaptation stage: fit --config ..."),
    "distill": ("dinov3_eo.ssl.cli", "distill_main", "multi-student distillation: fit --config ..."),
    "export": ("dinov3_eo.models.hub", "export_main",
               "export a checkpoint's backbone: teacher, fine-tuned or LoRA-merged (official .pth + safetensors)"),
    "segment": ("dinov3_eo.tasks.segmentation", "main", "supervised segmentation: fit / predict / evaluate GeoTIFFs, prototypes (no training), class transitions"),
    "embed": ("dinov3_eo.tasks.features", "embed_main", "patch features of a GeoTIFF as a georeferenced raster or zarr; one embedding per image chip as a table (--chips)"),
    "classify": ("dinov3_eo.tasks.classify_cli", "classify_main", "scene classification of image chips or a scene's tiles: a linear probe or k-NN on frozen features (fit: chips, or --scenes with polygons; test / predict; map: a scene tile by tile; zero-shot: from text)"),
    "regress": ("dinov3_eo.tasks.regress_cli", "regress_main", "regression on frozen features: a number per tile (canopy height, biomass, tree cover) from a reference raster, field plots or polygons, or per chip from a table (fit / test / map / predict)"),
    "pca": ("dinov3_eo.tasks.features", "pca_main", "3-component PCA picture of the features of a GeoTIFF"),
    "text": ("dinov3_eo.tasks.openvocab", "text_main", "text alignment (dino.txt style): fit --config ..."),
    "query": ("dinov3_eo.tasks.openvocab", "query_main", "open-vocabulary maps of a GeoTIFF from free text"),
    "height": ("dinov3_eo.tasks.height", "main", "canopy height: fit / predict / evaluate in metres, calibrate against GEDI shots or LiDAR, change between two dates, individual trees (tops and crowns)"),
    "sample": ("dinov3_eo.tasks.sample_design", "sample_main", "a stratified random sample of a class map's pixels: points to label for an accuracy assessment"),
    "objects": ("dinov3_eo.tasks.image_objects", "objects_main", "cut a scene into image objects (SLIC superpixels of a given size) as polygons, for object-based classification with embed --zones"),
    "zonal": ("dinov3_eo.tasks.zonal", "zonal_main", "summarise a map over polygons: per zone mean/std/min/max/percentiles of values, or hectares and share of each class"),
    "gedi": ("dinov3_eo.data.gedi", "gedi_main", "GEDI L2A/L2B/L4A granules (.h5) to quality-filtered shots in an area: reference heights, cover or biomass"),
    "change": ("dinov3_eo.tasks.change", "change_main", "what changed between two dates: feature distance map, mask, polygons"),
    "cluster": ("dinov3_eo.tasks.clustering", "cluster_main", "unsupervised map: k-means clusters of the features of GeoTIFFs"),
    "similar": ("dinov3_eo.tasks.similarity", "similar_main", "find the places that look like an example point or polygon"),
}


#: (command, sub-command) -> (module, function) for sub-commands that live in a module lighter than their command's:
#: raster jobs that need no Lightning start in ~2 s instead of ~6 s
SUBCOMMANDS: dict[tuple[str, str], tuple[str, str]] = {
    ("height", "change"): ("dinov3_eo.tasks.height_change", "change_main"),
    ("height", "calibrate"): ("dinov3_eo.tasks.height_calibration", "calibrate_main"),
    ("height", "trees"): ("dinov3_eo.tasks.tree_maps", "trees_main"),
    ("segment", "change"): ("dinov3_eo.tasks.class_change", "change_main"),
    ("segment", "evaluate"): ("dinov3_eo.tasks.segmentation_eval", "evaluate_main"),
    ("segment", "prototypes"): ("dinov3_eo.tasks.prototypes", "prototypes_main"),
}


def ignore_expected_lightning_warnings() -> None:
    """Filter :data:`EXPECTED_LIGHTNING_WARNINGS` out (inside the caller's ``warnings.catch_warnings()``)."""
    for message in EXPECTED_LIGHTNING_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


#: LightningCLI's sub-commands, after which a data class may be named on the command line
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def names_data_class(argv: Sequence[str]) -> bool:
    """Whether ``argv`` names the data module's class: ``--data.class_path`` (or ``--data`` with a class or a YAML
    file that has one) on the command line, or a ``data: class_path:`` in a ``--config`` file it gives."""
    import yaml

    def in_yaml(path: str, *keys: str) -> bool:
        try:
            content = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError):
            return False  # LightningCLI says what is wrong with the file
        for key in keys:
            content = content.get(key) if isinstance(content, dict) else None
        return isinstance(content, dict) and "class_path" in content

    args = list(argv)
    for i, arg in enumerate(args):
        name, _, value = arg.partition("=")
        value = value if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
        if name == "--data.class_path":
            return True
        if name == "--data" and (not value.endswith((".yaml", ".yml")) or in_yaml(value)):
            return True
        if name in ("--config", "-c") and in_yaml(value, "data"):
            return True
    return False


def with_default_data_class(argv: Sequence[str], class_path: str) -> list[str]:
    """``argv`` with ``--data.class_path class_path`` after its sub-command unless it names a data class itself
    (:func:`names_data_class`): a data block without a ``class_path`` (every config written before there was a
    choice of data module) keeps meaning ``class_path``'s arguments. Naming the default on the command line, rather
    than as a parser default, keeps jsonargparse from carrying that class's defaults over to a class a config names
    (``normalization: sat493m`` into a chip module whose own default is ``zscore``)."""
    args = list(argv)
    if not args or args[0] not in LIGHTNING_SUBCOMMANDS or names_data_class(args[1:]):
        return args
    return [args[0], "--data.class_path", class_path, *args[1:]]


def run_lightning_cli(model_class: type, datamodule_class: type, argv: Sequence[str], prog: str, *,
                      cli_class: type | None = None, default_data_class: str | None = None,
                      **cli_kwargs: Any) -> int:  # fmt: skip
    """``dinov3-eo <command> fit|validate --config X.yaml [--key value ...]`` through LightningCLI; returns 0.

    ``argv`` is handed over as ``args=`` alone: ``sys.argv`` is set to ``[prog]`` meanwhile, so that ``--help``
    names the real command and LightningCLI neither reads the arguments twice nor warns that it was given both.
    ``cli_class``: a ``LightningCLI`` subclass (hooks such as ``before_instantiate_classes``); ``default_data_class``:
    with ``subclass_mode_data=True``, the data module of a config that names none (:func:`with_default_data_class`);
    ``cli_kwargs`` go to it (e.g. ``auto_configure_optimizers=False``).
    """
    from lightning.pytorch.cli import LightningCLI

    cli_class = cli_class or LightningCLI
    if default_data_class is not None:
        argv = with_default_data_class(argv, default_data_class)
    old_argv = sys.argv
    sys.argv = [prog]
    try:
        with warnings.catch_warnings():
            ignore_expected_lightning_warnings()
            cli_class(model_class, datamodule_class, args=list(argv) or ["--help"],
                         save_config_kwargs={"overwrite": True}, seed_everything_default=0, **cli_kwargs)  # fmt: skip
    finally:
        sys.argv = old_argv
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinov3-eo",
        description="DINOv3 for Earth observation: pretrain on GeoTIFF archives, segment, map canopy height, query with text.",
    )
    parser.add_argument("--version", action="version", version=f"dinov3-eo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        # add_help=False: the sub-command's own parser answers --help
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def show_package_messages() -> None:
    """Print the package's own log messages from INFO up ("Loaded backbone ...", "Resumed mid-epoch ...", "Class names
    from the labels ...") on stderr, as Lightning prints its own: without a handler Python shows warnings only. Only
    the first process of a multi-process run says INFO (the others would repeat it); nothing is added where a caller
    configured the ``dinov3_eo`` logger already, or twice."""
    import logging

    class CurrentStderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is when a message comes (a stream bound once would outlive a redirect)."""

        @property
        def stream(self) -> Any:  # noqa: D102
            return sys.stderr

        @stream.setter
        def stream(self, value: Any) -> None:
            pass

    logger = logging.getLogger("dinov3_eo")
    if logger.handlers or logger.level != logging.NOTSET:
        return
    handler = CurrentStderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    ranks = (os.environ.get(key, "0") for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))
    logger.setLevel(logging.INFO if all(rank in ("", "0") for rank in ranks) else logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dinov3-eo`` with ``argv`` (defaults to ``sys.argv[1:]``); returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 0
    # Nothing is ever fetched from a hub at run time: weights come from local paths only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Freed memory stays mapped for the next step instead of being page-faulted in again (dinov3_eo.allocator: on a
    # CPU a ViT-S SSL step 1.13-1.18x faster, predict_raster 3x); a process-wide choice: the command makes it, not
    # the package. DINOV3_EO_RETAIN_FREED_MEMORY=0 turns it off.
    retain_freed_memory_unless_disabled()
    show_package_messages()
    # Lightning 2.6 under torch 2.14 warns at every fit that its own pytree helper uses a deprecated torch class: a
    # note for Lightning's developers that a user can do nothing about
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    module_name, func_name, _ = COMMANDS[argv[0]]
    rest = argv[1:]
    if tuple(argv[:2]) in SUBCOMMANDS:
        module_name, func_name = SUBCOMMANDS[(argv[0], argv[1])]
        rest = argv[2:]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as e:
        parser.exit(2, f"dinov3-eo: the '{argv[0]}' command is not available in this build ({e}).\n")
    try:
        result = func(rest)
    except USER_ERRORS as e:
        if os.environ.get("DINOV3_EO_TRACEBACK", "") not in ("", "0"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else e  # str(KeyError) wraps it in quotes
        print(f"dinov3-eo {argv[0]}: error: {message}\n(DINOV3_EO_TRACEBACK=1 shows where it was raised)", file=sys.stderr)
        return EXIT_BAD_INPUT
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
