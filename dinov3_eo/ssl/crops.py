"""Batched multi-crop augmentation for DINOv3 on normalised images of any band count (runs on GPU).

All crops are rendered directly from the source images with ``torchvision.ops.roi_align`` (one kernel call per
crop set, area-averaging when shrinking so small crops are not aliased), so the same box can be rendered at two
resolutions: the student's global crop and the Gram teacher's higher-resolution crop cover exactly the same
ground. All random numbers come from one explicit CPU ``torch.Generator`` (device-independent reproducibility).

On a GPU the crops are a few dozen kernel launches and never wait for the device: every random decision (boxes,
flips, the photometric parameters, the blur kernels) is drawn on the host first and travels in one pinned copy
(:func:`host_to_device`); brightness, contrast and grayscale are one affine map per crop (:func:`apply_photometry`);
flips are one gather per axis (:func:`apply_flips`); and a batch without nodata (``valid=None``) renders no masks.

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
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from kornia.filters import get_gaussian_kernel1d
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

    def draw_boxes(
        self, n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``max_tries`` random-resized-crop candidates for each of ``n`` crops, drawn on the CPU.

        Returns:
            (candidates, legal): [n, tries, 4] float boxes (x0, y0, x1, y1) in pixel-edge coordinates, integer-valued,
            and [n, tries] bool. Illegal candidates are 1-pixel boxes at the origin (safe to look up). A crop with no
            legal candidate gets torchvision's fallback as its first candidate, marked legal: the largest centred box
            within the ratio range.
        """
        tries = self.max_tries
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
        candidates = torch.stack([x0, y0, x0 + w, y0 + h], dim=-1)  # [n, tries, 4]
        no_fit = ~legal.any(dim=1)
        if bool(no_fit.any()):
            in_ratio = width / height
            if in_ratio < self.ratio[0]:
                fw, fh = width, round(width / self.ratio[0])
            elif in_ratio > self.ratio[1]:
                fw, fh = round(height * self.ratio[1]), height
            else:
                fw, fh = width, height
            fx0, fy0 = (width - fw) // 2, (height - fh) // 2
            candidates[no_fit, 0] = torch.tensor([fx0, fy0, fx0 + fw, fy0 + fh], dtype=candidates.dtype)
            legal[no_fit, 0] = True
        return candidates, legal

    def choose_boxes(self, candidates: Tensor, legal: Tensor, table: Tensor | None) -> Tensor:
        """The first legal candidate with at least ``min_valid_fraction`` valid pixels, else the most valid one.

        Args:
            candidates: [n_crops·B, tries, 4] boxes and legal [n_crops·B, tries] from :meth:`draw_boxes`, crop-major.
            table: :meth:`valid_table` of the source images (on their device), or ``None`` when every pixel is
                valid: then the first legal candidate, chosen where ``candidates`` are.

        Returns:
            [n_crops·B, 4] boxes, on ``candidates``' device.
        """
        if table is None:
            first = torch.argmax(legal.to(torch.int8), dim=1)  # first True (every row has one, see draw_boxes)
            return candidates[torch.arange(len(candidates), device=candidates.device), first]
        # valid fraction of every candidate from the summed-area table: O(1) per box, decided where the table lives
        # without a device-to-host copy (that would stall the GPU queue once per crop set)
        batch, height, width = table.shape[0], table.shape[1] - 1, table.shape[2] - 1
        n = candidates.shape[0]
        image_index = torch.arange(n, device=table.device) % batch  # crop-major: row k·B + b is image b
        base = (image_index * (height + 1) * (width + 1))[:, None]  # [n, 1]
        flat = table.flatten()
        x0, y0, x1, y1 = candidates.long().unbind(-1)  # [n, tries] each
        row0, row1 = base + y0 * (width + 1), base + y1 * (width + 1)  # flat offsets of the top and bottom edges
        inside = (flat[row1 + x1] - flat[row0 + x1] - flat[row1 + x0] + flat[row0 + x0]).double()  # valid pixels
        fraction = torch.where(legal, inside / ((x1 - x0) * (y1 - y0)).double(), -1.0)  # [n, tries]
        accepted = legal & (fraction >= self.min_valid_fraction)
        first_accepted = torch.argmax(accepted.to(torch.int8), dim=1)  # first True, or 0 if none
        most_valid = torch.argmax(fraction, dim=1)
        choice = torch.where(accepted.any(dim=1), first_accepted, most_valid)
        return candidates[torch.arange(n, device=candidates.device), choice]

    @staticmethod
    def rois(boxes: Tensor, n_crops: int) -> Tensor:
        """``roi_align`` boxes [n_crops·B, 5] (image index, x0, y0, x1, y1) from crop-major boxes [n_crops·B, 4]."""
        batch = boxes.shape[0] // max(n_crops, 1)
        image_index = torch.arange(batch, dtype=boxes.dtype, device=boxes.device).repeat(n_crops)[:, None]  # [n, 1]
        return torch.cat([image_index, boxes], dim=1)

    @staticmethod
    def render(images: Tensor, boxes: Tensor, n_crops: int, size: int) -> Tensor:
        """Resample each box of each image to ``size × size``.

        Args:
            images: [B, C, H, W] float images.
            boxes: [n_crops·B, 4] (x0, y0, x1, y1) pixel-edge boxes, crop-major, or [n_crops·B, 5] :meth:`rois`.
            n_crops: crops per image.
            size: output side.

        Returns:
            [n_crops·B, C, size, size].
        """
        rois = boxes if boxes.shape[-1] == 5 else MultiCrop.rois(boxes, n_crops)
        # aligned=True: pixel i spans [i, i+1], so box edges are exact pixel edges;
        # sampling_ratio=-1: ceil(box/size) samples per output pixel = area averaging when shrinking
        return roi_align(images, rois.to(images.device, images.dtype), output_size=(size, size), spatial_scale=1.0,
                         sampling_ratio=-1, aligned=True)

    # ------------------------------------------------------------------------------------------------ photometry

    def draw_photometry(
        self, n: int, channels: int, blur_prob: Tensor, solarize_prob: Tensor, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """Every photometric decision for ``n`` crops, drawn on the CPU and folded into the parameters of
        :func:`apply_photometry` (see there for the meaning of each key).

        Args:
            n: crops; channels: bands; blur_prob, solarize_prob: [n] per-crop apply-probabilities.
        """
        jitter = (torch.rand(n, generator=generator) < self.jitter_prob)[:, None]  # [n, 1]
        contrast = 1.0 + self.contrast * (2 * torch.rand(n, channels, generator=generator) - 1)
        offset = self.brightness * (2 * torch.rand(n, channels, generator=generator) - 1)
        gain = torch.where(jitter, contrast, 1.0)  # [n, C]
        shift = torch.where(jitter, offset, 0.0)
        gray = torch.rand(n, generator=generator) < self.grayscale_prob  # [n]
        blur = torch.rand(n, generator=generator) < blur_prob
        sigma = self.blur_sigma[0] + (self.blur_sigma[1] - self.blur_sigma[0]) * torch.rand(n, generator=generator)
        solar = torch.rand(n, generator=generator) < solarize_prob
        # per band: y = gain·x + (1 − gain)·mean + shift
        params = {"gain": gain, "mean_gain": 1.0 - gain, "shift": shift}
        if channels == 3 and bool(gray.any()):
            # the grey crops alone (a fifth), after their jitter as in the official order
            params |= {"grey_index": gray.nonzero().flatten(), "grey_weights": torch.tensor(_LUMA_WEIGHTS)}
        if bool(blur.any()):
            params["blur_index"] = blur.nonzero().flatten()
            params["blur_kernel"] = get_gaussian_kernel1d(self.blur_kernel_size, sigma[blur][:, None])  # [m, k]
        if channels == 3 and bool(solar.any()):
            params["solarize_gain"] = -2.0 * solar.to(torch.float32)  # x − 2·max(x, 0) = −x above 0, x below
        return params

    # ------------------------------------------------------------------------------------------------ entry point

    def __call__(
        self, images: Tensor, valid: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Build the crops of one batch.

        Args:
            images: [B, C, H, W] normalised float images (invalid pixels 0), on any device.
            valid: [B, H, W] bool validity, or ``None`` for all valid (the fast path: no validity masks are
                rendered; a caller that can tell on the host, as :class:`~dinov3_eo.ssl.stage.SSLStage` does
                before a batch goes to the GPU, should pass ``None``).
            generator: CPU ``torch.Generator`` for every random draw (``None``: torch's global generator).

        Returns:
            ``global_crops`` [2B, C, G, G]; ``local_crops`` [N·B, C, L, L]; ``global_boxes`` [2B, 4] and
            ``local_boxes`` [N·B, 4] (x0, y0, x1, y1 pixel edges of the source, before flipping);
            ``global_flips`` [2B, 2] / ``local_flips`` [N·B, 2] bool (horizontal, vertical);
            ``global_valid`` [2B, G, G] / ``local_valid`` [N·B, L, L] bool (an expanded view of one ``True`` when
            ``valid`` is ``None``); with ``gram_teacher_size`` also ``gram_crops`` [2B, C, T, T] (same boxes and
            flips as the global crops, no photometric change) and ``gram_valid`` [2B, T, T]. Boxes and crops are on
            the input's device, flips on the CPU.

        Raises:
            ValueError: on badly shaped ``images``/``valid``.
        """
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f"MultiCrop: images must be a float [B, C, H, W] tensor, got {images.dtype} "
                             f"{tuple(images.shape)}.")
        batch, channels, height, width = images.shape
        device = images.device
        if valid is not None and valid.shape != (batch, height, width):
            raise ValueError(f"MultiCrop: valid must be [B, H, W] = {(batch, height, width)}, got {tuple(valid.shape)}.")
        if valid is not None and device.type == "cpu" and bool(valid.all()):
            valid = None  # free to check on the CPU; on a GPU it would cost a sync that the masks do not
        sizes = {"global": self.global_size, "local": self.local_size}
        counts = {"global": 2, "local": self.n_local_crops}

        # 1. every random decision, on the CPU, in a fixed order
        host: dict[str, Tensor] = {}
        flips: dict[str, Tensor] = {}
        for kind in ("global", "local"):
            n = counts[kind] * batch
            scale = self.global_scale if kind == "global" else self.local_scale
            candidates, legal = self.draw_boxes(n, height, width, scale, generator)
            if valid is None:
                host[f"{kind}/rois"] = self.rois(self.choose_boxes(candidates, legal, None), counts[kind])
            else:
                host[f"{kind}/candidates"], host[f"{kind}/legal"] = candidates, legal
            flips[kind] = torch.stack([torch.rand(n, generator=generator) < self.horizontal_flip_prob,
                                       torch.rand(n, generator=generator) < self.vertical_flip_prob], dim=1)
            gram_size = [self.gram_teacher_size] if kind == "global" and self.gram_teacher_size else []
            for size in [sizes[kind], *gram_size]:
                host |= {f"{kind}/flip{size}/{axis}": index for axis, index in flip_indices(flips[kind], size).items()}
            if kind == "global":  # crop 1 rows, then crop 2 rows; only crop 2 is ever solarised
                blur_prob = torch.tensor(self.blur_probs[:2]).repeat_interleave(batch)
                solarize_prob = torch.tensor([0.0, self.solarize_prob]).repeat_interleave(batch)
            else:
                blur_prob, solarize_prob = torch.full((n,), self.blur_probs[2]), torch.zeros(n)
            if n:
                photometry = self.draw_photometry(n, channels, blur_prob, solarize_prob, generator)
                host |= {f"{kind}/photometry/{key}": value for key, value in photometry.items()}

        # 2. one host-to-device copy for all of them
        params = host_to_device(host, device)

        # 3. the pixels, on the images' device
        table = None if valid is None else self.valid_table(valid)
        valid_float = None if valid is None else valid[:, None].to(images.dtype)  # [B, 1, H, W]
        true = torch.ones((), dtype=torch.bool, device=device) if valid is None else None
        out: dict[str, Tensor] = {}

        def rendered(rois: Tensor, n_crops: int, size: int) -> dict[str, Tensor]:
            """The crops at ``size`` and, where the batch has nodata, their validity."""
            views = {"crops": self.render(images, rois, n_crops, size)}
            if valid_float is not None:
                views["valid"] = self.render(valid_float, rois, n_crops, size)[:, 0] >= 0.5
            return views

        def emit(name: str, views: dict[str, Tensor], kind: str, size: int) -> None:
            """Flip ``views`` as ``kind``'s crops flip and store them as ``{name}_crops``/``{name}_valid``."""
            for key, view in views.items():
                out[f"{name}_{key}"] = apply_flips(view, params.get(f"{kind}/flip{size}/x"),
                                                   params.get(f"{kind}/flip{size}/y"))
            if valid is None:
                out[f"{name}_valid"] = true.expand(views["crops"].shape[0], size, size)

        for kind in ("global", "local"):
            n_crops, size = counts[kind], sizes[kind]
            if valid is None:
                rois = params[f"{kind}/rois"]
            else:
                boxes = self.choose_boxes(params[f"{kind}/candidates"], params[f"{kind}/legal"], table)
                rois = self.rois(boxes, n_crops)
            out[f"{kind}_boxes"], out[f"{kind}_flips"] = rois[:, 1:], flips[kind]
            if not n_crops * batch:
                out[f"{kind}_crops"] = images.new_zeros(0, channels, size, size)
                out[f"{kind}_valid"] = torch.zeros(0, size, size, dtype=torch.bool, device=device)
                continue
            views = rendered(rois, n_crops, size)
            prefix = f"{kind}/photometry/"
            photometry = {key[len(prefix):]: value for key, value in params.items() if key.startswith(prefix)}
            views["crops"] = apply_photometry(views["crops"], views.get("valid"), photometry)
            emit(kind, views, kind, size)
            if kind == "global" and self.gram_teacher_size is not None:
                gram = rendered(rois, n_crops, self.gram_teacher_size)  # no photometric change
                if "valid" in gram:
                    gram["crops"] = gram["crops"] * gram["valid"][:, None]
                emit("gram", gram, kind, self.gram_teacher_size)
        return out


def flip_indices(flips: Tensor, size: int) -> dict[str, Tensor]:
    """Gather indices that flip each crop: ``x`` [n, size] (columns) when any crop flips left-right, ``y`` [n, size]
    (rows) when any flips up-down; an axis no crop flips is absent (no work for it). ``flips`` [n, 2] bool."""
    forward = torch.arange(size)
    indices = {}
    for column, axis in ((0, "x"), (1, "y")):
        if bool(flips[:, column].any()):
            indices[axis] = torch.where(flips[:, column, None], size - 1 - forward, forward)
    return indices


def apply_flips(view: Tensor, columns: Tensor | None, rows: Tensor | None) -> Tensor:
    """Flip each crop of ``view`` [n, ..., s, s] along the axes :func:`flip_indices` gave: one gather per axis."""
    n, size = view.shape[0], view.shape[-1]
    ones = [1] * (view.ndim - 2)
    if columns is not None:
        view = view.gather(-1, columns.long().view(n, *ones, size).expand_as(view))
    if rows is not None:
        view = view.gather(-2, rows.long().view(n, *ones[:-1], size, 1).expand_as(view))
    return view


def apply_photometry(crops: Tensor, valid: Tensor | None, params: dict[str, Tensor]) -> Tensor:
    """Brightness/contrast per band, RGB grayscale, blur and RGB solarisation, as :meth:`MultiCrop.draw_photometry`
    decided them.

    Brightness and contrast are one affine map per crop and band: ``gain``/``mean_gain``/``shift`` [n, C]
    (``y = gain·x + mean_gain·mean + shift``, ``mean`` the crop's valid-pixel band mean). The crops at
    ``grey_index`` [g] (RGB only) then become their luma, ``grey_weights`` [3] · bands, in all three bands: only
    those crops are read again (mixing every crop's bands as a batched 3×3 product, as before, cost an H100 0.9 ms
    a ViT-S step at batch 128, and TF32 rounding). Then the crops at ``blur_index`` [m] are blurred with their
    ``blur_kernel`` [m, k] (separable, reflect border), ``solarize_gain`` [n] (−2 or 0) solarises, and invalid
    pixels are set to 0.

    Args:
        crops: [n, C, s, s]; valid: [n, s, s] bool or ``None`` (all valid).

    Returns:
        [n, C, s, s], a new tensor.
    """
    if valid is None:
        mean = crops.mean(dim=(2, 3))  # [n, C]
    else:
        weight = valid[:, None].to(crops.dtype)  # [n, 1, s, s]
        mean = (crops * weight).sum((2, 3)) / weight.sum((2, 3)).clamp_min(1.0)
    bias = torch.addcmul(params["shift"], params["mean_gain"], mean)  # [n, C]
    crops = torch.addcmul(bias[..., None, None], crops, params["gain"][..., None, None])
    if "grey_index" in params:
        index = params["grey_index"].long()
        weights = params["grey_weights"].to(crops.dtype)[:, None, None]  # [3, 1, 1]
        luma = (crops.index_select(0, index) * weights).sum(dim=1, keepdim=True)  # [g, 1, s, s]
        crops.index_copy_(0, index, luma.expand(-1, crops.shape[1], -1, -1))
    if "blur_index" in params:
        index, kernel = params["blur_index"].long(), params["blur_kernel"]
        crops.index_copy_(0, index, separable_blur(crops.index_select(0, index), kernel))
    if "solarize_gain" in params:
        crops = torch.addcmul(crops, crops.clamp_min(0.0), params["solarize_gain"][:, None, None, None])
    if valid is not None:
        crops = crops * valid[:, None].to(crops.dtype)
    return crops


def separable_blur(crops: Tensor, kernel: Tensor) -> Tensor:
    """Each crop blurred by its own separable kernel, reflect border: ``crops`` [m, C, s, s], ``kernel`` [m, k]
    (odd ``k``) -> [m, C, s, s].

    One reflect pad of both axes, then a row pass and a column pass as grouped convolutions (one group per crop
    and band): the values of kornia's ``filter2d_separable(..., "reflect")``, which pads before each pass, with two
    fewer launches and none of its per-call checks (host time a GPU step waits on).
    """
    m, channels, height, width = crops.shape
    k = kernel.shape[-1]
    weights = kernel.to(crops.dtype).repeat_interleave(channels, dim=0)  # [m·C, k]
    padded = F.pad(crops.reshape(1, m * channels, height, width), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
    rows = F.conv2d(padded, weights[:, None, None, :], groups=m * channels)  # [1, m·C, s + k - 1, s]
    return F.conv2d(rows, weights[:, None, :, None], groups=m * channels).reshape(m, channels, height, width)


def travels_exactly_as_float32(t: Tensor) -> bool:
    """Whether ``t`` survives a float32 round trip exactly: bool, float32, and integers within ±2**24."""
    if t.dtype in (torch.bool, torch.float32) or t.numel() == 0:
        return True
    if t.dtype.is_floating_point or t.is_complex():
        return False
    return bool(t.abs().max() < 2**24)


def pack_host_tensors(tensors: Mapping[str, Tensor]) -> Tensor:
    """Flatten small CPU tensors into one float32 vector (exact for what :func:`travels_exactly_as_float32`)."""
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors.values()])


def unpack_host_tensors(flat: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Undo :func:`pack_host_tensors` where ``flat`` now is: each tensor back in its shape and dtype."""
    out, start = {}, 0
    for key, t in like.items():
        part = flat[start : start + t.numel()].view(t.shape)
        start += t.numel()
        out[key] = part > 0.5 if t.dtype == torch.bool else part.to(t.dtype)
    return out


def host_to_device(tensors: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """Move small CPU tensors to ``device`` in one copy (pinned and non-blocking on CUDA) instead of one copy each.

    A copy from pageable memory may wait for the device's queue, and each one costs a launch. A tensor that float32
    cannot carry exactly (float64, integers beyond 2**24) travels on its own. On the CPU the tensors are returned as
    they are.
    """
    if device.type == "cpu" or not tensors:
        return dict(tensors)
    packed = {key: t for key, t in tensors.items() if travels_exactly_as_float32(t)}
    out = {key: t.to(device, non_blocking=True) for key, t in tensors.items() if key not in packed}
    if packed:
        flat = pack_host_tensors(packed)
        if device.type == "cuda":
            flat = flat.pin_memory()
        out |= unpack_host_tensors(flat.to(device, non_blocking=True), packed)
    return {key: out[key] for key in tensors}
