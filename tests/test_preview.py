"""Feature pictures of the SSL stages: the PCA colouring, the crops, and the pictures a fit writes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from test_distill import HEADS
from test_pretrain import MODEL_KW, _datamodule, _trainer

from dinov3_eo.ssl.distill import DINOv3Distill
from dinov3_eo.ssl.module import DINOv3Pretrain
from dinov3_eo.ssl.preview import MIN_CELL, FeaturePreview, centre_crops, pca_rgb


def test_pca_colours_separate_what_differs_and_whiten_invalid_patches() -> None:
    """Four kinds of patch features (three principal directions) get four colours, the same within a kind; invalid
    patches are white."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 5
    kinds = rng.integers(0, 4, size=(2, 6, 5))
    tokens = centres[kinds] + rng.normal(size=(2, 6, 5, 16)) * 0.01
    valid = np.ones((2, 6, 5), dtype=bool)
    valid[1, 0, 0] = False
    rgb = pca_rgb(tokens, valid).astype(int)
    assert rgb.shape == (2, 6, 5, 3)
    assert (rgb[1, 0, 0] == 255).all()
    colour = {k: rgb[valid & (kinds == k)] for k in range(4)}
    for k in range(4):
        assert np.abs(colour[k] - colour[k].mean(axis=0)).max() <= 8  # one colour per kind (noise: a few levels)
        for j in range(k):
            assert np.abs(colour[k].mean(axis=0) - colour[j].mean(axis=0)).max() > 60
    assert (pca_rgb(tokens, np.zeros_like(valid)) == 0).all()  # nothing valid: black, no crash


def test_centre_crops() -> None:
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).reshape(2, 3, 10, 12)
    crops, valid = centre_crops(images, None, 6)
    torch.testing.assert_close(crops, images[..., 2:8, 3:9])
    assert valid.shape == (2, 6, 6) and valid.all()
    mask = torch.zeros(2, 10, 12, dtype=torch.bool)
    mask[:, 5:, :] = True
    crops, valid = centre_crops(images, mask, 20)  # larger than the image: the whole image
    assert crops.shape == (2, 3, 10, 12) and torch.equal(valid, mask)


@pytest.mark.slow
def test_a_fit_writes_a_picture_after_the_first_step_every_n_steps_and_at_the_end(tmp_path: Path) -> None:
    L.seed_everything(0)
    _trainer(tmp_path, 5, []).fit(DINOv3Pretrain(**MODEL_KW, preview_every_n_steps=2), datamodule=_datamodule(tmp_path, 4))
    pictures = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert pictures == ["step_0000001.png", "step_0000002.png", "step_0000004.png", "step_0000005.png"]
    # 4 images of the first batch (64-px crops, enlarged to MIN_CELL) over the teacher's feature colours
    cell = 64 * -(-MIN_CELL // 64)
    with Image.open(tmp_path / "previews" / "step_0000005.png") as picture:
        assert picture.size == (4 * cell + 3 * 4, 2 * cell + 4)
        pixels = np.asarray(picture)
    features = pixels[cell + 4 :]
    assert len(np.unique(features.reshape(-1, 3), axis=0)) > 8  # the patches are coloured, not blank
    assert not (tmp_path / "previews" / ".step_0000005.png.part").exists()
    own = tmp_path / "own"  # a FeaturePreview of the trainer's own is kept, not replaced by the module's
    _trainer(own, 3, [FeaturePreview(every_n_steps=3, bands=[3, 2, 1])]).fit(
        DINOv3Pretrain(**MODEL_KW, preview_every_n_steps=1), datamodule=_datamodule(own, 4))
    assert sorted(p.name for p in (own / "previews").iterdir()) == ["step_0000001.png", "step_0000003.png"]
    off = tmp_path / "off"
    _trainer(off, 1, []).fit(DINOv3Pretrain(**MODEL_KW, preview_every_n_steps=0), datamodule=_datamodule(off, 4))
    assert not (off / "previews").exists()


def test_distillation_pictures_the_teacher_and_every_student(tmp_path: Path) -> None:
    pretrain = DINOv3Pretrain(backbone="vitmicro16", **HEADS)
    torch.save({"state_dict": pretrain.state_dict(), "dinov3_eo": pretrain.backbone_meta().to_dict()},
               tmp_path / "teacher.ckpt")  # fmt: skip
    module = DINOv3Distill(teacher=str(tmp_path / "teacher.ckpt"), students=["vitmicro16", "vitmicro16"],
                           student_kwargs={}, head_hidden_dim=64, head_bottleneck_dim=32, global_crop_size=32)  # fmt: skip
    assert list(module.preview_backbones()) == ["teacher", "student 0 (EMA)", "student 1 (EMA)"]
    preview = FeaturePreview(every_n_steps=1, images=3)
    preview._crops = centre_crops(torch.randn(3, 3, 48, 48), None, 32)
    picture = preview.picture(module)
    cell = 32 * -(-MIN_CELL // 32)
    assert picture.shape == (4 * cell + 3 * 4, 3 * cell + 2 * 4, 3)  # images, teacher, two students
    assert not module.students_ema[0]["backbone"].training  # pictured in eval mode, left as it was


def test_every_process_computes_the_picture_and_the_first_writes_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FSDP a forward pass gathers sharded weights from every process: all must take part; one file is written."""
    from types import SimpleNamespace

    preview = FeaturePreview(every_n_steps=1)
    preview._crops = centre_crops(torch.zeros(1, 3, 16, 16), None, 16)
    computed = []
    monkeypatch.setattr(preview, "picture", lambda module: computed.append(module) or np.zeros((4, 4, 3), np.uint8))
    module = SimpleNamespace(preview_backbones=lambda: {"teacher": None})
    other = SimpleNamespace(is_global_zero=False, default_root_dir=str(tmp_path / "rank1"))
    assert preview.write(other, module, 10) is None and len(computed) == 1
    assert not (tmp_path / "rank1").exists()
    preview._last_written = -1
    first = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path / "rank0"))
    assert preview.write(first, module, 10) == tmp_path / "rank0" / "previews" / "step_0000010.png"
    assert preview.write(first, module, 10) is None and len(computed) == 2  # once per step


def test_a_picture_runs_compiled_blocks_eagerly() -> None:
    """With model.compile the blocks have one graph per training shape: a picture's batch must not compile another."""
    import torch._dynamo

    from dinov3_eo.ssl.compilation import compile_regions

    module = DINOv3Pretrain(**MODEL_KW)
    compile_regions(module)
    preview = FeaturePreview()
    preview._crops = centre_crops(torch.randn(3, 3, 64, 64), None, 64)
    torch._dynamo.utils.counters.clear()
    assert preview.picture(module).shape == (2 * 128 + 4, 3 * 128 + 2 * 4, 3)
    assert not torch._dynamo.utils.counters["stats"]  # nothing traced, nothing compiled
