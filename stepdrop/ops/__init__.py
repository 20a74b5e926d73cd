"""Fused sampling ops behind one contract, dispatched to a backend.

Ops: ``fused_step`` (one transition t → s per sample), ``fused_plan_step`` (step k of a
per-sample plan, with the loop's bookkeeping in the same launch) and ``grad_probe`` (the
per-sample ‖J v‖/‖v‖ reduction of the gradient-aware policy). Each validates its inputs
here, at the Python boundary (:mod:`stepdrop.ops._inputs`), before any kernel runs; backends
receive checked tensors and never read out of bounds. The torch reference
(:mod:`stepdrop.ops.reference`) is the specification every backend is tested against.

Backends: "torch" (reference, any device), "cpu" (the C++ extension ``stepdrop._C``, CPU
tensors), "cuda" (the CUDA kernels of that extension, CUDA tensors, where it was built with
them), "triton" (:mod:`stepdrop.ops.triton_step`: CUDA tensors where triton is installed; CPU
tensors only under Triton's interpreter, ``TRITON_INTERPRET=1``, for tests). "auto" picks the
fastest one available for the tensor's device (never the interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdrop._validation import check_choice
from stepdrop.ops import _native, triton_step
from stepdrop.ops._inputs import FLOAT_DTYPES, validate_plan_step_inputs, validate_probe_inputs, validate_step_inputs
from stepdrop.ops.reference import (
    CLEAN,
    SOLVERS,
    fused_plan_step_reference,
    fused_step_reference,
    grad_norm_probe,
    predict_x0,
    q_sample,
    step_coefficients,
)
from stepdrop.ops.step_args import PlanOutputs, StepOptions

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")

__all__ = [
    "BACKENDS",
    "CLEAN",
    "FLOAT_DTYPES",
    "SOLVERS",
    "available_backends",
    "fused_plan_step",
    "fused_plan_step_reference",
    "fused_step",
    "fused_step_reference",
    "grad_probe",
    "predict_x0",
    "q_sample",
    "resolve_backend",
    "step_coefficients",
]


def _reference_step(x, eps, alphas_cumprod, t, s, active, options: StepOptions, return_x0: bool):
    """The torch backend of the fused step: the reference, given its settings as keywords."""
    return fused_step_reference(x, eps, alphas_cumprod, t, s, active=active, return_x0=return_x0, **vars(options))


def _reference_plan_step(x, eps, alphas_cumprod, plan, k, options: StepOptions, outputs: PlanOutputs):
    """The torch backend of the plan step: the reference, given its settings as keywords."""
    return fused_plan_step_reference(x, eps, alphas_cumprod, plan, k, **vars(options), **vars(outputs))


_IMPLS = {
    "fused_step": dict(
        torch=_reference_step,
        cpu=_native.fused_step,
        cuda=_native.fused_step,
        triton=triton_step.fused_step_triton,
    ),
    "fused_plan_step": dict(
        torch=_reference_plan_step,
        cpu=_native.fused_plan_step,
        cuda=_native.fused_plan_step,
        triton=triton_step.fused_plan_step_triton,
    ),
    "grad_probe": dict(
        torch=grad_norm_probe, cpu=_native.grad_probe, cuda=_native.grad_probe, triton=triton_step.grad_probe_triton
    ),
}
"""The one dispatch table: op → concrete backend → implementation (validated inputs in). The
steps' implementations take ``(x, eps, alphas_cumprod, t, s, active, options, return_x0)`` and
``(x, eps, alphas_cumprod, plan, k, options, outputs)``, with the settings in one
:class:`~stepdrop.ops.step_args.StepOptions` and the plan step's bookkeeping in one
:class:`~stepdrop.ops.step_args.PlanOutputs`."""


def available_backends(device: torch.device | str = "cpu") -> tuple[str, ...]:
    """Backends that can run on ``device`` in this installation, fastest first. On the CPU
    "triton" is listed (last) only under Triton's interpreter, which is slow and for tests."""
    device = torch.device(device)
    names = []
    if device.type == "cpu" and _native.has_cpu():
        names.append("cpu")
    if device.type == "cuda" and _native.has_cuda():
        names.append("cuda")
    if device.type == "cuda" and triton_step.triton_available(device):
        names.append("triton")
    names.append("torch")
    if device.type == "cpu" and triton_step.triton_available(device):
        names.append("triton")
    return tuple(names)


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend for ``backend`` on ``device``; a clear error if it cannot run there."""
    check_choice("backend", backend, BACKENDS)
    usable = available_backends(device)
    if backend == "auto":
        return usable[0]
    if backend not in usable:
        why = {
            "cpu": "needs CPU tensors and the compiled extension stepdrop._C",
            "cuda": "needs CUDA tensors and stepdrop._C built with CUDA (nvcc + a CUDA build of torch)",
            "triton": "needs CUDA tensors and triton installed, or CPU tensors with TRITON_INTERPRET=1 "
            "set before triton is imported (the interpreter, for tests)",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} cannot run on {torch.device(device)} ({why}); available here: {usable}")
    return backend


def fused_step(
    x: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    t: Tensor,
    s: Tensor,
    *,
    noise: Tensor | None = None,
    active: Tensor | None = None,
    solver: str = "ddim",
    eta: float = 0.0,
    clip: float | None = None,
    return_x0: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """One transition t → s per sample; see :func:`stepdrop.ops.reference.fused_step_reference`.

    Non-contiguous inputs are accepted (the compiled backends copy them to contiguous memory).
    Raises ``TypeError``/``ValueError`` naming the argument on any malformed input.
    """
    options = StepOptions(noise, solver, eta, clip)
    validate_step_inputs(x, eps, alphas_cumprod, t, s, active, options)
    return _dispatch(resolve_backend(backend, x.device), x, eps, alphas_cumprod, t, s, active, options, return_x0)


def _dispatch(name: str, x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, s: Tensor, active: Tensor | None,
              options: StepOptions, return_x0: bool = False):  # fmt: skip
    """Run the fused step on the concrete backend ``name`` (from :func:`resolve_backend`) with
    validated inputs; shared with :class:`stepdrop.FusedSampler`."""
    return _IMPLS["fused_step"][name](x, eps, alphas_cumprod, t, s, active, options, return_x0)


def fused_plan_step(
    x: Tensor,
    eps: Tensor,
    alphas_cumprod: Tensor,
    plan: Tensor,
    k: int,
    *,
    noise: Tensor | None = None,
    solver: str = "ddim",
    eta: float = 0.0,
    clip: float | None = None,
    nfe: Tensor | None = None,
    t_next: Tensor | None = None,
    active_next: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """Step k of a per-sample plan in one launch: the update of :func:`fused_step` with
    t = plan[:, k], s = plan[:, k+1], active = t ≥ 0, and the loop's bookkeeping (nfe += active,
    t_next = max(plan[:, k+1], 0), active_next = plan[:, k+1] ≥ 0) written by the same kernel;
    see :func:`stepdrop.ops.reference.fused_plan_step_reference`.

    ``k`` is a Python int in [0, L−2], passed to the kernel as an argument: nothing is read
    back from the device, and a captured CUDA graph replays each step with its own k. ``plan``
    may have any strides (an expanded shared plan is read in place); ``nfe``, ``t_next`` and
    ``active_next`` must be contiguous (they are written in place) and share no memory with
    ``plan`` or each other. Raises ``TypeError``/``ValueError`` naming the argument on any
    malformed input.
    """
    options, outputs = StepOptions(noise, solver, eta, clip), PlanOutputs(nfe, t_next, active_next)
    k = validate_plan_step_inputs(x, eps, alphas_cumprod, plan, k, options, outputs)
    return _dispatch_plan_step(resolve_backend(backend, x.device), x, eps, alphas_cumprod, plan, k, options, outputs)


def _dispatch_plan_step(name: str, x: Tensor, eps: Tensor, alphas_cumprod: Tensor, plan: Tensor, k: int,
                        options: StepOptions, outputs: PlanOutputs):  # fmt: skip
    """:func:`fused_plan_step` on the concrete backend ``name`` with validated inputs."""
    return _IMPLS["fused_plan_step"][name](x, eps, alphas_cumprod, plan, k, options, outputs)


def grad_probe(eps_probe: Tensor, eps: Tensor, v: Tensor, step: float, *, backend: str = "auto") -> Tensor:
    """Per-sample sensitivity ‖ε(x + h·v) − ε(x)‖/(h·‖v‖) in one launch; see
    :func:`stepdrop.ops.reference.grad_norm_probe`.

    Args:
        eps_probe: ε(x + h·v), [B, ...], float32, float64, float16 or bfloat16.
        eps: ε(x), the shape and dtype of ``eps_probe``.
        v: the probe direction, the shape and dtype of ``eps``.
        step: h > 0.
        backend: one of :data:`BACKENDS`.

    Returns:
        [B], float64 for float64 input, else float32 (the sums are taken in that dtype; the
        compiled backends add each sample's elements in a fixed order, so equal inputs give
        equal results).
    """
    step = validate_probe_inputs(eps_probe, eps, v, step)
    return _IMPLS["grad_probe"][resolve_backend(backend, eps.device)](eps_probe, eps, v, step)
