"""dino.txt-style text alignment model: shapes, recipe details, OpenCLIP init and the official key layout.

The official-layout tests build a state dict from a key/shape list written out here (not from our exporter)
and check our model against a plain functional re-statement of the official forward.
"""

from __future__ import annotations

import functools
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from tiny_text import TINY_TEXT
from torch import Tensor

from dinov3_eo.models.text import (
    DINOTXT_TEXT_CFG,
    EOT_TOKEN,
    SOT_TOKEN,
    TextAlignedModel,
    TextTower,
    VisionAdapter,
    build_dinotxt_model,
    clip_tokenizer,
    export_dinotxt_state_dict,
    load_dinotxt_state_dict,
)
from dinov3_eo.models.vit import build_backbone


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("vitmicro16")  # D 96, 2 heads, 4 storage tokens


@pytest.fixture
def model(backbone: torch.nn.Module) -> TextAlignedModel:
    return TextAlignedModel(backbone=backbone, text_cfg=TINY_TEXT).eval()


@pytest.fixture
def images() -> Tensor:
    return torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------------- tokenizer
class TestTokenizer:
    def test_offline_ids(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import socket

        def refuse(*args, **kwargs):
            raise OSError("network access attempted")

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setattr(socket.socket, "connect", refuse)
        monkeypatch.setattr(socket, "create_connection", refuse)
        clip_tokenizer.cache_clear()
        ids = clip_tokenizer(77)(["a satellite image of water."])[0].tolist()
        assert ids[0] == SOT_TOKEN and EOT_TOKEN in ids
        assert ids[: ids.index(EOT_TOKEN) + 1] == [SOT_TOKEN, 320, 10316, 2867, 539, 1573, 269, EOT_TOKEN]

    def test_layout_and_agreement_with_open_clip(self) -> None:
        import open_clip

        texts = ["A satellite image of WATER.", "solar panels"]
        ours = clip_tokenizer(77)(texts)
        assert ours.shape == (2, 77) and ours.dtype == torch.int64
        assert (ours[:, 0] == SOT_TOKEN).all()
        eot = (ours == EOT_TOKEN).int().argmax(dim=1)
        assert all((ours[i, eot[i] + 1 :] == 0).all() for i in range(2))  # zero padding after EOT
        assert torch.equal(ours, open_clip.get_tokenizer("ViT-B-32")(texts))

    def test_model_tokenize_rejects_bare_string(self, model: TextAlignedModel) -> None:
        with pytest.raises(TypeError, match="single string"):
            model.tokenize("water")


# ---------------------------------------------------------------------------------------------------- vision
class TestVisionSide:
    def test_shapes_and_normalisation(self, model: TextAlignedModel, images: Tensor) -> None:
        image = model.encode_image(images)
        dense = model.encode_dense(images)
        text = model.encode_text(["water", "forest", "a road"])
        assert image.shape == (2, 192) and dense.shape == (2, 96, 3, 4) and text.shape == (3, 192)
        torch.testing.assert_close(image.norm(dim=1), torch.ones(2))
        torch.testing.assert_close(dense.norm(dim=1), torch.ones(2, 3, 4))
        torch.testing.assert_close(text.norm(dim=1), torch.ones(3))

    def test_image_embedding_is_cls_and_mean_patch(self, model: TextAlignedModel, images: Tensor) -> None:
        cls, patches = model.vision(images)
        expected = F.normalize(torch.cat([cls, patches.mean(dim=(2, 3))], dim=1), dim=1)
        torch.testing.assert_close(model.encode_image(images), expected)
        # the adapted tokens come from the backbone's last normed layer, not from anything else
        ((bb_patches, bb_cls, bb_regs),) = model.vision.backbone.get_intermediate_layers(
            images, n=1, return_class_token=True, return_extra_tokens=True
        )
        tokens = model.vision.backbone_tokens(images)
        assert torch.equal(tokens[:, 0], bb_cls) and torch.equal(tokens[:, 1:5], bb_regs)
        assert torch.equal(tokens[:, 5:], bb_patches)

    def test_head_blocks_match_timm_without_rope(self, backbone: torch.nn.Module) -> None:
        from timm.layers import SwiGLU
        from timm.models.vision_transformer import Block as TimmBlock

        adapter = VisionAdapter(backbone=backbone, n_blocks=1, ffn_layer="swiglu64", layerscale_init=0.5).eval()
        block = adapter.blocks[0]
        hidden = block.mlp.w1.out_features
        assert hidden == 256  # int(int(96*4)*2/3) = 256, already a multiple of 64
        reference = TimmBlock(
            96,
            2,
            mlp_ratio=hidden / 96,
            qkv_bias=False,
            init_values=1.0,
            act_layer=torch.nn.SiLU,  # timm's Block hands its activation to the MLP
            mlp_layer=functools.partial(SwiGLU, norm_layer=None),
        ).eval()
        renames = {"mlp.w1.": "mlp.fc1_g.", "mlp.w2.": "mlp.fc1_x.", "mlp.w3.": "mlp.fc2."}
        state = {}
        for key, value in block.state_dict().items():
            for src, dst in renames.items():
                key = key.replace(src, dst)
            state[key] = value
        reference.load_state_dict(state, strict=True)
        x = torch.randn(2, 11, 96)
        torch.testing.assert_close(block([x], [None])[0], reference(x), atol=1e-5, rtol=1e-5)

    def test_head_layout_is_official(self, backbone: torch.nn.Module) -> None:
        adapter = VisionAdapter(backbone=backbone)
        keys = {k: tuple(v.shape) for k, v in adapter.state_dict().items() if not k.startswith("backbone.")}
        assert "blocks.0.attn.qkv.weight" in keys and "blocks.0.attn.qkv.bias" not in keys
        assert keys["blocks.1.mlp.w3.weight"] == (96, 256) and keys["blocks.1.ls2.gamma"] == (96,)
        assert keys["ln_final.weight"] == (96,) and len(keys) == 2 * 15 + 2
        torch.testing.assert_close(adapter.blocks[0].ls1.gamma, torch.full((96,), 1e-5))

    def test_frozen_backbone_gets_no_gradient(self, backbone: torch.nn.Module, images: Tensor) -> None:
        model = TextAlignedModel(backbone=backbone, text_cfg=TINY_TEXT, freeze_text=True).train()
        assert not model.vision.backbone.training and model.vision.training
        image, text = model(images, ["water", "forest"])
        (image * text).sum().backward()
        assert all(p.grad is None for p in model.vision.backbone.parameters())
        assert all(p.grad is None for p in model.text.encoder.parameters())
        assert model.vision.blocks[0].attn.qkv.weight.grad is not None
        assert model.text.projection.weight.grad is not None

    def test_backbone_modes_are_set_at_construction(self) -> None:
        # Lightning does not call train() when a fit starts; a loaded backbone arrives in eval mode
        for freeze, expected in ((True, False), (False, True)):
            loaded = build_backbone("vitmicro16").eval() if not freeze else build_backbone("vitmicro16").train()
            adapter = VisionAdapter(backbone=loaded, freeze_backbone=freeze)
            assert adapter.backbone.training is expected and adapter.blocks.training

    def test_bad_backbone(self) -> None:
        with pytest.raises(TypeError, match="has no 'embed_dim'"):
            VisionAdapter(backbone=torch.nn.Linear(2, 2))
        with pytest.raises(ValueError, match="ffn_layer"):
            VisionAdapter(backbone=build_backbone("vitmicro16", depth=1), ffn_layer="geglu")


# ---------------------------------------------------------------------------------------------------- text & recipe
class TestRecipe:
    def test_logit_scale_init_and_clamp(self, model: TextAlignedModel) -> None:
        assert model.logit_scale.shape == (1,)
        assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
        with torch.no_grad():
            model.logit_scale.fill_(7.0)
        model.clamp_logit_scale_()
        assert model.logit_scale.item() == pytest.approx(math.log(100.0))
        with torch.no_grad():
            model.logit_scale.fill_(-3.0)
        model.clamp_logit_scale_()
        assert model.logit_scale.item() == 0.0
        assert model.logit_scale.requires_grad

    def test_prompt_ensembling(self, model: TextAlignedModel) -> None:
        templates = ["a satellite image of {}.", "{} seen from above."]
        ens = model.text_embeddings_for_classes(["water", "forest"], templates)
        assert ens.shape == (2, 192)
        for i, name in enumerate(["water", "forest"]):
            each = model.encode_text([t.format(name) for t in templates])  # normalised per caption
            torch.testing.assert_close(ens[i], F.normalize(each.mean(dim=0), dim=0))
        patch = model.text_embeddings_for_classes(["water"], templates, part="patch")
        raw = model.text(model.tokenize([t.format("water") for t in templates]))[:, 96:]
        torch.testing.assert_close(patch[0], F.normalize(F.normalize(raw, dim=1).mean(dim=0), dim=0))
        with pytest.raises(ValueError, match="placeholder"):
            model.text_embeddings_for_classes(["water"], ["no placeholder"])

    def test_dense_scores_use_the_patch_half(self, model: TextAlignedModel, images: Tensor) -> None:
        text = torch.randn(3, 192)
        scores = model.dense_scores(images, text)
        assert scores.shape == (2, 3, 3, 4)
        expected = torch.einsum("bdyx,td->btyx", model.encode_dense(images), F.normalize(text[:, 96:], dim=1))
        torch.testing.assert_close(scores, expected)
        changed_cls_half = text.clone()
        changed_cls_half[:, :96] = torch.randn(3, 96)
        torch.testing.assert_close(model.dense_scores(images, changed_cls_half), scores)
        changed_patch_half = text.clone()
        changed_patch_half[:, 96:] = torch.randn(3, 96)
        assert not torch.allclose(model.dense_scores(images, changed_patch_half), scores)
        assert scores.abs().max() <= 1.0 + 1e-5
        with pytest.raises(ValueError, match="text embeddings must be"):
            model.dense_scores(images, torch.randn(3, 50))

    def test_dense_scores_from_strings(self, model: TextAlignedModel, images: Tensor) -> None:
        templates = ["an aerial photo of {}.", "{}."]
        from_strings = model.dense_scores(images, ["water", "road"], templates=templates)
        patch_half = model.text_embeddings_for_classes(["water", "road"], templates, part="patch")
        torch.testing.assert_close(from_strings, model.dense_scores(images, patch_half))

    def test_picklable(self, model: TextAlignedModel) -> None:
        clone = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(clone.encode_text(["water"]), model.encode_text(["water"]))


class TestTextTower:
    def _tiny_clip(self):
        import open_clip

        vision = {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16}
        return open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=TINY_TEXT).eval()

    def test_init_from_local_openclip_checkpoint(self, tmp_path) -> None:
        clip = self._tiny_clip()
        torch.save({"state_dict": {f"module.{k}": v for k, v in clip.state_dict().items()}}, tmp_path / "clip.pt")
        tower = TextTower(text_cfg=TINY_TEXT, output_dim=48, checkpoint=tmp_path / "clip.pt", freeze=True).eval()
        tokens = tower.tokenize(["a satellite image of a harbour.", "vineyards"])
        # the text tower's pooled features, pushed through CLIP's own projection, are CLIP's text features
        torch.testing.assert_close(tower.encoder(tokens) @ clip.text_projection, clip.encode_text(tokens))
        assert tower(tokens).shape == (2, 48)
        assert not any(p.requires_grad for p in tower.encoder.parameters()) and tower.projection.weight.requires_grad

    def test_custom_text_clip_safetensors_layout(self, tmp_path) -> None:
        from safetensors.torch import save_file

        clip = self._tiny_clip()
        state = {
            (k if k.startswith("visual.") else "text." + k): v.contiguous() for k, v in clip.state_dict().items()
        }
        save_file(state, str(tmp_path / "clip.safetensors"))
        tower = TextTower(text_cfg=TINY_TEXT, output_dim=8, checkpoint=tmp_path / "clip.safetensors").eval()
        tokens = tower.tokenize(["water"])
        torch.testing.assert_close(tower.encoder(tokens) @ clip.text_projection, clip.encode_text(tokens))

    def test_checkpoint_that_does_not_fit(self, tmp_path) -> None:
        torch.save(self._tiny_clip().state_dict(), tmp_path / "clip.pt")
        with pytest.raises(ValueError, match="does not fit text_cfg"):
            TextTower(text_cfg={**TINY_TEXT, "layers": 3}, output_dim=8, checkpoint=tmp_path / "clip.pt")
        with pytest.raises(FileNotFoundError, match="does not exist"):
            TextTower(text_cfg=TINY_TEXT, output_dim=8, checkpoint=tmp_path / "missing.pt")

    def test_config_errors(self) -> None:
        with pytest.raises(ValueError, match="not an OpenCLIP model config name"):
            TextTower(text_cfg="no-such-model", output_dim=8)
        with pytest.raises(ValueError, match="Hugging Face"):
            TextTower(text_cfg={"hf_model_name": "bert-base-uncased"}, output_dim=8)
        with pytest.raises(ValueError, match="vocab_size"):
            TextTower(text_cfg={**TINY_TEXT, "vocab_size": 1000}, output_dim=8)

    def test_a_frozen_encoder_is_in_eval_mode_from_construction(self) -> None:
        # Lightning does not call train() when a fit starts: the constructor must set the frozen part's mode
        frozen = TextTower(text_cfg=TINY_TEXT, output_dim=8, freeze=True)
        assert not any(m.training for m in frozen.encoder.modules()) and frozen.projection.training
        assert TextTower(text_cfg=TINY_TEXT, output_dim=8, freeze=False).encoder.training


