"""Per-step call variants: how each model call of a plan is made (docs/DESIGN.md §4c).

A step plan says *when* the model is called; a :class:`CallPlan` says *how*, per plan column k:

* full: the model as it is;
* at a reduced resolution (PostDiff's mixed-resolution denoising, Du et al. 2025, arXiv
  2508.06160): the first calls run on x at ``scale``·H × ``scale``·W; after the last of them
  x̂0 is upsampled bilinearly and re-noised with fresh seeded noise to the next timestep,
  x_s = √ᾱ_s·up(x̂0) + √(1−ᾱ_s)·z, and sampling goes on at full size. A multistep solver starts
  its history afresh there (its past x̂0 are at the other size);
* shallow, with the cached deep feature (DeepCache, Ma et al. 2024): every ``interval`` calls
  (or on a quadratic refresh schedule) the whole network runs and its up-path feature at skip
  ``branch`` is kept; the calls in between run only the shallow path and reuse it. The first
  call at each resolution and width is always a full one;
* at a reduced width (DDSM, Wang et al. 2024) of a slimmable network
  (:class:`~stepdrop.models.SlimmableTinyUNet`): one width for every call, or one per call (a
  searched width schedule).

A shallow or low-resolution call is still a model call: NFE counts it, and its FLOPs are its
own (:func:`stepdrop.cost.gflops_per_variant`). Cell specs write a call plan as a suffix,
``ddim:quadratic-25+mixres(0.5,0.3)+cache(5)``, ``ddim-25+width(0.5)``; :func:`parse_calls` reads it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from stepdrop._io import cache_root
from stepdrop._validation import check_choice, check_float, check_int

__all__ = ["CallPlan", "DeepCache", "MixedResolution", "ModelCalls", "Variant", "Widths", "parse_calls"]

REFRESH = ("uniform", "quadratic")
DEFAULT_BRANCH = 1
"""Skip branch 1 by default: the embedded model's top level (32 px) holds skips 0 and 1, so the
shallow path keeps one ResBlock of it, as DeepCache's pixel-DDPM recipe (branch 2 of a model
with three skips per level) stays inside the top level."""


class Variant(NamedTuple):
    """How one column's model call runs: at ``scale`` of the full size, ``shallow`` (the cached
    deep feature) or not, at ``width`` of a slimmable network."""

    scale: float = 1.0
    shallow: bool = False
    width: float = 1.0

    @property
    def label(self) -> str:
        parts = ([f"res{self.scale:g}"] if self.scale != 1.0 else []) + (["shallow"] if self.shallow else []) + \
            ([f"w{self.width:g}"] if self.width != 1.0 else [])
        return "+".join(parts) or "full"


FULL = Variant()


@dataclass(frozen=True)
class MixedResolution:
    """The first ``fraction`` of a plan's calls at ``scale`` of the full size (PostDiff)."""

    scale: float
    fraction: float

    def __post_init__(self) -> None:
        check_float("mixres scale", self.scale, low=0.0, high=1.0, low_open=True, high_open=True)
        check_float("mixres fraction", self.fraction, low=0.0, high=1.0, low_open=True, high_open=True)

    def low_res_calls(self, columns: int) -> int:
        """Calls at the reduced size for a plan of ``columns`` calls: round(fraction·K), at least
        one, and at least one full-size call after them."""
        if columns < 2:
            raise ValueError(f"mixres needs a plan of at least 2 model calls (some at each size), got {columns}")
        return min(columns - 1, max(1, round(self.fraction * columns)))

    @property
    def text(self) -> str:
        return f"mixres({self.scale:g},{self.fraction:g})"


