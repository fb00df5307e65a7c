"""The DINOv3 ViT: official sizes and state-dict layout, numerical parity with timm, and forward semantics."""

from pathlib import Path

import pytest
import rasterio
import torch
from torch import Tensor

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models.vit import (
    BACKBONES,
    DinoVisionTransformer,
    _add_residual,
    build_backbone,
    swiglu_hidden_features,
)

DATA = Path(__file__).parent / "data"

@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core CI box, OpenMP spinning makes 2 threads ~8x slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


OFFICIAL_PARAMS = {
    "vits16": 21_601_152,
    "vits16plus": 28_697_472,
    "vitb16": 85_669_632,
    "vitl16": 303_154_176,
    "vith16plus": 840_633_600,
    "vit7b16": 6_716_043_264,
}


def perturbed(model: DinoVisionTransformer, scale: float = 0.05) -> DinoVisionTransformer:
    """Random weights everywhere (biases, LayerScale, norms) so that no term hides behind its init value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def random_backbone(name: str, **overrides) -> DinoVisionTransformer:
    """A backbone with random weights everywhere, built without the (slower) official init."""
    model = build_backbone(name, device="meta", **overrides).to_empty(device="cpu")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for key, p in model.named_parameters():
            is_norm_weight = key.endswith("weight") and "norm" in key
            p.copy_(torch.randn(p.shape, generator=g) * 0.05 + float(is_norm_weight))
    model.rope_embed.reset_parameters()
    for block in model.blocks:
        block.attn.qkv.reset_bias_mask()
    return model.eval()


def real_image(height: int, width: int, batch: int = 2) -> Tensor:
    """ImageNet-normalised windows of a real Landsat-7 RGB scene (CC0 test raster): (batch, 3, height, width)."""
    with rasterio.open(DATA / "rgb_byte_crop.tif") as src:
        pixels = torch.from_numpy(src.read()).float()  # [3, 230, 250]
    crops = [pixels[:, 3 * i : 3 * i + height, 5 * i : 5 * i + width] for i in range(batch)]
    return Normalization.preset("imagenet")(torch.stack(crops))


# ------------------------------------------------------------------------------------------- sizes
class TestSizes:
    @pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
    def test_parameter_count(self, name: str) -> None:
        model = build_backbone(name, device="meta")
        assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]

    def test_vitl16_state_dict_layout(self) -> None:
        sd = build_backbone("vitl16", device="meta").state_dict()
        assert len(sd) == 368
        expected = {
            "cls_token": (1, 1, 1024),
            "storage_tokens": (1, 4, 1024),
            "mask_token": (1, 1024),
            "patch_embed.proj.weight": (1024, 3, 16, 16),
            "patch_embed.proj.bias": (1024,),
            "rope_embed.periods": (16,),
            "blocks.0.norm1.weight": (1024,),
            "blocks.0.attn.qkv.weight": (3072, 1024),
            "blocks.0.attn.qkv.bias": (3072,),
            "blocks.0.attn.qkv.bias_mask": (3072,),
            "blocks.0.attn.proj.weight": (1024, 1024),
            "blocks.0.ls1.gamma": (1024,),
            "blocks.0.norm2.bias": (1024,),
            "blocks.0.mlp.fc1.weight": (4096, 1024),
            "blocks.0.mlp.fc2.weight": (1024, 4096),
            "blocks.23.ls2.gamma": (1024,),
            "norm.weight": (1024,),
        }
        assert {k: tuple(sd[k].shape) for k in expected} == expected

    def test_sat_vitl16_and_7b_layouts(self) -> None:
        sat = build_backbone("vitl16", untie_global_and_local_cls_norm=True, device="meta")
        assert sum(p.numel() for p in sat.parameters()) == 303_156_224
        assert len(sat.state_dict()) == 370
        sd = build_backbone("vit7b16", device="meta").state_dict()
        assert len(sd) == 610
        assert "blocks.0.attn.qkv.bias" not in sd and "blocks.0.attn.qkv.bias_mask" not in sd
        assert tuple(sd["blocks.0.mlp.w1.weight"].shape) == (8192, 4096)
        assert tuple(sd["blocks.0.mlp.w3.weight"].shape) == (4096, 8192)
        assert tuple(sd["rope_embed.periods"].shape) == (32,)
        assert "local_cls_norm.weight" in sd

    @pytest.mark.parametrize(
        ("dim", "ratio", "align", "hidden"), [(384, 6, 8, 1536), (1280, 6, 8, 5120), (4096, 3, 64, 8192), (100, 4, 8, 272)]
    )
    def test_swiglu_hidden_rounding(self, dim: int, ratio: float, align: int, hidden: int) -> None:
        assert swiglu_hidden_features(dim, ratio, align) == hidden

    def test_small_sizes(self) -> None:
        for name, dim, depth, heads in [("vitt16", 192, 12, 3), ("vitmicro16", 96, 4, 2)]:
            m = build_backbone(name, device="meta")
            assert (m.embed_dim, m.n_blocks, m.num_heads, m.patch_size, m.n_storage_tokens) == (dim, depth, heads, 16, 4)

    def test_registry_is_explicit(self) -> None:
        assert set(OFFICIAL_PARAMS) | {"vitl16plus", "vitt16", "vitmicro16"} == set(BACKBONES)
        with pytest.raises(ValueError, match="Unknown backbone 'vitx'; choose one of"):
            build_backbone("vitx")


class TestInit:
    def test_official_init(self) -> None:
        m = build_backbone("vitmicro16")
        qkv = m.blocks[0].attn.qkv
        D = m.embed_dim
        assert torch.equal(qkv.bias_mask, torch.cat([torch.ones(D), torch.zeros(D), torch.ones(D)]))
        assert torch.equal(m.mask_token, torch.zeros(1, D))
        assert torch.all(m.blocks[2].ls2.gamma == 1e-5)
        bound = (1 / (3 * 16 * 16)) ** 0.5
        assert m.patch_embed.proj.weight.abs().max() <= bound
        assert 0.01 < m.storage_tokens.std().item() < 0.03
        assert not any(torch.isnan(t).any() for t in m.state_dict().values())

    def test_key_bias_is_masked(self) -> None:
        m = perturbed(build_backbone("vitmicro16", depth=1))
        x = torch.randn(2, 5, m.embed_dim)
        qkv = m.blocks[0].attn.qkv
        out = qkv(x)
        D = m.embed_dim
        torch.testing.assert_close(out[..., D : 2 * D], x @ qkv.weight[D : 2 * D].T)
        torch.testing.assert_close(out[..., :D], x @ qkv.weight[:D].T + qkv.bias[:D])


# ------------------------------------------------------------------------------------- timm parity
def timm_twin(model: DinoVisionTransformer, variant: str, **kwargs) -> torch.nn.Module:
    """timm's model of the same size, loaded with our state dict through timm's own checkpoint filter."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    twin = timm.create_model(variant, pretrained=False, num_classes=0, global_pool="token", device="meta", **kwargs)
    twin = twin.to_empty(device="cpu")
    twin.load_state_dict(checkpoint_filter_fn(model.state_dict(), twin), strict=True)
    for module in twin.modules():  # timm's RoPE periods and zero key bias are non-persistent
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
    return twin.eval()


