"""Sample images of the built-in benchmark (``dedn samples``): rendered only, no backbone, in seconds."""

from __future__ import annotations

import csv
import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedn.config import find_config, load_config
from dedn.data.imagebench import ImageBenchmark, make_image_benchmark
from dedn.errors import ConfigError

INDEX_FILE = "index.csv"
KINDS = ("seen", "unseen", "validation")
#: Between the class name and the image number in a sample's file name: ``<class name>__<image index>.png``.
NAME_SEPARATOR = "__"


def class_in_file_name(path: str | Path) -> str | None:
    """The class a sample's file name starts with (``<class name>__<image index>.png``), or None."""
    stem = Path(path).stem
    return stem.rsplit(NAME_SEPARATOR, 1)[0] if NAME_SEPARATOR in stem else None


@dataclass
class Samples:
    """What :func:`write_samples` wrote: the folder, the index CSV and one ``(file, class, kind, split)`` per
    image."""

    folder: Path
    index: Path
    rows: list[tuple[str, str, str, str]]


def class_kinds(bench: ImageBenchmark) -> list[str]:
    """``seen``, ``unseen`` or ``validation`` (seen classes the validated protocol holds out) per class."""
    kinds = ["seen"] * bench.n_classes
    for c in bench.unseen_classes:
        kinds[int(c)] = "unseen"
    for c in bench.val_classes:
        kinds[int(c)] = "validation"
    return kinds


def select_classes(bench: ImageBenchmark, wanted: Sequence[str] | None) -> list[int]:
    """Class indices from names (``003.Blue_headed...`` or without ``003.``), numbers (``3``) or a kind.

    Entries may also be comma-separated. ``None`` or empty: every class.

    Raises:
        ConfigError: an entry that names no class (close names suggested).
    """
    if not wanted:
        return list(range(bench.n_classes))
    kinds = class_kinds(bench)
    stems = [n.split(".", 1)[-1] for n in bench.class_names]
    out: list[int] = []
    for entry in (e.strip() for w in wanted for e in str(w).split(",")):
        if not entry:
            continue
        if entry in KINDS:
            hits = [c for c, k in enumerate(kinds) if k == entry]
        elif entry.isdigit() and 1 <= int(entry) <= bench.n_classes:
            hits = [int(entry) - 1]
        elif entry in bench.class_names:
            hits = [bench.class_names.index(entry)]
        elif entry in stems:
            hits = [stems.index(entry)]
        else:
            close = difflib.get_close_matches(entry, bench.class_names + stems, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise ConfigError(f"--classes: {entry!r} is no class of the built-in benchmark{hint}; give class names, "
                              f"numbers 1..{bench.n_classes}, or seen, unseen, validation")
        out += [c for c in hits if c not in out]
    return out


def write_samples(out: str | Path, per_class: int = 2, classes: Sequence[str] | None = None,
                  overrides: Sequence[str] = ()) -> Samples:
    """Render ``per_class`` images of each chosen class of the demo's benchmark as PNGs under ``out``.

    Files are named ``<class name>__<image index>.png`` and listed in ``out/index.csv`` (file, class, kind:
    seen, unseen or validation; split: test, or trainval where a class has too few test images). Test images
    come first, so predictions on them are honest. The benchmark is the demo config's ``data.imagebench`` with
    ``overrides``.
    """
    if per_class < 1:
        raise ConfigError(f"--per-class must be at least 1, got {per_class}")
    cfg = load_config(find_config("demo"), list(overrides))
    bench = make_image_benchmark(cfg.data.imagebench)
    kinds = class_kinds(bench)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    split = np.full(bench.n_images, "trainval", dtype=object)
    split[np.concatenate([bench.test_seen_loc, bench.test_unseen_loc])] = "test"
    rows: list[tuple[str, str, str, str]] = []
    for c in select_classes(bench, classes):
        images = np.flatnonzero(bench.labels == c)
        # Test images first: a model trained on the benchmark has never seen them.
        for i in sorted(images, key=lambda i: (split[i] != "test", i))[:per_class]:
            name = f"{bench.class_names[c]}{NAME_SEPARATOR}{int(i):05d}.png"
            bench.image(int(i)).save(folder / name)
            rows.append((name, bench.class_names[c], kinds[c], str(split[i])))
    index = folder / INDEX_FILE
    with index.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "class", "kind", "split"])
        writer.writerows(rows)
    return Samples(folder, index, rows)
