"""The DINOv3 Vision Transformer with the official state-dict layout.

``DinoVisionTransformer.state_dict()`` has exactly the key names and shapes of the official
checkpoints (``cls_token``, ``storage_tokens``, ``mask_token``, ``patch_embed.proj``,
``rope_embed.periods``, ``blocks.i.{norm1, attn.qkv (+ bias_mask), attn.proj, ls1.gamma, norm2,
mlp.fc1/fc2 | mlp.w1/w2/w3, ls2.gamma}``, ``norm`` and optionally ``local_cls_norm``), so released
``.pth`` files load strictly.

Token layout: ``[cls (1) | storage/register tokens (4) | patches (h*w)]`` with no absolute position
embedding; RoPE rotates queries and keys of the patch tokens only.

Input sizes: height and width must be multiples of the patch size (16). Any such size works,
square or not, because RoPE has no fixed grid. Other sizes raise ``ValueError`` rather than being
floor-cropped silently by the strided convolution as in the official code; crop or pad first.

Variants are small factory functions (``vits16`` ... ``vit7b16`` and the CPU-sized ``vitt16``,
``vitmicro16``) collected in the explicit :data:`BACKBONES` registry used by :func:`build_backbone`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dinov3_eo.models.rope import RopePositionEmbedding, rope_apply_fast

FfnLayer = Literal["mlp", "swiglu", "swiglu32", "swiglu64", "swiglu128"]

#: SwiGLU variants -> the multiple the hidden width is rounded up to
_SWIGLU_ALIGN: dict[str, int] = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}

RopeTable = tuple[Tensor, Tensor]


def swiglu_hidden_features(embed_dim: int, ffn_ratio: float, align_to: int) -> int:
    """Official SwiGLU width: ``int(int(embed_dim * ffn_ratio) * 2 / 3)`` rounded up to ``align_to``."""
    hidden = int(int(embed_dim * ffn_ratio) * 2 / 3)
    return (hidden + align_to - 1) // align_to * align_to


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(
        self, *, in_chans: int, embed_dim: int, patch_size: int, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, device=device)

    def reset_parameters(self) -> None:
        """Uniform(+-sqrt(1 / (in_chans * p * p))) for weight and bias, as the official init."""
        bound = math.sqrt(1.0 / (self.in_chans * self.patch_size * self.patch_size))
        nn.init.uniform_(self.proj.weight, -bound, bound)
        nn.init.uniform_(self.proj.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # [B, D, h, w] -> [B, h, w, D]


class LayerScale(nn.Module):
    """Per-channel residual scale ``x * gamma`` (gamma initialised to ``init_values``)."""

    def __init__(self, dim: int, *, init_values: float = 1e-5, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class LinearKMaskedBias(nn.Linear):
    """The fused q/k/v projection whose key bias is multiplied by a persistent 0 mask.

    ``bias_mask`` is 1 on the query and value thirds and 0 on the key third, so the key bias is
    effectively absent (as in the released weights). It is NaN until :meth:`reset_parameters`.
    """

    def __init__(self, in_features: int, out_features: int, *, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias=True, device=device)
        self.register_buffer("bias_mask", torch.full((out_features,), float("nan"), device=device), persistent=True)
        self.reset_bias_mask()

    def reset_bias_mask(self) -> None:
        if self.bias_mask.is_meta:
            return
        n = self.out_features
        with torch.no_grad():
            self.bias_mask.fill_(1.0)
            self.bias_mask[n // 3 : 2 * n // 3] = 0.0

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


_HALF_DTYPES = (torch.bfloat16, torch.float16)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE on the patch tokens (the last ``h*w`` tokens).

    Args:
        dim: token width ``D``.
        num_heads: number of heads (``D`` must divide evenly).
        qkv_bias: whether q/k/v have a bias.
        mask_k_bias: zero the key bias through a ``bias_mask`` buffer (official layout).
        proj_bias: whether the output projection has a bias.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        qkv_bias: bool = True,
        mask_k_bias: bool = True,
        proj_bias: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        if qkv_bias and mask_k_bias:
            self.qkv: nn.Linear = LinearKMaskedBias(dim, 3 * dim, device=device)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, device=device)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device)

    def forward(self, x: Tensor, rope: RopeTable | None = None) -> Tensor:
        """(B, N, D) tokens, optional RoPE table -> (B, N, D).

        ``rope`` is ``(sin, cos)`` of shape (N, head_dim) covering the whole sequence: the prefix rows are
        the identity rotation (sin 0, cos 1), which keeps the hot path free of slicing and concatenation.
        """
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)  # token-major, as the projection writes it
        # split in this layout, not slice and index after a permute: the gradient is one concatenation straight into
        # the projection's layout, where a slice's and an index's were each a zero-filled copy of the whole
        # projection, summed, then copied again to undo the permute
        qk, v = qkv.split([2, 1], dim=2)  # [B, N, 2, h, hd], [B, N, 1, h, hd]
        if rope is not None:
            sin, cos = rope  # [N, hd], broadcast over (q/k, heads)
            qk = rope_apply_fast(qk, sin[:, None, None], cos[:, None, None])  # q and k together, one new tensor
        q, k = (t.transpose(1, 2) for t in qk.unbind(2))  # 2 x [B, h, N, hd]
        v = v.squeeze(2).transpose(1, 2)  # [B, h, N, hd]
        if x.device.type == "cpu" and q.dtype in _HALF_DTYPES:
            # PyTorch's CPU attention kernels are no faster in bf16 than in float32, and their bf16 backward is
            # 2-6x slower for the short sequences of small crops (ViT-T on 64-px crops: 5.6 vs 1.0 ms; only near
            # 1,000 tokens is it 1.3x faster; scripts/bench_cpu_bf16.py), so under CPU autocast attention runs in
            # float32 while the projections around it keep bf16's faster matrix products.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, hd]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))  # [B, N, D]


class Mlp(nn.Module):
    """``fc2(GELU(fc1 x))``: (..., D) -> (..., D)."""

    def __init__(
        self, dim: int, *, hidden_features: int, bias: bool = True, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_features, bias=bias, device=device)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, dim, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """``w3(SiLU(w1 x) * w2 x)``: (..., D) -> (..., D)."""

    def __init__(
        self, dim: int, *, hidden_features: int, bias: bool = True, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_features, bias=bias, device=device)
        self.w2 = nn.Linear(dim, hidden_features, bias=bias, device=device)
        self.w3 = nn.Linear(hidden_features, dim, bias=bias, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


def _add_residual(
    xs: list[Tensor],
    branch: Callable[[list[Tensor]], list[Tensor]],
    gamma: Tensor,
    *,
    drop_rate: float,
    training: bool,
) -> list[Tensor]:
    """``x + gamma * branch(x)`` (LayerScale ``gamma`` (D,)) for every crop set, with the official
    batch-subset stochastic depth.

    In training with ``drop_rate > 0`` only a random subset of ``max(int(B * (1 - rate)), 1)`` images of
    each crop set goes through the branch; its output is added back scaled by ``B / subset`` and the
    other images keep their input unchanged (cheaper than computing and zeroing whole residuals).
    """
    if not training or drop_rate <= 0.0:
        return [x + r * gamma.to(r.dtype) for x, r in zip(xs, branch(xs))]
    keep = [torch.randperm(x.shape[0], device=x.device)[: max(int(x.shape[0] * (1 - drop_rate)), 1)] for x in xs]
    residuals = branch([x[idx] for x, idx in zip(xs, keep)])
    out = []
    for x, idx, r in zip(xs, keep, residuals):
        scale = x.shape[0] / idx.numel()
        scaled = (r * gamma.to(r.dtype)).flatten(1).to(x.dtype)  # [subset, N*D]
        out.append(torch.index_add(x.flatten(1), 0, idx, scaled, alpha=scale).view_as(x))  # [B, N, D]
    return out


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1 x))`` then ``x + ls2(mlp(norm2 x))``.

    Takes a list of crop sets (B_i, N_i, D); attention runs per crop set, the feed-forward part on all
    tokens at once.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        ffn_layer: FfnLayer = "mlp",
        ffn_hidden_features: int,
        qkv_bias: bool = True,
        mask_k_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float = 1e-5,
        norm_eps: float = 1e-5,
        drop_path: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        self.attn = SelfAttention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, mask_k_bias=mask_k_bias, proj_bias=proj_bias, device=device
        )
        self.ls1 = LayerScale(dim, init_values=layerscale_init, device=device)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, device=device)
        ffn_cls = Mlp if ffn_layer == "mlp" else SwiGLUFFN
        self.mlp: nn.Module = ffn_cls(dim, hidden_features=ffn_hidden_features, bias=ffn_bias, device=device)
        self.ls2 = LayerScale(dim, init_values=layerscale_init, device=device)
        self.drop_path = drop_path

    # the branches stop before LayerScale, which _add_residual applies (only to the kept subset)
    def _attn_branch(self, xs: list[Tensor], ropes: Sequence[RopeTable | None]) -> list[Tensor]:
        return [self.attn(self.norm1(x), rope) for x, rope in zip(xs, ropes)]

    def _ffn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) == 1:
            return [self.mlp(self.norm2(xs[0]))]
        flat = torch.cat([x.flatten(0, 1) for x in xs])  # [sum_i B_i*N_i, D]
        out = self.mlp(self.norm2(flat))
        sizes = [x.shape[0] * x.shape[1] for x in xs]
        return [o.view_as(x) for o, x in zip(out.split(sizes), xs)]

    def forward(self, xs: list[Tensor], ropes: Sequence[RopeTable | None]) -> list[Tensor]:
        """Crop sets ``xs[i]`` (B_i, N_i, D) with RoPE tables ``ropes[i]`` (N_i, hd) -> same shapes."""
        xs = _add_residual(
            xs,
            lambda ys: self._attn_branch(ys, ropes),
            self.ls1.gamma,
            drop_rate=self.drop_path,
            training=self.training,
        )
        return _add_residual(xs, self._ffn_branch, self.ls2.gamma, drop_rate=self.drop_path, training=self.training)


class DinoVisionTransformer(nn.Module):
    """DINOv3 ViT (official layout). Build one with :func:`build_backbone` or a factory function.

    Args:
        patch_size: patch side in pixels.
        in_chans: input bands.
        embed_dim: token width ``D``.
        depth: number of blocks.
        num_heads: attention heads.
        ffn_ratio: feed-forward width ratio (for SwiGLU the official 2/3 rounding is applied).
        ffn_layer: ``"mlp"`` (GELU) or a SwiGLU variant (``"swiglu"`` aligns the width to 8, ``"swiglu64"`` to 64...).
        qkv_bias, proj_bias, ffn_bias: biases of the attention and feed-forward projections.
        mask_k_bias: keep a ``bias_mask`` buffer zeroing the key bias (official layout).
        layerscale_init: initial LayerScale value.
        norm_eps: epsilon of every LayerNorm.
        drop_path_rate: stochastic-depth rate (same for every block, batch-subset form).
        n_storage_tokens: register tokens after the class token.
        pos_embed_rope_base: RoPE period base.
        pos_embed_rope_shift_coords, pos_embed_rope_jitter_coords, pos_embed_rope_rescale_coords: training-only
            RoPE coordinate augmentations (see :mod:`dinov3_eo.models.rope`).
        untie_global_and_local_cls_norm: add ``local_cls_norm``, used in training for the class and
            register tokens of the second crop set (local crops) only.
        device: where to allocate parameters (``"meta"`` to count parameters without memory).

    Attributes:
        embed_dim, num_features, patch_size, n_storage_tokens, num_heads, n_blocks, blocks.
        grad_checkpointing: recompute each block in the backward pass (saves activation memory).
    """

    def __init__(
        self,
        *,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        ffn_layer: FfnLayer = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        mask_k_bias: bool = True,
        layerscale_init: float = 1e-5,
        norm_eps: float = 1e-5,
        drop_path_rate: float = 0.0,
        n_storage_tokens: int = 4,
        pos_embed_rope_base: float = 100.0,
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = 2.0,
        untie_global_and_local_cls_norm: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if ffn_layer != "mlp" and ffn_layer not in _SWIGLU_ALIGN:
            raise ValueError(f"Unknown ffn_layer {ffn_layer!r}; choose one of {['mlp', *_SWIGLU_ALIGN]}.")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}.")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}.")
        # the constructor arguments, so a model can be rebuilt or described (device excluded)
        self.arch: dict[str, Any] = {
            k: v for k, v in locals().items() if k not in ("self", "device", "__class__")
        }
        self.name = "custom"  # the registry name, set by build_backbone
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.n_storage_tokens = n_storage_tokens
        self.num_heads = num_heads
        self.n_blocks = depth
        self.grad_checkpointing = False
        if ffn_layer == "mlp":
            hidden = int(embed_dim * ffn_ratio)
        else:
            hidden = swiglu_hidden_features(embed_dim, ffn_ratio, _SWIGLU_ALIGN[ffn_layer])

        self.patch_embed = PatchEmbed(in_chans=in_chans, embed_dim=embed_dim, patch_size=patch_size, device=device)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim, device=device))
        self.storage_tokens = nn.Parameter(torch.empty(1, n_storage_tokens, embed_dim, device=device))
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim, device=device))
        self.rope_embed = RopePositionEmbedding(
            head_dim=embed_dim // num_heads,
            base=pos_embed_rope_base,
            shift_coords=pos_embed_rope_shift_coords,
            jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords,
            device=device,
        )
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads=num_heads,
                ffn_layer=ffn_layer,
                ffn_hidden_features=hidden,
                qkv_bias=qkv_bias,
                mask_k_bias=mask_k_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                layerscale_init=layerscale_init,
                norm_eps=norm_eps,
                drop_path=drop_path_rate,
                device=device,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps, device=device)
        self.local_cls_norm = (
            nn.LayerNorm(embed_dim, eps=norm_eps, device=device) if untie_global_and_local_cls_norm else None
        )
        self.init_weights()

    # ------------------------------------------------------------------ init
    def init_weights(self) -> None:
        """Official init: tokens N(0, 0.02), mask token 0, Linear trunc-normal(0.02) with zero bias,
        LayerScale 1e-5, patch embedding uniform, LayerNorm default, RoPE periods and ``bias_mask`` computed."""
        if self.cls_token.is_meta:
            return
        self.rope_embed.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.storage_tokens, std=0.02)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, LinearKMaskedBias):
                    module.reset_bias_mask()
            elif isinstance(module, (nn.LayerNorm, LayerScale, PatchEmbed)):
                module.reset_parameters()

    # ---------------------------------------------------------------- tokens
    def _check_size(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"DinoVisionTransformer expects images of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}."
            )
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"Image size {H}x{W} is not a multiple of the patch size {self.patch_size}; "
                f"crop or pad it to a multiple of {self.patch_size} first."
            )

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> tuple[Tensor, tuple[int, int]]:
        """(B, C, H, W) images and optional (B, h*w) bool masks -> (B, 1 + n_storage + h*w, D) tokens, (h, w).

        Masked patch embeddings are replaced by ``mask_token``.
        """
        self._check_size(x)
        patches = self.patch_embed(x)  # [B, h, w, D]
        B, h, w, D = patches.shape
        patches = patches.flatten(1, 2)  # [B, hw, D]
        if masks is not None:
            if masks.shape != (B, h * w):
                raise ValueError(f"masks must have shape (B, h*w) = {(B, h * w)}, got {tuple(masks.shape)}.")
            patches = torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype).unsqueeze(0), patches)
        prefix = torch.cat((self.cls_token, self.storage_tokens), dim=1).to(patches.dtype)  # [1, 1+S, D]
        return torch.cat((prefix.expand(B, -1, -1), patches), dim=1), (h, w)  # [B, 1+S+hw, D]

    def _rope_table(self, h: int, w: int) -> RopeTable:
        """RoPE (sin, cos) over the whole sequence, identity on the prefix tokens: 2 x (1+S+hw, hd)."""
        return self._rope_tables(h, w, 1)[0]

    def _rope_tables(self, h: int, w: int, count: int) -> list[RopeTable]:
        """``count`` RoPE tables as :meth:`_rope_table` gives them, each its own draw in training, made at once."""
        sin, cos = self.rope_embed.tables(H=h, W=w, count=count)  # [count, hw, hd]
        n_prefix = 1 + self.n_storage_tokens
        sin = F.pad(sin, (0, 0, n_prefix, 0), value=0.0)  # [count, 1+S+hw, hd]
        cos = F.pad(cos, (0, 0, n_prefix, 0), value=1.0)
        return list(zip(sin.unbind(0), cos.unbind(0)))

    def _run_blocks(
        self, xs: list[Tensor], grids: list[tuple[int, int]], *, keep: Sequence[int] = ()
    ) -> tuple[list[Tensor], list[list[Tensor]]]:
        """Run every block on the crop sets; also return the outputs of blocks whose index is in ``keep``."""
        kept: list[list[Tensor]] = []
        # Eval RoPE is deterministic: compute it once. In training a fresh draw per block, as upstream.
        count = len(self.blocks) if self.training else 1
        tables = [self._rope_tables(h, w, count) for h, w in grids]  # [grid][block]
        for i, block in enumerate(self.blocks):
            block_ropes = [per_block[i if self.training else 0] for per_block in tables]
            if self.grad_checkpointing and torch.is_grad_enabled():
                xs = checkpoint(block, xs, block_ropes, use_reentrant=False)
            else:
                xs = block(xs, block_ropes)
            if i in keep:
                kept.append(xs)
        return xs, kept

    # -------------------------------------------------------------- features
    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Normalised token groups.

        Args:
            x: images (B, C, H, W), or a list of crop batches (B_i, C, H_i, W_i) of different sizes that
                share the blocks (attention stays within each crop set).
            masks: (B, h*w) bool patch masks (True = replaced by ``mask_token``), or a list matching ``x``.

        Returns:
            dict (list of dicts for list input) with ``x_norm_clstoken`` (B, D), ``x_storage_tokens``
            (B, S, D), ``x_norm_patchtokens`` (B, h*w, D), ``x_prenorm`` (B, 1+S+h*w, D) and ``masks``.
        """
        is_list = isinstance(x, (list, tuple))
        images = list(x) if is_list else [x]
        if masks is None:
            mask_list: list[Tensor | None] = [None] * len(images)
        elif isinstance(masks, (list, tuple)):
            mask_list = list(masks)
        else:
            mask_list = [masks]
        if len(mask_list) != len(images):
            raise ValueError(f"Got {len(images)} crop sets but {len(mask_list)} mask entries.")
        prepared = [self.prepare_tokens_with_masks(im, m) for im, m in zip(images, mask_list)]
        xs, _ = self._run_blocks([t for t, _ in prepared], [g for _, g in prepared])
        n_prefix = 1 + self.n_storage_tokens
        outputs = []
        for idx, (tokens, m) in enumerate(zip(xs, mask_list)):
            if self.local_cls_norm is not None and self.training and idx == 1:
                prefix = self.local_cls_norm(tokens[:, :n_prefix])  # [B, 1+S, D]
                patches = self.norm(tokens[:, n_prefix:])  # [B, hw, D]
            else:
                normed = self.norm(tokens)  # [B, 1+S+hw, D]
                prefix, patches = normed[:, :n_prefix], normed[:, n_prefix:]
            outputs.append(
                {
                    "x_norm_clstoken": prefix[:, 0],
                    "x_storage_tokens": prefix[:, 1:],
                    "x_norm_patchtokens": patches,
                    "x_prenorm": tokens,
                    "masks": m,
                }
            )
        return outputs if is_list else outputs[0]

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        return_extra_tokens: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Outputs of selected blocks (official semantics).

        Args:
            x: images (B, C, H, W).
            n: an int takes the last ``n`` blocks; a sequence takes those 0-based block indices.
            reshape: return patch tokens as (B, D, h, w) instead of (B, h*w, D).
            return_class_token: pair each layer with its class token (B, D).
            return_extra_tokens: pair each layer with its register tokens (B, S, D).
            norm: apply the final ``norm`` to every selected layer.

        Returns:
            one entry per selected block, in block order: patch tokens, or tuples
            ``(patches, cls)``, ``(patches, registers)`` or ``(patches, cls, registers)``.

        Raises:
            IndexError: if a requested block index is out of range.
        """
        if isinstance(n, int):
            if not 1 <= n <= self.n_blocks:
                raise IndexError(f"n={n} must be between 1 and the number of blocks {self.n_blocks}.")
            indices = list(range(self.n_blocks - n, self.n_blocks))
        else:
            indices = [int(i) for i in n]
            bad = [i for i in indices if not 0 <= i < self.n_blocks]
            if bad:
                raise IndexError(f"Block indices {bad} are out of range for a {self.n_blocks}-block model.")
        tokens, (h, w) = self.prepare_tokens_with_masks(x)
        _, kept = self._run_blocks([tokens], [(h, w)], keep=set(indices))
        # `kept` is in block order; map each requested index to its output (duplicates allowed)
        by_index = dict(zip(sorted(set(indices)), (k[0] for k in kept)))
        layers = [by_index[i] for i in indices]
        if norm:
            layers = [self.norm(out) for out in layers]
        n_prefix = 1 + self.n_storage_tokens
        B = x.shape[0]
        cls_tokens = [out[:, 0] for out in layers]  # [B, D]
        extra_tokens = [out[:, 1:n_prefix] for out in layers]  # [B, S, D]
        patches = [out[:, n_prefix:] for out in layers]  # [B, hw, D]
        if reshape:
            patches = [p.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for p in patches]  # [B, D, h, w]
        if return_class_token and return_extra_tokens:
            return tuple(zip(patches, cls_tokens, extra_tokens))
        if return_class_token:
            return tuple(zip(patches, cls_tokens))
        if return_extra_tokens:
            return tuple(zip(patches, extra_tokens))
        return tuple(patches)

    def forward(self, x: Tensor | list[Tensor], *, is_training: bool = False, masks: Any = None) -> Any:
        """Normalised class token (B, D); with ``is_training=True`` the :meth:`forward_features` output."""
        features = self.forward_features(x, masks)
        if is_training:
            return features
        if isinstance(features, list):
            return [f["x_norm_clstoken"] for f in features]
        return features["x_norm_clstoken"]


# --------------------------------------------------------------------------- variants
def vitmicro16(**overrides: Any) -> DinoVisionTransformer:
    """Micro ViT for CPU tests: D 96, 4 blocks, 2 heads (head dim 48), MLP ratio 4."""
    return DinoVisionTransformer(**{"embed_dim": 96, "depth": 4, "num_heads": 2, **overrides})


def vitt16(**overrides: Any) -> DinoVisionTransformer:
    """Tiny ViT for quick CPU runs: D 192, 12 blocks, 3 heads, MLP ratio 4 (timm's DINOv3-T shape)."""
    return DinoVisionTransformer(**{"embed_dim": 192, "depth": 12, "num_heads": 3, **overrides})


def vits16(**overrides: Any) -> DinoVisionTransformer:
    """ViT-S/16: D 384, 12 blocks, 6 heads, MLP 1536 (21.6 M parameters)."""
    return DinoVisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **overrides})


