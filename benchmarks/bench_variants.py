"""Per-step call variants on the CPU (docs/DESIGN.md §4c): what they cost and what they save.

On the embedded model (1×32×32, v-prediction), DDIM-50, batch 16, in one process and
interleaved rounds:

* ``test_full_variant_overhead``: a plan whose every call is full but goes through the
  variant mechanism (``calls="+cache(1,0)"``: each call is ``forward_cached`` without a
  feature) against today's plain loop. ``full_variant_ratio`` (target ≤ 1.03).
* ``test_cheaper_calls_speedup``: DDIM-50 with deep-feature caching (``+cache(3,0)``) and
  with mixed resolution (``+mixres(0.5,0.6)``) against plain DDIM-50 and plain DDIM-25;
  images/s ratios next to the counted GFLOPs ratios, so a saving on paper and one on the clock
  can be compared.

Slow: runs only with ``--benchmark-only`` (``make bench``).
"""

import torch

from stepdrop import FusedSampler
from stepdrop.checkpoint import load_pretrained
from stepdrop.cost import gflops_per_variant

BATCH, K = 16, 50


def _setup():
    loaded = load_pretrained("fashion-mnist")
    return loaded.model.eval(), loaded.schedule


def _runner(model, schedule, calls: str, budget: int = K):
    sampler = FusedSampler(model, schedule, solver="ddim", calls=calls)
    shape = sampler.calls.start_shape(model.sample_shape)
    noise = torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(0))

    def run():
        return sampler.sample(noise, "uniform", budget=budget, generator=torch.Generator().manual_seed(1))

    return run


def _counted_gflops(model, schedule, calls: str, budget: int = K) -> float:
    sampler = FusedSampler(model, schedule, calls=calls)
    _, stats = _runner(model, schedule, calls, budget)()
    per_call = gflops_per_variant(model, sampler.calls)
    return sum(per_call[label] * float(n.double().mean()) for label, n in stats.calls_by_variant().items())


def test_full_variant_overhead(benchmark_only, interleaved, benchmark):
    model, schedule = _setup()
    plain, full_variant = _runner(model, schedule, ""), _runner(model, schedule, "+cache(1,0)")
    assert torch.equal(plain()[0], full_variant()[0])  # the same computation
    med = interleaved(full_variant, {"plain": plain}, rounds=7, warmup_rounds=1)
    ratio = med["target"] / med["plain"]
    benchmark.extra_info.update(plain_median_s=med["plain"], full_variant_median_s=med["target"],
                                full_variant_ratio=ratio)
    print(f"\nDDIM-{K}, B={BATCH}: plain {med['plain'] * 1e3:.0f} ms, every call full through the variant "
          f"mechanism {med['target'] * 1e3:.0f} ms (ratio {ratio:.3f})")


def test_cheaper_calls_speedup(benchmark_only, interleaved, benchmark):
    model, schedule = _setup()
    runs = {"ddim-50": "", "ddim-50+cache(3,0)": "+cache(3,0)", "ddim-50+mixres(0.5,0.6)": "+mixres(0.5,0.6)"}
    gflops = {name: _counted_gflops(model, schedule, calls) for name, calls in runs.items()}
    gflops["ddim-25"] = _counted_gflops(model, schedule, "", 25)
    baselines = {name: _runner(model, schedule, calls) for name, calls in runs.items() if name != "ddim-50+cache(3,0)"}
    baselines["ddim-25"] = _runner(model, schedule, "", 25)
    med = interleaved(_runner(model, schedule, "+cache(3,0)"), baselines, rounds=5, warmup_rounds=1)
    med["ddim-50+cache(3,0)"] = med.pop("target")
    base = med["ddim-50"]
    info = {}
    for name, seconds in med.items():
        info[name] = dict(images_per_second=BATCH / seconds, speedup_vs_ddim50=base / seconds,
                          gflops_per_sample=gflops[name], gflops_ratio_vs_ddim50=gflops[name] / gflops["ddim-50"])
        print(f"\n{name:<26} {BATCH / seconds:7.1f} img/s  {base / seconds:5.2f}x DDIM-50  "
              f"{gflops[name]:6.2f} GFLOPs/sample ({gflops[name] / gflops['ddim-50']:.2f} of DDIM-50)", end="")
    print()
    benchmark.extra_info.update(info)
