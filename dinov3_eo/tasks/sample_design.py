"""Where to put the reference points of an accuracy assessment: a stratified random sample of a class map's pixels,
the design that the error-adjusted areas of ``segment evaluate`` (Olofsson et al. 2014, "Good practices for
estimating area and assessing accuracy of land change") and the stratified estimate of ``regress evaluate --strata``
assume.

* :func:`sample_size`: the points needed for a target standard error of the overall accuracy,
  ``n = (sum_i W_i S_i / SE)²`` with ``S_i = sqrt(U_i (1 - U_i))`` from each class's share ``W_i`` of the map and
  its expected user's accuracy ``U_i`` (Olofsson et al. 2014, eq. 13; Cochran 1977, 5.25);
* :func:`allocate`: the points per stratum: ``proportional`` to the strata's areas or ``equal``, with at least
  ``min_per_stratum`` in every stratum (Olofsson et al. suggest 50 to 100 for the rare classes a proportional
  sample would starve), the rest proportional;
* :func:`stratified_sample`: that many pixels drawn uniformly at random, without replacement, within each stratum,
  in two passes over the raster block by block (count, then draw by rank), so memory is flat in its size. Each point
  is its pixel's centre, with its stratum and the pixels it stands for (``N_h / n_h``), and an empty ``reference``
  column for the person who labels it.

``dinov3-eo sample MAP.tif -n 500 -o points.gpkg`` is the command; label the points, then
``dinov3-eo segment evaluate MAP.tif points.gpkg --attribute reference``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: how points are shared among strata (before the minimum per stratum)
ALLOCATIONS = ("proportional", "equal")


def sample_size(weights: Sequence[float], user_accuracies: Sequence[float] | float, target_se: float) -> int:
    """Points for a standard error ``target_se`` of the overall accuracy of a map whose classes cover ``weights``
    (shares summing to 1) and are expected to be right ``user_accuracies`` of the time (one per class, or one for
    all): ``ceil((sum_i W_i sqrt(U_i (1 - U_i)) / target_se)²)``.

    Raises:
        ValueError: a target outside (0, 1), accuracies outside [0, 1], or a length mismatch.
    """
    w = np.asarray(weights, np.float64)
    u = np.broadcast_to(np.asarray(user_accuracies, np.float64), w.shape) if np.ndim(user_accuracies) == 0 else (
        np.asarray(user_accuracies, np.float64))  # fmt: skip
    if u.shape != w.shape:
        raise ValueError(f"{len(u)} expected accuracies for {len(w)} strata; give one per stratum, or one for all.")
    if not 0 < target_se < 1 or ((u < 0) | (u > 1)).any():
        raise ValueError(f"The target standard error ({target_se}) and the expected accuracies ({u.tolist()}) are "
                         "fractions between 0 and 1.")  # fmt: skip
    spread = float(np.sum(w / w.sum() * np.sqrt(u * (1 - u))))
    return max(1, math.ceil((spread / target_se) ** 2 - 1e-9))


def allocate(counts: Sequence[int], n: int, *, allocation: str = "proportional", min_per_stratum: int = 0) -> np.ndarray:
    """``[H]`` points per stratum for ``n`` points over strata of ``counts`` pixels: ``proportional`` to the counts
    or ``equal``, every stratum raised to ``min_per_stratum`` (the others giving way in proportion), none above its
    pixels; the sum is ``n`` unless the strata hold fewer pixels. Rounding by largest remainders.

    Raises:
        ValueError: an unknown allocation, ``n`` < 1, or ``n`` too small for the minimum in every stratum.
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"The allocation must be one of {ALLOCATIONS}, not {allocation!r}.")
    sizes = np.asarray(counts, np.int64)
    if n < 1:
        raise ValueError(f"A sample needs at least one point, got {n}.")
    floors = np.minimum(sizes, max(0, int(min_per_stratum)))
    if floors.sum() > n:
        raise ValueError(f"{n} points cannot give every one of the {int((sizes > 0).sum())} strata {min_per_stratum}; "
                         "ask for more points or a smaller minimum.")  # fmt: skip
    n = int(min(n, sizes.sum()))
    share = (sizes if allocation == "proportional" else np.ones(len(sizes))).astype(np.float64)
    out = np.zeros(len(sizes), np.int64)
    fixed = np.zeros(len(sizes), bool)
    while True:  # strata whose share falls below their minimum, or above their pixels, are fixed there
        free = np.flatnonzero(~fixed)
        budget = n - int(out[fixed].sum())
        target = share[free] / share[free].sum() * budget if len(free) else np.empty(0)
        low, high = target < floors[free], target > sizes[free]
        if not (low | high).any():
            break
        out[free[low]], out[free[high]] = floors[free[low]], sizes[free[high]]
        fixed[free[low | high]] = True
    whole = np.floor(target).astype(np.int64)
    extra = budget - int(whole.sum())  # largest remainders take the points rounding left over
    for i in np.argsort(-(target - whole), kind="stable")[: max(0, extra)]:
        whole[i] += 1
    out[free] = whole
    return out


