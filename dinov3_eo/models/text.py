"""dino.txt-style text alignment on a frozen DINOv3 backbone.

Image side (:class:`VisionAdapter`): the backbone's last-layer, normed tokens ``[cls | registers | patches]`` go
through a few trainable transformer blocks *without* RoPE and a final LayerNorm over all tokens. The image
embedding is ``concat[cls_out, mean(patch_out)]`` (width ``2·D``); the adapted patch tokens are the dense
embeddings that open-vocabulary maps are made from.

Text side (:class:`TextTower`): any OpenCLIP text transformer (a model-config name such as ``"ViT-B-32"`` or a
``CLIPTextCfg``-style dict), from scratch or initialised from a local OpenCLIP checkpoint, optionally frozen
(LiT-style), pooled at the end-of-text token, then a bias-free linear projection to ``2·D``. Tokenisation is
the CLIP BPE that ships inside open_clip, so nothing is fetched from a hub.

:class:`TextAlignedModel` joins the two with a learnable logit scale and implements the official dense recipe:
patch tokens are compared with the *second half* of the text embedding (the half aligned with the mean of the
patch tokens), after prompt-template ensembling.

Official dino.txt checkpoints (vision head + text encoder, ``dinov3_vitl16_dinotxt_*``) map onto a model built
with :func:`build_dinotxt_model`; :func:`load_dinotxt_state_dict` and :func:`export_dinotxt_state_dict` convert
between the two key layouts strictly.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import LayerNorm as OpenClipLayerNorm
from open_clip.transformer import QuickGELU, TextTransformer
from torch import Tensor, nn

from dinov3_eo.models.hub import read_checkpoint
from dinov3_eo.models.vit import Block, LayerScale, swiglu_hidden_features
from dinov3_eo.tasks.prompts import validate_templates

__all__ = [
    "DINOTXT_TEXT_CFG",
    "TextAlignedModel",
    "TextDenseEncoder",
    "TextImageEncoder",
    "TextTower",
    "VisionAdapter",
    "build_dinotxt_model",
    "clip_tokenizer",
    "export_dinotxt_state_dict",
    "load_dinotxt_state_dict",
    "load_openclip_text_state_dict",
]

#: CLIP BPE special tokens (open_clip / OpenAI vocabulary).
SOT_TOKEN = 49406
EOT_TOKEN = 49407
CLIP_VOCAB_SIZE = 49408

#: The official dino.txt text tower ("tet1280d20h24l") as an OpenCLIP text config.
DINOTXT_TEXT_CFG: dict[str, Any] = {
    "context_length": 77,
    "vocab_size": CLIP_VOCAB_SIZE,
    "width": 1280,
    "heads": 20,
    "layers": 24,
    "mlp_ratio": 4.0,
    "pool_type": "argmax",
}

_SWIGLU_ALIGN = {"swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}
_FFN_LAYERS = ("mlp", *_SWIGLU_ALIGN)


# --------------------------------------------------------------------------------------------------------------
# Vision side
# --------------------------------------------------------------------------------------------------------------


class VisionAdapter(nn.Module):
    """The dino.txt image side: a (frozen) DINOv3 backbone plus a trainable head of transformer blocks.

    The head blocks are the backbone's own pre-norm :class:`~dinov3_eo.models.vit.Block` (official parameter names
    ``norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.{w1,w2,w3|fc1,fc2}, ls2.gamma``), run **without RoPE**
    (every token, class and registers included, is treated alike) and with no q/k/v bias, followed by a
    LayerNorm ``ln_final`` over all tokens.

    The backbone must offer the official ``get_intermediate_layers`` and the attributes ``embed_dim``,
    ``patch_size``, ``n_storage_tokens`` and ``num_heads``.

    Args:
        backbone: the DINOv3 ViT.
        n_blocks: head blocks (official: 2).
        num_heads: head-block attention heads (default: the backbone's).
        ffn_layer: ``"mlp"`` (GELU) or ``"swiglu"``/``"swiglu32"``/``"swiglu64"``/``"swiglu128"`` (SwiGLU with that
            hidden-width alignment; official ``"swiglu64"``: hidden 2752 for ``D = 1024``).
        ffn_ratio: hidden width over ``D`` before the SwiGLU 2/3 rule (official 4).
        layerscale_init: initial LayerScale value (official 1e-5).
        drop_path: stochastic-depth rate of the head blocks in training (official 0.3; batch-subset form).
        norm_eps: LayerNorm epsilon (official 1e-5).
        freeze_backbone: keep the backbone's weights fixed and in eval mode, and run it without autograd.
        device: where to allocate the head.

    Raises:
        TypeError: if the backbone lacks the attributes above.
        ValueError: on an unknown ``ffn_layer``, a negative ``n_blocks`` or a width the heads do not divide.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        n_blocks: int = 2,
        num_heads: int | None = None,
        ffn_layer: str = "swiglu64",
        ffn_ratio: float = 4.0,
        layerscale_init: float = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        freeze_backbone: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        for attr in ("embed_dim", "patch_size", "n_storage_tokens", "num_heads", "get_intermediate_layers"):
            if not hasattr(backbone, attr):
                raise TypeError(f"VisionAdapter: the backbone ({type(backbone).__name__}) has no {attr!r}.")
        if n_blocks < 0:
            raise ValueError(f"VisionAdapter: n_blocks={n_blocks} must be >= 0.")
        if ffn_layer not in _FFN_LAYERS:
            raise ValueError(f"VisionAdapter: ffn_layer={ffn_layer!r} is not one of {_FFN_LAYERS}.")
        self.backbone = backbone
        self.embed_dim = int(backbone.embed_dim)
        self.patch_size = int(backbone.patch_size)
        self.n_storage_tokens = int(backbone.n_storage_tokens)
        self.freeze_backbone = freeze_backbone
        heads = int(num_heads if num_heads is not None else backbone.num_heads)
        if self.embed_dim % heads:
            raise ValueError(f"VisionAdapter: width {self.embed_dim} is not divisible by num_heads={heads}.")
        if ffn_layer == "mlp":
            hidden = int(self.embed_dim * ffn_ratio)
        else:
            hidden = swiglu_hidden_features(self.embed_dim, ffn_ratio, _SWIGLU_ALIGN[ffn_layer])
        self.blocks = nn.ModuleList(
            Block(
                self.embed_dim,
                num_heads=heads,
                ffn_layer=ffn_layer,
                ffn_hidden_features=hidden,
                qkv_bias=False,
                mask_k_bias=False,
                layerscale_init=layerscale_init,
                norm_eps=norm_eps,
                drop_path=drop_path,
                device=device,
            )
            for _ in range(n_blocks)
        )
        self.ln_final = nn.LayerNorm(self.embed_dim, eps=norm_eps, device=device)
        self.reset_parameters()
        if freeze_backbone:
            self.backbone.requires_grad_(False)
        # the modes train() sets, set now: Lightning (2.x) does not call train() when a fit starts, and load_backbone
        # returns eval mode (a fine-tuned backbone must train)
        self.train(self.training)

    def reset_parameters(self) -> None:
        """Official ViT init of the head (the backbone is left alone): Linear weights trunc-normal(0.02) with zero
        bias, LayerNorm default, LayerScale at its initial value."""
        for module in [*self.blocks.modules(), self.ln_final]:
            if module.__class__ is nn.Linear and not module.weight.is_meta:
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, LayerScale)) and not next(module.parameters()).is_meta:
                module.reset_parameters()

    def train(self, mode: bool = True) -> VisionAdapter:
        super().train(mode)
        if self.freeze_backbone:
            # A frozen backbone behaves as at inference (no RoPE rescale, no drop-path), as in dino.txt.
            self.backbone.eval()
        return self

    def backbone_tokens(self, x: Tensor) -> Tensor:
        """Last-layer normed backbone tokens ``[cls | registers | patches]``.

        Args:
            x: ``[B, C, H, W]`` normalised images (H, W multiples of the patch size).

        Returns:
            ``[B, 1 + R + h·w, D]``.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            ((patches, cls, registers),) = self.backbone.get_intermediate_layers(
                x, n=1, return_class_token=True, return_extra_tokens=True, norm=True
            )
        return torch.cat([cls[:, None], registers, patches], dim=1)  # [B, 1+R+HW, D]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Adapted class and patch tokens (not normalised).

        Args:
            x: ``[B, C, H, W]`` normalised images.

        Returns:
            ``(cls [B, D], patches [B, D, h, w])`` with ``h = H // patch_size``, ``w = W // patch_size``.
        """
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        tokens = self.backbone_tokens(x)  # [B, 1+R+HW, D]
        for block in self.blocks:
            # the backbone's blocks take lists of crop sets with RoPE tables; None = no RoPE
            (tokens,) = block([tokens], [None])
        tokens = self.ln_final(tokens)
        prefix = 1 + self.n_storage_tokens
        patches = tokens[:, prefix:]  # [B, HW, D]
        if patches.shape[1] != h * w:
            raise ValueError(
                f"VisionAdapter: got {patches.shape[1]} patch tokens for a {h}x{w} grid from input {tuple(x.shape)}."
            )
        patches = patches.transpose(1, 2).reshape(x.shape[0], self.embed_dim, h, w)  # [B, D, h, w]
        return tokens[:, 0], patches


