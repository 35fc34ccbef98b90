"""Feature extraction: image modes, bad files reported by path, resume == uninterrupted, sharding."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from dedn.data.store import FeatureStore
from dedn.errors import DataError
from dedn.features.backbones import Backbone, ResNet101Backbone
from dedn.features.extract import ExtractOptions, extract_features, extract_folder, list_image_folder, read_image

SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine, OpenMP threads spinning on each other make
    ResNet-101 forward passes ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class TinyBackbone(Backbone):
    """A one-layer stand-in with the Backbone interface, fast enough for the sharding tests."""

    name = "tiny"
    out_channels = 8
    stride = 32
    default_image_size = SIZE

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 8, kernel_size=32, stride=32)
        self._freeze()

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(images))


def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    return rgb if mode == "RGB" else rgb.quantize(16) if mode == "P" else rgb.convert(mode)


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Three class folders with RGB, grey, CMYK, palette and EXIF-rotated images, plus two bad files."""
    root = tmp_path_factory.mktemp("images")
    files = {
        "cat/rgb_0.jpg": _noise("RGB", (80, 60), 0),
        "cat/grey.png": _noise("L", (50, 70), 1),
        "cat/cmyk.jpg": _noise("CMYK", (64, 64), 2),
        "cat/palette.png": _noise("P", (70, 70), 3),
        "dog/rgb_1.png": _noise("RGB", (64, 96), 4),
        "dog/rgb_2.jpg": _noise("RGB", (100, 64), 5),
        "dog/sub/rgb_3.bmp": _noise("RGB", (64, 64), 6),
        "dog/rgba.png": _noise("RGBA", (66, 66), 7),
        "eel/rgb_4.jpg": _noise("RGB", (90, 90), 8),
        "eel/palette.gif": _noise("P", (64, 80), 9),
    }
    for rel, image in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        image.save(root / rel)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _noise("RGB", (40, 24), 10).save(root / "eel" / "rotated.jpg", exif=exif)
    (root / "eel" / "notes.txt").write_text("not an image, ignored by extension")
    # Bad files: a JPEG cut in half and a file that is not an image at all.
    buf = io.BytesIO()
    _noise("RGB", (96, 96), 11).save(buf, format="JPEG", quality=95)
    (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "cat" / "garbage.png").write_bytes(b"this is not a png")
    return root


@pytest.fixture(scope="module")
def good_images(image_root):
    paths, labels, classes = list_image_folder(image_root)
    keep = [i for i, p in enumerate(paths) if not p.endswith(("truncated.jpg", "garbage.png"))]
    return [paths[i] for i in keep], labels[keep], classes


@pytest.fixture(scope="module")
def resnet() -> ResNet101Backbone:
    torch.manual_seed(0)
    return ResNet101Backbone(weights=None)


def _run(paths, labels, store, backbone, **kw):
    args = dict(image_size=SIZE, batch_size=4, num_workers=0, progress=False, chunk_size=4, device="cpu")
    return extract_features(paths, labels, store, backbone, ExtractOptions(**{**args, **kw}))


def test_image_modes_and_exif(image_root):
    for path in image_root.rglob("*"):
        bad = path.name in ("truncated.jpg", "garbage.png")
        if path.suffix in (".jpg", ".png", ".bmp", ".gif") and not bad:
            assert read_image(path).mode == "RGB"
    assert read_image(image_root / "eel" / "rotated.jpg").size == (24, 40)  # EXIF orientation applied
    with pytest.raises(OSError, match="truncated"):
        read_image(image_root / "dog" / "truncated.jpg")


def test_folder_listing(image_root, tmp_path):
    paths, labels, classes = list_image_folder(image_root)
    assert classes == ["cat", "dog", "eel"]
    assert len(paths) == 13 and not any(p.endswith(".txt") for p in paths)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: expected one subfolder per class"):
        extract_folder(tmp_path / "empty", tmp_path / "s", TinyBackbone())
    _noise("RGB", (8, 8), 0).save(tmp_path / "empty" / "loose.png")
    with pytest.raises(DataError, match="no class subfolders"):
        list_image_folder(tmp_path / "empty")
    (tmp_path / "empty" / "owl").mkdir()
    with pytest.raises(DataError, match=r"class folders without images \(owl\)"):
        list_image_folder(tmp_path / "empty")


def test_bad_images_reported_by_path_before_writing(image_root, tmp_path, resnet):
    with pytest.raises(DataError) as info:
        extract_folder(image_root, tmp_path / "store", resnet, ExtractOptions(
            image_size=SIZE, batch_size=4, num_workers=0, progress=False, chunk_size=4, device="cpu"))
    msg = str(info.value)
    assert "2 images cannot be read" in msg
    assert str(image_root / "dog" / "truncated.jpg") in msg and "truncated" in msg
    assert str(image_root / "cat" / "garbage.png") in msg
    assert not (tmp_path / "store").exists()  # nothing written


