"""The README's Python example runs as written on a fresh machine (no download, seconds); the README, the
real-data guide and CITATION.cff agree with the package on the facts they repeat."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BUDGET_S = 180  # about 15 s on two CPU cores; generous for a loaded CI machine


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert match, "README.md has no ```python block"
    return match.group(1)


def test_readme_python_example_runs(tmp_path: Path) -> None:
    code = first_python_block(README.read_text())
    assert "import dedn\n" in code and "dedn.train(cfg)" in code  # the public API, as a notebook uses it
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=BUDGET_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("H ")), None)
    assert line is not None, proc.stdout
    fields = line.split()
    assert 0.0 <= float(fields[1]) <= 100.0 and fields[2] == "gamma" and fields[4] == "validated"
    assert "DEDN" in proc.stdout
    assert (tmp_path / "runs").is_dir()  # it wrote its run under the temporary working directory


def _bibtex_title(text: str) -> str:
    match = re.search(r"^```bibtex\n.*?title\s*=\s*\{(.*?)\},", text, flags=re.S | re.M)
    assert match, "no BibTeX entry with a title"
    return match.group(1)


def test_the_citation_files_agree() -> None:
    import yaml

    from dedn import __version__

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["version"] == __version__
    paper = cff["preferred-citation"]
    readme, guide = README.read_text(), (ROOT / "docs" / "real-data.md").read_text()
    assert _bibtex_title(readme) == _bibtex_title(guide) == paper["title"]
    assert paper["year"] == 2024 and len(paper["authors"]) == 8
    assert "](docs/real-data.md)" in readme and "## Citing" in readme


def test_the_readme_states_the_demos_measured_seed_spread() -> None:
    from dedn.apps.demo import DEMO_SEED_SPREAD as spread

    text = README.read_text()
    assert f"| DEDN | {spread.mean_H:.1f} ± {spread.std_H:.1f} |" in text and spread.command in text
