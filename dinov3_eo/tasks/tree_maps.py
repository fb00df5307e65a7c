"""Individual trees from a canopy height GeoTIFF: tree tops, crowns, and their agreement with reference trees.

A CHM of about a metre or finer (``height predict`` on sub-metre imagery, or a LiDAR CHM) resolves single crowns.
:func:`detect_trees` finds the tops and crowns of :mod:`dinov3_eo.tasks.tree_detection` over the whole raster, block
by block, and writes

* ``trees.gpkg`` (or ``.geojson`` / ``.csv``): one point per tree at its top, with ``tree_id``, ``height_m`` and,
  with crowns, ``crown_area_m2`` and ``crown_diameter_m`` (the diameter of a circle of the crown's area);
* ``trees_crowns.gpkg``: the crowns as polygons with the same columns, and ``trees_crowns.tif``, each pixel's
  ``tree_id`` (int32, 0 = no crown): zonal statistics and overlays work on either;
* ``trees.png``: the heights with the crowns outlined and the tops marked.

Blocks: the tops are found in a first pass over blocks read with a halo as wide as the largest search window, so
every top is the one a whole-raster run finds. They are numbered in row-major order; a second pass floods the crowns
of each block from the tops within a halo of two crown radii. A crown that crosses a block edge is flooded twice,
once per block, and each block writes its own part; the two parts agree unless the flooding that decides it reaches
past the halo (on the 9-Mpx map of ``scripts/bench_trees.py`` every crown came out as in one pass). Blocks of 1,024
pixels also keep the memory of the crowns' flooding (~90 bytes a pixel) to ~100 MiB.

:func:`evaluate_trees` compares detected trees with reference trees (a field stem map, or the tops of a LiDAR CHM):
precision, recall and F1 of one-to-one matches within a distance, and the matched trees' height errors.
``dinov3-eo height trees`` and ``height trees evaluate`` are the commands.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dinov3_eo.tasks.tree_detection import WindowRule, delineate_crowns, find_tree_tops, match_trees
from dinov3_eo.tasks.zonal import read_zones


@dataclass(frozen=True)
class TreeSummary:
    """What :func:`detect_trees` wrote and counted (per-hectare numbers over the pixels with a height)."""

    tops: Path
    crowns: Path | None
    labels: Path | None
    quicklook: Path | None
    trees: int
    area_ha: float
    trees_per_ha: float | None
    mean_height_m: float | None
    mean_crown_area_m2: float | None


def _read_heights(src: Any, window: Any, nodata: float | None) -> np.ndarray:
    """Band 1 in ``window`` as float64 metres, NaN where the file's (or the given) nodata is."""
    read = src.read(1, window=window, masked=True)
    heights = read.astype(np.float64).filled(np.nan)
    if nodata is not None:
        heights[np.ma.getdata(read) == nodata] = np.nan
    return heights


def smooth_heights(heights: np.ndarray, sigma_px: float) -> np.ndarray:
    """A Gaussian-smoothed copy of ``heights`` ``[H, W]`` that ignores NaN (a normalised convolution); NaN stays NaN."""
    if sigma_px <= 0:
        return heights
    from scipy.ndimage import gaussian_filter

    valid = np.isfinite(heights)
    total = gaussian_filter(np.where(valid, heights, 0.0), sigma_px, mode="constant")
    weight = gaussian_filter(valid.astype(np.float64), sigma_px, mode="constant")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(valid, total / weight, np.nan)


