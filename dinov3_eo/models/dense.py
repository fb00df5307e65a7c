"""Dense prediction on DINOv3 features: linear and DPT heads, height bins, and a backbone + head wrapper.

Every head takes what ``backbone.get_intermediate_layers(x, n=layers, reshape=True, return_class_token=True)``
returns: one ``(patch [B, D, h, w], cls [B, D])`` pair per selected block (a bare patch map is accepted too when
the head does not read the class token), and returns logits ``[B, K, h', w']``.

* :class:`LinearHead` is the official linear protocol (segmentation and linear depth probes): Dropout2d(0.1),
  BatchNorm, a 1x1 convolution initialised N(0, 0.01), bilinear upsampling. Given several layers it resizes them
  to the first layer's grid and concatenates them (the "multi-layer linear" head), optionally with the class token
  broadcast over the grid. Its state-dict keys are those of the official depth-eval ``LinearHead``
  (``batchnorm_layer.*``, ``conv.*``).
* :class:`DPTHead` is the DPT decoder of the official depth evaluation; :func:`chmv2_head` builds it in the
  configuration of Meta's CHMv2 canopy-height head, whose released checkpoint (68 keys, 33.7 M parameters on a
  ViT-L) loads into it strictly.
* :func:`height_bins` / :func:`bins_to_metres` / :class:`LogitsToHeight` turn bin logits into metres
  (CHMv2 "mixlog" bins, or linear/log bins, or direct regression for one output channel).
* :class:`DenseModel` ties a backbone to a head: centre-pads the input to a size the head can map back exactly,
  runs the (frozen by default) backbone once, the head, the optional output conversion, and crops to the input
  size, so ``[B, C, H, W] -> [B, K, H, W]`` for any ``H, W``.

Legend for shapes: B batch, C input bands, D embedding width, h x w patch grid, K output channels.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov3_eo.models.lora import LoRAConfig, add_lora, lora_parameters

#: What a head consumes per backbone layer: ``(patch [B, D, h, w], cls [B, D])`` or just the patch map.
LayerFeatures = tuple[Tensor, Tensor] | Tensor

BinStrategy = Literal["chmv2_mixlog", "linear", "log"]
NormStrategy = Literal["chmv2_mixlog", "linear", "softmax", "sigmoid"]

#: Blocks (0-based) the CHMv2 head reads on a 24-block ViT-L.
CHMV2_LAYERS: tuple[int, ...] = (5, 11, 17, 23)
#: CHMv2 height range in metres and number of bins.
CHMV2_MIN_HEIGHT = 0.001
CHMV2_MAX_HEIGHT = 96.0
CHMV2_N_BINS = 256

# The mixlog bins are built on [min, max / 8] and the weighted sum is scaled back by 8 (official CHMv2 choice).
_MIXLOG_SCALE = 8.0
# Positive shift added to the ReLU'd mixlog logits before normalising: keeps the denominator positive when every
# logit is <= 0 (value of the released CHMv2 code).
_MIXLOG_SHIFT = 1e-8
# Additive floor of the "linear" (AdaBins) normalisation in the official depth code.
_LINEAR_NORM_SHIFT = 0.1


def _split_layer(features: LayerFeatures, *, need_cls: bool, where: str) -> tuple[Tensor, Tensor | None]:
    """Return ``(patch [B, D, h, w], cls [B, D] | None)`` from one layer's features; checks shapes."""
    if isinstance(features, Tensor):
        patch, cls = features, None
    elif isinstance(features, (tuple, list)) and len(features) >= 1:
        patch = features[0]
        cls = features[1] if len(features) >= 2 else None
    else:
        raise TypeError(
            f"{where}: expected a [B, D, h, w] tensor or a (patch, cls) pair, got {type(features).__name__}."
        )
    if patch.ndim != 4:
        raise ValueError(f"{where}: patch features must be [B, D, h, w], got shape {tuple(patch.shape)}.")
    if need_cls and cls is None:
        raise ValueError(
            f"{where}: this head reads the class token; pass (patch, cls) pairs (return_class_token=True)."
        )
    return patch, cls


def _device_context(device: torch.device | str | None):
    return torch.device(device) if device is not None else nullcontext()


# ----------------------------------------------------------------------------------------------------------------
# Linear head
# ----------------------------------------------------------------------------------------------------------------


