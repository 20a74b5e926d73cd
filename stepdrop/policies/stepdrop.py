"""Stochastic step dropping (StepDrop, seed 000): middle steps of a uniform base grid dropped
with probability p·f(u), f one of :data:`PROFILES`, per batch or per sample, from a seedable
``torch.Generator`` (docs/DESIGN.md §4).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from stepdrop._validation import check_bool, check_choice, check_float, check_int
from stepdrop.ops.reference import CLEAN
from stepdrop.plan import StepPlan
from stepdrop.policies.base import StepPolicy, _finish, _generator, per_sample_generators
from stepdrop.policies.spacing import Uniform
from stepdrop.schedule import NoiseSchedule


PROFILES: dict[str, Callable[[Tensor], Tensor]] = {
    "constant": lambda u: torch.ones_like(u),
    "linear": lambda u: 4 * u * (1 - u),
    "cosine": lambda u: torch.sin(math.pi * u) ** 2,
    "quadratic": lambda u: 16 * u**2 * (1 - u) ** 2,
}


class StochasticStepDrop(StepPolicy):
    """StepDrop (seed 000): stochastic omission of middle steps from a uniform base grid.

    The base grid has N uniform trailing steps: ``base_steps``, or ``round(base_ratio·K)``, or
    by default the largest N ≤ 2K from which the budget is reachable in expectation (a larger
    base keeps more steps at least: its boundary, and 1 − f(u) of each middle step).
    Its first and last ``boundary`` fraction (at least one step each) is always kept. Each
    middle step at u = t/(T−1) is dropped with probability p·f(u), f one of :data:`PROFILES`
    (constant 1, linear 4u(1−u), cosine sin²(πu), quadratic 16u²(1−u)²).

    Modes:
        "bernoulli": independent drops; with ``p=None`` p is solved so that the expected
            number of kept steps equals the budget K (the realised count varies and is counted).
        "exact": exactly K steps: the boundary plus middle steps drawn without replacement
            with weights 1 − p·f(u) (p defaults to 1).

    ``per_sample=True`` draws a separate plan for every sample (padded [B, L] plan).
    """

    name = "stepdrop"
    stochastic = True

    def __init__(
        self,
        p: float | None = None,
        profile: str = "constant",
        mode: Literal["bernoulli", "exact"] = "bernoulli",
        base_ratio: float | None = None,
        base_steps: int | None = None,
        boundary: float = 0.1,
        per_sample: bool = False,
    ):
        self.p = None if p is None else check_float("p", p, low=0.0, high=1.0)
        self.profile = check_choice("profile", profile, tuple(PROFILES))
        self.mode = check_choice("mode", mode, ("bernoulli", "exact"))
        self.base_ratio = None if base_ratio is None else check_float("base_ratio", base_ratio, low=1.0)
        self.base_steps = None if base_steps is None else check_int("base_steps", base_steps, low=1)
        self.boundary = check_float("boundary", boundary, low=0.0, high=0.5)
        self.per_sample = check_bool("per_sample", per_sample)

    def _base(self, schedule: NoiseSchedule, budget: int) -> tuple[Tensor, Tensor, Tensor]:
        """(base grid [N], profile f(u) on it (0 at the boundary), boundary mask [N])."""
        T = schedule.num_timesteps
        if self.base_steps is not None:
            sizes = [self.base_steps]
        elif self.base_ratio is not None:
            sizes = [round(self.base_ratio * budget)]
        else:  # largest base whose drop capacity Σf covers the N − K steps to drop
            sizes = [round(budget * (2 - i / 20)) for i in range(21)]
        for n in sizes:
            n = min(max(n, 1), T)
            if self.mode == "exact" and n < budget:
                raise ValueError(f"base_steps={n} must be >= budget={budget} in mode='exact'")
            base = Uniform().plan(schedule, n).timesteps[:-1]
            keep_each_end = max(1, round(self.boundary * n))
            boundary = torch.zeros(n, dtype=torch.bool)
            boundary[:keep_each_end] = True
            boundary[max(n - keep_each_end, keep_each_end):] = True
            f = torch.where(boundary, 0.0, PROFILES[self.profile](base.double() / (T - 1)))
            if self.p is not None or self.mode == "exact" or float(f.sum()) >= n - budget:
                break
        return base, f, boundary

    def drop_probabilities(self, schedule: NoiseSchedule, budget: int) -> tuple[Tensor, Tensor, float]:
        """(base grid [N], drop probability per base step [N] (0 at the boundary), p used)."""
        base, f, _ = self._base(schedule, budget)
        p = self._scale(f, base.numel(), budget)
        return base, p * f, p

    def _scale(self, f: Tensor, n: int, budget: int) -> float:
        if self.p is not None:
            return self.p
        return 1.0 if self.mode == "exact" else _solve_drop_scale(f, n, budget, self)

    def _plan(
        self,
        schedule: NoiseSchedule,
        budget: int,
        *,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> StepPlan:
        T = schedule.num_timesteps
        base, f, boundary = self._base(schedule, budget)
        p = self._scale(f, base.numel(), budget)
        drop = p * f
        gens = per_sample_generators(generator, batch_size) if self.per_sample else [_generator(generator)]
        rows = [self._draw(base, drop, boundary, budget, g) for g in gens]
        length = max(r.numel() for r in rows)
        ts = torch.full((len(rows), length), CLEAN, dtype=torch.int64)
        for i, r in enumerate(rows):
            ts[i, : r.numel()] = r
        ts = ts if self.per_sample else ts[0]
        expected = float(budget) if self.mode == "exact" else float((1 - drop).sum())
        info = {"p": p, "profile": self.profile, "mode": self.mode, "base_steps": base.numel(),
                "expected_steps": expected}
        return _finish(ts, T, self.name, info=info)

    def _draw(self, base: Tensor, drop: Tensor, boundary: Tensor, budget: int, gen: torch.Generator) -> Tensor:
        if self.mode == "bernoulli":
            keep = torch.rand(base.numel(), generator=gen, dtype=torch.float64) >= drop
            return base[keep]
        fixed = boundary.nonzero().flatten()
        if fixed.numel() >= budget:  # budget smaller than the boundary: keep its outermost steps
            fixed = torch.cat([fixed[: (budget + 1) // 2], fixed[fixed.numel() - budget // 2 :]])
            return base[fixed.sort().values]
        weights = (1 - drop[~boundary]).clamp(min=1e-6)
        chosen = torch.multinomial(weights, budget - fixed.numel(), replacement=False, generator=gen)
        picked = (~boundary).nonzero().flatten()[chosen]
        return base[torch.cat([fixed, picked]).sort().values]


def _solve_drop_scale(f: Tensor, n: int, budget: int, policy: StochasticStepDrop) -> float:
    """p with n − p·Σf = K, so that the expected number of kept steps is the budget."""
    total = float(f.sum())
    excess = n - budget
    if excess <= 0:
        return 0.0
    p = excess / total if total > 0 else math.inf
    if p > 1:
        raise ValueError(
            f"budget={budget} cannot be met in expectation: from a base of {n} steps with boundary="
            f"{policy.boundary} and profile={policy.profile!r} at most {total:.1f} steps can be dropped; "
            f"lower base_ratio/base_steps or boundary, or use a flatter profile"
        )
    return p
