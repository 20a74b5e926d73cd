"""FusedSampler: counted NFE, per-sample plans with masking, seeded reproducibility, the
initial-noise / plan arguments, agreement with a hand-written reference loop, non-finite
model outputs and argument validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stepdrop import (
    CLEAN,
    Adaptive,
    FusedSampler,
    GradientAware,
    NoiseSchedule,
    NonFiniteOutputError,
    StepPlan,
    StochasticStepDrop,
    Uniform,
    available_backends,
)
from stepdrop.ops.reference import fused_step_reference

SHAPE = (1, 8, 8)
SCHEDULE = NoiseSchedule.linear(1000)
BACKENDS_HERE = available_backends("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class CountingModel(nn.Module):
    """eps = 0.1·w·x + 0.05·sin(t/100): element-wise, so every sample is computed on its own.
    Records each call's timestep vector (unless ``record`` is False: that copy is a host sync,
    which a CUDA-graph capture refuses)."""

    sample_shape = SHAPE
    record = True

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()), requires_grad=False)
        self.calls = 0
        self.ts: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        self.calls += 1
        if self.record:
            self.ts.append(t.detach().cpu().clone())
        return 0.1 * self.w * x + 0.05 * torch.sin(t.to(x.dtype) / 100).view(-1, *([1] * (x.ndim - 1)))


class PoisonModel(CountingModel):
    """Returns ``value`` (NaN/Inf) for the samples whose timestep equals ``at``."""

    def __init__(self, at: int, value: float = float("nan")):
        super().__init__()
        self.at, self.value = at, value

    def forward(self, x, t):
        eps = super().forward(x, t)
        hit = (t == self.at).view(-1, *([1] * (x.ndim - 1)))
        return torch.where(hit, torch.full_like(eps, self.value), eps)


def sampler(model=None, **kw) -> FusedSampler:
    return FusedSampler(model if model is not None else CountingModel(), SCHEDULE, **kw)


# ====================================================================== counted NFE
@pytest.mark.parametrize("policy,K", [("uniform", 10), ("quadratic", 7), ("stepdrop_exact", 12), ("importance", 25)])
def test_shared_plan_nfe_is_counted(policy, K):
    model = CountingModel()
    x, stats = sampler(model).sample(3, policy, budget=K, generator=gen(0))
    assert x.shape == (3, *SHAPE)
    assert stats.nfe.tolist() == [K] * 3
    assert stats.model_calls == model.calls == K
    assert stats.evaluated_samples == K * 3
    assert stats.mean_nfe == K
    # the model saw exactly the plan, whole batch each time
    row = stats.timesteps[0]
    assert torch.equal(stats.timesteps, row.expand(3, -1))
    assert [int(t[0]) for t in model.ts] == [int(v) for v in row[row >= 0]]
    assert all(torch.equal(t, t[:1].expand(3)) for t in model.ts)


def test_bernoulli_shared_plan_nfe_equals_realised_length():
    model = CountingModel()
    pol = StochasticStepDrop()
    plan = pol.plan(SCHEDULE, 20, generator=gen(5))
    x, stats = sampler(model).sample(2, plan, generator=gen(0))
    k = int(plan.num_steps)
    assert stats.nfe.tolist() == [k, k]
    assert stats.model_calls == model.calls == k == plan.length - 1


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_per_sample_plan_nfe_and_timesteps(mode):
    B = 6
    model = CountingModel()
    plan = StochasticStepDrop(mode=mode, per_sample=True).plan(SCHEDULE, 15, batch_size=B, generator=gen(2))
    rows = plan.timesteps
    x, stats = sampler(model).sample(B, plan, generator=gen(0))
    L = plan.length
    assert stats.model_calls == model.calls == L - 1
    assert stats.nfe.tolist() == [int((r >= 0).sum()) for r in rows]
    assert torch.equal(stats.timesteps, rows)
    for i in range(B):
        seen = [int(model.ts[k][i]) for k in range(L - 1) if rows[i, k] >= 0]
        assert seen == plan.row(i), i
    if mode == "bernoulli":
        assert len(set(stats.nfe.tolist())) > 1  # the rows really differ in length here


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("solver,eta", [("ddim", 0.0)])
def test_masked_samples_match_running_alone(backend, solver, eta):
    """A sample whose plan ended is not updated any more: its result equals running it alone
    with its own plan (deterministic DDIM, element-wise model)."""
    B = 5
    rows = StochasticStepDrop(per_sample=True).plan(SCHEDULE, 12, batch_size=B, generator=gen(4)).timesteps
    noise = torch.randn(B, *SHAPE, generator=gen(1))
    s = sampler(solver=solver, eta=eta, backend=backend)
    frames = []
    x, _ = s.sample(noise, StepPlan(rows, 1000), callback=lambda k, t, xk: frames.append(xk.clone()))
    assert len(frames) == rows.shape[1] - 1
    for i in range(B):
        alone, st = s.sample(noise[i : i + 1].clone(), StepPlan.from_timesteps(rows[i][rows[i] >= 0], 1000))
        assert st.nfe.tolist() == [int((rows[i] >= 0).sum())]
        assert torch.equal(x[i], alone[0]), i
        # once row i has reached its terminal, x[i] never changes again
        end = int((rows[i] >= 0).sum())  # the step that moved it to CLEAN is end-1
        for k in range(end, len(frames)):
            assert torch.equal(frames[k][i], frames[end - 1][i]), (i, k)


def test_masked_samples_ignore_nonfinite_output():
    """A model that returns NaN for a masked sample (which sees t clamped to 0) changes nothing."""
    rows = torch.tensor([[999, 500, 100, 30, -1], [999, 400, -1, -1, -1]])
    model = PoisonModel(at=0)
    noise = torch.randn(2, *SHAPE, generator=gen(3))
    x, stats = sampler(model).sample(noise, StepPlan(rows, 1000))
    assert torch.isfinite(x).all()
    assert stats.nfe.tolist() == [4, 2]
    alone, _ = sampler(CountingModel()).sample(noise[1:].clone(), [999, 400])
    assert torch.equal(x[1], alone[0])


@pytest.mark.parametrize("K", [1, 2, 5, 12, 1000])
@pytest.mark.parametrize("signal", ["x0", "eps"])
def test_adaptive_nfe_counted(K, signal):
    B = 4
    model = CountingModel()
    x, stats = sampler(model).sample(B, Adaptive(signal=signal), budget=K, generator=gen(0))
    assert torch.isfinite(x).all()
    ts = stats.timesteps
    assert ts.shape[0] == B
    for r in ts:  # every realised row is a valid plan
        vals = r.tolist()
        k = vals.index(CLEAN)
        assert all(a > b for a, b in zip(vals[:k], vals[1:k])) and all(v == CLEAN for v in vals[k:])
        assert vals[0] == 999
    assert stats.nfe.tolist() == (ts >= 0).sum(1).tolist()
    assert (stats.nfe <= K).all() and (stats.nfe >= 1).all()
    assert (ts != 0).all()  # no call is spent at t = 0, where x̂0 ≈ x_t: a stride that reaches it goes clean
    assert stats.model_calls == model.calls == int(stats.nfe.max())
    for i in range(B):
        seen = [int(model.ts[k][i]) for k in range(model.calls) if ts[i, k] >= 0]
        assert seen == [int(v) for v in ts[i][ts[i] >= 0]], i


def test_gradient_aware_overhead_counted_through_sampler():
    model = CountingModel()
    x, stats = sampler(model).sample(2, GradientAware(pilot_steps=8, pilot_batch=2), budget=10, generator=gen(0))
    assert stats.nfe.tolist() == [10, 10]
    assert stats.overhead_calls == model.calls - stats.model_calls == 16
    assert stats.overhead_samples == 16 * 2


# ====================================================================== reproducibility
CONFIGS = {
    "ddim_eta0": (dict(solver="ddim", eta=0.0), "uniform"),
    "ddim_eta0.5": (dict(solver="ddim", eta=0.5), "uniform"),
    "ddpm": (dict(solver="ddpm"), "uniform"),
    "stepdrop_per_sample": (dict(solver="ddim", eta=0.0), StochasticStepDrop(per_sample=True)),
    "stepdrop_per_sample_ddpm": (dict(solver="ddpm"), StochasticStepDrop(per_sample=True)),
    "adaptive": (dict(solver="ddim", eta=0.0), Adaptive()),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_seed_reproducibility(name):
    kw, plan = CONFIGS[name]
    s = sampler(**kw)
    a, sa = s.sample(4, plan, budget=10, generator=gen(1234))
    b, sb = s.sample(4, plan, budget=10, generator=gen(1234))
    assert torch.equal(a, b)
    assert torch.equal(sa.timesteps, sb.timesteps) and torch.equal(sa.nfe, sb.nfe)
    c, _ = s.sample(4, plan, budget=10, generator=gen(1235))
    assert not torch.allclose(a, c)
    # seeding the global RNG reproduces a run without a generator
    torch.manual_seed(7)
    d, _ = s.sample(4, plan, budget=10)
    torch.manual_seed(7)
    e, _ = s.sample(4, plan, budget=10)
    assert torch.equal(d, e)


@pytest.mark.parametrize("solver,eta", [("ddim", 0.5), ("ddpm", 0.0)])
def test_stochastic_solvers_use_fresh_noise(solver, eta):
    """Same x_T, different generator ⇒ different images (the per-step noise is drawn)."""
    noise = torch.randn(2, *SHAPE, generator=gen(0))
    s = sampler(solver=solver, eta=eta)
    a, _ = s.sample(noise.clone(), "uniform", budget=10, generator=gen(1))
    b, _ = s.sample(noise.clone(), "uniform", budget=10, generator=gen(2))
    assert not torch.allclose(a, b)
    c, _ = sampler(solver="ddim", eta=0.0).sample(noise.clone(), "uniform", budget=10, generator=gen(1))
    d, _ = sampler(solver="ddim", eta=0.0).sample(noise.clone(), "uniform", budget=10, generator=gen(2))
    assert torch.equal(c, d)  # deterministic DDIM ignores the generator once x_T is given


# ====================================================================== arguments
def test_int_batch_uses_model_sample_shape_and_generator():
    class Wide(CountingModel):
        sample_shape = (2, 4, 6)

    s = sampler(Wide())
    x, stats = s.sample(3, "uniform", budget=4, generator=gen(9))
    assert x.shape == (3, 2, 4, 6) and x.dtype == torch.float32
    # the initial noise is the first draw of the generator
    noise = torch.randn(3, 2, 4, 6, generator=gen(9))
    y, _ = s.sample(noise, "uniform", budget=4)
    assert torch.equal(x, y)


def test_noise_tensor_is_x_T():
    noise = torch.randn(2, 1, 5, 7, generator=gen(0))  # not the model's sample_shape
    model = CountingModel()
    x, _ = sampler(model).sample(noise, [999])
    # one DDIM step from T-1 to the clean end returns x̂0 of the given noise
    a = SCHEDULE.alphas_cumprod[999]
    eps = 0.1 * noise.double() + 0.05 * torch.sin(torch.tensor(999.0, dtype=torch.float64) / 100)
    x0 = (noise.double() - (1 - a).sqrt() * eps) / a.sqrt()
    assert x.shape == noise.shape
    assert torch.allclose(x.double(), x0, rtol=1e-5, atol=1e-4)


def test_sample_shape_argument_for_models_without_one():
    def fn(x, t):
        return 0.1 * x

    x, _ = FusedSampler(fn, SCHEDULE).sample(2, "uniform", budget=3, sample_shape=(3, 4, 4), generator=gen(0))
    assert x.shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="sample_shape"):
        FusedSampler(fn, SCHEDULE).sample(2, "uniform", budget=3)


def test_custom_timestep_list_and_plan_object():
    model = CountingModel()
    x, stats = sampler(model).sample(2, [999, 600, 250, 50], generator=gen(0))
    assert stats.nfe.tolist() == [4, 4] and model.calls == 4
    assert [int(t[0]) for t in model.ts] == [999, 600, 250, 50]
    plan = StepPlan.from_timesteps([999, 600, 250, 50], 1000)
    y, st2 = sampler(CountingModel()).sample(2, plan, generator=gen(0))
    assert torch.equal(x, y) and st2.nfe.tolist() == [4, 4]
    z, _ = sampler(CountingModel()).sample(2, torch.tensor([999, 600, 250, 50]), generator=gen(0))
    assert torch.equal(x, z)


def test_budget_rules():
    s = sampler()
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, "uniform")
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, Uniform())
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, Adaptive())
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, Uniform().plan(SCHEDULE, 5), budget=5)
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, [999, 500], budget=2)
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, "uniform", budget=0)
    with pytest.raises(ValueError, match="budget"):
        s.sample(2, "uniform", budget=1001)
    with pytest.raises(TypeError, match="budget"):
        s.sample(2, "uniform", budget=2.0)


# ====================================================================== vs a hand-written loop
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_ddim_uniform_equals_reference_loop(backend):
    B = 3
    noise = torch.randn(B, *SHAPE, generator=gen(42))
    x, stats = sampler(CountingModel(), backend=backend).sample(noise.clone(), "uniform", budget=10)
    assert stats.backend == backend

    ref_model = CountingModel()
    plan = list(range(999, 0, -100)) + [-1]  # trailing uniform, K = 10
    table = SCHEDULE.alphas_cumprod.clone()
    y = noise.clone()
    for t, s in zip(plan, plan[1:]):
        tv = torch.full((B,), t, dtype=torch.int64)
        sv = torch.full((B,), s, dtype=torch.int64)
        y = fused_step_reference(y, ref_model(y, tv), table, tv, sv, solver="ddim", eta=0.0)
    if backend == "torch":
        assert torch.equal(x, y)
    else:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_per_sample_plan_equals_masked_reference_loop(backend):
    rows = torch.tensor([[999, 700, 400, 100, -1], [999, 500, -1, -1, -1], [800, 300, 10, -1, -1]])
    noise = torch.randn(3, *SHAPE, generator=gen(8))
    x, _ = sampler(CountingModel(), backend=backend).sample(noise.clone(), StepPlan(rows, 1000))
    m = CountingModel()
    table = SCHEDULE.alphas_cumprod.clone()
    y = noise.clone()
    for k in range(rows.shape[1] - 1):
        t, s = rows[:, k], rows[:, k + 1]
        active = t >= 0
        eps = m(y, t.clamp(min=0))
        y = fused_step_reference(y, eps, table, t, s, active=active, solver="ddim")
    if backend == "torch":
        assert torch.equal(x, y)
    else:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


# ====================================================================== non-finite output
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_output_names_step_and_timestep(value):
    model = PoisonModel(at=499, value=value)
    with pytest.raises(NonFiniteOutputError) as err:
        sampler(model).sample(2, [999, 700, 499, 100], generator=gen(0))
    assert isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "step 2" in msg and "499" in msg, msg


def test_nonfinite_output_per_sample_names_the_sample_timestep():
    rows = torch.tensor([[999, 700, 100, -1], [999, 499, -1, -1]])
    with pytest.raises(NonFiniteOutputError) as err:
        sampler(PoisonModel(at=499)).sample(2, StepPlan(rows, 1000), generator=gen(0))
    msg = str(err.value)
    assert "step 1" in msg and "499" in msg and "sample 1" in msg, msg


@pytest.mark.parametrize("policy", [Adaptive(), StochasticStepDrop(per_sample=True)])
def test_nonfinite_output_online_and_per_sample(policy):
    """NaN for every t < 500: the error names the first step at which some sample got there."""

    class Below(CountingModel):
        def forward(self, x, t):
            eps = super().forward(x, t)
            return torch.where((t < 500).view(-1, 1, 1, 1), torch.full_like(eps, float("nan")), eps)

    # the run is identical to a finite one up to that step, so the finite run tells which it is
    _, st = sampler(CountingModel()).sample(3, policy, budget=10, generator=gen(0))
    ts = st.timesteps
    hits = (ts >= 0) & (ts < 500)
    k = int(hits.any(0).nonzero()[0, 0])
    i = int(hits[:, k].nonzero()[0, 0])
    with pytest.raises(NonFiniteOutputError) as err:
        sampler(Below()).sample(3, policy, budget=10, generator=gen(0))
    msg = str(err.value)
    assert f"step {k} " in msg and f"t={int(ts[i, k])}" in msg, (msg, k, ts[:, k])


def test_nonfinite_check_can_be_disabled():
    x, _ = sampler(PoisonModel(at=499), check_finite=False).sample(1, [999, 499], generator=gen(0))
    assert not torch.isfinite(x).all()


@pytest.mark.parametrize("bad", ["shape", "batch", "tuple"])
def test_wrong_model_output_raises(bad):
    class Bad(CountingModel):
        def forward(self, x, t):
            eps = super().forward(x, t)
            if bad == "shape":
                return eps[..., :4]
            if bad == "batch":
                return eps[:1]
            return (eps,)

    with pytest.raises(ValueError, match="shape"):
        sampler(Bad()).sample(2, "uniform", budget=3, generator=gen(0))


# ====================================================================== bad input
@pytest.mark.parametrize(
    "arg,exc,match",
    [
        (0, ValueError, "noise_or_batch"),
        (-2, ValueError, "noise_or_batch"),
        (2.0, TypeError, "noise_or_batch"),
        (True, TypeError, "noise_or_batch"),
        ("4", TypeError, "noise_or_batch"),
        (torch.randn(8), ValueError, "noise_or_batch"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.int64), TypeError, "noise_or_batch"),
    ],
)
def test_bad_noise_or_batch(arg, exc, match):
    with pytest.raises(exc, match=match):
        sampler().sample(arg, "uniform", budget=3, generator=gen(0))


@pytest.mark.parametrize("bad", [42, "seed", torch.Generator])
def test_bad_generator(bad):
    with pytest.raises(TypeError, match="generator"):
        sampler().sample(2, "uniform", budget=3, generator=bad)


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        (dict(solver="euler"), ValueError, "solver"),
        (dict(backend="metal"), ValueError, "backend"),
        (dict(eta=1.5), ValueError, "eta"),
        (dict(eta=-0.1), ValueError, "eta"),
        (dict(eta="0.5"), TypeError, "eta"),
        (dict(clip=0.0), ValueError, "clip"),
        (dict(clip=-1.0), ValueError, "clip"),
        (dict(check_finite=1), TypeError, "check_finite"),
        (dict(cuda_graph=1), TypeError, "cuda_graph"),
        (dict(cuda_graph="yes"), TypeError, "cuda_graph"),
    ],
)
def test_bad_sampler_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        sampler(**kw)


def test_bad_schedule_and_plan():
    with pytest.raises(TypeError, match="schedule"):
        FusedSampler(CountingModel(), SCHEDULE.alphas_cumprod)
    with pytest.raises(TypeError, match="schedule"):
        FusedSampler(CountingModel(), "linear")
    plan50 = Uniform().plan(NoiseSchedule.linear(50), 5)
    with pytest.raises(ValueError, match="T=50"):
        sampler().sample(2, plan50)
    with pytest.raises(ValueError, match="policy"):
        sampler().sample(2, "nope", budget=3)
    with pytest.raises(TypeError, match="plan"):
        sampler().sample(2, 3.5)
    with pytest.raises(ValueError, match="rows"):  # per-sample plan for another batch size
        sampler().sample(3, StepPlan(torch.tensor([[999, -1], [500, -1]]), 1000))
    with pytest.raises(ValueError, match="timesteps"):
        sampler().sample(2, [999, 1000])


def test_half_precision_model_samples_in_a_float32_state():
    from stepdrop import TinyUNet

    torch.manual_seed(0)
    model = TinyUNet(in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=(), image_size=8).to(torch.bfloat16)
    sampler = FusedSampler(model, NoiseSchedule.linear(20))
    images, stats = sampler.sample(3, "uniform", budget=4, generator=torch.Generator().manual_seed(0))
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
    assert stats.nfe.tolist() == [4, 4, 4]
    # bf16 noise is accepted too and gives the same run as its float32 value
    noise = torch.randn(2, 1, 8, 8).to(torch.bfloat16)
    a, _ = sampler.sample(noise, "uniform", budget=4)
    b, _ = sampler.sample(noise.float(), "uniform", budget=4)
    assert torch.equal(a, b)


def test_geometry_errors_name_the_argument():
    from stepdrop import TinyUNet

    model = TinyUNet(in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=(), image_size=8)
    sampler = FusedSampler(model, NoiseSchedule.linear(20))
    with pytest.raises(ValueError, match="device=meta disagrees with noise_or_batch"):
        sampler.sample(torch.randn(2, 1, 8, 8), "uniform", budget=2, device="meta")
    with pytest.raises(TypeError, match="sample_shape must be a sequence"):
        FusedSampler(lambda x, t: x, NoiseSchedule.linear(20)).sample(2, "uniform", budget=2, sample_shape=4)


def test_per_sample_plan_does_not_depend_on_batch_size_through_the_sampler():
    """The sampler draws the plan before the noise: row i is the same at any batch size."""
    model = lambda x, t: 0.1 * x  # noqa: E731
    sampler = FusedSampler(model, NoiseSchedule.linear(100))
    policy = StochasticStepDrop(per_sample=True)
    rows = {}
    for batch in (2, 5):
        _, stats = sampler.sample(batch, policy, budget=10, sample_shape=(1, 4, 4),
                                  generator=torch.Generator().manual_seed(0))
        rows[batch] = stats.timesteps
    assert torch.equal(rows[2][:, : rows[2].shape[1]], rows[5][:2, : rows[2].shape[1]])
    assert (rows[5][:2, rows[2].shape[1]:] == -1).all()
