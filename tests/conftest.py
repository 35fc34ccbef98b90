"""Shared fixtures: tiny configs that train in seconds on two CPU cores."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from dedn.cli import main
from dedn.config import RunConfig, load_config

#: The real semantic files of CUB, SUN and AWA2, one folder per dataset: xlsa17's att_splits.mat and class lists
#: (trainvalclasses.txt, testclasses.txt, trainclasses1.txt, valclasses1.txt), the attribute names
#: (attributes.txt, attributes.mat, predicates.txt) and word vectors ({DS}_attribute.pkl) of DAZLE's repository,
#: and semantic_{DS}.npz, all of them consolidated. They are test data kept beside the checkout, never in it;
#: the environment variable DEDN_SEMANTIC_DIR names another folder that holds CUB/, SUN/ and AWA2/.
SHARED = Path(os.environ.get("DEDN_SEMANTIC_DIR") or Path(__file__).resolve().parents[2] / "shared/data/zsl-semantic")


def shared_dir(ds: str, file: str | None = None) -> Path:
    """The folder of one benchmark's real semantic files (or one ``file`` in it), or a skip that says how to
    run the test."""
    folder = SHARED / ds
    path = folder / file if file else folder
    if not path.exists():
        pytest.skip(f"needs the real {ds} semantic files ({path} is absent): to run it, put them (listed in "
                    f"tests/conftest.py at SHARED) in a folder {ds}/ and run "
                    "`DEDN_SEMANTIC_DIR=<its parent> make test`")
    return path

TINY = [
    "data.synthetic.n_images=240",
    "data.synthetic.n_channels=16",
    "data.synthetic.height=3",
    "data.synthetic.width=3",
    "data.synthetic.n_classes=12",
    "data.synthetic.n_unseen=4",
    "data.synthetic.n_val=3",
    "data.synthetic.n_attributes=12",
    "data.synthetic.n_clusters=3",
    "data.synthetic.semantic_dim=8",
    "train.batch_size=16",
    "train.iters_per_epoch=3",
    "train.epochs=3",
    "train.progress=false",
    "eval.batch_size=64",
]


@pytest.fixture(autouse=True)
def _single_thread() -> None:
    # Tiny tensors: threads only add scheduling noise (and the tests must be deterministic).
    torch.set_num_threads(1)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    return [*TINY, f"output_dir={tmp_path / 'runs'}"]


@pytest.fixture
def tiny_cfg(tiny_overrides: list[str]) -> RunConfig:
    return load_config(None, tiny_overrides)


@contextlib.contextmanager
def interrupted_at_step(monkeypatch, step: int, counts: Callable[[Any], bool] = lambda trainer: True):
    """Inside the block, the ``step``-th training step (1-based, counting the trainers for which ``counts``
    is true) raises KeyboardInterrupt, as Ctrl-C would; the block expects it. Steps train normally after."""
    from dedn.training.trainer import Trainer

    original, seen = Trainer.train_step, {"n": 0}

    def train_step(self, index, batch=None, share=None):
        if counts(self):
            seen["n"] += 1
            if seen["n"] == step:
                raise KeyboardInterrupt
        return original(self, index, batch, share)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(Trainer, "train_step", original)


def run_cli(args: list, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the ``dedn`` command in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["dedn", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_trainer(cfg: RunConfig, run_dir: Path | None = None, data: Any = None, resume: bool = False,
                callbacks: tuple = ()) -> Any:
    """One trainer run as the protocols make it (resumed from ``run_dir``'s checkpoint with ``resume``)."""
    from dedn.training.callbacks import BestOverTraining
    from dedn.training.trainer import Trainer

    trainer = Trainer(cfg, data=data, run_dir=run_dir, callbacks=[*callbacks, BestOverTraining()])
    try:
        if resume:
            trainer.resume()
        return trainer.fit()
    finally:
        trainer.close()
