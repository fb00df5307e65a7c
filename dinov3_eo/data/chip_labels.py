"""Labels of image chips: the class of each chip from its folder (ImageFolder layout) or from a table (CSV, Parquet,
JSON Lines) of ``image`` and ``label`` columns, one class per chip or several (multi-label), and held-out splits.

Benchmarks ship their splits either way: EuroSAT and UC Merced as one folder per class, BigEarthNet and most
labelling exports as tables, multi-label ones with a list (or a joined string) of classes per chip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def folder_labels(paths: Sequence[str]) -> list[str]:
    """Each chip's class as the name of its folder (``EuroSAT/Forest/Forest_1.jpg`` is ``Forest``), the layout of
    torchvision's ``ImageFolder`` and of most chip datasets."""
    return [Path(p).parent.name for p in paths]


def _table_rows(table: str | os.PathLike[str], column: str | None = None) -> list[tuple[str, Any]]:
    """``(chip path, raw label cell)`` of each row of a label table (columns ``image`` or ``path``, and ``column``,
    default ``labels``, ``label`` or ``class``; paths relative to the table's folder)."""
    from dinov3_eo.data.tables import read_table, table_path

    frame = read_table(table, what="Label table")
    image = next((c for c in ("image", "path") if c in frame.columns), None)
    label = column if column is not None else next((c for c in ("labels", "label", "class") if c in frame.columns), None)
    if image is None or label is None or label not in frame.columns:
        wanted = repr(column) if column is not None else "'label' (or 'class')"
        raise ValueError(f"Label table {str(table)!r} needs columns 'image' (or 'path') and {wanted}; it has "
                         f"{list(frame.columns)}.")  # fmt: skip
    rows = []
    for i, (name, cell) in enumerate(frame[[image, label]].itertuples(index=False)):
        path = table_path(table, name)
        if not path.is_file():
            raise FileNotFoundError(f"Label table {str(table)!r}: row {i} names {str(path)!r}, which does not exist.")
        rows.append((str(path.resolve()), cell))
    if not rows:
        raise ValueError(f"Label table {str(table)!r} lists no chip.")
    return rows


def _missing(cell: Any) -> bool:
    return cell is None or (isinstance(cell, float) and np.isnan(cell))


def table_labels(table: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """The chips and classes a table lists (CSV, Parquet or JSON Lines: :func:`~dinov3_eo.data.tables.read_table`):
    columns ``image`` (or ``path``; relative to the table's folder) and ``label`` (or ``class``), as benchmarks ship
    their splits.

    Raises:
        FileNotFoundError: the table, or a chip it lists, does not exist. ValueError: the columns are missing or a
        label is empty (row named).
    """
    paths, labels = [], []
    for i, (path, cell) in enumerate(_table_rows(table)):
        name = "" if _missing(cell) else str(cell).strip()
        if not name:
            raise ValueError(f"Label table {str(table)!r}: row {i} has no label.")
        paths.append(path)
        labels.append(name)
    return paths, labels


def table_values(table: str | os.PathLike[str], column: str | None = None) -> tuple[list[str], np.ndarray]:
    """The chips and the number each carries (biomass, canopy height, tree cover), from a table as
    :func:`table_labels` reads: columns ``image`` (or ``path``) and ``column`` (default ``value``, else the table's
    only numeric column).

    Raises:
        FileNotFoundError: the table, or a chip it lists, does not exist. ValueError: no such column, several numeric
        columns and none named, or a cell that is not a finite number (row named).
    """
    from dinov3_eo.data.tables import numeric_columns, read_table

    if column is None:
        frame = read_table(table, what="Label table")
        numeric = numeric_columns(frame, exclude=("image", "path"))
        if "value" in frame.columns:
            column = "value"
        elif len(numeric) == 1:
            column = numeric[0]
        else:
            raise ValueError(f"Label table {str(table)!r} has the numeric columns {numeric}: name the one to fit "
                             "(--value-column).")  # fmt: skip
    paths, values = [], []
    for i, (path, cell) in enumerate(_table_rows(table, column)):
        try:
            value = float(cell)
        except (TypeError, ValueError):
            value = float("nan")
        if not np.isfinite(value):
            raise ValueError(f"Label table {str(table)!r}: row {i} has no number in {column!r} ({cell!r}).")
        paths.append(path)
        values.append(value)
    return paths, np.asarray(values, np.float64)


def table_multilabels(table: str | os.PathLike[str], separator: str = ";") -> tuple[list[str], list[list[str]]]:
    """The chips and class sets of a multi-label table: as :func:`table_labels`, the label cell (column ``labels``,
    ``label`` or ``class``) a list (Parquet, JSON Lines) or a string of classes joined by ``separator``
    (``"water;crop"``); an empty cell is a chip of none of the classes.
    """
    paths, labels = [], []
    for path, cell in _table_rows(table):
        if isinstance(cell, (list, tuple, np.ndarray)):
            names = [str(v).strip() for v in cell]
        else:
            names = [] if _missing(cell) else str(cell).split(separator)
        paths.append(path)
        labels.append(sorted({n.strip() for n in names if n.strip()}))
    return paths, labels


def label_matrix(labels: Sequence[Sequence[str]], classes: Sequence[str]) -> np.ndarray:
    """``[N, K]`` bool: chip ``i`` carries class ``k`` (classes not in ``classes`` ignored)."""
    lookup = {name: k for k, name in enumerate(classes)}
    targets = np.zeros((len(labels), len(classes)), dtype=bool)
    for i, names in enumerate(labels):
        targets[i, [lookup[n] for n in names if n in lookup]] = True
    return targets


def labelled_chips(chips: Sequence[str], table: str | None) -> tuple[list[str], list[str]]:
    """Chips and their classes: from the label ``table`` where given, else the ``chips`` folders (the folder names
    the class: :func:`folder_labels`).

    Raises:
        ValueError: neither or both given.
    """
    from dinov3_eo.data.datasets import expand_chips

    if bool(chips) == bool(table):
        raise ValueError("Give the chips either as class folders (CHIPS) or as a label table (--labels), one of the two.")
    if table:
        return table_labels(table)
    paths = expand_chips(list(chips))
    return paths, folder_labels(paths)


def stratified_split(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, held_out)``: ``fraction`` of each class's chips (at least one where a class has two or
    more) held out, drawn with ``seed``; each sorted."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for name in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == name)
        n = int(round(fraction * len(members)))
        n = max(n, 1) if fraction > 0 and len(members) > 1 else n
        held += rng.choice(members, size=min(n, len(members) - 1) if len(members) > 1 else 0, replace=False).tolist()
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


__all__ = [
    "folder_labels",
    "label_matrix",
    "labelled_chips",
    "stratified_split",
    "table_labels",
    "table_multilabels",
]