class LinearHead(nn.Module):
    """Official linear probe: per-pixel linear classifier/regressor on (concatenated) patch features.

    ``forward``: each layer ``[B, D_i, h_i, w_i]`` (with the class token broadcast and concatenated after it when
    ``use_cls_token``) is bilinearly resized to the first layer's grid, all are concatenated to
    ``[B, sum(D_i)(x2), h, w]``, then Dropout2d -> BatchNorm2d -> 1x1 conv -> ``[B, K, h, w]``, bilinearly upsampled to
    ``output_size`` when given.

    Args:
        in_channels: embedding width of each input layer (an int for one layer).
        out_channels: number of classes (or depth bins / 1 for regression).
        use_cls_token: concatenate each layer's class token to its patch features.
        use_batchnorm: BatchNorm before the classifier (the official protocol); ``False`` -> Identity.
        dropout: channel dropout probability (official 0.1).
        device: where to create the parameters (``"meta"`` for shape-only builds).
    """

    def __init__(
        self,
        *,
        in_channels: int | Sequence[int],
        out_channels: int,
        use_cls_token: bool = False,
        use_batchnorm: bool = True,
        dropout: float = 0.1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dims = [in_channels] if isinstance(in_channels, int) else [int(d) for d in in_channels]
        if not dims or any(d <= 0 for d in dims):
            raise ValueError(f"LinearHead: in_channels must be positive widths, got {in_channels!r}.")
        if out_channels <= 0:
            raise ValueError(f"LinearHead: out_channels must be >= 1, got {out_channels}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LinearHead: dropout must be in [0, 1), got {dropout}.")
        self.in_channels = dims
        self.out_channels = out_channels
        self.use_cls_token = use_cls_token
        self.channels = sum(dims) * (2 if use_cls_token else 1)
        with _device_context(device):
            self.dropout = nn.Dropout2d(dropout)
            self.batchnorm_layer = nn.BatchNorm2d(self.channels) if use_batchnorm else nn.Identity()
            self.conv = nn.Conv2d(self.channels, out_channels, kernel_size=1)
        self.reset_parameters()

    @property
    def n_inputs(self) -> int:
        """Number of backbone layers this head expects."""
        return len(self.in_channels)

    #: The head maps any patch grid back exactly (no internal striding).
    grid_multiple: int = 1

    def reset_parameters(self) -> None:
        nn.init.normal_(self.conv.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv.bias)
        if isinstance(self.batchnorm_layer, nn.BatchNorm2d):
            self.batchnorm_layer.reset_parameters()

    def concat_features(self, features: Sequence[LayerFeatures]) -> Tensor:
        """Resize and concatenate the layers: ``-> [B, channels, h, w]`` on the first layer's grid."""
        if len(features) != self.n_inputs:
            raise ValueError(f"LinearHead: expected {self.n_inputs} layer(s) of features, got {len(features)}.")
        maps = []
        for i, layer in enumerate(features):
            patch, cls = _split_layer(layer, need_cls=self.use_cls_token, where=f"LinearHead input {i}")
            if patch.shape[1] != self.in_channels[i]:
                raise ValueError(
                    f"LinearHead input {i}: expected {self.in_channels[i]} channels, got {patch.shape[1]}."
                )
            if self.use_cls_token:
                assert cls is not None
                patch = torch.cat([patch, cls[:, :, None, None].expand_as(patch)], dim=1)  # [B, 2D, h, w]
            maps.append(patch)
        size = maps[0].shape[-2:]
        maps = [
            m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            for m in maps
        ]
        return torch.cat(maps, dim=1)  # [B, channels, h, w]

    def forward(self, features: Sequence[LayerFeatures], output_size: tuple[int, int] | None = None) -> Tensor:
        """``features`` (one entry per layer) -> logits ``[B, K, h, w]`` or ``[B, K, *output_size]``."""
        x = self.concat_features(features)
        x = self.conv(self.batchnorm_layer(self.dropout(x)))  # [B, K, h, w]
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return x


# ----------------------------------------------------------------------------------------------------------------
# DPT head
# ----------------------------------------------------------------------------------------------------------------


class ConvNorm(nn.Module):
    """A convolution (``.conv``) optionally followed by BatchNorm (``.bn``); same-size padding for odd kernels."""

    def __init__(
        self, in_channels: int, out_channels: int, *, kernel_size: int, bias: bool = True, use_batchnorm: bool = False
    ) -> None:
        super().__init__()
        pad = kernel_size // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size=kernel_size, padding=pad, bias=bias and not use_batchnorm
        )
        self.bn = nn.BatchNorm2d(out_channels) if use_batchnorm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return self.bn(x) if self.bn is not None else x


