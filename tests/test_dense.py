"""Dense heads (linear, multi-layer linear, DPT / CHMv2), height bins and the backbone + head wrapper."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F
from rasterio.windows import Window
from torch import Tensor, nn

from dinov3_eo.models.dense import (
    CHMV2_LAYERS,
    DenseModel,
    DPTHead,
    LinearHead,
    LogitsToHeight,
    bin_weights,
    bins_to_metres,
    build_chmv2_model,
    chmv2_head,
    height_bins,
    load_head_weights,
    metres_to_bin,
)
from dinov3_eo.models.vit import build_backbone

SAMPLE = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"


def _landsat(height: int, width: int, *, batch: int = 2) -> Tensor:
    """Real Landsat-8 B2/B3/B4 windows, z-scored per band: ``[batch, 3, height, width]``."""
    with rasterio.open(SAMPLE) as src:
        chips = [src.read(window=Window(40 * i, 200 + 60 * i, width, height)).astype(np.float32) for i in range(batch)]
    x = torch.from_numpy(np.stack(chips))
    return (x - x.mean(dim=(0, 2, 3), keepdim=True)) / x.std(dim=(0, 2, 3), keepdim=True)


@pytest.fixture
def backbone() -> nn.Module:
    """The project's smallest real DINOv3 ViT (embed 96, 4 blocks), recording how it is called."""
    vit = build_backbone("vitmicro16")
    calls: list[dict] = []
    original = vit.get_intermediate_layers

    def spy(x: Tensor, **kwargs) -> tuple:
        calls.append(kwargs)
        return original(x, **kwargs)

    vit.get_intermediate_layers = spy
    vit.calls = calls
    return vit


def _feats(dims, grids, *, batch=2, cls=True):
    out = []
    for d, (h, w) in zip(dims, grids):
        p = torch.randn(batch, d, h, w)
        out.append((p, torch.randn(batch, d)) if cls else p)
    return out


# ---------------------------------------------------------------------------------------------------------------
# LinearHead
# ---------------------------------------------------------------------------------------------------------------


class TestLinearHead:
    def test_protocol_layers_and_init(self) -> None:
        head = LinearHead(in_channels=256, out_channels=64)
        assert isinstance(head.dropout, nn.Dropout2d) and head.dropout.p == 0.1
        assert isinstance(head.batchnorm_layer, nn.BatchNorm2d) and head.batchnorm_layer.num_features == 256
        assert head.conv.kernel_size == (1, 1) and (head.conv.in_channels, head.conv.out_channels) == (256, 64)
        assert head.conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
        assert head.conv.weight.mean().abs().item() < 1e-3
        assert torch.count_nonzero(head.conv.bias) == 0
        # official key names, so a head trained with the official code loads as is
        assert set(head.state_dict()) == {
            "batchnorm_layer.weight", "batchnorm_layer.bias", "batchnorm_layer.running_mean",
            "batchnorm_layer.running_var", "batchnorm_layer.num_batches_tracked", "conv.weight", "conv.bias",
        }  # fmt: skip
        names = [type(m).__name__ for m in head.children()]
        assert names == ["Dropout2d", "BatchNorm2d", "Conv2d"]

    def test_eval_matches_explicit_formula_and_upsamples(self) -> None:
        head = LinearHead(in_channels=8, out_channels=3)
        bn = head.batchnorm_layer
        with torch.no_grad():
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
        head.eval()
        (p, c) = _feats([8], [(3, 5)])[0]
        out = head([(p, c)], output_size=(48, 80))
        z = (p - bn.running_mean[:, None, None]) / torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
        logits = torch.einsum("kd,bdhw->bkhw", head.conv.weight[:, :, 0, 0], z) + head.conv.bias[:, None, None]
        expected = F.interpolate(logits, size=(48, 80), mode="bilinear", align_corners=False)
        assert out.shape == (2, 3, 48, 80)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        # without output_size the logits stay on the patch grid; a bare tensor input works too
        torch.testing.assert_close(head([p]), logits, rtol=1e-5, atol=1e-6)

    def test_dropout_only_in_training(self) -> None:
        head = LinearHead(in_channels=16, out_channels=2)
        feats = [torch.randn(4, 16, 4, 4)]
        head.eval()
        torch.testing.assert_close(head(feats), head(feats))
        head.train()
        a, b = head(feats), head(feats)
        assert not torch.allclose(a, b)

    def test_multilayer_concat_resize_and_cls(self) -> None:
        dims, grids = [6, 10, 4], [(4, 6), (2, 3), (4, 6)]
        head = LinearHead(in_channels=dims, out_channels=5, use_cls_token=True).eval()
        assert head.n_inputs == 3 and head.channels == 2 * sum(dims)
        feats = _feats(dims, grids)
        x = head.concat_features(feats)
        assert x.shape == (2, 40, 4, 6)
        # order: [patch_0, cls_0, patch_1 (resized), cls_1, patch_2, cls_2]
        torch.testing.assert_close(x[:, :6], feats[0][0])
        torch.testing.assert_close(x[:, 6:12], feats[0][1][:, :, None, None].expand(2, 6, 4, 6))
        resized = F.interpolate(feats[1][0], size=(4, 6), mode="bilinear", align_corners=False)
        torch.testing.assert_close(x[:, 12:22], resized)
        torch.testing.assert_close(x[:, 22:32], feats[1][1][:, :, None, None].expand(2, 10, 4, 6))
        torch.testing.assert_close(x[:, 32:36], feats[2][0])
        assert head(feats, output_size=(64, 96)).shape == (2, 5, 64, 96)

    def test_bad_inputs(self) -> None:
        head = LinearHead(in_channels=[8, 8], out_channels=2, use_cls_token=True)
        with pytest.raises(ValueError, match="expected 2 layer"):
            head(_feats([8], [(2, 2)]))
        with pytest.raises(ValueError, match="reads the class token"):
            head([torch.randn(1, 8, 2, 2), torch.randn(1, 8, 2, 2)])
        with pytest.raises(ValueError, match="expected 8 channels"):
            head(_feats([8, 6], [(2, 2), (2, 2)]))
        with pytest.raises(ValueError, match="dropout"):
            LinearHead(in_channels=8, out_channels=2, dropout=1.5)
        with pytest.raises(ValueError, match="in_channels"):
            LinearHead(in_channels=[], out_channels=2)