# ---------------------------------------------------------------------------------------------------- official layout
def _official_spec(
    *, dim: int, ffn: int, width: int, layers: int, ctx: int = 77, vocab: int = 49408
) -> dict[str, tuple]:
    """The official dino.txt key list, written out by hand from the published layout."""
    spec: dict[str, tuple] = {}
    for i in range(2):
        b = f"visual_model.head.blocks.{i}."
        spec |= {
            b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
            b + "attn.qkv.weight": (3 * dim, dim),
            b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
            b + "ls1.gamma": (dim,),
            b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
            b + "mlp.w1.weight": (ffn, dim), b + "mlp.w1.bias": (ffn,),
            b + "mlp.w2.weight": (ffn, dim), b + "mlp.w2.bias": (ffn,),
            b + "mlp.w3.weight": (dim, ffn), b + "mlp.w3.bias": (dim,),
            b + "ls2.gamma": (dim,),
        }  # fmt: skip
    spec |= {"visual_model.head.ln_final.weight": (dim,), "visual_model.head.ln_final.bias": (dim,)}
    t = "text_model.backbone."
    spec |= {t + "token_embedding.weight": (vocab, width), t + "positional_embedding": (ctx, width)}
    for i in range(layers):
        b = f"{t}blocks.{i}."
        spec |= {
            b + "attention_norm.weight": (width,), b + "attention_norm.bias": (width,),
            b + "attention.qkv.weight": (3 * width, width),
            b + "attention.proj.weight": (width, width), b + "attention.proj.bias": (width,),
            b + "ffn_norm.weight": (width,), b + "ffn_norm.bias": (width,),
            b + "feed_forward.fc1.weight": (4 * width, width), b + "feed_forward.fc1.bias": (4 * width,),
            b + "feed_forward.fc2.weight": (width, 4 * width), b + "feed_forward.fc2.bias": (width,),
        }  # fmt: skip
    spec |= {t + "ln_final.weight": (width,), t + "ln_final.bias": (width,)}
    spec |= {"text_model.head.linear_projection.weight": (2 * dim, width), "logit_scale": (1,)}
    return spec


