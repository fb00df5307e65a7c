"""``dinov3-eo quickstart`` with tiny settings: every promised output exists, is georeferenced like the sample, and loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from dinov3_eo.cli import main as cli_main
from dinov3_eo.quickstart import SAMPLE_CLASSES, sample_paths


@pytest.mark.slow
def test_quickstart_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "-o", str(out), "--steps", "2", "--head-epochs", "1", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed

    scene, _ = sample_paths()
    stem = scene.stem
    expected = ["stats.json", "backbone.pth", "backbone.safetensors", "backbone.json", "pca.png", "segmentation.ckpt",
                f"{stem}_classes.tif", f"{stem}_quicklook.png", f"{stem}_polygons.gpkg"]  # fmt: skip
    for name in expected:
        assert (out / name).is_file(), name
        assert name in printed
    assert not (out / ".lightning").exists()
    # the feature pictures of the 2-step run: after step 1, every quarter (steps // 4 -> every step), at the end
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_0000001.png", "step_0000002.png"]
    assert "previews/ (2 pictures)" in printed

    sidecar = json.loads((out / "backbone.json").read_text())["dinov3_eo"]
    assert sidecar["in_chans"] == 3 and sidecar["normalization"]["name"] == "zscore"

    with rasterio.open(scene) as src, rasterio.open(out / f"{stem}_classes.tif") as cls:
        assert (cls.crs, cls.transform, cls.width, cls.height) == (src.crs, src.transform, src.width, src.height)
        labels = cls.read(1)
        collar = (src.read() == 0).all(axis=0)
    assert (labels[collar] == 255).all()
    assert set(np.unique(labels[~collar]).tolist()) <= set(SAMPLE_CLASSES.values())

    import geopandas as gpd

    frame = gpd.read_file(out / f"{stem}_polygons.gpkg")
    assert frame.crs == cls.crs and set(frame["class_name"]) <= set(SAMPLE_CLASSES)
    assert (frame.area >= 2 * 900.0).all()  # the quickstart's minimum area: two Landsat pixels

    # a second run refuses the non-empty folder
    assert cli_main(["quickstart", "-o", str(out), "--steps", "1", "--head-epochs", "1", "--quiet"]) == 2
