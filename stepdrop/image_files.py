"""Samples on disk, for any FID tool: a folder of numbered PNGs or an ``.npz`` of uint8 NHWC.

``save_samples(images, path, records=..., meta=...)`` writes

* ``path/000000.png``, ``000001.png``, … (a folder: torch-fidelity's ``fidelity --input1``,
  clean-fid), or ``path`` = ``*.npz`` holding ``arr_0``, uint8 [N, H, W, C] (what the
  guided-diffusion evaluator and clean-fid read);
* beside them ``samples.json`` (``<stem>.json`` next to an ``.npz``): the run's settings and,
  per sample, its index, the seed its noise came from and the timesteps it visited.

Nothing is left half written: everything goes to a temporary sibling first and is moved into
place in one rename. An existing, non-empty ``path`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from stepdrop._io import atomic_write_bytes

__all__ = ["check_output", "save_samples", "sidecar_path"]


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON beside the images goes: ``path/samples.json``, or ``<stem>.json`` for an npz."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".npz" else path / "samples.json"


def check_output(path: str | os.PathLike, overwrite: bool, name: str = "save_images") -> Path:
    """``path`` as a Path; ValueError if it already holds something and ``overwrite`` is False
    (checked before any sampling, so hours of work never end in a refusal)."""
    path = Path(path)
    if path.suffix not in ("", ".npz") and not path.is_dir():
        raise ValueError(f"{name} must be a folder (numbered PNGs) or a .npz file, got {str(path)!r}")
    taken = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if taken and not overwrite:
        raise ValueError(f"{name}: {path} exists and is not empty; choose another path or pass --overwrite "
                         f"(overwrite=True) to replace it")
    return path


def save_samples(images: Tensor, path: str | os.PathLike, *, records: Sequence[dict[str, Any]] | None = None,
                 meta: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write ``images`` (uint8 [N, C, H, W], or floats in [−1, 1]) to ``path`` (module docstring).
    ``records``: one JSON-able dict per image (seed, timesteps, …); returns ``path``."""
    from stepdrop.metrics import to_uint8

    path = check_output(path, overwrite)
    x = images if images.dtype == torch.uint8 else to_uint8(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C in (1, 3), got {tuple(images.shape)}")
    if records is not None and len(records) != x.shape[0]:
        raise ValueError(f"records must hold one entry per image ({x.shape[0]}), got {len(records)}")
    nhwc = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    sidecar = {"format": "stepdrop-samples", "num_images": int(x.shape[0]), "shape_nhwc": list(nhwc.shape),
               "meta": meta or {}, "samples": list(records) if records is not None else None}
    if path.suffix == ".npz":
        buffer = io.BytesIO()
        np.savez(buffer, arr_0=nhwc)
        atomic_write_bytes(path, buffer.getvalue())
        atomic_write_bytes(sidecar_path(path), (json.dumps(sidecar, indent=1) + "\n").encode())
        return path
    _write_folder(nhwc, path, sidecar)
    return path


def _write_folder(nhwc: np.ndarray, path: Path, sidecar: dict[str, Any]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        digits = max(6, len(str(len(nhwc) - 1)))
        for i, image in enumerate(nhwc):
            Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(staging / f"{i:0{digits}d}.png")
        (staging / "samples.json").write_text(json.dumps(sidecar, indent=1) + "\n")
        old = None
        if path.exists():  # overwrite: swap in the new folder, then drop the old one
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        staging.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
