"""A small DDPM-style UNet for pixel-space noise prediction.

Architecture after Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (appendix B):
a sinusoidal timestep embedding (the Transformer's positional encoding, Vaswani et al. 2017)
fed through a two-layer MLP; at each resolution ``num_res_blocks`` residual blocks (GroupNorm,
SiLU, 3×3 convolutions, the time embedding added between the two convolutions, dropout);
single-layer self-attention at chosen resolutions; stride-2 convolutions down, nearest
upsampling + 3×3 convolution up, with skip connections concatenated on the way up; a middle
block ResBlock → attention → ResBlock.

Contract (shared by every model in stepdrop): ``eps = model(x, t)`` with ``x`` of shape
[B, C, H, W] and ``t`` an integer timestep vector [B] (or one timestep for the whole batch);
``eps`` has ``x``'s shape.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stepdrop._validation import check_bool, check_float, check_int
from stepdrop.models._timesteps import as_timestep_vector
from stepdrop.prediction import check_prediction_type

__all__ = ["TinyUNet", "timestep_embedding"]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal timestep embedding (Ho et al. 2020; Vaswani et al. 2017, sec. 3.5).

    ``emb[b] = [sin(t_b·ω_0), …, sin(t_b·ω_{h−1}), cos(t_b·ω_0), …, cos(t_b·ω_{h−1})]`` with
    ``h = dim // 2`` and ``ω_i = max_period^(−i/(h−1))``, computed in float32; an odd ``dim``
    gets one zero column appended.

    Args:
        t: timesteps, shape [B] (integer or floating dtype).
        dim: embedding width, ≥ 1.
    Returns:
        float32 tensor of shape [B, dim].
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / max(half - 1, 1)
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _group_norm(channels: int, max_groups: int) -> nn.GroupNorm:
    # The largest group count ≤ max_groups that divides the channel count.
    return nn.GroupNorm(math.gcd(max_groups, channels), channels, eps=1e-6)


class _ResBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → (+ time embedding) → GroupNorm → SiLU → dropout → conv3×3, plus skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = _group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.in_parts: tuple[int, ...] | None = None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class _AttnBlock(nn.Module):
    """Multi-head self-attention over the H·W positions, residual (F.scaled_dot_product_attention)."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = _group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, heads, C // heads, H * W)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # [B, heads, HW, d]
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, HW, d]
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(h)


class _Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """The blocks of one resolution: ResBlocks (each optionally followed by attention) and a resampler."""

    def __init__(self) -> None:
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()  # nn.Identity where the resolution has no attention
        self.resample: nn.Module = nn.Identity()


