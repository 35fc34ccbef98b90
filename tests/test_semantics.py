"""Safe word-vector loading, row normalisation and offline attribute embedding."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from dedn.data.semantics import (
    RestrictedUnpickler,
    attribute_words,
    embed_attributes,
    load_word_vectors,
    normalize_rows,
    read_word_vectors,
)
from dedn.errors import DataError

from .conftest import shared_dir

# A protocol-0 pickle that would call os.system("echo pwned") if loaded by pickle.load.
# Written by hand so that the test never builds a callable object itself.
MALICIOUS = b"cos\nsystem\n(S'echo pwned'\ntR."
MALICIOUS_P2 = b"\x80\x02cposix\nsystem\nq\x00X\x0b\x00\x00\x00echo pwnedq\x01\x85q\x02Rq\x03."


# ---------------------------------------------------------------------------------------------- unpickler
@pytest.mark.parametrize("payload,refused", [(MALICIOUS, "os.system"), (MALICIOUS_P2, "posix.system")])
def test_unpickler_refuses_os_system(tmp_path, payload, refused):
    with pytest.raises(DataError, match=refused.replace(".", r"\.")):
        RestrictedUnpickler(io.BytesIO(payload), source="x.pkl").load()
    f = tmp_path / "evil.pkl"
    f.write_bytes(payload)
    with pytest.raises(DataError) as err:
        load_word_vectors(f)
    assert str(f) in str(err.value) and refused in str(err.value)


def test_unpickler_refuses_other_globals():
    for module, name in [("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                         ("numpy", "load"), ("numpy.testing", "assert_equal")]:
        payload = f"c{module}\n{name}\n(S'1'\ntR.".encode()
        with pytest.raises(DataError, match=f"{module}.{name}"):
            RestrictedUnpickler(io.BytesIO(payload)).load()


def test_unpickler_codecs_only_latin1():
    payload = b"c_codecs\nencode\n(S'abc'\nS'rot13'\ntR."
    with pytest.raises(DataError, match="not a readable pickle"):
        load_word_vectors_bytes(payload)


def load_word_vectors_bytes(payload: bytes):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "v.pkl"
        f.write_bytes(payload)
        return load_word_vectors(f)


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5])
def test_unpickler_round_trips_arrays(protocol):
    arr = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    out = RestrictedUnpickler(io.BytesIO(pickle.dumps(arr, protocol=protocol)), encoding="latin1").load()
    np.testing.assert_array_equal(out, arr)
    assert out.dtype == arr.dtype
    mixed = {"a": [np.float32(1.5), (np.int64(2),)], "b": arr}
    back = RestrictedUnpickler(io.BytesIO(pickle.dumps(mixed, protocol=protocol)), encoding="latin1").load()
    assert back["a"][0] == np.float32(1.5) and back["a"][1][0] == 2


@pytest.mark.parametrize("ds,d", [("CUB", 312), ("SUN", 102), ("AWA2", 85)])
def test_load_real_pickles(ds, d):
    w = load_word_vectors(shared_dir(ds) / f"{ds}_attribute.pkl")
    assert w.shape == (d, 300) and w.dtype == np.float64
    with np.load(shared_dir(ds) / f"semantic_{ds}.npz") as z:
        np.testing.assert_allclose(w, z["w2v_att"])


# ---------------------------------------------------------------------------------------------- other formats
def test_load_npy_npz_txt(tmp_path):
    arr = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "one.npz", anything=arr)
    np.savez(tmp_path / "named.npz", w2v_att=arr, other=arr[:2])
    np.savetxt(tmp_path / "a.txt", arr)
    for name in ("a.npy", "one.npz", "named.npz"):
        np.testing.assert_array_equal(load_word_vectors(tmp_path / name), arr)
    np.testing.assert_allclose(load_word_vectors(tmp_path / "a.txt"), arr, rtol=1e-6)


def test_load_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_word_vectors(tmp_path / "none.pkl")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):
        load_word_vectors(tmp_path / "obj.npy")
    np.save(tmp_path / "vec.npy", np.ones(4))
    with pytest.raises(DataError, match=r"\(D, G\)"):
        load_word_vectors(tmp_path / "vec.npy")
    np.savez(tmp_path / "two.npz", a=np.ones((2, 2)), b=np.ones((2, 2)))
    with pytest.raises(DataError, match="which array"):
        load_word_vectors(tmp_path / "two.npz")
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]]))
    with pytest.raises(DataError, match="NaN"):
        load_word_vectors(tmp_path / "nan.npy")
    (tmp_path / "v.csv").write_text("1,2\n")
    with pytest.raises(DataError, match="unknown word-vector file type"):
        load_word_vectors(tmp_path / "v.csv")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="junk.pkl"):
        load_word_vectors(tmp_path / "junk.pkl")


# ---------------------------------------------------------------------------------------------- normalisation
def test_normalize_rows_zero_rows_stay_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-30, 0.0]])
    y = normalize_rows(x)
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y[0], [0.6, 0.8])
    np.testing.assert_array_equal(y[1], [0.0, 0.0])
    h = normalize_rows(np.zeros((2, 3), dtype=np.float16))
    assert h.dtype == np.float16 and np.isfinite(h).all()


def test_normalize_real_sun_zero_row():
    w = load_word_vectors(shared_dir("SUN") / "SUN_attribute.pkl")
    assert not w[88].any()  # "man-made": known all-zero row
    y = normalize_rows(w)
    assert np.isfinite(y).all() and not y[88].any()
    norms = np.linalg.norm(np.delete(y, 88, axis=0), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- embedding
VOCAB = {"bill": [1, 0, 0, 0], "shape": [0, 1, 0, 0], "dagger": [0, 0, 1, 0], "wing": [0, 0, 0, 1],
         "color": [1, 1, 0, 0], "blue": [0, 0, 1, 1]}


def write_glove(path: Path, header: bool = False) -> Path:
    lines = [f"{len(VOCAB)} 4"] if header else []
    lines += [w + " " + " ".join(str(float(v)) for v in vec) for w, vec in VOCAB.items()]
    lines.append("Blue 9 9 9 9")  # another spelling: the exact lowercase entry must win
    path.write_text("\n".join(lines) + "\n")
    return path


def test_attribute_words():
    assert attribute_words("has_bill_shape::Dagger") == ["has", "bill", "shape", "dagger"]
    assert attribute_words("sailing/ boating") == ["sailing", "boating"]


@pytest.mark.parametrize("header", [False, True])
def test_embed_with_text_vectors(tmp_path, header):
    model = write_glove(tmp_path / "vec.txt", header)
    texts = ["has_bill_shape::dagger", "has_wing_color::blue"]
    out = embed_attributes(texts, model)
    np.testing.assert_allclose(out[0], [1, 1, 1, 0])  # "has" is unknown: skipped
    np.testing.assert_allclose(out[1], [1, 1, 1, 2])
    mean = embed_attributes(texts, model, reduce="mean")
    np.testing.assert_allclose(mean[0], np.array([1, 1, 1, 0]) / 3)


def test_embed_with_word2vec_binary(tmp_path):
    f = tmp_path / "vec.bin"
    with open(f, "wb") as fh:
        fh.write(f"{len(VOCAB)} 4\n".encode())
        for word, vec in VOCAB.items():
            fh.write(word.encode() + b" " + struct.pack("<4f", *vec) + b"\n")
    assert set(read_word_vectors(f)) == set(VOCAB)
    np.testing.assert_allclose(embed_attributes(["bill shape"], f)[0], [1, 1, 0, 0])


def test_embed_unknown_text_warns_and_pca(tmp_path):
    model = write_glove(tmp_path / "vec.txt")
    with pytest.warns(UserWarning, match="zero vector"):
        out = embed_attributes(["bill", "zzz", "wing blue", "shape color"], model)
    assert not out[1].any()
    red = embed_attributes(["bill", "wing", "blue", "shape color", "dagger"], model, dim=2)
    assert red.shape == (5, 2) and red.dtype == np.float32
    with pytest.raises(DataError, match="PCA"):
        embed_attributes(["bill", "wing"], model, dim=3)


def test_embed_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        embed_attributes(["a"], tmp_path / "missing.txt")
    model = write_glove(tmp_path / "vec.txt")
    with pytest.raises(DataError, match="none of the attribute words"):
        embed_attributes(["qqq"], model)
    (tmp_path / "ragged.txt").write_text("a 1 2\nb 1\n")
    with pytest.raises(DataError, match="line 2"):
        embed_attributes(["a"], tmp_path / "ragged.txt")
    folder = tmp_path / "st-model"
    folder.mkdir()
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        with pytest.raises(DataError, match="sentence_transformers"):
            embed_attributes(["a"], folder)
    else:  # pragma: no cover - only where the optional package is installed
        with pytest.raises(DataError, match="sentence-transformers model"):
            embed_attributes(["a"], folder)
