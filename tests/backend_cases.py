"""Shared inputs and the reference check for the fused-step backend tests (native, Triton).

float64 must agree to ~1e-12. For float32 the tolerance is measured, not guessed: a backend
may be at most 2× as far from the float64 reference as the reference itself run in float32
(plus one float32 ulp of slack for cases where that error happens to be ~0).
"""

from __future__ import annotations

import torch

from stepdrop.ops.reference import CLEAN, fused_step_reference

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
