"""Devices, precision, seeding and torch.distributed set-up (torchrun environment)."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lejepa.errors import ConfigError


@dataclass(frozen=True)
class Runtime:
    """Where and how this process trains."""

    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    autocast_dtype: torch.dtype | None  # None = fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` → cuda, then mps, then cpu; an explicit device must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            requested = "cuda"
        elif torch.backends.mps.is_available():
            requested = "mps"
        else:
            requested = "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device='cuda' but no CUDA device is available (use auto or cpu)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device='mps' but MPS is not available (use auto or cpu)")
    return torch.device(requested)


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA); precision
    ``auto`` is bf16 autocast on CUDA and fp32 elsewhere; bf16 on CPU is refused (ConfigError)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if precision == "bf16" and dev.type == "cpu":
        # measured with torch 2.14 (tests/test_trainer.py): bf16 convolution backward on CPU returns
        # NaN weight gradients now and then on small feature maps, and a run diverges within steps
        raise ConfigError(
            "train.precision=bf16 is for CUDA: on CPU, PyTorch's bf16 convolution backward "
            "intermittently gives NaN gradients; use train.precision=fp32 (or auto)"
        )
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None
    return Runtime(dev, rank, world, local_rank, dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def compile_mode(requested: str, device: torch.device) -> str | None:
    """The ``torch.compile`` mode for ``train.compile`` (None = eager): ``auto`` compiles with
    the default mode on CUDA only, where it pays; on CPU the compile time outweighs the gain."""
    if requested == "auto":
        return "default" if device.type == "cuda" else None
    return None if requested == "eager" else requested


def is_convolutional(module: torch.nn.Module) -> bool:
    """True when at least half of the parameters sit in 2-D convolutions (a CNN backbone)."""
    conv = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Conv2d) for p in m.parameters(False))
    total = sum(p.numel() for p in module.parameters())
    return total > 0 and conv >= total / 2


def use_channels_last(requested: bool | None, device: torch.device, backbone: torch.nn.Module) -> bool:
    """``train.channels_last``: None = on CUDA for convolutional backbones (cuDNN's NHWC kernels)."""
    if requested is None:
        return device.type == "cuda" and is_convolutional(backbone)
    return requested


def adamw_kernel(fused: bool | None, device: torch.device) -> dict[str, bool]:
    """AdamW's implementation for ``optim.fused``: fused on CUDA by default, foreach elsewhere."""
    if fused is None:
        fused = device.type == "cuda"
    return {"fused": True} if fused else {"foreach": True}
