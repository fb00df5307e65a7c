"""Canopy heights from footprints (GEDI-like shots): labels on a tile's grid against pixel arithmetic, a height
model's data module and fit on them, and a map scored per footprint, on the NEON plots' LiDAR CHMs
(``tests/data/neon``, CC0). The "shots" are points in lon/lat over the plots whose height is the CHM's maximum
within 12.5 m (as GEDI's rh98 is near the top of the canopy in its 25 m footprint).
"""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
from shapely.geometry import Point

from dinov3_eo.tasks.height_footprints import FootprintHeights, evaluate_height_footprints, footprint_means

NEON = Path(__file__).resolve().parent / "data" / "neon"
PLOTS = ("TEAK_044", "TEAK_050", "TEAK_052")


def _chm(plot: str) -> tuple[np.ndarray, rasterio.Affine, rasterio.crs.CRS]:
    with rasterio.open(NEON / f"{plot}_CHM.tif") as src:
        chm = src.read(1).astype(np.float64)
        if src.nodata is not None:
            chm[chm == src.nodata] = np.nan
        return chm, src.transform, src.crs


def _top_within(chm: np.ndarray, transform: rasterio.Affine, x: float, y: float, radius: float) -> float:
    rows, cols = np.indices(chm.shape)
    cx, cy = transform @ (cols + 0.5, rows + 0.5)
    inside = np.hypot(cx - x, cy - y) <= radius
    return float(np.nanmax(np.where(inside, chm, np.nan)))


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 shots per plot at random spots 13 m or more inside it, in lon/lat, with ``rh98`` and a ``beam`` column."""
    rng = np.random.default_rng(0)
    rows = []
    for plot in PLOTS:
        chm, transform, crs = _chm(plot)
        for _ in range(12):
            col, row = rng.uniform(13, 27, 2)
            x, y = transform @ (col, row)
            rows.append({"rh98": _top_within(chm, transform, x, y, 12.5), "beam": 5, "plot": plot,
                         "geometry": Point(x, y)})  # fmt: skip
    frame = gpd.GeoDataFrame(rows, crs=crs).to_crs("EPSG:4326")
    path = tmp_path_factory.mktemp("gedi") / "shots.gpkg"
    frame.to_file(path)
    return path


def test_footprints_label_the_pixel_under_each_shot_or_its_disc(shots: Path) -> None:
    chm, transform, crs = _chm("TEAK_050")
    heights = FootprintHeights(path=shots, attribute="rh98")
    assert len(heights) == 36 and heights.points
    labels = heights.read(crs=crs, transform=transform, shape=chm.shape)
    mine = gpd.read_file(shots).to_crs(crs)
    mine = mine[mine["plot"] == "TEAK_050"]
    cols, rows = ~transform @ (mine.geometry.x.to_numpy(), mine.geometry.y.to_numpy())
    rows, cols = np.floor(rows).astype(int), np.floor(cols).astype(int)
    expected = np.full(chm.shape, np.nan)
    for r, c in set(zip(rows, cols)):  # shots in one pixel: their mean
        expected[r, c] = mine["rh98"].to_numpy()[(rows == r) & (cols == c)].mean()
    np.testing.assert_allclose(labels, expected, rtol=1e-6)
    assert heights.count(crs=crs, transform=transform, shape=chm.shape) == len(set(zip(rows, cols))) <= 12
    # a 10 m footprint labels the pixels whose centres lie within 5 m (the disc drawn with 64 segments)
    disc = FootprintHeights(path=shots, attribute="rh98", footprint_m=10.0).read(crs=crs, transform=transform,
                                                                               shape=chm.shape)  # fmt: skip
    grid_r, grid_c = np.indices(chm.shape)
    cx, cy = transform @ (grid_c + 0.5, grid_r + 0.5)
    distance = np.min([np.hypot(cx - x, cy - y) for x, y in zip(mine.geometry.x, mine.geometry.y)], axis=0)
    assert np.isfinite(disc[distance < 4.95]).all() and not np.isfinite(disc[distance > 5.05]).any()
    # off the shots' ground: nothing
    far = heights.read(crs=crs, transform=transform @ rasterio.Affine.translation(10_000, 0), shape=chm.shape)
    assert np.isnan(far).all()
    with pytest.raises(ValueError, match="numeric columns"):
        FootprintHeights(path=shots)  # rh98 and beam: which one?
    with pytest.raises(ValueError, match="must be positive"):
        FootprintHeights(path=shots, attribute="rh98", footprint_m=0)


def test_a_map_is_scored_per_footprint_whole_across_blocks(shots: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:  # fmt: skip
    """The CHM itself as the map: its maximum under each 25 m footprint is the shot's rh98, across block edges."""
    from dinov3_eo.cli import main as cli_main

    heights = FootprintHeights(path=shots, attribute="rh98", footprint_m=25.0)
    chm_path = NEON / "TEAK_050_CHM.tif"
    whole = footprint_means(chm_path, heights, statistic="max")
    blocks = footprint_means(chm_path, heights, statistic="max", block=7)  # 6 x 6 blocks, footprints cut by edges
    np.testing.assert_array_equal(np.isfinite(whole), np.isfinite(blocks))
    on = np.isfinite(whole)
    assert on.sum() >= 12  # the plot's shots (and any other plot's whose disc reaches it)
    np.testing.assert_allclose(blocks[on], whole[on])
    mine = heights.frame["_value"].to_numpy()
    plot = gpd.read_file(shots)["plot"].to_numpy() == "TEAK_050"
    np.testing.assert_allclose(whole[plot], mine[plot], atol=1e-4)
    means = footprint_means(chm_path, heights, block=7)
    chm, transform, crs = _chm("TEAK_050")
    import shapely

    first = heights._in_crs(crs).geometry.iloc[int(np.flatnonzero(plot)[0])]  # the 25 m disc in the CHM's CRS
    grid_r, grid_c = np.indices(chm.shape)
    cx, cy = transform @ (grid_c + 0.5, grid_r + 0.5)
    disc = shapely.contains_xy(first, cx, cy)  # the pixels whose centres it holds
    assert 400 < disc.sum() < 500  # ~ pi 12.5²
    assert means[np.flatnonzero(plot)[0]] == pytest.approx(np.nanmean(chm[disc]), rel=1e-6)

    metrics, frame = evaluate_height_footprints(chm_path, shots, attribute="rh98", footprint_m=25.0, statistic="max",
                                                out_dir=tmp_path / "eval")  # fmt: skip
    assert metrics["all"]["n"] == on.sum() and len(frame) == on.sum()
    assert metrics["all"]["mae"] < 0.01 and set(frame.columns) >= {"reference", "predicted", "error"}
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["footprints_on_map"] == on.sum() and saved["footprints_off_map"] == 36 - on.sum()
    assert cli_main(["height", "evaluate", str(chm_path), str(shots), "--attribute", "rh98", "--footprint-m", "25",
                     "--footprint-statistic", "max", "--out-dir", str(tmp_path / "cli")]) == 0  # fmt: skip
    assert f"{on.sum()} footprints on TEAK_050_CHM.tif" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "cli").iterdir()} == {"metrics.json", "footprints.gpkg", "scatter.png"}
    assert cli_main(["height", "evaluate", str(chm_path), str(shots), "--attribute", "rh98", "--calibrate",
                     str(tmp_path / "i.json")]) == 2  # fmt: skip
    assert "footprints are scored without them" in capsys.readouterr().err
    assert cli_main(["height", "evaluate", str(chm_path), str(chm_path), "--attribute", "rh98"]) == 2
    assert "--attribute and --footprint-m are for footprints" in capsys.readouterr().err
    far = tmp_path / "far.tif"
    with rasterio.open(chm_path) as src:
        profile = src.profile | {"transform": src.transform @ rasterio.Affine.translation(10_000, 0)}
        data = src.read()
    with rasterio.open(far, "w", **profile) as dst:
        dst.write(data)
    with pytest.raises(ValueError, match="No footprint of .* falls on a valued pixel"):
        evaluate_height_footprints(far, shots, attribute="rh98")


