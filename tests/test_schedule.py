"""NoiseSchedule: ᾱ tables against independent numpy computations and against diffusers.

Every expected value here is computed independently of ``stepdrop.schedule`` (numpy in
float64 from the papers' formulas, or diffusers' own schedulers), never read back from it.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from stepdrop.schedule import NoiseSchedule

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

SIZES = [2, 7, 1000, 4000]


# ----------------------------------------------------------------------------- numpy references
def np_linear(T, b0=1e-4, b1=0.02):
    """Ho et al. 2020: β linear, ᾱ_t = ∏_{s≤t}(1−β_s)."""
    return np.cumprod(1.0 - np.linspace(b0, b1, T, dtype=np.float64))


def np_scaled_linear(T, b0=0.00085, b1=0.012):
    """Latent diffusion: √β linear."""
    return np.cumprod(1.0 - np.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=np.float64) ** 2)


def np_cosine(T, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021 eq. 17: ᾱ(t)=f(t)/f(0), β_t = min(1 − ᾱ_t/ᾱ_{t−1}, max_beta)."""
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    grid = np.arange(T + 1, dtype=np.float64) / T
    betas = np.minimum(1.0 - f(grid[1:]) / f(grid[:-1]), max_beta)
    return np.cumprod(1.0 - betas)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


# ----------------------------------------------------------------------------- tables
@pytest.mark.parametrize("T", SIZES)
def test_linear_matches_numpy(T):
    sch = NoiseSchedule.linear(T)
    assert sch.num_timesteps == T
    assert sch.alphas_cumprod.dtype == torch.float64 and sch.alphas_cumprod.shape == (T,)
    np.testing.assert_allclose(as_np(sch.alphas_cumprod), np_linear(T), rtol=1e-13, atol=0)
    sch2 = NoiseSchedule.linear(T, beta_start=3e-4, beta_end=0.05)
    np.testing.assert_allclose(as_np(sch2.alphas_cumprod), np_linear(T, 3e-4, 0.05), rtol=1e-13, atol=0)


@pytest.mark.parametrize("T", SIZES)
def test_scaled_linear_matches_numpy(T):
    sch = NoiseSchedule.scaled_linear(T)
    np.testing.assert_allclose(as_np(sch.alphas_cumprod), np_scaled_linear(T), rtol=1e-13, atol=0)


@pytest.mark.parametrize("T", SIZES)
def test_cosine_matches_numpy(T):
    sch = NoiseSchedule.cosine(T)
    np.testing.assert_allclose(as_np(sch.alphas_cumprod), np_cosine(T), rtol=1e-12, atol=1e-300)
    sch2 = NoiseSchedule.cosine(T, s=0.02, max_beta=0.5)
    np.testing.assert_allclose(as_np(sch2.alphas_cumprod), np_cosine(T, 0.02, 0.5), rtol=1e-12, atol=1e-300)


def test_cosine_follows_the_continuous_formula_where_unclipped():
    """Away from the clip, ᾱ_t = f((t+1)/T)/f(0) exactly (product telescopes)."""
    T, s = 1000, 0.008
    sch = NoiseSchedule.cosine(T)
    f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f((t + 1) / T) / f(0) for t in range(T - 50)])
    np.testing.assert_allclose(as_np(sch.alphas_cumprod[: T - 50]), expected, rtol=1e-10)


@pytest.mark.parametrize("T", SIZES)
def test_betas_and_cumprod_consistent(T):
    sch = NoiseSchedule.linear(T)
    a = as_np(sch.alphas_cumprod)
    betas = as_np(sch.betas)
    assert np.all(np.diff(a) < 0), "ᾱ must be strictly decreasing"
    ratio = np.concatenate([[a[0]], a[1:] / a[:-1]])
    np.testing.assert_allclose(ratio, 1 - betas, rtol=1e-12)


# ----------------------------------------------------------------------------- diffusers configs
DIFFUSERS_CONFIGS = [
    dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=7, beta_schedule="linear", beta_start=0.01, beta_end=0.3),
    dict(num_train_timesteps=2, beta_schedule="scaled_linear", beta_start=0.01, beta_end=0.2),
    dict(num_train_timesteps=4000, beta_schedule="squaredcos_cap_v2"),
    dict(num_train_timesteps=4000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
]


def _float32_cumprod_tolerance(T: int) -> float:
    # diffusers accumulates the product in float32 (≈T rounding errors of 2^-24 each);
    # stepdrop accumulates the same float32 betas in float64.
    return 4 * T * 2.0**-24


