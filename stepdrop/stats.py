"""What a sampling run cost, counted while it ran: :class:`SampleStats` (docs/DESIGN.md §6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["SampleStats"]


@dataclass
class SampleStats:
    """What a sampling run cost, counted while it ran.

    Attributes:
        nfe: int64 [B], model evaluations that updated each sample (masked ones not counted).
        model_calls: batched forward passes made (each on the whole batch).
        evaluated_samples: samples pushed through the model, masked ones included
            (the compute actually spent: model_calls × B).
        overhead_calls: batched model calls the policy spent building the plan (pilot runs).
        overhead_samples: samples evaluated in those calls.
        wall_time_s: time of the loop, device synchronised at both ends.
        timesteps: int64 [B, L], the timesteps each sample actually visited (−1 = clean end).
    """

    nfe: Tensor
    model_calls: int
    evaluated_samples: int
    overhead_calls: int
    overhead_samples: int
    wall_time_s: float
    timesteps: Tensor
    policy: str
    solver: str
    eta: float
    backend: str
    info: dict[str, Any] = field(default_factory=dict)
    variants: tuple[str, ...] = ()  # how each plan column's call ran (stepdrop.variants.Variant.label)

    def calls_by_variant(self) -> dict[str, Tensor]:
        """Model calls per sample of each variant (int64 [B] per label), read from the visited
        timesteps: column k of an active row is one call of column k's variant."""
        labels = self.variants or ("full",) * (self.timesteps.shape[1] - 1)
        active = self.timesteps[:, : len(labels)] >= 0
        out: dict[str, Tensor] = {}
        for k, label in enumerate(labels):
            out[label] = out.get(label, torch.zeros(active.shape[0], dtype=torch.int64)) + active[:, k]
        return out

    @property
    def mean_nfe(self) -> float:
        return float(self.nfe.double().mean()) if self.nfe.numel() else 0.0

    @property
    def images_per_second(self) -> float:
        return self.nfe.numel() / self.wall_time_s if self.wall_time_s > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "policy": self.policy,
            "solver": self.solver,
            "eta": self.eta,
            "backend": self.backend,
            "batch_size": int(self.nfe.numel()),
            "mean_nfe": self.mean_nfe,
            "min_nfe": int(self.nfe.min()) if self.nfe.numel() else 0,
            "max_nfe": int(self.nfe.max()) if self.nfe.numel() else 0,
            "model_calls": self.model_calls,
            "evaluated_samples": self.evaluated_samples,
            "overhead_calls": self.overhead_calls,
            "overhead_samples": self.overhead_samples,
            "calls_by_variant": {k: float(v.double().mean()) for k, v in self.calls_by_variant().items()},
            "wall_time_s": self.wall_time_s,
            "images_per_second": self.images_per_second,
            "info": self.info,
        }
