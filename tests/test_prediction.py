"""Prediction types (ε, v, x0): the conversions against their definitions, the sampler with an
exact Gaussian model written in each parameterisation (every solver, policy kind and backend
must give the same samples), diffusers' DDIMScheduler and DPMSolverMultistepScheduler as peers
in float64, StepDropScheduler, and the arguments."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stepdrop import FusedSampler, NoiseSchedule, StepPlan, StochasticStepDrop, TinyUNet
from stepdrop.ops.reference import q_sample
from stepdrop.prediction import (
    PREDICTION_TYPES,
    EpsilonView,
    resolve_prediction_type,
    to_eps,
    to_x0,
    training_target,
)
from test_sampler import BACKENDS_HERE, gen

T = 1000
SCHEDULE = NoiseSchedule.linear(T)
TABLE = SCHEDULE.table("cpu", torch.float64)
SHAPE = (3, 5, 7)  # odd sizes on purpose


def vec(value: int, batch: int) -> torch.Tensor:
    return torch.full((batch,), value, dtype=torch.int64)


class GaussianModel(nn.Module):
    """The exact prediction for data x0 ~ N(μ, v·I), written in one parameterisation:
    E[x0 | x_t] = μ + α·v·(x_t − α·μ)/(α²·v + σ²), E[ε | x_t] = σ·(x_t − α·μ)/(α²·v + σ²),
    and v = α·E[ε] − σ·E[x0]. The three are one function, so every sampler must give the same
    samples from each."""

    sample_shape = SHAPE
    mu, var = 0.3, 0.25

    def __init__(self, prediction_type: str, dtype=torch.float64):
        super().__init__()
        self.prediction_type = prediction_type
        self.scale = nn.Parameter(torch.ones((), dtype=dtype), requires_grad=False)

    def forward(self, x, t):
        a = TABLE[t].view(-1, 1, 1, 1).to(x.dtype)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        centred = (x - alpha * self.mu) / (a * self.var + 1 - a)
        eps, x0 = sigma * centred, self.mu + alpha * self.var * centred
        out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[self.prediction_type]
        return self.scale * out


# ----------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_target_converts_back_to_eps_and_x0(prediction_type, dtype):
    """For x_t = α·x0 + σ·ε, the training target of each type converts back to that ε and x0,
    at every timestep from 0 to T−1 (float32: to float32 rounding, the x0 of ε at t = T−1
    divided by α ≈ 0.006)."""
    B = 64
    t = torch.cat([torch.tensor([0, 1, T - 2, T - 1]), torch.randint(0, T, (B - 4,), generator=gen(0))])
    x0 = torch.rand(B, *SHAPE, generator=gen(1), dtype=torch.float64).mul(2).sub(1).to(dtype)
    eps = torch.randn(B, *SHAPE, generator=gen(2), dtype=torch.float64).to(dtype)
    x_t = q_sample(x0, eps, TABLE, t)
    out = training_target(x0, eps, TABLE, t, prediction_type)
    assert out.dtype == dtype and out.shape == x0.shape
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=0, atol=1e-4)
    torch.testing.assert_close(to_eps(out, x_t, TABLE, t, prediction_type).to(dtype), eps, **tol)
    if prediction_type != "epsilon":  # x0 of ε divides by α: float32 loses 1/α ≈ 157 × ulp at t = T − 1
        torch.testing.assert_close(to_x0(out, x_t, TABLE, t, prediction_type).to(dtype), x0, **tol)
    else:
        torch.testing.assert_close(to_x0(out, x_t, TABLE, t, prediction_type).double(), x0.double(),
                                   rtol=0, atol=1e-12 if dtype == torch.float64 else 3e-4 * 157)


def test_v_is_diffusers_definition():
    """v = α·ε − σ·x0 (diffusers' ``get_velocity``), written out here by hand."""
    x0 = torch.randn(4, *SHAPE, generator=gen(3), dtype=torch.float64)
    eps = torch.randn(4, *SHAPE, generator=gen(4), dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    a = TABLE[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(training_target(x0, eps, TABLE, t, "v_prediction"), a.sqrt() * eps - (1 - a).sqrt() * x0,
                               rtol=0, atol=1e-15)
    assert training_target(x0, eps, TABLE, t, "epsilon") is eps
    assert training_target(x0, eps, TABLE, t, "sample") is x0


def test_to_eps_of_epsilon_is_the_output_itself():
    out = torch.randn(2, *SHAPE)
    assert to_eps(out, torch.randn(2, *SHAPE), TABLE, vec(5, 2), "epsilon") is out


def test_non_contiguous_and_half_output():
    """A strided output and a float16 output: ε is computed in float32 against the full-precision x."""
    x = torch.randn(3, 7, 5, 2, generator=gen(5)).transpose(1, 2)  # [3, 5, 7, 2] strided
    t = torch.tensor([999, 400, 3])
    out = torch.randn(3, 7, 5, 2, generator=gen(6)).transpose(1, 2)
    expected = to_eps(out.double(), x.double(), TABLE, t, "v_prediction")
    got = to_eps(out, x, TABLE, t, "v_prediction")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6)
    half = to_eps(out.half(), x, TABLE, t, "v_prediction")
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), to_eps(out.half().double(), x.double(), TABLE, t, "v_prediction"),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- the sampler
CASES = [
    dict(solver="ddim", plan="uniform", budget=10),
    dict(solver="ddim", eta=0.6, plan="quadratic", budget=7),
    dict(solver="ddpm", plan="logsnr", budget=12),
    dict(solver="dpmpp_2m", plan="uniform", budget=10),
    dict(solver="ddim", plan=StochasticStepDrop(profile="cosine", per_sample=True), budget=8),
    dict(solver="dpmpp_2m", plan="adaptive", budget=12),
    dict(solver="ddim", plan="gradient_aware", budget=6),
    dict(solver="ddim", plan="uniform", budget=10, clip=1.0),
]


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['solver']}-{getattr(c['plan'], 'name', c['plan'])}"
                         f"{'-clip' if c.get('clip') else ''}{'-eta' if c.get('eta') else ''}")
