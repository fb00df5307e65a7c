"""Multi-crop: shapes and layout, exact geometry (coordinate ramps), Gram crops on the same ground, nodata
avoidance, photometric rules per band count, the fused photometry and flips against per-crop references, no device
reads and one host-to-device copy (on meta tensors), determinism."""

from __future__ import annotations

import pickle

import pytest
import torch
import torch.nn.functional as F
from kornia.filters import gaussian_blur2d
from meta_device import HostToDeviceCopies

from dinov3_eo.ssl.crops import (
    MultiCrop,
    apply_flips,
    apply_photometry,
    flip_indices,
    host_to_device,
    pack_host_tensors,
    travels_exactly_as_float32,
    unpack_host_tensors,
)

NO_PHOTOMETRY = dict(jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0, blur_probs=(0.0, 0.0, 0.0))


def coordinate_ramp(batch: int, height: int, width: int) -> torch.Tensor:
    """Channel 0 = x of the pixel centre, channel 1 = y, channel 2 = image index: [B, 3, H, W]."""
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    ramp = torch.stack([xs, ys, torch.zeros_like(xs)])[None].repeat(batch, 1, 1, 1)
    ramp[:, 2] = torch.arange(batch, dtype=torch.float32)[:, None, None]
    return ramp


def expected_centres(boxes: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and y of the output pixel centres for [n, 4] boxes: [n, size, size] each."""
    t = (torch.arange(size) + 0.5) / size
    x = boxes[:, 0, None] + t[None] * (boxes[:, 2] - boxes[:, 0])[:, None]  # [n, size]
    y = boxes[:, 1, None] + t[None] * (boxes[:, 3] - boxes[:, 1])[:, None]
    return x[:, None, :].expand(-1, size, -1), y[:, :, None].expand(-1, -1, size)


def interior(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes at least one pixel away from the image border, where bilinear sampling of a ramp is exact."""
    return (boxes[:, 0] >= 1) & (boxes[:, 1] >= 1) & (boxes[:, 2] <= width - 1) & (boxes[:, 3] <= height - 1)


def test_shapes_layout_and_boxes() -> None:
    crop = MultiCrop(global_size=32, local_size=16, n_local_crops=3, gram_teacher_size=64)
    out = crop(torch.randn(4, 5, 70, 90), generator=torch.Generator().manual_seed(0))
    assert out["global_crops"].shape == (8, 5, 32, 32) and out["local_crops"].shape == (12, 5, 16, 16)
    assert out["gram_crops"].shape == (8, 5, 64, 64) and out["gram_valid"].shape == (8, 64, 64)
    assert out["global_boxes"].shape == (8, 4) and out["local_flips"].shape == (12, 2)
    for key, scale in (("global_boxes", (0.32, 1.0)), ("local_boxes", (0.05, 0.32))):
        b = out[key]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= 90).all() and (b[:, 3] <= 70).all()
        area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (70 * 90)
        assert (area > scale[0] * 0.9).all() and (area < scale[1] * 1.1).all()  # rounding to whole pixels
        aspect = (b[:, 2] - b[:, 0]) / (b[:, 3] - b[:, 1])
        assert (aspect > 0.7).all() and (aspect < 1.45).all()


def test_crops_are_crop_major_and_cover_their_boxes() -> None:
    crop = MultiCrop(global_size=24, local_size=12, n_local_crops=2, horizontal_flip_prob=0.0, **NO_PHOTOMETRY)
    image = coordinate_ramp(3, 64, 80)
    out = crop(image, generator=torch.Generator().manual_seed(1))
    for kind, size in (("global", 24), ("local", 12)):
        crops, boxes = out[f"{kind}_crops"], out[f"{kind}_boxes"]
        n_crops = crops.shape[0] // 3
        torch.testing.assert_close(crops[:, 2, 0, 0], torch.arange(3.0).repeat(n_crops))  # image b at row k·B + b
        x, y = expected_centres(boxes, size)
        ok = interior(boxes, 64, 80)
        torch.testing.assert_close(crops[ok, 0], x[ok], atol=1e-3, rtol=0)
        torch.testing.assert_close(crops[ok, 1], y[ok], atol=1e-3, rtol=0)
        # at the border, bilinear clamping moves samples by at most half a pixel
        assert (crops[:, 0] - x).abs().max() <= 0.5 + 1e-4 and (crops[:, 1] - y).abs().max() <= 0.5 + 1e-4


