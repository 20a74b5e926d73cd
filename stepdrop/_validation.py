"""Argument checks shared by every public entry point.

Each raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value, and the
message names the argument and its legal range.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch
from torch import Tensor


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{_fmt(low, '-inf')}, {_fmt(high, 'inf')}], got {value}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float in the interval given by the bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if value != value or too_low or too_high:
        lb = "(" if low_open else "["
        rb = ")" if high_open else "]"
        raise ValueError(f"{name} must be in {lb}{_fmt(low, '-inf')}, {_fmt(high, 'inf')}{rb}, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def check_tensor(
    name: str,
    value: object,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    ndim: int | None = None,
    min_ndim: int | None = None,
) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            legal = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({legal}), got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(value.shape)}")
    if min_ndim is not None and value.ndim < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    return value


def check_same_device(**tensors: Tensor | None) -> None:
    """All given tensors on one device; the error lists each argument's device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"tensors must be on one device, got {where}")


def _fmt(bound: float | None, unbounded: str) -> str:
    return unbounded if bound is None else str(bound)


def model_device_dtype(
    model: object, *, default_device: torch.device | None = torch.device("cpu")
) -> tuple[torch.device | None, torch.dtype]:
    """Device and dtype of a model's first parameter; for a parameter-free callable
    (``default_device``, float32): pass ``default_device=None`` to tell such a model apart."""
    try:
        p = next(model.parameters())  # type: ignore[attr-defined]
        return p.device, p.dtype
    except (AttributeError, StopIteration, TypeError):
        return default_device, torch.float32


def check_device(name: str, device: object) -> torch.device:
    """``device`` as a torch.device that exists on this machine; ValueError naming it and what
    is available otherwise (before any file is read or tensor moved)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name} must be a device string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    available = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else ["cpu"]
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={str(device)!r} is not a device; available here: {', '.join(available)}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}={str(device)!r}: CUDA is not available on this machine "
                             f"(torch.cuda.is_available() is False); available here: {', '.join(available)}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}={str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                             f"available here: {', '.join(available)}")
        return dev
    raise ValueError(f"{name}={str(device)!r}: stepdrop runs on the CPU and on CUDA devices; available here: "
                     f"{', '.join(available)}")
