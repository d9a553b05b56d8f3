"""Per-step learning-rate schedule: linear warm-up, then cosine decay to ``lr * final_ratio``."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """Multiplier of the base lr at ``step`` (0-based).

    warm-up: (step + 1) / warmup_steps for step < warmup_steps;
    then r + (1 − r)·(1 + cos(π·p))/2 with p = (step − warmup) / (total − warmup) ∈ [0, 1].
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, final_ratio: float) -> LambdaLR:
    """A LambdaLR stepping :func:`warmup_cosine_factor` once per optimiser step."""
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, warmup_steps, total_steps, final_ratio))
