"""StepDropScheduler: stepdrop's policies and fused step inside an unchanged diffusers pipeline.

References are diffusers' own schedulers (DDIM "trailing", DDPM with custom timesteps) run in the
same pipeline with the same generator, and stepdrop's FusedSampler on the same initial noise.
A small randomly initialised UNet2DModel drifts to |x| ~ 600 over 10 DDIM steps, so the final
[0, 1] images are mostly saturated; the raw trajectories (every ``prev_sample``) are compared
too, relative to their magnitude. Runs in seconds on two CPU cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

from stepdrop import FusedSampler, get_policy  # noqa: E402
from stepdrop.models import DiffusersUNetAdapter  # noqa: E402
from stepdrop.diffusers_scheduler import StepDropScheduler  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BATCH = 2
SHAPE = (BATCH, 3, 16, 16)
DETERMINISTIC = ("uniform", "quadratic", "cosine", "logsnr", "importance", "noise_aware")
# float32 end to end; diffusers builds ᾱ in float32, stepdrop in float64: measured ≤ 5e-7 relative
RTOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A 16x16 UNet gains nothing from intra-op threads; on a busy 2-core machine they spin
    (this file: 15 s with one thread, over 60 s with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()


def run_pipeline(unet, scheduler, steps, seed=1):
    """DDPMPipeline as shipped; returns (images in [0, 1] [B, C, H, W], every raw prev_sample)."""
    trajectory = recorder(scheduler)
    pipe = DDPMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=BATCH, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                  output_type="pt").images
    return images, trajectory


def recorder(scheduler) -> list[torch.Tensor]:
    """Record each ``step``'s prev_sample (the instance's step is wrapped, the class untouched)."""
    out: list[torch.Tensor] = []
    step = scheduler.step

    def recording_step(*args, **kwargs):
        result = step(*args, **kwargs)
        out.append(result.prev_sample)
        return result

    scheduler.step = recording_step
    return out


def assert_close_relative(actual, expected, rtol=RTOL):
    scale = expected.abs().max().clamp(min=1.0)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"max error {err:.3g} relative to max |x| = {scale:.3g}"


def assert_trajectories_match(ours, theirs):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape and a.dtype == b.dtype, k
        assert_close_relative(a, b)


# ====================================================================== (a), (b): DDIM
@pytest.fixture(scope="module")
def uniform_ddim_run(unet):
    """Our scheduler (uniform, DDIM η = 0, K = 10) in DDPMPipeline, generator seed 1."""
    scheduler = StepDropScheduler(policy="uniform", solver="ddim", eta=0.0)
    images, traj = run_pipeline(unet, scheduler, 10, seed=1)
    return scheduler, images, traj


def test_uniform_ddim_equals_diffusers_ddim_trailing(unet, uniform_ddim_run):
    ours, images, traj = uniform_ddim_run
    theirs = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    ref_images, ref_traj = run_pipeline(unet, theirs, 10, seed=1)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.timesteps.dtype == torch.int64 and ours.num_inference_steps == 10
    assert_trajectories_match(traj, ref_traj)
    torch.testing.assert_close(images, ref_images, rtol=0, atol=1e-5)


def test_pipeline_runs_fused_sampler_math(unet, uniform_ddim_run):
    scheduler, images, traj = uniform_ddim_run
    noise = randn_tensor(SHAPE, generator=torch.Generator().manual_seed(1))  # what the pipeline drew
    sampler = FusedSampler(DiffusersUNetAdapter(unet), scheduler.schedule, solver="ddim")
    x, stats = sampler.sample(noise, scheduler.plan)
    assert stats.model_calls == 10
    assert_close_relative(traj[-1], x)
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_torch_backend_equals_default_backend(unet):
    a, traj_a = run_pipeline(unet, StepDropScheduler(policy="cosine", backend="auto"), 3)
    b, traj_b = run_pipeline(unet, StepDropScheduler(policy="cosine", backend="torch"), 3)
    assert_trajectories_match(traj_a, traj_b)


# ====================================================================== (c): every deterministic policy
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_policies_run_in_pipeline(unet, name):
    K = 3
    scheduler = StepDropScheduler(policy=name)
    images, traj = run_pipeline(unet, scheduler, K)
    expected = get_policy(name).plan(scheduler.schedule, K).row(0)
    assert scheduler.timesteps.tolist() == expected
    assert len(traj) == K and images.shape == SHAPE and torch.isfinite(images).all()


def test_non_uniform_plan_steps_by_position_not_stride(unet):
    """Each step goes to the plan's next entry (diffusers' DDIM would assume t − T/K)."""
    scheduler = StepDropScheduler(policy="quadratic")
    scheduler.set_timesteps(6)
    plan = scheduler.timesteps.tolist()
    assert len(set(a - b for a, b in zip(plan, plan[1:]))) > 1  # really non-uniform
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    table = scheduler.schedule.table()
    for t, s in zip(plan, plan[1:] + [-1]):
        out = scheduler.step(eps, torch.tensor(t), x)
        a_s = table[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
        # DDIM η = 0 keeps x̂0 and ε: x_s = √ᾱ_s x̂0 + √(1−ᾱ_s) ε
        expected = a_s.sqrt() * out.pred_original_sample.double() + (1 - a_s).sqrt() * eps.double()
        torch.testing.assert_close(out.prev_sample.double(), expected, rtol=1e-5, atol=1e-4)
        assert scheduler.previous_timestep(t) == s


def test_policy_kwargs_and_custom_timesteps():
    scheduler = StepDropScheduler(policy="importance", policy_kwargs={"middle_weight": 0.5})
    scheduler.set_timesteps(8)
    expected = get_policy("importance", middle_weight=0.5).plan(scheduler.schedule, 8).row(0)
    assert scheduler.timesteps.tolist() == expected
    scheduler.set_timesteps(timesteps=[999, 600, 250, 50])
    assert scheduler.timesteps.tolist() == [999, 600, 250, 50] and scheduler.num_inference_steps == 4
    assert scheduler.previous_timestep(50) == -1 and scheduler.previous_timestep(600) == 250
    scheduler.set_timesteps(timesteps=torch.tensor([999, 0, -1]))  # an explicit clean terminal is accepted
    assert scheduler.timesteps.tolist() == [999, 0]


def test_full_budget_is_plain_ddpm_chain():
    scheduler = StepDropScheduler(solver="ddpm")
    scheduler.set_timesteps(1000)
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))


def test_stochastic_policy_plan_is_seeded():
    K = 6
    scheduler = StepDropScheduler(policy="stepdrop", plan_seed=7)
    scheduler.set_timesteps(K)
    first = scheduler.timesteps.tolist()
    scheduler.set_timesteps(K)
    assert scheduler.timesteps.tolist() == first
    expected = get_policy("stepdrop").plan(scheduler.schedule, K, generator=torch.Generator().manual_seed(7)).row(0)
    assert first == expected
    scheduler.set_timesteps(K, generator=torch.Generator().manual_seed(8))
    expected = get_policy("stepdrop").plan(scheduler.schedule, K, generator=torch.Generator().manual_seed(8)).row(0)
    assert scheduler.timesteps.tolist() == expected
    exact = StepDropScheduler(policy="stepdrop_exact")
    exact.set_timesteps(K)
    assert exact.num_inference_steps == K


# ====================================================================== (d): DDPM
@pytest.mark.parametrize("clip_sample", [False, True])
def test_ddpm_solver_equals_diffusers_ddpm_custom_timesteps(unet, clip_sample):
    """Quadratic plan (non-uniform). Both draw the initial noise, then one z per step while the
    next timestep is ≥ 0, from the same generator in the same order: the streams line up
    (diffusers also draws at the last step when it is t > 0, after everything that matters,
    and adds a σ = √1e-20 from its variance clamp there: 1e-10, below the tolerance)."""
    K = 5
    ours = StepDropScheduler(policy="quadratic", solver="ddpm", clip_sample=clip_sample)
    images, traj = run_pipeline(unet, ours, K, seed=5)
    plan = ours.timesteps.tolist()
    assert plan[-1] > 0

    theirs = DDPMScheduler(clip_sample=clip_sample)
    theirs.set_timesteps(timesteps=plan)
    generator = torch.Generator().manual_seed(5)
    x = randn_tensor(SHAPE, generator=generator)
    ref_traj = []
    with torch.no_grad():
        for t in theirs.timesteps:
            x = theirs.step(unet(x, t).sample, t, x, generator=generator).prev_sample
            ref_traj.append(x)
    assert_trajectories_match(traj, ref_traj)
    torch.testing.assert_close(images, (x / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)


def test_ddpm_single_step_with_explicit_noise_equals_ddim_eta_one():
    """σ² of the DDPM posterior equals DDIM's at η = 1 (DESIGN §4), here through step()."""
    ddpm = StepDropScheduler(solver="ddpm")
    ddim = StepDropScheduler(solver="ddim", eta=1.0)
    for s in (ddpm, ddim):
        s.set_timesteps(timesteps=[900, 400, 30])
    gen = torch.Generator().manual_seed(0)
    x, eps, z = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) for _ in range(3))
    a = ddpm.step(eps, 400, x, variance_noise=z)
    b = ddim.step(eps, 400, x, variance_noise=z)
    torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample)
    # the means differ (the DDPM posterior mean uses x_t, DDIM's ε); the noise scales agree
    mean_a = ddpm.step(eps, 400, x, variance_noise=torch.zeros_like(z)).prev_sample
    mean_b = ddim.step(eps, 400, x, variance_noise=torch.zeros_like(z)).prev_sample
    torch.testing.assert_close(a.prev_sample - mean_a, b.prev_sample - mean_b)
    # σ = 0 at the clean end: that step draws nothing, so the generator's stream stays where
    # diffusers' DDPM (no draw at t = 0) leaves it
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    ddpm.step(eps, 30, x, generator=gen)
    assert torch.equal(gen.get_state(), state)
    ddpm.step(eps, 900, x, generator=gen)
    assert not torch.equal(gen.get_state(), state)


