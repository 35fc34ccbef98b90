"""Figures for people: printed sizes and fonts, zero-based bars, error bars over seeds, the paper's figures as
markers, legends that cover nothing, operating points on seen-unseen curves."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dedn.apps import reports as R
from dedn.eval.metrics import plot_seen_unseen_curve


@pytest.fixture
def saved(monkeypatch) -> list:
    """Figures are kept instead of written: the tests read their artists."""
    from matplotlib.figure import Figure

    figures: list = []
    monkeypatch.setattr(Figure, "savefig", lambda self, path, **kw: figures.append(self))
    return figures


def _check_print_ready(fig) -> None:
    """A figure a two-column paper can print as is: one column or the page wide, text of at least 8 pt (tick
    labels at least 9 pt), no rotated tick labels, and every legend outside every axes' data area."""
    fig.draw_without_rendering()
    assert fig.get_figwidth() in (R.COLUMN_WIDTH, R.PAGE_WIDTH)
    for ax in fig.axes:
        for label in ax.get_xticklabels() + ax.get_yticklabels():
            if label.get_text():
                assert label.get_fontsize() >= 9 and label.get_rotation() == 0, label.get_text()
        assert all(t.get_fontsize() >= 8 for t in ax.texts)
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend())]
    assert legends
    for legend in legends:
        assert all(t.get_fontsize() >= 9 for t in legend.get_texts())
        box = legend.get_window_extent()
        assert fig.bbox.x0 - 1 <= box.x0 and box.x1 <= fig.bbox.x1 + 1, "the legend is cut at the figure's sides"
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), "the legend covers an axes"


def test_seen_unseen_curve_marks_the_operating_point(tmp_path: Path, saved) -> None:
    s, u = np.array([1.0, 0.8, 0.0]), np.array([0.0, 0.6, 0.9])
    plot_seen_unseen_curve({"DEDN": (s, u), "other": (s * 0.5, u)}, tmp_path / "c.png", title="toy",
                           protocol="validated", points={"DEDN": (0.8, 0.6, 1.5)})
    fig = saved[0]
    ax = fig.axes[0]
    assert "toy\nvalidated protocol" in ax.get_title() and "operating point" in ax.get_title()
    dots = [line for line in ax.get_lines() if line.get_marker() == "o"]
    assert len(dots) == 1 and dots[0].get_xdata()[0] == pytest.approx(60) and dots[0].get_ydata()[0] == 80
    curve = next(line for line in ax.get_lines() if line.get_label().startswith("DEDN (AUSUC"))
    assert dots[0].get_zorder() > curve.get_zorder() and dots[0].get_color() == curve.get_color()
    assert "γ 1.5: S 80.0, U 60.0, H 68.6" in dots[0].get_label()
    assert ax.get_ylim()[0] == 0 and ax.get_xlim()[0] == 0
    _check_print_ready(fig)


def test_value_ranges() -> None:
    assert R._zero_based([70.0, 80.0]) == (0.0, 90.0)  # bars: from 0, room for the values above the highest
    assert R._zero_based([99.0, 100.0]) == (0.0, 110.0)
    assert R._near_data([70.0, 80.0])[0] == 65.0  # curves: near the data
    assert R._near_data([0.0, 30.0])[0] == 0.0  # data near zero: start at zero
    assert R._near_data([]) == (0.0, 100.0)


def _axes():
    from matplotlib.figure import Figure

    return Figure().add_subplot(1, 1, 1)


def _errorbars(ax) -> list:
    return [c for c in ax.containers if type(c).__name__ == "ErrorbarContainer"]


