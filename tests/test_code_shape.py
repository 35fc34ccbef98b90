"""Every function in ``src/dedn`` stays short and takes few parameters.

Read from the source with ``ast``: a function is at most ``MAX_LINES`` lines long (its ``def`` line through its
last line; decorators not counted) and takes at most ``MAX_PARAMETERS`` parameters (``self`` / ``cls`` not
counted; ``*args`` and ``**kwargs`` count one each). Typer command functions in ``cli.py`` are exempt: their
parameters are the command's options.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "dedn"
MAX_LINES = 80
MAX_PARAMETERS = 10


Function = ast.FunctionDef | ast.AsyncFunctionDef


def _is_typer_command(func: Function) -> bool:
    """``@app.command()``, ``@store_app.command("import")``, ``@app.command`` ...: a typer command."""
    for deco in func.decorator_list:
        target = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(target, ast.Attribute) and target.attr == "command":
            return True
    return False


def parameter_count(func: Function) -> int:
    """Parameters of ``func``, ``self`` / ``cls`` not counted, ``*args`` / ``**kwargs`` one each."""
    a = func.args
    positional = [*a.posonlyargs, *a.args]
    if positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    return len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)


def line_count(func: Function) -> int:
    """Lines from the ``def`` line through the function's last line."""
    assert func.end_lineno is not None
    return func.end_lineno - func.lineno + 1


def offenders(source: str, rel_path: str) -> list[tuple[str, str, int, int]]:
    """``(place, name, lines, parameters)`` for each too long or too wide function of one module's source."""
    functions = sorted((node for node in ast.walk(ast.parse(source))
                        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))), key=lambda f: f.lineno)
    found = []
    for node in functions:
        if rel_path == "cli.py" and _is_typer_command(node):
            continue
        lines, params = line_count(node), parameter_count(node)
        if lines > MAX_LINES or params > MAX_PARAMETERS:
            found.append((f"{rel_path}:{node.lineno}", node.name, lines, params))
    return found


def test_no_function_is_too_long_or_takes_too_many_parameters():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        bad += [o for o in offenders(path.read_text(encoding="utf-8"), rel)]
    assert not bad, (f"functions over {MAX_LINES} lines or {MAX_PARAMETERS} parameters (place name: lines, "
                     "parameters); split them into named steps or pass an options object:\n"
                     + "\n".join(f"  {place} {name}: {lines} lines, {params} parameters"
                                 for place, name, lines, params in bad))


def test_the_rules_are_measured_as_documented():
    source = (
        "class A:\n"
        "    def method(self, a, b, c, d, e, f, g, h, i, j):\n"
        "        pass\n"
        "    def wide(self, a, b, c, d, e, f, g, h, i, *args, **kwargs):\n"
        "        pass\n"
        "def long():\n" + "    x = 1\n" * (MAX_LINES - 1) +
        "def longer():\n" + "    x = 1\n" * MAX_LINES +
        "@app.command()\n"
        "def command(a, b, c, d, e, f, g, h, i, j, k):\n"
        "    pass\n"
    )
    assert [(name, lines, params) for _, name, lines, params in offenders(source, "apps/x.py")] == [
        ("wide", 2, 11), ("longer", MAX_LINES + 1, 0), ("command", 2, 11)]
    assert [name for _, name, _, _ in offenders(source, "cli.py")] == ["wide", "longer"]