def _random_state(spec: dict[str, tuple]) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, shape in spec.items():
        value = torch.randn(shape, generator=gen)
        if key.endswith(("norm1.weight", "norm2.weight", "_norm.weight", "ln_final.weight")):
            value = 1 + 0.1 * value
        elif key.endswith("gamma"):
            value = 0.5 + 0.1 * value
        elif key != "logit_scale":
            value = 0.05 * value
        state[key] = value
    state["logit_scale"] = torch.tensor([3.5])
    return state


def _ln(x: Tensor, sd: dict[str, Tensor], prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5)


def _attention(x: Tensor, qkv_w: Tensor, proj_w: Tensor, proj_b: Tensor, heads: int, causal: bool) -> Tensor:
    n, length, width = x.shape
    q, k, v = (x @ qkv_w.T).reshape(n, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // heads)  # [n, heads, L, L]
    if causal:
        scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, width)
    return out @ proj_w.T + proj_b


def _reference_text(sd: dict[str, Tensor], tokens: Tensor, heads: int) -> Tensor:
    """Official text tower: causal pre-LN GELU transformer, final LN, EOT (argmax) pooling, projection."""
    t = "text_model.backbone."
    x = sd[t + "token_embedding.weight"][tokens] + sd[t + "positional_embedding"][: tokens.shape[1]]
    i = 0
    while f"{t}blocks.{i}.attention_norm.weight" in sd:
        b = f"{t}blocks.{i}."
        h = _ln(x, sd, b + "attention_norm")
        names = ("attention.qkv.weight", "attention.proj.weight", "attention.proj.bias")
        qkv, proj_w, proj_b = (sd[b + n] for n in names)
        x = x + _attention(h, qkv, proj_w, proj_b, heads, causal=True)
        h = _ln(x, sd, b + "ffn_norm")
        h = F.gelu(h @ sd[b + "feed_forward.fc1.weight"].T + sd[b + "feed_forward.fc1.bias"])
        x = x + h @ sd[b + "feed_forward.fc2.weight"].T + sd[b + "feed_forward.fc2.bias"]
        i += 1
    x = _ln(x, sd, t + "ln_final")
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    return pooled @ sd["text_model.head.linear_projection.weight"].T