def test_same_samples_in_every_parameterisation(backend, case):
    """One exact Gaussian model as ε, v and x0: the same samples and the same visited timesteps,
    for deterministic and stochastic solvers, per-sample plans, the online adaptive loop and the
    gradient-aware policy (whose pilot probes ∂ε/∂x_t through EpsilonView)."""
    case = dict(case)
    plan, budget = case.pop("plan"), case.pop("budget")
    x = torch.randn(5, *SHAPE, generator=gen(7), dtype=torch.float64)
    results = {}
    for ptype in PREDICTION_TYPES:
        sampler = FusedSampler(GaussianModel(ptype), SCHEDULE, backend=backend, **case)
        assert sampler.prediction_type == ptype
        results[ptype] = sampler.sample(x.clone(), plan, budget=budget, generator=gen(8))
    ref, ref_stats = results["epsilon"]
    assert torch.isfinite(ref).all()
    for ptype in ("v_prediction", "sample"):
        out, stats = results[ptype]
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-9, msg=ptype)
        assert torch.equal(stats.timesteps, ref_stats.timesteps) and torch.equal(stats.nfe, ref_stats.nfe)


@pytest.mark.parametrize("ptype", ["v_prediction", "sample"])
def test_float32_model_close_to_float64(ptype):
    """The conversion uses the full-precision state x, so a float32 model stays at float32 rounding."""
    x = torch.randn(5, *SHAPE, generator=gen(9), dtype=torch.float64)
    out64, _ = FusedSampler(GaussianModel(ptype), SCHEDULE).sample(x, "uniform", budget=25)
    out32, _ = FusedSampler(GaussianModel(ptype, torch.float32), SCHEDULE).sample(x.float(), "uniform", budget=25)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out64, rtol=0, atol=2e-5)


