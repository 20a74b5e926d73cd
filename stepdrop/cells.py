"""The cell files of ``stepdrop compare`` under ``<out>/cells/``: a finished cell
(``<label>.pt``), a cell in progress (``<label>.partial.pt``) and the film frames
(``film_<label>.pt``), each stored atomically with the key of the settings it was made with,
and read back only for that key.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Callable

import torch

from stepdrop.checkpoint import atomic_save

__all__ = ["FORMAT", "batch_seeds", "load", "load_matching", "safe_name", "save"]

FORMAT = "stepdrop-compare-cell"


def batch_seeds(seed: int, index: int) -> tuple[int, int]:
    """(initial-noise seed, plan/step-noise seed) of batch ``index`` of every cell."""
    base = (seed << 24) + 2 * index
    return base, base + 1


def safe_name(label: str) -> str:
    return label.replace(":", "_").replace("@", "_n").replace("(", "_").replace(")", "").replace(",", "_")


def load(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged file is redone, not trusted
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def load_matching(path: Path, key: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any] | None:
    """The payload stored at ``path`` if it was made with ``key``. A file that cannot be read, or
    that was made with other settings, is renamed aside (``<name>.set-aside-<UTC time>.pt``)
    and None returned: it is redone, but hours of sampling are never overwritten."""
    if not path.exists():
        return None
    data = load(path)
    if data is not None and data.get("key") == key:
        return data
    if data is None:
        why = "cannot be read as a stepdrop compare file"
    else:
        old = data.get("key") or {}
        changed = [f"{k}: {old.get(k)!r} -> {key.get(k)!r}" for k in sorted(set(old) | set(key))
                   if old.get(k) != key.get(k)]
        why = f"was made with other settings ({'; '.join(changed)})"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    aside = path.with_name(f"{path.stem}.set-aside-{stamp}{path.suffix}")
    path.replace(aside)
    log(f"{path.name} {why}: kept as {aside.name}, redoing it")
    return None


def save(payload: dict[str, Any], path: Path) -> None:
    atomic_save({"format": FORMAT, **payload}, path)