def detect_trees(
    chm: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    rule: WindowRule = WindowRule(),
    min_height: float = 2.0,
    smooth_m: float = 0.0,
    crowns: bool = True,
    crown_fraction: float = 0.45,
    max_crown_radius_m: float = 10.0,
    nodata: float | None = None,
    crowns_dst: str | os.PathLike[str] | None = None,
    labels_dst: str | os.PathLike[str] | None = None,
    quicklook: str | os.PathLike[str] | None = None,
    block: int = 1024,
    progress: bool = True,
    overwrite: bool = False,
) -> TreeSummary:
    """Find the trees of a canopy height GeoTIFF and write their tops (and crowns) (module docstring).

    Args:
        chm: a one-band canopy height GeoTIFF in metres on a projected grid (square pixels), an open dataset, or an
            ``xarray.DataArray`` with a CRS (``height predict``'s map read with rioxarray, or one computed in Python).
        dst: the tops: ``.gpkg``, ``.geojson`` or ``.csv``.
        rule: the search window (:class:`~dinov3_eo.tasks.tree_detection.WindowRule`).
        min_height: shorter pixels are no tree (default 2 m).
        smooth_m: Gaussian smoothing (sigma in metres) of the heights before the tops are sought, which removes
            the spurious tops of a rough crown (default 0: none); heights, crowns and outputs use the raw heights.
        crowns: also delineate the crowns (``crown_fraction``, ``max_crown_radius_m``: see
            :func:`~dinov3_eo.tasks.tree_detection.delineate_crowns`).
        nodata: override the file's nodata.
        crowns_dst, labels_dst: the crown polygons and label raster (default ``<dst stem>_crowns.gpkg`` / ``.tif``).
        quicklook: a ``.png`` picture.
        block: rows and columns processed at once.

    Raises:
        ValueError: a raster without a projected CRS, with non-square pixels or more than one band; bad settings.
        FileExistsError: an output exists and ``overwrite`` is false (checked before any work).
    """
    import geopandas as gpd
    from tqdm import tqdm

    from dinov3_eo.data.raster import (
        block_windows,
        halo_window,
        inner_slices,
        open_raster,
        pixel_area_ha,
        pixel_size_m,
        require_georeferenced,
    )
    from dinov3_eo.inference.writers import COGWriter, check_feature_suffix, check_overwrite, write_features

    check_feature_suffix(dst, "Trees")
    if min_height < 0 or smooth_m < 0 or max_crown_radius_m <= 0 or not 0 <= crown_fraction <= 1:
        raise ValueError(f"Needs min_height >= 0, smooth_m >= 0, max_crown_radius_m > 0 and crown_fraction in [0, 1]; "
                         f"got {min_height}, {smooth_m}, {max_crown_radius_m} and {crown_fraction}.")  # fmt: skip
    is_path = isinstance(chm, (str, os.PathLike))
    inputs = [chm] if is_path else []
    dst = check_overwrite(dst, overwrite, inputs=inputs)
    stem = dst.with_suffix("")
    if crowns:
        crowns_dst = check_overwrite(crowns_dst or f"{stem}_crowns.gpkg", overwrite, inputs=inputs)
        labels_dst = check_overwrite(labels_dst or f"{stem}_crowns.tif", overwrite, inputs=inputs)
    if quicklook is not None:
        quicklook = check_overwrite(quicklook, overwrite, inputs=inputs)
    where = os.fspath(chm) if is_path else "The canopy height DataArray"
    with open_raster(chm) as src:
        require_georeferenced(src)
        if src.count != 1:
            raise ValueError(f"{where} has {src.count} bands; a canopy height model is one band of metres.")
        size = pixel_size_m(src.crs, src.transform)
        if size is None:
            raise ValueError(f"{where} is in {src.crs} (degrees): tree windows and crowns are in metres; warp it to a "
                             "projected CRS first (gdalwarp -t_srs EPSG:326xx).")  # fmt: skip
        if not math.isclose(abs(src.transform.a), abs(src.transform.e), rel_tol=1e-3) or src.transform.b or src.transform.d:
            raise ValueError(f"{where} has non-square or rotated pixels ({src.res}); warp it to square pixels first.")
        crs, transform, height, width = src.crs, src.transform, src.height, src.width
        hectares = pixel_area_ha(crs, transform)
        sigma_px = smooth_m / size
        top_halo = int(math.ceil(max(rule.max_radius_m / size, math.sqrt(2.0)))) + int(math.ceil(4 * sigma_px))
        windows = block_windows(height, width, block)
        found, top_heights, valid = [], [], 0
        for window in tqdm(windows, desc="tree tops", unit="block", disable=not progress or len(windows) < 2):
            outer = halo_window(window, top_halo, height, width)
            raw = _read_heights(src, outer, nodata)  # [h, w]
            local = find_tree_tops(smooth_heights(raw, sigma_px), size, rule=rule, min_height=min_height)
            rows, cols = inner_slices(window, outer)
            inside = ((local[:, 0] >= rows.start) & (local[:, 0] < rows.stop) & (local[:, 1] >= cols.start)
                      & (local[:, 1] < cols.stop))  # fmt: skip
            local = local[inside]
            found.append(local + [int(outer.row_off), int(outer.col_off)])
            top_heights.append(raw[local[:, 0], local[:, 1]])
            valid += int(np.isfinite(raw[rows, cols]).sum())
        if not valid:
            raise ValueError(f"{where} has no height: every pixel is nodata (or NaN); check its nodata value "
                             "(--nodata).")  # fmt: skip
        tops = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
        tops_height = np.concatenate(top_heights) if top_heights else np.zeros(0)
        order = np.lexsort((tops[:, 1], tops[:, 0]))  # row-major: tree_id 1..N
        tops, tops_height = tops[order], tops_height[order]
        ids = np.arange(1, len(tops) + 1, dtype=np.int64)
        crown_pixels = np.zeros(len(tops) + 1, np.int64)
        if crowns:
            crown_halo = 2 * int(math.ceil(max_crown_radius_m / size)) + 1
            with COGWriter(labels_dst, crs=crs, transform=transform, width=width, height=height, count=1,
                           dtype="int32", nodata=0, overwrite=overwrite, band_descriptions=["tree_id of the crown"],
                           tags={"dinov3_eo_output": "tree_crowns", "chm": where if is_path else "DataArray"}) as out:  # fmt: skip
                for window in tqdm(windows, desc="tree crowns", unit="block", disable=not progress or len(windows) < 2):
                    outer = halo_window(window, crown_halo, height, width)
                    first, last = np.searchsorted(tops[:, 0], [outer.row_off, outer.row_off + outer.height])
                    near = np.arange(first, last)
                    near = near[(tops[near, 1] >= outer.col_off) & (tops[near, 1] < outer.col_off + outer.width)]
                    labels = delineate_crowns(
                        _read_heights(src, outer, nodata), tops[near] - [int(outer.row_off), int(outer.col_off)], size,
                        ids=ids[near], min_height=min_height, crown_fraction=crown_fraction,
                        max_radius=max_crown_radius_m)  # fmt: skip
                    core = labels[inner_slices(window, outer)]
                    out.write(core[None], window)
                    crown_pixels += np.bincount(core.ravel(), minlength=len(crown_pixels))
    xs = transform.c + (tops[:, 1] + 0.5) * transform.a
    ys = transform.f + (tops[:, 0] + 0.5) * transform.e
    columns: dict[str, Any] = {"tree_id": ids, "height_m": tops_height.astype(np.float64)}
    if crowns:
        area_m2 = crown_pixels[1:] * size**2
        columns |= {"crown_area_m2": area_m2, "crown_diameter_m": 2 * np.sqrt(area_m2 / np.pi)}
    trees = gpd.GeoDataFrame(columns, geometry=gpd.points_from_xy(xs, ys), crs=crs)
    write_features(trees, dst, layer="tree_tops", overwrite=overwrite)
    if crowns:
        polygons = crown_polygons(labels_dst)
        frame = gpd.GeoDataFrame(trees.drop(columns="geometry").merge(polygons, on="tree_id"), crs=crs)
        from dinov3_eo.inference.writers import write_vector

        write_vector(frame, crowns_dst, layer="crowns", overwrite=overwrite)
    if quicklook is not None:
        from dinov3_eo.tasks.height_plots import crown_picture

        crown_picture(quicklook, chm, trees, labels=labels_dst if crowns else None, overwrite=overwrite)
    area_ha = valid * hectares
    return TreeSummary(
        tops=dst, crowns=Path(crowns_dst) if crowns else None, labels=Path(labels_dst) if crowns else None,
        quicklook=quicklook, trees=len(trees), area_ha=area_ha, trees_per_ha=len(trees) / area_ha if area_ha else None,
        mean_height_m=float(tops_height.mean()) if len(tops) else None,
        mean_crown_area_m2=float(columns["crown_area_m2"].mean()) if crowns and len(tops) else None,
    )  # fmt: skip


