"""GZSL metrics: per-class accuracy, calibrated stacking, T / S / U / H, the seen-unseen curve, AUSUC.

Everything here works on plain score matrices (numpy, no torch), so it serves the trainer, the CLI, the
compatibility layer and a notebook user alike. Conventions (docs/method.md, "Metrics and calibration"):

- Every accuracy is a *per-class mean accuracy*: the mean over classes of each class's accuracy, where a
  class counts only when it has at least one image in the evaluated set. Accuracies are fractions in
  [0, 1]; :meth:`GZSLResult.to_dict` converts to percent for reports.
- Calibrated stacking: the GZSL prediction is ``argmax_k s_k - gamma * [k seen]`` over all K classes.
  Larger ``gamma`` favours unseen classes.
- T (ZSL) classifies the test-unseen images among the unseen classes only, without calibration.
- S is measured on test-seen images over the seen classes, U on test-unseen images over the unseen
  classes, H = 2SU / (S + U) (0 when S + U = 0).
- The seen-unseen curve (Chao et al., 2016) is exact: each image's calibrated prediction is either its
  best seen class or its best unseen class and flips exactly once, at
  ``gamma* = max_seen score - max_unseen score``. Sorting these breakpoints gives every distinct
  (S, U) point from gamma = -inf (everything predicted seen, U = 0) to +inf (everything unseen, S = 0).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dedn.atomic import atomic_write_text
from dedn.errors import DataError

__all__ = [
    "GZSLResult",
    "ausuc",
    "best_calibration",
    "calibrated_predictions",
    "gzsl_metrics",
    "harmonic_mean",
    "per_class_accuracy",
    "plot_seen_unseen_curve",
    "seen_unseen_curve",
    "write_metrics",
]


# ---------------------------------------------------------------------------------------------- basics
def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[float, np.ndarray]:
    """Per-class mean accuracy over ``classes``.

    Args:
        pred: (N,) predicted class indices.
        labels: (N,) true class indices. Images whose label is not in ``classes`` are ignored.
        classes: the class indices to average over.

    Returns:
        ``(mean, per_class)``: ``per_class[j]`` is the accuracy of ``classes[j]`` (a fraction), NaN when
        that class has no image; ``mean`` averages only the classes that have images (classes without
        images neither count as 0 nor as 1). ``mean`` is NaN when no class has an image.
    """
    pred = np.asarray(pred).ravel()
    labels = np.asarray(labels).ravel()
    classes = np.asarray(classes, dtype=np.int64).ravel()
    if pred.shape != labels.shape:
        raise DataError(f"per_class_accuracy: {pred.size} predictions but {labels.size} labels")
    correct, count = _class_counts(pred == labels, labels, classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(count > 0, correct / np.maximum(count, 1), np.nan)
    has = count > 0
    mean = float(per_class[has].mean()) if has.any() else float("nan")
    return mean, per_class


def harmonic_mean(s: float, u: float) -> float:
    """H = 2SU / (S + U), defined as 0 when S + U = 0."""
    return 0.0 if s + u <= 0 else float(2.0 * s * u / (s + u))


def calibrated_predictions(scores: np.ndarray, seen_mask: np.ndarray, gamma: float) -> np.ndarray:
    """Calibrated stacking: ``argmax_k scores[:, k] - gamma * [k seen]`` (ties go to the lower index).

    ``gamma`` may be +-inf: +inf never predicts a seen class, -inf never an unseen one (each image then
    gets its best class of the remaining group).
    """
    scores = _as_scores(scores, "scores")
    seen_mask = _as_mask(seen_mask, scores.shape[1])
    if np.isinf(gamma):
        # s - inf would tie every class of one group at -inf; restrict the argmax to the other group.
        keep = ~seen_mask if gamma > 0 else seen_mask
        if not keep.any():
            return scores.argmax(axis=1)
        cols = np.flatnonzero(keep)
        return cols[scores[:, cols].argmax(axis=1)]
    # float64 so that predictions agree with the breakpoints of seen_unseen_curve to rounding level
    return (scores - np.where(seen_mask, float(gamma), 0.0)).argmax(axis=1)


# ---------------------------------------------------------------------------------------------- the record
#: The order of every table, CSV and printout: the paper's columns T, U, S, H, then AUSUC.
METRIC_ORDER = ("T", "U", "S", "H", "AUSUC")


@dataclass(frozen=True)
class Metrics:
    """The reported numbers of one model, in percent, and the calibration that produced them: an H is never
    reported without its gamma and where gamma came from, and AUSUC stands beside it.

    Attributes:
        T, U, S, H, AUSUC: percent (``nan`` where not measured).
        gamma: the calibrated-stacking value behind S, U and H (None where none was used).
        gamma_source: where gamma came from (a :class:`~dedn.eval.calibration.GammaSource` value).
    """

    T: float
    U: float
    S: float
    H: float
    AUSUC: float = math.nan
    gamma: float | None = None
    gamma_source: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Metrics:
        """From a record holding at least T, U, S, H (a ``metrics.json``, a job result); other keys are ignored."""
        def number(key: str) -> float:
            v = values.get(key)
            return math.nan if v is None else float(v)

        gamma = values.get("gamma")
        source = values.get("gamma_source")
        return cls(*(number(k) for k in METRIC_ORDER), gamma=None if gamma is None else float(gamma),
                   gamma_source=None if source is None else str(source))

    def values(self) -> tuple[float, ...]:
        """T, U, S, H, AUSUC in :data:`METRIC_ORDER`."""
        return tuple(getattr(self, k) for k in METRIC_ORDER)

    def to_dict(self) -> dict[str, Any]:
        """Plain values, metrics in :data:`METRIC_ORDER`, then gamma and its source."""
        return {**dict(zip(METRIC_ORDER, self.values(), strict=True)), "gamma": self.gamma,
                "gamma_source": self.gamma_source}


# ---------------------------------------------------------------------------------------------- T/S/U/H
@dataclass
class GZSLResult:
    """GZSL evaluation at one calibration ``gamma``. Accuracies are fractions in [0, 1].

    Attributes:
        T: ZSL per-class accuracy on test-unseen images, argmax over unseen classes only.
        S: GZSL per-class accuracy on test-seen images over the seen classes.
        U: GZSL per-class accuracy on test-unseen images over the unseen classes.
        H: harmonic mean of S and U.
        gamma: the calibration used for S, U, H.
        seen_classes / unseen_classes: the classes counted in S / in U and T (those with test images).
        acc_seen, acc_unseen, acc_zsl: per-class accuracies aligned with those class arrays.
        n_seen_images, n_unseen_images: test images of each of those classes.
        ausuc: area under the seen-unseen curve of the same scores, when computed.
    """

    T: float
    S: float
    U: float
    H: float
    gamma: float
    seen_classes: np.ndarray
    unseen_classes: np.ndarray
    acc_seen: np.ndarray
    acc_unseen: np.ndarray
    acc_zsl: np.ndarray
    n_seen_images: np.ndarray
    n_unseen_images: np.ndarray
    ausuc: float | None = None

    @property
    def per_class_seen(self) -> dict[int, float]:
        """Class index -> GZSL accuracy, seen classes (the terms of S)."""
        return dict(zip(self.seen_classes.tolist(), self.acc_seen.tolist(), strict=True))

    @property
    def per_class_unseen(self) -> dict[int, float]:
        """Class index -> GZSL accuracy, unseen classes (the terms of U)."""
        return dict(zip(self.unseen_classes.tolist(), self.acc_unseen.tolist(), strict=True))

    @property
    def per_class_zsl(self) -> dict[int, float]:
        """Class index -> ZSL accuracy, unseen classes (the terms of T)."""
        return dict(zip(self.unseen_classes.tolist(), self.acc_zsl.tolist(), strict=True))

    def to_dict(self, percent: bool = True) -> dict[str, Any]:
        """Summary numbers as plain floats (percent when ``percent``); gamma is never scaled."""
        f = 100.0 if percent else 1.0
        out: dict[str, Any] = {
            "T": self.T * f,
            "S": self.S * f,
            "U": self.U * f,
            "H": self.H * f,
            "gamma": float(self.gamma),
            "units": "percent" if percent else "fraction",
            "n_seen_classes": int(self.seen_classes.size),
            "n_unseen_classes": int(self.unseen_classes.size),
            "n_test_seen": int(self.n_seen_images.sum()),
            "n_test_unseen": int(self.n_unseen_images.sum()),
        }
        if self.ausuc is not None:
            out["AUSUC"] = float(self.ausuc) * f
        return out


def gzsl_metrics(
    scores_seen: np.ndarray,
    labels_seen: np.ndarray,
    scores_unseen: np.ndarray,
    labels_unseen: np.ndarray,
    seen_mask: np.ndarray,
    gamma: float,
) -> GZSLResult:
    """T, S, U, H of class scores at calibration ``gamma``.

    Args:
        scores_seen: (N_s, K) class scores of the test-seen images.
        labels_seen: (N_s,) their classes, all seen.
        scores_unseen: (N_u, K) class scores of the test-unseen images.
        labels_unseen: (N_u,) their classes, all unseen.
        seen_mask: (K,) bool, True for seen classes.
        gamma: calibrated-stacking margin subtracted from seen-class scores.

    Raises:
        DataError: shapes disagree, a set is empty, scores are not finite, or a label lies in the wrong
            group of classes.
    """
    ev = _Eval.build(scores_seen, labels_seen, scores_unseen, labels_unseen, seen_mask)
    s, acc_s = per_class_accuracy(calibrated_predictions(ev.scores_seen, ev.seen_mask, gamma),
                                  ev.labels_seen, ev.seen_classes)
    u, acc_u = per_class_accuracy(calibrated_predictions(ev.scores_unseen, ev.seen_mask, gamma),
                                  ev.labels_unseen, ev.unseen_classes)
    unseen_cols = np.flatnonzero(~ev.seen_mask)
    zsl_pred = unseen_cols[ev.scores_unseen[:, unseen_cols].argmax(axis=1)]
    t, acc_t = per_class_accuracy(zsl_pred, ev.labels_unseen, ev.unseen_classes)
    return GZSLResult(
        T=t, S=s, U=u, H=harmonic_mean(s, u), gamma=float(gamma),
        seen_classes=ev.seen_classes, unseen_classes=ev.unseen_classes,
        acc_seen=acc_s, acc_unseen=acc_u, acc_zsl=acc_t,
        n_seen_images=ev.n_seen_images, n_unseen_images=ev.n_unseen_images,
    )


# ---------------------------------------------------------------------------------------------- curve
def seen_unseen_curve(
    scores_seen: np.ndarray,
    labels_seen: np.ndarray,
    scores_unseen: np.ndarray,
    labels_unseen: np.ndarray,
    seen_mask: np.ndarray,
    n_points: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The exact seen-unseen accuracy curve traced by sweeping the calibration gamma.

    Every image flips from its best seen class to its best unseen class at
    ``gamma* = max_seen - max_unseen``. With the P - 1 distinct breakpoints sorted, the curve has P points:
    point 0 is gamma = -inf (all images predicted seen, U = 0), point j holds for every gamma strictly
    between the j-th and (j+1)-th distinct breakpoint, and the last point is gamma = +inf (S = 0).
    O(N log N): per-class correct counts are updated incrementally.

    Returns:
        ``(gammas, S, U)``, float64 arrays of P points with S non-increasing and U non-decreasing.
        ``gammas[j]`` is a finite calibration that gives exactly point j with
        :func:`calibrated_predictions` (the midpoint of its interval; one unit, or the spread of the
        breakpoints if larger, beyond the first/last breakpoint at the ends).
        With ``n_points``, the curve is subsampled to at most that many points, both ends kept
        (for plotting; AUSUC of a subsampled curve is approximate).
    """
    ev = _Eval.build(scores_seen, labels_seen, scores_unseen, labels_unseen, seen_mask)
    bp, s, u = _exact_curve(ev)
    gammas = _representative_gammas(bp)
    if n_points is not None and n_points < s.size:
        if n_points < 2:
            raise DataError(f"seen_unseen_curve: n_points must be at least 2, got {n_points}")
        keep = np.unique(np.round(np.linspace(0, s.size - 1, n_points)).astype(np.int64))
        gammas, s, u = gammas[keep], s[keep], u[keep]
    return gammas, s, u


