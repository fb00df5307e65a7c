"""Axial 2-D RoPE: periods, coordinates, layout, augmentations, and agreement with timm's DINOv3 RoPE."""

import math

import pytest
import torch

from dinov3_eo.models.rope import (
    RopePositionEmbedding,
    patch_centre_coords,
    rope_apply,
    rope_apply_fast,
    rotate_by,
    rotate_half,
)


class TestPeriods:
    def test_vitl_periods(self) -> None:
        rope = RopePositionEmbedding(head_dim=64)
        assert rope.periods.shape == (16,)
        assert rope.periods[0].item() == pytest.approx(1.0)
        assert rope.periods[1].item() == pytest.approx(100 ** (2 / 32), rel=1e-6)  # 1.334
        assert rope.periods[-1].item() == pytest.approx(74.99, abs=5e-3)

    def test_vit7b_periods(self) -> None:
        rope = RopePositionEmbedding(head_dim=128)
        assert rope.periods.shape == (32,)
        assert rope.periods[-1].item() == pytest.approx(86.6, abs=5e-2)

    def test_periods_are_persistent(self) -> None:
        assert list(RopePositionEmbedding(head_dim=64).state_dict()) == ["periods"]

    def test_meta_device_leaves_periods_unset(self) -> None:
        assert RopePositionEmbedding(head_dim=64, device="meta").periods.is_meta


class TestCoordinates:
    def test_patch_centres(self) -> None:
        coords = patch_centre_coords(2, 4)
        rows = torch.tensor([-0.5, 0.5]).repeat_interleave(4)
        cols = torch.tensor([-0.75, -0.25, 0.25, 0.75]).repeat(2)
        torch.testing.assert_close(coords, torch.stack((rows, cols), dim=1))

    def test_row_then_column_frequencies_tiled_twice(self) -> None:
        rope = RopePositionEmbedding(head_dim=16).eval()
        sin, cos = rope(H=3, W=5)
        assert sin.shape == cos.shape == (15, 16)
        torch.testing.assert_close(sin[:, :8], sin[:, 8:], rtol=0, atol=0)
        grid = sin[:, :8].reshape(3, 5, 8)
        # first D/4 entries depend only on the row, the next D/4 only on the column
        torch.testing.assert_close(grid[:, :, :4], grid[:, :1, :4].expand(3, 5, 4))
        torch.testing.assert_close(grid[:, :, 4:], grid[:1, :, 4:].expand(3, 5, 4))
        # explicit value: row coordinate -2/3 at the lowest period (1)
        assert sin[0, 0].item() == pytest.approx(math.sin(2 * math.pi * (-2 / 3)), abs=1e-6)
        assert cos[0, 4].item() == pytest.approx(math.cos(2 * math.pi * (-0.8)), abs=1e-6)


class TestAgainstTimm:
    @pytest.mark.parametrize(("H", "W"), [(14, 14), (4, 6)])
    def test_matches_timm_dinov3_rope(self, H: int, W: int) -> None:
        from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

        ours = RopePositionEmbedding(head_dim=64).eval()
        theirs = RotaryEmbeddingDinoV3(64, temperature=100, rotate_half=True).eval()
        sin, cos = ours(H=H, W=W)
        their_sin, their_cos = theirs.get_embed(shape=[H, W]).chunk(2, dim=-1)
        torch.testing.assert_close(sin, their_sin, rtol=0, atol=1e-6)
        torch.testing.assert_close(cos, their_cos, rtol=0, atol=1e-6)


