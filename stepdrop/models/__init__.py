"""Noise-prediction models behind one contract: ``eps = model(x, t)``.

``x`` is float [B, C, H, W], ``t`` an int64 timestep vector [B]; the output has ``x``'s shape.
Models expose ``sample_shape`` = (C, H, W). :func:`as_eps_model` brings a diffusers
``UNet2DModel`` to this contract (diffusers stays optional: it is never imported here).
"""

from stepdrop.models.adapters import DiffusersUNetAdapter, as_eps_model
from stepdrop.models.tiny_unet import TinyUNet

__all__ = ["DiffusersUNetAdapter", "TinyUNet", "as_eps_model"]
