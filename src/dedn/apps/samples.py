"""Sample images of the built-in benchmark (``dedn samples``): rendered only, no backbone, in seconds; with the
class attribute, class split and attribute group files that make them a dataset of one's own for ``dedn extract``."""

from __future__ import annotations

import csv
import difflib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dedn.config import find_config, load_config
from dedn.data.imagebench import ImageBenchmark, make_image_benchmark
from dedn.errors import ConfigError

INDEX_FILE = "index.csv"
ATTRIBUTES_FILE = "attributes.csv"
SPLITS_FILE = "splits.csv"
GROUPS_FILE = "groups.csv"
KINDS = ("seen", "unseen", "validation")
#: What ``dedn samples --split`` takes (see :func:`split_images`).
SPLITS = ("train", "test", "validation", "all")
#: The columns of ``index.csv``: ``path`` and ``class`` as ``dedn extract --images index.csv`` reads them.
INDEX_COLUMNS = ("path", "class", "kind", "split")
#: Between the class name and the image number in a sample's file name: ``<class name>__<image index>.png``.
NAME_SEPARATOR = "__"


def class_in_file_name(path: str | Path) -> str | None:
    """The class a sample's file name starts with (``<class name>__<image index>.png``), or None."""
    stem = Path(path).stem
    return stem.rsplit(NAME_SEPARATOR, 1)[0] if NAME_SEPARATOR in stem else None


@dataclass
class Samples:
    """What :func:`write_samples` wrote: the folder, the index CSV and one ``(path, class, kind, split)`` per
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


def split_images(bench: ImageBenchmark, split: str) -> dict[str, np.ndarray]:
    """The images of ``split`` by benchmark split (``trainval``, ``test``): sorted image indices.

    ``train``: the trainval images (every seen class's training images); ``test``: the test split (test-seen and
    test-unseen images); ``validation``: the trainval images of the validation classes (the seen classes the
    validated protocol holds out); ``all``: both splits.

    Raises:
        ConfigError: an unknown split.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    trainval = np.sort(bench.trainval_loc)
    test = np.sort(np.concatenate([bench.test_seen_loc, bench.test_unseen_loc]))
    if split == "validation":
        return {"trainval": trainval[np.isin(bench.labels[trainval], bench.val_classes)]}
    return {"train": {"trainval": trainval}, "test": {"test": test},
            "all": {"trainval": trainval, "test": test}}[split]


def _chosen(bench: ImageBenchmark, pools: dict[str, np.ndarray], c: int, per_class: int) -> list[tuple[int, str]]:
    """Up to ``per_class`` images of class ``c``, taken in turn from each split's pool (both splits show)."""
    mine = [[(int(i), name) for i in pool[bench.labels[pool] == c]] for name, pool in pools.items()]
    taken = [item for row in itertools.zip_longest(*mine) for item in row if item is not None]
    return taken[:per_class]


def write_samples(out: str | Path, per_class: int = 2, classes: Sequence[str] | None = None,
                  overrides: Sequence[str] = (), split: str = "test") -> Samples:
    """Render ``per_class`` images of each chosen class of the demo's benchmark, from ``split``, as PNGs under
    ``out``, with the files a dataset of one's own needs (``dedn extract --images out/index.csv --attributes
    out/attributes.csv --splits out/splits.csv --groups out/groups.csv``).

    Files are named ``<class name>__<image index>.png`` and listed in ``out/index.csv`` (path, class, kind: seen,
    unseen or validation; split: trainval or test, the benchmark's). ``attributes.csv`` holds the chosen classes'
    attribute values, ``splits.csv`` their class split (train, val, test) and ``groups.csv`` the attribute groups.
    The benchmark is the demo config's ``data.imagebench`` with ``overrides``.
    """
    if per_class < 1:
        raise ConfigError(f"--per-class must be at least 1, got {per_class}")
    cfg = load_config(find_config("demo"), list(overrides))
    bench = make_image_benchmark(cfg.data.imagebench)
    pools = split_images(bench, split)
    kinds = class_kinds(bench)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str, str]] = []
    chosen = select_classes(bench, classes)
    for c in chosen:
        for i, image_split in _chosen(bench, pools, c, per_class):
            name = f"{bench.class_names[c]}{NAME_SEPARATOR}{i:05d}.png"
            bench.image(i).save(folder / name)
            rows.append((name, bench.class_names[c], kinds[c], image_split))
    shown = sorted({bench.class_names.index(r[1]) for r in rows})
    class_split = {"seen": "train", "validation": "val", "unseen": "test"}
    group = {int(a): g for g, members in bench.clusters.items() for a in members}
    index = folder / INDEX_FILE
    _write_csv(index, list(INDEX_COLUMNS), rows)
    _write_csv(folder / ATTRIBUTES_FILE, ["class", *bench.attribute_names],
               [[bench.class_names[c], *(f"{v:.4g}" for v in bench.class_att[c])] for c in shown])
    _write_csv(folder / SPLITS_FILE, ["class", "split"], [[bench.class_names[c], class_split[kinds[c]]] for c in shown])
    _write_csv(folder / GROUPS_FILE, ["attribute", "group"],
               [[a, group[j]] for j, a in enumerate(bench.attribute_names)])
    return Samples(folder, index, rows)


def _write_csv(path: Path, header: list[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
