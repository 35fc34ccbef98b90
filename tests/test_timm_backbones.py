"""timm backbones end to end: extract -> train -> explain on the built-in benchmark, mixed stores refused, and
every method on the region grids and channel counts of transformer features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dedn
from dedn.config import load_config
from dedn.data.imagebench import ImageBenchConfig, make_image_benchmark, to_zsldata
from dedn.data.store import FeatureStore, SemanticSide
from dedn.errors import DataError
from dedn.features.backbones import TimmBackbone
from dedn.features.extract import ExtractOptions, extract_features
from dedn.models.registry import model_names
from dedn.runfolder import RunFolder
from tests.conftest import TINY, run_cli

# A small built-in benchmark: 12 classes (4 unseen) x 5 images, rendered at 64 px.
BENCH = ImageBenchConfig(n_classes=12, n_unseen=4, n_val=3, images_per_class=5, image_size=64)


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory) -> tuple[Path, object]:
    """The benchmark's images in class folders named so that the folder order is the benchmark's order."""
    bench = make_image_benchmark(BENCH)
    root = tmp_path_factory.mktemp("imagebench")
    for i in range(len(bench)):
        k = int(bench.labels[i])
        folder = root / f"{k:02d}-{bench.class_names[k]}"
        folder.mkdir(exist_ok=True)
        bench.image(i).save(folder / f"{i:04d}.png")
    return root, bench


def _random_weights(name: str, path: Path) -> Path:
    """A randomly initialised timm model's state dict as float16 safetensors (ViT-B: 86M parameters, 172 MB
    instead of 344 MB in float32; the backbone loads it into float32)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False)
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "grid"), [("vit_base_patch16_224", 64, 4),
                                                     ("vit_base_patch14_dinov2", 56, 4)])
def test_extract_train_explain_with_a_vit_base_store(name, size, grid, bench_folder, tmp_path, monkeypatch,
                                                      capsys) -> None:
    root, bench = bench_folder
    weights = _random_weights(name, tmp_path / f"{name}.safetensors")
    store = tmp_path / "store"
    code, out, err = run_cli(["extract", "--images", root, "--backbone", f"timm:{name}", "--weights", weights,
                              "--image-size", size, "--batch-size", 20, "--workers", 0, "--device", "cpu",
                              "--out", store], monkeypatch, capsys)
    assert code == 0, err
    opened = FeatureStore.open(store)
    assert opened.shape == (len(bench), 768, grid, grid)  # patch tokens only, on the patch grid
    prov = opened.provenance
    assert prov["backbone"] == prov["model"] == f"timm:{name}" and prov["layer"] == "final"
    assert prov["image_size"] == size and len(prov["weights_sha256"]) == 64
    # The benchmark's semantic side (the folder order is the benchmark's, so indices agree).
    opened.save_semantics(SemanticSide.of(to_zsldata(bench, np.zeros((len(bench), 1, 1, 1), np.float32))))

    run = tmp_path / "run"
    code, out, err = run_cli(["train", "data.source=store", f"data.path={store}", "model.clusters=kmeans",
                              "model.n_clusters=2", "train.epochs=2", "train.progress=false", "eval.plots=false",
                              "--run-dir", run], monkeypatch, capsys)
    assert code == 0, err
    features = json.loads((RunFolder(run).model_folder().path / RunFolder.FEATURES).read_text())
    assert features["backbone"] == f"timm:{name}" and features["layer"] == "final"

    image = next((root / f"{int(bench.labels[bench.test_unseen_loc[0]]):02d}-"
                  f"{bench.class_names[int(bench.labels[bench.test_unseen_loc[0]])]}").iterdir())
    code, out, err = run_cli(["explain", "--run", run, image, "--top-attributes", 2, "--out", tmp_path / "explain"],
                             monkeypatch, capsys)
    assert code == 0, err
    record = json.loads(next((tmp_path / "explain").glob("*-explain.json")).read_text())
    assert record["feature_shape"] == [768, grid, grid] and record["image_size"] == size
    maps = np.asarray(record["attributes"][0]["experts"]["cexp"]["region_attention"])
    assert maps.shape == (grid, grid) and abs(maps.sum() - 1) < 1e-4


