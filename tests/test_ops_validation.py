"""``stepdrop.ops.fused_step`` rejects malformed input at the Python boundary with a
TypeError/ValueError whose message names the offending argument (docs/DESIGN.md §5)."""

from __future__ import annotations

import pytest
import torch

from stepdrop.ops import BACKENDS, CLEAN, SOLVERS, available_backends, fused_step
from stepdrop.schedule import NoiseSchedule

T = 50
B = 3
TABLE = NoiseSchedule.linear(T).alphas_cumprod


def good(**over):
    """A valid call's arguments, with overrides."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 3, generator=g, dtype=torch.float64)
    args = dict(
        x=x,
        eps=torch.randn(x.shape, generator=g, dtype=torch.float64),
        alphas_cumprod=TABLE,
        t=torch.tensor([40, 10, 0]),
        s=torch.tensor([20, 9, CLEAN]),
        noise=torch.randn(x.shape, generator=g, dtype=torch.float64),
        active=None,
        solver="ddim",
        eta=0.5,
        clip=None,
        backend="torch",
    )
    args.update(over)
    return args


def call(**over):
    a = good(**over)
    return fused_step(a.pop("x"), a.pop("eps"), a.pop("alphas_cumprod"), a.pop("t"), a.pop("s"), **a)


def test_good_call_runs():
    """Baseline for every test below: the unmodified arguments are accepted."""
    out = call()
    assert out.shape == (B, 2, 3) and torch.isfinite(out).all()


def raises(exc, name, **over):
    with pytest.raises(exc, match=name) as info:
        call(**over)
    return str(info.value)


# ----------------------------------------------------------------------------- x / eps / noise
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float16, torch.bfloat16, torch.bool])
def test_x_dtype(dtype):
    x = torch.zeros(B, 2, 3, dtype=dtype)
    msg = raises(TypeError, r"\bx\b", x=x, eps=x.clone(), noise=x.clone())
    assert "float32" in msg and "float64" in msg


def test_x_not_a_tensor():
    raises(TypeError, r"\bx\b", x=[[0.0]] * B)


def test_x_zero_dim():
    x = torch.tensor(1.0, dtype=torch.float64)
    raises(ValueError, r"\bx\b", x=x, eps=x.clone(), noise=None, eta=0.0)


def test_eps_shape():
    raises(ValueError, "eps", eps=torch.zeros(B, 2, 4, dtype=torch.float64))
    raises(ValueError, "eps", eps=torch.zeros(B, 6, dtype=torch.float64))


def test_eps_dtype():
    raises(TypeError, "eps", eps=torch.zeros(B, 2, 3, dtype=torch.float32))


def test_noise_shape():
    raises(ValueError, "noise", noise=torch.zeros(B + 1, 2, 3, dtype=torch.float64))


def test_noise_dtype():
    raises(TypeError, "noise", noise=torch.zeros(B, 2, 3, dtype=torch.float32))


@pytest.mark.parametrize("solver,eta", [("ddpm", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_noise_required(solver, eta):
    raises(ValueError, "noise", noise=None, solver=solver, eta=eta)


def test_noise_optional_for_deterministic_ddim():
    out = call(noise=None, eta=0.0)
    assert out.shape == (B, 2, 3)


# ----------------------------------------------------------------------------- table
def test_alphas_cumprod_bad():
    raises(TypeError, "alphas_cumprod", alphas_cumprod=TABLE.to(torch.int64))
    raises(ValueError, "alphas_cumprod", alphas_cumprod=TABLE.view(5, 10))
    raises(ValueError, "alphas_cumprod", alphas_cumprod=TABLE[:1], t=torch.zeros(B, dtype=torch.int64),
           s=torch.full((B,), CLEAN))


@pytest.mark.parametrize("backend", ["torch", *[b for b in ("cpu",) if b in available_backends("cpu")]])
@pytest.mark.parametrize(
    "value, where", [(1.0, 1), (1.0, 0), (0.0, 30), (-0.2, 45), (1.5, 5), (float("nan"), 40), (float("inf"), 12),
                     (float("-inf"), 7)],
    ids=["one", "one-first", "zero", "negative", "above-one", "nan", "inf", "-inf"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_alphas_cumprod_values_outside_0_1(backend, value, where, dtype):
    """A table entry outside (0, 1) — e.g. [.5, 1, 1, …], which made the step return NaN — is a
    ValueError naming alphas_cumprod and the entry, whichever entry the batch indexes."""
    table = TABLE.clone().to(dtype)
    table[where] = value
    msg = raises(ValueError, "alphas_cumprod", alphas_cumprod=table, backend=backend,
                 x=good()["x"].to(dtype), eps=good()["eps"].to(dtype), noise=good()["noise"].to(dtype))
    assert f"alphas_cumprod[{where}]" in msg and "(0, 1)" in msg


def test_alphas_cumprod_half_then_ones_used_to_give_nan():
    table = torch.tensor([0.5] + [1.0] * (T - 1), dtype=torch.float64)
    raises(ValueError, "alphas_cumprod", alphas_cumprod=table)
    # the whole open interval is accepted, right up to its ends
    edge = torch.linspace(1 - 2**-52, 2**-1000, T, dtype=torch.float64)
    assert torch.isfinite(call(alphas_cumprod=edge)).all()


# ----------------------------------------------------------------------------- t / s / active
@pytest.mark.parametrize("name", ["t", "s"])
def test_index_dtype(name):
    base = good()[name]
    for dtype in (torch.int32, torch.float32, torch.float64):
        raises(TypeError, rf"\b{name}\b", **{name: base.to(dtype)})
    raises(TypeError, rf"\b{name}\b", **{name: base.tolist()})


@pytest.mark.parametrize("name", ["t", "s"])
def test_index_length_and_rank(name):
    base = good()[name]
    raises(ValueError, rf"\b{name}\b", **{name: base[:2]})
    raises(ValueError, rf"\b{name}\b", **{name: torch.cat([base, base[:1]])})
    raises(ValueError, rf"\b{name}\b", **{name: base.view(B, 1)})
    raises(ValueError, rf"\b{name}\b", **{name: base[0]})


def test_active_dtype_and_length():
    raises(TypeError, "active", active=torch.ones(B, dtype=torch.int64))
    raises(TypeError, "active", active=torch.ones(B, dtype=torch.uint8))
    raises(ValueError, "active", active=torch.ones(B + 1, dtype=torch.bool))
    raises(ValueError, "active", active=torch.ones(B, 1, dtype=torch.bool))


@pytest.mark.parametrize("bad_t", [T, T + 7, -1, -5])
def test_t_out_of_range(bad_t):
    t = torch.tensor([40, bad_t, 0])
    s = torch.tensor([20, -1, CLEAN]) if bad_t >= 0 else torch.tensor([20, -2, CLEAN])
    msg = raises(ValueError, r"\bt\b", t=t, s=s)
    assert str(T - 1) in msg  # states the legal range


@pytest.mark.parametrize("t,s", [(10, 10), (10, 11), (0, 0), (T - 1, T - 1), (5, 40)])
def test_s_not_below_t(t, s):
    raises(ValueError, r"\bs\b", t=torch.tensor([40, t, 0]), s=torch.tensor([20, s, CLEAN]))


@pytest.mark.parametrize("s", [-2, -100])
def test_s_below_clean(s):
    raises(ValueError, r"\bs\b", s=torch.tensor([20, s, CLEAN]))


def test_index_checks_skip_inactive_samples():
    """Finished samples carry t = s = CLEAN; they are masked, so they are not errors …"""
    active = torch.tensor([True, False, True])
    out = call(t=torch.tensor([40, CLEAN, 0]), s=torch.tensor([20, CLEAN, CLEAN]), active=active)
    x = good()["x"]
    assert torch.equal(out[1], x[1])
    # … but the same indices on an active sample are
    raises(ValueError, r"\bt\b", t=torch.tensor([40, CLEAN, 0]), s=torch.tensor([20, CLEAN, CLEAN]))


# ----------------------------------------------------------------------------- scalars
def test_solver_unknown():
    msg = raises(ValueError, "solver", solver="euler")
    assert all(repr(name) in msg for name in ("ddim", "ddpm"))
    assert set(SOLVERS) == {"ddim", "ddpm"}


@pytest.mark.parametrize("eta", [-0.1, 1.0001, 2.0, float("nan"), float("inf")])
def test_eta_out_of_range(eta):
    raises(ValueError, "eta", eta=eta)


@pytest.mark.parametrize("eta", ["0.5", None, True])
def test_eta_type(eta):
    raises(TypeError, "eta", eta=eta)


@pytest.mark.parametrize("clip", [0.0, -1.0, float("nan")])
def test_clip_not_positive(clip):
    raises(ValueError, "clip", clip=clip)


def test_clip_type():
    raises(TypeError, "clip", clip="1")


# ----------------------------------------------------------------------------- backend / device
def test_backend_unknown():
    msg = raises(ValueError, "backend", backend="triton-ish")
    assert all(repr(name) in msg for name in BACKENDS)


def test_backend_cuda_on_cpu_tensors():
    if "cuda" in available_backends("cpu"):
        pytest.fail("the cuda backend must never be listed for CPU tensors")
    raises(ValueError, "backend", backend="cuda")


def test_backend_cpu_unavailable_or_runs():
    if "cpu" in available_backends("cpu"):
        assert call(backend="cpu").shape == (B, 2, 3)
    else:
        raises(ValueError, "backend", backend="cpu")


def test_devices_differ():
    """A tensor on another device is named in the error (the meta device stands in for a
    second device on machines without a GPU)."""
    a = good()
    for name in ("eps", "noise", "t", "s", "alphas_cumprod"):
        with pytest.raises(ValueError, match=name) as info:
            call(**{name: a[name].to("meta")})
        assert "device" in str(info.value)
    with pytest.raises(ValueError, match="active"):
        call(active=torch.ones(B, dtype=torch.bool, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_devices_differ_cuda():
    with pytest.raises(ValueError, match="eps"):
        call(eps=good()["eps"].cuda())


# ----------------------------------------------------------------------------- empty batch
@pytest.mark.parametrize("backend", available_backends("cpu"))
@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
def test_empty_batch(backend, solver, eta):
    x = torch.zeros(0, 2, 3, dtype=torch.float32)
    idx = torch.zeros(0, dtype=torch.int64)
    out = fused_step(x, x.clone(), TABLE, idx, idx, noise=x.clone(), solver=solver, eta=eta, backend=backend)
    assert out.shape == (0, 2, 3) and out.dtype == torch.float32
    out, x0 = fused_step(x, x.clone(), TABLE, idx, idx, noise=x.clone(), active=torch.zeros(0, dtype=torch.bool),
                         solver=solver, eta=eta, return_x0=True, backend=backend)
    assert out.shape == x0.shape == (0, 2, 3)
