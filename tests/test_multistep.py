"""DPM-Solver++(2M) (``solver="dpmpp_2m"``): the sampler's ε-rewrite through the fused DDIM step
against the paper's formula (:func:`dpmpp_2m_step_reference`), against diffusers'
``DPMSolverMultistepScheduler`` on identical float64 tables, its order of convergence on a
Gaussian whose probability-flow ODE is solved in closed form, per-sample plans with masking,
the online loop, and its arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stepdrop import CLEAN, FusedSampler, NoiseSchedule, StepPlan
from stepdrop.multistep import SAMPLER_SOLVERS, dpmpp_2m_eps
from stepdrop.ops.reference import dpmpp_2m_step_reference, fused_step_reference, predict_x0
from test_sampler import BACKENDS_HERE, gen

T = 1000
SCHEDULE = NoiseSchedule.linear(T)
TABLE = SCHEDULE.table("cpu", torch.float64)
SHAPE = (3, 5, 7)  # odd sizes on purpose


class SmoothModel(nn.Module):
    """A non-linear ε(x, t), element-wise; its parameter sets the run's dtype."""

    sample_shape = SHAPE

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=dtype), requires_grad=False)

    def forward(self, x, t):
        return self.scale * (0.3 * torch.tanh(x) + 0.1 * torch.cos(t.to(x.dtype) / 150).view(-1, 1, 1, 1))


class GaussianModel(nn.Module):
    """The exact ε of data ~ N(μ, v·I): ε(x_t) = σ_t·(x_t − α_t·μ)/(ᾱ_t·v + 1 − ᾱ_t)."""

    sample_shape = (1, 4, 4)
    mu, var = 0.3, 0.25

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    def forward(self, x, t):
        a = TABLE[t].view(-1, 1, 1, 1)
        return self.scale * (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.var + 1 - a)

    @classmethod
    def ode_solution(cls, x_T: torch.Tensor, t: int = T - 1) -> torch.Tensor:
        """x_0 of the probability-flow ODE from x_t: μ + √v/√(ᾱ_t·v + 1 − ᾱ_t)·(x_t − α_t·μ)."""
        a = TABLE[t]
        return cls.mu + cls.var**0.5 / (a * cls.var + 1 - a).sqrt() * (x_T - a.sqrt() * cls.mu)


def vec(value: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.int64)


def reference_loop(model, x: torch.Tensor, rows: torch.Tensor, clip=None) -> torch.Tensor:
    """The paper's update per sample, one sample at a time, in float64: the spec the sampler's
    batched, masked ε-rewrite must reproduce."""
    out = []
    for b in range(x.shape[0]):
        xb = x[b : b + 1].double()
        plan = [int(v) for v in rows[b] if v >= 0] + [CLEAN]
        x0_prev, t_prev = torch.zeros_like(xb), CLEAN
        for t, s in zip(plan[:-1], plan[1:]):
            eps = model(xb, vec(t, 1)).double()
            x0 = predict_x0(xb, eps, TABLE, vec(t, 1))
            xb = dpmpp_2m_step_reference(xb, x0, x0_prev, TABLE, vec(t_prev, 1), vec(t, 1), vec(s, 1), clip)
            x0_prev, t_prev = x0, t
        out.append(xb)
    return torch.cat(out)


