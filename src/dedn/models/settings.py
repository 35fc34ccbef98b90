"""The method settings: what ``mode`` (paper | reference) and the dataset change, resolved once.

``paper`` follows the paper; ``reference`` reproduces the authors' released code, which differs from it in a
few places, some of them per dataset. :func:`resolve_method` is the one place that knows those differences:
it turns (mode, dataset, the run's loss settings, the low rank) into a :class:`MethodSettings` of explicit
values, and the model and the losses read only these values, never a mode or a dataset name.

The run's loss settings are read by attribute (:class:`LossSettings`): the models do not import the run
config (:mod:`dedn.config`), whose ``LossConfig`` is one such object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import ConfigError

#: The discrepancy d(x, y) of the align and distill terms, as :func:`dedn.models.losses.discrepancy` names it.
PAPER_DISCREPANCY = "paper"  # JSD computed in log space + mean squared error
RELEASED_DISCREPANCY = "reference"  # the released code's JSD + its cubic term
DISCREPANCIES = (PAPER_DISCREPANCY, RELEASED_DISCREPANCY)
DIVERGENCES = ("jsd", "symmetric_kl")
SQUARED_ERRORS = ("mean", "sum")


class LossSettings(Protocol):
    """The loss weights and switches DEDN reads (a run's ``loss`` section, :class:`dedn.config.LossConfig`,
    where each is described)."""

    beta: float
    gamma: float
    margin: float
    mal: bool
    align: bool
    distill: bool
    lamb: float
    calibration_margin: float
    divergence: str
    squared_error: str


#: The field annotations a model config's values are made plain of (annotations are strings here:
#: ``from __future__ import annotations``).
_PLAIN_KINDS = {"int": int, "float": float, "bool": bool}


def make_plain(config: Any) -> None:
    """Turn every ``int``, ``float`` and ``bool`` field of a frozen dataclass ``config`` into that plain Python
    type (numpy scalars, ints given for floats), so that equal configs compare and serialise equal. For the
    model configs' ``__post_init__``."""
    for f in fields(config):
        kind = _PLAIN_KINDS.get(str(f.type))
        if kind is not None:
            object.__setattr__(config, f.name, kind(getattr(config, f.name)))


@dataclass(frozen=True)
class MethodSettings:
    """Every behaviour that differs between the paper and the released code, as explicit values.

    The defaults are the paper's (with MAL margin 1).

    Attributes:
        mode: the mode these settings were resolved for; a label for records and messages, nothing
            branches on it.
        target_margin: MAL subtracts this from the target class score (2 eps; the released SUN and AWA2
            code subtracts eps).
        calibration_margin: a fixed shift inside the class scores, +margin on unseen and -margin on seen
            classes (the released code; 0: none).
        sum_branches_in_training: while training an expert's attribute scores are O_r + O_c (the released
            code) instead of the l_rc mix used at inference.
        clip_negative_attributes: class attributes are clipped at 0 before normalising (the released AWA2
            loader; AWA2's attributes hold -1 for unknown).
        discrepancy: the form of d(x, y), one of :data:`DISCREPANCIES`.
        divergence: in the paper's form, the divergence of the two softmaxes: ``"jsd"`` (the paper's text) or
            ``"symmetric_kl"`` (its equations 7 and 12, 1/2 [KL(P||Q) + KL(Q||P)]).
        squared_error: in the paper's form, ``"mean"`` (over batch and entries, the text's "mean squared
            error") or ``"sum"`` (the printed ||P - Q||^2, summed over the score vector, mean over the batch).
        self_calibration: weight of the released code's self-calibration loss (0: the term is left out).
        low_rank: when set, every W1 is H1 H3 of this rank (the released SUN model).
        cluster_variant: which of a benchmark's built-in cluster definitions fExp uses (``"reference"``: the
            released code's, whose SUN slicing differs from the paper's groups).
        default_gamma: the calibrated-stacking gamma of an evaluation that nothing else chose: 2 eps in the
            paper (its inference scores are margin-processed, seen - eps and unseen + eps, eq. 14), 0 for the
            released code, whose margin is already inside its scores.
    """

    mode: str = "paper"
    target_margin: float = 2.0
    calibration_margin: float = 0.0
    sum_branches_in_training: bool = False
    clip_negative_attributes: bool = False
    discrepancy: str = PAPER_DISCREPANCY
    divergence: str = "jsd"
    squared_error: str = "mean"
    self_calibration: float = 0.0
    low_rank: int | None = None
    default_gamma: float = 2.0
    cluster_variant: str = "paper"

    def __post_init__(self) -> None:
        if self.discrepancy not in DISCREPANCIES:
            raise ValueError(f"discrepancy must be one of {DISCREPANCIES}, got {self.discrepancy!r}")
        if self.divergence not in DIVERGENCES or self.squared_error not in SQUARED_ERRORS:
            raise ValueError(f"divergence must be one of {DIVERGENCES} and squared_error one of {SQUARED_ERRORS}, "
                             f"got {self.divergence!r}, {self.squared_error!r}")
        if self.low_rank is not None and (isinstance(self.low_rank, bool) or int(self.low_rank) != self.low_rank
                                          or self.low_rank < 1):
            raise ValueError(f"low_rank must be an integer >= 1 or None, got {self.low_rank!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodSettings:
        return cls(**values)


def resolve_method(
    mode: str,
    dataset: str | None,
    loss: LossSettings,
    low_rank: int | None = None,
) -> MethodSettings:
    """The settings of ``mode`` for ``dataset`` (CUB, SUN, AWA2, another name or None).

    Paper mode ignores the dataset and the reference-only options (``loss.lamb``, ``loss.calibration_margin``,
    ``low_rank``, a run's ``model.low_rank``). Reference mode takes them, and the released code's dataset
    differences: SUN and AWA2 subtract eps (not 2 eps) from the target score, AWA2 clips negative class
    attributes.

    Raises:
        ValueError: a mode other than paper and reference (configs are checked before they get here).
        ConfigError: a paper-only reading asked for in reference mode.
    """
    if mode == "paper":
        return MethodSettings(mode=mode, target_margin=2.0 * loss.margin, default_gamma=2.0 * loss.margin,
                              divergence=loss.divergence, squared_error=loss.squared_error)
    if mode != "reference":
        raise ValueError(f"mode must be paper or reference, got {mode!r}")
    if (loss.divergence, loss.squared_error) != ("jsd", "mean"):
        raise ConfigError("loss.divergence and loss.squared_error choose between the paper's readings; reference "
                          "mode computes the released code's discrepancy: leave them at jsd and mean")
    name = canonical_dataset(dataset) or (dataset.upper() if dataset else None)
    return MethodSettings(
        mode=mode,
        target_margin=loss.margin if name in ("SUN", "AWA2") else 2.0 * loss.margin,
        calibration_margin=float(loss.calibration_margin),
        sum_branches_in_training=True,
        clip_negative_attributes=name == "AWA2",
        discrepancy=RELEASED_DISCREPANCY,
        self_calibration=float(loss.lamb),
        low_rank=low_rank,
        default_gamma=0.0,
        cluster_variant="reference",
    )
