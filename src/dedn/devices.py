"""Devices and torch.distributed: the one place that picks a device and joins a process group.

Training, extraction and prediction all ask :func:`resolve_device`; training and sharded extraction under
``torchrun`` join its process group through :func:`join_process_group`.
"""

from __future__ import annotations

import os

import torch

from dedn.errors import ConfigError

#: Precision of the products over the features (docs/precision.md): float32, or bf16 operands with float32
#: accumulation (weights, softmax, losses and the optimizer stay float32). Here because the config checks a
#: run's choice and the model computes with it, and the config may not import the models.
PRECISIONS = ("fp32", "bf16")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the CUDA device of this process (under torchrun its ``LOCAL_RANK`` GPU) when CUDA is there,
    else the CPU. Anything else as given; a CUDA device on a machine without CUDA is refused."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name} asked for, but no CUDA device is available")
    return torch.device(name)


def join_process_group(device: torch.device) -> bool:
    """Start torch.distributed when launched by torchrun (``WORLD_SIZE`` > 1, ``MASTER_ADDR`` set) and nobody
    did yet, with NCCL on CUDA and gloo on the CPU. True when this call started it."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return True


def process_rank() -> tuple[int, int]:
    """(rank, world size) of this process: from the running process group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def use_threads(threads: int | None) -> None:
    """Set torch's CPU thread count for this process (``train.threads``); None keeps torch's default.

    Process-wide, so the entry points that run a config call it, not the trainer: small models lose more to
    thread synchronisation than they gain, and the demo runs one single-threaded run per process.
    """
    if threads:
        torch.set_num_threads(threads)
