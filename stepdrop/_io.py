"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

An interrupted write (a crash, Ctrl-C, a full disk) never leaves a broken file behind: the
target holds either its previous content or the complete new one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file and move it onto ``path`` atomically."""
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write to {folder}: the folder is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def ensure_writable_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed; a clear error if it (or its nearest existing parent) is not
    a writable folder."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(f"output folder {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"output folder {folder} is not writable")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cache_root() -> Path:
    """``$STEPDROP_CACHE``, default ``~/.cache/stepdrop``: searched timesteps, width schedules."""
    root = os.environ.get("STEPDROP_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "stepdrop"
