"""Attribute semantic vectors: safe loading of word-vector files and offline embedding.

Each attribute d has a semantic vector (row of V, D x G). The published benchmarks ship them as
pickles of numpy arrays (``CUB_attribute.pkl`` and friends, D x 300 float64). A pickle can run any
code when loaded, so :func:`load_word_vectors` reads pickles with :class:`RestrictedUnpickler`,
which admits only what numpy array reconstruction needs.

:func:`embed_attributes` computes such vectors for new attribute texts from a local model: a
word-vector text file (word2vec / GloVe text format, or word2vec binary) or a sentence-transformers
folder. Nothing is downloaded.
"""

from __future__ import annotations

import codecs
import io
import pickle
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dedn.errors import DataError

__all__ = [
    "RestrictedUnpickler",
    "attribute_words",
    "embed_attributes",
    "load_word_vectors",
    "normalize_rows",
    "read_word_vectors",
]


# ---------------------------------------------------------------------------------------------- pickles
def _latin1_encode(obj: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode``: pickles of protocol <= 2 store array bytes as latin-1 text."""
    if encoding.replace("-", "").lower() != "latin1" or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1")


def _numpy_global(module: str, name: str) -> Any:
    """The numpy object behind an allowed global, without importing the deprecated ``numpy.core``."""
    if module == "numpy":
        return getattr(np, name)
    try:  # numpy >= 2 keeps the implementation in numpy._core; old pickles still say numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return getattr(numeric if module.endswith(".numeric") else multiarray, name)


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that rebuilds numpy arrays and builtin containers and refuses everything else.

    Admitted globals: ``numpy.ndarray``, ``numpy.dtype``, ``_reconstruct`` and ``scalar`` from
    ``numpy.core.multiarray`` / ``numpy._core.multiarray``, ``_frombuffer`` from ``numpy.core.numeric`` /
    ``numpy._core.numeric`` (protocol-5 array pickles), the builtin containers ``list``, ``tuple``,
    ``dict``, ``set``, ``frozenset``, and ``_codecs.encode`` restricted to latin-1 (protocol-2 pickles
    of arrays store their bytes that way; it only turns text into bytes). Any other global, such as
    ``os.system``, raises :class:`DataError` naming the file and the refused global; nothing is
    imported or called before that check.
    """

    _NUMPY = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        # Protocol-5 pickles of arrays: np.frombuffer(...).reshape(...), it only copies bytes.
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }
    _BUILTINS = {"list", "tuple", "dict", "set", "frozenset"}

    def __init__(self, file: Any, source: str = "<pickle>", **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._NUMPY:
            return _numpy_global(module, name)
        if module in ("builtins", "__builtin__") and name in self._BUILTINS:
            return {"list": list, "tuple": tuple, "dict": dict, "set": set, "frozenset": frozenset}[name]
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise DataError(
            f"{self.source}: refused to load the pickle: it references the global {module}.{name}, and "
            "only numpy arrays and builtin containers are allowed. Convert the file to .npy "
            "(numpy.save) if it is genuine, or do not use it."
        )


def _load_pickle(path: Path) -> Any:
    data = path.read_bytes()
    try:
        # latin1 lets pickles written by Python 2 numpy (array bytes as str) load unchanged.
        return RestrictedUnpickler(io.BytesIO(data), source=str(path), encoding="latin1").load()
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a readable pickle of a numpy array: {exc}") from None


# ---------------------------------------------------------------------------------------------- loading
def load_word_vectors(path: str | Path) -> np.ndarray:
    """Read an attribute semantic-vector matrix (D, G) from .pkl/.pickle, .npy, .npz or .txt.

    Pickles are read with :class:`RestrictedUnpickler`; ``.npy`` with ``allow_pickle=False``; an
    ``.npz`` must hold one array or one named ``w2v_att``, ``w2v`` or ``semantic``; a ``.txt`` is a
    whitespace-separated numeric matrix, one attribute per line. Float dtypes are kept as stored.

    Raises:
        DataError: the file is missing, unreadable, of an unknown kind, not a finite 2-D numeric matrix.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: word-vector file not found (expected a D x G matrix in .pkl, .npy, .npz "
                        "or .txt)")
    suffix = p.suffix.lower()
    try:
        if suffix in (".pkl", ".pickle"):
            obj = _load_pickle(p)
        elif suffix == ".npy":
            obj = np.load(p, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.files)
                key = next((k for k in ("w2v_att", "w2v", "semantic") if k in keys), None)
                if key is None and len(keys) == 1:
                    key = keys[0]
                if key is None:
                    raise DataError(f"{p}: cannot tell which array holds the word vectors among {keys}; "
                                    "name it w2v_att or store only that array")
                obj = z[key]
        elif suffix == ".txt":
            obj = np.loadtxt(p, ndmin=2)
        else:
            raise DataError(f"{p}: unknown word-vector file type {suffix!r}; use .pkl, .npy, .npz or .txt")
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{p}: cannot read word vectors: {exc}") from None
    try:
        arr = np.asarray(obj)
    except Exception as exc:  # ragged lists and the like
        raise DataError(f"{p}: word vectors are not a matrix: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{p}: word vectors must be a non-empty (D, G) matrix, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        arr = arr.astype(np.float64)
    if arr.dtype.kind != "f":
        raise DataError(f"{p}: word vectors must be numeric, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise DataError(f"{p}: word vectors contain NaN or infinite values")
    return arr


def normalize_rows(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each row to unit L2 norm; an all-zero row stays zero (never NaN), like F.normalize.

    The SUN word vectors have an all-zero row (attribute 88, "man-made"), so plain division would
    produce NaN. Dtype is kept for float input.
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    # Divide in float64 so that eps cannot underflow for float16 input.
    wide = arr.astype(np.float64)
    norms = np.linalg.norm(wide, axis=-1, keepdims=True)
    return (wide / np.maximum(norms, eps)).astype(arr.dtype)


# ---------------------------------------------------------------------------------------------- embedding
_WORD = re.compile(r"[a-z]+")


def attribute_words(text: str) -> list[str]:
    """The words of an attribute text as the published vectors use them: lowercase, split on non-letters."""
    return _WORD.findall(text.lower())


def read_word_vectors(path: str | Path, vocabulary: set[str] | None = None) -> dict[str, np.ndarray]:
    """Read word vectors from a word2vec/GloVe text file or a word2vec binary file (``.bin``).

    Only words in ``vocabulary`` (compared lowercase) are kept, so a multi-gigabyte file is streamed
    without holding it in memory. An exact lowercase entry wins over other spellings of the same word.

    Raises:
        DataError: missing file or a line that is not ``word v1 v2 ...`` with a consistent width.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: word-vector model file not found")
    found: dict[str, np.ndarray] = {}
    exact: set[str] = set()

    def keep(word: str, vec: np.ndarray) -> None:
        low = word.lower()
        if vocabulary is not None and low not in vocabulary:
            return
        if low in exact:
            return
        if word == low:
            exact.add(low)
            found[low] = vec
        elif low not in found:
            found[low] = vec

    if p.suffix.lower() == ".bin":
        _read_word2vec_binary(p, keep)
    else:
        _read_word_vector_text(p, keep)
    return found


def _read_word_vector_text(p: Path, keep: Any) -> None:
    width = None
    with open(p, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.rstrip().split(" ")
            if lineno == 1 and len(parts) == 2 and all(s.isdigit() for s in parts):
                width = int(parts[1])  # word2vec text header "count dim"
                continue
            if len(parts) < 2:
                continue
            if width is None:
                width = len(parts) - 1
            if len(parts) - 1 != width:
                raise DataError(f"{p}, line {lineno}: expected a word and {width} numbers, got "
                                f"{len(parts) - 1} numbers; is this a word2vec/GloVe text file?")
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError:
                raise DataError(f"{p}, line {lineno}: not a word followed by numbers") from None
            keep(parts[0], vec)
    if width is None:
        raise DataError(f"{p}: no word vectors found")


def _read_word2vec_binary(p: Path, keep: Any) -> None:
    with open(p, "rb") as fh:
        header = fh.readline().split()
        if len(header) != 2:
            raise DataError(f"{p}: not a word2vec binary file (first line must be 'count dim')")
        count, dim = int(header[0]), int(header[1])
        nbytes = 4 * dim
        for i in range(count):
            word = bytearray()
            while True:
                ch = fh.read(1)
                if not ch:
                    raise DataError(f"{p}: file ends after {i} of {count} words")
                if ch == b" ":
                    break
                if ch != b"\n":  # some writers end each vector with a newline
                    word += ch
            raw = fh.read(nbytes)
            if len(raw) != nbytes:
                raise DataError(f"{p}: file ends inside the vector of word {i}")
            keep(word.decode("utf-8", errors="replace"), np.frombuffer(raw, dtype="<f4").copy())


def embed_attributes(
    texts: Sequence[str],
    model_path: str | Path,
    dim: int | None = None,
    reduce: str = "sum",
) -> np.ndarray:
    """Semantic vectors (D, G) for attribute texts, computed offline from a local model.

    ``model_path`` is either a word-vector file (word2vec/GloVe text, or word2vec ``.bin``): each text
    becomes the ``reduce`` ("sum", as the published files, or "mean") of the vectors of its words
    (:func:`attribute_words`; unknown words are skipped, a text with no known word gets a zero row and a
    warning); or a sentence-transformers model folder, used when the ``sentence_transformers`` package
    is importable. ``dim`` reduces the result to that many components with PCA (scikit-learn).

    Raises:
        DataError: no model at the path, no usable package for a folder, no text matched any word,
            ``dim`` larger than the data allow.
    """
    texts = [str(t) for t in texts]
    if not texts:
        raise DataError("embed_attributes: no attribute texts given")
    if reduce not in ("sum", "mean"):
        raise DataError(f"embed_attributes: reduce must be 'sum' or 'mean', got {reduce!r}")
    p = Path(model_path)
    if p.is_dir():
        vectors = _embed_sentence_transformers(texts, p)
    elif p.is_file():
        vectors = _embed_word_vectors(texts, p, reduce)
    else:
        raise DataError(f"{p}: embedding model not found; give a word2vec/GloVe vector file or a "
                        "sentence-transformers model folder on this machine (nothing is downloaded)")
    if dim is not None:
        vectors = _pca(vectors, dim, p)
    return vectors


def _embed_word_vectors(texts: list[str], p: Path, reduce: str) -> np.ndarray:
    words = [attribute_words(t) for t in texts]
    table = read_word_vectors(p, {w for ws in words for w in ws})
    if not table:
        raise DataError(f"{p}: none of the attribute words were found in this word-vector file; is it "
                        "the right file (one word and its numbers per line)?")
    width = len(next(iter(table.values())))
    out = np.zeros((len(texts), width), dtype=np.float32)
    empty = []
    for i, ws in enumerate(words):
        hits = [table[w] for w in ws if w in table]
        if not hits:
            empty.append(texts[i])
            continue
        stacked = np.stack(hits)
        out[i] = stacked.sum(0) if reduce == "sum" else stacked.mean(0)
    if empty:
        warnings.warn(f"{p}: {len(empty)} attribute texts have no known word and get a zero vector: "
                      f"{empty[:5]}", stacklevel=3)
    return out


def _embed_sentence_transformers(texts: list[str], p: Path) -> np.ndarray:
    try:
        from sentence_transformers import SentenceTransformer  # optional dependency
    except ImportError:
        raise DataError(f"{p} is a folder, which is read as a sentence-transformers model, but the "
                        "sentence_transformers package is not installed; install it "
                        "(pip install sentence-transformers) or give a word-vector text file") from None
    try:
        model = SentenceTransformer(str(p), device="cpu")
        vectors = model.encode(texts, convert_to_numpy=True, show_progress_bar=False)
    except Exception as exc:
        raise DataError(f"{p}: cannot use this folder as a sentence-transformers model: {exc}") from None
    return np.asarray(vectors, dtype=np.float32)


def _pca(vectors: np.ndarray, dim: int, p: Path) -> np.ndarray:
    limit = min(vectors.shape)
    if not 1 <= dim <= limit:
        raise DataError(f"{p}: cannot reduce {vectors.shape[0]} vectors of width {vectors.shape[1]} to "
                        f"{dim} dimensions with PCA; choose dim between 1 and {limit}")
    from sklearn.decomposition import PCA

    return PCA(n_components=dim, random_state=0).fit_transform(vectors).astype(np.float32)