# --------------------------------------------------------------------------------------------------------------
# Text side
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def clip_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """The CLIP BPE tokenizer bundled with open_clip (offline; pads with 0, ``<|startoftext|>`` = 49406,
    ``<|endoftext|>`` = 49407; lower-cases and cleans text; truncates keeping the end token)."""
    return SimpleTokenizer(context_length=context_length)


def _resolve_text_cfg(text_cfg: str | Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """A text config dict (CLIPTextCfg fields) and the quick-GELU flag, from a model-config name or a dict."""
    import open_clip

    if isinstance(text_cfg, str):
        model_cfg = open_clip.get_model_config(text_cfg)
        if model_cfg is None or "text_cfg" not in model_cfg:
            raise ValueError(
                f"text_cfg={text_cfg!r} is not an OpenCLIP model config name (see open_clip.list_models())."
            )
        cfg = dict(model_cfg["text_cfg"])
        quick_gelu = bool(model_cfg.get("quick_gelu", False))
    else:
        cfg = dict(text_cfg)
        quick_gelu = bool(cfg.pop("quick_gelu", False))
    if cfg.get("hf_model_name"):
        raise ValueError(
            f"text_cfg uses the Hugging Face text tower {cfg['hf_model_name']!r}; only OpenCLIP text transformers "
            "(CLIP BPE tokenizer, no hub download) are supported."
        )
    if cfg.get("vocab_size", CLIP_VOCAB_SIZE) != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"text_cfg vocab_size={cfg['vocab_size']} does not match the CLIP BPE vocabulary ({CLIP_VOCAB_SIZE})."
        )
    return cfg, quick_gelu


