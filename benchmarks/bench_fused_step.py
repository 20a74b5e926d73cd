"""Fused DDIM step on the CPU: the native kernel vs the eager torch reference, and vs the
memory-bandwidth limit. 3×32×32 float32, DDIM η = 0.5 (so the step reads fresh noise z).

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


@pytest.mark.parametrize("batch", [1, 64, 256])
def test_fused_step_cpu_vs_torch(interleaved, benchmark, batch):
    x, eps, table, t, s, noise = _inputs(batch)
    kw = dict(noise=noise, active=None, solver="ddim", eta=0.5, clip=None)
    validate_step_inputs(x, eps, table, t, s, **kw)

    def native():
        return _dispatch("cpu", x, eps, table, t, s, return_x0=False, **kw)

    def reference():
        return _dispatch("torch", x, eps, table, t, s, return_x0=False, **kw)

    def public_api():
        return fused_step(x, eps, table, t, s, noise=noise, solver="ddim", eta=0.5, backend="cpu")

    # the bytes the step moves (x, ε, z read; x_s written), moved by one copy_ (read + write)
    moved = 4 * x.numel() * x.element_size()
    src = torch.randn(moved // (2 * x.element_size()))
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)

    torch.testing.assert_close(native(), reference())
    med = interleaved(native, {"torch": reference, "copy": copy, "public_api": public_api}, rounds=100,
                      warmup_rounds=3)
    info = {
        "native_median_s": med["target"],
        "torch_median_s": med["torch"],
        "copy_median_s": med["copy"],
        "public_api_median_s": med["public_api"],
        "bytes_moved": moved,
        "speedup_vs_torch": med["torch"] / med["target"],
        "bandwidth_fraction": med["copy"] / med["target"],
        "copy_GBps": moved / med["copy"] / 1e9,
    }
    benchmark.extra_info.update(info)
    print(f"\nB={batch}: native {med['target'] * 1e6:.0f} us, torch {med['torch'] * 1e6:.0f} us "
          f"(speedup {info['speedup_vs_torch']:.2f}x), copy of {moved / 1e6:.2f} MB {med['copy'] * 1e6:.0f} us "
          f"(bandwidth fraction {info['bandwidth_fraction']:.2f}), public fused_step {med['public_api'] * 1e6:.0f} us")
