"""Zero-shot probes (``classify zero-shot``): class names embedded by a text model make a probe whose scores are
dino.txt's zero-shot probabilities, computed here again from the text model's own ``encode_image`` and
``text_embeddings_for_classes``, and which ``classify predict``, ``test`` and ``map`` take as any probe.

The text model is a tiny random one (micro ViT, 2-layer text tower); the chips are 16-px PNG cuts of
``tests/data/rgb_byte_crop.tif`` (real Landsat-7 RGB, CC0).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from PIL import Image
from tiny_text import tiny_text_model

from dinov3_eo.cli import main as cli_main
from dinov3_eo.data.normalization import Normalization
from dinov3_eo.tasks.chip_classification import ChipClassifier, probe_backbone, zero_shot_classifier
from dinov3_eo.tasks.chip_embeddings import chip_features, embed_chips_with
from dinov3_eo.tasks.chip_finetune import ProbeHead
from dinov3_eo.tasks.openvocab import load_text_model

from brightness_chips import SCENE, brightness_folders

NORM = {"mean": [0.4] * 3, "std": [0.2] * 3, "low": [0] * 3, "high": [255] * 3, "name": "u8"}
CLASSES = ["bright", "dark", "solar farm"]


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_model(tmp_path_factory.mktemp("text") / "tiny_text.pt", NORM)


def test_scores_are_dino_txt_zero_shot_probabilities(text_model: Path, tmp_path: Path) -> None:
    probe = zero_shot_classifier(text_model, CLASSES, templates=["a satellite photo of {}.", "{} seen from above"], size=32)
    assert probe.features == "image" and probe.embedding["encoder"] == "text" and probe.weight.shape == (3, 192)
    probe.save(tmp_path / "zero.safetensors")
    probe = ChipClassifier.load(tmp_path / "zero.safetensors")  # round trip
    chips = brightness_folders(tmp_path / "chips")
    backbone = probe_backbone(probe)
    embedded = embed_chips_with(backbone, chips, size=32, progress=False)
    scores = probe.scores(chip_features(embedded, probe.features))

    # the same from the text model's own calls: image embedding (cls and mean patch token of the adapter, normalised
    # together), prompt-ensembled class embeddings, logit scale, softmax
    model, _, _ = load_text_model(text_model)
    images = torch.stack([Normalization.from_dict(NORM)(torch.from_numpy(
        np.asarray(Image.open(path)).transpose(2, 0, 1).astype(np.float32))) for path in embedded.paths])  # fmt: skip
    images = torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
    with torch.no_grad():
        image = model.encode_image(images)
        text = model.text_embeddings_for_classes(CLASSES, ["a satellite photo of {}.", "{} seen from above"])
        expected = (model.logit_scale.exp() * image @ text.T).softmax(dim=1).numpy()
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert scores.std(axis=0).max() > 1e-4  # chips differ

    # fine-tuning's head on the same outputs gives the same logits
    head = ProbeHead(probe)
    with torch.no_grad():
        out = backbone.model.forward_features(images)
        logits = head(out, torch.ones(len(images), 2, 2, dtype=torch.bool))
    np.testing.assert_allclose(logits.softmax(dim=1).numpy(), expected, atol=1e-5)

    with pytest.raises(ValueError, match="distinct class names"):
        zero_shot_classifier(text_model, ["water", "water"])


def test_zero_shot_from_the_command_line(text_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    probe = tmp_path / "zero.safetensors"
    assert cli_main(["classify", "zero-shot", "--model", str(text_model), "--classes", *CLASSES, "-o", str(probe),
                     "--size", "32", "--tile-size", "16"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "zero-shot probe of 3 classes (bright, dark, solar farm)" in printed and "prompt templates" in printed
    loaded = ChipClassifier.load(probe)
    assert loaded.embedding["chip_size"] == [16, 16] and len(loaded.embedding["templates"]) > 1  # the model's set

    chips = brightness_folders(tmp_path / "chips")
    assert cli_main(["classify", "predict", str(chips), "--probe", str(probe), "-o", str(tmp_path / "p.csv"), "--quiet"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 72 and {"p_bright", "p_dark", "p_solar farm"} <= set(rows[0])
    assert all(abs(sum(float(r[f"p_{c}"]) for c in CLASSES) - 1) < 1e-5 for r in rows)
    assert cli_main(["classify", "test", str(chips), "--probe", str(probe), "--quiet"]) == 0
    assert "zero-shot probe on 72 test chips" in (out := capsys.readouterr().out) and "over 72 chips" in out
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(probe), "-o", str(tmp_path / "map"), "--quiet"]) == 0
    with rasterio.open(tmp_path / "map" / "rgb_byte_crop_tile_classes.tif") as src:
        assert src.tags()["class_names"] == '["bright", "dark", "solar farm"]' and src.width == 16

    untiled = tmp_path / "untiled.safetensors"
    assert cli_main(["classify", "zero-shot", "--model", str(text_model), "--classes", "a", "b", "-o", str(untiled)]) == 0
    assert cli_main(["classify", "map", str(SCENE), "--probe", str(untiled), "-o", str(tmp_path / "m2"), "--quiet"]) == 2
    assert "a zero-shot probe made without --tile-size" in capsys.readouterr().err
    assert cli_main(["classify", "zero-shot", "--model", str(tmp_path / "none.pt"), "--classes", "a", "b", "-o",
                     str(tmp_path / "x.safetensors")]) == 2  # fmt: skip
    assert "does not exist" in capsys.readouterr().err