# ====================================================================== (e): config
def test_config_round_trip(tmp_path):
    scheduler = StepDropScheduler(
        num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        policy="importance", policy_kwargs={"middle_weight": 0.25}, solver="ddim", eta=0.5,
        clip_sample=True, clip_sample_range=2.0, backend="torch", plan_seed=3,
    )
    scheduler.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "StepDropScheduler" and saved["policy_kwargs"] == {"middle_weight": 0.25}
    loaded = StepDropScheduler.from_pretrained(tmp_path)
    for key in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "policy", "policy_kwargs",
                "solver", "eta", "clip_sample", "clip_sample_range", "backend", "plan_seed"):
        assert loaded.config[key] == scheduler.config[key], key
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    loaded.set_timesteps(7)
    scheduler.set_timesteps(7)
    assert torch.equal(loaded.timesteps, scheduler.timesteps)
    assert len(loaded) == 500


def test_trained_betas_round_trip(tmp_path):
    betas = torch.linspace(1e-3, 0.05, 50, dtype=torch.float64).tolist()
    scheduler = StepDropScheduler(num_train_timesteps=50, trained_betas=betas)
    scheduler.save_config(tmp_path)
    loaded = StepDropScheduler.from_pretrained(tmp_path)
    assert torch.equal(loaded.betas, torch.tensor(betas, dtype=torch.float64))


