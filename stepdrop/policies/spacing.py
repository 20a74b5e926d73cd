"""Deterministic spacings, pure functions of (schedule, K): uniform "trailing" (Lin et al. 2024,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", Table 2), quadratic (Song et
al. 2021, DDIM, §D.2), cosine and importance (StepDrop, seed 000), log-SNR uniform, AS-DDIM
noise-aware allocation (seed 001, eq. 5), and user-given timesteps (docs/DESIGN.md §4).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from stepdrop._validation import check_float
from stepdrop.plan import StepPlan
from stepdrop.policies.base import DensityPolicy, StepPolicy, _finish, make_strictly_decreasing, trailing_from_unit
from stepdrop.schedule import NoiseSchedule


# ====================================================================== deterministic spacings
class Uniform(StepPolicy):
    """Evenly spaced "trailing" timesteps t_i = round(T − i·T/K) − 1, starting at T−1; the same
    values as diffusers' ``timestep_spacing="trailing"``."""

    name = "uniform"

    def _plan(self, schedule: NoiseSchedule, budget: int, **kwargs: Any) -> StepPlan:
        T = schedule.num_timesteps
        i = torch.arange(budget, dtype=torch.float64)
        ts = torch.round(T + i * (-(T / budget))) - 1
        return _finish(make_strictly_decreasing(ts, T), T, self.name)


class Quadratic(StepPolicy):
    """t_i ∝ (K−i)², dense near t = 0 (DDIM paper §D.2), trailing: t_0 = T−1."""

    name = "quadratic"

    def _plan(self, schedule: NoiseSchedule, budget: int, **kwargs: Any) -> StepPlan:
        grid = ((budget - torch.arange(budget, dtype=torch.float64)) / budget) ** 2
        return _finish(trailing_from_unit(grid, schedule.num_timesteps), schedule.num_timesteps, self.name)


class Cosine(StepPolicy):
    """t_i ∝ sin²(π/2 · (K−i)/K): smooth, steps dense at both ends and skips most frequent in
    the middle (StepDrop's "cosine" skipping)."""

    name = "cosine"

    def _plan(self, schedule: NoiseSchedule, budget: int, **kwargs: Any) -> StepPlan:
        grid = torch.sin(math.pi / 2 * (budget - torch.arange(budget, dtype=torch.float64)) / budget) ** 2
        return _finish(trailing_from_unit(grid, schedule.num_timesteps), schedule.num_timesteps, self.name)


class LogSNRUniform(DensityPolicy):
    """Steps evenly spaced in log-SNR λ_t: density ρ(t) = λ_{t−1} − λ_t."""

    name = "logsnr"

    def density(self, schedule: NoiseSchedule) -> Tensor:
        lam = schedule.log_snr
        gaps = lam[:-1] - lam[1:]
        return torch.cat([gaps[:1], gaps])


class Importance(DensityPolicy):
    """Dense near both ends, sparse in the middle (StepDrop's best schedule):
    ρ(u) = m + (1 − m)·(2u − 1)², u = t/(T−1), with middle weight m ∈ (0, 1]."""

    name = "importance"

    def __init__(self, middle_weight: float = 0.1):
        self.middle_weight = check_float("middle_weight", middle_weight, low=0.0, high=1.0, low_open=True)

    def density(self, schedule: NoiseSchedule) -> Tensor:
        u = torch.linspace(0, 1, schedule.num_timesteps, dtype=torch.float64)
        return self.middle_weight + (1 - self.middle_weight) * (2 * u - 1) ** 2


class NoiseAware(DensityPolicy):
    """AS-DDIM noise-aware allocation (seed 001, eq. 5): ρ(t) ∝ 1/(σ_t^p + ε'), σ_t² = 1 − ᾱ_t.

    p = 0 is uniform; a larger p moves steps to low noise (small t)."""

    name = "noise_aware"

    def __init__(self, p: float = 1.0, eps: float = 0.05):
        self.p = check_float("p", p, low=0.0)
        self.eps = check_float("eps", eps, low=0.0, low_open=True)

    def density(self, schedule: NoiseSchedule) -> Tensor:
        return noise_weight(schedule, self.p, self.eps)


def noise_weight(schedule: NoiseSchedule, p: float, eps: float) -> Tensor:
    """w_noise(t) = 1/(σ_t^p + ε'), float64 [T]."""
    return 1.0 / (schedule.sigmas**p + eps)


class CustomTimesteps(StepPolicy):
    """A fixed list of model-call timesteps given by the user (validated; budget must match)."""

    name = "custom"

    def __init__(self, timesteps: list[int] | Tensor):
        ts = torch.as_tensor(timesteps)
        if ts.ndim != 1 or ts.numel() == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D list, got shape {tuple(ts.shape)}")
        self.timesteps = ts

    def _plan(self, schedule: NoiseSchedule, budget: int, **kwargs: Any) -> StepPlan:
        plan = StepPlan.from_timesteps(self.timesteps, schedule.num_timesteps, policy=self.name)
        if int(plan.num_steps) != budget:
            raise ValueError(f"budget={budget} does not match the {int(plan.num_steps)} custom timesteps")
        return plan
