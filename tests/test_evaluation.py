"""Metrics on hand-made cases with hand-computed values, and the exact curve against brute force."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dedn.errors import DataError
from dedn.eval.metrics import (
    ausuc,
    best_calibration,
    calibrated_predictions,
    gzsl_metrics,
    harmonic_mean,
    per_class_accuracy,
    plot_seen_unseen_curve,
    seen_unseen_curve,
    write_metrics,
)

# A 4-class toy problem: classes 0, 1 seen; 2, 3 unseen.
SEEN_MASK = np.array([True, True, False, False])
SCORES_SEEN = np.array([
    [2.0, 0.0, 1.5, 0.0],  # label 0, flips to unseen class 2 at gamma 0.5
    [0.0, 1.0, 0.2, 0.0],  # label 1, flips at 0.8
    [0.0, 0.5, 0.9, 0.0],  # label 1, flips at -0.4
])
LABELS_SEEN = np.array([0, 1, 1])
SCORES_UNSEEN = np.array([
    [1.0, 0.0, 0.8, 0.1],  # label 2, flips (to the right class 2) at 0.2
    [0.0, 0.0, 0.6, 0.5],  # label 3, flips (to the wrong class 2) at -0.6
    [0.3, 0.0, 0.1, 0.2],  # label 3, flips (to the right class 3) at 0.1
])
LABELS_UNSEEN = np.array([2, 3, 3])
TOY = (SCORES_SEEN, LABELS_SEEN, SCORES_UNSEEN, LABELS_UNSEEN, SEEN_MASK)


def test_per_class_mean_differs_from_overall_accuracy_on_imbalanced_classes():
    labels = np.array([0, 0, 0, 0, 1])
    pred = np.array([0, 0, 0, 0, 0])
    mean, per_class = per_class_accuracy(pred, labels, np.array([0, 1]))
    assert np.mean(pred == labels) == pytest.approx(0.8)
    assert mean == pytest.approx(0.5)
    np.testing.assert_allclose(per_class, [1.0, 0.0])


def test_per_class_accuracy_skips_classes_without_images_and_foreign_labels():
    labels = np.array([0, 0, 1, 5])
    pred = np.array([0, 1, 1, 5])
    mean, per_class = per_class_accuracy(pred, labels, np.array([2, 0, 1]))
    assert np.isnan(per_class[0])
    np.testing.assert_allclose(per_class[1:], [0.5, 1.0])
    assert mean == pytest.approx(0.75)  # class 2 (no images) and label 5 (not listed) do not count
    mean_none, _ = per_class_accuracy(pred, labels, np.array([7]))
    assert np.isnan(mean_none)


def test_calibration_shifts_predictions_towards_unseen():
    scores = np.array([[1.0, 0.8], [0.2, 0.9]])
    mask = np.array([True, False])
    np.testing.assert_array_equal(calibrated_predictions(scores, mask, 0.0), [0, 1])
    np.testing.assert_array_equal(calibrated_predictions(scores, mask, 0.3), [1, 1])
    np.testing.assert_array_equal(calibrated_predictions(scores, mask, -1.0), [0, 0])
    np.testing.assert_array_equal(calibrated_predictions(scores, mask, np.inf), [1, 1])
    np.testing.assert_array_equal(calibrated_predictions(scores, mask, -np.inf), [0, 0])


def test_harmonic_mean():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    assert harmonic_mean(0.7, 0.7) == pytest.approx(0.7)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.9) == 0.0


def test_gzsl_metrics_hand_computed():
    r0 = gzsl_metrics(*TOY, gamma=0.0)
    # S: class 0 right (1/1), class 1 one of two -> 0.75 (overall accuracy would be 2/3).
    assert r0.S == pytest.approx(0.75)
    assert r0.U == pytest.approx(0.0)  # every unseen image goes to a seen class or a wrong unseen one
    assert r0.H == 0.0
    # T restricted to unseen classes: image 0 (global argmax seen class 0) is right among {2, 3}.
    assert r0.T == pytest.approx(0.75)
    assert r0.per_class_zsl == {2: 1.0, 3: 0.5}

    r = gzsl_metrics(*TOY, gamma=0.4)
    assert (r.S, r.U) == (pytest.approx(0.75), pytest.approx(0.75))
    assert r.H == pytest.approx(0.75)
    assert r.T == pytest.approx(0.75)  # T does not depend on gamma
    assert r.per_class_seen == {0: 1.0, 1: 0.5}
    assert r.per_class_unseen == {2: 1.0, 3: 0.5}
    np.testing.assert_array_equal(r.n_seen_images, [1, 2])
    d = r.to_dict(percent=True)
    assert d["H"] == pytest.approx(75.0) and d["gamma"] == pytest.approx(0.4)
    assert r.to_dict(percent=False)["S"] == pytest.approx(0.75)


def test_gzsl_metrics_rejects_bad_input():
    with pytest.raises(DataError, match="unseen classes"):
        gzsl_metrics(SCORES_SEEN, np.array([0, 1, 2]), SCORES_UNSEEN, LABELS_UNSEEN, SEEN_MASK, 0.0)
    with pytest.raises(DataError, match="seen classes"):
        gzsl_metrics(SCORES_SEEN, LABELS_SEEN, SCORES_UNSEEN, np.array([2, 3, 0]), SEEN_MASK, 0.0)
    bad = SCORES_SEEN.copy()
    bad[0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        gzsl_metrics(bad, LABELS_SEEN, SCORES_UNSEEN, LABELS_UNSEEN, SEEN_MASK, 0.0)
    with pytest.raises(DataError, match="seen_mask"):
        gzsl_metrics(SCORES_SEEN, LABELS_SEEN, SCORES_UNSEEN, LABELS_UNSEEN, SEEN_MASK[:3], 0.0)


def test_exact_curve_of_the_toy_problem():
    gammas, s, u = seen_unseen_curve(*TOY)
    # Breakpoints sorted: -0.6 (unseen, wrong), -0.4 (seen loses), 0.1 (+class 3), 0.2 (+class 2),
    # 0.5 (class 0 lost), 0.8 (class 1 lost).
    np.testing.assert_allclose(s, [1.0, 1.0, 0.75, 0.75, 0.75, 0.25, 0.0])
    np.testing.assert_allclose(u, [0.0, 0.0, 0.0, 0.25, 0.75, 0.75, 0.75])
    np.testing.assert_allclose(gammas[1:-1], [-0.5, -0.15, 0.15, 0.35, 0.65])
    assert gammas[0] < -0.6 and gammas[-1] > 0.8
    assert ausuc(s, u) == pytest.approx(0.25 * 0.75 + 0.5 * 0.75)
    gamma, best = best_calibration(*TOY)
    assert gamma == pytest.approx(0.35)
    assert best.H == pytest.approx(0.75)
    assert best.ausuc == pytest.approx(0.5625)


def test_ausuc_of_hand_made_curves():
    assert ausuc(np.array([1.0, 0.5, 0.0]), np.array([0.0, 0.5, 1.0])) == pytest.approx(0.5)
    # Order of the points does not matter; a perfect classifier has area 1.
    assert ausuc(np.array([0.0, 1.0, 0.5]), np.array([1.0, 0.0, 0.5])) == pytest.approx(0.5)
    assert ausuc(np.array([1.0, 1.0, 0.0]), np.array([0.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert ausuc(np.array([0.6, 0.0]), np.array([0.0, 0.4])) == pytest.approx(0.12)


def _random_problem(seed: int, integer_scores: bool = False):
    rng = np.random.default_rng(seed)
    k, n_seen_cls = 20, 12
    seen_mask = np.zeros(k, dtype=bool)
    seen_mask[rng.choice(k, n_seen_cls, replace=False)] = True
    seen_cls, unseen_cls = np.flatnonzero(seen_mask), np.flatnonzero(~seen_mask)
    # Imbalanced classes so that per-class means differ from overall accuracy.
    ls = rng.choice(seen_cls, 300, p=rng.dirichlet(np.ones(seen_cls.size)))
    lu = rng.choice(unseen_cls, 200, p=rng.dirichlet(np.ones(unseen_cls.size)))

    def scores(labels):
        if integer_scores:  # many exactly equal breakpoints and within-group ties
            sc = rng.integers(0, 4, size=(labels.size, k)).astype(float)
            sc[np.arange(labels.size), labels] += rng.integers(0, 3, size=labels.size)
        else:
            sc = rng.normal(size=(labels.size, k))
            sc[np.arange(labels.size), labels] += 1.5
        return sc

    return scores(ls), ls, scores(lu), lu, seen_mask


@pytest.mark.parametrize("integer_scores", [False, True])
def test_exact_curve_matches_brute_force_sweep(integer_scores):
    problem = _random_problem(1, integer_scores)
    ss, ls, su, lu, mask = problem
    gammas, s, u = seen_unseen_curve(*problem)
    assert np.all(np.diff(gammas) > 0)
    assert np.all(np.diff(s) <= 1e-12) and np.all(np.diff(u) >= -1e-12)
    assert s[0] > 0 and u[0] == 0.0 and s[-1] == 0.0 and u[-1] > 0
    # Each returned gamma reproduces its point exactly.
    for g, s_j, u_j in zip(gammas, s, u, strict=True):
        r = gzsl_metrics(*problem, gamma=g)
        assert (r.S, r.U) == (pytest.approx(s_j, abs=1e-12), pytest.approx(u_j, abs=1e-12))
    # Any gamma lands on the point of its interval between breakpoints (computed independently here).
    scores = np.concatenate([ss, su])
    flips = np.unique(scores[:, mask].max(axis=1) - scores[:, ~mask].max(axis=1))
    assert flips.size == s.size - 1
    rng = np.random.default_rng(2)
    probes = rng.uniform(flips[0] - 1.0, flips[-1] + 1.0, size=300)
    if integer_scores:
        probes = np.round(probes * 4) / 4 + 0.125  # never exactly on an integer breakpoint
    for g in probes:
        j = np.searchsorted(flips, g, side="left")
        r = gzsl_metrics(*problem, gamma=g)
        assert (r.S, r.U) == (pytest.approx(s[j], abs=1e-12), pytest.approx(u[j], abs=1e-12))


def test_curve_subsampling_keeps_both_ends():
    problem = _random_problem(3)
    _, s, u = seen_unseen_curve(*problem)
    g_sub, s_sub, u_sub = seen_unseen_curve(*problem, n_points=20)
    assert 2 <= s_sub.size <= 20 and g_sub.size == s_sub.size
    assert (s_sub[0], u_sub[0], s_sub[-1], u_sub[-1]) == (s[0], u[0], s[-1], u[-1])
    assert ausuc(s_sub, u_sub) == pytest.approx(ausuc(s, u), abs=0.05)


def test_best_calibration_finds_the_brute_force_maximum():
    problem = _random_problem(4)
    gamma, best = best_calibration(*problem)
    sweep = np.linspace(-4.0, 4.0, 2001)
    brute = max(gzsl_metrics(*problem, gamma=g).H for g in sweep)
    assert best.H >= brute - 1e-12
    assert best.gamma == gamma
    assert best.H == pytest.approx(gzsl_metrics(*problem, gamma=gamma).H)
    _, s, u = seen_unseen_curve(*problem)
    assert best.ausuc == pytest.approx(ausuc(s, u))


def test_write_metrics_and_plot(tmp_path):
    r = gzsl_metrics(*TOY, gamma=0.4)
    names = ["a", "b", "c", "d"]
    write_metrics(r, tmp_path / "out" / "metrics.json", tmp_path / "out" / "per_class.csv", names,
                  ausuc=0.5625, extra={"epoch": 3})
    summary = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert summary["H"] == pytest.approx(75.0)
    assert summary["T"] == pytest.approx(75.0)
    assert summary["AUSUC"] == pytest.approx(56.25)
    assert summary["gamma"] == pytest.approx(0.4)
    assert summary["epoch"] == 3
    with (tmp_path / "out" / "per_class.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [row["class_name"] for row in rows] == names
    assert [row["split"] for row in rows] == ["seen", "seen", "unseen", "unseen"]
    assert [int(row["n_images"]) for row in rows] == [1, 2, 1, 2]
    assert float(rows[1]["accuracy"]) == pytest.approx(50.0)
    assert rows[0]["zsl_accuracy"] == "" and float(rows[3]["zsl_accuracy"]) == pytest.approx(50.0)

    _, s, u = seen_unseen_curve(*TOY)
    png = tmp_path / "curve.png"
    plot_seen_unseen_curve({"toy": (s, u), "ideal": (np.array([1.0, 1.0, 0.0]), np.array([0, 1.0, 1.0]))},
                           png, title="toy")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluation_reads_a_tensor_of_all_maps_like_the_array(tiny_cfg) -> None:
    """A store resident on the GPU is evaluated from its tensor, as stored; here the same path on the CPU."""
    from dataclasses import replace

    import torch

    from dedn.data.sources import DeviceFeatures
    from dedn.eval.evaluate import evaluate_model
    from dedn.factory import build_model, load_data

    data = load_data(tiny_cfg)
    model = build_model(tiny_cfg, data)
    resident = torch.as_tensor(np.asarray(data.features[np.arange(data.n_images)], dtype=np.float32)).half()
    a = evaluate_model(model, replace(data, features=DeviceFeatures(resident)), 1.0, batch_size=50,
                       stored_dtype=True)
    b = evaluate_model(model, replace(data, features=resident.float().numpy()), 1.0, batch_size=50)
    assert a.result.to_dict() == b.result.to_dict()
    bad = resident.clone()
    bad[data.test_seen_loc[3], 0, 0, 0] = float("nan")
    with pytest.raises(DataError, match=rf"images \[{data.test_seen_loc[3]}\]"):
        evaluate_model(model, replace(data, features=DeviceFeatures(bad)), 1.0, batch_size=50, stored_dtype=True)


def test_a_fixed_gamma_note_only_where_gamma_was_not_chosen_on_validation():
    from dedn.eval.calibration import GammaSource, fixed_gamma_note

    for source in (GammaSource.CONFIG, "mode default"):
        note = fixed_gamma_note(source)
        assert note is not None and "eval.protocol=validated" in note and f"({GammaSource(source).value})" in note
    assert fixed_gamma_note("validated") is None and fixed_gamma_note(GammaSource.ORACLE) is None
    assert fixed_gamma_note(None) is None
