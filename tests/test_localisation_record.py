"""The demo's localisation record: each part's share of attention beside that part's own chance."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dedn.apps.demo import localisation

sys.path.insert(0, str(Path(__file__).parent))
from test_explain import ATTRS, C, H, W, make_model  # noqa: E402


class FakeBench:
    """Two parts on 64x64 masks: a big body (bottom half) and a small tail (one 16x16 corner)."""

    part_names = ("body", "tail")
    attribute_part = np.array([0, 1, 0, -1, 1, -1])  # per attribute of test_explain's ATTRS

    def render(self, i: int):
        masks = np.zeros((2, 64, 64), dtype=bool)
        masks[0, 32:] = True
        masks[1, :16, :16] = True
        return None, masks


def test_localisation_record_gives_each_part_its_own_chance() -> None:
    assert len(ATTRS) == FakeBench.attribute_part.size
    data = SimpleNamespace(features=np.random.default_rng(0).random((5, C, H, W)).astype(np.float32), provenance={})
    out = localisation(make_model(), data, FakeBench(), np.arange(5), batch=2)
    assert out["n_images"] == 5
    for expert in ("cexp", "fexp"):
        rec = out[expert]
        assert rec["chance_per_part"] == pytest.approx({"body": 0.5, "tail": 1 / 16})
        assert rec["per_part_percent"]["tail"]["chance"] == pytest.approx(100 / 16)
        assert rec["per_part_percent"]["body"]["chance"] == pytest.approx(50.0)
        for part in ("body", "tail"):
            assert rec["per_part_percent"][part]["share"] == pytest.approx(rec["per_part"][part] * 100)
        assert rec["chance"] == pytest.approx((0.5 * 2 + 1 / 16 * 2) / 4)  # the overall chance mixes them
