"""Feature store safety (issue 9, "nothing lost, nothing silent"): each reproduced fault is now one clear
``error:`` line with exit status 2, and every file that existed before the command is left byte-identical."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from dedn.atomic import temporary_name
from dedn.data.hdf5 import ImportOptions, import_hdf5
from dedn.data.store import FeatureStore, load_zsldata

from .conftest import run_cli

N, C, H, W = 240, 4, 2, 2
K, D, G = 5, 4, 3
CHUNK = 80  # three chunks: images 0-79, 80-159, 160-239


# ---------------------------------------------------------------------------------------------- helpers
def _write_h5(path: Path, seed: int = 0) -> np.ndarray:
    """A small DAZLE/DEDN-layout file; files of different seeds differ only in their feature maps (same size)."""
    rng = np.random.default_rng(1)
    labels = np.arange(N) % K
    feats = np.random.default_rng(seed).normal(size=(N, C, H, W)).astype(np.float32)
    idx = np.arange(N)
    with h5py.File(path, "w") as f:
        f["feature_map"] = feats
        f["labels"] = labels
        f["trainval_loc"] = idx[labels < 3][:100]
        f["test_seen_loc"] = idx[labels < 3][100:]
        f["test_unseen_loc"] = idx[labels >= 3]
        f["att"] = rng.random((K, D)).astype(np.float32)
        f["original_att"] = rng.random((K, D)).astype(np.float32) * 100
        f["w2v_att"] = rng.normal(size=(D, G)).astype(np.float32)
    return feats


def _import(h5: Path, store: Path) -> FeatureStore:
    return import_hdf5(h5, store, ImportOptions(chunk_size=CHUNK, block_size=32, progress=False))


def _snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (files or folders), to prove a refused command changed nothing."""
    out = {}
    for root in roots:
        for p in sorted([root] if root.is_file() else root.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out




def _refused(args: list[str], monkeypatch, capsys, *needles: str) -> str:
    """Run a command that must fail: exit 2, one `error:` line holding ``needles``, no traceback."""
    code, _, err = run_cli(args, monkeypatch, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _ok(args: list[str], monkeypatch, capsys) -> str:
    code, out, err = run_cli(args, monkeypatch, capsys)
    assert code == 0, err
    return out


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    h5 = tmp_path / "f.h5"
    feats = _write_h5(h5)
    _import(h5, tmp_path / "s")
    return h5, tmp_path / "s", feats


# ---------------------------------------------------------------------------------------------- 1. header hash
@pytest.mark.parametrize("edit", [
    {"shape": [2, 4, 2]},  # same byte count, another shape
    {"shape": [2, 2, 2], "dtype": "float32"},  # same byte count, another dtype
])
def test_edited_header_is_refused(imported, monkeypatch, capsys, edit) -> None:
    h5, store, _ = imported
    meta = store / "store.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), **edit}))
    before = _snapshot(store, h5)
    for cmd in (["store", "info", store], ["store", "verify", store], ["store", "export", store, h5.parent / "o.h5"],
                ["store", "import", h5, store]):
        _refused(cmd, monkeypatch, capsys, str(meta), "store.json was edited: its header hash does not match",
                 "re-import or re-extract the store")
    assert _snapshot(store, h5) == before
    assert not (h5.parent / "o.h5").exists()


@pytest.mark.parametrize("absent", [("header_sha256",), ("chunk_checksums",), ("header_sha256", "chunk_checksums")])
def test_a_store_without_its_hashes_is_refused(imported, monkeypatch, capsys, absent) -> None:
    h5, store, feats = imported
    meta = store / "store.json"
    info = json.loads(meta.read_text())
    for key in absent:
        del info[key]
    meta.write_text(json.dumps(info))
    before = _snapshot(store, h5)
    for cmd in (["store", "info", store], ["store", "verify", store], ["store", "import", h5, store]):
        _refused(cmd, monkeypatch, capsys, f"{store}: this feature store was written by an earlier dedn",
                 f"no {' and no '.join(absent)}", "re-create it with `dedn extract` or `dedn store import`")
    assert _snapshot(store, h5) == before
    _ok(["store", "import", h5, store, "--overwrite"], monkeypatch, capsys)
    np.testing.assert_array_equal(FeatureStore.open(store)[:], feats.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------- 2. chunk checksums
def test_verify_names_the_damaged_chunks(imported, monkeypatch, capsys) -> None:
    h5, store, _ = imported
    out = _ok(["store", "verify", store], monkeypatch, capsys)
    assert out.strip() == f"OK: {store}: 3/3 chunks match their checksums; labels and semantic side readable"
    row_bytes = C * H * W * 2
    _flip_byte(store / "features.bin", 100 * row_bytes + 3)  # image 100: chunk 1
    before = _snapshot(store, h5)
    _refused(["store", "verify", store], monkeypatch, capsys, str(store / "features.bin"),
             "1 of 3 completed chunks do not match", "chunk 1 (images 80 to 159)", f"dedn store import {h5}")
    assert _snapshot(store, h5) == before
    # A chunk marked complete by hand (no checksum) is not trusted either.
    meta = store / "store.json"
    info = json.loads(meta.read_text())
    del info["chunk_checksums"]["2"]
    meta.write_text(json.dumps(info))
    _refused(["store", "verify", store], monkeypatch, capsys,
             "chunk 2 (images 160 to 239) is marked complete without a checksum")


def test_verify_refuses_an_incomplete_store(tmp_path, monkeypatch, capsys) -> None:
    store = FeatureStore.create(tmp_path / "s", N, (C, H, W), chunk_size=CHUNK)
    store.write_chunk(0, np.zeros((CHUNK, C, H, W), np.float32))
    _refused(["store", "verify", store.path], monkeypatch, capsys, "incomplete (2 of 3 chunks missing")
    assert store.verify(require_complete=False).missing == [1, 2]


def test_sharded_rank_marks_carry_checksums(tmp_path, monkeypatch, capsys) -> None:
    x = np.random.default_rng(0).normal(size=(N, C, H, W)).astype(np.float32)
    store = FeatureStore.create(tmp_path / "s", N, (C, H, W), chunk_size=CHUNK)
    for i, rank in ((0, 0), (1, 1), (2, 1)):
        store.write_rows(i * CHUNK, x[i * CHUNK:(i + 1) * CHUNK])
        store.mark_complete(i, rank=rank)
    rank1 = json.loads((tmp_path / "s" / "complete.rank1.json").read_text())
    assert rank1["chunks"] == [1, 2] and set(rank1["checksums"]) == {"1", "2"}
    assert FeatureStore.open(tmp_path / "s").verify().verified == 3  # before the merge: from the rank files
    store.merge_rank_marks()
    assert not list((tmp_path / "s").glob("complete.rank*"))
    assert set(json.loads((tmp_path / "s" / "store.json").read_text())["chunk_checksums"]) == {"0", "1", "2"}
    assert "3/3 chunks match" in _ok(["store", "verify", tmp_path / "s"], monkeypatch, capsys)
    _flip_byte(tmp_path / "s" / "features.bin", 200 * C * H * W * 2)
    _refused(["store", "verify", tmp_path / "s"], monkeypatch, capsys, "chunk 2 (images 160 to 239)")


# ---------------------------------------------------------------------------------------------- 3. source identity
def _interrupted_import(h5: Path, store: Path, monkeypatch) -> None:
    """An import stopped after its first chunk (80 of 240 images), as by Ctrl-C."""
    original = FeatureStore.write_rows

    def stop_in_chunk_1(self, start, array):
        if start >= CHUNK:
            raise KeyboardInterrupt
        original(self, start, array)

    monkeypatch.setattr(FeatureStore, "write_rows", stop_in_chunk_1)
    with pytest.raises(KeyboardInterrupt):
        _import(h5, store)
    monkeypatch.setattr(FeatureStore, "write_rows", original)
    assert FeatureStore.open(store).completed_chunks == [0]


def test_resume_from_another_file_of_the_same_size_is_refused(tmp_path, monkeypatch, capsys) -> None:
    f, g = tmp_path / "f.h5", tmp_path / "g.h5"
    feats = _write_h5(f, seed=0)
    _write_h5(g, seed=1)
    assert f.stat().st_size == g.stat().st_size  # same size, labels and splits: only the maps differ
    store = tmp_path / "s"
    _interrupted_import(f, store, monkeypatch)
    before = _snapshot(store, f, g)
    _refused(["store", "import", g, store], monkeypatch, capsys, str(store), "started from another file",
             "source_fingerprint", f"resume it from {f.resolve()}", "--overwrite")
    # An in-place edit of a map the fingerprint does not sample: caught by the mtime.
    h = tmp_path / "h.h5"
    shutil.copy2(f, h)
    with h5py.File(h, "r+") as fh:
        fh["feature_map"][5] = 0.0
    os.utime(h, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    _refused(["store", "import", h, store], monkeypatch, capsys, "started from another file", "source_mtime_ns")
    assert _snapshot(store, f, g) == before
    # The original file resumes it.
    out = _ok(["store", "import", f, store], monkeypatch, capsys)
    assert "resuming the import" in out and "2 of 3 chunks left" in out
    np.testing.assert_array_equal(FeatureStore.open(store)[:], feats.astype(np.float16).astype(np.float32))


def test_import_onto_a_complete_store(imported, monkeypatch, capsys) -> None:
    f, store, _ = imported
    g = f.parent / "g.h5"
    g_feats = _write_h5(g, seed=1)
    before = _snapshot(store, f, g)
    _refused(["store", "import", g, store], monkeypatch, capsys, f"{store} is already a complete import of "
             f"{f.resolve()}", "nothing was changed", "--overwrite")
    assert _snapshot(store, f, g) == before
    out = _ok(["store", "import", f, store], monkeypatch, capsys)  # the same file again: a no-op
    assert "already imported from" in out and "nothing to do" in out
    assert _snapshot(store, f, g) == before
    _ok(["store", "import", g, store, "--overwrite"], monkeypatch, capsys)
    replaced = FeatureStore.open(store)
    assert replaced.provenance["source_file"] == str(g.resolve())
    np.testing.assert_array_equal(replaced[:], g_feats.astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------------------------------------- 4. disk full
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds the file being synced through /proc")
def test_disk_full_while_writing_meta(tmp_path, monkeypatch, capsys) -> None:
    f = tmp_path / "f.h5"
    _write_h5(f)
    store = tmp_path / "s"
    real_fsync = os.fsync

    def full_for_meta(fd: int) -> None:
        if ".meta.npz.tmp-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_meta)
    before = _snapshot(f)
    _refused(["store", "import", f, store], monkeypatch, capsys, f"could not write {store / 'meta.npz'}",
             "No space left on device", "free disk space")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert _snapshot(f) == before
    assert not [p.name for p in store.iterdir() if ".tmp" in p.name]  # no temporary file left behind
    assert not (store / "meta.npz").exists() and not FeatureStore.open(store).complete
    _refused(["store", "verify", store], monkeypatch, capsys, "semantic side is missing")
    # A re-run writes the semantic side first, then the chunks.
    out = _ok(["store", "import", f, store], monkeypatch, capsys)
    assert "wrote the missing or damaged semantic side" in out
    assert "1/1 chunks match" in _ok(["store", "verify", store], monkeypatch, capsys)  # CLI default: 256 images
    assert load_zsldata(store).att.shape == (K, D)


def test_complete_store_without_meta_is_not_reported_imported(imported, monkeypatch, capsys) -> None:
    f, store, _ = imported
    (store / "meta.npz").unlink()  # what the old importer left after a full disk
    before = _snapshot(store, f)
    _refused(["store", "verify", store], monkeypatch, capsys, "semantic side is missing (att, w2v",
             f"`dedn store import {f.resolve()} {store}` writes meta.npz again")
    _refused(["store", "export", store, f.parent / "o.h5"], monkeypatch, capsys, "no semantic side")
    assert _snapshot(store, f) == before
    out = _ok(["store", "import", f, store], monkeypatch, capsys)
    assert "wrote the missing or damaged semantic side" in out and "nothing to do" in out
    assert "labels and semantic side readable" in _ok(["store", "verify", store], monkeypatch, capsys)


def test_temporary_names_are_unique(tmp_path) -> None:
    names = {temporary_name(tmp_path / "store.json").name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(f".store.json.tmp-{os.getpid()}-") for n in names)


# ---------------------------------------------------------------------------------------------- 5. corrupt meta.npz
@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_meta_npz(imported, monkeypatch, capsys, damage) -> None:
    f, store, _ = imported
    meta = store / "meta.npz"
    if damage == "truncate":
        meta.write_bytes(meta.read_bytes()[: meta.stat().st_size // 2])
    elif damage == "flip":
        _flip_byte(meta, 100)  # inside the first array's data: a CRC error
    else:
        meta.write_bytes(b"not a zip file at all" * 10)
    out = f.parent / "o.h5"
    before = _snapshot(store, f)
    for cmd in (["store", "verify", store], ["store", "export", store, out]):
        _refused(cmd, monkeypatch, capsys, f"{meta} is corrupt",
                 f"re-import the store (`dedn store import {f.resolve()} {store}` writes meta.npz again)")
    assert _snapshot(store, f) == before and not out.exists()
    # What the message suggests repairs it.
    assert "wrote the missing or damaged" in _ok(["store", "import", f, store], monkeypatch, capsys)
    _ok(["store", "export", store, out], monkeypatch, capsys)


# ---------------------------------------------------------------------------------------------- 6. export
def test_export_never_replaces_its_own_source(imported, monkeypatch, capsys) -> None:
    f, store, _ = imported
    link, hard = f.parent / "link.h5", f.parent / "hard.h5"
    link.symlink_to(f)
    os.link(f, hard)
    before = _snapshot(store, f)
    for target in (f, link, hard):
        for extra in ([], ["--overwrite"]):
            _refused(["store", "export", store, target, *extra], monkeypatch, capsys,
                     "is the file this store was imported from", "original float32 feature maps", "float16")
    _refused(["store", "export", store, store / "features.bin", "--overwrite"], monkeypatch, capsys,
             "inside the feature store")
    assert _snapshot(store, f) == before
    with h5py.File(f, "r") as fh:
        assert fh["feature_map"].dtype == np.float32


def test_export_overwrites_only_when_asked(imported, monkeypatch, capsys) -> None:
    f, store, _ = imported
    other = f.parent / "other.h5"
    other.write_bytes(b"somebody's file")
    before = _snapshot(store, f, other)
    _refused(["store", "export", store, other], monkeypatch, capsys, f"{other} already exists", "--overwrite")
    assert _snapshot(store, f, other) == before
    _ok(["store", "export", store, other, "--overwrite"], monkeypatch, capsys)
    with h5py.File(other, "r") as fh:
        np.testing.assert_array_equal(fh["feature_map"][()], FeatureStore.open(store)[:])
    assert not [p.name for p in f.parent.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------- 7. info
def test_info_shows_the_source_identity(imported, monkeypatch, capsys) -> None:
    f, store, _ = imported
    info = json.loads(_ok(["store", "info", store, "--json"], monkeypatch, capsys))
    st = f.stat()
    src = info["source"]
    assert src["file"] == str(f.resolve()) and src["bytes"] == st.st_size and src["mtime_ns"] == st.st_mtime_ns
    assert src["dtype"] == "float32" and len(src["fingerprint"]) == 32
    assert info["header_hash"] == "checked" and info["complete"] and info["chunks_complete"] == 3


# ---------------------------------------------------------------------------------------------- a real process
def test_a_real_process_prints_one_error_line(imported) -> None:
    _, store, _ = imported
    meta = store / "store.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "shape": [2, 4, 2]}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "dedn.cli", "store", "verify", str(store)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {meta} was edited")
