"""Thin wrapper around the compiled extension ``stepdrop._C``.

The package works without it (torch backend) and says so in one warning line. Inputs reach
this module already validated (:mod:`stepdrop.ops._inputs`); here they are only made
contiguous and handed over.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from stepdrop.ops.reference import SOLVERS
from stepdrop.ops.step_args import PlanOutputs, StepOptions

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


def fused_step(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, s: Tensor, active: Tensor | None,
               options: StepOptions, return_x0: bool) -> Tensor | tuple[Tensor, Tensor]:  # fmt: skip
    """Native fused step; same contract as :func:`stepdrop.ops.reference.fused_step_reference`."""
    _require()
    x = x.contiguous()
    x0 = torch.empty_like(x) if return_x0 else None
    x_next = _C.fused_step(
        x,
        eps.contiguous(),
        _table(alphas_cumprod),
        t.contiguous(),
        s.contiguous(),
        _contiguous(options.noise),
        _contiguous(active),
        *_scalars(options),
        x0,
    )
    return (x_next, x0) if return_x0 else x_next


def fused_plan_step(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, plan: Tensor, k: int, options: StepOptions,
                    outputs: PlanOutputs) -> Tensor:  # fmt: skip
    """Native plan step; same contract as :func:`stepdrop.ops.reference.fused_plan_step_reference`.
    The plan is read through its strides (no copy); the outputs are contiguous (validated)."""
    _require()
    return _C.fused_plan_step(
        x.contiguous(),
        eps.contiguous(),
        _table(alphas_cumprod),
        plan,
        int(k),
        _contiguous(options.noise),
        *_scalars(options),
        outputs.nfe,
        outputs.t_next,
        outputs.active_next,
    )


def grad_probe(eps_probe: Tensor, eps: Tensor, v: Tensor, step: float) -> Tensor:
    """Native probe; same contract as :func:`stepdrop.ops.reference.grad_norm_probe`."""
    _require()
    return _C.grad_probe(eps_probe.contiguous(), eps.contiguous(), v.contiguous(), float(step))


def _require() -> None:
    if _C is None:
        raise RuntimeError(f"stepdrop._C is not available: {IMPORT_ERROR}")


def _table(alphas_cumprod: Tensor) -> Tensor:
    """The ᾱ table as the kernels read it: float64, contiguous."""
    return alphas_cumprod.to(torch.float64).contiguous()


def _contiguous(v: Tensor | None) -> Tensor | None:
    return None if v is None else v.contiguous()


def _scalars(options: StepOptions) -> tuple[int, float, float]:
    """(solver code, η, clip) as the binding takes them; clip 0 means no clipping."""
    clip = options.clip
    return SOLVERS.index(options.solver), float(options.eta), 0.0 if clip is None else float(clip)
