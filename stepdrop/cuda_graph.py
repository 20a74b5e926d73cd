"""The CUDA-graph runner (docs/DESIGN.md §5): the sampler's plan loop, unchanged, captured once
into a ``torch.cuda.CUDAGraph`` over static buffers (x_T, the [B, L] plan, each random draw of
the loop: the step noise, and the mixed-resolution switch noise) and replayed; a new seed, x_T
or plan of the same length is copied into the buffers.

The functions take the :class:`~stepdrop.sampler.FusedSampler` whose loop they capture
(``self``): its graphs are cached on it, one per run signature.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor

from stepdrop.loop import Counters, Run, clock
from stepdrop.plan import StepPlan

__all__ = ["CudaGraphError", "PlanGraph", "check_graphable", "sample_graph"]

GRAPH_WARMUP_STEPS = 3
"""Eager loop steps run on a side stream before a capture: every step runs the same kernels,
so a few steps initialise what a capture may not (cuBLAS/cuDNN handles and workspaces,
algorithm choice, Triton compilation, allocator pools), as the torch CUDA-graph docs require."""


class CudaGraphError(RuntimeError):
    """``cuda_graph=True``, but the sampling loop could not be captured (the message says why)."""


def release_default_generator(device: torch.device) -> None:
    """Take the device's default CUDA generator out of capture mode after a failed capture.

    A capture registers that generator, and only a successful end releases it. After a failure
    its next random draw outside a graph (``torch.randn(..., device="cuda")`` anywhere in the
    process) raises "Offset increment outside graph capture encountered unexpectedly". A
    capture that succeeds, here of one trivial kernel, runs the release.
    """
    with torch.cuda.device(device):
        scratch = torch.empty(1, device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            scratch.fill_(0.0)


@dataclass
class PlanGraph:
    """One captured sampling loop: its static inputs (x_T [B, C, H, W], plan [B, L] int64, one
    buffer per random draw of the loop, keyed by (kind, step) as
    :meth:`~stepdrop.sampler.FusedSampler.noise_draws` lists them) and outputs (images,
    counters), written by every replay."""

    x_T: Tensor
    plan: Tensor
    noise: dict[tuple[str, int], Tensor]
    weights: tuple[Tensor, ...]  # the model's parameters and buffers ...
    addresses: tuple[int, ...]  # ... and where they were at capture: the graph reads them there
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    out: Tensor | None = None
    counts: "Counters | None" = None

    @classmethod
    def allocate(cls, x: Tensor, length: int, draws, model) -> "PlanGraph":
        noise = {(kind, k): x.new_empty(shape) for kind, k, shape in draws}
        plan = torch.empty((x.shape[0], length), dtype=torch.int64, device=x.device)
        weights = tuple(itertools.chain(model.parameters(), model.buffers())) if isinstance(model, torch.nn.Module) \
            else ()
        return cls(torch.empty_like(x), plan, noise, weights, tuple(w.data_ptr() for w in weights))

    def weights_moved(self) -> bool:
        """Whether a weight tensor now lives elsewhere (``model.to(...)`` replaces ``.data``), so that
        the graph would read stale memory. In-place updates (``load_state_dict``) keep the addresses
        and reach the next replay. Checked on the tensors kept at capture (~0.1 µs each): walking the
        module tree again would cost more than a small model's replay."""
        return any(w.data_ptr() != a for w, a in zip(self.weights, self.addresses))