# ----------------------------------------------------------------------------- the formula
def test_reference_first_order_is_ddim():
    """Without a previous call (t_prev < 0) or at the last step (s = −1) DPM-Solver++ is DDIM
    (η = 0) in the data prediction, whatever x0_prev holds (Lu et al. 2022, eq. 5 vs DDIM eq. 12)."""
    x = torch.randn(4, *SHAPE, generator=gen(0), dtype=torch.float64)
    eps = torch.randn(4, *SHAPE, generator=gen(1), dtype=torch.float64)
    junk = torch.full_like(x, 1e6)
    t, s = torch.tensor([999, 700, 40, 1]), torch.tensor([800, 100, -1, -1])
    x0 = predict_x0(x, eps, TABLE, t)
    ddim = fused_step_reference(x, eps, TABLE, t, s, solver="ddim")
    got = dpmpp_2m_step_reference(x, x0, junk, TABLE, vec(CLEAN, 4), t, s)
    torch.testing.assert_close(got, ddim, rtol=0, atol=1e-11)
    # stepping to the clean end returns x̂0 even with a history
    last = dpmpp_2m_step_reference(x, x0, junk, TABLE, torch.tensor([999, 900, 300, 2]), t, vec(CLEAN, 4))
    torch.testing.assert_close(last, x0, rtol=0, atol=1e-11)
    # and clips like DDIM: x̂0 clipped, ε kept (the inputs put x̂0 outside [−1, 1])
    assert (x0.abs() > 1).any()
    ddim_clip = fused_step_reference(x, eps, TABLE, t, s, solver="ddim", clip=1.0)
    got_clip = dpmpp_2m_step_reference(x, x0, junk, TABLE, vec(CLEAN, 4), t, s, clip=1.0)
    torch.testing.assert_close(got_clip, ddim_clip, rtol=0, atol=1e-11)


