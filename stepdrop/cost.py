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

__all__ = ["gflops_per_call", "PeakMemory"]


@torch.no_grad()
def gflops_per_call(model: torch.nn.Module, sample_shape: Sequence[int] | None = None, timestep: int = 500) -> float:
    """GFLOPs of one forward of ``model`` on a single sample (batch 1) at ``timestep``."""
    shape = tuple(sample_shape) if sample_shape is not None else getattr(model, "sample_shape", None)
    if shape is None:
        raise ValueError("sample_shape=(C, H, W) is required: the model has no sample_shape attribute")
    shape = tuple(check_int("sample_shape", d, low=1) for d in shape)
    device, dtype = model_device_dtype(model)
    x = torch.randn(1, *shape, device=device, dtype=dtype)
    t = torch.full((1,), check_int("timestep", timestep, low=0), device=device, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        model(x, t)
    return counter.get_total_flops() / 1e9


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