@pytest.mark.parametrize("cfg", DIFFUSERS_CONFIGS, ids=lambda c: f"{c['beta_schedule']}-T{c['num_train_timesteps']}")
@pytest.mark.parametrize("as_object", [False, True], ids=["dict", "config-object"])
def test_from_diffusers_config_matches_diffusers(cfg, as_object):
    ref = DDPMScheduler(**cfg)
    config = ref.config if as_object else dict(cfg)
    sch = NoiseSchedule.from_diffusers_config(config)
    T = cfg["num_train_timesteps"]
    assert sch.num_timesteps == T
    # β is the same float32 computation, so it matches bit for bit
    np.testing.assert_array_equal(as_np(sch.betas), as_np(ref.betas.double()))
    # ᾱ: diffusers' float32 table, to float32 precision …
    np.testing.assert_allclose(
        as_np(sch.alphas_cumprod), as_np(ref.alphas_cumprod.double()), rtol=_float32_cumprod_tolerance(T), atol=0
    )
    # … and exactly the float64 product of diffusers' betas
    np.testing.assert_allclose(
        as_np(sch.alphas_cumprod), as_np(torch.cumprod(1 - ref.betas.double(), 0)), rtol=1e-13, atol=0
    )
    # the DDIM scheduler builds the same table from the same config
    ddim = DDIMScheduler(**cfg)
    np.testing.assert_allclose(
        as_np(sch.alphas_cumprod), as_np(ddim.alphas_cumprod.double()), rtol=_float32_cumprod_tolerance(T), atol=0
    )


def test_from_diffusers_config_trained_betas():
    rng = np.random.default_rng(0)
    betas = np.sort(rng.uniform(1e-4, 0.05, size=50)).tolist()
    ref = DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
    sch = NoiseSchedule.from_diffusers_config(ref.config)
    np.testing.assert_allclose(as_np(sch.alphas_cumprod), as_np(ref.alphas_cumprod.double()), rtol=1e-5, atol=0)
    np.testing.assert_allclose(as_np(sch.alphas_cumprod), np.cumprod(1 - np.array(betas)), rtol=1e-13)


def test_from_diffusers_config_default_is_linear_1000():
    sch = NoiseSchedule.from_diffusers_config({})
    ref = DDPMScheduler()
    np.testing.assert_allclose(as_np(sch.alphas_cumprod), as_np(ref.alphas_cumprod.double()), rtol=1e-4)


def test_from_diffusers_config_rejects_unknown_beta_schedule():
    with pytest.raises(ValueError, match="beta_schedule"):
        NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=10, beta_schedule="sigmoid"))


def test_from_diffusers_config_rejects_bad_num_train_timesteps():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=1))
    with pytest.raises(TypeError, match="num_train_timesteps"):
        NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=10.5))


def test_from_alphas_cumprod_keeps_table():
    a = torch.from_numpy(np_cosine(37))
    sch = NoiseSchedule.from_alphas_cumprod(a)
    assert torch.equal(sch.alphas_cumprod, a)
    np.testing.assert_allclose(as_np(torch.cumprod(1 - sch.betas, 0)), as_np(a), rtol=1e-12)


