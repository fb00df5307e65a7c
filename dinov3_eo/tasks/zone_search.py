"""Polygons like these: ``dinov3-eo similar --zones parcels.parquet --like crop=rice -o like_rice.gpkg``.

A query by example over a zone table (``embed --zones``, one date or a season): the polygons picked by ``--like
COLUMN=VALUE`` (the fields you know are flooded, the crowns you named) are the examples, and every other polygon is
ranked by the cosine similarity of its ``patch_mean`` to the examples' mean
(:func:`~dinov3_eo.tasks.chip_embeddings.cosine_to_mean`), as ``similar --chips`` ranks chips. No backbone runs: the
table holds the features. Written: the examples and the ``k`` most similar other polygons with their columns,
``similarity``, ``rank`` (0 for the examples) and ``example``; and a map of every polygon filled by its similarity,
the examples outlined (``<output>.png``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def examples_of(table: Any, like: Sequence[str], *, where: str = "the zone table") -> np.ndarray:
    """``[N]`` bool: the rows of ``table`` matching any ``COLUMN=VALUE`` of ``like`` (values compared as text).

    Raises:
        ValueError: a condition without ``=``, a column the table lacks, or no row matching any.
    """
    chosen = np.zeros(len(table), bool)
    for condition in like:
        column, sep, value = condition.partition("=")
        column, value = column.strip(), value.strip()
        if not sep or not column:
            raise ValueError(f"--like takes COLUMN=VALUE (e.g. crop=rice or id=17), not {condition!r}.")
        if column not in table.columns:
            raise ValueError(f"{where} has no column {column!r}; it has {[c for c in table.columns if c != 'patch_mean']}.")
        chosen |= (table[column].astype(str).str.strip() == value).to_numpy()
    if not chosen.any():
        raise ValueError(f"No polygon of {where} matches {' or '.join(like)}.")
    return chosen


def zone_similarity(x: np.ndarray, examples: np.ndarray) -> np.ndarray:
    """``[N]`` float: each polygon's cosine to the mean of the examples' features; NaN for polygons without features.

    Args:
        x: a zone table's ``patch_mean`` ``[N, D]`` (NaN rows: no features); examples: ``[N]`` bool.

    Raises:
        ValueError: no example with features.
    """
    from dinov3_eo.tasks.chip_embeddings import cosine_to_mean

    seen = np.isfinite(x).all(axis=1)
    if not (examples & seen).any():
        raise ValueError("None of the example polygons has features (all lie outside the scene or on nodata).")
    similarity = np.full(len(x), np.nan)
    similarity[seen] = np.clip(cosine_to_mean(x[seen], x[examples & seen]), -1.0, 1.0)
    return similarity


def zones_like(table: Any, similarity: np.ndarray, examples: np.ndarray, *, k: int = 20) -> Any:
    """The example polygons and the ``k`` (0: all) most similar others with features, most similar first.

    Args:
        table: a zone table's frame; similarity: ``[N]`` (:func:`zone_similarity`); examples: ``[N]`` bool.

    Returns:
        ``table`` without ``patch_mean``, those rows only, with ``similarity``, ``rank`` (0: an example) and
        ``example``.
    """
    others = np.flatnonzero(~examples & np.isfinite(similarity))
    others = others[np.argsort(-similarity[others], kind="stable")]
    if k > 0:
        others = others[:k]
    rows = np.concatenate([np.flatnonzero(examples), others])
    rank = np.concatenate([np.zeros(int(examples.sum()), np.int64), np.arange(1, len(others) + 1)])
    out = table.drop(columns="patch_mean", errors="ignore").iloc[rows].copy()
    out["similarity"], out["rank"], out["example"] = similarity[rows], rank, examples[rows]
    return out.reset_index(drop=True)


def similar_zones_main(argv: Sequence[str]) -> int:
    """``dinov3-eo similar --zones TABLE --like COLUMN=VALUE [...] -o matches.gpkg [-k 20]``."""
    from dinov3_eo.cli import EXIT_BAD_INPUT
    from dinov3_eo.inference.writers import check_overwrite
    from dinov3_eo.tasks.zonal import zonal_picture
    from dinov3_eo.tasks.zone_embeddings import ZONE_ROW_SUFFIXES, read_zone_tables, write_zone_rows

    parser = argparse.ArgumentParser(prog="dinov3-eo similar --zones", description="The polygons of a zone table "
                                     "('embed --zones') most like the ones picked by --like, by the cosine of their "
                                     "embeddings; no backbone runs.")  # fmt: skip
    parser.add_argument("--zones", nargs="+", required=True, metavar="TABLE", help="one or more tables from 'embed "
                        "--zones' (.parquet; several: one backbone, searched together)")  # fmt: skip
    parser.add_argument("--like", nargs="+", required=True, metavar="COLUMN=VALUE", help="the example polygons: "
                        "rows whose COLUMN is VALUE (several: any of them), e.g. crop=rice or id=17")  # fmt: skip
    parser.add_argument("-o", "--output", required=True, help=f"the matches: {', '.join(ZONE_ROW_SUFFIXES)} "
                        "(+ OUTPUT.png, every polygon by its similarity)")  # fmt: skip
    parser.add_argument("-k", type=int, default=20, help="how many other polygons to keep, most similar first "
                        "(default 20; 0: all)")  # fmt: skip
    parser.add_argument("--no-quicklook", action="store_true", help="do not draw OUTPUT.png")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(list(argv))
    try:
        if args.k < 0:
            raise ValueError(f"-k must be 0 (all) or a count, not {args.k}.")
        output = Path(args.output)
        if output.suffix.lower() not in ZONE_ROW_SUFFIXES:
            raise ValueError(f"The matches are written as {', '.join(ZONE_ROW_SUFFIXES)}, not {args.output!r}.")
        picture = None if args.no_quicklook else output.with_suffix(".png")
        for path in (output, picture):
            if path is not None:
                check_overwrite(path, args.overwrite, inputs=args.zones)
        table, x = read_zone_tables(args.zones)
        examples = examples_of(table, args.like, where=", ".join(args.zones))
        similarity = zone_similarity(x, examples)
        matches = zones_like(table, similarity, examples, k=args.k)
        write_zone_rows(matches, output, layer="matches", overwrite=args.overwrite)
        if picture is not None:
            drawn = table.drop(columns="patch_mean").assign(similarity=similarity)
            zonal_picture(picture, drawn, "similarity", title=f"similarity to {int(examples.sum())} example polygon(s)",
                          outline=drawn[examples], overwrite=args.overwrite)  # fmt: skip
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"dinov3-eo similar: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    others = matches[~matches["example"]]
    print(f"{int(examples.sum())} example polygon(s); the {len(others)} most like them kept"
          + (f" (similarity {others['similarity'].iloc[0]:.3f} to {others['similarity'].iloc[-1]:.3f})" if len(others) else ""))
    print(output)
    if picture is not None:
        print(picture)
    return 0


__all__ = ["examples_of", "similar_zones_main", "zone_similarity", "zones_like"]
