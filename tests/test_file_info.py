"""``dinov3-eo info``: every kind of file the toolkit reads or writes, described from the file alone."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch
from micro_backbone import MICRO_NORM, micro_backbone_file

from dinov3_eo.cli import main as cli_main
from dinov3_eo.file_info import describe
from dinov3_eo.models.hub import load_backbone, to_timm
from dinov3_eo.models.vit import build_backbone

DATA = Path(__file__).resolve().parent / "data"
SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample"
NORM = MICRO_NORM


def test_backbones_in_every_layout(tmp_path: Path) -> None:
    pth = micro_backbone_file(tmp_path, bands=["B4", "B3", "B2"], gsd=10.0)
    model = load_backbone(pth)
    params = sum(p.numel() for p in model.parameters())
    for suffix in (".pth", ".safetensors", ".json"):
        info = describe(pth.with_suffix(suffix))
        assert info.kind.startswith("backbone")
        d = info.details
        assert d["architecture"] == "vitmicro16" and d["layout"] == "official" and d["blocks"] == model.n_blocks
        assert d["embed dim"] == 96 and d["patch size"] == 16 and d["bands"] == 3 and d["band names"] == ["B4", "B3", "B2"]
        assert d["parameters"] == f"{params / 1e6:.1f} M" and d["gsd (m)"] == 10.0
        assert d["input normalisation"] == "test; clip [0.0, 0.0, 0.0]..[255.0, 255.0, 255.0] to [0, 1]; mean [0.4, 0.4, 0.3], std [0.2, 0.2, 0.2]"
    # a bare state dict in timm's layout: no metadata, so no normalisation to give
    timm_sd = to_timm(model).state_dict()
    torch.save(timm_sd, tmp_path / "timm.pth")
    d = describe(tmp_path / "timm.pth").details
    assert d["layout"] == "timm" and d["architecture"] == "vitmicro16"
    assert d["input normalisation"] == "none recorded (give --normalization)"


def test_checkpoints_of_each_task(tmp_path: Path) -> None:
    from dinov3_eo.tasks.height import HeightTask
    from dinov3_eo.tasks.segmentation import SegmentationTask

    seg = SegmentationTask(backbone="vitmicro16", class_names=["water", "crop"], image_normalization=NORM)
    torch.save({"state_dict": seg.state_dict(), "hyper_parameters": dict(seg.hparams), "global_step": 120,
                "epoch": 3, "dinov3_eo": seg.checkpoint_metadata()}, tmp_path / "seg.ckpt")  # fmt: skip
    info = describe(tmp_path / "seg.ckpt")
    assert info.kind.startswith("segmentation checkpoint")
    assert info.details["classes"] == ["water", "crop"] and info.details["head"] == "linear"
    assert info.details["step"] == 120 and info.details["epoch"] == 3 and info.details["backbone"] == "vitmicro16"
    assert info.details["input normalisation"].startswith("test;")
    height = HeightTask(backbone="vitmicro16", head="linear", max_height=64.0)
    torch.save({"state_dict": height.state_dict(), "hyper_parameters": dict(height.hparams),
                "dinov3_eo": height.backbone_meta().to_dict()}, tmp_path / "height.ckpt")  # fmt: skip
    info = describe(tmp_path / "height.ckpt")
    assert info.kind.startswith("height checkpoint") and info.details["max height (m)"] == 64.0
    assert info.details["input normalisation"] == "none recorded (give --normalization)"
    state = {f"teacher.backbone.{k}": v for k, v in build_backbone("vitmicro16").state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"gram_weight": 0.0}, "global_step": 50,
                "dinov3_eo": {"model": "vitmicro16", "in_chans": 3, "patch_size": 16, "embed_dim": 96}}, tmp_path / "ssl.ckpt")  # fmt: skip
    info = describe(tmp_path / "ssl.ckpt")
    assert info.kind == "SSL checkpoint (pretraining)" and info.details["step"] == 50


def test_a_text_model(tmp_path: Path) -> None:
    from tiny_text import tiny_text_model

    model = tiny_text_model(tmp_path / "text.pt", MICRO_NORM)
    info = describe(model)
    assert info.kind.startswith("text model") and info.details["backbone"] == "vitmicro16"
    assert info.details["prompt templates"] > 0 and info.details["backbone stored"] is True
    assert info.details["input normalisation"].startswith("test;")


def test_probes_tables_rasters_and_vectors(tmp_path: Path) -> None:
    from dinov3_eo.tasks.chip_classification import fit_chip_classifier
    from dinov3_eo.tasks.zone_embeddings import write_zone_embeddings

    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    probe = fit_chip_classifier(x, np.arange(40) % 2, ["a", "b"], method="linear", features="patch_mean")
    probe.embedding = {"kind": "zones", "backbone": "vitmicro16", "dates": ["2020-05-18", "2020-08-07"],
                       "temporal": "concat", "time_steps": 2}  # fmt: skip
    probe.save(tmp_path / "probe.safetensors")
    info = describe(tmp_path / "probe.safetensors")
    assert info.kind == "zone probe (classify fit --zones)" and info.details["classes"] == ["a", "b"]
    assert info.details["width"] == 8 and info.details["dates"] == ["2020-05-18", "2020-08-07"]
    table = gpd.GeoDataFrame({"crop": ["a", "b"], "patch_mean": [np.zeros(4, np.float32)] * 2, "coverage": [1.0, 0.5],
                              "patches": [3, 1]}, geometry=[shapely.box(0, 0, 1, 1)] * 2, crs="EPSG:32633")  # fmt: skip
    table.attrs["dinov3_eo"] = {"backbone": "vitmicro16", "patch_size": 16, "embed_dim": 4, "dates": ["2021-06-01"]}
    write_zone_embeddings(table, tmp_path / "zones.parquet")
    d = describe(tmp_path / "zones.parquet")
    assert d.kind == "polygons at several dates (embed --zones)" and d.details["rows"] == 2
    assert d.details["crs"] == "EPSG:32633" and d.details["dates"] == ["2021-06-01"] and "crop" in d.details["columns"]
    scene = describe(DATA / "rgb_byte_crop.tif")
    assert scene.kind == "GeoTIFF" and scene.details["size"] == "250 x 230 px" and scene.details["bands"] == 3
    assert scene.details["crs"] == "EPSG:32618" and scene.details["nodata"] == 0.0
    polygons = describe(SAMPLE / "landsat8_224078_polygons.gpkg")
    assert polygons.kind == "vector file" and polygons.details["features"] == 4 and "name" in polygons.details["fields"]
    stats = {"bands": ["B2", "B3"], "count": [10, 10], "mean": [7811.241844857787, 1.0], "std": [210.2, 3.0],
             "percentiles": {"98": [1, 2], "2": [0, 0]}}  # fmt: skip
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    described = describe(tmp_path / "stats.json")
    assert described.kind.startswith("band statistics") and described.details["mean"] == [7811.2, 1.0]
    assert described.details["percentiles"] == ["2", "98"]
    gpd.read_file(SAMPLE / "landsat8_224078_polygons.gpkg").to_file(tmp_path / "p.geojson")
    assert describe(tmp_path / "p.geojson").details["features"] == 4  # GeoJSON is a vector file, not any JSON
    (tmp_path / "other.json").write_text('{"a": 1, "b": 2}')
    assert describe(tmp_path / "other.json").details == {"keys": ["a", "b"]}
    from PIL import Image

    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "chip.png")
    chip = describe(tmp_path / "chip.png")
    assert chip.kind == "image" and chip.details["size"] == "30 x 20 px" and "--chips" in chip.details["georeference"]


def test_info_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    (tmp_path / "table.xlsx").write_text("?")
    files = [DATA / "rgb_byte_crop.tif", tmp_path / "missing.ckpt", tmp_path / "notes.pth", tmp_path / "table.xlsx",
             SAMPLE / "landsat8_224078_polygons.gpkg"]  # fmt: skip
    assert cli_main(["info", *map(str, files)]) == 2  # every readable file is still described
    captured = capsys.readouterr()
    assert "rgb_byte_crop.tif: GeoTIFF" in captured.out and "landsat8_224078_polygons.gpkg: vector file" in captured.out
    assert "No file at" in captured.err and "notes.pth is not a PyTorch checkpoint" in captured.err
    assert "reads no .xlsx files" in captured.err
    assert cli_main(["info", str(DATA / "rgb_byte_crop.tif"), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["kind"] == "GeoTIFF" and row["bands"] == 3 and row["crs"] == "EPSG:32618"
