"""Contrastive losses: checked against naive loops and against cross-entropy formulations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dinov3_eo.losses.contrastive import clip_loss, dense_text_alignment_loss, labels_to_patch_grid


def _naive_clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: float) -> float:
    """Symmetric InfoNCE with explicit loops in float64."""
    scale = math.exp(logit_scale)
    n = img.shape[0]
    s = [[scale * float(img[i].double() @ txt[j].double()) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        lse_row = math.log(sum(math.exp(s[i][j]) for j in range(n)))
        lse_col = math.log(sum(math.exp(s[j][i]) for j in range(n)))
        total += -(2 * s[i][i] - lse_row - lse_col) / 2
    return total / n


class TestClipLoss:
    @pytest.mark.parametrize("batch,dim", [(1, 4), (5, 8), (16, 32)])
    def test_matches_naive_loop(self, batch: int, dim: int) -> None:
        img = F.normalize(torch.randn(batch, dim), dim=1)
        txt = F.normalize(torch.randn(batch, dim), dim=1)
        loss = clip_loss(img, txt, torch.tensor([math.log(1 / 0.07)]))
        assert loss.shape == ()
        assert loss.item() == pytest.approx(_naive_clip_loss(img, txt, math.log(1 / 0.07)), rel=1e-5, abs=1e-6)

    def test_equals_mean_of_two_cross_entropies(self) -> None:
        img = F.normalize(torch.randn(7, 16), dim=1)
        txt = F.normalize(torch.randn(7, 16), dim=1)
        logits = 10.0 * img @ txt.T
        target = torch.arange(7)
        expected = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        torch.testing.assert_close(clip_loss(img, txt, math.log(10.0)), expected)

    def test_aligned_pairs_give_low_loss_and_shuffled_high(self) -> None:
        emb = F.normalize(torch.randn(8, 64), dim=1)
        aligned = clip_loss(emb, emb, math.log(100.0))
        shuffled = clip_loss(emb, emb.roll(1, dims=0), math.log(100.0))
        assert aligned.item() < 0.05
        assert shuffled.item() > 5.0

    def test_gradient_reaches_embeddings_and_scale(self) -> None:
        img = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
        txt = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
        scale = torch.tensor([2.0], requires_grad=True)
        clip_loss(img, txt, scale).backward()
        assert img.grad is not None and txt.grad is not None and scale.grad is not None
        assert torch.isfinite(scale.grad).all() and scale.grad.abs().item() > 0

    def test_shape_mismatch(self) -> None:
        with pytest.raises(ValueError, match="same shape"):
            clip_loss(torch.randn(4, 8), torch.randn(3, 8), 1.0)
        with pytest.raises(ValueError, match="one value"):
            clip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(2))


class TestLabelsToPatchGrid:
    def test_majority_vote_ignores_unlabelled_and_breaks_ties_low(self) -> None:
        labels = torch.full((1, 4, 4), 255)
        labels[0, :2, :2] = torch.tensor([[1, 1], [1, 2]])  # majority 1
        labels[0, :2, 2:] = torch.tensor([[255, 255], [255, 2]])  # only labelled pixel -> 2
        labels[0, 2:, :2] = torch.tensor([[0, 2], [2, 0]])  # tie 0/2 -> 0
        # bottom-right block stays all 255 -> ignore
        out = labels_to_patch_grid(labels, (2, 2), num_classes=3)
        assert out.tolist() == [[[1, 2], [0, 255]]]

    def test_majority_matches_naive_loop(self) -> None:
        gen = torch.Generator().manual_seed(3)
        labels = torch.randint(0, 4, (2, 32, 48), generator=gen)
        labels[torch.rand(labels.shape, generator=gen) < 0.3] = 255
        out = labels_to_patch_grid(labels, (2, 3), num_classes=4)
        for b in range(2):
            for y in range(2):
                for x in range(3):
                    block = labels[b, y * 16 : (y + 1) * 16, x * 16 : (x + 1) * 16]
                    votes = torch.bincount(block[block != 255], minlength=4)
                    expected = int(votes.argmax()) if votes.sum() > 0 else 255
                    assert out[b, y, x].item() == expected

    def test_nearest_when_not_a_multiple(self) -> None:
        labels = torch.arange(5 * 7).reshape(1, 5, 7) % 3
        out = labels_to_patch_grid(labels, (2, 3), num_classes=3)
        expected = F.interpolate(labels[:, None].float(), size=(2, 3), mode="nearest")[:, 0].long()
        assert torch.equal(out, expected)

    def test_out_of_range_label(self) -> None:
        with pytest.raises(ValueError, match="outside"):
            labels_to_patch_grid(torch.full((1, 4, 4), 7), (1, 1), num_classes=3)


class TestDenseTextAlignmentLoss:
    def test_matches_naive_loop(self) -> None:
        gen = torch.Generator().manual_seed(0)
        patch = torch.randn(2, 8, 3, 4, generator=gen)
        text = torch.randn(5, 8, generator=gen)
        labels = torch.randint(0, 5, (2, 3, 4), generator=gen)
        labels[0, 0, 0] = 255
        loss = dense_text_alignment_loss(patch, text, labels, math.log(20.0))
        total, count = 0.0, 0
        for b in range(2):
            for y in range(3):
                for x in range(4):
                    if labels[b, y, x] == 255:
                        continue
                    p = patch[b, :, y, x].double()
                    logits = torch.stack([20.0 * F.cosine_similarity(p, t.double(), dim=0) for t in text])
                    total += float(-torch.log_softmax(logits, 0)[labels[b, y, x]])
                    count += 1
        assert loss.item() == pytest.approx(total / count, rel=1e-5)

    def test_pixel_labels_are_pooled_to_patches(self) -> None:
        patch = torch.randn(1, 4, 2, 2)
        text = torch.randn(3, 4)
        fine = torch.randint(0, 3, (1, 2, 2)).repeat_interleave(16, 1).repeat_interleave(16, 2)  # [1, 32, 32]
        coarse = fine[:, ::16, ::16]
        torch.testing.assert_close(
            dense_text_alignment_loss(patch, text, fine, 1.0), dense_text_alignment_loss(patch, text, coarse, 1.0)
        )

    def test_all_ignored_is_zero_with_gradient(self) -> None:
        patch = torch.randn(1, 4, 2, 2, requires_grad=True)
        loss = dense_text_alignment_loss(patch, torch.randn(3, 4), torch.full((1, 32, 32), 255), 1.0)
        assert loss.item() == 0.0
        loss.backward()
        assert patch.grad is not None

    def test_bad_shapes(self) -> None:
        labels = torch.zeros(1, 2, 2, dtype=torch.long)
        with pytest.raises(ValueError, match="class_text_emb"):
            dense_text_alignment_loss(torch.randn(1, 4, 2, 2), torch.randn(3, 5), labels, 1.0)
        with pytest.raises(ValueError, match="labels must be"):
            dense_text_alignment_loss(torch.randn(1, 4, 2, 2), torch.randn(3, 4), labels.repeat(2, 1, 1), 1.0)
