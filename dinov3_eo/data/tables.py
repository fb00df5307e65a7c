"""Tables of files and their annotations (a caption per image, a class per chip): CSV, Parquet or JSON Lines, read
as one ``pandas.DataFrame``, with relative paths resolved against the table's own folder, as datasets ship them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

#: the formats :func:`read_table` reads
TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


def read_table(path: str | os.PathLike[str], *, what: str = "Table") -> Any:
    """A CSV, Parquet, JSON Lines (``.jsonl``) or JSON (a list of objects) table as a ``pandas.DataFrame``.

    Args:
        what: what the table is, for messages ("Caption table").

    Raises:
        FileNotFoundError: the table does not exist. ValueError: an unknown format. ImportError: Parquet without
        pyarrow.
    """
    import pandas as pd

    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"{what} {str(source)!r} does not exist.")
    suffix = source.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(source)
    if suffix == ".parquet":
        try:
            return pd.read_parquet(source)
        except ImportError as e:
            raise ImportError(f"Reading the Parquet {what.lower()} {str(source)!r} needs pyarrow (pip install pyarrow).") from e
    if suffix == ".jsonl":
        return pd.read_json(source, lines=True)
    if suffix == ".json":
        return pd.DataFrame(json.loads(source.read_text(encoding="utf-8")))
    raise ValueError(f"{what} {str(source)!r}: unknown format {suffix!r}; use one of {TABLE_SUFFIXES}.")


def numeric_columns(frame: Any, exclude: Sequence[str] = ()) -> list[str]:
    """The columns of ``frame`` (a ``pandas.DataFrame``) that hold numbers (booleans are not), ``exclude`` left out:
    the candidates for a value to fit (biomass, canopy height) where none is named."""
    import pandas as pd

    return [c for c in frame.columns if c not in exclude and pd.api.types.is_numeric_dtype(frame[c])
            and not pd.api.types.is_bool_dtype(frame[c])]  # fmt: skip


def table_path(table: str | os.PathLike[str], value: Any) -> Path:
    """A path cell of ``table``: as written when absolute, else relative to the table's folder."""
    path = Path(str(value))
    return path if path.is_absolute() else Path(table).parent / path


__all__ = ["TABLE_SUFFIXES", "read_table", "table_path"]
