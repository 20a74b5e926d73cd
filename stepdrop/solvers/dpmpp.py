"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), multistep in the data prediction, as diffusers'
``DPMSolverMultistepScheduler`` writes it (``algorithm_type="dpmsolver++"`` or
``"sde-dpmsolver++"``, ``solver_type="midpoint"``).

With h = λ_s − λ_t, h_i the spacing of the past calls, r_i = h_i/h and x̂0_i the data
predictions (newest first), each update is x_s = (σ_s/σ_t)·x_t + α_s·(1 − e^{−h})·D:

* 2M (Alg. 2): D = x̂0_0 + (1/(2r_0))·(x̂0_0 − x̂0_1);
* 3M: D = D_0 + c_1·D_1 − c_2·D_2 with D_1, D_2 the first and second divided differences
  of diffusers' ``multistep_dpm_solver_third_order_update``,
  c_1 = ((e^{−h} − 1)/h + 1)/(1 − e^{−h}), c_2 = ((e^{−h} − 1 + h)/h² − ½)/(1 − e^{−h});
* 2M SDE (§5, ``sde-dpmsolver++``): the same D in
  x_s = (σ_s/σ_t)·e^{−h}·x_t + α_s·(1 − e^{−2h})·D + σ_s·√(1 − e^{−2h})·z, which is the DDPM
  posterior with x̂0 = D, so DDIM with η = 1 on the rewritten ε.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stepdrop.solvers.base import MultistepSolver, select


def _second_order(h: Tensor, lam_t: Tensor, lam_past: list[Tensor]) -> list[Tensor]:
    w = h / (2 * (lam_t - lam_past[0]))  # 1/(2r_0)
    return [1 + w, -w]


class DPMSolverPP2M(MultistepSolver):
    name = "dpmpp_2m"
    order = 2
    summary = "DPM-Solver++(2M): deterministic, second order from the previous call"

    def coefficients(self, order, h, lam_t, lam_past):
        one = torch.ones_like(h)
        return select(order, [[one], _second_order(h, lam_t, lam_past)])


class DPMSolverPP3M(MultistepSolver):
    name = "dpmpp_3m"
    order = 3
    summary = "DPM-Solver++(3M): deterministic, third order from the two previous calls"

    def coefficients(self, order, h, lam_t, lam_past):
        one = torch.ones_like(h)
        r0 = (lam_t - lam_past[0]) / h
        r1 = (lam_past[0] - lam_past[1]) / h
        phi = -torch.expm1(-h)  # 1 − e^{−h}
        c1 = (torch.expm1(-h) / h + 1) / phi
        c2 = ((torch.expm1(-h) + h) / h**2 - 0.5) / phi
        # D = x̂0_0 + A·(x̂0_0 − x̂0_1)/r0 + B·(x̂0_1 − x̂0_2)/r1, expanded from diffusers' D_1, D_2
        a = c1 * (1 + r0 / (r0 + r1)) - c2 / (r0 + r1)
        b = (c2 - c1 * r0) / (r0 + r1)
        third = [1 + a / r0, -a / r0 + b / r1, -b / r1]
        return select(order, [[one], _second_order(h, lam_t, lam_past), third])


class DPMSolverPP2MSDE(DPMSolverPP2M):
    name = "dpmpp_2m_sde"
    update = "ddim"
    stochastic = True
    summary = "DPM-Solver++(2M) SDE: second order, draws fresh noise each step"

    def __init__(self, eta: float = 0.0):
        super().__init__(1.0)  # the DDPM posterior's variance: DDIM's η = 1 (module docstring)
