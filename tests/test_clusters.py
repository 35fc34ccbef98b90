"""Attribute clusters: built-in definitions against the real attribute names, K-means, files, checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dedn.data.clusters import (
    builtin_clusters,
    cluster_permutation,
    half_clusters,
    kmeans_clusters,
    load_cluster_file,
    merge_neighbours,
    resolve_clusters,
    validate_clusters,
)
from dedn.data.xlsa17 import load_attribute_names
from dedn.errors import ConfigError, DataError

from .conftest import shared_dir

N_ATT = {"CUB": 312, "SUN": 102, "AWA2": 85}
NAME_FILE = {"CUB": "attributes.txt", "SUN": "attributes.mat", "AWA2": "predicates.txt"}


def names_of(ds: str) -> list[str]:
    return load_attribute_names(shared_dir(ds, NAME_FILE[ds]))


def w2v_of(ds: str) -> np.ndarray:
    with np.load(shared_dir(ds, f"semantic_{ds}.npz")) as z:
        return z["w2v_att"]


def sizes(clusters) -> list[int]:
    return [len(v) for v in clusters.values()]


# ---------------------------------------------------------------------------------------------- built-ins
@pytest.mark.parametrize("ds", ["CUB", "SUN", "AWA2"])
@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_builtin_validates_and_is_sorted(ds, variant):
    clusters = builtin_clusters(ds, variant)
    validate_clusters(clusters, N_ATT[ds], f"{ds} {variant}")
    for idx in clusters.values():
        assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
    half = half_clusters(ds, variant)
    validate_clusters(half, N_ATT[ds], f"{ds} half")
    assert len(half) == {"CUB": 3, "SUN": 2, "AWA2": 2}[ds]


def test_builtin_counts():
    cub = builtin_clusters("CUB")
    assert list(cub) == ["head", "torso", "wing", "tail", "leg", "whole"]
    assert sizes(cub) == [112, 87, 24, 40, 15, 34]
    assert {k: v.tolist() for k, v in cub.items()} == {
        k: v.tolist() for k, v in builtin_clusters("cub", "reference").items()}
    assert sizes(builtin_clusters("SUN", "paper")) == [38, 27, 17, 20]
    sun_ref = builtin_clusters("SUN", "reference")
    assert sizes(sun_ref) == [64, 27, 9, 2] and list(sun_ref)[0] == "function_ref"
    assert sizes(builtin_clusters("AWA2")) == sizes(builtin_clusters("AWA2", "reference")) == [18, 15, 38, 14]
    assert list(half_clusters("CUB")) == ["head+torso", "wing+tail", "leg+whole"]
    assert list(half_clusters("AWA2")) == ["texture+organ", "abstract+environment"]


def test_cub_names_match_parts():
    names = names_of("CUB")
    cub = builtin_clusters("CUB")
    part = {n: n.split("::")[0] for n in names}
    head_words = ("head", "bill", "crown", "eye", "forehead", "nape", "throat")
    torso_words = ("upperparts", "underparts", "breast", "back", "belly")
    for i in cub["head"]:
        assert any(w in part[names[i]] for w in head_words), names[i]
    for i in cub["torso"]:
        assert any(w in part[names[i]] for w in torso_words), names[i]
    for i in cub["wing"]:
        assert "wing" in names[i]
    for i in cub["tail"]:
        assert "tail" in names[i]
    for i in cub["leg"]:
        assert "leg" in names[i]
    for i in cub["whole"]:
        assert part[names[i]] in ("has_size", "has_shape", "has_primary_color"), names[i]


def test_awa2_names_match_groups():
    names = names_of("AWA2")
    awa = {k: {names[i] for i in v} for k, v in builtin_clusters("AWA2").items()}
    assert {"black", "spots", "furry", "big", "lean"} <= awa["texture"]
    assert {"flippers", "hooves", "paws", "tail", "horns", "tusks"} <= awa["organ"]
    assert {"smelly", "swims", "fish", "hunter", "smart", "domestic"} <= awa["abstract"]
    assert {"arctic", "ocean", "forest", "water", "cave"} <= awa["environment"]


def test_sun_names_match_groups():
    names = names_of("SUN")
    sun = {k: {names[i] for i in v} for k, v in builtin_clusters("SUN").items()}
    assert {"sailing/ boating", "driving", "hiking", "praying"} <= sun["function"]
    assert {"trees", "grass", "asphalt", "brick", "glass"} <= sun["instance"]
    assert {"ocean", "snow", "fire", "rusty", "dry"} <= sun["environment"]
    assert {"natural light", "direct sun/sunny", "warm", "man-made", "open area", "stressful"} <= sun["light"]
    ref = {k: {names[i] for i in v} for k, v in builtin_clusters("SUN", "reference").items()}
    assert ref["light_ref"] == {"warm", "scary"}
    assert {"natural light", "cold", "driving"} <= ref["function_ref"]


def test_builtin_unknown_dataset():
    with pytest.raises(ConfigError, match="no built-in attribute clusters"):
        builtin_clusters("APY")
    with pytest.raises(ConfigError, match="variant"):
        builtin_clusters("CUB", "other")


def test_merge_neighbours_odd():
    c = {"a": np.array([0]), "b": np.array([3]), "c": np.array([1]), "d": np.array([2]), "e": np.array([4])}
    merged = merge_neighbours(c)
    assert {k: v.tolist() for k, v in merged.items()} == {"a+b": [0, 3], "c+d+e": [1, 2, 4]}


def test_cluster_permutation():
    perm = cluster_permutation(builtin_clusters("AWA2"))
    assert sorted(perm.tolist()) == list(range(85)) and perm[:3].tolist() == [0, 1, 2]


# ---------------------------------------------------------------------------------------------- k-means
def test_kmeans_deterministic_and_valid():
    w = np.random.default_rng(1).normal(size=(40, 8))
    a = kmeans_clusters(w, 5, seed=3)
    b = kmeans_clusters(w, 5, seed=3)
    assert list(a) == ["k0", "k1", "k2", "k3", "k4"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    validate_clusters(a, 40, "kmeans")
    assert [int(v[0]) for v in a.values()] == sorted(int(v[0]) for v in a.values())


def test_kmeans_real_sun_with_zero_row():
    w = w2v_of("SUN")
    clusters = kmeans_clusters(w, 4, seed=0)
    validate_clusters(clusters, 102, "kmeans SUN")
    assert min(sizes(clusters)) >= 1


def test_kmeans_too_many_clusters():
    w = np.repeat(np.eye(3), 4, axis=0)  # 12 attributes, 3 distinct directions
    assert len(kmeans_clusters(w, 3)) == 3
    with pytest.raises(DataError, match="3 distinct"):
        kmeans_clusters(w, 4)


# ---------------------------------------------------------------------------------------------- files
NAMES = ["red", "green", "blue", "big", "small", "fast"]


def test_cluster_file_names_indices_ranges(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("colour: [red, 1, blue]\nsize: ['3:5']\nmotion: [fast]\n")
    got = load_cluster_file(f, NAMES)
    assert list(got) == ["colour", "size", "motion"]
    assert {k: v.tolist() for k, v in got.items()} == {"colour": [0, 1, 2], "size": [3, 4], "motion": [5]}
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"b": [5, 4, 3], "a": ["green", "red", "blue"]}))
    got = load_cluster_file(j, NAMES)
    assert list(got) == ["b", "a"] and got["b"].tolist() == [3, 4, 5] and got["a"].dtype == np.int64


def test_cluster_file_as_a_csv_of_attribute_and_group(tmp_path):
    f = tmp_path / "groups.csv"
    f.write_text("\ufeffattribute,group\nbig,size\nred,colour\n\ngreen,colour\nblue,colour\nsmall,size\nfast,motion\n")
    got = load_cluster_file(f, NAMES)  # groups in the order they first appear; a spreadsheet's BOM is no problem
    assert {k: v.tolist() for k, v in got.items()} == {"size": [3, 4], "colour": [0, 1, 2], "motion": [5]}
    assert list(got) == ["size", "colour", "motion"]
    f.write_text("name,cluster\nred,a\n")
    with pytest.raises(DataError, match="groups.csv: a groups CSV starts with the header 'attribute,group'"):
        load_cluster_file(f, NAMES)
    f.write_text("attribute,group\nred,\n")
    with pytest.raises(DataError, match=r"groups.csv: row 2 needs an attribute name and a group"):
        load_cluster_file(f, NAMES)
    f.write_text("attribute,group\nred,a\ngreen,a\nblue,a\nbig,b\nsmall,b\nfast,b\nred,b\n")
    with pytest.raises(DataError, match=r"clusters 'a' and 'b' overlap in attributes 0 \(red\)"):
        load_cluster_file(f, NAMES)


def test_cluster_file_real_cub_names(tmp_path):
    names = names_of("CUB")
    f = tmp_path / "cub.yaml"
    legs = [n for n in names if n.startswith("has_leg_color")]
    f.write_text("legs: " + json.dumps(legs) + "\nrest: " + json.dumps(["0:263", "278:312"]) + "\n")
    got = load_cluster_file(f, names)
    assert got["legs"].tolist() == list(range(263, 278))


@pytest.mark.parametrize("text,match", [
    ("a: [red, green, blue]\nb: [blue, big, small, fast]\n", r"overlap in attributes 2 \(blue\)"),
    ("a: [red, green, blue]\nb: [big, small]\n", r"1 attributes are in no cluster: 5 \(fast\)"),
    ("a: [red, green, blue, big, small, fast]\nb: []\n", "cluster 'b' is empty"),
    ("a: [0, 1, 2, 3, 4, 5, 6]\n", "outside 0..5"),
    ("a: [red, red, green, blue, big, small, fast]\n", "lists attributes twice"),
    ("a: [redd, green, blue, big, small, fast]\n", r"unknown attributes \['redd'\] \(did you mean"),
    ("a: red\n", "must be a list"),
    ("- red\n", "must map each cluster name"),
    ("a: [1.5]\n", "neither an attribute index nor a name"),
])
def test_cluster_file_errors(tmp_path, text, match):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(DataError, match=match) as err:
        load_cluster_file(f, NAMES)
    assert str(f) in str(err.value)


def test_cluster_file_missing(tmp_path):
    with pytest.raises(DataError, match="cluster file not found"):
        load_cluster_file(tmp_path / "none.yaml", NAMES)


def test_validate_errors():
    with pytest.raises(DataError, match="src: no attribute clusters"):
        validate_clusters({}, 3, "src")
    with pytest.raises(DataError, match=r"src: clusters 'a' and 'b' overlap in attributes 1, 2;"):
        validate_clusters({"a": np.array([0, 1, 2]), "b": np.array([1, 2, 3])}, 4, "src")


# ---------------------------------------------------------------------------------------------- resolve
def test_resolve_specs(tmp_path):
    w = np.random.default_rng(0).normal(size=(102, 16))
    names = [f"a{i}" for i in range(102)]
    assert sizes(resolve_clusters("auto", "SUN", "paper", w, names)) == [38, 27, 17, 20]
    assert sizes(resolve_clusters("auto", "sun", "reference", w, names)) == [64, 27, 9, 2]
    assert sizes(resolve_clusters("paper", "SUN", "reference", w, names)) == [38, 27, 17, 20]
    assert sizes(resolve_clusters("half", "SUN", "paper", w, names)) == [65, 37]
    assert sizes(resolve_clusters("half", "SUN", "reference", w, names)) == [91, 11]
    assert sizes(resolve_clusters("none", None, "paper", w, names)) == [102]
    km = resolve_clusters("kmeans", "SUN", "paper", w, names)
    assert len(km) == 4
    assert len(resolve_clusters("kmeans", None, "paper", w, names, n_clusters=7)) == 7
    own = {"x": np.arange(50), "y": np.arange(50, 102)}
    got = resolve_clusters("auto", "SUN", "paper", w, names, own=own)
    assert list(got) == ["x", "y"] and got["y"].dtype == np.int64
    assert len(resolve_clusters("kmeans", None, "paper", w, names, own=own)) == 2
    assert list(resolve_clusters("half", None, "paper", w, names, own=own)) == ["x+y"]
    f = tmp_path / "c.yaml"
    f.write_text("first: ['0:51']\nsecond: ['51:102']\n")
    assert sizes(resolve_clusters(str(f), None, "paper", w, names)) == [51, 51]


def test_resolve_errors():
    w = np.zeros((10, 3))
    names = [f"a{i}" for i in range(10)]
    with pytest.raises(ConfigError, match="neither one of"):
        resolve_clusters("kmeanz", None, "paper", w, names)
    with pytest.raises(ConfigError, match="no built-in attribute clusters"):
        resolve_clusters("auto", None, "paper", w, names)
    with pytest.raises(ConfigError, match="n_clusters"):
        resolve_clusters("kmeans", None, "paper", np.eye(10), names)
    with pytest.raises(ConfigError, match="mode"):
        resolve_clusters("auto", "CUB", "fast", w, names)
    with pytest.raises(DataError, match="cover 312 attributes but the data has 10"):
        resolve_clusters("auto", "CUB", "paper", w, names)
    with pytest.raises(DataError, match="model.clusters=none"):  # no attributes at all
        resolve_clusters("none", None, "paper", None, [])
