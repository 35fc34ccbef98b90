"""Classes given by attribute vectors at prediction time: reading and checking a CSV or JSON class file."""

from __future__ import annotations

import csv
import difflib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dedn.checks import ATTRIBUTE_VALUE, check
from dedn.errors import DataError


def _suggest(name: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""


def unknown_attribute_message(unknown: Sequence[str], attribute_names: Sequence[str]) -> str:
    """``'x' (did you mean 'y'?), ...`` for attribute names that are not in ``attribute_names``."""
    return ", ".join(f"{u!r}{_suggest(u, attribute_names)}" for u in unknown)


def _to_float(value: Any, where: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {value!r} is not a number") from None
    if not math.isfinite(out):
        raise DataError(f"{where}: {value!r} is not a finite number")
    check(where, out, ATTRIBUTE_VALUE, error=DataError)  # 1e300 is finite but overflows float32 (NaN scores)
    return out


def _rows_from_named(path: Path, rows: list[tuple[str, dict[str, Any]]], attribute_names: Sequence[str],
                     fill: float | None) -> np.ndarray:
    """(K', D) matrix from ``(class, {attribute: value})`` rows; unknown names always fail."""
    index = {a: j for j, a in enumerate(attribute_names)}
    unknown = sorted({a for _, values in rows for a in values if a not in index})
    if unknown:
        raise DataError(f"{path}: unknown attribute names {unknown_attribute_message(unknown, attribute_names)}")
    att = np.full((len(rows), len(attribute_names)), np.nan)
    for i, (cls, values) in enumerate(rows):
        for a, v in values.items():
            att[i, index[a]] = _to_float(v, f"{path}: class {cls!r}, attribute {a!r}")
    missing = np.isnan(att)
    if missing.any():
        if fill is None:
            names = [attribute_names[j] for j in np.flatnonzero(missing.any(axis=0))]
            shown = ", ".join(repr(n) for n in names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
            raise DataError(f"{path}: {len(names)} attributes have no value for some classes: {shown}; give "
                            "every attribute, or a fill value for missing ones (--fill 0)")
        att[missing] = fill
    return att


def _csv_rows(path: Path, text: str, attribute_names: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(class, {attribute: cell})`` rows of a CSV class file (empty cells left out)."""
    table = [r for r in csv.reader(text.splitlines()) if any(c.strip() for c in r)]
    if len(table) < 2:
        raise DataError(f"{path}: expected a header row (class, attribute names...) and one row per class")
    header = [h.strip() for h in table[0][1:]]
    if not header:
        raise DataError(f"{path}: no attribute columns (header: class name, then attribute names)")
    dup = sorted({h for h in header if header.count(h) > 1})
    if dup:
        raise DataError(f"{path}: attribute columns given twice: {', '.join(map(repr, dup))}")
    rows: list[tuple[str, dict[str, Any]]] = []
    for n, r in enumerate(table[1:], start=2):
        if len(r) != len(header) + 1:
            raise DataError(f"{path}: line {n} has {len(r)} cells, the header has {len(header) + 1}")
        rows.append((r[0].strip(), {h: c for h, c in zip(header, r[1:], strict=True) if c.strip() != ""}))
    # A column header that names no attribute is an error even if all its cells are empty.
    unknown = [h for h in header if h not in set(attribute_names)]
    if unknown:
        raise DataError(f"{path}: unknown attribute names {unknown_attribute_message(unknown, attribute_names)}")
    return rows


def _json_rows(path: Path, text: str, d: int) -> tuple[list[tuple[str, dict[str, Any]]], dict[int, np.ndarray]]:
    """Rows of a JSON class file: ``(class, {attribute: value})``, and the full vectors by row (their rows: {})."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict) or not obj:
        raise DataError(f'{path}: expected an object {{"class": {{"attribute": value, ...}}}} or '
                        f'{{"class": [{d} values]}}')
    rows: list[tuple[str, dict[str, Any]]] = []
    vectors: dict[int, np.ndarray] = {}
    for i, (cls, value) in enumerate(obj.items()):
        if isinstance(value, dict):
            rows.append((str(cls), value))
        elif isinstance(value, list):
            if len(value) != d:
                raise DataError(f"{path}: class {cls!r} has {len(value)} values, expected {d} (one per "
                                "attribute, in the model's attribute order)")
            vectors[i] = np.array([_to_float(v, f"{path}: class {cls!r}, value {j}")
                                   for j, v in enumerate(value)])
            rows.append((str(cls), {}))
        else:
            raise DataError(f"{path}: class {cls!r} must map to an object of attribute values or a list of "
                            f"{d} values, got {type(value).__name__}")
    return rows, vectors


def load_class_definitions(path: str | Path, attribute_names: Sequence[str],
                           fill: float | None = None) -> tuple[list[str], np.ndarray]:
    """Read classes defined by attribute vectors, for recognising classes given at prediction time.

    Formats (chosen by extension):

    - ``.csv``: a header row (first cell: anything, e.g. ``class``; then attribute names), then one row per
      class (class name, then values). Columns may come in any order; empty cells count as missing.
    - ``.json``: ``{"class": {"attribute name": value, ...}, ...}`` or ``{"class": [D values], ...}``.

    Args:
        path: the file.
        attribute_names: the model's D attribute names (dataset order).
        fill: value for attributes a class does not give; ``None`` makes missing attributes an error.

    Returns:
        ``(class_names, att)`` with att (K', D) float32 in dataset attribute order.

    Raises:
        DataError: unreadable file, unknown attribute names (close matches suggested), missing attributes
            without ``fill``, a vector of the wrong length, a non-number or a value beyond |value| <= 1e6, no
            or duplicate classes. ConfigError: a ``fill`` that is no such number.
    """
    path = Path(path)
    if fill is not None:
        check("fill", fill, ATTRIBUTE_VALUE)
    if not path.is_file():
        raise DataError(f"{path}: class definition file not found")
    d = len(attribute_names)
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read the class definitions ({exc})") from None
    vectors: dict[int, np.ndarray] = {}
    if suffix == ".csv":
        rows = _csv_rows(path, text, attribute_names)
    elif suffix == ".json":
        rows, vectors = _json_rows(path, text, d)
    else:
        raise DataError(f"{path}: unknown class definition format {suffix or '(no extension)'}; use .csv or .json")
    names = [r[0] for r in rows]
    if any(not n for n in names):
        raise DataError(f"{path}: a class has an empty name")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{path}: classes defined twice: {', '.join(map(repr, dup))}")
    named = [r for i, r in enumerate(rows) if i not in vectors]
    att = np.zeros((len(rows), d))
    if named:
        att_named = _rows_from_named(path, named, attribute_names, fill)
        att[[i for i in range(len(rows)) if i not in vectors]] = att_named
    for i, v in vectors.items():
        att[i] = v
    return names, att.astype(np.float32)