def test_bars_group_by_metric_with_error_bars_only_with_several_seeds() -> None:
    ax = _axes()
    drawn = R._bars(ax, ["T", "H"], {"DEDN": ([70.0, 71.0], [math.nan, math.nan]), "DAZLE": ([60.0, 61.0], [1.0, 2.0]),
                                     "ESZSL": ([50.0, math.nan], [math.nan, math.nan])}, hatched=["ESZSL"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["T", "H"]
    assert [h.get_label() for h in ax.get_legend_handles_labels()[0]] == ["DEDN", "DAZLE", "ESZSL"]
    assert {"70.0", "71.0", "60.0", "61.0", "50.0", "n/a"} <= {t.get_text() for t in ax.texts}
    assert len(_errorbars(ax)) == 1  # only DAZLE has a std
    bars = [c for c in ax.containers if type(c).__name__ == "BarContainer"]
    assert all(b.get_hatch() for b in bars[2]) and not any(b.get_hatch() for b in bars[0])
    assert max(drawn) == 71.0 and 63.0 in drawn  # means, plus the std where there is one


def test_bars_mark_the_papers_figures_and_then_write_no_values() -> None:
    ax = _axes()
    R._bars(ax, ["T", "H"], {"DEDN": ([70.0, 71.0], [1.0, 1.0]), "DAZLE": ([60.0, 61.0], [1.0, 1.0])},
            paper={"DEDN": [77.4, 70.4], "DAZLE": [None, 58.0]})
    lines = [c for c in ax.collections if c.get_label() == R.PAPER_LABEL]
    assert len(lines) == 1  # one legend entry for every paper line
    flat = [seg for c in ax.collections for seg in c.get_segments() if len(seg) and seg[0][1] == seg[1][1]]
    assert sorted(seg[0][1] for seg in flat) == [58.0, 70.4, 77.4]  # a horizontal line per paper figure
    assert not ax.texts


def _table_exp(n_seeds: int, protocols: tuple[str, ...], baselines: bool = True):
    exp = SimpleNamespace(name="table3", dataset="CUB", protocols=list(protocols), seeds=list(range(n_seeds)),
                          rows=[SimpleNamespace(label="DEDN", overrides=()),
                                SimpleNamespace(label="DEDN w/o MAL", overrides=("loss.l_mal=0",))],
                          extra={"baselines": {"ESZSL (pooled features)": {"T": 51.3, "U": 49.6, "S": 49.3,
                                                                           "H": 49.4}}} if baselines else {})
    std = 1.5 if n_seeds > 1 else math.nan
    summary = [{"protocol": p, "label": label, "paper": {"T": 77.4, "U": 70.9, "S": 70.0, "H": 70.4},
                **{m: {"mean": v - i, "std": std} for m, v in zip("TUSH", (76.9, 72.9, 80.4, 76.4), strict=True)}}
               for p in protocols for i, label in enumerate(("DEDN", "DEDN w/o MAL"))]
    return exp, summary


def test_titles_name_the_built_in_benchmark_and_the_compared_methods(tmp_path: Path, saved) -> None:
    exp, summary = _table_exp(1, ("validated",))
    exp.dataset = "imagebench"
    exp.rows.append(SimpleNamespace(label="DAZLE", overrides=("model.name=dazle",)))
    R._table_plot(exp, summary, ("T", "U", "S", "H"), tmp_path / "t.png")
    assert "Table 3: ablations and compared methods on the built-in benchmark" in saved[0].get_suptitle()


def test_table_plot_is_print_ready_with_error_bars_over_seeds(tmp_path: Path, saved) -> None:
    exp, summary = _table_exp(2, ("validated", "published"))
    R._table_plot(exp, summary, ("T", "U", "S", "H"), tmp_path / "t.png")
    fig = saved[0]
    assert fig.get_figwidth() == R.PAGE_WIDTH and "Table 3: ablations on CUB" in fig.get_suptitle()
    assert "2 seeds" in fig.get_suptitle()
    for ax, proto in zip(fig.axes, ("validated", "published"), strict=True):
        assert ax.get_title().startswith(f"{proto} protocol")
        assert ax.get_ylim()[0] == 0  # zero-based value axis
        assert [t.get_text() for t in ax.get_xticklabels()] == ["T", "U", "S", "H"]
        assert len(_errorbars(ax)) == 2  # one per row with a std; the baseline has none
        assert any(c.get_label() == R.PAPER_LABEL for c in ax.collections)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["DEDN", "DEDN w/o MAL", "ESZSL (pooled features), baseline", R.PAPER_LABEL]
    _check_print_ready(fig)


def test_table_plot_with_one_seed_draws_no_error_bars(tmp_path: Path, saved) -> None:
    exp, summary = _table_exp(1, ("validated",), baselines=False)
    for s in summary:
        s["paper"] = None
    R._table_plot(exp, summary, ("T", "U", "S", "H"), tmp_path / "t.png")
    fig = saved[0]
    ax = fig.axes[0]
    assert fig.get_figwidth() == R.COLUMN_WIDTH and "1 seed" in fig.get_suptitle()
    assert not _errorbars(ax) and ax.get_ylim()[0] == 0
    assert {"76.9", "75.9"} <= {t.get_text() for t in ax.texts}  # few bars, no paper lines: values written
    _check_print_ready(fig)


def test_table_plot_legend_of_many_long_rows_fits_the_page(tmp_path: Path, saved) -> None:
    exp, summary = _table_exp(1, ("validated",))
    labels = ["DEDN", "cExp alone (no distillation)", "fExp alone (no distillation)", "DEDN w/o channel attention",
              "DEDN w/o MAL", "DAZLE", "MSDN", "TransZero"]
    exp.rows = [SimpleNamespace(label=label, overrides=()) for label in labels]
    summary = [{**summary[0], "label": label, "paper": None} for label in labels]
    R._table_plot(exp, summary, ("T", "U", "S", "H"), tmp_path / "t.png")
    fig = saved[0]
    assert fig.get_figwidth() == R.PAGE_WIDTH and not fig.axes[0].texts  # 36 bars: no values written on them
    _check_print_ready(fig)
