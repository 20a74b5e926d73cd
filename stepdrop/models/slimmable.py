"""A slimmable TinyUNet: one set of weights, run at several widths (DDSM, Wang et al. 2024,
"Denoising Diffusion Step-aware Models", ICLR; docs/DESIGN.md §4c).

At width w every convolution and linear layer uses a prefix of its weights: the first
``active(C_out)`` output rows, where ``active(C) = min(C, 8·⌈C·w/8⌉)`` (channels rounded up to
multiples of 8, as DDSM's code does), and the input columns of the channels it receives. Two
places differ from a plain prefix:

* the up path concatenates [h, skip]; a layer reading that concatenation (the ResBlock's first
  GroupNorm, first convolution and 1×1 skip convolution) takes the first channels of *each
  part*, so at full width it is exactly the unsliced layer and each part keeps its meaning;
* attention's qkv convolution slices q, k and v each.

GroupNorm slices its affine parameters and takes the rule TinyUNet builds it with, the largest
group count ≤ ``norm_groups`` that divides the channels it gets, so the group count changes
with the width (our 8- and 16-channel layers at w = 1/4 cannot hold 32 groups). The final
convolution keeps its full output. At width 1 the network is the TinyUNet
it was built as, bit for bit; its state dict is TinyUNet's, so a TinyUNet checkpoint
warm-starts it.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdrop._validation import check_float
from stepdrop.models.tiny_unet import TinyUNet, _AttnBlock

__all__ = ["SlimmableTinyUNet", "WIDTHS", "active_channels"]

WIDTHS = (1.0, 0.75, 0.5, 0.25)
"""DDSM's widths."""
CHANNEL_MULTIPLE = 8


def active_channels(channels: int, width: float) -> int:
    """Channels a layer of ``channels`` uses at ``width``: ⌈C·w⌉ rounded up to a multiple of 8."""
    if width >= 1.0:
        return channels
    return min(channels, CHANNEL_MULTIPLE * math.ceil(channels * width / CHANNEL_MULTIPLE))


_INDICES: dict[tuple, Tensor] = {}
"""Index tensors by (what, sizes, width, device): built once, so a call copies nothing from the
host (a CUDA-graph capture forbids that; the capture's warm-up steps build them first)."""


def _input_index(parts: Sequence[int], width: float, device: torch.device) -> Tensor | None:
    """Columns of a layer reading the concatenation of ``parts``: the first active channels of
    each part (None at full width: all of them)."""
    if width >= 1.0:
        return None
    key = ("parts", tuple(parts), width, str(device))
    if key not in _INDICES:
        index, start = [], 0
        for c in parts:
            index.extend(range(start, start + active_channels(c, width)))
            start += c
        _INDICES[key] = torch.tensor(index, device=device)
    return _INDICES[key]


def _qkv_rows(channels: int, width: float, device: torch.device) -> Tensor:
    """Rows of a qkv convolution at ``width``: the first active rows of each of q, k and v."""
    key = ("qkv", channels, width, str(device))
    if key not in _INDICES:
        third, keep = channels // 3, active_channels(channels // 3, width)
        _INDICES[key] = torch.tensor([i * third + j for i in range(3) for j in range(keep)], device=device)
    return _INDICES[key]


class _SlimConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        w, parts, width = self.weight, self.in_parts, self.width
        out = self.out_channels if self.full_output else active_channels(self.out_channels, width)
        if self.qkv and width < 1.0:  # q, k and v: the first active rows of each third
            rows = _qkv_rows(self.out_channels, width, w.device)
            w, bias = w.index_select(0, rows), self.bias.index_select(0, rows) if self.bias is not None else None
        else:
            w, bias = w[:out], self.bias[:out] if self.bias is not None else None
        if parts is not None and width < 1.0:
            w = w.index_select(1, _input_index(parts, width, w.device))
        else:
            w = w[:, : x.shape[1]]
        return self._conv_forward(x, w, bias)


