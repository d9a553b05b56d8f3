"""Multi-crop views, generated as whole batches on the training device.

Each view of each image gets its own random parameters, drawn from one CPU
``torch.Generator`` and moved to the images' device; every view type (global, local) is then
transformed for the whole batch at once by tensor ops, never a Python loop over samples.
Per view, in this order (docs/method.md §2; torchvision semantics unless said otherwise):

1. RandomResizedCrop(size, scale, ratio=(3/4, 4/3)): torchvision's sampler, vectorised (10
   tries of area ~ U(scale)·H·W and log-ratio ~ U(log 3/4, log 4/3), integer box, first try
   that fits, else the whole image). Crop and resize of all boxes is one ``roi_align``
   (aligned, adaptive sampling grid): bilinear when enlarging, an area-averaging antialias
   when shrinking (torchvision's antialias uses a triangle filter; both agree on smooth images).
2. Horizontal flip with p = ``flip_p``.
3. ColorJitter(brightness, contrast, saturation, hue) with p = ``jitter_p``: factors
   b, c, s ~ U(max(0, 1 - x), 1 + x) and hue shift ~ U(-h, h) per sample; fixed order
   brightness, contrast, saturation, hue (torchvision permutes the four per call). Each op
   equals ``torchvision.transforms.v2.functional.adjust_*`` with that sample's factor; the hue
   shift is the exact HSV rotation of ``adjust_hue``, in closed form (see :func:`shift_hue`).
4. Grayscale (ITU-R 601-2 luma, kept as 3 channels) with p = ``grayscale_p``.
5. Gaussian blur with p = ``blur_p``: sigma ~ U(0.1, 2.0) per sample, odd kernel side
   ``round(23 * side / 224)`` (23 px at 224 as in SimCLR/BYOL, at least 3), separable, reflect
   padding: one grouped convolution per axis with a kernel per sample.
6. Solarize with p = ``solarize_p``: x -> 1 - x where x >= 0.5.
7. Normalise with the dataset's mean and std.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as NF
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.ops import roi_align

from lejepa.config import ViewsConfig

RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_TRIES = 10
BLUR_SIGMA = (0.1, 2.0)
SOLARIZE_THRESHOLD = 0.5
EVAL_CROP = 0.875  # eval: torchvision's Resize(R / 0.875) + CenterCrop(R), never beyond the stored size


@dataclass
class Views:
    """Normalised float views: ``global_views`` [Vg, B, 3, R, R], ``local_views``
    [Vl, B, 3, L, L] or ``None`` when there are no local views."""

    global_views: Tensor
    local_views: Tensor | None


class ViewSampler:
    """Draws ``cfg.global_views`` views of side ``resolution`` and ``cfg.local_views`` of side
    :attr:`local_size` from a batch of images (see the module docstring for the recipe)."""

    def __init__(self, cfg: ViewsConfig, resolution: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.cfg = cfg
        self.resolution = resolution
        self.mean = list(mean)
        self.std = list(std)

    @property
    def local_size(self) -> int:
        """``cfg.local_size``, else the paper's 96/224 of the resolution (at least 4 px)."""
        return self.cfg.local_size or max(4, round(self.resolution * 96 / 224))

    @torch.no_grad()
    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Views:
        """``images``: uint8 [B, 3, H, W] or float in [0, 1]; ``generator``: a CPU generator
        (``None`` = torch's global one). Same images and generator state, same views."""
        x = to_unit(images)
        glob = self._views(x, self.cfg.global_views, self.resolution, self.cfg.global_scale, generator)
        local = None
        if self.cfg.local_views > 0:
            local = self._views(x, self.cfg.local_views, self.local_size, self.cfg.local_scale, generator)
        return Views(glob, local)

    def _views(self, x: Tensor, count: int, size: int, scale: tuple[float, float], generator: torch.Generator | None) -> Tensor:
        """``count`` augmented views of every image: [count, B, 3, size, size], normalised."""
        batch = x.shape[0]
        views = self.augment(crop_views(x, count, size, scale, generator), generator)
        return TF.normalize(views, self.mean, self.std, inplace=True).unflatten(0, (count, batch))

    def augment(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Flip, colour jitter, grayscale, blur and solarize [n, 3, s, s] crops in [0, 1], in
        place, each with its own probability and parameters per sample; stays in [0, 1]."""
        cfg = self.cfg
        n = x.shape[0]
        u = torch.rand(n, 5, generator=generator)
        jitter = torch.rand(n, 4, generator=generator)
        sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand(n, generator=generator)
        x = apply_where(x, u[:, 0] < cfg.flip_p, lambda y: y.flip(-1))
        x = apply_where(x, u[:, 1] < cfg.jitter_p, self._jitter, jitter)
        x = apply_where(x, u[:, 2] < cfg.grayscale_p, lambda y: TF.rgb_to_grayscale(y, num_output_channels=3))
        x = apply_where(x, u[:, 3] < cfg.blur_p, gaussian_blur, sigma)
        return apply_where(x, u[:, 4] < cfg.solarize_p, solarize)

    def _jitter(self, x: Tensor, u: Tensor) -> Tensor:
        """ColorJitter with factors from ``u`` ~ U(0, 1) [n, 4] scaled to the configured ranges."""
        b, c, s, h = self.cfg.jitter
        lows = u.new_tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        highs = u.new_tensor([1 + b, 1 + c, 1 + s, h])
        brightness, contrast, saturation, hue = (lows + (highs - lows) * u).unbind(1)
        return color_jitter(x, brightness, contrast, saturation, hue, active=(b > 0, c > 0, s > 0, h > 0))


def to_unit(images: Tensor) -> Tensor:
    """uint8 [..., 3, H, W] to float32 in [0, 1]; float input is only cast to float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], generator: torch.Generator | None = None) -> Tensor:
    """``n`` RandomResizedCrop boxes (x1, y1, x2, y2) in pixel-edge coordinates, float [n, 4]:
    torchvision's sampler vectorised over samples and tries (integer sides and offsets)."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * torch.rand(n, CROP_TRIES, generator=generator))
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, CROP_TRIES, generator=generator))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # index of the first try that fits
    found = fits.any(1)
    w = torch.where(found, w.gather(1, first).squeeze(1), float(width))
    h = torch.where(found, h.gather(1, first).squeeze(1), float(height))
    offsets = torch.rand(n, 2, generator=generator)
    top = torch.floor(offsets[:, 0] * (height - h + 1))
    left = torch.floor(offsets[:, 1] * (width - w + 1))
    return torch.stack([left, top, left + w, top + h], dim=1)


def crop_views(x: Tensor, count: int, size: int, scale: tuple[float, float], generator: torch.Generator | None = None) -> Tensor:
    """``count`` random resized crops of each image of ``x`` [B, 3, H, W] (float), all in one
    ``roi_align``; result [count * B, 3, size, size], view-major (view v of image b at v*B + b)."""
    batch, _, height, width = x.shape
    boxes = crop_boxes(count * batch, height, width, scale, generator)
    return resized_crops(x, boxes, torch.arange(batch).repeat(count), size)


def resized_crops(x: Tensor, boxes: Tensor, owners: Tensor, size: int) -> Tensor:
    """Crop box k (x1, y1, x2, y2, pixel edges) of image ``owners[k]`` of ``x`` [B, C, H, W]
    (float) and resize it to ``size`` x ``size``: [K, C, size, size], one ``roi_align``."""
    rois = torch.cat([owners[:, None].to(boxes.dtype), boxes], dim=1).to(x.device, non_blocking=True)
    return roi_align(x, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def apply_where(x: Tensor, mask: Tensor, fn: Callable[..., Tensor], *params: Tensor) -> Tensor:
    """Replace, in place, the samples of ``x`` where the CPU bool ``mask`` holds by ``fn`` of
    them (a copy ``fn`` may overwrite) and their rows of ``params``. Indices are computed on
    the CPU: no device sync."""
    index = mask.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    rows = [p[index].to(x.device, non_blocking=True) for p in params]
    index = index.to(x.device, non_blocking=True)
    return x.index_copy_(0, index, fn(x.index_select(0, index), *rows))


def color_jitter(
    x: Tensor,
    brightness: Tensor,
    contrast: Tensor,
    saturation: Tensor,
    hue: Tensor,
    active: Sequence[bool] = (True, True, True, True),
) -> Tensor:
    """Per-sample adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue (in that
    order) of float [n, 3, H, W] in [0, 1], overwriting ``x``; factors [n]; ops with
    ``active`` False are skipped."""

    def per_sample(v: Tensor) -> Tensor:
        return v.view(-1, 1, 1, 1)

    if active[0]:
        x = x.mul_(per_sample(brightness)).clamp_(0.0, 1.0)
    if active[1]:
        mean = TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
        x = _blend_(x, mean, per_sample(contrast))
    if active[2]:
        x = _blend_(x, TF.rgb_to_grayscale(x), per_sample(saturation))
    if active[3]:
        x = shift_hue(x, hue)
    return x


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Per-sample HSV hue rotation of float [n, 3, H, W] in [0, 1] by ``shift`` [n] turns.

    V = max and C = max - min are kept; with H6 = 6H in [0, 6) from the usual piecewise formula
    (ties resolved r, g, b as in torchvision), channel j = V - C * clamp(min(k, 4 - k), 0, 1),
    k = (n_j + H6 + 6 * shift) mod 6, n = (5, 3, 1): the closed-form HSV->RGB, no round trip."""
    r, g, b = x.unbind(dim=-3)
    low, high = torch.aminmax(x, dim=-3)
    chroma = high - low
    inv = 1.0 / chroma.clamp_min(1e-12)  # chroma 0: any hue, the result is grey
    h6 = torch.where(high == r, (g - b) * inv, torch.where(high == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
    h6 = h6.add_(6.0 * shift.view(-1, 1, 1)).unsqueeze(-3)
    k = (h6 + x.new_tensor([5.0, 3.0, 1.0]).view(3, 1, 1)).remainder_(6.0)
    return torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0).mul_(-chroma.unsqueeze(-3)).add_(high.unsqueeze(-3))


def _blend_(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """torchvision's blend in place: x <- ratio * x + (1 - ratio) * other, clamped to [0, 1]."""
    return x.mul_(ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def blur_kernel_size(side: int) -> int:
    """Odd Gaussian kernel side scaled to the image: 23 at 224 px, at least 3."""
    k = round(23 * side / 224)
    return max(3, k if k % 2 == 1 else k + 1)


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian blur of float [n, C, H, W] with one sigma per sample [n]: torchvision's
    kernel (``blur_kernel_size``, reflect padding) as two grouped 1-D convolutions."""
    n, c, height, width = x.shape
    k = blur_kernel_size(min(height, width))
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma[:, None]).square())
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [n*C, k]
    y = NF.pad(x.reshape(1, n * c, height, width), [k // 2] * 4, mode="reflect")
    y = NF.conv2d(y, kernel[:, None, None, :], groups=n * c)
    y = NF.conv2d(y, kernel[:, None, :, None], groups=n * c)
    return y.reshape(n, c, height, width)


def solarize(x: Tensor) -> Tensor:
    """Invert the values at or above the threshold (0.5 on [0, 1])."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)


def eval_images(images: Tensor, resolution: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Deterministic eval images: uint8 (or [0, 1] float) [B, 3, S, S] to normalised float
    [B, 3, R, R]. S <= R: resize to R. S > R: resize to min(S, round(R / 0.875)), centre crop R
    (256 -> 224 is a plain centre crop, as image folders are stored at R / 0.875)."""
    x = to_unit(images)
    side = x.shape[-1]
    if side <= resolution:
        x = TF.resize(x, [resolution, resolution], antialias=True)
    else:
        inner = min(side, round(resolution / EVAL_CROP))
        x = TF.center_crop(TF.resize(x, [inner, inner], antialias=True), [resolution, resolution])
    return TF.normalize(x, list(mean), list(std))