def load_openclip_text_state_dict(path: str | PathLike[str]) -> dict[str, Tensor]:
    """The text-tower weights of a local OpenCLIP checkpoint, keyed as in ``open_clip.transformer.TextTransformer``.

    Accepts ``.pt``/``.pth``/``.bin`` (optionally wrapped in ``{"state_dict": ...}``, keys optionally prefixed with
    ``module.``) and ``.safetensors``; both the ``CLIP`` layout (text keys at the top level) and the
    ``CustomTextCLIP`` layout (``text.`` prefix). The CLIP ``text_projection`` is dropped: it maps to the CLIP
    embedding width, not to this model's.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file holds no OpenCLIP text tower or cannot be read (a ``CheckpointError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"OpenCLIP checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Mapping[str, Any] = load_file(str(path))
    else:
        state = read_checkpoint(path, "OpenCLIP checkpoint")  # weights_only, and one sentence for a corrupt file
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
    keys = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("text.transformer.") for k in keys):  # CustomTextCLIP
        keys = {k.removeprefix("text."): v for k, v in keys.items() if k.startswith("text.")}
    text_roots = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "cls_emb")
    text = {k: v for k, v in keys.items() if k.startswith(text_roots)}
    if "token_embedding.weight" not in text:
        raise ValueError(f"{str(path)!r} holds no OpenCLIP text tower (no 'token_embedding.weight' key).")
    return text


class TextTower(nn.Module):
    """An OpenCLIP text transformer, EOT pooling, and a bias-free projection to the image embedding width.

    Args:
        text_cfg: an OpenCLIP model-config name (its ``text_cfg`` is used, e.g. ``"ViT-B-32"``) or a dict of
            ``open_clip.model.CLIPTextCfg`` fields (plus optional ``"quick_gelu"``). Any projection it declares is
            replaced by :attr:`projection`.
        output_dim: the embedding width (``2·D`` of the vision side).
        checkpoint: optional local OpenCLIP checkpoint whose text-tower weights initialise the encoder.
        freeze: keep the encoder fixed (LiT-style; unseen words keep the pretrained tower's knowledge); the
            projection stays trainable.
        qkv_bias: give the attention input projection a bias (OpenCLIP: yes; official dino.txt: no).

    Raises:
        ValueError: on an unusable config or a checkpoint that does not fit it.
    """

    def __init__(
        self,
        *,
        text_cfg: str | Mapping[str, Any] = "ViT-B-32",
        output_dim: int,
        checkpoint: str | PathLike[str] | None = None,
        freeze: bool = False,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        cfg, quick_gelu = _resolve_text_cfg(text_cfg)
        self.text_cfg = {**cfg, "quick_gelu": quick_gelu}
        # output_dim=0 leaves the encoder without its own projection; ours follows.
        build_cfg = {**cfg, "proj_type": "none"}
        norm_kwargs = build_cfg.pop("norm_kwargs", None) or {}
        act_kwargs = build_cfg.pop("act_kwargs", None) or {}
        for unused in ("hf_model_name", "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "hf_tokenizer_name",
                       "tokenizer_mode", "tokenizer_kwargs", "output_tokens", "proj_bias", "final_ln_after_pool"):
            build_cfg.pop(unused, None)
        act = QuickGELU if quick_gelu else nn.GELU
        self.encoder = TextTransformer(
            output_dim=0,
            act_layer=functools.partial(act, **act_kwargs) if act_kwargs else act,
            norm_layer=functools.partial(OpenClipLayerNorm, **norm_kwargs) if norm_kwargs else OpenClipLayerNorm,
            **build_cfg,
        )
        self.qkv_bias = qkv_bias
        if not qkv_bias:
            for block in self.encoder.transformer.resblocks:
                # nn.MultiheadAttention accepts a missing input bias; the output projection keeps its bias.
                block.attn.register_parameter("in_proj_bias", None)
        self.context_length = int(self.encoder.context_length)
        self.width = int(self.encoder.width)
        self.output_dim = int(output_dim)
        self.projection = nn.Linear(self.width, self.output_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=self.width**-0.5)
        if checkpoint is not None:
            self.load_openclip_checkpoint(checkpoint)
        self.frozen = freeze
        if freeze:
            self.encoder.requires_grad_(False)
        # the frozen encoder in eval mode now (train() below): Lightning (2.x) does not call train() when a fit starts
        self.train(self.training)

    def load_openclip_checkpoint(self, path: str | PathLike[str]) -> None:
        """Initialise the encoder from a local OpenCLIP checkpoint (strict on the text-tower keys).

        Raises:
            ValueError: if the checkpoint's text tower does not match this config (missing/unexpected keys, shapes).
        """
        state = load_openclip_text_state_dict(path)
        expected = self.encoder.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"OpenCLIP checkpoint {str(path)!r} does not fit text_cfg: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}."
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise ValueError(
                    f"OpenCLIP checkpoint {str(path)!r}: {key} has shape {tuple(value.shape)}, "
                    f"the text tower expects {tuple(expected[key].shape)}."
                )
        self.encoder.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """CLIP BPE token ids ``[T, context_length]`` (int64) on the tower's device.

        Raises:
            TypeError: if ``texts`` is a bare string or holds a non-string.
        """
        if isinstance(texts, str):
            raise TypeError(f"texts must be a list of strings, not the single string {texts!r}.")
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must hold only strings.")
        tokens = clip_tokenizer(self.context_length)(texts)  # [T, ctx]
        # non_blocking: a blocking copy to a GPU would first wait for every queued kernel (a sync per step)
        return tokens.to(self.projection.weight.device, non_blocking=True)

    def forward(self, tokens: Tensor) -> Tensor:
        """Projected text features (not normalised).

        Args:
            tokens: ``[T, context_length]`` int64 token ids.

        Returns:
            ``[T, output_dim]``.
        """
        if tokens.ndim != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be [T, {self.context_length}], got shape {tuple(tokens.shape)}.")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            pooled = self.encoder(tokens)  # [T, width]
        return self.projection(pooled)


# --------------------------------------------------------------------------------------------------------------
# The aligned model
# --------------------------------------------------------------------------------------------------------------

#: Bounds of the learnable log inverse temperature: scale in [1, 100].
LOGIT_SCALE_MAX = math.log(100.0)


class TextAlignedModel(nn.Module):
    """A DINOv3 backbone aligned with a text encoder, dino.txt style.

    Args:
        backbone: the DINOv3 ViT (frozen by default).
        text_cfg, text_checkpoint, freeze_text, text_qkv_bias: see :class:`TextTower`.
        n_blocks, num_heads, ffn_layer, ffn_ratio, layerscale_init, drop_path, norm_eps, freeze_backbone:
            see :class:`VisionAdapter`.
        init_logit_scale: initial log inverse temperature (official ``ln(1/0.07)``).

    Attributes:
        vision: :class:`VisionAdapter` (``D`` = backbone width); text: :class:`TextTower` (output ``2·D``);
        logit_scale: ``[1]`` parameter; embed_dim: ``2·D``; patch_dim: ``D``.
    """

    def __init__(
        self,
        *,
        backbone: nn.Module,
        text_cfg: str | Mapping[str, Any] = "ViT-B-32",
        text_checkpoint: str | PathLike[str] | None = None,
        freeze_text: bool = False,
        text_qkv_bias: bool = True,
        n_blocks: int = 2,
        num_heads: int | None = None,
        ffn_layer: str = "swiglu64",
        ffn_ratio: float = 4.0,
        layerscale_init: float = 1e-5,
        drop_path: float = 0.0,
        norm_eps: float = 1e-5,
        freeze_backbone: bool = True,
        init_logit_scale: float = math.log(1 / 0.07),
    ) -> None:
        super().__init__()
        self.vision = VisionAdapter(
            backbone=backbone,
            n_blocks=n_blocks,
            num_heads=num_heads,
            ffn_layer=ffn_layer,
            ffn_ratio=ffn_ratio,
            layerscale_init=layerscale_init,
            drop_path=drop_path,
            norm_eps=norm_eps,
            freeze_backbone=freeze_backbone,
        )
        self.patch_dim = self.vision.embed_dim
        self.embed_dim = 2 * self.patch_dim
        self.text = TextTower(
            text_cfg=text_cfg,
            output_dim=self.embed_dim,
            checkpoint=text_checkpoint,
            freeze=freeze_text,
            qkv_bias=text_qkv_bias,
        )
        self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp ``logit_scale`` to ``[0, ln 100]`` in place; call after every optimiser step."""
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    # ---- images ----------------------------------------------------------------------------------------------
    def encode_image_and_dense(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Both image outputs from one forward pass.

        Args:
            x: ``[B, C, H, W]`` normalised images.

        Returns:
            ``(image_emb [B, 2D], dense [B, D, h, w])``, both L2-normalised (over ``2D`` and over ``D``).
        """
        cls, patches = self.vision(x)  # [B, D], [B, D, h, w]
        image = torch.cat([cls, patches.mean(dim=(2, 3))], dim=1)  # [B, 2D]
        return F.normalize(image, dim=1), F.normalize(patches, dim=1)

    def encode_image(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, 2D]`` L2-normalised ``concat[cls_out, mean(patch_out)]``."""
        return self.encode_image_and_dense(x)[0]

    def encode_dense(self, x: Tensor) -> Tensor:
        """``[B, C, H, W] -> [B, D, h, w]`` adapted patch tokens, L2-normalised over ``D``."""
        _, patches = self.vision(x)
        return F.normalize(patches, dim=1)

    # ---- texts -----------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """``list[str] -> [T, context_length]`` CLIP BPE token ids."""
        return self.text.tokenize(texts)

    def encode_text(self, texts: Sequence[str] | Tensor) -> Tensor:
        """``T`` strings (or ``[T, context_length]`` token ids) -> ``[T, 2D]`` L2-normalised text embeddings."""
        tokens = texts if isinstance(texts, Tensor) else self.tokenize(texts)
        return F.normalize(self.text(tokens), dim=1)

    def forward(self, images: Tensor, texts: Sequence[str] | Tensor) -> tuple[Tensor, Tensor]:
        """``(encode_image(images) [B, 2D], encode_text(texts) [B, 2D])`` for the contrastive loss."""
        return self.encode_image(images), self.encode_text(texts)

    def text_embeddings_for_classes(
        self,
        class_names: Sequence[str],
        templates: Sequence[str] | None = None,
        *,
        part: Literal["full", "patch", "cls"] = "full",
        batch_size: int = 256,
    ) -> Tensor:
        """Prompt-ensembled class embeddings.

        Every (class, template) caption is embedded; the chosen part (``"full"`` = all ``2D``, ``"patch"`` = the
        second half ``[D:]`` aligned with the mean patch token, ``"cls"`` = the first half) is L2-normalised per
        caption, averaged over templates and renormalised — the official zero-shot/dense recipe.

        Args:
            class_names: ``K`` class names.
            templates: templates with one ``{}`` each (default: just ``"{}"``, the bare name).
            part: which part of the text embedding to ensemble.
            batch_size: captions encoded per forward pass.

        Returns:
            ``[K, 2D]`` for ``part="full"``, else ``[K, D]``.

        Raises:
            ValueError: on an empty class list, a malformed template or an unknown ``part``.
        """
        names = [class_names] if isinstance(class_names, str) else list(class_names)
        if not names:
            raise ValueError("class_names is empty.")
        if part not in ("full", "patch", "cls"):
            raise ValueError(f"part={part!r} is not one of ('full', 'patch', 'cls').")
        temps = validate_templates(templates if templates is not None else ("{}",))
        captions = [t.format(name) for name in names for t in temps]  # class-major: [K·M]
        chunks = [self.text(self.tokenize(captions[i : i + batch_size])) for i in range(0, len(captions), batch_size)]
        emb = torch.cat(chunks).reshape(len(names), len(temps), self.embed_dim)  # [K, M, 2D]
        if part == "patch":
            emb = emb[..., self.patch_dim :]  # [K, M, D]
        elif part == "cls":
            emb = emb[..., : self.patch_dim]  # [K, M, D]
        return F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)

    def dense_scores(
        self, x: Tensor, texts: Sequence[str] | Tensor, *, templates: Sequence[str] | None = None
    ) -> Tensor:
        """Cosine maps between the adapted patch tokens and text queries (official dense recipe).

        Args:
            x: ``[B, C, H, W]`` normalised images.
            texts: ``T`` query strings (prompt-ensembled over ``templates``), or text embeddings ``[T, 2D]``
                (their patch half ``[:, D:]`` is used, renormalised) or ``[T, D]`` (used as the patch half).
            templates: templates for string queries (default: the bare name).

        Returns:
            ``[B, T, h, w]`` cosine similarities in ``[-1, 1]`` at patch resolution.

        Raises:
            ValueError: if a text-embedding tensor has neither ``2D`` nor ``D`` columns.
        """
        if isinstance(texts, Tensor):
            if texts.ndim != 2 or texts.shape[1] not in (self.embed_dim, self.patch_dim):
                raise ValueError(
                    f"text embeddings must be [T, {self.embed_dim}] or [T, {self.patch_dim}], got {tuple(texts.shape)}."
                )
            patch_text = texts[:, -self.patch_dim :]  # the second half when 2D wide
            patch_text = F.normalize(patch_text, dim=1)
        else:
            patch_text = self.text_embeddings_for_classes(texts, templates, part="patch")  # [T, D]
        dense = self.encode_dense(x)  # [B, D, h, w]
        return torch.einsum("bdyx,td->btyx", dense, patch_text.to(dense.dtype))


class TextImageEncoder(nn.Module):
    """A text model's image side as a backbone: ``forward_features`` gives the adapted class and patch tokens (the
    :class:`VisionAdapter`'s outputs, which the text embeddings were aligned with) under the backbone's keys
    ``x_norm_clstoken`` ``[B, D]`` and ``x_norm_patchtokens`` ``[B, h·w, D]``, so that chip and tile embeddings made
    through it are dino.txt's image embedding (``concat[cls, mean(patches)]``, normalised together).

    ``patch_size``, ``embed_dim`` and ``patch_embed`` are the backbone's (what the embedding code reads); ``meta``
    is the given metadata (a loaded text model's), else the backbone's.
    """

    def __init__(self, model: TextAlignedModel, meta: Any = None) -> None:
        super().__init__()
        self.vision = model.vision
        backbone = model.vision.backbone
        self.patch_size, self.embed_dim = int(model.vision.patch_size), int(model.vision.embed_dim)
        self.patch_embed = backbone.patch_embed
        self.meta = meta if meta is not None else getattr(backbone, "meta", None)

    def forward_features(self, x: Tensor) -> dict[str, Tensor]:
        """``[B, C, H, W]`` normalised images -> adapted ``{"x_norm_clstoken": [B, D], "x_norm_patchtokens": [B, h·w, D]}``."""
        cls, patches = self.vision(x)  # [B, D], [B, D, h, w]
        return {"x_norm_clstoken": cls, "x_norm_patchtokens": patches.flatten(2).transpose(1, 2)}


class TextDenseEncoder(nn.Module):
    """A text model's image side as a streaming backbone for its dense recipe: ``get_intermediate_layers`` gives the
    L2-normalised adapted patch tokens (:meth:`TextAlignedModel.encode_dense`), so that a region's mean of them,
    dotted with a query's patch-half text embedding, is the mean of that query's cosine over the region's patches
    (what ``embed --zones`` and :meth:`~dinov3_eo.tasks.openvocab.MapQuery.zones` average per polygon).

    ``patch_size`` and ``patch_embed`` are the backbone's, ``embed_dim`` the adapted tokens' width; ``meta`` as
    :class:`TextImageEncoder`'s.
    """

    #: what a zone table made through it records as its features (not a backbone's ``patch_mean``)
    feature_kind = "text_patch_mean"

    def __init__(self, model: TextAlignedModel, meta: Any = None) -> None:
        super().__init__()
        self.model = model
        backbone = model.vision.backbone
        self.patch_size, self.embed_dim = int(model.vision.patch_size), int(model.patch_dim)
        self.patch_embed = backbone.patch_embed
        self.meta = meta if meta is not None else getattr(backbone, "meta", None)

    @property
    def fingerprint_source(self) -> nn.Module:
        """The module whose weights make the features (the backbone and the adapter; not the text tower)."""
        return self.model.vision

    def get_intermediate_layers(self, x: Tensor, n: int = 1, *, reshape: bool = True, norm: bool = True) -> tuple[Tensor]:
        """``[B, C, H, W]`` normalised images -> ``([B, D, h, w],)``: the last adapted layer's patch tokens, each of
        unit length (``n``, ``norm`` accepted for the backbone's signature; only ``n = 1``, ``reshape`` exists)."""
        if n != 1 or not reshape:
            raise ValueError("TextDenseEncoder gives the last adapted layer only, reshaped: n=1, reshape=True.")
        return (self.model.encode_dense(x),)


def build_dinotxt_model(
    backbone: nn.Module,
    *,
    text_overrides: Mapping[str, Any] | None = None,
    drop_path: float = 0.0,
    freeze_text: bool = False,
) -> TextAlignedModel:
    """A :class:`TextAlignedModel` configured as the official dino.txt (``dinov3_vitl16_dinotxt_tet1280d20h24l``).

    Vision head: 2 blocks, heads = backbone heads, SwiGLU align 64 (hidden 2752 for D=1024), LayerScale 1e-5, no qkv
    bias, LayerNorm eps 1e-5; text: :data:`DINOTXT_TEXT_CFG` (causal, GELU, argmax pooling, no qkv bias) projected to
    ``2·D``. ``text_overrides`` changes text fields (e.g. ``{"layers": 2, "width": 64, "heads": 4}`` for tests);
    the official key mapping does not depend on depth or widths. The official head was aligned to the web (LVD)
    ViT-L; on other backbones its weights are meaningless.
    """
    return TextAlignedModel(
        backbone=backbone,
        text_cfg={**DINOTXT_TEXT_CFG, **(text_overrides or {})},
        freeze_text=freeze_text,
        text_qkv_bias=False,
        n_blocks=2,
        ffn_layer="swiglu64",
        ffn_ratio=4.0,
        layerscale_init=1e-5,
        drop_path=drop_path,
        norm_eps=1e-5,
    )


# --------------------------------------------------------------------------------------------------------------
# Official dino.txt key layout
# --------------------------------------------------------------------------------------------------------------

_TEXT_BLOCK_RENAMES = (  # ours (open_clip) -> official, inside text blocks
    ("ln_1.", "attention_norm."),
    ("attn.in_proj_weight", "attention.qkv.weight"),
    ("attn.out_proj.", "attention.proj."),
    ("ln_2.", "ffn_norm."),
    ("mlp.c_fc.", "feed_forward.fc1."),
    ("mlp.c_proj.", "feed_forward.fc2."),
)
_TEXT_BLOCK = re.compile(r"^text\.encoder\.transformer\.resblocks\.(\d+)\.(.+)$")


def _official_key(ours: str) -> str:
    """Our state-dict key -> the official dino.txt key.

    Raises:
        ValueError: for a parameter the official layout has no place for (e.g. a text qkv bias or LayerScale).
    """
    if ours == "logit_scale":
        return ours
    if ours.startswith("vision.backbone."):
        return "visual_model.backbone." + ours.removeprefix("vision.backbone.")
    if ours.startswith(("vision.blocks.", "vision.ln_final.")):
        return "visual_model.head." + ours.removeprefix("vision.")
    if ours == "text.projection.weight":
        return "text_model.head.linear_projection.weight"
    if ours in ("text.encoder.token_embedding.weight", "text.encoder.positional_embedding") or ours.startswith(
        "text.encoder.ln_final."
    ):
        return "text_model.backbone." + ours.removeprefix("text.encoder.")
    match = _TEXT_BLOCK.match(ours)
    if match:
        index, rest = match.groups()
        for src, dst in _TEXT_BLOCK_RENAMES:
            if rest.startswith(src):
                return f"text_model.backbone.blocks.{index}.{dst}{rest.removeprefix(src)}"
    raise ValueError(
        f"{ours!r} has no counterpart in the official dino.txt layout; build the model with build_dinotxt_model()."
    )


def _key_map(model: TextAlignedModel, *, include_backbone: bool) -> dict[str, str]:
    """``{official key: our key}`` for every persistent entry of ``model`` that the official file holds."""
    ours = [k for k in model.state_dict() if include_backbone or not k.startswith("vision.backbone.")]
    return {_official_key(k): k for k in ours}


def export_dinotxt_state_dict(model: TextAlignedModel, *, include_backbone: bool = False) -> dict[str, Tensor]:
    """``model``'s vision head, text tower and logit scale in the official dino.txt key layout.

    Args:
        model: a model built with :func:`build_dinotxt_model` (any depth/width).
        include_backbone: also export the backbone as ``visual_model.backbone.*`` (the official file has no
            backbone; it loads on top of the separately released ViT).

    Returns:
        ``{official key: tensor}`` (tensors detached, shared with the model).

    Raises:
        ValueError: if the model has parameters the official layout cannot hold.
    """
    state = model.state_dict()
    key_map = _key_map(model, include_backbone=include_backbone)
    return {official: state[ours].detach() for official, ours in key_map.items()}


def load_dinotxt_state_dict(model: TextAlignedModel, state_dict: Mapping[str, Tensor]) -> None:
    """Load an official dino.txt state dict (vision head + text encoder + ``logit_scale``) strictly into ``model``.

    ``visual_model.backbone.*`` keys, if present, are loaded into the backbone as well (all of them or none).

    Args:
        model: a model built with :func:`build_dinotxt_model` whose sizes match the file.
        state_dict: the official checkpoint's state dict (``torch.load(path, weights_only=True)``).

    Raises:
        KeyError: if keys are missing or unexpected (the first few are named).
        ValueError: if a tensor's shape differs, or the model cannot be expressed in the official layout.
    """
    with_backbone = any(k.startswith("visual_model.backbone.") for k in state_dict)
    key_map = _key_map(model, include_backbone=with_backbone)
    missing = sorted(set(key_map) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(key_map))
    if missing or unexpected:
        raise KeyError(
            f"load_dinotxt_state_dict: {len(missing)} missing keys {missing[:5]} and {len(unexpected)} unexpected keys "
            f"{unexpected[:5]} for this model configuration."
        )
    ours_state = model.state_dict()
    converted: dict[str, Tensor] = {}
    for official, ours in key_map.items():
        value = state_dict[official]
        if tuple(value.shape) != tuple(ours_state[ours].shape):
            raise ValueError(
                f"load_dinotxt_state_dict: {official} has shape {tuple(value.shape)}, the model expects "
                f"{tuple(ours_state[ours].shape)} ({ours})."
            )
        converted[ours] = value
    result = model.load_state_dict(converted, strict=False)
    left_out = [k for k in result.missing_keys if with_backbone or not k.startswith("vision.backbone.")]
    if left_out or result.unexpected_keys:  # cannot happen if the key map is complete; guards future edits
        raise KeyError(f"load_dinotxt_state_dict: not loaded {left_out[:5]}, unexpected {result.unexpected_keys[:5]}.")
