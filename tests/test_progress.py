"""Progress a user can see: one line per finished experiment job (reused ones say so), and --quiet."""

from __future__ import annotations

from pathlib import Path

from .conftest import TINY, run_cli


def test_experiment_prints_one_line_per_job(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ["experiment", "table1", "--methods", "dedn", *TINY, "train.epochs=2", "--protocol", "both", "--seeds", "2",
            "--out", str(tmp_path / "t1")]
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("[")]
    assert len(lines) == 4 and lines[0].startswith("[1/4] DEDN (validated, seed 0): H ")
    assert all("AUSUC" in line and "gamma" in line and line.endswith(" s") for line in lines)
    assert "(published, seed 1)" in lines[-1] and "(mode default)" in lines[-1]
    # A rerun reuses every finished job and says so; --quiet prints no progress at all.
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0 and [line.endswith("reused") for line in err.splitlines() if line.startswith("[")] == [True] * 4
    code, out, err = run_cli([*args, "--quiet"], monkeypatch, capsys)
    assert code == 0 and not [line for line in err.splitlines() if line.startswith("[")]
    assert "reports in" in out
