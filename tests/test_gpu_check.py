"""The prepared GPU check (``tools/gpu_check.py``) runs its sections on the CPU at small sizes, prints one JSON line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    """The script, imported by path: it is a repository tool, not a module of the package."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_check_runs_every_section_on_the_cpu(gpu_check, tmp_path) -> None:
    summary = gpu_check.run_gpu_check("small", "cpu", workdir=tmp_path, run_tests=False, budget_s=None)
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


def test_the_command_prints_one_json_line(gpu_check, monkeypatch, capsys) -> None:
    monkeypatch.setattr(gpu_check, "run_gpu_check", lambda scale, device, **kw: {"scale": scale, "failed": ["bench"]})
    assert gpu_check.main(["--small", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and json.loads(out) == {"scale": "small", "failed": ["bench"]}
    for bad in (["--device", "tpu"], ["--budget-s", "0"], ["--budget-s", "soon"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main(bad)
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err


def test_a_spent_budget_skips_sections_and_the_out_file_follows_the_check(gpu_check, tmp_path, monkeypatch) -> None:
    out = tmp_path / "check.json"
    writes: list[dict] = []
    write = gpu_check.atomic_write_text
    monkeypatch.setattr(gpu_check, "atomic_write_text", lambda path, text: (writes.append(json.loads(text)),
                                                                            write(path, text)))
    assert gpu_check.gpu_check_command(small=True, device="cpu", out=str(out), budget_s=0) == 0
    summary = json.loads(out.read_text())
    sections = [k for k, v in summary.items() if isinstance(v, dict) and "status" in v]
    assert "partial" not in summary and len(sections) >= 6
    assert all(summary[k]["status"] == "skipped" for k in sections)
    # Rewritten after every section (marked partial), then once whole.
    assert len(writes) == len(sections) + 1 and all(w["partial"] for w in writes[:-1])


def test_the_cuda_tests_are_the_repositorys(gpu_check, monkeypatch) -> None:
    calls: list[list[str]] = []
    done = subprocess.CompletedProcess([], 0, stdout="3 passed\n", stderr="")
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, **kw: (calls.append(cmd), done)[1])
    assert gpu_check._cuda_tests(gpu_check.ROOT) == {"status": "ok", "returncode": 0, "summary": "3 passed"}
    assert gpu_check.ROOT == ROOT and calls[0][-1] == str(ROOT / "tests") and calls[0][-3:-1] == ["-m", "cuda"]


def test_the_shell_script_runs_the_check_from_the_source_tree() -> None:
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu-check.sh"), "--small", "--device", "cpu",
                           "--budget-s", "0.001"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable}, cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["check"] == "dedn gpu-check"
