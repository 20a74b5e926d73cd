"""The settings of a fused step, defined once for every backend.

The public ops (:func:`stepdrop.ops.fused_step`, :func:`stepdrop.ops.fused_plan_step`) and
their reference take these as keywords; after validation (:mod:`stepdrop.ops._inputs`) they
travel as one :class:`StepOptions` (and, for the plan step, one :class:`PlanOutputs`) through
the dispatch table to each backend's implementation.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class StepOptions:
    """How one transition t → s updates x, in the fused step and the plan step alike
    (docs/DESIGN.md §4 for the formulas).

    Attributes:
        noise: z ~ N(0, I), the shape and dtype of x; needed when σ > 0 (``solver="ddpm"`` or
            η > 0), else None.
        solver: "ddim" or "ddpm" (:data:`stepdrop.ops.reference.SOLVERS`).
        eta: DDIM stochasticity η ∈ [0, 1] (ignored by "ddpm").
        clip: clip x̂0 to [−clip, clip] before the update, or None.
    """

    noise: Tensor | None = None
    solver: str = "ddim"
    eta: float = 0.0
    clip: float | None = None


@dataclass(frozen=True)
class PlanOutputs:
    """The plan step's bookkeeping, written in place by the launch that updates x
    (docs/DESIGN.md §5): int64/bool [B], contiguous, sharing no memory with the plan or each
    other; None to skip one. With active = plan[b, k] ≥ 0 per sample b:

    Attributes:
        nfe: int64 model-call counter: nfe[b] += active.
        t_next: int64, written: max(plan[b, k+1], 0), the timestep of the next model call
            (clamped so that a finished sample indexes a valid embedding).
        active_next: bool, written: plan[b, k+1] ≥ 0.
    """

    nfe: Tensor | None = None
    t_next: Tensor | None = None
    active_next: Tensor | None = None