class _SlimLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        out = active_channels(self.out_features, self.width)
        return F.linear(x, self.weight[:out, : x.shape[-1]], self.bias[:out] if self.bias is not None else None)


class _SlimGroupNorm(nn.GroupNorm):
    def forward(self, x: Tensor) -> Tensor:
        if self.width >= 1.0:
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if self.in_parts is not None:
            index = _input_index(self.in_parts, self.width, x.device)
            weight, bias = weight.index_select(0, index), bias.index_select(0, index)
        else:
            weight, bias = weight[: x.shape[1]], bias[: x.shape[1]]
        return F.group_norm(x, math.gcd(self.max_groups, x.shape[1]), weight, bias, self.eps)


_SLIM = {nn.Conv2d: _SlimConv2d, nn.Linear: _SlimLinear, nn.GroupNorm: _SlimGroupNorm}


class SlimmableTinyUNet(TinyUNet):
    """:class:`TinyUNet` that also runs at a reduced width (module docstring).

    Args:
        widths: the widths it is trained and run at, each in (0, 1], 1 included (default
            DDSM's (1, 0.75, 0.5, 0.25)).
        **config: TinyUNet's arguments.

    :meth:`set_width` picks the width of the following calls; :meth:`at_width` does so for a
    ``with`` block. A width outside ``widths`` is refused by name.
    """

    def __init__(self, widths: Sequence[float] = WIDTHS, **config: Any):
        super().__init__(**config)
        widths = tuple(sorted({check_float("widths", w, low=0.0, high=1.0, low_open=True) for w in widths},
                              reverse=True))
        if 1.0 not in widths:
            raise ValueError(f"widths must include the full width 1.0, got {widths}")
        self._config["widths"] = list(widths)
        for name, module in self.named_modules():
            cls = _SLIM.get(type(module))
            if cls is None:
                continue
            module.__class__ = cls
            module.width = 1.0
            module.in_parts = None
            module.full_output = name == "conv_out"
            module.qkv = name.endswith("qkv")
            module.max_groups = self._config["norm_groups"]
        for level in self.up:  # the up ResBlocks read [h, skip]: slice each part
            for block in level.res:
                for layer in (block.norm1, block.conv1, block.skip):
                    if isinstance(layer, (_SlimConv2d, _SlimGroupNorm)):
                        layer.in_parts = block.in_parts
        for w in widths:  # every attention block's channels must hold whole heads
            self._check_heads(w)
        self._width = 1.0

    @property
    def widths(self) -> tuple[float, ...]:
        return tuple(self._config["widths"])

    @property
    def width(self) -> float:
        return self._width

    def set_width(self, width: float) -> None:
        """Run the following calls at ``width``, one of :attr:`widths`."""
        if width not in self.widths:
            raise ValueError(f"width must be one of the widths this network was built for {self.widths}, got {width!r}")
        if width != self._width:
            for module in self.modules():
                if isinstance(module, (_SlimConv2d, _SlimLinear, _SlimGroupNorm)):
                    module.width = width
            self._width = width

    def at_width(self, width: float):
        """``with model.at_width(0.5): model(x, t)``; the previous width is restored after."""
        return _AtWidth(self, width)

    def _check_heads(self, width: float) -> None:
        for name, module in self.named_modules():
            if isinstance(module, _AttnBlock):
                c = active_channels(module.proj.out_channels, width)
                if c % module.num_heads:
                    raise ValueError(f"width {width}: {name} has {c} channels for {module.num_heads} heads")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "SlimmableTinyUNet":
        config = dict(config)
        widths = config.pop("widths", WIDTHS)
        base = TinyUNet.from_config(config)  # checks the keys
        model = cls(widths=widths, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in base.config.items()})
        return model


class _AtWidth:
    def __init__(self, model: SlimmableTinyUNet, width: float):
        self.model, self.width, self.previous = model, width, model.width

    def __enter__(self) -> SlimmableTinyUNet:
        self.previous = self.model.width
        self.model.set_width(self.width)
        return self.model

    def __exit__(self, *exc) -> None:
        self.model.set_width(self.previous)
