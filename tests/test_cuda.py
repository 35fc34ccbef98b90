"""The CUDA paths against the CPU (run on a GPU machine by ``tools/gpu-check.sh``; skipped elsewhere)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dedn.config import apply_overrides
from dedn.data.sources import DeviceFeatures
from dedn.data.store import store_zsldata
from dedn.factory import load_data
from dedn.training.trainer import Trainer

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _fit(cfg, device: str, precision: str = "fp32") -> Trainer:
    trainer = Trainer(apply_overrides(cfg, [f"train.device={device}", f"train.precision={precision}",
                                            "eval.protocol=fixed", "eval.plots=false"]))
    trainer.fit()
    return trainer


def test_training_on_cuda_follows_the_cpu(tiny_cfg, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # compare float32 with float32
    cpu, gpu = _fit(tiny_cfg, "cpu"), _fit(tiny_cfg, "cuda")
    for (name, a), b in zip(cpu.model.state_dict().items(), gpu.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4, msg=name)
    assert abs(cpu.history[-1]["H"] - gpu.history[-1]["H"]) < 1.0


def test_bf16_training_on_cuda_is_finite_and_close(tiny_cfg) -> None:
    fp32, bf16 = _fit(tiny_cfg, "cuda"), _fit(tiny_cfg, "cuda", "bf16")
    assert all(torch.isfinite(p).all() for p in bf16.model.parameters())
    assert abs(fp32.losses[-1] - bf16.losses[-1]) < 0.05 * abs(fp32.losses[-1]) + 0.05


def test_training_from_a_resident_store(tiny_cfg, tmp_path: Path) -> None:
    store_zsldata(tmp_path / "store", load_data(tiny_cfg))
    cfg = apply_overrides(tiny_cfg, ["data.source=store", f"data.path={tmp_path / 'store'}"])
    trainer = _fit(cfg, "cuda")
    assert isinstance(trainer.features, DeviceFeatures) and trainer.features.device.type == "cuda"
    assert "H" in trainer.history[-1]
