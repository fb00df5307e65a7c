"""Polygons classified by a probe on their embeddings: ``classify fit / test / predict --zones TABLE``.

The table is ``embed SCENE --zones parcels.gpkg -o parcels.parquet``'s (:mod:`dinov3_eo.tasks.zone_embeddings`): each
polygon's area-weighted mean patch token. ``fit`` takes the polygons with a class in ``--label-column`` (others are
the ones to classify), holds out a stratified share to choose ``C`` and calibrate prediction sets, and saves the same
probe file a chip probe is, marked as a zone probe (its features are a polygon's patch mean, not a chip's
embedding: ``classify predict CHIPS`` and ``classify map`` refuse it). ``predict`` writes every polygon with its
``class``, ``score``, set and ``p_<class>``; ``test`` scores labelled polygons.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: ``ChipClassifier.embedding["kind"]`` of a probe fitted on polygon embeddings
ZONE_KIND = "zones"


def labelled_zones(table: Any, x: np.ndarray, label_column: str, *, where: str = "the zone table") -> tuple[np.ndarray, list[str]]:
    """The rows of a zone table with a class in ``label_column`` and features: ``(x [n, D], labels)``.

    Raises:
        ValueError: no such column.
    """
    if label_column not in table.columns:
        raise ValueError(f"{where} has no column {label_column!r}; it has {[c for c in table.columns if c != 'patch_mean']}.")
    labels = table[label_column]
    keep = labels.notna().to_numpy() & (labels.astype(str).str.strip() != "").to_numpy()
    if len(x):
        keep &= np.isfinite(x).all(axis=1)
    rows = np.flatnonzero(keep)
    return x[rows], [str(v) for v in labels.iloc[rows]]


def labels_from_points(table: Any, points: Any, column: str, *, where: str = "the points") -> tuple[Any, dict[str, int]]:
    """Each polygon's class from the labelled points inside it (field plots, survey points): the most common class
    of its points; a polygon whose points tie between classes gets none.

    Args:
        table: a zone table's frame (polygons, any CRS); points: a ``GeoDataFrame`` of points or a vector file's path.
        column: the points' class column.

    Returns:
        ``(labels, counts)``: a ``[N]`` object Series aligned with ``table`` (None where no point or a tie), and the
        counts of ``points`` with a class, those ``outside`` every polygon, polygons ``labelled`` and ``tied``.

    Raises:
        FileNotFoundError: no such file. ValueError: points without a CRS, other geometries, no such column.
    """
    import geopandas as gpd
    import pandas as pd

    from dinov3_eo.data.labels import read_vector

    if isinstance(points, (str, os.PathLike)):
        where = os.fspath(points)
    points = read_vector(points, "Labelled points")
    if points.crs is None:
        raise ValueError(f"{where} has no CRS: set it (e.g. in QGIS) so that the points can meet the polygons.")
    if column not in points.columns:
        raise ValueError(f"{where} has no column {column!r}; it has {[c for c in points.columns if c != 'geometry']}.")
    kinds = set(points.geometry.geom_type.dropna())
    if not kinds <= {"Point"}:
        raise ValueError(f"{where} holds {sorted(kinds)}, not points: label polygons in the zone table's own column.")
    named = points[points[column].notna() & (points[column].astype(str).str.strip() != "")]
    named = named.assign(_class=named[column].astype(str).str.strip()).to_crs(table.crs)
    polygons = gpd.GeoDataFrame({"_zone": np.arange(len(table))}, geometry=table.geometry.reset_index(drop=True), crs=table.crs)
    joined = gpd.sjoin(named[["_class", "geometry"]], polygons, predicate="within", how="left")
    outside = int(joined.loc[~joined.index.duplicated(), "_zone"].isna().sum())
    votes = joined.dropna(subset=["_zone"]).groupby(["_zone", "_class"]).size().rename("n").reset_index()
    labels = pd.Series([None] * len(table), dtype=object)
    tied = 0
    for zone, group in votes.groupby("_zone"):
        top = group[group["n"] == group["n"].max()]
        if len(top) > 1:
            tied += 1
            continue
        labels.iloc[int(zone)] = top["_class"].iloc[0]
    counts = {"points": len(named), "outside": outside, "labelled": int(labels.notna().sum()), "tied": tied}
    return labels, counts


def refuse_zone_probe(probe: Any, what: str) -> None:
    """Raise ValueError if ``probe`` was fitted on polygon embeddings: ``what`` (chips, a scene's tiles) are
    embedded otherwise, and its scores on them would mean nothing."""
    if probe.embedding.get("kind") == ZONE_KIND:
        raise ValueError(f"This probe was fitted on polygon embeddings ('embed --zones'); it cannot classify {what}: "
                         "embed the polygons to classify the same way and run 'classify predict --zones TABLE'.")  # fmt: skip


def table_steps(made: dict[str, Any]) -> int:
    """How many dates a zone table's ``patch_mean`` holds one after the other (its ``attrs["dinov3_eo"]`` or a zone
    probe's ``embedding``): 1 for one date or dates averaged (``temporal="mean"``)."""
    return int(made.get("time_steps") or 1) if made.get("temporal", "concat") == "concat" else 1


def zone_probe_record(made: dict[str, Any], table: str | os.PathLike[str]) -> dict[str, Any]:
    """A zone probe's ``embedding``: the backbone and the dates of the table ``made`` describes (its attrs)."""
    record = {"kind": ZONE_KIND, "backbone": made.get("backbone"), "patch_size": made.get("patch_size"),
              "features": made.get("features", "patch_mean"), "weights": made.get("weights"),
              "upsample": int(made.get("upsample") or 1), "table": os.fspath(table)}  # fmt: skip
    if made.get("dates"):
        record.update(dates=made["dates"], temporal=made.get("temporal", "concat"), time_steps=len(made["dates"]))
    return record


def season_for_probe(probe: Any, table: Any, x: np.ndarray, path: str | os.PathLike[str]) -> tuple[Any, np.ndarray]:
    """A season's table at the probe's days of the year (:func:`~dinov3_eo.tasks.zone_time_series.season_at`: each
    polygon's features interpolated linearly in time, the first or last date's beyond either end), so that a probe of
    one year's season classifies another year's taken on other days or on more or fewer of them; said in one line
    on stderr. Unchanged unless both are seasons of two or more dates one after the other on other days.

    Returns:
        ``(table, x)``: a copy of the table whose record names the probe's dates, and ``[Z, T_probe · D]`` features.
    """
    from dinov3_eo.tasks.zone_time_series import season_at

    made = table.attrs.get("dinov3_eo", {})
    fitted, now = probe.embedding.get("dates"), made.get("dates")
    if not fitted or not now or table_steps(probe.embedding) < 2 or table_steps(made) < 2:
        return table, x
    aligned = season_at(x, now, fitted)
    if aligned is None:
        return table, x
    print(f"{os.fspath(path)}: its {len(now)} dates ({', '.join(now)}) interpolated to the probe's {len(fitted)} days "
          f"of the year ({', '.join(d[5:] for d in fitted)}).", file=sys.stderr)  # fmt: skip
    out = table.copy()
    out.attrs = {**table.attrs, "dinov3_eo": {**made, "dates": list(fitted), "time_steps": len(fitted)}}
    return out, aligned


def check_zone_table(probe: Any, table: Any, path: str | os.PathLike[str], x: np.ndarray | None = None) -> None:
    """Raise ValueError unless ``table`` (a zone table's frame, features ``x``) was embedded by the backbone ``probe``
    was fitted on (its name, kind of features and weights' fingerprint, where both say), at as many dates one after
    the other, with features of its width."""
    from dinov3_eo.tasks.zone_embeddings import same_weights

    if probe.embedding.get("kind") != ZONE_KIND:
        raise ValueError("--zones classifies polygon embeddings with a probe fitted on them ('classify fit --zones'); "
                         f"this probe was fitted on {probe.embedding.get('kind', 'chips')}.")  # fmt: skip
    made = table.attrs.get("dinov3_eo", {})
    fitted, now = probe.embedding.get("backbone"), made.get("backbone")
    if fitted and now and fitted != now:
        raise ValueError(f"{os.fspath(path)} was embedded by {now!r}, the probe's polygons by {fitted!r}: embed them "
                         "with the probe's backbone.")  # fmt: skip
    fitted_kind, now_kind = probe.embedding.get("features", "patch_mean"), made.get("features", "patch_mean")
    if fitted_kind != now_kind:
        text = "a text model's aligned patch features"
        raise ValueError(f"{os.fspath(path)} holds {text if now_kind == 'text_patch_mean' else 'backbone features'}, the "
                         f"probe's polygons {text if fitted_kind == 'text_patch_mean' else 'backbone features'}: embed "
                         "them with the model the probe's polygons were embedded with.")  # fmt: skip
    if not same_weights(probe.embedding, made):
        raise ValueError(f"{os.fspath(path)} was embedded by other weights of {now or fitted!r} than the probe's "
                         "polygons (another checkpoint of the same backbone): embed them with the probe's.")  # fmt: skip
    fitted_scale, now_scale = int(probe.embedding.get("upsample") or 1), int(made.get("upsample") or 1)
    if fitted_scale != now_scale:
        raise ValueError(f"{os.fspath(path)} was embedded with --upsample {now_scale}, the probe's polygons with "
                         f"{fitted_scale}: embed them as the probe's were (the features change with the scale).")  # fmt: skip
    fitted_steps, now_steps = table_steps(probe.embedding), table_steps(made)
    if fitted_steps != now_steps:
        raise ValueError(f"{os.fspath(path)} holds each polygon's features at {now_steps} date(s) one after the other, "
                         f"the probe's polygons at {fitted_steps}: embed as many dates of the season, in the same "
                         "order (a table of two or more dated steps is interpolated to the probe's days of the year), "
                         "or both with --temporal mean.")  # fmt: skip
    fitted_on = getattr(probe, "weight", None) if getattr(probe, "weight", None) is not None else getattr(probe, "bank", None)
    width = None if fitted_on is None else fitted_on.shape[1]
    if x is not None and len(x) and width is not None and x.shape[1] != width:
        raise ValueError(f"{os.fspath(path)} holds {x.shape[1]} features per polygon, the probe takes {width}: embed "
                         "the polygons with the probe's backbone.")  # fmt: skip


def zone_predictions(table: Any, x: np.ndarray, probe: Any) -> Any:
    """``table`` without its ``patch_mean``, with the probe's ``class``, ``score`` (and ``set``, ``set_size`` with
    prediction sets) and ``p_<class>``; a polygon without features gets no class (empty) and NaN scores."""
    from dinov3_eo.tasks.chip_classification import prediction_columns

    seen = np.isfinite(x).all(axis=1) if len(x) else np.zeros(0, bool)
    scores = np.full((len(table), len(probe.classes)), np.nan)
    if seen.any():
        scores[seen] = probe.scores(x[seen])
    filled = np.where(seen[:, None], scores, 0.0)
    set_threshold = probe.sets["threshold"] if probe.sets else None
    columns = prediction_columns([""] * len(table), filled, probe.classes, set_threshold=set_threshold)
    columns.pop("path")
    for name, values in columns.items():
        if name in ("class", "set"):
            columns[name] = [v if ok else "" for v, ok in zip(values, seen)]
        else:
            columns[name] = np.where(seen, np.asarray(values, np.float64), np.nan)
    return table.drop(columns="patch_mean").assign(**columns)


def zone_class_map(predicted: Any, classes: list[str], raster: str | os.PathLike[str], dst: str | os.PathLike[str], *,
                   block: int = 1024, overwrite: bool = False) -> Path:  # fmt: skip
    """The polygons' predicted classes (``zone_predictions``' ``class``) burnt onto ``raster``'s grid: a uint8 class
    COG (the classes' colours and names, 255 where no polygon with a class lies; a pixel is a polygon's when its
    centre is inside, the later polygon's where two overlap), written block by block.

    Raises:
        FileExistsError: ``dst`` exists and ``overwrite`` is false. ValueError: a raster without a georeference.
    """
    import rasterio.windows
    import shapely

    from dinov3_eo.data.labels import burn_polygons
    from dinov3_eo.data.raster import open_quietly, require_georeferenced
    from dinov3_eo.inference.writers import COGWriter, default_colormap

    named = predicted[predicted["class"].notna() & (predicted["class"].astype(str) != "")]
    ids = {name: i for i, name in enumerate(classes)}
    with open_quietly(raster) as src:
        require_georeferenced(src)
        geometries = named.geometry.to_crs(src.crs).to_numpy()
        values = np.array([ids[c] for c in named["class"]], np.int64)
        tree = shapely.STRtree(geometries)
        with COGWriter(dst, crs=src.crs, transform=src.transform, width=src.width, height=src.height, count=1,
                       dtype="uint8", nodata=255, class_names=classes, colormap=default_colormap(len(classes)),
                       overwrite=overwrite) as out:  # fmt: skip
            for row in range(0, src.height, block):
                for col in range(0, src.width, block):
                    window = rasterio.windows.Window(col, row, min(block, src.width - col), min(block, src.height - row))
                    out.write(burn_polygons(geometries, values, tree, window, src.transform, fill=255, dtype="uint8"), window)
    return Path(dst)


__all__ = ["ZONE_KIND", "check_zone_table", "labelled_zones", "labels_from_points", "refuse_zone_probe",
           "season_for_probe", "table_steps", "zone_class_map", "zone_predictions", "zone_probe_record"]
