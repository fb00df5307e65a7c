"""Loading and exporting backbones: every checkpoint layout, size inference, inflation, metadata and errors."""

import json
import logging
from pathlib import Path

import pytest
import torch
from torch import Tensor

from dinov3_eo.data.normalization import Normalization
from dinov3_eo.models import BackboneMeta, CheckpointError, build_backbone, export_backbone, load_backbone, to_timm
from dinov3_eo.models.hub import (
    _default_normalization,
    detect_layout,
    export_main,
    infer_architecture,
    inflate_patch_embed,
)
from dinov3_eo.models.vit import DinoVisionTransformer


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core CI box, OpenMP spinning makes 2 threads far slower under load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomised(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random values in every parameter (biases, LayerScale, norms, tokens) so that none hides behind its init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def micro() -> DinoVisionTransformer:
    return randomised(build_backbone("vitmicro16", depth=2))


@pytest.fixture(scope="module")
def image() -> Tensor:
    return torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(3))


def same_outputs(a: DinoVisionTransformer, b: DinoVisionTransformer, x: Tensor) -> None:
    with torch.no_grad():
        fa, fb = a.forward_features(x), b.forward_features(x)
    for key in ("x_norm_clstoken", "x_storage_tokens", "x_norm_patchtokens"):
        torch.testing.assert_close(fa[key], fb[key], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ official layouts
class TestOfficialLayouts:
    def test_hub_checkpoint(self, micro: DinoVisionTransformer, image: Tensor, tmp_path: Path) -> None:
        path = tmp_path / "dinov3_vitmicro16_pretrain_lvd1689m-00000000.pth"
        torch.save(micro.state_dict(), path)
        loaded = load_backbone(path)
        same_outputs(micro, loaded, image)
        assert not loaded.training
        assert (loaded.meta.name, loaded.meta.in_chans, loaded.meta.patch_size, loaded.meta.embed_dim) == (
            "vitmicro16", 3, 16, 96,
        )
        assert loaded.n_blocks == 2  # depth read from the weights
        assert loaded.meta.normalization == Normalization.preset("imagenet").to_dict()
        assert loaded.meta.bands == ["red", "green", "blue"]

    def test_sat_checkpoint_with_local_cls_norm(self, image: Tensor, tmp_path: Path) -> None:
        sat = randomised(build_backbone("vitmicro16", untie_global_and_local_cls_norm=True))
        path = tmp_path / "dinov3_vitmicro16_pretrain_sat493m-eadcf0ff.pth"
        torch.save(sat.state_dict(), path)
        for name in (None, "vitmicro16"):
            loaded = load_backbone(path, name=name)
            assert loaded.local_cls_norm is not None
            same_outputs(sat, loaded, image)
            assert loaded.meta.normalization["name"] == "sat493m" and loaded.meta.gsd == 0.6

    def test_sat_vitl16_is_recognised_without_filename_hint(self) -> None:
        assert _default_normalization(Path("weights.pth"), "vitl16", {"local_cls_norm.weight": torch.ones(1)}) == (
            "sat493m", 0.6,
        )
        assert _default_normalization(Path("weights.pth"), "vitl16", {}) == ("imagenet", None)

    def test_training_checkpoint(self, micro: DinoVisionTransformer, image: Tensor, tmp_path: Path) -> None:
        teacher = {f"module.backbone.{k}": v for k, v in micro.state_dict().items()}
        teacher["module.dino_head.mlp.0.weight"] = torch.randn(8, 96)
        teacher["module.ibot_head.last_layer.weight"] = torch.randn(16, 8)
        path = tmp_path / "model_0001249.rank_0.pth"
        torch.save({"teacher": teacher, "iteration": 1249}, path)
        same_outputs(micro, load_backbone(path), image)

    def test_size_inference_swiglu(self, image: Tensor, tmp_path: Path) -> None:
        plus = randomised(build_backbone("vits16plus", depth=1))
        path = tmp_path / "splus.pth"
        torch.save(plus.state_dict(), path)
        loaded = load_backbone(path)
        assert loaded.meta.name == "vits16plus" and loaded.num_heads == 6
        same_outputs(plus, loaded, image)

    def test_infer_architecture_overrides(self, micro: DinoVisionTransformer) -> None:
        name, overrides = infer_architecture(micro.state_dict())
        assert name == "vitmicro16"
        assert overrides == {"depth": 2, "untie_global_and_local_cls_norm": False}
        seven_b = build_backbone("vit7b16", device="meta").state_dict()
        assert infer_architecture(seven_b) == ("vit7b16", {"untie_global_and_local_cls_norm": True})


# ----------------------------------------------------------------------------- foreign layouts
def hf_model(gated: bool) -> torch.nn.Module:
    """A real transformers DINOv3 model with random weights (sizes of our vitmicro16 / vits16plus)."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    if gated:
        config = DINOv3ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=1, num_attention_heads=6,
                                 num_register_tokens=4, use_gated_mlp=True, hidden_act="silu")
    else:
        config = DINOv3ViTConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
                                 num_register_tokens=4)
    torch.manual_seed(5)
    return randomised(DINOv3ViTModel(config), seed=5)


class TestHuggingFace:
    @pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
    @pytest.mark.parametrize("form", ["state_dict", "save_pretrained", "safetensors_file"])
    def test_matches_transformers(self, gated: bool, form: str, image: Tensor, tmp_path: Path) -> None:
        hf = hf_model(gated)
        if form == "state_dict":
            source = tmp_path / "hf_state.pth"
            torch.save(hf.state_dict(), source)  # in-memory keys: "model.layer.i."
        else:
            hf.save_pretrained(tmp_path / "hf")  # on-disk keys: "layer.i."
            source = tmp_path / "hf" if form == "save_pretrained" else tmp_path / "hf" / "model.safetensors"
        ours = load_backbone(source)
        assert ours.meta.name == ("vits16plus" if gated else "vitmicro16")
        masks = torch.zeros(2, 6, dtype=torch.bool)
        masks[1, 2] = True
        with torch.no_grad():
            theirs = hf(pixel_values=image, bool_masked_pos=masks).last_hidden_state  # normed [B, 5 + hw, D]
            mine = ours.forward_features(image, masks=masks)
        torch.testing.assert_close(mine["x_norm_clstoken"], theirs[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine["x_storage_tokens"], theirs[:, 1:5], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine["x_norm_patchtokens"], theirs[:, 5:], rtol=1e-5, atol=1e-5)


class TestTimm:
    @pytest.mark.parametrize(
        ("variant", "kwargs"),
        [
            ("vit_small_plus_patch16_dinov3_qkvb", {"depth": 1}),
            ("vit_small_patch16_dinov3", {"depth": 1, "num_classes": 10}),  # no q/v bias, with a classifier
        ],
    )
    def test_timm_state_dict(self, variant: str, kwargs: dict, image: Tensor, tmp_path: Path) -> None:
        import timm

        theirs = randomised(timm.create_model(variant, pretrained=False, global_pool="token", **kwargs))
        path = tmp_path / "timm.pth"
        torch.save(theirs.state_dict(), path)
        ours = load_backbone(path)
        assert ours.meta.name == ("vits16plus" if "plus" in variant else "vits16")
        with torch.no_grad():
            torch.testing.assert_close(ours(image), theirs.forward_head(theirs.forward_features(image), pre_logits=True),
                                       rtol=1e-5, atol=1e-5)
        assert torch.equal(ours.mask_token, torch.zeros(1, 384))  # timm drops the pretraining-only mask token

    @pytest.mark.parametrize("name", ["vitmicro16", "vits16plus"])
    def test_to_timm(self, name: str, image: Tensor) -> None:
        ours = randomised(build_backbone(name, depth=1))
        ours.meta = BackboneMeta(name=name, in_chans=3, patch_size=16, embed_dim=ours.embed_dim,
                                 normalization=Normalization.preset("sat493m").to_dict())
        theirs = to_timm(ours)
        with torch.no_grad():
            torch.testing.assert_close(theirs(image), ours(image), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs.forward_features(image)[:, 5:],
                                       ours.forward_features(image)["x_norm_patchtokens"], rtol=1e-5, atol=1e-5)
        assert theirs.pretrained_cfg["mean"] == (0.430, 0.411, 0.296)

    def test_to_timm_plain_variant_for_zero_biases(self) -> None:
        theirs = to_timm(build_backbone("vits16", depth=1))
        assert theirs.pretrained_cfg["architecture"] == "vit_small_patch16_dinov3"


# -------------------------------------------------------------------------------- our formats
class TestExport:
    def test_export_round_trips(self, micro: DinoVisionTransformer, image: Tensor, tmp_path: Path) -> None:
        meta = BackboneMeta(name="vitmicro16", in_chans=3, patch_size=16, embed_dim=96, bands=["B4", "B3", "B2"],
                            normalization=Normalization.zscore([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]).to_dict(), gsd=10.0)
        written = export_backbone(micro, tmp_path / "out" / "micro.pth", meta=meta)
        assert {p.name for p in written.values()} == {"micro.pth", "micro.safetensors", "micro.json"}
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["micro.json", "micro.pth", "micro.safetensors"]
        # official layout: exactly the model's keys, loadable as a plain state dict
        plain = torch.load(written["pth"], weights_only=True)
        assert list(plain) == list(micro.state_dict())
        sidecar = json.loads(written["json"].read_text())
        assert sidecar["dinov3_eo"]["bands"] == ["B4", "B3", "B2"] and sidecar["arch"]["depth"] == 2
        for path in (written["pth"], written["safetensors"]):
            loaded = load_backbone(path)
            same_outputs(micro, loaded, image)
            assert loaded.meta == meta

    def test_lightning_checkpoint(self, tmp_path: Path, image: Tensor) -> None:
        model = randomised(build_backbone("vitmicro16", in_chans=4, depth=1))
        student = randomised(build_backbone("vitmicro16", in_chans=4, depth=1), seed=9)
        meta = BackboneMeta(name="vitmicro16", in_chans=4, patch_size=16, embed_dim=96,
                            bands=["red", "green", "blue", "nir"],
                            normalization=Normalization.zscore([1, 2, 3, 4], [1, 1, 1, 1]).to_dict(), gsd=0.6)
        state = {f"teacher.backbone.{k}": v for k, v in model.state_dict().items()}
        state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
        state["teacher.dino_head.last_layer.weight"] = torch.randn(8, 4)
        ckpt = {"state_dict": state, "dinov3_eo": meta.to_dict(), "epoch": 3, "global_step": 10,
                "hyper_parameters": {"lr": 1e-3, "data_root": Path("/data/archive")}, "optimizer_states": []}
        path = tmp_path / "last.ckpt"
        torch.save(ckpt, path)
        loaded = load_backbone(path)
        assert loaded.meta == meta
        x = torch.randn(1, 4, 32, 32)
        torch.testing.assert_close(loaded(x), model(x))

    def test_export_cli(self, micro: DinoVisionTransformer, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        ckpt = tmp_path / "teacher.pth"
        torch.save({"teacher": {f"backbone.{k}": v for k, v in micro.state_dict().items()}}, ckpt)
        assert export_main([str(ckpt), "-o", str(tmp_path / "exp" / "backbone")]) == 0
        assert (tmp_path / "exp" / "backbone.safetensors").exists()
        assert "backbone.pth" in capsys.readouterr().out
        assert export_main([str(tmp_path / "missing.pth"), "-o", str(tmp_path / "x")]) == 2
        assert "does not exist" in capsys.readouterr().err

    def test_meta_dict_round_trip(self) -> None:
        meta = BackboneMeta(name="vitl16", in_chans=3, patch_size=16, embed_dim=1024, bands=None,
                            normalization=Normalization.preset("sat493m").to_dict(), gsd=0.6)
        d = meta.to_dict()
        assert d["model"] == "vitl16" and json.loads(json.dumps(d)) == d
        assert BackboneMeta.from_dict(d) == meta
        assert BackboneMeta.from_dict({k: v for k, v in d.items() if k != "name"}) == meta
        with pytest.raises(CheckpointError, match=r"Backbone metadata lacks \['embed_dim'\]"):
            BackboneMeta.from_dict({"model": "vitl16", "in_chans": 3, "patch_size": 16})


# ---------------------------------------------------------------------------------- inflation
class TestInflation:
    def test_inflated_weights(self) -> None:
        rgb = torch.randn(8, 3, 16, 16)
        four = inflate_patch_embed(rgb, 4)
        torch.testing.assert_close(four[:, :3], rgb * 3 / 4)
        torch.testing.assert_close(four[:, 3], rgb.mean(1) * 3 / 4)
        one = inflate_patch_embed(rgb, 1)
        torch.testing.assert_close(one[:, 0], rgb.mean(1) * 3)
        with pytest.raises(ValueError, match=r"expects an RGB weight \(D, 3, p, p\), got \(8, 4, 16, 16\)"):
            inflate_patch_embed(four, 5)

    @pytest.mark.parametrize("bands", [1, 4, 10])
    def test_grey_image_gives_rgb_features(
        self, bands: int, micro: DinoVisionTransformer, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Equal bands: the inflated model sees exactly what the RGB model sees (why the 3/N scale)."""
        path = tmp_path / "rgb.pth"
        torch.save(micro.state_dict(), path)
        with caplog.at_level(logging.WARNING, logger="dinov3_eo.models.hub"):
            multi = load_backbone(path, in_chans=bands)
        assert f"Inflated the RGB patch embedding of {path} to {bands} bands" in caplog.text
        grey = torch.randn(2, 1, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(multi(grey.expand(-1, bands, -1, -1)), micro(grey.expand(-1, 3, -1, -1)),
                                       rtol=1e-5, atol=1e-5)
        assert multi.meta.in_chans == bands and multi.meta.bands is None and multi.meta.normalization is None

    def test_only_rgb_weights_inflate(self, tmp_path: Path) -> None:
        path = tmp_path / "four.pth"
        torch.save(build_backbone("vitmicro16", in_chans=4, depth=1).state_dict(), path)
        with pytest.raises(CheckpointError, match="weights take 4 bands; only RGB .* can be adapted to 5"):
            load_backbone(path, in_chans=5)


# ------------------------------------------------------------------------------------- errors
class TestErrors:
    @pytest.fixture()
    def state(self, micro: DinoVisionTransformer) -> dict[str, Tensor]:
        return dict(micro.state_dict())

    def _save(self, obj, tmp_path: Path) -> Path:
        path = tmp_path / "bad.pth"
        torch.save(obj, path)
        return path

    def test_missing_key(self, state: dict, tmp_path: Path) -> None:
        del state["blocks.1.ls2.gamma"]
        with pytest.raises(CheckpointError, match=r"missing keys \[blocks\.1\.ls2\.gamma\]"):
            load_backbone(self._save(state, tmp_path))

    def test_wrong_shape_and_unexpected_key_in_one_message(self, state: dict, tmp_path: Path) -> None:
        state["blocks.0.mlp.fc2.bias"] = torch.zeros(95)
        state["blocks.0.attn.extra"] = torch.zeros(1)
        with pytest.raises(CheckpointError) as info:
            load_backbone(self._save(state, tmp_path))
        message = str(info.value)
        assert "unexpected keys [blocks.0.attn.extra]" in message
        assert "blocks.0.mlp.fc2.bias: checkpoint (95,) vs model (96,)" in message

    def test_wrong_name(self, state: dict, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match=r"for backbone 'vits16' does not fit: missing keys \[blocks\.10"):
            load_backbone(self._save(state, tmp_path), name="vits16")

    def test_unknown_size(self, tmp_path: Path) -> None:
        odd = build_backbone("vitmicro16", embed_dim=64, depth=1).state_dict()
        with pytest.raises(CheckpointError, match="No registered backbone has width 64 with a MLP of hidden size 256"):
            load_backbone(self._save(odd, tmp_path))

    def test_unrecognised_layout(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match="Unrecognised checkpoint layout"):
            load_backbone(self._save({"conv1.weight": torch.zeros(1)}, tmp_path))
        with pytest.raises(CheckpointError, match="Unrecognised checkpoint layout"):
            detect_layout({"fc.weight": torch.zeros(1)})

    def test_not_a_state_dict(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match="expected a state dict of tensors"):
            load_backbone(self._save({"cls_token": torch.zeros(1), "note": "hello"}, tmp_path))

    def test_pickled_object_is_refused(self, tmp_path: Path) -> None:
        path = tmp_path / "module.pth"
        torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
        with pytest.raises(CheckpointError, match=r"Cannot read .*module\.pth with torch\.load\(weights_only=True\)"):
            load_backbone(path)

    def test_lightning_without_teacher(self, tmp_path: Path) -> None:
        with pytest.raises(CheckpointError, match=r"no 'teacher\.backbone\.\*' \(pretraining\) or 'model\.backbone\.\*' "
                           r"\(segmentation, height\) weights \(top-level prefixes: \['head'\]\)"):  # fmt: skip
            load_backbone(self._save({"state_dict": {"head.weight": torch.zeros(1)}}, tmp_path))

    def test_missing_file(self, tmp_path: Path) -> None:
        with pytest.raises(FileNotFoundError, match="Checkpoint .*nothing.pth does not exist"):
            load_backbone(tmp_path / "nothing.pth")


def test_read_checkpoint_names_what_the_file_was_for(tmp_path: Path) -> None:
    from dinov3_eo.models.hub import CheckpointError, read_checkpoint

    with pytest.raises(FileNotFoundError, match=r"^init_from '.*missing\.ckpt' does not exist\.$"):
        read_checkpoint(tmp_path / "missing.ckpt", "init_from")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.ckpt is not a PyTorch checkpoint"):
        read_checkpoint(junk)
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "ok.ckpt")
    assert torch.equal(read_checkpoint(tmp_path / "ok.ckpt")["state_dict"]["w"], torch.ones(2))


def test_a_file_that_is_no_checkpoint_is_named_for_what_it_is(tmp_path: Path) -> None:
    import argparse

    from dinov3_eo.models.hub import read_checkpoint

    tif = Path(__file__).resolve().parents[1] / "dinov3_eo" / "sample" / "landsat8_224078_subset.tif"
    with pytest.raises(CheckpointError, match=r"is not a PyTorch checkpoint \(it is a TIFF image\)\.$"):
        read_checkpoint(tif)
    (tmp_path / "noise.pt").write_bytes(b"\x00\x01 nothing known")
    with pytest.raises(CheckpointError, match="torch.save writes a zip archive, this file is none"):
        read_checkpoint(tmp_path / "noise.pt")
    # a real checkpoint holding an object that unpickling would construct: refused, without torch's advice to
    # load it with weights_only=False
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "unsafe.pt")
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(tmp_path / "unsafe.pt")
    message = str(info.value)
    assert "GLOBAL argparse.Namespace was not an allowed global" in message and "could run code" in message
    assert "weights_only` set to `False`" not in message and "Please use" not in message
    # a truncated one: torch's own first line
    data = tmp_path / "whole.pt"
    torch.save({"w": torch.zeros(100)}, data)
    (tmp_path / "cut.pt").write_bytes(data.read_bytes()[:300])
    with pytest.raises(CheckpointError, match="Cannot read .*cut.pt with torch.load\\(weights_only=True\\): PytorchStreamReader"):
        read_checkpoint(tmp_path / "cut.pt")
