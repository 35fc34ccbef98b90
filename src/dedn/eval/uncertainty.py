"""How much a test figure would move with another draw of test images: a bootstrap interval.

The built-in benchmark's test split holds a few hundred images, so one run's S and U move by points with the
images alone. :func:`bootstrap_interval` resamples the test images with replacement within each class (so
every class keeps its image count and the per-class mean stays defined) and reports the percentile interval
of T, U, S and H at a fixed calibration. It measures the test set's sampling noise, not the seed's.
"""

from __future__ import annotations

import numpy as np

from dedn.eval.metrics import calibrated_predictions, harmonic_mean


def _per_class_mean(correct: np.ndarray, groups: list[np.ndarray], picks: list[np.ndarray]) -> float:
    return float(np.mean([correct[g[p]].mean() for g, p in zip(groups, picks, strict=True)]))


def bootstrap_interval(scores_seen: np.ndarray, labels_seen: np.ndarray, scores_unseen: np.ndarray,
                       labels_unseen: np.ndarray, seen_mask: np.ndarray, gamma: float, n: int = 500,
                       level: float = 0.95, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile interval (percent) of T, U, S and H over ``n`` class-stratified resamples of the test images.

    Predictions are made once; each resample only redraws which images count, so 500 resamples take well
    under a second on the built-in benchmark.
    """
    rng = np.random.default_rng(seed)
    mask = np.asarray(seen_mask, dtype=bool)
    pred_s = calibrated_predictions(scores_seen, mask, gamma)
    pred_u = calibrated_predictions(scores_unseen, mask, gamma)
    unseen_cols = np.flatnonzero(~mask)
    pred_t = unseen_cols[np.asarray(scores_unseen)[:, unseen_cols].argmax(axis=1)]
    ok_s, ok_u, ok_t = pred_s == labels_seen, pred_u == labels_unseen, pred_t == labels_unseen
    groups_s = [np.flatnonzero(labels_seen == c) for c in np.unique(labels_seen)]
    groups_u = [np.flatnonzero(labels_unseen == c) for c in np.unique(labels_unseen)]
    draws: dict[str, list[float]] = {"T": [], "U": [], "S": [], "H": []}
    for _ in range(n):
        ps = [rng.integers(0, g.size, g.size) for g in groups_s]
        pu = [rng.integers(0, g.size, g.size) for g in groups_u]
        s, u = _per_class_mean(ok_s, groups_s, ps), _per_class_mean(ok_u, groups_u, pu)
        draws["S"].append(s)
        draws["U"].append(u)
        draws["T"].append(_per_class_mean(ok_t, groups_u, pu))
        draws["H"].append(harmonic_mean(s, u))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return {k: (float(np.percentile(v, lo)) * 100, float(np.percentile(v, hi)) * 100) for k, v in draws.items()}
