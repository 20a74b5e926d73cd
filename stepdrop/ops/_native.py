"""Thin wrapper around the compiled extension ``stepdrop._C``.

The package works without it (torch backend) and says so in one warning line. Inputs reach
this module already validated by :func:`stepdrop.ops.validate_step_inputs`; here they are
only made contiguous and handed over.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from stepdrop.ops.reference import SOLVERS

try:
    from stepdrop import _C  # type: ignore[attr-defined]

    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # built without the extension, or a broken build
    _C = None
    IMPORT_ERROR = exc
    # warn_explicit with no source file: the warning prints as exactly one line
    warnings.warn_explicit(
        f"compiled extension stepdrop._C unavailable ({exc}); using the torch backend",
        RuntimeWarning,
        filename="stepdrop",
        lineno=0,
    )


def has_cpu() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and bool(_C.has_cuda()) and torch.cuda.is_available()


def fused_step(
    x: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    noise: Tensor | None,
    active: Tensor | None,
    solver: str,
    eta: float,
    clip: float | None,
    return_x0: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """Native fused step; same contract as :func:`stepdrop.ops.reference.fused_step_reference`."""
    if _C is None:
        raise RuntimeError(f"stepdrop._C is not available: {IMPORT_ERROR}")
    x = x.contiguous()
    x0 = torch.empty_like(x) if return_x0 else None
    x_next = _C.fused_step(
        x,
        eps.contiguous(),
        alphas_cumprod.to(torch.float64).contiguous(),
        t.contiguous(),
        s.contiguous(),
        None if noise is None else noise.contiguous(),
        None if active is None else active.contiguous(),
        SOLVERS.index(solver),
        float(eta),
        0.0 if clip is None else float(clip),
        x0,
    )
    return (x_next, x0) if return_x0 else x_next
