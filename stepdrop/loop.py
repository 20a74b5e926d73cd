"""What one sampling run carries through its loop: the resolved run settings, the on-device
counters (NFE per sample, the non-finite check) and the clock (docs/DESIGN.md §2).

Shared by the eager loops of :class:`~stepdrop.sampler.FusedSampler` and the CUDA-graph runner
(:mod:`stepdrop.cuda_graph`), which captures the same loop over static buffers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from stepdrop.ops import resolve_backend
from stepdrop.schedule import NoiseSchedule

__all__ = ["Counters", "NonFiniteOutputError", "Run", "clock", "progress_steps", "state_dtype"]


class NonFiniteOutputError(ValueError):
    """The model returned NaN or Inf; the message names the step and the timestep."""



@dataclass(frozen=True)
class Run:
    """What one :meth:`stepdrop.sampler.FusedSampler.sample` call resolves once, before its loop."""

    device: torch.device
    model_dtype: torch.dtype  # x is cast to it for each model call
    state_dtype: torch.dtype  # dtype of x, the noise and the update (:func:`state_dtype`)
    backend: str  # concrete fused-step backend (from resolve_backend)
    table: Tensor  # ᾱ [T], float64 on ``device``
    generator: torch.Generator | None
    sample_shape: tuple[int, ...]  # (C, H, W) at full size (x_T may be smaller: mixed resolution)

    @classmethod
    def make(cls, device: torch.device, model_dtype: torch.dtype, backend: str, schedule: NoiseSchedule,
             generator: torch.Generator | None, sample_shape: tuple[int, ...]) -> "Run":
        return cls(device, model_dtype, state_dtype(model_dtype), resolve_backend(backend, device),
                   schedule.table(device, torch.float64), generator, tuple(sample_shape))


def state_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """dtype of x during sampling: float64 for a float64 model, else float32 (a half-precision
    model is fed x in its own dtype; the update always runs in float32 or wider)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


class Counters:
    """Per-sample NFE and the non-finite check, accumulated on the device.

    ``nfe`` is incremented by the loop (in a plan loop by :func:`stepdrop.ops.fused_plan_step`).
    For the check, each step stores Σ ε per sample, summed in float64: the sum is finite exactly
    when every element is (float32 values cannot overflow a float64 sum; NaN and ±Inf carry
    through), so one reduction kernel per step replaces an element-wise test, and which samples
    were active is read from the visited timesteps once, after the loop."""

    def __init__(self, batch: int, steps: int, device: torch.device, check_finite: bool):
        self.nfe = torch.zeros(batch, dtype=torch.int64, device=device)
        self.sums = torch.zeros((steps, batch), dtype=torch.float64, device=device) if check_finite else None
        self.calls = 0

    def check(self, k: int, eps: Tensor) -> None:
        """Count a batched model call and record step k's Σ ε per sample."""
        self.calls += 1
        if self.sums is not None:
            torch.sum(eps.flatten(1), dim=1, dtype=torch.float64, out=self.sums[k])

    def raise_if_nonfinite(self, timesteps: Tensor) -> None:
        """Raise :class:`NonFiniteOutputError` naming the first step at which an active sample
        (``timesteps[b, k] >= 0``; ``timesteps`` [B, ≥ steps]) got a NaN/Inf output."""
        if self.sums is None or self.sums.numel() == 0:
            return
        ts = timesteps.cpu()[:, : self.sums.shape[0]]
        bad = ~torch.isfinite(self.sums.cpu().T) & (ts >= 0)  # [B, steps]
        if bool(bad.any()):
            k = int(bad.any(0).nonzero()[0, 0])
            i = int(bad[:, k].nonzero()[0, 0])
            n = int(bad.any(1).sum())
            raise NonFiniteOutputError(
                f"model output contains NaN or Inf at step {k} (timestep t={int(ts[i, k])}) for {n} of "
                f"{bad.shape[0]} samples (first: sample {i})"
            )


def progress_steps(n: int, progress: bool, label: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=f"sampling ({label})", unit="step", leave=False)


def clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