def test_the_exact_gaussian_model_reaches_its_ode_solution():
    """What the three samples must agree on: DDIM at 200 calls on the exact model is the
    probability-flow ODE's closed-form solution x0 = μ + √v/√(ᾱ_T·v + 1 − ᾱ_T)·(x_T − α_T·μ)."""
    x = torch.randn(16, *SHAPE, generator=gen(10), dtype=torch.float64)
    a = TABLE[T - 1]
    exact = GaussianModel.mu + GaussianModel.var**0.5 / (a * GaussianModel.var + 1 - a).sqrt() \
        * (x - a.sqrt() * GaussianModel.mu)
    out, _ = FusedSampler(GaussianModel("v_prediction"), SCHEDULE, solver="dpmpp_2m").sample(x, "logsnr", budget=200)
    torch.testing.assert_close(out, exact, rtol=0, atol=5e-4)  # measured 1.4e-4 (its first-order last step)


def test_epsilon_view_equals_the_conversion():
    model = GaussianModel("sample")
    view = EpsilonView(model, SCHEDULE.alphas_cumprod, "sample")
    x = torch.randn(3, *SHAPE, generator=gen(11), dtype=torch.float64)
    t = torch.tensor([0, 300, 999])
    torch.testing.assert_close(view(x, t), GaussianModel("epsilon")(x, t), rtol=0, atol=1e-10)
    torch.testing.assert_close(view(x, 300), GaussianModel("epsilon")(x, vec(300, 3)), rtol=0, atol=1e-10)
    assert view.prediction_type == "epsilon" and view.source_prediction_type == "sample"
    assert view.sample_shape == SHAPE and list(view.parameters()) == list(model.parameters())


# ----------------------------------------------------------------------------- the model property
def test_tiny_unet_carries_its_prediction_type():
    kw = dict(in_channels=1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(),
              image_size=8)
    model = TinyUNet(**kw, prediction_type="v_prediction")
    assert model.prediction_type == "v_prediction" and model.config["prediction_type"] == "v_prediction"
    assert TinyUNet.from_config(model.config).prediction_type == "v_prediction"
    legacy = {k: v for k, v in model.config.items() if k != "prediction_type"}  # a file from before the key
    assert TinyUNet.from_config(legacy).prediction_type == "epsilon"
    assert FusedSampler(model, SCHEDULE).prediction_type == "v_prediction"
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*'epsilon', 'v_prediction', 'sample'.*'v'"):
        TinyUNet(**kw, prediction_type="v")


def test_resolve_prediction_type():
    assert resolve_prediction_type(lambda x, t: x, None) == "epsilon"
    assert resolve_prediction_type(lambda x, t: x, "sample") == "sample"
    assert resolve_prediction_type(GaussianModel("v_prediction"), None) == "v_prediction"
    assert resolve_prediction_type(GaussianModel("v_prediction"), "v_prediction") == "v_prediction"
    with pytest.raises(ValueError, match=r"prediction_type='epsilon' contradicts the model, which predicts "
                                         r"'v_prediction'"):
        FusedSampler(GaussianModel("v_prediction"), SCHEDULE, prediction_type="epsilon")
    with pytest.raises(ValueError, match=r"prediction_type must be one of .*got 'x0'"):
        FusedSampler(lambda x, t: x, SCHEDULE, prediction_type="x0")
    with pytest.raises(ValueError, match=r"the model's prediction_type must be one of"):
        FusedSampler(GaussianModel("velocity"), SCHEDULE)


def test_a_function_model_set_by_hand():
    """A plain function has no attribute: the type is set by hand, and then used."""
    exact = GaussianModel("sample")
    x = torch.randn(2, *SHAPE, generator=gen(12), dtype=torch.float64)
    by_hand, _ = FusedSampler(lambda x, t: exact(x, t), SCHEDULE, prediction_type="sample").sample(
        x, "uniform", budget=5)
    reference, _ = FusedSampler(exact, SCHEDULE).sample(x, "uniform", budget=5)
    assert by_hand.dtype == torch.float32  # a function has no parameters: float32 state
    torch.testing.assert_close(by_hand.double(), reference, rtol=0, atol=1e-5)
    wrong, _ = FusedSampler(lambda x, t: exact(x, t), SCHEDULE).sample(x, "uniform", budget=5)
    assert (wrong.double() - reference).abs().max() > 0.1  # read as ε, the same output is another model


