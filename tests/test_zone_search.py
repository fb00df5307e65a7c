"""``similar --zones``: the polygons of a zone table most like the ones picked, ranked by cosine, with no backbone."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from micro_backbone import micro_backbone_file

from dinov3_eo.cli import main as cli_main
from dinov3_eo.tasks.zone_embeddings import read_zone_embeddings
from dinov3_eo.tasks.zone_search import examples_of, zone_similarity, zones_like

SCENE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
POLYGONS = SCENE.with_name("landsat8_224078_polygons.gpkg")  # water, crop, tree, developed (~15 ha each)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled scene's four land-cover polygons cut into four strips each, embedded by a random micro ViT."""
    folder = tmp_path_factory.mktemp("zone_search")
    rows = []
    for name, shape in zip(*(lambda f: (f["name"], f.geometry))(gpd.read_file(POLYGONS))):
        x0, y0, x1, y1 = shape.bounds
        edges = np.linspace(x0, x1, 5)
        rows += [{"name": name, "strip": k, "geometry": shape & shapely.box(a, y0, b, y1)}
                 for k, (a, b) in enumerate(zip(edges, edges[1:]))]  # fmt: skip
    rows.append({"name": "nowhere", "strip": 0, "geometry": shapely.box(0, 0, 10, 10)})  # off the scene
    gpd.GeoDataFrame(rows, crs=gpd.read_file(POLYGONS).crs).to_file(folder / "parcels.gpkg")
    pth = micro_backbone_file(folder, seed=0, normalization=None, layerscale_init=1.0)
    out = folder / "parcels.parquet"
    assert cli_main(["embed", str(SCENE), "--model", str(pth), "--normalization", "none", "--zones",
                     str(folder / "parcels.gpkg"), "-o", str(out), "--quiet"]) == 0  # fmt: skip
    return out


def test_polygons_are_ranked_by_cosine_to_the_examples_mean(table: Path) -> None:
    frame, x = read_zone_embeddings(table)
    examples = examples_of(frame, ["name=water"])
    assert examples.sum() == 4
    assert examples_of(frame, ["name=water", "strip=3"]).sum() == 4 + 3  # any condition; numbers compared as text
    similarity = zone_similarity(x, examples)
    matches = zones_like(frame, similarity, examples, k=5)
    assert list(matches["rank"]) == [0, 0, 0, 0, 1, 2, 3, 4, 5] and matches["example"].sum() == 4
    query = x[examples].mean(axis=0)
    for _, row in matches.iterrows():  # against the cosine written out
        v = x[(frame["name"] == row["name"]).to_numpy() & (frame["strip"] == row["strip"]).to_numpy()][0]
        assert row["similarity"] == pytest.approx(v @ query / np.linalg.norm(v) / np.linalg.norm(query), abs=1e-6)
    others = matches["similarity"].to_numpy()[4:]
    assert (np.diff(others) <= 0).all() and "patch_mean" not in matches.columns
    everyone = zones_like(frame, similarity, examples, k=0)
    assert len(everyone) == len(frame) - 1  # all but the polygon off the scene, which has no features
    assert np.isnan(similarity[-1]) and np.isfinite(similarity[:-1]).all()