# ---------------------------------------------------------------------------------------------------------------
# DPT head and the CHMv2 layout
# ---------------------------------------------------------------------------------------------------------------


def _small_dpt(**kw) -> DPTHead:
    args = dict(embed_dim=24, out_channels=7, post_process_channels=(8, 16, 24, 32), channels=16, n_hidden_channels=8)
    args.update(kw)
    return DPTHead(**args)


class TestDPTHead:
    @pytest.mark.parametrize("grid", [(2, 2), (4, 6), (6, 2), (8, 4)])
    def test_output_is_sixteen_times_the_grid(self, grid) -> None:
        head = _small_dpt().eval()
        out = head(_feats([24] * 4, [grid] * 4))
        assert out.shape == (2, 7, 16 * grid[0], 16 * grid[1])
        assert head.grid_multiple == 2

    def test_odd_grid_rounds_up_and_output_size_resizes(self) -> None:
        head = _small_dpt().eval()
        feats = _feats([24] * 4, [(5, 3)] * 4)
        assert head(feats).shape == (2, 7, 96, 64)  # coarsest level ceil(5/2)=3, ceil(3/2)=2 -> x32
        assert head(feats, output_size=(80, 48)).shape == (2, 7, 80, 48)

    def test_structure(self) -> None:
        head = _small_dpt()
        rb = head.reassemble_blocks
        kinds = [type(m).__name__ for m in rb.resize_layers]
        assert kinds == ["ConvTranspose2d", "ConvTranspose2d", "Identity", "Conv2d"]
        strides = [m.stride for m in (rb.resize_layers[0], rb.resize_layers[1], rb.resize_layers[3])]
        assert strides == [(4, 4), (2, 2), (2, 2)]
        assert rb.resize_layers[3].kernel_size == (3, 3)
        assert isinstance(rb.readout_projects[0][0], nn.Linear) and rb.readout_projects[0][0].in_features == 48
        assert isinstance(rb.readout_projects[0][1], nn.GELU)
        assert head.fusion_blocks[0].res_conv_unit1 is None
        assert all(b.res_conv_unit1 is not None for b in head.fusion_blocks[1:])
        assert all(c.conv.bias is None and c.conv.kernel_size == (3, 3) for c in head.convs)

    def test_readout_uses_cls_and_ignore_does_not(self) -> None:
        feats = _feats([24] * 4, [(2, 4)] * 4)
        other = [(p, torch.randn_like(c)) for p, c in feats]
        proj = _small_dpt().eval()
        assert not torch.allclose(proj(feats), proj(other))
        ign = _small_dpt(readout="ignore").eval()
        assert not any("readout" in k for k in ign.state_dict())
        torch.testing.assert_close(ign(feats), ign(other))
        torch.testing.assert_close(ign(feats), ign([p for p, _ in feats]))

    def test_chmv2_layout_on_meta(self) -> None:
        head = chmv2_head(embed_dim=1024, device="meta")
        sd = head.state_dict()
        assert len(sd) == 68
        n_params = sum(p.numel() for p in head.parameters())
        assert n_params == 33_747_200 and round(n_params / 1e6, 1) == 33.7
        assert all(v.device.type == "meta" for v in sd.values())
        assert sd["reassemble_blocks.readout_projects.0.0.weight"].shape == (1024, 2048)
        assert sd["reassemble_blocks.resize_layers.0.weight"].shape == (128, 128, 4, 4)
        assert sd["reassemble_blocks.resize_layers.3.weight"].shape == (1024, 1024, 3, 3)
        assert "reassemble_blocks.resize_layers.2.weight" not in sd  # identity level
        assert sd["convs.3.conv.weight"].shape == (256, 1024, 3, 3) and "convs.3.conv.bias" not in sd
        assert sd["conv_depth.head.4.weight"].shape == (256, 128, 1, 1)
        assert "fusion_blocks.0.res_conv_unit1.conv1.conv.weight" not in sd
        groups = {re.sub(r"\.\d+\.", ".#.", k).split(".#.")[0] for k in sd}
        assert groups == {
            "reassemble_blocks.projects", "reassemble_blocks.resize_layers", "reassemble_blocks.readout_projects",
            "convs", "fusion_blocks", "conv_depth.head",
        }  # fmt: skip

    def test_matches_transformers_chmv2_port(self) -> None:
        """Independent implementation: the CHMv2 head in transformers, renamed to the official keys."""
        modeling = pytest.importorskip("transformers.models.chmv2.modeling_chmv2")
        from transformers.models.chmv2.configuration_chmv2 import CHMv2Config

        cfg = CHMv2Config(
            backbone_config={"model_type": "dinov3_vit", "hidden_size": 24, "num_hidden_layers": 4,
                             "num_attention_heads": 2, "intermediate_size": 48},
            post_process_channels=[8, 16, 24, 32], fusion_hidden_size=16, head_hidden_size=8, number_output_channels=7,
        )  # fmt: skip
        theirs = modeling.CHMv2Head(cfg).eval()
        rules = [  # HF name -> official name (as in the released head checkpoint)
            (r"^reassemble_stage\.layers\.(\d+)\.projection\.", r"reassemble_blocks.projects.\1.conv."),
            (r"^reassemble_stage\.layers\.(\d+)\.resize\.", r"reassemble_blocks.resize_layers.\1."),
            (r"^reassemble_stage\.readout_projects\.", r"reassemble_blocks.readout_projects."),
            (r"^convs\.(\d+)\.weight$", r"convs.\1.conv.weight"),
            (
                r"^fusion_layers\.(\d+)\.residual_layer(\d)\.convolution(\d)\.",
                r"fusion_blocks.\1.res_conv_unit\2.conv\3.conv.",
            ),
            (r"^fusion_layers\.(\d+)\.projection\.", r"fusion_blocks.\1.project.conv."),
        ]
        renamed = {}
        for k, v in theirs.state_dict().items():
            for pattern, repl in rules:
                k = re.sub(pattern, repl, k)
            renamed[k] = v
        ours = _small_dpt().eval()
        ours.load_state_dict(renamed, strict=True)
        for grid in [(4, 6), (5, 3)]:
            feats = _feats([24] * 4, [grid] * 4)
            with torch.no_grad():
                torch.testing.assert_close(ours(feats), theirs(feats, *grid), rtol=1e-5, atol=1e-5)
        logits = torch.randn(2, 256, 6, 5) * 3
        expected = modeling.CHMv2FeaturesToDepth(CHMv2Config())(logits)
        torch.testing.assert_close(LogitsToHeight()(logits), expected, rtol=1e-5, atol=1e-4)

    def test_state_dict_round_trip_through_file(self, tmp_path) -> None:
        head = _small_dpt().eval()
        path = tmp_path / "head.pth"
        torch.save({"model": head.state_dict()}, path)  # official wrapper
        fresh = load_head_weights(_small_dpt().eval(), path)
        feats = _feats([24] * 4, [(2, 2)] * 4)
        torch.testing.assert_close(fresh(feats), head(feats))
        torch.save(head.state_dict(), path)  # plain state dict
        torch.testing.assert_close(load_head_weights(_small_dpt().eval(), path)(feats), head(feats))

    def test_load_errors(self, tmp_path) -> None:
        with pytest.raises(FileNotFoundError, match="no checkpoint"):
            load_head_weights(_small_dpt(), tmp_path / "missing.pth")
        path = tmp_path / "other.pth"
        torch.save(_small_dpt(readout="ignore").state_dict(), path)
        with pytest.raises(ValueError, match="missing \\['reassemble_blocks.readout_projects"):
            load_head_weights(_small_dpt(), path)
        torch.save(_small_dpt(out_channels=3).state_dict(), path)
        with pytest.raises(ValueError, match="shape mismatch"):
            load_head_weights(_small_dpt(), path)

    def test_bad_config(self) -> None:
        with pytest.raises(ValueError, match="readout"):
            _small_dpt(readout="add")
        with pytest.raises(ValueError, match="reassemble_factors"):
            _small_dpt(reassemble_factors=(4, 2, 1))
        with pytest.raises(ValueError, match="1/n"):
            _small_dpt(reassemble_factors=(4, 2, 1, 0.4))
        with pytest.raises(ValueError, match="expected 4 layers"):
            _small_dpt()(_feats([24] * 3, [(2, 2)] * 3))