def ausuc(S: np.ndarray, U: np.ndarray) -> float:
    """Area under the seen-unseen curve (Chao et al., 2016): x = U, y = S, trapezoid rule.

    Points are sorted by U (then by S descending, which only orders vertical segments). Pass the full
    curve including both extremes, (U=0, S=S_max) and (U=U_max, S=0), as :func:`seen_unseen_curve`
    returns it; no points are added. Accuracies as fractions give an area in [0, 1].
    """
    s = np.asarray(S, dtype=np.float64).ravel()
    u = np.asarray(U, dtype=np.float64).ravel()
    if s.shape != u.shape:
        raise DataError(f"ausuc: {s.size} S values but {u.size} U values")
    if s.size < 2:
        return 0.0
    order = np.lexsort((-s, u))
    s, u = s[order], u[order]
    return float(np.sum(np.diff(u) * (s[1:] + s[:-1]) / 2.0))


def best_calibration(
    scores_seen: np.ndarray,
    labels_seen: np.ndarray,
    scores_unseen: np.ndarray,
    labels_unseen: np.ndarray,
    seen_mask: np.ndarray,
) -> tuple[float, GZSLResult]:
    """The calibration gamma that maximises H on the given (validation) scores, searched exactly.

    Every distinct (S, U) point of the exact curve is a candidate, represented by the midpoint of its
    gamma interval; among equal maxima the smallest gamma wins. The returned result is recomputed at
    that gamma with :func:`gzsl_metrics` and carries the AUSUC of the same scores.
    """
    ev = _Eval.build(scores_seen, labels_seen, scores_unseen, labels_unseen, seen_mask)
    bp, s, u = _exact_curve(ev)
    gammas = _representative_gammas(bp)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where(s + u > 0, 2.0 * s * u / (s + u), 0.0)
    gamma = float(gammas[int(np.argmax(h))])
    result = gzsl_metrics(ev.scores_seen, ev.labels_seen, ev.scores_unseen, ev.labels_unseen,
                          ev.seen_mask, gamma)
    result.ausuc = ausuc(s, u)
    return gamma, result


