"""Image-text contrastive losses for dino.txt-style alignment.

Two pure functions, no state:

- :func:`clip_loss` — the symmetric InfoNCE of CLIP/dino.txt on a batch of matching (image, caption) pairs;
- :func:`dense_text_alignment_loss` — an optional per-patch term for when per-pixel labels exist: every patch
  token is classified against the text embeddings of the class names, so the patch tokens (which the
  open-vocabulary maps use) learn to point at the text of their own class.

Both return an unweighted scalar; the caller weights and sums them. They run without a process group:
the contrast is over the local batch only (the official ring all-to-all over GPUs is not reproduced).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dinov3_eo.losses.cross_entropy import check_class_labels

__all__ = ["clip_loss", "dense_text_alignment_loss", "labels_to_patch_grid"]


def _scale(logit_scale: Tensor | float, like: Tensor) -> Tensor:
    """``exp(logit_scale)`` as a 0-d tensor on ``like``'s device and dtype (gradient kept)."""
    scale = torch.as_tensor(logit_scale, device=like.device, dtype=like.dtype)
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(scale.shape)}.")
    return scale.reshape(()).exp()


def clip_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE between matching image and text embeddings.

    With ``s = exp(logit_scale) · image_emb @ text_embᵀ`` (``[B, B]``, pair ``i`` on the diagonal)::

        loss = mean_i  −( 2·s_ii − logsumexp_j s_ij − logsumexp_j s_ji ) / 2

    i.e. the mean of the image→text and text→image cross-entropies. The embeddings are used as given:
    pass L2-normalised ones (``TextAlignedModel.encode_image`` / ``encode_text`` return them so).

    Args:
        image_emb: ``[B, E]`` image embeddings.
        text_emb: ``[B, E]`` text embeddings; row ``i`` is the caption of image ``i``.
        logit_scale: the log of the inverse temperature (a learnable 0-d or 1-element tensor, or a float).

    Returns:
        0-d tensor.

    Raises:
        ValueError: if the two embeddings are not 2-D with the same shape, or the batch is empty.
    """
    if image_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        raise ValueError(
            f"clip_loss: image_emb and text_emb must both be [B, E] with the same shape, "
            f"got {tuple(image_emb.shape)} and {tuple(text_emb.shape)}."
        )
    if image_emb.shape[0] == 0:
        raise ValueError("clip_loss: the batch is empty.")
    sim = _scale(logit_scale, image_emb) * image_emb @ text_emb.T  # [B, B]
    lse_rows = torch.logsumexp(sim, dim=1)  # [B] image -> all texts
    lse_cols = torch.logsumexp(sim, dim=0)  # [B] text -> all images
    return -(2 * sim.diagonal() - lse_rows - lse_cols).mean() / 2


def labels_to_patch_grid(
    labels: Tensor, grid: tuple[int, int], *, num_classes: int, ignore_index: int = 255
) -> Tensor:
    """Bring per-pixel labels down to the patch grid.

    When the label size is an integer multiple of the grid (the usual case: patch size 16) each patch gets the
    **majority** label of its pixels, ``ignore_index`` pixels not voting (ties go to the lower class index; a
    patch without any labelled pixel gets ``ignore_index``). Otherwise the label at the nearest pixel is used.

    Args:
        labels: ``[B, H, W]`` int64 labels in ``[0, num_classes)`` or ``ignore_index``.
        grid: ``(h, w)`` patch grid.
        num_classes: number of classes ``K``.
        ignore_index: the label of unlabelled pixels.

    Returns:
        ``[B, h, w]`` int64 labels.

    Raises:
        ValueError: if ``labels`` is not 3-D or, for CPU labels, holds a value outside ``[0, num_classes)`` other than
            ``ignore_index`` (:func:`check_class_labels`; device labels are not read back).
    """
    if labels.ndim != 3:
        raise ValueError(f"labels must be [B, H, W], got shape {tuple(labels.shape)}.")
    labels = labels.long()
    valid = labels != ignore_index
    if labels.device.type == "cpu":  # on a GPU the check would read back from the device: callers check on the host
        check_class_labels(labels, num_classes, ignore_index=ignore_index)
    b, height, width = labels.shape
    h, w = grid
    if height % h or width % w:
        idx = F.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")  # [B, 1, h, w]
        return idx[:, 0].long()
    ph, pw = height // h, width // w
    # Votes are scattered into [B, h·w·K] bins, not one-hot encoded: memory O(B·H·W) rather than O(B·H·W·K).
    rows = torch.arange(height, device=labels.device) // ph  # [H]
    cols = torch.arange(width, device=labels.device) // pw  # [W]
    cell = (rows[:, None] * w + cols[None, :]).expand(b, height, width)  # [B, H, W]
    bins = (cell * num_classes + labels.clamp(0, num_classes - 1)).reshape(b, -1)  # [B, H·W]
    counts = torch.zeros(b, h * w * num_classes, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, bins, valid.reshape(b, -1).long())
    counts = counts.reshape(b, h, w, num_classes)  # [B, h, w, K]
    patch_labels = counts.argmax(dim=-1)  # [B, h, w]
    return torch.where(counts.sum(dim=-1) > 0, patch_labels, torch.full_like(patch_labels, ignore_index))


def dense_text_alignment_loss(
    patch_emb: Tensor,
    class_text_emb: Tensor,
    labels: Tensor,
    logit_scale: Tensor | float,
    *,
    ignore_index: int = 255,
) -> Tensor:
    """Per-patch cross-entropy of patch-vs-class-text cosine logits.

    ``logits[b, k, y, x] = exp(logit_scale) · cos(patch_emb[b, :, y, x], class_text_emb[k])``; the labels are
    brought to the patch grid by :func:`labels_to_patch_grid` and the loss is the mean cross-entropy over the
    patches whose label is not ``ignore_index`` (0 with a live graph when there is none, never NaN).

    Args:
        patch_emb: ``[B, D, h, w]`` patch embeddings (normalised here, over ``D``).
        class_text_emb: ``[K, D]`` one text embedding per class (normalised here), e.g. the patch half of
            ``TextAlignedModel.text_embeddings_for_classes(..., part="patch")``.
        labels: ``[B, H, W]`` int labels in ``[0, K)`` or ``ignore_index``.
        logit_scale: log inverse temperature (tensor or float).
        ignore_index: the label of unlabelled pixels.

    Returns:
        0-d tensor.

    Raises:
        ValueError: on mismatched shapes, or out-of-range labels on the CPU.
    """
    if patch_emb.ndim != 4 or class_text_emb.ndim != 2 or patch_emb.shape[1] != class_text_emb.shape[1]:
        raise ValueError(
            f"dense_text_alignment_loss: expected patch_emb [B, D, h, w] and class_text_emb [K, D], "
            f"got {tuple(patch_emb.shape)} and {tuple(class_text_emb.shape)}."
        )
    if labels.ndim != 3 or labels.shape[0] != patch_emb.shape[0]:
        raise ValueError(
            f"dense_text_alignment_loss: labels must be [B, H, W] with B={patch_emb.shape[0]}, "
            f"got {tuple(labels.shape)}."
        )
    num_classes = class_text_emb.shape[0]
    target = labels_to_patch_grid(
        labels.to(patch_emb.device), tuple(patch_emb.shape[-2:]), num_classes=num_classes, ignore_index=ignore_index
    )  # [B, h, w]
    patches = F.normalize(patch_emb, dim=1)  # [B, D, h, w]
    texts = F.normalize(class_text_emb.to(patches.dtype), dim=1)  # [K, D]
    logits = _scale(logit_scale, patches) * torch.einsum("bdyx,kd->bkyx", patches, texts)  # [B, K, h, w]
    # the mean as a sum over a count: no labelled patch gives an exact 0 (live graph) without reading the device
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    return total / (target != ignore_index).sum().to(total.dtype).clamp_min(1.0)


def grouped_clip_loss(image_emb: Tensor, text_emb: Tensor, groups: Tensor, logit_scale: Tensor | float) -> Tensor:
    """Symmetric InfoNCE when several images share one text (labels as captions: many chips of "forest").

    ``text_emb`` holds one row per *group*; image ``b`` belongs to group ``groups[b]``. With
    ``s = exp(logit_scale) · image_emb @ text_embᵀ`` (``[B, U]``)::

        image→text = mean_b  −( s[b, g_b] − logsumexp_u s[b, u] )
        text→image = mean_u  −( logsumexp_{b: g_b = u} s[b, u] − logsumexp_b s[b, u] )
        loss       = (image→text + text→image) / 2

    so images of the same group are positives of their text rather than false negatives. With one image per
    group (``U = B``, ``groups = arange(B)``) this is exactly :func:`~dinov3_eo.losses.contrastive.clip_loss`.

    Args:
        image_emb: ``[B, E]`` L2-normalised image embeddings.
        text_emb: ``[U, E]`` L2-normalised text embeddings, one per group.
        groups: ``[B]`` int64 group index of every image, each of ``0..U-1`` used at least once.
        logit_scale: log inverse temperature.

    Returns:
        0-d tensor.

    Raises:
        ValueError: on mismatched shapes, or (CPU ``groups``) a group without image.
    """
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape[1] != text_emb.shape[1]:
        raise ValueError(
            f"grouped_clip_loss: expected image_emb [B, E] and text_emb [U, E], got {tuple(image_emb.shape)} and "
            f"{tuple(text_emb.shape)}."
        )
    if groups.shape != (image_emb.shape[0],):
        raise ValueError(f"grouped_clip_loss: groups must be [{image_emb.shape[0]}], got {tuple(groups.shape)}.")
    n_groups = text_emb.shape[0]
    # checked where it is free: device groups (built on the host by the caller) are not read back
    if groups.device.type == "cpu" and (
        torch.bincount(groups, minlength=n_groups).min() == 0 or int(groups.max()) >= n_groups
    ):
        raise ValueError(f"grouped_clip_loss: every one of the {n_groups} texts needs at least one image.")
    scale = torch.as_tensor(logit_scale, dtype=image_emb.dtype, device=image_emb.device).reshape(()).exp()
    sim = scale * image_emb @ text_emb.T  # [B, U]
    image_to_text = F.cross_entropy(sim, groups)
    member = F.one_hot(groups, n_groups).bool()  # [B, U]
    positives = torch.logsumexp(sim.masked_fill(~member, float("-inf")), dim=0)  # [U]
    text_to_image = (torch.logsumexp(sim, dim=0) - positives).mean()
    return (image_to_text + text_to_image) / 2
