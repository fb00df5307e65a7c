"""LoRA fine-tuning (dinov3_eo.models.lora) of the DINOv3 ViT, in a dense model and through the segmentation task."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dinov3_eo.models.dense import DenseModel, LinearHead
from dinov3_eo.models.lora import (
    LoRA,
    LoRAConfig,
    add_lora,
    has_lora,
    lora_parameters,
    merge_lora,
    merge_lora_state_dict,
)
from dinov3_eo.models.vit import LinearKMaskedBias, build_backbone


def tiny_vit() -> nn.Module:
    """A micro ViT whose blocks matter: LayerScale 1.0 (at the official 1e-5 a random block barely moves a token)."""
    torch.manual_seed(0)
    return build_backbone("vitmicro16", layerscale_init=1.0).eval()


def randomise_updates(module: nn.Module, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(module):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


class TestLoRALayer:
    def test_zero_at_start_and_the_formula_after(self) -> None:
        """B = 0 at start (outputs unchanged); then W x + b + (alpha / r) B A x, against a linear layer built with
        the summed weight."""
        layer = nn.Linear(12, 20)
        reference = copy.deepcopy(layer)
        holder = nn.Sequential(layer)
        holder.blocks = nn.ModuleList([nn.ModuleDict({"proj": layer})])  # add_lora looks in blocks
        add_lora(holder, LoRAConfig(rank=3, alpha=6.0, targets=("proj",)))
        x = torch.randn(4, 7, 12)
        torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=0)
        randomise_updates(holder)
        update = layer.lora
        assert update.scaling == 2.0 and update.A.shape == (3, 12) and update.B.shape == (20, 3)
        summed = nn.Linear(12, 20)
        with torch.no_grad():
            summed.weight.copy_(reference.weight + 2.0 * update.B @ update.A)
            summed.bias.copy_(reference.bias)
        torch.testing.assert_close(layer(x), summed(x), rtol=1e-5, atol=1e-6)

    def test_initialisation(self) -> None:
        update = LoRA(64, 32, rank=8, alpha=16)
        assert (update.B == 0).all()
        bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) = nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))
        assert update.A.abs().max() <= bound and update.A.std() > 0.4 * bound

    @pytest.mark.parametrize("kwargs, match", [
        ({"rank": 0}, "rank"), ({"dropout": 1.0}, "dropout"), ({"targets": ["query"]}, "targets"),
        ({"targets": []}, "targets"), ({"ranks": 4}, "Unknown LoRA option"),
    ])  # fmt: skip
    def test_bad_configs(self, kwargs: dict, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            LoRAConfig.from_any(kwargs)


class TestBackbone:
    def test_adapts_the_chosen_layers_and_freezes_the_rest(self) -> None:
        vit = tiny_vit()
        names = add_lora(vit, {"rank": 4, "targets": ["qkv", "fc2"], "blocks": [0, 2]})
        assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.2.attn.qkv", "blocks.2.mlp.fc2"]
        assert isinstance(vit.blocks[0].attn.qkv, LinearKMaskedBias)  # the layer itself stays (masked key bias)
        trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
        assert trainable == {f"{n}.lora.{m}" for n in names for m in "AB"}
        with pytest.raises(ValueError, match="already has a LoRA update"):
            add_lora(vit, {"rank": 4, "targets": ["qkv"], "blocks": [0]})
        with pytest.raises(ValueError, match="block indices"):
            add_lora(tiny_vit(), {"blocks": [99]})

    def test_outputs_unchanged_at_start_and_merge_is_exact(self) -> None:
        plain, vit = tiny_vit(), tiny_vit()
        keys = set(plain.state_dict())
        add_lora(vit, {"rank": 4, "targets": ["qkv", "proj", "fc1", "fc2"]})
        x = torch.randn(2, 3, 48, 64)
        with torch.no_grad():
            torch.testing.assert_close(vit.forward_features(x)["x_norm_patchtokens"],
                                       plain.forward_features(x)["x_norm_patchtokens"], rtol=0, atol=0)  # fmt: skip
            randomise_updates(vit)
            adapted = vit.forward_features(x)["x_norm_patchtokens"]
            assert (adapted - plain.forward_features(x)["x_norm_patchtokens"]).abs().max() > 1e-2
            assert set(vit.state_dict()) - keys == {k for k in vit.state_dict() if ".lora." in k}
            assert merge_lora(vit) == 4 * len(vit.blocks)
            assert not has_lora(vit) and set(vit.state_dict()) == keys  # the official layout again
            torch.testing.assert_close(vit.forward_features(x)["x_norm_patchtokens"], adapted, rtol=1e-4, atol=1e-5)
        assert all(not m._forward_hooks for m in vit.modules())

    def test_only_the_updates_get_gradients_and_they_survive_a_state_dict_round_trip(self) -> None:
        vit = tiny_vit().train()
        add_lora(vit, {"rank": 2})
        before = {k: v.clone() for k, v in vit.state_dict().items()}
        optimizer = torch.optim.AdamW(lora_parameters(vit), lr=1e-2)
        for _ in range(3):
            vit.forward_features(torch.randn(2, 3, 32, 32))["x_norm_clstoken"].square().sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        after = vit.state_dict()
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        assert changed and all(".lora." in k for k in changed)
        assert any(k.endswith(".lora.A") for k in changed) and any(k.endswith(".lora.B") for k in changed)
        fresh = tiny_vit()
        add_lora(fresh, {"rank": 2})
        fresh.load_state_dict(after, strict=True)
        x = torch.randn(1, 3, 32, 32)
        vit.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh.forward_features(x)["x_norm_clstoken"], vit.forward_features(x)["x_norm_clstoken"])

    def test_an_official_checkpoint_loads_into_an_adapted_backbone(self) -> None:
        """The base weights keep their official names: a plain state dict loads with only the updates missing."""
        plain, vit = tiny_vit(), build_backbone("vitmicro16", layerscale_init=1.0)
        add_lora(vit, {"rank": 4})
        missing, unexpected = vit.load_state_dict(plain.state_dict(), strict=False)
        assert not unexpected and missing and all(".lora." in k for k in missing)

    def test_merging_the_tensors_equals_merging_the_module(self) -> None:
        vit = tiny_vit()
        add_lora(vit, {"rank": 3, "alpha": 6.0, "targets": ["qkv", "fc1"]})
        randomise_updates(vit)
        folded = merge_lora_state_dict(vit.state_dict(), {"rank": 3, "alpha": 6.0})
        merge_lora(vit)
        assert set(folded) == set(vit.state_dict())
        for key, value in vit.state_dict().items():
            torch.testing.assert_close(folded[key], value, rtol=1e-5, atol=1e-6)
        broken = {k: v for k, v in tiny_vit().state_dict().items()} | {"blocks.0.attn.qkv.lora.A": torch.zeros(2, 4)}
        with pytest.raises(ValueError, match="incomplete"):
            merge_lora_state_dict(broken)

    def test_deepcopy_keeps_the_update(self) -> None:
        vit = tiny_vit()
        add_lora(vit, {"rank": 4})
        randomise_updates(vit)
        twin = copy.deepcopy(vit)
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(twin(x), vit(x))
        merge_lora(twin)
        assert has_lora(vit)  # merging the copy leaves the original adapted


class TestDenseModel:
    def test_fine_tuning_trains_a_backbone_that_arrives_frozen(self) -> None:
        """``freeze_backbone=False`` on a backbone taken from a frozen model (a text model's vision tower) trains it:
        before, its weights kept ``requires_grad=False`` and only the head trained."""
        vit = tiny_vit().requires_grad_(False)
        model = DenseModel(backbone=vit, head=LinearHead(in_channels=vit.embed_dim, out_channels=3), layers=1,
                           freeze_backbone=False)  # fmt: skip
        groups = {g["name"]: g for g in model.parameter_groups(lr=1e-3)}
        assert len(groups["backbone"]["params"]) == len(list(vit.parameters()))
        assert all(p.requires_grad for p in vit.parameters())

    def test_groups_modes_and_training(self) -> None:
        vit = tiny_vit()
        head = LinearHead(in_channels=vit.embed_dim, out_channels=3)
        model = DenseModel(backbone=vit, head=head, layers=1, lora={"rank": 4})
        assert not model.freeze_backbone and model.lora == LoRAConfig(rank=4)
        model.train()
        assert model.backbone.training  # adapted like a fine-tuned backbone
        groups = {g["name"]: g for g in model.parameter_groups(lr=1e-3, lora_lr_scale=0.5)}
        assert set(groups) == {"head", "lora"} and groups["lora"]["lr"] == 5e-4
        assert {id(p) for p in groups["lora"]["params"]} == {id(p) for p in lora_parameters(vit)}
        base = {n: p.clone() for n, p in vit.named_parameters() if ".lora." not in n}
        optimizer = torch.optim.AdamW(list(groups.values()))
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
        for _ in range(2):
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
        assert all(torch.equal(p, base[n]) for n, p in vit.named_parameters() if ".lora." not in n)
        assert any(p.abs().sum() > 0 for n, p in vit.named_parameters() if n.endswith(".lora.B"))


def test_segmentation_task_trains_lora_and_reloads(tmp_path: Path) -> None:
    """A Lightning fit of a LoRA segmentation task: only the updates and the head train; the checkpoint rebuilds the
    adapted model through ``from_checkpoint`` with the same predictions, and ``load_backbone`` reads the adapted
    backbone (updates merged) from it."""
    import lightning as L

    from dinov3_eo.tasks.segmentation import SegmentationTask

    torch.manual_seed(0)
    task = SegmentationTask(backbone="vitmicro16", num_classes=3, lora={"rank": 4, "targets": ["qkv"]}, lr=1e-2,
                            backbone_kwargs={"layerscale_init": 1.0})  # blocks that matter: the updates show
    x = torch.randn(8, 3, 32, 32)
    data = [{"image": x[i : i + 2], "mask": torch.randint(0, 3, (2, 32, 32))} for i in range(0, 8, 2)]
    base = {k: v.clone() for k, v in task.model.backbone.state_dict().items() if ".lora." not in k}
    trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(task, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    state = task.model.backbone.state_dict()
    assert all(torch.equal(state[k], v) for k, v in base.items())
    assert any(state[k].abs().sum() > 0 for k in state if k.endswith(".lora.B"))
    ckpt = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = SegmentationTask.from_checkpoint(ckpt)
    assert has_lora(loaded.model.backbone)
    task.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[:2]), task(x[:2]))
    # the adapted backbone alone: load_backbone (and so export, embed, pca) folds the updates into its weights
    from dinov3_eo.models.hub import load_backbone

    backbone = load_backbone(ckpt)
    assert not has_lora(backbone) and backbone.meta.in_chans == 3
    with torch.no_grad():
        adapted = task.model.backbone.forward_features(x[:2])["x_norm_patchtokens"]
        torch.testing.assert_close(backbone.forward_features(x[:2])["x_norm_patchtokens"], adapted, rtol=1e-4, atol=1e-5)
        frozen = SegmentationTask(backbone="vitmicro16", num_classes=3, backbone_kwargs={"layerscale_init": 1.0})
        frozen.model.backbone.load_state_dict(base, strict=False)
        assert (frozen.model.backbone.forward_features(x[:2])["x_norm_patchtokens"] - adapted).abs().max() > 1e-4