def vits16plus(**overrides: Any) -> DinoVisionTransformer:
    """ViT-S+/16: D 384, 12 blocks, 6 heads, SwiGLU ratio 6 (28.7 M parameters)."""
    return DinoVisionTransformer(
        **{"embed_dim": 384, "depth": 12, "num_heads": 6, "ffn_ratio": 6.0, "ffn_layer": "swiglu", **overrides}
    )


def vitb16(**overrides: Any) -> DinoVisionTransformer:
    """ViT-B/16: D 768, 12 blocks, 12 heads, MLP 3072 (85.7 M parameters)."""
    return DinoVisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **overrides})


def vitl16(**overrides: Any) -> DinoVisionTransformer:
    """ViT-L/16: D 1024, 24 blocks, 16 heads, MLP 4096 (303 M parameters). SAT-493M adds ``local_cls_norm``."""
    return DinoVisionTransformer(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **overrides})


def vitl16plus(**overrides: Any) -> DinoVisionTransformer:
    """ViT-L+/16: D 1024, 24 blocks, 16 heads, SwiGLU ratio 6."""
    return DinoVisionTransformer(
        **{"embed_dim": 1024, "depth": 24, "num_heads": 16, "ffn_ratio": 6.0, "ffn_layer": "swiglu", **overrides}
    )


