"""Fused DDIM step: the native kernel vs the eager torch reference, and vs the memory-bandwidth
limit. 3×32×32 float32, DDIM η = 0.5 (so the step reads fresh noise z). On the CPU the native
kernel is the C++ extension; on an NVIDIA GPU (skipped without one) the ``cuda`` and ``triton``
backends at B = 1 to 4096, each timed unit being 50 back-to-back steps.

Timed: the step as :class:`stepdrop.FusedSampler` runs it in its loop (inputs validated once
per run, then the backend called each step), so the ratios are those of the kernels. The public
:func:`stepdrop.ops.fused_step`, which validates on every call, is timed alongside
(``public_api_median_s``).

Reported in ``extra_info`` (all from one interleaved run, medians):

* ``speedup_vs_torch``: reference time ÷ native time (target ≥ 4× at B = 256);
* ``bandwidth_fraction``: a plain ``Tensor.copy_`` that moves as many bytes as the step
  (reads x, ε, z and writes x_s: 4 tensors of x's size) takes time t_copy; the fraction is
  t_copy ÷ t_native, the step's share of what the memory system delivers (target ≥ 0.6).

Run: ``make bench`` or ``.venv/bin/python -m pytest benchmarks --benchmark-only``.
"""

import pytest
import torch

from stepdrop.ops import _dispatch, available_backends, fused_step, validate_step_inputs
from stepdrop.ops.step_args import StepOptions
from stepdrop.schedule import NoiseSchedule


def _inputs(batch: int):
    g = torch.Generator().manual_seed(0)
    shape = (batch, 3, 32, 32)
    x, eps, noise = (torch.randn(shape, generator=g) for _ in range(3))
    table = NoiseSchedule.linear().table("cpu", torch.float64)
    t = torch.full((batch,), 500, dtype=torch.int64)
    s = torch.full((batch,), 450, dtype=torch.int64)
    return x, eps, table, t, s, noise


def _copy_like_step(x):
    """(bytes the step moves, a copy_ moving as many): x, ε, z read and x_s written, i.e. 4
    tensors of x's size, moved by one copy_ of half as many elements (it reads and writes)."""
    moved = 4 * x.numel() * x.element_size()
    src = torch.randn(moved // (2 * x.element_size()), device=x.device)
    dst = torch.empty_like(src)
    return moved, lambda: dst.copy_(src)


def _ratios(med: dict[str, float], moved: int) -> dict[str, float]:
    """The reported figures from per-call medians (target = the native kernel)."""
    return {
        "native_median_s": med["target"],
        "torch_median_s": med["torch"],
        "copy_median_s": med["copy"],
        "bytes_moved": moved,
        "speedup_vs_torch": med["torch"] / med["target"],
        "bandwidth_fraction": med["copy"] / med["target"],
        "native_GBps": moved / med["target"] / 1e9,
        "copy_GBps": moved / med["copy"] / 1e9,
    }


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="stepdrop._C not built")
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_fused_step_cpu_vs_torch(interleaved, benchmark, batch):
    x, eps, table, t, s, noise = _inputs(batch)
    options = StepOptions(noise, solver="ddim", eta=0.5)
    validate_step_inputs(x, eps, table, t, s, None, options)

    def native():
        return _dispatch("cpu", x, eps, table, t, s, None, options)

    def reference():
        return _dispatch("torch", x, eps, table, t, s, None, options)

    def public_api():
        return fused_step(x, eps, table, t, s, noise=noise, solver="ddim", eta=0.5, backend="cpu")

    moved, copy = _copy_like_step(x)
    torch.testing.assert_close(native(), reference())
    med = interleaved(native, {"torch": reference, "copy": copy, "public_api": public_api}, rounds=100,
                      warmup_rounds=3)
    info = _ratios(med, moved) | {"public_api_median_s": med["public_api"]}
    benchmark.extra_info.update(info)
    print(f"\nB={batch}: native {med['target'] * 1e6:.0f} us, torch {med['torch'] * 1e6:.0f} us "
          f"(speedup {info['speedup_vs_torch']:.2f}x), copy of {moved / 1e6:.2f} MB {med['copy'] * 1e6:.0f} us "
          f"(bandwidth fraction {info['bandwidth_fraction']:.2f}), public fused_step {med['public_api'] * 1e6:.0f} us")



# ------------------------------------------------------------------ GPU
# A step at B = 1 is one launch of ~20 µs against a few µs of memory traffic, so every timed unit
# is CALLS back-to-back steps (synchronised once); medians are per step.
CALLS = 50


def _repeat(fn):
    def run():
        for _ in range(CALLS):
            fn()
    return run


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("batch", [1, 256, 1024, 4096])
def test_fused_step_gpu_vs_torch(benchmark_only, interleaved, benchmark, backend, batch):
    if not torch.cuda.is_available() or backend not in available_backends("cuda"):
        pytest.skip(f"needs an NVIDIA GPU with the {backend!r} backend (have: {available_backends('cuda') if torch.cuda.is_available() else 'no GPU'})")
    x, eps, table, t, s, noise = (v.cuda() for v in _inputs(batch))
    options = StepOptions(noise, solver="ddim", eta=0.5)
    validate_step_inputs(x, eps, table, t, s, None, options)

    def native():
        return _dispatch(backend, x, eps, table, t, s, None, options)

    def reference():
        return _dispatch("torch", x, eps, table, t, s, None, options)

    moved, copy = _copy_like_step(x)
    torch.testing.assert_close(native(), reference())
    med = interleaved(_repeat(native), {"torch": _repeat(reference), "copy": _repeat(copy)}, rounds=30,
                      warmup_rounds=3, sync=torch.cuda.synchronize)
    per_call = {k: v / CALLS for k, v in med.items()}
    info = {"device": torch.cuda.get_device_name()} | _ratios(per_call, moved)
    benchmark.extra_info.update(info)
    print(f"\n{backend} B={batch}: native {per_call['target'] * 1e6:.1f} us ({info['native_GBps']:.0f} GB/s), "
          f"torch {per_call['torch'] * 1e6:.1f} us (speedup {info['speedup_vs_torch']:.2f}x), "
          f"copy {per_call['copy'] * 1e6:.1f} us (bandwidth fraction {info['bandwidth_fraction']:.2f})")
