"""Evaluating a model or its saved outputs: T, S, U, H and AUSUC at a calibration that names its source,
and the files of an evaluation."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dedn.atomic import atomic_write_text
from dedn.config import RunConfig
from dedn.data.dataset import ZSLData
from dedn.eval.calibration import Calibration, GammaSource, config_calibration, default_gamma
from dedn.eval.inference import ModelOutputs, collect_outputs
from dedn.eval.metrics import GZSLResult, best_calibration, gzsl_metrics, seen_unseen_curve, write_metrics
from dedn.runfolder import RunFolder


@dataclass
class Evaluation:
    """Model outputs on the evaluation split, the metrics at the calibration used, and where it came from.

    ``best`` / ``best_gamma`` are the H-maximising calibration on these very scores: the validated choice
    on a validation task, an oracle (labelled so) on the test split.
    """

    seen: ModelOutputs
    unseen: ModelOutputs
    seen_mask: np.ndarray
    result: GZSLResult
    gamma: float
    best_gamma: float
    best: GZSLResult
    gamma_source: GammaSource = GammaSource.MODE_DEFAULT

    def summary(self) -> dict[str, Any]:
        r = self.result.to_dict(percent=True)
        out: dict[str, Any] = {"T": r["T"], "S": r["S"], "U": r["U"], "H": r["H"], "gamma": self.gamma,
                               "gamma_source": self.gamma_source,
                               "AUSUC": self.best.ausuc * 100 if self.best.ausuc is not None else float("nan")}
        if self.gamma_source != GammaSource.VALIDATED:  # the best gamma on these scores is an oracle, not a result
            out.update({"oracle_H": self.best.H * 100, "oracle_gamma": self.best_gamma})
        return out


def evaluate_model(
    model: nn.Module,
    data: ZSLData,
    gamma: float | str | Calibration = 0.0,
    batch_size: int = 200,
    device: torch.device | str = "cpu",
    progress: bool = False,
    l_rc: float | None = None,
    l_e: float | None = None,
    precision: str = "fp32",
    stored_dtype: bool = False,
) -> Evaluation:
    """T, S, U, H of ``model`` on ``data``'s test split (which is the validation split of a validation task).

    ``gamma``: a :class:`~dedn.eval.calibration.Calibration`, a number (source ``config``), or ``"best"`` for the
    H-maximising value on these very scores (source ``validated`` on a validation task, else
    ``oracle-on-test``). ``precision``: of the feature products, ``fp32`` or ``bf16`` (a run's
    ``train.precision``). ``stored_dtype``: read ``data.features`` as they are kept where the source hands that
    out (a store, a copy resident on the GPU: :meth:`~dedn.data.sources.FeatureSource.read`), else in float32.
    """
    if not isinstance(gamma, Calibration):
        on_val = data.provenance.get("split") == "validation"
        source = (GammaSource.VALIDATED if on_val else GammaSource.ORACLE) if gamma == "best" else GammaSource.CONFIG
        gamma = Calibration(gamma, source)
    seen = collect_outputs(model, data.features, data.test_seen_loc, data.labels, batch_size, device,
                           progress, "test seen", precision, stored_dtype)
    unseen = collect_outputs(model, data.features, data.test_unseen_loc, data.labels, batch_size, device,
                             progress, "test unseen", precision, stored_dtype)
    return evaluate_outputs(seen, unseen, data.seen_mask, gamma, model.config.l_rc if l_rc is None else l_rc,
                            model.config.l_e if l_e is None else l_e)


def evaluate_outputs(seen: ModelOutputs, unseen: ModelOutputs, seen_mask: np.ndarray,
                     gamma: float | str | Calibration, l_rc: float, l_e: float) -> Evaluation:
    """Metrics from saved outputs at any l_rc, l_e and calibration (no model needed).

    A bare number counts as source ``config``, a bare ``"best"`` as ``oracle-on-test``: pass a
    :class:`~dedn.eval.calibration.Calibration` to say otherwise.
    """
    if not isinstance(gamma, Calibration):
        gamma = Calibration(gamma, GammaSource.ORACLE if gamma == "best" else GammaSource.CONFIG)
    s_scores, u_scores = seen.scores(l_rc, l_e), unseen.scores(l_rc, l_e)
    assert seen.labels is not None and unseen.labels is not None
    best_gamma, best = best_calibration(s_scores, seen.labels, u_scores, unseen.labels, seen_mask)
    if gamma.value == "best":
        g, result = best_gamma, best
    else:
        g = float(gamma.value)
        result = gzsl_metrics(s_scores, seen.labels, u_scores, unseen.labels, seen_mask, g)
        result.ausuc = best.ausuc
    return Evaluation(seen, unseen, seen_mask, result, g, best_gamma, best, gamma.source)


def write_evaluation(ev: Evaluation, folder: Path, class_names: list[str], extra: dict[str, Any],
                     prefix: str = "", plots: bool = True, label: str = "model") -> dict[str, Any]:
    """The evaluation record (metrics, per-class table, seen-unseen curve and plot, the saved outputs; the names
    are :class:`~dedn.runfolder.RunFolder`'s), into ``folder``; ``metrics.json`` is written last."""
    from dedn.eval.metrics import plot_seen_unseen_curve

    folder.mkdir(parents=True, exist_ok=True)
    l_rc, l_e = extra.get("l_rc", 0.8), extra.get("l_e", 0.9)
    gammas, s, u = seen_unseen_curve(ev.seen.scores(l_rc, l_e), ev.seen.labels, ev.unseen.scores(l_rc, l_e),
                                     ev.unseen.labels, ev.seen_mask)
    buf = io.StringIO()
    np.savetxt(buf, np.column_stack([gammas, s * 100, u * 100]), delimiter=",", header="gamma,S,U", comments="",
               fmt="%.6g")
    atomic_write_text(folder / f"{prefix}{RunFolder.CURVE_CSV}", buf.getvalue())
    if plots:
        r = ev.result
        plot_seen_unseen_curve({label: (s, u)}, folder / f"{prefix}{RunFolder.CURVE_PNG}",
                               title=f"test split, gamma from {ev.gamma_source}",
                               points={label: (r.S, r.U, ev.gamma)})
    ev.seen.save(folder / f"{prefix}{RunFolder.OUTPUTS_SEEN}")
    ev.unseen.save(folder / f"{prefix}{RunFolder.OUTPUTS_UNSEEN}")
    # metrics.json last: its presence marks a complete evaluation record.
    write_metrics(ev.result, folder / f"{prefix}{RunFolder.METRICS}", folder / f"{prefix}{RunFolder.PER_CLASS}",
                  class_names, extra=extra)
    return json.loads((folder / f"{prefix}{RunFolder.METRICS}").read_text())


def calibration_value(cfg: RunConfig, data: ZSLData) -> Calibration:
    """The calibration ``eval.calibration`` asks for on ``data`` (:func:`~dedn.eval.calibration.config_calibration`)."""
    return config_calibration(cfg.eval.gamma, default_gamma(cfg, data.name),
                              data.provenance.get("split") == "validation")
