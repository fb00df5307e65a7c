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

from dinov3_eo.data.raster import block_windows

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


def bin_names(edges: Sequence[float]) -> list[str]:
    """Class names of the bins ``(-inf, e0), [e0, e1), ..., [e_last, inf)``: ``"<10"``, ``"10-20"``, ``">=30"``."""
    edges = [float(e) for e in edges]
    inner = [f"{a:g}-{b:g}" for a, b in zip(edges[:-1], edges[1:])]
    return [f"<{edges[0]:g}", *inner, f">={edges[-1]:g}"]


def bin_raster(raster: str | os.PathLike[str], edges: Sequence[float], dst: str | os.PathLike[str], *, band: int = 1,
               overwrite: bool = False) -> Path:  # fmt: skip
    """A value map (canopy height, biomass) cut into strata at ``edges`` (increasing): a uint8 class COG on its grid,
    class ``i`` for values in ``[edges[i-1], edges[i])`` (:func:`bin_names`), 255 where the map has no value. The
    strata of a sample for ``regress evaluate --strata``.

    Raises:
        ValueError: edges not increasing, or more than 254 bins. FileExistsError: ``dst`` exists without ``overwrite``.
    """
    from dinov3_eo.data.raster import open_quietly
    from dinov3_eo.inference.writers import COGWriter, check_overwrite

    edges = np.asarray(edges, np.float64)
    if edges.ndim != 1 or not len(edges) or (np.diff(edges) <= 0).any() or len(edges) > 253:
        raise ValueError(f"Bin edges must increase (at most 253 of them), got {edges.tolist()}.")
    check_overwrite(dst, overwrite, inputs=[raster])
    with open_quietly(raster) as src:
        with COGWriter(dst, width=src.width, height=src.height, count=1, dtype="uint8", crs=src.crs,
                       transform=src.transform, nodata=255, class_names=bin_names(edges), overwrite=overwrite,
                       tags={"source": Path(raster).name, "bin_edges": json.dumps(edges.tolist())}) as out:  # fmt: skip
            for window in block_windows(src.height, src.width, 1024):
                read = src.read(band, window=window, masked=True).astype(np.float64)
                values = read.filled(np.nan)
                classes = np.where(np.isfinite(values), np.digitize(values, edges), 255).astype(np.uint8)
                out.write(classes[None], window=window)
    return Path(dst)


#: stratum ids of buffer strata start here (map classes keep their own values as stratum ids)
BUFFER_BASE = 1_000_000


