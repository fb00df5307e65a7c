"""The picture of segmentation tiles (imagery, reference, prediction) that validation and test write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinov3_eo.tasks.segmentation_plots import class_colour_image, prediction_panels

COLOURS = [[255, 0, 0], [0, 128, 0], [0, 0, 255]]


def test_class_colour_image_colours_shown_classes_only() -> None:
    classes = np.array([[0, 1], [2, 7]])
    shown = np.array([[True, True], [False, True]])
    rgba = class_colour_image(classes, COLOURS, shown)
    assert rgba.shape == (2, 2, 4) and rgba.dtype == np.float32
    np.testing.assert_allclose(rgba[0, 0], [1, 0, 0, 1])
    np.testing.assert_allclose(rgba[0, 1], [0, 128 / 255, 0, 1])
    assert (rgba[1, 0] == 0).all()  # not shown: transparent
    assert (rgba[1, 1] == 0).all()  # id 7 has no colour: transparent


def test_prediction_panels_writes_a_png_and_refuses_bad_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((3, 32, 32, 3)).astype(np.float32)
    truth = rng.integers(0, 3, (3, 32, 32))
    truth[0, :8] = 255
    truth[2] = 255  # a tile without any label
    pred = rng.integers(0, 3, (3, 32, 32))
    dst = prediction_panels(tmp_path / "val_predictions.png", images, truth, pred, class_names=["a", "b", "c"],
                            class_colors=COLOURS, titles=["x.tif", "y.tif", "z.tif"], title="validation")  # fmt: skip
    with Image.open(dst) as picture:
        assert picture.format == "PNG" and picture.height > picture.width > 300  # three rows of three panels
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    with pytest.raises(FileExistsError):
        prediction_panels(dst, images, truth, pred, class_names=["a", "b", "c"], class_colors=COLOURS, overwrite=False)
    with pytest.raises(ValueError, match=r"images must be \[N, H, W, 3\]"):
        prediction_panels(tmp_path / "bad.png", images[..., :2], truth, pred, class_names=["a", "b", "c"],
                          class_colors=COLOURS)  # fmt: skip
    assert not (tmp_path / "bad.png").exists()
