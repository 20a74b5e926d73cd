"""stepdrop.diagnose and `stepdrop diagnose`: the linear-Gaussian reference is the Wiener filter
(checked on Gaussian data against the closed form), a model that *is* the reference scores
exactly the reference, a bad model shows its weak range, and the command writes its table,
JSON, CSV and PNG for the shipped model on real Fashion-MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from stepdrop import NoiseSchedule
from stepdrop.cli import main
from stepdrop.diagnose import LinearGaussianReference, diagnose, format_diagnosis, weak_range

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
SCHEDULE = NoiseSchedule.linear(1000)
SHAPE = (1, 3, 5)


def gaussian_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images from N(μ, Σ) with a random full-rank Σ; returns (images, μ, Σ)."""
    g = torch.Generator().manual_seed(seed)
    d = SHAPE[0] * SHAPE[1] * SHAPE[2]
    mu = 0.2 * torch.randn(d, generator=g, dtype=torch.float64)
    factor = 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = factor @ factor.T + 0.01 * torch.eye(d, dtype=torch.float64)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (mu + z @ torch.linalg.cholesky(cov).T).view(n, *SHAPE), mu, cov


class ReferenceModel(nn.Module):
    """The reference itself as an x0-prediction model."""

    prediction_type = "sample"

    def __init__(self, reference: LinearGaussianReference):
        super().__init__()
        self.reference = reference
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # device and dtype

    def forward(self, x, t):
        a = SCHEDULE.alphas_cumprod[t[0]]
        return self.reference.predict_x0(x, float(a.sqrt()), float((1 - a).sqrt())).float()


class ZeroEps(nn.Module):
    """ε̂ = 0: right on average, useless at high noise where x̂0 = x_t/α."""

    prediction_type = "epsilon"

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, x, t):
        return torch.zeros_like(x)


def test_reference_is_the_wiener_filter():
    """Fitted on many samples of N(μ, Σ), the estimator approaches the closed form
    μ + Σ·α·(α²Σ + σ²I)⁻¹·(x_t − α·μ)."""
    images, mu, cov = gaussian_images(200_000)
    ref = LinearGaussianReference(images)
    x_t = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for alpha in (0.99, 0.5, 0.05):
        sigma = (1 - alpha**2) ** 0.5
        d = cov.shape[0]
        exact = mu + (x_t.view(8, d) - alpha * mu) @ torch.linalg.solve(alpha**2 * cov + sigma**2 * torch.eye(d,
                                                                        dtype=torch.float64), alpha * cov).T
        torch.testing.assert_close(ref.predict_x0(x_t, alpha, sigma).view(8, d), exact, rtol=0, atol=2e-2)


def test_a_model_that_is_the_reference_scores_the_reference():
    train, _, _ = gaussian_images(4000, seed=2)
    test, _, _ = gaussian_images(300, seed=3)
    ref = LinearGaussianReference(train.float())
    rows = diagnose(ReferenceModel(ref), SCHEDULE, test.float(), ref, timesteps=[0, 300, 999], batch_size=128)
    assert [r.t for r in rows] == [0, 300, 999]
    for r in rows:
        assert r.eps_mse == pytest.approx(r.linear_eps_mse, rel=1e-4)
        assert r.x0_rmse == pytest.approx(r.linear_x0_rmse, rel=1e-4)
    assert weak_range(rows) is None


def test_a_bad_model_shows_its_weak_range_and_the_errors_are_measured():
    train, _, _ = gaussian_images(4000, seed=4)
    test, mu, _ = gaussian_images(256, seed=5)
    ref = LinearGaussianReference(train.float())
    rows = diagnose(ZeroEps(), SCHEDULE, test.float(), ref, timesteps=[10, 500, 999], seed=7)
    # ε̂ = 0: the ε-MSE is E[ε²] = 1 at every t, measured on this draw
    noise = torch.randn(test.shape, generator=torch.Generator().manual_seed(7))
    assert rows[0].eps_mse == pytest.approx(float(noise.double().pow(2).mean()), rel=1e-6)
    # x̂0 = x_t/α: its error is σ/α·ε, huge at t = 999 (σ/α ≈ 157)
    a = float(SCHEDULE.alphas_cumprod[999])
    assert rows[-1].x0_rmse == pytest.approx(((1 - a) / a) ** 0.5 * float(noise.double().pow(2).mean()) ** 0.5,
                                             rel=1e-4)
    assert weak_range(rows) == (500, 999)
    assert "weak range (eps-MSE > 2x the linear reference): t = 500..999" in format_diagnosis(rows)


def test_bad_timesteps_are_refused():
    images, _, _ = gaussian_images(64)
    ref = LinearGaussianReference(images.float())
    with pytest.raises(ValueError, match=r"timesteps must be a non-empty 1-D list of timesteps in \[0, 999\]"):
        diagnose(ZeroEps(), SCHEDULE, images.float(), ref, timesteps=[0, 1000])
    with pytest.raises(ValueError, match="batch_size"):
        diagnose(ZeroEps(), SCHEDULE, images.float(), ref, batch_size=0)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_cli_on_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "diag"
    assert main(["diagnose", "--num-images", "16", "--timesteps", "0,500,999", "--out", str(out),
                 "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "weak range" in text and "eps-MSE" in text
    report = json.loads((out / "diagnosis.json").read_text())
    assert [r["t"] for r in report["rows"]] == [0, 500, 999] and report["meta"]["num_images"] == 16
    assert all(r["eps_mse"] > 0 and r["linear_eps_mse"] > 0 for r in report["rows"])
    assert (out / "diagnosis.csv").read_text().splitlines()[0].startswith("t,snr,eps_mse")
    assert (out / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="needs Debian's dataset-fashion-mnist")
@pytest.mark.parametrize("args, message", [
    (["--num-images", "20000"], "--num-images must be in [1, 10000] (the fashion-mnist test split), got 20000"),
    (["--num-images", "0"], "--num-images must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--timesteps", "5,1000"], "timesteps must be a non-empty 1-D list of timesteps in [0, 999]"),
])
def test_cli_bad_arguments_name_the_flag(tmp_path, capsys, args, message):
    assert main(["diagnose", *args, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
