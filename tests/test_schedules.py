"""Schedules at key steps and against the official array formulas; parameter groups; per-module clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from dinov3_eo.models.heads import DINOHead
from dinov3_eo.ssl.schedules import (
    apply_optimizer_schedules,
    build_param_groups,
    clip_grad_norm_per_module,
    cosine_schedule,
    gram_teacher_refresh_due,
    last_layer_lr,
    linear_warmup_cosine_decay,
    scale_lr_sqrt_wrt_1024,
    teacher_momentum,
    teacher_temperature,
    warmup_constant,
)


def v1_array(base: float, final: float, total: int, warmup: int, start: float, freeze: int) -> np.ndarray:
    """The v1 CosineScheduler array, from its formula."""
    n = total - warmup - freeze
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * np.arange(n) / n))
    return np.concatenate([np.zeros(freeze), np.linspace(start, base, warmup), cosine])


def v2_array(start: float, peak: float, end: float, warmup: int, total: int, cosine: int | None) -> np.ndarray:
    """The v2 linear_warmup_cosine_decay array, from its formula."""
    cosine = total - warmup if cosine is None else cosine
    ramp = np.linspace(start, peak, warmup, endpoint=False)
    cos = end + (peak - end) * (np.cos(np.linspace(0, np.pi, cosine)) + 1) / 2
    return np.concatenate([ramp, cos, np.full(total - warmup - cosine, end)])


@pytest.mark.parametrize(("warmup", "freeze"), [(0, 0), (10, 0), (7, 5), (1, 0)])
def test_cosine_schedule_equals_array(warmup: int, freeze: int) -> None:
    total = 50
    expected = v1_array(1e-3, 1e-6, total, warmup, 1e-5, freeze)
    ours = [cosine_schedule(s, base=1e-3, final=1e-6, total_steps=total, warmup_steps=warmup, start_warmup=1e-5,
                            freeze_steps=freeze) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)
    assert cosine_schedule(total + 3, base=1e-3, final=1e-6, total_steps=total) == 1e-6


@pytest.mark.parametrize(("warmup", "total", "cosine"), [(10, 50, None), (10, 50, 20), (0, 30, None), (5, 5, 0)])
def test_linear_warmup_cosine_decay_equals_array(warmup: int, total: int, cosine: int | None) -> None:
    expected = v2_array(0.0, 1.0, 0.1, warmup, total, cosine)
    ours = [linear_warmup_cosine_decay(s, start=0.0, peak=1.0, end=0.1, warmup_iterations=warmup,
                                       total_iterations=total, cosine_iterations=cosine) for s in range(total)]
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-15)


def test_gram_weight_ramp_of_the_7b_recipe_scaled_down() -> None:
    # start 0 / peak 0 / end 2 with warm-up 1000 and cosine 10: zero, then a cosine ramp 0 -> 2, then 2
    def weight(step: int) -> float:
        return linear_warmup_cosine_decay(step, start=0, peak=0, end=2.0, warmup_iterations=1000,
                                          total_iterations=1200, cosine_iterations=10)

    assert weight(0) == weight(999) == weight(1000) == 0.0
    assert 0 < weight(1004) < 2.0 and weight(1009) == pytest.approx(2.0) and weight(1100) == weight(5000) == 2.0


def test_key_values() -> None:
    assert teacher_temperature(0, warmup_steps=30) == pytest.approx(0.04)
    assert teacher_temperature(29, warmup_steps=30) == pytest.approx(0.07)
    assert teacher_temperature(15, warmup_steps=31) == pytest.approx(0.055)
    assert teacher_temperature(10**6, warmup_steps=30) == pytest.approx(0.07)
    assert teacher_temperature(0, warmup_steps=0) == pytest.approx(0.07)
    assert teacher_momentum(0, total_steps=100) == pytest.approx(0.992)
    assert teacher_momentum(50, total_steps=100) == pytest.approx(0.996)
    assert teacher_momentum(100, total_steps=100) == 1.0
    assert teacher_momentum(7, total_steps=100, base=0.994, final=0.994) == pytest.approx(0.994)
    assert warmup_constant(0, peak=4e-4, warmup_steps=100) == 0.0
    assert warmup_constant(50, peak=4e-4, warmup_steps=100) == pytest.approx(2e-4)
    assert warmup_constant(100, peak=4e-4, warmup_steps=100) == warmup_constant(10**6, peak=4e-4, warmup_steps=100)
    assert last_layer_lr(4, 1e-3, freeze_steps=5) == 0.0 and last_layer_lr(5, 1e-3, freeze_steps=5) == 1e-3
    assert scale_lr_sqrt_wrt_1024(1e-3, 2048) == pytest.approx(4e-3 * math.sqrt(2))  # 5.66e-3, IN-1k recipe
    assert scale_lr_sqrt_wrt_1024(5e-5, 4096) == pytest.approx(4e-4)  # 7B recipe


def test_gram_teacher_refresh_fires_at_the_configured_steps() -> None:
    fired = [s for s in range(200) if gram_teacher_refresh_due(s, first_update=101, frequency=10, max_updates=3)]
    assert fired == [109, 119, 129]  # multiples of 10 from 101 on, three times
    official = [s for s in range(1_000_000, 1_100_000)
                if gram_teacher_refresh_due(s, first_update=1_010_000, frequency=10_000, max_updates=3)]
    assert official == [1_009_999, 1_019_999, 1_029_999]
    assert not any(gram_teacher_refresh_due(s, first_update=0, frequency=5, max_updates=0) for s in range(50))
    assert [s for s in range(50) if gram_teacher_refresh_due(s, first_update=0, frequency=5, max_updates=2)] == [4, 9]
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        gram_teacher_refresh_due(0, first_update=0, frequency=0, max_updates=1)


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="must be >= 0 and fit in total_steps \\(10\\)"):
        cosine_schedule(0, base=1, final=0, total_steps=10, warmup_steps=8, freeze_steps=3)
    with pytest.raises(ValueError, match="fit in total_iterations \\(10\\)"):
        linear_warmup_cosine_decay(0, start=0, peak=1, end=0, warmup_iterations=5, total_iterations=10,
                                   cosine_iterations=6)
    with pytest.raises(ValueError, match="global_batch_size must be >= 1"):
        scale_lr_sqrt_wrt_1024(1e-3, 0)


class TinyBackbone(nn.Module):
    """Stand-in with the official parameter names."""

    def __init__(self, dim: int = 8, n_blocks: int = 2) -> None:
        super().__init__()
        self.n_blocks = n_blocks
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, 4, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList()
        for _ in range(n_blocks):
            block = nn.Module()
            block.norm1 = nn.LayerNorm(dim)
            block.attn = nn.Module()
            block.attn.qkv = nn.Linear(dim, 3 * dim)
            block.ls1 = nn.Module()
            block.ls1.gamma = nn.Parameter(torch.ones(dim))
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim)


def tiny_student() -> nn.ModuleDict:
    return nn.ModuleDict({"backbone": TinyBackbone(), "dino_head": DINOHead(8, out_dim=16, hidden_dim=8,
                          bottleneck_dim=4), "ibot_head": DINOHead(8, out_dim=16, hidden_dim=8, bottleneck_dim=4)})


def test_param_groups_multipliers() -> None:
    student = tiny_student()
    groups = build_param_groups(student, n_blocks=2, layerwise_decay=0.9, patch_embed_lr_mult=0.2)
    by_name = {name: g for g in groups for name in g["names"]}
    assert set(by_name) == {n for n, _ in student.named_parameters()}
    lr = {n: g["lr_multiplier"] for n, g in by_name.items()}
    wd = {n: g["wd_multiplier"] for n, g in by_name.items()}
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(0.9**3 * 0.2)
    for token in ("cls_token", "storage_tokens", "mask_token"):
        assert lr[f"backbone.{token}"] == pytest.approx(0.9**3) and wd[f"backbone.{token}"] == 1.0
    assert lr["backbone.blocks.0.attn.qkv.weight"] == pytest.approx(0.9**2)
    assert lr["backbone.blocks.1.attn.qkv.weight"] == pytest.approx(0.9)
    assert lr["backbone.norm.weight"] == 1.0 and lr["dino_head.mlp.0.weight"] == 1.0
    no_wd = {n for n, v in wd.items() if v == 0.0}
    assert no_wd == {n for n in lr if n.endswith("bias") or "norm" in n or "gamma" in n}
    assert "backbone.blocks.0.ls1.gamma" in no_wd and "backbone.blocks.0.attn.qkv.weight" not in no_wd
    last = {n for n, g in by_name.items() if g["is_last_layer"]}
    assert last == {"dino_head.last_layer.weight", "ibot_head.last_layer.weight"}

    frozen = tiny_student()
    frozen["backbone"].requires_grad_(False)
    assert not any(n.startswith("backbone") for g in build_param_groups(frozen, n_blocks=2) for n in g["names"])


def test_apply_schedules_and_clipping() -> None:
    student = tiny_student()
    optimizer = torch.optim.AdamW(build_param_groups(student, n_blocks=2))
    apply_optimizer_schedules(optimizer, lr=1e-3, weight_decay=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        expected_lr = 0.0 if group["is_last_layer"] else 1e-3 * group["lr_multiplier"]
        assert group["lr"] == pytest.approx(expected_lr)
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])

    for p in student.parameters():
        p.grad = torch.full_like(p, 10.0)
    norms = clip_grad_norm_per_module(student, max_norm=3.0)
    assert set(norms) == {"backbone", "dino_head", "ibot_head"}
    for name, module in student.items():
        expected = math.sqrt(sum(p.numel() for p in module.parameters())) * 10
        assert norms[name].item() == pytest.approx(expected, rel=1e-5)
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in module.parameters()]))
        assert after.item() == pytest.approx(3.0, rel=1e-4)
