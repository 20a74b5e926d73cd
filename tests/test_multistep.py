"""The solver registry and its multistep solvers: DPM-Solver++ 2M / 3M / 2M SDE and UniPC
(order 2 and 3, with UniC) run through the fused step by the ε-rewrite
(:mod:`stepdrop.solvers.base`), against the paper's 2M formula (:func:`dpmpp_2m_step_reference`),
against diffusers' schedulers on whole trajectories in float64 with identical ᾱ tables, their
orders of convergence on a Gaussian whose probability-flow ODE is solved in closed form,
per-sample plans with masking, the online loop, and their arguments."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from stepdrop import CLEAN, FusedSampler, NoiseSchedule, StepPlan
from stepdrop.ops.reference import dpmpp_2m_step_reference, fused_step_reference, predict_x0
from stepdrop.solvers import SOLVERS, MultistepSolver, StepInfo, get_solver
from stepdrop.solvers.base import select
from test_sampler import BACKENDS_HERE, gen

MULTISTEP = ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc", "unipc_3")

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


def rewrite(name, x, eps, t, s, history=()):
    """The solver's (x, ε') for one step t → s after the (t_prev, x̂0_prev) calls in ``history``."""
    solver = get_solver(name)
    state = solver.start(x)
    for t_prev, x0_prev in history:
        lam = 0.5 * torch.log(TABLE[t_prev.clamp(min=0)] / (1 - TABLE[t_prev.clamp(min=0)]))
        state.x0 = [x0_prev] + state.x0[:-1]
        state.lam = [lam] + state.lam[:-1]
        state.count = state.count + (t_prev >= 0).long()
    info = StepInfo(0, TABLE, t.clamp(min=0), s, t >= 0, torch.where(s >= 0, 2, 1))
    return solver.prepare(x, eps, info, state)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_eps_rewrite_through_ddim_is_the_reference(clip):
    """The sampler's route: DDIM (η = 0, the same clip) fed ε' takes exactly the reference step,
    with and without a history, stepping to the clean end."""
    x = 2 * torch.randn(5, *SHAPE, generator=gen(5), dtype=torch.float64)
    eps = torch.randn(5, *SHAPE, generator=gen(6), dtype=torch.float64)
    x0_prev = torch.randn(5, *SHAPE, generator=gen(7), dtype=torch.float64)
    t_prev = torch.tensor([-1, 999, 999, 500, 3])
    t = torch.tensor([999, 800, 200, 100, 1])
    s = torch.tensor([900, 300, -1, 0, -1])
    x_in, eps_d = rewrite("dpmpp_2m", x, eps, t, s, [(t_prev, x0_prev)])
    assert x_in is x
    if clip is not None:
        assert (predict_x0(x, eps_d, TABLE, t).abs() > clip).any(), "the inputs never exercised the clip"
    got = fused_step_reference(x, eps_d, TABLE, t, s, solver="ddim", clip=clip)
    expected = dpmpp_2m_step_reference(x, predict_x0(x, eps, TABLE, t), x0_prev, TABLE, t_prev, t, s, clip)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", MULTISTEP)
def test_eps_rewrite_is_finite_for_finished_samples(name):
    """A finished sample (t = s = CLEAN, clamped) or the first call must not make inf/nan that a
    masked kernel would then carry nowhere but into a non-finite check."""
    x = torch.randn(3, *SHAPE, generator=gen(8))
    eps = torch.randn(3, *SHAPE, generator=gen(9))
    x_in, eps_d = rewrite(name, x, eps, torch.tensor([CLEAN, 0, 999]), torch.tensor([CLEAN, CLEAN, 998]))
    assert torch.isfinite(eps_d).all() and torch.isfinite(x_in).all() and eps_d.dtype == torch.float32


def test_select_takes_each_samples_order():
    one, two, three = (torch.full((3,), float(v)) for v in (1, 2, 3))
    got = select(torch.tensor([1, 2, 3]), [[one], [two, two], [three, three, three]])
    assert [w.tolist() for w in got] == [[1, 2, 3], [0, 2, 3], [0, 0, 3]]


# ----------------------------------------------------------------------------- the sampler vs the spec
ROWS = torch.tensor([[999, 850, 600, 420, 90, 8, CLEAN],
                     [999, 500, CLEAN, CLEAN, CLEAN, CLEAN, CLEAN],
                     [700, 699, 300, 2, 1, CLEAN, CLEAN],
                     [400, CLEAN, CLEAN, CLEAN, CLEAN, CLEAN, CLEAN]])


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_dpmpp_2m_equals_reference_on_per_sample_plans(backend, clip):
    """Rows of different lengths in one batch (finished samples masked), non-uniform strides."""
    model = SmoothModel()
    x = 1.5 * torch.randn(4, *SHAPE, generator=gen(10), dtype=torch.float64)
    out, stats = FusedSampler(model, SCHEDULE, solver="dpmpp_2m", clip=clip, backend=backend).sample(
        x.clone(), StepPlan(ROWS, T))
    torch.testing.assert_close(out, reference_loop(model, x, ROWS, clip), rtol=0, atol=1e-9)
    assert stats.nfe.tolist() == [6, 2, 5, 1] and stats.solver == "dpmpp_2m"


@pytest.mark.parametrize("name", [n for n in MULTISTEP if n != "dpmpp_2m_sde"])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["noclip", "clip"])
def test_per_sample_plans_equal_each_row_alone(name, clip):
    """Every multistep solver keeps its history per sample: a batch of rows of different lengths
    equals each row sampled on its own."""
    model = SmoothModel()
    x = 1.5 * torch.randn(4, *SHAPE, generator=gen(16), dtype=torch.float64)
    sampler = FusedSampler(model, SCHEDULE, solver=name, clip=clip)
    batch, stats = sampler.sample(x.clone(), StepPlan(ROWS, T))
    for b in range(4):
        row = [int(v) for v in ROWS[b] if v >= 0]
        alone, _ = sampler.sample(x[b : b + 1].clone(), row)
        torch.testing.assert_close(batch[b : b + 1], alone, rtol=0, atol=1e-12)
    assert stats.nfe.tolist() == [6, 2, 5, 1]


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_float32_close_to_float64(name, backend):
    model32, model64 = SmoothModel(torch.float32), SmoothModel(torch.float64)
    x = torch.randn(4, *SHAPE, generator=gen(11), dtype=torch.float64)
    noise = torch.randn(10, 4, *SHAPE, generator=gen(1), dtype=torch.float64)
    out = {}
    for dtype, model in ((torch.float32, model32), (torch.float64, model64)):
        sampler = FusedSampler(model, SCHEDULE, solver=name, backend=backend)
        steps = iter(noise.to(dtype))
        sampler._randn = lambda shape, run, out=None: next(steps)  # the same step noise in both dtypes
        out[dtype], _ = sampler.sample(x.to(dtype), "logsnr", budget=10)
    assert out[torch.float32].dtype == torch.float32
    torch.testing.assert_close(out[torch.float32].double(), out[torch.float64], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- the peer
def diffusers_scheduler(name: str, K: int, monkeypatch, timesteps: list[int] | None = None):
    """diffusers' scheduler for ``name`` on our float64 table, trailing spacing (our "uniform"
    plan) or the given ``timesteps`` (DPM-Solver only) and a last step to σ = 0 (our clean end). diffusers casts x_t to float32 inside each
    DPM-Solver step; the module's ``torch.float32`` is pointed at float64 so that the whole
    trajectory compares in float64."""
    diffusers = pytest.importorskip("diffusers")
    common = dict(num_train_timesteps=T, beta_schedule="linear", prediction_type="epsilon",
                  timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True)
    if name.startswith("unipc"):
        cls = diffusers.UniPCMultistepScheduler
        kwargs = dict(solver_order=3 if name == "unipc_3" else 2, solver_type="bh2", predict_x0=True)
    else:
        cls = diffusers.DPMSolverMultistepScheduler
        kwargs = dict(solver_order=3 if name == "dpmpp_3m" else 2, solver_type="midpoint",
                      algorithm_type="sde-dpmsolver++" if name == "dpmpp_2m_sde" else "dpmsolver++")
    module = __import__(cls.__module__, fromlist=["torch"])
    monkeypatch.setattr(module, "torch", types.SimpleNamespace(**{**vars(torch), "float32": torch.float64}))
    sched = cls(**common, **kwargs)
    sched.set_timesteps(K) if timesteps is None else sched.set_timesteps(timesteps=timesteps)
    # identical float64 tables on both sides: diffusers rounds its σ = √((1−ᾱ)/ᾱ) to float32
    sigmas = ((1 - TABLE[sched.timesteps]) / TABLE[sched.timesteps]).sqrt()
    sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sched


def diffusers_trajectory(sched, model, x, noise=()):
    expected = x.clone()
    for k, t in enumerate(sched.timesteps):
        extra = dict(variance_noise=noise[k]) if len(noise) else {}
        expected = sched.step(model(expected, vec(int(t), x.shape[0])), t, expected, **extra).prev_sample
    return expected


# diffusers' set_timesteps calls np.array on a torch tensor, which numpy 2 warns about
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("name", MULTISTEP)
@pytest.mark.parametrize("K", [2, 3, 10, 14])
def test_matches_diffusers_in_float64(name, K, monkeypatch):
    """Same timesteps, same outputs, the whole trajectory in float64, the SDE on the same noise.
    (diffusers' DPM-Solver keeps third order at the second-to-last step from 15 steps on;
    stepdrop caps every multistep solver's order by the steps left, hence K < 15.)"""
    sched = diffusers_scheduler(name, K, monkeypatch)
    model = SmoothModel()
    x = torch.randn(4, *SHAPE, generator=gen(12), dtype=torch.float64)
    sampler = FusedSampler(model, SCHEDULE, solver=name)
    ours, stats = sampler.sample(x.clone(), "uniform", budget=K, generator=gen(3))
    # x_T was given, so the generator drew only the steps' noise, one draw per step in order
    g = gen(3)
    noise = [torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(K)] if sampler.stochastic else []
    expected = diffusers_trajectory(sched, model, x, noise)
    assert stats.timesteps[0, :-1].tolist() == sched.timesteps.tolist()
    assert expected.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)
    assert stats.nfe.tolist() == [K] * 4


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc_3"])
def test_matches_diffusers_on_every_backend(backend, name, monkeypatch):
    sched = diffusers_scheduler(name, 8, monkeypatch)
    model = SmoothModel()
    x = torch.randn(2, *SHAPE, generator=gen(17), dtype=torch.float64)
    ours, _ = FusedSampler(model, SCHEDULE, solver=name, backend=backend).sample(x.clone(), "uniform", budget=8)
    torch.testing.assert_close(ours, diffusers_trajectory(sched, model, x), rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- what they are for
def test_orders_of_convergence_on_a_gaussian():
    """On Gaussian data the probability-flow ODE has a closed-form solution. From 10 to 40 calls
    (logSNR spacing) the error shrinks ~4x for DDIM (first order) and by far more for the
    multistep solvers; at 40 calls each of them beats DDIM many times over. Measured here,
    error(40)/error(10): 0.27 (ddim), 0.14 (dpmpp_2m), 0.011 (dpmpp_3m), 0.024 (unipc), 0.002
    (unipc_3). (From 40 to 80 calls the third-order solvers stall near 3.5e-4: logSNR-spaced
    integer timesteps near t = 0 make the last steps' ratios uneven.)"""
    x = torch.randn(64, 1, 4, 4, generator=gen(13), dtype=torch.float64)
    exact = GaussianModel.ode_solution(x)
    names = ("ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3")
    err = {}
    for solver in names:
        for K in (10, 40):
            out, _ = FusedSampler(GaussianModel(), SCHEDULE, solver=solver).sample(x, "logsnr", budget=K)
            err[solver, K] = float((out - exact).abs().max())
    ratio = {s: err[s, 40] / err[s, 10] for s in names}
    assert 0.2 < ratio["ddim"] < 0.35, ratio
    assert ratio["dpmpp_2m"] < 0.2 and ratio["unipc"] < 0.05, ratio
    assert ratio["dpmpp_3m"] < 0.03 and ratio["unipc_3"] < 0.03, ratio
    for solver in names[1:]:
        assert err[solver, 40] < err["ddim", 40] / 5, err


def test_sde_solver_samples_the_data_distribution():
    """DPM-Solver++(2M) SDE on the Gaussian: fresh noise each step, and the samples' mean and
    variance are the data's (μ = 0.3, v = 0.25) at 100 calls (measured: 0.2988, 0.2507; at 25
    calls the variance is still 0.262)."""
    sampler = FusedSampler(GaussianModel(), SCHEDULE, solver="dpmpp_2m_sde")
    assert sampler.stochastic
    x = torch.randn(4096, 1, 4, 4, generator=gen(18), dtype=torch.float64)
    out, _ = sampler.sample(x, "logsnr", budget=100, generator=gen(19))
    assert abs(float(out.mean()) - GaussianModel.mu) < 0.01
    assert abs(float(out.var()) - GaussianModel.var) < 0.005
    again, _ = sampler.sample(x[:8], "logsnr", budget=25, generator=gen(20))
    assert not torch.equal(sampler.sample(x[:8], "logsnr", budget=25, generator=gen(19))[0], again)


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


class AdamsBashforth2(MultistepSolver):
    """A solver written outside the package, unregistered (no name): the base class's contract
    is all it needs. It restates DPM-Solver++(2M)'s D in its own words."""

    order = 2

    def coefficients(self, order, h, lam_t, lam_past):
        w = 0.5 * h / (lam_t - lam_past[0])
        return select(order, [[torch.ones_like(h)], [1 + w, -w]])


def test_a_solver_object_from_outside_the_package():
    model = SmoothModel()
    x = torch.randn(3, *SHAPE, generator=gen(21), dtype=torch.float64)
    ours, stats = FusedSampler(model, SCHEDULE, solver=AdamsBashforth2()).sample(x.clone(), "logsnr", budget=7)
    expected, _ = FusedSampler(model, SCHEDULE, solver="dpmpp_2m").sample(x.clone(), "logsnr", budget=7)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    assert stats.nfe.tolist() == [7, 7, 7]


# ----------------------------------------------------------------------------- arguments
def test_registry_declares_each_solver():
    assert set(SOLVERS) == {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "unipc", "unipc_3"}
    declared = {n: (get_solver(n).stochastic, get_solver(n).history, tuple(get_solver(n).rule)) for n in SOLVERS}
    assert declared["ddim"] == (False, 0, ("ddim", 0.0))
    assert declared["ddpm"] == (True, 0, ("ddpm", 0.0))
    assert declared["dpmpp_2m_sde"] == (True, 1, ("ddim", 1.0))
    assert declared["dpmpp_3m"] == (False, 2, ("ddim", 0.0))
    assert declared["unipc_3"] == (False, 2, ("ddim", 0.0))
    assert get_solver("ddim", eta=0.5).stochastic


@pytest.mark.parametrize("name", [n for n in SOLVERS if n != "ddim"])
def test_eta_only_with_ddim(name):
    with pytest.raises(ValueError, match=rf"eta must be 0 with solver='{name}'.*solver='ddim'"):
        FusedSampler(SmoothModel(), SCHEDULE, solver=name, eta=0.5)


def test_unknown_solver_lists_the_legal_ones():
    with pytest.raises(ValueError, match=r"solver.*dpmpp_3m.*unipc"):
        FusedSampler(SmoothModel(), SCHEDULE, solver="euler")


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3"])
def test_deterministic_and_no_step_noise_drawn(name):
    """A deterministic solver: the generator only draws x_T, so two seeds that give the same x_T
    give the same images."""
    s = FusedSampler(SmoothModel(torch.float32), SCHEDULE, solver=name)
    assert not s.stochastic
    a, _ = s.sample(3, "uniform", budget=5, generator=gen(15))
    g = gen(15)
    x_T = torch.randn(3, *SHAPE, generator=g)
    b, _ = s.sample(x_T, "uniform", budget=5)
    assert torch.equal(a, b)
