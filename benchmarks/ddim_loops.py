"""The DDIM-25 workload shared by ``bench_sampler_loop.py`` and ``bench_gpu_throughput.py``.

One small TinyUNet (3×32×32, two levels, no attention, 0.65M parameters) with random weights,
and the two loops that run it for K = 25 DDIM (η = 0, Song et al. 2021) model calls on the same
schedule: :class:`stepdrop.FusedSampler` and the loop a diffusers user writes around
``DDIMScheduler`` (``set_timesteps(25)``, trailing spacing, ᾱ = 1 at the clean end). The
stepdrop schedule is built from the diffusers config (:meth:`NoiseSchedule.from_diffusers_config`),
so both use the same float32 β; and trailing DDIM-25 is stepdrop's "uniform" plan, so both
loops compute the same images (checked before timing).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from stepdrop import NoiseSchedule, TinyUNet

K = 25
UNET_CONFIG = dict(in_channels=3, image_size=32, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
                   attention_resolutions=())


def tiny_unet(device: str = "cpu") -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(**UNET_CONFIG).to(device).eval()


def ddim_scheduler():
    """diffusers' DDIMScheduler for DDPM's linear β (1e-4 … 0.02, T = 1000), trailing spacing."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                         timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)


def stepdrop_schedule(scheduler) -> NoiseSchedule:
    return NoiseSchedule.from_diffusers_config(scheduler.config)


@torch.no_grad()
def diffusers_loop(model, scheduler, noise: Tensor, steps: int = K) -> Tensor:
    """The sampling loop of diffusers' ``DDIMPipeline``: timesteps on the CPU, ε = model(x, t),
    then ``scheduler.step``."""
    scheduler.set_timesteps(steps)
    x = noise
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x).prev_sample
    return x


def model_calls(model, noise: Tensor, steps: int = K) -> Callable[[], Tensor]:
    """A function making ``steps`` model calls alone, at the DDIM-25 plan's timesteps (the
    floor of any sampling loop); the timestep vectors are built beforehand."""
    stride = 1000 // steps
    ts = [torch.full((noise.shape[0],), 999 - stride * k, dtype=torch.int64, device=noise.device) for k in range(steps)]

    @torch.no_grad()
    def run() -> Tensor:
        out = noise
        for t in ts:
            out = model(noise, t)
        return out

    return run
