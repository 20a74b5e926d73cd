"""GPU throughput of DDIM-25 (images/s) for the small TinyUNet of :mod:`ddim_loops`, at batch
1, 16, 256 and 1024: ``FusedSampler(cuda_graph=True)`` vs the same sampler eager vs the diffusers
``DDIMScheduler`` loop, timed in interleaved rounds with the device synchronised around each run.

``extra_info`` (medians of one run): ``images_per_s_{graph,eager,diffusers}``,
``speedup_vs_diffusers`` (graph ÷ diffusers images/s; target ≥ 3× at batch 1) and
``speedup_vs_eager``. A graph's one-time capture happens before timing (it is cached).

Needs an NVIDIA GPU (skipped otherwise) and runs only with ``--benchmark-only``.
"""

import pytest
import torch

from ddim_loops import K, ddim_scheduler, diffusers_loop, stepdrop_schedule, tiny_unet
from stepdrop import FusedSampler

pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")


@pytest.mark.parametrize("batch", [1, 16, 256, 1024])
def test_gpu_ddim25_throughput(benchmark_only, interleaved, benchmark, batch):
    model = tiny_unet("cuda")
    scheduler = ddim_scheduler()
    schedule = stepdrop_schedule(scheduler)
    graphed = FusedSampler(model, schedule, solver="ddim", cuda_graph=True)
    eager = FusedSampler(model, schedule, solver="ddim")
    noise = torch.randn(batch, *model.sample_shape, device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(0))

    def graph():
        return graphed.sample(noise, "uniform", budget=K)[0]

    def eager_run():
        return eager.sample(noise, "uniform", budget=K)[0]

    def diffusers():
        return diffusers_loop(model, scheduler, noise)

    torch.testing.assert_close(graph(), eager_run(), rtol=1e-5, atol=1e-5)  # bit-identical: tests/test_cuda_graph.py
    # Same images as the diffusers loop, checked in full float32: with TF32 convolutions (torch's
    # default on a GPU, used for the timings of all three) each call rounds to ~1e-3 relative, and
    # 25 calls of a random-weight net spread the last-bit differences of two update formulas further.
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        torch.testing.assert_close(eager_run(), diffusers(), rtol=1e-3, atol=1e-3)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    med = interleaved(graph, {"eager": eager_run, "diffusers": diffusers}, rounds=20 if batch < 256 else 8,
                      warmup_rounds=3, sync=torch.cuda.synchronize)
    assert graphed.graph_captures == 1
    info = {
        "device": torch.cuda.get_device_name(),
        "images_per_s_graph": batch / med["target"],
        "images_per_s_eager": batch / med["eager"],
        "images_per_s_diffusers": batch / med["diffusers"],
        "speedup_vs_diffusers": med["diffusers"] / med["target"],
        "speedup_vs_eager": med["eager"] / med["target"],
    }
    benchmark.extra_info.update(info)
    print(f"\nB={batch}: images/s graph {info['images_per_s_graph']:.0f}, eager {info['images_per_s_eager']:.0f}, "
          f"diffusers {info['images_per_s_diffusers']:.0f} (graph ÷ diffusers {info['speedup_vs_diffusers']:.2f}x)")
