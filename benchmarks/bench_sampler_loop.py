"""Sampler-loop overhead on the CPU: what a DDIM-25 run costs beyond its 25 model calls.

For a small TinyUNet (:mod:`ddim_loops`), each round times, one after the other:
25 model calls alone (the floor), the hand-written diffusers ``DDIMScheduler`` loop, and
``FusedSampler(...).sample(noise, "uniform", budget=25)`` (timed by pytest-benchmark). Reported
in ``extra_info`` (medians of one interleaved run):

* ``fused_overhead_ratio``: FusedSampler time ÷ (25 × model forward) (target ≤ 1.03);
* ``diffusers_overhead_ratio``: the same for the diffusers loop.

Slow (about a minute on 2 cores): runs only with ``--benchmark-only`` (``make bench``).
"""

import pytest
import torch

from ddim_loops import K, ddim_scheduler, diffusers_loop, model_calls, stepdrop_schedule, tiny_unet
from stepdrop import FusedSampler

pytest.importorskip("diffusers")


@pytest.mark.parametrize("batch", [1, 4])
def test_sampler_loop_overhead(benchmark_only, interleaved, benchmark, batch):
    model = tiny_unet("cpu")
    scheduler = ddim_scheduler()
    sampler = FusedSampler(model, stepdrop_schedule(scheduler), solver="ddim")
    noise = torch.randn(batch, *model.sample_shape, generator=torch.Generator().manual_seed(0))

    def fused():
        return sampler.sample(noise, "uniform", budget=K)[0]

    def diffusers():
        return diffusers_loop(model, scheduler, noise)

    # the same images (float32 ᾱ on both sides; the update differs only in rounding)
    torch.testing.assert_close(fused(), diffusers(), rtol=1e-4, atol=1e-4)
    med = interleaved(fused, {"model_calls": model_calls(model, noise), "diffusers": diffusers},
                      rounds=11 if batch == 1 else 5, warmup_rounds=2 if batch == 1 else 1)
    info = {
        "model_calls_median_s": med["model_calls"],
        "fused_median_s": med["target"],
        "diffusers_median_s": med["diffusers"],
        "fused_overhead_ratio": med["target"] / med["model_calls"],
        "diffusers_overhead_ratio": med["diffusers"] / med["model_calls"],
        "forward_ms": med["model_calls"] / K * 1e3,
    }
    benchmark.extra_info.update(info)
    print(f"\nB={batch}: {K} model calls {med['model_calls'] * 1e3:.1f} ms; FusedSampler {med['target'] * 1e3:.1f} ms "
          f"(ratio {info['fused_overhead_ratio']:.3f}); diffusers loop {med['diffusers'] * 1e3:.1f} ms "
          f"(ratio {info['diffusers_overhead_ratio']:.3f})")