def test_a_store_is_never_resumed_with_another_backbone_layer_or_weights(bench_folder, tmp_path) -> None:
    root, bench = bench_folder
    paths = sorted(str(p) for p in root.rglob("*.png"))[:6]
    labels = np.zeros(len(paths), dtype=np.int64)
    kwargs = {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2}
    torch.manual_seed(0)
    tiny = TimmBackbone("vit_tiny_patch16_224", model_kwargs=kwargs)
    options = ExtractOptions(batch_size=4, num_workers=0, device="cpu", progress=False, chunk_size=4)
    store = extract_features(paths, labels, tmp_path / "store", tiny, options)
    assert store.shape == (6, 32, 4, 4) and store.provenance["layer"] == "final"
    with pytest.raises(DataError, match=r"cannot resume .*layer: store has 'final', this run 0"):
        extract_features(paths, labels, tmp_path / "store", TimmBackbone("vit_tiny_patch16_224", layer=0,
                                                                       model_kwargs=kwargs), options)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in tiny.net.state_dict().items()}, tmp_path / "w.safetensors")
    loaded = TimmBackbone("vit_tiny_patch16_224", weights=tmp_path / "w.safetensors", model_kwargs=kwargs)
    with pytest.raises(DataError, match=r"cannot resume .*weights_sha256: store has None, this run '[0-9a-f]{64}'"):
        extract_features(paths, labels, tmp_path / "store", loaded, options)
    conv = TimmBackbone("convnext_atto", model_kwargs={"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)})
    with pytest.raises(DataError, match=r"cannot resume .*backbone: store has 'timm:vit_tiny_patch16_224', this "
                                        r"run 'timm:convnext_atto'"):
        extract_features(paths, labels, tmp_path / "store", conv, options)


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize(("channels", "height", "width"), [(48, 14, 14), (40, 16, 12)])
def test_every_method_takes_any_region_grid_and_channel_count(name, channels, height, width, tmp_path) -> None:
    cfg = load_config(None, [*TINY, f"model.name={name}", "train.epochs=1", "eval.plots=false",
                             "eval.protocol=fixed", f"data.synthetic.n_channels={channels}",
                             f"data.synthetic.height={height}", f"data.synthetic.width={width}",
                             f"output_dir={tmp_path}"])
    result = dedn.train(cfg, run_dir=tmp_path / "run")
    assert np.isfinite(result.metrics.H)
    model = dedn.load_weights(RunFolder(tmp_path / "run").model_folder().model)
    assert model.config.n_channels == channels
    regions = getattr(model.config, "n_regions", None) or np.prod(getattr(model.config, "grid", (0, 0)))
    assert regions == height * width


def test_extract_names_the_weights_file_a_timm_backbone_needs(tmp_path, monkeypatch, capsys) -> None:
    base = ["extract", "--images", tmp_path, "--out", tmp_path / "store", "--device", "cpu"]
    code, out, err = run_cli([*base, "--backbone", "timm:vit_base_patch14_dinov2"], monkeypatch, capsys)
    assert code == 2 and "no --weights; expected a local weights file for vit_base_patch14_dinov2" in err
    assert "timm/vit_base_patch14_dinov2.lvd142m" in err and "never downloads" in err
    code, out, err = run_cli([*base, "--backbone", "timm:vit_base_patch14_dinov2", "--weights",
                              tmp_path / "dino.safetensors"], monkeypatch, capsys)
    assert code == 2 and f"{tmp_path / 'dino.safetensors'} does not exist" in err
    code, out, err = run_cli([*base, "--backbone", "efficientnet-lite0", "--layer", "2"], monkeypatch, capsys)
    assert code == 2 and "only timm:<model name> backbones take a layer" in err
    code, out, err = run_cli([*base, "--backbone", "timm:no_such_model", "--weights", "w"], monkeypatch, capsys)
    assert code == 2 and "has no model 'no_such_model'" in err
    assert not (tmp_path / "store").exists()


def test_the_built_in_benchmark_on_a_timm_backbone_from_the_config(tmp_path: Path) -> None:
    """data.backbone=timm:<name> with data.backbone_weights and data.backbone_layer: the built-in benchmark's
    features from a tiny ViT (random weights written here), cached per weights and layer."""
    name = "vit_tiny_patch16_224"
    weights = _random_weights(name, tmp_path / "vit-tiny.safetensors")
    common = ["data.source=imagebench", f"data.cache_dir={tmp_path / 'cache'}", f"data.backbone=timm:{name}",
              f"data.backbone_weights={weights}", "data.image_size=64", "train.progress=false",
              *[f"data.imagebench.{k}={v}" for k, v in (("n_classes", 12), ("n_unseen", 4), ("n_val", 3),
                                                        ("images_per_class", 5), ("image_size", 64))]]
    final = dedn.load_data(load_config(None, common))
    block = dedn.load_data(load_config(None, [*common, "data.backbone_layer=2"]))
    assert final.feature_shape == block.feature_shape == (192, 4, 4)  # ViT-Ti: 192 channels, 64 px / 16
    assert final.provenance["weights_sha256"] == block.provenance["weights_sha256"]
    assert (final.provenance["layer"], block.provenance["layer"]) == ("final", 2)
    assert not np.allclose(np.asarray(final.features[:2]), np.asarray(block.features[:2]))  # another cache entry
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_a_timm_backbone_for_the_built_in_benchmark_needs_a_weights_file(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.source=imagebench", f"data.cache_dir={tmp_path}",
                             "data.backbone=timm:vit_tiny_patch16_224", "train.progress=false"])
    with pytest.raises(DataError, match="weights"):
        dedn.load_data(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything was written
