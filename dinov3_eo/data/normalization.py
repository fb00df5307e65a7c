"""Per-band normalisation that travels with every checkpoint.

The most common silent failure in this field is running a model on data normalised differently
from its training data. A :class:`Normalization` is therefore a small serialisable value: the
datasets apply it, the training checkpoints store it (``to_dict``) and inference rebuilds it
(``from_dict``) instead of guessing.

The transform is, per band ``c`` and on raw pixel values ``x`` (after any DN scale/offset):

    y = (x - low[c]) / (high[c] - low[c])   if low/high are set (values clipped to [low, high] first)
    z = (y - mean[c]) / std[c]

so ``percentile`` normalisation is ``low/high`` = band percentiles with ``mean=0, std=1``; ``zscore`` is
``mean/std`` of the raw values; the RGB presets are ``low=0, high=255`` (uint8) followed by the
published mean/std on [0, 1] RGB.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: Published RGB statistics on [0, 1] inputs.
RGB_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # ImageNet / LVD-1689M web backbones
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # SAT-493M backbones (DINOv3 README)
    "sat493m": ((0.430, 0.411, 0.296), (0.213, 0.156, 0.143)),
    # CHMv2 head: the value inherited from HighResCanopyHeight, needed to reproduce its maps
    "chmv2": ((0.420, 0.411, 0.296), (0.213, 0.156, 0.143)),
}


@dataclass(frozen=True)
class Normalization:
    """Per-band affine normalisation, optionally after a clip-and-scale to [0, 1].

    Args:
        mean: per-band mean subtracted last (after the optional clip-and-scale).
        std: per-band standard deviation divided last.
        low: per-band lower clip value in raw units, or ``None`` for no clip-and-scale.
        high: per-band upper clip value in raw units (required with ``low``).
        name: a label for logs and metadata (``"sat493m"``, ``"zscore"``, ...).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None
    name: str = "custom"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != len(self.std):
            raise ValueError(f"Normalization: mean has {len(self.mean)} bands but std has {len(self.std)}.")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalization: every std must be > 0, got {self.std}.")
        if (self.low is None) != (self.high is None):
            raise ValueError("Normalization: give both low and high, or neither.")
        if self.low is not None and self.high is not None:
            object.__setattr__(self, "low", tuple(float(v) for v in self.low))
            object.__setattr__(self, "high", tuple(float(v) for v in self.high))
            if not len(self.low) == len(self.high) == len(self.mean):
                raise ValueError(
                    f"Normalization: low/high/mean band counts differ ({len(self.low)}, {len(self.high)}, {len(self.mean)})."
                )
            if any(h <= lo for lo, h in zip(self.low, self.high)):
                raise ValueError(f"Normalization: high must exceed low for every band (low={self.low}, high={self.high}).")

    @property
    def num_bands(self) -> int:
        return len(self.mean)

    @classmethod
    def preset(cls, name: str, *, low: float = 0.0, high: float = 255.0) -> Normalization:
        """A published RGB preset (``imagenet``, ``sat493m``, ``chmv2``) for raw values in ``[low, high]``."""
        if name not in RGB_PRESETS:
            raise ValueError(f"Unknown normalisation preset {name!r}; choose one of {sorted(RGB_PRESETS)}.")
        mean, std = RGB_PRESETS[name]
        return cls(mean=mean, std=std, low=(low,) * 3, high=(high,) * 3, name=name)

    @classmethod
    def zscore(cls, mean: Sequence[float], std: Sequence[float]) -> Normalization:
        """Z-score on raw values from per-band statistics."""
        return cls(mean=tuple(mean), std=tuple(max(float(s), 1e-6) for s in std), name="zscore")

    @classmethod
    def percentile(cls, low: Sequence[float], high: Sequence[float]) -> Normalization:
        """Clip each band to its [low, high] percentiles and scale to [0, 1]."""
        n = len(low)
        return cls(mean=(0.0,) * n, std=(1.0,) * n, low=tuple(low), high=tuple(high), name="percentile")

    def __call__(self, image: Tensor) -> Tensor:
        """Normalise ``image`` of shape (C, H, W) or (B, C, H, W); returns float32 of the same shape."""
        channel_dim = image.ndim - 3
        if image.ndim not in (3, 4) or image.shape[channel_dim] != self.num_bands:
            raise ValueError(
                f"Normalization {self.name!r} expects {self.num_bands} bands in (C,H,W) or (B,C,H,W), "
                f"got shape {tuple(image.shape)}."
            )
        shape = (-1, 1, 1)
        x = image.to(torch.float32)
        if self.low is not None and self.high is not None:
            low = torch.tensor(self.low, dtype=x.dtype, device=x.device).view(shape)
            high = torch.tensor(self.high, dtype=x.dtype, device=x.device).view(shape)
            x = (torch.minimum(torch.maximum(x, low), high) - low) / (high - low)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(shape)
        return (x - mean) / std

    def after_affine(self, scale: Sequence[float], offset: Sequence[float]) -> Normalization:
        """This normalisation of ``scale * x + offset`` (per band, every scale > 0) as one normalisation of ``x``.

        Exact, clip included: ``clip(g x + o, L, H) = g clip(x, (L - o) / g, (H - o) / g) + o``, so the clip bounds
        move and the rest is unchanged; without a clip the mean becomes ``(m - o) / g`` and the std ``s / g``. Used
        to carry a radiometric correction of one image (e.g. the later of two dates) into its normalisation.

        Raises:
            ValueError: for another band count or a scale that is not positive.
        """
        g, o = np.asarray(scale, dtype=np.float64), np.asarray(offset, dtype=np.float64)
        if g.shape != (self.num_bands,) or o.shape != (self.num_bands,):
            raise ValueError(f"after_affine: {self.num_bands} scales and offsets expected, got {g.shape} and {o.shape}.")
        if not (g > 0).all():
            raise ValueError(f"after_affine: every scale must be > 0, got {g.tolist()}.")
        if self.low is not None and self.high is not None:
            low = (np.asarray(self.low) - o) / g
            high = (np.asarray(self.high) - o) / g
            return Normalization(mean=self.mean, std=self.std, low=tuple(low), high=tuple(high), name=self.name)
        mean = (np.asarray(self.mean) - o) / g
        std = np.asarray(self.std) / g
        return Normalization(mean=tuple(mean), std=tuple(std), name=self.name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description (stored in checkpoints and metadata sidecars)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalization:
        """Inverse of :meth:`to_dict`; a missing field is an error, never a silent default."""
        missing = {"mean", "std"} - set(d)
        if missing:
            raise KeyError(f"Normalization metadata lacks {sorted(missing)} (got keys {sorted(d)}).")
        return cls(
            mean=tuple(d["mean"]),
            std=tuple(d["std"]),
            low=None if d.get("low") is None else tuple(d["low"]),
            high=None if d.get("high") is None else tuple(d["high"]),
            name=d.get("name", "custom"),
        )