def test_gram_crop_covers_the_same_ground_as_the_global_crop() -> None:
    crop = MultiCrop(global_size=16, local_size=8, n_local_crops=1, gram_teacher_size=32, horizontal_flip_prob=0.5,
                     vertical_flip_prob=0.5, **NO_PHOTOMETRY)
    out = crop(coordinate_ramp(4, 96, 96), generator=torch.Generator().manual_seed(2))
    globals_, gram = out["global_crops"], out["gram_crops"]
    ok = interior(out["global_boxes"], 96, 96)
    assert ok.sum() >= 2 and out["global_flips"].any()
    # a 2x finer rendering of the same box, area-averaged back, is the global crop (flips included)
    torch.testing.assert_close(F.avg_pool2d(gram[ok], 2), globals_[ok], atol=1e-3, rtol=0)
    # and the corner pixel centres sit where the box says
    x, y = expected_centres(out["global_boxes"], 32)
    unflipped = ok & ~out["global_flips"].any(1)
    torch.testing.assert_close(gram[unflipped, 0], x[unflipped], atol=1e-3, rtol=0)


def test_render_against_slicing_and_area_pooling() -> None:
    image = torch.randn(2, 3, 40, 40)
    boxes = torch.tensor([[4.0, 6.0, 20.0, 22.0], [8.0, 0.0, 40.0, 32.0]])  # image 0: 16 px box; image 1: 32 px
    rendered = MultiCrop.render(image, boxes, 1, 16)
    torch.testing.assert_close(rendered[0], image[0, :, 6:22, 4:20])  # 16 px -> 16 px: an exact copy
    expected = F.avg_pool2d(image[1:2, :, 0:32, 8:40], 2)[0]  # 32 px -> 16 px: 2x2 area averages
    torch.testing.assert_close(rendered[1], expected, atol=1e-5, rtol=0)


def test_nodata_is_avoided() -> None:
    valid = torch.ones(8, 64, 64, dtype=torch.bool)
    valid[:, :, :40] = False  # left 62 % is nodata
    image = torch.randn(8, 4, 64, 64) * valid[:, None]

    def valid_fraction(boxes: torch.Tensor) -> torch.Tensor:
        return torch.stack([valid[i % 8, int(b[1]) : int(b[3]), int(b[0]) : int(b[2])].float().mean()
                            for i, b in enumerate(boxes)])

    careful = MultiCrop(global_size=16, local_size=8, n_local_crops=4, min_valid_fraction=0.5, max_tries=30,
                        gram_teacher_size=32, vertical_flip_prob=0.5)
    out = careful(image, valid, generator=torch.Generator().manual_seed(3))
    assert (valid_fraction(out["local_boxes"]) >= 0.5).all()
    # global crops (≥ 32 % of the image) cannot always reach 50 %: they take the most valid candidate
    careless = MultiCrop(global_size=16, local_size=8, n_local_crops=4, min_valid_fraction=0.0)
    base = careless(image, valid, generator=torch.Generator().manual_seed(3))
    assert valid_fraction(out["global_boxes"]).mean() > valid_fraction(base["global_boxes"]).mean()
    assert (valid_fraction(base["local_boxes"]) < 0.5).any()
    # invalid pixels stay exactly 0 through the photometric changes, and are reported
    for kind in ("global", "local", "gram"):
        assert (out[f"{kind}_crops"].abs().sum(1)[~out[f"{kind}_valid"]] == 0).all()
        assert (out[f"{kind}_crops"].abs().sum(1)[out[f"{kind}_valid"]] > 0).float().mean() > 0.99
    # the Gram teacher's validity is the global crops' at twice the resolution, flips included
    coarse = F.avg_pool2d(out["gram_valid"][:, None].float(), 2)[:, 0]
    assert ((coarse == 1) <= out["global_valid"]).all() and ((coarse == 0) <= ~out["global_valid"]).all()


def test_photometric_rules_by_band_count() -> None:
    gen_seed = 4
    rgb = MultiCrop(global_size=16, local_size=8, n_local_crops=2, jitter_prob=0.0, grayscale_prob=1.0,
                    solarize_prob=1.0, blur_probs=(0.0, 0.0, 0.0))
    out = rgb(torch.randn(3, 3, 48, 48), generator=torch.Generator().manual_seed(gen_seed))
    crops = out["global_crops"]
    torch.testing.assert_close(crops[:, 0], crops[:, 1])  # grayscale for RGB
    assert (crops[3:] <= 0).all() and (crops[:3] > 0).any()  # solarisation only on global crop 2
    multispectral = MultiCrop(global_size=16, local_size=8, n_local_crops=2, jitter_prob=0.0, grayscale_prob=1.0,
                              solarize_prob=1.0, blur_probs=(0.0, 0.0, 0.0))
    ms = multispectral(torch.randn(3, 6, 48, 48), generator=torch.Generator().manual_seed(gen_seed))
    assert not torch.allclose(ms["global_crops"][:, 0], ms["global_crops"][:, 1]) and (ms["global_crops"] > 0).any()


