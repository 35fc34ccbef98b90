"""Training under torch.distributed (what torchrun sets up), two CPU processes with the gloo backend."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

from dedn.config import load_config
from dedn.training.checkpoint import load_weights
from dedn.training.trainer import Trainer

from .conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, overrides: list[str], run_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        Trainer(load_config(None, overrides), run_dir=run_dir).fit()
    finally:
        torch.distributed.destroy_process_group()


def test_two_processes_match_one(tmp_path: Path) -> None:
    overrides = [*TINY, "train.epochs=2", "train.eval_every=0"]
    single = Trainer(load_config(None, overrides), run_dir=tmp_path / "single").fit()
    mp.spawn(_worker, args=(2, _free_port(), overrides, str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = load_weights(tmp_path / "ddp" / "model.safetensors")
    for name, value in single.model.state_dict().items():
        assert torch.allclose(ddp.state_dict()[name], value, rtol=1e-4, atol=1e-6), name
    assert (tmp_path / "ddp" / "metrics.json").is_file()


def test_uneven_shards_match_one_process(tmp_path: Path) -> None:
    # A batch of 15 on 2 ranks: shards of 8 and 7. Each rank's loss is weighted by its share of the batch,
    # so the averaged gradient is the gradient of the whole batch's mean loss.
    overrides = [*TINY, "train.epochs=2", "train.eval_every=0", "train.balanced=false", "train.batch_size=15"]
    single = Trainer(load_config(None, overrides), run_dir=tmp_path / "single").fit()
    mp.spawn(_worker, args=(2, _free_port(), overrides, str(tmp_path / "ddp")), nprocs=2, join=True)
    ddp = load_weights(tmp_path / "ddp" / "model.safetensors")
    for name, value in single.model.state_dict().items():
        assert torch.allclose(ddp.state_dict()[name], value, rtol=1e-4, atol=1e-6), name
