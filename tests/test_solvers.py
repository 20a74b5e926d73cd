"""The fused DDIM / DDPM step against diffusers and against the papers' formulas.

Expected values come from (a) diffusers' ``DDIMScheduler.step`` / ``DDPMScheduler.step`` run
on the identical float64 ᾱ table with identical noise, or (b) an independent float64 numpy
derivation written here from the papers:

* DDIM, Song et al. 2021 eq. (12)/(16):
  x_s = √ᾱ_s·x̂0 + √(1−ᾱ_s−σ²)·ε + σ·z,  σ = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_s);
* DDPM posterior, Ho et al. 2020 eq. (6)/(7):
  μ̃ = √ᾱ_{t−1}·β_t/(1−ᾱ_t)·x0 + √α_t·(1−ᾱ_{t−1})/(1−ᾱ_t)·x_t,  β̃ = (1−ᾱ_{t−1})/(1−ᾱ_t)·β_t.

Every test runs on each backend available for CPU tensors ("torch" reference, and "cpu"
when the C++ extension is built), through the public dispatcher ``stepdrop.ops.fused_step``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stepdrop.ops import CLEAN, available_backends, fused_step, predict_x0
from stepdrop.ops.reference import fused_step_reference, q_sample
from stepdrop.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as ddpm_module  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

T = 1000
SHAPE = (3, 2, 5, 5)  # odd sizes on purpose


@pytest.fixture(params=available_backends("cpu"))
def backend(request):
    return request.param


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed, dtype=torch.float64):
    return torch.randn(shape, generator=gen(seed), dtype=dtype)


def vec(values, batch=None):
    """int64 [B] timestep vector; a scalar is repeated ``batch`` times."""
    if batch is not None:
        values = [values] * batch
    return torch.tensor(values, dtype=torch.int64)


# ----------------------------------------------------------------------------- independent formulas
def np_alpha(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ᾱ at each index, with ᾱ = 1 at the clean end (index −1)."""
    idx = np.asarray(idx)
    return np.where(idx >= 0, table[np.clip(idx, 0, None)], 1.0)


def per_sample(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def paper_x0(x, eps, a_t, clip=None):
    """x̂0 = (x_t − √(1−ᾱ_t)·ε)/√ᾱ_t (DDIM eq. 9 / DDPM eq. 15)."""
    a_t = per_sample(a_t, x.ndim)
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    return np.clip(x0, -clip, clip) if clip is not None else x0


def paper_ddim(x, eps, z, table, t, s, eta, clip=None):
    """DDIM (Song et al. 2021, eq. 12 with σ of eq. 16), float64, per sample."""
    x, eps, z = (np.asarray(v, dtype=np.float64) for v in (x, eps, z))
    a_t, a_s = np_alpha(table, t), np_alpha(table, s)
    sigma = eta * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)
    x0 = paper_x0(x, eps, a_t, clip)
    direction = np.sqrt(np.maximum(1 - a_s - sigma**2, 0.0))
    b = lambda v: per_sample(v, x.ndim)  # noqa: E731
    return b(np.sqrt(a_s)) * x0 + b(direction) * eps + b(sigma) * z


def skipped_posterior(x, eps, z, table, t, s, clip=None):
    """q(x_s | x_t, x̂0) for any s < t (docs/DESIGN.md §4, Markovian skipped-step), float64:
    α_{t|s} = ᾱ_t/ᾱ_s, β_{t|s} = 1 − α_{t|s};
    mean = √ᾱ_s·β_{t|s}/(1−ᾱ_t)·x̂0 + √α_{t|s}·(1−ᾱ_s)/(1−ᾱ_t)·x_t, var = (1−ᾱ_s)/(1−ᾱ_t)·β_{t|s}.
    With clipping only the x̂0 term sees the clip (x_t stays raw), as in Ho et al. / diffusers."""
    x, eps, z = (np.asarray(v, dtype=np.float64) for v in (x, eps, z))
    a_t, a_s = np_alpha(table, t), np_alpha(table, s)
    alpha_ts = a_t / a_s
    beta_ts = 1 - alpha_ts
    x0 = paper_x0(x, eps, a_t, clip)
    b = lambda v: per_sample(v, x.ndim)  # noqa: E731
    var = (1 - a_s) / (1 - a_t) * beta_ts
    return b(np.sqrt(a_s) * beta_ts / (1 - a_t)) * x0 + b(np.sqrt(alpha_ts) * (1 - a_s) / (1 - a_t)) * x + b(np.sqrt(var)) * z


