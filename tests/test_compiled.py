"""compile_model / CompiledModel: the channels-last and Inductor paths give the eager model's
outputs (odd batches, non-contiguous input, float64), NCHW-contiguous, without touching the
user's module; attributes are forwarded; the compile time is recorded once; bad modes fail."""

from __future__ import annotations

import pytest
import torch

from stepdrop import FusedSampler, NoiseSchedule
from stepdrop.checkpoint import load_pretrained
from stepdrop.compiled import COMPILE_MODES, CompiledModel, compile_model
from stepdrop.models import TinyUNet

# The embedded model's architecture at a small width, so that the file runs in seconds.
SMALL = dict(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
             attention_resolutions=(8,))


def small_unet(dtype: torch.dtype = torch.float32) -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(**SMALL).to(dtype).eval()


def inputs(batch: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, 16, 16, generator=g, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def snapshot(model: torch.nn.Module) -> dict[str, tuple[int, tuple[int, ...], torch.Tensor]]:
    return {n: (p.data_ptr(), p.stride(), p.detach().clone()) for n, p in model.named_parameters()}


# ====================================================================== channels_last
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("batch", [1, 3])
def test_channels_last_equals_eager(batch, dtype, tol):
    model = small_unet(dtype)
    fast = compile_model(model, "channels_last")
    x, t = inputs(batch, dtype)
    with torch.no_grad():
        ref = model(x, t)
        out = fast(x, t)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous()  # NCHW, as the fused-step kernels expect
    torch.testing.assert_close(out, ref, rtol=0, atol=tol)
    assert fast.compile_seconds == 0.0


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_channels_last_non_contiguous_input(layout):
    model = small_unet()
    fast = compile_model(model, "channels_last")
    x, t = inputs(3)
    if layout == "transposed":  # same values, strides of an [B, C, W, H] tensor
        y = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:  # every other sample and column of a bigger tensor
        big = torch.zeros(6, 1, 16, 32)
        big[::2, :, :, ::2] = x
        y = big[::2, :, :, ::2]
    assert not y.is_contiguous() and torch.equal(y, x)
    with torch.no_grad():
        out = fast(y, t)
        ref = model(x, t)
    assert out.is_contiguous()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["channels_last", "inductor"])
def test_user_model_is_not_mutated(mode):
    model = small_unet()
    before = snapshot(model)
    fast = compile_model(model, mode)  # inductor compiles lazily: nothing runs here
    assert fast.inner is not model
    for name, p in model.named_parameters():
        ptr, stride, value = before[name]
        assert p.data_ptr() == ptr and p.stride() == stride and p.is_contiguous()
        assert torch.equal(p, value)
    weights = [p for p in fast.inner.parameters() if p.ndim == 4]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    assert not all(p.is_contiguous() for p in weights)  # (a 1-channel conv is both)


def test_attributes_are_forwarded():
    model = small_unet()
    fast = compile_model(model, "channels_last")
    assert fast.sample_shape == model.sample_shape == (1, 16, 16)
    assert fast.prediction_type == model.prediction_type
    assert fast.config == model.config
    p = next(fast.parameters())
    assert (p.device, p.dtype) == (torch.device("cpu"), torch.float32)
    assert sum(q.numel() for q in fast.parameters()) == sum(q.numel() for q in model.parameters())
    assert list(fast.state_dict()) == [f"inner.{k}" for k in model.state_dict()]  # the weights once
    assert fast.num_parameters() == model.num_parameters()  # a method, looked up on the copy
    with pytest.raises(AttributeError, match="submodule"):
        fast.conv_in  # noqa: B018 — submodules are reached through .inner
    with pytest.raises(AttributeError, match="no_such_thing"):
        fast.no_such_thing  # noqa: B018
    assert not hasattr(compile_model(torch.nn.Conv2d(1, 1, 1), "channels_last"), "sample_shape")