@dataclass(frozen=True)
class DeepCache:
    """A full call every ``interval`` calls (``refresh`` "uniform"), or ``ceil(K/interval)`` full
    calls placed quadratically, denser toward the clean end ("quadratic"); the shallow path at
    skip ``branch`` in between."""

    interval: int
    branch: int = DEFAULT_BRANCH
    refresh: str = "uniform"

    def __post_init__(self) -> None:
        check_int("cache interval", self.interval, low=1)
        check_int("cache branch", self.branch, low=0)
        check_choice("cache refresh", self.refresh, REFRESH)

    def refresh_columns(self, columns: int) -> set[int]:
        if self.refresh == "uniform":
            return set(range(0, columns, self.interval))
        m = math.ceil(columns / self.interval)
        return {min(columns - 1, round(columns * (1 - ((m - i) / m) ** 2))) for i in range(m)}

    @property
    def text(self) -> str:
        extra = "" if (self.branch, self.refresh) == (DEFAULT_BRANCH, "uniform") else \
            f",{self.branch}" + ("" if self.refresh == "uniform" else f",{self.refresh}")
        return f"cache({self.interval}{extra})"


def width_schedule_path(name: str) -> Path:
    """Where the named width schedule ``name`` lives: ``$STEPDROP_CACHE/widths/<name>.json``
    (``stepdrop search-widths`` writes it), or ``name`` itself if it is a path to a ``.json``."""
    if name.endswith(".json") or "/" in name:
        return Path(name)
    return cache_root() / "widths" / f"{name}.json"