@pytest.mark.parametrize("source", [
    lambda: DDIMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False, timestep_spacing="trailing"),
    lambda: DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=800),
    lambda: DDPMScheduler(clip_sample=True, clip_sample_range=1.5, variance_type="fixed_small"),
])
def test_from_config_of_diffusers_schedulers(source):
    theirs = source()
    ours = StepDropScheduler.from_config(theirs.config)
    assert ours.config.num_train_timesteps == theirs.config.num_train_timesteps
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-6, atol=1e-7)
    # explicitly given keys carry over ("_use_default_values" ones take our defaults, as in diffusers)
    given = set(theirs.config) - set(theirs.config.get("_use_default_values", []))
    for key in {"clip_sample", "clip_sample_range", "beta_schedule"} & given:
        assert ours.config[key] == theirs.config[key], key
    assert ours.config.policy == "uniform"
    ours = StepDropScheduler.from_config(theirs.config, policy="logsnr", solver="ddpm")
    assert ours.config.policy == "logsnr" and ours.config.solver == "ddpm"


def test_from_config_of_pipeline_scheduler_and_swap(unet):
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.scheduler = StepDropScheduler.from_config(pipe.scheduler.config, policy="cosine")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(0), num_inference_steps=3,
                  output_type="np").images
    assert images.shape == (1, 16, 16, 3)


