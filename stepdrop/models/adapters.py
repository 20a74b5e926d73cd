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

    # ------------------------------------------------------------------ call variants (docs/DESIGN.md §4c)
    def check_resolution(self, height: int, width: int) -> None:
        """ValueError unless the UNet can run at H × W: a size up to its ``sample_size`` that its
        downsampling blocks divide (mixed-resolution sampling)."""
        factor = 2 ** sum(getattr(b, "downsamplers", None) is not None for b in self.unet.down_blocks)
        _, H, W = self._sample_shape
        if not (1 <= height <= H and 1 <= width <= W) or height % factor or width % factor:
            raise ValueError(f"the UNet2DModel runs at sizes up to its sample_size {H}x{W} that its downsamplings "
                             f"divide ({factor}), got {height}x{width}")

    @property
    def deep_branches(self) -> int:
        """Split points for deep-feature caching: one per up block (branch 0 = the last, shallowest,
        up block; the cached feature is the one entering up block ``n − 1 − branch``). A UNet with
        skip-connection blocks (``Skip*Block2D``, whose image skip runs alongside every block)
        has no shallow path to run on its own, and is refused with the reason."""
        skip = [type(b).__name__ for b in (*self.unet.down_blocks, *self.unet.up_blocks) if hasattr(b, "skip_conv")]
        if skip:
            raise ValueError(f"deep-feature caching cannot split this UNet2DModel: its {skip[0]} carries an image "
                             f"skip path through every block, so no shallow path exists without the deep blocks")
        return len(self.unet.up_blocks)

    def forward_cached(self, x: Tensor, t: Tensor | int, branch: int,
                       feature: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(output, deep feature), as :meth:`stepdrop.models.TinyUNet.forward_cached`, at up-block
        granularity: diffusers' ``UNet2DModel.forward`` (0.42) written out with the split. The
        full call (``feature=None``) equals ``unet(x, t)``; given a feature, only the down blocks
        that make the skips of the shallow up blocks run, then those up blocks."""
        from stepdrop._validation import check_int

        unet = self.unet
        branch = check_int("branch", branch, low=0, high=self.deep_branches - 1)
        start = len(unet.up_blocks) - 1 - branch
        needed = sum(len(b.resnets) for b in unet.up_blocks[start:])  # skips the shallow up blocks take back
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        timesteps = as_timestep_vector(t, x.shape[0], x.device)
        emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype))
        h = unet.conv_in(x)
        res: tuple[Tensor, ...] = (h,)
        for block in unet.down_blocks:
            if feature is not None and len(res) >= needed:
                break
            h, more = block(hidden_states=h, temb=emb)
            res += more
        if feature is None:
            if unet.mid_block is not None:
                h = unet.mid_block(h, emb)
            for block in unet.up_blocks[:start]:
                n = len(block.resnets)
                h, res = block(h, res[-n:], emb), res[:-n]
            feature = h
        res = res[:needed]
        h = feature
        for block in unet.up_blocks[start:]:
            n = len(block.resnets)
            h, res = block(h, res[-n:], emb), res[:-n]
        h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        if unet.config.time_embedding_type == "fourier":
            h = h / timesteps.reshape((h.shape[0], *([1] * (h.ndim - 1))))
        return h, feature


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