class PreActResidualUnit(nn.Module):
    """``x + conv2(relu(conv1(relu(x))))`` with 3x3 convolutions; ``[B, C, h, w] -> [B, C, h, w]``."""

    def __init__(self, channels: int, *, use_batchnorm: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvNorm(channels, channels, kernel_size=3, use_batchnorm=use_batchnorm)
        self.conv2 = ConvNorm(channels, channels, kernel_size=3, use_batchnorm=use_batchnorm)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class FusionBlock(nn.Module):
    """One DPT fusion step: add the refined skip, refine, upsample x2 (bilinear, align_corners=True), 1x1 project.

    ``forward(x [B, C, h, w], skip [B, C, h', w'] | None) -> [B, C, 2h, 2w]``; the skip is bilinearly resized to
    ``x``'s grid when they differ (odd grids). The first (coarsest) block has no skip and no ``res_conv_unit1``.
    """

    def __init__(self, channels: int, *, has_skip: bool, use_batchnorm: bool = False) -> None:
        super().__init__()
        self.res_conv_unit1 = PreActResidualUnit(channels, use_batchnorm=use_batchnorm) if has_skip else None
        self.res_conv_unit2 = PreActResidualUnit(channels, use_batchnorm=use_batchnorm)
        self.project = ConvNorm(channels, channels, kernel_size=1)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        if skip is not None:
            if self.res_conv_unit1 is None:
                raise ValueError("FusionBlock: the first fusion block takes no skip input.")
            if skip.shape[-2:] != x.shape[-2:]:
                skip = F.interpolate(skip, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x + self.res_conv_unit1(skip)
        x = self.res_conv_unit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)  # [B, C, 2h, 2w]
        return self.project(x)


def _resize_layer(channels: int, factor: float) -> nn.Module:
    """Reassemble resampling: transposed conv for x``factor`` up, identity for 1, strided 3x3 conv for 1/n down."""
    if factor > 1:
        if factor != int(factor):
            raise ValueError(f"DPTHead: up-sampling reassemble factors must be integers, got {factor}.")
        return nn.ConvTranspose2d(channels, channels, kernel_size=int(factor), stride=int(factor))
    if factor == 1:
        return nn.Identity()
    stride = round(1 / factor)
    if factor <= 0 or not math.isclose(1 / stride, factor):
        raise ValueError(f"DPTHead: down-sampling reassemble factors must be 1/n, got {factor}.")
    return nn.Conv2d(channels, channels, kernel_size=3, stride=stride, padding=1)


class ReassembleBlocks(nn.Module):
    """Turn each layer's tokens into a feature map at its own scale.

    Per layer i: optional CLS read-out ("project": ``Linear(2D -> D) + GELU`` on ``[patch, cls]`` per token),
    1x1 conv ``D -> post_process_channels[i]``, then resampling by ``factors[i]`` (e.g. x4, x2, x1, x1/2).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        post_process_channels: Sequence[int],
        factors: Sequence[float],
        readout: Literal["project", "ignore"],
        use_batchnorm: bool,
    ) -> None:
        super().__init__()
        self.readout = readout
        self.projects = nn.ModuleList(ConvNorm(embed_dim, c, kernel_size=1) for c in post_process_channels)
        self.resize_layers = nn.ModuleList(_resize_layer(c, f) for c, f in zip(post_process_channels, factors))
        self.batchnorm_layers = nn.ModuleList(
            nn.BatchNorm2d(c) if use_batchnorm else nn.Identity() for c in post_process_channels
        )
        if readout == "project":
            self.readout_projects = nn.ModuleList(
                nn.Sequential(nn.Linear(2 * embed_dim, embed_dim), nn.GELU()) for _ in post_process_channels
            )
        else:
            self.readout_projects = None

    def forward(self, features: Sequence[LayerFeatures]) -> list[Tensor]:
        """One entry per layer -> list of ``[B, post_process_channels[i], h * factors[i], w * factors[i]]``."""
        out = []
        for i, layer in enumerate(features):
            patch, cls = _split_layer(layer, need_cls=self.readout == "project", where=f"DPTHead input {i}")
            if self.readout_projects is not None:
                assert cls is not None
                b, d, h, w = patch.shape
                tokens = patch.flatten(2).transpose(1, 2)  # [B, hw, D]
                tokens = torch.cat([tokens, cls[:, None, :].expand_as(tokens)], dim=-1)  # [B, hw, 2D]
                tokens = self.readout_projects[i](tokens)  # [B, hw, D]
                patch = tokens.transpose(1, 2).reshape(b, d, h, w)  # [B, D, h, w]
            x = self.projects[i](patch)
            x = self.resize_layers[i](x)
            out.append(self.batchnorm_layers[i](x))
        return out


class UpConvHead(nn.Module):
    """Final DPT output head: 3x3 ``C -> C/2``, x2 bilinear, 3x3 ``C/2 -> hidden``, ReLU, 1x1 ``hidden -> K``.

    ``[B, C, h, w] -> [B, K, 2h, 2w]``; the layers live in ``head`` at indices 0, 2, 4 (official layout).
    """

    def __init__(self, *, channels: int, out_channels: int, n_hidden_channels: int) -> None:
        super().__init__()
        self.head = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(channels // 2, n_hidden_channels, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(n_hidden_channels, out_channels, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x)


class DPTHead(nn.Module):
    """DPT decoder on four (or more) intermediate ViT layers, as in the official depth evaluation.

    Data flow for a patch grid ``h x w`` and the default factors ``(4, 2, 1, 0.5)``::

        layer i (patch [B, D, h, w], cls [B, D])
          -> reassemble_blocks: CLS read-out, 1x1 conv, resample   [B, P_i, 4h | 2h | h | h/2, ...]
          -> convs[i]: 3x3 conv, no bias                            [B, channels, ...]
          -> fusion_blocks, coarsest first, each x2                 [B, channels, 8h, 8w]
          -> conv_depth (UpConvHead, x2)                            [B, K, 16h, 16w]

    so the output is at input-pixel resolution for a 16-pixel patch when ``h`` and ``w`` are even (an odd grid is
    rounded up by the stride-2 level; :class:`DenseModel` pads to even grids).

    Args:
        embed_dim: backbone width D.
        out_channels: K (256 depth bins for CHMv2, classes for segmentation, 1 for regression).
        post_process_channels: reassembled width per input layer, in input order (shallowest layer first).
        channels: width of the fusion path.
        n_hidden_channels: hidden width of the final head.
        readout: ``"project"`` concatenates the class token and projects (needs (patch, cls) inputs);
            ``"ignore"`` uses patch tokens only.
        reassemble_factors: resampling factor per layer (>1: transposed conv, 1: identity, 1/n: strided conv).
        use_batchnorm: BatchNorm in the reassemble and residual units (``False`` for CHMv2; only the layout without
            BatchNorm is checked against a released checkpoint).
        device: where to create the parameters (``"meta"`` for shape-only builds).
    """

    def __init__(
        self,
        *,
        embed_dim: int,
        out_channels: int,
        post_process_channels: Sequence[int] = (128, 256, 512, 1024),
        channels: int = 256,
        n_hidden_channels: int = 128,
        readout: Literal["project", "ignore"] = "project",
        reassemble_factors: Sequence[float] = (4, 2, 1, 0.5),
        use_batchnorm: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if readout not in ("project", "ignore"):
            raise ValueError(f"DPTHead: readout must be 'project' or 'ignore', got {readout!r}.")
        if len(post_process_channels) != len(reassemble_factors):
            raise ValueError(
                f"DPTHead: {len(post_process_channels)} post_process_channels but {len(reassemble_factors)} "
                "reassemble_factors; give one of each per layer."
            )
        if len(post_process_channels) < 1 or embed_dim <= 0 or out_channels <= 0 or channels < 2:
            raise ValueError(
                f"DPTHead: need >= 1 layer and positive sizes (embed_dim={embed_dim}, out_channels={out_channels}, "
                f"channels={channels})."
            )
        self.embed_dim = embed_dim
        self.out_channels = out_channels
        self.post_process_channels = [int(c) for c in post_process_channels]
        self.reassemble_factors = [float(f) for f in reassemble_factors]
        self.readout = readout
        downs = [round(1 / f) for f in self.reassemble_factors if f < 1]
        #: Patch-grid sides must be a multiple of this for the output to land exactly on the input grid.
        self.grid_multiple = max(downs, default=1)
        with _device_context(device):
            self.reassemble_blocks = ReassembleBlocks(
                embed_dim=embed_dim,
                post_process_channels=self.post_process_channels,
                factors=self.reassemble_factors,
                readout=readout,
                use_batchnorm=use_batchnorm,
            )
            self.convs = nn.ModuleList(
                ConvNorm(c, channels, kernel_size=3, bias=False) for c in self.post_process_channels
            )
            self.fusion_blocks = nn.ModuleList(
                FusionBlock(channels, has_skip=i > 0, use_batchnorm=use_batchnorm)
                for i in range(len(self.post_process_channels))
            )
            self.conv_depth = UpConvHead(
                channels=channels, out_channels=out_channels, n_hidden_channels=n_hidden_channels
            )

    @property
    def n_inputs(self) -> int:
        """Number of backbone layers this head expects."""
        return len(self.post_process_channels)

    def reset_parameters(self) -> None:
        """PyTorch default initialisation of every layer (the head is trained from scratch or loaded)."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def forward(self, features: Sequence[LayerFeatures], output_size: tuple[int, int] | None = None) -> Tensor:
        """``features`` (one entry per layer, finest first) -> ``[B, K, 16h, 16w]`` (or ``output_size``)."""
        if len(features) != self.n_inputs:
            raise ValueError(f"DPTHead: expected {self.n_inputs} layers of features, got {len(features)}.")
        maps = self.reassemble_blocks(features)
        maps = [conv(m) for conv, m in zip(self.convs, maps)]  # [B, channels, ...] fine -> coarse
        x = self.fusion_blocks[0](maps[-1])
        for block, skip in zip(self.fusion_blocks[1:], reversed(maps[:-1])):
            x = block(x, skip)
        x = self.conv_depth(x)  # [B, K, 16h, 16w]
        if output_size is not None and tuple(x.shape[-2:]) != tuple(output_size):
            x = F.interpolate(x, size=tuple(output_size), mode="bilinear", align_corners=False)
        return x


def chmv2_head(*, embed_dim: int = 1024, device: torch.device | str | None = None) -> DPTHead:
    """The DPT head in the configuration of Meta's CHMv2 canopy-height model (256 height bins, CLS read-out).

    On ``embed_dim=1024`` (SAT-493M ViT-L) its state dict has the 68 keys of the released
    ``dinov3_vitl16_chmv2_dpt_head`` checkpoint and 33.7 M parameters; use it with :data:`CHMV2_LAYERS` and
    :func:`chmv2_height` (or :func:`build_chmv2_model`).
    """
    return DPTHead(
        embed_dim=embed_dim,
        out_channels=CHMV2_N_BINS,
        post_process_channels=(128, 256, 512, 1024),
        channels=256,
        n_hidden_channels=128,
        readout="project",
        reassemble_factors=(4, 2, 1, 0.5),
        use_batchnorm=False,
        device=device,
    )


def read_head_state(path: str | Path) -> dict[str, Tensor]:
    """The state dict of a head checkpoint: a plain one, or one under ``"model"``/``"state_dict"``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"read_head_state: no checkpoint at {str(path)!r}.")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"read_head_state: {str(path)!r} holds a {type(state).__name__}, not a state dict.")
    return state


def load_head_weights(head: nn.Module, path: str | Path) -> nn.Module:
    """Load a head checkpoint (a plain state dict, or one under ``"model"``/``"state_dict"``) strictly into ``head``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the checkpoint's keys or shapes do not match ``head`` (missing/unexpected keys are listed).
    """
    return load_head_state(head, read_head_state(path), source=str(path))


def load_head_state(head: nn.Module, state: dict[str, Tensor], *, source: str = "state dict") -> nn.Module:
    """Load ``state`` strictly into ``head``; missing/unexpected keys and shape mismatches are one clear error."""
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"load_head_weights: {source!r} does not match {type(head).__name__}: "
            f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}."
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        raise ValueError(
            f"load_head_weights: shape mismatch in {source!r} for {bad[:8]} "
            f"(e.g. {bad[0]}: checkpoint {tuple(state[bad[0]].shape)} vs model {tuple(expected[bad[0]].shape)})."
        )
    head.load_state_dict(state, strict=True)
    return head


# ----------------------------------------------------------------------------------------------------------------
# Height (depth) bins
# ----------------------------------------------------------------------------------------------------------------


def height_bins(
    n_bins: int,
    *,
    min_height: float = CHMV2_MIN_HEIGHT,
    max_height: float = CHMV2_MAX_HEIGHT,
    strategy: BinStrategy = "chmv2_mixlog",
    device: torch.device | str | None = None,
) -> Tensor:
    """Bin centres in metres, ``[n_bins]``, increasing.

    * ``"chmv2_mixlog"``: with ``m = max_height / 8`` and ``t = linspace(1, 0, n_bins)``,
      ``bins = 8 * (t * exp(linspace(log min, log m)) + (1 - t) * linspace(min, m))`` -- log-spaced at the low end,
      linear at the high end, from ``8 * min`` to ``max``;
    * ``"linear"``: ``linspace(min, max)``; ``"log"``: ``exp(linspace(log min, log max))``.

    Raises:
        ValueError: unknown strategy, ``n_bins < 2`` or ``not 0 < min_height < max_height``.
    """
    if n_bins < 2:
        raise ValueError(f"height_bins: n_bins must be >= 2, got {n_bins}.")
    if not 0 < min_height < max_height:
        raise ValueError(f"height_bins: need 0 < min_height < max_height, got {min_height} and {max_height}.")
    kw = {"device": device, "dtype": torch.float32}
    if strategy == "linear":
        return torch.linspace(min_height, max_height, n_bins, **kw)
    if strategy == "log":
        return torch.exp(torch.linspace(math.log(min_height), math.log(max_height), n_bins, **kw))
    if strategy == "chmv2_mixlog":
        top = max_height / _MIXLOG_SCALE
        if not min_height < top:
            raise ValueError(
                f"height_bins: chmv2_mixlog needs min_height < max_height / 8, got {min_height}, {max_height}."
            )
        linear = torch.linspace(min_height, top, n_bins, **kw)
        log = torch.exp(torch.linspace(math.log(min_height), math.log(top), n_bins, **kw))
        t = torch.linspace(1.0, 0.0, n_bins, **kw)
        return _MIXLOG_SCALE * (t * log + (1 - t) * linear)
    raise ValueError(f"height_bins: unknown strategy {strategy!r}; choose 'chmv2_mixlog', 'linear' or 'log'.")


def bin_weights(logits: Tensor, *, norm: NormStrategy = "chmv2_mixlog") -> Tensor:
    """Per-pixel bin weights summing to 1 over dim 1: ``[B, K, H, W] -> [B, K, H, W]``.

    ``chmv2_mixlog``: ``(relu(x) + 1e-8) / sum``; ``linear``: ``(relu(x) + 0.1) / sum``; ``softmax``;
    ``sigmoid``: ``sigmoid(x) / sum``.
    """
    if norm == "chmv2_mixlog":
        w = F.relu(logits) + _MIXLOG_SHIFT
    elif norm == "linear":
        w = F.relu(logits) + _LINEAR_NORM_SHIFT
    elif norm == "softmax":
        return torch.softmax(logits, dim=1)
    elif norm == "sigmoid":
        w = torch.sigmoid(logits)
    else:
        raise ValueError(
            f"bin_weights: unknown norm {norm!r}; choose 'chmv2_mixlog', 'linear', 'softmax' or 'sigmoid'."
        )
    return w / w.sum(dim=1, keepdim=True)


def bins_to_metres(logits: Tensor, bins: Tensor, *, norm: NormStrategy = "chmv2_mixlog") -> Tensor:
    """Expected height ``sum_k w_k * bins_k``: logits ``[B, K, H, W]``, bins ``[K]`` (metres) -> ``[B, 1, H, W]``.

    Raises:
        ValueError: ``logits`` is not 4-D or its channel count differs from ``len(bins)``.
    """
    if logits.ndim != 4 or logits.shape[1] != bins.numel():
        raise ValueError(
            f"bins_to_metres: logits must be [B, {bins.numel()}, H, W] to match the bins, got {tuple(logits.shape)}."
        )
    w = bin_weights(logits, norm=norm)
    return torch.einsum("bkhw,k->bhw", w, bins.to(w)).unsqueeze(1)


def metres_to_bin(height: Tensor, bins: Tensor) -> Tensor:
    """Index of the nearest bin centre for each height (any shape -> same shape, int64); NaN heights give -1."""
    mids = (bins[1:] + bins[:-1]) / 2  # [K-1] decision boundaries
    idx = torch.bucketize(height.to(bins.dtype).contiguous(), mids)
    return torch.where(torch.isnan(height), torch.full_like(idx, -1), idx)


class LogitsToHeight(nn.Module):
    """Convert head output to metres: ``[B, K, H, W] -> [B, 1, H, W]``.

    ``K == n_bins`` (> 1): :func:`bins_to_metres` over :func:`height_bins`; ``n_bins == 1``: direct regression,
    ``relu(x) + min_height`` (official regression output). The bins are a non-persistent buffer, so this module
    adds nothing to a state dict.
    """

    def __init__(
        self,
        *,
        n_bins: int = CHMV2_N_BINS,
        min_height: float = CHMV2_MIN_HEIGHT,
        max_height: float = CHMV2_MAX_HEIGHT,
        strategy: BinStrategy = "chmv2_mixlog",
        norm: NormStrategy = "chmv2_mixlog",
    ) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"LogitsToHeight: n_bins must be >= 1, got {n_bins}.")
        self.n_bins = n_bins
        self.min_height = min_height
        self.max_height = max_height
        self.strategy = strategy
        self.norm = norm
        if n_bins > 1:
            bins = height_bins(n_bins, min_height=min_height, max_height=max_height, strategy=strategy)
        else:
            bins = torch.zeros(1)  # regression: unused, kept so ``.bins`` always exists
        bin_weights(torch.zeros(1, 1, 1, 1), norm=norm)  # validates ``norm`` at construction
        self.register_buffer("bins", bins, persistent=False)

    def forward(self, logits: Tensor) -> Tensor:
        if logits.ndim != 4 or logits.shape[1] != self.n_bins:
            raise ValueError(f"LogitsToHeight: expected [B, {self.n_bins}, H, W] logits, got {tuple(logits.shape)}.")
        if self.n_bins == 1:
            return F.relu(logits) + self.min_height
        return bins_to_metres(logits, self.bins, norm=self.norm)


def chmv2_height() -> LogitsToHeight:
    """The CHMv2 output conversion: 256 mixlog bins over 0.001-96 m, mixlog (linear) normalisation."""
    return LogitsToHeight(
        n_bins=CHMV2_N_BINS, min_height=CHMV2_MIN_HEIGHT, max_height=CHMV2_MAX_HEIGHT,
        strategy="chmv2_mixlog", norm="chmv2_mixlog",
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Backbone + head
# ----------------------------------------------------------------------------------------------------------------


class DenseModel(nn.Module):
    """A ViT backbone plus a dense head: ``forward(x [B, C, H, W]) -> [B, K, H, W]`` at input resolution.

    The input is centre-padded with zeros (the normalised mean) to a multiple of ``pad_multiple`` pixels (default:
    ``patch_size * head.grid_multiple``, i.e. 16 for linear heads and 32 for the DPT head, so the head's output
    falls exactly on the padded pixel grid), the backbone runs once through
    ``get_intermediate_layers(x, n=layers, reshape=True, return_class_token=True, norm=norm)``, the head's output
    is passed through ``output`` (e.g. :class:`LogitsToHeight`), bilinearly resized to the padded size if needed
    (linear heads: patch grid -> pixels) and cropped back to ``H x W``.

    Args:
        backbone: a DINOv3 ViT (``embed_dim``, ``patch_size``, ``n_blocks``, ``get_intermediate_layers``).
        head: a :class:`LinearHead`, :class:`DPTHead` or any module with ``n_inputs`` and
            ``forward(features) -> [B, K, h', w']``.
        layers: an int ``n`` (the last n blocks) or 0-based block indices; one per head input.
        freeze_backbone: no gradients into the backbone and keep it in eval mode (default, the official protocol);
            ``False`` trains every backbone weight (all set to require gradients).
        lora: fine-tune the backbone through low-rank updates instead (:class:`~dinov3_eo.models.lora.LoRAConfig` or
            a mapping of its fields): its own weights stay fixed, the updates train, and the backbone runs in
            training mode like a fine-tuned one. Excludes ``freeze_backbone``'s fixed features: with ``lora`` the
            backbone is adapted whatever ``freeze_backbone`` says.
        output: optional module applied to the head's output (``[B, K, h', w'] -> [B, K', h', w']``).
        pad_multiple: pad sides to this many pixels (must be a multiple of the patch size). 16 is the official
            CHMv2 centre padding; with a DPT head, odd patch grids then come out one patch larger and are resized
            to the padded size before cropping (the official notebook resizes the whole padded map to the image
            size instead), so only even grids reproduce the official maps exactly.
        norm: apply the backbone's final norm to every selected layer (official dense protocols: True).

    Raises:
        ValueError: the number of layers differs from ``head.n_inputs``, an index is out of range, or
            ``pad_multiple`` is not a multiple of the patch size.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: nn.Module,
        layers: int | Sequence[int] = 1,
        freeze_backbone: bool = True,
        lora: LoRAConfig | Mapping[str, Any] | None = None,
        output: nn.Module | None = None,
        pad_multiple: int | None = None,
        norm: bool = True,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.output = output
        self.patch_size = int(backbone.patch_size)
        n_blocks = int(getattr(backbone, "n_blocks", len(getattr(backbone, "blocks", ()))))
        if isinstance(layers, int):
            if not 1 <= layers <= n_blocks:
                raise ValueError(f"DenseModel: layers={layers} must be between 1 and the backbone's {n_blocks} blocks.")
            self.layers: int | list[int] = layers
            n_layers = layers
        else:
            self.layers = [int(i) for i in layers]
            bad = [i for i in self.layers if not 0 <= i < n_blocks]
            if bad or not self.layers:
                raise ValueError(f"DenseModel: layer indices {bad or self.layers} are not in [0, {n_blocks}).")
            n_layers = len(self.layers)
        n_inputs = getattr(head, "n_inputs", None)
        if n_inputs is not None and n_inputs != n_layers:
            raise ValueError(
                f"DenseModel: the head expects {n_inputs} layers but layers={layers!r} selects {n_layers}."
            )
        multiple = self.patch_size * int(getattr(head, "grid_multiple", 1)) if pad_multiple is None else pad_multiple
        if multiple <= 0 or multiple % self.patch_size:
            raise ValueError(
                f"DenseModel: pad_multiple={pad_multiple} must be a positive multiple of the patch size "
                f"{self.patch_size}."
            )
        self.pad_multiple = multiple
        self.norm = norm
        self.lora = LoRAConfig.from_any(lora)
        self.freeze_backbone = freeze_backbone and self.lora is None
        if self.lora is not None:
            add_lora(self.backbone, self.lora)  # freezes the backbone's own weights
        else:
            # both ways, whatever the backbone arrived with: one taken from a frozen model (a text model's vision
            # tower, a teacher) must train when fine-tuning is asked for
            self.backbone.requires_grad_(not freeze_backbone)
        # the modes train() sets, set now: Lightning (2.x) does not call train() when a fit starts, and a backbone
        # from load_backbone arrives in eval mode (a fine-tuned one must train like the head)
        self.train(self.training)

    @property
    def out_channels(self) -> int:
        """K of ``forward``'s output: 1 after a height conversion, else the head's output channels."""
        if isinstance(self.output, LogitsToHeight):
            return 1
        return int(getattr(self.head, "out_channels"))

    def train(self, mode: bool = True) -> DenseModel:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()  # a frozen backbone never runs in training mode (no drop-path, RoPE jitter)
        return self

    def padding(self, height: int, width: int) -> tuple[int, int, int, int]:
        """Centre padding ``(left, right, top, bottom)`` that brings ``height x width`` to ``pad_multiple``."""
        m = self.pad_multiple
        ph, pw = -height % m, -width % m
        return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

    def features(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Backbone features of an already padded batch: per layer ``(patch [B, D, h, w], cls [B, D])``."""
        grad = torch.is_grad_enabled() and not self.freeze_backbone
        with torch.set_grad_enabled(grad):
            feats = self.backbone.get_intermediate_layers(
                x, n=self.layers, reshape=True, return_class_token=True, norm=self.norm
            )
        return [tuple(f) for f in feats]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` normalised imagery -> ``[B, K, H, W]`` (logits, or metres with a height ``output``)."""
        if x.ndim != 4:
            raise ValueError(f"DenseModel: expected a [B, C, H, W] batch, got shape {tuple(x.shape)}.")
        height, width = x.shape[-2:]
        left, right, top, bottom = self.padding(height, width)
        xp = F.pad(x, (left, right, top, bottom)) if left or right or top or bottom else x  # [B, C, Hp, Wp]
        padded = tuple(xp.shape[-2:])
        out = self.head(self.features(xp))  # [B, K, h', w']
        if self.output is not None:
            out = self.output(out)
        if tuple(out.shape[-2:]) != padded:
            out = F.interpolate(out, size=padded, mode="bilinear", align_corners=False)
        return out[..., top : top + height, left : left + width]

    def parameter_groups(self, *, lr: float, backbone_lr_scale: float = 0.1, lora_lr_scale: float = 1.0) -> list[dict]:
        """Optimiser groups: the head (and output) at ``lr``; a trainable backbone at ``lr * backbone_lr_scale``, or
        its LoRA updates at ``lr * lora_lr_scale`` (low-rank updates start at zero and train at head-like rates)."""
        head_params = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        groups: list[dict] = [{"params": head_params, "lr": lr, "name": "head"}]
        if self.lora is not None:
            groups.append({"params": lora_parameters(self.backbone), "lr": lr * lora_lr_scale, "name": "lora"})
        elif not self.freeze_backbone:
            backbone_params = [p for p in self.backbone.parameters() if p.requires_grad]
            groups.append({"params": backbone_params, "lr": lr * backbone_lr_scale, "name": "backbone"})
        return groups


def build_chmv2_model(
    backbone: nn.Module,
    *,
    head_weights: str | Path | None = None,
    layers: Sequence[int] = CHMV2_LAYERS,
    pad_multiple: int | None = None,
) -> DenseModel:
    """Frozen ``backbone`` + CHMv2 DPT head + metre conversion: ``[B, 3, H, W] -> [B, 1, H, W]`` metres.

    With the SAT-493M ViT-L, ``head_weights`` = the released ``dinov3_vitl16_chmv2_dpt_head`` ``.pth`` and input
    normalised with the ``chmv2`` preset, this reproduces Meta's CHMv2 maps (exactly on sides that are multiples of 32).
    """
    head = chmv2_head(embed_dim=int(backbone.embed_dim))
    if head_weights is not None:
        load_head_weights(head, head_weights)
    return DenseModel(backbone=backbone, head=head, layers=layers, output=chmv2_height(), pad_multiple=pad_multiple)
