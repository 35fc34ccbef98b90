"""Precision of the products over the features: ``fp32``, or ``bf16`` operands with float32 accumulation.

With ``bf16`` the feature maps and the projections M1..M4 enter the large matrix products (the region
product and the channel attention, :mod:`dedn.models.dedn`) rounded to bfloat16; the products accumulate
in float32. The master weights, every softmax, the losses and the optimizer stay float32
(docs/precision.md).

Where the device has a bf16 matrix unit (CUDA GPUs, CPUs with AVX512-BF16 or AMX) the products run in
bf16, at up to twice the float32 rate or more. Elsewhere a bf16 product is a slow reference loop (on an
AVX2-only CPU about 1 GFLOP/s, a hundred times slower than float32), so there the bf16-rounded operands are
multiplied in float32 instead: the same rounding of the operands, no speed-up (:func:`product_dtype`).
"""

from __future__ import annotations

import functools
import logging

import torch

from dedn.devices import PRECISIONS
from dedn.errors import ConfigError

log = logging.getLogger("dedn")

__all__ = ["check_precision", "native_bf16", "product_dtype", "round_bf16", "run_precision"]


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


@functools.cache
def native_bf16(device_type: str) -> bool:
    """Whether bf16 matrix products run at hardware speed on this kind of device (``"cpu"``, ``"cuda"``)."""
    if device_type == "cuda":
        # Without emulation: pre-Ampere GPUs accept bf16 but have no bf16 tensor cores.
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if device_type == "cpu":
        # The check torch itself makes before sending a bf16 matmul to oneDNN (AVX512-BF16, AMX, AVX2-VNNI-2).
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


@functools.cache
def _emulated_note(device_type: str) -> None:
    log.warning("this %s has no bf16 matrix unit: bf16 products run in float32 on bf16-rounded operands "
                "(same rounding, no speed-up; precision fp32 is as fast here)", device_type)


def product_dtype(device: torch.device) -> torch.dtype:
    """The dtype bf16-precision products are computed in on ``device``: bfloat16 where it is native, else
    float32 (on bf16-rounded operands; a warning says so once per process)."""
    if native_bf16(device.type):
        return torch.bfloat16
    _emulated_note(device.type)
    return torch.float32


def round_bf16(x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """``x`` rounded to bfloat16, in the ``compute`` dtype; the gradient comes back in ``x``'s dtype.

    For a float32 ``compute`` the rounding is straight-through (the gradient passes unrounded): the product
    it feeds then has a float32 gradient, as the custom channel attention's bf16 path gives.
    """
    if compute == torch.bfloat16:
        return x.to(torch.bfloat16)
    rounded = x.detach().to(torch.bfloat16).to(compute)
    return x + (rounded - x.detach())  # exactly ``rounded`` (the difference is exact), gradient identity


def run_precision(precision: str, dtype: str = "float32", key: str = "train.precision") -> str:
    """A run's precision (``train.precision``) checked against its weights' dtype (``train.dtype``).

    Raises:
        ConfigError: ``precision`` is not one of :data:`PRECISIONS`, or bf16 with float64 weights (bf16
            products accumulate in float32 for float32 models).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"{key} must be one of {{{', '.join(PRECISIONS)}}}, got {precision!r}")
    if precision == "bf16" and dtype != "float32":
        raise ConfigError(f"{key}=bf16 needs train.dtype=float32, got train.dtype={dtype}")
    return precision
