"""What a network predicts, and the one place its output becomes ε, x̂0 or a training target.

With α_t = √ᾱ_t, σ_t = √(1−ᾱ_t) and x_t = α_t·x0 + σ_t·ε (docs/DESIGN.md §4), a diffusion
network is trained to predict one of three quantities (diffusers' ``prediction_type`` names):

* ``"epsilon"``: the noise ε (Ho et al. 2020, "Denoising Diffusion Probabilistic Models");
* ``"v_prediction"``: the velocity v = α_t·ε − σ_t·x0 (Salimans & Ho 2022, "Progressive
  Distillation for Fast Sampling of Diffusion Models", §4 and appendix D);
* ``"sample"``: the clean image x0.

They are the same information, exchanged exactly given x_t:

    ε  = α_t·v + σ_t·x_t          x0 = α_t·x_t − σ_t·v          (v-prediction)
    ε  = (x_t − α_t·x0) / σ_t                                     (x0-prediction)

Why the choice matters at high noise. With x_t fixed, an error δ in x̂0 is an error
√SNR·δ = (α/σ)·δ in ε̂ and δ/σ in v̂. So the plain MSE on ε weights the x0 error by the
signal-to-noise ratio SNR = α²/σ², which vanishes as t → T (4.0e-5 at t = 999 on the linear
schedule): an ε-model is barely trained to be right there, and its x̂0 = (x_t − σ·ε̂)/α
multiplies the ε error by σ/α (157 at t = 999). The MSE on v weights the x0 error by
SNR + 1 ≥ 1, and v's x̂0 multiplies the v error by σ ≤ 1. The embedded ε model's measured
failure at t ≳ 750 (docs/MODEL_CARD.md) is this effect.

The sampler, its policies and :class:`~stepdrop.diffusers_scheduler.StepDropScheduler` all
turn a model's output into ε with :func:`to_eps` (the fused step then computes x̂0 from ε,
the same x̂0 as :func:`to_x0` up to rounding), and the trainer takes its target from
:func:`training_target`: these three functions are the only place the parameterisations meet.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from stepdrop._validation import check_choice

__all__ = ["PREDICTION_TYPES", "EpsilonView", "check_prediction_type", "resolve_prediction_type", "to_eps", "to_x0",
           "training_target"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def check_prediction_type(value: object, name: str = "prediction_type") -> str:
    """``value`` if it is one of :data:`PREDICTION_TYPES`, else ValueError naming ``name``."""
    return check_choice(name, value, PREDICTION_TYPES)


def resolve_prediction_type(model: object, prediction_type: str | None) -> str:
    """The prediction type to sample ``model`` with: ``prediction_type`` if given, else the
    model's own ``prediction_type`` attribute (stepdrop's models carry it), else "epsilon".

    A given type that contradicts the model's own is refused: sampling a v-model as an ε-model
    produces plausible-looking garbage, never an error.
    """
    own = getattr(model, "prediction_type", None)
    if own is not None:
        own = check_prediction_type(own, "the model's prediction_type")
    if prediction_type is None:
        return own or "epsilon"
    prediction_type = check_prediction_type(prediction_type)
    if own is not None and own != prediction_type:
        raise ValueError(f"prediction_type={prediction_type!r} contradicts the model, which predicts {own!r}; "
                         f"leave prediction_type=None to use the model's")
    return prediction_type


def _alpha_sigma(alphas_cumprod: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
    """α_t, σ_t per sample, shaped to broadcast over ``like`` [B, ...], in the compute dtype
    (float64 for float64 ``like``, float32 otherwise); gathered in float64 from the table."""
    a = alphas_cumprod.to(torch.float64)[t.long().clamp(0, alphas_cumprod.numel() - 1)]
    compute = torch.float64 if like.dtype == torch.float64 else torch.float32
    shape = (-1,) + (1,) * (like.ndim - 1)
    return a.sqrt().to(compute).view(shape), (1 - a).sqrt().to(compute).view(shape), compute


def to_eps(output: Tensor, x: Tensor, alphas_cumprod: Tensor, t: Tensor, prediction_type: str) -> Tensor:
    """The noise ε implied by a model ``output`` of ``prediction_type`` at (x_t = ``x``, ``t``).

    Args:
        output: the model's prediction, [B, ...] like ``x``.
        x: x_t, the model's input, in full precision (the sampler's state, not a half-precision
            copy: at t = 999 the v → ε conversion's x̂0 divides rounding in x by α = 0.006).
        alphas_cumprod: [T] ᾱ table on ``x``'s device.
        t: int64 [B] timesteps (a masked sample's negative t is clamped to 0: its value is unused).
        prediction_type: one of :data:`PREDICTION_TYPES` (not checked here: the callers check it
            once, at their boundary).

    Returns:
        ε in float32 (float64 for float64 ``x``); for "epsilon", ``output`` itself (no copy,
        no extra kernel).
    """
    if prediction_type == "epsilon":
        return output
    alpha, sigma, compute = _alpha_sigma(alphas_cumprod, t, x)
    out, xt = output.to(compute), x.to(compute)
    if prediction_type == "v_prediction":
        eps = alpha * out + sigma * xt
    else:  # "sample"
        eps = (xt - alpha * out) / sigma
    return eps


def to_x0(output: Tensor, x: Tensor, alphas_cumprod: Tensor, t: Tensor, prediction_type: str) -> Tensor:
    """The clean image x̂0 implied by a model ``output`` (arguments as :func:`to_eps`); computed
    in float32 (float64 for float64 input) and returned in that dtype."""
    alpha, sigma, compute = _alpha_sigma(alphas_cumprod, t, x)
    out, xt = output.to(compute), x.to(compute)
    if prediction_type == "epsilon":
        return (xt - sigma * out) / alpha
    if prediction_type == "v_prediction":
        return alpha * xt - sigma * out
    return out


def training_target(x0: Tensor, eps: Tensor, alphas_cumprod: Tensor, t: Tensor, prediction_type: str) -> Tensor:
    """What a network of ``prediction_type`` is trained to output for x_t = α_t·x0 + σ_t·ε:
    ε, v = α_t·ε − σ_t·x0 (computed in float32, float64 for float64 input) or x0."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    alpha, sigma, compute = _alpha_sigma(alphas_cumprod, t, x0)
    return (alpha * eps.to(compute) - sigma * x0.to(compute)).to(x0.dtype)


class EpsilonView(nn.Module):
    """A model of any prediction type seen through stepdrop's model contract ``eps = f(x, t)``.

    For code that calls the model itself and needs ε (the gradient-aware policy's pilot run
    probes ∂ε/∂x_t, which for a v-model is α·∂v/∂x_t + σ·I). ``model`` is registered as a
    submodule when it is an ``nn.Module``, so parameters, devices and dtypes read through. The
    view itself predicts ε (its :attr:`prediction_type`); the wrapped model's type is
    :attr:`source_prediction_type`.
    """

    prediction_type = "epsilon"

    def __init__(self, model: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor, prediction_type: str):
        super().__init__()
        self.model = model
        self.source_prediction_type = check_prediction_type(prediction_type)
        self._table = alphas_cumprod.detach().to("cpu", torch.float64)  # not a buffer: .half() must not touch it
        shape = getattr(model, "sample_shape", None)
        if shape is not None:
            self.sample_shape = tuple(shape)

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        from stepdrop.models._timesteps import as_timestep_vector  # stepdrop.models imports this module

        t = as_timestep_vector(t, x.shape[0], x.device)
        eps = to_eps(self.model(x, t), x, self._table.to(x.device), t, self.source_prediction_type)
        return eps.to(x.dtype)