def crown_polygons(labels: str | os.PathLike[str]) -> Any:
    """The crowns of a crown label raster as a ``GeoDataFrame`` of ``tree_id`` and one geometry per tree (the parts a
    block edge left apart joined into a MultiPolygon)."""
    import geopandas as gpd
    import rasterio

    from dinov3_eo.inference.writers import region_polygons

    with rasterio.open(labels) as src:
        polygons, ids = region_polygons(src)
        crs = src.crs
    frame = gpd.GeoDataFrame({"tree_id": np.asarray(ids, np.int64)}, geometry=gpd.GeoSeries(polygons, crs=crs))
    if frame["tree_id"].duplicated().any():
        frame = frame.dissolve(by="tree_id", as_index=False)
    return frame.sort_values("tree_id").reset_index(drop=True)


#: the columns :func:`stand_table` adds to each zone
STAND_COLUMNS = ("trees", "trees_per_ha", "mean_height_m", "max_height_m", "top_height_m", "mean_crown_area_m2",
                 "crown_cover", "area_ha")  # fmt: skip


def stand_table(trees: Any, zones: Any, *, crowns: Any = None, top_trees_per_ha: float = 100.0) -> Any:
    """The forest-inventory numbers of each zone (stand, plot, parcel) from its trees: a copy of ``zones`` with
    :data:`STAND_COLUMNS`.

    A tree belongs to the zone its top lies in. ``top_height_m`` is the mean height of the zone's
    ``top_trees_per_ha`` tallest trees per hectare (at least one; the forester's top or dominant height, 100 per ha),
    ``crown_cover`` the share of the zone under ``crowns`` (polygons, cut to the zone), ``area_ha`` the zone's area.

    Args:
        trees: tree points with ``height_m`` (and ``crown_area_m2``), e.g. :func:`detect_trees`' output; or a path.
        zones: polygons in any CRS; or a path. The table is in the trees' CRS, which must be projected.
        crowns: the crown polygons (``trees_crowns.gpkg``), or ``None`` for no ``crown_cover``.

    Raises:
        ValueError: trees without a projected CRS or without ``height_m``.
    """
    import shapely
    from rasterio.crs import CRS

    from dinov3_eo.data.labels import read_vector
    from dinov3_eo.data.raster import metres_per_unit

    trees = read_vector(trees, "Trees")
    factor = metres_per_unit(CRS.from_user_input(trees.crs)) if trees.crs is not None else None
    if factor is None:
        raise ValueError("The trees need a projected CRS (metres) for areas per hectare.")
    if "height_m" not in trees.columns:
        raise ValueError(f"The trees have no 'height_m' column (they have {list(trees.columns)}).")
    local = read_zones(zones).to_crs(trees.crs)
    area_ha = local.geometry.area.to_numpy() * factor**2 / 10_000
    zone_of = np.full(len(trees), -1, np.int64)
    tree_index, zone_index = local.sindex.query(trees.geometry, predicate="within")
    zone_of[tree_index] = zone_index  # a top on the shared edge of two zones goes to the last one listed
    heights = trees["height_m"].to_numpy(np.float64)
    crown_area = trees["crown_area_m2"].to_numpy(np.float64) if "crown_area_m2" in trees.columns else None
    rows: dict[str, list[float]] = {c: [] for c in STAND_COLUMNS}
    for k in range(len(local)):
        h = np.sort(heights[zone_of == k])[::-1]
        top = max(1, int(round(top_trees_per_ha * area_ha[k])))
        rows["trees"].append(len(h))
        rows["trees_per_ha"].append(len(h) / area_ha[k] if area_ha[k] > 0 else np.nan)
        rows["mean_height_m"].append(float(h.mean()) if len(h) else np.nan)
        rows["max_height_m"].append(float(h[0]) if len(h) else np.nan)
        rows["top_height_m"].append(float(h[:top].mean()) if len(h) else np.nan)
        rows["mean_crown_area_m2"].append(float(crown_area[zone_of == k].mean())
                                          if crown_area is not None and len(h) else np.nan)  # fmt: skip
        rows["area_ha"].append(float(area_ha[k]))
    cover = np.full(len(local), np.nan)
    if crowns is not None:
        shapes = read_vector(crowns, "Crowns").to_crs(trees.crs)  # (no crown at all is a valid answer)
        cover[:] = 0.0
        crown_index, zone_index = local.sindex.query(shapes.geometry, predicate="intersects")
        cut = shapely.intersection(shapes.geometry.to_numpy()[crown_index], local.geometry.to_numpy()[zone_index])
        np.add.at(cover, zone_index, shapely.area(cut) * factor**2)
        cover /= np.maximum(area_ha * 10_000, 1e-12)
    rows["crown_cover"] = cover.tolist()
    return local.assign(**{c: rows[c] for c in STAND_COLUMNS})


