"""Discrete-time variance-preserving noise schedules.

ᾱ_t = ∏_{s≤t} (1 − β_s) for t = 0..T−1 (Ho et al. 2020, "Denoising Diffusion Probabilistic
Models"), σ_t² = 1 − ᾱ_t and the log signal-to-noise ratio λ_t = log ᾱ_t − log(1 − ᾱ_t).
The cosine schedule is Nichol & Dhariwal 2021 ("Improved DDPM", eq. 17).

Tables are kept in float64 on the CPU; :meth:`NoiseSchedule.table` hands out cached copies
on other devices/dtypes so that a sampling loop never rebuilds them.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from stepdrop._validation import check_int

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine", "custom")


class NoiseSchedule:
    """β schedule and the tables derived from it.

    Args:
        betas: 1-D tensor of T values, each in (0, 1).
        kind: a label kept in :meth:`to_config` ("linear", "scaled_linear", "cosine" or "custom").
        params: the constructor parameters of ``kind`` (kept so a config round-trips).

    Prefer the constructors :meth:`linear`, :meth:`cosine`, :meth:`from_config` and
    :meth:`from_diffusers_config`.
    """

    def __init__(self, betas: Tensor, *, kind: str = "custom", params: Mapping[str, Any] | None = None):
        if not isinstance(betas, Tensor):
            betas = torch.as_tensor(betas)
        if betas.ndim != 1 or betas.numel() < 2:
            raise ValueError(f"betas must be a 1-D tensor with at least 2 entries, got shape {tuple(betas.shape)}")
        betas = betas.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("betas must be finite and each in the open interval (0, 1)")
        if kind not in BETA_SCHEDULES:
            raise ValueError(f"kind must be one of {BETA_SCHEDULES}, got {kind!r}")
        self.kind = kind
        self.params = dict(params or {})
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._tables: dict[tuple[str, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ constructors
    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> "NoiseSchedule":
        """β linear in t from ``beta_start`` to ``beta_end`` (Ho et al. 2020)."""
        T = check_int("num_timesteps", num_timesteps, low=2)
        _check_beta_range(beta_start, beta_end)
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        return cls(betas, kind="linear", params={"beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def scaled_linear(cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> "NoiseSchedule":
        """√β linear in t (the latent-diffusion schedule)."""
        T = check_int("num_timesteps", num_timesteps, low=2)
        _check_beta_range(beta_start, beta_end)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        return cls(betas, kind="scaled_linear", params={"beta_start": beta_start, "beta_end": beta_end})

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> "NoiseSchedule":
        """ᾱ(t) = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)), β clipped at ``max_beta``
        (Nichol & Dhariwal 2021, eq. 17)."""
        T = check_int("num_timesteps", num_timesteps, low=2)
        if not 0 <= s < 1:
            raise ValueError(f"s must be in [0, 1), got {s}")
        if not 0 < max_beta < 1:
            raise ValueError(f"max_beta must be in (0, 1), got {max_beta}")
        t = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        return cls(betas, kind="cosine", params={"s": s, "max_beta": max_beta})

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor, *, betas: Tensor | None = None) -> "NoiseSchedule":
        """Schedule whose ᾱ table is exactly ``alphas_cumprod`` (strictly decreasing, in (0, 1)).

        Args:
            alphas_cumprod: the ᾱ table, 1-D with T ≥ 2 entries; kept bit for bit (as float64).
            betas: the β table to keep alongside it (e.g. the one ᾱ was computed from, as
                :meth:`to_config` stores it); must have T entries with ∏(1 − β) = ᾱ to within
                rounding. Default None: β_t = 1 − ᾱ_t/ᾱ_{t−1}, re-derived from ᾱ.
        """
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
        if a.ndim != 1 or a.numel() < 2:
            raise ValueError(f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all() or (a <= 0).any() or (a >= 1).any() or (a[1:] >= a[:-1]).any():
            raise ValueError("alphas_cumprod must be finite, strictly decreasing and each in the open interval (0, 1)")
        if betas is None:
            prev = torch.cat([a.new_ones(1), a[:-1]])
            schedule = cls(1 - a / prev, kind="custom")
        else:
            schedule = cls(betas, kind="custom")  # validates betas
            if schedule.num_timesteps != a.numel() or not torch.allclose(schedule.alphas_cumprod, a, rtol=1e-9, atol=0):
                raise ValueError(
                    f"betas ({schedule.num_timesteps} entries) do not give alphas_cumprod ({a.numel()} entries): "
                    f"∏(1 − β) must equal ᾱ to within rounding"
                )
        schedule.alphas_cumprod = a.clone()  # keep the caller's table bit for bit
        return schedule

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "NoiseSchedule":
        """Inverse of :meth:`to_config`."""
        kind = config.get("kind")
        T = config.get("num_timesteps")
        params = dict(config.get("params", {}))
        if kind == "custom":
            if "alphas_cumprod" in config:
                betas = config.get("betas")
                return cls.from_alphas_cumprod(
                    torch.tensor(config["alphas_cumprod"], dtype=torch.float64),
                    betas=None if betas is None else torch.tensor(betas, dtype=torch.float64),
                )
            if "betas" in config:  # configs written before the ᾱ table was stored
                return cls(torch.tensor(config["betas"], dtype=torch.float64), kind="custom")
            raise ValueError("a 'custom' schedule config needs its 'alphas_cumprod' table (or legacy 'betas')")
        makers = {"linear": cls.linear, "scaled_linear": cls.scaled_linear, "cosine": cls.cosine}
        if kind not in makers:
            raise ValueError(f"config['kind'] must be one of {BETA_SCHEDULES}, got {kind!r}")
        return makers[kind](T, **params)

    @classmethod
    def from_diffusers_config(cls, config: Any) -> "NoiseSchedule":
        """Schedule of a diffusers scheduler config (a dict or ``scheduler.config``).

        Reproduces diffusers' own float32 β computation, so the ᾱ table matches the one
        diffusers builds for the same config. Supported ``beta_schedule`` values: "linear",
        "scaled_linear", "squaredcos_cap_v2"; a ``trained_betas`` list is taken as is.

        Keys that make diffusers change the ᾱ table in a way not reproduced here raise
        ``ValueError`` naming the key rather than being dropped: ``rescale_betas_zero_snr=True``
        (zero-terminal-SNR rescaling, DDPM/DDIM/… schedulers) and ``snr_shift_scale`` ≠ 1
        (CogVideoX's DDIM). Keys that only affect sampling (``timestep_spacing``,
        ``steps_offset``, …) are ignored; ``prediction_type`` is the scheduler's business
        (:class:`stepdrop.diffusers_scheduler.StepDropScheduler` checks it), not the table's.
        """
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        T = check_int("num_train_timesteps", get("num_train_timesteps", 1000), low=2)
        if get("rescale_betas_zero_snr", False):
            raise ValueError(
                "rescale_betas_zero_snr=True (zero-terminal-SNR rescaling of β, ᾱ_{T-1} = 0) is not supported: "
                "stepdrop's ᾱ table would not match the one diffusers builds for this config"
            )
        shift = get("snr_shift_scale", None)
        if shift is not None and float(shift) != 1.0:
            raise ValueError(
                f"snr_shift_scale={shift} (an SNR shift of the ᾱ table, CogVideoX's DDIM) is not supported: "
                f"stepdrop's ᾱ table would not match the one diffusers builds for this config"
            )
        trained = get("trained_betas", None)
        if trained is not None:
            return cls(torch.tensor(trained, dtype=torch.float64), kind="custom")
        kind = get("beta_schedule", "linear")
        beta_start = float(get("beta_start", 1e-4))
        beta_end = float(get("beta_end", 0.02))
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
            return cls(betas, kind="custom")
        if kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
            return cls(betas, kind="custom")
        if kind == "squaredcos_cap_v2":
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
            return cls(torch.tensor(betas, dtype=torch.float32), kind="custom")
        raise ValueError(
            f"beta_schedule must be one of ('linear', 'scaled_linear', 'squaredcos_cap_v2'), got {kind!r}"
        )

    # ------------------------------------------------------------------ tables
    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps (valid indices 0..T−1)."""
        return self.betas.numel()

    @property
    def sigmas(self) -> Tensor:
        """σ_t = √(1 − ᾱ_t), float64 [T]."""
        return (1 - self.alphas_cumprod).sqrt()

    @property
    def log_snr(self) -> Tensor:
        """λ_t = log ᾱ_t − log(1 − ᾱ_t), float64 [T], decreasing in t."""
        a = self.alphas_cumprod
        return a.log() - torch.log1p(-a)

    def table(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> Tensor:
        """The ᾱ table on ``device`` in ``dtype``, cached (built once per device and dtype)."""
        device = torch.device(device)
        key = (str(device), dtype)
        if key not in self._tables:
            self._tables[key] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return self._tables[key]

    def to_config(self) -> dict[str, Any]:
        """A JSON-serialisable description that :meth:`from_config` rebuilds exactly.

        A "custom" schedule stores its float64 ᾱ table (``"alphas_cumprod"``; Python floats
        round-trip through JSON exactly) and :meth:`from_config` rebuilds it with
        :meth:`from_alphas_cumprod`, so the ᾱ table comes back bit-identical (re-deriving ᾱ
        as a product of stored β could differ in the last bits). Its β table is stored too
        (``"betas"``), so that β also comes back bit for bit.
        """
        config: dict[str, Any] = {"kind": self.kind, "num_timesteps": self.num_timesteps, "params": dict(self.params)}
        if self.kind == "custom":
            config["alphas_cumprod"] = self.alphas_cumprod.tolist()
            config["betas"] = self.betas.tolist()
        return config

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"NoiseSchedule({self.kind}, T={self.num_timesteps}{', ' + extra if extra else ''})"


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    if not (0 < beta_start < 1 and 0 < beta_end < 1):
        raise ValueError(f"beta_start and beta_end must be in (0, 1), got {beta_start}, {beta_end}")
