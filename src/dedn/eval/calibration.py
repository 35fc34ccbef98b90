"""Which calibrated-stacking value an evaluation uses, and where it came from.

Calibrated stacking subtracts gamma from every seen class's score before the argmax over all classes. An H is
only meaningful next to its gamma, so every evaluation carries a :class:`Calibration`: the value and its
source, a :class:`GammaSource`:

- ``validated``: chosen (H-maximising) on the validation task, never on test images;
- ``config``: a number given in ``eval.calibration`` or on the command line;
- ``mode default``: the method's own fixed margin (see :func:`default_gamma`);
- ``oracle-on-test``: H-maximising on the test scores themselves. Optimistic by construction, shown only
  as a labelled diagnosis, never as a result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dedn.checks import Choice, GammaChoice
from dedn.errors import ConfigError
from dedn.models.registry import RunSettings, model_entry


class GammaSource(Choice):
    """Where an evaluation's gamma came from; the value is what records and printouts say."""

    VALIDATED = "validated"
    CONFIG = "config"
    MODE_DEFAULT = "mode default"
    ORACLE = "oracle-on-test"


def fixed_gamma_note(source: str | GammaSource | None) -> str | None:
    """For a figure at a gamma that was not chosen on validation (a ``config`` or ``mode default`` gamma): one
    line that says so and how to get the figure at a validated gamma; None for any other source (a validated
    gamma needs no note, an oracle one is labelled as a diagnosis where it is printed)."""
    if source not in (GammaSource.CONFIG, GammaSource.MODE_DEFAULT):
        return None
    return (f"this gamma is fixed ({GammaSource(source).value}), chosen on no data, and may not suit these scores; "
            "a gamma chosen on validation comes from training under eval.protocol=validated (the default) "
            "with eval.calibration=auto (the default)")


def default_gamma(run: RunSettings, dataset: str | None) -> float:
    """The fixed calibration of the run's method and mode when nothing chose one (the registry entry's
    ``default_gamma``).

    DEDN paper mode: 2 eps. The paper's inference works on margin-processed scores (seen - eps, unseen + eps,
    eq. 14), the scores its margin-aware loss is built to win on, and that shift is calibrated stacking at
    2 eps. A reference mode: 0, because the released code keeps its margin inside the model's scores already.
    """
    return model_entry(run.model.name).default_gamma(run, dataset)


@dataclass(frozen=True)
class Calibration:
    """A calibration request: a number, or ``"best"`` (H-maximising on the scores evaluated), and its source."""

    value: float | str
    source: GammaSource

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", GammaSource(self.source))  # ValueError on an unknown source
        if self.value != "best" and not (isinstance(self.value, (int, float)) and math.isfinite(self.value)):
            raise ConfigError(f"calibration must be a finite number or 'best', got {self.value!r}")


def config_calibration(setting: GammaChoice | float, default: float, on_validation_task: bool) -> Calibration:
    """What an ``eval.calibration`` setting (parsed: :attr:`dedn.config.EvalConfig.gamma`) asks for on the data at hand.

    ``auto`` (and ``validated``) on a validation task: the H-maximising value on its scores (that *is* the
    validation choice). ``auto`` on the test split: ``default`` (:func:`default_gamma`). A number: that number.
    ``validated`` on the test split needs a value chosen by the validated protocol and is refused here.
    """
    if setting is GammaChoice.AUTO or setting is GammaChoice.VALIDATED:
        if on_validation_task:
            return Calibration("best", GammaSource.VALIDATED)
        if setting is GammaChoice.VALIDATED:
            raise ConfigError("eval.calibration=validated needs the value chosen on the validation task: run "
                              "the validated protocol (eval.protocol=validated) or give a number")
        return Calibration(default, GammaSource.MODE_DEFAULT)
    return Calibration(float(setting), GammaSource.CONFIG)