def test_blur_probabilities_follow_the_trained_behaviour() -> None:
    image = torch.randn(6, 4, 48, 48)
    kwargs = dict(global_size=24, local_size=12, n_local_crops=1, jitter_prob=0.0, horizontal_flip_prob=0.0,
                  blur_sigma=(1.5, 2.0))
    sharp = MultiCrop(**kwargs, blur_probs=(0.0, 0.0, 0.0))(image, generator=torch.Generator().manual_seed(5))
    blurred = MultiCrop(**kwargs, blur_probs=(0.0, 1.0, 1.0))(image, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(blurred["global_crops"][:6], sharp["global_crops"][:6])  # global 1 never blurred

    def roughness(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(1, 2, 3))

    assert (roughness(blurred["global_crops"][6:]) < roughness(sharp["global_crops"][6:])).all()
    assert (roughness(blurred["local_crops"]) < roughness(sharp["local_crops"])).all()
    assert MultiCrop().blur_probs == (0.0, 0.9, 0.5)


def test_jitter_changes_bands_independently() -> None:
    image = torch.randn(4, 5, 32, 32)
    crop = MultiCrop(global_size=32, local_size=8, n_local_crops=0, global_scale=(1.0, 1.0), ratio=(1.0, 1.0),
                     horizontal_flip_prob=0.0, jitter_prob=1.0, brightness=0.4, contrast=0.4, grayscale_prob=0.0,
                     solarize_prob=0.0, blur_probs=(0.0, 0.0, 0.0))
    out = crop(image, generator=torch.Generator().manual_seed(6))
    assert out["local_crops"].shape == (0, 5, 8, 8)
    source = image.repeat(2, 1, 1, 1)
    # each band is an affine map of the source band: z' = a·z + c with a in [0.6, 1.4]
    z, zj = source.flatten(2), out["global_crops"].flatten(2)
    zc, zjc = z - z.mean(-1, keepdim=True), zj - zj.mean(-1, keepdim=True)
    slope = (zc * zjc).sum(-1) / (zc * zc).sum(-1)  # [8, 5]
    torch.testing.assert_close(zjc, slope[..., None] * zc, atol=1e-4, rtol=0)
    assert ((slope >= 0.6 - 1e-5) & (slope <= 1.4 + 1e-5)).all() and slope.std(dim=1).min() > 0.01


def test_deterministic_with_generator_and_picklable() -> None:
    crop = MultiCrop(global_size=16, local_size=8, n_local_crops=2)
    image = torch.randn(2, 3, 40, 40)
    a = crop(image, generator=torch.Generator().manual_seed(7))
    b = pickle.loads(pickle.dumps(crop))(image, generator=torch.Generator().manual_seed(7))
    c = crop(image, generator=torch.Generator().manual_seed(8))
    for key in a:
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["global_boxes"], c["global_boxes"])


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="global_scale must be a range"):
        MultiCrop(global_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match=r"blur_probs\[1\] must be in \[0, 1\]"):
        MultiCrop(blur_probs=(0.0, 1.5, 0.5))
    with pytest.raises(ValueError, match="images must be a float"):
        MultiCrop()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="valid must be"):
        MultiCrop()(torch.zeros(2, 3, 8, 8), torch.ones(2, 8, 9, dtype=torch.bool))


