"""The facts of the three benchmarks (CUB, SUN, AWA2), in one table that every other module reads.

Each :class:`Benchmark` holds what is fixed by the xlsa17 "proposed split" files and by the DEDN paper
and its released code: the counts, the image and feature-map sizes the paper's features use, the
attribute clusters, the shipped preset hyper-parameters and the published results. Keeping them here
means a corrected number changes everywhere at once; ``tests/test_benchmarks.py`` checks the counts
against the real xlsa17 files.

The module is plain data (no file reading, no dedn imports besides the errors) so that any layer of the
package may read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from dedn.errors import ConfigError

__all__ = [
    "BENCHMARKS",
    "FEATURE_CHANNELS",
    "PEER_SOURCES",
    "TABLE3_ROWS",
    "WORD_VECTOR_DIM",
    "Benchmark",
    "PresetSettings",
    "Ranges",
    "find_benchmark",
    "get_benchmark",
]

#: Cluster name -> half-open ``(start, stop)`` ranges of 0-based attribute indices in xlsa17 order.
Ranges = Mapping[str, tuple[tuple[int, int], ...]]

#: Where each published peer figure (:attr:`Benchmark.peers_table1`) was printed.
PEER_SOURCES: Mapping[str, str] = {
    "dazle": "DEDN paper, Table 1 (DAZLE, CVPR 2020)",
    "msdn": "DEDN paper, Table 1 (= MSDN's README, CVPR 2022)",
    "transzero": "TransZero's README, its released models (AAAI 2022; not in the DEDN paper's Table 1)",
}

#: Channels of the ResNet-101 layer4 maps all three benchmarks' features are taken from.
FEATURE_CHANNELS = 2048
#: Dimension of the xlsa17 attribute word vectors (``{DS}_attribute.pkl``).
WORD_VECTOR_DIM = 300

#: Row keys of paper Table 3 (the ablations), in the paper's order.
TABLE3_ROWS = ("cexp_wo_distill", "fexp_wo_distill", "dedn_wo_distill", "wo_channel_attention", "wo_mal",
               "wo_align", "full")


@dataclass(frozen=True)
class PresetSettings:
    """The per-dataset hyper-parameters of one shipped preset (the released training scripts' values)."""

    epochs: int
    l_rc: float
    l_e: float
    balanced: bool
    lamb: float
    seed: int
    low_rank: int | None


@dataclass(frozen=True)
class Benchmark:
    """One benchmark's facts.

    Attributes:
        name: the canonical name (``"CUB"``, ``"SUN"``, ``"AWA2"``).
        aliases: other spellings that name it; case, spaces and punctuation are ignored.
        n_images, n_classes, n_attributes: N, K and D of the xlsa17 files.
        n_seen, n_unseen: classes of trainval and of test_unseen (``trainvalclasses.txt``,
            ``testclasses.txt``).
        n_val: validation classes (``valclasses1.txt``), a subset of the seen classes.
        n_trainval, n_test_seen, n_test_unseen: images of the three splits; they cover every image once.
        image_size: input size in pixels of the paper's features.
        feature_size: height = width of the feature maps at that size (ResNet-101 stride 32).
        clusters: variant (``"paper"`` / ``"reference"``) -> the fine-grained expert's attribute clusters.
            They differ only for SUN: the released code slices its groups wrongly and gets clusters of
            64/27/9/2 attributes instead of the paper's 38/27/17/20.
        presets: ``"gzsl"`` / ``"zsl"`` -> the shipped preset's settings.
        table1: paper Table 1, DEDN: T, U, S, H in percent.
        peers_table1: method name -> its published T, U, S, H in percent (:data:`PEER_SOURCES` says where
            each was printed). Every one of them was selected on the test split by its released code.
        table3: paper Table 3, row key (:data:`TABLE3_ROWS`) -> T, U, S, H in percent.
        half_clusters_drop: paper section 4.3 (Figure 5b): points of H and T lost when the clusters are
            halved.
        feature_channels, word_vector_dim: C of the feature maps and G of the attribute word vectors.
    """

    name: str
    aliases: tuple[str, ...]
    n_images: int
    n_classes: int
    n_seen: int
    n_unseen: int
    n_val: int
    n_attributes: int
    n_trainval: int
    n_test_seen: int
    n_test_unseen: int
    image_size: int
    feature_size: int
    clusters: Mapping[str, Ranges]
    presets: Mapping[str, PresetSettings]
    table1: Mapping[str, float]
    peers_table1: Mapping[str, Mapping[str, float]]
    table3: Mapping[str, Mapping[str, float]]
    half_clusters_drop: Mapping[str, float]
    feature_channels: int = FEATURE_CHANNELS
    word_vector_dim: int = WORD_VECTOR_DIM

    def expected_counts(self) -> dict[str, int]:
        """The counts an xlsa17 folder of this benchmark must have, keyed as the reader reports them."""
        return {"classes": self.n_classes, "seen": self.n_seen, "unseen": self.n_unseen,
                "attributes": self.n_attributes, "images": self.n_images, "trainval": self.n_trainval,
                "test_seen": self.n_test_seen, "test_unseen": self.n_test_unseen}

    def cluster_ranges(self, variant: str = "paper") -> Ranges:
        """The attribute clusters of ``variant`` (``"paper"`` or ``"reference"``) as index ranges."""
        if variant not in self.clusters:
            raise ConfigError(f"cluster variant must be paper or reference, got {variant!r}")
        return self.clusters[variant]


def _tush(*values: float) -> dict[str, float]:
    return dict(zip("TUSH", values, strict=True))


def _table3(*rows: tuple[float, float, float, float]) -> dict[str, dict[str, float]]:
    return {key: _tush(*row) for key, row in zip(TABLE3_ROWS, rows, strict=True)}


_CUB_CLUSTERS: Ranges = {
    "head": ((0, 9), (94, 105), (120, 167), (182, 197), (278, 308)),
    "torso": ((24, 73), (105, 120), (197, 212), (236, 240), (244, 248)),
    "wing": ((9, 24), (212, 217), (308, 312)),
    "tail": ((73, 94), (167, 182), (240, 244)),
    "leg": ((263, 278),),
    "whole": ((217, 236), (248, 263)),
}
# AWA2: both modes use this grouping (18/15/38/14). The paper's table lists 18/14/13/40, which comes from
# constants the released code defines but never uses.
_AWA2_CLUSTERS: Ranges = {
    "texture": ((0, 18),),
    "organ": ((18, 33),),
    "abstract": ((33, 64), (78, 85)),
    "environment": ((64, 78),),
}

_CUB = Benchmark(
    name="CUB", aliases=("CUB-200", "CUB_200_2011"),
    n_images=11788, n_classes=200, n_seen=150, n_unseen=50, n_val=50, n_attributes=312,
    n_trainval=7057, n_test_seen=1764, n_test_unseen=2967,
    image_size=448, feature_size=14,
    clusters={"paper": _CUB_CLUSTERS, "reference": _CUB_CLUSTERS},
    presets={"gzsl": PresetSettings(80, 0.8, 0.9, True, 0.0, 214, None),
             "zsl": PresetSettings(80, 0.6, 0.9, True, 0.18, 214, None)},
    table1=_tush(77.4, 70.9, 70.0, 70.4),
    peers_table1={"dazle": _tush(66.0, 56.7, 59.6, 58.1), "msdn": _tush(76.1, 68.7, 67.5, 68.1),
                  "transzero": _tush(76.8, 69.3, 68.3, 68.8)},
    table3=_table3((74.6, 62.4, 71.4, 66.6), (75.5, 68.1, 67.9, 68.0), (75.7, 66.7, 70.7, 68.6),
                   (77.0, 58.7, 73.6, 65.3), (75.8, 73.2, 62.5, 67.4), (77.6, 63.3, 72.8, 67.7),
                   (77.4, 70.9, 70.0, 70.4)),
    half_clusters_drop={"H": 0.6, "T": 0.7},
)

_SUN = Benchmark(
    name="SUN", aliases=("SUN Attributes",),
    n_images=14340, n_classes=717, n_seen=645, n_unseen=72, n_val=65, n_attributes=102,
    n_trainval=10320, n_test_seen=2580, n_test_unseen=1440,
    image_size=448, feature_size=14,
    clusters={
        "paper": {
            "function": ((0, 38),),
            "instance": ((38, 65),),
            "environment": ((65, 74), (77, 85)),
            "light": ((74, 77), (85, 102)),
        },
        # What the released code's slices select: 64/27/9/2 attributes.
        "reference": {
            "function_ref": ((0, 38), (65, 77), (86, 93), (94, 99), (100, 102)),
            "instance_ref": ((38, 65),),
            "environment_ref": ((77, 85), (93, 94)),
            "light_ref": ((85, 86), (99, 100)),
        },
    },
    presets={"gzsl": PresetSettings(80, 0.95, 0.3, False, 0.0, 2339, 256),
             "zsl": PresetSettings(80, 0.95, 0.3, False, 0.0, 2339, 128)},
    table1=_tush(67.4, 54.7, 36.0, 43.5),
    peers_table1={"dazle": _tush(59.4, 52.3, 24.3, 33.2), "msdn": _tush(65.8, 52.2, 34.2, 41.3),
                  "transzero": _tush(65.6, 52.6, 33.4, 40.8)},
    table3=_table3((64.0, 41.6, 35.7, 38.4), (64.0, 42.8, 35.5, 38.7), (65.2, 47.3, 35.0, 40.3),
                   (65.8, 48.5, 34.6, 40.4), (66.0, 56.5, 34.3, 42.7), (65.5, 47.5, 35.3, 40.5),
                   (67.4, 54.7, 36.0, 43.5)),
    half_clusters_drop={"H": 1.0, "T": 0.2},
)

_AWA2 = Benchmark(
    name="AWA2", aliases=("Animals with Attributes 2",),
    n_images=37322, n_classes=50, n_seen=40, n_unseen=10, n_val=13, n_attributes=85,
    n_trainval=23527, n_test_seen=5882, n_test_unseen=7913,
    image_size=224, feature_size=7,
    clusters={"paper": _AWA2_CLUSTERS, "reference": _AWA2_CLUSTERS},
    presets={"gzsl": PresetSettings(20, 0.8, 0.5, True, 0.11, 87778, None),
             "zsl": PresetSettings(20, 0.8, 0.5, False, 0.11, 87778, None)},
    table1=_tush(75.8, 68.0, 76.5, 72.0),
    peers_table1={"dazle": _tush(67.9, 60.3, 75.7, 67.1), "msdn": _tush(70.1, 62.0, 74.5, 67.7),
                  "transzero": _tush(70.1, 61.3, 82.3, 70.2)},
    table3=_table3((71.1, 62.8, 78.8, 69.9), (71.1, 62.9, 79.1, 70.1), (72.1, 63.8, 79.3, 70.7),
                   (74.6, 61.7, 79.8, 69.6), (73.1, 66.5, 72.4, 69.3), (74.6, 64.8, 76.8, 70.3),
                   (75.8, 68.0, 76.5, 72.0)),
    half_clusters_drop={"H": 6.8, "T": 11.0},
)

#: Canonical name -> benchmark, in the order CUB, SUN, AWA2.
BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (_CUB, _SUN, _AWA2)}


def _key(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(name).upper())


_BY_KEY: dict[str, Benchmark] = {_key(n): b for b in BENCHMARKS.values() for n in (b.name, *b.aliases)}


def find_benchmark(name: str | None) -> Benchmark | None:
    """The benchmark ``name`` spells (any case; spaces and punctuation ignored), else ``None``."""
    return None if name is None else _BY_KEY.get(_key(name))


def get_benchmark(name: str | None) -> Benchmark:
    """The benchmark ``name`` spells, as :func:`find_benchmark`.

    Raises:
        ConfigError: ``name`` is none of CUB, SUN, AWA2 or their aliases.
    """
    bench = find_benchmark(name)
    if bench is None:
        raise ConfigError(f"unknown benchmark {name!r}; known are {', '.join(BENCHMARKS)} (also spelled "
                          + ", ".join(a for b in BENCHMARKS.values() for a in b.aliases) + ")")
    return bench
