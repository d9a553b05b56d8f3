"""Throughput of the batched ViewSampler against a per-sample torchvision v2 loop, on CPU.

Both make the default multi-crop recipe (2 global + 6 local views, docs/method.md §2) of the same
uint8 batch; the loop runs one ``v2.Compose`` per view per image and stacks the results.
Prints images/s (source images per second, all their views included) and the ratio.

    .venv/bin/python benchmarks/views.py [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torchvision.transforms import v2

from lejepa.config import ViewsConfig
from lejepa.views import ViewSampler, blur_kernel_size

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CASES = ((32, 32, 256), (224, 256, 32))  # (resolution, stored side, batch)


def torchvision_pipeline(cfg: ViewsConfig, size: int, scale: tuple[float, float]) -> v2.Compose:
    """The same recipe as one per-image torchvision v2 pipeline (uint8 in, normalised float out)."""
    k = blur_kernel_size(size)
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=scale, antialias=True),
            v2.RandomHorizontalFlip(cfg.flip_p),
            v2.RandomApply([v2.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
            v2.RandomGrayscale(cfg.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=cfg.blur_p),
            v2.RandomSolarize(128, p=cfg.solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def loop_views(images: torch.Tensor, pipelines: list[tuple[v2.Compose, int]]) -> list[torch.Tensor]:
    """Per-sample baseline: every view of every image through its Compose, then stacked."""
    return [torch.stack([torch.stack([pipe(img) for img in images]) for _ in range(count)]) for pipe, count in pipelines]


def rate(fn, batch: int, reps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return batch * reps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = ViewsConfig()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cfg.global_views} global + {cfg.local_views} local views"
    )
    print(f"{'resolution':>10} {'batch':>6} {'ViewSampler img/s':>18} {'v2 loop img/s':>14} {'ratio':>6}")
    for resolution, side, batch in CASES:
        sampler = ViewSampler(cfg, resolution, MEAN, STD)
        images = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
        generator = torch.Generator().manual_seed(0)
        pipelines = [
            (torchvision_pipeline(cfg, resolution, cfg.global_scale), cfg.global_views),
            (torchvision_pipeline(cfg, sampler.local_size, cfg.local_scale), cfg.local_views),
        ]
        fast = rate(partial(sampler, images, generator), batch, args.reps)
        slow = rate(partial(loop_views, images, pipelines), batch, max(1, args.reps // 2))
        print(f"{resolution:>10} {batch:>6} {fast:>18.0f} {slow:>14.0f} {fast / slow:>5.1f}x")


if __name__ == "__main__":
    main()