def reference_photometry(crop: MultiCrop, crops: torch.Tensor, valid: torch.Tensor | None, blur_prob: torch.Tensor,
                         solarize_prob: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The photometric recipe crop by crop and band by band, drawing in MultiCrop's documented order."""
    n, channels = crops.shape[:2]
    jitter = torch.rand(n, generator=generator) < crop.jitter_prob
    contrast = 1.0 + crop.contrast * (2 * torch.rand(n, channels, generator=generator) - 1)
    offset = crop.brightness * (2 * torch.rand(n, channels, generator=generator) - 1)
    gray = torch.rand(n, generator=generator) < crop.grayscale_prob
    blur = torch.rand(n, generator=generator) < blur_prob
    low, high = crop.blur_sigma
    sigma = low + (high - low) * torch.rand(n, generator=generator)
    solar = torch.rand(n, generator=generator) < solarize_prob
    out = []
    for i in range(n):
        x = crops[i].clone()
        v = torch.ones(x.shape[1:], dtype=torch.bool) if valid is None else valid[i]
        if jitter[i]:
            for band in range(channels):
                mean = x[band][v].mean() if v.any() else torch.tensor(0.0)
                x[band] = (x[band] - mean) * contrast[i, band] + mean + offset[i, band]
        if channels == 3 and gray[i]:
            x = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).expand(3, -1, -1)
        if blur[i]:
            k = crop.blur_kernel_size
            x = gaussian_blur2d(x[None], (k, k), (float(sigma[i]), float(sigma[i])))[0]
        if channels == 3 and solar[i]:
            x = torch.where(x >= 0, -x, x)
        out.append(x * v)
    return torch.stack(out)


@pytest.mark.parametrize("channels", [3, 5])
@pytest.mark.parametrize("with_nodata", [False, True])
def test_fused_photometry_matches_the_per_crop_recipe(channels: int, with_nodata: bool) -> None:
    crop = MultiCrop(jitter_prob=0.7, grayscale_prob=0.5, blur_sigma=(0.5, 2.0))
    crops = torch.randn(12, channels, 20, 20) + torch.arange(channels)[:, None, None]
    valid = None
    if with_nodata:
        valid = torch.rand(12, 20, 20) > 0.3
        valid[0] = False  # a crop with no valid pixel: its band mean counts as 0
        crops = crops * valid[:, None]
    blur_prob, solarize_prob = torch.full((12,), 0.5), torch.tensor([0.0, 1.0]).repeat_interleave(6)
    params = crop.draw_photometry(12, channels, blur_prob, solarize_prob, torch.Generator().manual_seed(9))
    assert ("grey_index" in params) == (channels == 3) and "blur_index" in params  # grey crops and blur exercised
    assert ("solarize_gain" in params) == (channels == 3)
    got = apply_photometry(crops, valid, params)
    expected = reference_photometry(crop, crops, valid, blur_prob, solarize_prob, torch.Generator().manual_seed(9))
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    if valid is not None:  # an all-True mask and no mask are the same crops
        torch.testing.assert_close(apply_photometry(crops, torch.ones_like(valid), params),
                                   apply_photometry(crops, None, params), atol=1e-6, rtol=0)


def test_flips_are_per_crop_torch_flips() -> None:
    flips = torch.tensor([[0, 0], [1, 0], [0, 1], [1, 1], [1, 1]], dtype=torch.bool)
    images, masks = torch.randn(5, 2, 6, 6), torch.rand(5, 6, 6) > 0.5
    index = flip_indices(flips, 6)
    for view in (images, masks):
        got = apply_flips(view, index["x"], index["y"])
        expected = [v.flip([d for d, f in zip((-1, -2), flag) if f]) if flag.any() else v
                    for v, flag in zip(view, flips)]
        assert torch.equal(got, torch.stack(expected))
    only_left_right = flip_indices(flips[:, :1].repeat(1, 2) & torch.tensor([True, False]), 6)
    assert set(only_left_right) == {"x"} and flip_indices(torch.zeros(5, 2, dtype=torch.bool), 6) == {}
    assert apply_flips(images, None, None) is images  # no flips, no work


def test_choose_boxes_first_sufficiently_valid_candidate_else_the_most_valid() -> None:
    crop = MultiCrop(min_valid_fraction=0.5, max_tries=10)
    candidates, legal = crop.draw_boxes(24, 40, 50, (0.3, 1.0), torch.Generator().manual_seed(10))
    assert legal.any(1).all() and not legal.all()  # some candidates overflow the image
    all_valid = torch.ones(8, 40, 50, dtype=torch.bool)
    first_legal = candidates[torch.arange(24), legal.int().argmax(1)]
    assert torch.equal(crop.choose_boxes(candidates, legal, None), first_legal)
    assert torch.equal(crop.choose_boxes(candidates, legal, crop.valid_table(all_valid)), first_legal)

    valid = all_valid.clone()
    valid[:, :, :30] = False  # 60 % nodata on the left
    chosen = crop.choose_boxes(candidates, legal, crop.valid_table(valid))
    for row in range(24):
        image = valid[row % 8]  # crop-major rows
        fractions = [float(image[int(y0) : int(y1), int(x0) : int(x1)].float().mean()) if ok else -1.0
                     for (x0, y0, x1, y1), ok in zip(candidates[row], legal[row])]
        good = [i for i, f in enumerate(fractions) if f >= 0.5]
        expected = good[0] if good else max(range(10), key=lambda i: fractions[i])
        assert torch.equal(chosen[row], candidates[row, expected])


