"""Checkpoints and shipped models: self-describing, loaded with ``weights_only=True``.

Two kinds of file, both a plain dict of tensors and JSON-like values:

* a **training checkpoint** (``format = "stepdrop-checkpoint"``): model and EMA weights,
  optimizer, step, data position and every RNG state, so ``stepdrop train --resume``
  continues exactly where it stopped;
* an **exported model** (``format = "stepdrop-model"``): EMA weights only (optionally fp16)
  plus the model config, noise schedule and a model card (``meta``).

Both carry the architecture (``model_config``) and the noise schedule (``schedule``), so no
sampler hard-codes either. Files are written atomically: a temporary file in the same
folder, fsync, then ``os.replace`` — an interrupted write never leaves a broken file.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepdrop._io import atomic_write
from stepdrop._validation import check_device
from stepdrop.models import build_model
from stepdrop.schedule import NoiseSchedule

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "CheckpointError",
    "LoadedModel",
    "atomic_save",
    "export_model",
    "load_checkpoint",
    "load_pretrained",
    "model_fingerprint",
    "pretrained_names",
]

CHECKPOINT_FORMAT = "stepdrop-checkpoint"
MODEL_FORMAT = "stepdrop-model"
FORMAT_VERSION = 1
_WEIGHTS_PACKAGE = "stepdrop.weights"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or of an unsupported version."""


@dataclass
class LoadedModel:
    """A model rebuilt from a file: the network (EMA weights, eval mode), its schedule and card."""

    model: nn.Module
    schedule: NoiseSchedule
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def model_fingerprint(model: nn.Module) -> str:
    """A content hash of the model's weights and buffers (16 hex digits): results cached for a
    model (finished ``compare`` cells, optimized timesteps) are reused only for the same
    network, wherever its file lives."""
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def atomic_save(payload: dict[str, Any], path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file and an atomic rename."""
    return atomic_write(path, lambda f: torch.save(payload, f))


def read_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a stepdrop file with ``weights_only=True``; clear errors for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    payload = load_torch_file(path, map_location, "checkpoint")
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, MODEL_FORMAT):
        raise CheckpointError(
            f"{path} is not a stepdrop checkpoint (format {fmt!r}; expected {CHECKPOINT_FORMAT!r} or {MODEL_FORMAT!r})"
        )
    if payload.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload.get('version')!r}; this stepdrop reads {FORMAT_VERSION}")
    for key in ("model_config", "schedule", "ema"):
        if key not in payload:
            raise CheckpointError(f"{path} lacks {key!r}: the file is incomplete")
    return payload


def load_torch_file(path: Path, map_location: str | torch.device, kind: str) -> Any:
    """``torch.load(path, weights_only=True)`` for a file that claims to be a stepdrop ``kind``;
    :class:`CheckpointError` naming the file and what it is instead (not a torch file, an
    old-style pickle, a truncated archive, a torch file of other objects). torch's own advice
    (re-load with ``weights_only=False``) is never passed on: it is wrong for an untrusted file."""
    map_location = check_device("map_location", map_location)
    what = _torch_file_kind(path)
    if what is not None:
        raise CheckpointError(f"{path} is not a stepdrop {kind}: {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a well-formed archive whose pickle holds more than tensors and plain values
        raise CheckpointError(f"{path} is not a stepdrop {kind}: a torch file holding objects other than "
                              f"tensors and plain values ({type(exc).__name__}), not written by stepdrop") from exc


def _torch_file_kind(path: Path) -> str | None:
    """Why ``path`` cannot be a torch zip archive (None if it looks like one): not a torch file at
    all, an old-style pickle, or a zip archive that is truncated or damaged."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"\x80\x02" or head[:1] == b"\x80":
        return "an old-style (non-zip) torch or pickle file; stepdrop writes zip archives"
    if head != b"PK\x03\x04":
        return f"not a torch file (it starts with {head!r}; a torch zip archive starts with b'PK\\x03\\x04')"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except Exception as exc:  # BadZipFile, EOFError, zlib.error, NotImplementedError (a foreign method), …
        return f"a truncated or damaged torch archive ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"a damaged torch archive (entry {bad!r} fails its checksum)"
    if not any(name.endswith("data.pkl") for name in names):
        return "a zip archive without a torch pickle (data.pkl)"
    return None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Rebuild the model (EMA weights, eval mode, ``dtype``) and schedule from a training
    checkpoint or an exported model file."""
    payload = read_file(path, map_location)
    try:
        model = build_model(payload["model_config"])
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in payload["ema"].items()}
        model.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored model config: {exc}") from exc
    try:
        schedule = NoiseSchedule.from_config(payload["schedule"])
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{path}: the stored noise schedule is malformed: {exc}") from exc
    model = model.to(device=map_location, dtype=dtype).eval()
    meta = dict(payload.get("meta", {}))
    if payload["format"] == CHECKPOINT_FORMAT:
        meta.setdefault("step", payload.get("step"))
    return LoadedModel(model, schedule, meta, str(path))


def export_model(checkpoint_path: str | os.PathLike, out_path: str | os.PathLike, *, half: bool = True,
                 meta: dict[str, Any] | None = None) -> Path:
    """Write the EMA weights of a training checkpoint as a shippable model file."""
    payload = read_file(checkpoint_path)
    ema = {k: (v.half() if half and v.is_floating_point() else v) for k, v in payload["ema"].items()}
    card = dict(payload.get("meta", {}))
    card.update(meta or {})
    card.setdefault("step", payload.get("step"))
    out = {
        "format": MODEL_FORMAT,
        "version": FORMAT_VERSION,
        "model_config": payload["model_config"],
        "schedule": payload["schedule"],
        "ema": ema,
        "meta": card,
    }
    return atomic_save(out, out_path)


def pretrained_names() -> tuple[str, ...]:
    """Models shipped inside the package (files ``stepdrop/weights/<name>.pt``)."""
    try:
        folder = resources.files(_WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        return ()
    return tuple(sorted(p.name[:-3] for p in folder.iterdir() if p.name.endswith(".pt")))


def load_pretrained(name: str, map_location: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A model shipped with stepdrop, by name (see :func:`pretrained_names`)."""
    names = pretrained_names()
    if name not in names:
        raise ValueError(f"unknown pretrained model {name!r}; available: {names}")
    with resources.as_file(resources.files(_WEIGHTS_PACKAGE) / f"{name}.pt") as path:
        return load_checkpoint(path, map_location, dtype)