def check_graphable(device: torch.device, progress: bool, callback) -> torch.device:
    """The run's device with its index (graphs are cached per device); ValueError naming the
    argument that rules a CUDA graph out."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, but this run samples on {device}; move the model "
                         f"(and noise_or_batch) to CUDA or use cuda_graph=False")
    if callback is not None or progress:
        name = "callback" if callback is not None else "progress"
        raise ValueError(f"{name} is not supported with cuda_graph=True: a replayed graph runs no Python between "
                         f"steps; use cuda_graph=False to observe the steps")
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def sample_graph(sampler, x, plan: StepPlan, run: Run):
    """Replay (capturing first if needed) the CUDA graph of this run's signature."""
    B = x.shape[0]
    ts = plan.expand(B)
    # shared and per-sample plans run the same masked loop: one graph serves both
    key = (run.device, tuple(x.shape), plan.length, run.state_dtype, run.model_dtype, run.backend, sampler._solver,
           sampler.clip, sampler.check_finite, sampler.calls, run.sample_shape)
    graph = sampler._graphs.get(key)
    if graph is None or graph.weights_moved():  # a new signature, or model.to(...) since the capture
        draws = sampler.noise_draws(x.shape, plan.length - 1, run.sample_shape)
        graph = PlanGraph.allocate(x, plan.length, draws, sampler.model)
    with torch.cuda.device(run.device):  # replay launches on the current device's stream
        start = clock(run.device)
        load_inputs(sampler, graph, x, ts, run)
        capture_s = 0.0
        if graph.graph is None:
            capture_s = capture(sampler, graph, run)
            sampler._graphs[key] = graph
        graph.graph.replay()
        images = graph.out.clone()  # the static output is overwritten by the next replay
        wall = clock(run.device) - start - capture_s
    graph.counts.raise_if_nonfinite(ts)
    stats = sampler._stats(graph.counts, plan, ts, wall, run.backend)
    stats.info["cuda_graph"] = {"captured_now": capture_s > 0, "capture_s": capture_s}
    return images, stats


def load_inputs(sampler, graph: PlanGraph, x: Tensor, ts: Tensor, run: Run) -> None:
    """Copy x_T and the [B, L] plan into the static buffers and draw the loop's noise into its
    buffers, in the eager loop's order (x_T was drawn first, then step 0's draws, 1's, …), so
    the same generator state gives the same noise as :meth:`~stepdrop.sampler.FusedSampler.sample`."""
    graph.x_T.copy_(x)
    graph.plan.copy_(ts)
    for buffer in graph.noise.values():  # dicts keep the insertion order: the loop's
        sampler._randn(buffer.shape, run, out=buffer)


def graph_body(sampler, graph: PlanGraph, run: Run, ks: Iterable[int]) -> tuple[Tensor, Counters]:
    """The loop over ``graph``'s static buffers, as a capture records it: (images, counters)."""
    counts = Counters(graph.x_T.shape[0], graph.plan.shape[1] - 1, graph.x_T.device, sampler.check_finite)
    return sampler._run_plan(graph.x_T, graph.plan, ks, lambda kind, k, shape: graph.noise[(kind, k)], counts, run,
                             None), counts


def capture(sampler, graph: PlanGraph, run: Run) -> float:
    """Warm up on a side stream, then capture the loop over ``graph``'s static buffers.
    Returns the seconds spent (device synchronised), which a run's wall time leaves out."""
    start = clock(run.device)
    steps = graph.plan.shape[1] - 1
    stream = torch.cuda.current_stream(run.device)
    side = torch.cuda.Stream(run.device)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        graph_body(sampler, graph, run, range(min(steps, GRAPH_WARMUP_STEPS)))
    stream.wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(cuda_graph):
            graph.out, graph.counts = graph_body(sampler, graph, run, range(steps))
    except RuntimeError as exc:
        # torch.cuda.graph leaves its capture stream current when ending the capture fails
        torch.cuda.set_stream(stream)
        release_default_generator(run.device)
        cause = exc.__context__ if exc.__context__ is not None else exc
        why = str(cause).strip().splitlines()[0] if str(cause).strip() else ""  # CUDA errors append advice lines
        raise CudaGraphError(
            f"cuda_graph=True: the {steps}-step sampling loop could not be captured into a CUDA graph "
            f"({type(cause).__name__}: {why}). A model whose forward pass synchronises with the host "
            f"(.item(), .cpu(), .tolist(), printing a tensor, a Python `if` on a tensor value, a "
            f"data-dependent shape) cannot be captured: remove the synchronisation, or use cuda_graph=False"
        ) from exc
    graph.graph = cuda_graph
    sampler.graph_captures += 1
    return clock(run.device) - start

