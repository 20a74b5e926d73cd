"""The solver registry: every module of this package defines solvers that register by name.

A solver declares its name, whether it draws noise, how many past model outputs it keeps and
how its update maps onto the fused step (:mod:`stepdrop.solvers.base`). The sampler's loops,
the CUDA-graph runner, :class:`~stepdrop.diffusers_scheduler.StepDropScheduler`, ``compare`` and
the CLI all take solvers from :data:`SOLVERS`. Adding one is one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil

from stepdrop._validation import check_choice, check_float
from stepdrop.solvers.base import REGISTRY, MultistepSolver, Solver, StepInfo, StepRule

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

SOLVERS: tuple[str, ...] = tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].__module__, n)))
"""Every solver name, e.g. "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc", "unipc_3"."""

__all__ = ["SOLVERS", "MultistepSolver", "Solver", "StepInfo", "StepRule", "get_solver", "solver_help"]


def get_solver(solver: "str | Solver", eta: float = 0.0) -> Solver:
    """A solver by name (one of :data:`SOLVERS`), or ``solver`` itself when it is one.

    ``eta`` (DDIM's η ∈ [0, 1]) is a setting of "ddim" only; a non-zero η with another solver
    raises, since that solver's noise is part of its definition."""
    if isinstance(solver, Solver):
        if eta:
            raise ValueError(f"eta is a setting of the solver object {solver!r}; pass eta=0 with a Solver instance")
        return solver
    name = check_choice("solver", solver, SOLVERS)
    cls = REGISTRY[name]
    eta = check_float("eta", eta, low=0.0, high=1.0)
    if eta and not cls.takes_eta:
        raise ValueError(f"eta must be 0 with solver={name!r} ({cls.summary}); eta in (0, 1] is a setting of "
                         f"solver='ddim'")
    return cls(eta)


def solver_help() -> str:
    """One line per solver, for ``--help`` texts."""
    return "; ".join(f"{name}: {REGISTRY[name].summary}" for name in SOLVERS)
