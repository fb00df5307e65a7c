"""Test-time augmentation (dinov3_eo.inference.tta) alone and inside predict_raster, on the real CC0 Landsat crop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import Tensor, nn

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.data.raster import read_window
from dinov3_eo.inference.predict import PROBABILITY_SCALE, predict_raster
from dinov3_eo.inference.tta import TestTimeAugmented, dihedral, random_dihedral, tta_views, undo_dihedral

DATA = Path(__file__).parent / "data"
CROP = DATA / "rgb_byte_crop.tif"  # 250 x 230, nodata 0
NORM = Normalization.preset("sat493m")


def numpy_views(mode: str) -> list[tuple]:
    """The views as numpy (forward, inverse) pairs on [..., H, W] arrays, written from the group's definition."""
    identity = (lambda a: a, lambda a: a)
    lr = (lambda a: np.flip(a, -1), lambda a: np.flip(a, -1))
    tb = (lambda a: np.flip(a, -2), lambda a: np.flip(a, -2))
    half = (lambda a: np.flip(a, (-2, -1)), lambda a: np.flip(a, (-2, -1)))
    if mode == "flips":
        return [identity, lr, tb, half]
    turns = [(lambda a, k=k: np.rot90(a, k, axes=(-2, -1)), lambda a, k=k: np.rot90(a, -k, axes=(-2, -1)))
             for k in range(4)]
    transposed = [(lambda a, f=f: np.swapaxes(f(a), -2, -1), lambda a, g=g: g(np.swapaxes(a, -2, -1)))
                  for f, g in turns]
    return turns + transposed


