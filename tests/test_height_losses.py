"""Height losses: values against naive references, nodata never reaches the loss or its gradient."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.windows import Window

from dinov3_eo.losses.height import (
    MaskedHuberLoss,
    MaskedL1Loss,
    SigLoss,
    masked_huber_loss,
    masked_l1_loss,
    sig_loss,
)

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


@pytest.fixture
def heights() -> tuple[torch.Tensor, torch.Tensor]:
    """A real-texture "height" field and a prediction, ``[2, 1, 48, 48]`` each.

    The target is the red band of the bundled Landsat scene on two windows across the scene's diagonal edge,
    rescaled to 0-40 m; the 0-valued collar becomes NaN (nodata), as a LiDAR CHM's gaps would. The prediction is
    the target smoothed, biased and noised.
    """
    with rasterio.open(SAMPLE) as src:
        red = [src.read(3, window=Window(300 + 60 * i, 30 + 10 * i, 48, 48)).astype(np.float64) for i in range(2)]
    dn = torch.from_numpy(np.stack(red))[:, None]  # [2, 1, 48, 48]
    nodata = dn == 0
    assert 0.02 < nodata.float().mean() < 0.6, "the sample corner should hold some collar"
    good = dn[~nodata]
    target = (dn - good.min()) / (good.max() - good.min()) * 40.0
    target[nodata] = float("nan")
    gen = torch.Generator().manual_seed(0)
    pred = torch.nn.functional.avg_pool2d(torch.nan_to_num(target, 0.0), 3, stride=1, padding=1) * 1.1 + 0.5
    pred = (pred + torch.randn(pred.shape, generator=gen, dtype=pred.dtype)).clamp_min(0.0)
    return pred.float(), target.float()


def _valid(target: torch.Tensor) -> torch.Tensor:
    return torch.isfinite(target)


class TestValues:
    @pytest.mark.parametrize("lam", [0.0, 0.15, 0.5, 1.0])
    def test_sig_loss_matches_numpy(self, heights, lam) -> None:
        pred, target = heights
        keep = _valid(target).numpy()
        p, t = pred.numpy()[keep].astype(np.float64), target.numpy()[keep].astype(np.float64)
        g = np.log(p + 1e-3) - np.log(t + 1e-3)
        expected = np.sqrt(np.var(g, ddof=1) + lam * np.mean(g) ** 2)
        assert sig_loss(pred, target, lam=lam).item() == pytest.approx(expected, rel=1e-5)

    def test_sig_loss_classic_form(self, heights) -> None:
        """sqrt(mean g^2 - 0.85 mean(g)^2) up to the unbiased-variance factor n/(n-1)."""
        pred, target = heights
        keep = _valid(target)
        g = (torch.log(pred[keep].double() + 1e-3) - torch.log(target[keep].double() + 1e-3))
        n = g.numel()
        classic = torch.sqrt(n / (n - 1) * (g.square().mean() - g.mean() ** 2) + 0.15 * g.mean() ** 2)
        assert sig_loss(pred, target).item() == pytest.approx(classic.item(), rel=1e-5)

    def test_sig_loss_scale_invariance_without_mean_term(self, heights) -> None:
        pred, target = heights
        base = sig_loss(pred + 1.0, target + 1.0, lam=0.0, eps=1e-9)
        scaled = sig_loss((pred + 1.0) * 3.0, target + 1.0, lam=0.0, eps=1e-9)
        assert scaled.item() == pytest.approx(base.item(), rel=1e-4)
        assert sig_loss((pred + 1.0) * 3.0, target + 1.0, eps=1e-9) > base  # the mean term sees the scale

    def test_l1_matches_loop(self, heights) -> None:
        pred, target = heights
        total, count = 0.0, 0
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if np.isfinite(t):
                total, count = total + abs(p - t), count + 1
        assert masked_l1_loss(pred, target).item() == pytest.approx(total / count, rel=1e-5)

    @pytest.mark.parametrize("delta", [0.5, 1.0, 4.0])
    def test_huber_matches_loop(self, heights, delta) -> None:
        pred, target = heights
        terms = []
        for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
            if np.isfinite(t):
                r = abs(p - t)
                terms.append(0.5 * r * r if r < delta else delta * (r - 0.5 * delta))
        assert masked_huber_loss(pred, target, delta=delta).item() == pytest.approx(np.mean(terms), rel=1e-5)

    def test_perfect_prediction(self, heights) -> None:
        _, target = heights
        pred = torch.nan_to_num(target, 0.0).requires_grad_()
        for fn in (sig_loss, masked_l1_loss, masked_huber_loss):
            loss = fn(pred, target)
            assert loss.item() == pytest.approx(0.0, abs=1e-5)
            (grad,) = torch.autograd.grad(loss, pred)
            assert torch.isfinite(grad).all()

    def test_modules_equal_functions(self, heights) -> None:
        pred, target = heights
        assert SigLoss(lam=0.3)(pred, target) == sig_loss(pred, target, lam=0.3)
        assert MaskedL1Loss()(pred, target) == masked_l1_loss(pred, target)
        assert MaskedHuberLoss(delta=2.0)(pred, target) == masked_huber_loss(pred, target, delta=2.0)

    def test_channel_dim_optional(self, heights) -> None:
        pred, target = heights
        for fn in (sig_loss, masked_l1_loss, masked_huber_loss):
            assert fn(pred[:, 0], target[:, 0]) == fn(pred, target) == fn(pred, target[:, 0])


LOSSES = [sig_loss, masked_l1_loss, masked_huber_loss]


@pytest.mark.parametrize("fn", LOSSES)
def test_bf16_predictions_are_reduced_in_float32(heights, fn) -> None:
    pred, target = heights
    half = pred.bfloat16()  # a DPT head's output under bf16 autocast
    loss = fn(half, target)
    assert loss.dtype == torch.float32 and torch.equal(loss, fn(half.float(), target))


class TestNodata:
    @pytest.mark.parametrize("fn", LOSSES)
    def test_nan_targets_do_not_change_loss_or_gradient(self, heights, fn) -> None:
        pred, target = heights
        invalid = ~_valid(target)
        a = pred.clone().requires_grad_()
        b = pred.clone()
        b[invalid] = torch.where(torch.rand(int(invalid.sum())) > 0.5, 1e6, float("nan"))  # garbage where no data
        b.requires_grad_()
        la, lb = fn(a, target), fn(b, target)
        assert torch.isfinite(la) and la.item() == lb.item()
        (ga,) = torch.autograd.grad(la, a)
        (gb,) = torch.autograd.grad(lb, b)
        assert torch.isfinite(gb).all()
        assert torch.all(ga[invalid] == 0) and torch.all(gb[invalid] == 0)
        torch.testing.assert_close(ga, gb)
        assert (ga[~invalid] != 0).any()

    @pytest.mark.parametrize("fn", LOSSES)
    def test_valid_mask_equals_dropping_pixels(self, heights, fn) -> None:
        pred, target = heights
        mask = torch.zeros_like(target, dtype=torch.bool)
        mask[..., 10:30, 5:40] = True
        masked = target.clone()
        masked[~mask] = float("nan")
        assert fn(pred, target, mask).item() == pytest.approx(fn(pred, masked).item(), rel=1e-6)
        p = pred.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(p, target, mask), p)
        assert torch.all(g[~mask] == 0)

    @pytest.mark.parametrize("fn", LOSSES)
    def test_no_valid_pixel_is_zero_without_warning(self, fn) -> None:
        pred = torch.rand(2, 1, 8, 8, requires_grad=True)
        target = torch.full((2, 1, 8, 8), float("nan"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = fn(pred, target)
            assert loss.item() == 0.0 and loss.requires_grad
            loss.backward()
            loss2 = fn(pred, torch.rand(2, 1, 8, 8), torch.zeros(2, 8, 8, dtype=torch.bool))
            assert loss2.item() == 0.0
        assert torch.all(pred.grad == 0)

    def test_sig_loss_single_pixel_and_negative_targets(self) -> None:
        pred = torch.tensor([[[[2.0, 5.0]]]])
        target = torch.tensor([[[[1.0, -3.0]]]])  # the negative height is not counted
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = sig_loss(pred, target)
        g = np.log(2.001) - np.log(1.001)
        assert loss.item() == pytest.approx(np.sqrt(0.15) * abs(g), rel=1e-5)


class TestErrors:
    def test_shape_and_type_errors(self) -> None:
        with pytest.raises(ValueError, match="differ in shape"):
            masked_l1_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 5))
        with pytest.raises(ValueError, match="one channel"):
            sig_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4))
        with pytest.raises(ValueError, match="valid .* does not match"):
            masked_huber_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.ones(2, 4, 5, dtype=torch.bool))
        with pytest.raises(TypeError, match="bool mask"):
            masked_l1_loss(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4), torch.ones(2, 4, 4))
        with pytest.raises(ValueError, match="delta must be > 0"):
            masked_huber_loss(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), delta=0.0)
        with pytest.raises(ValueError, match="lam must be in"):
            SigLoss(lam=2.0)
        with pytest.raises(ValueError, match="delta must be > 0"):
            MaskedHuberLoss(delta=-1.0)