def _read_strata(src: Any, band: int, window: Any, buffers: Sequence[tuple[int, int]],
                 classes: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """``(strata, map classes, valid)`` of a window: each valid pixel's stratum (its class, or ``BUFFER_BASE + b``
    within ``buffers[b]``'s distance of that class and not of it; the first buffer wins), ``-1`` where it is not
    sampled. A buffer looks ``px`` pixels beyond the window, so blocks agree at their edges."""
    from dinov3_eo.data.raster import halo_window, inner_slices

    outer = halo_window(window, max((px for _, px in buffers), default=0), src.height, src.width)
    read = src.read(band, window=outer, masked=True)
    values, valid = np.ma.getdata(read).astype(np.int64), ~np.ma.getmaskarray(read)
    strata = np.where(valid, values, -1)
    if classes is not None:
        strata[~np.isin(values, list(classes))] = -1
    if buffers:
        from scipy.ndimage import binary_dilation

        for b, (value, px) in enumerate(buffers):
            offsets = np.arange(-px, px + 1)
            disk = np.hypot(*np.meshgrid(offsets, offsets)) <= px
            near = binary_dilation(valid & (values == value), structure=disk)
            strata[near & valid & (values != value) & (strata < BUFFER_BASE)] = BUFFER_BASE + b
    crop = inner_slices(window, outer)
    return strata[crop], values[crop], valid[crop]


def _stratum_counts(src: Any, band: int, block: int, buffers: Sequence[tuple[int, int]],
                    classes: Sequence[int] | None) -> tuple[dict[int, int], dict[int, int]]:  # fmt: skip
    """Pixels per stratum, and valid pixels per map class, over the whole raster, block by block."""
    strata_counts: dict[int, int] = {}
    class_counts: dict[int, int] = {}
    for window in block_windows(src.height, src.width, block):
        strata, values, valid = _read_strata(src, band, window, buffers, classes)
        for target, array in ((strata_counts, strata[strata >= 0]), (class_counts, values[valid])):
            present, n = np.unique(array, return_counts=True)
            for value, count in zip(present.tolist(), n.tolist()):
                target[value] = target.get(value, 0) + count
    return dict(sorted(strata_counts.items())), dict(sorted(class_counts.items()))


def stratified_sample(
    raster: str | os.PathLike[str],
    *,
    n: int | None = None,
    per_stratum: dict[int, int] | None = None,
    target_se: float | None = None,
    expected_accuracy: float | Sequence[float] = 0.9,
    allocation: str = "proportional",
    min_per_stratum: int = 0,
    strata: Sequence[int] | None = None,
    buffers: Sequence[tuple[int, int]] = (),
    band: int = 1,
    seed: int = 0,
    block: int = 1024,
) -> Any:
    """A stratified random sample of ``raster``'s pixels, its classes the strata (module docstring): ``n`` points
    allocated by :func:`allocate`, or ``per_stratum`` (stratum id -> points) as given, or as many points as
    :func:`sample_size` gives for a ``target_se`` of the overall accuracy with ``expected_accuracy`` (one for all
    strata, or one per stratum in id order) and the strata's shares; nodata pixels never drawn.

    Args:
        strata: the class ids to sample (default: every class present).
        buffers: ``(class id, pixels)``: a stratum of its own for the pixels within that distance of the class
            and not of it (where a map's omissions of a rare class hide; Olofsson et al. 2014's buffer stratum),
            id ``BUFFER_BASE + i``. The strata then differ from the map classes: estimate with :func:`design_estimates`.
        seed: the draw's seed (the same raster, design and seed give the same points).

    Returns:
        A ``GeoDataFrame`` of points at the drawn pixels' centres in the raster's CRS: ``id``, ``stratum`` (the
        class name, its id, or ``"<class> buffer"``), ``stratum_id``, ``class_id`` (the map's class there),
        ``pixels_per_point`` (``N_h / n_h``), ``reference`` (empty), ordered by stratum then row; its
        ``attrs["design"]`` holds the strata's pixels, area and points, ``attrs["map_classes"]`` each map class's
        name and pixels.

    Raises:
        ValueError: a raster of non-integer values, no georeference, not exactly one of ``n``, ``per_stratum`` and
        ``target_se``,
        a stratum asked for more points than it has pixels, no pixel to sample.
    """
    import geopandas as gpd

    from dinov3_eo.data.raster import open_quietly, pixel_area_ha, require_georeferenced, tagged_class_names

    if sum(x is not None for x in (n, per_stratum, target_se)) != 1:
        raise ValueError("Give the number of points (n), the points per stratum or a target standard error, one of "
                         "the three.")  # fmt: skip
    with open_quietly(raster) as src:
        require_georeferenced(src)
        if not np.issubdtype(np.dtype(src.dtypes[band - 1]), np.integer):
            raise ValueError(f"{os.fspath(raster)!r} holds {src.dtypes[band - 1]} values; strata come from a class "
                             "raster of integers (a class map, or a value map binned into classes).")  # fmt: skip
        counts, class_pixels = _stratum_counts(src, band, block, buffers, strata)
        if not counts:
            raise ValueError(f"{os.fspath(raster)!r} has no valid pixel of the strata asked for.")
        labels = list(counts)
        if target_se is not None:  # the shares come from the pass above: the map is not read once more for them
            weights = np.array([counts[c] for c in labels], np.float64)
            n = sample_size(weights / weights.sum(), expected_accuracy, target_se)
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
        for window in block_windows(src.height, src.width, block):
            stratum_of, values, _ = _read_strata(src, band, window, buffers, strata)
            for c, r in ranks.items():
                here = stratum_of == c
                total = int(here.sum())
                if not total:
                    continue
                lo, hi = np.searchsorted(r, [seen[c], seen[c] + total])
                if hi > lo:
                    flat = np.flatnonzero(here)[r[lo:hi] - seen[c]]
                    rows, cols = np.divmod(flat, int(window.width))
                    picked[c].append(np.stack([rows + int(window.row_off), cols + int(window.col_off),
                                               values.ravel()[flat]], axis=1))  # fmt: skip
                seen[c] += total
        names = tagged_class_names(src, band) or []
        hectares = pixel_area_ha(src.crs, src.transform)
        transform, crs = src.transform, src.crs
    class_name = lambda c: names[c] if 0 <= c < len(names) else str(c)  # noqa: E731
    stratum_name = lambda h: f"{class_name(buffers[h - BUFFER_BASE][0])} buffer" if h >= BUFFER_BASE else class_name(h)  # noqa: E731
    drawn = [np.concatenate(picked[c]) if picked[c] else np.empty((0, 3), np.int64) for c in ranks]
    cells = np.concatenate(drawn) if drawn else np.empty((0, 3), np.int64)
    stratum_ids = np.concatenate([np.full(len(d), c) for c, d in zip(ranks, drawn)]) if drawn else np.empty(0, np.int64)
    x, y = transform @ (cells[:, 1] + 0.5, cells[:, 0] + 0.5)
    per_point = {c: counts[c] / len(r) for c, r in ranks.items()}
    frame = gpd.GeoDataFrame(
        {"id": np.arange(1, len(cells) + 1), "stratum": [stratum_name(int(h)) for h in stratum_ids],
         "stratum_id": stratum_ids.astype(np.int64), "class_id": cells[:, 2].astype(np.int64),
         "pixels_per_point": [per_point[int(h)] for h in stratum_ids], "reference": [""] * len(cells)},
        geometry=gpd.points_from_xy(x, y), crs=crs)  # fmt: skip
    total = sum(counts.values())
    frame.attrs["points_asked"] = int(n) if n is not None else int(sum(wanted))
    frame.attrs["design"] = [{"stratum_id": int(h), "stratum": stratum_name(h), "pixels": int(counts[h]),
                              "area_ha": None if hectares is None else counts[h] * hectares,
                              "weight": counts[h] / total, "points": int(k)}
                             for h, k in zip(labels, wanted)]  # fmt: skip
    frame.attrs["map_classes"] = [{"class_id": int(c), "name": class_name(c), "pixels": int(p)}
                                  for c, p in class_pixels.items()]  # fmt: skip
    frame.attrs["pixel_area_ha"] = hectares
    return frame


def _stratified_total(strata: np.ndarray, y: np.ndarray, sizes: dict[int, int], fpc: bool,
                      x: np.ndarray | None = None) -> tuple[float, float, float]:  # fmt: skip
    """``(Ŷ, X̂, V)``: the stratified estimates of the totals of ``y`` and ``x`` over the strata's pixels and the
    variance of ``Ŷ`` (``x`` None) or of the ratio ``Ŷ / X̂`` (times ``X̂²``). A stratum with a single point has no
    sample variance and adds none (as ``segment evaluate``'s estimator): give every stratum two points or more."""
    y_total = x_total = variance = 0.0
    pairs = []
    for h, size in sizes.items():
        inside = strata == h
        n_h = int(inside.sum())
        if not n_h:
            continue
        yh = y[inside].astype(np.float64)
        xh = x[inside].astype(np.float64) if x is not None else None
        y_total += size * yh.mean()
        x_total += size * xh.mean() if xh is not None else 0.0
        pairs.append((size, n_h, yh, xh))
    from dinov3_eo.tasks.map_estimate import stratum_variance_terms

    ratio = y_total / x_total if x is not None and x_total else 0.0
    spreads = []
    for size, n_h, yh, xh in pairs:
        if n_h < 2:
            continue
        if xh is None:
            spread = yh.var(ddof=1)
        else:  # the ratio's linearised residual y - R x
            spread = yh.var(ddof=1) + ratio**2 * xh.var(ddof=1) - 2 * ratio * np.cov(yh, xh, ddof=1)[0, 1]
        spreads.append((size, n_h, max(float(spread), 0.0)))  # (rounding can leave -1e-17 where y = R x)
    if spreads:
        variance = float(stratum_variance_terms(*np.asarray(spreads).T, finite_population=fpc).sum())
    return y_total, x_total, variance


def design_estimates(strata: np.ndarray, map_class: np.ndarray, reference: np.ndarray, stratum_pixels: dict[int, int],
                     map_pixels: dict[int, int], class_names: Sequence[str], *, pixel_area: float = 1.0,
                     z: float = 1.96, finite_population: bool = True) -> dict[str, Any]:  # fmt: skip
    """Class areas and accuracies from labelled points of a stratified random sample whose strata need not be the
    map classes (Stehman 2014, "Estimating area and map accuracy for stratified random sampling when the strata are
    different from the map classes"): every quantity is a stratified total of an indicator over the pixels, or a
    ratio of two (user's and producer's accuracy), with its variance from the strata's sample variances
    (``(1 - n_h/N_h)`` with ``finite_population``; the ratio's by linearisation). With the map classes as the strata
    and no finite-population correction it is Olofsson et al.'s estimator (``segment evaluate``'s) exactly.

    Args:
        strata, map_class, reference: ``[n]`` each point's stratum id, map class and reference class (ids).
        stratum_pixels: stratum id -> its pixels ``N_h``; map_pixels: map class id -> its pixels.
        class_names: class id -> name (ids beyond it named by number).

    Returns:
        As :func:`~dinov3_eo.tasks.segmentation_eval.area_estimates`: ``{"overall_accuracy", "overall_accuracy_ci",
        "unsampled_strata", "classes": {name: {"map_area", "estimated_area", "estimated_area_ci", "users_accuracy",
        "users_accuracy_ci", "producers_accuracy", "producers_accuracy_ci"}}}``, and ``"area_matrix"``: the error
        matrix in estimated shares of the area (``shares[i][j]``: mapped ``i``, reference ``j``; summing to 1).
    """
    strata, mapped, truth = (np.asarray(a, np.int64) for a in (strata, map_class, reference))
    total = float(sum(stratum_pixels.values()))
    ids = sorted(set(map_pixels) | set(truth.tolist()))
    name = lambda c: class_names[c] if 0 <= c < len(class_names) else str(c)  # noqa: E731
    fpc = finite_population
    right = mapped == truth
    overall, _, overall_var = _stratified_total(strata, right, stratum_pixels, fpc)
    classes = {}
    for c in ids:
        area, _, area_var = _stratified_total(strata, truth == c, stratum_pixels, fpc)
        users, mapped_total, users_var = _stratified_total(strata, right & (mapped == c), stratum_pixels, fpc,
                                                           x=mapped == c)  # fmt: skip
        producers, truth_total, producers_var = _stratified_total(strata, right & (mapped == c), stratum_pixels, fpc,
                                                                  x=truth == c)  # fmt: skip
        ratio = lambda a, b: a / b if b else math.nan  # noqa: E731
        classes[name(c)] = {
            "map_area": map_pixels.get(c, 0) * pixel_area, "estimated_area": area * pixel_area,
            "estimated_area_ci": z * math.sqrt(area_var) * pixel_area,
            "users_accuracy": ratio(users, mapped_total),
            "users_accuracy_ci": z * math.sqrt(users_var) / mapped_total if mapped_total else math.nan,
            "producers_accuracy": ratio(producers, truth_total),
            "producers_accuracy_ci": z * math.sqrt(producers_var) / truth_total if truth_total else math.nan,
        }  # fmt: skip
    sampled = set(strata.tolist())
    # the error matrix in shares of the area (rows: map, columns: reference), the table an accuracy report shows
    matrix = [[_stratified_total(strata, (mapped == i) & (truth == j), stratum_pixels, fpc)[0] / total for j in ids]
              for i in ids]  # fmt: skip
    return {"overall_accuracy": overall / total, "overall_accuracy_ci": z * math.sqrt(overall_var) / total,
            "unsampled_strata": [h for h, size in stratum_pixels.items() if size and h not in sampled],
            "classes": classes, "area_matrix": {"classes": [name(c) for c in ids], "rows": "map",
                                                "columns": "reference", "shares": matrix}}  # fmt: skip


def _buffer_arg(text: str) -> tuple[str, int]:
    name, _, px = text.rpartition(":")
    if not name or not px.isdigit() or int(px) < 1:
        raise argparse.ArgumentTypeError(f"--buffer takes CLASS:PIXELS (e.g. water:3), not {text!r}")
    return name, int(px)


def _class_ids(names: Sequence[str], wanted: Sequence[str], where: str) -> list[int]:
    unknown = [c for c in wanted if c not in names and not c.isdigit()]
    if unknown:
        raise ValueError(f"{where} has no classes {unknown} (its classes: {list(names) or 'unnamed ids'}).")
    return [list(names).index(c) if c in names else int(c) for c in wanted]


def sample_main(argv: Sequence[str]) -> int:
    """``dinov3-eo sample MAP.tif -n 500 -o points.gpkg``; ``dinov3-eo sample estimate points.gpkg``."""
    if argv and argv[0] == "estimate":
        return estimate_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="dinov3-eo sample",
        description="A stratified random sample of a class map's pixels for an accuracy assessment (Olofsson et al. "
                    "2014): points per class proportional to its area or equal, at least --min-per-class each, drawn "
                    "uniformly within each class; --buffer adds a stratum around a rare class. Writes the points "
                    "(with an empty 'reference' column to fill in) and <out>_design.json; label them, then "
                    "'dinov3-eo sample estimate points.gpkg' (any design) or 'dinov3-eo segment evaluate MAP "
                    "points.gpkg --attribute reference' (map classes as strata) gives the accuracies and "
                    "error-adjusted areas.")  # fmt: skip
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
                        help="points per stratum proportional to its area (default) or equal")
    parser.add_argument("--min-per-class", type=int, default=50, help="at least this many points in every stratum "
                        "(default 50; fewer where a stratum has fewer pixels)")  # fmt: skip
    parser.add_argument("--classes", nargs="+", default=None, help="sample only these classes (names or ids)")
    parser.add_argument("--buffer", type=_buffer_arg, action="append", default=[], metavar="CLASS:PIXELS",
                        help="a stratum of the pixels within PIXELS of CLASS (not of it), where the map's omissions "
                        "of a rare class hide; repeatable")  # fmt: skip
    parser.add_argument("--bins", type=float, nargs="+", default=None, metavar="EDGE",
                        help="a value map (heights, biomass): strata are its values cut at these edges, written to "
                        "<out>_strata.tif (the --strata of 'regress evaluate')")  # fmt: skip
    parser.add_argument("--band", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(list(argv))

    from dinov3_eo.data.raster import open_quietly, tagged_class_names
    from dinov3_eo.inference.writers import atomic_output, check_feature_suffix, check_overwrite, write_features

    out = Path(args.output)
    check_feature_suffix(out, "Points")
    design_path = out.with_name(f"{out.stem}_design.json")
    for path in (out, design_path, *([out.with_name(f"{out.stem}_strata.tif")] if args.bins else [])):
        check_overwrite(path, args.overwrite, inputs=[args.map])
    if args.bins:
        strata_path = bin_raster(args.map, sorted(args.bins), out.with_name(f"{out.stem}_strata.tif"), band=args.band,
                                 overwrite=args.overwrite)  # fmt: skip
        print(f"strata: {args.map} cut at {sorted(args.bins)} -> {strata_path}")
        args.map, args.band = str(strata_path), 1
    with open_quietly(args.map) as src:
        names = tagged_class_names(src, args.band) or []
    strata = _class_ids(names, args.classes, str(args.map)) if args.classes else None
    buffers = [(c, px) for c, (_, px) in zip(_class_ids(names, [b for b, _ in args.buffer], str(args.map)),
                                             args.buffer)]  # fmt: skip
    accuracy = args.expected_accuracy[0] if len(args.expected_accuracy) == 1 else args.expected_accuracy
    frame = stratified_sample(args.map, n=args.points, target_se=args.target_se if args.points is None else None,
                              expected_accuracy=accuracy, allocation=args.allocation,
                              min_per_stratum=args.min_per_class, strata=strata, buffers=buffers, band=args.band,
                              seed=args.seed)  # fmt: skip
    if args.points is None:
        print(f"{frame.attrs.pop('points_asked')} points for a standard error of {args.target_se:g} on the overall "
              "accuracy")  # fmt: skip
    design = frame.attrs.pop("design")
    record = {"map": os.fspath(args.map), "points": len(frame), "allocation": args.allocation,
              "min_per_class": args.min_per_class, "seed": args.seed, "class_names": names,
              "buffers": [{"class_id": c, "pixels": px} for c, px in buffers],
              "pixel_area_ha": frame.attrs.pop("pixel_area_ha"), "map_classes": frame.attrs.pop("map_classes"),
              "strata": design}  # fmt: skip
    write_features(frame, out, layer="points", overwrite=args.overwrite)
    with atomic_output(design_path, overwrite=args.overwrite) as tmp:
        tmp.write_text(json.dumps(record, indent=2))
    print(f"{'stratum':<20}{'pixels':>12}{'share':>8}{'points':>8}")
    for row in design:
        print(f"{row['stratum']:<20}{row['pixels']:>12,}{100 * row['weight']:>7.1f}%{row['points']:>8}")
    print(f"wrote {len(frame)} points to {out} and the design to {design_path.name}")
    return 0


def estimate_main(argv: Sequence[str]) -> int:
    """``dinov3-eo sample estimate points.gpkg [--design points_design.json]``."""
    parser = argparse.ArgumentParser(
        prog="dinov3-eo sample estimate",
        description="Class areas and user's, producer's and overall accuracies with 95 %% intervals from the labelled "
                    "points of 'dinov3-eo sample' (its strata may differ from the map classes: buffers; Stehman "
                    "2014).")  # fmt: skip
    parser.add_argument("points", help="the labelled points (.gpkg, .geojson or .csv)")
    parser.add_argument("--design", default=None, help="the design (default: <points>_design.json)")
    parser.add_argument("--reference-column", default="reference", help="the labels' column (default: reference)")
    parser.add_argument("--out", default=None, help="also write the estimates here (JSON)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(list(argv))

    import pandas as pd

    from dinov3_eo.inference.writers import atomic_output, check_overwrite

    points_path = Path(args.points)
    design_path = Path(args.design) if args.design else points_path.with_name(f"{points_path.stem}_design.json")
    for path in (points_path, design_path):
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist" + (" (give --design)" if path == design_path else "")
                                    + ".")  # fmt: skip
    if args.out:
        check_overwrite(args.out, args.overwrite, inputs=[points_path, design_path])
    design = json.loads(design_path.read_text())
    if points_path.suffix.lower() == ".csv":
        table = pd.read_csv(points_path, keep_default_na=False)
    else:
        import geopandas as gpd

        table = gpd.read_file(points_path)
    missing = [c for c in ("stratum_id", "class_id", args.reference_column) if c not in table.columns]
    if missing:
        raise KeyError(f"{str(points_path)!r} has no columns {missing}; these are the points 'dinov3-eo sample' wrote, "
                       "with the labels in --reference-column.")  # fmt: skip
    names = design.get("class_names") or []
    labels = table[args.reference_column].astype(str).str.strip()
    empty = int((labels == "").sum() + table[args.reference_column].isna().sum())
    if empty:
        raise ValueError(f"{empty} of the {len(table)} points have no label in {args.reference_column!r}; label every "
                         "point (a class name or id) before estimating.")  # fmt: skip
    reference = _class_ids(names, labels.tolist(), f"The design {design_path.name}")
    result = design_estimates(table["stratum_id"].to_numpy(), table["class_id"].to_numpy(), np.array(reference),
                              {row["stratum_id"]: row["pixels"] for row in design["strata"]},
                              {row["class_id"]: row["pixels"] for row in design["map_classes"]}, names,
                              pixel_area=design.get("pixel_area_ha") or 1.0)  # fmt: skip
    unit = "ha" if design.get("pixel_area_ha") else "pixels"
    print(f"{len(table)} labelled points, {len(design['strata'])} strata; areas in {unit}, 95 % intervals:")
    print(f"{'class':<16}{'mapped':>12}{'estimated':>12}{'± 95 %':>10}{'user':>8}{'producer':>10}")
    for name, row in result["classes"].items():
        print(f"{name:<16}{row['map_area']:>12,.1f}{row['estimated_area']:>12,.1f}{row['estimated_area_ci']:>10,.1f}"
              f"{row['users_accuracy']:>8.3f}{row['producers_accuracy']:>10.3f}")  # fmt: skip
    print(f"overall accuracy {result['overall_accuracy']:.3f} ± {result['overall_accuracy_ci']:.3f}")
    matrix = result["area_matrix"]
    print("error matrix, shares of the area (rows: map, columns: reference):")
    print(f"{'':<16}" + "".join(f"{c[:10]:>11}" for c in matrix["classes"]))
    for name, row in zip(matrix["classes"], matrix["shares"]):
        print(f"{name:<16}" + "".join(f"{v:>11.4f}" for v in row))
    if result["unsampled_strata"]:
        print(f"warning: strata {result['unsampled_strata']} have no point: every estimate is biased")
    if args.out:
        with atomic_output(args.out, overwrite=args.overwrite) as tmp:
            tmp.write_text(json.dumps({"unit": unit, **result}, indent=2))
    return 0


__all__ = ["ALLOCATIONS", "BUFFER_BASE", "allocate", "design_estimates", "estimate_main", "sample_main", "sample_size",
           "stratified_sample"]
