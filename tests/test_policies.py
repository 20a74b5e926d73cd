"""Step policies (docs/DESIGN.md §4): every plan is a valid StepPlan of the promised size, the
spacings have the shapes the papers describe, stochastic plans are reproducible from a seed,
and bad input fails with an error that names the argument."""

from __future__ import annotations

import math
import tempfile

import pytest
import numpy as np
import torch
from torch import nn

from stepdrop import (
    CLEAN,
    FusedSampler,
    POLICIES,
    Cosine,
    CustomTimesteps,
    GradientAware,
    Importance,
    LogSNRUniform,
    NoiseAware,
    NoiseSchedule,
    Quadratic,
    StepPlan,
    StochasticStepDrop,
    Uniform,
    get_policy,
)
from stepdrop.policies import PROFILES

SCHEDULES = {
    "linear1000": NoiseSchedule.linear(1000),
    "cosine1000": NoiseSchedule.cosine(1000),
    "linear50": NoiseSchedule.linear(50),
}
BUDGETS = {1000: [1, 2, 10, 25, 50, 999, 1000], 50: [1, 2, 10, 25, 49, 50]}
UPFRONT = [name for name in POLICIES if name != "adaptive"]
# (policy, T, K) combinations that are legitimately invalid, with the documented error.
# (None at present: every up-front policy accepts every K in [1, T].)
KNOWN_INVALID: dict[tuple[str, int, int], str] = {}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class WindowModel(nn.Module):
    """eps = a(t)·x, a linear map whose Jacobian is a(t)·I: |a| = ``big`` on [lo, hi], ``small``
    elsewhere. float64 (through its parameter), so finite differences are exact to ~1e-10.
    Counts its calls."""

    def __init__(self, lo: int = 400, hi: int = 600, big: float = -4.0, small: float = 0.2):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)
        self.lo, self.hi, self.big, self.small = lo, hi, big, small
        self.calls = 0

    def a(self, t: torch.Tensor) -> torch.Tensor:
        inside = (t >= self.lo) & (t <= self.hi)
        return torch.where(inside, torch.full(t.shape, self.big, dtype=torch.float64),
                           torch.full(t.shape, self.small, dtype=torch.float64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        return self.scale * self.a(t.cpu()).to(x).view(-1, *([1] * (x.ndim - 1))) * x


def make_plan(name: str, schedule: NoiseSchedule, K: int, seed: int = 0, **kwargs) -> StepPlan:
    if name == "optimized":  # searched for the sampler that runs it: a short search, cached nowhere shared
        settings = dict(pilot_batch=1, reference_steps=20, max_evals=3, cache_dir=tempfile.mkdtemp(), progress=False)
        model = WindowModel()
        return get_policy(name, **{**settings, **kwargs}).plan(schedule, K, model=model, sample_shape=(1, 4, 4),
                                                                 sampler=FusedSampler(model, schedule))
    policy = get_policy(name, **kwargs)
    if policy.needs_model:
        return policy.plan(schedule, K, generator=gen(seed), model=WindowModel(), sample_shape=(1, 4, 4))
    return policy.plan(schedule, K, generator=gen(seed))


def assert_valid_row(row: torch.Tensor, T: int) -> int:
    """Independent check of the plan invariants for one row; returns its model-call count."""
    assert row.dtype == torch.int64 and row.ndim == 1
    vals = row.tolist()
    assert vals[0] >= 0, vals
    assert vals[-1] == CLEAN, vals
    k = vals.index(CLEAN)
    calls = vals[:k]
    assert all(v == CLEAN for v in vals[k:]), f"values after the terminal: {vals}"
    assert all(0 <= v <= T - 1 for v in calls), vals
    assert all(a > b for a, b in zip(calls, calls[1:])), f"not strictly decreasing: {vals}"
    return len(calls)


def gaps(plan: StepPlan) -> list[int]:
    r = plan.row()
    return [a - b for a, b in zip(r, r[1:])]


# ====================================================================== plan invariants
def _cases():
    for sname, sched in SCHEDULES.items():
        for K in BUDGETS[sched.num_timesteps]:
            for name in UPFRONT:
                yield pytest.param(name, sname, K, id=f"{name}-{sname}-K{K}")


@pytest.mark.parametrize("name,sname,K", list(_cases()))
def test_plan_invariants_and_size(name, sname, K):
    schedule = SCHEDULES[sname]
    T = schedule.num_timesteps
    if (name, T, K) in KNOWN_INVALID:
        with pytest.raises(ValueError, match=KNOWN_INVALID[(name, T, K)]):
            make_plan(name, schedule, K)
        return
    plan = make_plan(name, schedule, K)
    assert isinstance(plan, StepPlan)
    assert plan.num_train_timesteps == T
    assert plan.per_sample == (name == "stepdrop_per_sample")  # a plan per sample even for a batch of 1
    timesteps = plan.timesteps[0] if plan.per_sample else plan.timesteps
    calls = assert_valid_row(timesteps, T)
    if name in ("stepdrop", "stepdrop_per_sample"):  # bernoulli: the count varies around K (test_bernoulli_mean_count)
        assert calls >= 1
        assert calls == int(plan.num_steps.max())
    else:
        assert plan.timesteps.shape == (K + 1,)
        assert calls == K == int(plan.num_steps)
    if name in ("uniform", "quadratic", "cosine", "stepdrop", "stepdrop_exact", "stepdrop_per_sample", "noise_aware",
                "logsnr", "importance", "gradient_aware", "combined"):
        # every spacing is "trailing": sampling starts from pure noise at T-1
        assert plan.row()[0] == T - 1


@pytest.mark.parametrize("T,K", [(1000, K) for K in (2, 10, 25, 50, 999, 1000)] + [(50, K) for K in (2, 10, 25, 49, 50)])
def test_bernoulli_mean_count(T, K):
    """Bernoulli StepDrop keeps K steps in expectation: mean over seeds within 5 binomial σ."""
    schedule = NoiseSchedule.linear(T)
    policy = StochasticStepDrop()
    _, drop, _ = policy.drop_probabilities(schedule, K)
    var = float((drop * (1 - drop)).sum())
    n_seeds = 200
    counts = []
    for seed in range(n_seeds):
        plan = policy.plan(schedule, K, generator=gen(seed))
        counts.append(assert_valid_row(plan.timesteps, T))
    mean = sum(counts) / n_seeds
    tol = 5 * math.sqrt(var / n_seeds) + 1e-9
    assert abs(mean - K) <= tol, (mean, K, tol)
    assert plan.info["expected_steps"] == pytest.approx(K, abs=1e-9)


@pytest.mark.parametrize("K", [1, 2, 10, 25, 50, 999, 1000])
def test_per_sample_rows_valid(K):
    schedule = SCHEDULES["linear1000"]
    for mode in ("bernoulli", "exact"):
        plan = StochasticStepDrop(mode=mode, per_sample=True).plan(schedule, K, batch_size=5, generator=gen(3))
        assert plan.per_sample and plan.timesteps.shape[0] == 5
        counts = [assert_valid_row(r, 1000) for r in plan.timesteps]
        assert plan.num_steps.tolist() == counts
        assert plan.length == max(counts) + 1  # padded to the longest row, no further
        if mode == "exact":
            assert counts == [K] * 5


# ====================================================================== uniform vs diffusers
@pytest.mark.parametrize("T,K", [(1000, K) for K in (1, 2, 3, 7, 10, 25, 33, 49, 50, 100, 250, 999, 1000)]
                         + [(50, K) for K in (1, 2, 3, 7, 10, 25, 33, 49, 50)])
def test_uniform_matches_diffusers_trailing(T, K):
    from diffusers import DDIMScheduler

    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ref.set_timesteps(K)
    plan = Uniform().plan(NoiseSchedule.linear(T), K)
    assert torch.equal(plan.timesteps[:-1], ref.timesteps.to(torch.int64)), (plan.row(), ref.timesteps.tolist())
    assert int(plan.timesteps[-1]) == CLEAN


# ====================================================================== reproducibility
STOCHASTIC = {
    "stepdrop": dict(),
    "stepdrop_exact": dict(),
    "stepdrop_linear": dict(profile="linear"),
    "stepdrop_exact_cosine": dict(mode="exact", profile="cosine"),
}


@pytest.mark.parametrize("label", list(STOCHASTIC))
@pytest.mark.parametrize("per_sample", [False, True])
def test_same_seed_same_plan_different_seed_different(label, per_sample):
    kw = dict(STOCHASTIC[label])
    if label.startswith("stepdrop_exact"):
        kw["mode"] = "exact"
    schedule = SCHEDULES["linear1000"]
    policy = StochasticStepDrop(per_sample=per_sample, **kw)
    B = 4
    a = policy.plan(schedule, 25, batch_size=B, generator=gen(7))
    b = policy.plan(schedule, 25, batch_size=B, generator=gen(7))
    assert torch.equal(a.timesteps, b.timesteps)
    others = [policy.plan(schedule, 25, batch_size=B, generator=gen(s)).timesteps for s in (8, 9, 10)]
    assert any(o.shape != a.timesteps.shape or not torch.equal(o, a.timesteps) for o in others)
    # global-RNG fallback (generator=None) is reproducible from torch.manual_seed
    torch.manual_seed(123)
    c = policy.plan(schedule, 25, batch_size=B)
    torch.manual_seed(123)
    d = policy.plan(schedule, 25, batch_size=B)
    assert torch.equal(c.timesteps, d.timesteps)


def test_gradient_aware_same_seed_same_plan():
    schedule = SCHEDULES["linear1000"]
    # a nonlinear model, so that the pilot's random probes matter
    class Tanh(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor(2.0), requires_grad=False)

        def forward(self, x, t):
            return torch.tanh(self.w * x * (1 + t.view(-1, 1, 1, 1) / 500))

    m = Tanh()
    pol = GradientAware(lam=2.0)
    a = pol.plan(schedule, 20, generator=gen(1), model=m, sample_shape=(1, 4, 4))
    b = pol.plan(schedule, 20, generator=gen(1), model=m, sample_shape=(1, 4, 4))
    assert torch.equal(a.timesteps, b.timesteps)
    assert a.info["pilot_g"] == b.info["pilot_g"]
    c = pol.plan(schedule, 20, generator=gen(2), model=m, sample_shape=(1, 4, 4))
    assert c.info["pilot_g"] != a.info["pilot_g"]


@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_per_sample_rows_differ_and_do_not_depend_on_batch_size(mode):
    schedule = SCHEDULES["linear1000"]
    policy = StochasticStepDrop(mode=mode, per_sample=True)
    p3 = policy.plan(schedule, 20, batch_size=3, generator=gen(11))
    p8 = policy.plan(schedule, 20, batch_size=8, generator=gen(11))
    rows8 = [p8.row(i) for i in range(8)]
    assert len({tuple(r) for r in rows8}) > 1, "per-sample plans are all the same"
    for i in range(3):
        assert p3.row(i) == rows8[i], i
        # same row apart from the -1 padding to each plan's length
        n = len(rows8[i])
        assert torch.equal(p3.timesteps[i, :n], p8.timesteps[i, :n])
        assert (p3.timesteps[i, n:] == CLEAN).all() and (p8.timesteps[i, n:] == CLEAN).all()


# ====================================================================== drop profiles
@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("mode", ["bernoulli", "exact"])
def test_boundary_steps_always_kept(profile, mode):
    schedule = SCHEDULES["linear1000"]
    policy = StochasticStepDrop(p=1.0, profile=profile, mode=mode, base_steps=40, boundary=0.1)
    base = Uniform().plan(schedule, 40).row()
    nb = 4  # round(0.1 * 40)
    must = set(base[:nb] + base[-nb:])
    for seed in range(60):
        row = set(policy.plan(schedule, 12, generator=gen(seed)).row())
        assert must <= row, (seed, sorted(must - row))
        assert row <= set(base)  # only base-grid steps


def _drop_frequencies(policy, schedule, K, n_seeds):
    base = None
    dropped = None
    for seed in range(n_seeds):
        plan = policy.plan(schedule, K, generator=gen(seed))
        if base is None:
            base = policy.drop_probabilities(schedule, K)[0].tolist()
            dropped = torch.zeros(len(base))
        kept = set(plan.row())
        dropped += torch.tensor([b not in kept for b in base], dtype=torch.float32)
    return torch.tensor(base), dropped / n_seeds


@pytest.mark.parametrize("profile", ["linear", "cosine", "quadratic"])
def test_profiles_drop_middle_more_than_ends(profile):
    schedule = SCHEDULES["linear1000"]
    n_seeds = 400
    policy = StochasticStepDrop(p=0.9, profile=profile, base_steps=40, boundary=0.05)
    base, freq = _drop_frequencies(policy, schedule, 20, n_seeds)
    u = base.double() / 999
    middle = (u > 0.35) & (u < 0.65)
    near_ends = ((u > 0.05) & (u < 0.2)) | ((u > 0.8) & (u < 0.95))
    assert middle.any() and near_ends.any()
    assert freq[middle].mean() > freq[near_ends].mean() + 0.15, (freq[middle].mean(), freq[near_ends].mean())
    # and each frequency matches p·f(u) (0 at the boundary) within 5 binomial σ
    _, drop, p = policy.drop_probabilities(schedule, 20)
    assert p == 0.9
    nb = 2  # round(0.05 * 40)
    f = PROFILES[profile](u)
    expect = 0.9 * f
    expect[:nb] = 0
    expect[-nb:] = 0
    assert torch.allclose(drop, expect, atol=1e-12)
    sigma = (expect * (1 - expect) / n_seeds).sqrt()
    assert ((freq.double() - expect).abs() <= 5 * sigma + 1e-9).all(), (freq, expect)


def test_constant_profile_drops_evenly():
    schedule = SCHEDULES["linear1000"]
    policy = StochasticStepDrop(p=0.5, profile="constant", base_steps=30, boundary=0.1)
    base, freq = _drop_frequencies(policy, schedule, 10, 300)
    nb = 3
    assert (freq[:nb] == 0).all() and (freq[-nb:] == 0).all()
    sigma = math.sqrt(0.25 / 300)
    assert ((freq[nb:-nb] - 0.5).abs() <= 5 * sigma).all(), freq


@pytest.mark.parametrize("profile", list(PROFILES))
def test_p_zero_keeps_every_base_step(profile):
    schedule = SCHEDULES["linear1000"]
    base = Uniform().plan(schedule, 30)
    for seed in range(5):
        plan = StochasticStepDrop(p=0.0, profile=profile, base_steps=30).plan(schedule, 10, generator=gen(seed))
        assert torch.equal(plan.timesteps, base.timesteps)
        assert plan.info["expected_steps"] == 30


@pytest.mark.parametrize("profile,base_ratio", [("constant", 2.0), ("linear", 2.0), ("quadratic", 2.0),
                                                ("cosine", 1.5), ("linear", 1.5), (None, None)])
@pytest.mark.parametrize("K", [5, 10, 25, 50])
def test_solved_p_gives_expected_budget(profile, base_ratio, K):
    kw = {} if profile is None else dict(profile=profile, base_ratio=base_ratio)
    schedule = SCHEDULES["linear1000"]
    policy = StochasticStepDrop(**kw)
    plan = policy.plan(schedule, K, generator=gen(0))
    assert plan.info["expected_steps"] == pytest.approx(K, abs=1e-9)
    base, drop, p = policy.drop_probabilities(schedule, K)
    assert 0.0 <= p <= 1.0
    assert float((1 - drop).sum()) == pytest.approx(K, abs=1e-9)
    assert ((drop >= 0) & (drop <= 1)).all()


@pytest.mark.parametrize("profile", ["cosine", "quadratic", "linear"])
def test_unreachable_budget_raises_helpful_error(profile):
    schedule = SCHEDULES["linear1000"]
    with pytest.raises(ValueError, match="budget=10") as err:
        StochasticStepDrop(profile=profile, base_ratio=4.0).plan(schedule, 10, generator=gen(0))
    msg = str(err.value)
    assert "base" in msg and profile in msg  # says what to change
    with pytest.raises(ValueError, match="budget"):  # nothing droppable: everything is boundary
        StochasticStepDrop(boundary=0.5, base_steps=20).plan(schedule, 10, generator=gen(0))


def test_exact_mode_requires_base_at_least_budget():
    with pytest.raises(ValueError, match="base_steps"):
        StochasticStepDrop(mode="exact", base_steps=5).plan(SCHEDULES["linear1000"], 10)


# ====================================================================== noise-aware
@pytest.mark.parametrize("sname", ["linear1000", "cosine1000"])
@pytest.mark.parametrize("K", [10, 25])
def test_noise_aware_moves_steps_to_low_noise(sname, K):
    schedule = SCHEDULES[sname]
    means = []
    for p in (0.0, 0.5, 1.0, 2.0):
        plan = NoiseAware(p=p).plan(schedule, K)
        assert_valid_row(plan.timesteps, schedule.num_timesteps)
        means.append(sum(plan.row()) / K)
    assert all(a > b for a, b in zip(means, means[1:])), means


def test_noise_aware_steps_at_density_quantiles():
    """Independent check of ρ(t) ∝ 1/(σ_t^p + ε), steps at equal-mass quantiles.

    Timestep t owns the mass interval (C(t−1), C(t)]; the continuous position u = t + 1 where
    the piecewise-linear cumulative mass reaches level·S is rounded, so the level must lie
    between the cumulative mass at positions t + 0.5 and t + 1.5."""
    schedule = SCHEDULES["linear1000"]
    K, p, eps = 12, 1.0, 0.05
    sigma = (1 - schedule.alphas_cumprod).sqrt().numpy()
    rho = 1 / (sigma**p + eps)
    cum = np.concatenate([[0.0], np.cumsum(rho)]) / rho.sum()  # cum[k] = mass of t < k
    positions = np.arange(cum.size, dtype=np.float64)
    plan = NoiseAware(p=p, eps=eps).plan(schedule, K)
    for i, t in enumerate(plan.row()):
        level = (K - i) / K
        assert np.interp(t + 0.5, positions, cum) <= level + 1e-9
        assert level <= np.interp(t + 1.5, positions, cum) + 1e-9


@pytest.mark.parametrize("K", [10, 25, 50, 3, 7, 33, 99])
def test_noise_aware_p0_is_uniform_trailing(K):
    """p = 0 gives a constant density: the docstrings promise uniform trailing spacing."""
    schedule = SCHEDULES["linear1000"]
    assert NoiseAware(p=0.0).plan(schedule, K).row() == Uniform().plan(schedule, K).row()


# ====================================================================== gradient-aware
def test_gradient_aware_estimates_jacobian_norm_and_allocates_to_window():
    schedule = SCHEDULES["linear1000"]
    model = WindowModel(lo=400, hi=600, big=-4.0, small=0.2)
    pol = GradientAware(lam=1.0, p=0.0, pilot_batch=3, pilot_steps=16)
    plan = pol.plan(schedule, 20, generator=gen(0), model=model, sample_shape=(1, 4, 4))
    pilot_t = plan.info["pilot_timesteps"]
    pilot_g = torch.tensor(plan.info["pilot_g"], dtype=torch.float64)
    assert pilot_t == Uniform().plan(schedule, 16).row()
    expect = model.a(torch.tensor(pilot_t)).abs()
    assert torch.allclose(pilot_g, expect, rtol=1e-6, atol=0), (pilot_g, expect)
    assert (expect == 4.0).sum() >= 2  # the window is seen by the pilot
    # counted overhead: the model's own call count
    assert plan.overhead_calls == model.calls == 32
    assert plan.overhead_samples == model.calls * 3
    # more steps inside the sensitive window than the uniform plan puts there
    inside = lambda r: sum(400 <= t <= 600 for t in r)  # noqa: E731
    assert inside(plan.row()) > inside(Uniform().plan(schedule, 20).row()), plan.row()
    assert int(plan.num_steps) == 20


@pytest.mark.parametrize("p", [0.0, 1.0, 2.0])
def test_gradient_aware_lam0_is_noise_only(p):
    schedule = SCHEDULES["linear1000"]
    for K in (10, 25):
        model = WindowModel()
        plan = GradientAware(lam=0.0, p=p).plan(schedule, K, generator=gen(0), model=model, sample_shape=(1, 4, 4))
        assert plan.row() == NoiseAware(p=p).plan(schedule, K).row()
        assert plan.overhead_calls == model.calls


def test_combined_is_gradient_aware_with_noise_weight():
    schedule = SCHEDULES["linear1000"]
    m1, m2 = WindowModel(), WindowModel()
    a = get_policy("combined", lam=1.0, p=1.0).plan(schedule, 20, generator=gen(0), model=m1, sample_shape=(1, 4, 4))
    b = GradientAware(lam=1.0, p=1.0).plan(schedule, 20, generator=gen(0), model=m2, sample_shape=(1, 4, 4))
    assert a.row() == b.row()
    # and the noise weight moves steps to low noise relative to p = 0
    c = GradientAware(lam=1.0, p=0.0).plan(schedule, 20, generator=gen(0), model=WindowModel(), sample_shape=(1, 4, 4))
    assert sum(a.row()) < sum(c.row())


def test_gradient_aware_needs_model():
    with pytest.raises(ValueError, match="model"):
        GradientAware().plan(SCHEDULES["linear1000"], 10)
    with pytest.raises(ValueError, match="sample_shape"):
        GradientAware().plan(SCHEDULES["linear1000"], 10, model=lambda x, t: x)


# ====================================================================== other spacings
@pytest.mark.parametrize("sname", ["linear1000", "cosine1000"])
@pytest.mark.parametrize("K", [10, 20])
def test_logsnr_gaps_roughly_equal(sname, K):
    schedule = SCHEDULES[sname]
    lam = schedule.log_snr
    step = torch.cat([(lam[:-1] - lam[1:])[:1], lam[:-1] - lam[1:]])  # λ change of one timestep at t
    plan = LogSNRUniform().plan(schedule, K)
    r = plan.row()
    span = float(lam[0] - lam[-1]) + float(step[0])
    target = span / K
    checked = 0
    for i, (a, b) in enumerate(zip(r, r[1:])):
        # where the quantiles collide (one λ step holds several levels, e.g. near T-1 of the
        # cosine schedule) the steps are pushed apart one by one: rounding does not allow more
        forced = a - b == 1 or (i > 0 and r[i - 1] - a == 1)
        if forced:
            continue
        gap = float(lam[b] - lam[a])
        assert abs(gap - target) <= float(step[a] + step[b]) + 1e-9, (a, b, gap, target)
        checked += 1
    assert checked >= K // 2, r


@pytest.mark.parametrize("K", [10, 25, 50])
def test_importance_dense_at_both_ends(K):
    plan = Importance().plan(SCHEDULES["linear1000"], K)
    g = gaps(plan)
    mid = g[len(g) // 2]
    assert g[0] < mid and g[-1] < mid, g
    assert g[0] < 0.6 * mid and g[-1] < 0.6 * mid, g


@pytest.mark.parametrize("K", [10, 25, 50])
def test_quadratic_dense_near_zero(K):
    plan = Quadratic().plan(SCHEDULES["linear1000"], K)
    g = gaps(plan)
    assert all(a >= b - 1 for a, b in zip(g, g[1:])), g  # shrinking towards t = 0 (±1 rounding)
    assert g[-1] * 5 < g[0], g


@pytest.mark.parametrize("K", [10, 25])
def test_cosine_dense_at_both_ends(K):
    g = gaps(Cosine().plan(SCHEDULES["linear1000"], K))
    mid = g[len(g) // 2]
    assert g[0] < mid and g[-1] < mid, g


def test_custom_timesteps_accepted():
    schedule = SCHEDULES["linear1000"]
    plan = CustomTimesteps([999, 600, 250, 50]).plan(schedule, 4)
    assert plan.timesteps.tolist() == [999, 600, 250, 50, CLEAN]
    plan = CustomTimesteps(torch.tensor([999, 600, 250, 50, -1])).plan(schedule, 4)
    assert plan.timesteps.tolist() == [999, 600, 250, 50, CLEAN]
    plan = CustomTimesteps([500.0, 20.0]).plan(schedule, 2)  # integral floats are fine
    assert plan.timesteps.tolist() == [500, 20, CLEAN] and plan.timesteps.dtype == torch.int64
    with pytest.raises(ValueError, match="budget"):
        CustomTimesteps([999, 600, 250, 50]).plan(schedule, 3)


@pytest.mark.parametrize(
    "bad,exc",
    [
        ([999, 600, 600, 50], ValueError),  # not strictly decreasing
        ([50, 600], ValueError),  # increasing
        ([1000, 500], ValueError),  # out of range (T = 1000)
        ([999, -5], ValueError),  # negative
        ([999, -1, 500], ValueError),  # value after the terminal
        ([], ValueError),  # empty
        ([999.5, 500.0], TypeError),  # float with a fraction
        ([[[999, 1]]], ValueError),  # 3-D
    ],
)
def test_custom_timesteps_validated(bad, exc):
    with pytest.raises(exc, match="timesteps"):
        CustomTimesteps(bad).plan(SCHEDULES["linear1000"], max(1, len(bad)))
    with pytest.raises(exc, match="timesteps"):
        StepPlan.from_timesteps(bad, 1000)


# ====================================================================== bad input
@pytest.mark.parametrize("name", UPFRONT)
@pytest.mark.parametrize("budget,exc", [(0, ValueError), (1001, ValueError), (-3, ValueError), (2.5, TypeError),
                                        ("10", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_budget(name, budget, exc):
    policy = get_policy(name)
    with pytest.raises(exc, match="budget"):
        policy.plan(SCHEDULES["linear1000"], budget, model=WindowModel(), sample_shape=(1, 4, 4))


def test_budget_numpy_int_accepted():
    np = pytest.importorskip("numpy")
    assert Uniform().plan(SCHEDULES["linear1000"], np.int64(10)).row() == Uniform().plan(SCHEDULES["linear1000"], 10).row()


def test_bad_batch_size_and_generator():
    with pytest.raises(ValueError, match="batch_size"):
        StochasticStepDrop(per_sample=True).plan(SCHEDULES["linear1000"], 10, batch_size=0)
    with pytest.raises(TypeError, match="generator"):
        StochasticStepDrop().plan(SCHEDULES["linear1000"], 10, generator=42)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan"), float("inf")])
def test_bad_drop_probability(p):
    with pytest.raises(ValueError, match="p must be"):
        StochasticStepDrop(p=p)


def test_bad_param_types_and_values():
    with pytest.raises(TypeError, match="p must be"):
        StochasticStepDrop(p="0.5")
    with pytest.raises(ValueError, match="p must be"):
        NoiseAware(p=-1.0)
    with pytest.raises(ValueError, match="lam"):
        GradientAware(lam=-1.0)
    with pytest.raises(ValueError, match="boundary"):
        StochasticStepDrop(boundary=0.7)
    with pytest.raises(ValueError, match="middle_weight"):
        Importance(middle_weight=0.0)
    with pytest.raises(TypeError, match="per_sample"):
        StochasticStepDrop(per_sample=1)


def test_unknown_names_list_legal_values():
    with pytest.raises(ValueError, match="profile") as e:
        StochasticStepDrop(profile="triangle")
    assert all(p in str(e.value) for p in PROFILES)
    with pytest.raises(ValueError, match="mode") as e:
        StochasticStepDrop(mode="poisson")
    assert "bernoulli" in str(e.value) and "exact" in str(e.value)
    with pytest.raises(ValueError, match="policy") as e:
        get_policy("nope")
    assert all(n in str(e.value) for n in POLICIES)


@pytest.mark.parametrize(
    "tensor,exc",
    [
        (torch.tensor([999, 500, -1], dtype=torch.int32), TypeError),  # not int64
        (torch.tensor([999.0, 500.0, -1.0]), TypeError),  # float
        ([999, 500, -1], TypeError),  # not a tensor
        (torch.tensor([999, 500]), ValueError),  # missing terminal
        (torch.tensor([500, 999, -1]), ValueError),  # increasing
        (torch.tensor([999, 999, -1]), ValueError),  # repeated
        (torch.tensor([999, -1, 5, -1]), ValueError),  # values after the terminal
        (torch.tensor([-1, -1]), ValueError),  # no model call
        (torch.tensor([-1]), ValueError),  # too short
        (torch.tensor([1000, 5, -1]), ValueError),  # out of range
        (torch.tensor([999, -2, -1]), ValueError),  # below the clean marker
        (torch.tensor([[999, 500, -1], [999, 600, 300]]), ValueError),  # a row without terminal
        (torch.tensor([[999, 500, -1], [999, -1, 4]]), ValueError),
        (torch.zeros(2, 2, 2, dtype=torch.int64), ValueError),  # 3-D
    ],
)
def test_stepplan_rejects_malformed(tensor, exc):
    with pytest.raises(exc, match="timesteps"):
        StepPlan(tensor, 1000)


def test_stepplan_accepts_padded_per_sample_rows():
    plan = StepPlan(torch.tensor([[999, 500, 100, -1], [999, 400, -1, -1]]), 1000)
    assert plan.per_sample and plan.num_steps.tolist() == [3, 2]
    assert plan.expand(2) is plan.timesteps
    with pytest.raises(ValueError, match="rows"):
        plan.expand(3)
    shared = StepPlan(torch.tensor([999, 10, -1]), 1000)
    assert shared.expand(3).tolist() == [[999, 10, -1]] * 3


def test_shared_plan_rejects_padding():
    """Padding with -1 is for per-sample rows only: a shared plan padded mid-way would make the
    sampler call the model past the plan's end."""
    with pytest.raises(ValueError, match="padding"):
        StepPlan(torch.tensor([999, 500, -1, -1]), 1000)
    with pytest.raises(ValueError, match="padding"):
        StepPlan.from_timesteps([999, 500, -1, -1], 1000)


def test_exact_mode_with_zero_drop_probability_draws_the_middle_uniformly():
    """p = 0 makes every middle step equally likely; only the true boundary is always kept."""
    schedule = NoiseSchedule.linear(1000)
    policy = StochasticStepDrop(p=0.0, mode="exact")
    base, _, _ = policy.drop_probabilities(schedule, 10)
    kept_middle = torch.zeros(base.numel())
    for seed in range(200):
        row = policy.plan(schedule, 10, generator=torch.Generator().manual_seed(seed)).row()
        kept_middle += torch.isin(base, torch.tensor(row)).double()
    middle = kept_middle[2:-2]  # boundary: round(0.1 * 20) = 2 steps at each end
    assert (kept_middle[:2] == 200).all() and (kept_middle[-2:] == 200).all()
    # 6 of 16 middle steps per draw: each kept ~75 times in 200 draws; none never, none always
    assert middle.min() > 30 and middle.max() < 130
