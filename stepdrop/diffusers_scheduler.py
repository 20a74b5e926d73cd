"""StepDropScheduler: stepdrop's step policies and fused step behind diffusers' scheduler protocol.

A drop-in scheduler for diffusers pipelines that call ``set_timesteps(n)`` and then
``step(model_output, t, x)`` per model call (``DDPMPipeline``, hand-written loops)::

    from diffusers import DDPMPipeline
    from stepdrop.diffusers_scheduler import StepDropScheduler

    pipe = DDPMPipeline.from_pretrained("google/ddpm-cifar10-32")
    pipe.scheduler = StepDropScheduler.from_config(pipe.scheduler.config, policy="importance")
    images = pipe(num_inference_steps=20).images

``set_timesteps`` builds a :class:`~stepdrop.plan.StepPlan` with a stepdrop policy (budget =
``num_inference_steps``) or from a custom list; ``step`` finds the timestep's *position* in that
plan (no uniform stride is assumed — diffusers' DDIM does, and is wrong on other spacings), takes
the next entry (or the clean end, −1) and runs :func:`stepdrop.ops.fused_step`, the same update
that :class:`stepdrop.FusedSampler` runs (DDIM, Song et al. 2021; DDPM posterior, Ho et al. 2020).

The scalar-timestep protocol gives every sample of a batch the same timestep, so per-sample
plans, policies that probe the model (``gradient_aware``, ``combined``) and the online
``adaptive`` policy are not available here: use :class:`stepdrop.FusedSampler` for them.

diffusers is optional for stepdrop: this module needs it (``pip install 'stepdrop[diffusers]'``),
and nothing else in stepdrop imports this module.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
    from diffusers.utils import BaseOutput
    from diffusers.utils.torch_utils import randn_tensor
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "stepdrop.diffusers_scheduler needs the optional dependency diffusers; install it with "
        "pip install 'stepdrop[diffusers]'"
    ) from exc

from stepdrop._validation import check_bool, check_choice, check_float, check_int, check_tensor
from stepdrop.ops import BACKENDS, FLOAT_DTYPES, fused_step
from stepdrop.ops.reference import CLEAN, q_sample
from stepdrop.plan import StepPlan
from stepdrop.policies import OnlinePolicy, StepPolicy, get_policy
from stepdrop.prediction import check_prediction_type, to_eps
from stepdrop.schedule import NoiseSchedule
from stepdrop.solvers import StepInfo, get_solver

__all__ = ["StepDropScheduler", "StepDropSchedulerOutput"]


@dataclass
class StepDropSchedulerOutput(BaseOutput):
    """Output of :meth:`StepDropScheduler.step` (the fields of diffusers' ``DDPMSchedulerOutput``).

    Attributes:
        prev_sample: x_s, the sample at the next timestep of the plan, [B, C, H, W].
        pred_original_sample: x̂0 predicted at the current timestep (clipped if ``clip_sample``).
    """

    prev_sample: Tensor
    pred_original_sample: Tensor | None = None


class StepDropScheduler(SchedulerMixin, ConfigMixin):
    """Diffusers scheduler that runs a stepdrop step policy with stepdrop's fused step.

    Every constructor argument is config (saved by ``save_config``, reloaded by
    ``from_pretrained``/``from_config``). A config of another diffusers scheduler loads too: its
    β schedule, ``prediction_type`` and ``clip_sample`` carry over, and keys that only choose that
    scheduler's own spacing or variants (``timestep_spacing``, ``steps_offset``,
    ``set_alpha_to_one``, ``variance_type``, ``thresholding``, …) are ignored, as diffusers does.

    Args:
        num_train_timesteps: T, the number of training timesteps (int ≥ 2, default 1000).
        beta_schedule: "linear" (default), "scaled_linear" or "squaredcos_cap_v2", computed as
            diffusers does (:meth:`stepdrop.NoiseSchedule.from_diffusers_config`).
        beta_start, beta_end: β range of the linear schedules (defaults 1e-4, 0.02).
        trained_betas: explicit list of T betas; overrides ``beta_schedule`` (default None).
        policy: a deterministic policy of :data:`stepdrop.policies.POLICIES` — "uniform"
            (default, diffusers' "trailing" spacing), "quadratic", "cosine", "logsnr",
            "importance", "noise_aware" — or a stochastic one ("stepdrop", "stepdrop_exact")
            with ``per_sample=False``; the plan is then drawn in each :meth:`set_timesteps`.
        policy_kwargs: keyword arguments of the policy (a JSON-serialisable dict, default None).
        solver: a name from :data:`stepdrop.solvers.SOLVERS`: "ddim" (default; deterministic
            for eta = 0), "ddpm" (posterior q(x_s|x_t, x̂0)), or a multistep solver
            ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "unipc_3"), whose history of
            data predictions the scheduler keeps between :meth:`step` calls: it starts afresh
            at the plan's first timestep, after :meth:`set_timesteps`, for a new batch shape,
            and whenever a step does not follow the previous one in the plan.
        eta: DDIM's η ∈ [0, 1] (default 0; "ddim" only); :meth:`step` may override it.
        clip_sample: clip x̂0 to [−clip_sample_range, clip_sample_range] (default False).
        clip_sample_range: the clipping bound, > 0 (default 1.0).
        prediction_type: what the model predicts, one of
            :data:`stepdrop.prediction.PREDICTION_TYPES` (default "epsilon"): ε, v
            ("v_prediction") or x0 ("sample"), with diffusers' definitions. :meth:`step` turns
            the output into ε (:func:`stepdrop.prediction.to_eps`) before the fused step.
        backend: fused-step backend, one of :data:`stepdrop.ops.BACKENDS` (default "auto":
            the fastest one for the sample's device; "torch" is the reference).
        plan_seed: seed of the stochastic policies' plans (each :meth:`set_timesteps` then
            draws the same plan); None (default) draws from torch's global RNG unless
            :meth:`set_timesteps` gets a ``generator``.

    Raises:
        ValueError: on an illegal value, including policies this protocol cannot run
            (per-sample plans, ``gradient_aware``, ``combined``, ``adaptive``).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        trained_betas: Sequence[float] | None = None,
        policy: str = "uniform",
        policy_kwargs: dict[str, Any] | None = None,
        solver: str = "ddim",
        eta: float = 0.0,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        prediction_type: str = "epsilon",
        backend: str = "auto",
        plan_seed: int | None = None,
        rescale_betas_zero_snr: bool = False,
    ):
        T = check_int("num_train_timesteps", num_train_timesteps, low=2)
        schedule = NoiseSchedule.from_diffusers_config(self.config)
        if schedule.num_timesteps != T:
            raise ValueError(f"trained_betas has {schedule.num_timesteps} entries but num_train_timesteps={T}")
        self.schedule = schedule
        self.policy = _make_policy(policy, policy_kwargs)
        get_solver(solver, eta)  # checks both
        check_bool("clip_sample", clip_sample)
        check_float("clip_sample_range", clip_sample_range, low=0.0, low_open=True)
        self._clip = float(clip_sample_range) if clip_sample else None
        check_prediction_type(prediction_type)
        check_choice("backend", backend, BACKENDS)
        if plan_seed is not None:
            check_int("plan_seed", plan_seed, low=0)

        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps: Tensor | None = None
        self.plan: StepPlan | None = None
        self._next: dict[int, int] = {}
        self._memory: Any = None  # a multistep solver's (history, next expected t, batch shape, solver name)

    # ------------------------------------------------------------------ schedule views
    @property
    def alphas_cumprod(self) -> Tensor:
        """ᾱ_t, float64 [T] on the CPU (diffusers' training utilities read this attribute)."""
        return self.schedule.alphas_cumprod

    @property
    def betas(self) -> Tensor:
        """β_t, float64 [T] on the CPU."""
        return self.schedule.betas

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ------------------------------------------------------------------ protocol
    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[int] | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        """Build the plan: ``num_inference_steps`` calls placed by the policy, or a custom list.

        Args:
            num_inference_steps: budget K ∈ [1, T] for the configured policy (a stochastic
                "stepdrop" policy in "bernoulli" mode meets it in expectation).
            device: where :attr:`timesteps` lives (default CPU).
            timesteps: custom model-call timesteps instead, strictly decreasing in [0, T−1]
                (e.g. ``[999, 600, 250, 50]``); the clean end −1 is implied.
            generator: CPU ``torch.Generator`` for a stochastic policy's plan (else
                ``plan_seed``, else torch's global RNG).

        Sets :attr:`timesteps` (int64 [K], the model-call timesteps, no terminal),
        :attr:`num_inference_steps` (K) and :attr:`plan` (the :class:`StepPlan`).
        """
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError(
                "pass exactly one of num_inference_steps (a budget for the policy) or timesteps (a custom list)"
            )
        if timesteps is not None:
            ts = torch.as_tensor(timesteps)
            if ts.ndim != 1:
                raise ValueError(
                    f"timesteps must be a 1-D list of model-call timesteps, got shape {tuple(ts.shape)}; "
                    f"per-sample plans need stepdrop.FusedSampler"
                )
            plan = StepPlan.from_timesteps(ts, T)
        else:
            K = check_int("num_inference_steps", num_inference_steps, low=1, high=T)
            if generator is None and self.policy.stochastic and self.config.plan_seed is not None:
                generator = torch.Generator().manual_seed(self.config.plan_seed)
            plan = self.policy.plan(self.schedule, K, generator=generator)
        entries = plan.timesteps.tolist()
        self.plan = plan
        self._next = {t: s for t, s in zip(entries[:-1], entries[1:])}
        self.timesteps = plan.timesteps[:-1].to(device if device is not None else "cpu")
        self.num_inference_steps = len(entries) - 1
        self._memory = None

    def previous_timestep(self, timestep: int | Tensor) -> int:
        """The plan's entry after ``timestep`` (the next one sampled; −1 = the clean end)."""
        if self.plan is None:
            raise ValueError(
                "no plan yet: call set_timesteps(num_inference_steps) or set_timesteps(timesteps=[...]) before step()"
            )
        t = _timestep_value(timestep)
        if t not in self._next:
            raise ValueError(
                f"timestep {t} is not in the plan {self.plan.row(0)}; step() takes the entries of "
                f"scheduler.timesteps as set by set_timesteps()"
            )
        return self._next[t]

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        eta: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        variance_noise: Tensor | None = None,
    ) -> StepDropSchedulerOutput | tuple[Tensor, Tensor]:
        """One transition t → s of the plan, s the entry after t (−1: return x̂0).

        1. s = the plan's next entry after t, found by position (any plan, no stride assumed);
        2. z ~ N(0, I) from ``generator`` (diffusers' ``randn_tensor``) when the step is
           stochastic ("ddpm", "dpmpp_2m_sde", "ddim" with η > 0) and s ≥ 0 (σ = 0 at the clean end);
        3. x̂0 and x_s from :func:`stepdrop.ops.fused_step` with t and s per sample.

        Args:
            model_output: the model's prediction (ε, v or x0: the config's ``prediction_type``),
                [B, ...] like ``sample``.
            timestep: the current timestep, an entry of :attr:`timesteps` (int or one-element
                tensor; a device tensor costs one host synchronisation, as in diffusers).
            sample: x_t, [B, ...]. Computed in float32 (float64 for float64), cast back.
            eta: DDIM's η ∈ [0, 1] for this call (default: the config's).
            generator: ``torch.Generator`` (or one per sample) for z.
            return_dict: return a :class:`StepDropSchedulerOutput` instead of a tuple.
            variance_noise: z itself, [B, ...] (instead of drawing it from ``generator``).

        Returns:
            :class:`StepDropSchedulerOutput` (``prev_sample`` x_s, ``pred_original_sample`` x̂0),
            or the tuple (x_s, x̂0).
        """
        s_value = self.previous_timestep(timestep)
        t_value = _timestep_value(timestep)
        check_tensor("sample", sample, min_ndim=1)
        check_tensor("model_output", model_output)
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output must have the shape of sample {tuple(sample.shape)}, got {tuple(model_output.shape)} "
                f"(a learned-variance model's 2C channels are not supported)"
            )
        if not (sample.dtype.is_floating_point and model_output.dtype.is_floating_point):
            raise TypeError(f"sample and model_output must be floating point, got {sample.dtype}, {model_output.dtype}")
        solver = get_solver(self.config.solver, self.config.eta if eta is None else eta)

        compute = sample.dtype if sample.dtype in FLOAT_DTYPES else torch.float32
        x = sample.to(compute)
        B = x.shape[0]
        t = torch.full((B,), t_value, dtype=torch.int64, device=x.device)
        s = torch.full((B,), s_value, dtype=torch.int64, device=x.device)
        table = self.schedule.table(x.device, torch.float64)
        eps = to_eps(model_output.to(compute), x, table, t, self.config.prediction_type).to(compute)
        if solver.history:
            x, eps = self._multistep(solver, x, eps, table, t, s, t_value)
        noise = None
        if solver.stochastic:
            if s_value == CLEAN:  # σ = 0: no draw, so the generator's stream lines up with diffusers'
                noise = torch.zeros_like(x)
            elif variance_noise is not None:
                check_tensor("variance_noise", variance_noise)
                if variance_noise.shape != sample.shape:
                    raise ValueError(
                        f"variance_noise must have the shape of sample {tuple(sample.shape)}, "
                        f"got {tuple(variance_noise.shape)}"
                    )
                noise = variance_noise.to(x.device, compute)
            else:
                # drawn in the model's dtype, as diffusers' DDPM/DDIM draw it, so the streams agree
                noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=model_output.dtype)
                noise = noise.to(compute)

        x_next, x0 = fused_step(
            x, eps, table, t, s,
            noise=noise, solver=solver.rule.update, eta=solver.rule.eta, clip=self._clip, return_x0=True,
            backend=self.config.backend,
        )
        x_next, x0 = x_next.to(sample.dtype), x0.to(sample.dtype)
        if not return_dict:
            return x_next, x0
        return StepDropSchedulerOutput(prev_sample=x_next, pred_original_sample=x0)

    def _multistep(self, solver, x: Tensor, eps: Tensor, table: Tensor, t: Tensor, s: Tensor,
                   t_value: int) -> tuple[Tensor, Tensor]:
        """The solver's (x, ε') for this step, with its history carried over from the previous
        :meth:`step` when this one follows it in the plan (module docstring of
        :mod:`stepdrop.solvers.base`)."""
        entries = self.plan.timesteps.tolist()
        position = entries.index(t_value)
        memory = self._memory
        if memory is None or memory[1] != t_value or memory[2] != tuple(x.shape) or memory[3] != solver.name \
                or position == 0:
            memory = (solver.start(x), None, tuple(x.shape), solver.name)
        remaining = torch.full_like(t, len(entries) - 1 - position)
        info = StepInfo(position, table, t, s, torch.ones_like(t, dtype=torch.bool), remaining)
        x, eps = solver.prepare(x, eps, info, memory[0])
        self._memory = (memory[0], int(s[0]), memory[2], memory[3])
        return x, eps

    def scale_model_input(self, sample: Tensor, timestep: int | Tensor | None = None) -> Tensor:
        """The model takes x_t unscaled: returns ``sample``."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor | int) -> Tensor:
        """Forward process x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), for training loops.

        Args:
            original_samples: x_0, float [B, ...].
            noise: ε, the shape of ``original_samples``.
            timesteps: int [B] (one per sample), or one timestep for all, in [0, T−1].

        Returns:
            x_t in the dtype of ``original_samples`` (computed in float32, float64 for float64).
        """
        check_tensor("original_samples", original_samples, min_ndim=1)
        check_tensor("noise", noise)
        if noise.shape != original_samples.shape:
            raise ValueError(
                f"noise must have the shape of original_samples {tuple(original_samples.shape)}, "
                f"got {tuple(noise.shape)}"
            )
        device = original_samples.device
        t = torch.as_tensor(timesteps, device=device)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"timesteps must be integers, got dtype {t.dtype}")
        t = t.to(torch.int64).reshape(-1)
        last = self.config.num_train_timesteps - 1
        if t.device.type == "cpu" and t.numel() and (t.min() < 0 or t.max() > last):
            raise ValueError(f"timesteps must be in [0, {last}], got range [{int(t.min())}, {int(t.max())}]")
        return q_sample(original_samples, noise, self.schedule.table(device, torch.float64), t)


def _make_policy(name: str, kwargs: dict[str, Any] | None) -> StepPolicy:
    """The configured policy, or a ValueError if the scalar-timestep protocol cannot run it."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"policy_kwargs must be a dict or None, got {type(kwargs).__name__}")
    policy = get_policy(name, **(kwargs or {}))
    use_sampler = "use stepdrop.FusedSampler(model, schedule).sample(..., plan=...) for it"
    if isinstance(policy, OnlinePolicy):
        raise ValueError(
            f"policy {name!r} chooses each sample's next timestep online from the model's predictions, "
            f"which a diffusers scheduler (plan fixed by set_timesteps) cannot do; {use_sampler}"
        )
    if policy.needs_model:
        raise ValueError(
            f"policy {name!r} probes the model to build its plan, and a diffusers scheduler never sees the "
            f"model; {use_sampler} (or build the plan there and pass its timesteps to set_timesteps(timesteps=...))"
        )
    if getattr(policy, "per_sample", False):
        raise ValueError(
            f"policy {name!r} with per_sample=True gives every sample its own timesteps, which diffusers' "
            f"scalar-timestep protocol cannot express; set per_sample=False or {use_sampler}"
        )
    return policy


def _timestep_value(timestep: int | Tensor) -> int:
    """A single timestep as a Python int (one host sync for a device tensor)."""
    if isinstance(timestep, Tensor):
        if timestep.numel() != 1:
            raise ValueError(
                f"timestep must be a single timestep (int or one-element tensor), got shape {tuple(timestep.shape)}; "
                f"per-sample timesteps need stepdrop.FusedSampler"
            )
        value = timestep.item()
    elif isinstance(timestep, numbers.Real) and not isinstance(timestep, bool):
        value = timestep
    else:
        raise TypeError(f"timestep must be an int or a one-element tensor, got {type(timestep).__name__}")
    if value != int(value):
        raise ValueError(f"timestep must be an integer timestep, got {value}")
    return int(value)
