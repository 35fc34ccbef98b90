"""The benchmark table: its counts against the real xlsa17 files, its clusters, aliases, presets and paper numbers."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from dedn.config import load_config
from dedn.data.benchmarks import BENCHMARKS, TABLE3_ROWS, find_benchmark, get_benchmark
from dedn.data.clusters import builtin_clusters, validate_clusters
from dedn.data.semantics import load_word_vectors
from dedn.data.xlsa17 import canonical_dataset, load_attribute_names, load_class_list
from dedn.errors import ConfigError

from .conftest import shared_dir

NAMES = list(BENCHMARKS)
NAME_FILE = {"CUB": "attributes.txt", "SUN": "attributes.mat", "AWA2": "predicates.txt"}
PRESETS = Path(str(resources.files("dedn.configs"))) / "presets"


@pytest.mark.parametrize("ds", NAMES)
def test_counts_match_the_real_files(ds: str) -> None:
    b = BENCHMARKS[ds]
    folder = shared_dir(ds)
    # Read the files directly, not through read_semantic_dir, which checks against this very table.
    mat = scipy.io.loadmat(folder / "att_splits.mat")
    assert mat["att"].shape == (b.n_attributes, b.n_classes)
    assert len(mat["allclasses_names"]) == b.n_classes
    assert [mat[k].size for k in ("trainval_loc", "test_seen_loc", "test_unseen_loc")] == [
        b.n_trainval, b.n_test_seen, b.n_test_unseen]
    with np.load(folder / f"semantic_{ds}.npz") as z:
        labels = z["labels"]
    assert labels.size == b.n_images == b.n_trainval + b.n_test_seen + b.n_test_unseen
    seen = np.unique(labels[mat["trainval_loc"].ravel().astype(np.int64) - 1])
    unseen = np.unique(labels[mat["test_unseen_loc"].ravel().astype(np.int64) - 1])
    assert (seen.size, unseen.size) == (b.n_seen, b.n_unseen) and b.n_seen + b.n_unseen == b.n_classes
    assert len(load_class_list(folder / "trainvalclasses.txt")) == b.n_seen
    assert len(load_class_list(folder / "testclasses.txt")) == b.n_unseen
    assert len(load_class_list(folder / "valclasses1.txt")) == b.n_val
    assert len(load_class_list(folder / "trainclasses1.txt")) == b.n_seen - b.n_val
    assert len(load_attribute_names(folder / NAME_FILE[ds])) == b.n_attributes
    assert load_word_vectors(folder / f"{ds}_attribute.pkl").shape == (b.n_attributes, b.word_vector_dim)


@pytest.mark.parametrize("ds", NAMES)
def test_feature_maps_follow_from_the_image_size(ds: str) -> None:
    b = BENCHMARKS[ds]
    assert b.image_size == 32 * b.feature_size  # ResNet-101 layer4 has stride 32
    assert b.feature_channels == 2048


@pytest.mark.parametrize("ds", NAMES)
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_every_cluster_definition_covers_each_attribute_once(ds: str, variant: str) -> None:
    b = BENCHMARKS[ds]
    ranges = b.cluster_ranges(variant)
    assert ranges and all(ranges.values())
    assert all(0 <= lo < hi <= b.n_attributes for spans in ranges.values() for lo, hi in spans)
    members = np.concatenate([np.arange(lo, hi) for spans in ranges.values() for lo, hi in spans])
    np.testing.assert_array_equal(np.bincount(members, minlength=b.n_attributes), np.ones(b.n_attributes))
    validate_clusters(builtin_clusters(ds, variant), b.n_attributes, f"{ds} {variant}")


def test_cluster_variants_differ_only_for_sun() -> None:
    sizes = {ds: {v: [sum(hi - lo for lo, hi in spans) for spans in b.cluster_ranges(v).values()]
                  for v in ("paper", "reference")} for ds, b in BENCHMARKS.items()}
    assert sizes["SUN"] == {"paper": [38, 27, 17, 20], "reference": [64, 27, 9, 2]}
    for ds in ("CUB", "AWA2"):
        assert BENCHMARKS[ds].cluster_ranges("paper") == BENCHMARKS[ds].cluster_ranges("reference")
    with pytest.raises(ConfigError, match="paper or reference"):
        BENCHMARKS["CUB"].cluster_ranges("half")


@pytest.mark.parametrize("spelling", ["cub", "CUB-200", "cub_200_2011", "Sun", "SUN attributes", "awa2", "AwA2",
                                      "Animals_with_Attributes2", "animals with attributes 2"])
def test_aliases_name_the_same_benchmark_as_canonical_dataset(spelling: str) -> None:
    assert get_benchmark(spelling).name == find_benchmark(spelling).name == canonical_dataset(spelling)


def test_unknown_names() -> None:
    assert find_benchmark(None) is None and find_benchmark("AWA1") is None and canonical_dataset("imagenet") is None
    with pytest.raises(ConfigError, match="unknown benchmark 'AWA1'; known are CUB, SUN, AWA2"):
        get_benchmark("AWA1")


@pytest.mark.parametrize("ds", NAMES)
@pytest.mark.parametrize("task", ["gzsl", "zsl"])
def test_shipped_presets_match_the_table(ds: str, task: str) -> None:
    p = BENCHMARKS[ds].presets[task]
    cfg = load_config(PRESETS / f"{ds.lower()}-{task}.yaml")
    assert cfg.data.dataset == ds
    assert (cfg.train.epochs, cfg.model.l_rc, cfg.model.l_e, cfg.train.balanced, cfg.loss.lamb, cfg.seed,
            cfg.model.low_rank) == (p.epochs, p.l_rc, p.l_e, p.balanced, p.lamb, p.seed, p.low_rank)


@pytest.mark.parametrize("ds", NAMES)
def test_published_numbers_are_consistent(ds: str) -> None:
    b = BENCHMARKS[ds]
    assert tuple(b.table3) == TABLE3_ROWS
    assert b.table3["full"] == b.table1  # Table 3's full model is Table 1's DEDN row
    for row in (b.table1, *b.table3.values()):
        assert tuple(row) == ("T", "U", "S", "H")
        u, s = row["U"], row["S"]
        # H is the harmonic mean of U and S; the paper rounds all three (its SUN fExp row is 0.11 off), so
        # this catches transcription slips, not rounding.
        assert row["H"] == pytest.approx(2 * u * s / (u + s), abs=0.15)
    assert set(b.half_clusters_drop) == {"H", "T"}


def test_table3_experiment_rows_are_the_papers() -> None:
    from dedn.apps.experiments import TABLE3_ROWS as EXPERIMENT_ROWS

    assert tuple(row.key for row in EXPERIMENT_ROWS) == TABLE3_ROWS
