"""Fused sampling ops behind one contract, dispatched to a backend.

``fused_step`` validates its inputs here, at the Python boundary, before any kernel runs;
backends receive checked tensors and never read out of bounds. The torch reference
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

from stepdrop._validation import check_choice, check_float, check_same_device, check_tensor
from stepdrop.ops import _native, triton_step
from stepdrop.ops.reference import CLEAN, SOLVERS, fused_step_reference, predict_x0, q_sample, step_coefficients

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
FLOAT_DTYPES = (torch.float32, torch.float64)

__all__ = [
    "BACKENDS",
    "CLEAN",
    "SOLVERS",
    "available_backends",
    "fused_step",
    "fused_step_reference",
    "predict_x0",
    "q_sample",
    "resolve_backend",
    "step_coefficients",
]


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
    validate_step_inputs(x, eps, alphas_cumprod, t, s, noise=noise, active=active, solver=solver, eta=eta, clip=clip)
    kwargs = dict(noise=noise, active=active, solver=solver, eta=eta, clip=clip, return_x0=return_x0)
    return _dispatch(resolve_backend(backend, x.device), x, eps, alphas_cumprod, t, s, **kwargs)


def _dispatch(name: str, x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, s: Tensor, **kwargs):
    """Run the fused step on the concrete backend ``name`` (from :func:`resolve_backend`) with
    validated inputs; the one dispatch table, shared with :class:`stepdrop.FusedSampler`."""
    impl = {
        "torch": fused_step_reference,
        "cpu": _native.fused_step,
        "cuda": _native.fused_step,
        "triton": triton_step.fused_step_triton,
    }[name]
    return impl(x, eps, alphas_cumprod, t, s, **kwargs)


def validate_step_inputs(
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
) -> None:
    """All checks of :func:`fused_step`. Value checks on t, s and the ᾱ table (each entry in
    (0, 1)) run only for CPU tensors, where they cost no device synchronisation; kernels clamp
    indices regardless."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES, min_ndim=1)
    check_tensor("eps", eps, dtypes=(x.dtype,))
    if eps.shape != x.shape:
        raise ValueError(f"eps must have the shape of x {tuple(x.shape)}, got {tuple(eps.shape)}")
    if noise is not None:
        check_tensor("noise", noise, dtypes=(x.dtype,))
        if noise.shape != x.shape:
            raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    check_tensor("alphas_cumprod", alphas_cumprod, dtypes=FLOAT_DTYPES, ndim=1)
    if alphas_cumprod.numel() < 2:
        raise ValueError(f"alphas_cumprod must have at least 2 entries, got {alphas_cumprod.numel()}")
    if alphas_cumprod.device.type == "cpu":
        # one pass over a [T] table: ᾱ = 1 gives 0/0 in the coefficients, ᾱ ≤ 0 or NaN a NaN sample
        inside = (alphas_cumprod > 0) & (alphas_cumprod < 1)  # NaN fails both comparisons
        if not bool(inside.all()):
            i = int((~inside).nonzero()[0])
            raise ValueError(
                f"alphas_cumprod must be finite and each in the open interval (0, 1), "
                f"got alphas_cumprod[{i}] = {float(alphas_cumprod[i])}"
            )
    batch = x.shape[0]
    for name, idx in (("t", t), ("s", s)):
        check_tensor(name, idx, dtypes=(torch.int64,), ndim=1)
        if idx.numel() != batch:
            raise ValueError(f"{name} must have one entry per sample ({batch}), got {idx.numel()}")
    if active is not None:
        check_tensor("active", active, dtypes=(torch.bool,), ndim=1)
        if active.numel() != batch:
            raise ValueError(f"active must have one entry per sample ({batch}), got {active.numel()}")
    check_same_device(x=x, eps=eps, alphas_cumprod=alphas_cumprod, t=t, s=s, noise=noise, active=active)
    check_choice("solver", solver, SOLVERS)
    check_float("eta", eta, low=0.0, high=1.0)
    if clip is not None:
        check_float("clip", clip, low=0.0, low_open=True)
    if noise is None and (solver == "ddpm" or eta > 0):
        raise ValueError(f"noise is required for solver={solver!r} with eta={eta} (the update adds σ·z)")
    if x.device.type == "cpu" and batch > 0:
        last = alphas_cumprod.numel() - 1
        live = active if active is not None else torch.ones(batch, dtype=torch.bool)
        tl, sl = t[live], s[live]
        if tl.numel() and (tl.min() < 0 or tl.max() > last):
            raise ValueError(f"t must be in [0, {last}] for active samples, got range [{int(tl.min())}, {int(tl.max())}]")
        if sl.numel() and (sl.min() < CLEAN or (sl >= tl).any()):
            raise ValueError(f"s must be in [{CLEAN}, t-1] for active samples ({CLEAN} = clean data)")
