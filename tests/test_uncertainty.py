"""The bootstrap interval of T, U, S and H over resampled test images."""

from __future__ import annotations

import numpy as np
import pytest

from dedn.eval.metrics import gzsl_metrics
from dedn.eval.uncertainty import bootstrap_interval


def _scores(seed: int = 0):
    rng = np.random.default_rng(seed)
    k, seen = 6, np.array([True, True, True, False, False, False])
    ls, lu = rng.integers(0, 3, 120), rng.integers(3, 6, 90)
    ss, su = rng.normal(size=(120, k)), rng.normal(size=(90, k))
    ss[np.arange(120), ls] += 1.5
    su[np.arange(90), lu] += 1.0
    return ss, ls, su, lu, seen


def test_interval_brackets_the_point_and_is_deterministic() -> None:
    ss, ls, su, lu, seen = _scores()
    point = gzsl_metrics(ss, ls, su, lu, seen, 0.3).to_dict(percent=True)
    ci = bootstrap_interval(ss, ls, su, lu, seen, 0.3, n=300)
    for key in ("T", "U", "S", "H"):
        lo, hi = ci[key]
        assert lo <= point[key] <= hi and 0 < hi - lo < 40, key
    assert ci == bootstrap_interval(ss, ls, su, lu, seen, 0.3, n=300)


def test_interval_narrows_with_more_images() -> None:
    ss, ls, su, lu, seen = _scores()
    wide = bootstrap_interval(ss, ls, su, lu, seen, 0.3, n=300)["H"]
    many = [np.concatenate([x] * 9) for x in (ss, ls, su, lu)]
    narrow = bootstrap_interval(many[0], many[1], many[2], many[3], seen, 0.3, n=300)["H"]
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) * 0.6
    assert pytest.approx(np.mean(narrow), abs=3) == np.mean(wide)