def load_width_schedule(name: str) -> "Widths":
    """The named width schedule (``+width(@name)``), read from :func:`width_schedule_path`."""
    path = width_schedule_path(name)
    try:
        widths = json.loads(path.read_text())["widths"]
        return Widths(tuple(float(w) for w in widths), name=name)
    except FileNotFoundError:
        raise ValueError(f"width schedule @{name}: no file {path} (stepdrop search-widths writes it)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"width schedule @{name}: {path} is not a width schedule ({type(exc).__name__}: {exc})") \
            from None


@dataclass(frozen=True)
class Widths:
    """The width of each call of a slimmable network: one for all (``width(0.5)``), one per
    call (``width(1,1,0.75,…)``: its length must be the plan's calls), or a named searched
    schedule (``width(@name)``, :func:`load_width_schedule`)."""

    widths: tuple[float, ...]
    name: str | None = None

    def __post_init__(self) -> None:
        if not self.widths:
            raise ValueError("width needs at least one width")
        for w in self.widths:
            check_float("width", w, low=0.0, high=1.0, low_open=True)

    def per_column(self, columns: int) -> tuple[float, ...]:
        if len(self.widths) == 1:
            return self.widths * columns
        if len(self.widths) != columns:
            raise ValueError(f"a width schedule of {len(self.widths)} calls cannot run a plan of {columns} calls")
        return self.widths

    @property
    def text(self) -> str:
        return f"width(@{self.name})" if self.name else f"width({','.join(f'{w:g}' for w in self.widths)})"


@dataclass(frozen=True)
class CallPlan:
    """How the calls of a plan are made: mixed resolution, deep-feature caching, slimmed widths,
    any combination, or plain full calls."""

    mixres: MixedResolution | None = None
    cache: DeepCache | None = None
    width: Widths | None = None

    @property
    def text(self) -> str:
        """The spec suffix, e.g. ``+mixres(0.5,0.3)+cache(5)`` ("" for plain full calls)."""
        return "".join("+" + part.text for part in (self.mixres, self.cache, self.width) if part is not None)

    @property
    def plain(self) -> bool:
        return self.mixres is None and self.cache is None and self.width is None

    def variants(self, columns: int) -> tuple[Variant, ...]:
        """One :class:`Variant` per plan column (``columns`` = L − 1)."""
        low = self.mixres.low_res_calls(columns) if self.mixres is not None else 0
        scales = [self.mixres.scale if k < low else 1.0 for k in range(columns)] if low else [1.0] * columns
        widths = self.width.per_column(columns) if self.width is not None else (1.0,) * columns
        refresh = self.cache.refresh_columns(columns) if self.cache is not None else set(range(columns))
        # a shallow call reuses a feature of its own size and width: the first call of each is full
        return tuple(Variant(s, self.cache is not None and k not in refresh and k > 0 and scales[k - 1] == s
                             and widths[k - 1] == w, w) for k, (s, w) in enumerate(zip(scales, widths)))

    def start_shape(self, sample_shape: Sequence[int]) -> tuple[int, ...]:
        """(C, H, W) of x_T: the full ``sample_shape``, or its reduced size under mixres."""
        shape = tuple(sample_shape)
        return shape if self.mixres is None else (shape[0], *reduced_size(shape, self.mixres.scale))

    def check_model(self, model: Any, sample_shape: Sequence[int]) -> None:
        """ValueError naming the setting that ``model`` cannot run, before any model call."""
        if self.mixres is not None:
            size = reduced_size(sample_shape, self.mixres.scale)
            check = getattr(model, "check_resolution", None)
            if check is None:
                raise ValueError(f"mixres needs a model that declares which input sizes it takes "
                                 f"(check_resolution(h, w)), and {type(model).__name__} does not")
            try:
                check(*size)
            except ValueError as exc:
                raise ValueError(f"mixres scale {self.mixres.scale:g} gives {size[0]}x{size[1]} from "
                                 f"{tuple(sample_shape)[1]}x{tuple(sample_shape)[2]}, which the model cannot take: {exc}") \
                    from None
        if self.cache is not None:
            branches = getattr(model, "deep_branches", None)
            if branches is None or not callable(getattr(model, "forward_cached", None)):
                raise ValueError(f"cache needs a model with a shallow/deep split (forward_cached and deep_branches, as "
                                 f"TinyUNet has), and {type(model).__name__} has none")
            check_int("cache branch", self.cache.branch, low=0, high=int(branches) - 1)
        if self.width is not None:
            allowed = getattr(model, "widths", None)
            if allowed is None or not callable(getattr(model, "set_width", None)):
                raise ValueError(f"width needs a slimmable model (set_width and widths, as SlimmableTinyUNet has), "
                                 f"and {type(model).__name__} is not one")
            bad = sorted(set(self.width.widths) - set(allowed))
            if bad:
                raise ValueError(f"width must be among the widths the model was trained at {tuple(allowed)}, "
                                 f"got {bad[0]:g}")


def reduced_size(sample_shape: Sequence[int], scale: float) -> tuple[int, int]:
    """(h, w) = round(scale·H), round(scale·W)."""
    _, H, W = tuple(sample_shape)
    return max(1, round(scale * H)), max(1, round(scale * W))


_PART = re.compile(r"\+(?P<name>[a-z]+)\((?P<args>[^()]*)\)")


def parse_calls(text: str) -> CallPlan:
    """A call plan from its spec suffix: ``+mixres(scale,fraction)``,
    ``+cache(interval[,branch[,uniform|quadratic]])`` and ``+width(w)`` or ``+width(w_1,…,w_K)``,
    alone or together, e.g. ``+mixres(0.5,0.3)+cache(5)``."""
    parts: dict[str, list[str]] = {}
    pos = 0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        if m["name"] in parts:
            raise ValueError(f"call spec {text!r} names {m['name']} twice")
        parts[m["name"]] = [a.strip() for a in m["args"].split(",")]
        pos = m.end()
    if pos != len(text):
        raise ValueError(f"call spec {text!r} must be a list of +mixres(scale,fraction), "
                         f"+cache(interval[,branch[,uniform|quadratic]]) and +width(w[,...]), e.g. "
                         f"+mixres(0.5,0.3)+cache(5)")
    unknown = sorted(set(parts) - {"mixres", "cache", "width"})
    if unknown:
        raise ValueError(f"call spec {text!r}: unknown variant {unknown[0]!r}; legal: mixres, cache, width")
    mixres = cache = width = None
    if "width" in parts:
        args = parts["width"]
        if len(args) == 1 and args[0].startswith("@"):
            width = load_width_schedule(args[0][1:])
        else:
            width = Widths(tuple(_number("width", w) for w in args))
    if "mixres" in parts:
        args = parts["mixres"]
        if len(args) != 2:
            raise ValueError(f"mixres takes (scale, fraction), e.g. mixres(0.5,0.3), got mixres({','.join(args)})")
        mixres = MixedResolution(_number("mixres scale", args[0]), _number("mixres fraction", args[1]))
    if "cache" in parts:
        args = parts["cache"]
        if not 1 <= len(args) <= 3:
            raise ValueError(f"cache takes (interval[, branch[, refresh]]), e.g. cache(5), got cache({','.join(args)})")
        interval = _integer("cache interval", args[0])
        branch = _integer("cache branch", args[1]) if len(args) > 1 else DEFAULT_BRANCH
        cache = DeepCache(interval, branch, args[2] if len(args) > 2 else "uniform")
    return CallPlan(mixres, cache, width)


def _number(name: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {text!r}") from None


def _integer(name: str, text: str) -> int:
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"{name} must be an integer, got {text!r}")
    return int(text)


class ModelCalls:
    """The model calls of one run: column k's variant, and the deep feature kept between calls
    (on the device, no host sync: a CUDA graph captures it as it captures the rest of the loop)."""

    def __init__(self, model: Callable[..., Tensor], calls: CallPlan, columns: int, sample_shape: Sequence[int]):
        self.model = model
        self.sample_shape = tuple(sample_shape)
        self.branch = calls.cache.branch if calls.cache is not None else 0
        self.variants = calls.variants(columns)
        self.cached = calls.cache is not None
        self.slimmed = calls.width is not None
        self.previous_width = getattr(model, "width", 1.0) if self.slimmed else 1.0
        self.feature: Tensor | None = None

    def __call__(self, k: int, x: Tensor, t: Tensor) -> Tensor:
        if self.slimmed:
            self.model.set_width(self.variants[k].width)
        if not self.cached:
            return self.model(x, t)
        feature = self.feature if self.variants[k].shallow else None
        out, self.feature = self.model.forward_cached(x, t, self.branch, feature)
        return out

    def finish(self) -> None:
        """Leave the model as it was given: a slimmable model back at the width it had."""
        if self.slimmed:
            self.model.set_width(self.previous_width)

    def size_at(self, k: int) -> tuple[int, int]:
        """(H, W) of x at column k."""
        scale = self.variants[k].scale
        return tuple(self.sample_shape[1:]) if scale == 1.0 else reduced_size(self.sample_shape, scale)

    def switches_after(self, k: int) -> bool:
        """Whether x changes size between column k and k + 1."""
        return k + 1 < len(self.variants) and self.variants[k + 1].scale != self.variants[k].scale


def upsample_and_renoise(x0: Tensor, size: Sequence[int], s: Tensor, table: Tensor, noise: Tensor) -> Tensor:
    """The mixed-resolution switch: x_s = √ᾱ_s·up(x̂0) + √(1−ᾱ_s)·z with up() bilinear
    (align_corners=False) to ``size`` (H, W), per sample; a sample already at the clean end
    (s = −1, ᾱ = 1) gets up(x̂0) itself. Computed in x̂0's dtype with float64 coefficients."""
    up = F.interpolate(x0, size=tuple(size), mode="bilinear", align_corners=False)
    a = torch.where(s >= 0, table.to(torch.float64)[s.clamp(min=0)], torch.ones_like(s, dtype=torch.float64))
    shape = (-1,) + (1,) * (up.ndim - 1)
    return a.sqrt().to(up.dtype).view(shape) * up + (1 - a).sqrt().to(up.dtype).view(shape) * noise.to(up.dtype)
