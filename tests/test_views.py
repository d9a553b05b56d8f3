"""Batched multi-crop views: shapes, ranges, randomness, and each augmentation against
torchvision's own per-image functionals."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import v2

from lejepa.config import ViewsConfig
from lejepa.views import (
    ViewSampler,
    blur_kernel_size,
    color_jitter,
    crop_boxes,
    eval_images,
    gaussian_blur,
    resized_crops,
    shift_hue,
)

RAW = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean 0, std 1: views are the [0, 1] pixels
OFF = dict(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
IDENTITY = dict(OFF, global_views=1, local_views=0, global_scale=(1.0, 1.0))


def images(batch: int = 8, side: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def smooth(side: int, channels: int = 3) -> torch.Tensor:
    """A smooth float image in [0, 1] [1, C, side, side] (low-frequency waves)."""
    t = torch.linspace(0, 1, side)
    y, x = torch.meshgrid(t, t, indexing="ij")
    planes = [0.5 + 0.4 * torch.sin(2.0 * x + (c + 1) * y + c) for c in range(channels)]
    return torch.stack(planes)[None]


def sample(images: torch.Tensor, seed: int = 0, resolution: int = 32, stats=RAW, **cfg):
    sampler = ViewSampler(ViewsConfig(**cfg), resolution, *stats)
    return sampler(images, torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ shapes, ranges, randomness


def test_shapes_and_dtype_global_and_local():
    views = sample(images(batch=5), global_views=2, local_views=6)
    assert views.global_views.shape == (2, 5, 3, 32, 32)
    assert views.local_views.shape == (6, 5, 3, 14, 14)  # round(32 * 96 / 224)
    assert views.global_views.dtype == views.local_views.dtype == torch.float32


def test_global_only_and_local_size_override():
    assert sample(images(batch=3), local_views=0).local_views is None
    views = sample(images(batch=3, side=48), resolution=40, local_views=2, local_size=20)
    assert views.global_views.shape == (2, 3, 3, 40, 40) and views.local_views.shape == (2, 3, 3, 20, 20)
    assert ViewSampler(ViewsConfig(), 224, *RAW).local_size == 96
    assert ViewSampler(ViewsConfig(), 8, *RAW).local_size == 4


def test_values_stay_in_unit_range_and_are_normalised():
    all_on = dict(flip_p=1.0, jitter_p=1.0, grayscale_p=0.5, blur_p=1.0, solarize_p=0.5)
    raw = sample(images(batch=16), **all_on)
    for v in (raw.global_views, raw.local_views):
        assert v.min() >= 0.0 and v.max() <= 1.0
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    norm = sample(images(batch=16), stats=(mean, std), **all_on)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(norm.global_views * s + m, raw.global_views)
    torch.testing.assert_close(norm.local_views * s + m, raw.local_views)


def test_float_input_equals_uint8_input():
    x = images()
    a, b = sample(x), sample(x.float() / 255)
    torch.testing.assert_close(a.global_views, b.global_views)


def test_deterministic_for_a_seed_and_different_across_seeds():
    x = images()
    a, b, c = sample(x, seed=1), sample(x, seed=1), sample(x, seed=2)
    assert torch.equal(a.global_views, b.global_views) and torch.equal(a.local_views, b.local_views)
    assert not torch.allclose(a.global_views, c.global_views)
    torch.manual_seed(3)
    d = ViewSampler(ViewsConfig(), 32, *RAW)(x)
    torch.manual_seed(3)
    assert torch.equal(d.global_views, ViewSampler(ViewsConfig(), 32, *RAW)(x).global_views)


def test_each_sample_and_view_gets_its_own_parameters():
    x = (smooth(32) * 255).round().to(torch.uint8).expand(2, -1, -1, -1)  # two identical images
    views = sample(x, **OFF)
    g = views.global_views
    assert not torch.allclose(g[0, 0], g[0, 1])  # same image, different crops per sample
    assert not torch.allclose(g[0, 0], g[1, 0])  # and per view
    assert not torch.allclose(views.local_views[0, 0], views.local_views[0, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_on_cuda_match_cpu():
    x = images(batch=16)
    on_cpu = sample(x, blur_p=1.0, jitter_p=1.0, solarize_p=0.5)
    on_gpu = sample(x.cuda(), blur_p=1.0, jitter_p=1.0, solarize_p=0.5)
    assert on_gpu.global_views.is_cuda
    torch.testing.assert_close(on_gpu.global_views.cpu(), on_cpu.global_views, atol=1e-4, rtol=0)
    torch.testing.assert_close(on_gpu.local_views.cpu(), on_cpu.local_views, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ each augmentation, p = 1 vs 0


def test_identity_when_everything_is_off():
    x = images()
    torch.testing.assert_close(sample(x, **IDENTITY).global_views[0], x.float() / 255)


def test_flip():
    x = images()
    flipped = sample(x, **dict(IDENTITY, flip_p=1.0)).global_views[0]
    torch.testing.assert_close(flipped, torch.flip(x.float() / 255, dims=[-1]))


def test_grayscale():
    x = images()
    gray = sample(x, **dict(IDENTITY, grayscale_p=1.0)).global_views[0]
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x.float() / 255, num_output_channels=3))


def test_solarize():
    x = torch.full((4, 3, 16, 16), 0.8)
    solar = sample(x, resolution=16, **dict(IDENTITY, solarize_p=1.0)).global_views[0]
    torch.testing.assert_close(solar, torch.full_like(x, 0.2))
    dark = torch.full((4, 3, 16, 16), 0.3)
    torch.testing.assert_close(sample(dark, resolution=16, **dict(IDENTITY, solarize_p=1.0)).global_views[0], dark)


def test_blur_changes_texture_but_not_constant_images():
    x = images()
    blurred = sample(x, **dict(IDENTITY, blur_p=1.0)).global_views[0]
    assert (blurred - x.float() / 255).abs().mean() > 0.02
    assert blurred.std() < (x.float() / 255).std()
    flat = torch.full((3, 3, 32, 32), 0.6)
    torch.testing.assert_close(sample(flat, **dict(IDENTITY, blur_p=1.0)).global_views[0], flat)


def test_jitter_changes_colours_and_is_identity_at_zero_strength():
    x = images()
    jittered = sample(x, **dict(IDENTITY, jitter_p=1.0)).global_views[0]
    assert ((jittered - x.float() / 255).abs().flatten(1).mean(1) > 1e-3).all()
    same = sample(x, **dict(IDENTITY, jitter_p=1.0, jitter=(0.0, 0.0, 0.0, 0.0))).global_views[0]
    torch.testing.assert_close(same, x.float() / 255)


def test_probabilities_are_per_sample():
    x = images(batch=64)
    flips = sample(x, **dict(IDENTITY, flip_p=0.5)).global_views[0]
    flipped = (flips - torch.flip(x.float() / 255, dims=[-1])).flatten(1).abs().amax(1) < 1e-6
    assert 16 < int(flipped.sum()) < 48


# ------------------------------------------------------------------ against torchvision, per image


def test_color_jitter_matches_torchvision_functionals():
    x = torch.rand(6, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5  # grey: hue undefined
    b, c, s = (
        torch.tensor([0.6, 1.4, 1.0, 0.9, 1.2, 0.7]),
        torch.tensor([1.3, 0.6, 1.1, 1.0, 0.8, 1.4]),
        torch.tensor([0.7, 1.2, 0.0, 1.4, 1.0, 0.9]),
    )
    h = torch.tensor([0.1, -0.1, 0.05, 0.5, -0.5, 0.0])
    got = color_jitter(x.clone(), b, c, s, h)
    for i in range(6):
        ref = TF.adjust_brightness(x[i], float(b[i]))
        ref = TF.adjust_contrast(ref, float(c[i]))
        ref = TF.adjust_saturation(ref, float(s[i]))
        ref = TF.adjust_hue(ref, float(h[i]))
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)


def test_hue_shift_matches_adjust_hue_including_ties():
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x[1, 1] = x[1, 0]  # r == g ties
    x[2, 2] = x[2, 1]  # g == b ties
    shifts = torch.tensor([0.0, 0.25, -0.3, 0.5, 0.123])
    got = shift_hue(x, shifts)
    for i in range(5):
        torch.testing.assert_close(got[i], TF.adjust_hue(x[i], float(shifts[i])), atol=1e-5, rtol=0)


def test_gaussian_blur_matches_torchvision_per_sample_sigma():
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = gaussian_blur(x, sigma)
    k = blur_kernel_size(32)
    for i in range(4):
        ref = TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2)
        torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=0)
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 11 and blur_kernel_size(14) == 3


@pytest.mark.parametrize(
    "top,left,height,width,size,margin,atol",
    [
        (0, 0, 32, 32, 48, 0, 1e-5),  # whole image, enlarged: exactly bilinear
        (5, 7, 12, 10, 32, 2, 1e-5),  # interior box, enlarged: bilinear (the outer rings of roi_align
        #                               samples reads the pixels just outside the box; resized_crop clamps)
        (2, 3, 27, 29, 14, 0, 2e-2),  # shrunk: area average vs torchvision's triangle antialias
    ],
)
def test_resized_crop_matches_torchvision(top, left, height, width, size, margin, atol):
    x = smooth(32)
    box = torch.tensor([[left, top, left + width, top + height]], dtype=torch.float32)
    got = resized_crops(x, box, torch.tensor([0]), size)[0]
    ref = TF.resized_crop(x[0], top, left, height, width, [size, size], antialias=True)
    inner = slice(margin, size - margin)
    torch.testing.assert_close(got[:, inner, inner], ref[:, inner, inner], atol=atol, rtol=0)
    torch.testing.assert_close(got, ref, atol=3e-2, rtol=0)


def test_crop_boxes_follow_random_resized_crop():
    n, side, scale = 4000, 64, (0.05, 0.3)
    boxes = crop_boxes(n, side, side, scale, torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes == boxes.round()).all() and (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= side).all()
    area = w * h / side**2
    assert area.min() > scale[0] * 0.8 and area.max() < scale[1] * 1.2  # rounding to whole pixels
    assert (w / h).min() > 0.75 * 0.85 and (w / h).max() < 4 / 3 * 1.15
    torch.manual_seed(0)
    ref = torch.tensor(
        [v2.RandomResizedCrop.get_params(torch.empty(1, side, side), list(scale), [3 / 4, 4 / 3])[2:] for _ in range(n)]
    ).float()
    ref_area = ref[:, 0] * ref[:, 1] / side**2
    assert abs(area.mean() - ref_area.mean()) < 0.01
    centre = (boxes[:, 0] + boxes[:, 2]) / 2
    assert abs(centre.mean() - side / 2) < 1.0  # offsets uniform over the valid range


def test_crop_boxes_fall_back_to_the_whole_image():
    boxes = crop_boxes(50, 20, 20, (1.0, 1.0), torch.Generator().manual_seed(0))
    assert torch.equal(boxes, torch.tensor([0.0, 0.0, 20.0, 20.0]).expand(50, 4))


# ------------------------------------------------------------------ eval images


def test_eval_images_identity_crop_and_resize():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    x = images(batch=3, side=32)
    torch.testing.assert_close(eval_images(x, 32, mean, std), (x.float() / 255 - m) / s)
    big = images(batch=2, side=256)
    crop = TF.center_crop(big.float() / 255, [224, 224])
    torch.testing.assert_close(eval_images(big, 224, mean, std), (crop - m) / s)
    small = eval_images(images(batch=2, side=16), 32, *RAW)
    assert small.shape == (2, 3, 32, 32)
    stl = eval_images(images(batch=2, side=96), 64, *RAW)  # 96 -> 73 (64 / 0.875), centre 64
    ref = TF.center_crop(TF.resize(images(batch=2, side=96).float() / 255, [73, 73], antialias=True), [64, 64])
    torch.testing.assert_close(stl, ref)
    assert math.isclose(float(stl.sum()), float(eval_images(images(batch=2, side=96), 64, *RAW).sum()))
