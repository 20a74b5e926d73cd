"""Step policies: which K of the T timesteps a sampler visits.

Every policy turns (schedule, budget K) into a :class:`~stepdrop.plan.StepPlan` of K model
calls (K+1 entries with the clean terminal). Deterministic spacings are pure functions of
(T, K); stochastic ones draw from a ``torch.Generator`` the caller can seed, and per-sample
plans give each sample its own generator derived from one draw, so a sample's plan does not
depend on the batch size. The online :class:`Adaptive` policy chooses its timesteps while
sampling, from the model's own predictions.

Papers: uniform "trailing" spacing (Lin et al. 2024, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", Table 2); quadratic spacing (Song et al. 2021, DDIM, §D.2);
stochastic step dropping and importance spacing (StepDrop, seed 000); noise- and
gradient-aware allocation (AS-DDIM, seed 001, eqs. 4–6 and §3.2).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from torch import Tensor

from stepdrop._validation import check_bool, check_choice, check_float, check_int, model_device_dtype
from stepdrop.ops import grad_probe
from stepdrop.ops.reference import CLEAN, fused_step_reference, predict_x0
from stepdrop.plan import StepPlan
from stepdrop.schedule import NoiseSchedule

__all__ = [
    "POLICIES",
    "PROFILES",
    "Adaptive",
    "Cosine",
    "CustomTimesteps",
    "GradientAware",
    "Importance",
    "LogSNRUniform",
    "NoiseAware",
    "OnlinePolicy",
    "Quadratic",
    "StepPolicy",
    "StochasticStepDrop",
    "Uniform",
    "get_policy",
    "make_strictly_decreasing",
    "timesteps_from_density",
]


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


# ====================================================================== stochastic dropping
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


# ====================================================================== online adaptive policy
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


class Adaptive(OnlinePolicy):
    """Online per-sample stride control in log-SNR λ, within a budget of K calls per sample.

    After each call the relative change of the signal (x̂0 by default, or ε) since the
    previous call, r = ‖a_k − a_{k−1}‖/‖a_k‖, sets the next stride as in adaptive ODE solvers:
    h ← h·clip(safety·√(tol/r), shrink, grow). The stride never falls below the even split of
    the remaining λ-span over the remaining calls, the last jump to the clean end included:
    the span ends one λ-gap past t = 0 (as the ``logsnr`` policy's plans do), so the last call
    falls at a small t > 0, not at t = 0, where a call is worth nothing. A stride that reaches
    t = 0 goes straight to the clean end instead. Samples whose trajectory settles early take longer
    strides and finish with fewer calls; each makes at most K, so the mean NFE (counted by the
    sampler) is ≤ K.
    """

    name = "adaptive"

    def __init__(self, tol: float = 0.1, signal: Literal["x0", "eps"] = "x0", safety: float = 0.9,
                 shrink: float = 0.5, grow: float = 2.0):
        self.tol = check_float("tol", tol, low=0.0, low_open=True)
        self.signal = check_choice("signal", signal, ("x0", "eps"))
        self.safety = check_float("safety", safety, low=0.0, low_open=True)
        self.shrink = check_float("shrink", shrink, low=0.0, high=1.0, low_open=True)
        self.grow = check_float("grow", grow, low=1.0)

    def start(self, schedule: NoiseSchedule, budget: int, batch_size: int, device: torch.device) -> dict[str, Any]:
        K = check_budget(budget, schedule.num_timesteps)
        lam = schedule.log_snr.to(device)
        T = schedule.num_timesteps
        lam_end = float(2 * lam[0] - lam[1]) if T > 1 else float(lam[0]) + 1.0  # one gap past t = 0
        return {
            "table": schedule.table(device, torch.float64),
            "lam": lam,
            "lam_end": lam_end,
            "lam_rising": lam.flip(0),  # increasing: index j ↔ t = T−1−j
            "calls_left": torch.full((batch_size,), K, dtype=torch.int64, device=device),
            "stride": torch.full((batch_size,), (lam_end - float(lam[T - 1])) / K, dtype=torch.float64,
                                 device=device),
            "previous": None,
            "t0": torch.full((batch_size,), T - 1, dtype=torch.int64, device=device),
        }

    def next_timesteps(self, state: dict[str, Any], x: Tensor, eps: Tensor, t: Tensor, active: Tensor) -> Tensor:
        lam, T = state["lam"], state["lam"].numel()
        sig = predict_x0(x, eps, state["table"], t) if self.signal == "x0" else eps
        sig = sig.flatten(1).double()
        if state["previous"] is None:
            factor = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        else:
            r = (sig - state["previous"]).norm(dim=1) / sig.norm(dim=1).clamp(min=1e-12)
            factor = (self.safety * (self.tol / r.clamp(min=1e-12)).sqrt()).clamp(self.shrink, self.grow)
        state["previous"] = torch.where(active[:, None], sig, state["previous"] if state["previous"] is not None else sig)

        calls_after = state["calls_left"] - 1
        lam_t = lam[t.clamp(min=0)]
        # calls_after more calls, then the jump to the clean end: calls_after + 1 strides left
        even = (state["lam_end"] - lam_t) / (calls_after + 1).clamp(min=1)
        stride = torch.maximum(state["stride"] * factor, even)
        target = lam_t + stride
        j = torch.searchsorted(state["lam_rising"], target.contiguous()).clamp(max=T - 1)
        s = (T - 1 - j).clamp(min=0)
        s = torch.minimum(s, t - 1)  # strictly decreasing
        # a call at t = 0 (ᾱ_0 ≈ 1) would only return its input: a stride that reaches it goes clean
        finish = (calls_after <= 0) | (s <= 0)
        s = torch.where(finish, torch.full_like(s, CLEAN), s.clamp(min=0))
        s = torch.where(active, s, t)
        moved = lam[s.clamp(min=0)] - lam_t
        state["stride"] = torch.where(active & (s >= 0), moved, state["stride"])
        state["calls_left"] = torch.where(active, calls_after, state["calls_left"])
        return s


# ====================================================================== registry
POLICIES: dict[str, Callable[..., StepPolicy | OnlinePolicy]] = {
    "uniform": Uniform,
    "quadratic": Quadratic,
    "cosine": Cosine,
    "logsnr": LogSNRUniform,
    "importance": Importance,
    "stepdrop": StochasticStepDrop,
    "stepdrop_exact": lambda **kw: StochasticStepDrop(mode="exact", **kw),
    "stepdrop_per_sample": lambda **kw: StochasticStepDrop(per_sample=True, **kw),
    "noise_aware": NoiseAware,
    "gradient_aware": GradientAware,
    "combined": Combined,
    "adaptive": Adaptive,
}


def get_policy(name: str, **kwargs: Any) -> StepPolicy | OnlinePolicy:
    """A policy by name (one of :data:`POLICIES`) with its keyword arguments."""
    check_choice("policy", name, tuple(POLICIES))
    return POLICIES[name](**kwargs)


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation (numpy.interp) with constant extension; xp increasing."""
    idx = torch.searchsorted(xp, x).clamp(1, xp.numel() - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    y0, y1 = fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0)).clamp(0, 1)
    return y0 + w * (y1 - y0)