def ho_posterior(x, eps, betas, t, clip=None):
    """q(x_{t−1} | x_t, x̂0) of Ho et al. eq. (7), built from the β table itself:
    α_t = 1−β_t, ᾱ_t = ∏α. Returns (μ̃, β̃) with β̃ per sample."""
    x, eps = np.asarray(x, np.float64), np.asarray(eps, np.float64)
    betas = np.asarray(betas, np.float64)
    abar = np.cumprod(1 - betas)
    t = np.asarray(t)
    beta_t = betas[t]
    alpha_t = 1 - beta_t
    abar_t = abar[t]
    abar_prev = np.where(t > 0, abar[np.maximum(t - 1, 0)], 1.0)
    x0 = paper_x0(x, eps, abar_t, clip)
    b = lambda v: per_sample(v, x.ndim)  # noqa: E731
    mean = b(np.sqrt(abar_prev) * beta_t / (1 - abar_t)) * x0 + b(np.sqrt(alpha_t) * (1 - abar_prev) / (1 - abar_t)) * x
    var = (1 - abar_prev) / (1 - abar_t) * beta_t
    return mean, var


def assert_close(got, expected, tol, what=""):
    got = got.detach().numpy() if isinstance(got, torch.Tensor) else np.asarray(got)
    err = np.max(np.abs(got - np.asarray(expected))) if got.size else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.1e}"


# ----------------------------------------------------------------------------- diffusers helpers
def diffusers_ddim(K, *, clip_sample=False, schedule="linear"):
    sched = DDIMScheduler(
        num_train_timesteps=T,
        beta_schedule=schedule,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
        clip_sample=clip_sample,
        clip_sample_range=1.0,
    )
    sched.set_timesteps(K)
    # identical float64 tables on both sides
    sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return sched, sched.alphas_cumprod


def diffusers_ddpm(*, clip_sample=False, schedule="linear"):
    sched = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=schedule,
        variance_type="fixed_small",
        clip_sample=clip_sample,
        clip_sample_range=1.0,
    )
    sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    return sched, sched.alphas_cumprod


class FixedNoise:
    """Stands in for diffusers' ``randn_tensor`` inside DDPMScheduler.step, so that diffusers
    adds exactly the noise we pass to stepdrop (diffusers draws it internally, with no
    ``variance_noise=`` argument on DDPMScheduler.step). Records how often it was called."""

    def __init__(self):
        self.z = None
        self.calls = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == tuple(self.z.shape) and dtype == self.z.dtype
        self.calls += 1
        return self.z.clone()


@pytest.fixture
def fixed_noise(monkeypatch):
    fn = FixedNoise()
    monkeypatch.setattr(ddpm_module, "randn_tensor", fn)
    return fn


