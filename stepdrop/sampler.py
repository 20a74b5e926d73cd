"""FusedSampler: run a step plan (or an online policy) through a model with the fused step.

Data flow (DESIGN.md §2): for k = 0..L−2, ε = model(x, t_k) on the whole batch with a
per-sample timestep vector, then one ``fused_step`` t_k → t_{k+1}. Samples whose plan has
ended are masked (their x is passed through), never split off the batch. Model calls are
counted as they happen, per sample: ``SampleStats.nfe`` is a count, not the plan's label.
Nothing in the loop waits for the device (given a generator on the sampling device; a CPU
generator with CUDA tensors reproduces bit for bit but copies each step's noise over); a
non-finite model output is recorded on the device and reported once after the loop, naming
the step and the timestep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from stepdrop._validation import check_bool, check_choice, check_float, check_int, check_tensor, model_device_dtype
from stepdrop.ops import BACKENDS, FLOAT_DTYPES, SOLVERS, _dispatch, resolve_backend, validate_step_inputs
from stepdrop.ops.reference import CLEAN
from stepdrop.plan import StepPlan
from stepdrop.policies import OnlinePolicy, StepPolicy, get_policy
from stepdrop.schedule import NoiseSchedule

__all__ = ["FusedSampler", "NonFiniteOutputError", "SampleStats"]


class NonFiniteOutputError(ValueError):
    """The model returned NaN or Inf; the message names the step and the timestep."""


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
        model: ``eps = model(x, t)`` with t an int64 vector [B]; a diffusers ``UNet2DModel``
            is wrapped automatically. Must predict the noise ε.
        schedule: the :class:`~stepdrop.schedule.NoiseSchedule` the model was trained with.
        solver: "ddim" (deterministic for eta=0) or "ddpm" (posterior q(x_s|x_t, x̂0): DDPM
            ancestral on a full plan, Markovian skipped-step sampling on a sub-plan).
        eta: DDIM's η ∈ [0, 1]; η = 1 equals "ddpm".
        clip: clip x̂0 to [−clip, clip] (1.0 for data in [−1, 1]), or None.
        backend: one of :data:`stepdrop.ops.BACKENDS`; "auto" picks the fastest for the device.
        check_finite: record NaN/Inf model outputs on the device and raise after the loop.

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
    ):
        from stepdrop.models.adapters import as_eps_model

        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a stepdrop.NoiseSchedule, got {type(schedule).__name__}")
        self.model = as_eps_model(model)
        self.schedule = schedule
        self.solver = check_choice("solver", solver, SOLVERS)
        self.eta = check_float("eta", eta, low=0.0, high=1.0)
        self.clip = None if clip is None else check_float("clip", clip, low=0.0, low_open=True)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.check_finite = check_bool("check_finite", check_finite)

    @property
    def stochastic(self) -> bool:
        """Whether each step adds fresh noise (σ > 0)."""
        return self.solver == "ddpm" or self.eta > 0

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
            progress: show a tqdm bar over the steps.
            callback: ``callback(k, t, x)`` after each step (k, the [B] timesteps just left, x).

        Returns:
            (images [B, C, H, W] in the model's data range, :class:`SampleStats`).
        """
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        check_bool("progress", progress)
        batch, shape, dev = self._geometry(noise_or_batch, sample_shape, device)
        backend = resolve_backend(self.backend, dev)
        # the plan is drawn before the noise, so a per-sample plan does not depend on the batch size
        plan_obj = self._resolve_plan(plan, budget, batch, shape, generator)
        if isinstance(noise_or_batch, Tensor):
            x = noise_or_batch.to(self._state_dtype)
        else:
            x = self._randn((batch, *shape), generator, dev)
        if isinstance(plan_obj, OnlinePolicy):
            return self._sample_online(x, plan_obj, budget, generator, backend, progress, callback)
        return self._sample_plan(x, plan_obj, generator, backend, progress, callback)

    # ------------------------------------------------------------------ loops
    def _sample_plan(self, x, plan: StepPlan, generator, backend, progress, callback):
        B = x.shape[0]
        table = self.schedule.table(x.device, torch.float64)
        ts = plan.expand(B).to(x.device, non_blocking=True)
        per_sample = plan.per_sample
        steps = plan.length - 1
        counts = _Counters(B, x.device, self.check_finite)
        start = _clock(x.device)
        for k in _steps(steps, progress, plan.policy):
            t, s = ts[:, k], ts[:, k + 1]
            active = t >= 0 if per_sample else None
            eps = self._evaluate(x, t, active, k, counts)
            x = self._update(x, eps, t, s, active, k, table, generator, backend, callback)
        wall = _clock(x.device) - start
        counts.raise_if_nonfinite(ts)
        return x, self._stats(counts, plan, ts, wall, backend)

    def _sample_online(self, x, policy: OnlinePolicy, budget, generator, backend, progress, callback):
        B = x.shape[0]
        table = self.schedule.table(x.device, torch.float64)
        state = policy.start(self.schedule, budget, B, x.device)
        visited = torch.full((B, budget + 1), CLEAN, dtype=torch.int64, device=x.device)
        t = state["t0"]
        visited[:, 0] = t
        counts = _Counters(B, x.device, self.check_finite)
        start = _clock(x.device)
        for k in _steps(budget, progress, policy.name):
            active = t >= 0
            if x.device.type == "cpu" and not bool(active.any()):  # free on the CPU; a sync on a GPU
                break
            eps = self._evaluate(x, t, active, k, counts)
            s = policy.next_timesteps(state, x, eps, t, active)
            x = self._update(x, eps, t, s, active, k, table, generator, backend, callback)
            visited[:, k + 1] = torch.where(active, s, visited[:, k + 1])
            t = s
        wall = _clock(x.device) - start
        counts.raise_if_nonfinite(visited)
        realised = StepPlan(visited.cpu(), self.schedule.num_timesteps, policy=policy.name)
        return x, self._stats(counts, realised, visited, wall, backend)

    def _evaluate(self, x, t, active, k, counts) -> Tensor:
        """ε = model(x, t) on the whole batch (masked samples see t clamped to 0), counted."""
        eps = self.model(x.to(self._model_dtype), t if active is None else t.clamp(min=0))
        if not isinstance(eps, Tensor) or eps.shape != x.shape:
            got = tuple(eps.shape) if isinstance(eps, Tensor) else type(eps).__name__
            raise ValueError(f"model output must have the shape of x {tuple(x.shape)}, got {got} (step {k})")
        eps = eps.to(x.dtype)
        counts.record(k, eps, active)
        return eps

    def _update(self, x, eps, t, s, active, k, table, generator, backend, callback) -> Tensor:
        noise = self._randn(x.shape, generator, x.device) if self.stochastic else None
        kwargs = dict(noise=noise, active=active, solver=self.solver, eta=self.eta, clip=self.clip)
        if k == 0:  # the loop's tensors keep their shapes, dtypes and devices: check them once
            validate_step_inputs(x, eps, table, t, s, **kwargs)
        x = _dispatch(backend, x, eps, table, t, s, return_x0=False, **kwargs)
        if callback is not None:
            callback(k, t, x)
        return x

    # ------------------------------------------------------------------ helpers
    @property
    def _model_dtype(self) -> torch.dtype:
        return model_device_dtype(self.model)[1]

    @property
    def _state_dtype(self) -> torch.dtype:
        """dtype of x during sampling: float64 for a float64 model, else float32 (a half-precision
        model is fed x in its own dtype; the update always runs in float32 or wider)."""
        return torch.float64 if self._model_dtype == torch.float64 else torch.float32

    def _geometry(self, noise_or_batch, sample_shape, device) -> tuple[int, tuple[int, ...], torch.device]:
        """(batch size, sample shape, device) of the run, checked against the model."""
        model_device = model_device_dtype(self.model)[0]
        if isinstance(noise_or_batch, Tensor):
            check_tensor("noise_or_batch", noise_or_batch, dtypes=FLOAT_DTYPES + (torch.float16, torch.bfloat16),
                         min_ndim=2)
            if noise_or_batch.shape[0] == 0:
                raise ValueError("noise_or_batch must hold at least one sample, got batch size 0")
            if device is not None and torch.device(device) != noise_or_batch.device:
                raise ValueError(f"device={device} disagrees with noise_or_batch on {noise_or_batch.device}")
            has_params = next(iter(self.model.parameters()), None) is not None if hasattr(self.model, "parameters") \
                else False
            if has_params and model_device != noise_or_batch.device:
                raise ValueError(f"noise_or_batch is on {noise_or_batch.device} but the model is on {model_device}")
            return noise_or_batch.shape[0], tuple(noise_or_batch.shape[1:]), noise_or_batch.device
        batch = check_int("noise_or_batch", noise_or_batch, low=1)
        shape = sample_shape if sample_shape is not None else getattr(self.model, "sample_shape", None)
        if shape is None:
            raise ValueError("sample_shape=(C, H, W) is required: the model has no sample_shape attribute")
        if isinstance(shape, (int, str, bytes)) or not hasattr(shape, "__iter__"):
            raise TypeError(f"sample_shape must be a sequence such as (C, H, W), got {type(shape).__name__}")
        shape = tuple(check_int("sample_shape", d, low=1) for d in shape)
        return batch, shape, torch.device(device) if device is not None else model_device

    def _randn(self, shape, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """N(0, I) in the state dtype; drawn on the generator's device (a CPU generator with
        CUDA tensors reproduces bit for bit but copies each draw over)."""
        gen_dev = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=gen_dev, dtype=self._state_dtype).to(device)

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
            return plan.plan(self.schedule, budget, batch_size=batch, generator=plan_gen,
                             model=self.model, sample_shape=shape)
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