def _reference_head(sd: dict[str, Tensor], x: Tensor, heads: int) -> Tensor:
    """Official vision head: 2 pre-LN blocks (no RoPE, no qkv bias, SwiGLU, LayerScale), then ln_final."""
    for i in range(2):
        b = f"visual_model.head.blocks.{i}."
        qkv, proj_w, proj_b = (sd[b + n] for n in ("attn.qkv.weight", "attn.proj.weight", "attn.proj.bias"))
        a = _attention(_ln(x, sd, b + "norm1"), qkv, proj_w, proj_b, heads, causal=False)
        x = x + sd[b + "ls1.gamma"] * a
        h = _ln(x, sd, b + "norm2")
        gate = F.silu(h @ sd[b + "mlp.w1.weight"].T + sd[b + "mlp.w1.bias"])
        value = h @ sd[b + "mlp.w2.weight"].T + sd[b + "mlp.w2.bias"]
        h = (gate * value) @ sd[b + "mlp.w3.weight"].T + sd[b + "mlp.w3.bias"]
        x = x + sd[b + "ls2.gamma"] * h
    return _ln(x, sd, "visual_model.head.ln_final")


class TestOfficialLayout:
    @pytest.fixture
    def reduced(self, backbone: torch.nn.Module) -> TextAlignedModel:
        return build_dinotxt_model(backbone, text_overrides={"width": 32, "heads": 4, "layers": 2}).eval()

    def test_full_size_key_layout(self) -> None:
        # The released configuration, on the meta device (no memory): keys and shapes of the official file.
        class _ViTLStandIn(torch.nn.Module):
            embed_dim, patch_size, n_storage_tokens, num_heads = 1024, 16, 4, 16

            def get_intermediate_layers(self, *args, **kwargs):
                raise NotImplementedError

        with torch.device("meta"):
            model = build_dinotxt_model(_ViTLStandIn())
        exported = export_dinotxt_state_dict(model)
        expected = _official_spec(dim=1024, ffn=2752, width=1280, layers=24)
        assert {k: tuple(v.shape) for k, v in exported.items()} == expected
        assert len(expected) == 32 + 2 + 24 * 11 + 2 + 1 + 1
        assert DINOTXT_TEXT_CFG["heads"] == 20 and model.text.encoder.pool_type == "argmax"

    def test_round_trip_is_exact_and_matches_reference(self, reduced: TextAlignedModel, images: Tensor) -> None:
        official = _random_state(_official_spec(dim=96, ffn=256, width=32, layers=2))
        load_dinotxt_state_dict(reduced, official)
        exported = export_dinotxt_state_dict(reduced)
        assert exported.keys() == official.keys()
        assert all(torch.equal(exported[k], official[k]) for k in official)
        # numerics: our forward equals the official forward written out above
        tokens = reduced.tokenize(["a satellite image of water.", "solar panels", "forest"])
        expected_text = _reference_text(official, tokens, heads=4)
        torch.testing.assert_close(reduced.text(tokens), expected_text, atol=1e-5, rtol=1e-4)
        with torch.no_grad():
            head = _reference_head(official, reduced.vision.backbone_tokens(images), heads=2)
        expected = F.normalize(torch.cat([head[:, 0], head[:, 5:].mean(dim=1)], dim=1), dim=1)
        torch.testing.assert_close(reduced.encode_image(images), expected, atol=1e-5, rtol=1e-4)
        assert reduced.logit_scale.item() == 3.5

    def test_strictness(self, reduced: TextAlignedModel) -> None:
        official = _random_state(_official_spec(dim=96, ffn=256, width=32, layers=2))
        missing = dict(official)
        del missing["text_model.backbone.blocks.1.feed_forward.fc2.bias"]
        with pytest.raises(KeyError, match="1 missing keys.*feed_forward.fc2.bias"):
            load_dinotxt_state_dict(reduced, missing)
        with pytest.raises(KeyError, match="1 unexpected keys.*blocks.2"):
            extra = {**official, "text_model.backbone.blocks.2.ffn_norm.weight": torch.ones(32)}
            load_dinotxt_state_dict(reduced, extra)
        wrong = {**official, "visual_model.head.ln_final.weight": torch.ones(95)}
        with pytest.raises(ValueError, match="visual_model.head.ln_final.weight has shape"):
            load_dinotxt_state_dict(reduced, wrong)

    def test_backbone_keys_load_when_present(self, reduced: TextAlignedModel) -> None:
        official = export_dinotxt_state_dict(reduced, include_backbone=True)
        assert "visual_model.backbone.blocks.0.attn.qkv.bias_mask" in official
        other = build_dinotxt_model(build_backbone("vitmicro16"), text_overrides={"width": 32, "heads": 4, "layers": 2})
        load_dinotxt_state_dict(other, {k: v.clone() for k, v in official.items()})
        assert torch.equal(other.vision.backbone.cls_token, reduced.vision.backbone.cls_token)

    def test_openclip_style_model_has_no_official_form(self, model: TextAlignedModel) -> None:
        with pytest.raises(ValueError, match="in_proj_bias' has no counterpart"):
            export_dinotxt_state_dict(model)


