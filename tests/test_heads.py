"""DINO/iBOT head: official key layout and shapes, normalised bottleneck, split forward, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinov3_eo.models.heads import DINOHead


def test_default_key_layout_and_shapes() -> None:
    head = DINOHead(384, device="meta")
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {
        "mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,),
        "mlp.2.weight": (2048, 2048), "mlp.2.bias": (2048,),
        "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
        "last_layer.weight": (65536, 256),
    }


@pytest.mark.parametrize(
    ("out_dim", "hidden", "bottleneck"), [(262144, 8192, 512), (98304, 4096, 384)]  # 7B DINO / iBOT heads
)
def test_7b_head_sizes(out_dim: int, hidden: int, bottleneck: int) -> None:
    head = DINOHead(4096, out_dim=out_dim, hidden_dim=hidden, bottleneck_dim=bottleneck, device="meta")
    sd = head.state_dict()
    assert tuple(sd["mlp.0.weight"].shape) == (hidden, 4096)
    assert tuple(sd["mlp.4.weight"].shape) == (bottleneck, hidden)
    assert tuple(sd["last_layer.weight"].shape) == (out_dim, bottleneck)
    assert "last_layer.bias" not in sd and not any("weight_g" in k or "weight_v" in k for k in sd)


def test_forward_split_and_normalised_bottleneck() -> None:
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(2, 5, 16)
    bottleneck = head(x, no_last_layer=True)
    assert bottleneck.shape == (2, 5, 8)
    torch.testing.assert_close(bottleneck.norm(dim=-1), torch.ones(2, 5))
    logits = head(x)
    assert logits.shape == (2, 5, 50)
    torch.testing.assert_close(head(bottleneck, only_last_layer=True), logits)
    # independent re-computation from the documented layout
    h = F.gelu(F.linear(x, head.mlp[0].weight, head.mlp[0].bias))
    h = F.gelu(F.linear(h, head.mlp[2].weight, head.mlp[2].bias))
    h = F.normalize(F.linear(h, head.mlp[4].weight, head.mlp[4].bias), dim=-1)
    torch.testing.assert_close(logits, h @ head.last_layer.weight.T)


def test_init_and_variants() -> None:
    head = DINOHead(64, out_dim=4096, hidden_dim=256, bottleneck_dim=64)
    weights = head.last_layer.weight
    # trunc_normal_(std=0.02) truncates at ±2 in absolute units (as in the reference), i.e. ~N(0, 0.02)
    assert weights.std().item() == pytest.approx(0.02, rel=0.05)
    assert weights.mean().abs().item() < 1e-3
    assert all(torch.count_nonzero(m.bias) == 0 for m in head.mlp if isinstance(m, torch.nn.Linear))
    assert [k for k in DINOHead(8, out_dim=4, nlayers=1).state_dict()] == ["mlp.0.weight", "mlp.0.bias",
                                                                          "last_layer.weight"]
    assert "mlp.6.weight" in DINOHead(8, out_dim=4, hidden_dim=8, nlayers=4).state_dict()


def test_bad_sizes() -> None:
    with pytest.raises(ValueError, match="nlayers must be >= 1, got 0"):
        DINOHead(8, nlayers=0)


def test_norm_last_layer_gives_cosine_logits_and_keeps_the_key_layout() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8, norm_last_layer=True)
    plain = DINOHead(16, out_dim=50, hidden_dim=32, bottleneck_dim=8)
    assert list(head.state_dict()) == list(plain.state_dict())  # same checkpoints, same export
    x = torch.randn(3, 16)
    z = head(x, no_last_layer=True)
    prototypes = head.last_layer.weight
    expected = torch.stack([torch.stack([F.cosine_similarity(zi, p, dim=0) for p in prototypes]) for zi in z])
    logits = head(x)
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= 1 + 1e-6
    # a prototype's length no longer matters: scaling the weights leaves the logits as they are
    with torch.no_grad():
        head.last_layer.weight.mul_(torch.rand(50, 1) * 10 + 0.1)
    torch.testing.assert_close(head(x), logits)
    # and the gradient reaches the prototypes' directions only (orthogonal to each prototype)
    head(x).sum().backward()
    radial = (head.last_layer.weight.grad * head.last_layer.weight).sum(1)
    torch.testing.assert_close(radial, torch.zeros(50), atol=1e-5, rtol=0)
