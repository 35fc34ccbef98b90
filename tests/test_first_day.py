"""A researcher's first day, as a shell runs it: the demo (small), each command it prints next, exactly as printed,
from a shell whose PATH does not hold the environment; then the README's "Your own dataset" commands, as written,
from `dedn samples` to `dedn explain`. The README's commands are read from the README, so it cannot drift."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_demo import TINY_DEMO

README = Path(__file__).resolve().parents[1] / "README.md"
SCRIPT = Path(sys.executable).parent / "dedn"  # the installed entry point, as `make demo` leaves it in .venv/bin


def readme_section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start:text.index("\n## ", start + 1)]


def own_dataset_commands() -> list[str]:
    """The commands of the section's bash block, continuation lines joined."""
    block = re.search(r"^```bash\n(.*?)^```", readme_section("Your own dataset"), flags=re.S | re.M)
    assert block, "README.md's 'Your own dataset' has no ```bash block"
    return [c.strip() for c in block.group(1).replace("\\\n", " ").splitlines() if c.strip()]


def _shell_env() -> dict[str, str]:
    """This environment with the interpreter's folder (the venv's bin) off the PATH: the environment not active."""
    venv_bin = os.path.realpath(SCRIPT.parent)
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and os.path.realpath(p) != venv_bin]
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    return {**env, "PATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}


def _shell(command: str, cwd: Path) -> str:
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=_shell_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_the_printed_and_the_documented_commands_run_in_a_plain_shell(tmp_path: Path) -> None:
    if not SCRIPT.is_file():
        pytest.skip(f"no dedn command beside {sys.executable}: install the package (make test) to run this test")
    started = time.perf_counter()
    out = _shell(f"{SCRIPT} demo --quiet {' '.join(TINY_DEMO)}", tmp_path)
    printed = out.split("\nnext:\n", 1)[1].splitlines()
    commands = [line.strip() for line in printed if line.startswith("  ")]
    assert [c.split()[1] for c in commands] == ["predict", "explain", "eval"]
    dedn = commands[0].split()[0]
    assert (tmp_path / dedn).is_file() or Path(dedn).is_file()  # a path the shell resolves from here
    results = [_shell(c, tmp_path) for c in commands]  # exactly as printed
    assert "%" in results[0]  # each class's probability
    assert re.search(r"T\s+U\s+S\s+H", results[2])

    # The README's own dataset, the commands as written (`dedn` called as the demo printed it).
    readme = own_dataset_commands()
    assert [c.split()[1] for c in readme] == ["samples", "extract", "train", "eval", "predict", "explain"]
    assert all(c.startswith("dedn ") for c in readme)
    own_started = time.perf_counter()
    outputs = [_shell(dedn + c.removeprefix("dedn"), tmp_path) for c in readme]
    own_seconds = time.perf_counter() - own_started
    folder = tmp_path / readme[0].split("--out ")[1].split()[0]
    assert "validated protocol" in outputs[2]
    classes = [line.split(",")[0] for line in (folder / "splits.csv").read_text().splitlines()[1:]]
    assert sum(c in outputs[4] for c in classes) >= 2  # it ranks the dataset's own classes, by name
    assert list((tmp_path / "runs" / "mydata" / "explain").glob("*.png"))

    # Each file the README shows is what `dedn samples` wrote: its first lines, cut at "...".
    files = {p.name: p.read_text().splitlines() for p in folder.glob("*.csv")}
    shown = re.findall(r"^```text\n(.*?)^```", readme_section("Your own dataset"), flags=re.S | re.M)
    assert len(shown) == 4
    for block in shown:
        lines = block.splitlines()
        name = next((n for n, f in files.items() if f[0].startswith(lines[0].removesuffix("..."))), None)
        assert name, f"README shows a file dedn samples does not write:\n{block}"
        for i, line in enumerate(lines):
            real = files[name][i] if i < len(files[name]) else ""
            assert real.startswith(line.removesuffix("...")) and (line.endswith("...") or real == line), (name, line)
    print(f"first day: {time.perf_counter() - started:.0f} s, README's own dataset {own_seconds:.0f} s")
