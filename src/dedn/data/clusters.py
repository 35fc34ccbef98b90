"""Attribute clusters for the fine-grained expert (fExp): built-in definitions, K-means, half variants,
cluster files and their checks.

A clustering is an ordered ``dict[str, np.ndarray]`` of sorted, 0-based int64 attribute indices; the
clusters are disjoint, non-empty and together cover every attribute. The built-in definitions are the
index ranges into the xlsa17 attribute order that the benchmark table (:mod:`dedn.data.benchmarks`) holds.

Half variants (paper Fig. 5b) merge neighbouring clusters pairwise, in definition order:

- CUB (6 -> 3): head+torso, wing+tail, leg+whole
- SUN (4 -> 2): function+instance, environment+light (reference layout: the same pairs of its groups)
- AWA2 (4 -> 2): texture+organ, abstract+environment
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dedn.data.benchmarks import BENCHMARKS, Ranges
from dedn.data.semantics import normalize_rows
from dedn.data.xlsa17 import canonical_dataset
from dedn.errors import ConfigError, DataError

__all__ = [
    "BUILTIN_RANGES",
    "builtin_clusters",
    "cluster_permutation",
    "half_clusters",
    "kmeans_clusters",
    "load_cluster_file",
    "merge_neighbours",
    "resolve_clusters",
    "validate_clusters",
]

#: dataset -> variant ("paper" / "reference") -> cluster name -> half-open index ranges (from the
#: benchmark table, :mod:`dedn.data.benchmarks`).
BUILTIN_RANGES: dict[str, dict[str, Ranges]] = {name: dict(b.clusters) for name, b in BENCHMARKS.items()}

_SPECS = ("auto", "paper", "reference", "half", "kmeans", "none")


def _builtin_name(dataset: str | None) -> str:
    ds = canonical_dataset(dataset)
    if ds is None:
        raise ConfigError(f"no built-in attribute clusters for dataset {dataset!r}; they exist for CUB, "
                          "SUN and AWA2. Use model.clusters=kmeans (with model.n_clusters), none, or a "
                          "cluster file")
    return ds


def builtin_clusters(dataset: str, variant: str = "paper") -> dict[str, np.ndarray]:
    """The built-in clusters of CUB, SUN or AWA2; ``variant`` "paper" or "reference" (they differ
    only for SUN, whose reference layout reproduces the released code's 64/27/9/2 split)."""
    ds = _builtin_name(dataset)
    if variant not in ("paper", "reference"):
        raise ConfigError(f"cluster variant must be paper or reference, got {variant!r}")
    return {
        name: np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])
        for name, ranges in BUILTIN_RANGES[ds][variant].items()
    }


