"""FusedSampler: run a step plan (or an online policy) through a model with the fused step.

Data flow (docs/DESIGN.md §2): for k = 0..L−2, ε = model(x, t_k) on the whole batch with a
per-sample timestep vector (a v- or x0-prediction turned into ε, :mod:`stepdrop.prediction`), then one ``fused_plan_step`` t_k → t_{k+1} (an online policy's
loop: one ``fused_step``). Samples whose plan has ended are masked (their x is passed
through), never split off the batch. Model calls are counted as they happen, per sample, by
the step kernel: ``SampleStats.nfe`` is a count, not the plan's label.
Nothing in the loop waits for the device (given a generator on the sampling device; a CPU
generator with CUDA tensors reproduces bit for bit but copies each step's noise over); a
non-finite model output is recorded on the device and reported once after the loop, naming
the step and the timestep.

With ``cuda_graph=True`` (docs/DESIGN.md §5) that same loop, unchanged, is captured once into a
``torch.cuda.CUDAGraph`` over static buffers (x_T, the [B, L] plan, the [K, B, …] step noise)
and replayed; a new seed, x_T or plan of the same length is copied into the buffers.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from stepdrop._validation import check_bool, check_choice, check_float, check_int, check_tensor, model_device_dtype
from stepdrop.ops import (
    BACKENDS,
    FLOAT_DTYPES,
    _dispatch,
    _dispatch_plan_step,
    resolve_backend,
    validate_plan_step_inputs,
    validate_step_inputs,
)
from stepdrop.ops.reference import CLEAN
from stepdrop.plan import StepPlan
from stepdrop.prediction import EpsilonView, resolve_prediction_type, to_eps
from stepdrop.policies import OnlinePolicy, StepPolicy, get_policy
from stepdrop.schedule import NoiseSchedule
from stepdrop.solvers import Solver, StepInfo, get_solver

__all__ = ["CudaGraphError", "FusedSampler", "NonFiniteOutputError", "SampleStats"]

_GRAPH_WARMUP_STEPS = 3
"""Eager loop steps run on a side stream before a capture: every step runs the same kernels,
so a few steps initialise what a capture may not (cuBLAS/cuDNN handles and workspaces,
algorithm choice, Triton compilation, allocator pools), as the torch CUDA-graph docs require."""


class NonFiniteOutputError(ValueError):
    """The model returned NaN or Inf; the message names the step and the timestep."""


def _release_default_generator(device: torch.device) -> None:
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


class CudaGraphError(RuntimeError):
    """``cuda_graph=True``, but the sampling loop could not be captured (the message says why)."""


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
            "wall_time_s": self.wall_time_s,
            "images_per_second": self.images_per_second,
            "info": self.info,
        }


PlanLike = StepPlan | StepPolicy | OnlinePolicy | str | Sequence[int] | Tensor


class FusedSampler:
    """Sample a diffusion model with a step plan and the fused update.

    Args:
        model: ``out = model(x, t)`` with t an int64 vector [B]; a diffusers ``UNet2DModel``
            is wrapped automatically. ``out`` means ``prediction_type``.
        schedule: the :class:`~stepdrop.schedule.NoiseSchedule` the model was trained with.
        solver: a name from :data:`stepdrop.solvers.SOLVERS` or a
            :class:`~stepdrop.solvers.Solver`: "ddim" (deterministic for eta=0), "ddpm"
            (posterior q(x_s|x_t, x̂0): DDPM ancestral on a full plan, Markovian skipped-step
            sampling on a sub-plan), the multistep "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"
            (DPM-Solver++, Lu et al. 2022) and "unipc", "unipc_3" (UniPC-bh2 with its corrector,
            Zhao et al. 2023). A multistep solver runs at lower order while its history fills
            and into the clean end (:mod:`stepdrop.solvers.base`).
        eta: DDIM's η ∈ [0, 1] (solver "ddim" only); η = 1 equals "ddpm" when ``clip`` is None
            (with a clip, DDIM keeps the model's ε for the direction while "ddpm" uses x_t, so
            the two differ by the clipped-away part of x̂0).
        clip: clip x̂0 to [−clip, clip] (1.0 for data in [−1, 1]), or None.
        backend: one of :data:`stepdrop.ops.BACKENDS`; "auto" picks the fastest for the device.
        check_finite: record NaN/Inf model outputs on the device and raise after the loop.
        prediction_type: what the model predicts, one of
            :data:`stepdrop.prediction.PREDICTION_TYPES` ("epsilon", "v_prediction", "sample"),
            or None (the default) for the model's own ``prediction_type`` attribute (stepdrop's
            models and adapters carry it), else "epsilon". Each output is turned into ε by
            :func:`stepdrop.prediction.to_eps` in full precision right after the call, so every
            solver, policy, backend and the CUDA graph work with all three.
        cuda_graph: capture the whole K-step loop of a plan (model calls, fused updates, the NFE
            and non-finite counters) into one ``torch.cuda.CUDAGraph`` and replay it, which
            removes the per-kernel launch cost that dominates small models on a GPU. One graph
            per (device, batch, sample shape, plan length L, dtypes, backend, solver settings),
            cached on the sampler; a new seed, x_T or plan (shared or per-sample) of the same
            length is copied into the graph's static buffers and the graph replayed, never
            re-captured (:attr:`graph_captures` counts captures; :meth:`clear_cuda_graphs`
            frees them). Stochastic solvers draw the K steps' noise from ``generator`` into a
            [K, B, C, H, W] buffer before each replay, in the order the eager loop draws it, so
            a replay is bit-identical to ``cuda_graph=False`` with the same seed. The graph reads
            the model's weights where they are: in-place updates (``load_state_dict``) reach the
            next replay, weights moved to new memory (``model.to(...)``) lead to a new capture;
            after replacing a parameter object (``module.weight = nn.Parameter(...)``) call
            :meth:`clear_cuda_graphs`.
            No silent fallback to eager sampling: ``ValueError`` at construction when CUDA is
            unavailable, and at :meth:`sample` for a non-CUDA device, an :class:`OnlinePolicy`
            (its realised length is data-dependent), ``callback`` or ``progress`` (no Python runs
            between replayed steps); :class:`CudaGraphError` when the model cannot be captured
            (it synchronises with the host: ``.item()``, ``.cpu()``, a Python ``if`` on a tensor).

    Attributes:
        graph_captures: number of CUDA graphs this sampler has captured (0 without ``cuda_graph``).

    Example::

        sampler = FusedSampler(model, NoiseSchedule.linear(), solver="ddim")
        images, stats = sampler.sample(16, "uniform", budget=25, generator=torch.Generator().manual_seed(0))
    """

    def __init__(
        self,
        model: Callable[[Tensor, Tensor], Tensor],
        schedule: NoiseSchedule,
        solver: str = "ddim",
        *,
        eta: float = 0.0,
        clip: float | None = None,
        backend: str = "auto",
        check_finite: bool = True,
        prediction_type: str | None = None,
        cuda_graph: bool = False,
    ):
        from stepdrop.models.adapters import as_eps_model

        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a stepdrop.NoiseSchedule, got {type(schedule).__name__}")
        self.model = as_eps_model(model)
        self.prediction_type = resolve_prediction_type(self.model, prediction_type)
        self.schedule = schedule
        self._solver: Solver = get_solver(solver, eta)
        self.solver = self._solver.name
        self.eta = self._solver.eta
        self.clip = None if clip is None else check_float("clip", clip, low=0.0, low_open=True)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.check_finite = check_bool("check_finite", check_finite)
        self.cuda_graph = check_bool("cuda_graph", cuda_graph)
        if self.cuda_graph and not torch.cuda.is_available():
            raise ValueError("cuda_graph=True needs a CUDA device, but torch.cuda.is_available() is False; "
                             "use cuda_graph=False (the default) on the CPU")
        self.graph_captures = 0
        self._graphs: dict[tuple, _PlanGraph] = {}

    @property
    def stochastic(self) -> bool:
        """Whether each step adds fresh noise (σ > 0)."""
        return self._solver.stochastic

    def _step_kwargs(self) -> dict[str, Any]:
        """The fused step's settings: the solver's rule (a multistep solver runs DDIM on the ε it
        rewrites, :mod:`stepdrop.solvers.base`) and the clip."""
        rule = self._solver.rule
        return dict(solver=rule.update, eta=rule.eta, clip=self.clip)

    def clear_cuda_graphs(self) -> None:
        """Drop the cached CUDA graphs and their static buffers (their memory goes back to torch)."""
        self._graphs.clear()

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(
        self,
        noise_or_batch: Tensor | int,
        plan: PlanLike = "uniform",
        *,
        budget: int | None = None,
        generator: torch.Generator | None = None,
        sample_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        callback: Callable[[int, Tensor, Tensor], None] | None = None,
    ) -> tuple[Tensor, SampleStats]:
        """Draw samples.

        Args:
            noise_or_batch: initial noise x_T [B, C, H, W], or a batch size B (noise is drawn
                from ``generator`` with ``sample_shape`` or the model's ``sample_shape``).
            plan: a :class:`StepPlan`, a policy object, a policy name (see
                :data:`stepdrop.policies.POLICIES`), or a list of model-call timesteps.
            budget: model calls per sample K ∈ [1, T], needed when ``plan`` is a policy.
            generator: seeds the initial noise, per-step noise and stochastic plans; with a
                CPU generator, a run reproduces bit for bit.
            sample_shape: (C, H, W) when ``noise_or_batch`` is an int and the model has none.
            device: where to sample when ``noise_or_batch`` is an int (default: the model's).
            progress: show a tqdm bar over the steps (not with ``cuda_graph``).
            callback: ``callback(k, t, x)`` after each step (k, the [B] timesteps just left, x;
                not with ``cuda_graph``).

        Returns:
            (images [B, C, H, W] in the model's data range, :class:`SampleStats`).
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        check_bool("progress", progress)
        # the model's device and dtype, read once per call (never per step)
        model_device, model_dtype = model_device_dtype(self.model, default_device=None)
        batch, shape, dev = self._geometry(noise_or_batch, sample_shape, device, model_device)
        if self.cuda_graph:
            dev = _check_graphable(dev, progress, callback)
        run = _Run.make(dev, model_dtype, self.backend, self.schedule, generator)
        # the plan is drawn before the noise, so a per-sample plan does not depend on the batch size
        plan_obj = self._resolve_plan(plan, budget, batch, shape, generator)
        if self.cuda_graph and isinstance(plan_obj, OnlinePolicy):
            raise ValueError(
                f"cuda_graph=True needs a plan of fixed length, but policy {plan_obj.name!r} is an OnlinePolicy that "
                f"picks each next timestep from the model output (its number of steps is data-dependent); "
                f"use cuda_graph=False or a StepPolicy / StepPlan"
            )
        if isinstance(noise_or_batch, Tensor):
            x = noise_or_batch.to(run.state_dtype)
        else:
            x = self._randn((batch, *shape), run)
        if isinstance(plan_obj, OnlinePolicy):
            return self._sample_online(x, plan_obj, budget, run, progress, callback)
        if self.cuda_graph:
            return self._sample_graph(x, plan_obj, run)
        return self._sample_plan(x, plan_obj, run, progress, callback)

    # ------------------------------------------------------------------ loops
    def _sample_plan(self, x, plan: StepPlan, run: "_Run", progress, callback):
        B, shape = x.shape[0], x.shape
        ts = plan.expand(B).to(x.device, non_blocking=True)
        counts = _Counters(B, plan.length - 1, x.device, self.check_finite)
        noise_at = (lambda k: self._randn(shape, run)) if self.stochastic else (lambda k: None)
        start = _clock(x.device)
        x = self._run_plan(x, ts, _steps(plan.length - 1, progress, plan.policy), noise_at, counts, run, callback)
        wall = _clock(x.device) - start
        counts.raise_if_nonfinite(ts)
        return x, self._stats(counts, plan, ts, wall, run.backend)

    def _run_plan(self, x, ts, steps: Iterable[int], noise_at: Callable[[int], Tensor | None],
                  counts: "_Counters", run: "_Run", callback) -> Tensor:
        """The loop shared by eager sampling and the CUDA-graph capture, over a [B, L] plan ``ts``.

        Step k: ε = model(x, t) on the whole batch with t = max(ts[:, k], 0), then one
        :func:`stepdrop.ops.fused_plan_step`, which in a single launch updates ts[:, k] → ts[:, k+1]
        (samples whose row has ended, ts[b, k] = CLEAN, are masked, not branched on) and does the
        bookkeeping: nfe += active, and the next step's t and active, written in place. Sync-free:
        the plan is read on the device and k reaches the kernel as an argument."""
        t = ts[:, 0].clamp(min=0)  # the model's timesteps and the active mask, rewritten by each step
        active = ts[:, 0] >= 0
        solver = self._solver
        memory = solver.start(x)
        for k in steps:
            eps = self._evaluate(x, t, k, counts, run)
            if solver.history:  # steps left per sample, this one included: the multistep order's cap
                info = StepInfo(k, run.table, t, ts[:, k + 1], active, (ts[:, k:] >= 0).sum(1))
                x, eps = solver.prepare(x, eps, info, memory)
            kwargs = dict(noise=noise_at(k), **self._step_kwargs(), nfe=counts.nfe, t_next=t, active_next=active)
            if k == 0:  # the loop's tensors keep their shapes, dtypes and devices: check them once
                validate_plan_step_inputs(x, eps, run.table, ts, k, **kwargs)
            x = _dispatch_plan_step(run.backend, x, eps, run.table, ts, k, **kwargs)
            if callback is not None:
                callback(k, ts[:, k], x)
        return x

    def _sample_graph(self, x, plan: StepPlan, run: "_Run"):
        """Replay (capturing first if needed) the CUDA graph of this run's signature."""
        B = x.shape[0]
        ts = plan.expand(B)
        # shared and per-sample plans run the same masked loop: one graph serves both
        key = (run.device, tuple(x.shape), plan.length, run.state_dtype, run.model_dtype, run.backend, self._solver,
               self.clip, self.check_finite)
        graph = self._graphs.get(key)
        if graph is None or graph.weights_moved():  # a new signature, or model.to(...) since the capture
            graph = _PlanGraph.allocate(x, plan.length, self.stochastic, self.model)
        with torch.cuda.device(run.device):  # replay launches on the current device's stream
            start = _clock(run.device)
            self._load_graph_inputs(graph, x, ts, run)
            capture_s = 0.0
            if graph.graph is None:
                capture_s = self._capture(graph, run)
                self._graphs[key] = graph
            graph.graph.replay()
            images = graph.out.clone()  # the static output is overwritten by the next replay
            wall = _clock(run.device) - start - capture_s
        graph.counts.raise_if_nonfinite(ts)
        stats = self._stats(graph.counts, plan, ts, wall, run.backend)
        stats.info["cuda_graph"] = {"captured_now": capture_s > 0, "capture_s": capture_s}
        return images, stats

    def _load_graph_inputs(self, graph: "_PlanGraph", x: Tensor, ts: Tensor, run: "_Run") -> None:
        """Copy x_T and the [B, L] plan into the static buffers and draw the K steps' noise into
        its buffer, in the eager loop's order (x_T was drawn first, then step 0, 1, …), so the
        same generator state gives the same noise as :meth:`_sample_plan`."""
        graph.x_T.copy_(x)
        graph.plan.copy_(ts)
        if graph.noise is not None:
            for k in range(graph.noise.shape[0]):
                self._randn(x.shape, run, out=graph.noise[k])

    def _graph_body(self, graph: "_PlanGraph", run: "_Run", ks: Iterable[int]) -> tuple[Tensor, "_Counters"]:
        """The loop over ``graph``'s static buffers, as a capture records it: (images, counters)."""
        counts = _Counters(graph.x_T.shape[0], graph.plan.shape[1] - 1, graph.x_T.device, self.check_finite)
        noise_at = (lambda k: graph.noise[k]) if graph.noise is not None else (lambda k: None)
        return self._run_plan(graph.x_T, graph.plan, ks, noise_at, counts, run, None), counts

    def _capture(self, graph: "_PlanGraph", run: "_Run") -> float:
        """Warm up on a side stream, then capture the loop over ``graph``'s static buffers.
        Returns the seconds spent (device synchronised), which a run's wall time leaves out."""
        start = _clock(run.device)
        steps = graph.plan.shape[1] - 1
        stream = torch.cuda.current_stream(run.device)
        side = torch.cuda.Stream(run.device)
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            self._graph_body(graph, run, range(min(steps, _GRAPH_WARMUP_STEPS)))
        stream.wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(cuda_graph):
                graph.out, graph.counts = self._graph_body(graph, run, range(steps))
        except RuntimeError as exc:
            # torch.cuda.graph leaves its capture stream current when ending the capture fails
            torch.cuda.set_stream(stream)
            _release_default_generator(run.device)
            cause = exc.__context__ if exc.__context__ is not None else exc
            why = str(cause).strip().splitlines()[0] if str(cause).strip() else ""  # CUDA errors append advice lines
            raise CudaGraphError(
                f"cuda_graph=True: the {steps}-step sampling loop could not be captured into a CUDA graph "
                f"({type(cause).__name__}: {why}). A model whose forward pass synchronises with the host "
                f"(.item(), .cpu(), .tolist(), printing a tensor, a Python `if` on a tensor value, a "
                f"data-dependent shape) cannot be captured: remove the synchronisation, or use cuda_graph=False"
            ) from exc
        graph.graph = cuda_graph
        self.graph_captures += 1
        return _clock(run.device) - start

    def _sample_online(self, x, policy: OnlinePolicy, budget, run: "_Run", progress, callback):
        B = x.shape[0]
        state = policy.start(self.schedule, budget, B, x.device)
        visited = torch.full((B, budget + 1), CLEAN, dtype=torch.int64, device=x.device)
        t = state["t0"]
        visited[:, 0] = t
        counts = _Counters(B, budget, x.device, self.check_finite)
        solver = self._solver
        memory = solver.start(x)
        start = _clock(x.device)
        for k in _steps(budget, progress, policy.name):
            active = t >= 0
            if x.device.type == "cpu" and not bool(active.any()):  # free on the CPU; a sync on a GPU
                break
            eps = self._evaluate(x, t.clamp(min=0), k, counts, run)
            counts.nfe += active.long()
            s = policy.next_timesteps(state, x, eps, t, active)  # the policy reads the model's own ε
            if solver.history:  # steps left: 1 into the clean end, else bounded by the budget left
                remaining = torch.where(s >= 0, budget - k, 1)
                info = StepInfo(k, run.table, t.clamp(min=0), s, active, remaining)
                x, eps = solver.prepare(x, eps, info, memory)
            noise = self._randn(x.shape, run) if self.stochastic else None
            x = self._update(x, eps, t, s, active, k, run, noise, callback)
            visited[:, k + 1] = torch.where(active, s, visited[:, k + 1])
            t = s
        wall = _clock(x.device) - start
        counts.raise_if_nonfinite(visited)
        realised = StepPlan(visited.cpu(), self.schedule.num_timesteps, policy=policy.name)
        return x, self._stats(counts, realised, visited, wall, run.backend)

    def _evaluate(self, x, t, k, counts, run: "_Run") -> Tensor:
        """ε from model(x, t) on the whole batch (t ≥ 0: the caller clamps a masked sample's t to 0),
        checked for shape, and recorded on the device for the non-finite check. The output is
        turned into ε against the full-precision x (:func:`stepdrop.prediction.to_eps`)."""
        out = self.model(x.to(run.model_dtype), t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, got {got} (step {k})")
        eps = to_eps(out.to(x.dtype), x, run.table, t, self.prediction_type).to(x.dtype)
        counts.check(k, eps)
        return eps

    def _update(self, x, eps, t, s, active, k, run: "_Run", noise, callback) -> Tensor:
        """One fused step t → s of the online loop (noise: this step's z, or None for a
        deterministic solver)."""
        kwargs = dict(noise=noise, active=active, **self._step_kwargs())
        if k == 0:  # the loop's tensors keep their shapes, dtypes and devices: check them once
            validate_step_inputs(x, eps, run.table, t, s, **kwargs)
        x = _dispatch(run.backend, x, eps, run.table, t, s, return_x0=False, **kwargs)
        if callback is not None:
            callback(k, t, x)
        return x

    # ------------------------------------------------------------------ helpers
    def _geometry(self, noise_or_batch, sample_shape, device,
                  model_device: torch.device | None) -> tuple[int, tuple[int, ...], torch.device]:
        """(batch size, sample shape, device) of the run, checked against the model's device
        (``model_device``; None for a model without parameters, which runs anywhere)."""
        if isinstance(noise_or_batch, Tensor):
            check_tensor("noise_or_batch", noise_or_batch, dtypes=FLOAT_DTYPES + (torch.float16, torch.bfloat16),
                         min_ndim=2)
            if noise_or_batch.shape[0] == 0:
                raise ValueError("noise_or_batch must hold at least one sample, got batch size 0")
            if device is not None and torch.device(device) != noise_or_batch.device:
                raise ValueError(f"device={device} disagrees with noise_or_batch on {noise_or_batch.device}")
            if model_device is not None and model_device != noise_or_batch.device:
                raise ValueError(f"noise_or_batch is on {noise_or_batch.device} but the model is on {model_device}")
            return noise_or_batch.shape[0], tuple(noise_or_batch.shape[1:]), noise_or_batch.device
        batch = check_int("noise_or_batch", noise_or_batch, low=1)
        shape = sample_shape if sample_shape is not None else getattr(self.model, "sample_shape", None)
        if shape is None:
            raise ValueError("sample_shape=(C, H, W) is required: the model has no sample_shape attribute")
        if isinstance(shape, (int, str, bytes)) or not hasattr(shape, "__iter__"):
            raise TypeError(f"sample_shape must be a sequence such as (C, H, W), got {type(shape).__name__}")
        shape = tuple(check_int("sample_shape", d, low=1) for d in shape)
        if device is not None:
            return batch, shape, torch.device(device)
        return batch, shape, model_device if model_device is not None else torch.device("cpu")

    @staticmethod
    def _randn(shape, run: "_Run", out: Tensor | None = None) -> Tensor:
        """z ~ N(0, I) in the state dtype on the run's device, from the run's generator; drawn on
        the generator's device (a CPU generator with CUDA tensors reproduces bit for bit but
        copies each draw over). With ``out`` (a CUDA-graph noise buffer) the draw lands there and
        is, element for element, the draw the eager loop makes for the same generator state."""
        gen = run.generator
        gen_dev = gen.device if gen is not None else run.device
        if out is not None and gen_dev == out.device:
            return torch.randn(shape, generator=gen, device=gen_dev, dtype=run.state_dtype, out=out)
        z = torch.randn(shape, generator=gen, device=gen_dev, dtype=run.state_dtype)
        return z.to(run.device) if out is None else out.copy_(z)

    def _resolve_plan(self, plan: PlanLike, budget, batch: int, shape: tuple[int, ...],
                      generator) -> StepPlan | OnlinePolicy:
        T = self.schedule.num_timesteps
        if isinstance(plan, str):
            plan = get_policy(plan)
        if isinstance(plan, StepPlan):
            if plan.num_train_timesteps != T:
                raise ValueError(f"plan was made for T={plan.num_train_timesteps} but the schedule has T={T}")
            if budget is not None:
                raise ValueError("budget is given by the plan itself; pass budget only with a policy")
            return plan
        if isinstance(plan, (list, tuple, Tensor)):
            if budget is not None:
                raise ValueError("budget is given by the timestep list itself; pass budget only with a policy")
            return StepPlan.from_timesteps(plan, T)
        if isinstance(plan, (StepPolicy, OnlinePolicy)):
            if budget is None:
                raise ValueError(f"budget (model calls per sample, in [1, {T}]) is required with policy {plan.name!r}")
            check_int("budget", budget, low=1, high=T)
            if isinstance(plan, OnlinePolicy):
                return plan
            plan_gen = generator if generator is None or generator.device.type == "cpu" else \
                torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
            eps_model = self.model if self.prediction_type == "epsilon" else \
                EpsilonView(self.model, self.schedule.alphas_cumprod, self.prediction_type)
            return plan.plan(self.schedule, budget, batch_size=batch, generator=plan_gen,
                             model=eps_model, sample_shape=shape)
        raise TypeError(
            f"plan must be a StepPlan, a policy, a policy name or a list of timesteps, got {type(plan).__name__}"
        )

    def _stats(self, counts: "_Counters", plan: StepPlan, ts: Tensor, wall: float, backend: str) -> SampleStats:
        B = ts.shape[0]
        return SampleStats(
            nfe=counts.nfe.cpu(),
            model_calls=counts.calls,
            evaluated_samples=counts.calls * B,
            overhead_calls=plan.overhead_calls,
            overhead_samples=plan.overhead_samples,
            wall_time_s=wall,
            timesteps=ts.cpu(),
            policy=plan.policy,
            solver=self.solver,
            eta=self.eta,
            backend=backend,
            info=dict(plan.info),
        )


@dataclass(frozen=True)
class _Run:
    """What one :meth:`FusedSampler.sample` call resolves once, before its loop."""

    device: torch.device
    model_dtype: torch.dtype  # x is cast to it for each model call
    state_dtype: torch.dtype  # dtype of x, the noise and the update (:func:`_state_dtype`)
    backend: str  # concrete fused-step backend (from resolve_backend)
    table: Tensor  # ᾱ [T], float64 on ``device``
    generator: torch.Generator | None

    @classmethod
    def make(cls, device: torch.device, model_dtype: torch.dtype, backend: str, schedule: NoiseSchedule,
             generator: torch.Generator | None) -> "_Run":
        return cls(device, model_dtype, _state_dtype(model_dtype), resolve_backend(backend, device),
                   schedule.table(device, torch.float64), generator)


@dataclass
class _PlanGraph:
    """One captured sampling loop: its static inputs (x_T [B, C, H, W], plan [B, L] int64, step
    noise [K, B, C, H, W] or None) and outputs (images, counters), written by every replay."""

    x_T: Tensor
    plan: Tensor
    noise: Tensor | None
    weights: tuple[Tensor, ...]  # the model's parameters and buffers ...
    addresses: tuple[int, ...]  # ... and where they were at capture: the graph reads them there
    graph: Any = None  # torch.cuda.CUDAGraph once captured
    out: Tensor | None = None
    counts: "_Counters | None" = None

    @classmethod
    def allocate(cls, x: Tensor, length: int, stochastic: bool, model) -> "_PlanGraph":
        noise = x.new_empty((length - 1, *x.shape)) if stochastic else None
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


def _state_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """dtype of x during sampling: float64 for a float64 model, else float32 (a half-precision
    model is fed x in its own dtype; the update always runs in float32 or wider)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def _check_graphable(device: torch.device, progress: bool, callback) -> torch.device:
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


class _Counters:
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


def _steps(n: int, progress: bool, label: str):
    if not progress:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=f"sampling ({label})", unit="step", leave=False)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
