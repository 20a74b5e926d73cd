"""Faster model calls: the same network in the channels-last layout, or compiled by TorchInductor.

On the CPU and at the batch sizes sampling uses, model calls are the cost, not the loop
(docs/DESIGN.md §6). :func:`compile_model` returns a drop-in replacement that keeps stepdrop's
contract ``out = model(x, t)`` (x float [B, C, H, W], t int64 [B]) and its outputs:

* ``"none"``: the model itself (eager, NCHW);
* ``"channels_last"``: a copy of the model in ``torch.channels_last``; x is converted on the
  way in and the output is returned NCHW-contiguous, as the fused-step kernels expect
  (docs/DESIGN.md §5);
* ``"inductor"``: that copy (kept NCHW on a CUDA device) under ``torch.compile``. The first
  call compiles, which takes tens of seconds; :attr:`CompiledModel.compile_seconds` records it.
  A new input shape, dtype, device or grad mode compiles again.

The user's module is never modified. Speed-ups are measured, never assumed:
``benchmarks/bench_compile.py``.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import Tensor, nn

from stepdrop._validation import check_choice, model_device_dtype

__all__ = ["COMPILE_MODES", "CompiledModel", "compile_model"]

COMPILE_MODES = ("none", "channels_last", "inductor")


class CompiledModel(nn.Module):
    """``model`` called in another layout or through ``torch.compile`` (:data:`COMPILE_MODES`).

    The wrapped network is a deep copy (except for ``"none"``), registered as :attr:`inner`, so
    ``parameters()``, ``.to(...)`` and ``eval()`` reach it. :attr:`sample_shape`,
    :attr:`prediction_type` and :attr:`config` are the model's, and any other attribute that is
    not a submodule (``check_resolution``, ``forward_cached``, ``deep_branches``, …) is looked
    up on the copy. Such methods run eager, never compiled; their tensor outputs are returned
    contiguous, as :meth:`forward`'s are.

    The layout is chosen at construction, from the model's device: ``"inductor"`` converts to
    channels-last on the CPU only (on CUDA, Inductor picks the convolution layouts itself).

    Args:
        model: an ``nn.Module`` with the contract ``out = model(x, t)``.
        mode: one of :data:`COMPILE_MODES`.
    """

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        self.mode = check_choice("compile", mode, COMPILE_MODES)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module to be compiled, got {type(model).__name__}")
        device, _ = model_device_dtype(model)
        self.channels_last = mode == "channels_last" or (mode == "inductor" and device.type != "cuda")
        inner = model if mode == "none" else copy.deepcopy(model)
        if self.channels_last:
            inner = inner.to(memory_format=torch.channels_last)
        self.inner = inner
        self.training = inner.training
        call: Callable[..., Any] = inner
        if mode == "inductor":
            # The default mode, not "reduce-overhead": that one records its own CUDA graphs
            # (cudagraph trees), which cannot nest inside the capture of stepdrop's sampling
            # loop (cuda_graph=True, docs/DESIGN.md §5). Static shapes: a sampling run calls
            # the model at one batch shape. Graph breaks fall back to eager, not to an error.
            call = torch.compile(inner, mode=None, dynamic=False, fullgraph=False)
        # kept out of the module registry: state_dict() holds the weights once, under inner.*
        object.__setattr__(self, "_call", call)
        self.compile_seconds = 0.0
        self._compiled = mode != "inductor"  # eager modes have nothing to compile

    # ------------------------------------------------------------------ the model's attributes
    @property
    def sample_shape(self) -> Any:
        """The wrapped model's ``sample_shape`` (C, H, W)."""
        return self.inner.sample_shape

    @property
    def prediction_type(self) -> Any:
        """The wrapped model's ``prediction_type``."""
        return self.inner.prediction_type

    @property
    def config(self) -> Any:
        """The wrapped model's ``config``."""
        return self.inner.config

    def __getattr__(self, name: str) -> Any:
        try:  # parameters, buffers and submodules of the wrapper itself (inner)
            return super().__getattr__(name)
        except AttributeError:
            pass
        inner = self.__dict__.get("_modules", {}).get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = getattr(inner, name)
        if isinstance(value, nn.Module):
            raise AttributeError(f"{type(self).__name__!r} does not forward submodule {name!r}; use .inner.{name}")
        if callable(value) and self.channels_last:
            return _contiguous_outputs(value)
        return value

    # ------------------------------------------------------------------ calls
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``model(x, t)``, NCHW-contiguous; the first call of ``"inductor"`` compiles."""
        if not self._compiled:
            return self._first_call(x, t)[0]
        return self._forward(x, t)

    def warm_up(self, x: Tensor, t: Tensor) -> float:
        """Run one call (the compile, for ``"inductor"``) and return :attr:`compile_seconds`.

        Call it with the batch shape, dtype and grad mode of the sampling run
        (``torch.no_grad()``), or the first sampling call compiles again.
        """
        if self._compiled:
            self._forward(x, t)
        else:
            self._first_call(x, t)
        return self.compile_seconds

    def _forward(self, x: Tensor, t: Tensor) -> Tensor:
        if self.channels_last and isinstance(x, Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self._call(x, t)
        return out.contiguous() if isinstance(out, Tensor) else out

    def _first_call(self, x: Tensor, t: Tensor) -> tuple[Tensor, float]:
        sync = _sync_for(x)
        sync()
        start = time.perf_counter()
        out = self._forward(x, t)
        sync()
        self.compile_seconds = time.perf_counter() - start
        self._compiled = True
        return out, self.compile_seconds

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, channels_last={self.channels_last}"


def compile_model(model: nn.Module, mode: str) -> nn.Module:
    """``model`` for ``mode="none"``, else :class:`CompiledModel` ``(model, mode)``.

    ``mode`` is one of :data:`COMPILE_MODES`; see the module docstring for what each does.
    """
    if check_choice("compile", mode, COMPILE_MODES) == "none":
        return model
    return CompiledModel(model, mode)


def _sync_for(x: object) -> Callable[[], None]:
    """Wait for the device of ``x`` (a no-op off CUDA): a compile time includes its kernels."""
    if isinstance(x, Tensor) and x.device.type == "cuda":
        return lambda: torch.cuda.synchronize(x.device)
    return lambda: None


def _contiguous_outputs(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with its tensor outputs (alone, or in a plain tuple or list) made contiguous."""

    def call(*args: Any, **kwargs: Any) -> Any:
        out = method(*args, **kwargs)
        if isinstance(out, Tensor):
            return out.contiguous()
        if type(out) in (tuple, list):
            return type(out)(o.contiguous() if isinstance(o, Tensor) else o for o in out)
        return out

    call.__name__ = getattr(method, "__name__", "call")
    call.__doc__ = getattr(method, "__doc__", None)
    return call
