"""The package's layers: imports point one way, and no module imports itself through others.

Every ``import`` of a ``dedn`` module is read from the source (ast), function-level imports included, so a
lazy import cannot hide a cycle or an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dedn"

#: Layers, lowest first. A module may import modules of its own layer and of the layers below it.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("dedn", "dedn.errors", "dedn.atomic", "dedn.checks", "dedn.devices", "dedn.hostmemory",
                    "dedn.runfolder")),
    ("data", ("dedn.data",)),
    ("config", ("dedn.config",)),
    ("features", ("dedn.features",)),
    ("models", ("dedn.models", "dedn.factory")),
    ("eval", ("dedn.eval",)),
    ("training", ("dedn.training",)),
    ("apps", ("dedn.apps",)),
    ("cli", ("dedn.cli",)),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c in modules and c != name:
                    deps.add(c)
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} belongs to no layer"
    return rank


GRAPH = _imports()


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_imports_point_down_the_layers() -> None:
    upward = sorted(f"{m} ({LAYERS[_layer(m)][0]}) imports {d} ({LAYERS[_layer(d)][0]})"
                    for m, deps in GRAPH.items() for d in deps if _layer(d) > _layer(m))
    assert not upward, "\n".join(upward)


def test_every_module_is_in_a_layer_and_subpackages_exist() -> None:
    for m in GRAPH:
        _layer(m)
    for sub in ("data", "features", "models", "eval", "training", "apps"):
        assert (SRC / sub / "__init__.py").is_file()
    assert not [p.name for p in SRC.glob("*.py")
                if p.stem not in ("__init__", "errors", "atomic", "checks", "devices", "hostmemory", "runfolder",
                                  "config", "factory", "cli")]


def _run_folder_names() -> set[str]:
    """The file names :class:`dedn.runfolder.RunFolder` owns (those with a suffix: folder names are words)."""
    tree = ast.parse((SRC / "runfolder.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunFolder")
    return {n.value.value for n in cls.body if isinstance(n, ast.Assign) and isinstance(n.value, ast.Constant)
            and isinstance(n.value.value, str) and "." in n.value.value}


def test_run_folder_file_names_are_spelled_only_by_the_run_folder_module() -> None:
    names = _run_folder_names()
    assert {"config.json", "model.safetensors", "metrics.json", "job.json", "done.json"} <= names
    found = []
    for path in SRC.rglob("*.py"):
        if path.name == "runfolder.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if node.value in names or any(node.value.endswith("/" + n) for n in names):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert not found, "run-folder file names outside dedn.runfolder (use RunFolder):\n" + "\n".join(found)


def test_the_models_do_not_import_the_run_config() -> None:
    """A method reads the run's settings by attribute (:mod:`dedn.models.registry`): nothing under
    ``dedn/models/`` imports :mod:`dedn.config` (nor, through it, the image benchmark)."""
    found = sorted(f"{m} imports dedn.config" for m, deps in GRAPH.items()
                   if (m == "dedn.models" or m.startswith("dedn.models.")) and "dedn.config" in deps)
    assert not found, "\n".join(found)


#: Sub-layers of ``dedn.apps``, lowest first: an apps module imports apps modules of its own sub-layer and below.
#: Selection sits below the protocols, the protocols below the launchers, the launchers below the experiments.
APPS_LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("records", ("dedn.apps", "dedn.apps.results", "dedn.apps.class_files", "dedn.apps.custom_dataset",
                 "dedn.apps.datacache", "dedn.apps.reports", "dedn.apps.samples")),
    ("selection", ("dedn.apps.selection",)),
    ("protocols", ("dedn.apps.protocols",)),
    ("model use", ("dedn.apps.predict", "dedn.apps.explain", "dedn.apps.describe")),
    ("launch", ("dedn.apps.launch",)),
    ("experiments", ("dedn.apps.experiments",)),
    ("tools", ("dedn.apps.stepprofile", "dedn.apps.demo", "dedn.apps.bench", "dedn.apps.storebench")),
]
#: What a trained model's users (predict, explain, describe) and the evaluation path must never load.
BATCH_MODULES = ("dedn.apps.experiments", "dedn.apps.launch")


def _apps_layer(module: str) -> int:
    for i, (_, modules) in enumerate(APPS_LAYERS):
        if module in modules:
            return i
    raise AssertionError(f"{module} belongs to no sub-layer of apps (add it to APPS_LAYERS)")


def _path_to(start: str, targets: tuple[str, ...]) -> list[str] | None:
    """An import chain from ``start`` to one of ``targets`` through GRAPH (breadth first), or None."""
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        m = queue.pop(0)
        if m in targets:
            chain = [m]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])  # type: ignore[arg-type]
            return chain[::-1]
        for d in sorted(GRAPH[m]):
            if d not in parent:
                parent[d] = m
                queue.append(d)
    return None


def test_apps_imports_point_down_its_sub_layers() -> None:
    apps = [m for m in GRAPH if m == "dedn.apps" or m.startswith("dedn.apps.")]
    upward = sorted(f"{m} ({APPS_LAYERS[_apps_layer(m)][0]}) imports {d} ({APPS_LAYERS[_apps_layer(d)][0]})"
                    for m in apps for d in GRAPH[m] if d in apps and _apps_layer(d) > _apps_layer(m))
    assert not upward, "\n".join(upward)


def test_model_use_and_evaluation_never_load_experiments_or_launchers() -> None:
    starts = [m for m in GRAPH if m in ("dedn.apps.predict", "dedn.apps.explain", "dedn.apps.describe")
              or m == "dedn.eval" or m.startswith("dedn.eval.")]
    assert "dedn.apps.predict" in starts and "dedn.eval.evaluate" in starts
    chains = [" -> ".join(chain) for m in sorted(starts) if (chain := _path_to(m, BATCH_MODULES))]
    assert not chains, "\n".join(chains)
