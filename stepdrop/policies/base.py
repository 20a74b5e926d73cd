"""What every step policy builds on: budget checks, timestep rounding, density-to-timesteps
quantiles, plan generators, and the :class:`StepPolicy`, :class:`DensityPolicy` and
:class:`OnlinePolicy` base classes (docs/DESIGN.md §4).

Rounding follows the uniform "trailing" spacing (Lin et al. 2024, "Common Diffusion Noise
Schedules and Sample Steps are Flawed", Table 2); per-sample generators give each sample of a
stochastic plan (StepDrop, seed 000) its own stream, independent of the batch size.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from stepdrop._validation import check_int
from stepdrop.ops.reference import CLEAN
from stepdrop.plan import StepPlan
from stepdrop.schedule import NoiseSchedule


# ====================================================================== helpers
def check_budget(budget: object, num_train_timesteps: int) -> int:
    """K as an int in [1, T]."""
    return check_int("budget", budget, low=1, high=num_train_timesteps)


def make_strictly_decreasing(timesteps: Tensor, num_train_timesteps: int) -> Tensor:
    """Round to integers and push collisions apart: the result is strictly decreasing inside
    [0, T−1] and moves each entry as little as the constraints allow (needs K ≤ T)."""
    T = num_train_timesteps
    ts = timesteps.to(torch.float64).round().to(torch.int64).clamp(0, T - 1)
    idx = torch.arange(ts.numel())
    # lower bound t_i ≥ t_j + (j − i) for every j > i: a reversed running max of t_j + j
    lifted = torch.flip(torch.cummax(torch.flip(ts + idx, [0]), 0).values, [0]) - idx
    # upper bound t_i ≤ T−1−i; the min of two strictly decreasing sequences stays strictly decreasing
    return torch.minimum(lifted, T - 1 - idx)


def trailing_from_unit(grid: Tensor, num_train_timesteps: int) -> Tensor:
    """Model-call timesteps from a decreasing grid g_i ∈ (0, 1] with g_0 = 1: t_i = ⌈T·g_i⌉ − 1,
    so g = 1 maps to T−1 (sampling starts from pure noise, "trailing")."""
    T = num_train_timesteps
    return make_strictly_decreasing(torch.ceil(T * grid - 1e-9) - 1, T)


def timesteps_from_density(density: Tensor, budget: int) -> Tensor:
    """K model-call timesteps at equal-mass quantiles of a step density ρ(t) over t = 0..T−1.

    Timestep t owns the mass interval (C(t−1), C(t)], C(t) = Σ_{τ≤t} ρ(τ). Call i (i = 0..K−1)
    sits where the cumulative mass, inverted piecewise-linearly, reaches S·(K−i)/K (S = Σρ),
    rounded like :class:`Uniform`: a constant ρ gives exactly the uniform trailing timesteps.
    More density ⇒ more steps.
    """
    if density.ndim != 1 or not torch.isfinite(density).all() or (density < 0).any() or density.sum() <= 0:
        raise ValueError("density must be a 1-D tensor of finite, non-negative values with a positive sum")
    T = density.numel()
    K = check_budget(budget, T)
    mass = torch.cat([density.new_zeros(1, dtype=torch.float64), torch.cumsum(density.to(torch.float64), 0)])
    targets = mass[-1] * (K - torch.arange(K, dtype=torch.float64)) / K
    position = _interp(targets, mass, torch.arange(T + 1, dtype=torch.float64))  # t + 1, continuous
    return make_strictly_decreasing(torch.round(position) - 1, T)


def _finish(timesteps: Tensor, T: int, policy: str, **kwargs: Any) -> StepPlan:
    """Append the clean terminal to model-call timesteps ([K] or [B, K])."""
    pad = timesteps.new_full(timesteps.shape[:-1] + (1,), CLEAN)
    return StepPlan(torch.cat([timesteps, pad], dim=-1), T, policy=policy, **kwargs)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        # seeded from torch's global RNG, so torch.manual_seed still reproduces the run
        return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator for plan sampling must be a CPU generator, got one on {generator.device}")
    return generator


def per_sample_generators(generator: torch.Generator | None, batch_size: int) -> list[torch.Generator]:
    """One generator per sample, derived from a single draw of ``generator``: sample i's stream
    depends only on that draw and i, never on the batch size."""
    base = int(torch.randint(0, 2**62, (1,), generator=_generator(generator)))
    return [torch.Generator().manual_seed((base + 0x9E3779B97F4A7C15 * (i + 1)) % 2**63) for i in range(batch_size)]


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (numpy.interp) with constant extension; xp increasing."""
    idx = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)


# ====================================================================== policy base classes
class StepPolicy:
    """A policy that fixes every timestep before sampling starts."""

    name = "policy"
    stochastic = False
    needs_model = False

    def plan(
        self,
        schedule: NoiseSchedule,
        budget: int,
        *,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        model: Callable[[Tensor, Tensor], Tensor] | None = None,
        sample_shape: tuple[int, ...] | None = None,
        sampler: Any = None,
    ) -> StepPlan:
        """Plan ``budget`` model calls for a batch of ``batch_size`` samples.

        ``generator`` (CPU) seeds stochastic policies; ``model`` and ``sample_shape`` are used
        by policies that probe the network (:class:`GradientAware`); ``sampler``, the
        :class:`~stepdrop.FusedSampler` that will run the plan, by policies tuned for its
        solver (:class:`~stepdrop.optimize.Optimized`)."""
        K = check_budget(budget, schedule.num_timesteps)
        check_int("batch_size", batch_size, low=1)
        return self._plan(schedule, K, batch_size=batch_size, generator=generator, model=model, sample_shape=sample_shape,
                          sampler=sampler)

    def _plan(self, schedule: NoiseSchedule, budget: int, **kwargs: Any) -> StepPlan:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class DensityPolicy(StepPolicy):
    """A deterministic policy defined by a step density ρ(t) (more density ⇒ denser steps)."""

    def density(self, schedule: NoiseSchedule) -> Tensor:
        raise NotImplementedError

    def _plan(self, schedule: NoiseSchedule, budget: int, **kwargs: Any) -> StepPlan:
        return _finish(timesteps_from_density(self.density(schedule), budget), schedule.num_timesteps, self.name)


class OnlinePolicy:
    """A policy that picks each sample's next timestep during sampling (per sample, on device,
    with no host synchronisation)."""

    name = "online"
    stochastic = False
    needs_model = False

    def start(self, schedule: NoiseSchedule, budget: int, batch_size: int, device: torch.device) -> dict[str, Any]:
        raise NotImplementedError

    def next_timesteps(self, state: dict[str, Any], x: Tensor, eps: Tensor, t: Tensor, active: Tensor) -> Tensor:
        raise NotImplementedError
