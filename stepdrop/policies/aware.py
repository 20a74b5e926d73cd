"""AS-DDIM gradient-aware and combined allocation (seed 001, eqs. 4–6 and §3.2): a pilot run
estimates the network's sensitivity ‖∂ε_θ/∂x_t‖ and steps go where it is large
(docs/DESIGN.md §4).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from stepdrop._validation import check_float, check_int, model_device_dtype
from stepdrop.ops import grad_probe
from stepdrop.ops.reference import fused_step_reference
from stepdrop.plan import StepPlan
from stepdrop.policies.base import StepPolicy, _finish, _generator, _interp, timesteps_from_density
from stepdrop.policies.spacing import Uniform, noise_weight
from stepdrop.schedule import NoiseSchedule


class GradientAware(StepPolicy):
    """AS-DDIM gradient-aware (and, with p > 0, combined) allocation (seed 001, §3.2).

    ρ(t) ∝ w_noise(t)·(1 + λ·ĝ(t)), where g(t) = ‖∂ε_θ(x_t, t)/∂x_t‖ is estimated with a
    Hutchinson probe ‖J v‖/‖v‖ (v ~ N(0, I), J v by a forward finite difference) on a pilot
    batch following a uniform DDIM trajectory of ``pilot_steps`` calls, interpolated over t and
    normalised to mean 1 (ĝ). The paper states its intent (smaller steps where the network is
    sensitive) but its equations mix step size and step density; this is the density form.

    The pilot's model calls are counted into ``plan.overhead_calls`` (2 per pilot step).
    """

    name = "gradient_aware"
    needs_model = True

    def __init__(
        self,
        lam: float = 1.0,
        p: float = 0.0,
        eps: float = 0.05,
        pilot_batch: int = 4,
        pilot_steps: int = 16,
        fd_step: float = 1e-3,
    ):
        self.lam = check_float("lam", lam, low=0.0)
        self.p = check_float("p", p, low=0.0)
        self.eps = check_float("eps", eps, low=0.0, low_open=True)
        self.pilot_batch = check_int("pilot_batch", pilot_batch, low=1)
        self.pilot_steps = check_int("pilot_steps", pilot_steps, low=2)
        self.fd_step = check_float("fd_step", fd_step, low=0.0, low_open=True)

    def estimate_sensitivity(
        self,
        schedule: NoiseSchedule,
        model: Callable[[Tensor, Tensor], Tensor],
        sample_shape: tuple[int, ...],
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, int]:
        """Pilot run: (pilot timesteps [P], g at them [P], batched model calls spent)."""
        device, dtype = model_device_dtype(model)
        gen = _generator(generator)
        steps = min(self.pilot_steps, schedule.num_timesteps)
        pilot = Uniform().plan(schedule, steps).timesteps
        table = schedule.table(device, torch.float64)
        x = torch.randn((self.pilot_batch, *sample_shape), generator=gen).to(device, dtype)
        g = torch.empty(steps, dtype=torch.float64)
        calls = 0
        with torch.no_grad():
            for k in range(steps):
                t = torch.full((self.pilot_batch,), int(pilot[k]), dtype=torch.int64, device=device)
                s = torch.full_like(t, int(pilot[k + 1]))
                eps = model(x, t)
                v = torch.randn(x.shape, generator=gen).to(device, dtype)
                eps_probe = model(x + self.fd_step * v, t)
                calls += 2
                g[k] = grad_probe(eps_probe, eps, v, self.fd_step).mean().double().cpu()  # fused, one launch
                x = fused_step_reference(x, eps, table, t, s, solver="ddim")
        return pilot[:-1], g, calls

    def _plan(
        self,
        schedule: NoiseSchedule,
        budget: int,
        *,
        generator: torch.Generator | None = None,
        model: Callable[[Tensor, Tensor], Tensor] | None = None,
        sample_shape: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> StepPlan:
        if model is None:
            raise ValueError(f"{type(self).__name__} probes the network: pass model=... (and sample_shape=...)")
        shape = sample_shape if sample_shape is not None else getattr(model, "sample_shape", None)
        if shape is None:
            raise ValueError("sample_shape is required (the model has no sample_shape attribute)")
        pilot_t, g, calls = self.estimate_sensitivity(schedule, model, tuple(shape), generator)
        T = schedule.num_timesteps
        grid = torch.arange(T, dtype=torch.float64)
        g_all = _interp(grid, pilot_t.flip(0).double(), g.flip(0))
        g_hat = g_all / g_all.mean().clamp(min=1e-30)
        density = noise_weight(schedule, self.p, self.eps) * (1 + self.lam * g_hat)
        ts = timesteps_from_density(density, budget)
        info = {"pilot_timesteps": pilot_t.tolist(), "pilot_g": g.tolist()}
        return _finish(ts, T, self.name, overhead_calls=calls, overhead_samples=calls * self.pilot_batch, info=info)


class Combined(GradientAware):
    """AS-DDIM combined noise- and gradient-aware allocation: :class:`GradientAware` with p > 0."""

    name = "combined"

    def __init__(self, lam: float = 1.0, p: float = 1.0, **kwargs: Any):
        super().__init__(lam=lam, p=p, **kwargs)
