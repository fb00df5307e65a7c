"""Batched multi-crop augmentation for DINOv3 on normalised images of any band count (runs on GPU).

All crops are rendered directly from the source images with ``torchvision.ops.roi_align`` (one kernel call per
crop set, area-averaging when shrinking so small crops are not aliased), so the same box can be rendered at two
resolutions: the student's global crop and the Gram teacher's higher-resolution crop cover exactly the same
ground. All random numbers come from one explicit CPU ``torch.Generator`` (device-independent reproducibility).

Crop layout is crop-major, as in the official collate: ``global_crops[k·B + b]`` is global crop ``k`` of image ``b``.

Differences from the official torchvision pipeline, and why:

- Geometry: bilinear/area resampling instead of bicubic (needed for batched rendering; no ringing on
  reflectance data).
- Colour: ColorJitter's hue/saturation are RGB-only. Instead, per crop and per band, contrast is scaled by
  U(1 − contrast, 1 + contrast) around the crop's band mean and a brightness offset U(−brightness, brightness)
  is added, both in normalised units (≈ dataset standard deviations); independent per band, this also shifts
  the balance between bands the way hue/saturation do for RGB. Grayscale (ITU-R 601 luma weights) and
  solarisation are applied only to 3-band (RGB) inputs. Solarisation negates values above 0 (= the band's
  dataset mean after normalisation), the analogue of inverting pixels above 128/255.
- Blur: the official code passes ``1 − p`` to ``RandomApply`` (issue #286), so the released models were trained
  with global crop 1 *never* blurred, global crop 2 blurred 90 % and local crops 50 %. We reproduce that trained
  behaviour on purpose, stating the apply-probabilities directly: ``blur_probs = (0.0, 0.9, 0.5)``
  (the fix proposed upstream, PR #342, does the same).
- Nodata: a candidate box whose valid fraction is below ``min_valid_fraction`` is resampled (up to
  ``max_tries`` candidates); if none qualifies the legal candidate with the most valid pixels is used. Invalid
  pixels stay 0 after the photometric changes and are reported in ``*_valid``.
"""

from __future__ import annotations

import math

import torch
from kornia.filters import gaussian_blur2d
from torch import Tensor
from torchvision.ops import roi_align

_LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class MultiCrop:
    """2 global + N local random-resized crops with flips and band-agnostic photometric augmentation.

    Args:
        global_size: side of the global crops (official 224; 256 for the 7B recipes; 512/768 high-res).
        local_size: side of the local crops (96; 112 for 7B).
        n_local_crops: number of local crops per image (8).
        global_scale: area fraction range of the global crops (0.32, 1.0).
        local_scale: area fraction range of the local crops (0.05, 0.32).
        ratio: aspect-ratio range (3/4, 4/3).
        gram_teacher_size: side of the Gram-teacher crops (e.g. 2× global), or ``None`` for no Gram crops.
        horizontal_flip_prob: per-crop probability of a left-right flip (0.5; 0 in the 7B configs).
        vertical_flip_prob: per-crop probability of an up-down flip (0 officially; overhead imagery has no "up").
        jitter_prob: probability of the per-band brightness/contrast change (0.8, as ColorJitter).
        brightness: half-width of the brightness offset in normalised units.
        contrast: half-width of the contrast factor range around 1.
        grayscale_prob: probability of grayscale (RGB inputs only) (0.2).
        solarize_prob: probability of solarising global crop 2 (RGB inputs only) (0.2).
        blur_probs: apply-probabilities of Gaussian blur for (global 1, global 2, local), see module docstring.
        blur_sigma: blur sigma range (0.1, 2.0).
        blur_kernel_size: blur kernel side (9).
        min_valid_fraction: minimum share of valid pixels in a crop box before resampling it.
        max_tries: candidate boxes drawn per crop.

    Raises:
        ValueError: on non-positive sizes, empty ranges or probabilities outside [0, 1].
    """

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        n_local_crops: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        gram_teacher_size: int | None = None,
        horizontal_flip_prob: float = 0.5,
        vertical_flip_prob: float = 0.0,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        grayscale_prob: float = 0.2,
        solarize_prob: float = 0.2,
        blur_probs: tuple[float, float, float] = (0.0, 0.9, 0.5),
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        blur_kernel_size: int = 9,
        min_valid_fraction: float = 0.5,
        max_tries: int = 10,
    ) -> None:
        for name, size in (("global_size", global_size), ("local_size", local_size), ("max_tries", max_tries),
                           ("blur_kernel_size", blur_kernel_size)):
            if size < 1:
                raise ValueError(f"MultiCrop: {name} must be >= 1, got {size}.")
        if gram_teacher_size is not None and gram_teacher_size < 1:
            raise ValueError(f"MultiCrop: gram_teacher_size must be >= 1 or None, got {gram_teacher_size}.")
        if n_local_crops < 0:
            raise ValueError(f"MultiCrop: n_local_crops must be >= 0, got {n_local_crops}.")
        for name, (low, high) in (("global_scale", global_scale), ("local_scale", local_scale), ("ratio", ratio),
                                  ("blur_sigma", blur_sigma)):
            if not 0 < low <= high:
                raise ValueError(f"MultiCrop: {name} must be a range 0 < low <= high, got {(low, high)}.")
        probs = {"horizontal_flip_prob": horizontal_flip_prob, "vertical_flip_prob": vertical_flip_prob,
                 "jitter_prob": jitter_prob, "grayscale_prob": grayscale_prob, "solarize_prob": solarize_prob,
                 "min_valid_fraction": min_valid_fraction}
        probs.update({f"blur_probs[{i}]": p for i, p in enumerate(blur_probs)})
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"MultiCrop: {name} must be in [0, 1], got {p}.")
        if len(blur_probs) != 3:
            raise ValueError(f"MultiCrop: blur_probs must be (global 1, global 2, local), got {blur_probs}.")
        self.global_size, self.local_size, self.n_local_crops = global_size, local_size, n_local_crops
        self.global_scale, self.local_scale, self.ratio = tuple(global_scale), tuple(local_scale), tuple(ratio)
        self.gram_teacher_size = gram_teacher_size
        self.horizontal_flip_prob, self.vertical_flip_prob = horizontal_flip_prob, vertical_flip_prob
        self.jitter_prob, self.brightness, self.contrast = jitter_prob, brightness, contrast
        self.grayscale_prob, self.solarize_prob = grayscale_prob, solarize_prob
        self.blur_probs, self.blur_sigma, self.blur_kernel_size = tuple(blur_probs), tuple(blur_sigma), blur_kernel_size
        self.min_valid_fraction, self.max_tries = min_valid_fraction, max_tries

    # ------------------------------------------------------------------------------------------------ geometry

    @staticmethod
    def valid_table(valid: Tensor) -> Tensor:
        """Summed-area table of ``valid`` [B, H, W] bool: [B, H+1, W+1] int32 counts (exact; integer arithmetic)."""
        batch, height, width = valid.shape
        table = torch.zeros(batch, height + 1, width + 1, dtype=torch.int32, device=valid.device)
        table[:, 1:, 1:] = valid.to(torch.int32).cumsum(1).cumsum(2)
        return table

    def sample_boxes(
        self, table: Tensor, n_crops: int, scale: tuple[float, float], generator: torch.Generator | None
    ) -> Tensor:
        """Random-resized-crop boxes that avoid nodata.

        Args:
            table: :meth:`valid_table` of the [B, H, W] validity of the source images.
            n_crops: crops per image.
            scale: area fraction range.
            generator: CPU generator.

        Returns:
            [n_crops·B, 4] float boxes (x0, y0, x1, y1) in pixel-edge coordinates of the source, integer-valued,
            crop-major.
        """
        batch, height, width = table.shape[0], table.shape[1] - 1, table.shape[2] - 1
        n, tries = n_crops * batch, self.max_tries
        image_index = torch.arange(batch).repeat(n_crops)  # [n] crop-major
        area = height * width * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, tries, generator=generator))
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * torch.rand(n, tries, generator=generator))
        w = torch.round(torch.sqrt(area * aspect))  # [n, tries]
        h = torch.round(torch.sqrt(area / aspect))
        legal = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        x0 = torch.floor(torch.rand(n, tries, generator=generator) * (width - w + 1)).clamp_min(0)
        y0 = torch.floor(torch.rand(n, tries, generator=generator) * (height - h + 1)).clamp_min(0)
        w, h = torch.where(legal, w, 1.0), torch.where(legal, h, 1.0)
        x0, y0 = torch.where(legal, x0, 0.0), torch.where(legal, y0, 0.0)

        # valid fraction of every candidate from the summed-area table: O(1) per box. Candidates are drawn on the
        # CPU (one generator) and judged where the table lives, without copying anything back: a device-to-host
        # copy would stall the GPU queue once per crop group.
        device = table.device
        no_fit = ~legal.any(dim=1)  # [n] CPU: decided without looking at the data
        legal, w, h, x0, y0 = (t.to(device, non_blocking=True) for t in (legal, w, h, x0, y0))
        flat = table.flatten()  # [B·(H+1)·(W+1)]
        base = (image_index.to(device, non_blocking=True) * (height + 1) * (width + 1))[:, None]  # [n, 1]

        def corner(y: Tensor, x: Tensor) -> Tensor:
            return flat[base + (y * (width + 1) + x).long()].double()  # [n, tries]

        inside = corner(y0 + h, x0 + w) - corner(y0, x0 + w) - corner(y0 + h, x0) + corner(y0, x0)
        fraction = torch.where(legal, inside / (w * h).double(), -1.0)  # [n, tries]
        accepted = legal & (fraction >= self.min_valid_fraction)
        first_accepted = torch.argmax(accepted.to(torch.int8), dim=1)  # first True, or 0 if none
        most_valid = torch.argmax(fraction, dim=1)
        choice = torch.where(accepted.any(dim=1), first_accepted, most_valid)[:, None]  # [n, 1]
        boxes = torch.cat([x0.gather(1, choice), y0.gather(1, choice), (x0 + w).gather(1, choice),
                           (y0 + h).gather(1, choice)], dim=1)  # [n, 4]

        # torchvision's fallback when no candidate fits the image: the largest centred box within the ratio range
        if bool(no_fit.any()):
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                fw, fh = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                fw, fh = round(height * self.ratio[1]), height
            else:
                fw, fh = width, height
            fx0, fy0 = (width - fw) // 2, (height - fh) // 2
            fallback = torch.tensor([fx0, fy0, fx0 + fw, fy0 + fh], dtype=boxes.dtype)
            boxes = torch.where(no_fit.to(device, non_blocking=True)[:, None], fallback.to(device, non_blocking=True),
                                boxes)
        return boxes

    @staticmethod
    def render(images: Tensor, boxes: Tensor, n_crops: int, size: int) -> Tensor:
        """Resample each box of each image to ``size × size``.

        Args:
            images: [B, C, H, W] float images.
            boxes: [n_crops·B, 4] (x0, y0, x1, y1) pixel-edge boxes, crop-major.
            n_crops: crops per image.
            size: output side.

        Returns:
            [n_crops·B, C, size, size].
        """
        batch = images.shape[0]
        image_index = torch.arange(batch, dtype=boxes.dtype, device=boxes.device).repeat(n_crops)[:, None]  # [n, 1]
        rois = torch.cat([image_index, boxes], dim=1).to(images.device, images.dtype)  # [n, 5]
        # aligned=True: pixel i spans [i, i+1], so box edges are exact pixel edges;
        # sampling_ratio=-1: ceil(box/size) samples per output pixel = area averaging when shrinking
        return roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    # ------------------------------------------------------------------------------------------------ photometry

    def _bernoulli(self, n: int, p: float, generator: torch.Generator | None) -> Tensor:
        return torch.rand(n, generator=generator) < p

    def _photometric(
        self, crops: Tensor, valid: Tensor, blur_prob: Tensor, solarize: bool, generator: torch.Generator | None
    ) -> Tensor:
        """Per-band brightness/contrast, RGB grayscale, blur and (for ``solarize``) RGB solarisation.

        Args:
            crops: [n, C, s, s]; valid: [n, s, s] bool; blur_prob: [n] apply-probabilities.
        """
        n, channels = crops.shape[:2]
        device = crops.device
        weight = valid[:, None].to(crops.dtype)  # [n, 1, s, s]
        band_mean = (crops * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1.0)  # [n, C]
        jitter = self._bernoulli(n, self.jitter_prob, generator)[:, None]  # [n, 1]
        contrast = 1.0 + self.contrast * (2 * torch.rand(n, channels, generator=generator) - 1)
        offset = self.brightness * (2 * torch.rand(n, channels, generator=generator) - 1)
        # every random decision stays on the CPU and travels host-to-device without a sync (non_blocking)
        contrast = torch.where(jitter, contrast, 1.0).to(device, crops.dtype, non_blocking=True)[..., None, None]
        offset = torch.where(jitter, offset, 0.0).to(device, crops.dtype, non_blocking=True)[..., None, None]
        mean = band_mean[..., None, None]
        crops = (crops - mean) * contrast + mean + offset

        is_rgb = channels == 3
        gray = self._bernoulli(n, self.grayscale_prob, generator)  # [n] CPU
        if is_rgb and bool(gray.any()):
            luma = torch.tensor(_LUMA_WEIGHTS, dtype=crops.dtype).to(device, non_blocking=True)
            grey = (crops * luma[:, None, None]).sum(1, keepdim=True).expand_as(crops)  # [n, 3, s, s]
            crops = torch.where(gray.to(device, non_blocking=True)[:, None, None, None], grey, crops)

        blur = torch.rand(n, generator=generator) < blur_prob  # [n] CPU
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * torch.rand(n, generator=generator)
        if bool(blur.any()):
            selected = blur.nonzero().flatten()  # CPU indices
            sig = sigma[selected][:, None].expand(-1, 2).to(device, crops.dtype, non_blocking=True)  # [m, 2] y = x
            index = selected.to(device, non_blocking=True)
            k = self.blur_kernel_size
            crops = crops.index_copy(0, index, gaussian_blur2d(crops.index_select(0, index), (k, k), sig))

        solar = self._bernoulli(n, self.solarize_prob if solarize else 0.0, generator)  # [n] CPU
        if is_rgb and bool(solar.any()):
            solar = solar.to(device, non_blocking=True)
            crops = torch.where(solar[:, None, None, None] & (crops >= 0), -crops, crops)
        return crops * valid[:, None].to(crops.dtype)

    def _flip(self, crops: Tensor, flips: Tensor) -> Tensor:
        """Apply per-crop flips; flips [n, 2] bool (horizontal, vertical) on the CPU."""
        flips = flips.to(crops.device, non_blocking=True)
        out = torch.where(flips[:, 0].view(-1, *[1] * (crops.ndim - 1)), crops.flip(-1), crops)
        return torch.where(flips[:, 1].view(-1, *[1] * (crops.ndim - 1)), out.flip(-2), out)

    # ------------------------------------------------------------------------------------------------ entry point

    def __call__(
        self, images: Tensor, valid: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Build the crops of one batch.

        Args:
            images: [B, C, H, W] normalised float images (invalid pixels 0), on any device.
            valid: [B, H, W] bool validity, or ``None`` for all valid.
            generator: CPU ``torch.Generator`` for every random draw (``None``: torch's global generator).

        Returns:
            ``global_crops`` [2B, C, G, G]; ``local_crops`` [N·B, C, L, L]; ``global_boxes`` [2B, 4] and
            ``local_boxes`` [N·B, 4] (x0, y0, x1, y1 pixel edges of the source, before flipping);
            ``global_flips`` [2B, 2] / ``local_flips`` [N·B, 2] bool (horizontal, vertical);
            ``global_valid`` [2B, G, G] / ``local_valid`` [N·B, L, L] bool; with ``gram_teacher_size`` also
            ``gram_crops`` [2B, C, T, T] (same boxes and flips as the global crops, no photometric change) and
            ``gram_valid`` [2B, T, T]. Boxes and crops are on the input's device, flips on the CPU.

        Raises:
            ValueError: on badly shaped ``images``/``valid``.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"MultiCrop: images must be a float [B, C, H, W] tensor, got {images.dtype} "
                             f"{tuple(images.shape)}.")
        batch, _, height, width = images.shape
        if valid is None:
            valid = torch.ones(batch, height, width, dtype=torch.bool, device=images.device)
        if valid.shape != (batch, height, width):
            raise ValueError(f"MultiCrop: valid must be [B, H, W] = {(batch, height, width)}, got {tuple(valid.shape)}.")
        table = self.valid_table(valid)
        # on the CPU a fully valid batch skips rendering the masks; on a GPU the check would cost a sync that the
        # (cheap) mask rendering does not
        all_valid = images.device.type == "cpu" and bool(table[:, -1, -1].eq(height * width).all())
        valid_float = valid[:, None].to(images.dtype)  # [B, 1, H, W]

        def render_valid(boxes: Tensor, n_crops: int, size: int) -> Tensor:
            if all_valid:
                return torch.ones(n_crops * batch, size, size, dtype=torch.bool, device=images.device)
            return self.render(valid_float, boxes, n_crops, size)[:, 0] >= 0.5

        out: dict[str, Tensor] = {}

        n_global = 2
        global_boxes = self.sample_boxes(table, n_global, self.global_scale, generator)
        global_flips = torch.stack([self._bernoulli(n_global * batch, self.horizontal_flip_prob, generator),
                                    self._bernoulli(n_global * batch, self.vertical_flip_prob, generator)], dim=1)
        global_valid = render_valid(global_boxes, n_global, self.global_size)
        global_crops = self.render(images, global_boxes, n_global, self.global_size)
        blur_prob = torch.tensor(self.blur_probs[:2]).repeat_interleave(batch)  # [2B]: crop 1 rows, then crop 2
        crops_1 = self._photometric(global_crops[:batch], global_valid[:batch], blur_prob[:batch], False, generator)
        crops_2 = self._photometric(global_crops[batch:], global_valid[batch:], blur_prob[batch:], True, generator)
        out["global_crops"] = self._flip(torch.cat([crops_1, crops_2]), global_flips)
        out["global_valid"] = self._flip(global_valid, global_flips)
        out["global_boxes"], out["global_flips"] = global_boxes, global_flips

        if self.gram_teacher_size is not None:
            gram_valid = render_valid(global_boxes, n_global, self.gram_teacher_size)
            gram = self.render(images, global_boxes, n_global, self.gram_teacher_size) * gram_valid[:, None]
            out["gram_crops"] = self._flip(gram, global_flips)
            out["gram_valid"] = self._flip(gram_valid, global_flips)

        n_local = self.n_local_crops
        local_boxes = self.sample_boxes(table, n_local, self.local_scale, generator)
        local_flips = torch.stack([self._bernoulli(n_local * batch, self.horizontal_flip_prob, generator),
                                   self._bernoulli(n_local * batch, self.vertical_flip_prob, generator)], dim=1)
        if n_local:
            local_valid = render_valid(local_boxes, n_local, self.local_size)
            local = self.render(images, local_boxes, n_local, self.local_size)
            local = self._photometric(local, local_valid, torch.full((n_local * batch,), self.blur_probs[2]), False,
                                      generator)
        else:
            local_valid = torch.zeros(0, self.local_size, self.local_size, dtype=torch.bool, device=images.device)
            local = images.new_zeros(0, images.shape[1], self.local_size, self.local_size)
        out["local_crops"] = self._flip(local, local_flips)
        out["local_valid"] = self._flip(local_valid, local_flips)
        out["local_boxes"], out["local_flips"] = local_boxes, local_flips
        return out
