"""iBOT block masks for the student's global crops, generated with an explicit numpy Generator.

The SSL stages make them on the host inside each step (``ssl.stage.make_views``, seeded by the step), where the
crops are made too; they would run as well in a collate function on data-loader workers (seed each worker's
Generator, e.g. ``np.random.default_rng([seed, worker_id, epoch])``). Nothing here touches the global
``random``/``np.random``. One step's masks take ~2 ms of host time (128 global crops at 224 px).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor


def uniform_stream(rng: np.random.Generator, block: int = 256) -> Iterator[float]:
    """Uniform [0, 1) numbers from ``rng``, drawn ``block`` at a time.

    One Generator call per block instead of one per number: a numpy Generator call costs about a microsecond, and
    the masks of one step draw about two thousand numbers (this made them the bulk of a GPU step's host time).
    """
    while True:
        yield from rng.random(block).tolist()


def _add_rectangle(
    rows: list[int],
    width: int,
    max_new: int,
    *,
    uniforms: Iterator[float],
    min_block: int,
    log_aspect: tuple[float, float],
    tries: int = 10,
) -> int:
    """Try (≤ ``tries`` times) to mask one random rectangle adding 1..max_new new patches; returns how many it added.

    ``rows`` holds the mask as one integer per grid row (bit ``j`` = column ``j``), updated in place: a rectangle's
    already-masked patches are then a popcount per row instead of a numpy reduction.
    """
    height = len(rows)
    low = min(min_block, max_new)
    for _ in range(tries):
        area = low + (max_new - low) * next(uniforms)
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * next(uniforms))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if not (0 < h < height and 0 < w < width):
            continue
        top = int(next(uniforms) * (height - h + 1))  # uniform over 0..height-h
        left = int(next(uniforms) * (width - w + 1))
        columns = ((1 << w) - 1) << left
        new = h * w - sum((rows[r] & columns).bit_count() for r in range(top, top + h))
        if 0 < new <= max_new:
            for r in range(top, top + h):
                rows[r] |= columns
            return new
    return 0


def _rows_to_array(rows: list[int], width: int) -> np.ndarray:
    """Row bitsets → [len(rows), width] bool array."""
    n_bytes = (width + 7) // 8
    packed = np.frombuffer(b"".join(row.to_bytes(n_bytes, "little") for row in rows), dtype=np.uint8)
    return np.unpackbits(packed.reshape(len(rows), n_bytes), axis=1, bitorder="little")[:, :width].astype(bool)


def block_mask(
    grid_hw: tuple[int, int],
    n_masked: int,
    *,
    rng: np.random.Generator,
    min_block: int = 4,
    max_block: int | None = None,
    min_aspect: float = 0.3,
    max_aspect: float | None = None,
    uniforms: Iterator[float] | None = None,
) -> np.ndarray:
    """BEiT-style block mask with exactly ``n_masked`` patches set.

    Rectangles of area U(min_block, max_block) and aspect ratio log-uniform in [min_aspect, max_aspect] (default
    1/min_aspect) are added while they bring new patches (≤ 10 tries each) without overshooting the target; the
    remaining count, if any, is completed with uniformly random unmasked patches.

    Args:
        grid_hw: (h, w) patch grid of a global crop.
        n_masked: patches to mask, 0 ≤ n_masked ≤ h·w.
        rng: the random source (explicit, for reproducible collation).
        min_block: smallest rectangle area.
        max_block: largest rectangle area (official: half the grid, ``0.5·h·w``); ``None`` = ``n_masked``.
        min_aspect: smallest rectangle aspect ratio.
        max_aspect: largest aspect ratio (default ``1 / min_aspect``).
        uniforms: the rectangles' uniform draws, when several masks share one :func:`uniform_stream` of ``rng``
            (default: a stream of ``rng`` for this mask alone).

    Returns:
        [h, w] bool array with ``n_masked`` True entries.

    Raises:
        ValueError: if ``n_masked`` is outside [0, h·w].
    """
    height, width = grid_hw
    n_total = height * width
    if not 0 <= n_masked <= n_total:
        raise ValueError(f"block_mask: n_masked must be in [0, {n_total}] for a {height}x{width} grid, got {n_masked}.")
    rows = [0] * height
    cap = n_masked if max_block is None else max(1, int(max_block))
    log_aspect = (math.log(min_aspect), math.log(max_aspect if max_aspect is not None else 1.0 / min_aspect))
    uniforms = uniforms if uniforms is not None else uniform_stream(rng)
    count = 0
    while count < n_masked:
        added = _add_rectangle(rows, width, min(n_masked - count, cap), uniforms=uniforms, min_block=min_block,
                               log_aspect=log_aspect)
        if added == 0:
            break
        count += added
    mask = _rows_to_array(rows, width)
    if count < n_masked:
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=n_masked - count, replace=False)] = True
    return mask


def ibot_masks(
    n_images: int,
    grid_hw: tuple[int, int],
    *,
    rng: np.random.Generator,
    mask_probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
    max_block_fraction: float = 0.5,
) -> dict[str, Tensor]:
    """Masks for a batch of global crops, as the official collate builds them.

    ``n = int(n_images · mask_probability)`` images are masked; the i-th of them gets
    ``int(N · r_i)`` patches with ``r = linspace(lo, hi, n + 1)[1:]`` (ratios spread evenly over (lo, hi]);
    the others get an empty mask; the list is then shuffled.

    Args:
        n_images: global-crop images in the batch (2·B, crop-major like ``ssl.crops``).
        grid_hw: (h, w) patch grid of a global crop (N = h·w).
        rng: numpy Generator.
        mask_probability: fraction of images masked (0.5).
        ratio_range: (lo, hi) masking ratios (0.1, 0.5).
        max_block_fraction: largest rectangle as a fraction of N (0.5).

    Returns:
        ``masks`` [n_images, N] bool; ``mask_indices`` [M] long flat indices into [n_images·N];
        ``masks_weight`` [M] fp32 = 1/(masked patches of the token's image); ``n_masked_patches`` [1] long = M.

    Raises:
        ValueError: on a non-positive ``n_images`` or out-of-range probability/ratios.
    """
    if n_images < 1:
        raise ValueError(f"ibot_masks: n_images must be >= 1, got {n_images}.")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"ibot_masks: mask_probability must be in [0, 1], got {mask_probability}.")
    low, high = ratio_range
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"ibot_masks: ratio_range must satisfy 0 <= lo <= hi <= 1, got {ratio_range}.")
    n_patches = grid_hw[0] * grid_hw[1]
    n_masked_images = int(n_images * mask_probability)
    ratios = np.linspace(low, high, n_masked_images + 1)[1:]
    max_block = max_block_fraction * n_patches
    uniforms = uniform_stream(rng)
    per_image = [
        block_mask(grid_hw, int(n_patches * ratio), rng=rng, max_block=max_block, uniforms=uniforms).ravel()
        for ratio in ratios
    ]
    per_image += [np.zeros(n_patches, dtype=bool)] * (n_images - n_masked_images)
    order = rng.permutation(n_images)
    masks = torch.from_numpy(np.stack([per_image[i] for i in order]))  # [n_images, N]
    mask_indices = masks.flatten().nonzero().flatten()  # [M]
    per_image_count = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()  # [n_images, 1]
    masks_weight = (1.0 / per_image_count).expand(masks.shape)[masks]  # [M]
    return {
        "masks": masks,
        "mask_indices": mask_indices,
        "masks_weight": masks_weight,
        "n_masked_patches": torch.tensor([mask_indices.numel()], dtype=torch.long),
    }
