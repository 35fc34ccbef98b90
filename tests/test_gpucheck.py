"""The prepared GPU check runs its sections on the CPU at small sizes and prints one JSON line."""

from __future__ import annotations

import json

from dedn.apps.gpucheck import run_gpu_check
from tests.conftest import run_cli


def test_small_check_runs_every_section_on_the_cpu(tmp_path) -> None:
    summary = run_gpu_check("small", "cpu", workdir=tmp_path, run_tests=False, budget_s=None)
    assert summary["failed"] == [], {k: v for k, v in summary.items() if isinstance(v, dict) and "error" in v}
    for skipped in ("cuda_tests", "ddp"):
        assert summary[skipped]["status"] == "skipped" and summary[skipped]["reason"]
    assert set(summary["bench"]) >= {"fp32", "tf32", "bf16", "status", "seconds"}
    assert summary["bench"]["bf16"]["step_seconds"] > 0 and summary["bench"]["bf16"]["fp32_step_seconds"] > 0
    assert summary["resident_store"]["resident"] is False and summary["resident_store"]["steps"] == 8  # 128 // 16
    assert summary["extraction"]["finite"] and summary["extraction"]["images"] == 6
    for precision in ("fp32", "bf16"):
        run = summary[f"train_80_epochs_{precision}"]
        assert (run["steps"], run["evaluations"], run["precision"]) == (12, 3, precision)
        assert run["train_seconds"] > 0 and 0 <= run["H"] <= 100
    json.dumps(summary)


def test_the_command_prints_one_json_line(monkeypatch, capsys) -> None:
    import dedn.apps.gpucheck as gpucheck

    monkeypatch.setattr(gpucheck, "run_gpu_check", lambda scale, device, **kw: {"scale": scale, "failed": ["bench"]})
    code, out, _ = run_cli(["gpu-check", "--small", "--device", "cpu"], monkeypatch, capsys)
    assert code == 1 and len(out.strip().splitlines()) == 1
    assert json.loads(out) == {"scale": "small", "failed": ["bench"]}
    code, _, err = run_cli(["gpu-check", "--device", "tpu"], monkeypatch, capsys)
    assert code == 2 and "--device" in err


def test_a_spent_budget_skips_sections_and_the_out_file_follows_the_check(tmp_path, monkeypatch) -> None:
    import dedn.atomic
    from dedn.apps.gpucheck import gpu_check_command

    out = tmp_path / "check.json"
    writes: list[dict] = []
    write = dedn.atomic.atomic_write_text
    monkeypatch.setattr(dedn.atomic, "atomic_write_text", lambda path, text: (writes.append(json.loads(text)),
                                                                               write(path, text)))
    assert gpu_check_command(small=True, device="cpu", out=str(out), budget_s=0) == 0
    summary = json.loads(out.read_text())
    sections = [k for k, v in summary.items() if isinstance(v, dict) and "status" in v]
    assert "partial" not in summary and len(sections) >= 6
    assert all(summary[k]["status"] == "skipped" for k in sections)
    # Rewritten after every section (marked partial), then once whole.
    assert len(writes) == len(sections) + 1 and all(w["partial"] for w in writes[:-1])


def test_the_shell_script_runs_the_check_from_the_source_tree() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(["bash", str(root / "tools" / "gpu-check.sh"), "--small", "--device", "cpu",
                           "--budget-s", "0.001"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable}, cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["check"] == "dedn gpu-check"
