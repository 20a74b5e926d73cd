"""Compiled model calls on the CPU: one forward of the embedded Fashion-MNIST model, eager NCHW
against :func:`stepdrop.compiled.compile_model`'s ``"channels_last"`` and ``"inductor"``.

For batch 1, 16 and 100, each round times, one after the other (under ``torch.no_grad``): the
eager forward (the baseline), the channels-last forward, a 2048×2048 float32 matmul (the
machine's FLOP/s at that moment), then the Inductor forward (timed by pytest-benchmark). The
Inductor model is compiled once per batch shape before the timed region; that compile time is
reported on its own. Reported in ``extra_info`` (medians of one interleaved run):

* ``*_median_s`` and ``*_gflops_per_s``: stepdrop.cost.gflops_per_call × batch ÷ seconds;
* ``channels_last_speedup`` and ``inductor_speedup``: images/s over eager images/s;
* ``*_sgemm_fraction``: a layout's GFLOP/s over the matmul's;
* ``inductor_compile_s``: the first (compiling) call.

Slow (compiles three times, a few minutes on 2 cores): runs only with ``--benchmark-only``.
"""

import pytest
import torch

from stepdrop.checkpoint import load_pretrained
from stepdrop.compiled import compile_model
from stepdrop.cost import gflops_per_call

SGEMM_N = 2048
ROUNDS = {1: (21, 3), 16: (9, 2), 100: (5, 1)}  # batch: (rounds, warm-up rounds)


@pytest.mark.parametrize("batch", [1, 16, 100])
def test_compiled_forward(benchmark_only, interleaved, benchmark, batch):
    model = load_pretrained("fashion-mnist").model.eval()
    gflops = gflops_per_call(model) * batch
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, *model.sample_shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    a = torch.randn(SGEMM_N, SGEMM_N, generator=g)
    b = torch.randn(SGEMM_N, SGEMM_N, generator=g)
    channels_last = compile_model(model, "channels_last")
    inductor = compile_model(model, "inductor")

    with torch.no_grad():
        compile_s = inductor.warm_up(x, t)  # outside the timed region
        ref = model(x, t)
        # the same outputs (Inductor reorders float32 reductions: rounding only)
        torch.testing.assert_close(channels_last(x, t), ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(inductor(x, t), ref, rtol=0, atol=1e-4)
        rounds, warmup = ROUNDS[batch]
        med = interleaved(lambda: inductor(x, t),
                          {"eager": lambda: model(x, t), "channels_last": lambda: channels_last(x, t),
                           "sgemm": lambda: torch.mm(a, b)},
                          rounds=rounds, warmup_rounds=warmup)

    sgemm_gflops_s = 2 * SGEMM_N**3 / 1e9 / med["sgemm"]
    seconds = {"eager": med["eager"], "channels_last": med["channels_last"], "inductor": med["target"]}
    rate = {k: gflops / s for k, s in seconds.items()}
    info = {
        "batch": batch,
        "threads": torch.get_num_threads(),
        "gflops_per_image": gflops / batch,
        "sgemm_median_s": med["sgemm"],
        "sgemm_gflops_per_s": sgemm_gflops_s,
        "inductor_compile_s": compile_s,
        "channels_last_speedup": med["eager"] / med["channels_last"],
        "inductor_speedup": med["eager"] / med["target"],
    }
    for k, s in seconds.items():
        info[f"{k}_median_s"] = s
        info[f"{k}_images_per_s"] = batch / s
        info[f"{k}_gflops_per_s"] = rate[k]
        info[f"{k}_sgemm_fraction"] = rate[k] / sgemm_gflops_s
    benchmark.extra_info.update(info)
    parts = "; ".join(f"{k} {s * 1e3:.1f} ms ({batch / s:.0f} img/s, {rate[k]:.1f} GFLOP/s, "
                      f"{rate[k] / sgemm_gflops_s:.0%} of sgemm)" for k, s in seconds.items())
    print(f"\nB={batch}: {parts}; channels_last/eager {info['channels_last_speedup']:.2f}x, "
          f"inductor/eager {info['inductor_speedup']:.2f}x; sgemm {sgemm_gflops_s:.1f} GFLOP/s; "
          f"compile {compile_s:.1f} s")