class _Counters:
    """Per-sample NFE and the first non-finite step, accumulated on the device."""

    def __init__(self, batch: int, device: torch.device, check_finite: bool):
        self.nfe = torch.zeros(batch, dtype=torch.int64, device=device)
        self.first_bad = torch.full((batch,), -1, dtype=torch.int64, device=device) if check_finite else None
        self.calls = 0

    def record(self, k: int, eps: Tensor, active: Tensor | None) -> None:
        self.calls += 1
        self.nfe += 1 if active is None else active.long()
        if self.first_bad is not None:
            bad = ~torch.isfinite(eps).flatten(1).all(dim=1)
            if active is not None:
                bad &= active
            self.first_bad = torch.where(bad & (self.first_bad < 0), k, self.first_bad)

    def raise_if_nonfinite(self, timesteps: Tensor) -> None:
        if self.first_bad is None or self.first_bad.numel() == 0:
            return
        bad = self.first_bad.cpu()
        if (bad >= 0).any():
            hit = bad.clamp(min=0)
            k = int(bad[bad >= 0].min())
            i = int(((bad == k)).nonzero()[0, 0])
            t = int(timesteps.cpu()[i, hit[i]])
            n = int((bad >= 0).sum())
            raise NonFiniteOutputError(
                f"model output contains NaN or Inf at step {k} (timestep t={t}) for {n} of {bad.numel()} "
                f"samples (first: sample {i})"
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
