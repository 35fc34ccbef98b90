"""Devices and torch.distributed: the device a process trains on, and joining the process group that
torchrun describes."""

from __future__ import annotations

import os

import torch

from dedn.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available (under torchrun the process's ``LOCAL_RANK`` GPU), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available")
    return torch.device(name)


def init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the torch.distributed group that ``torchrun`` describes in the environment.

    Outside torchrun (no ``WORLD_SIZE`` > 1) training runs in this one process: (0, 1).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()
