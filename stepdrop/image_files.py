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
from stepdrop._validation import check_choice
from stepdrop.cells import batch_seeds, safe_name

__all__ = ["cell_targets", "check_output", "save_cell", "save_samples", "sidecar_path"]


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where the JSON beside the images goes: ``path/samples.json``, or ``<stem>.json`` for an npz."""
    path = Path(path)
    return path.with_suffix(".json") if path.suffix == ".npz" else path / "samples.json"


def check_output(path: str | os.PathLike, overwrite: bool, name: str = "save_images") -> Path:
    """``path`` as a Path; ValueError if it already holds something and ``overwrite`` is False
    (checked before any sampling, so hours of work never end in a refusal)."""
    path = Path(path)  # a folder of PNGs unless it ends in .npz (cell names hold dots: mixres_0.5_0.3)
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


def cell_targets(specs, keys, save_images, save_format: str, overwrite: bool) -> dict[str, Path]:
    """``compare --save-images``: where each cell's samples go (``specs``: RunSpecs, ``keys``: the
    cells' settings keys by label); ValueError before any sampling for a taken place (one
    holding this cell's samples from the same settings is not taken: they are kept)."""
    if save_images is None:
        return {}
    check_choice("save_format", save_format, ("png", "npz"))
    targets = {}
    for spec in specs:
        target = Path(save_images) / (safe_name(spec.label) + (".npz" if save_format == "npz" else ""))
        try:
            same = json.loads(sidecar_path(target).read_text())["meta"]["key"] == keys[spec.label]
        except (OSError, ValueError, KeyError, TypeError):
            same = False
        if not same:
            check_output(target, overwrite, "save_images")
            targets[spec.label] = target
    return targets


def save_cell(state: dict[str, Any], key: dict[str, Any], seed: int, batch_size: int, target: Path,
              overwrite: bool) -> None:
    """Write a finished ``compare`` cell's samples with each one's seeds and timesteps."""
    rows = [row for batch in state.get("visited") or [] for row in batch.tolist()]
    visited = rows if len(rows) == state["images"].shape[0] else None  # cells stored before it was kept: None
    records = []
    for i in range(state["images"].shape[0]):
        batch = i // batch_size
        noise_seed, plan_seed = batch_seeds(seed, batch)
        records.append(dict(index=i, batch=batch, noise_seed=noise_seed, plan_seed=plan_seed,
                            row=i - batch * batch_size, nfe=int(state["nfe"][i]),
                            timesteps=None if visited is None else [int(v) for v in visited[i] if v >= 0]))
    save_samples(state["images"], target, records=records, overwrite=overwrite,
                 meta=dict(label=key["label"], key=key, noise="x_T of batch b: row `row` of torch.randn((batch_size, "
                           "C, H, W), generator=torch.Generator().manual_seed(noise_seed)); plans and step noise "
                           "from torch.Generator().manual_seed(plan_seed)"))