PARITY_CASES = [
    ("vits16", "vit_small_patch16_dinov3_qkvb", {}, [(224, 224), (64, 96)]),
    ("vits16plus", "vit_small_plus_patch16_dinov3_qkvb", {}, [(64, 96)]),
    ("vitl16", "vit_large_patch16_dinov3_qkvb", {"depth": 2}, [(64, 96)]),
]


@pytest.mark.parametrize(("name", "variant", "overrides", "sizes"), PARITY_CASES, ids=[c[0] for c in PARITY_CASES])
def test_matches_timm(name: str, variant: str, overrides: dict, sizes: list) -> None:
    ours = random_backbone(name, **overrides)
    assert ours.blocks[0].attn.qkv.bias.abs().min() > 0  # q/k/v biases all in play (k masked)
    theirs = timm_twin(ours, variant, **overrides)
    depth = ours.n_blocks
    for H, W in sizes:
        x = real_image(H, W)
        with torch.no_grad():
            feats = ours.forward_features(x)
            tokens = theirs.forward_features(x)  # [B, 5 + hw, D], normed
            torch.testing.assert_close(feats["x_norm_clstoken"], tokens[:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(feats["x_storage_tokens"], tokens[:, 1:5], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(feats["x_norm_patchtokens"], tokens[:, 5:], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
            layers = [0, depth - 1]
            mine = ours.get_intermediate_layers(x, n=layers, reshape=True, return_class_token=True)
            timm_layers = theirs.forward_intermediates(
                x, indices=layers, norm=True, output_fmt="NCHW", return_prefix_tokens=True, intermediates_only=True
            )
            for (patches, cls), (t_patches, t_prefix) in zip(mine, timm_layers):
                torch.testing.assert_close(patches, t_patches, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(cls, t_prefix[:, 0], rtol=1e-5, atol=1e-5)
            raw = ours.get_intermediate_layers(x, n=1, norm=False)[0]
            t_raw = theirs.forward_intermediates(x, indices=1, norm=False, output_fmt="NLC", intermediates_only=True)[0]
            torch.testing.assert_close(raw, t_raw, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ forward API
@pytest.fixture(scope="module")
def micro() -> DinoVisionTransformer:
    torch.manual_seed(0)
    return perturbed(build_backbone("vitmicro16"))


class TestForward:
    def test_output_shapes(self, micro: DinoVisionTransformer) -> None:
        x = torch.randn(2, 3, 64, 96)
        f = micro.forward_features(x)
        D = micro.embed_dim
        assert f["x_norm_clstoken"].shape == (2, D)
        assert f["x_storage_tokens"].shape == (2, 4, D)
        assert f["x_norm_patchtokens"].shape == (2, 24, D)
        assert f["x_prenorm"].shape == (2, 29, D)
        assert f["masks"] is None
        torch.testing.assert_close(micro(x), f["x_norm_clstoken"])

    def test_intermediate_layers_semantics(self, micro: DinoVisionTransformer) -> None:
        x = torch.randn(2, 3, 64, 96)
        out = micro.get_intermediate_layers(x, n=[1, 3], reshape=True, return_class_token=True, return_extra_tokens=True)
        assert len(out) == 2
        patches, cls, regs = out[1]
        assert patches.shape == (2, micro.embed_dim, 4, 6) and cls.shape == (2, micro.embed_dim)
        assert regs.shape == (2, 4, micro.embed_dim)
        f = micro.forward_features(x)
        # the last block, normed, is forward_features' output; reshape keeps row-major patch order
        torch.testing.assert_close(patches.flatten(2).transpose(1, 2), f["x_norm_patchtokens"])
        torch.testing.assert_close(cls, f["x_norm_clstoken"])
        torch.testing.assert_close(regs, f["x_storage_tokens"])
        last_two = micro.get_intermediate_layers(x, n=2)
        by_index = micro.get_intermediate_layers(x, n=[2, 3])
        for a, b in zip(last_two, by_index):
            torch.testing.assert_close(a, b)
        raw = micro.get_intermediate_layers(x, n=1, norm=False, return_class_token=True)[0]
        torch.testing.assert_close(raw[0], f["x_prenorm"][:, 5:])
        torch.testing.assert_close(raw[1], f["x_prenorm"][:, 0])
        with pytest.raises(IndexError, match=r"Block indices \[4\] are out of range for a 4-block model"):
            micro.get_intermediate_layers(x, n=[4])

    def test_size_not_multiple_of_patch(self, micro: DinoVisionTransformer) -> None:
        with pytest.raises(ValueError, match="Image size 64x90 is not a multiple of the patch size 16"):
            micro(torch.randn(1, 3, 64, 90))

    def test_wrong_band_count(self, micro: DinoVisionTransformer) -> None:
        with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\), got \(1, 4, 32, 32\)"):
            micro(torch.randn(1, 4, 32, 32))

    def test_mask_token_replaces_masked_patches(self, micro: DinoVisionTransformer) -> None:
        x = torch.randn(2, 3, 32, 48)
        masks = torch.zeros(2, 6, dtype=torch.bool)
        masks[0, [1, 4]] = True
        tokens, (h, w) = micro.prepare_tokens_with_masks(x, masks)
        plain, _ = micro.prepare_tokens_with_masks(x)
        assert (h, w) == (2, 3)
        for b, i in [(0, 1), (0, 4)]:
            torch.testing.assert_close(tokens[b, 5 + i], micro.mask_token[0])
        keep = ~masks
        torch.testing.assert_close(tokens[:, 5:][keep], plain[:, 5:][keep])
        # a fully masked image no longer depends on its content
        full = torch.ones(2, 6, dtype=torch.bool)
        a = micro.forward_features(x, masks=full)
        b = micro.forward_features(torch.randn_like(x), masks=full)
        torch.testing.assert_close(a["x_norm_patchtokens"], b["x_norm_patchtokens"])
        assert a["masks"] is full
        with pytest.raises(ValueError, match=r"masks must have shape \(B, h\*w\) = \(2, 6\)"):
            micro.forward_features(x, masks=torch.zeros(2, 5, dtype=torch.bool))

    def test_list_input_equals_separate_calls(self, micro: DinoVisionTransformer) -> None:
        globals_, locals_ = torch.randn(2, 3, 64, 64), torch.randn(6, 3, 32, 48)
        masks = torch.rand(2, 16) > 0.5
        both = micro.forward_features([globals_, locals_], masks=[masks, None])
        assert isinstance(both, list) and len(both) == 2
        alone = [micro.forward_features(globals_, masks=masks), micro.forward_features(locals_)]
        for joint, single in zip(both, alone):
            for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens", "x_prenorm"):
                torch.testing.assert_close(joint[key], single[key], rtol=1e-5, atol=1e-5)

    def test_list_input_backpropagates(self) -> None:
        m = build_backbone("vitmicro16", depth=2).train()
        out = m.forward_features([torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)])
        (out[0]["x_norm_clstoken"].sum() + out[1]["x_norm_patchtokens"].sum()).backward()
        assert m.blocks[0].attn.qkv.weight.grad is not None and m.cls_token.grad is not None

    def test_train_mode_rope_is_random_eval_is_deterministic(self, micro: DinoVisionTransformer) -> None:
        x = torch.randn(1, 3, 32, 32)
        micro.train()
        try:
            a, b = micro(x), micro(x)
        finally:
            micro.eval()
        assert not torch.allclose(a, b)
        torch.testing.assert_close(micro(x), micro(x), rtol=0, atol=0)
        still = perturbed(build_backbone("vitmicro16", depth=1, pos_embed_rope_rescale_coords=None)).train()
        torch.testing.assert_close(still(x), still(x), rtol=0, atol=0)

    def test_training_blocks_each_get_their_own_rope_draw(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """In training every block rotates with its own table (upstream draws one per block), made for all blocks at
        once per crop set; in eval one table serves every block."""
        m = build_backbone("vitmicro16", depth=3).train()
        seen: dict[int, list] = {}
        for i, block in enumerate(m.blocks):
            original = block.forward

            def record(xs: list, ropes: list, i: int = i, original=original) -> list:  # noqa: ANN001
                seen.setdefault(i, []).append([sin.clone() for sin, _ in ropes])
                return original(xs, ropes)

            monkeypatch.setattr(block, "forward", record)
        calls = []
        tables = m.rope_embed.tables
        monkeypatch.setattr(m.rope_embed, "tables", lambda **kw: calls.append(kw) or tables(**kw))
        m.forward_features([torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)])
        assert calls == [{"H": 2, "W": 2, "count": 3}, {"H": 1, "W": 1, "count": 3}]
        sins = [seen[i][0][0] for i in range(3)]  # the 2x2 grid (a 1x1 grid's one centre is at 0: no rotation)
        assert not torch.equal(sins[0], sins[1]) and not torch.equal(sins[1], sins[2])
        seen.clear(), calls.clear()
        m.eval().forward_features(torch.randn(1, 3, 32, 32))
        assert calls == [{"H": 2, "W": 2, "count": 1}]
        assert all(torch.equal(seen[i][0][0], seen[0][0][0]) for i in range(3))

    def test_local_cls_norm_only_for_second_crop_set_in_training(self) -> None:
        m = perturbed(build_backbone("vitmicro16", depth=1, untie_global_and_local_cls_norm=True,
                                     pos_embed_rope_rescale_coords=None))
        crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16)]
        m.train()
        out = m.forward_features(crops)
        for i, norm in [(0, m.norm), (1, m.local_cls_norm)]:
            torch.testing.assert_close(out[i]["x_norm_clstoken"], norm(out[i]["x_prenorm"][:, 0]))
            torch.testing.assert_close(out[i]["x_norm_patchtokens"], m.norm(out[i]["x_prenorm"][:, 5:]))
        m.eval()
        out = m.forward_features(crops)
        torch.testing.assert_close(out[1]["x_norm_clstoken"], m.norm(out[1]["x_prenorm"][:, 0]))


class TestTraining:
    def test_batch_subset_drop_path(self) -> None:
        x = [torch.zeros(4, 3, 2)]
        gamma = torch.full((2,), 0.5)
        out = _add_residual(x, lambda ys: [torch.ones_like(y) for y in ys], gamma, drop_rate=0.5, training=True)[0]
        changed = out.flatten(1).abs().sum(1) > 0
        assert changed.sum() == 2  # int(4 * (1 - 0.5)) images get the residual ...
        torch.testing.assert_close(out[changed], torch.full((2, 3, 2), 0.5 * 4 / 2))  # ... scaled by B / subset
        same = _add_residual(x, lambda ys: [torch.ones_like(y) for y in ys], gamma, drop_rate=0.5, training=False)[0]
        torch.testing.assert_close(same, torch.full((4, 3, 2), 0.5))

    def test_drop_path_changes_training_outputs_only(self) -> None:
        m = perturbed(build_backbone("vitmicro16", depth=2, drop_path_rate=0.5, pos_embed_rope_rescale_coords=None))
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
        m.train()
        assert not torch.allclose(m(x), m(x))

    def test_gradient_checkpointing_gives_same_gradients(self) -> None:
        m = perturbed(build_backbone("vitmicro16", depth=2, pos_embed_rope_rescale_coords=None)).train()
        x = torch.randn(2, 3, 32, 32)
        grads = []
        for flag in (False, True):
            m.zero_grad()
            m.grad_checkpointing = flag
            m.forward_features(x)["x_norm_patchtokens"].square().mean().backward()
            grads.append(m.blocks[0].mlp.fc1.weight.grad.clone())
        torch.testing.assert_close(grads[0], grads[1])

    def test_invalid_constructor_arguments(self) -> None:
        with pytest.raises(ValueError, match="Unknown ffn_layer 'geglu'"):
            DinoVisionTransformer(ffn_layer="geglu")
        with pytest.raises(ValueError, match="embed_dim 100 is not divisible by num_heads 3"):
            DinoVisionTransformer(embed_dim=100, num_heads=3)
        with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\), got 1.0"):
            DinoVisionTransformer(embed_dim=96, num_heads=2, drop_path_rate=1.0)

    def test_pickle_round_trip(self, micro: DinoVisionTransformer) -> None:
        import pickle

        clone = pickle.loads(pickle.dumps(micro))
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(clone(x), micro(x))


class TestCpuAutocast:
    """Under CPU bf16 autocast (Lightning's ``bf16-mixed`` on a CPU) attention runs in float32, the rest in bf16."""

    def test_attention_sees_float32_without_autocast(self, micro: DinoVisionTransformer, monkeypatch) -> None:
        seen = []
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def spy(q: Tensor, k: Tensor, v: Tensor, *args, **kwargs) -> Tensor:
            seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
            return sdpa(q, k, v, *args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = micro.forward_features(real_image(32, 48))
        assert len(seen) == len(micro.blocks)
        assert set(seen) == {(torch.float32, torch.float32, torch.float32, False)}
        assert micro.blocks[0].mlp.fc1(torch.randn(1, micro.embed_dim)).dtype == torch.float32  # autocast is off again
        assert out["x_norm_patchtokens"].shape == (2, 6, micro.embed_dim)

    def test_outputs_and_gradients_follow_float32(self, micro: DinoVisionTransformer) -> None:
        x = real_image(32, 48)
        results = []
        for enabled in (False, True):
            micro.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                f = micro.forward_features(x)
                loss = f["x_norm_clstoken"].float().square().sum() + f["x_norm_patchtokens"].float().square().mean()
            loss.backward()
            grad = torch.cat([p.grad.flatten() for p in micro.parameters() if p.grad is not None])
            results.append((f["x_norm_clstoken"].float(), grad))
        micro.zero_grad()
        (cls32, grad32), (cls16, grad16) = results
        assert torch.isfinite(grad16).all()
        assert torch.nn.functional.cosine_similarity(cls16, cls32, dim=1).min() > 0.999
        assert torch.nn.functional.cosine_similarity(grad16, grad32, dim=0) > 0.99
