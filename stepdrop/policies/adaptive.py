"""The online :class:`Adaptive` policy: per-sample stride control in log-SNR while sampling,
from the model's own predictions, as in adaptive ODE step-size control (docs/DESIGN.md §4).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from stepdrop._validation import check_choice, check_float
from stepdrop.ops.reference import CLEAN, predict_x0
from stepdrop.policies.base import OnlinePolicy, check_budget
from stepdrop.schedule import NoiseSchedule


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
        if state["previous"] is not None and state["previous"].shape != sig.shape:
            state["previous"] = None  # x changed size (mixed resolution): no comparable previous call
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
