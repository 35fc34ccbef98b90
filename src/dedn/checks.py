"""Checks of numeric options and config values, shared by the config (:mod:`dedn.config`) and the CLI.

Every value is checked up front, before data is loaded or a model is built, against a :class:`Rule` that
says in words what it must be. The config and the command line use the same rules, so ``model.l_e=2``
and ``dedn predict --l-e 2`` fail the same way: one line that names the key or option, what it must be,
and what it got.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from dedn.errors import ConfigError, DednError


@dataclass(frozen=True)
class Rule:
    """What a value must be: ``test`` decides, ``expects`` says it in the error (``must be {expects}``)."""

    test: Callable[[Any], bool]
    expects: str


def _is_int(value: Any) -> bool:
    # bool is an int in Python, but `train.epochs=true` is a mistake, not 1 epoch.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(low: int, high: int | None = None) -> Rule:
    """An integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    if high is None:
        return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}")
    return Rule(lambda v: _is_int(v) and low <= v <= high, f"an integer in [{low}, {high}]")


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           high_open: bool = False, expects: str | None = None) -> Rule:
    """A finite number within the bounds given (NaN and infinities never pass).

    ``low_open`` / ``high_open`` exclude the bound itself. ``expects`` replaces the generated wording.
    """
    def test(v: Any) -> bool:
        if not _is_finite(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return high is None or (v < high if high_open else v <= high)

    if expects is None:
        if low is not None and high is not None:
            expects = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            expects = f"a finite number {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            expects = f"a finite number {'<' if high_open else '<='} {high:g}"
        else:
            expects = "a finite number"
    return Rule(test, expects)


def choice(*names: str) -> Rule:
    """One of ``names`` (named in the error)."""
    return Rule(lambda v: v in names, f"one of {{{', '.join(names)}}}")


def optional(rule: Rule) -> Rule:
    """``rule`` or None (``null`` in a config: "use the default")."""
    return Rule(lambda v: v is None or rule.test(v), f"{rule.expects} or null")


def _is_device(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


class Choice(str, Enum):
    """A closed set of names a config, the CLI or a record uses (protocols, launchers, gamma sources, ...).

    Members are strings, so they compare equal to, hash like and serialise as their value; ``str()`` and
    f-strings give the value too (Python 3.11 would otherwise format a mixed-in enum by its member name).
    """

    def __str__(self) -> str:
        return str(self.value)


class GammaChoice(Choice):
    """The words ``eval.calibration`` accepts besides a number."""

    AUTO = "auto"  # chosen on the validation task under the validated protocol, else the mode's default
    VALIDATED = "validated"  # the value the validated protocol chose (refused where none was chosen)


def parse_calibration(value: Any, what: str = "eval.calibration") -> GammaChoice | float:
    """``eval.calibration`` (or a CLI option) as one parsed value: :class:`GammaChoice` or a finite number.

    Raises:
        ConfigError: naming ``what``, when the value is neither a word above nor a finite number.
    """
    if isinstance(value, GammaChoice):
        return value
    if value in [c.value for c in GammaChoice]:
        return GammaChoice(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):  # float("nan") parses; NaN makes every score NaN
        raise ConfigError(f"{what} must be {CALIBRATION.expects}, got {value!r}")
    return number


def _is_calibration(value: Any) -> bool:
    try:
        parse_calibration(value)
    except ConfigError:
        return False
    return True


def _is_image_size(value: Any) -> bool:
    return _is_int(value) and value >= 32 and value % 32 == 0


# Rules used by both the config and the CLI (one definition each, so both say the same thing).
COUNT = integer(1)  # batch sizes, top-k, iterations, ranks
NON_NEGATIVE_COUNT = integer(0)  # epochs, intervals (0: off), DataLoader workers
FRACTION = number(0.0, 1.0)  # mixing weights l_rc and l_e
OPEN_FRACTION = number(0.0, 1.0, low_open=True, high_open=True)
NON_NEGATIVE = number(0.0)
POSITIVE = number(0.0, low_open=True)
FINITE = number()
DEVICE = Rule(_is_device, "one of {auto, cpu, cuda, cuda:N}")
CALIBRATION = Rule(_is_calibration, "auto, validated or a finite number")
# The registered backbones (ResNet-101, EfficientNet-Lite0) have stride 32: other sizes crop (ResNet) or pad
# (EfficientNet) the image borders, and the region grid no longer tiles the image evenly. timm models check their
# own patch size or stride when built (dedn.features.backbones.TimmBackbone).
IMAGE_SIZE = Rule(_is_image_size, "a positive multiple of 32 (the backbones' stride)")
# Class attribute values are percentages (CUB: 0-100) or in [0, 1] in practice. They are stored as float32
# (1e300 became inf there and made every probability NaN) and L2-normalised, and squares overflow float32
# from ~1.8e19. 1e6 keeps every square, and their sum over thousands of attributes, far inside its range.
ATTRIBUTE_LIMIT = 1e6
ATTRIBUTE_VALUE = number(-ATTRIBUTE_LIMIT, ATTRIBUTE_LIMIT, expects="a finite number with |value| <= 1e6")


def check(name: str, value: Any, rule: Rule, origin: str | None = None,
          error: type[DednError] = ConfigError) -> None:
    """Raise ``error`` (``[origin: ]name must be ..., got value``) unless ``value`` passes ``rule``."""
    if not rule.test(value):
        where = f"{origin}: " if origin else ""
        raise error(f"{where}{name} must be {rule.expects}, got {value!r}")


def check_option(name: str, value: Any, rule: Rule) -> None:
    """A command-line option: None means "not given" (the default applies); anything else must pass."""
    if value is not None:
        check(name, value, rule)


def check_output_folder(name: str, path: str | os.PathLike[str]) -> None:
    """Refuse an output folder that is an existing file or lies under one (mkdir would fail later)."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if q.is_dir():
                return
            if q == p:
                raise ConfigError(f"{name} must be a folder, got the existing file {p}")
            raise ConfigError(f"{name} must be a folder, got {p}, which lies under the file {q}")
