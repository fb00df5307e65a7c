"""Land-cover change between two class maps of a place: which class became which, and how many hectares.

Post-classification comparison, the classic way to report land-cover change: given two class maps (``segment
predict`` of two acquisitions, or any one-band class GeoTIFFs with the same classes), :func:`class_transitions`
counts every pixel's ``(before class, after class)`` pair on the before map's grid, block by block (the after map
warped onto it per window, nearest resampling, so any CRS and resolution), and reports:

* the transition matrix (rows: before, columns: after) in hectares (pixels on a grid in degrees), and the largest
  transitions (``forest -> crop: 412.3 ha``) first;
* per class its area before and after, net change, gross loss (what it lost to other classes) and gross gain;
* a from-to raster (``from_to.tif``: code ``before * K + after``, named ``"forest -> crop"``, changed pixels
  coloured by their new class) and ``transitions.png`` (the matrix, each before class's shares, hectares printed).

A map's errors become false changes here (two maps 90 % accurate can disagree on up to 20 % of the pixels), so read
it with ``segment evaluate``'s accuracy of each map at hand. ``dinov3-eo segment change`` is its command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.enums import Resampling
from rasterio.windows import Window

from dinov3_eo.data.raster import tagged_class_names

#: files written to ``out_dir``
TRANSITION_FILES = ("transitions.json", "transitions.csv", "transitions.png", "from_to.tif")


def transition_report(matrix: np.ndarray, class_names: Sequence[str], *, pixel_area: float = 1.0) -> dict[str, Any]:
    """Areas from a transition matrix ``[K, K]`` of pixel counts (rows: before, columns: after).

    Returns:
        ``{"pixels", "changed", "changed_fraction", "matrix" (areas), "classes": {name: {"before", "after", "net",
        "gross_loss", "gross_gain", "stable"}}, "transitions": [{"from", "to", "area"}, ...] (off-diagonal, largest
        first)}``, areas in the unit of ``pixel_area`` (``changed`` too).
    """
    counts = np.asarray(matrix, dtype=np.int64)
    area = counts.astype(np.float64) * pixel_area
    stable = np.diag(area)
    before, after = area.sum(axis=1), area.sum(axis=0)
    total = int(counts.sum())
    changed = total - int(np.trace(counts))
    off = [(i, j) for i in range(len(class_names)) for j in range(len(class_names)) if i != j and counts[i, j]]
    off.sort(key=lambda ij: -counts[ij])
    return {
        "pixels": total,
        "changed": changed * pixel_area,
        "changed_fraction": changed / total if total else 0.0,
        "matrix": area.tolist(),
        "classes": {
            name: {"before": before[i], "after": after[i], "net": after[i] - before[i], "gross_loss": before[i] - stable[i],
                   "gross_gain": after[i] - stable[i], "stable": stable[i]}  # fmt: skip
            for i, name in enumerate(class_names)
        },
        "transitions": [{"from": class_names[i], "to": class_names[j], "area": float(area[i, j])} for i, j in off],
    }


def _common_class_names(stack: Any, class_names: Sequence[str] | None) -> list[str]:
    """The K class names of the stacked class maps: ``class_names``, else their ``class_names`` tags, which must agree.

    Raises:
        ValueError: a map that is not a one-band integer raster, tags that differ, or no names at all.
    """
    tagged = []
    for src, name in zip(stack.sources, stack.names):
        if src.count != 1 or not np.issubdtype(np.dtype(src.dtypes[0]), np.integer):
            raise ValueError(f"{name!r} is not a class map: expected one integer band, got {src.count} band(s) of "
                             f"{src.dtypes[0]}.")  # fmt: skip
        tagged.append(tagged_class_names(src))
    (first, second), (before, after) = tagged, stack.names
    if class_names is None:
        if first is not None and second is not None and first != second:
            raise ValueError(f"The class maps name different classes ({first} in {before}, {second} in {after}); "
                             "compare maps of the same classes, or pass class_names= (--class-names).")  # fmt: skip
        class_names = first or second
    if class_names is None:
        raise ValueError(f"Neither {before} nor {after} names its classes (no 'class_names' tag); pass class_names= "
                         "(--class-names on the command line).")  # fmt: skip
    return [str(n) for n in class_names]


def class_transitions(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] | None = None,
    class_names: Sequence[str] | None = None,
    before_nodata: float | None = None,
    after_nodata: float | None = None,
    block: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """The from -> to transitions between two class maps, on ``before``'s grid (see the module docstring).

    Args:
        before, after: one-band class GeoTIFFs with the same classes (ids ``0..K-1``; each one's nodata left out);
            ``after`` in any CRS and resolution.
        out_dir: also write :data:`TRANSITION_FILES` here (existing ones only with ``overwrite``, checked first).
        class_names: the K names (default: the maps' ``class_names`` tags, which must then agree).
        before_nodata, after_nodata: override the files' nodata.
        block: side of the blocks read at once (memory is flat in the maps' size).

    Returns:
        :func:`transition_report` plus ``"unit"`` (``"ha"`` or ``"pixels"``), ``"class_names"``, ``"before"``,
        ``"after"``.

    Raises:
        ValueError: a map that is not a one-band integer raster, classes that cannot be named or whose names differ
            between the maps, a class id outside ``0..K-1``, or maps that share no classified pixel.
    """
    from dinov3_eo.data.raster import pixel_area_ha
    from dinov3_eo.data.stack import RasterStack
    from dinov3_eo.inference.writers import COGWriter, atomic_output, check_overwrite, default_colormap
    from dinov3_eo.tasks.segmentation_eval import confusion_matrix, confusion_plot

    if out_dir is not None and Path(out_dir).is_dir():
        for name in TRANSITION_FILES:
            check_overwrite(Path(out_dir) / name, overwrite, inputs=[before, after])
    folder = Path(out_dir) if out_dir is not None else None
    with RasterStack([before, after], nodata=[before_nodata, after_nodata], resampling=Resampling.nearest) as stack, \
            contextlib.ExitStack() as outputs:  # the from-to raster is removed if anything fails
        class_names = _common_class_names(stack, class_names)
        k = len(class_names)
        matrix = np.zeros((k, k), dtype=np.int64)
        code_dtype, code_nodata = (np.uint8, 255) if k * k < 255 else (np.uint16, 65535)
        hectares = pixel_area_ha(stack.crs, stack.transform)
        writer = None
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            palette = default_colormap(k)
            colours = {i * k + j: (palette[j] if i != j else (225, 225, 225, 255)) for i in range(k) for j in range(k)}
            writer = outputs.enter_context(COGWriter(
                folder / "from_to.tif", crs=stack.crs, transform=stack.transform, width=stack.width,
                height=stack.height, count=1, dtype=code_dtype, nodata=code_nodata, overwrite=overwrite,
                class_names=[f"{a} -> {b}" for a in class_names for b in class_names],
                colormap=colours if code_dtype == np.uint8 else None,
                tags={"dinov3_eo_output": "class_transitions", "code": "before * K + after", "K": k},
            ))  # fmt: skip
        for row in range(0, stack.height, block):
            for col in range(0, stack.width, block):
                window = Window(col, row, min(block, stack.width - col), min(block, stack.height - row))
                pair = stack.read(window=window)  # [2, h, w] float32, NaN = nodata
                ids = np.where(np.isfinite(pair), pair, -1).astype(np.int64)
                bad = np.unique(ids[ids >= k])
                if bad.size:
                    raise ValueError(f"Class ids {bad.tolist()} in {before if (ids[0] >= k).any() else after} are "
                                     f"outside 0..{k - 1} of the classes {class_names}.")  # fmt: skip
                matrix += confusion_matrix(ids[1], ids[0], k)
                if writer is not None:
                    both = (ids[0] >= 0) & (ids[1] >= 0)
                    codes = np.full(both.shape, code_nodata, dtype=code_dtype)
                    codes[both] = (ids[0][both] * k + ids[1][both]).astype(code_dtype)
                    writer.write(codes[None], window)
        if matrix.sum() == 0:  # (inside: the from-to raster of nothing is not kept)
            raise ValueError(f"No pixel has a class on both {before} and {after}: do they overlap, and is their nodata "
                             "right?")  # fmt: skip
    report = transition_report(matrix, class_names, pixel_area=hectares or 1.0)
    report.update(unit="ha" if hectares is not None else "pixels", class_names=class_names, before=os.fspath(before),
                  after=os.fspath(after), pixel_counts=matrix.tolist())  # fmt: skip
    if folder is not None:
        with atomic_output(folder / "transitions.json", overwrite=True) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
        rows = [f"before \\ after ({report['unit']})," + ",".join(class_names)]
        rows += [f"{name}," + ",".join(f"{v:.4f}" for v in report["matrix"][i]) for i, name in enumerate(class_names)]
        with atomic_output(folder / "transitions.csv", overwrite=True) as tmp:
            tmp.write_text("\n".join(rows) + "\n")
        cells = [[f"{v:,.1f}" for v in row] for row in report["matrix"]]
        confusion_plot(folder / "transitions.png", matrix, class_names, row_label="before", column_label="after",
                       cell_text=cells, title=f"{Path(before).name} -> {Path(after).name} ({report['unit']})")  # fmt: skip
    return report


def transitions_table(report: dict[str, Any], *, top: int = 10) -> str:
    """A plain-text table of the per-class areas and the ``top`` largest transitions."""
    unit = report["unit"]
    width = max(8, *(len(n) for n in report["class_names"]))
    lines = [f"{'class':<{width}} {'before':>12} {'after':>12} {'net':>12} {'lost':>12} {'gained':>12}  ({unit})"]
    for name, c in report["classes"].items():
        lines.append(f"{name:<{width}} {c['before']:12,.2f} {c['after']:12,.2f} {c['net']:+12,.2f} "
                     f"{c['gross_loss']:12,.2f} {c['gross_gain']:12,.2f}")  # fmt: skip
    lines.append(f"changed: {report['changed']:,.2f} {unit} ({report['changed_fraction']:.1%} of the pixels classified on "
                 "both dates)")  # fmt: skip
    for t in report["transitions"][:top]:
        lines.append(f"  {t['from']} -> {t['to']}: {t['area']:,.2f} {unit}")
    return "\n".join(lines)


def change_main(argv: Sequence[str]) -> int:
    """``dinov3-eo segment change BEFORE_CLASSES.tif AFTER_CLASSES.tif [--out-dir DIR]``; returns the exit code."""
    from dinov3_eo.cli import EXIT_BAD_INPUT

    prog = "dinov3-eo segment change"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Land-cover change between two class maps of a place: the from -> to transition matrix in hectares, "
        "per-class net change and gross loss/gain, a from-to raster and a picture of the matrix.",
    )
    parser.add_argument("before", help="earlier class map GeoTIFF (its grid is the output's)")
    parser.add_argument("after", help="later class map GeoTIFF with the same classes, any CRS and resolution")
    parser.add_argument("--out-dir", help="write transitions.json, transitions.csv, transitions.png and from_to.tif here")
    parser.add_argument("--class-names", nargs="+", default=None, help="names of classes 0..K-1 (default: the maps' tags)")
    parser.add_argument("--before-nodata", type=float, default=None)
    parser.add_argument("--after-nodata", type=float, default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an earlier comparison")
    args = parser.parse_args(list(argv))
    try:
        report = class_transitions(args.before, args.after, out_dir=args.out_dir, class_names=args.class_names,
                                   before_nodata=args.before_nodata, after_nodata=args.after_nodata,
                                   overwrite=args.overwrite)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(transitions_table(report))
    if args.out_dir:
        print(f"wrote {', '.join(str(Path(args.out_dir) / n) for n in TRANSITION_FILES)}")
    return 0


__all__ = ["TRANSITION_FILES", "change_main", "class_transitions", "transition_report", "transitions_table"]
