"""FusedSampler: run a step plan (or an online policy) through a model with the fused step.

Data flow (docs/DESIGN.md §2): for k = 0..L−2, ε = model(x, t_k) on the whole batch with a
per-sample timestep vector (a v- or x0-prediction turned into ε,
:mod:`stepdrop.prediction`), then one ``fused_plan_step`` t_k → t_{k+1}. One loop serves
every plan: an online policy runs in it as a per-step hook (:class:`OnlineSteps`) that
writes the plan's next column from the model's output, and a multistep solver as the history
that turns ε into its ε'. Samples whose plan has ended are masked (their x is passed
through), never split off the batch. Model calls are counted as they happen, per sample, by
the step kernel: ``SampleStats.nfe`` is a count, not the plan's label. Nothing in the loop
waits for the device (given a generator on the sampling device; a CPU generator with CUDA
tensors reproduces bit for bit but copies each step's noise over); a non-finite model output
is recorded on the device and reported once after the loop, naming the step and the
timestep.

With ``cuda_graph=True`` (docs/DESIGN.md §5) that same loop, unchanged, is captured once into a
``torch.cuda.CUDAGraph`` over static buffers (x_T, the [B, L] plan, the [K, B, …] step noise)
and replayed; a new seed, x_T or plan of the same length is copied into the buffers.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from stepdrop._validation import check_bool, check_choice, check_float, check_int, check_tensor, model_device_dtype
from stepdrop.cuda_graph import CudaGraphError, PlanGraph, check_graphable, sample_graph
from stepdrop.loop import Counters, NonFiniteOutputError, Run, clock, progress_steps
from stepdrop.ops import (
    BACKENDS,
    FLOAT_DTYPES,
    _dispatch_plan_step,
    validate_plan_step_inputs,
)
from stepdrop.ops.reference import CLEAN, predict_x0
from stepdrop.ops.step_args import PlanOutputs, StepOptions
from stepdrop.plan import StepPlan
from stepdrop.prediction import EpsilonView, resolve_prediction_type, to_eps
from stepdrop.policies import OnlinePolicy, StepPolicy, check_budget, get_policy
from stepdrop.schedule import NoiseSchedule
from stepdrop.solvers import Solver, StepInfo, get_solver
from stepdrop.stats import SampleStats
from stepdrop.variants import CallPlan, ModelCalls, parse_calls, reduced_size, upsample_and_renoise

__all__ = ["CudaGraphError", "FusedSampler", "NonFiniteOutputError", "SampleStats"]


PlanLike = StepPlan | StepPolicy | OnlinePolicy | str | Sequence[int] | Tensor


class OnlineSteps:
    """The per-step hook that runs an :class:`OnlinePolicy` in the plan loop: after the call at
    column k it asks the policy for each active sample's next timestep and writes it into
    column k+1 (finished rows stay :data:`CLEAN`). Returns the steps left per sample for the
    multistep order's cap: 1 into the clean end, else bounded by the budget left."""

    def __init__(self, policy: OnlinePolicy, state: dict[str, Any], budget: int):
        self.policy, self.state, self.budget = policy, state, budget

    def __call__(self, k: int, x: Tensor, eps: Tensor, ts: Tensor) -> Tensor:
        t = ts[:, k]
        active = t >= 0
        s = self.policy.next_timesteps(self.state, x, eps, t, active)  # the policy reads the model's own ε
        ts[:, k + 1] = torch.where(active, s, CLEAN)
        return torch.where(s >= 0, self.budget - k, 1)


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
        calls: how each model call is made (:mod:`stepdrop.variants`, docs/DESIGN.md §4c): a
            :class:`~stepdrop.variants.CallPlan` or its spec suffix, e.g. ``"+mixres(0.5,0.3)"``
            (the first 30 % of the calls at half size, then x̂0 upsampled and re-noised),
            ``"+cache(5)"`` (the whole network every 5th call, the shallow path with the cached
            deep feature in between) or both; None: every call is the full model. With mixed
            resolution, noise given as ``noise_or_batch`` is x_T at the reduced size.
        compile: how the model runs, one of :data:`stepdrop.compiled.COMPILE_MODES`: "none" (as
            given), "channels_last" (a channels-last copy on the CPU) or "inductor"
            (``torch.compile`` of it; the one-time compile cost is reported apart, in
            ``stats.info["compile_s"]`` of the first run). The user's model is never modified.

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
        calls: CallPlan | str | None = None,
        compile: str = "none",
    ):
        from stepdrop.compiled import compile_model
        from stepdrop.models.adapters import as_eps_model

        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a stepdrop.NoiseSchedule, got {type(schedule).__name__}")
        self.model = compile_model(as_eps_model(model), compile)
        self.compile = compile
        if calls is None or isinstance(calls, CallPlan):
            self.calls = calls or CallPlan()
        elif isinstance(calls, str):
            self.calls = parse_calls(calls)
        else:
            raise TypeError(f"calls must be a stepdrop.variants.CallPlan, a spec such as '+mixres(0.5,0.3)' or None, "
                            f"got {type(calls).__name__}")
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
        self._graphs: dict[tuple, PlanGraph] = {}

    @property
    def stochastic(self) -> bool:
        """Whether each step adds fresh noise (σ > 0)."""
        return self._solver.stochastic

    def _step_options(self) -> StepOptions:
        """The fused step's settings for a run, without noise: the solver's rule (a multistep
        solver runs DDIM on the ε it rewrites, :mod:`stepdrop.solvers.base`) and the clip."""
        rule = self._solver.rule
        return StepOptions(None, rule.update, rule.eta, self.clip)

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
        start_shape = shape
        if self.calls.mixres is not None:  # the plan runs at full size; x_T is drawn at the reduced one
            shape, start_shape = self._mixres_shapes(noise_or_batch, shape, sample_shape)
        if not self.calls.plain:
            self.calls.check_model(self.model, shape)
        if self.cuda_graph:
            dev = check_graphable(dev, progress, callback)
        run = Run.make(dev, model_dtype, self.backend, self.schedule, generator, shape)
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
            x = self._randn((batch, *start_shape), run)
        if isinstance(plan_obj, OnlinePolicy):
            return self._sample_online(x, plan_obj, budget, run, progress, callback)
        if self.cuda_graph:
            return sample_graph(self, x, plan_obj, run)
        return self._sample_plan(x, plan_obj, run, progress, callback)

    # ------------------------------------------------------------------ loops
    def _sample_plan(self, x, plan: StepPlan, run: "Run", progress, callback):
        ts = plan.expand(x.shape[0]).to(x.device, non_blocking=True)
        steps = progress_steps(plan.length - 1, progress, plan.policy)
        return self._sample(x, ts, steps, plan, run, callback)

    def _sample_online(self, x, policy: OnlinePolicy, budget, run: "Run", progress, callback):
        """The plan loop on a plan that the policy writes one column ahead (:class:`OnlineSteps`)."""
        B = x.shape[0]
        state = policy.start(self.schedule, budget, B, x.device)
        ts = torch.full((B, budget + 1), CLEAN, dtype=torch.int64, device=x.device)
        ts[:, 0] = state["t0"]
        steps = progress_steps(budget, progress, policy.name)
        return self._sample(x, ts, steps, None, run, callback, OnlineSteps(policy, state, budget), policy.name)

    def _sample(self, x, ts, steps, plan: StepPlan | None, run: "Run", callback, hook=None, policy: str = ""):
        counts = Counters(x.shape[0], ts.shape[1] - 1, x.device, self.check_finite)
        start = clock(x.device)
        x = self._run_plan(x, ts, steps, lambda kind, k, shape: self._randn(shape, run), counts, run, callback, hook)
        wall = clock(x.device) - start
        counts.raise_if_nonfinite(ts)
        if plan is None:  # an online run: its plan is the one it wrote
            plan = StepPlan(ts.cpu(), self.schedule.num_timesteps, policy=policy)
        return x, self._stats(counts, plan, ts, wall, run.backend)

    def noise_draws(self, x_shape: Sequence[int], columns: int,
                    sample_shape: Sequence[int]) -> list[tuple[str, int, tuple[int, ...]]]:
        """The random draws of a loop over ``columns`` plan columns from x_T of ``x_shape``, in the
        order the loop makes them: ("step", k, shape) for a stochastic solver's noise at step k,
        ("switch", k, shape) for the mixed-resolution re-noising after step k. The CUDA-graph
        runner fills its buffers in this order, so a replay sees the eager loop's noise."""
        calls = ModelCalls(self.model, self.calls, columns, sample_shape)
        shape = tuple(x_shape)
        draws = []
        for k in range(columns):
            if self.stochastic:
                draws.append(("step", k, shape))
            if calls.switches_after(k):
                shape = shape[:2] + calls.size_at(k + 1)
                draws.append(("switch", k, shape))
        return draws

    def _run_plan(self, x, ts, steps: Iterable[int], draw: Callable[[str, int, tuple[int, ...]], Tensor],
                  counts: "Counters", run: "Run", callback, hook: "OnlineSteps | None" = None) -> Tensor:
        """The one sampling loop: eager plans, online policies and the CUDA-graph capture, over a
        [B, L] plan ``ts``.

        Step k: ε = model(x, t) on the whole batch with t = max(ts[:, k], 0); then ``hook``, if
        any, writes ts[:, k+1] from the model's own ε (an online policy); then the solver's
        history turns ε into its ε' (a multistep solver); then one
        :func:`stepdrop.ops.fused_plan_step`, which in a single launch updates ts[:, k] → ts[:, k+1]
        (samples whose row has ended, ts[b, k] = CLEAN, are masked, not branched on) and does the
        bookkeeping: nfe += active, and the next step's t and active, written in place. Sync-free
        without a hook: the plan is read on the device and k reaches the kernel as an argument.

        Each call runs column k's variant (:class:`~stepdrop.variants.ModelCalls`); where the
        resolution changes after step k, x̂0 of step k is upsampled and re-noised to the next
        timestep with a fresh draw, and a multistep solver starts its history again. A slimmable
        model runs each call at its column's width and is left at full width.
        ``draw(kind, k, shape)`` gives the step noise ("step") and the switch noise ("switch")."""
        t = ts[:, 0].clamp(min=0)  # the model's timesteps and the active mask, rewritten by each step
        active = ts[:, 0] >= 0
        solver = self._solver
        memory = solver.start(x)
        calls = ModelCalls(self.model, self.calls, ts.shape[1] - 1, run.sample_shape)
        settings, outputs = self._step_options(), PlanOutputs(counts.nfe, t, active)  # fixed for the run
        check_at = 0
        try:
            for k in steps:
                if hook is not None and x.device.type == "cpu" and calls.variants[k].scale == 1.0 and \
                        not bool(active.any()):
                    break  # every online row has ended (and x is at full size): free to see on the CPU
                eps = self._evaluate(calls, x, t, k, counts, run)
                remaining = None if hook is None else hook(k, x, eps, ts)
                if solver.history:  # steps left per sample, this one included: the multistep order's cap
                    if remaining is None:
                        remaining = (ts[:, k:] >= 0).sum(1)
                    info = StepInfo(k, run.table, t, ts[:, k + 1], active, remaining)
                    x, eps = solver.prepare(x, eps, info, memory)
                options = replace(settings, noise=draw("step", k, tuple(x.shape))) if self.stochastic else settings
                if k == check_at:  # the tensors keep their shapes, dtypes and devices until a switch: check once
                    validate_plan_step_inputs(x, eps, run.table, ts, k, options, outputs)
                switch = calls.switches_after(k)
                if switch:  # x̂0 of this step, before the step rewrites t and active in place
                    x0 = torch.where(active.view(-1, *([1] * (x.ndim - 1))),
                                     predict_x0(x, eps, run.table, t, self.clip), x)
                x = _dispatch_plan_step(run.backend, x, eps, run.table, ts, k, options, outputs)
                if switch:
                    size = calls.size_at(k + 1)
                    noise = draw("switch", k, tuple(x.shape[:2]) + size)
                    x = upsample_and_renoise(x0, size, ts[:, k + 1], run.table, noise).to(x.dtype)
                    memory, check_at = solver.start(x), k + 1
                if callback is not None:
                    callback(k, ts[:, k], x)
        finally:
            calls.finish()  # a slimmable model is left at full width, even after an error
        return x

    def _evaluate(self, calls: ModelCalls, x, t, k, counts, run: "Run") -> Tensor:
        """ε from model(x, t) on the whole batch (t ≥ 0: the caller clamps a masked sample's t to 0),
        as column k's variant, checked for shape, and recorded on the device for the non-finite
        check. The output is turned into ε against the full-precision x
        (:func:`stepdrop.prediction.to_eps`)."""
        out = calls(k, x.to(run.model_dtype), t)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, got {got} (step {k})")
        eps = to_eps(out.to(x.dtype), x, run.table, t, self.prediction_type).to(x.dtype)
        counts.check(k, eps)
        return eps

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

    def _mixres_shapes(self, noise_or_batch, shape, sample_shape) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(full sample shape, x_T's reduced shape) of a mixed-resolution run; ValueError if the
        full size is unknown or given noise is not at the reduced size."""
        full = sample_shape if sample_shape is not None else getattr(self.model, "sample_shape", None)
        if full is None:
            raise ValueError("calls with mixres need the full sample_shape=(C, H, W): the model has no sample_shape")
        full = tuple(check_int("sample_shape", d, low=1) for d in full)
        if len(full) != 3:
            raise ValueError(f"calls with mixres need a sample_shape (C, H, W), got {full}")
        start = (full[0], *reduced_size(full, self.calls.mixres.scale))
        if isinstance(noise_or_batch, Tensor) and tuple(shape) != start:
            raise ValueError(f"noise_or_batch must be x_T at the reduced size of {self.calls.mixres.text}, "
                             f"[B, {', '.join(map(str, start))}], got {tuple(noise_or_batch.shape)}")
        return full, start

    @staticmethod
    def _randn(shape, run: "Run", out: Tensor | None = None) -> Tensor:
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
            check_budget(budget, T)
            if isinstance(plan, OnlinePolicy):
                return plan
            plan_gen = generator if generator is None or generator.device.type == "cpu" else \
                torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
            eps_model = self.model if self.prediction_type == "epsilon" else \
                EpsilonView(self.model, self.schedule.alphas_cumprod, self.prediction_type)
            return plan.plan(self.schedule, budget, batch_size=batch, generator=plan_gen,
                             model=eps_model, sample_shape=shape, sampler=self)
        raise TypeError(
            f"plan must be a StepPlan, a policy, a policy name or a list of timesteps, got {type(plan).__name__}"
        )

    def _stats(self, counts: "Counters", plan: StepPlan, ts: Tensor, wall: float, backend: str) -> SampleStats:
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
            variants=tuple(v.label for v in self.calls.variants(ts.shape[1] - 1)),
        )
