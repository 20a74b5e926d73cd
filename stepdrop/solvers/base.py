"""What a solver is: how one step t → s uses the model's output, written onto the fused step.

Every backend implements one update, the fused DDIM / DDPM-posterior step of
:mod:`stepdrop.ops.reference`. A solver names which of the two it runs (its :class:`StepRule`)
and, before each step, may rewrite the ε and the x that step receives (docs/DESIGN.md §4b).
A data-prediction multistep solver (DPM-Solver++, UniPC) moves t → s as

    x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^{−h})·D,    h = λ_s − λ_t,  λ = log(α/σ),

which is DDIM (η = 0) with x̂0 = D, a combination of the current and past data predictions.
DDIM reads x̂0 from ε, so feeding the step ε' = (x_t − α_t·D)/σ_t makes every backend, the
per-sample plans, the masking, the counted NFE and the CUDA graph serve the solver unchanged.
A solver therefore only computes D's coefficients: :meth:`MultistepSolver.coefficients`.

Subclasses register themselves by ``name``; :mod:`stepdrop.solvers` imports every module of
the package, so a new solver is one new file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from stepdrop.ops.reference import _compute_dtype, predict_x0

__all__ = ["MultistepSolver", "Solver", "StepInfo", "StepRule", "REGISTRY"]

REGISTRY: dict[str, type["Solver"]] = {}
"""Solver classes by name, filled as their modules are imported (:mod:`stepdrop.solvers`)."""


class StepRule(NamedTuple):
    """The fused step a solver runs: the kernel's update ("ddim" or "ddpm") and DDIM's η."""

    update: str
    eta: float


@dataclass(frozen=True)
class StepInfo:
    """What a solver sees of step k, all on the sampling device (nothing here needs a host read).

    Attributes:
        k: the step index.
        table: ᾱ [T], float64.
        t: int64 [B], this call's timestep (clamped ≥ 0 where a sample has ended).
        s: int64 [B], the next timestep (−1: the clean end).
        active: bool [B], samples this step updates (the others pass through unchanged).
        remaining: int64 [B], steps left in each sample's plan, this one included (an online
            policy's loop gives the budget left, an upper bound).
    """

    k: int
    table: Tensor
    t: Tensor
    s: Tensor
    active: Tensor
    remaining: Tensor


class Solver:
    """A single-step solver: the fused step itself, with no history.

    Class attributes (the solver's declaration):
        name: the registry name.
        stochastic: whether each step draws fresh noise z.
        history: how many past model outputs it keeps.
        update: the fused step's update, "ddim" or "ddpm".
        takes_eta: whether DDIM's η is a free setting (only plain DDIM).
    """

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    history: ClassVar[int] = 0
    update: ClassVar[str] = "ddim"
    takes_eta: ClassVar[bool] = False
    summary: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            REGISTRY[cls.name] = cls

    def __init__(self, eta: float = 0.0):
        self.eta = float(eta)

    @property
    def rule(self) -> StepRule:
        return StepRule(self.update, self.eta)

    def start(self, x: Tensor) -> Any:
        """The per-run state (None: the solver keeps none)."""
        return None

    def prepare(self, x: Tensor, eps: Tensor, info: StepInfo, state: Any) -> tuple[Tensor, Tensor]:
        """The (x, ε) that the fused step t → s receives, given the model's ε at t."""
        return x, eps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, eta={self.eta})"


@dataclass
class History:
    """A multistep solver's per-sample memory. Entries ``[0]`` are the newest."""

    x0: list[Tensor]  # past data predictions, each [B, ...] in the compute dtype
    lam: list[Tensor]  # their λ, float64 [B]
    count: Tensor  # int64 [B], model outputs seen so far
    x: Tensor  # the x each sample last stepped from (kept by a corrector only)
    order: Tensor  # int64 [B], the order of each sample's last step (kept by a corrector only)