# ---------------------------------------------------------------------------------------------------- prompts
class TestPrompts:
    def test_builtin_templates(self) -> None:
        from dinov3_eo.tasks.prompts import REMOTE_SENSING_TEMPLATES, load_templates

        assert 15 <= len(REMOTE_SENSING_TEMPLATES) <= 25
        assert load_templates() == REMOTE_SENSING_TEMPLATES
        assert len(set(REMOTE_SENSING_TEMPLATES)) == len(REMOTE_SENSING_TEMPLATES)
        assert all(t.count("{}") == 1 for t in REMOTE_SENSING_TEMPLATES)

    def test_load_from_list_text_and_json(self, tmp_path) -> None:
        from dinov3_eo.tasks.prompts import load_templates

        assert load_templates(["{} from orbit."]) == ("{} from orbit.",)
        (tmp_path / "t.txt").write_text("# mine\n\na SAR image of {}.\n  {} at night.  \n")
        assert load_templates(tmp_path / "t.txt") == ("a SAR image of {}.", "{} at night.")
        (tmp_path / "t.json").write_text('["a drone shot of {}."]')
        assert load_templates(str(tmp_path / "t.json")) == ("a drone shot of {}.",)

    def test_bad_templates(self, tmp_path) -> None:
        from dinov3_eo.tasks.prompts import load_templates

        with pytest.raises(ValueError, match=r"templates\[1\].*exactly one"):
            load_templates(["{}.", "no slot"])
        with pytest.raises(ValueError, match="exactly one"):
            load_templates(["{} and {}"])
        with pytest.raises(ValueError, match="exactly one"):
            load_templates(["{name}"])
        with pytest.raises(ValueError, match="empty"):
            load_templates([])
        with pytest.raises(FileNotFoundError, match="does not exist"):
            load_templates(tmp_path / "none.txt")
        (tmp_path / "t.json").write_text('{"a": 1}')
        with pytest.raises(ValueError, match="JSON list"):
            load_templates(tmp_path / "t.json")

    def test_class_captions(self) -> None:
        import numpy as np

        from dinov3_eo.tasks.prompts import class_captions, humanize_class_name, random_caption

        templates = ("a satellite image of {}.", "{} seen from above.", "an aerial photo of {}.")
        assert class_captions("water", templates) == [
            "a satellite image of water.",
            "water seen from above.",
            "an aerial photo of water.",
        ]
        drawn = class_captions("forest", templates, np.random.default_rng(0), k=2)
        assert len(drawn) == 2 and len(set(drawn)) == 2 and all("forest" in c for c in drawn)
        assert drawn == class_captions("forest", templates, np.random.default_rng(0), k=2)  # seeded
        seen = {random_caption("road", templates, np.random.default_rng(s)) for s in range(40)}
        assert seen == {t.format("road") for t in templates}
        with pytest.raises(ValueError, match="k=4"):
            class_captions("water", templates, k=4)
        assert humanize_class_name("AnnualCrop") == "annual crop"
        assert humanize_class_name("HerbaceousVegetation") == "herbaceous vegetation"
        assert humanize_class_name("sea_lake") == "sea lake"