def test_reference_second_order_extrapolates_x0():
    """With a history, D = x̂0_t + h/(2·h_prev)·(x̂0_t − x̂0_prev) replaces x̂0_t in the DDIM update:
    checked against the update written with λ = log(α/σ) computed independently here."""
    x = torch.randn(2, *SHAPE, generator=gen(2), dtype=torch.float64)
    x0 = torch.randn(2, *SHAPE, generator=gen(3), dtype=torch.float64)
    x0_prev = torch.randn(2, *SHAPE, generator=gen(4), dtype=torch.float64)
    t_prev, t, s = torch.tensor([999, 600]), torch.tensor([700, 300]), torch.tensor([300, 10])
    lam = lambda i: 0.5 * torch.log(TABLE[i] / (1 - TABLE[i]))  # noqa: E731
    h, h_prev = lam(s) - lam(t), lam(t) - lam(t_prev)
    d = x0 + (h / (2 * h_prev)).view(-1, 1, 1, 1) * (x0 - x0_prev)
    a_t, a_s = TABLE[t].view(-1, 1, 1, 1), TABLE[s].view(-1, 1, 1, 1)
    expected = ((1 - a_s) / (1 - a_t)).sqrt() * x + a_s.sqrt() * (1 - torch.exp(-h).view(-1, 1, 1, 1)) * d
    torch.testing.assert_close(dpmpp_2m_step_reference(x, x0, x0_prev, TABLE, t_prev, t, s), expected,
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_eps_rewrite_through_ddim_is_the_reference(clip):
    """The sampler's route: DDIM (η = 0, the same clip) fed ε' takes exactly the reference step,
    with and without a history, stepping to the clean end, and for a masked (finished) sample."""
    x = 2 * torch.randn(5, *SHAPE, generator=gen(5), dtype=torch.float64)
    eps = torch.randn(5, *SHAPE, generator=gen(6), dtype=torch.float64)
    x0_prev = torch.randn(5, *SHAPE, generator=gen(7), dtype=torch.float64)
    t_prev = torch.tensor([-1, 999, 999, 500, 3])
    t = torch.tensor([999, 800, 200, 100, 1])
    s = torch.tensor([900, 300, -1, 0, -1])
    eps_d, x0 = dpmpp_2m_eps(x, eps, TABLE, t_prev, t, s, x0_prev)
    torch.testing.assert_close(x0, predict_x0(x, eps, TABLE, t), rtol=0, atol=0)  # kept unclipped
    if clip is not None:
        d = predict_x0(x, eps_d, TABLE, t)
        assert (d.abs() > clip).any(), "the inputs never exercised the clip"
    got = fused_step_reference(x, eps_d, TABLE, t, s, solver="ddim", clip=clip)
    expected = dpmpp_2m_step_reference(x, x0, x0_prev, TABLE, t_prev, t, s, clip)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_eps_rewrite_is_finite_for_finished_samples():
    """A finished sample (t = s = CLEAN, clamped) or the first call (t_prev = CLEAN) must not
    make inf/nan that a masked kernel would then carry nowhere but into a non-finite check."""
    x = torch.randn(3, *SHAPE, generator=gen(8))
    eps = torch.randn(3, *SHAPE, generator=gen(9))
    t_prev, t, s = vec(CLEAN, 3), torch.tensor([CLEAN, 0, 999]), torch.tensor([CLEAN, CLEAN, 998])
    eps_d, x0 = dpmpp_2m_eps(x, eps, TABLE, t_prev, t, s, x)
    assert torch.isfinite(eps_d).all() and torch.isfinite(x0).all()
    assert eps_d.dtype == x0.dtype == torch.float32


# ----------------------------------------------------------------------------- the sampler vs the spec
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_sampler_equals_reference_on_per_sample_plans(backend, clip):
    """Rows of different lengths in one batch (finished samples masked), non-uniform strides."""
    rows = torch.tensor([[999, 850, 600, 420, 90, 8, CLEAN],
                         [999, 500, CLEAN, CLEAN, CLEAN, CLEAN, CLEAN],
                         [700, 699, 300, 2, 1, CLEAN, CLEAN],
                         [400, CLEAN, CLEAN, CLEAN, CLEAN, CLEAN, CLEAN]])
    model = SmoothModel()
    x = 1.5 * torch.randn(4, *SHAPE, generator=gen(10), dtype=torch.float64)
    out, stats = FusedSampler(model, SCHEDULE, solver="dpmpp_2m", clip=clip, backend=backend).sample(
        x.clone(), StepPlan(rows, T))
    torch.testing.assert_close(out, reference_loop(model, x, rows, clip), rtol=0, atol=1e-9)
    assert stats.nfe.tolist() == [6, 2, 5, 1] and stats.solver == "dpmpp_2m"


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_sampler_float32_close_to_float64(backend):
    model32, model64 = SmoothModel(torch.float32), SmoothModel(torch.float64)
    x = torch.randn(4, *SHAPE, generator=gen(11), dtype=torch.float64)
    kw = dict(budget=10)
    out32, _ = FusedSampler(model32, SCHEDULE, solver="dpmpp_2m", backend=backend).sample(x.float(), "logsnr", **kw)
    out64, _ = FusedSampler(model64, SCHEDULE, solver="dpmpp_2m", backend=backend).sample(x, "logsnr", **kw)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the peer
def diffusers_dpmpp_2m(K: int):
    """diffusers' DPM-Solver++(2M) on our float64 table: trailing spacing (our "uniform" plan)
    and a first-order last step to σ = 0 (our clean end). Skips the test without diffusers (the
    other tests of this file do not need it)."""
    DPMSolverMultistepScheduler = pytest.importorskip("diffusers").DPMSolverMultistepScheduler
    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
        prediction_type="epsilon", timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True,
    )
    sched.set_timesteps(K)
    # identical float64 tables on both sides: diffusers rounds its σ = √((1−ᾱ)/ᾱ) to float32
    sigmas = ((1 - TABLE[sched.timesteps]) / TABLE[sched.timesteps]).sqrt()
    sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sched


