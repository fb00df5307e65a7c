"""iBOT block masks: exact counts, official ratio spread, block structure, determinism, no global RNG."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from dinov3_eo.ssl.masking import block_mask, ibot_masks


def reference_block_mask(
    grid_hw: tuple[int, int], n_masked: int, rng: np.random.Generator, max_block: float
) -> np.ndarray:
    """The BEiT block-mask algorithm straight from its description (dinov3_facts.md §3): numpy draws one at a time,
    a numpy mask; rectangles of area U(4, max_block), aspect log-uniform in [0.3, 1/0.3], ≤ 10 tries each,
    then random completion."""
    height, width = grid_hw
    mask = np.zeros(grid_hw, dtype=bool)
    count = 0
    while count < n_masked:
        added = 0
        max_new = min(n_masked - count, max(1, int(max_block)))
        for _ in range(10):
            area = rng.uniform(min(4, max_new), max_new)
            aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
            h, w = round(np.sqrt(area * aspect)), round(np.sqrt(area / aspect))
            if not (0 < h < height and 0 < w < width):
                continue
            top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
            new = h * w - mask[top : top + h, left : left + w].sum()
            if 0 < new <= max_new:
                mask[top : top + h, left : left + w] = True
                added = new
                break
        if added == 0:
            break
        count += added
    free = np.flatnonzero(~mask.ravel())
    mask.ravel()[rng.choice(free, size=n_masked - count, replace=False)] = True
    return mask


def mask_statistics(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-patch masking frequency [h, w] and the distribution of masked 4-neighbours of a masked patch [5]."""
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    neighbours = (padded[:, :-2, 1:-1].astype(int) + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:])
    shape = np.bincount(neighbours[masks], minlength=5) / masks.sum()
    return masks.mean(0), shape


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


@pytest.mark.parametrize(("grid", "n_masked"), [((14, 14), 59), ((14, 14), 98), ((7, 7), 12)])
def test_block_mask_matches_the_reference_algorithm(grid: tuple[int, int], n_masked: int) -> None:
    # the fast generator (bulk draws, row bitsets) draws other numbers than the reference but the same distribution:
    # where patches fall and how blocky the masks are agree within sampling noise over 1,500 masks each
    half = grid[0] * grid[1] / 2
    rng_fast, rng_ref = np.random.default_rng(0), np.random.default_rng(1)
    fast = np.stack([block_mask(grid, n_masked, rng=rng_fast, max_block=half) for _ in range(1500)])
    ref = np.stack([reference_block_mask(grid, n_masked, rng_ref, half) for _ in range(1500)])
    assert (fast.sum((1, 2)) == n_masked).all()
    (where_fast, shape_fast), (where_ref, shape_ref) = mask_statistics(fast), mask_statistics(ref)
    ratio = n_masked / (grid[0] * grid[1])
    noise = np.sqrt(ratio * (1 - ratio) / 1500)  # one patch's frequency, as a binomial share
    assert np.abs(where_fast - where_ref).max() < 5 * noise
    np.testing.assert_allclose(shape_fast, shape_ref, atol=0.02)


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