# ====================================================================== protocol details
def test_protocol_attributes_and_add_noise():
    scheduler = StepDropScheduler()
    assert scheduler.init_noise_sigma == 1.0 and scheduler.order == 1 and len(scheduler) == 1000
    assert "DDIMScheduler" in scheduler._compatibles
    x = torch.randn(SHAPE)
    assert scheduler.scale_model_input(x, 5) is x
    noise = torch.randn(SHAPE)
    t = torch.tensor([10, 900])
    torch.testing.assert_close(scheduler.add_noise(x, noise, t), DDPMScheduler().add_noise(x, noise, t))
    a = scheduler.alphas_cumprod[10]
    torch.testing.assert_close(scheduler.add_noise(x.double(), noise.double(), 10),
                               a.sqrt() * x.double() + (1 - a).sqrt() * noise.double())
    with pytest.raises(ValueError, match=r"\[0, 999\]"):
        scheduler.add_noise(x, noise, torch.tensor([0, 1000]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_add_noise_is_the_shared_q_sample(dtype, monkeypatch):
    """add_noise is stepdrop.ops.reference.q_sample on the float64 table (the forward-noising
    formula exists once, shared with training), bit for bit, per-sample and scalar t."""
    import stepdrop.diffusers_scheduler as mod
    from stepdrop.ops.reference import q_sample

    scheduler = StepDropScheduler(beta_schedule="squaredcos_cap_v2")
    x, noise = torch.randn(SHAPE).to(dtype), torch.randn(SHAPE).to(dtype)
    t = torch.tensor([3, 777])
    table = scheduler.alphas_cumprod
    assert torch.equal(scheduler.add_noise(x, noise, t), q_sample(x, noise, table, t))
    assert torch.equal(scheduler.add_noise(x, noise, 777), q_sample(x, noise, table, torch.tensor([777, 777])))
    calls = []
    monkeypatch.setattr(mod, "q_sample", lambda *a: calls.append(a) or q_sample(*a))
    scheduler.add_noise(x, noise, t)
    assert len(calls) == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_step_keeps_dtype(dtype):
    scheduler = StepDropScheduler(eta=0.3)
    scheduler.set_timesteps(4)
    x = torch.randn(SHAPE).to(dtype)
    out = scheduler.step(torch.randn(SHAPE).to(dtype), scheduler.timesteps[1], x,
                         generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    prev, x0 = scheduler.step(torch.randn(SHAPE).to(dtype), 249, x, return_dict=False)
    assert torch.isfinite(prev.float()).all() and prev.shape == SHAPE


def test_set_timesteps_device_argument():
    scheduler = StepDropScheduler()
    scheduler.set_timesteps(3, device="cpu")
    assert scheduler.timesteps.device.type == "cpu"
    if torch.cuda.is_available():
        scheduler.set_timesteps(3, device="cuda")
        assert scheduler.timesteps.device.type == "cuda"
        x = torch.randn(SHAPE, device="cuda")
        out = scheduler.step(torch.randn_like(x), scheduler.timesteps[0], x)
        assert out.prev_sample.device.type == "cuda"


# ====================================================================== (f): errors
def test_step_before_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        StepDropScheduler().step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))


def test_timestep_not_in_plan_names_it_and_the_plan():
    scheduler = StepDropScheduler()
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match=r"timestep 500 is not in the plan \[999, 749, 499, 249\]"):
        scheduler.step(torch.zeros(SHAPE), 500, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="single timestep"):
        scheduler.step(torch.zeros(SHAPE), torch.tensor([999, 999]), torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="shape of sample"):
        scheduler.step(torch.zeros(2, 6, 16, 16), 999, torch.zeros(SHAPE))


