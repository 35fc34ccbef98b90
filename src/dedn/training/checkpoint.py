"""Checkpoints: safetensors weights, JSON state, written atomically; and rebuilding a model from them.

A checkpoint is three files side by side, ``NAME.safetensors`` (model weights and buffers, with the
model's method name and its config, e.g. :class:`~dedn.models.dedn.DEDNConfig`, as JSON in the safetensors
metadata; the method registry, :mod:`dedn.models.registry`, rebuilds the model from them), ``NAME-optim.safetensors``
(optimizer state) and ``NAME.json`` (epoch, history and the SHA-256 of both weight files). Every file is written
to a temporary name and moved into place, the JSON last: a checkpoint whose JSON is present and whose
hashes match is complete; an interrupted write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from dedn.atomic import atomic_write, atomic_write_text
from dedn.errors import CheckpointError
from dedn.models.registry import entry_for, model_entry, model_names
from dedn.training.rundir import read_json

FORMAT = "dedn-checkpoint-1"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def save_weights(model: nn.Module, path: str | Path, extra_metadata: dict[str, str] | None = None,
                 record_hash: bool = False) -> None:
    """Model weights and buffers as safetensors, with the method's name and the model's config in the file's
    metadata.

    ``record_hash`` also writes ``PATH.sha256`` (``sha256sum`` format), which :func:`load_weights` needs
    (checkpoints record their hashes in their JSON instead).
    """
    path = Path(path)
    meta = {"format": FORMAT, "model": entry_for(model).name, "config": json.dumps(model.config.to_dict()),
            **(extra_metadata or {})}
    _atomic_save_tensors(dict(model.state_dict()), path, meta)
    if record_hash:
        atomic_write_text(hash_file(path), f"{_sha256(path)}  {path.name}\n")


def hash_file(path: Path) -> Path:
    """Where the SHA-256 of a weights file is recorded."""
    return path.with_name(path.name + ".sha256")


def verify_weights(path: Path) -> None:
    """Check a weights file against the SHA-256 recorded beside it.

    Raises:
        CheckpointError: no SHA-256 was recorded, or the weights do not match it.
    """
    record = hash_file(path)
    if not record.is_file():
        raise CheckpointError(f"{path}: no {record.name} beside it, so the weights cannot be checked; a model "
                              "file is written with its SHA-256 (retrain, or restore the file)")
    want = (record.read_text().split() or [""])[0]  # sha256sum format: "<hex>  <name>"
    if _sha256(path) != want:
        raise CheckpointError(f"{path}: the weights do not match the SHA-256 recorded in {record.name} when they "
                              "were written; the file is corrupt or was changed: retrain, or restore it")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model from a file written by :func:`save_weights` with its SHA-256 (``record_hash``).

    Raises:
        CheckpointError: the file or its ``.sha256`` is missing, the hash does not match, the file is not a
            dedn model file, or it does not fit its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found")
    verify_weights(path)
    return _read_weights(path, device)


def _read_weights(path: Path, device: str | torch.device) -> nn.Module:
    """The model a weights file holds, rebuilt through the registry entry of the method it records (its hash
    checked by the caller)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); the file is corrupt or "
                              "truncated, use an earlier checkpoint or retrain") from None
    if meta.get("format") != FORMAT or "model" not in meta or "config" not in meta:
        raise CheckpointError(f"{path}: not a dedn model file (no '{FORMAT}' metadata with the method and its "
                              "config)")
    if meta["model"] not in model_names():
        raise CheckpointError(f"{path}: a model of method {meta['model']!r}, which this version does not have "
                              f"(it has {', '.join(model_names())})")
    entry = model_entry(meta["model"])
    try:
        model = entry.from_config(entry.config_type.from_dict(json.loads(meta["config"])))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the recorded architecture is unusable ({type(exc).__name__}: {exc}); "
                              "the file is corrupt or was edited") from None
    # Buffers that depend on the class set may have another K than the placeholder: resize first.
    try:
        model.class_att = torch.empty_like(state["class_att"])
        model.seen_mask = torch.empty_like(state["seen_mask"])
        model.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError) as exc:
        raise CheckpointError(f"{path}: weights do not match the recorded architecture: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.to(device)


def _optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"{names[id(p)]}/{key}"] = value
    return out


def _restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        if name not in params:
            raise CheckpointError(f"optimizer state names unknown parameter {name!r}")
        optimizer.state[params[name]][field] = value.to(params[name].device)


def checkpoint_record(folder: str | Path, name: str = "last") -> Path:
    """The JSON record of checkpoint ``name`` in ``folder``: a checkpoint is complete when its record exists."""
    return Path(folder) / f"{name}.json"


def save_checkpoint(
    folder: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    name: str = "last",
) -> Path:
    """Write a complete checkpoint ``folder/NAME*`` atomically; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.safetensors"
    optim = folder / f"{name}-optim.safetensors"
    save_weights(model, weights)
    _atomic_save_tensors(_optimizer_tensors(model, optimizer), optim, {"format": FORMAT})
    record = {"format": FORMAT, **state, "files": {weights.name: _sha256(weights), optim.name: _sha256(optim)}}
    path = checkpoint_record(folder, name)
    atomic_write_text(path, json.dumps(record, indent=1))
    return path


def load_checkpoint(
    folder: str | Path, optimizer_for: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
    name: str = "last", device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``folder/NAME*``: the model, and the optimizer state into ``optimizer`` when given.

    With ``optimizer_for`` the weights are loaded into that existing model (so the optimizer built on its
    parameters stays valid); otherwise a new model is built from the file.

    Raises:
        CheckpointError: a file is missing, or its hash disagrees with the record (corrupt or half written).
    """
    folder = Path(folder)
    path = checkpoint_record(folder, name)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint here (expected {name}.json, {name}.safetensors and "
                              f"{name}-optim.safetensors)")
    record = read_json(path, "checkpoint record")
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dedn checkpoint record")
    for fname, digest in record.get("files", {}).items():
        f = folder / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing checkpoint file")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum does not match {path.name}; the file is corrupt or was "
                                  "changed after saving")
    loaded = _read_weights(folder / f"{name}.safetensors", device)  # its hash was checked against the record
    model = loaded
    if optimizer_for is not None:
        try:
            optimizer_for.load_state_dict(loaded.state_dict())
        except RuntimeError as exc:
            # torch's message: a header line, then one indented line per kind of mismatch; keep the first.
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            detail = (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:200]
            raise CheckpointError(f"{folder / (name + '.safetensors')}: the checkpoint's architecture differs from "
                                  f"the model the config builds ({detail}); was the run's config.json edited? "
                                  "Restore it, or start a new run") from None
        model = optimizer_for
    if optimizer is not None:
        try:
            tensors = load_file(str(folder / f"{name}-optim.safetensors"), device=str(device))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{folder / (name + '-optim.safetensors')}: unreadable ({exc})") from None
        _restore_optimizer(model, optimizer, tensors)
    return model, record
