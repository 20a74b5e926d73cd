"""Turn other networks into stepdrop's model contract ``eps = model(x, t)``.

diffusers is optional: nothing here imports it. A diffusers model is recognised by its class
(``diffusers.…UNet2DModel`` in its MRO), which needs no import because such an object can
only exist once diffusers has been imported by whoever built it.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, Callable

from torch import Tensor, nn

from stepdrop.models._timesteps import as_timestep_vector
from stepdrop.prediction import check_prediction_type

if TYPE_CHECKING:
    from stepdrop.schedule import NoiseSchedule

__all__ = ["DiffusersUNetAdapter", "as_eps_model", "from_diffusers_pipeline"]


def _diffusers_class_names(obj: object) -> list[str]:
    """Names of the diffusers classes in ``type(obj)``'s MRO (empty for non-diffusers objects)."""
    return [c.__name__ for c in type(obj).__mro__ if c.__module__.split(".")[0] == "diffusers"]


def _is_diffusers_unet2d(obj: object) -> bool:
    return "UNet2DModel" in _diffusers_class_names(obj)


class DiffusersUNetAdapter(nn.Module):
    """A diffusers ``UNet2DModel`` behind stepdrop's model contract ``out = model(x, t)``.

    ``forward(x, t)``: ``x`` float [B, C, H, W] with (C, H, W) = :attr:`sample_shape`,
    ``t`` int64 timesteps [B] (per sample) or a single timestep (0-dim tensor or Python int);
    returns ``unet(x, t).sample``, shape [B, C, H, W], which means :attr:`prediction_type`.

    The UNet must have ``out_channels == in_channels`` (a learned-variance model outputs 2C
    channels) and be unconditional (no class labels).

    Args:
        unet: a ``diffusers.UNet2DModel``; registered as the submodule ``unet``, so
            ``.to()``, ``.eval()`` and ``state_dict()`` reach it.
        prediction_type: what the UNet predicts, one of
            :data:`stepdrop.prediction.PREDICTION_TYPES` (default "epsilon"). diffusers keeps it
            in the scheduler's config, not the model's: :func:`from_diffusers_pipeline` reads it
            from there.
    """

    def __init__(self, unet: nn.Module, prediction_type: str = "epsilon"):
        super().__init__()
        self.prediction_type = check_prediction_type(prediction_type)
        if not _is_diffusers_unet2d(unet):
            raise TypeError(f"unet must be a diffusers UNet2DModel, got {type(unet).__module__}.{type(unet).__name__}")
        cfg = unet.config
        in_ch, out_ch = int(cfg.in_channels), int(cfg.out_channels)
        if out_ch != in_ch:
            raise ValueError(
                f"unet must output as many channels as it takes (an ε prediction of x's shape); "
                f"its config has in_channels={in_ch}, out_channels={out_ch}"
            )
        if getattr(cfg, "num_class_embeds", None) is not None or getattr(cfg, "class_embed_type", None) is not None:
            raise ValueError("unet is class-conditional (num_class_embeds/class_embed_type set); "
                             "only unconditional UNet2DModels fit eps = model(x, t)")
        size = cfg.sample_size
        if isinstance(size, numbers.Integral):
            h = w = int(size)
        else:
            h, w = (int(s) for s in size)
        self.unet = unet
        self._sample_shape = (in_ch, h, w)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) from the UNet's config (``in_channels``, ``sample_size``)."""
        return self._sample_shape

    @property
    def config(self) -> dict[str, Any]:
        """The wrapped UNet's diffusers config as a plain dict."""
        return dict(self.unet.config)

    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a tensor of shape [B, C, H, W], got {shape}")
        t = as_timestep_vector(t, x.shape[0], x.device)
        return self.unet(x, t, return_dict=False)[0]

    def extra_repr(self) -> str:
        return f"sample_shape={self._sample_shape}, prediction_type={self.prediction_type!r}"


def from_diffusers_pipeline(pipeline: Any) -> tuple[DiffusersUNetAdapter, "NoiseSchedule"]:
    """The UNet and noise schedule of a diffusers pipeline (``DDPMPipeline``, ``DDIMPipeline``, …),
    ready for :class:`~stepdrop.sampler.FusedSampler`: the adapter carries the scheduler config's
    ``prediction_type``, the schedule is its β schedule
    (:meth:`~stepdrop.schedule.NoiseSchedule.from_diffusers_config`).

        model, schedule = from_diffusers_pipeline(DDPMPipeline.from_pretrained("google/ddpm-cifar10-32"))
        images, stats = FusedSampler(model, schedule).sample(16, "uniform", budget=25)
    """
    from stepdrop.schedule import NoiseSchedule

    unet, scheduler = getattr(pipeline, "unet", None), getattr(pipeline, "scheduler", None)
    if unet is None or scheduler is None:
        raise TypeError(f"pipeline must have a .unet and a .scheduler (a diffusers DDPMPipeline, DDIMPipeline, …), "
                        f"got {type(pipeline).__name__}")
    config = scheduler.config
    prediction_type = config.get("prediction_type", "epsilon") if isinstance(config, dict) else \
        getattr(config, "prediction_type", "epsilon")
    return DiffusersUNetAdapter(unet, check_prediction_type(prediction_type, "the scheduler's prediction_type")), \
        NoiseSchedule.from_diffusers_config(config)


def as_eps_model(model: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``model`` as a callable ``out = f(x, t)`` (its output means the model's ``prediction_type``).

    A diffusers ``UNet2DModel`` is wrapped in :class:`DiffusersUNetAdapter`; any other callable
    (a stepdrop model, the user's own ``nn.Module`` or function of (x, t) returning a tensor)
    is returned unchanged. Other diffusers models (conditional UNets, …) raise ``TypeError``,
    as does a non-callable.
    """
    if isinstance(model, DiffusersUNetAdapter):
        return model
    if _is_diffusers_unet2d(model):
        return DiffusersUNetAdapter(model)  # type: ignore[arg-type]
    names = _diffusers_class_names(model)
    if names:
        raise TypeError(
            f"model is a diffusers {type(model).__name__}; only UNet2DModel is supported "
            f"(wrap other models so that model(x, t) returns the prediction tensor)"
        )
    if not callable(model):
        raise TypeError(f"model must be callable as eps = model(x, t), got {type(model).__name__}")
    return model