def merge_neighbours(clusters: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge clusters pairwise in order (1+2, 3+4, ...), Q -> Q // 2; with odd Q the last group takes three.

    Merged names join the originals with "+" (e.g. ``head+torso``).
    """
    items = list(clusters.items())
    if len(items) < 2:
        return {name: np.sort(np.asarray(idx, dtype=np.int64)) for name, idx in items}
    groups = [items[i:i + 2] for i in range(0, len(items) - len(items) % 2, 2)]
    if len(items) % 2:
        groups[-1] = groups[-1] + [items[-1]]
    merged = {}
    for group in groups:
        merged["+".join(name for name, _ in group)] = np.sort(
            np.concatenate([np.asarray(idx, dtype=np.int64) for _, idx in group]))
    return merged


def half_clusters(dataset: str, variant: str = "paper") -> dict[str, np.ndarray]:
    """Paper Fig. 5b: the built-in clusters with neighbours merged (CUB 3, SUN 2, AWA2 2); see module doc."""
    return merge_neighbours(builtin_clusters(dataset, variant))


def kmeans_clusters(w2v: np.ndarray, q: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Paper Fig. 5a: K-means (scikit-learn, n_init=10, fixed seed) of the L2-normalised semantic vectors.

    Clusters are named ``k0`` ... and ordered by their smallest attribute index, so the result depends
    only on the vectors, ``q`` and ``seed``. No cluster is ever empty.

    Raises:
        DataError: ``q`` is not between 1 and the number of distinct semantic vectors.
    """
    from sklearn.cluster import KMeans

    x = normalize_rows(np.asarray(w2v, dtype=np.float64))
    if x.ndim != 2:
        raise DataError(f"kmeans clusters need a (D, G) semantic matrix, got shape {x.shape}")
    distinct = np.unique(np.round(x, 12), axis=0).shape[0]
    if not 1 <= q <= distinct:
        raise DataError(f"kmeans clusters: cannot make {q} clusters of {x.shape[0]} attributes with "
                        f"{distinct} distinct semantic vectors; choose model.n_clusters between 1 and "
                        f"{distinct}")
    km = KMeans(n_clusters=q, n_init=10, random_state=seed).fit(x)
    labels = km.labels_.copy()
    # scikit-learn relocates empty clusters itself; keep a guard so the contract never depends on it.
    for c in range(q):
        if not (labels == c).any():
            sizes = np.bincount(labels, minlength=q)
            donor = int(sizes.argmax())
            members = np.flatnonzero(labels == donor)
            far = members[np.argmax(np.linalg.norm(x[members] - km.cluster_centers_[donor], axis=1))]
            labels[far] = c
    groups = [np.flatnonzero(labels == c).astype(np.int64) for c in range(q)]
    groups.sort(key=lambda g: int(g[0]))
    return {f"k{i}": g for i, g in enumerate(groups)}


def cluster_permutation(clusters: Mapping[str, np.ndarray]) -> np.ndarray:
    """The attribute order of the clusters concatenated (the model's cluster order), int64."""
    return np.concatenate([np.asarray(v, dtype=np.int64) for v in clusters.values()])


def validate_clusters(
    clusters: Mapping[str, Any],
    n_attributes: int,
    source: str,
    attribute_names: Sequence[str] | None = None,
) -> None:
    """Check that clusters are non-empty, in range, disjoint and cover all ``n_attributes`` attributes.

    Raises:
        DataError: naming ``source``, the cluster and the offending attributes (indices and names).
    """

    def show(idx: Sequence[int]) -> str:
        idx = list(idx)
        if attribute_names is not None and len(attribute_names) == n_attributes:
            items = [f"{i} ({attribute_names[i]})" for i in idx[:8]]
        else:
            items = [str(i) for i in idx[:8]]
        return ", ".join(items) + (f" and {len(idx) - 8} more" if len(idx) > 8 else "")

    if not clusters:
        raise DataError(f"{source}: no attribute clusters defined")
    owner: dict[int, str] = {}
    for name, idx in clusters.items():
        arr = np.asarray(idx)
        if arr.size == 0:
            raise DataError(f"{source}: cluster {name!r} is empty")
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise DataError(f"{source}: cluster {name!r} must be a list of attribute indices")
        bad = arr[(arr < 0) | (arr >= n_attributes)]
        if bad.size:
            raise DataError(f"{source}: cluster {name!r} holds attributes outside 0..{n_attributes - 1}: "
                            f"{bad[:8].tolist()}")
        values, counts = np.unique(arr, return_counts=True)
        if (counts > 1).any():
            raise DataError(f"{source}: cluster {name!r} lists attributes twice: {show(values[counts > 1])}")
        taken = [i for i in values.tolist() if i in owner]
        if taken:
            raise DataError(f"{source}: clusters {owner[taken[0]]!r} and {name!r} overlap in attributes "
                            f"{show(taken)}; each attribute must belong to exactly one cluster")
        owner.update(dict.fromkeys(values.tolist(), str(name)))
    missing = sorted(set(range(n_attributes)) - set(owner))
    if missing:
        raise DataError(f"{source}: {len(missing)} attributes are in no cluster: {show(missing)}; every "
                        "attribute must belong to exactly one cluster")


def _normalised(clusters: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {str(k): np.sort(np.asarray(v, dtype=np.int64)) for k, v in clusters.items()}


def load_cluster_file(path: str | Path, attribute_names: Sequence[str]) -> dict[str, np.ndarray]:
    """Read a cluster file and validate it: a YAML or JSON mapping ``cluster name -> list of attributes``, or a
    CSV with the header ``attribute,group`` and one row per attribute (the group names its cluster).

    In a mapping each item is an attribute index (int, 0-based), an attribute name (string, exact) or a
    half-open range ``"a:b"``; kinds may be mixed. The file order gives the cluster order (in a CSV, the order
    in which the groups first appear).

    Raises:
        DataError: the file is missing or malformed, names an unknown attribute, or the clusters are not
            disjoint, covering and non-empty.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: cluster file not found")
    try:
        text = p.read_text(encoding="utf-8")
        if p.suffix.lower() == ".csv":
            data = _groups_csv(p, text)
        elif p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read the cluster file: {exc}") from None
    if not isinstance(data, Mapping) or not data:
        raise DataError(f"{p}: a cluster file must map each cluster name to a list of attributes, e.g. "
                        "'head: [0, 1, has_bill_shape::dagger, \"94:105\"]'")
    index = {str(n): i for i, n in enumerate(attribute_names)}
    clusters: dict[str, np.ndarray] = {}
    for name, items in data.items():
        if not isinstance(items, list):
            raise DataError(f"{p}: cluster {name!r} must be a list of attribute indices or names")
        out: list[int] = []
        unknown: list[str] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise DataError(f"{p}: cluster {name!r}: {item!r} is neither an attribute index nor a name")
            if isinstance(item, int):
                out.append(item)
            elif item in index:
                out.append(index[item])
            elif re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", item):
                a, b = (int(s) for s in item.split(":"))
                out.extend(range(a, b))
            else:
                unknown.append(item)
        if unknown:
            import difflib

            hint = difflib.get_close_matches(unknown[0], list(index), n=3)
            raise DataError(f"{p}: cluster {name!r} names unknown attributes {unknown[:5]}"
                            + (f" (did you mean {hint}?)" if hint else ""))
        clusters[str(name)] = np.asarray(out, dtype=np.int64)
    validate_clusters(clusters, len(attribute_names), str(p), attribute_names)
    return _normalised(clusters)


def _groups_csv(path: Path, text: str) -> dict[str, list[str]]:
    """``group -> attribute names`` of a CSV ``attribute,group`` (one row per attribute), groups in first-seen order."""
    import csv

    rows = [[c.strip() for c in r] for r in csv.reader(text.lstrip("\ufeff").splitlines()) if any(c.strip() for c in r)]
    if not rows or [c.lower() for c in rows[0][:2]] != ["attribute", "group"]:
        raise DataError(f"{path}: a groups CSV starts with the header 'attribute,group', then one row per "
                        "attribute: its name and its group")
    groups: dict[str, list[str]] = {}
    for n, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0] or not row[1]:
            raise DataError(f"{path}: row {n} needs an attribute name and a group, got {row}")
        groups.setdefault(row[1], []).append(row[0])
    return groups


def resolve_clusters(
    spec: str,
    dataset: str | None,
    mode: str,
    w2v: np.ndarray | None,
    attribute_names: Sequence[str],
    n_clusters: int | None = None,
    own: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """The clusters a config's ``model.clusters`` value asks for, validated.

    - ``auto``: ``own`` (the dataset's own clusters) when given, else the built-in clusters of
      ``dataset`` in the variant of ``mode`` (paper or reference);
    - ``paper`` / ``reference``: that built-in variant;
    - ``half``: neighbours merged (of ``own`` when given, else of the built-in ``mode`` variant);
    - ``kmeans``: K-means of ``w2v`` into ``n_clusters`` (default: as many as ``own`` or the built-in);
    - ``none``: one cluster ``all`` holding every attribute;
    - anything else: a YAML/JSON cluster file (see :func:`load_cluster_file`).

    Raises:
        ConfigError: an unknown value, or one that needs what is missing (dataset, vectors, Q).
        DataError: the clusters do not fit the attributes (wrong count, overlap, gap).
    """
    if mode not in ("paper", "reference"):
        raise ConfigError(f"mode must be paper or reference, got {mode!r}")
    n_attributes = int(w2v.shape[0]) if w2v is not None else len(attribute_names)
    key = str(spec).strip()
    low = key.lower()
    if low not in _SPECS:
        path = Path(key).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.clusters={spec!r} is neither one of {', '.join(_SPECS)} nor an "
                              "existing cluster file")
        return load_cluster_file(path, attribute_names)

    if low == "none":
        clusters = {"all": np.arange(n_attributes, dtype=np.int64)}
        source = "model.clusters=none"
    elif low == "kmeans":
        if w2v is None:
            raise ConfigError("model.clusters=kmeans needs the attributes' semantic vectors")
        q = n_clusters or (len(own) if own else None)
        if q is None and canonical_dataset(dataset):
            q = len(BUILTIN_RANGES[_builtin_name(dataset)][mode])
        if q is None:
            raise ConfigError("model.clusters=kmeans needs model.n_clusters for a dataset without built-in "
                              "clusters")
        clusters = kmeans_clusters(w2v, int(q))
        source = f"model.clusters=kmeans (Q={q})"
    elif low == "half":
        if own:
            clusters, source = merge_neighbours(own), "the dataset's own clusters, halved"
        else:
            clusters = half_clusters(_builtin_name(dataset), mode)
            source = f"built-in {canonical_dataset(dataset)} half clusters ({mode})"
    elif low == "auto" and own:
        clusters, source = dict(own), "the dataset's own clusters"
    else:
        variant = mode if low == "auto" else low
        ds = _builtin_name(dataset)
        clusters, source = builtin_clusters(ds, variant), f"built-in {ds} clusters ({variant})"
        expected = BENCHMARKS[ds].n_attributes
        if n_attributes != expected:
            raise DataError(f"{source} cover {expected} attributes but the data has {n_attributes}; "
                            "is data.dataset right? Otherwise use kmeans, none or a cluster file")
    validate_clusters(clusters, n_attributes, source, attribute_names)
    return _normalised(clusters)