def _class_counts(src: Any, band: int, strata: Sequence[int] | None, block: int) -> dict[int, int]:
    """Valid pixels per class value over the whole raster, block by block."""
    counts: dict[int, int] = {}
    for window in _windows(src, block):
        values, valid = _read_classes(src, band, window)
        present, n = np.unique(values[valid], return_counts=True)
        for value, count in zip(present.tolist(), n.tolist()):
            if strata is None or value in strata:
                counts[value] = counts.get(value, 0) + count
    return dict(sorted(counts.items()))


def _windows(src: Any, block: int) -> list[Any]:
    from rasterio.windows import Window

    return [Window(col, row, min(block, src.width - col), min(block, src.height - row))
            for row in range(0, src.height, block) for col in range(0, src.width, block)]  # fmt: skip


def _read_classes(src: Any, band: int, window: Any) -> tuple[np.ndarray, np.ndarray]:
    read = src.read(band, window=window, masked=True)
    return np.ma.getdata(read), ~np.ma.getmaskarray(read)


def stratified_sample(
    raster: str | os.PathLike[str],
    *,
    n: int | None = None,
    per_stratum: dict[int, int] | None = None,
    allocation: str = "proportional",
    min_per_stratum: int = 0,
    strata: Sequence[int] | None = None,
    band: int = 1,
    seed: int = 0,
    block: int = 1024,
) -> Any:
    """A stratified random sample of ``raster``'s pixels, its classes the strata (module docstring): ``n`` points
    allocated by :func:`allocate`, or ``per_stratum`` (class id -> points) as given; nodata pixels never drawn.

    Args:
        strata: the class ids to sample (default: every class present).
        seed: the draw's seed (the same raster, design and seed give the same points).

    Returns:
        A ``GeoDataFrame`` of points at the drawn pixels' centres in the raster's CRS: ``id``, ``stratum`` (the class
        name, else its id), ``class_id``, ``pixels_per_point`` (``N_h / n_h``), ``reference`` (empty), ordered by
        stratum then row; its ``attrs["design"]`` holds the strata's pixels, area and points.

    Raises:
        ValueError: a raster of non-integer values, no georeference, neither or both of ``n`` and ``per_stratum``,
        a stratum asked for more points than it has pixels, no pixel to sample.
    """
    import geopandas as gpd

    from dinov3_eo.data.raster import open_quietly, pixel_area_ha, require_georeferenced, tagged_class_names

    if (n is None) == (per_stratum is None):
        raise ValueError("Give the number of points (n) or the points per stratum, one of the two.")
    with open_quietly(raster) as src:
        require_georeferenced(src)
        if not np.issubdtype(np.dtype(src.dtypes[band - 1]), np.integer):
            raise ValueError(f"{os.fspath(raster)!r} holds {src.dtypes[band - 1]} values; strata come from a class "
                             "raster of integers (a class map, or a value map binned into classes).")  # fmt: skip
        counts = _class_counts(src, band, strata, block)
        if not counts:
            raise ValueError(f"{os.fspath(raster)!r} has no valid pixel of the strata asked for.")
        labels = list(counts)
        if per_stratum is not None:
            wanted = np.array([int(per_stratum.get(c, 0)) for c in labels])
            over = [c for c, k in zip(labels, wanted) if k > counts[c]]
            if over:
                raise ValueError(f"Strata {over} are asked for more points than they have pixels "
                                 f"({[counts[c] for c in over]}).")  # fmt: skip
        else:
            wanted = allocate([counts[c] for c in labels], int(n), allocation=allocation,
                              min_per_stratum=min_per_stratum)  # fmt: skip
        rng = np.random.default_rng(seed)
        # each stratum's points as ranks among its pixels in block order, then found in a second pass
        ranks = {c: np.sort(rng.choice(counts[c], size=int(k), replace=False)) for c, k in zip(labels, wanted) if k}
        seen = dict.fromkeys(labels, 0)
        picked: dict[int, list[np.ndarray]] = {c: [] for c in ranks}
        for window in _windows(src, block):
            values, valid = _read_classes(src, band, window)
            for c, r in ranks.items():
                here = valid & (values == c)
                total = int(here.sum())
                if not total:
                    continue
                lo, hi = np.searchsorted(r, [seen[c], seen[c] + total])
                if hi > lo:
                    flat = np.flatnonzero(here)[r[lo:hi] - seen[c]]
                    rows, cols = np.divmod(flat, int(window.width))
                    picked[c].append(np.stack([rows + int(window.row_off), cols + int(window.col_off)], axis=1))
                seen[c] += total
        names = tagged_class_names(src, band) or []
        hectares = pixel_area_ha(src.crs, src.transform)
        transform, crs = src.transform, src.crs
    rows_cols = [np.concatenate(picked[c]) if picked[c] else np.empty((0, 2), np.int64) for c in ranks]
    cells = np.concatenate(rows_cols) if rows_cols else np.empty((0, 2), np.int64)
    class_ids = np.concatenate([np.full(len(rc), c) for c, rc in zip(ranks, rows_cols)]) if rows_cols else np.empty(0)
    x, y = transform @ (cells[:, 1] + 0.5, cells[:, 0] + 0.5)
    name = lambda c: names[c] if 0 <= c < len(names) else str(c)  # noqa: E731
    per_point = {c: counts[c] / len(r) for c, r in ranks.items()}
    frame = gpd.GeoDataFrame(
        {"id": np.arange(1, len(cells) + 1), "stratum": [name(int(c)) for c in class_ids],
         "class_id": class_ids.astype(np.int64), "pixels_per_point": [per_point[int(c)] for c in class_ids],
         "reference": [""] * len(cells)},
        geometry=gpd.points_from_xy(x, y), crs=crs)  # fmt: skip
    frame.attrs["design"] = [{"class_id": int(c), "stratum": name(c), "pixels": int(counts[c]),
                              "area_ha": None if hectares is None else counts[c] * hectares,
                              "weight": counts[c] / sum(counts.values()), "points": int(k)}
                             for c, k in zip(labels, wanted)]  # fmt: skip
    return frame


