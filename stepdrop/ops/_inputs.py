"""Input validation of the fused ops, at the Python boundary (docs/DESIGN.md §5).

Every check raises ``TypeError`` for a wrong type and ``ValueError`` for a wrong value or
shape, naming the argument and its legal range. Checks of tensor *values* (timesteps, plan
entries, the ᾱ table) run only for CPU tensors, where they cost no device synchronisation;
on a GPU the kernels clamp indices instead, so they never read out of bounds. The CPU value
checks read zero-copy numpy views: a dozen torch dispatches on a [B] index vector cost more
than the fused step they guard at small batches.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from stepdrop._validation import check_choice, check_float, check_int, check_same_device, check_tensor
from stepdrop.ops.reference import CLEAN, SOLVERS
from stepdrop.ops.step_args import PlanOutputs, StepOptions

FLOAT_DTYPES = (torch.float32, torch.float64)
"""dtypes of x, ε and z in the fused step (the update runs in float32, or float64)."""
PROBE_DTYPES = FLOAT_DTYPES + (torch.float16, torch.bfloat16)
"""dtypes of the probe's inputs (a half-precision model's outputs; sums in float32)."""


def validate_step_inputs(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, s: Tensor, active: Tensor | None,
                         options: StepOptions) -> None:  # fmt: skip
    """All checks of :func:`stepdrop.ops.fused_step`. Value checks on t, s and the ᾱ table
    (each entry in (0, 1)) run only for CPU tensors; kernels clamp indices regardless."""
    _check_data(x, eps, options.noise, alphas_cumprod)
    batch = x.shape[0]
    for name, idx in (("t", t), ("s", s)):
        check_tensor(name, idx, dtypes=(torch.int64,), ndim=1)
        if idx.numel() != batch:
            raise ValueError(f"{name} must have one entry per sample ({batch}), got {idx.numel()}")
    if active is not None:
        check_tensor("active", active, dtypes=(torch.bool,), ndim=1)
        if active.numel() != batch:
            raise ValueError(f"active must have one entry per sample ({batch}), got {active.numel()}")
    check_same_device(x=x, eps=eps, alphas_cumprod=alphas_cumprod, t=t, s=s, noise=options.noise, active=active)
    _check_options(options)
    if x.device.type == "cpu" and batch > 0:
        live = None if active is None else _view(active)
        _check_timesteps(_view(t), _view(s), live, alphas_cumprod.numel() - 1, "t", "s")


def validate_plan_step_inputs(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, plan: Tensor, k: int,
                              options: StepOptions, outputs: PlanOutputs) -> int:  # fmt: skip
    """All checks of :func:`stepdrop.ops.fused_plan_step`; returns ``k`` as an int.

    On CPU tensors the two plan columns the step reads are checked too: active samples
    (plan[b, k] ≥ 0) need plan[b, k] ≤ T−1 and CLEAN ≤ plan[b, k+1] < plan[b, k], and a
    finished row stays finished (plan[b, k] = CLEAN ⇒ plan[b, k+1] = CLEAN)."""
    _check_data(x, eps, options.noise, alphas_cumprod)
    batch = x.shape[0]
    check_tensor("plan", plan, dtypes=(torch.int64,), ndim=2)
    if plan.shape[0] != batch:
        raise ValueError(f"plan must have one row per sample ({batch}), got shape {tuple(plan.shape)}")
    if plan.shape[1] < 2:
        raise ValueError(f"plan must have at least 2 columns (step k goes from column k to k+1), got shape "
                         f"{tuple(plan.shape)}")  # fmt: skip
    k = check_int("k", k, low=0, high=plan.shape[1] - 2)
    written = vars(outputs)  # the fields by name: nfe, t_next, active_next
    for name, out in written.items():
        if out is None:
            continue
        check_tensor(name, out, dtypes=(torch.bool if name == "active_next" else torch.int64,), ndim=1)
        if out.numel() != batch:
            raise ValueError(f"{name} must have one entry per sample ({batch}), got {out.numel()}")
        if not out.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is written in place")
    check_same_device(x=x, eps=eps, alphas_cumprod=alphas_cumprod, plan=plan, noise=options.noise, **written)
    _check_no_shared_memory(plan=plan, **written)
    _check_options(options)
    if x.device.type == "cpu" and batch > 0:
        t, s = _view(plan[:, k]), _view(plan[:, k + 1])
        t_name, s_name = f"plan[:, {k}]", f"plan[:, {k + 1}]"
        if t.min() < CLEAN:
            raise ValueError(f"{t_name} must be in [{CLEAN}, {alphas_cumprod.numel() - 1}] ({CLEAN} = finished), "
                             f"got {int(t.min())}")  # fmt: skip
        live = t >= 0
        finished = ~live & (s != CLEAN)
        if finished.any():
            b = int(np.flatnonzero(finished)[0])
            raise ValueError(f"plan rows must stay at {CLEAN} once finished, got plan[{b}, {k}] = {CLEAN} and "
                             f"plan[{b}, {k + 1}] = {int(s[b])}")  # fmt: skip
        _check_timesteps(t, s, live, alphas_cumprod.numel() - 1, t_name, s_name)
    return k


def validate_probe_inputs(eps_probe: Tensor, eps: Tensor, v: Tensor, step: float) -> float:
    """All checks of :func:`stepdrop.ops.grad_probe`; returns ``step`` as a float."""
    check_tensor("eps", eps, dtypes=PROBE_DTYPES, min_ndim=1)
    for name, other in (("eps_probe", eps_probe), ("v", v)):
        check_tensor(name, other, dtypes=(eps.dtype,))
        if other.shape != eps.shape:
            raise ValueError(f"{name} must have the shape of eps {tuple(eps.shape)}, got {tuple(other.shape)}")
    check_same_device(eps_probe=eps_probe, eps=eps, v=v)
    return check_float("step", step, low=0.0, low_open=True, high=float("inf"), high_open=True)


# ------------------------------------------------------------------------------ pieces
def _check_data(x: Tensor, eps: Tensor, noise: Tensor | None, alphas_cumprod: Tensor) -> None:
    """x, ε and z of one step, and the ᾱ table (its values on the CPU: each in (0, 1))."""
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
        table = _view(alphas_cumprod)
        inside = (table > 0) & (table < 1)  # NaN fails both comparisons
        if not inside.all():
            i = int(np.flatnonzero(~inside)[0])
            raise ValueError(
                f"alphas_cumprod must be finite and each in the open interval (0, 1), "
                f"got alphas_cumprod[{i}] = {float(alphas_cumprod[i])}"
            )


def _check_options(options: StepOptions) -> None:
    """The solver, its scalars, and the noise that a stochastic update needs."""
    solver, eta = options.solver, options.eta
    check_choice("solver", solver, SOLVERS)
    check_float("eta", eta, low=0.0, high=1.0)
    if options.clip is not None:
        check_float("clip", options.clip, low=0.0, low_open=True)
    if options.noise is None and (solver == "ddpm" or eta > 0):
        raise ValueError(f"noise is required for solver={solver!r} with eta={eta} (the update adds σ·z)")


def _view(tensor: Tensor) -> np.ndarray:
    """A zero-copy numpy view of a CPU tensor, for value checks."""
    return tensor.detach().numpy()


def _check_timesteps(t: np.ndarray, s: np.ndarray, live: np.ndarray | None, last: int, t_name: str,
                     s_name: str) -> None:  # fmt: skip
    """CPU value check of one transition's indices: for live samples (all when ``live`` is
    None), t ∈ [0, last] and s ∈ [CLEAN, t−1]. The names are those of the caller's arguments."""
    t_live, s_live = (t, s) if live is None else (t[live], s[live])
    if t_live.size and (t_live.min() < 0 or t_live.max() > last):
        raise ValueError(f"{t_name} must be in [0, {last}] for active samples, got range [{int(t_live.min())}, "
                         f"{int(t_live.max())}]")  # fmt: skip
    if s_live.size and (s_live.min() < CLEAN or (s_live >= t_live).any()):
        raise ValueError(f"{s_name} must be in [{CLEAN}, {t_name}-1] for active samples ({CLEAN} = clean data)")


def _check_no_shared_memory(**tensors: Tensor | None) -> None:
    """No two of the tensors share memory: outputs written in place must not alias each other
    or an input the same launch reads (the byte spans of their views may not intersect)."""
    spans = {}
    for name, v in tensors.items():
        if v is None or v.numel() == 0 or v.device.type == "meta":
            continue
        extent = sum((size - 1) * stride for size, stride in zip(v.shape, v.stride())) + 1
        spans[name] = (v.device, v.data_ptr(), v.data_ptr() + extent * v.element_size())
    names = list(spans)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (dev_a, lo_a, hi_a), (dev_b, lo_b, hi_b) = spans[a], spans[b]
            if dev_a == dev_b and lo_a < hi_b and lo_b < hi_a:
                raise ValueError(f"{a} and {b} must not share memory: {b} is written in place")
