"""What an experiment produced: its rows (the settings compared), one result per (row, protocol, seed), and
the whole record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from dedn.eval.inference import ModelOutputs


@dataclass(frozen=True)
class Row:
    """One setting of an experiment: a folder-safe key, the paper's label and the config overrides."""

    key: str
    label: str
    overrides: tuple[str, ...] = ()


@dataclass
class RunResult:
    """The result of one (row, protocol, seed) job.

    Attributes:
        row, label, protocol, seed: what was run.
        metrics: T, S, U, H, AUSUC in percent on the test split (see ``choices`` for how they were obtained).
        choices: what the protocol chose (validated: epochs, gamma, l_rc, l_e, tuned settings, validation
            scores) or read off (published: epochs of the best H and best T, the fixed calibration).
        dataset: the benchmark name (CUB, SUN, AWA2, synthetic, ...).
        folder: the job folder.
        outputs: the saved test outputs behind ``metrics``: file names relative to ``folder`` for
            ``seen``, ``unseen`` (:class:`~dedn.eval.inference.ModelOutputs`) and ``seen_mask`` (.npy).
        sweep: evaluation-time sweep points (Figure 3), one dict per (axis, value), if asked.
        n_clusters: number of fExp attribute clusters of the trained model.
        seconds: wall time the job took when it was computed.
        reused: True when read from a finished job's ``done.json`` instead of computed now.
    """

    row: str
    label: str
    protocol: str
    seed: int
    metrics: dict[str, float]
    choices: dict[str, Any]
    dataset: str | None
    folder: str
    outputs: dict[str, str]
    sweep: list[dict[str, Any]] = field(default_factory=list)
    n_clusters: int | None = None
    seconds: float | None = None
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("reused")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], reused: bool = False) -> RunResult:
        names = {f.name for f in fields(cls)} - {"reused"}
        return cls(**{k: v for k, v in data.items() if k in names}, reused=reused)

    def load_outputs(self) -> tuple[ModelOutputs, ModelOutputs, np.ndarray]:
        """The test outputs (seen, unseen) and the seen mask behind ``metrics``."""
        folder = Path(self.folder)
        return (ModelOutputs.load(folder / self.outputs["seen"]), ModelOutputs.load(folder / self.outputs["unseen"]),
                np.load(folder / self.outputs["seen_mask"]))


@dataclass
class ExperimentResult:
    """Everything one experiment command produced.

    Attributes:
        name: the experiment (table1, table3, figure3, figure5, calibration).
        out_dir: the results folder.
        protocols, seeds: what was run.
        config: the resolved base config (plain dict).
        rows: the settings compared.
        runs: one :class:`RunResult` per (row, protocol, seed), in row, protocol, seed order.
        tune: the tune grid used by the validated protocol (setting -> values).
        extra: experiment-specific results (sweep axes, curves, cluster counts, ...).
        files: the report files written.
    """

    name: str
    out_dir: Path
    protocols: list[str]
    seeds: list[int]
    config: dict[str, Any]
    rows: list[Row]
    runs: list[RunResult]
    tune: dict[str, list[Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)

    def runs_for(self, row: str, protocol: str) -> list[RunResult]:
        """The per-seed results of one row under one protocol."""
        return [r for r in self.runs if r.row == row and r.protocol == protocol]

    @property
    def dataset(self) -> str | None:
        return self.runs[0].dataset if self.runs else None