class TestAugmentation:
    def test_eval_is_deterministic(self) -> None:
        rope = RopePositionEmbedding(head_dim=32, rescale_coords=2.0, jitter_coords=1.5, shift_coords=0.1).eval()
        a, b = rope(H=4, W=4), rope(H=4, W=4)
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    def test_train_is_random(self) -> None:
        rope = RopePositionEmbedding(head_dim=32, rescale_coords=2.0).train()
        assert not torch.equal(rope(H=4, W=4)[0], rope(H=4, W=4)[0])

    def test_train_without_augmentation_is_deterministic(self) -> None:
        rope = RopePositionEmbedding(head_dim=32).train()
        torch.testing.assert_close(rope(H=4, W=4), rope.eval()(H=4, W=4), rtol=0, atol=0)

    def test_rescale_is_one_shared_log_uniform_factor(self) -> None:
        rope = RopePositionEmbedding(head_dim=32, rescale_coords=2.0).train()
        coords = patch_centre_coords(4, 6)
        factors = []
        for _ in range(200):
            ratio = rope._augment(coords, 1)[0] / coords
            torch.testing.assert_close(ratio, ratio[:1, :1].expand_as(ratio))
            factors.append(ratio[0, 0].item())
        assert 0.5 <= min(factors) < 0.6 and 1.8 < max(factors) <= 2.0
        # log-uniform: the log factors average to ~0
        assert abs(sum(math.log(f) for f in factors) / len(factors)) < 0.12

    def test_jitter_is_per_axis(self) -> None:
        rope = RopePositionEmbedding(head_dim=32, jitter_coords=3.0).train()
        coords = patch_centre_coords(4, 6)
        ratio = rope._augment(coords, 1)[0] / coords
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
        assert ratio[0, 0] != ratio[0, 1]
        assert ((ratio >= 1 / 3) & (ratio <= 3)).all()

    def test_shift_is_additive_per_axis(self) -> None:
        rope = RopePositionEmbedding(head_dim=32, shift_coords=0.25).train()
        coords = patch_centre_coords(4, 6)
        delta = rope._augment(coords, 1)[0] - coords
        torch.testing.assert_close(delta, delta[:1].expand_as(delta))
        assert (delta.abs() <= 0.25).all()


class TestTables:
    def test_each_training_table_is_its_own_draw_of_the_single_table_formula(self) -> None:
        """``tables(count=n)``: n tables at once (one per block in a forward pass), each equal to the one-table
        formula at its own rescaled coordinates; the draws differ from table to table."""
        rope = RopePositionEmbedding(head_dim=16, rescale_coords=2.0).train()
        sin, cos = rope.tables(H=3, W=5, count=12)
        assert sin.shape == cos.shape == (12, 15, 16)
        reference = RopePositionEmbedding(head_dim=16).eval()
        factors = []
        for i in range(12):
            # the first patch's row angle at the longest period (no wrap-around) is 2·pi·factor·coordinate / period
            angle = math.atan2(sin[i, 0, 3], cos[i, 0, 3])
            factor = angle * float(reference.periods[3]) / (2 * math.pi * float(patch_centre_coords(3, 5)[0, 0]))
            assert 0.5 <= factor <= 2.0
            factors.append(factor)
            coords = patch_centre_coords(3, 5) * factor
            angles = 2 * math.pi * coords[:, :, None] / reference.periods
            expected = angles.flatten(1).tile(2)
            torch.testing.assert_close(sin[i], expected.sin(), atol=1e-5, rtol=0)
            torch.testing.assert_close(cos[i], expected.cos(), atol=1e-5, rtol=0)
        assert len({round(f, 6) for f in factors}) == 12

    def test_eval_tables_are_the_one_table(self) -> None:
        rope = RopePositionEmbedding(head_dim=16, rescale_coords=2.0, jitter_coords=1.5, shift_coords=0.1).eval()
        sin, cos = rope.tables(H=4, W=2, count=3)
        one_sin, one_cos = rope(H=4, W=2)
        for i in range(3):
            torch.testing.assert_close(sin[i], one_sin, rtol=0, atol=0)
            torch.testing.assert_close(cos[i], one_cos, rtol=0, atol=0)