def test_similar_zones_from_the_command_line(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "like_water.gpkg"
    assert cli_main(["similar", "--zones", str(table), "--like", "name=water", "-k", "3", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 example polygon(s); the 3 most like them kept" in printed and str(out.with_suffix(".png")) in printed
    written = gpd.read_file(out)
    assert len(written) == 7 and list(written["rank"]) == [0, 0, 0, 0, 1, 2, 3] and out.with_suffix(".png").stat().st_size > 0
    assert cli_main(["similar", "--zones", str(table), "--like", "name=water", "-o", str(tmp_path / "m.csv")]) == 0
    capsys.readouterr()
    for like, message in ((["water"], "takes COLUMN=VALUE"), (["crop=rice"], "no column 'crop'"),
                          (["name=rice"], "No polygon of"), (["name=nowhere"], "None of the example polygons has features")):  # fmt: skip
        assert cli_main(["similar", "--zones", str(table), "--like", *like, "-o", str(tmp_path / "x.gpkg")]) == 2
        assert message in capsys.readouterr().err
    assert cli_main(["similar", "--zones", str(tmp_path / "none.parquet"), "--like", "name=water", "-o",
                     str(tmp_path / "y.gpkg")]) == 2  # fmt: skip
    assert "Zone table" in capsys.readouterr().err
    (tmp_path / "text.parquet").write_text("not a table")
    assert cli_main(["similar", "--zones", str(tmp_path / "text.parquet"), "--like", "name=water", "-o",
                     str(tmp_path / "y.gpkg")]) == 2  # fmt: skip
    assert "is not a GeoParquet table of 'embed --zones'" in capsys.readouterr().err
    assert cli_main(["similar", "--zones", str(table), "--like", "name=water", "-o", str(out)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "x.gpkg").exists()


def test_field_points_label_the_polygons_they_fall_in(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dinov3_eo.tasks.zone_classification import labels_from_points

    frame, _ = read_zone_embeddings(table)
    inside = frame.geometry.representative_point()
    rows = [{"cover": name, "geometry": point} for name, point, strip in zip(frame["name"], inside, frame["strip"])
            if name != "nowhere" and strip < 3]  # three strips of each cover labelled, the fourth left to predict
    rows.append({"cover": "crop", "geometry": inside.iloc[0]})  # a second point in the first water strip: a tie
    rows.append({"cover": "water", "geometry": inside.iloc[1]})  # and a second water point in the next: a majority
    rows.append({"cover": "tree", "geometry": shapely.Point(0, 0)})  # in no polygon
    rows.append({"cover": None, "geometry": inside.iloc[2]})  # no class: not a vote
    points = gpd.GeoDataFrame(rows, crs=frame.crs).to_crs("EPSG:4326")  # another CRS than the table's
    points.to_file(tmp_path / "plots.gpkg")
    labels, counts = labels_from_points(frame, tmp_path / "plots.gpkg", "cover")
    assert counts == {"points": 15, "outside": 1, "labelled": 11, "tied": 1}
    assert labels.iloc[0] is None and labels.iloc[1] == "water" and labels.iloc[3] is None
    assert list(labels[(frame["strip"] < 3).to_numpy() & (frame["name"] == "crop").to_numpy()]) == ["crop"] * 3
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--zones", str(table), "--labels", str(tmp_path / "plots.gpkg"),
                     "--label-column", "cover", "--method", "knn", "-k", "1", "--val-fraction", "0.3", "-o", str(probe)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "15 labelled points of" in out and "11 polygons take their class; 1 points lie in no polygon; 1 polygons with tied classes left out" in out
    # every polygon predicted, and its class burnt onto the scene's grid (a class COG and its picture)
    out = tmp_path / "objects_predicted.gpkg"
    assert cli_main(["classify", "predict", "--zones", str(table), "--probe", str(probe), "-o", str(out), "--raster",
                     str(SCENE)]) == 0  # fmt: skip
    capsys.readouterr()
    predicted = gpd.read_file(out)
    with rasterio.open(tmp_path / "objects_predicted_classes.tif") as src:
        burnt, names = src.read(1), json.loads(src.tags()["class_names"])
        assert src.crs == frame.crs and src.nodata == 255 and (tmp_path / "objects_predicted_classes.png").is_file()
        for _, row in predicted[predicted["class"].notna() & (predicted["class"] != "")].iterrows():
            r, c = src.index(*row.geometry.representative_point().coords[0])
            assert names[burnt[r, c]] == row["class"]
    assert (burnt != 255).sum() < burnt.size / 10  # only under the polygons
    assert cli_main(["classify", "predict", str(SCENE), "--probe", str(probe), "-o", str(tmp_path / "c.csv"), "--raster",
                     str(SCENE)]) == 2  # fmt: skip
    assert "goes with --zones" in capsys.readouterr().err
    assert cli_main(["classify", "test", "--zones", str(table), "--labels", str(tmp_path / "plots.gpkg"),
                     "--label-column", "cover", "--probe", str(probe)]) == 0  # fmt: skip
    assert "on 11 test polygons" in capsys.readouterr().out
    gpd.GeoDataFrame({"cover": ["water"]}, geometry=[shapely.box(0, 0, 1, 1)], crs=frame.crs).to_file(tmp_path / "areas.gpkg")
    for labels_file, column, message in ((tmp_path / "areas.gpkg", "cover", "not points"),
                                         (tmp_path / "plots.gpkg", "crop", "has no column 'crop'"),
                                         (tmp_path / "none.gpkg", "cover", "do not exist")):  # fmt: skip
        assert cli_main(["classify", "fit", "--zones", str(table), "--labels", str(labels_file), "--label-column",
                         column, "-o", str(tmp_path / "p2.safetensors")]) == 2  # fmt: skip
        assert message in capsys.readouterr().err


def test_several_zone_tables_are_used_as_one(table: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dinov3_eo.tasks.zone_embeddings import read_zone_tables, write_zone_embeddings

    frame, x = read_zone_embeddings(table)
    west, east = tmp_path / "west.parquet", tmp_path / "east.parquet"
    half = len(frame) // 2
    for path, rows in ((west, slice(0, half)), (east, slice(half, None))):
        part = frame.iloc[rows].copy()
        part.attrs = frame.attrs
        write_zone_embeddings(part, path)
    both, stacked = read_zone_tables([west, east.with_name("east.parquet")])
    np.testing.assert_array_equal(stacked, x)
    assert list(both["zone_table"]) == ["west.parquet"] * half + ["east.parquet"] * (len(frame) - half)
    assert both.attrs["dinov3_eo"]["tables"] == [str(west), str(east)] and both.crs == frame.crs
    probe = tmp_path / "probe.safetensors"
    assert cli_main(["classify", "fit", "--zones", str(west), str(east), "--label-column", "name", "--method", "knn",
                     "-k", "1", "--val-fraction", "0.3", "-o", str(probe)]) == 0  # fmt: skip
    assert cli_main(["classify", "predict", "--zones", str(west), str(east), "--probe", str(probe), "-o",
                     str(tmp_path / "both.csv")]) == 0  # fmt: skip
    capsys.readouterr()
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "both.csv")["zone_table"]) == {"west.parquet", "east.parquet"}
    # a table of another number of dates does not stack
    other = frame.copy()
    other.attrs = {"dinov3_eo": {**frame.attrs["dinov3_eo"], "dates": ["2020-05-18", "2020-08-07"], "temporal": "concat"}}
    write_zone_embeddings(other, tmp_path / "season.parquet")
    with pytest.raises(ValueError, match="number of dates"):
        read_zone_tables([west, tmp_path / "season.parquet"])
    # two years' seasons on other days and of other lengths stack at the first's days of the year
    rng = np.random.default_rng(0)
    d = x.shape[1]
    first_x, second_x = rng.normal(size=(len(frame), 2 * d)), rng.normal(size=(len(frame), 3 * d))
    for name, values, dates in (("y2021", first_x, ["2021-05-18", "2021-08-07"]),  # days 137, 218
                                ("y2022", second_x, ["2022-05-01", "2022-06-15", "2022-09-01"])):  # days 120, 165, 243
        season = frame.copy()
        season["patch_mean"] = list(values.astype(np.float32))
        season.attrs = {"dinov3_eo": {**frame.attrs["dinov3_eo"], "dates": dates, "temporal": "concat", "time_steps": len(dates)}}
        write_zone_embeddings(season, tmp_path / f"{name}.parquet")
    capsys.readouterr()
    seasons, features = read_zone_tables([tmp_path / "y2021.parquet", tmp_path / "y2022.parquet"])
    assert "its 3 dates interpolated to the days of the year of" in capsys.readouterr().err
    later = second_x.reshape(len(frame), 3, d)
    may = later[:, 0] + 17 / 45 * (later[:, 1] - later[:, 0])
    august = later[:, 1] + 53 / 78 * (later[:, 2] - later[:, 1])
    np.testing.assert_allclose(features[: len(frame)], first_x, rtol=1e-6)
    np.testing.assert_allclose(features[len(frame) :], np.concatenate([may, august], 1), rtol=1e-5, atol=1e-6)
    assert seasons.attrs["dinov3_eo"]["dates"] == ["2021-05-18", "2021-08-07"] and len(seasons) == 2 * len(frame)