# ----------------------------------------------------------------------------- DDIM vs diffusers
@pytest.mark.parametrize("K", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip_sample", [False, True], ids=["noclip", "clip"])
def test_ddim_matches_diffusers_on_uniform_trailing_plans(backend, K, eta, clip_sample):
    sched, table = diffusers_ddim(K, clip_sample=clip_sample)
    plan = [int(t) for t in sched.timesteps] + [CLEAN]
    assert plan[0] == T - 1 and all(a - b == T // K for a, b in zip(plan[:-2], plan[1:-1]))
    B = SHAPE[0]
    x = randn(SHAPE, 0)
    clipped_somewhere = False
    for k, (t, s) in enumerate(zip(plan[:-1], plan[1:])):
        eps = randn(SHAPE, 1000 + k)
        z = randn(SHAPE, 2000 + k)
        ref = sched.step(eps, t, x, eta=eta, variance_noise=z)
        out, x0 = fused_step(
            x, eps, table, vec(t, B), vec(s, B),
            noise=z if eta > 0 else None, solver="ddim", eta=eta,
            clip=1.0 if clip_sample else None, return_x0=True, backend=backend,
        )
        assert out.dtype == torch.float64
        assert_close(out, ref.prev_sample, 1e-6, f"x_s at t={t}")
        assert_close(x0, ref.pred_original_sample, 1e-6, f"x0 at t={t}")
        # much tighter than the 1e-6 asked for: same float64 arithmetic
        assert_close(out, ref.prev_sample, 1e-10 * max(1.0, float(x.abs().max())), f"x_s at t={t} (tight)")
        unclipped = predict_x0(x, eps, table, vec(t, B))
        clipped_somewhere |= bool((unclipped.abs() > 1).any())
        x = out
    if clip_sample:
        assert clipped_somewhere, "test inputs never exercised the clip"


def test_ddim_last_step_of_diffusers_is_to_clean():
    """Premise of the comparison above: with trailing spacing and set_alpha_to_one the last
    diffusers step goes to ᾱ=1, i.e. our s=-1, and returns x̂0 exactly."""
    sched, table = diffusers_ddim(10)
    x, eps = randn(SHAPE, 1), randn(SHAPE, 2)
    t_last = int(sched.timesteps[-1])
    ref = sched.step(eps, t_last, x, eta=0.0)
    torch.testing.assert_close(ref.prev_sample, ref.pred_original_sample, rtol=0, atol=1e-12)
    out = fused_step(x, eps, table, vec(t_last, 3), vec(CLEAN, 3))
    assert_close(out, ref.prev_sample, 1e-12)


# ----------------------------------------------------------------------------- DDPM vs diffusers
@pytest.mark.parametrize("clip_sample", [False, True], ids=["noclip", "clip"])
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_ddpm_matches_diffusers_adjacent_steps(backend, fixed_noise, clip_sample, schedule):
    sched, table = diffusers_ddpm(clip_sample=clip_sample, schedule=schedule)
    B = SHAPE[0]
    for i, t in enumerate([999, 998, 731, 500, 100, 10, 2, 1, 0]):
        x, eps = randn(SHAPE, 10 + i), randn(SHAPE, 100 + i)
        fixed_noise.z = randn(SHAPE, 200 + i)
        calls = fixed_noise.calls
        ref = sched.step(eps, t, x)
        assert fixed_noise.calls == calls + (1 if t > 0 else 0)
        s = t - 1  # t = 0 → -1 = CLEAN
        out, x0 = fused_step(
            x, eps, table, vec(t, B), vec(s, B), noise=fixed_noise.z, solver="ddpm",
            clip=1.0 if clip_sample else None, return_x0=True, backend=backend,
        )
        assert_close(out, ref.prev_sample, 1e-6, f"x_s at t={t}")
        assert_close(x0, ref.pred_original_sample, 1e-6, f"x0 at t={t}")
        assert_close(out, ref.prev_sample, 1e-11 * max(1.0, float(x0.abs().max())), f"x_s at t={t} (tight)")


CUSTOM_PLAN = [999, 950, 811, 640, 417, 300, 123, 64, 30, 7, 3]  # non-uniform, ends above 0


@pytest.mark.parametrize("clip_sample", [False, True], ids=["noclip", "clip"])
def test_ddpm_matches_diffusers_on_custom_nonuniform_plan(backend, fixed_noise, clip_sample):
    """diffusers' DDPMScheduler looks up prev_t per position of a custom plan, so it is a
    correct reference for skipped-step (Markovian) DDPM on arbitrary plans. At the last step
    (t=3 → clean) diffusers adds √(1e-20)·z (its clamp of a zero variance): 1e-10, far
    below the tolerance."""
    sched, table = diffusers_ddpm(clip_sample=clip_sample)
    sched.set_timesteps(timesteps=CUSTOM_PLAN)
    plan = CUSTOM_PLAN + [CLEAN]
    B = SHAPE[0]
    x = randn(SHAPE, 5)
    for k, (t, s) in enumerate(zip(plan[:-1], plan[1:])):
        assert int(sched.previous_timestep(t)) == s
        eps = randn(SHAPE, 300 + k)
        fixed_noise.z = randn(SHAPE, 400 + k)
        ref = sched.step(eps, t, x)
        out = fused_step(
            x, eps, table, vec(t, B), vec(s, B), noise=fixed_noise.z, solver="ddpm",
            clip=1.0 if clip_sample else None, backend=backend,
        )
        assert_close(out, ref.prev_sample, 1e-6, f"x_s at t={t} → {s}")
        x = out


# ----------------------------------------------------------------------------- non-uniform DDIM
NONUNIFORM_PLANS = [
    [999, 870, 600, 420, 250, 120, 50, 12, 3, CLEAN],  # arbitrary
    [int(round(999 * (i / 9) ** 2)) for i in range(9, 0, -1)] + [CLEAN],  # quadratic (DDIM paper)
]


@pytest.mark.parametrize("plan", NONUNIFORM_PLANS, ids=["arbitrary", "quadratic"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddim_nonuniform_plan_matches_paper(backend, plan, eta, clip):
    sched = NoiseSchedule.linear(T)
    table = sched.alphas_cumprod
    tab = table.numpy()
    B = SHAPE[0]
    x = randn(SHAPE, 7)
    for k, (t, s) in enumerate(zip(plan[:-1], plan[1:])):
        eps, z = randn(SHAPE, 500 + k), randn(SHAPE, 600 + k)
        expected = paper_ddim(x.numpy(), eps.numpy(), z.numpy(), tab, [t] * B, [s] * B, eta, clip)
        out = fused_step(
            x, eps, table, vec(t, B), vec(s, B), noise=z if eta > 0 else None,
            solver="ddim", eta=eta, clip=clip, backend=backend,
        )
        assert_close(out, expected, 1e-10 * max(1.0, np.abs(expected).max()), f"x_s at t={t} → {s}")
        x = out


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_diffusers_ddim_differs_on_nonuniform_plans(eta):
    """Documents the diffusers DDIM bug (docs/DESIGN.md §4): DDIMScheduler.step takes the previous
    timestep as t − T//K, so on a non-uniform plan it steps to the wrong ᾱ_s. stepdrop follows
    the plan (checked against the paper above); diffusers visibly departs from it."""
    plan = NONUNIFORM_PLANS[0]
    K = len(plan) - 1
    dsched, table = diffusers_ddim(K)
    tab = table.numpy()
    B = SHAPE[0]
    x = randn(SHAPE, 8)
    worst = 0.0
    for k, (t, s) in enumerate(zip(plan[:-1], plan[1:])):
        eps, z = randn(SHAPE, 700 + k), randn(SHAPE, 800 + k)
        ours = fused_step(x, eps, table, vec(t, B), vec(s, B), noise=z if eta > 0 else None, eta=eta, backend="torch")
        assert_close(ours, paper_ddim(x.numpy(), eps.numpy(), z.numpy(), tab, [t] * B, [s] * B, eta), 1e-8)
        theirs = dsched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        if max(t - T // K, CLEAN) != s:  # diffusers maps any negative prev to ᾱ = 1
            diff = float((theirs - ours).abs().max())
            assert diff > 1e-3, f"diffusers unexpectedly agrees at t={t} (its prev={t - T // K}, plan s={s})"
            worst = max(worst, diff)
        x = ours
    assert worst > 1e-3


# ----------------------------------------------------------------------------- DDPM == DDIM(η=1)
def _random_pairs(B, seed):
    """t uniform in [0, T−1], s uniform in [−1, t−1], plus edge cases (s = −1, s = t−1, t = 0, t = T−1)."""
    g = gen(seed)
    t = torch.randint(0, T, (B,), generator=g)
    s = (torch.rand(B, generator=g, dtype=torch.float64) * (t + 1)).floor().long() - 1
    t[:4] = torch.tensor([0, T - 1, T - 1, 500])
    s[:4] = torch.tensor([-1, -1, T - 2, 499])
    s[4:20] = CLEAN
    x = torch.randn((B, 3, 4, 3), generator=g, dtype=torch.float64)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    z = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return t, s, x, eps, z


@pytest.mark.parametrize("schedule", ["linear", "cosine", "scaled_linear"])
def test_ddpm_posterior_equals_ddim_eta_one(backend, schedule):
    """docs/DESIGN.md §4: the Markovian skipped-step posterior is DDIM with η = 1, for any s < t
    (with x̂0 unclipped: clipping breaks the identity, since DDPM keeps x_t where DDIM keeps ε)."""
    table = getattr(NoiseSchedule, schedule)(T).alphas_cumprod
    t, s, x, eps, z = _random_pairs(256, 11)
    ddpm = fused_step(x, eps, table, t, s, noise=z, solver="ddpm", backend=backend)
    ddim = fused_step(x, eps, table, t, s, noise=z, solver="ddim", eta=1.0, backend=backend)
    # the two forms differ only by rounding; scale by the size of the terms combined
    scale = max(1.0, float(predict_x0(x, eps, table, t).abs().max()))
    assert_close(ddpm, ddim, 1e-12 * scale, "ddpm vs ddim(eta=1)")
    # and both agree with the paper's DDIM form and the posterior form written here
    args = (x.numpy(), eps.numpy(), z.numpy(), table.numpy(), t.numpy(), s.numpy())
    assert_close(ddpm, paper_ddim(*args, 1.0), 1e-12 * scale, "ddpm vs paper DDIM(eta=1)")
    assert_close(ddpm, skipped_posterior(*args), 1e-12 * scale, "ddpm vs posterior")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("clip", [0.5, 1.0])
def test_ddpm_with_clip_matches_posterior(backend, schedule, clip):
    table = getattr(NoiseSchedule, schedule)(T).alphas_cumprod
    t, s, x, eps, z = _random_pairs(256, 12)
    args = (x.numpy(), eps.numpy(), z.numpy(), table.numpy(), t.numpy(), s.numpy())
    # x̂0 near the clip carries the cancellation error of x_t − √(1−ᾱ_t)·ε amplified by 1/√ᾱ_t
    scale = max(1.0, float(predict_x0(x, eps, table, t).abs().max()))
    ddpm = fused_step(x, eps, table, t, s, noise=z, solver="ddpm", clip=clip, backend=backend)
    assert_close(ddpm, skipped_posterior(*args, clip=clip), 1e-12 * scale, "ddpm (clipped x̂0) vs posterior")
    ddim = fused_step(x, eps, table, t, s, noise=z, solver="ddim", eta=1.0, clip=clip, backend=backend)
    assert_close(ddim, paper_ddim(*args, 1.0, clip), 1e-12 * scale, "ddim (clipped x̂0) vs paper")
    # the clip must make a difference here (otherwise this test would repeat the one above)
    unclipped = fused_step(x, eps, table, t, s, noise=z, solver="ddpm", backend=backend)
    assert float((unclipped - ddpm).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- DDIM(η=1), one step = DDPM posterior
@pytest.mark.parametrize("solver", ["ddim", "ddpm"])
def test_single_step_is_ho_posterior(backend, solver):
    """t → t−1 with DDIM η=1 (and with "ddpm") has mean μ̃ and variance β̃ of Ho et al. eq. (7),
    derived here from the β table (not from ᾱ)."""
    betas = np.linspace(1e-4, 0.02, T)  # Ho et al.'s schedule, computed independently
    table = torch.from_numpy(np.cumprod(1 - betas))
    ts = np.array([999, 998, 600, 250, 40, 5, 1, 0])
    B = len(ts)
    x = randn((B, 2, 3, 3), 21)
    eps = randn(x.shape, 22)
    mean, var = ho_posterior(x.numpy(), eps.numpy(), betas, ts)
    t, s = torch.from_numpy(ts), torch.from_numpy(ts - 1)
    kw = dict(solver=solver, eta=1.0, backend=backend)
    det = fused_step(x, eps, table, t, s, noise=torch.zeros_like(x), **kw)
    assert_close(det, mean, 1e-11 * max(1.0, np.abs(mean).max()), "posterior mean μ̃")
    ones = fused_step(x, eps, table, t, s, noise=torch.ones_like(x), **kw)
    coef = (ones - det).numpy()
    assert_close(coef, np.broadcast_to(per_sample(np.sqrt(var), coef.ndim), coef.shape), 1e-12, "noise coefficient √β̃")
    assert var[-1] == 0.0 and var[0] > 0.0  # t=0 → clean is deterministic


@pytest.mark.parametrize("t", [900, 300, 20, 1])
def test_ddim_eta_one_monte_carlo_posterior(backend, t):
    """Sample x_{t−1} many times from one (x_t, ε): empirical mean and variance match μ̃, β̃.
    N = 40,000 draws per element, 8 elements: the sample variance has relative s.d.
    √(2/(N−1)) ≈ 0.7 %; we allow 6 s.d. (mean: 6·√(β̃/N))."""
    betas = np.linspace(1e-4, 0.02, T)
    table = torch.from_numpy(np.cumprod(1 - betas))
    N, D = 40_000, 8
    x1, e1 = randn((1, D), 31), randn((1, D), 32)
    mean, var = ho_posterior(x1.numpy(), e1.numpy(), betas, np.array([t]))
    x, eps = x1.expand(N, D).contiguous(), e1.expand(N, D).contiguous()
    z = randn((N, D), 33)
    out = fused_step(x, eps, table, vec(t, N), vec(t - 1, N), noise=z, solver="ddim", eta=1.0, backend=backend)
    out = out.numpy()
    emp_mean, emp_var = out.mean(0), out.var(0, ddof=1)
    sd = math.sqrt(var[0])
    assert np.all(np.abs(emp_mean - mean[0]) <= 6 * sd / math.sqrt(N)), (emp_mean, mean[0])
    assert np.all(np.abs(emp_var / var[0] - 1) <= 6 * math.sqrt(2 / (N - 1))), (emp_var, var[0])


# ----------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_masked_samples_pass_through(backend, solver, eta):
    table = NoiseSchedule.linear(T).alphas_cumprod
    B = 5
    x, eps, z = randn((B, 3, 4), 41), randn((B, 3, 4), 42), randn((B, 3, 4), 43)
    active = torch.tensor([True, False, True, False, True])
    t = torch.tensor([700, CLEAN, 300, CLEAN, 0])
    s = torch.tensor([200, CLEAN, 299, CLEAN, CLEAN])
    noise = z if (solver == "ddpm" or eta > 0) else None
    out, x0 = fused_step(x, eps, table, t, s, noise=noise, active=active, solver=solver, eta=eta,
                         return_x0=True, backend=backend)
    assert torch.equal(out[~active], x[~active]), "inactive samples must be copied bit for bit"
    assert torch.equal(x0[~active], x[~active])
    idx = active.nonzero().flatten()
    alone = fused_step(x[idx], eps[idx], table, t[idx], s[idx], noise=None if noise is None else noise[idx],
                       solver=solver, eta=eta, backend=backend)
    assert_close(out[idx], alone, 1e-14, "active samples unaffected by the mask")
    all_off = fused_step(x, eps, table, t, s, noise=noise,
                         active=torch.zeros(B, dtype=torch.bool), solver=solver, eta=eta, backend=backend)
    assert torch.equal(all_off, x)


@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("clip", [None, 1.5])
def test_step_to_clean_returns_x0(backend, solver, eta, clip):
    table = NoiseSchedule.cosine(T).alphas_cumprod
    ts = torch.tensor([0, 1, 17, 500, 998, T - 1])
    B = len(ts)
    x, eps, z = randn((B, 2, 3), 51), randn((B, 2, 3), 52), randn((B, 2, 3), 53)
    out, x0 = fused_step(x, eps, table, ts, vec(CLEAN, B), noise=z if solver == "ddpm" or eta > 0 else None,
                         solver=solver, eta=eta, clip=clip, return_x0=True, backend=backend)
    expected = paper_x0(x.numpy(), eps.numpy(), table.numpy()[ts.numpy()], clip)
    scale = max(1.0, np.abs(expected).max())
    assert_close(out, expected, 1e-12 * scale, "x_{-1} = x̂0")
    assert_close(x0, expected, 1e-12 * scale, "returned x̂0")


@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)])
@pytest.mark.parametrize("clip", [None, 0.5, 1.0, 3.0])
def test_return_x0_is_predict_x0_and_clip_bounds(backend, solver, eta, clip):
    table = NoiseSchedule.linear(T).alphas_cumprod
    t = torch.tensor([999, 700, 50, 3])
    s = torch.tensor([900, 100, CLEAN, 2])
    B = len(t)
    x, eps, z = 2 * randn((B, 4, 4), 61), randn((B, 4, 4), 62), randn((B, 4, 4), 63)
    noise = z if solver == "ddpm" or eta > 0 else None
    out, x0 = fused_step(x, eps, table, t, s, noise=noise, solver=solver, eta=eta, clip=clip,
                         return_x0=True, backend=backend)
    assert_close(x0, predict_x0(x, eps, table, t, clip=clip), 1e-12 * 200, "x0 vs predict_x0")
    expected_x0 = paper_x0(x.numpy(), eps.numpy(), table.numpy()[t.numpy()], clip)
    assert_close(x0, expected_x0, 1e-10, "x0 vs paper")
    if clip is not None:
        assert float(x0.abs().max()) <= clip
        unclipped = paper_x0(x.numpy(), eps.numpy(), table.numpy()[t.numpy()])
        assert np.any(np.abs(unclipped) > clip), "inputs must exercise the clip"
    # the update uses the clipped x̂0: DDIM against the paper, DDPM against the posterior
    args = (x.numpy(), eps.numpy(), z.numpy(), table.numpy(), t.numpy(), s.numpy())
    expected = paper_ddim(*args, eta, clip) if solver == "ddim" else skipped_posterior(*args, clip)
    assert_close(out, expected, 1e-10, "x_s with clip")
    # return_x0=False returns the same x_s alone
    only = fused_step(x, eps, table, t, s, noise=noise, solver=solver, eta=eta, clip=clip, backend=backend)
    assert isinstance(only, torch.Tensor) and torch.equal(only, out)


def test_clip_changes_only_x0_term_for_ddpm(backend):
    """With clip, DDPM's c_x·x_t term must still use the raw x_t (Ho et al. / diffusers)."""
    table = NoiseSchedule.linear(T).alphas_cumprod
    x, eps, z = 3 * randn((2, 6), 71), randn((2, 6), 72), randn((2, 6), 73)
    t, s = torch.tensor([400, 400]), torch.tensor([350, 350])
    a_t, a_s = table[400].item(), table[350].item()
    x0c = np.clip(paper_x0(x.numpy(), eps.numpy(), np.array([a_t, a_t])), -1, 1)
    beta_ts = 1 - a_t / a_s
    var = (1 - a_s) / (1 - a_t) * beta_ts
    expected = (math.sqrt(a_s) * beta_ts / (1 - a_t)) * x0c + math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t) * x.numpy() \
        + math.sqrt(var) * z.numpy()
    out = fused_step(x, eps, table, t, s, noise=z, solver="ddpm", clip=1.0, backend=backend)
    assert_close(out, expected, 1e-12)


@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_float32_close_to_float64(backend, solver, eta):
    """float32 in → float32 out; error vs the float64 result within a measured bound: at most
    4× the error of an independent float32 evaluation of the same formula (numpy), plus a
    few float32 ulps of the result's size."""
    table = NoiseSchedule.linear(T).alphas_cumprod
    g = gen(81)
    B = 64
    t = torch.randint(1, T, (B,), generator=g)
    s = (torch.rand(B, generator=g, dtype=torch.float64) * (t + 1)).floor().long() - 1
    x64 = torch.randn((B, 3, 5), generator=g, dtype=torch.float64)
    e64 = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    z64 = torch.randn(x64.shape, generator=g, dtype=torch.float64)
    x32, e32, z32 = x64.float(), e64.float(), z64.float()
    noise = solver == "ddpm" or eta > 0
    kw = dict(solver=solver, eta=eta, return_x0=True, backend=backend)
    o64, x0_64 = fused_step(x32.double(), e32.double(), table, t, s, noise=z32.double() if noise else None, **kw)
    o32, x0_32 = fused_step(x32, e32, table, t, s, noise=z32 if noise else None, **kw)
    assert o32.dtype == torch.float32 and x0_32.dtype == torch.float32
    # independent float32 evaluation of the DDIM(η) / posterior (=DDIM η=1) formula
    e = 1.0 if solver == "ddpm" else eta
    tab32 = table.numpy().astype(np.float32)
    paper64 = paper_ddim(x32.numpy(), e32.numpy(), z32.numpy(), table.numpy(), t.numpy(), s.numpy(), e)
    a_t = np_alpha(tab32, t.numpy()).astype(np.float32)
    a_s = np_alpha(tab32, s.numpy()).astype(np.float32)
    sig = (np.float32(e) * np.sqrt((1 - a_s) / (1 - a_t)) * np.sqrt(1 - a_t / a_s)).astype(np.float32)
    b = lambda v: v.reshape(-1, 1, 1)  # noqa: E731
    x0n = (x32.numpy() - b(np.sqrt(1 - a_t)) * e32.numpy()) / b(np.sqrt(a_t))
    naive32 = b(np.sqrt(a_s)) * x0n + b(np.sqrt(np.maximum(1 - a_s - sig**2, 0))) * e32.numpy() + b(sig) * z32.numpy()
    assert naive32.dtype == np.float32
    ref = o64.numpy()
    assert_close(paper64, ref, 1e-9 * max(1.0, np.abs(ref).max()), "float64 sanity")
    naive_err = np.abs(naive32 - ref).max()
    ulp = np.finfo(np.float32).eps * np.abs(ref).max()
    err = np.abs(o32.numpy() - ref).max()
    assert err <= 4 * naive_err + 8 * ulp, f"float32 error {err:.2e} vs naive float32 {naive_err:.2e}, ulp {ulp:.2e}"
    x0_err = np.abs(x0_32.numpy() - x0_64.numpy()).max()
    assert x0_err <= 8 * np.finfo(np.float32).eps * max(1.0, np.abs(x0_64.numpy()).max())


@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 0.3), ("ddpm", 0.0)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_sample_pairs_equal_separate_calls(backend, solver, eta, dtype):
    table = NoiseSchedule.cosine(T).alphas_cumprod
    t = torch.tensor([999, 999, 640, 500, 37, 1, 0, 250])
    s = torch.tensor([998, CLEAN, 100, 499, 36, 0, CLEAN, 249])
    B = len(t)
    x, eps, z = (randn((B, 3, 3, 2), seed, dtype) for seed in (91, 92, 93))
    noise = z if solver == "ddpm" or eta > 0 else None
    batched, x0 = fused_step(x, eps, table, t, s, noise=noise, solver=solver, eta=eta, clip=2.0, return_x0=True,
                             backend=backend)
    for i in range(B):
        one, one_x0 = fused_step(x[i:i + 1], eps[i:i + 1], table, t[i:i + 1], s[i:i + 1],
                                 noise=None if noise is None else noise[i:i + 1], solver=solver, eta=eta, clip=2.0,
                                 return_x0=True, backend=backend)
        tol = 0.0 if dtype == torch.float64 else 4 * np.finfo(np.float32).eps * max(1.0, float(one.abs().max()))
        assert_close(batched[i:i + 1], one, max(tol, 1e-14 * max(1.0, float(one.abs().max()))), f"sample {i}")
        assert_close(x0[i:i + 1], one_x0, max(tol, 1e-14 * max(1.0, float(one_x0.abs().max()))), f"x0 {i}")
    # and each sample follows its own (t, s): compare with the paper (float64 only)
    if dtype == torch.float64:
        args = (x.numpy(), eps.numpy(), z.numpy(), table.numpy(), t.numpy(), s.numpy())
        expected = paper_ddim(*args, eta, 2.0) if solver == "ddim" else skipped_posterior(*args, 2.0)
        assert_close(batched, expected, 1e-10)


def test_backends_agree(backend):
    """Every available CPU backend equals the torch reference on a mixed batch."""
    table = NoiseSchedule.linear(T).alphas_cumprod
    g = gen(101)
    B = 33
    t = torch.randint(0, T, (B,), generator=g)
    s = (torch.rand(B, generator=g, dtype=torch.float64) * (t + 1)).floor().long() - 1
    active = torch.rand(B, generator=g) > 0.2
    for dtype in (torch.float64, torch.float32):
        x, eps, z = (torch.randn((B, 3, 7), generator=g, dtype=dtype) for _ in range(3))
        for solver, eta in (("ddim", 0.0), ("ddim", 0.4), ("ddpm", 0.0)):
            kw = dict(noise=z, active=active, solver=solver, eta=eta, clip=1.0, return_x0=True)
            a, a0 = fused_step(x, eps, table, t, s, backend=backend, **kw)
            r, r0 = fused_step(x, eps, table, t, s, backend="torch", **kw)
            tol = 1e-13 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(a, r, rtol=tol, atol=tol)
            torch.testing.assert_close(a0, r0, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- x̂0 and the forward process
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_predict_x0_is_the_fused_steps_x0_bit_for_bit(dtype, clip):
    """predict_x0 takes its coefficients from step_coefficients, so it is exactly the x̂0 that
    the reference step computes (one formula, not two that could drift apart)."""
    table = NoiseSchedule.cosine(T).alphas_cumprod
    t = torch.tensor([999, 998, 500, 17, 1, 0])
    s = torch.tensor([900, CLEAN, 499, 3, 0, CLEAN])
    x, eps = 2 * randn((6, 3, 4), 71, dtype), randn((6, 3, 4), 72, dtype)
    _, x0 = fused_step_reference(x, eps, table, t, s, clip=clip, return_x0=True)
    got = predict_x0(x, eps, table, t, clip=clip)
    assert got.dtype == dtype and torch.equal(got, x0)
    expected = paper_x0(x.double().numpy(), eps.double().numpy(), table.numpy()[t.numpy()], clip)
    scale = max(1.0, np.abs(expected).max())  # unclipped x̂0 at t = 999 is large (1/√ᾱ_t)
    assert_close(got.double(), expected, (1e-12 if dtype == torch.float64 else 1e-6) * scale, "predict_x0 vs paper")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("table_dtype", [torch.float64, torch.float32])
def test_q_sample_is_ho_eq_4_per_sample(dtype, table_dtype):
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), each sample with its own t, in x0's dtype."""
    betas = np.linspace(1e-4, 0.02, T)
    table64 = np.cumprod(1 - betas)  # independent of stepdrop
    table = torch.from_numpy(table64).to(table_dtype)
    t = torch.tensor([0, 999, 500, 500, 3])
    x0, eps = randn((5, 2, 3, 3), 81, dtype), randn((5, 2, 3, 3), 82, dtype)
    out = q_sample(x0, eps, table, t)
    assert out.dtype == dtype and out.shape == x0.shape
    a = per_sample(table.double().numpy()[t.numpy()], 4)
    expected = np.sqrt(a) * x0.double().numpy() + np.sqrt(1 - a) * eps.double().numpy()
    tol = {torch.float64: 1e-14, torch.float32: 1e-6, torch.float16: 4e-3}[dtype] * 4
    assert_close(out.double(), expected, tol, "q_sample")
    # per sample: each row uses its own ᾱ_t, and a one-element t applies to the whole batch
    for i in range(5):
        torch.testing.assert_close(q_sample(x0[i:i + 1], eps[i:i + 1], table, t[i:i + 1]), out[i:i + 1], rtol=0, atol=0)
    torch.testing.assert_close(q_sample(x0, eps, table, t[2:3]), q_sample(x0, eps, table, torch.full((5,), 500)),
                               rtol=0, atol=0)