class TestApply:
    def test_rotate_half(self) -> None:
        torch.testing.assert_close(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))

    def test_rotation_preserves_pair_norms(self) -> None:
        rope = RopePositionEmbedding(head_dim=16).eval()
        sin, cos = rope(H=3, W=3)
        x = torch.randn(2, 9, 16)
        y = rope_apply(x, sin, cos)
        pair_norm = lambda t: t[..., :8] ** 2 + t[..., 8:] ** 2  # noqa: E731
        torch.testing.assert_close(pair_norm(y), pair_norm(x))

    def test_relative_positions(self) -> None:
        """q.k after RoPE depends only on the offset between two patches."""
        rope = RopePositionEmbedding(head_dim=16).eval()
        sin, cos = rope(H=1, W=8)  # one row: offsets along the columns
        q, k = torch.randn(16), torch.randn(16)
        score = lambda i, j: (rope_apply(q, sin[i], cos[i]) * rope_apply(k, sin[j], cos[j])).sum()  # noqa: E731
        torch.testing.assert_close(score(0, 2), score(3, 5), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(score(1, 6), score(2, 7), rtol=1e-5, atol=1e-5)

    def test_fast_apply_matches_reference(self) -> None:
        rope = RopePositionEmbedding(head_dim=32).eval()
        sin, cos = rope(H=4, W=5)
        x = torch.randn(3, 20, 32)
        torch.testing.assert_close(rope_apply_fast(x, sin, cos), rope_apply(x, sin, cos))
        # strided input (a view of fused q/k/v), as in attention
        qkv = torch.randn(3, 20, 2, 32).permute(0, 2, 1, 3)
        torch.testing.assert_close(rope_apply_fast(qkv[:2], sin, cos), rope_apply(qkv[:2], sin, cos))
        # and the same gradient (the fast path writes in place)
        grads = []
        for fn in (rope_apply, rope_apply_fast):
            leaf = x.clone().requires_grad_()
            fn(leaf, sin, cos).pow(2).sum().backward()
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1])

    def test_written_out_backward_is_the_transposed_rotation(self) -> None:
        rope = RopePositionEmbedding(head_dim=16).train()  # augmented angles: no symmetry to hide a sign
        sin, cos = (t.double() for t in rope(H=3, W=4))
        x = torch.randn(2, 12, 16, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: rope_apply_fast(t, sin, cos), (x,))
        # <R x, y> = <x, Rᵀ y>
        y = torch.randn(2, 12, 16, dtype=torch.float64)
        lhs = (rotate_by(x.detach(), sin, cos) * y).sum()
        torch.testing.assert_close(lhs, (x.detach() * rotate_by(y, sin, cos, transpose=True)).sum())

    def test_bf16_attention_view_matches_autograd_through_the_reference(self) -> None:
        rope = RopePositionEmbedding(head_dim=32).eval()
        sin, cos = rope(H=4, W=5)
        qkv = torch.randn(3, 20, 3, 2, 32).to(torch.bfloat16).permute(2, 0, 3, 1, 4)  # [3, B, h, N, hd] view
        upstream = torch.randn(2, 3, 2, 20, 32).to(torch.bfloat16)
        outs, grads = [], []
        for fn in (rope_apply, rope_apply_fast):
            leaf = qkv.detach().requires_grad_()
            out = fn(leaf[:2], sin, cos)
            out.backward(upstream)
            outs.append(out)
            grads.append(leaf.grad)
        assert outs[1].dtype == torch.bfloat16
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)  # the same float32 arithmetic, one rounding
        torch.testing.assert_close(grads[1], grads[0])  # float32 sums in another order, then one rounding
        assert grads[1][2].abs().sum() == 0  # v gets no gradient from the rotation

    @pytest.mark.parametrize("transpose", [False, True])
    def test_promoting_products_equal_the_float32_copy(self, transpose: bool) -> None:
        # the GPU form (half precision promoted inside the first product) and the CPU form (converted first) agree
        # exactly: bf16 -> float32 is exact, and the products and sums are the same float32 operations
        rope = RopePositionEmbedding(head_dim=16).eval()
        sin, cos = rope(H=3, W=3)
        x = torch.randn(4, 2, 9, 16).to(torch.bfloat16).transpose(1, 2).transpose(1, 2)
        one_pass = rotate_by(x, sin, cos, transpose=transpose, convert_first=False)
        assert one_pass.dtype == torch.float32
        torch.testing.assert_close(one_pass, rotate_by(x, sin, cos, transpose=transpose, convert_first=True),
                                   rtol=0, atol=0)

    def test_angles_that_need_a_gradient_go_through_autograd(self) -> None:
        rope = RopePositionEmbedding(head_dim=16).eval()
        sin, cos = (t.clone().requires_grad_() for t in rope(H=2, W=2))
        x = torch.randn(3, 4, 16)
        rope_apply_fast(x, sin, cos).sum().backward()
        reference = [t.detach().clone().requires_grad_() for t in (sin, cos)]
        rope_apply(x, *reference).sum().backward()
        torch.testing.assert_close(sin.grad, reference[0].grad)
        torch.testing.assert_close(cos.grad, reference[1].grad)

    def test_low_precision_input_is_rotated_in_float32(self) -> None:
        rope = RopePositionEmbedding(head_dim=16).eval()
        sin, cos = rope(H=2, W=2)
        x = torch.randn(4, 16)
        y = rope_apply(x.to(torch.bfloat16), sin, cos)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), rope_apply(x.to(torch.bfloat16).float(), sin, cos), atol=1e-2, rtol=1e-2)


class TestErrors:
    def test_head_dim_multiple_of_4(self) -> None:
        with pytest.raises(ValueError, match="head_dim must be a positive multiple of 4, got 30"):
            RopePositionEmbedding(head_dim=30)

    def test_rescale_bound(self) -> None:
        with pytest.raises(ValueError, match="rescale_coords is a factor bound and must be >= 1"):
            RopePositionEmbedding(head_dim=32, rescale_coords=0.5)
