"""StepPlan: which timesteps each sample visits.

A plan for budget K holds K model-call timesteps, strictly decreasing inside [0, T−1],
followed by the terminal :data:`CLEAN` (= −1, the data end of the chain, ᾱ = 1). So a plan
of K+1 entries costs exactly K model calls, and K = T (full DDPM, calls at 999..0) is
representable. Shared plans are ``[K+1]``; per-sample plans are ``[B, L]``, each row its own
plan padded after its terminal with further :data:`CLEAN` entries (a sample whose row has
ended is masked by the sampler, not split off the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from stepdrop._validation import check_int
from stepdrop.ops.reference import CLEAN

__all__ = ["CLEAN", "StepPlan"]


@dataclass(frozen=True)
class StepPlan:
    """Timesteps for a sampling run.

    Attributes:
        timesteps: int64 ``[L]`` (shared) or ``[B, L]`` (per sample), CPU; see module docstring.
        num_train_timesteps: T of the schedule the plan was made for.
        policy: name of the policy that made it (for reports).
        overhead_calls: batched model calls a policy spent to build the plan (e.g. the pilot
            of the gradient-aware policy), counted, not estimated.
        overhead_samples: samples evaluated in those calls (calls × pilot batch).
        info: extra policy details (parameters, drop probability, …) for reports.
    """

    timesteps: Tensor
    num_train_timesteps: int
    policy: str = "custom"
    overhead_calls: int = 0
    overhead_samples: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_plan_tensor(self.timesteps, self.num_train_timesteps)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_timesteps(cls, timesteps: Sequence[int] | Tensor, num_train_timesteps: int, policy: str = "custom") -> "StepPlan":
        """Plan from a user's list of model-call timesteps, e.g. ``[999, 600, 250, 50]``.

        The list must be strictly decreasing inside [0, T−1]; a trailing :data:`CLEAN` (−1)
        may be given or is appended. A 2-D input is taken as per-sample rows (padded with −1).
        """
        T = check_int("num_train_timesteps", num_train_timesteps, low=2)
        ts = torch.as_tensor(timesteps)
        if ts.dtype.is_floating_point or ts.dtype == torch.bool:
            if not ts.dtype.is_floating_point or not torch.equal(ts, ts.round()):
                raise TypeError(f"timesteps must be integers, got dtype {ts.dtype}")
        ts = ts.to(torch.int64)
        if ts.ndim not in (1, 2) or ts.shape[-1] == 0:
            raise ValueError(f"timesteps must be a non-empty 1-D list (or 2-D per-sample rows), got shape {tuple(ts.shape)}")
        if ts.ndim == 1 and ts[-1] != CLEAN:
            ts = torch.cat([ts, ts.new_tensor([CLEAN])])
        elif ts.ndim == 2 and (ts[:, -1] != CLEAN).any():
            ts = torch.cat([ts, ts.new_full((ts.shape[0], 1), CLEAN)], dim=1)
        return cls(ts, T, policy=policy)

    # ------------------------------------------------------------------ views
    @property
    def per_sample(self) -> bool:
        return self.timesteps.ndim == 2

    @property
    def length(self) -> int:
        """L, the number of entries per row (max model calls + 1)."""
        return self.timesteps.shape[-1]

    @property
    def num_steps(self) -> Tensor:
        """Model calls of each row (entries ≥ 0): a 0-dim tensor for a shared plan, [B] otherwise."""
        return (self.timesteps >= 0).sum(-1)

    def expand(self, batch_size: int) -> Tensor:
        """The plan as a ``[B, L]`` tensor (a shared plan repeated; a per-sample plan checked)."""
        if self.per_sample:
            if self.timesteps.shape[0] != batch_size:
                raise ValueError(
                    f"per-sample plan has {self.timesteps.shape[0]} rows but the batch has {batch_size} samples"
                )
            return self.timesteps
        return self.timesteps.unsqueeze(0).expand(batch_size, -1)

    def row(self, index: int = 0) -> list[int]:
        """One row's model-call timesteps as a list (no terminal), for reports."""
        r = self.timesteps[index] if self.per_sample else self.timesteps
        return [int(v) for v in r[r >= 0]]

    def __repr__(self) -> str:
        shape = "x".join(str(d) for d in self.timesteps.shape)
        head = self.row(0)
        shown = head if len(head) <= 8 else head[:4] + ["…"] + head[-3:]
        return f"StepPlan({self.policy}, T={self.num_train_timesteps}, shape={shape}, row0={shown})"


def validate_plan_tensor(timesteps: Tensor, num_train_timesteps: int) -> None:
    """Check the plan invariants; ``ValueError``/``TypeError`` naming ``timesteps``."""
    if not isinstance(timesteps, Tensor):
        raise TypeError(f"timesteps must be a torch.Tensor, got {type(timesteps).__name__}")
    if timesteps.dtype != torch.int64:
        raise TypeError(f"timesteps must be int64, got {timesteps.dtype}")
    if timesteps.ndim not in (1, 2) or timesteps.shape[-1] < 2:
        raise ValueError(
            f"timesteps must be [K+1] or [B, K+1] with K >= 1 (at least one model call), got shape {tuple(timesteps.shape)}"
        )
    T = num_train_timesteps
    rows = timesteps.reshape(-1, timesteps.shape[-1]).cpu()
    if (rows < CLEAN).any() or (rows > T - 1).any():
        raise ValueError(f"timesteps must be inside [0, {T - 1}] (and {CLEAN} for the clean end), got range "
                         f"[{int(rows.min())}, {int(rows.max())}]")
    if timesteps.ndim == 1 and (rows[0, :-1] < 0).any():
        raise ValueError(f"timesteps: a shared plan holds model-call timesteps then one {CLEAN}; padding with "
                         f"{CLEAN} is only for per-sample [B, L] plans, got {rows[0].tolist()}")
    if (rows[:, 0] < 0).any():
        raise ValueError("timesteps: every row must start with a model-call timestep >= 0")
    if (rows[:, -1] != CLEAN).any():
        raise ValueError(f"timesteps: every row must end with the clean marker {CLEAN}")
    live = rows[:, :-1] >= 0
    diffs = rows[:, 1:] - rows[:, :-1]
    if (live & (diffs >= 0)).any():
        bad = int((live & (diffs >= 0)).nonzero()[0, 0])
        raise ValueError(f"timesteps must be strictly decreasing, got {rows[bad].tolist()}")
    # after the first CLEAN only CLEAN padding may follow
    ended = torch.cummax((rows == CLEAN).int(), dim=1).values.bool()
    if (ended & (rows != CLEAN)).any():
        raise ValueError("timesteps: after the clean marker -1 only -1 padding may follow")
