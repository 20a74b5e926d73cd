"""Fused DDIM step: native CPU kernel vs the eager torch reference, 3×32×32, DDIM η = 0.5.

Each case times both implementations in the same process with pytest-benchmark (warm-up
rounds, several rounds, medians) and stores the ratio in ``extra_info["speedup_vs_torch"]``.
Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks --benchmark-only``.
"""

import time

import pytest
import torch

from stepdrop.ops import available_backends, fused_step
from stepdrop.schedule import NoiseSchedule

pytestmark = pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="stepdrop._C not built")


def _inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    shape = (batch, 3, 32, 32)
    x, eps, noise = (torch.randn(shape, generator=g) for _ in range(3))
    table = NoiseSchedule.linear().table("cpu", torch.float64)
    t = torch.full((batch,), 500, dtype=torch.int64)
    s = torch.full((batch,), 450, dtype=torch.int64)
    return x, eps, table, t, s, noise


def _median_time(fn, rounds: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_fused_step_cpu_vs_torch(benchmark, batch):
    x, eps, table, t, s, noise = _inputs(batch)
    kw = dict(noise=noise, solver="ddim", eta=0.5)

    def native():
        return fused_step(x, eps, table, t, s, backend="cpu", **kw)

    def reference():
        return fused_step(x, eps, table, t, s, backend="torch", **kw)

    torch.testing.assert_close(native(), reference())
    torch_time = _median_time(reference)
    benchmark.pedantic(native, rounds=30, warmup_rounds=3, iterations=1)
    ratio = torch_time / benchmark.stats.stats.median
    benchmark.extra_info["torch_median_s"] = torch_time
    benchmark.extra_info["speedup_vs_torch"] = ratio
    print(f"\nB={batch}: native {benchmark.stats.stats.median * 1e6:.0f} us, torch {torch_time * 1e6:.0f} us, "
          f"speedup {ratio:.2f}x")