# diffusers' set_timesteps calls np.array on a torch tensor, which numpy 2 warns about
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("K", [2, 3, 10, 25])
def test_matches_diffusers_dpmsolver_multistep(backend, K):
    """Same timesteps, same outputs. diffusers rounds x_t to float32 inside every step (its
    "upcast" line casts float64 down), so the match is to float32 precision; the float64 match
    is with the paper's formula above."""
    sched = diffusers_dpmpp_2m(K)
    model = SmoothModel()
    x = torch.randn(4, *SHAPE, generator=gen(12), dtype=torch.float64)
    expected = x.clone()
    for t in sched.timesteps:
        expected = sched.step(model(expected, vec(int(t), 4)), t, expected).prev_sample
    sampler = FusedSampler(model, SCHEDULE, solver="dpmpp_2m", backend=backend)
    ours, stats = sampler.sample(x.clone(), "uniform", budget=K)
    assert stats.timesteps[0, :-1].tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(ours, expected, rtol=4e-6, atol=1e-6)
    assert stats.nfe.tolist() == [K] * 4


# ----------------------------------------------------------------------------- what it is for
@pytest.mark.parametrize("policy", ["quadratic", "logsnr"])
def test_second_order_convergence_on_a_gaussian(policy):
    """On Gaussian data the probability-flow ODE has a closed-form solution: DDIM's error halves
    when K doubles (first order), DPM-Solver++(2M)'s falls much faster, and at equal calls it is
    far smaller. Measured here: 80 vs 20 calls shrink the error ~0.26x for DDIM and ~0.05x for
    DPM-Solver++(2M); at 40 calls it is ~9x (quadratic) to ~17x (logSNR) smaller."""
    x = torch.randn(64, 1, 4, 4, generator=gen(13), dtype=torch.float64)
    exact = GaussianModel.ode_solution(x)
    err = {}
    for solver in ("ddim", "dpmpp_2m"):
        for K in (20, 40, 80):
            out, _ = FusedSampler(GaussianModel(), SCHEDULE, solver=solver).sample(x, policy, budget=K)
            err[solver, K] = float((out - exact).abs().max())
    assert 0.2 < err["ddim", 80] / err["ddim", 20] < 0.35
    assert err["dpmpp_2m", 80] / err["dpmpp_2m", 20] < 0.1
    assert err["dpmpp_2m", 40] < err["ddim", 40] / 5


def test_online_loop_equals_its_realised_plan():
    """The adaptive policy picks each next timestep online; replaying the timesteps it visited
    as a per-sample plan gives the same images (the online loop keeps the same per-sample
    history as the plan loop), with NFE counted within the budget."""
    model = SmoothModel()
    x = torch.randn(4, *SHAPE, generator=gen(14), dtype=torch.float64)
    sampler = FusedSampler(model, SCHEDULE, solver="dpmpp_2m")
    online, stats = sampler.sample(x.clone(), "adaptive", budget=12)
    assert int(stats.nfe.max()) <= 12
    replay, replay_stats = sampler.sample(x.clone(), StepPlan(stats.timesteps, T))
    torch.testing.assert_close(online, replay, rtol=0, atol=1e-12)
    assert torch.equal(replay_stats.nfe, stats.nfe)


# ----------------------------------------------------------------------------- arguments
def test_eta_must_be_zero():
    with pytest.raises(ValueError, match=r"eta must be 0 with solver='dpmpp_2m'.*solver='ddim'"):
        FusedSampler(SmoothModel(), SCHEDULE, solver="dpmpp_2m", eta=0.5)


def test_unknown_solver_lists_the_legal_ones():
    with pytest.raises(ValueError, match=r"solver.*dpmpp_2m"):
        FusedSampler(SmoothModel(), SCHEDULE, solver="dpmpp_3m")
    assert SAMPLER_SOLVERS == ("ddim", "ddpm", "dpmpp_2m")


def test_deterministic_and_no_step_noise_drawn():
    """A deterministic solver: the generator only draws x_T, so two seeds that give the same x_T
    give the same images."""
    s = FusedSampler(SmoothModel(torch.float32), SCHEDULE, solver="dpmpp_2m")
    assert not s.stochastic
    a, _ = s.sample(3, "uniform", budget=5, generator=gen(15))
    g = gen(15)
    x_T = torch.randn(3, *SHAPE, generator=g)
    b, _ = s.sample(x_T, "uniform", budget=5)
    assert torch.equal(a, b)
