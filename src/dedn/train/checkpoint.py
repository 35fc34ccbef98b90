"""Checkpoints: safetensors weights, JSON state, written atomically; and rebuilding a model from them.

A checkpoint is three files side by side, ``NAME.safetensors`` (model weights and buffers, with the
model's :class:`~dedn.models.dedn.DEDNConfig` as JSON in the safetensors metadata), ``NAME-optim.safetensors``
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

from dedn.atomic import atomic_write, atomic_write_text
from dedn.errors import CheckpointError
from dedn.models.dedn import DEDN, DEDNConfig
from dedn.models.settings import legacy_settings

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


def model_hparams(model: DEDN) -> dict[str, Any]:
    """What rebuilds ``model`` (weights come from the state dict): its config, JSON-ready."""
    return model.config.to_dict()


def config_from_hparams(hp: dict[str, Any]) -> DEDNConfig:
    """A :class:`DEDNConfig` from a model file's metadata: the ``config`` this version writes, or the
    ``hparams`` (the earlier constructor arguments, with ``mode``) that files from before it hold."""
    if "mode" not in hp:
        return DEDNConfig.from_dict(hp)
    return DEDNConfig(
        n_attributes=hp["n_attributes"], semantic_dim=hp["semantic_dim"], n_channels=hp["n_channels"],
        n_regions=hp["n_regions"], clusters=tuple(hp["clusters"]), experts=hp["experts"],
        channel_attention=hp["channel_attention"], l_rc=hp["l_rc"], l_e=hp["l_e"],
        method=legacy_settings(hp["mode"], calibration_margin=hp["calibration_margin"],
                               clip_negative_att=hp["clip_negative_att"], low_rank=hp["low_rank"]),
    )


def model_from_hparams(hp: dict[str, Any]) -> DEDN:
    """An architecture-only DEDN (placeholder semantics and classes) ready for ``load_state_dict``; ``hp`` as
    :func:`config_from_hparams` reads it."""
    config = config_from_hparams(hp)
    d = config.n_attributes
    return DEDN.from_config(config, torch.zeros(d, config.semantic_dim).numpy(), torch.ones(1, d).numpy(),
                            torch.zeros(1, dtype=torch.bool).numpy())


#: Parameter names of the layout before :class:`~dedn.models.dedn.Expert` (``cexp_W1``, ``fexp_V``, ...).
_OLD_EXPERTS = ("cexp", "fexp")
_OLD_PARAMETERS = ("V", "W1", "H1", "H3", "W2", "W3", "W4")


def migrate_name(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One state-dict (or optimizer-state) entry of the earlier layout under its current name and shape.

    The earlier layout named parameters ``{expert}_{P}`` on the model itself, and kept cExp's weights
    without a cluster axis: ``cexp_W1`` (G, C) is now ``experts.cexp.W1`` (1, G, C), the same for H1, H3,
    W2, W3, W4. ``cexp_V`` and every ``fexp_*`` keep their shape (``fexp_W1`` (Q, G, C) ->
    ``experts.fexp.W1``). Any other name is returned unchanged.
    """
    expert, _, param = name.partition("_")
    if expert not in _OLD_EXPERTS or param not in _OLD_PARAMETERS:
        return name, value
    # cExp's weights gain the cluster axis; its optimizer's scalar entries (the step count) have none.
    if expert == "cexp" and param != "V" and value.ndim == 2:
        value = value.unsqueeze(0)
    return f"experts.{expert}.{param}", value


def migrate_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of the earlier layout (see :func:`migrate_name`) in the current one; current ones pass."""
    return dict(migrate_name(k, v) for k, v in state.items())


def save_weights(model: DEDN, path: str | Path, extra_metadata: dict[str, str] | None = None,
                 record_hash: bool = False) -> None:
    """Model weights and buffers as safetensors, with the architecture in the file's metadata.

    ``record_hash`` also writes ``PATH.sha256`` (``sha256sum`` format), which :func:`load_weights` checks.
    """
    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(model_hparams(model)), **(extra_metadata or {})}
    _atomic_save_tensors(dict(model.state_dict()), path, meta)
    if record_hash:
        atomic_write_text(hash_file(path), f"{_sha256(path)}  {path.name}\n")


def hash_file(path: Path) -> Path:
    """Where the SHA-256 of a weights file is recorded."""
    return path.with_name(path.name + ".sha256")


def verify_weights(path: Path) -> None:
    """Check a weights file against its recorded SHA-256, when one was recorded (runs before this check have
    none). Raises :class:`CheckpointError` on a mismatch."""
    record = hash_file(path)
    if not record.is_file():
        return
    want = (record.read_text().split() or [""])[0]  # sha256sum format: "<hex>  <name>"
    if _sha256(path) != want:
        raise CheckpointError(f"{path}: the weights do not match the SHA-256 recorded in {record.name} when they "
                              "were written; the file is corrupt or was changed: retrain, or restore it")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> DEDN:
    """Rebuild a model from a file written by :func:`save_weights`.

    Files written before :class:`~dedn.models.dedn.Expert` (``hparams`` metadata, ``cexp_W1``-style names)
    are read too: :func:`config_from_hparams` and :func:`migrate_state_dict` translate them.

    Raises:
        CheckpointError: the file is missing, not a dedn safetensors file, or does not fit its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model weights not found")
    verify_weights(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); the file is corrupt or "
                              "truncated, use an earlier checkpoint or retrain") from None
    recorded = meta.get("config", meta.get("hparams"))
    if meta.get("format") != FORMAT or recorded is None:
        raise CheckpointError(f"{path}: not a dedn model file (no '{FORMAT}' metadata)")
    state = migrate_state_dict(state)
    try:
        model = model_from_hparams(json.loads(recorded))
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


def _optimizer_tensors(model: DEDN, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"{names[id(p)]}/{key}"] = value
    return out


def _restore_optimizer(model: DEDN, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        name, field = key.rsplit("/", 1)
        name, value = migrate_name(name, value)  # optimizer state of a checkpoint of the earlier layout
        if name not in params:
            raise CheckpointError(f"optimizer state names unknown parameter {name!r}")
        optimizer.state[params[name]][field] = value.to(params[name].device)


def checkpoint_record(folder: str | Path, name: str = "last") -> Path:
    """The JSON record of checkpoint ``name`` in ``folder``: a checkpoint is complete when its record exists."""
    return Path(folder) / f"{name}.json"


def save_checkpoint(
    folder: str | Path,
    model: DEDN,
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
    folder: str | Path, optimizer_for: DEDN | None = None, optimizer: torch.optim.Optimizer | None = None,
    name: str = "last", device: str | torch.device = "cpu",
) -> tuple[DEDN, dict[str, Any]]:
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
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint record ({exc})") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dedn checkpoint record")
    for fname, digest in record.get("files", {}).items():
        f = folder / fname
        if not f.is_file():
            raise CheckpointError(f"{f}: missing checkpoint file")
        if _sha256(f) != digest:
            raise CheckpointError(f"{f}: checksum does not match {path.name}; the file is corrupt or was "
                                  "changed after saving")
    loaded = load_weights(folder / f"{name}.safetensors", device=device)
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