@dataclass(frozen=True)
class TreeEvaluation:
    """:func:`evaluate_trees`' scores (heights ``None`` without both sets' heights, or without a match)."""

    detected: int
    reference: int
    matched: int
    commission: int
    omission: int
    precision: float
    recall: float
    f1: float
    max_distance_m: float
    mean_distance_m: float | None
    height_bias_m: float | None
    height_rmse_m: float | None


def _height_column(frame: Any, column: str | None, what: str) -> str | None:
    """The named height column of ``frame`` (refused if missing), else the first of the usual names it has."""
    if column is not None:
        if column not in frame.columns:
            raise ValueError(f"The {what} trees have no column {column!r}; they have {list(frame.columns)}.")
        return column
    return next((c for c in ("height_m", "height", "rh98", "rh100", "h", "ht") if c in frame.columns), None)


def evaluate_trees(
    detected: Any,
    reference: Any,
    *,
    max_distance: float = 3.0,
    max_height_difference: float | None = None,
    detected_height: str | None = None,
    reference_height: str | None = None,
    area: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> TreeEvaluation:
    """Score detected trees against reference trees: one-to-one matches within ``max_distance`` metres (nearest
    pairs first; with ``max_height_difference``, only pairs whose heights differ by at most that), precision, recall,
    F1, and the matched pairs' height bias (detected - reference) and RMSE.

    Args:
        detected, reference: points (``GeoDataFrame`` or a vector file's path); the reference is brought into the
            detections' CRS, which must be projected (metres).
        detected_height, reference_height: their height columns (default: ``height_m``, ``height``, ``rh98``, ...).
        area: polygons (``GeoDataFrame`` or path) outside which neither set's trees count, e.g. the field plots.
        out_dir: writes ``tree_match.json`` (the scores) and ``tree_match.gpkg`` (every tree with its ``status``:
            ``matched``, ``commission`` or ``omission``, and its partner's index).

    Raises:
        ValueError: no CRS, a CRS in degrees, or a missing height column.
    """
    import geopandas as gpd
    import pandas as pd
    from rasterio.crs import CRS

    from dinov3_eo.data.labels import read_vector
    from dinov3_eo.data.raster import metres_per_unit
    from dinov3_eo.inference.writers import atomic_output, check_overwrite, write_vector

    detected, reference = read_vector(detected, "Trees"), read_vector(reference, "Trees")
    if detected.crs is None or reference.crs is None:
        raise ValueError("Both sets of trees need a CRS to be compared.")
    factor = metres_per_unit(CRS.from_user_input(detected.crs))
    if factor is None:
        raise ValueError(f"The detected trees are in {detected.crs} (degrees); distances need a projected CRS.")
    reference = reference.to_crs(detected.crs)
    if area is not None:
        zone = read_zones(area).to_crs(detected.crs).geometry.union_all()
        detected = detected[detected.geometry.within(zone)]
        reference = reference[reference.geometry.within(zone)]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tree_match.json", "tree_match.gpkg"):
            check_overwrite(out / name, overwrite)
    dh, rh = _height_column(detected, detected_height, "detected"), _height_column(reference, reference_height, "reference")
    d_xy = np.column_stack([detected.geometry.x, detected.geometry.y]) * factor
    r_xy = np.column_stack([reference.geometry.x, reference.geometry.y]) * factor
    d_h = detected[dh].to_numpy(np.float64) if dh else None
    r_h = reference[rh].to_numpy(np.float64) if rh else None
    match = match_trees(d_xy, r_xy, max_distance=max_distance, detected_height=d_h, reference_height=r_h,
                        max_height_difference=max_height_difference)  # fmt: skip
    i, j = match.pairs[:, 0], match.pairs[:, 1]
    distance = np.hypot(*(d_xy[i] - r_xy[j]).T) if len(i) else np.zeros(0)
    error = (d_h[i] - r_h[j]) if d_h is not None and r_h is not None and len(i) else None
    scores = TreeEvaluation(
        detected=match.detected, reference=match.reference, matched=match.true_positives,
        commission=match.commission, omission=match.omission, precision=match.precision, recall=match.recall,
        f1=match.f1, max_distance_m=max_distance, mean_distance_m=float(distance.mean()) if len(i) else None,
        height_bias_m=float(error.mean()) if error is not None else None,
        height_rmse_m=float(np.sqrt(np.mean(error**2))) if error is not None else None,
    )  # fmt: skip
    if out_dir is not None:
        partner_d = np.full(len(detected), -1, np.int64)
        partner_d[i] = j
        partner_r = np.full(len(reference), -1, np.int64)
        partner_r[j] = i
        rows = pd.concat([
            detected[[detected.geometry.name]].assign(
                set="detected", index=np.arange(len(detected)), partner=partner_d,
                status=np.where(partner_d >= 0, "matched", "commission"), height_m=d_h if d_h is not None else np.nan),
            reference[[reference.geometry.name]].assign(
                set="reference", index=np.arange(len(reference)), partner=partner_r,
                status=np.where(partner_r >= 0, "matched", "omission"), height_m=r_h if r_h is not None else np.nan),
        ], ignore_index=True)  # fmt: skip
        write_vector(gpd.GeoDataFrame(rows, crs=detected.crs), out / "tree_match.gpkg", layer="trees",
                     overwrite=overwrite)  # fmt: skip
        with atomic_output(out / "tree_match.json", overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(asdict(scores), indent=2) + "\n")
    return scores


def _evaluate_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dinov3-eo height trees evaluate",
        description="Detected trees against reference trees (a field stem map, the tops of a LiDAR CHM): one-to-one "
        "matches within a distance; precision, recall, F1 and the matched trees' height errors.",
    )
    p.add_argument("detected", help="detected tree points (height trees' output: .gpkg / .geojson)")
    p.add_argument("reference", help="reference tree points, any CRS")
    p.add_argument("--max-distance", type=float, default=3.0, help="metres within which two trees may match (default 3)")
    p.add_argument("--max-height-difference", type=float, default=None, help="metres; pairs differing more never match")
    p.add_argument("--detected-height", default=None, help="height column of the detections (default: height_m, ...)")
    p.add_argument("--reference-height", default=None, help="height column of the reference (default: height_m, "
                   "height, rh98, rh100, h, ht, the first it has)")  # fmt: skip
    p.add_argument("--area", default=None, help="polygons (e.g. the field plots) outside which no tree counts")
    p.add_argument("--out-dir", default=None, help="write tree_match.json and tree_match.gpkg here")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(list(argv))
    s = evaluate_trees(args.detected, args.reference, max_distance=args.max_distance,
                       max_height_difference=args.max_height_difference, detected_height=args.detected_height,
                       reference_height=args.reference_height, area=args.area, out_dir=args.out_dir,
                       overwrite=args.overwrite)  # fmt: skip
    print(f"{s.matched} of {s.reference} reference trees found ({s.detected} detected) within {s.max_distance_m:g} m: "
          f"precision {s.precision:.3f}, recall {s.recall:.3f}, F1 {s.f1:.3f}; commission {s.commission}, omission "
          f"{s.omission}")  # fmt: skip
    if s.height_rmse_m is not None:
        print(f"matched heights: bias {s.height_bias_m:+.2f} m, RMSE {s.height_rmse_m:.2f} m; mean distance "
              f"{s.mean_distance_m:.2f} m")  # fmt: skip
    if args.out_dir is not None:
        print(f"written: {Path(args.out_dir) / 'tree_match.json'}, {Path(args.out_dir) / 'tree_match.gpkg'}")
    return 0


