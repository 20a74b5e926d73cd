"""Shared set-up for the pytest-benchmark suites (docs/DESIGN.md §6: warm-up, device sync, several
rounds, medians, always a ratio against a baseline run in the same process).

* one thread count for every timing;
* ``interleaved``: time a target with pytest-benchmark while its baselines are timed in the
  same rounds, one after the other (CPU timings here drift by tens of percent over seconds:
  interleaving exposes target and baselines to the same drift, and medians drop the outliers);
* ``benchmark_only``: a slow suite runs only under ``--benchmark-only`` (``make bench``).
  pytest collects ``bench_*.py`` too (pyproject's ``python_files``), so ``pytest benchmarks``
  without the flag runs just the quick cases, as smoke tests of the timed code.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _fixed_threads():
    torch.set_num_threads(torch.get_num_threads())
    yield


@pytest.fixture
def benchmark_only(request):
    """Skip the requesting benchmark unless pytest runs with ``--benchmark-only``."""
    if not request.config.getoption("benchmark_only", default=False):
        pytest.skip("slow benchmark: runs only with --benchmark-only (make bench)")


def _no_sync() -> None:
    return None


@pytest.fixture
def interleaved(benchmark):
    """``run(target, baselines, rounds=…, warmup_rounds=…, sync=…)`` → medians in seconds.

    Each round times every baseline once (``time.perf_counter``, ``sync()`` before and after),
    then ``target`` under pytest-benchmark (which reports it), ``sync()`` included in its time.
    Warm-up rounds run everything and are not counted. Returns ``{"target": s, name: s, …}``.
    With timing disabled (``--benchmark-disable``) each function runs once and the test is
    skipped, as there is no ratio to report.
    """

    def run(target: Callable[[], object], baselines: dict[str, Callable[[], object]], *, rounds: int,
            warmup_rounds: int = 2, sync: Callable[[], None] = _no_sync) -> dict[str, float]:
        times: dict[str, list[float]] = {name: [] for name in baselines}

        def time_baselines():
            for name, fn in baselines.items():
                sync()
                start = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - start)

        def timed_target():
            target()
            sync()

        if benchmark.disabled:
            time_baselines()
            timed_target()
            pytest.skip("timing disabled (--benchmark-disable): no ratio to report")
        benchmark.pedantic(timed_target, setup=time_baselines, rounds=rounds, warmup_rounds=warmup_rounds,
                           iterations=1)
        medians = {name: statistics.median(v[warmup_rounds:]) for name, v in times.items()}
        medians["target"] = benchmark.stats.stats.median
        return medians

    return run
