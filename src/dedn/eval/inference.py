"""Running a trained model over feature maps, and the saved outputs that any l_rc / l_e can be read from.

:class:`ModelOutputs` keeps each branch's attribute scores per image (DEDN: each expert's region and channel
scores O_r, O_c; a method's ``forward`` output names them in ``branches()``).
Class scores for any branch mix l_rc and expert mix l_e follow from them by one small product with the
class attributes, so the evaluation-time sweeps of the paper's Figure 3 need no retraining and no
second pass over the features.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from dedn.atomic import atomic_write_bytes
from dedn.data.sources import FeatureSource
from dedn.errors import DataError


@dataclass
class ModelOutputs:
    """Per-image attribute scores of a model's branches (model attribute order) and what is needed to score.

    Attributes:
        branches: name -> (N, D) array, ``<expert>_o_r`` (and ``<expert>_o_c`` where the expert has a second
            branch), experts in the model's order (``cexp`` then ``fexp`` for DEDN).
        class_att: (K, D) normalised class attributes in the model's attribute order.
        bias: (K,) fixed score shift inside the model's scores (reference calibration margin; else 0).
        labels: (N,) classes of the images, or None.
    """

    branches: dict[str, np.ndarray]
    class_att: np.ndarray
    bias: np.ndarray
    labels: np.ndarray | None

    @property
    def experts(self) -> list[str]:
        """The experts (or subnets) the branches belong to, in order: the first is weighted l_e."""
        return list(dict.fromkeys(name.rsplit("_o_", 1)[0] for name in self.branches))

    def expert_scores(self, expert: str, l_rc: float) -> np.ndarray | None:
        """(N, K) class scores of one expert at branch mix ``l_rc`` (None if the model lacks that expert)."""
        o_r = self.branches.get(f"{expert}_o_r")
        if o_r is None:
            return None
        o_c = self.branches.get(f"{expert}_o_c")
        o = o_r if o_c is None else l_rc * o_r + (1.0 - l_rc) * o_c
        return o @ self.class_att.T + self.bias

    def scores(self, l_rc: float, l_e: float) -> np.ndarray:
        """(N, K) prediction scores: one expert's, or l_e * P_first + (1 - l_e) * P_second at branch mix
        ``l_rc`` (DEDN: l_e * P_cExp + (1 - l_e) * P_fExp)."""
        experts = self.experts
        if len(experts) == 1:
            return self.expert_scores(experts[0], l_rc)
        first, second = (self.expert_scores(e, l_rc) for e in experts)
        return l_e * first + (1.0 - l_e) * second

    def subset(self, index: np.ndarray) -> ModelOutputs:
        return ModelOutputs(
            branches={k: v[index] for k, v in self.branches.items()},
            class_att=self.class_att, bias=self.bias,
            labels=None if self.labels is None else self.labels[index],
        )

    def save(self, path: str | Path) -> None:
        """Write as a plain ``.npz`` (no pickled objects)."""
        arrays: dict[str, Any] = dict(self.branches)
        arrays.update(class_att=self.class_att, bias=self.bias)
        if self.labels is not None:
            arrays["labels"] = self.labels
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> ModelOutputs:
        with np.load(path, allow_pickle=False) as z:
            return cls(
                branches={k: z[k] for k in z.files if "_o_" in k},  # saved in the model's expert order
                class_att=z["class_att"], bias=z["bias"],
                labels=z["labels"] if "labels" in z.files else None,
            )


@torch.no_grad()
def collect_outputs(
    model: nn.Module,
    features: FeatureSource,
    index: np.ndarray,
    labels: np.ndarray | None = None,
    batch_size: int = 200,
    device: torch.device | str = "cpu",
    progress: bool = False,
    desc: str = "scoring",
    precision: str = "fp32",
    stored_dtype: bool = False,
) -> ModelOutputs:
    """Run ``model`` (in eval mode) over ``features[index]`` and keep every branch's attribute scores.

    ``features``: the maps, read batch by batch (:meth:`~dedn.data.sources.FeatureSource.read`; a resident copy
    gathers them on its own device). ``stored_dtype``: read them in the dtype they are kept in where the source
    hands that out (see ``read``), else float32.

    ``precision``: of the model's feature products (``fp32`` or ``bf16``, :mod:`dedn.models.precision`).
    """
    was_training = model.training
    model.eval()
    index = np.asarray(index, dtype=np.int64)
    parts: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=index.size, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        for start in range(0, index.size, batch_size):
            chunk = features.read(index[start : start + batch_size], stored_dtype=stored_dtype)
            if not bool(torch.isfinite(chunk).all()):  # name the images, not a downstream "scores contain NaN"
                rows = ~torch.isfinite(chunk.reshape(chunk.shape[0], -1)).all(1).cpu().numpy()
                bad = index[start : start + chunk.shape[0]][rows]
                raise DataError(f"feature maps of images {bad[:5].tolist()} (dataset indices) hold NaN or infinite "
                                "values; fix or re-extract those features")
            out = model(chunk.to(device), precision=precision)
            for name, branch in out.branches().items():
                parts.setdefault(name, []).append(branch.float().cpu().numpy())
            bar.update(chunk.shape[0])
    finally:
        bar.close()
        model.train(was_training)
    d = model.config.n_attributes
    branches = {k: np.concatenate(v) if v else np.zeros((0, d), np.float32) for k, v in parts.items()}
    return ModelOutputs(
        branches=branches,
        class_att=model.class_att.float().cpu().numpy(),
        bias=model.calibration_bias().float().cpu().numpy(),
        labels=None if labels is None else np.asarray(labels)[index],
    )