def trees_main(argv: Sequence[str]) -> int:
    """``dinov3-eo height trees CHM.tif -o trees.gpkg`` and ``height trees evaluate DETECTED REFERENCE``."""
    argv = list(argv)
    if argv and argv[0] == "evaluate":
        return _evaluate_main(argv[1:])
    p = argparse.ArgumentParser(
        prog="dinov3-eo height trees",
        description="Individual trees of a canopy height model (metres, ~1 m pixels or finer): tops by a "
        "variable-window local-maximum filter, crowns by a marker-controlled watershed; points, crown polygons, a "
        "crown raster and a picture. 'height trees evaluate DETECTED REFERENCE' scores them against reference trees.",
    )
    p.add_argument("chm", help="canopy height GeoTIFF in metres on a projected grid")
    p.add_argument("-o", "--output", required=True, help="tree tops: .gpkg, .geojson or .csv; crowns go to "
                   "OUTPUT_crowns.gpkg and OUTPUT_crowns.tif, the picture to OUTPUT.png")  # fmt: skip
    p.add_argument("--min-height", type=float, default=2.0, help="shorter pixels are no tree (default 2 m)")
    p.add_argument("--window", type=float, nargs=2, default=(0.5, 0.06), metavar=("A", "B"),
                   help="search radius A + B x height metres (default 0.5 0.06)")  # fmt: skip
    p.add_argument("--max-radius", type=float, default=10.0, help="largest search radius in metres (default 10)")
    p.add_argument("--smooth", type=float, default=0.0, help="Gaussian sigma in metres applied before the tops are "
                   "sought (default 0: none; try one pixel on a rough CHM)")  # fmt: skip
    p.add_argument("--crown-fraction", type=float, default=0.45,
                   help="a crown's pixels are at least this share of its top's height (default 0.45)")
    p.add_argument("--max-crown-radius", type=float, default=10.0, help="metres a crown may reach from its top (default 10)")
    p.add_argument("--no-crowns", action="store_true", help="tops only (faster)")
    p.add_argument("--zones", default=None, help="polygons (stands, plots; any CRS): writes OUTPUT_zones.gpkg (or the "
                   "output's format) with each zone's trees, trees per ha, mean, max and top height (the 100 tallest "
                   "per ha), mean crown and crown cover")  # fmt: skip
    p.add_argument("--nodata", type=float, default=None, help="override the raster's nodata")
    p.add_argument("--block", type=int, default=1024, help="rows and columns processed at once (default 1024)")
    p.add_argument("--no-quicklook", action="store_true", help="do not write the PNG picture")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = p.parse_args(argv)
    if args.zones is not None:
        from dinov3_eo.inference.writers import check_overwrite, write_features

        out = Path(args.output)
        zones_path = check_overwrite(out.with_name(f"{out.stem}_zones{out.suffix}"), args.overwrite, inputs=[args.zones])
    summary = detect_trees(
        args.chm, args.output, rule=WindowRule(args.window[0], args.window[1], args.max_radius),
        min_height=args.min_height, smooth_m=args.smooth, crowns=not args.no_crowns,
        crown_fraction=args.crown_fraction, max_crown_radius_m=args.max_crown_radius, nodata=args.nodata,
        quicklook=None if args.no_quicklook else Path(args.output).with_suffix(".png"), block=args.block,
        overwrite=args.overwrite,
    )  # fmt: skip
    if args.zones is not None:
        trees = summary.tops
        if trees.suffix.lower() == ".csv":  # the table keeps the tops' x, y in the CHM's CRS
            import geopandas as gpd
            import pandas as pd
            import rasterio

            table = pd.read_csv(trees)
            with rasterio.open(args.chm) as src:
                trees = gpd.GeoDataFrame(table, geometry=gpd.points_from_xy(table["x"], table["y"]), crs=src.crs)
        zones_path = write_features(stand_table(trees, args.zones, crowns=summary.crowns), zones_path, layer="zones",
                                    overwrite=args.overwrite)  # fmt: skip
    density = "" if summary.trees_per_ha is None else f" ({summary.trees_per_ha:,.0f} per ha of {summary.area_ha:,.2f} ha)"
    print(f"{summary.trees:,} trees{density}" + (f", mean height {summary.mean_height_m:.1f} m"
                                                 if summary.mean_height_m is not None else ""))  # fmt: skip
    if summary.mean_crown_area_m2 is not None:
        print(f"mean crown {summary.mean_crown_area_m2:.1f} m² "
              f"({2 * math.sqrt(summary.mean_crown_area_m2 / math.pi):.1f} m across)")  # fmt: skip
    for label, path in (("tops:   ", summary.tops), ("crowns: ", summary.crowns), ("raster: ", summary.labels),
                        ("picture:", summary.quicklook), ("zones:  ", zones_path if args.zones else None)):  # fmt: skip
        if path is not None:
            print(f"{label} {path}")
    return 0


__all__ = ["STAND_COLUMNS", "TreeEvaluation", "TreeSummary", "crown_polygons", "detect_trees", "evaluate_trees",
           "smooth_heights", "stand_table", "trees_main"]