# ----------------------------------------------------------------------------- the peers
class SmoothModel(nn.Module):
    """A non-linear model output, read as any type (it is just a function of (x, t)); its float64
    parameter makes the sampler run in float64."""

    sample_shape = SHAPE

    def __init__(self, prediction_type):
        super().__init__()
        self.prediction_type = prediction_type
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64), requires_grad=False)

    def forward(self, x, t):
        return self.scale * (0.3 * torch.tanh(x) + 0.1 * torch.cos(t.to(x.dtype) / 150).view(-1, 1, 1, 1))


smooth = SmoothModel


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize("K", [4, 10])  # strides that divide T: diffusers steps t → t − T//K
def test_matches_diffusers_ddim(prediction_type, K):
    """diffusers' DDIMScheduler (trailing, ᾱ_final = 1) on our float64 table: the same trajectory
    in float64."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="linear", prediction_type=prediction_type,
                                    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(K)
    sched.alphas_cumprod = TABLE.clone()  # diffusers builds ᾱ in float32; ours is float64
    model = smooth(prediction_type)
    x = torch.randn(4, *SHAPE, generator=gen(13), dtype=torch.float64)
    expected = x.clone()
    for t in sched.timesteps:
        expected = sched.step(model(expected, vec(int(t), 4)), t, expected).prev_sample
    ours, stats = FusedSampler(model, SCHEDULE).sample(x.clone(), "uniform", budget=K)
    assert stats.timesteps[0, :-1].tolist() == sched.timesteps.tolist()
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-10)


@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_matches_diffusers_dpmsolver_multistep(prediction_type):
    """diffusers' DPM-Solver++(2M) with v and x0 models. diffusers rounds x_t to float32 inside
    each step (its upcast line), so the match is to float32 precision, as for ε
    (test_multistep.py)."""
    diffusers = pytest.importorskip("diffusers")
    K = 10
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="linear", algorithm_type="dpmsolver++", solver_order=2,
        prediction_type=prediction_type, timestep_spacing="trailing", final_sigmas_type="zero",
        lower_order_final=True)
    sched.set_timesteps(K)
    sigmas = ((1 - TABLE[sched.timesteps]) / TABLE[sched.timesteps]).sqrt()
    sched.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    model = smooth(prediction_type)
    x = torch.randn(4, *SHAPE, generator=gen(14), dtype=torch.float64)
    expected = x.clone()
    for t in sched.timesteps:
        expected = sched.step(model(expected, vec(int(t), 4)), t, expected).prev_sample
    ours, _ = FusedSampler(model, SCHEDULE, solver="dpmpp_2m").sample(x.clone(), "uniform", budget=K)
    torch.testing.assert_close(ours, expected, rtol=4e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_stepdrop_scheduler_equals_the_sampler(prediction_type):
    """StepDropScheduler with prediction_type converts like FusedSampler: the same trajectory."""
    pytest.importorskip("diffusers")
    from stepdrop.diffusers_scheduler import StepDropScheduler

    sched = StepDropScheduler(policy="quadratic", prediction_type=prediction_type)
    sched.set_timesteps(6)
    model = smooth(prediction_type)
    x = torch.randn(3, *SHAPE, generator=gen(15), dtype=torch.float64)
    ours = x.clone()
    for t in sched.timesteps:
        ours = sched.step(model(ours, vec(int(t), 3)), t, ours).prev_sample
    sampler = FusedSampler(model, NoiseSchedule.from_diffusers_config(sched.config))
    expected, _ = sampler.sample(x.clone(), sched.plan)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)


def test_from_diffusers_pipeline_reads_the_scheduler_config():
    diffusers = pytest.importorskip("diffusers")
    from stepdrop.models.adapters import from_diffusers_pipeline

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"))
    sched = diffusers.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    model, schedule = from_diffusers_pipeline(diffusers.DDIMPipeline(unet=unet, scheduler=sched))
    assert model.prediction_type == "v_prediction" and model.unet is unet
    torch.testing.assert_close(schedule.alphas_cumprod, sched.alphas_cumprod.double(), rtol=0, atol=1e-6)
    assert FusedSampler(model, schedule).prediction_type == "v_prediction"
    with pytest.raises(TypeError, match="pipeline must have a .unet and a .scheduler"):
        from_diffusers_pipeline(object())