class MultistepSolver(Solver):
    """A deterministic data-prediction multistep solver run as DDIM on a rewritten ε (module
    docstring). Its order at step k is ``min(order, calls so far + 1, steps remaining)`` per
    sample: lower order while the history fills, and first order into the clean end (σ_s = 0,
    where λ_s = ∞), diffusers' ``lower_order_final`` with ``final_sigmas_type="zero"``.

    Subclasses set ``order`` and implement :meth:`coefficients`; a corrector (UniPC's UniC)
    overrides :meth:`correct`."""

    order: ClassVar[int] = 2

    @property
    def history(self) -> int:  # type: ignore[override]
        return self.order - 1

    def start(self, x: Tensor) -> History:
        compute = _compute_dtype(x.dtype)
        B = x.shape[0]
        zeros = torch.zeros(B, dtype=torch.float64, device=x.device)
        return History([torch.zeros_like(x, dtype=compute) for _ in range(self.order)],
                       [zeros.clone() for _ in range(self.order)],
                       torch.zeros(B, dtype=torch.int64, device=x.device), x, torch.ones_like(zeros, dtype=torch.int64))

    def coefficients(self, order: Tensor, h: Tensor, lam_t: Tensor, lam_past: list[Tensor]) -> list[Tensor]:
        """float64 [B] weights a_0.. of D = Σ a_i·x̂0_i, x̂0_0 the data prediction at t and x̂0_i
        the i-th most recent past one, for per-sample ``order`` (int64 [B], ≥ 1; weights past it
        are 0), step ``h = λ_s − λ_t`` and the past λs (newest first)."""
        raise NotImplementedError

    def correct(self, x: Tensor, x0: Tensor, lam_t: Tensor, info: StepInfo, state: History,
                alpha_sigma) -> Tensor:
        """The x to step from (a corrector's refinement of the predicted x_t); default: x."""
        return x

    def prepare(self, x: Tensor, eps: Tensor, info: StepInfo, state: History) -> tuple[Tensor, Tensor]:
        lam_table = log_snr(info.table)
        compute = _compute_dtype(x.dtype)
        alpha, sigma = alpha_sigma(info.table)
        x0 = predict_x0(x.to(compute), eps.to(compute), info.table, info.t)
        lam_t = lam_table[info.t]
        x = self.correct(x, x0, lam_t, info, state, (alpha, sigma))
        order = torch.minimum(torch.minimum(state.count + 1, info.remaining), torch.full_like(state.count, self.order))
        order = order.clamp(min=1)
        lam_s = torch.where(info.s >= 0, lam_table[info.s.clamp(min=0)], lam_t + 1)  # unused where s < 0
        weights = self.coefficients(order, lam_s - lam_t, lam_t, state.lam[: self.order - 1])
        d = combine(weights, [x0] + state.x0[: self.order - 1])
        a_t, s_t = _view(alpha[info.t], x), _view(sigma[info.t], x)
        eps_d = (x.to(compute) - a_t.to(compute) * d) / s_t.to(compute)
        self._remember(state, x, x0, lam_t, order, info.active)
        return x, eps_d.to(x.dtype)

    def _remember(self, state: History, x: Tensor, x0: Tensor, lam_t: Tensor, order: Tensor, active: Tensor) -> None:
        """Push this step's x̂0 and λ where a sample is active; the others keep theirs. (A
        corrector also keeps the step's x and order: :meth:`UniPC._remember`.)"""
        keep = _view(active, x0)
        state.x0 = [torch.where(keep, new, old) for new, old in zip([x0] + state.x0[:-1], state.x0)]
        state.lam = [torch.where(active, new, old) for new, old in zip([lam_t] + state.lam[:-1], state.lam)]
        state.count = state.count + active.long()


def log_snr(table: Tensor) -> Tensor:
    """λ = log(α/σ) = ½·log(ᾱ/(1−ᾱ)) per timestep, float64."""
    table = table.to(torch.float64)
    return 0.5 * (table / (1 - table)).log()


def alpha_sigma(table: Tensor) -> tuple[Tensor, Tensor]:
    table = table.to(torch.float64)
    return table.sqrt(), (1 - table).sqrt()


def combine(weights: list[Tensor], tensors: list[Tensor]) -> Tensor:
    """Σ_i weights[i]·tensors[i], per sample (weights float64 [B])."""
    out = _view(weights[0], tensors[0]).to(tensors[0].dtype) * tensors[0]
    for w, v in zip(weights[1:], tensors[1:]):
        out = out + _view(w, v).to(v.dtype) * v
    return out


def select(order: Tensor, by_order: list[list[Tensor]]) -> list[Tensor]:
    """Per sample, the weights of its order: ``by_order[p − 1]`` (lists padded with zeros)."""
    n = max(len(w) for w in by_order)
    zero = torch.zeros_like(by_order[0][0])
    padded = [w + [zero] * (n - len(w)) for w in by_order]
    out = padded[0]
    for p, weights in enumerate(padded[1:], start=2):
        out = [torch.where(order >= p, new, old) for new, old in zip(weights, out)]
    return out


def _view(v: Tensor, like: Tensor) -> Tensor:
    return v.view((-1,) + (1,) * (like.ndim - 1))