class TinyUNet(nn.Module):
    """Small DDPM UNet predicting the noise ε (Ho et al. 2020, "Denoising Diffusion Probabilistic Models").

    Input ``x``: float [B, in_channels, image_size, image_size]; ``t``: int64 timesteps [B]
    (one per sample; values in [0, T−1]) or a single timestep (0-dim tensor or Python int)
    broadcast over the batch. Output: ε̂ of shape [B, out_channels, image_size, image_size]
    (``out_channels`` defaults to ``in_channels``, so ε̂ has ``x``'s shape). Each sample's output
    depends only on its own ``x[b]`` and ``t[b]`` (GroupNorm normalises within a sample).

    Args:
        in_channels: image channels, ≥ 1 (default 3).
        out_channels: output channels, ≥ 1, or None for ``in_channels``.
        image_size: side length H = W, ≥ 1 and divisible by 2**(len(channel_mults) − 1) (default 32).
        base_channels: channels of the first level, ≥ 1 (default 32); level i has
            ``base_channels * channel_mults[i]``; also the width of the sinusoidal embedding.
        channel_mults: non-empty sequence of positive ints, one per resolution (default (1, 2, 2)).
            Level i works at resolution ``image_size // 2**i``.
        num_res_blocks: ResBlocks per level on the way down, ≥ 1 (default 2; the way up has one more).
        attention_resolutions: resolutions (side lengths) with self-attention after each
            ResBlock; each must be one of ``image_size // 2**i`` (default (16,)). Empty: none.
        dropout: dropout probability inside ResBlocks, in [0, 1) (default 0.0).
        num_heads: attention heads, ≥ 1, dividing the channel count at every attention
            block (default 1).
        time_embed_dim: width of the time-embedding MLP, ≥ 1, or None for ``4 * base_channels``.
        mid_attention: whether the middle block has self-attention (default True, as in DDPM).
        norm_groups: largest GroupNorm group count (default 32); each norm uses
            gcd(norm_groups, channels) groups so that the count divides the channels.
        prediction_type: what the output means, one of
            :data:`stepdrop.prediction.PREDICTION_TYPES` (default "epsilon"): the noise ε, the
            velocity v = α_t·ε − σ_t·x0, or x0 ("sample"). It changes no weight; samplers read
            it to convert the output (:func:`stepdrop.prediction.to_eps`), and checkpoints store
            it with the architecture.
        zero_init_output: zero the final convolution's weights and bias (default False).
            True is the usual choice for training from scratch (the network starts at ε̂ = 0);
            False keeps a freshly built model a non-degenerate function of (x, t) for tests
            and benchmarks.

    Timestep values are not range-checked in ``forward`` (that would need a device sync).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        image_size: int = 32,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_heads: int = 1,
        time_embed_dim: int | None = None,
        mid_attention: bool = True,
        norm_groups: int = 32,
        prediction_type: str = "epsilon",
        zero_init_output: bool = False,
    ):
        super().__init__()
        in_channels = check_int("in_channels", in_channels, low=1)
        out_channels = in_channels if out_channels is None else check_int("out_channels", out_channels, low=1)
        image_size = check_int("image_size", image_size, low=1)
        base_channels = check_int("base_channels", base_channels, low=1)
        channel_mults = _int_tuple("channel_mults", channel_mults, low=1)
        if not channel_mults:
            raise ValueError("channel_mults must be a non-empty sequence of positive ints, got ()")
        num_res_blocks = check_int("num_res_blocks", num_res_blocks, low=1)
        attention_resolutions = _int_tuple("attention_resolutions", attention_resolutions, low=1)
        dropout = check_float("dropout", dropout, low=0.0, high=1.0, high_open=True)
        num_heads = check_int("num_heads", num_heads, low=1)
        time_embed_dim = 4 * base_channels if time_embed_dim is None else check_int("time_embed_dim", time_embed_dim, low=1)
        mid_attention = check_bool("mid_attention", mid_attention)
        norm_groups = check_int("norm_groups", norm_groups, low=1)
        prediction_type = check_prediction_type(prediction_type)
        zero_init_output = check_bool("zero_init_output", zero_init_output)

        num_levels = len(channel_mults)
        factor = 2 ** (num_levels - 1)
        if image_size % factor:
            raise ValueError(
                f"image_size must be divisible by 2**(len(channel_mults) - 1) = {factor} "
                f"(it is halved {num_levels - 1} time(s)), got {image_size}"
            )
        resolutions = tuple(image_size // 2**i for i in range(num_levels))
        bad = sorted(set(attention_resolutions) - set(resolutions))
        if bad:
            raise ValueError(
                f"attention_resolutions must be resolutions that occur in the network {resolutions}, "
                f"got {attention_resolutions} ({bad} do not occur)"
            )
        attn_channels = [base_channels * m for m, r in zip(channel_mults, resolutions) if r in attention_resolutions]
        if mid_attention:
            attn_channels.append(base_channels * channel_mults[-1])
        for ch in attn_channels:
            if ch % num_heads:
                raise ValueError(
                    f"num_heads must divide the channel count of every attention block {sorted(set(attn_channels))}, "
                    f"got {num_heads}"
                )

        self._config: dict[str, Any] = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "image_size": image_size,
            "base_channels": base_channels,
            "channel_mults": list(channel_mults),
            "num_res_blocks": num_res_blocks,
            "attention_resolutions": list(attention_resolutions),
            "dropout": dropout,
            "num_heads": num_heads,
            "time_embed_dim": time_embed_dim,
            "mid_attention": mid_attention,
            "norm_groups": norm_groups,
            "prediction_type": prediction_type,
            "zero_init_output": zero_init_output,
        }

        g = norm_groups
        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        def attn_or_identity(ch: int, res: int) -> nn.Module:
            return _AttnBlock(ch, num_heads, g) if res in attention_resolutions else nn.Identity()

        # Down path; record the channels of every feature map pushed as a skip connection.
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for i, (mult, res) in enumerate(zip(channel_mults, resolutions)):
            level = _Level()
            out_ch = base_channels * mult
            for _ in range(num_res_blocks):
                level.res.append(_ResBlock(ch, out_ch, time_embed_dim, dropout, g))
                level.attn.append(attn_or_identity(out_ch, res))
                ch = out_ch
                skip_channels.append(ch)
            if i < num_levels - 1:
                level.resample = _Downsample(ch)
                skip_channels.append(ch)
            self.down.append(level)

        self.mid_res1 = _ResBlock(ch, ch, time_embed_dim, dropout, g)
        self.mid_attn = _AttnBlock(ch, num_heads, g) if mid_attention else nn.Identity()
        self.mid_res2 = _ResBlock(ch, ch, time_embed_dim, dropout, g)

        # Up path (stored coarsest level first, in execution order).
        self.up = nn.ModuleList()
        for i in reversed(range(num_levels)):
            level = _Level()
            out_ch = base_channels * channel_mults[i]
            for _ in range(num_res_blocks + 1):
                skip = skip_channels.pop()
                level.res.append(_ResBlock(ch + skip, out_ch, time_embed_dim, dropout, g))
                level.res[-1].in_parts = (ch, skip)  # it reads [h, skip] (a slimmable network slices each)
                level.attn.append(attn_or_identity(out_ch, resolutions[i]))
                ch = out_ch
            if i > 0:
                level.resample = _Upsample(ch)
            self.up.append(level)
        assert not skip_channels  # internal invariant, not user input
        # the up path's ResBlocks in execution order (level, index): flat block i takes back skip n − 1 − i
        self._up_blocks = [(level, j) for level in self.up for j in range(len(level.res))]

        self.norm_out = _group_norm(ch, g)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)
        if zero_init_output:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain JSON-able dict (lists, not tuples)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "TinyUNet":
        """Build a model from :attr:`config` (missing keys take their defaults)."""
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        known = set(cls._config_keys())
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"config has unknown keys {unknown}; legal keys are {sorted(known)}")
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
        return cls(**kwargs)

    @staticmethod
    def _config_keys() -> tuple[str, ...]:
        import inspect

        return tuple(p for p in inspect.signature(TinyUNet.__init__).parameters if p != "self")

    @property
    def prediction_type(self) -> str:
        """What the output means: "epsilon", "v_prediction" or "sample" (:mod:`stepdrop.prediction`)."""
        return self._config["prediction_type"]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one input sample."""
        c = self._config
        return (c["in_channels"], c["image_size"], c["image_size"])

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self._config.items())

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, t: Tensor | int) -> Tensor:
        """ε̂ = model(x, t); x: float [B, C, H, W], t: int timesteps [B] or a single one."""
        x, t = self._check_inputs(x, t)
        temb = self._embed(t)
        skips = self._down(x, temb)
        h = self.mid_res2(self.mid_attn(self.mid_res1(skips[-1], temb)), temb)
        return self._up(h, skips, temb, 0)

    # ------------------------------------------------------------------ call variants
    @property
    def deep_branches(self) -> int:
        """Number of skip branches, the places :meth:`forward_cached` can split the network:
        branch b (0 = the shallowest, the output of ``conv_in``) is the b-th feature map pushed
        on the way down, and the up-path ResBlock that takes it back is the split point."""
        return len(self._up_blocks)

    def check_resolution(self, height: int, width: int) -> None:
        """ValueError unless the network can run at H × W: the trained size or a reduced square
        size that its {levels − 1} stride-2 downsamplings divide (mixed-resolution sampling,
        docs/DESIGN.md §4c). Attention stays at the levels it was built for."""
        size = self._config["image_size"]
        factor = 2 ** (len(self._config["channel_mults"]) - 1)
        if height != width or not 1 <= height <= size or height % factor:
            raise ValueError(
                f"TinyUNet runs at a square size H = W <= its image_size {size} and divisible by {factor} (its "
                f"{len(self._config['channel_mults']) - 1} stride-2 downsamplings), got {height}x{width}")

    def forward_cached(self, x: Tensor, t: Tensor | int, branch: int,
                       feature: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(ε̂, deep feature): deep-feature caching at skip ``branch`` (DeepCache, Ma et al. 2024;
        docs/DESIGN.md §4c).

        With ``feature=None`` this is the full network, which also returns the up-path feature
        that enters the ResBlock taking skip ``branch`` back. Given that ``feature`` (from an
        earlier call on a batch of the same shape), only the shallow path runs: the down path
        until it has pushed skip ``branch``, then the up path from that ResBlock on, with the
        cached feature in place of everything deeper. The returned feature is then the one given.
        """
        branch = self._check_branch(branch)
        x, t = self._check_inputs(x, t)
        temb = self._embed(t)
        start = len(self._up_blocks) - 1 - branch
        if feature is None:
            skips = self._down(x, temb)
            h = self.mid_res2(self.mid_attn(self.mid_res1(skips[-1], temb)), temb)
            h = self._up(h, skips, temb, 0, stop=start)
            feature = h
        else:
            if not isinstance(feature, Tensor) or feature.shape[0] != x.shape[0]:
                got = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
                raise ValueError(f"feature must be the [B, ...] tensor an earlier full call returned for this batch "
                                 f"(B = {x.shape[0]}), got {got}")
            skips = self._down(x, temb, stop=branch + 1)
        return self._up(feature, skips, temb, start), feature

    def _check_branch(self, branch: int) -> int:
        return check_int("branch", branch, low=0, high=len(self._up_blocks) - 1)

    def _embed(self, t: Tensor) -> Tensor:
        temb = timestep_embedding(t, self._config["base_channels"])
        return self.time_mlp(temb.to(self.time_mlp[0].weight.dtype))

    def _down(self, x: Tensor, temb: Tensor, stop: int | None = None) -> list[Tensor]:
        """The skip features, shallowest first (the last one is also the middle block's input: the
        deepest level has no downsampling); with ``stop``, only the first ``stop`` of them."""
        h = self.conv_in(x)
        skips = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                if stop is not None and len(skips) >= stop:
                    return skips
                h = attn(res(h, temb))
                skips.append(h)
            if not isinstance(level.resample, nn.Identity):
                if stop is not None and len(skips) >= stop:
                    return skips
                h = level.resample(h)
                skips.append(h)
        return skips

    def _up(self, h: Tensor, skips: list[Tensor], temb: Tensor, start: int, stop: int | None = None) -> Tensor:
        """The up path from flat ResBlock ``start`` (each takes back the deepest skip left in
        ``skips``) to the output; with ``stop``, the feature entering ResBlock ``stop`` instead."""
        for i, (level, j) in enumerate(self._up_blocks):
            if i < start:
                continue
            if stop is not None and i == stop:
                return h
            h = level.attn[j](level.res[j](torch.cat([h, skips.pop()], dim=1), temb))
            if j == len(level.res) - 1:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_inputs(self, x: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        expected = self.sample_shape
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.ndim != 4 or x.shape[1] != expected[0] or tuple(x.shape[2:]) != expected[1:] and \
                not self._reduced_size_ok(x.shape[2], x.shape[3]):
            raise ValueError(f"x must have shape [B, {expected[0]}, {expected[1]}, {expected[2]}] (or a reduced square "
                             f"size that the downsamplings divide, for mixed resolution), got {tuple(x.shape)}")
        return x, as_timestep_vector(t, x.shape[0], x.device)

    def _reduced_size_ok(self, height: int, width: int) -> bool:
        try:
            self.check_resolution(height, width)
        except ValueError:
            return False
        return True


def _int_tuple(name: str, value: object, *, low: int) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(value).__name__}")
    return tuple(check_int(f"{name}[{i}]", v, low=low) for i, v in enumerate(value))
