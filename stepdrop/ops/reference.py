"""Pure-torch reference of the fused sampling step: the specification every backend matches.

One transition t → s of a discrete-time VP diffusion, per sample (docs/DESIGN.md §4):

    x̂0  = (x_t − √(1−ᾱ_t)·ε) / √ᾱ_t                      (optionally clipped to [−c, c])
    x_s = c_x0·x̂0 + c_x·x_t + c_eps·ε + σ·z

with the coefficients of

* **DDIM** (Song et al. 2021, eq. 12), η ∈ [0, 1]:
  σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s), c_x0 = √ᾱ_s, c_x = 0, c_eps = √(1−ᾱ_s−σ²);
* **DDPM posterior** q(x_s | x_t, x̂0) (Ho et al. 2020, eq. 7, for s = t−1; for any s < t it
  is the Markovian skipped-step sampler of Xu 2025): with α_{t|s} = ᾱ_t/ᾱ_s, β_{t|s} = 1−α_{t|s},
  c_x0 = √ᾱ_s·β_{t|s}/(1−ᾱ_t), c_x = √α_{t|s}·(1−ᾱ_s)/(1−ᾱ_t), c_eps = 0,
  σ² = (1−ᾱ_s)/(1−ᾱ_t)·β_{t|s}.

Timestep indices are rows of the ᾱ table (0..T−1); ``s = -1`` (:data:`CLEAN`) is the data
end of the chain, ᾱ = 1, where both solvers return x̂0. DDIM with η = 1 is the DDPM posterior
when x̂0 is not clipped; with a clip they differ, since DDIM's direction term keeps the model's
ε while the posterior's c_x·x_t keeps the clipped-away part of x̂0.

:func:`dpmpp_2m_step_reference` is the spec of the multistep DPM-Solver++(2M) transition
(Lu et al. 2022, Alg. 2), which the sampler runs through the DDIM step above
(:mod:`stepdrop.solvers.dpmpp`). Coefficients are computed in float64;
the element-wise update runs in float64 for float64 input and float32 otherwise, then is
cast back to the input dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SOLVERS = ("ddim", "ddpm")
CLEAN = -1
"""Plan marker for the end of the chain: x_0 itself, ᾱ = 1 (diffusers' ``prev_timestep = -1``)."""


class StepCoefficients(NamedTuple):
    """Per-sample coefficients of one transition, float64 tensors of shape [B]."""

    x0_from_x: Tensor  # 1/√ᾱ_t
    x0_from_eps: Tensor  # −√(1−ᾱ_t)/√ᾱ_t
    c_x0: Tensor
    c_x: Tensor
    c_eps: Tensor
    sigma: Tensor


def gather_alphas(alphas_cumprod: Tensor, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """ᾱ_t and ᾱ_s per sample in float64; ``s < 0`` gives ᾱ_s = 1. Indices are clamped so that
    masked samples (whose t may be :data:`CLEAN`) never index out of range."""
    table = alphas_cumprod.to(torch.float64)
    last = table.numel() - 1
    a_t = table[t.clamp(0, last)]
    a_s = torch.where(s >= 0, table[s.clamp(0, last)], torch.ones_like(a_t))
    return a_t, a_s


def step_coefficients(alphas_cumprod: Tensor, t: Tensor, s: Tensor, solver: str = "ddim", eta: float = 0.0) -> StepCoefficients:
    """Coefficients of x_s = c_x0·x̂0 + c_x·x_t + c_eps·ε + σ·z for each sample (module docstring)."""
    a_t, a_s = gather_alphas(alphas_cumprod, t, s)
    x0_from_x = a_t.rsqrt()
    x0_from_eps = -(1 - a_t).sqrt() * x0_from_x
    zero = torch.zeros_like(a_t)
    if solver == "ddim":
        var = eta**2 * (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        c_eps = (1 - a_s - var).clamp(min=0).sqrt()
        return StepCoefficients(x0_from_x, x0_from_eps, a_s.sqrt(), zero, c_eps, var.sqrt())
    if solver == "ddpm":
        alpha_ts = a_t / a_s
        beta_ts = 1 - alpha_ts
        c_x0 = a_s.sqrt() * beta_ts / (1 - a_t)
        c_x = alpha_ts.sqrt() * (1 - a_s) / (1 - a_t)
        var = (1 - a_s) / (1 - a_t) * beta_ts
        return StepCoefficients(x0_from_x, x0_from_eps, c_x0, c_x, zero, var.sqrt())
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")


def predict_x0(x: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, clip: float | None = None) -> Tensor:
    """x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t per sample, optionally clipped to [−clip, clip].

    The coefficients are :func:`step_coefficients`' ``x0_from_x`` and ``x0_from_eps``, so x̂0
    here is bit for bit the x̂0 of :func:`fused_step_reference`."""
    coef = step_coefficients(alphas_cumprod, t, t)
    compute = _compute_dtype(x.dtype)
    shape = (-1,) + (1,) * (x.ndim - 1)
    c1 = coef.x0_from_x.to(compute).view(shape)
    c2 = coef.x0_from_eps.to(compute).view(shape)
    x0 = c1 * x.to(compute) + c2 * eps.to(compute)
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    return x0.to(x.dtype)


def q_sample(x0: Tensor, noise: Tensor, alphas_cumprod: Tensor, t: Tensor) -> Tensor:
    """Forward noising x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), per sample.

    Args:
        x0: clean data [B, ...].
        noise: ε, the shape of ``x0``.
        alphas_cumprod: [T] ᾱ table (any float dtype), on ``x0``'s device.
        t: int64 [B] timesteps in [0, T−1] (one per sample, gathered from the table; a
            one-element ``t`` applies to the whole batch). Not range-checked here.

    Returns:
        x_t in ``x0``'s dtype. √ᾱ_t and √(1−ᾱ_t) are computed in float64; the element-wise
        update runs in float64 for float64 ``x0`` and in float32 otherwise.
    """
    a = alphas_cumprod[t].to(torch.float64)
    compute = _compute_dtype(x0.dtype)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    signal = a.sqrt().to(compute).view(shape)
    sigma = (1 - a).sqrt().to(compute).view(shape)
    return (signal * x0.to(compute) + sigma * noise.to(compute)).to(x0.dtype)


def fused_step_reference(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """One transition t → s for every sample of a batch (module docstring for the formulas).

    Args:
        x, eps: [B, ...] current sample x_t and the model's noise prediction ε.
        alphas_cumprod: [T] ᾱ table.
        t, s: [B] int64 current and next timestep; ``s = -1`` is the clean end.
        active: [B] bool; inactive samples are returned unchanged (x̂0 for them is x).
        noise, solver, eta, clip: the update's settings, each defined in
            :class:`~stepdrop.ops.step_args.StepOptions`.
        return_x0: also return x̂0.

    Returns:
        x_s, or (x_s, x̂0), in the dtype of ``x``.
    """
    coef = step_coefficients(alphas_cumprod, t, s, solver, eta)
    compute = _compute_dtype(x.dtype)
    shape = (-1,) + (1,) * (x.ndim - 1)
    c = [v.to(compute).view(shape) for v in coef]
    xc, ec = x.to(compute), eps.to(compute)
    x0 = c[0] * xc + c[1] * ec
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    x_next = c[2] * x0 + c[3] * xc + c[4] * ec
    if noise is not None:
        x_next = x_next + c[5] * noise.to(compute)
    if active is not None:
        keep = active.view(shape)
        x_next = torch.where(keep, x_next, xc)
        x0 = torch.where(keep, x0, xc)
    x_next = x_next.to(x.dtype)
    return (x_next, x0.to(x.dtype)) if return_x0 else x_next


def fused_plan_step_reference(
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
) -> Tensor:
    """Step k of a per-sample plan, with the sampling loop's bookkeeping.

    Per sample b: t = plan[b, k], s = plan[b, k+1], active = t ≥ 0, and
    x_next = :func:`fused_step_reference` (x, eps, alphas_cumprod, t, s, active=active, …):
    finished samples (t = :data:`CLEAN`) pass through bit for bit.

    Args:
        x, eps, alphas_cumprod, noise, solver, eta, clip: as in :func:`fused_step_reference`.
        plan: int64 [B, L]; each row strictly decreasing model-call timesteps in [0, T−1],
            then :data:`CLEAN`, padded with CLEAN (a row may finish early).
        k: the loop step, in [0, L−2].
        nfe, t_next, active_next: the bookkeeping, written in place, each defined in
            :class:`~stepdrop.ops.step_args.PlanOutputs`.

    Returns:
        x_next in the dtype of ``x``.
    """
    t, s = plan[:, k], plan[:, k + 1]
    active = t >= 0
    x_next = fused_step_reference(x, eps, alphas_cumprod, t, s, noise=noise, active=active, solver=solver, eta=eta,
                                  clip=clip)  # fmt: skip
    if nfe is not None:
        nfe.add_(active.to(nfe.dtype))
    if t_next is not None:
        t_next.copy_(s.clamp(min=0))
    if active_next is not None:
        active_next.copy_(s >= 0)
    return x_next


def dpmpp_2m_step_reference(
    x: Tensor,
    x0: Tensor,
    x0_prev: Tensor,
    alphas_cumprod: Tensor,
    t_prev: Tensor,
    t: Tensor,
    s: Tensor,
    clip: float | None = None,
) -> Tensor:
    """One DPM-Solver++(2M) transition t → s per sample (Lu et al. 2022, "DPM-Solver++",
    Alg. 2 with data prediction), written from the paper in float64:

        α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ), h = λ_s − λ_t, r = (λ_t − λ_{t_prev})/h,
        D = (1 + 1/(2r))·x̂0_t − 1/(2r)·x̂0_{t_prev},
        x_s = (σ_s/σ_t)·x_t − α_s·(e^{−h} − 1)·D
            = α_s·D + σ_s·ε_D,   ε_D = (x_t − α_t·D)/σ_t.

    With ``clip`` the step is DDIM's clip applied to the second form, x_s = α_s·clip(D) + σ_s·ε_D
    (the extrapolation itself uses the unclipped x̂0s; :mod:`stepdrop.solvers.dpmpp`).

    A sample without a previous model call (``t_prev < 0``) or stepping to the clean end
    (``s = -1``: σ_s = 0, h = ∞; diffusers' ``final_sigmas_type="zero"``) takes the first-order
    step D = x̂0_t, which is DDIM (η = 0) written in x̂0; at the clean end it returns x̂0_t.

    Args:
        x: [B, ...] x_t.
        x0, x0_prev: [B, ...] the data predictions at t and at t_prev (``x0_prev`` is ignored
            where ``t_prev < 0``).
        alphas_cumprod: [T] ᾱ table.
        t_prev, t, s: int64 [B]; t_prev > t > s per sample, ``t_prev < 0`` for none.
        clip: clip D to [−clip, clip] in the α_s·D term, or None.

    Returns:
        x_s in the dtype of ``x``.
    """
    table = alphas_cumprod.to(torch.float64)
    last = table.numel() - 1
    shape = (-1,) + (1,) * (x.ndim - 1)

    def alpha_sigma(i: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.where(i >= 0, table[i.clamp(0, last)], 1.0)
        return a.sqrt(), (1 - a).sqrt()

    (al_p, si_p), (al_t, si_t), (al_s, si_s) = alpha_sigma(t_prev), alpha_sigma(t), alpha_sigma(s)
    lam_t = (al_t / si_t).log()
    first_order = (t_prev < 0) | (s < 0)
    # placeholders where first-order, so that no inf/nan reaches a coefficient that is then unused
    lam_s = torch.where(first_order, lam_t + 1, (al_s / si_s).log())
    lam_p = torch.where(first_order, lam_t - 1, (al_p / si_p).log())
    h = lam_s - lam_t
    w = torch.where(first_order, torch.zeros_like(h), h / (2 * (lam_t - lam_p)))  # 1/(2r)
    xs, x0s, x0p = (v.to(torch.float64) for v in (x, x0, x0_prev))
    d = (1 + w.view(shape)) * x0s - w.view(shape) * x0p
    ratio = (si_s / si_t).view(shape)  # 0 at the clean end, where x_s = α_s·clip(D) = clip(x̂0_t)
    # −α_s·(e^{−h} − 1)·D with e^{−h} = (σ_s/σ_t)·(α_t/α_s), split so that clip acts on α_s·D only
    d_kept = d if clip is None else d.clamp(-clip, clip)
    return (ratio * xs + al_s.view(shape) * d_kept - (ratio * al_t.view(shape)) * d).to(x.dtype)


def grad_norm_probe(eps_probe: Tensor, eps: Tensor, v: Tensor, step: float) -> Tensor:
    """Hutchinson-style sensitivity per sample: ‖J v‖/‖v‖ with J v ≈ (ε(x + h·v) − ε(x))/h,
    i.e. ‖ε_probe − ε‖/(h·‖v‖) over each sample's elements.

    For v ~ N(0, I), E‖J v‖² = ‖J‖_F², so this estimates the Jacobian's Frobenius norm over
    √dim (AS-DDIM's g(t), seed 001 §3.2). Computed in float32 for float32/float16/bfloat16
    input, float64 for float64; returns float32/float64 [B]. The torch backend of
    :func:`stepdrop.ops.grad_probe`."""
    compute = _compute_dtype(eps.dtype)
    diff = _per_sample(eps_probe.to(compute) - eps.to(compute))
    return diff.norm(dim=1) / (step * _per_sample(v.to(compute)).norm(dim=1))


def _per_sample(v: Tensor) -> Tensor:
    """[B, ...] as [B, elements of one sample] (a [B] tensor has one element per sample)."""
    return v.flatten(1) if v.ndim > 1 else v.unsqueeze(1)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