def test_no_candidate_fits_gives_the_largest_centred_box_in_the_ratio_range() -> None:
    crop = MultiCrop(global_scale=(1.0, 1.0), ratio=(2.0, 3.0))  # too wide for a full square image
    candidates, legal = crop.draw_boxes(3, 40, 40, (1.0, 1.0), torch.Generator().manual_seed(11))
    assert legal[:, 0].all() and not legal[:, 1:].any()
    boxes = crop.choose_boxes(candidates, legal, crop.valid_table(torch.ones(3, 40, 40, dtype=torch.bool)))
    assert torch.equal(boxes, torch.tensor([[0.0, 10.0, 40.0, 30.0]]).expand(3, 4))


def test_host_tensors_travel_exactly_in_one_vector() -> None:
    tensors = {"flags": torch.rand(3, 4) > 0.5, "index": torch.tensor([0, 7, 2**24 - 1]),
               "weights": torch.rand(5, dtype=torch.float32)}
    flat = pack_host_tensors(tensors)
    assert flat.shape == (12 + 3 + 5,) and flat.dtype == torch.float32
    back = unpack_host_tensors(flat, tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value)
    assert host_to_device(tensors, torch.device("cpu"))["index"] is tensors["index"]  # nothing to move
    # what float32 cannot carry exactly travels on its own, in its own dtype
    assert all(travels_exactly_as_float32(t) for t in tensors.values())
    assert not travels_exactly_as_float32(torch.tensor([2**24]))
    assert not travels_exactly_as_float32(torch.ones(2, dtype=torch.float64))
    mixed = {**tensors, "big": torch.tensor([2**40]), "precise": torch.tensor([0.1], dtype=torch.float64)}
    with HostToDeviceCopies() as counter:
        moved = host_to_device(mixed, torch.device("meta"))
    assert len(counter.copies) == 3 and not counter.blocking and list(moved) == list(mixed)
    assert all(moved[k].dtype == v.dtype and moved[k].shape == v.shape for k, v in mixed.items())


@pytest.mark.parametrize("channels", [3, 5])
@pytest.mark.parametrize("with_mask", [False, True])
def test_crops_queue_device_work_without_reading_it_back(channels: int, with_mask: bool) -> None:
    """On meta tensors every device-to-host read (a GPU sync) raises: the crops make none, blur and masks included,
    and all host decisions (boxes, flips, photometry) reach the device in one copy."""
    images = torch.empty(4, channels, 64, 64, device="meta")
    valid = torch.empty(4, 64, 64, dtype=torch.bool, device="meta") if with_mask else None
    crop = MultiCrop(global_size=32, local_size=16, n_local_crops=3, gram_teacher_size=48, grayscale_prob=0.5,
                     solarize_prob=1.0, blur_probs=(0.0, 1.0, 0.5), vertical_flip_prob=0.5)
    with HostToDeviceCopies() as counter:
        out = crop(images, valid, generator=torch.Generator().manual_seed(12))
    assert len(counter.copies) == 1 and not counter.blocking
    assert out["global_crops"].shape == (8, channels, 32, 32) and out["global_crops"].device.type == "meta"
    assert out["local_valid"].shape == (12, 16, 16) and out["gram_crops"].shape == (8, channels, 48, 48)
    assert out["global_flips"].device.type == "cpu"


@pytest.mark.parametrize("shape", [(5, 3, 32, 32), (4, 6, 12, 20)])
def test_separable_blur_equals_kornias_reflect_filter(shape: tuple[int, int, int, int]) -> None:
    """The crops' blur: the values of kornia's ``filter2d_separable(..., "reflect")`` (each crop its own sigma), in
    fewer launches."""
    from kornia.filters import filter2d_separable, get_gaussian_kernel1d

    from dinov3_eo.ssl.crops import separable_blur

    gen = torch.Generator().manual_seed(0)
    crops = torch.randn(shape, generator=gen)
    kernel = get_gaussian_kernel1d(9, torch.rand(shape[0], 1, generator=gen) * 1.9 + 0.1)
    torch.testing.assert_close(separable_blur(crops, kernel), filter2d_separable(crops, kernel, kernel, "reflect"),
                               rtol=0, atol=1e-6)
