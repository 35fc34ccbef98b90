"""Where a training step's time goes: its operators profiled once and summed by class.

:func:`profile_step` runs a step under ``torch.profiler`` and sums every operator's own time (not counting the
operators it calls) into :data:`PROFILE_CLASSES`: matrix products, dtype conversions, elementwise work (copies
and fills included), reductions (sums, norms, softmax), the optimizer (everything inside ``optimizer.step`` and
``zero_grad``) and the rest (autograd and Python overhead, views, allocation). It also counts the dtype
conversions and the bytes they move (read plus written): every ``copy_`` between two dtypes, the ones that
``.to()`` makes and the hidden ones of a mixed-dtype operator alike. ``dedn bench --profile`` prints it
(:func:`format_profile`); ``tests/test_precision.py`` holds the bf16 step's conversions to a budget with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.profiler import ProfilerActivity, profile

__all__ = ["PROFILE_CLASSES", "StepProfile", "format_profile", "profile_step"]

#: The operator classes, in table order: the JSON key and the table's label.
PROFILE_CLASSES: dict[str, str] = {
    "matrix_products": "matrix products",
    "conversions": "conversions",
    "elementwise": "elementwise",
    "reductions": "reductions",
    "optimizer": "optimizer",
    "other": "other",
}

_MATRIX = {"aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::addbmm", "aten::matmul",
           "aten::linear", "aten::einsum", "aten::dot", "aten::mv", "aten::_mkldnn_matmul"}
_REDUCTIONS = {"aten::sum", "aten::mean", "aten::amax", "aten::amin", "aten::max", "aten::min", "aten::norm",
               "aten::linalg_vector_norm", "aten::logsumexp", "aten::_softmax", "aten::_log_softmax",
               "aten::_softmax_backward_data", "aten::_log_softmax_backward_data", "aten::nll_loss_forward",
               "aten::nll_loss_backward", "aten::nll_loss2d_forward", "aten::prod", "aten::cumsum", "aten::all",
               "aten::any"}
_ELEMENTWISE = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "exp", "exp_", "log", "log_", "sqrt",
                "sqrt_", "pow", "pow_", "abs", "neg", "clamp", "clamp_", "clamp_min", "clamp_min_", "maximum",
                "minimum", "where", "fill_", "zero_", "zeros_like", "copy_", "clone", "cat", "stack", "addcmul_",
                "addcdiv_", "lerp_", "logaddexp", "sign", "relu", "threshold_backward", "expand_backward",
                "index", "index_select", "gather", "scatter_add_", "masked_fill_", "eq", "ne", "lt", "gt",
                "isfinite", "reciprocal", "rsqrt", "contiguous", "_to_copy", "to"}
#: Bytes of one element, by the names the profiler gives dtypes.
_ITEM_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
               "short int": 2, "bool": 1, "unsigned char": 1, "signed char": 1}


@dataclass
class StepProfile:
    """One profiled step: per class its operators' own ``seconds`` and ``calls``; ``total_seconds`` their sum
    (the step's time under the profiler, a little above an unprofiled step); the number of dtype conversions
    (``conversion_count``), the ``bytes_converted`` (read plus written) and the largest single one
    (``largest_conversion_bytes``)."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PROFILE_CLASSES, 0.0))
    calls: dict[str, int] = field(default_factory=lambda: dict.fromkeys(PROFILE_CLASSES, 0))
    conversion_count: int = 0
    bytes_converted: int = 0
    largest_conversion_bytes: int = 0

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``{class: {seconds, calls, share}, ..., total_seconds, conversion_count,
        bytes_converted}``,
        ``share`` the class's part of the step (0..1)."""
        total = self.total_seconds or math.inf
        out: dict[str, Any] = {name: {"seconds": self.seconds[name], "calls": self.calls[name],
                                      "share": self.seconds[name] / total} for name in PROFILE_CLASSES}
        out.update(total_seconds=self.total_seconds, conversion_count=self.conversion_count,
                   bytes_converted=self.bytes_converted, largest_conversion_bytes=self.largest_conversion_bytes)
        return out


def _conversion_bytes(event: Any) -> int | None:
    """Bytes a ``copy_`` event moves between two dtypes (read plus written), or None when it converts nothing."""
    dtypes = list(getattr(event, "input_dtypes", None) or [])
    shapes = event.input_shapes or []
    if len(dtypes) < 2 or not dtypes[0] or not dtypes[1] or dtypes[0] == dtypes[1]:
        return None
    if not shapes or not shapes[0]:
        return None  # a Python number wrapped as a 0-dim tensor: no data converted
    numel = math.prod(shapes[0])
    return numel * (_ITEM_BYTES.get(dtypes[0], 4) + _ITEM_BYTES.get(dtypes[1], 4))


def _in_optimizer(event: Any) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return True
        parent = parent.cpu_parent
    return False


def _classify(event: Any) -> str:
    name = event.name
    if _in_optimizer(event) or name.startswith("Optimizer."):
        return "optimizer"
    if name in _MATRIX:
        return "matrix_products"
    if name in _REDUCTIONS:
        return "reductions"
    if name.startswith("aten::") and name[6:] in _ELEMENTWISE:
        return "elementwise"
    return "other"


def profile_step(step: Callable[[], None]) -> StepProfile:
    """Run ``step`` once under the profiler (CPU operators; a CUDA step's kernels are not timed separately) and
    sum its operators' own time by class; count the dtype conversions and their bytes."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    result = StepProfile()
    for event in prof.events():
        moved = _conversion_bytes(event) if event.name == "aten::copy_" else None
        kind = "conversions" if moved is not None and not _in_optimizer(event) else _classify(event)
        if moved is not None:
            result.conversion_count += 1
            result.bytes_converted += moved
            result.largest_conversion_bytes = max(result.largest_conversion_bytes, moved)
        result.seconds[kind] += event.self_cpu_time_total / 1e6
        result.calls[kind] += 1
    return result


def format_profile(profiles: dict[str, dict[str, Any]]) -> str:
    """A Markdown table of one or more profiles (``{column name: StepProfile.to_dict()}``), pasteable as is."""
    names = list(profiles)
    head = "| class | " + " | ".join(f"{n} s | calls | share" for n in names) + " |"
    rule = "|---|" + "---:|---:|---:|" * len(names)
    rows = [head, rule]
    for key, label in PROFILE_CLASSES.items():
        cells = [f"{p[key]['seconds']:.3f} | {p[key]['calls']} | {p[key]['share']:.0%}" for p in profiles.values()]
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    footer = {
        "step (profiled)": [f"{p['total_seconds']:.3f} | | 100%" for p in profiles.values()],
        "dtype conversions": [f"{p['conversion_count']} | | " for p in profiles.values()],
        "bytes converted": [f"{p['bytes_converted'] / 1e6:.1f} MB | | " for p in profiles.values()],
    }
    rows += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in footer.items()]
    return "\n".join(rows)
