"""Noise-prediction models behind one contract: ``eps = model(x, t)``.

``x`` is float [B, C, H, W], ``t`` an int64 timestep vector [B]; the output has ``x``'s shape.
Models expose ``sample_shape`` = (C, H, W). :func:`as_eps_model` brings a diffusers
``UNet2DModel`` to this contract (diffusers stays optional: it is never imported here).
"""

from typing import Any, Mapping

from stepdrop.models.adapters import DiffusersUNetAdapter, as_eps_model
from stepdrop.models.slimmable import SlimmableTinyUNet
from stepdrop.models.tiny_unet import TinyUNet

__all__ = ["DiffusersUNetAdapter", "SlimmableTinyUNet", "TinyUNet", "as_eps_model", "build_model"]


def build_model(config: Mapping[str, Any]) -> TinyUNet:
    """The network a stored ``model_config`` describes: a :class:`SlimmableTinyUNet` when it
    lists ``widths``, else a :class:`TinyUNet`."""
    if isinstance(config, Mapping) and "widths" in config:
        return SlimmableTinyUNet.from_config(config)
    return TinyUNet.from_config(config)