def sample_main(argv: Sequence[str]) -> int:
    """``dinov3-eo sample MAP.tif -n 500 -o points.gpkg``."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo sample",
        description="A stratified random sample of a class map's pixels for an accuracy assessment (Olofsson et al. "
                    "2014): points per class proportional to its area or equal, at least --min-per-class each, drawn "
                    "uniformly within each class. Writes the points (with an empty 'reference' column to fill in) "
                    "and <out>_design.json; label them, then 'dinov3-eo segment evaluate MAP points.gpkg "
                    "--attribute reference' gives the accuracies and error-adjusted areas.")  # fmt: skip
    parser.add_argument("map", help="the class map (its classes are the strata), or any class raster of strata")
    parser.add_argument("-o", "--output", required=True, help="the points: .gpkg, .geojson, or .csv (x, y in the "
                        "map's CRS and lon, lat)")  # fmt: skip
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("-n", "--points", type=int, help="points in all")
    size.add_argument("--target-se", type=float, help="instead of -n: the standard error of the overall accuracy to "
                      "reach (e.g. 0.01), from --expected-accuracy")  # fmt: skip
    parser.add_argument("--expected-accuracy", type=float, nargs="+", default=[0.85],
                        help="with --target-se: each class's expected user's accuracy, or one for all (default 0.85)")
    parser.add_argument("--allocation", choices=ALLOCATIONS, default="proportional",
                        help="points per class proportional to its area (default) or equal")
    parser.add_argument("--min-per-class", type=int, default=50, help="at least this many points in every class "
                        "(default 50; fewer where a class has fewer pixels)")  # fmt: skip
    parser.add_argument("--classes", nargs="+", default=None, help="sample only these classes (names or ids)")
    parser.add_argument("--band", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(list(argv))

    from dinov3_eo.data.raster import open_quietly, tagged_class_names
    from dinov3_eo.inference.writers import VECTOR_FORMATS, atomic_output, check_overwrite, write_vector

    out = Path(args.output)
    if out.suffix.lower() not in (*VECTOR_FORMATS, ".csv"):
        raise ValueError(f"Points are written as .gpkg, .geojson or .csv, not {str(out)!r}.")
    design_path = out.with_name(f"{out.stem}_design.json")
    for path in (out, design_path):
        check_overwrite(path, args.overwrite, inputs=[args.map])
    strata = None
    if args.classes:
        with open_quietly(args.map) as src:
            names = tagged_class_names(src, args.band) or []
        unknown = [c for c in args.classes if c not in names and not c.isdigit()]
        if unknown:
            raise ValueError(f"{args.map} has no classes {unknown} (its classes: {names or 'unnamed ids'}).")
        strata = [names.index(c) if c in names else int(c) for c in args.classes]
    n = args.points
    if n is None:
        with open_quietly(args.map) as src:
            counts = _class_counts(src, args.band, strata, 1024)
        weights = np.array(list(counts.values()), np.float64)
        accuracy = args.expected_accuracy[0] if len(args.expected_accuracy) == 1 else args.expected_accuracy
        n = sample_size(weights / weights.sum(), accuracy, args.target_se)
        print(f"{n} points for a standard error of {args.target_se:g} on the overall accuracy")
    frame = stratified_sample(args.map, n=n, allocation=args.allocation, min_per_stratum=args.min_per_class,
                              strata=strata, band=args.band, seed=args.seed)  # fmt: skip
    design = frame.attrs.pop("design")
    if out.suffix.lower() == ".csv":
        lonlat = frame.to_crs("EPSG:4326").geometry
        table = frame.drop(columns=frame.geometry.name).assign(x=frame.geometry.x, y=frame.geometry.y, lon=lonlat.x,
                                                               lat=lonlat.y)  # fmt: skip
        with atomic_output(out, overwrite=args.overwrite) as tmp:
            table.to_csv(tmp, index=False)
    else:
        write_vector(frame, out, layer="points", overwrite=args.overwrite)
    with atomic_output(design_path, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps({"map": os.fspath(args.map), "points": len(frame), "allocation": args.allocation,
                                   "min_per_class": args.min_per_class, "seed": args.seed, "strata": design}, indent=2))
    print(f"{'stratum':<16}{'pixels':>12}{'share':>8}{'points':>8}")
    for row in design:
        print(f"{row['stratum']:<16}{row['pixels']:>12,}{100 * row['weight']:>7.1f}%{row['points']:>8}")
    print(f"wrote {len(frame)} points to {out} and the design to {design_path.name}")
    return 0


__all__ = ["ALLOCATIONS", "allocate", "sample_main", "sample_size", "stratified_sample"]
