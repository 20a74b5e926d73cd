"""stepdrop: fast sampling for tiny diffusion models."""

__version__ = "0.1.0"