def test_resume_after_interruption_equals_uninterrupted_run(good_images, tmp_path, resnet, monkeypatch):
    paths, labels, _ = good_images
    assert len(paths) == 11  # chunks of 4: 4 + 4 + 3
    full = _run(paths, labels, tmp_path / "full", resnet)
    assert full.complete and full.shape == (11, 2048, 2, 2)
    expected = full[:]
    assert np.isfinite(expected).all() and expected.std() > 0

    # Interrupt the run while it computes the second chunk (the first one is written and marked).
    real = resnet.features
    calls = []

    def interrupted(x):
        calls.append(x.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(x)

    monkeypatch.setattr(resnet, "features", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(paths, labels, tmp_path / "resumed", resnet)
    assert FeatureStore.open(tmp_path / "resumed").completed_chunks == [0]

    calls.clear()
    monkeypatch.setattr(resnet, "features", lambda x: (calls.append(x.shape[0]), real(x))[1])
    resumed = _run(paths, labels, tmp_path / "resumed", resnet)
    monkeypatch.undo()
    assert calls == [4, 3]  # only chunks 1 and 2 were computed
    assert resumed.complete
    np.testing.assert_array_equal(resumed[:], expected)
    np.testing.assert_array_equal(resumed.labels, full.labels)
    assert resumed.provenance == full.provenance
    assert resumed.meta()["image_files"].tolist() == paths

    # Resuming with another image size (or backbone) is refused, not mixed in.
    with pytest.raises(DataError, match=r"cannot resume .*image_size: store has 64, this run 96"):
        _run(paths, labels, tmp_path / "resumed", resnet, image_size=96)
    with pytest.raises(DataError, match=r"backbone: store has 'resnet101', this run 'tiny'"):
        _run(paths, labels, tmp_path / "resumed", TinyBackbone())
    with pytest.raises(DataError, match="already exists"):
        _run(paths, labels, tmp_path / "resumed", resnet, resume=False)


def test_sharded_ranks_write_disjoint_chunks(good_images, tmp_path):
    paths, labels, _ = good_images
    tiny = TinyBackbone()
    reference = _run(paths, labels, tmp_path / "one", tiny, chunk_size=2)[:]
    # Two ranks run one after the other without a process group: each takes its own chunks and
    # records them in its own completion file; store.json is written by rank 0 only.
    r0 = _run(paths, labels, tmp_path / "two", tiny, chunk_size=2, rank=0, world_size=2, num_workers=2)
    assert r0.completed_chunks == [0, 2, 4] and not r0.complete
    r1 = _run(paths, labels, tmp_path / "two", tiny, chunk_size=2, rank=1, world_size=2)
    assert r1.complete
    assert sorted(p.name for p in (tmp_path / "two").glob("complete.rank*")) == ["complete.rank0.json",
                                                                                 "complete.rank1.json"]
    np.testing.assert_array_equal(FeatureStore.open(tmp_path / "two")[:], reference)
    # A later single-process resume folds the rank files into store.json.
    _run(paths, labels, tmp_path / "two", tiny, chunk_size=2)
    assert not list((tmp_path / "two").glob("complete.rank*"))
    assert json.loads((tmp_path / "two" / "store.json").read_text())["complete_chunks"] == list(range(6))
    # Resuming a complete store is a no-op; it keeps its own chunk size.
    assert _run(paths, labels, tmp_path / "two", tiny, chunk_size=5).chunk_size == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun_worker(rank: int, world_size: int, port: int, paths, labels, store: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    _run(paths, labels, store, TinyBackbone(), chunk_size=2)


@pytest.mark.slow
def test_torch_distributed_two_ranks(good_images, tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    paths, labels, _ = good_images
    # fork: the children reuse the parent's imports (spawn would re-import torch in each, ~5 s).
    mp.start_processes(_torchrun_worker, args=(2, _free_port(), paths, labels, str(tmp_path / "dist")),
                       nprocs=2, start_method="fork")
    store = FeatureStore.open(tmp_path / "dist")
    assert store.complete and not list((tmp_path / "dist").glob("complete.rank*"))  # merged by rank 0
    reference = _run(paths, labels, tmp_path / "one", TinyBackbone(), chunk_size=2)
    np.testing.assert_array_equal(store[:], reference[:])


def test_missing_files_and_bad_arguments(good_images, tmp_path):
    paths, labels, _ = good_images
    with pytest.raises(DataError, match="1 image files do not exist: .*nope.jpg"):
        _run([*paths, str(tmp_path / "nope.jpg")], [*labels, 0], tmp_path / "s", TinyBackbone())
    with pytest.raises(DataError, match="11 images but labels of shape"):
        _run(paths, labels[:3], tmp_path / "s", TinyBackbone())
    shutil.rmtree(tmp_path / "s", ignore_errors=True)


def test_unchecked_bad_image_stops_with_its_path(image_root, good_images, tmp_path):
    paths, labels, _ = good_images
    bad = str(image_root / "dog" / "truncated.jpg")
    with pytest.raises(DataError, match=re.escape(f"{bad}: cannot read the image (OSError: image file is")):
        _run([*paths, bad], [*labels, 1], tmp_path / "s", TinyBackbone(), check_images=False, chunk_size=6)
    store = FeatureStore.open(tmp_path / "s")  # the chunks before the bad image are kept for a resume
    assert store.completed_chunks == [0]
