"""Figures for people: operating points on seen-unseen curves, bar charts in the table's order, y ranges."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from dedn.apps import reports as R
from dedn.eval.metrics import plot_seen_unseen_curve


def test_seen_unseen_curve_marks_the_operating_point(tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: saved.append(self))
    s, u = np.array([1.0, 0.8, 0.0]), np.array([0.0, 0.6, 0.9])
    plot_seen_unseen_curve({"DEDN": (s, u), "other": (s * 0.5, u)}, tmp_path / "c.png", title="toy",
                           protocol="validated", points={"DEDN": (0.8, 0.6, 1.5)})
    ax = saved[0].axes[0]
    assert "toy; validated protocol" in ax.get_title() and "operating point" in ax.get_title()
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 1 and dots[0].get_xdata()[0] == pytest.approx(60) and dots[0].get_ydata()[0] == 80
    curve = next(line for line in ax.get_lines() if line.get_label().startswith("DEDN (AUSUC"))
    assert dots[0].get_zorder() > curve.get_zorder() and dots[0].get_color() == curve.get_color()
    assert "gamma 1.5: S 80.0, U 60.0, H 68.6" in dots[0].get_label()


def test_near_data_y_range() -> None:
    assert R._near_data([70.0, 80.0]) == (65.0, pytest.approx(80 + 0.22 * 15 + 1))
    assert R._near_data([0.0, 30.0])[0] == 0.0  # data near zero: start at zero
    assert R._near_data([]) == (0.0, 100.0)
    assert R._near_data([99.0, 100.0])[1] <= 105


def _axes():
    from matplotlib.figure import Figure

    return Figure().add_subplot(1, 1, 1)


def test_bars_legend_order_values_and_error_bars_only_with_several_seeds() -> None:
    ax = _axes()
    drawn = R._bars(ax, ["a", "b"], {"T": ([70.0, 71.0], [math.nan, math.nan]), "U": ([60.0, 61.0], [1.0, 2.0]),
                                     "S": ([80.0, 81.0], [1.0, 1.0]), "H": ([68.0, math.nan], [1.0, 1.0])})
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["T", "U", "S", "H"]
    labels = [t.get_text() for t in ax.texts]
    assert {"70.0", "71.0", "60.0", "81.0", "68.0", "n/a"} <= set(labels)
    assert len(ax.containers) == 4 + 3  # four bar groups, error bars for the three series with a std
    assert min(drawn) == pytest.approx(59.0) and max(drawn) == pytest.approx(82.0)


def test_table_plot_has_baselines_plain_titles_and_near_data_axes(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: saved.append(self))
    exp = SimpleNamespace(name="table3", dataset="imagebench", protocols=["validated"], seeds=[0],
                          rows=[SimpleNamespace(label="DEDN")],
                          extra={"baselines": {"ESZSL (pooled features)": {"T": 51.3, "U": 49.6, "S": 49.3,
                                                                           "H": 49.4}}})
    one = {"mean": 0.0, "std": math.nan}
    summary = [{"protocol": "validated", "label": "DEDN", "paper": None,
                **{m: {**one, "mean": v} for m, v in zip("TUSH", (76.9, 72.9, 80.4, 76.4), strict=True)}}]
    R._table_plot(exp, summary, ("T", "U", "S", "H"), tmp_path / "t.png")
    ax = saved[0].axes[0]
    assert ax.get_title().startswith("Table 3: ablations on imagebench, validated protocol")
    assert "table3" not in ax.get_title() and "1 seed" in ax.get_title()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["DEDN", "ESZSL (pooled features)"]
    assert ax.get_ylim()[0] > 30  # starts near the data
    assert not [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]  # one seed: no error bars
