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

Modules: :mod:`~stepdrop.policies.base` (helpers and base classes),
:mod:`~stepdrop.policies.spacing` (deterministic spacings), :mod:`~stepdrop.policies.aware`
(gradient-aware), :mod:`~stepdrop.policies.stepdrop` (stochastic dropping),
:mod:`~stepdrop.policies.adaptive` (online); this package holds the :data:`POLICIES` registry.
"""

from __future__ import annotations

from typing import Any, Callable

from stepdrop._validation import check_choice
from stepdrop.policies.adaptive import Adaptive
from stepdrop.policies.aware import Combined, GradientAware
from stepdrop.policies.base import (  # noqa: F401  (the private helpers stay importable from here)
    DensityPolicy,
    OnlinePolicy,
    StepPolicy,
    _finish,
    _generator,
    _interp,
    check_budget,
    make_strictly_decreasing,
    per_sample_generators,
    timesteps_from_density,
    trailing_from_unit,
)
from stepdrop.policies.spacing import (  # noqa: F401
    Cosine,
    CustomTimesteps,
    Importance,
    LogSNRUniform,
    NoiseAware,
    Quadratic,
    Uniform,
    noise_weight,
)
from stepdrop.policies.stepdrop import PROFILES, StochasticStepDrop, _solve_drop_scale  # noqa: F401

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
