"""ONNX graphs (``export --onnx``): a backbone, a segmentation model and a height model, each run in ONNX Runtime on
real imagery against the PyTorch model it came from, with dynamic batch and sides and the normalisation inside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import rasterio
import torch
from micro_backbone import MICRO_NORM, micro_backbone_file
from rasterio.windows import Window
from tiny_text import tiny_text_model

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.inference.onnx_export import export_onnx, read_onnx_metadata
from dinov3_eo.models.hub import load_backbone

CROP = Path(__file__).resolve().parent / "data" / "rgb_byte_crop.tif"  # 250 x 230 Landsat RGB at 300 m, nodata 0 (CC0)
NORM = MICRO_NORM

pytestmark = pytest.mark.slow  # each export traces the model (8-20 s)


def raw_windows(batch: int, height: int, width: int) -> np.ndarray:
    """``[batch, 3, height, width]`` float32 raw DN of the test scene, windows down its diagonal."""
    with rasterio.open(CROP) as src:
        return np.stack([src.read(window=Window(60 + 20 * i, 40 + 15 * i, width, height)) for i in range(batch)]).astype(np.float32)


def run(path: Path, image: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    return session.run(None, {"image": image})


def test_a_backbone_graph_gives_the_backbones_features_from_raw_values(tmp_path: Path) -> None:
    pth = micro_backbone_file(tmp_path, seed=0, bands=["red", "green", "blue"], gsd=300.0, layerscale_init=1.0)
    backbone = load_backbone(pth)
    done = export_onnx(pth, tmp_path / "micro.onnx")
    assert done.path.is_file() and done.max_difference is not None and done.max_difference < 1e-4
    assert done.class_disagreement is None
    meta_read = read_onnx_metadata(done.path)
    assert meta_read == done.metadata
    assert meta_read["kind"] == "backbone" and meta_read["input"] == "raw" and meta_read["side_multiple"] == 16
    assert meta_read["bands"] == ["red", "green", "blue"] and meta_read["gsd"] == 300.0
    assert meta_read["normalization"]["high"] == [255.0, 255.0, 255.0] and list(meta_read["outputs"]) == ["cls_token", "patch_features"]
    # any batch, sides of whole patches other than the export's: raw DN in, the torch features of normalised DN out
    for batch, height, width in ((3, 64, 112), (1, 160, 32)):
        image = raw_windows(batch, height, width)
        cls, patch = run(done.path, image)
        x = Normalization.from_dict(NORM)(torch.from_numpy(image))
        with torch.no_grad():
            ((want_patch, want_cls),) = backbone.get_intermediate_layers(x, n=1, reshape=True, return_class_token=True,
                                                                         norm=True)  # fmt: skip
        assert cls.shape == (batch, 96) and patch.shape == (batch, 96, height // 16, width // 16)
        np.testing.assert_allclose(cls, want_cls.numpy(), atol=2e-5)
        np.testing.assert_allclose(patch, want_patch.numpy(), atol=2e-5)
    # with --normalized-input the graph skips the normalisation: the same features from normalised values
    plain = export_onnx(pth, tmp_path / "plain.onnx", normalized_input=True, check=False)
    assert plain.max_difference is None and read_onnx_metadata(plain.path)["input"] == "normalized"
    image = raw_windows(2, 48, 64)
    normalised = Normalization.from_dict(NORM)(torch.from_numpy(image)).numpy()
    np.testing.assert_allclose(run(plain.path, normalised)[1], run(done.path, image)[1], atol=2e-5)


def test_a_segmentation_graph_pads_any_size_and_keeps_the_classes(tmp_path: Path) -> None:
    from dinov3_eo.tasks.segmentation import SegmentationTask

    torch.manual_seed(1)
    task = SegmentationTask(backbone="vitmicro16", class_names=["water", "crop", "tree", "developed"],
                            lora={"rank": 4, "targets": ["qkv"]}, image_normalization=NORM,
                            backbone_kwargs={"layerscale_init": 1.0})  # fmt: skip
    with torch.no_grad():  # LoRA updates start at zero: make them matter, as after a fit
        for name, p in task.model.named_parameters():
            if name.endswith(".lora.B"):
                p.normal_(0, 0.05)
            elif name.startswith("head.conv"):  # a head that tells the scene's covers apart, not one class everywhere
                p.normal_(0, 2.0)
    task.eval()
    ckpt = tmp_path / "seg.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "dinov3_eo": task.checkpoint_metadata()}, ckpt)  # fmt: skip
    done = export_onnx(ckpt, tmp_path / "seg.onnx")
    meta = done.metadata
    assert meta["kind"] == "segmentation" and meta["class_names"] == ["water", "crop", "tree", "developed"]
    assert len(meta["class_colors"]) == 4 and meta["side_multiple"] == 1 and done.class_disagreement is not None
    assert done.class_disagreement < 1e-3
    loaded = SegmentationTask.from_checkpoint(ckpt)
    image = raw_windows(2, 50, 70)  # sides the model pads to whole patches inside
    probabilities, classes = run(done.path, image)
    with torch.no_grad():
        want = loaded.model(loaded.input_normalization()(torch.from_numpy(image))).softmax(dim=1).numpy()
    assert probabilities.shape == (2, 4, 50, 70) and classes.shape == (2, 50, 70) and classes.dtype == np.uint8
    np.testing.assert_allclose(probabilities, want, atol=1e-5)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (classes == want.argmax(axis=1)).mean() > 0.999 and len(np.unique(classes)) > 1


def test_a_height_graph_gives_the_models_metres(tmp_path: Path) -> None:
    from dinov3_eo.tasks.height import HeightTask, load_height_model

    torch.manual_seed(2)
    task = HeightTask(backbone="vitmicro16", dpt_channels=16, dpt_post_process_channels=[8, 16, 32, 32],
                      dpt_hidden_channels=8, n_bins=32, max_height=64.0, loss="l1")  # fmt: skip
    ckpt = tmp_path / "height.ckpt"
    meta = task.backbone_meta().to_dict() | {"normalization": NORM}
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "dinov3_eo": meta}, ckpt)
    done = export_onnx(ckpt, tmp_path / "height.onnx")
    assert done.metadata["kind"] == "height" and list(done.metadata["outputs"]) == ["height_m"]
    model = load_height_model(ckpt)
    image = raw_windows(3, 40, 90)
    (metres,) = run(done.path, image)
    with torch.no_grad():
        want = model(Normalization.from_dict(NORM)(torch.from_numpy(image))).numpy()
    assert metres.shape == (3, 1, 40, 90) and (metres >= 0).all() and (metres <= 64).all()
    np.testing.assert_allclose(metres, want, atol=1e-4)


def test_export_onnx_from_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pth = micro_backbone_file(tmp_path)
    assert cli_main(["export", str(pth), "-o", str(tmp_path / "deploy"), "--onnx"]) == 0
    out = capsys.readouterr().out
    assert "backbone graph (vitmicro16, 3 bands, raw input) -> cls_token, patch_features" in out
    assert "checked in ONNX Runtime against PyTorch on two input sizes: max |difference|" in out
    assert (tmp_path / "deploy.onnx").is_file() and not (tmp_path / "deploy.pth").exists()
    assert cli_main(["info", str(tmp_path / "deploy.onnx")]) == 0  # what the graph takes and gives, from the file
    described = capsys.readouterr().out
    assert "ONNX graph (dinov3-eo export --onnx)" in described and '"patch_features"' in described
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
    # an existing graph is kept unless --overwrite; options of --onnx refused without it; a file that is no model
    assert cli_main(["export", str(pth), "-o", str(tmp_path / "deploy.onnx"), "--onnx", "--no-check"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["export", str(pth), "-o", str(tmp_path / "x"), "--no-check"]) == 2
    assert "are options of --onnx" in capsys.readouterr().err
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    assert cli_main(["export", str(tmp_path / "notes.pth"), "-o", str(tmp_path / "n"), "--onnx"]) == 2
    assert "dinov3-eo export: error:" in capsys.readouterr().err and not (tmp_path / "n.onnx").exists()
    assert cli_main(["export", str(tmp_path / "missing.pth"), "-o", str(tmp_path / "m"), "--onnx"]) == 2
    assert "No checkpoint at" in capsys.readouterr().err
    import onnx

    bare = onnx.helper.make_model(onnx.helper.make_graph([], "empty", [], []))
    onnx.save(bare, tmp_path / "bare.onnx")
    with pytest.raises(ValueError, match="holds no 'dinov3_eo' metadata"):
        read_onnx_metadata(tmp_path / "bare.onnx")


def test_a_query_graph_maps_fixed_queries_as_query_does(tmp_path: Path) -> None:
    from dinov3_eo.tasks.openvocab import MapQuery

    sample = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
    norm = {"mean": [0.0] * 3, "std": [1.0] * 3, "low": [6000.0] * 3, "high": [14000.0] * 3, "name": "percentile"}
    model = tiny_text_model(tmp_path / "text.pt", norm)
    queries = ["water", "crop field", "forest"]
    done = export_onnx(model, tmp_path / "query.onnx", queries=queries)
    meta = done.metadata
    assert meta["kind"] == "query" and meta["queries"] == queries and meta["scores"] == "probability"
    assert list(meta["outputs"]) == ["probabilities", "classes"] and done.class_disagreement < 1e-3
    # a window of the real scene with data everywhere, mapped by `query` in one window: the same probabilities
    with rasterio.open(sample) as src:
        window = Window(200, 300, 96, 80)
        image = src.read(window=window).astype(np.float32)
        profile = src.profile | {"width": 96, "height": 80, "transform": src.window_transform(window), "tiled": False}
        profile.pop("blockxsize", None), profile.pop("blockysize", None)
    assert (image > 0).all()
    with rasterio.open(tmp_path / "window.tif", "w", **profile) as out:
        out.write(image.astype(np.uint16))
    expected = MapQuery.from_checkpoint(model, window=128, device="cpu").query(tmp_path / "window.tif", queries).values
    probabilities, classes = run(done.path, image[None])
    assert probabilities.shape == (1, 3, 80, 96) and classes.shape == (1, 80, 96)
    np.testing.assert_allclose(probabilities[0], expected, atol=2e-5)
    assert (classes[0] == expected.argmax(axis=0)).mean() > 0.999
    # one query: its cosine; a text model without queries, or queries for a backbone: refused in one sentence
    one = export_onnx(model, tmp_path / "water.onnx", queries=["water"], check=False)
    assert list(one.metadata["outputs"]) == ["cosine"] and run(one.path, image[None])[0].shape == (1, 1, 80, 96)
    with pytest.raises(ValueError, match="is a text model: give the queries"):
        export_onnx(model, tmp_path / "plain.onnx", check=False)
    pth = micro_backbone_file(tmp_path)
    with pytest.raises(ValueError, match="is not one"):
        export_onnx(pth, tmp_path / "q.onnx", queries=["water"], check=False)


def test_the_onnx_map_example_maps_a_scene_without_torch(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from dinov3_eo.tasks.segmentation import SegmentationTask

    root = Path(__file__).resolve().parents[1]
    sample = root / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
    torch.manual_seed(3)
    landsat = {"mean": [0.0] * 3, "std": [1.0] * 3, "low": [6000.0] * 3, "high": [9000.0] * 3, "name": "percentile"}
    task = SegmentationTask(backbone="vitmicro16", class_names=["water", "crop", "tree"], image_normalization=landsat,
                            backbone_kwargs={"layerscale_init": 1.0})  # fmt: skip
    with torch.no_grad():
        task.model.head.conv.weight.normal_(0, 2.0)
    task.eval()
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "dinov3_eo": task.checkpoint_metadata()}, tmp_path / "seg.ckpt")  # fmt: skip
    assert cli_main(["export", str(tmp_path / "seg.ckpt"), "-o", str(tmp_path / "seg"), "--onnx", "--no-check"]) == 0
    assert cli_main(["segment", "predict", str(sample), "--model", str(tmp_path / "seg.ckpt"), "-o", str(tmp_path / "torch"),
                     "--nodata", "0", "--quiet"]) == 0  # fmt: skip
    # the example in a process where importing torch fails: numpy, rasterio and onnxruntime only
    run_blocked = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; "
                   "runpy.run_path(sys.argv[0], run_name='__main__')")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", run_blocked, str(root / "examples" / "onnx_map.py"), str(tmp_path / "seg.onnx"),
                           str(sample), str(tmp_path / "onnx_classes.tif"), "--nodata", "0", "--tile", "256"],
                          capture_output=True, text=True, timeout=600, env=os.environ | {"HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "segmentation graph (vitmicro16)" in done.stdout
    with rasterio.open(tmp_path / "onnx_classes.tif") as a, rasterio.open(tmp_path / "torch" / f"{sample.stem}_classes.tif") as b:
        ours, theirs = a.read(1), b.read(1)
        assert a.crs == b.crs and a.transform == b.transform and a.nodata == b.nodata == 255
        assert json.loads(a.tags()["class_names"]) == ["water", "crop", "tree"] and a.colormap(1)[0][:3] == b.colormap(1)[0][:3]
    assert ((ours == 255) == (theirs == 255)).all() and (ours != 255).any()
    valid = ours != 255
    agreement = float((ours[valid] == theirs[valid]).mean())
    print(f"ONNX example vs segment predict: {agreement:.4f} of {valid.sum()} pixels agree")
    assert agreement > 0.95 and len(np.unique(ours[valid])) > 1