# ----------------------------------------------------------------------------- identities
@pytest.mark.parametrize(
    "make",
    [lambda T: NoiseSchedule.linear(T), lambda T: NoiseSchedule.cosine(T), lambda T: NoiseSchedule.scaled_linear(T)],
    ids=["linear", "cosine", "scaled_linear"],
)
@pytest.mark.parametrize("T", SIZES)
def test_log_snr_and_sigmas(make, T):
    sch = make(T)
    a = as_np(sch.alphas_cumprod)
    sig = as_np(sch.sigmas)
    lam = as_np(sch.log_snr)
    assert sig.shape == lam.shape == (T,)
    np.testing.assert_allclose(sig**2 + a, 1.0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(sig, np.sqrt(1 - a), rtol=1e-12)
    # λ = log(ᾱ/σ²), i.e. sigmoid(λ) = ᾱ
    np.testing.assert_allclose(lam, np.log(a) - np.log1p(-a), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(1 / (1 + np.exp(-lam)), a, rtol=1e-10, atol=1e-300)
    assert np.all(np.diff(lam) < 0), "logSNR must be strictly decreasing"


@pytest.mark.parametrize("beta0", [1e-4, 1e-8])
def test_log_snr_accurate_near_alpha_one(beta0):
    """λ_0 = log((1−β₀)/β₀) for small β₀, to the float64 resolution of the stored ᾱ (an error
    in ᾱ of one ulp of 1 moves λ by about 2^-53/β₀); a float32 computation would fail this."""
    sch = NoiseSchedule(torch.tensor([beta0, 0.5], dtype=torch.float64))
    expected = math.log1p(-beta0) - math.log(beta0)
    assert abs(sch.log_snr[0].item() - expected) <= 4 * 2.0**-53 / beta0


# ----------------------------------------------------------------------------- config round trip
@pytest.mark.parametrize(
    "sch",
    [
        NoiseSchedule.linear(7, beta_start=2e-3, beta_end=0.3),
        NoiseSchedule.scaled_linear(50, beta_start=1e-3, beta_end=0.02),
        NoiseSchedule.cosine(123, s=0.01, max_beta=0.9),
        NoiseSchedule(torch.tensor([0.1, 0.2, 0.35, 0.6], dtype=torch.float64)),
        NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")),
    ],
    ids=["linear", "scaled_linear", "cosine", "custom", "from_diffusers"],
)
def test_config_round_trip(sch):
    cfg = json.loads(json.dumps(sch.to_config()))  # must be JSON-serialisable
    back = NoiseSchedule.from_config(cfg)
    assert back.kind == sch.kind
    assert back.num_timesteps == sch.num_timesteps
    assert torch.equal(back.betas, sch.betas)
    assert torch.equal(back.alphas_cumprod, sch.alphas_cumprod)
    assert back.to_config() == cfg


def test_config_round_trip_from_alphas_cumprod():
    """A table given as ᾱ round-trips to the same ᾱ (to rounding of the β re-derivation)."""
    a = torch.from_numpy(np_scaled_linear(200))
    sch = NoiseSchedule.from_alphas_cumprod(a)
    back = NoiseSchedule.from_config(json.loads(json.dumps(sch.to_config())))
    np.testing.assert_allclose(as_np(back.alphas_cumprod), as_np(a), rtol=1e-13, atol=0)


def test_from_config_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule.from_config({"kind": "quadratic", "num_timesteps": 10, "params": {}})


# ----------------------------------------------------------------------------- table cache
def test_table_cached_per_device_and_dtype():
    sch = NoiseSchedule.linear(100)
    t32 = sch.table("cpu", torch.float32)
    assert t32 is sch.table("cpu", torch.float32)
    assert t32 is sch.table(torch.device("cpu"), torch.float32)
    assert t32.dtype == torch.float32 and t32.device.type == "cpu"
    np.testing.assert_allclose(as_np(t32.double()), as_np(sch.alphas_cumprod), rtol=2**-23)
    t64 = sch.table()
    assert t64 is sch.table("cpu", torch.float64)
    assert t64 is not t32
    assert torch.equal(t64, sch.alphas_cumprod)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    "betas",
    [
        [0.1, 1.0],
        [0.0, 0.5],
        [-0.1, 0.5],
        [0.1, 1.5],
        [0.1, float("nan")],
        [0.1, float("inf")],
    ],
    ids=["one", "zero", "negative", "above-one", "nan", "inf"],
)
def test_bad_betas_values(betas):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(torch.tensor(betas, dtype=torch.float64))


@pytest.mark.parametrize(
    "betas", [torch.full((2, 3), 0.1), torch.tensor(0.1), torch.tensor([0.1])], ids=["2-D", "0-D", "T=1"]
)
def test_bad_betas_shape(betas):
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule(betas)


def test_bad_kind():
    with pytest.raises(ValueError, match="kind"):
        NoiseSchedule(torch.tensor([0.1, 0.2]), kind="sigmoid")


@pytest.mark.parametrize("maker", [NoiseSchedule.linear, NoiseSchedule.cosine, NoiseSchedule.scaled_linear])
def test_bad_num_timesteps(maker):
    for bad in (1, 0, -5):
        with pytest.raises(ValueError, match="num_timesteps"):
            maker(bad)
    for bad in (10.0, 2.5, "1000", True):
        with pytest.raises(TypeError, match="num_timesteps"):
            maker(bad)


@pytest.mark.parametrize("maker", [NoiseSchedule.linear, NoiseSchedule.scaled_linear])
@pytest.mark.parametrize("start,end", [(0.0, 0.02), (1e-4, 1.0), (-1e-4, 0.02), (1e-4, 1.2)])
def test_bad_beta_range(maker, start, end):
    with pytest.raises(ValueError, match="beta_start and beta_end"):
        maker(10, beta_start=start, beta_end=end)


def test_bad_cosine_params():
    with pytest.raises(ValueError, match=r"\bs must"):
        NoiseSchedule.cosine(10, s=-0.1)
    with pytest.raises(ValueError, match="max_beta"):
        NoiseSchedule.cosine(10, max_beta=1.0)
    with pytest.raises(ValueError, match="max_beta"):
        NoiseSchedule.cosine(10, max_beta=0.0)


def test_bad_alphas_cumprod():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_alphas_cumprod(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_alphas_cumprod(torch.full((2, 2), 0.5))


@pytest.mark.parametrize("a", [[0.5, 0.6], [0.9, 0.0], [1.0, 0.5], [0.9, float("nan")]], ids=["increasing", "zero", "one", "nan"])
def test_bad_alphas_cumprod_values_name_the_argument(a):
    """ᾱ outside (0, 1) or not strictly decreasing: the error names ``alphas_cumprod``, the
    argument the caller passed (not the internal β)."""
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_alphas_cumprod(torch.tensor(a, dtype=torch.float64))


# ----------------------------------------------------------------------------- custom configs: exact ᾱ
def test_custom_config_round_trips_alphas_cumprod_bit_for_bit():
    """from_alphas_cumprod → to_config → JSON → from_config gives the very same ᾱ table (the config
    stores ᾱ, not β: ᾱ re-derived as ∏(1 − β) of the re-derived β differs in the last bits)."""
    rng = np.random.default_rng(3)
    a = np.sort(rng.uniform(1e-4, 1 - 1e-6, size=300))[::-1].copy()  # arbitrary decreasing table
    a_t = torch.from_numpy(a)
    # the old β-only storage could not get this table back exactly
    derived_betas = 1 - a_t / torch.cat([a_t.new_ones(1), a_t[:-1]])
    assert not torch.equal(torch.cumprod(1 - derived_betas, 0), a_t)

    sch = NoiseSchedule.from_alphas_cumprod(a_t)
    cfg = json.loads(json.dumps(sch.to_config()))
    assert cfg["kind"] == "custom" and cfg["alphas_cumprod"] == a.tolist()
    back = NoiseSchedule.from_config(cfg)
    assert torch.equal(back.alphas_cumprod, a_t)
    assert torch.equal(back.betas, sch.betas)
    assert back.to_config() == cfg


def test_custom_config_legacy_betas_key_still_loads():
    betas = [0.1, 0.2, 0.35, 0.6]
    back = NoiseSchedule.from_config({"kind": "custom", "num_timesteps": 4, "params": {}, "betas": betas})
    np.testing.assert_array_equal(as_np(back.betas), np.array(betas))
    np.testing.assert_allclose(as_np(back.alphas_cumprod), np.cumprod(1 - np.array(betas)), rtol=1e-15)


def test_custom_config_needs_a_table():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        NoiseSchedule.from_config({"kind": "custom", "num_timesteps": 4, "params": {}})


def test_from_alphas_cumprod_rejects_betas_that_do_not_match():
    a = torch.from_numpy(np_linear(20))
    betas = torch.linspace(1e-4, 0.02, 20, dtype=torch.float64)
    assert torch.equal(NoiseSchedule.from_alphas_cumprod(a, betas=betas).betas, betas)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_alphas_cumprod(a, betas=betas * 2)
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_alphas_cumprod(a, betas=betas[:-1])


# ----------------------------------------------------------------------------- diffusers keys that change ᾱ
@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_from_diffusers_config_rejects_zero_snr_rescaling(cls):
    """diffusers rescales β for zero terminal SNR; stepdrop does not reproduce that table, so the
    key must raise instead of being silently dropped."""
    ref = cls(num_train_timesteps=50, rescale_betas_zero_snr=True)
    for config in (ref.config, dict(ref.config), dict(num_train_timesteps=50, rescale_betas_zero_snr=True)):
        with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
            NoiseSchedule.from_diffusers_config(config)
    # False (the default in every diffusers config) is fine
    NoiseSchedule.from_diffusers_config(cls(num_train_timesteps=50, rescale_betas_zero_snr=False).config)


def test_from_diffusers_config_rejects_snr_shift():
    cfg = dict(num_train_timesteps=50, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with pytest.raises(ValueError, match="snr_shift_scale"):
        NoiseSchedule.from_diffusers_config({**cfg, "snr_shift_scale": 3.0})
    sch = NoiseSchedule.from_diffusers_config({**cfg, "snr_shift_scale": 1.0})  # no shift: the plain table
    assert torch.equal(sch.alphas_cumprod, NoiseSchedule.from_diffusers_config(cfg).alphas_cumprod)


def test_from_diffusers_config_ignores_sampling_only_keys():
    """timestep_spacing / steps_offset choose inference timesteps, and prediction_type is the
    scheduler's concern: none changes the ᾱ table, so none is rejected here."""
    base = NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=50))
    for extra in (dict(timestep_spacing="trailing"), dict(steps_offset=1), dict(prediction_type="v_prediction")):
        sch = NoiseSchedule.from_diffusers_config(dict(num_train_timesteps=50, **extra))
        assert torch.equal(sch.alphas_cumprod, base.alphas_cumprod), extra
