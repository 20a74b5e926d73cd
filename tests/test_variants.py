"""Per-step call variants (stepdrop.variants): mixed resolution and deep-feature caching.

The references here are hand-written loops of the same mathematics (docs/DESIGN.md §4c): a
DDIM loop whose first calls run at the reduced size, then x̂0 upsampled and re-noised; and the
full network against its own shallow path given its own deep feature.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stepdrop import FusedSampler, NoiseSchedule, StepPlan, TinyUNet
from stepdrop.cost import gflops_per_call, gflops_per_variant
from stepdrop.ops.reference import predict_x0, q_sample
from stepdrop.runs import parse_spec
from stepdrop.solvers import SOLVERS
from stepdrop.variants import CallPlan, DeepCache, MixedResolution, Variant, Widths, parse_calls
from test_sampler import BACKENDS_HERE, gen

SCHEDULE = NoiseSchedule.linear(1000)


def unet(**kw) -> TinyUNet:
    torch.manual_seed(0)
    config = dict(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                  attention_resolutions=(8,), prediction_type="v_prediction")
    config.update(kw)
    return TinyUNet(**config).eval()


class Counted(torch.nn.Module):
    """A TinyUNet that counts its calls of every kind."""

    def __init__(self, net: TinyUNet):
        super().__init__()
        self.net, self.calls = net, 0
        self.sample_shape, self.prediction_type = net.sample_shape, net.prediction_type
        self.deep_branches = net.deep_branches

    def forward(self, x, t):
        self.calls += 1
        return self.net(x, t)

    def forward_cached(self, x, t, branch, feature=None):
        self.calls += 1
        return self.net.forward_cached(x, t, branch, feature)

    def check_resolution(self, h, w):
        return self.net.check_resolution(h, w)


# ====================================================================== the spec grammar
@pytest.mark.parametrize("text,plan", [
    ("", CallPlan()),
    ("+mixres(0.5,0.3)", CallPlan(MixedResolution(0.5, 0.3))),
    ("+cache(5)", CallPlan(cache=DeepCache(5))),
    ("+cache(5,0,quadratic)", CallPlan(cache=DeepCache(5, 0, "quadratic"))),
    ("+mixres(0.75,0.2)+cache(3,2)", CallPlan(MixedResolution(0.75, 0.2), DeepCache(3, 2))),
    ("+width(0.5)", CallPlan(width=Widths((0.5,)))),
    ("+cache(2,0)+width(1,0.5,0.25)", CallPlan(cache=DeepCache(2, 0), width=Widths((1.0, 0.5, 0.25)))),
])
def test_parse_calls_round_trips(text, plan):
    assert parse_calls(text) == plan
    assert parse_calls(plan.text) == plan


@pytest.mark.parametrize("text,match", [
    ("+mixres(0.5)", r"mixres takes \(scale, fraction\)"),
    ("+mixres(1.5,0.3)", r"mixres scale must be in \(0.0, 1.0\), got 1.5"),
    ("+mixres(0.5,0)", r"mixres fraction must be in \(0.0, 1.0\)"),
    ("+mixres(a,0.3)", "mixres scale must be a number, got 'a'"),
    ("+cache(0)", r"cache interval must be in \[1, inf\], got 0"),
    ("+cache(2.5)", "cache interval must be an integer"),
    ("+cache(2,-1)", r"cache branch must be in \[0, inf\]"),
    ("+cache(2,1,sometimes)", r"cache refresh must be one of \('uniform', 'quadratic'\)"),
    ("+depth(0.5)", "unknown variant 'depth'; legal: mixres, cache, width"),
    ("+width(0)", r"width must be in \(0.0, 1.0\], got 0.0"),
    ("+width(a)", "width must be a number, got 'a'"),
    ("+cache(2)+cache(3)", "names cache twice"),
    ("mixres(0.5,0.3)", r"must be a list of \+mixres"),
])
def test_parse_calls_refuses_bad_specs_by_name(text, match):
    with pytest.raises(ValueError, match=match):
        parse_calls(text)


def test_run_spec_carries_calls():
    spec = parse_spec("ddim:quadratic-25+mixres(0.5,0.3)+cache(5)@100")
    assert (spec.solver, spec.policy, spec.budget, spec.num_samples) == ("ddim", "quadratic", 25, 100)
    assert spec.call_plan == CallPlan(MixedResolution(0.5, 0.3), DeepCache(5))
    assert parse_spec("ddim-10").calls == ""


# ====================================================================== which call runs where
def test_variants_per_column():
    assert CallPlan().variants(3) == (Variant(),) * 3
    mixres = CallPlan(MixedResolution(0.5, 0.3)).variants(10)
    assert [v.scale for v in mixres] == [0.5] * 3 + [1.0] * 7
    assert MixedResolution(0.5, 0.01).low_res_calls(10) == 1 and MixedResolution(0.5, 0.99).low_res_calls(10) == 9
    cache = CallPlan(cache=DeepCache(3)).variants(8)
    assert [v.shallow for v in cache] == [False, True, True, False, True, True, False, True]
    quad = DeepCache(4, refresh="quadratic").refresh_columns(20)
    assert 0 in quad and len(quad) == 5
    gaps = [b - a for a, b in zip(sorted(quad), sorted(quad)[1:])]
    assert gaps == sorted(gaps, reverse=True)  # denser toward the clean end
    both = CallPlan(MixedResolution(0.5, 0.5), DeepCache(10)).variants(6)
    # the first call at each size is a full one: a feature of the other size cannot be reused
    assert [(v.scale, v.shallow) for v in both] == [(0.5, False), (0.5, True), (0.5, True), (1.0, False), (1.0, True),
                                                    (1.0, True)]
    with pytest.raises(ValueError, match="at least 2 model calls"):
        MixedResolution(0.5, 0.5).low_res_calls(1)


# ====================================================================== the network's variants
@pytest.mark.parametrize("num_res_blocks", [1, 2])
def test_shallow_path_with_its_own_feature_is_the_full_network(num_res_blocks):
    model = unet(num_res_blocks=num_res_blocks)
    x, t = torch.randn(3, 1, 16, 16, generator=gen(0)), torch.tensor([999, 500, 3])
    with torch.no_grad():
        full = model(x, t)
        for branch in range(model.deep_branches):
            out, feature = model.forward_cached(x, t, branch)
            assert torch.equal(out, full)
            shallow, kept = model.forward_cached(x, t, branch, feature)
            torch.testing.assert_close(shallow, full, rtol=0, atol=1e-6)
            assert kept is feature
            # another timestep: only the shallow path sees it
            moved, _ = model.forward_cached(x, t.flip(0), branch, feature)
            assert not torch.allclose(moved, full)


def test_variant_flops_are_counted_apart():
    model = unet()
    flops = gflops_per_variant(model, parse_calls("+mixres(0.5,0.5)+cache(2,0)"))
    assert set(flops) == {"full", "shallow", "res0.5", "res0.5+shallow"}
    assert flops["full"] == pytest.approx(gflops_per_call(model))
    assert flops["shallow"] < 0.5 * flops["full"]
    assert flops["res0.5"] == pytest.approx(flops["full"] / 4, rel=0.1)  # convolutions scale with H·W
    assert flops["res0.5+shallow"] < flops["res0.5"]


def test_model_checks_its_sizes_and_branches():
    model = unet()
    model.check_resolution(8, 8)
    assert model(torch.randn(2, 1, 8, 8), 10).shape == (2, 1, 8, 8)
    for h, w in ((6, 6), (8, 12), (32, 32)):
        with pytest.raises(ValueError, match="TinyUNet runs at a square size"):
            model.check_resolution(h, w)
    with pytest.raises(ValueError, match=r"^x must have shape \[B, 1, 16, 16\]"):
        model(torch.randn(2, 1, 6, 6), 10)
    with pytest.raises(ValueError, match=r"branch must be in \[0, 5\], got 6"):
        model.forward_cached(torch.randn(1, 1, 16, 16), 10, 6)
    with pytest.raises(ValueError, match="feature must be the"):
        model.forward_cached(torch.randn(2, 1, 16, 16), 10, 1, torch.zeros(3, 16, 16, 16))


# ====================================================================== the sampler
def test_plain_call_plan_changes_nothing():
    model = unet()
    a, sa = FusedSampler(model, SCHEDULE, solver="unipc").sample(3, "uniform", budget=6, generator=gen(1))
    b, sb = FusedSampler(model, SCHEDULE, solver="unipc", calls="").sample(3, "uniform", budget=6, generator=gen(1))
    c, _ = FusedSampler(model, SCHEDULE, solver="unipc", calls="+cache(1)").sample(3, "uniform", budget=6,
                                                                                 generator=gen(1))
    assert torch.equal(a, b) and torch.equal(a, c)  # cache(1): a full call every step
    assert sa.variants == ("full",) * 6 and torch.equal(sa.calls_by_variant()["full"], sa.nfe)


def _mixres_reference(model, x_T, timesteps, low: int, scale_size, full_size, generator, clip=None):
    """DDIM (η = 0), written out: calls 0..low−1 at the reduced size, then x̂0 of call low−1
    upsampled (bilinear) and re-noised to t_low with the next draw of ``generator``."""
    table = SCHEDULE.alphas_cumprod.double()
    x = x_T.double()
    ts = list(timesteps) + [-1]
    for k, t in enumerate(ts[:-1]):
        s = ts[k + 1]
        tt = torch.full((x.shape[0],), t)
        eps_model = model(x.to(next(model.parameters()).dtype), tt).double()
        a_t = table[t]
        eps = a_t.sqrt() * eps_model + (1 - a_t).sqrt() * x  # v → ε
        x0 = predict_x0(x, eps, table, tt, clip)
        a_s = table[s] if s >= 0 else torch.tensor(1.0, dtype=torch.float64)
        if k == low - 1:
            up = F.interpolate(x0, size=full_size, mode="bilinear", align_corners=False)
            z = torch.randn((x.shape[0], 1, *full_size), generator=generator, dtype=torch.float64)
            x = q_sample(up, z, table, torch.full((x.shape[0],), s))
        else:
            x = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
    return x


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_mixed_resolution_equals_the_written_out_loop(backend):
    model = unet().double()
    timesteps = [999, 800, 600, 400, 200, 50]
    sampler = FusedSampler(model, SCHEDULE, calls="+mixres(0.5,0.5)", backend=backend)
    x_T = torch.randn(2, 1, 8, 8, generator=gen(3), dtype=torch.float64)
    generator = gen(4)
    out, stats = sampler.sample(x_T, StepPlan.from_timesteps(timesteps, 1000), generator=generator)
    ref = _mixres_reference(model, x_T, timesteps, 3, (8, 8), (16, 16), gen(4))
    assert out.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert stats.variants == ("res0.5",) * 3 + ("full",) * 3
    assert stats.nfe.tolist() == [6, 6]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("calls", ["+mixres(0.5,0.4)", "+cache(3,0)", "+mixres(0.5,0.3)+cache(2,1,quadratic)"])
def test_every_solver_and_per_sample_plans_run_with_variants(solver, calls):
    model = Counted(unet())
    sampler = FusedSampler(model, SCHEDULE, solver=solver, calls=calls)
    rows = torch.tensor([[999, 700, 400, 100, 20, -1], [999, 500, 200, -1, -1, -1], [800, 300, 10, 5, -1, -1]])
    images, stats = sampler.sample(3, StepPlan(rows, 1000), generator=gen(2))
    assert images.shape == (3, 1, 16, 16) and torch.isfinite(images).all()
    assert stats.nfe.tolist() == [5, 3, 4] and model.calls == stats.model_calls == 5
    by_variant = stats.calls_by_variant()
    assert torch.equal(sum(by_variant.values()), stats.nfe)  # every counted call has one variant
    again, _ = FusedSampler(model, SCHEDULE, solver=solver, calls=calls).sample(3, StepPlan(rows, 1000),
                                                                                 generator=gen(2))
    assert torch.equal(images, again)  # seeded: the switch noise too


def test_multistep_history_restarts_at_the_switch(monkeypatch):
    sampler = FusedSampler(unet(), SCHEDULE, solver="unipc", calls="+mixres(0.5,0.5)")
    starts = []
    original = type(sampler._solver).start
    monkeypatch.setattr(type(sampler._solver), "start", lambda self, x: starts.append(tuple(x.shape)) or
                        original(self, x))
    sampler.sample(2, "uniform", budget=6, generator=gen(0))
    assert starts == [(2, 1, 8, 8), (2, 1, 16, 16)]


def test_online_policy_runs_with_variants():
    images, stats = FusedSampler(unet(), SCHEDULE, calls="+mixres(0.5,0.3)+cache(2)").sample(
        4, "adaptive", budget=8, generator=gen(0))
    assert images.shape == (4, 1, 16, 16) and torch.isfinite(images).all()
    assert torch.equal(sum(stats.calls_by_variant().values()), stats.nfe)


@pytest.mark.parametrize("calls,match", [
    ("+mixres(0.3,0.5)", r"mixres scale 0.3 gives 5x5 from 16x16, which the model cannot take"),
    ("+cache(2,9)", r"cache branch must be in \[0, 5\], got 9"),
])
def test_bad_variants_are_refused_before_any_call(calls, match):
    model = Counted(unet())
    with pytest.raises(ValueError, match=match):
        FusedSampler(model, SCHEDULE, calls=calls).sample(2, "uniform", budget=4)
    assert model.calls == 0


def test_models_without_variants_are_refused_by_name():
    def plain(x, t):
        return torch.zeros_like(x)

    plain.sample_shape = (1, 8, 8)
    for calls, what in (("+mixres(0.5,0.5)", "check_resolution"), ("+cache(2)", "forward_cached")):
        with pytest.raises(ValueError, match=what):
            FusedSampler(plain, SCHEDULE, calls=calls).sample(2, "uniform", budget=4)
    with pytest.raises(TypeError, match="calls must be"):
        FusedSampler(plain, SCHEDULE, calls=5)


def test_mixres_noise_must_be_at_the_reduced_size():
    sampler = FusedSampler(unet(), SCHEDULE, calls="+mixres(0.5,0.5)")
    with pytest.raises(ValueError, match=r"noise_or_batch must be x_T at the reduced size .*\[B, 1, 8, 8\]"):
        sampler.sample(torch.randn(2, 1, 16, 16), "uniform", budget=4)


# ====================================================================== diffusers' UNet2DModel
def _diffusers_unet(**kw):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    config = dict(sample_size=16, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32), layers_per_block=1,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    config.update(kw)
    return diffusers.UNet2DModel(**config).eval()


def test_diffusers_unet_split_equals_its_own_forward():
    from stepdrop.models import DiffusersUNetAdapter

    unet = _diffusers_unet()
    adapter = DiffusersUNetAdapter(unet)
    x, t = torch.randn(2, 1, 16, 16, generator=gen(0)), torch.tensor([900, 30])
    with torch.no_grad():
        full = unet(x, t).sample
        assert adapter.deep_branches == 3
        for branch in range(3):
            out, feature = adapter.forward_cached(x, t, branch)
            assert torch.equal(out, full)
            shallow, _ = adapter.forward_cached(x, t, branch, feature)
            torch.testing.assert_close(shallow, full, rtol=0, atol=1e-6)
    adapter.check_resolution(8, 8)
    with pytest.raises(ValueError, match=r"sizes up to its sample_size 16x16 that its downsamplings divide \(4\)"):
        adapter.check_resolution(6, 6)


def test_diffusers_unet_samples_with_variants_and_refuses_skip_blocks():
    unet = _diffusers_unet()
    images, stats = FusedSampler(unet, SCHEDULE, calls="+mixres(0.5,0.5)+cache(2,0)").sample(
        2, "uniform", budget=6, generator=gen(0))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert stats.variants == ("res0.5", "res0.5+shallow", "res0.5", "full", "full", "shallow")  # refresh at 0, 2, 4
    flops = gflops_per_variant(FusedSampler(unet, SCHEDULE).model, parse_calls("+cache(2,0)"))
    assert flops["shallow"] < 0.6 * flops["full"]
    skip = _diffusers_unet(block_out_channels=(16, 32), down_block_types=("SkipDownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "SkipUpBlock2D"))
    with pytest.raises(ValueError, match="cannot split this UNet2DModel: its SkipDownBlock2D carries an image skip"):
        FusedSampler(skip, SCHEDULE, calls="+cache(2)").sample(2, "uniform", budget=4)


def test_spec_lists_split_outside_parentheses():
    from stepdrop.runs import split_specs

    assert split_specs("ddim-50+cache(3,0), unipc:logsnr-10+mixres(0.5,0.3)+cache(2,1,quadratic),ddim-10,") == [
        "ddim-50+cache(3,0)", "unipc:logsnr-10+mixres(0.5,0.3)+cache(2,1,quadratic)", "ddim-10"]


def test_an_online_run_that_ends_early_still_returns_full_size_images():
    """Every row may end during the low-resolution phase: the loop goes on to the switch."""
    from stepdrop import Adaptive

    images, stats = FusedSampler(unet(), SCHEDULE, calls="+mixres(0.5,0.9)").sample(
        2, Adaptive(tol=1e6), budget=10, generator=gen(0))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
