"""The timestep argument of the model contract ``eps = model(x, t)``, normalised once for every model."""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["as_timestep_vector"]


def as_timestep_vector(t: Tensor | int, batch: int, device: torch.device | str) -> Tensor:
    """``t`` as one timestep per sample: a tensor of shape [batch] on ``device``.

    Args:
        t: a tensor of shape [batch] (one timestep per sample) or 0-dim (one for the whole
            batch, broadcast), of an integer or real dtype; or a Python int (→ int64) or real
            number (→ float32) for the whole batch.
        batch: B, the batch size of ``x``.
        device: ``x``'s device; ``t`` is moved there (non-blocking).

    Returns:
        [batch] tensor; a tensor ``t`` keeps its dtype (int32, int64, float …).

    Raises:
        TypeError: ``t`` is a bool or complex tensor, a Python bool, or not a tensor or number.
        ValueError: ``t`` is a tensor of another shape.
    """
    if isinstance(t, Tensor):
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"t must be an integer (or real) tensor, got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.reshape(1).expand(batch)
        elif t.ndim != 1 or t.shape[0] != batch:
            raise ValueError(
                f"t must have shape [B] = [{batch}] (one timestep per sample) or be 0-dim, got {tuple(t.shape)}"
            )
        return t.to(device, non_blocking=True)
    if isinstance(t, numbers.Real) and not isinstance(t, bool):
        dtype = torch.int64 if isinstance(t, numbers.Integral) else torch.float32
        return torch.full((batch,), t, dtype=dtype, device=device)
    raise TypeError(f"t must be a tensor of shape [B] or a Python int, got {type(t).__name__}")