# ---------------------------------------------------------------------------------------------- output
def write_metrics(
    result: GZSLResult,
    path_json: str | Path,
    path_csv_per_class: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    ausuc: float | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the summary (JSON, percent) and optionally the per-class table (CSV).

    JSON: T, S, U, H in percent, gamma, AUSUC in percent (``ausuc`` argument, else ``result.ausuc``,
    omitted when neither is set), class and image counts, plus ``extra`` entries.
    CSV columns: ``class_index, class_name, split`` (seen / unseen), ``n_images``, ``accuracy`` (GZSL at
    ``gamma``, percent) and ``zsl_accuracy`` (unseen classes only, percent). Parent folders are created.
    """
    summary = result.to_dict(percent=True)
    area = ausuc if ausuc is not None else result.ausuc
    if area is not None:
        summary["AUSUC"] = float(area) * 100.0
    if extra:
        summary.update(extra)
    path_json = Path(path_json)
    path_json.parent.mkdir(parents=True, exist_ok=True)
    if path_csv_per_class is not None:  # the CSV first: metrics.json, written last, marks a complete record
        _write_per_class(result, Path(path_csv_per_class), class_names)
    atomic_write_text(path_json, json.dumps(summary, indent=2, default=_json_default) + "\n")


def _write_per_class(result: GZSLResult, path_csv: Path, class_names: Sequence[str] | None) -> None:
    n_known = int(max(result.seen_classes.max(initial=-1), result.unseen_classes.max(initial=-1))) + 1
    if class_names is not None and len(class_names) < n_known:
        raise DataError(f"write_metrics: {len(class_names)} class names but class index {n_known - 1} "
                        "occurs in the result")
    rows: list[tuple[int, str, int, float, float | None]] = []
    for k, n, a in zip(result.seen_classes, result.n_seen_images, result.acc_seen, strict=True):
        rows.append((int(k), "seen", int(n), float(a), None))
    for k, n, a, z in zip(result.unseen_classes, result.n_unseen_images, result.acc_unseen, result.acc_zsl,
                          strict=True):
        rows.append((int(k), "unseen", int(n), float(a), float(z)))
    rows.sort(key=lambda r: r[0])
    path_csv.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    writer = csv.writer(buf)
    writer.writerow(["class_index", "class_name", "split", "n_images", "accuracy", "zsl_accuracy"])
    for k, split, n, acc, zsl in rows:
        name = class_names[k] if class_names is not None else str(k)
        zsl_text = "" if zsl is None else f"{zsl * 100:.4f}"
        writer.writerow([k, name, split, n, f"{acc * 100:.4f}", zsl_text])
    atomic_write_text(path_csv, buf.getvalue())


def plot_seen_unseen_curve(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str | None = None,
    *, points: Mapping[str, tuple[float, ...]] | None = None, protocol: str | None = None,
) -> None:
    """Save a PNG of seen-unseen curves: U (x) against S (y) in percent, AUSUC in each legend entry.

    Args:
        curves: label -> ``(S, U)`` arrays of fractions (as from :func:`seen_unseen_curve`).
        path: output PNG; parent folders are created.
        title: the figure title; ``protocol`` (e.g. "validated") is named after it when given.
        points: label -> the operating point used, ``(S, U)`` or ``(S, U, gamma)`` as fractions: drawn as a
            large marker with a black edge on top of that label's curve, in its colour, with S, U and H
            (and gamma) in the legend.
    """
    # Figure without pyplot: no global backend switch, no figure registry, safe in headless processes.
    import matplotlib
    from matplotlib.figure import Figure

    # A column of a two-column paper wide (3.3 in), drawn at that size with 9 pt text; the legend below the axes.
    with matplotlib.rc_context({"font.size": 9.0, "legend.fontsize": 9.0, "axes.titlesize": 9.0}):
        points = dict(points or {})
        fig = Figure(figsize=(3.3, 3.9 + 0.19 * (len(curves) + len(points))), dpi=150, layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        for label, (s, u) in curves.items():
            s = np.asarray(s, dtype=np.float64)
            u = np.asarray(u, dtype=np.float64)
            order = np.lexsort((-s, u))
            (line,) = ax.plot(u[order] * 100, s[order] * 100, label=f"{label} (AUSUC {ausuc(s, u) * 100:.1f})",
                              zorder=2)
            if label in points:
                ps, pu, *g = points[label]
                h = harmonic_mean(ps, pu)
                text = f"{label} at {'γ ' + format(g[0], '.3g') + ': ' if g else ''}" \
                       f"S {ps * 100:.1f}, U {pu * 100:.1f}, H {h * 100:.1f}"
                ax.plot([pu * 100], [ps * 100], "o", markersize=7, color=line.get_color(), markeredgecolor="black",
                        markeredgewidth=1.0, zorder=5, label=text)
        ax.set_xlabel("U: unseen accuracy (%)")
        ax.set_ylabel("S: seen accuracy (%)")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 100)
        ax.set_aspect("equal")
        ax.grid(True, alpha=0.3)
        full_title = "\n".join(t for t in (title, f"{protocol} protocol" if protocol else None) if t)
        if points:
            full_title += ("\n" if full_title else "") + "dots: the operating point used (its γ)"
        if full_title:
            ax.set_title(full_title)
        if curves:
            fig.legend(loc="outside lower center", ncol=1, frameon=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")


def _class_counts(correct: np.ndarray, labels: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, ...]:
    """(correct, count) per entry of ``classes``; labels outside ``classes`` are ignored."""
    if classes.size == 0:
        return np.zeros(0), np.zeros(0)
    order = np.argsort(classes, kind="stable")
    sorted_classes = classes[order]
    pos = np.searchsorted(sorted_classes, labels)
    pos_clipped = np.minimum(pos, classes.size - 1)
    hit = sorted_classes[pos_clipped] == labels
    slot = order[pos_clipped[hit]]
    count = np.bincount(slot, minlength=classes.size).astype(np.float64)
    right = np.bincount(slot, weights=correct[hit].astype(np.float64), minlength=classes.size)
    return right, count


def _as_scores(scores: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2:
        raise DataError(f"{name} must be an (N, K) score matrix, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataError(f"{name} contains NaN or infinite scores")
    return arr


def _as_mask(seen_mask: np.ndarray, k: int) -> np.ndarray:
    mask = np.asarray(seen_mask)
    if mask.shape != (k,):
        raise DataError(f"seen_mask must have shape ({k},) to match the scores, got {mask.shape}")
    return mask.astype(bool)


@dataclass
class _Eval:
    """Checked inputs of one GZSL evaluation and the classes that count."""

    scores_seen: np.ndarray
    labels_seen: np.ndarray
    scores_unseen: np.ndarray
    labels_unseen: np.ndarray
    seen_mask: np.ndarray
    seen_classes: np.ndarray
    unseen_classes: np.ndarray
    n_seen_images: np.ndarray
    n_unseen_images: np.ndarray

    @classmethod
    def build(cls, scores_seen: np.ndarray, labels_seen: np.ndarray, scores_unseen: np.ndarray,
              labels_unseen: np.ndarray, seen_mask: np.ndarray) -> _Eval:
        ss = _as_scores(scores_seen, "scores_seen")
        su = _as_scores(scores_unseen, "scores_unseen")
        if ss.shape[1] != su.shape[1]:
            raise DataError(f"scores_seen has {ss.shape[1]} classes but scores_unseen has {su.shape[1]}")
        k = ss.shape[1]
        mask = _as_mask(seen_mask, k)
        if mask.all() or not mask.any():
            raise DataError("seen_mask must mark at least one seen and one unseen class")
        ls = np.asarray(labels_seen, dtype=np.int64).ravel()
        lu = np.asarray(labels_unseen, dtype=np.int64).ravel()
        for name, sc, lab in (("seen", ss, ls), ("unseen", su, lu)):
            if sc.shape[0] != lab.size:
                raise DataError(f"scores_{name} has {sc.shape[0]} rows but labels_{name} has {lab.size}")
            if lab.size == 0:
                raise DataError(f"no test-{name} images to evaluate")
            if lab.min() < 0 or lab.max() >= k:
                raise DataError(f"labels_{name} must lie in 0..{k - 1}")
        if not mask[ls].all():
            raise DataError(f"labels_seen holds unseen classes {np.unique(ls[~mask[ls]])[:5].tolist()}")
        if mask[lu].any():
            raise DataError(f"labels_unseen holds seen classes {np.unique(lu[mask[lu]])[:5].tolist()}")
        seen_classes, n_s = np.unique(ls, return_counts=True)
        unseen_classes, n_u = np.unique(lu, return_counts=True)
        return cls(ss, ls, su, lu, mask, seen_classes, unseen_classes, n_s, n_u)


def _exact_curve(ev: _Eval) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct sorted breakpoints (P-1,) and the P exact (S, U) points between them."""
    seen_cols = np.flatnonzero(ev.seen_mask)
    unseen_cols = np.flatnonzero(~ev.seen_mask)
    scores = np.concatenate([ev.scores_seen, ev.scores_unseen])
    labels = np.concatenate([ev.labels_seen, ev.labels_unseen])
    is_seen_img = np.arange(labels.size) < ev.labels_seen.size
    best_seen = seen_cols[scores[:, seen_cols].argmax(axis=1)]
    best_unseen = unseen_cols[scores[:, unseen_cols].argmax(axis=1)]
    rows = np.arange(labels.size)
    flip = scores[rows, best_seen] - scores[rows, best_unseen]  # prediction is unseen iff gamma > flip

    # Per-class weights 1 / (n_c * n_classes) turn correct-count changes into mean-accuracy changes.
    n_classes_s, n_classes_u = ev.seen_classes.size, ev.unseen_classes.size
    w_seen = 1.0 / (ev.n_seen_images * n_classes_s)
    w_unseen = 1.0 / (ev.n_unseen_images * n_classes_u)
    img_w_seen = w_seen[np.searchsorted(ev.seen_classes, ev.labels_seen)]
    img_w_unseen = w_unseen[np.searchsorted(ev.unseen_classes, ev.labels_unseen)]

    # gamma = -inf: every image gets its best seen class.
    correct_seen0 = best_seen[is_seen_img] == ev.labels_seen
    s0 = float(np.sum(img_w_seen * correct_seen0))
    # Flipping a test-seen image loses it if it was right; flipping a test-unseen image gains it if its
    # best unseen class is right.
    d_s = np.zeros(labels.size)
    d_u = np.zeros(labels.size)
    d_s[is_seen_img] = -img_w_seen * correct_seen0
    d_u[~is_seen_img] = img_w_unseen * (best_unseen[~is_seen_img] == ev.labels_unseen)

    order = np.argsort(flip, kind="stable")
    flip_sorted = flip[order]
    cum_s = s0 + np.cumsum(d_s[order])
    cum_u = np.cumsum(d_u[order])
    # One point per distinct breakpoint: the state after all images with that breakpoint have flipped.
    last_of_group = np.r_[flip_sorted[1:] != flip_sorted[:-1], True]
    bp = flip_sorted[last_of_group]
    s = np.concatenate([[s0], cum_s[last_of_group]])
    u = np.concatenate([[0.0], cum_u[last_of_group]])
    # The last point is exact by construction (S = 0); clean cumulative rounding at both ends.
    s[-1] = 0.0
    np.clip(s, 0.0, 1.0, out=s)
    np.clip(u, 0.0, 1.0, out=u)
    return bp, s, u


def _representative_gammas(bp: np.ndarray) -> np.ndarray:
    """One finite gamma inside each interval cut by the sorted distinct breakpoints ``bp``."""
    if bp.size == 0:
        return np.array([0.0])
    margin = max(1.0, float(bp[-1] - bp[0]))
    mids = (bp[1:] + bp[:-1]) / 2.0
    return np.concatenate([[bp[0] - margin], mids, [bp[-1] + margin]])


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")
