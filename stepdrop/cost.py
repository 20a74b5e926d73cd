"""What sampling costs: FLOPs per model call and peak memory.

FLOPs come from ``torch.utils.flop_counter`` on one batch-1 forward (convolutions,
transposed convolutions, matmuls and scaled-dot-product attention are counted; elementwise
ops are not, as usual). A run's FLOPs are this × its *counted* NFE, never an assumed step
count (docs/DESIGN.md §6).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from stepdrop._validation import check_int, model_device_dtype

__all__ = ["gflops_per_call", "gflops_per_variant", "PeakMemory"]


@torch.no_grad()
def gflops_per_call(model: torch.nn.Module, sample_shape: Sequence[int] | None = None, timestep: int = 500) -> float:
    """GFLOPs of one forward of ``model`` on a single sample (batch 1) at ``timestep``: the full
    call of :func:`gflops_per_variant`."""
    from stepdrop.variants import CallPlan

    return gflops_per_variant(model, CallPlan(), sample_shape, timestep)["full"]


@torch.no_grad()
def gflops_per_variant(model: torch.nn.Module, calls, sample_shape: Sequence[int] | None = None,
                       timestep: int = 500) -> dict[str, float]:
    """GFLOPs of one batch-1 call of each variant a :class:`~stepdrop.variants.CallPlan` can make,
    by label ("full", "res0.5", "shallow", "res0.5+shallow"; docs/DESIGN.md §4c). A shallow
    call is counted alone, after an uncounted full call has made its deep feature."""
    shape = tuple(sample_shape) if sample_shape is not None else getattr(model, "sample_shape", None)
    if shape is None:
        raise ValueError("sample_shape=(C, H, W) is required: the model has no sample_shape attribute")
    shape = tuple(check_int("sample_shape", d, low=1) for d in shape)
    from stepdrop.variants import Variant, reduced_size

    calls.check_model(model, shape)
    device, dtype = model_device_dtype(model)
    t = torch.full((1,), check_int("timestep", timestep, low=0), device=device, dtype=torch.int64)
    out: dict[str, float] = {}
    scales = (1.0,) if calls.mixres is None else (calls.mixres.scale, 1.0)
    widths = sorted(set(calls.width.widths) | {1.0}, reverse=True) if calls.width is not None else (1.0,)
    for variant in (Variant(scale, shallow, width) for scale in scales for width in widths
                    for shallow in ((False, True) if calls.cache else (False,))):
        size = tuple(shape[1:]) if variant.scale == 1.0 else reduced_size(shape, variant.scale)
        x = torch.randn(1, shape[0], *size, device=device, dtype=dtype)
        if calls.width is not None:
            model.set_width(variant.width)
        try:
            feature = model.forward_cached(x, t, calls.cache.branch)[1] if variant.shallow else None
            with FlopCounterMode(display=False) as counter:
                if variant.shallow:
                    model.forward_cached(x, t, calls.cache.branch, feature)
                else:
                    model(x, t)
        finally:
            if calls.width is not None:
                model.set_width(1.0)
        out[variant.label] = counter.get_total_flops() / 1e9
    return out


class PeakMemory:
    """Peak memory of a block: ``torch.cuda.max_memory_allocated`` on a CUDA device (true peak
    of tensors, reset on entry); on the CPU there is no per-block peak to read, so
    :attr:`megabytes` stays None rather than a process-wide figure passed off as one."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.megabytes: float | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.megabytes = torch.cuda.max_memory_allocated(self.device) / 2**20
