"""iBOT block masks: exact counts, official ratio spread, block structure, determinism, no global RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dinov3_eo.ssl.masking import block_mask, ibot_masks


@pytest.mark.parametrize("n_masked", [0, 1, 3, 20, 98, 150, 196])
def test_block_mask_exact_count(n_masked: int) -> None:
    mask = block_mask((14, 14), n_masked, rng=np.random.default_rng(n_masked), max_block=98)
    assert mask.shape == (14, 14) and mask.dtype == bool and int(mask.sum()) == n_masked


def test_block_mask_is_blocky() -> None:
    # rectangles: almost every masked patch has a masked 4-neighbour; random scatter at 25 % would not
    rng = np.random.default_rng(0)
    shares = []
    for _ in range(20):
        mask = block_mask((16, 16), 64, rng=rng, max_block=128)
        padded = np.pad(mask, 1)
        neighbour = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        shares.append((mask & neighbour).sum() / mask.sum())
    assert np.mean(shares) > 0.9


def test_ibot_masks_official_layout() -> None:
    out = ibot_masks(8, (14, 14), rng=np.random.default_rng(1))
    masks = out["masks"]
    assert masks.shape == (8, 196) and masks.dtype == torch.bool
    counts = sorted(masks.sum(1).tolist())
    # half the images masked, int(N·r) with r = linspace(0.1, 0.5, 5)[1:]
    assert counts == [0, 0, 0, 0, int(196 * 0.2), int(196 * 0.3), int(196 * 0.4), int(196 * 0.5)]
    torch.testing.assert_close(out["mask_indices"], masks.flatten().nonzero().flatten())
    assert out["n_masked_patches"].tolist() == [int(masks.sum())]
    image_of_token = out["mask_indices"] // 196
    sums = torch.zeros(8).index_add_(0, image_of_token, out["masks_weight"])
    torch.testing.assert_close(sums, (masks.sum(1) > 0).float())


def test_ibot_masks_odd_batch_and_probability() -> None:
    out = ibot_masks(3, (4, 6), rng=np.random.default_rng(0), mask_probability=0.5)
    assert int((out["masks"].sum(1) > 0).sum()) == 1  # int(3 · 0.5)
    assert int(out["masks"].sum()) == int(24 * 0.5)


def test_determinism_and_no_global_rng() -> None:
    np_state, py_state = np.random.get_state(), random.getstate()
    a = ibot_masks(6, (8, 8), rng=np.random.default_rng(42))
    b = ibot_masks(6, (8, 8), rng=np.random.default_rng(42))
    c = ibot_masks(6, (8, 8), rng=np.random.default_rng(43))
    assert torch.equal(a["masks"], b["masks"]) and not torch.equal(a["masks"], c["masks"])
    assert random.getstate() == py_state
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"n_masked must be in \[0, 16\]"):
        block_mask((4, 4), 17, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mask_probability must be in"):
        ibot_masks(4, (4, 4), rng=np.random.default_rng(0), mask_probability=1.5)
    with pytest.raises(ValueError, match="ratio_range"):
        ibot_masks(4, (4, 4), rng=np.random.default_rng(0), ratio_range=(0.5, 0.1))