@pytest.mark.parametrize("name, kwargs, match", [
    ("stepdrop", {"per_sample": True}, "per_sample=True"),
    ("stepdrop_exact", {"per_sample": True}, "per_sample=True"),
    ("gradient_aware", {}, "FusedSampler"),
    ("combined", {}, "FusedSampler"),
    ("adaptive", {}, "FusedSampler"),
    ("no_such_policy", {}, "policy must be one of"),
])
def test_unsupported_policies(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepDropScheduler(policy=name, policy_kwargs=kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="euler"), "solver must be one of"),
    (dict(eta=1.5), "eta"),
    (dict(prediction_type="velocity"), "prediction_type must be one of"),
    (dict(backend="tpu"), "backend"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
    (dict(num_train_timesteps=10, trained_betas=[0.01] * 9), "trained_betas"),
    (dict(policy_kwargs={"middle_weight": 2.0}, policy="importance"), "middle_weight"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        StepDropScheduler(**kwargs)


def test_bad_set_timesteps():
    scheduler = StepDropScheduler()
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps()
    with pytest.raises(ValueError, match="exactly one"):
        scheduler.set_timesteps(3, timesteps=[999, 0])
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(1001)
    with pytest.raises(ValueError, match="strictly decreasing"):
        scheduler.set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="FusedSampler"):
        scheduler.set_timesteps(timesteps=[[999, 0], [999, 500]])


def test_diffusers_stays_optional():
    """``import stepdrop`` pulls in neither diffusers nor this module; without diffusers the
    module's ImportError names the extra."""
    code = (
        "import sys\n"
        "import stepdrop\n"
        "assert 'diffusers' not in sys.modules, 'import stepdrop imported diffusers'\n"
        "assert 'stepdrop.diffusers_scheduler' not in sys.modules\n"
        "sys.modules['diffusers'] = None\n"
        "try:\n"
        "    import stepdrop.diffusers_scheduler\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "stepdrop[diffusers]" in result.stdout


def test_from_config_refuses_a_zero_snr_schedule_it_cannot_reproduce():
    """diffusers' from_config drops undeclared keys; the scheduler declares this one so that a
    zero-terminal-SNR config is refused instead of silently sampling another schedule."""
    from diffusers import DDIMScheduler

    config = DDIMScheduler(rescale_betas_zero_snr=True).config
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        StepDropScheduler.from_config(config)


# ====================================================================== every solver of the registry
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "unipc", "unipc_3", "dpmpp_2m_sde"])
def test_multistep_solvers_in_the_pipeline_equal_the_sampler(unet, solver):
    """The scheduler keeps the solver's history between step() calls: DDPMPipeline with it
    equals FusedSampler on the same plan, noise and (for the SDE) step noise."""
    scheduler = StepDropScheduler(policy="logsnr", solver=solver)
    images, traj = run_pipeline(unet, scheduler, 6, seed=3)
    gen = torch.Generator().manual_seed(3)
    noise = randn_tensor(SHAPE, generator=gen)  # the pipeline's x_T; then the steps' noise, in order
    sampler = FusedSampler(DiffusersUNetAdapter(unet), scheduler.schedule, solver=solver)
    if sampler.stochastic:
        steps = iter([randn_tensor(SHAPE, generator=gen) for _ in range(5)] + [torch.zeros(SHAPE)])
        sampler._randn = lambda shape, run, out=None: next(steps)
    x, stats = sampler.sample(noise, scheduler.plan)
    assert stats.model_calls == 6 and len(traj) == 6
    assert_close_relative(traj[-1], x)


def test_multistep_history_restarts_with_a_new_run():
    """A second run of the same plan (or one that skips ahead) starts its history afresh, so
    two identical runs give identical results and a jump is a first-order step, not an
    extrapolation from unrelated samples."""
    scheduler = StepDropScheduler(policy="uniform", solver="dpmpp_3m")
    scheduler.set_timesteps(5)
    x_T = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))

    def model(x, t):
        return 0.2 * torch.tanh(x) + 1e-3 * t

    def run(start=0):
        x = x_T.clone()
        for t in scheduler.timesteps[start:]:
            x = scheduler.step(model(x, int(t)), t, x).prev_sample
        return x

    first, second = run(), run()
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    fresh = StepDropScheduler(policy="uniform", solver="ddim")
    fresh.set_timesteps(5)
    t = scheduler.timesteps[2]  # jump: dpmpp_3m restarts at first order, which is DDIM
    jumped = scheduler.step(model(x_T, int(t)), t, x_T).prev_sample
    torch.testing.assert_close(jumped, fresh.step(model(x_T, int(t)), t, x_T).prev_sample, rtol=1e-6, atol=1e-6)


def test_eta_is_a_setting_of_ddim_only():
    with pytest.raises(ValueError, match="eta must be 0 with solver='unipc'"):
        StepDropScheduler(solver="unipc", eta=0.3)