def test_a_height_model_trains_on_footprints(shots: Path, tmp_path: Path) -> None:
    """The data module keeps the tiles with a shot, and their targets are the shots' heights on their pixels only;
    a height model then fits a few steps on them, every loss finite."""
    import lightning.pytorch as pl

    from dinov3_eo.tasks.height import HeightTask
    from dinov3_eo.tasks.height_data import HeightDataModule

    dm = HeightDataModule(paths=[str(NEON / f"{p}.tif") for p in PLOTS], labels=str(shots), label_attribute="rh98",
                          tile_size=64, gsd=0.4, batch_size=2, val_files=["TEAK_052.tif"], cache_dir=None)  # fmt: skip
    dm.setup("fit")
    assert dm.train_tiles and dm.val_tiles
    assert all(dm.footprint_count(t) >= 1 for t in dm.train_tiles + dm.val_tiles)
    sample = dm.dataset[dm.train_tiles[0]]
    target = sample["target"].numpy()
    labelled = np.isfinite(target)
    assert 1 <= labelled.sum() <= 12  # a pixel per shot, 0.4 m pixels
    shot_heights = gpd.read_file(shots)["rh98"].to_numpy()
    assert all(np.isclose(shot_heights, v, atol=1e-4).any() for v in target[labelled])
    with pytest.raises(ValueError, match="no training tile has 3 footprints"):
        HeightDataModule(paths=[str(NEON / "TEAK_044.tif")], labels=str(shots), label_attribute="rh98", tile_size=16,
                         gsd=0.4, min_footprints=3, val_fraction=0.5, cache_dir=None).setup("fit")  # fmt: skip

    task = HeightTask(backbone="vitmicro16", head="linear", lr=1e-3, warmup_steps=0)
    trainer = pl.Trainer(max_steps=3, limit_val_batches=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                         accelerator="cpu")  # fmt: skip
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3 and np.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert task.val_metrics.compute()["all"]["n"] >= 1  # scored on the held-out plot's shots
