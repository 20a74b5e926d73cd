"""Where is a model wrong? Its prediction error per timestep on real images, beside a reference.

For each timestep t of a grid, real test images x0 are noised with a fixed draw,
x_t = α_t·x0 + σ_t·ε, and the model's output is turned into ε̂ and x̂0
(:mod:`stepdrop.prediction`). Reported per t: the ε-MSE (per pixel) and the x̂0-RMSE, and the
same two figures for the **linear-Gaussian reference**: the best linear estimator of x0 from
x_t when x0 ~ N(μ, Σ) with the training set's mean and covariance (the Wiener filter),

    x̂0_lin = μ + Σ·α_t·(α_t²·Σ + σ_t²·I)⁻¹·(x_t − α_t·μ),    ε̂_lin = (x_t − α_t·x̂0_lin)/σ_t,

computed through the eigendecomposition of Σ. At high noise (small α_t) x_t holds little more
than the data's first two moments, so a trained network should match or beat this reference
there; a model whose error exceeds it by a large factor is under-trained at those timesteps,
and deterministic samplers, which start there, inherit the error (the embedded ε model's failure
at t ≳ 750, docs/MODEL_CARD.md). Nothing is sampled: one model call per image per timestep.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from stepdrop._io import atomic_write, atomic_write_bytes
from stepdrop._validation import check_int
from stepdrop.data import ImageData
from stepdrop.prediction import resolve_prediction_type, to_eps, to_x0
from stepdrop.schedule import NoiseSchedule

__all__ = ["TimestepError", "LinearGaussianReference", "diagnose", "plot_diagnosis", "write_diagnosis"]


@dataclass
class TimestepError:
    """The errors at one timestep, means over the images (per pixel for the MSE)."""

    t: int
    snr: float  # α_t²/σ_t²
    eps_mse: float
    x0_rmse: float
    linear_eps_mse: float
    linear_x0_rmse: float

    @property
    def eps_ratio(self) -> float:
        """Model ε-MSE over the reference's (> 1: the linear estimator does better)."""
        return self.eps_mse / self.linear_eps_mse


class LinearGaussianReference:
    """The Wiener estimator of x0 from x_t for x0 ~ N(μ, Σ) fitted to ``images`` (module docstring).

    Args:
        images: float [N, C, H, W] training images in the model's data range.
    """

    def __init__(self, images: Tensor):
        flat = images.flatten(1).to(torch.float64)
        self.mean = flat.mean(0)
        centred = flat - self.mean
        cov = centred.T @ centred / max(flat.shape[0] - 1, 1)
        eigvals, self.basis = torch.linalg.eigh(cov)
        self.eigvals = eigvals.clamp(min=0)

    def predict_x0(self, x_t: Tensor, alpha: float, sigma: float) -> Tensor:
        """x̂0_lin for x_t [B, ...] at signal α and noise σ; float64, x_t's shape."""
        y = x_t.flatten(1).to(torch.float64) - alpha * self.mean
        gain = alpha * self.eigvals / (alpha**2 * self.eigvals + sigma**2)
        x0 = self.mean + ((y @ self.basis) * gain) @ self.basis.T
        return x0.view(x_t.shape)


