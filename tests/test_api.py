"""The public API: ``import dedn`` gives the handful of entry points a notebook needs, each defined once."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import dedn


def test_every_public_name_is_the_one_its_module_defines() -> None:
    assert dedn.__all__ == ["__version__", *dedn._API]
    for name, module in dedn._API.items():
        obj = getattr(dedn, name)
        assert obj is getattr(importlib.import_module(module), name)
        assert obj.__module__ == module, f"{name} is defined in {obj.__module__}, not {module}"
        assert obj.__doc__, f"{name} has no docstring"
    assert set(dedn._API) <= set(dir(dedn))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        dedn.nothing  # noqa: B018


def test_importing_the_package_stays_light() -> None:
    code = "import sys, dedn; print(sorted(m for m in ('torch', 'dedn.apps', 'dedn.config') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
