"""Turn other networks into stepdrop's model contract ``eps = model(x, t)``.

diffusers is optional: nothing here imports it. A diffusers model is recognised by its class
(``diffusers.…UNet2DModel`` in its MRO), which needs no import because such an object can
only exist once diffusers has been imported by whoever built it.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

from torch import Tensor, nn

from stepdrop.models._timesteps import as_timestep_vector

__all__ = ["DiffusersUNetAdapter", "as_eps_model"]


def _diffusers_class_names(obj: object) -> list[str]:
    """Names of the diffusers classes in ``type(obj)``'s MRO (empty for non-diffusers objects)."""
    return [c.__name__ for c in type(obj).__mro__ if c.__module__.split(".")[0] == "diffusers"]


def _is_diffusers_unet2d(obj: object) -> bool:
    return "UNet2DModel" in _diffusers_class_names(obj)


class DiffusersUNetAdapter(nn.Module):
    """A diffusers ``UNet2DModel`` (ε-prediction) as ``eps = model(x, t)``.

    ``forward(x, t)``: ``x`` float [B, C, H, W] with (C, H, W) = :attr:`sample_shape`,
    ``t`` int64 timesteps [B] (per sample) or a single timestep (0-dim tensor or Python int);
    returns ``unet(x, t).sample``, shape [B, C, H, W].

    The UNet must predict ε (diffusers' ``prediction_type`` lives on the scheduler, not the
    model, so that is the caller's responsibility), have ``out_channels == in_channels`` (a
    learned-variance model outputs 2C channels) and be unconditional (no class labels).

    Args:
        unet: a ``diffusers.UNet2DModel``; registered as the submodule ``unet``, so
            ``.to()``, ``.eval()`` and ``state_dict()`` reach it.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
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
        return f"sample_shape={self._sample_shape}"


def as_eps_model(model: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """``model`` as an ``eps = f(x, t)`` callable.

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
            f"(wrap other models so that model(x, t) returns the ε tensor)"
        )
    if not callable(model):
        raise TypeError(f"model must be callable as eps = model(x, t), got {type(model).__name__}")
    return model
