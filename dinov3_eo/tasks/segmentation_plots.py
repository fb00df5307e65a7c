"""PNG pictures of segmentation tiles: the imagery, its reference mask and the prediction side by side, in the
classes' colours, as ``segment fit`` writes them after each validation (``val_predictions.png``) and ``segment test``
after the test (``test_predictions.png``). Drawn on a bare matplotlib ``Figure`` (Agg; pyplot's global state is
never touched) and written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dinov3_eo.inference.writers import save_figure


def class_colour_image(classes: np.ndarray, colours: Sequence[Sequence[int]], shown: np.ndarray) -> np.ndarray:
    """``[H, W]`` class ids -> ``[H, W, 4]`` float RGBA in [0, 1]: each class in its colour where ``shown``,
    transparent elsewhere (and for ids without a colour)."""
    table = np.zeros((len(colours) + 1, 4), dtype=np.float32)  # the last row: ids outside 0..K-1
    table[: len(colours), :3] = np.asarray(colours, dtype=np.float32)[:, :3] / 255.0
    table[: len(colours), 3] = 1.0
    ids = np.where((classes >= 0) & (classes < len(colours)), classes, len(colours))
    picture = table[ids]
    picture[~shown] = 0.0
    return picture


def prediction_panels(
    dst: str | os.PathLike[str],
    images: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    *,
    class_names: Sequence[str],
    class_colors: Sequence[Sequence[int]],
    ignore_index: int = 255,
    valid: np.ndarray | None = None,
    titles: Sequence[str] | None = None,
    title: str | None = None,
    overwrite: bool = True,
) -> Path:
    """One row per tile: the imagery, the reference mask over it, the predicted classes over it, and a legend of the
    classes that appear, with each row's share of labelled pixels predicted right.

    Args:
        dst: destination ``.png``.
        images: ``[N, H, W, 3]`` pictures in [0, 1] (e.g. :func:`~dinov3_eo.inference.writers.display_rgb`).
        truth: ``[N, H, W]`` reference class ids, ``ignore_index`` where unlabelled (drawn as the imagery).
        pred: ``[N, H, W]`` predicted class ids.
        class_names, class_colors: the K classes' names and RGB colours.
        ignore_index: the unlabelled value of ``truth``.
        valid: ``[N, H, W]`` bool, pixels with image data (prediction shown there only); default all.
        titles: a label per row (e.g. the tile's file and offset).
        title: the figure's title.
        overwrite: replace an existing ``dst``.

    Raises:
        ValueError: for arrays whose shapes disagree.
        FileExistsError: if ``dst`` exists and ``overwrite`` is false.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    images, truth, pred = np.asarray(images), np.asarray(truth), np.asarray(pred)
    valid = np.ones(truth.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if images.ndim != 4 or images.shape[-1] != 3 or truth.shape != images.shape[:3] or pred.shape != truth.shape \
            or valid.shape != truth.shape:  # fmt: skip
        raise ValueError(f"prediction_panels: images must be [N, H, W, 3] and truth, pred, valid [N, H, W]; got "
                         f"{images.shape}, {truth.shape}, {pred.shape}, {valid.shape}.")
    n = len(truth)
    fig = Figure(figsize=(7.8, 2.6 * n + 0.6), dpi=100, layout="constrained")
    axes = np.asarray(fig.subplots(n, 3, squeeze=False))
    labelled = truth != ignore_index
    for i in range(n):
        correct = (pred[i] == truth[i]) & labelled[i]
        share = f"{correct.sum() / labelled[i].sum():.0%} right" if labelled[i].any() else "no label"
        panels = [
            (None, titles[i] if titles is not None and i < len(titles) else f"tile {i}"),
            (class_colour_image(truth[i], class_colors, labelled[i]), "reference"),
            (class_colour_image(pred[i], class_colors, valid[i]), f"prediction ({share})"),
        ]
        for ax, (overlay, label) in zip(axes[i], panels):
            ax.imshow(images[i], interpolation="nearest")
            if overlay is not None:
                ax.imshow(overlay, alpha=0.75, interpolation="nearest")
            ax.set_title(label, fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])  # a frame but no ticks: a tile's nodata is white like the page
    seen = sorted(set(np.unique(truth[labelled]).tolist()) | set(np.unique(pred[valid]).tolist()))
    handles = [Patch(color=np.asarray(class_colors[k][:3]) / 255.0, label=class_names[k])
               for k in seen if 0 <= k < len(class_names)]  # fmt: skip
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, dst, overwrite=overwrite)