class Asymmetric(nn.Module):
    """Not equivariant to any flip or turn: a 3x3 conv with a lopsided kernel plus a bias that grows down the rows."""

    def __init__(self, in_chans: int = 3, out_chans: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(in_chans, out_chans, 3, padding=1)
        self.calls = 0
        self.shapes: list[tuple[int, int]] = []

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        self.shapes.append(tuple(x.shape[-2:]))
        rows = torch.linspace(0, 1, x.shape[-2])[:, None].expand(x.shape[-2:])
        return self.conv(x) + rows


def softmax_np(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class TestViews:
    @pytest.mark.parametrize("mode", ["flips", "d4"])
    def test_views_are_the_group_and_invert(self, mode: str) -> None:
        x = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5)  # non-square H x W
        seen = set()
        for k in tta_views(mode):
            y = dihedral(x, k)
            seen.add(tuple(y.flatten().tolist()) + tuple(y.shape))
            assert undo_dihedral(y, k).equal(x)
        assert len(seen) == len(tta_views(mode)) == {"flips": 4, "d4": 8}[mode]  # distinct elements
        expected = {tuple(np.ascontiguousarray(f(x.numpy())).flatten().tolist()) + f(x.numpy()).shape
                    for f, _ in numpy_views(mode)}
        assert seen == expected

    def test_flips_are_the_mirrors(self) -> None:
        x = torch.randn(1, 2, 4, 6)
        views = tta_views("flips")
        assert views[0] == 0
        got = [dihedral(x, k) for k in views]
        for want in (x, x.flip(-1), x.flip(-2), x.flip(-2, -1)):
            assert any(g.equal(want) for g in got)

    def test_unknown_mode(self) -> None:
        with pytest.raises(ValueError, match="tta must be one of"):
            tta_views("rot")


class TestTestTimeAugmented:
    @pytest.mark.parametrize("mode", ["flips", "d4"])
    @pytest.mark.parametrize("activation", ["softmax", "sigmoid", "none"])
    def test_equals_a_naive_mean_of_the_views(self, mode: str, activation: str) -> None:
        model = Asymmetric().eval()
        x = torch.randn(2, 3, 32, 48)
        with torch.no_grad():
            got = TestTimeAugmented(model, mode, activation)(x).numpy()
            calls, shapes = model.calls, set(model.shapes)
            outputs = []
            for forward, inverse in numpy_views(mode):
                y = model(torch.from_numpy(np.ascontiguousarray(forward(x.numpy())))).numpy()
                y = {"softmax": softmax_np, "sigmoid": lambda a: 1 / (1 + np.exp(-a)), "none": lambda a: a}[activation](y)
                outputs.append(inverse(y))
        np.testing.assert_allclose(got, np.mean(outputs, axis=0), atol=1e-5)
        assert calls == len(tta_views(mode))
        assert shapes == ({(32, 48)} if mode == "flips" else {(32, 48), (48, 32)})  # d4 feeds it transposed too
        plain = model(x).softmax(1) if activation == "softmax" else None
        if plain is not None:
            assert not np.allclose(got, plain.detach().numpy(), atol=1e-3)  # the views did change something

    @pytest.mark.parametrize("mode", ["flips", "d4"])
    def test_an_equivariant_model_is_unchanged(self, mode: str) -> None:
        model = nn.Conv2d(3, 4, 1).eval()  # per pixel: commutes with every flip and turn
        x = torch.randn(1, 3, 16, 32)
        with torch.no_grad():
            torch.testing.assert_close(TestTimeAugmented(model, mode, "softmax")(x), model(x).softmax(1))

    def test_keeps_the_wrapped_models_mode(self) -> None:
        model = nn.Conv2d(3, 4, 1).eval()
        wrapped = TestTimeAugmented(model, "flips")
        assert not wrapped.training and not model.training
        wrapped.train(wrapped.training)
        assert not model.training


class TestPredictRaster:
    def test_single_window_equals_the_views_mean(self, tmp_path: Path) -> None:
        """On a raster that fits one window, the TTA probabilities are the mean of the views' softmax."""
        model = Asymmetric()
        predict_raster(model, CROP, tmp_path / "c.tif", out_channels=4, window=256, normalization=NORM, tta="d4",
                       output="scores", scores_dtype="float32", progress=False)
        with rasterio.open(CROP) as src:
            height, width = src.height, src.width
            # the one window: the raster padded to multiples of 16 (a boundless read, as the grid's)
            pixels, valid = read_window(src, rasterio.windows.Window(0, 0, -width % 16 + width, -height % 16 + height))
        x = NORM(torch.from_numpy(pixels.astype(np.float32))).masked_fill(~torch.from_numpy(valid), 0.0)[None]
        with torch.no_grad():
            views = [inverse(softmax_np(model(torch.from_numpy(np.ascontiguousarray(forward(x.numpy())))).numpy()))
                     for forward, inverse in numpy_views("d4")]
        expected = np.mean(views, axis=0)[0][:, :height, :width]
        with rasterio.open(tmp_path / "c.tif") as out:
            got = out.read()
            assert out.tags()["tta"] == "d4"
        ok = valid[:height, :width]
        np.testing.assert_allclose(got[:, ok], expected[:, ok], atol=1e-5)

    def test_overlapping_windows_and_argmax(self, tmp_path: Path) -> None:
        """Many overlapping windows: the run calls the model once per view and batch; the uint8 probabilities and
        classes follow the blended TTA scores; the model's mode is restored."""
        model = Asymmetric().train()
        common = dict(out_channels=4, window=96, overlap=0.25, normalization=NORM, progress=False, batch_size=8)
        scores = predict_raster(model, CROP, tmp_path / "s.tif", output="scores", scores_dtype="float32", tta="flips",
                                **common)
        assert model.training
        calls = model.calls
        summary = predict_raster(model, CROP, tmp_path / "c.tif", probabilities=tmp_path / "p.tif", tta="flips", **common)
        assert model.calls - calls == 4 * summary.model_calls
        plain = predict_raster(model, CROP, tmp_path / "n.tif", output="scores", scores_dtype="float32", **common)
        assert scores.windows == plain.windows
        with rasterio.open(tmp_path / "s.tif") as s, rasterio.open(tmp_path / "p.tif") as p, \
                rasterio.open(tmp_path / "c.tif") as c, rasterio.open(tmp_path / "n.tif") as n:
            blended, probs, classes, no_tta = s.read(), p.read(), c.read(1), n.read()
        ok = ~np.isnan(blended[0])
        np.testing.assert_allclose(blended[:, ok].sum(axis=0), 1.0, atol=1e-5)  # averaged probabilities
        assert np.abs(probs[:, ok] / PROBABILITY_SCALE - blended[:, ok]).max() <= 0.5 / PROBABILITY_SCALE + 1e-6
        np.testing.assert_array_equal(classes[ok], blended[:, ok].argmax(axis=0))
        assert np.abs(blended[:, ok] - no_tta[:, ok]).max() > 1e-3

    def test_non_square_window_on_a_small_raster(self, tmp_path: Path) -> None:
        """A raster smaller than the window is one non-square padded window; d4 feeds it transposed as well."""
        with rasterio.open(CROP) as src:
            profile = src.profile | {"height": 40, "width": 72, "tiled": False}
            data = src.read(window=rasterio.windows.Window(100, 100, 72, 40))
            profile["transform"] = src.window_transform(rasterio.windows.Window(100, 100, 72, 40))
        small = tmp_path / "small.tif"
        with rasterio.open(small, "w", **profile) as dst:
            dst.write(data)
        model = Asymmetric()
        predict_raster(model, small, tmp_path / "o.tif", out_channels=4, window=512, normalization=NORM,
                       output="regression", tta="d4", progress=False)
        assert set(model.shapes) == {(48, 80), (80, 48)}
        with rasterio.open(tmp_path / "o.tif") as out:
            assert out.read().shape == (4, 40, 72)

    def test_unknown_mode_writes_nothing(self, tmp_path: Path) -> None:
        with pytest.raises(ValueError, match="tta must be one of"):
            predict_raster(Asymmetric(), CROP, tmp_path / "x.tif", out_channels=4, tta="all", progress=False)
        assert not list(tmp_path.iterdir())


def test_random_dihedral_draws_one_element_per_square_image() -> None:
    """Each image of a square batch takes its own element (the one ``dihedral`` gives it alone), labels with it;
    over a few steps the images of one batch take different elements."""
    image = torch.randn(6, 2, 8, 8)
    labels = image.argmax(dim=1)
    mixed = 0
    for step in range(8):
        moved_image, moved_labels = random_dihedral(image, labels, seed=1, step=step)
        assert moved_image.shape == image.shape and torch.equal(moved_image.argmax(dim=1), moved_labels)
        elements = [next(k for k in range(8) if torch.equal(dihedral(image[b], k), moved_image[b])) for b in range(6)]
        mixed += len(set(elements)) > 1
    assert mixed == 8


def test_random_dihedral_moves_image_and_labels_together_and_repeats_per_step() -> None:
    """Training augmentation: one group element for all tensors (labels stay on their pixels), the same one for the
    same (seed, step) whatever came before (a resumed run draws what the uninterrupted run drew), every element over
    enough steps."""
    image = torch.randn(2, 3, 8, 6)
    labels = image.argmax(dim=1)  # [2, 8, 6]: a function of each pixel, so it must move with it
    seen = set()
    for step in range(64):
        moved_image, moved_labels = random_dihedral(image, labels, seed=3, step=step)
        assert torch.equal(moved_image.argmax(dim=1), moved_labels)
        again = random_dihedral(image, labels, seed=3, step=step)
        assert torch.equal(again[0], moved_image) and torch.equal(again[1], moved_labels)
        seen.add(next(k for k in range(8) if dihedral(image, k).shape == moved_image.shape
                      and torch.equal(dihedral(image, k), moved_image)))  # fmt: skip
    assert seen == set(range(8))
    assert not all(torch.equal(random_dihedral(image, seed=s, step=0)[0], random_dihedral(image, seed=0, step=0)[0])
                   for s in range(1, 8))  # the seed matters  # fmt: skip