# ---------------------------------------------------------------------------------------------------------------
# Height bins
# ---------------------------------------------------------------------------------------------------------------


class TestHeightBins:
    def test_chmv2_mixlog_against_numpy(self) -> None:
        bins = height_bins(256).double()
        lo, top, n = 0.001, 96.0 / 8, 256
        t = np.linspace(1, 0, n)
        expected = 8 * (t * np.geomspace(lo, top, n) + (1 - t) * np.linspace(lo, top, n))
        np.testing.assert_allclose(bins.numpy(), expected, rtol=1e-5)
        assert bins[0].item() == pytest.approx(0.008, rel=1e-5) and bins[-1].item() == pytest.approx(96.0, rel=1e-6)
        assert torch.all(bins[1:] > bins[:-1])

    def test_linear_and_log(self) -> None:
        lin = height_bins(5, min_height=1.0, max_height=5.0, strategy="linear")
        torch.testing.assert_close(lin, torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        log = height_bins(3, min_height=0.1, max_height=10.0, strategy="log")
        torch.testing.assert_close(log, torch.tensor([0.1, 1.0, 10.0]))

    @pytest.mark.parametrize("strategy", ["chmv2_mixlog", "linear", "log"])
    def test_bins_metres_round_trip(self, strategy) -> None:
        bins = height_bins(64, min_height=0.01, max_height=60.0, strategy=strategy)
        idx = torch.arange(64)
        assert torch.equal(metres_to_bin(bins, bins), idx)
        # one-hot logits -> metres -> bin index gives the index back, and the value back
        onehot = F.one_hot(idx, 64).T.float()[None, :, :, None] * 5.0  # [1, K, K, 1]
        norm = "chmv2_mixlog" if strategy == "chmv2_mixlog" else "softmax"
        logits = onehot * (20.0 if norm == "softmax" else 1.0)
        metres = bins_to_metres(logits, bins, norm=norm)  # [1, 1, K, 1]
        torch.testing.assert_close(metres.flatten(), bins, rtol=1e-4, atol=1e-5)
        assert torch.equal(metres_to_bin(metres.flatten(), bins), idx)

    def test_nearest_bin_within_half_spacing(self) -> None:
        bins = height_bins(256)
        h = torch.tensor([0.0, 0.5, 3.3, 12.0, 37.7, 60.1, 95.9, 200.0, float("nan")])
        idx = metres_to_bin(h, bins)
        assert idx[-1].item() == -1 and idx[-2].item() == 255 and idx[0].item() == 0
        for value, i in zip(h[:-2], idx[:-2]):
            nearest = torch.argmin((bins - value).abs())
            assert i.item() == nearest.item()

    @pytest.mark.parametrize("norm", ["chmv2_mixlog", "linear", "softmax", "sigmoid"])
    def test_weights_sum_to_one(self, norm) -> None:
        w = bin_weights(torch.randn(2, 16, 3, 4) * 4, norm=norm)
        assert torch.all(w >= 0)
        torch.testing.assert_close(w.sum(dim=1), torch.ones(2, 3, 4))

    def test_mixlog_is_linear_normalisation_not_softmax(self) -> None:
        logits = torch.tensor([2.0, 1.0, -3.0, 1.0]).view(1, 4, 1, 1)
        w = bin_weights(logits).flatten()
        torch.testing.assert_close(w, torch.tensor([0.5, 0.25, 0.0, 0.25]), atol=1e-7, rtol=0)
        # all logits <= 0: the shift keeps it defined (uniform weights)
        torch.testing.assert_close(bin_weights(-torch.ones(1, 4, 1, 1)).flatten(), torch.full((4,), 0.25))

    def test_logits_to_height(self) -> None:
        conv = LogitsToHeight()
        assert conv.bins.shape == (256,) and len(conv.state_dict()) == 0
        out = conv(torch.randn(2, 256, 5, 7))
        assert out.shape == (2, 1, 5, 7) and torch.all((out >= 0.008) & (out <= 96.0))
        reg = LogitsToHeight(n_bins=1, min_height=0.5)
        torch.testing.assert_close(reg(torch.tensor([-2.0, 3.0]).view(2, 1, 1, 1)).flatten(), torch.tensor([0.5, 3.5]))
        with pytest.raises(ValueError, match=r"expected \[B, 256, H, W\]"):
            conv(torch.randn(1, 10, 2, 2))

    def test_bad_arguments(self) -> None:
        with pytest.raises(ValueError, match="unknown strategy"):
            height_bins(8, strategy="cubic")
        with pytest.raises(ValueError, match="0 < min_height < max_height"):
            height_bins(8, min_height=5.0, max_height=1.0)
        with pytest.raises(ValueError, match="unknown norm"):
            LogitsToHeight(norm="tanh")
        with pytest.raises(ValueError, match="match the bins"):
            bins_to_metres(torch.randn(1, 3, 2, 2), height_bins(4))


# ---------------------------------------------------------------------------------------------------------------
# DenseModel
# ---------------------------------------------------------------------------------------------------------------


class TestDenseModel:
    @pytest.mark.parametrize("size", [(32, 32), (48, 80), (40, 56), (17, 33), (70, 90), (64, 20)])
    @pytest.mark.parametrize("kind", ["linear", "multilinear", "dpt"])
    def test_output_at_input_resolution(self, backbone, size, kind) -> None:
        if kind == "linear":
            model = DenseModel(backbone=backbone, head=LinearHead(in_channels=96, out_channels=5))
        elif kind == "multilinear":
            head = LinearHead(in_channels=[96] * 3, out_channels=5, use_cls_token=True)
            model = DenseModel(backbone=backbone, head=head, layers=[0, 2, 3])
        else:
            model = DenseModel(backbone=backbone, head=_small_dpt(embed_dim=96, out_channels=5), layers=[0, 1, 2, 3])
        x = _landsat(*size)
        out = model.eval()(x)
        assert out.shape == (2, 5, *size) and model.out_channels == 5
        assert torch.isfinite(out).all()
        assert backbone.calls[-1] == {
            "n": model.layers, "reshape": True, "return_class_token": True, "norm": True,
        }  # fmt: skip

    def test_centre_padding(self, backbone) -> None:
        lin = DenseModel(backbone=backbone, head=LinearHead(in_channels=96, out_channels=2))
        dpt = DenseModel(backbone=backbone, head=_small_dpt(embed_dim=96), layers=4)
        assert lin.pad_multiple == 16 and dpt.pad_multiple == 32
        assert lin.padding(17, 33) == (7, 8, 7, 8)  # 17 -> 32 rows, 33 -> 48 columns
        assert dpt.padding(48, 64) == (0, 0, 8, 8)
        assert lin.padding(32, 48) == (0, 0, 0, 0)

    def test_padding_is_centred_on_the_input(self, backbone) -> None:
        """The cropped output equals the head run by hand on the centre-padded image."""
        model = DenseModel(backbone=backbone, head=LinearHead(in_channels=96, out_channels=3), layers=1).eval()
        x = _landsat(20, 40)
        padded = F.pad(x, (4, 4, 6, 6))  # -> 32 x 48
        feats = backbone.get_intermediate_layers(padded, n=1, reshape=True, return_class_token=True)
        full = model.head(feats, output_size=(32, 48))
        torch.testing.assert_close(model(x), full[..., 6:26, 4:44])

    def test_frozen_backbone_gets_no_gradient(self, backbone) -> None:
        backbone.train()
        model = DenseModel(backbone=backbone, head=LinearHead(in_channels=96, out_channels=3))
        assert model.head.training and not model.backbone.training  # from construction
        model.train()
        assert model.head.training and not model.backbone.training
        model(_landsat(32, 32)).square().mean().backward()
        assert all(p.grad is None for p in backbone.parameters())
        assert all(p.grad is not None for p in model.head.parameters())
        groups = model.parameter_groups(lr=1e-3)
        assert [g["name"] for g in groups] == ["head"]

    def test_trainable_backbone(self, backbone) -> None:
        backbone.eval()  # as load_backbone returns it
        model = DenseModel(backbone=backbone, head=LinearHead(in_channels=96, out_channels=3), freeze_backbone=False)
        assert model.backbone.training  # from construction: Lightning does not call train() when a fit starts
        model.train()
        assert model.backbone.training
        model(_landsat(32, 32)).square().mean().backward()
        assert backbone.patch_embed.proj.weight.grad is not None
        groups = model.parameter_groups(lr=1e-3, backbone_lr_scale=0.1)
        assert [(g["name"], g["lr"]) for g in groups] == [("head", 1e-3), ("backbone", pytest.approx(1e-4))]

    def test_bad_configuration(self, backbone) -> None:
        head = LinearHead(in_channels=[96, 96], out_channels=2)
        with pytest.raises(ValueError, match="expects 2 layers"):
            DenseModel(backbone=backbone, head=head, layers=[1, 2, 3])
        with pytest.raises(ValueError, match="not in \\[0, 4\\)"):
            DenseModel(backbone=backbone, head=head, layers=[1, 7])
        with pytest.raises(ValueError, match="between 1 and"):
            DenseModel(backbone=backbone, head=head, layers=5)
        with pytest.raises(ValueError, match="multiple of the patch size"):
            DenseModel(backbone=backbone, head=head, layers=2, pad_multiple=24)
        model = DenseModel(backbone=backbone, head=head, layers=2)
        with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
            model(torch.zeros(3, 32, 32))

    def test_height_model_outputs_metres(self, backbone) -> None:
        head = _small_dpt(embed_dim=96, out_channels=256)
        model = DenseModel(backbone=backbone, head=head, layers=[0, 1, 2, 3], output=LogitsToHeight()).eval()
        out = model(_landsat(40, 72))
        assert out.shape == (2, 1, 40, 72) and model.out_channels == 1
        assert torch.all((out >= 0.008) & (out <= 96.0))

    def test_build_chmv2_model(self) -> None:
        vit = build_backbone("vitmicro16", depth=24)
        model = build_chmv2_model(vit).eval()
        assert model.layers == list(CHMV2_LAYERS) and len(model.head.state_dict()) == 68
        assert len(model.state_dict()) == 68 + len(vit.state_dict())
        with torch.no_grad():
            out = model(_landsat(32, 48, batch=1))
        assert out.shape == (1, 1, 32, 48) and torch.isfinite(out).all()
        assert math.isclose(model.pad_multiple, 32)