def test_forwarded_methods_return_contiguous_outputs():
    model = small_unet()
    fast = compile_model(model, "channels_last")
    if not hasattr(model, "forward_cached"):
        pytest.skip("this TinyUNet has no forward_cached")
    x, t = inputs(3)
    with torch.no_grad():
        ref_eps, ref_feature = model.forward_cached(x, t, 0)
        eps, feature = fast.forward_cached(x, t, 0)
    assert eps.is_contiguous() and feature.is_contiguous()
    torch.testing.assert_close(eps, ref_eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(feature, ref_feature, rtol=0, atol=1e-5)


def test_none_returns_the_model_and_wrapper_is_eager():
    model = small_unet()
    assert compile_model(model, "none") is model
    wrapped = CompiledModel(model, "none")  # for uniform benchmarking
    assert wrapped.inner is model and not wrapped.channels_last
    x, t = inputs(3)
    with torch.no_grad():
        assert torch.equal(wrapped(x, t), model(x, t))
    assert wrapped.warm_up(x, t) == 0.0 == wrapped.compile_seconds


# ====================================================================== inductor
@pytest.mark.slow
def test_inductor_equals_eager_and_records_compile_time():
    """One compile (20 to 50 s on 2 CPU cores with a cold Inductor cache): it must work here, so
    this fails, not skips."""
    model = small_unet()
    fast = compile_model(model, "inductor")
    assert fast.channels_last  # on the CPU, compiled in channels-last
    assert fast.compile_seconds == 0.0
    x, t = inputs(3)
    with torch.no_grad():
        ref = model(x, t)
        out = fast(x, t)  # the first call compiles
        first = fast.compile_seconds
        assert first > 0.0
        out2 = fast(x, t)
        assert fast.warm_up(x, t) == first == fast.compile_seconds
    assert out.is_contiguous()
    # Inductor fuses and reorders reductions (group norm, softmax): float32 rounding, not exact
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)


# ====================================================================== errors
@pytest.mark.parametrize("bad", ["max-autotune", "reduce-overhead", "", None, "Inductor"])
def test_bad_mode_names_compile_and_the_choices(bad):
    model = small_unet()
    for build in (compile_model, CompiledModel):
        with pytest.raises(ValueError, match="compile must be one of") as info:
            build(model, bad)
        assert str(COMPILE_MODES) in str(info.value)


def test_non_module_is_refused():
    with pytest.raises(TypeError, match="nn.Module"):
        CompiledModel(lambda x, t: x, "channels_last")


# ====================================================================== with the sampler
def test_fused_sampler_with_channels_last_model_equals_eager():
    # The embedded model (a v-prediction one: prediction_type goes through the wrapper). Its
    # images lie in about [-1, 1]; an untrained UNet's grow to hundreds over the steps, where
    # float32 rounding alone exceeds the 1e-4 below.
    model = load_pretrained("fashion-mnist").model.eval()
    schedule = NoiseSchedule.linear(1000)
    noise = torch.randn(3, *model.sample_shape, generator=torch.Generator().manual_seed(1))
    ref, ref_stats = FusedSampler(model, schedule).sample(noise, "uniform", budget=10,
                                                          generator=torch.Generator().manual_seed(2))
    out, stats = FusedSampler(compile_model(model, "channels_last"), schedule).sample(
        noise, "uniform", budget=10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    assert stats.nfe.tolist() == ref_stats.nfe.tolist() == [10] * 3


def test_fused_sampler_compile_argument():
    from stepdrop import FusedSampler, NoiseSchedule
    from stepdrop.checkpoint import load_pretrained

    loaded = load_pretrained("fashion-mnist")
    model = loaded.model.eval()
    eager, _ = FusedSampler(model, loaded.schedule).sample(2, "uniform", budget=4, generator=torch.Generator().manual_seed(0))
    sampler = FusedSampler(model, loaded.schedule, compile="channels_last", calls="+cache(2,0)")
    fast, stats = sampler.sample(2, "uniform", budget=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampler.model, CompiledModel) and stats.variants == ("full", "shallow", "full", "shallow")
    plain_cached, _ = FusedSampler(model, loaded.schedule, calls="+cache(2,0)").sample(
        2, "uniform", budget=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast, plain_cached, rtol=0, atol=1e-4)  # the shallow path through the copy
    assert not torch.equal(fast, eager)
    with pytest.raises(ValueError, match=r"compile must be one of \('none', 'channels_last', 'inductor'\)"):
        FusedSampler(model, NoiseSchedule.linear(1000), compile="max")
