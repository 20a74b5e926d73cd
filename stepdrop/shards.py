"""A ``compare`` cell in progress, one file per finished batch (docs/DESIGN.md §6).

Batch i of a cell is stored as ``<cells>/<cell>.batches/batch-<i>.pt`` by whichever rank
sampled it, atomically and with the cell's settings key, so a run interrupted on any rank
resumes without sampling a finished batch again, with the same or another number of ranks
(:mod:`stepdrop.distributed`). When every batch exists, rank 0 folds them in batch order into
the cell's state, the same dict a single process builds. A cell in progress written before
this layout (one cumulative ``<cell>.partial.pt`` of batches 0…m−1) is read as those batches.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from stepdrop.cells import load_matching, save

__all__ = ["add_batch", "batch_dir", "batch_files", "done_batches", "merge", "new_state", "remove", "save_batch"]


def new_state(key: dict[str, Any], shape: tuple[int, ...], T: int) -> dict[str, Any]:
    """An empty cell state: what :func:`add_batch` accumulates into."""
    return dict(key=key, images=torch.empty(0, *shape, dtype=torch.uint8), nfe=torch.empty(0, dtype=torch.int64),
                model_calls=0, evaluated_samples=0, overhead_calls=0, overhead_samples=0, wall=0.0, batch_seconds=[],
                histogram=torch.zeros(T, dtype=torch.int64), timesteps=[], peak_mb=None, calls_by_variant={},
                evaluated_by_variant={}, visited=[], per_sample_plans=False)


def add_batch(state: dict[str, Any], images: Tensor, stats, elapsed: float, peak_mb: float | None) -> None:
    """Fold one sampled batch (uint8 images, its :class:`~stepdrop.sampler.SampleStats`) into ``state``."""
    size, T = images.shape[0], state["histogram"].numel()
    visited = stats.timesteps
    state["images"] = torch.cat([state["images"], images])
    state["nfe"] = torch.cat([state["nfe"], stats.nfe])
    for name in ("model_calls", "evaluated_samples", "overhead_calls", "overhead_samples"):
        state[name] += getattr(stats, name)
    state["wall"] += elapsed
    for label, count in stats.calls_by_variant().items():  # summed over samples
        state["calls_by_variant"][label] = state["calls_by_variant"].get(label, 0) + int(count.sum())
    for label in stats.variants[: stats.model_calls]:  # masked samples included
        state["evaluated_by_variant"][label] = state["evaluated_by_variant"].get(label, 0) + size
    state["batch_seconds"].append((size, elapsed))
    state["histogram"] += torch.bincount(visited[visited >= 0], minlength=T)
    state["visited"].append(visited.to(torch.int16))  # every sample's timesteps, for --save-images
    if len(state["timesteps"]) < 8:  # the first row of each batch: per-batch random plans differ there
        state["timesteps"].append([int(v) for v in visited[0] if v >= 0])
    state["per_sample_plans"] = state["per_sample_plans"] or bool((visited != visited[0]).any())
    if peak_mb is not None:
        state["peak_mb"] = max(state["peak_mb"] or 0.0, peak_mb)


def batch_dir(cells: Path, safe_label: str) -> Path:
    return cells / f"{safe_label}.batches"


def save_batch(state: dict[str, Any], folder: Path, index: int) -> None:
    """Store a one-batch state as batch ``index`` (atomic)."""
    save(dict(state, indices=[index]), folder / f"batch-{index:06d}.pt")


def done_batches(folder: Path, legacy: Path, key: dict[str, Any], log: Callable[[str], None],
                 convert: bool) -> dict[int, Path]:
    """The finished batches of a cell: index → file. A legacy cumulative partial file is
    converted into one record first (``convert``: rank 0 only, before the others look)."""
    if convert and legacy.exists():
        old = load_matching(legacy, key, log)
        count = len(old.get("batch_seconds") or []) if old is not None else 0
        if count:
            folder.mkdir(parents=True, exist_ok=True)
            record = dict(new_state(key, tuple(old["images"].shape[1:]), old["histogram"].numel()), **old)
            # written before call variants were counted: every call was a full one
            record["calls_by_variant"] = old.get("calls_by_variant") or {"full": int(old["nfe"].sum())}
            record["evaluated_by_variant"] = old.get("evaluated_by_variant") or {"full": int(old["evaluated_samples"])}
            save(dict(record, indices=list(range(count))), folder / f"batch-{0:06d}.pt")
        legacy.unlink(missing_ok=True)
    found: dict[int, Path] = {}
    if folder.is_dir():
        for path in batch_files(folder):
            record = load_matching(path, key, log)
            if record is not None:
                for i in record.get("indices", []):
                    found[i] = path
    return found


def merge(folder: Path, key: dict[str, Any], batches: int, shape: tuple[int, ...], T: int,
          log: Callable[[str], None]) -> dict[str, Any]:
    """The cell's state from its batch files, in batch order (what one process would have built)."""
    records = {}
    for path in batch_files(folder):
        record = load_matching(path, key, log)
        if record is not None:
            records[record["indices"][0]] = record
    state = new_state(key, shape, T)
    covered: list[int] = []
    for first in sorted(records):
        record = records[first]
        covered += record["indices"]
        state["images"] = torch.cat([state["images"], record["images"]])
        state["nfe"] = torch.cat([state["nfe"], record["nfe"]])
        for name in ("model_calls", "evaluated_samples", "overhead_calls", "overhead_samples", "wall"):
            state[name] += record[name]
        for name in ("calls_by_variant", "evaluated_by_variant"):
            for label, count in (record.get(name) or {}).items():
                state[name][label] = state[name].get(label, 0) + count
        state["batch_seconds"] += list(record.get("batch_seconds") or [])
        state["histogram"] += record["histogram"]
        state["visited"] += list(record.get("visited") or [])
        state["timesteps"] = (state["timesteps"] + list(record["timesteps"]))[:8]
        state["per_sample_plans"] = state["per_sample_plans"] or bool(record.get("per_sample_plans"))
        if record.get("peak_mb") is not None:
            state["peak_mb"] = max(state["peak_mb"] or 0.0, record["peak_mb"])
    if covered != list(range(batches)):
        raise RuntimeError(f"cell {key.get('label')!r}: batches {sorted(set(range(batches)) - set(covered))} are "
                           f"missing from {folder} after every rank finished")  # an internal invariant
    return state


def batch_files(folder: Path) -> list[Path]:
    """The batch files in ``folder`` (not the set-aside copies of damaged or foreign ones)."""
    return sorted(p for p in folder.glob("batch-*.pt") if re.fullmatch(r"batch-\d{6}\.pt", p.name))


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
