"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), the B(h) = e^{h} − 1 variant ("bh2") in the data prediction, as diffusers'
``UniPCMultistepScheduler`` writes it (``predict_x0=True``, ``solver_type="bh2"``).

Predictor UniP-p (Alg. 2): with h = λ_s − λ_t, r_i = (λ_i − λ_t)/h for the past calls and
x̂0_i their data predictions (x̂0_0 at t), x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^{−h})·D with
D = x̂0_0 + Σ_{i<p} ρ_i·(x̂0_i − x̂0_0)/r_i, ρ = ½ at p = 2 and R_{p−1}·ρ = b otherwise
(R_{ji} = r_i^j, b from the φ-functions of −h divided by B(−h); the paper's eq. 8).

Corrector UniC (Alg. 3), free of model calls: once the model has been evaluated at the
predicted x_t, the step that produced x_t is redone with that new output as one more point,
x_t^c = (σ_t/σ_u)·x_u + α_t·(1 − e^{−h})·(x̂0_u + Σ_{i<p} ρ_i·(x̂0_i − x̂0_u)/r_i + ρ_p·(x̂0_t − x̂0_u)),
u the previous call, p its order and R_p·ρ = b with r_p = 1; the next predictor starts
from x_t^c. The corrector reads unclipped data predictions; the fused step clips D.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdrop.solvers.base import History, MultistepSolver, StepInfo, _view, combine, select


def _b(h: Tensor, n: int) -> list[Tensor]:
    """b_1..b_n of UniPC-bh2 for step h (diffusers' ``multistep_uni_p_bh_update``)."""
    hh = -h
    b_h = torch.expm1(hh)
    h_phi_k = torch.expm1(hh) / hh - 1
    factorial, out = 1.0, []
    for i in range(1, n + 1):
        out.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return out


def _det(m: list[list[Tensor]]) -> Tensor:
    if len(m) == 1:
        return m[0][0]
    if len(m) == 2:
        return m[0][0] * m[1][1] - m[0][1] * m[1][0]
    return sum((-1) ** j * m[0][j] * _det([row[:j] + row[j + 1:] for row in m[1:]]) for j in range(len(m)))


def _solve(rs: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """ρ with Σ_i r_i^j·ρ_i = b_j (j = 0..n−1), per sample, by Cramer's rule: n ≤ 3 here, and
    unlike ``torch.linalg.solve`` it never reads an error flag back to the host."""
    n = len(rs)
    matrix = [[r**j for r in rs] for j in range(n)]
    det = _det(matrix)
    out = []
    for i in range(n):
        replaced = [row[:i] + [b[j]] + row[i + 1:] for j, row in enumerate(matrix)]
        out.append(_det(replaced) / det)
    return out


def _weights(rho: list[Tensor], rs: list[Tensor]) -> list[Tensor]:
    """Weights of x̂0_0, x̂0_1, … in x̂0_0 + Σ_i ρ_i·(x̂0_i − x̂0_0)/r_i."""
    past = [p / r for p, r in zip(rho, rs)]
    return [1 - sum(past, torch.zeros_like(rs[0]) if rs else 0.0)] + past


class UniPC(MultistepSolver):
    name = "unipc"
    order = 2
    summary = "UniPC-bh2 order 2 with its corrector UniC: deterministic, no extra model calls"

    def coefficients(self, order, h, lam_t, lam_past):
        one = torch.ones_like(h)
        rs = [(lam - lam_t) / h for lam in lam_past]
        by_order = [[one]]
        for p in range(2, self.order + 1):
            rho = [0.5 * one] if p == 2 else _solve(rs[: p - 1], _b(h, p - 1))
            by_order.append(_weights(rho, rs[: p - 1]))
        return select(order, by_order)

    def correct(self, x: Tensor, x0: Tensor, lam_t: Tensor, info: StepInfo, state: History, alpha_sigma) -> Tensor:
        alpha, sigma = alpha_sigma
        lam_u = state.lam[0]
        h = torch.where(state.count > 0, lam_t - lam_u, torch.ones_like(lam_t))  # 1: placeholder, unused
        rs = [(lam - lam_u) / h for lam in state.lam[1: self.order]]
        one = torch.ones_like(h)
        by_order = []
        for p in range(1, self.order + 1):  # p: the order of the step being corrected
            rho = [0.5 * one] if p == 1 else _solve(rs[: p - 1] + [one], _b(h, p))
            past = _weights(rho[:-1], rs[: p - 1])  # weights of x̂0_u, x̂0_1.., before the new point
            by_order.append([past[0] - rho[-1]] + past[1:] + [rho[-1]])
        # the new point x̂0_t rides last: pad every order's list to the same layout
        n = self.order + 1
        by_order = [w[:-1] + [torch.zeros_like(h)] * (n - len(w)) + w[-1:] for w in by_order]
        weights = select(state.order, by_order)
        d = combine(weights, state.x0[: self.order] + [x0])
        u = state.x  # the x the previous step started from
        a_t, s_t = alpha[info.t], sigma[info.t]
        s_u = _alpha_at(lam_u) * torch.exp(-lam_u)  # σ_u = α_u·e^{−λ_u}
        ratio = s_t / s_u
        corrected = _view(ratio, u).to(d.dtype) * u.to(d.dtype) + _view(a_t * -torch.expm1(-h), d).to(d.dtype) * d
        use = _view(info.active & (state.count > 0), x)
        return torch.where(use, corrected.to(x.dtype), x)


    def _remember(self, state: History, x: Tensor, x0: Tensor, lam_t: Tensor, order: Tensor, active: Tensor) -> None:
        """The base's history, plus the x this step starts from and its order: what the next
        step's corrector redoes (a predictor-only solver skips this full-size copy per step)."""
        super()._remember(state, x, x0, lam_t, order, active)
        state.x = torch.where(_view(active, x), x, state.x)
        state.order = torch.where(active, order, state.order)


def _alpha_at(lam: Tensor) -> Tensor:
    """α from λ = log(α/σ) with α² + σ² = 1: α = sigmoid(2λ)^{1/2}."""
    return torch.sigmoid(2 * lam).sqrt()


class UniPC3(UniPC):
    name = "unipc_3"
    order = 3
    summary = "UniPC-bh2 order 3 with its corrector UniC: deterministic, no extra model calls"
