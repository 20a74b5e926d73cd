"""Shared inputs and reference checks for the backend tests of the fused ops (native, Triton):
the fused step, the plan step and the gradient-norm probe.

float64 must agree to ~1e-12. For float32 the step's tolerance is measured, not guessed: a
backend may be at most 2× as far from the float64 reference as the reference itself run in
float32 (plus one float32 ulp of slack for cases where that error happens to be ~0). The
probe's tolerance is in :func:`assert_probe_matches_reference`.

Triton's CPU cases run under its interpreter in a subprocess (:func:`interpreter_results`):
``TRITON_INTERPRET=1`` is read when triton is imported and must not leak into this session.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stepdrop.ops import available_backends, triton_step
from stepdrop.ops.reference import CLEAN, fused_plan_step_reference, fused_step_reference, grad_norm_probe

T = 1000


def table(device="cpu") -> torch.Tensor:
    """ᾱ of the linear β schedule of Ho et al. (1e-4 … 0.02, T = 1000), float64."""
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(device)


def make_case(batch, shape, dtype, *, solver, eta, masked, seed=0, device="cpu"):
    """Inputs of one step: random t, s < t with some s = CLEAN and some s = t − 1; when
    ``masked``, every third sample inactive with t = CLEAN and an out-of-range s (kernels clamp)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(batch, *shape, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(1, T, (batch,), generator=g)
    s = torch.minimum(t - 1, (t - torch.randint(1, 200, (batch,), generator=g)).clamp(min=CLEAN))
    s[::4] = CLEAN
    s[1::5] = t[1::5] - 1
    active = None
    if masked:
        active = torch.ones(batch, dtype=torch.bool)
        active[1::3] = False
        t[~active] = CLEAN
        s[~active] = 10**6
    needs_noise = solver == "ddpm" or eta > 0
    case = dict(x=x, eps=eps, alphas_cumprod=table(), t=t, s=s, noise=noise if needs_noise else None, active=active)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def as_f64(case):
    return {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in case.items()}


def assert_matches_reference(out, case, **kw):
    """``out`` = (x_next, x̂0) of a backend against the reference, with the tolerance of the module docstring."""
    dtype = case["x"].dtype
    ref = fused_step_reference(**case, **kw, return_x0=True)
    exact = fused_step_reference(**as_f64(case), **kw, return_x0=True)
    for name, got, low, high in zip(("x_next", "x0"), out, ref, exact):
        assert got.dtype == dtype and got.shape == low.shape and got.device == low.device, name
        if dtype == torch.float64:
            torch.testing.assert_close(got, low, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
        elif high.numel():
            ref_err = (low.double() - high).abs().max().item()
            got_err = (got.double() - high).abs().max().item()
            slack = torch.finfo(torch.float32).eps * high.abs().max().item()
            assert got_err <= 2 * ref_err + slack, f"{name}: float32 error {got_err:.3g} > 2 × reference's {ref_err:.3g}"
        if case["active"] is not None:  # inactive samples are copied through bit for bit
            keep = ~case["active"]
            assert torch.equal(got[keep], case["x"][keep]), name


# ------------------------------------------------------------------------------ plan step
def make_plan(batch, length, *, seed=0, device="cpu") -> torch.Tensor:
    """int64 [batch, length] per-sample plans: row b makes (length − 1 − b) mod length model
    calls at distinct random timesteps, strictly decreasing, then CLEAN to the end — so rows
    finish at different steps; with 3 or more rows the last one is CLEAN throughout (a sample
    finished before the loop)."""
    g = torch.Generator().manual_seed(seed)
    plan = torch.full((batch, length), CLEAN, dtype=torch.int64)
    for b in range(batch):
        calls = (length - 1 - b) % length
        plan[b, :calls] = torch.randperm(T, generator=g)[:calls].sort(descending=True).values
    if batch >= 3:
        plan[-1] = CLEAN
    return plan.to(device)


def make_plan_case(batch, shape, dtype, *, solver, eta, k, length=6, seed=0, device="cpu"):
    """Inputs of one plan step (the arguments of ``fused_plan_step``, with ``nfe`` holding
    random counts, ``t_next``/``active_next`` garbage to be overwritten)."""
    case = make_case(batch, shape, dtype, solver=solver, eta=eta, masked=False, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    out = dict(x=case["x"], eps=case["eps"], alphas_cumprod=case["alphas_cumprod"],
               plan=make_plan(batch, length, seed=seed, device=device), k=k, noise=case["noise"])  # fmt: skip
    out["nfe"] = torch.randint(0, 10, (batch,), generator=g).to(device)
    out["t_next"] = torch.full((batch,), -7, dtype=torch.int64, device=device)
    out["active_next"] = torch.arange(batch, device=device) % 2 == 0
    return out


def copy_outputs(case):
    """The case with fresh copies of its in-place outputs (so that a run leaves the case intact)."""
    return {k: (v.clone() if k in ("nfe", "t_next", "active_next") and v is not None else v) for k, v in case.items()}


def as_step_case(case):
    """The fused_step case that plan step ``case["k"]`` must equal: t = plan[:, k],
    s = plan[:, k+1], active = t ≥ 0."""
    t, s = case["plan"][:, case["k"]], case["plan"][:, case["k"] + 1]
    return dict(x=case["x"], eps=case["eps"], alphas_cumprod=case["alphas_cumprod"], t=t, s=s, noise=case["noise"],
                active=t >= 0)  # fmt: skip


def assert_plan_step_matches_reference(out, case, **kw):
    """``out`` = (x_next, nfe, t_next, active_next) of a backend's plan step on ``case``
    (outputs as :func:`copy_outputs` gave them, None where the case has none): x_next within
    the step's tolerance, finished samples bit for bit, the bookkeeping exactly."""
    assert_matches_reference(out[:1], as_step_case(case), **kw)
    want = copy_outputs(case)
    fused_plan_step_reference(**want, **kw)
    for name, got in zip(("nfe", "t_next", "active_next"), out[1:]):
        if want[name] is None:
            assert got is None, name
        else:
            assert got.dtype == want[name].dtype and torch.equal(got, want[name]), f"{name}: {got} != {want[name]}"


# ------------------------------------------------------------------------------ probe
def make_probe_case(batch, shape, dtype, *, seed=0, device="cpu"):
    """ε, ε_probe = ε + 0.05·N(0, 1) (a realistic small difference) and v ~ N(0, I), h = 0.01."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    probe = eps + 0.05 * torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    v = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    return dict(eps_probe=probe.to(dtype).to(device), eps=eps.to(dtype).to(device), v=v.to(dtype).to(device),
                step=0.01)  # fmt: skip


def assert_probe_matches_reference(got, case):
    """float64 to 1e-12. Otherwise the sums run in float32 in another order than torch's, so
    the error may exceed the reference's: it may be 2× the reference's error (both against the
    float64 evaluation of the same inputs) plus 4·√N float32 ulps — the growth of rounding
    errors over a sum of N positive terms."""
    ref = grad_norm_probe(**case)
    assert got.dtype == ref.dtype and got.shape == ref.shape and got.device == ref.device
    if case["eps"].dtype == torch.float64:
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=0, equal_nan=True)
        return
    exact = grad_norm_probe(*(case[k].double() for k in ("eps_probe", "eps", "v")), case["step"])
    numel = case["eps"][0].numel() if case["eps"].shape[0] else 0
    assert torch.equal(got.isnan(), exact.isnan())
    ok = ~exact.isnan()
    ref_err = (ref.double() - exact)[ok].abs()
    got_err = (got.double() - exact)[ok].abs()
    allowed = 2 * ref_err + 4 * numel**0.5 * torch.finfo(torch.float32).eps * exact[ok].abs()
    assert (got_err <= allowed).all(), f"float32 error {got_err.max():.3g} > allowed {allowed.min():.3g}"


# ------------------------------------------------------------------------------ Triton interpreter
def interpreter_results(script, tmp_path_factory):
    """Run ``script`` (a test module whose ``__main__`` saves its Triton CPU outputs to the path
    it is given) in a fresh process with TRITON_INTERPRET=1, and load what it saved. Skips
    without triton."""
    if not triton_step.triton_importable():
        pytest.skip("triton is not installed")
    path = tmp_path_factory.mktemp("triton") / "results.pt"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, str(script), str(path)], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(path, weights_only=False)


def need_cuda_backend(backend):
    """Skip, with the reason, unless ``backend`` ("cuda" or "triton") can run on CUDA tensors here."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device available")
    if backend not in available_backends("cuda"):
        why = {"cuda": "stepdrop._C was built without the CUDA kernels", "triton": "triton is not installed"}
        pytest.skip(why[backend])