def vith16plus(**overrides: Any) -> DinoVisionTransformer:
    """ViT-H+/16: D 1280, 32 blocks, 20 heads, SwiGLU ratio 6 (841 M parameters)."""
    return DinoVisionTransformer(
        **{"embed_dim": 1280, "depth": 32, "num_heads": 20, "ffn_ratio": 6.0, "ffn_layer": "swiglu", **overrides}
    )


def vit7b16(**overrides: Any) -> DinoVisionTransformer:
    """ViT-7B/16: D 4096, 40 blocks, 32 heads (head dim 128), SwiGLU ratio 3 aligned to 64, no q/k/v bias,
    ``local_cls_norm`` (6.7 B parameters)."""
    return DinoVisionTransformer(
        **{
            "embed_dim": 4096,
            "depth": 40,
            "num_heads": 32,
            "ffn_ratio": 3.0,
            "ffn_layer": "swiglu64",
            "qkv_bias": False,
            "untie_global_and_local_cls_norm": True,
            **overrides,
        }
    )


#: name -> factory; the one place variants are listed.
BACKBONES: dict[str, Callable[..., DinoVisionTransformer]] = {
    "vitmicro16": vitmicro16,
    "vitt16": vitt16,
    "vits16": vits16,
    "vits16plus": vits16plus,
    "vitb16": vitb16,
    "vitl16": vitl16,
    "vitl16plus": vitl16plus,
    "vith16plus": vith16plus,
    "vit7b16": vit7b16,
}


def build_backbone(name: str, in_chans: int = 3, **overrides: Any) -> DinoVisionTransformer:
    """Build a randomly initialised backbone by registry name.

    Args:
        name: one of :data:`BACKBONES` (``vits16``, ``vitl16``, ``vitmicro16``, ...).
        in_chans: number of input bands.
        **overrides: constructor arguments of :class:`DinoVisionTransformer` (``depth``, ``drop_path_rate``,
            ``device="meta"``, ...).

    Raises:
        ValueError: if ``name`` is not registered.
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    model = BACKBONES[name](in_chans=in_chans, **overrides)
    model.name = name
    return model
