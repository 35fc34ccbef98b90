"""A closed-form baseline on globally pooled features: ESZSL (Romera-Paredes and Torr, ICML 2015).

It maps the average-pooled feature vector of an image linearly to class-attribute space,
V = (X X^T + g I)^-1 X Y S^T (S S^T + l I)^-1, and scores class k by x^T V a_k. It sees no regions,
no channels and no attribute clusters, which is what makes it a useful yardstick for what DEDN's
parts buy. Its two regularisers and the calibration are chosen on the validation task only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dedn.data.dataset import ZSLData
from dedn.data.semantics import normalize_rows
from dedn.data.sources import FeatureSource
from dedn.eval.metrics import GZSLResult, best_calibration, gzsl_metrics


def pooled_features(features: FeatureSource, index: np.ndarray, batch: int = 512) -> np.ndarray:
    """(n, C) global-average-pooled, L2-normalised feature vectors of ``features[index]``."""
    out = []
    index = np.asarray(index)
    for s in range(0, index.size, batch):
        chunk = features.read(index[s : s + batch]).cpu().numpy()
        out.append(chunk.reshape(chunk.shape[0], chunk.shape[1], -1).mean(-1))
    x = np.concatenate(out)
    return normalize_rows(x)


@dataclass
class ESZSL:
    """Embarrassingly simple zero-shot learning, closed form. ``gamma``/``lamb``: the two regularisers."""

    gamma: float = 1.0
    lamb: float = 1.0
    weights: np.ndarray | None = None

    def fit(self, x: np.ndarray, labels: np.ndarray, att: np.ndarray) -> ESZSL:
        """x: (n, C) features; labels: (n,) class indices into ``att`` (K, D)."""
        classes = np.unique(labels)
        s = att[classes].T.astype(np.float64)  # (D, z)
        y = -np.ones((labels.size, classes.size))
        y[np.arange(labels.size), np.searchsorted(classes, labels)] = 1.0
        xt = x.T.astype(np.float64)  # (C, n)
        left = np.linalg.solve(xt @ xt.T + self.gamma * np.eye(xt.shape[0]), xt @ y @ s.T)
        self.weights = np.linalg.solve((s @ s.T + self.lamb * np.eye(s.shape[0])).T, left.T).T
        return self

    def scores(self, x: np.ndarray, att: np.ndarray) -> np.ndarray:
        """(n, K) class scores."""
        assert self.weights is not None, "fit first"
        return x.astype(np.float64) @ self.weights @ att.T.astype(np.float64)


def eszsl_validated(data: ZSLData, grid: tuple[float, ...] = (1e-2, 1e-1, 1.0, 10.0, 100.0),
                    seen_fraction: float = 0.2, seed: int = 0) -> tuple[GZSLResult, dict[str, float]]:
    """ESZSL with both regularisers and the calibration chosen on the validation task, tested once.

    Returns the test result and the chosen settings.
    """
    val = data.validation_split(seen_fraction, seed)
    x_tr = pooled_features(val.features, val.trainval_loc)
    x_vs = pooled_features(val.features, val.test_seen_loc)
    x_vu = pooled_features(val.features, val.test_unseen_loc)
    best: tuple[float, float, float, float] | None = None
    for g in grid:
        for lam in grid:
            model = ESZSL(g, lam).fit(x_tr, val.labels[val.trainval_loc], val.att)
            cal, res = best_calibration(model.scores(x_vs, val.att), val.labels[val.test_seen_loc],
                                        model.scores(x_vu, val.att), val.labels[val.test_unseen_loc],
                                        val.seen_mask)
            if best is None or res.H > best[0]:
                best = (res.H, g, lam, cal)
    assert best is not None
    _, g, lam, cal = best
    model = ESZSL(g, lam).fit(pooled_features(data.features, data.trainval_loc),
                              data.labels[data.trainval_loc], data.att)
    result = gzsl_metrics(
        model.scores(pooled_features(data.features, data.test_seen_loc), data.att), data.labels[data.test_seen_loc],
        model.scores(pooled_features(data.features, data.test_unseen_loc), data.att),
        data.labels[data.test_unseen_loc], data.seen_mask, cal)
    return result, {"gamma_reg": g, "lambda_reg": lam, "calibration": cal, "validation_H": best[0] * 100}