@torch.no_grad()
def diagnose(
    model: Callable[[Tensor, Tensor], Tensor],
    schedule: NoiseSchedule,
    test_images: Tensor,
    reference: LinearGaussianReference,
    *,
    timesteps: Tensor | None = None,
    prediction_type: str | None = None,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = False,
) -> list[TimestepError]:
    """The model's and the reference's errors at each timestep on ``test_images``.

    Args:
        model: ``out = model(x, t)``; its output means ``prediction_type`` (default: the
            model's own, :func:`stepdrop.prediction.resolve_prediction_type`).
        schedule: the schedule the model was trained with.
        test_images: float [N, C, H, W] real images, not used to fit ``reference``.
        reference: the linear-Gaussian reference, fitted on training images.
        timesteps: int64 timesteps to probe (default: 0, 50, …, 950 and T−1).
        batch_size: images per model call.
        seed: the noise draw (one ε per image, the same at every t).
    """
    ptype = resolve_prediction_type(model, prediction_type)
    T = schedule.num_timesteps
    if timesteps is None:
        timesteps = torch.cat([torch.arange(0, T, 50), torch.tensor([T - 1])]).unique()
    timesteps = torch.as_tensor(timesteps, dtype=torch.int64)
    if timesteps.ndim != 1 or timesteps.numel() == 0 or int(timesteps.min()) < 0 or int(timesteps.max()) >= T:
        raise ValueError(f"timesteps must be a non-empty 1-D list of timesteps in [0, {T - 1}], got {timesteps.tolist()}")
    batch_size = check_int("batch_size", batch_size, low=1)
    params = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    device = params.device if params is not None else torch.device("cpu")
    dtype = params.dtype if params is not None else torch.float32
    x0_all = test_images.to(torch.float32)
    noise_all = torch.randn(x0_all.shape, generator=torch.Generator().manual_seed(seed))
    table = schedule.alphas_cumprod
    rows = []
    steps = timesteps.tolist()
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="diagnose", unit="t")
    for t in steps:
        a = float(table[t])
        alpha, sigma = a**0.5, (1 - a) ** 0.5
        sums = torch.zeros(4, dtype=torch.float64)
        for start in range(0, x0_all.shape[0], batch_size):
            x0, eps = x0_all[start:start + batch_size], noise_all[start:start + batch_size]
            x_t = alpha * x0 + sigma * eps
            tt = torch.full((x0.shape[0],), t, dtype=torch.int64)
            out = model(x_t.to(device, dtype), tt.to(device)).to("cpu", torch.float32)
            eps_hat = to_eps(out, x_t, table, tt, ptype)
            x0_hat = to_x0(out, x_t, table, tt, ptype)
            x0_lin = reference.predict_x0(x_t, alpha, sigma)
            eps_lin = (x_t.to(torch.float64) - alpha * x0_lin) / sigma
            sums += torch.stack([
                (eps_hat.double() - eps).pow(2).flatten(1).mean(1).sum(),
                (x0_hat.double() - x0).pow(2).flatten(1).mean(1).sum(),
                (eps_lin - eps).pow(2).flatten(1).mean(1).sum(),
                (x0_lin - x0).pow(2).flatten(1).mean(1).sum(),
            ])
        n = x0_all.shape[0]
        eps_mse, x0_mse, lin_eps_mse, lin_x0_mse = (sums / n).tolist()
        rows.append(TimestepError(int(t), alpha**2 / sigma**2, eps_mse, x0_mse**0.5, lin_eps_mse, lin_x0_mse**0.5))
    return rows


def weak_range(rows: list[TimestepError], factor: float = 2.0) -> tuple[int, int] | None:
    """The span of timesteps where the model's ε-MSE exceeds ``factor`` × the reference's, or None."""
    weak = [r.t for r in rows if r.eps_ratio > factor]
    return (min(weak), max(weak)) if weak else None


def format_diagnosis(rows: list[TimestepError]) -> str:
    """A text table, one row per timestep."""
    lines = [f"{'t':>5} {'SNR':>10} {'eps-MSE':>10} {'linear':>10} {'ratio':>7} {'x0-RMSE':>9} {'linear':>9}"]
    for r in rows:
        lines.append(f"{r.t:>5} {r.snr:>10.3g} {r.eps_mse:>10.3g} {r.linear_eps_mse:>10.3g} {r.eps_ratio:>7.2f} "
                     f"{r.x0_rmse:>9.3g} {r.linear_x0_rmse:>9.3g}")
    span = weak_range(rows)
    lines.append("weak range (eps-MSE > 2x the linear reference): "
                 + (f"t = {span[0]}..{span[1]}" if span else "none"))
    return "\n".join(lines)


def write_diagnosis(rows: list[TimestepError], out: str | os.PathLike, meta: dict) -> tuple[Path, Path]:
    """``diagnosis.json`` (rows and ``meta``) and ``diagnosis.csv`` in folder ``out``, atomically."""
    out = Path(out)
    records = [{**asdict(r), "eps_ratio": r.eps_ratio} for r in rows]
    json_path = atomic_write_bytes(out / "diagnosis.json",
                                   json.dumps({"meta": meta, "rows": records}, indent=2).encode())

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return json_path, atomic_write_bytes(out / "diagnosis.csv", text.getvalue().encode())


def plot_diagnosis(curves: dict[str, list[TimestepError]], path: str | os.PathLike) -> Path:
    """PNG: ε-MSE and x̂0-RMSE against t for each named model, the linear reference dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, lin, label in ((axes[0], "eps_mse", "linear_eps_mse", "ε-MSE per pixel"),
                                (axes[1], "x0_rmse", "linear_x0_rmse", "x̂0 RMSE")):
        for i, (name, rows) in enumerate(curves.items()):
            ts = [r.t for r in rows]
            (line,) = ax.plot(ts, [getattr(r, key) for r in rows], marker="o", ms=3, label=name)
            if i == 0:
                ax.plot(ts, [getattr(r, lin) for r in rows], "k--", lw=1.2, label="linear-Gaussian reference")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_title(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)

    def save(f) -> None:
        fig.savefig(f, format="png", dpi=110)

    try:
        return atomic_write(path, save)
    finally:
        plt.close(fig)


def test_and_reference(data: ImageData, train: ImageData, num_images: int) -> tuple[Tensor, LinearGaussianReference]:
    """The first ``num_images`` test images as float input, and the reference fitted on ``train``."""
    num_images = check_int("num_images", num_images, low=1, high=len(data))
    test = data.batch(torch.arange(num_images))
    return test, LinearGaussianReference(train.batch(torch.arange(len(train))))
