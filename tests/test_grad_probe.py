"""``stepdrop.ops.grad_probe`` on every backend against the torch reference, its specification
(:func:`stepdrop.ops.reference.grad_norm_probe`): ‖ε_probe − ε‖/(h‖v‖) per sample.

float64 to 1e-12; float32, float16 and bfloat16 input (float32 sums) within the tolerance of
tests/backend_cases.py (2× the reference's error plus 4·√N ulps). Half-precision loads are
checked bit-exactly over every float16 pattern. Sizes are odd; one sample of 66 048 elements
is split over several CPU work items and several CUDA blocks. Triton's CPU cases run under its
interpreter in a subprocess (this file run as a script); CUDA sections skip without a GPU.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter subprocess: before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from stepdrop.ops import _native, available_backends, grad_probe
from backend_cases import assert_probe_matches_reference, interpreter_results, make_probe_case, need_cuda_backend

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LARGE = (4, 128, 129)  # 66 048 elements: several CPU chunks of 16 384, several CUDA blocks of 4 096


def _cases() -> dict[str, dict]:
    cases = {}
    for dtype in DTYPES:
        d = str(dtype).split(".")[-1]
        for batch in (0, 1, 3, 257):
            cases[f"{d}-B{batch}"] = dict(batch=batch, shape=(3, 17, 19), dtype=dtype, seed=batch)
        cases[f"{d}-large-B1"] = dict(batch=1, shape=LARGE, dtype=dtype, seed=5)
        cases[f"{d}-large-B3"] = dict(batch=3, shape=LARGE, dtype=dtype, seed=6)
        cases[f"{d}-one-element"] = dict(batch=33, shape=(), dtype=dtype, seed=7)
        cases[f"{d}-strided"] = dict(batch=5, shape=(3, 17, 19), dtype=dtype, seed=8, strided=True)
    cases["no-elements"] = dict(batch=4, shape=(0, 3), dtype=torch.float32, seed=9)  # 0/0 = NaN, like the reference
    return cases


CASES = _cases()
INTERPRETED_EVERY = 61  # ~530 of the bfloat16 patterns: the interpreter runs one program per sample


def _build(spec, device="cpu"):
    """(inputs as the op receives them, the same contiguous)."""
    case = make_probe_case(spec["batch"], spec["shape"], spec["dtype"], seed=spec["seed"], device=device)
    inputs = dict(case)
    if spec.get("strided"):
        inputs["eps_probe"] = case["eps_probe"].transpose(-1, -2).contiguous().transpose(-1, -2)
        inputs["eps"] = torch.stack([case["eps"], torch.full_like(case["eps"], float("nan"))], -1)[..., 0]
        inputs["v"] = torch.stack([case["v"], case["v"]], 1)[:, 0]
        assert not any(inputs[k].is_contiguous() for k in ("eps_probe", "eps", "v"))
    return inputs, case


def _run(spec, backend, device="cpu"):
    return grad_probe(**_build(spec, device)[0], backend=backend)


def _check(got, spec):
    assert_probe_matches_reference(got, _build(spec, got.device)[1])


def _all_float16(device="cpu"):
    """Every float16 bit pattern as one sample each, with ε = 0, v = 1, h = 1: the probe is
    then √(x²)/1 = |x| exactly (x² of a float16 is exact in float32), so any error in the
    half → float conversion shows."""
    values = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.float16).view(-1, 1)
    return dict(eps_probe=values.to(device), eps=torch.zeros_like(values, device=device),
                v=torch.ones_like(values, device=device), step=1.0)  # fmt: skip


def _bfloat16_sample(device="cpu", every=1):
    """The bfloat16 patterns whose square is an exact, normal float32 (|x| in [2⁻⁶³, 2⁶³)),
    and ±0, ±inf, NaN (or every ``every``-th of them, for the slow interpreter); as for
    float16 the probe must return |x| exactly."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = bits.view(torch.bfloat16).float()
    keep = ((values.abs() >= 2.0**-63) & (values.abs() < 2.0**63)) | (values == 0) | values.isinf() | values.isnan()
    x = bits[keep][::every].view(torch.bfloat16).view(-1, 1).to(device)
    return dict(eps_probe=x, eps=torch.zeros_like(x), v=torch.ones_like(x), step=1.0)


def _check_exact_abs(got, case):
    want = case["eps_probe"].float().abs().view(-1)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# ------------------------------------------------------------------------------------ torch, cpu
CPU_BACKENDS = [b for b in ("torch", "cpu") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cid", list(CASES))
def test_matches_reference(backend, cid):
    _check(_run(CASES[cid], backend), CASES[cid])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make", [_all_float16, _bfloat16_sample], ids=["float16", "bfloat16"])
def test_half_precision_loads_are_exact(backend, make):
    case = make()
    _check_exact_abs(grad_probe(**case, backend=backend), case)


def test_cpu_deterministic_across_thread_counts():
    """Each sample's chunk sums are added in chunk order, whatever the number of threads."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("stepdrop._C is not built")
    inputs, _ = _build(CASES["float32-large-B3"])
    saved = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            runs.append(grad_probe(**inputs, backend="cpu"))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(r, runs[0]) for r in runs)


def test_binding_checks():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("stepdrop._C is not built")
    a = torch.randn(3, 4)
    for args, match in [
        ((a, a.double(), a, 0.1), "eps_probe must have the dtype of eps"),
        ((a, a, a[:, :3], 0.1), "v must have the shape of eps"),
        ((a, a.t().contiguous().t(), a, 0.1), "eps must be contiguous"),
        ((a, a.int(), a, 0.1), "eps must be float32, float64, float16 or bfloat16"),
        ((a, a, a, 0.0), "step must be finite and > 0"),
        ((a, a, a, float("nan")), "step must be finite and > 0"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            _native._C.grad_probe(*args)


# ------------------------------------------------------------------------------------ bad input
def _good(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(eps_probe=torch.randn(3, 2, 5, generator=g), eps=torch.randn(3, 2, 5, generator=g),
                v=torch.randn(3, 2, 5, generator=g), step=0.01, backend="torch")  # fmt: skip
    args.update(over)
    return args


def _raises(exc, pattern, **over):
    with pytest.raises(exc, match=pattern) as info:
        grad_probe(**_good(**over))
    return str(info.value)


def test_good_call_runs():
    out = grad_probe(**_good())
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_eps_dtype(dtype):
    z = torch.zeros(3, 2, 5, dtype=dtype)
    msg = _raises(TypeError, r"\beps\b", eps_probe=z, eps=z, v=z)
    assert all(d in msg for d in ("float32", "float64", "float16", "bfloat16"))


@pytest.mark.parametrize("name", ["eps_probe", "v"])
def test_dtype_mismatch(name):
    _raises(TypeError, name, **{name: torch.zeros(3, 2, 5, dtype=torch.float64)})


@pytest.mark.parametrize("name", ["eps_probe", "v"])
def test_shape_mismatch(name):
    _raises(ValueError, name, **{name: torch.zeros(3, 10)})
    _raises(ValueError, name, **{name: torch.zeros(4, 2, 5)})


def test_zero_dim_and_non_tensor():
    z = torch.tensor(1.0)
    _raises(ValueError, r"\beps\b", eps_probe=z, eps=z, v=z)
    _raises(TypeError, "eps_probe", eps_probe=[[0.0] * 10] * 3)


@pytest.mark.parametrize("step", [0.0, -0.1, float("nan"), float("inf")])
def test_step_value(step):
    _raises(ValueError, "step", step=step)


@pytest.mark.parametrize("step", ["0.1", None, True])
def test_step_type(step):
    _raises(TypeError, "step", step=step)


def test_devices_differ():
    for name in ("eps_probe", "v"):
        with pytest.raises(ValueError, match=name) as info:
            grad_probe(**_good(**{name: _good()[name].to("meta")}))
        assert "device" in str(info.value)


def test_backend_unknown_or_unavailable():
    _raises(ValueError, "backend", backend="fast")
    _raises(ValueError, "backend", backend="cuda")


# ------------------------------------------------------------------------------------ triton (interpreter)
def _interpreter_main(path: str) -> None:
    """Subprocess entry: every case through the interpreter; save the outputs."""
    results = {cid: _run(spec, "triton") for cid, spec in CASES.items()}
    results["bfloat16-exact"] = grad_probe(**_bfloat16_sample(every=INTERPRETED_EVERY), backend="triton")
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreter_results(__file__, tmp_path_factory)


@pytest.mark.parametrize("cid", list(CASES))
def test_interpreter_matches_reference(interpreted, cid):
    _check(interpreted[cid], CASES[cid])


def test_interpreter_bfloat16_loads_are_exact(interpreted):
    _check_exact_abs(interpreted["bfloat16-exact"], _bfloat16_sample(every=INTERPRETED_EVERY))


# ------------------------------------------------------------------------------------ CUDA
CUDA_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("cid", list(CASES))
def test_cuda_matches_reference(backend, cid):
    need_cuda_backend(backend)
    _check(_run(CASES[cid], backend, device="cuda"), CASES[cid])


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("make", [_all_float16, _bfloat16_sample], ids=["float16", "bfloat16"])
def test_cuda_half_precision_loads_are_exact(backend, make):
    need_cuda_backend(backend)
    case = make("cuda")
    _check_exact_abs(grad_probe(**case, backend=backend), case)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("spec", [dict(batch=70_000, shape=(1,)), dict(batch=2, shape=(1, 1000, 1000))],
                         ids=["beyond-grid-y", "many-blocks-per-sample"])  # fmt: skip
def test_cuda_extreme_shapes(backend, spec):
    need_cuda_backend(backend)
    spec = dict(spec, dtype=torch.float64, seed=10)
    _check(_run(spec, backend, device="cuda"), spec)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("cid", ["float32-large-B1", "float32-large-B3", "float32-B257"])
def test_cuda_deterministic_and_graph_capturable(backend, cid):
    """Equal inputs give equal bits (the multi-block reduction adds partials in block order),
    and the probe replays in a CUDA graph with new values in its static inputs."""
    need_cuda_backend(backend)
    inputs, _ = _build(CASES[cid], "cuda")
    first = grad_probe(**inputs, backend=backend)
    assert all(torch.equal(grad_probe(**inputs, backend=backend), first) for _ in range(3))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grad_probe(**inputs, backend=backend)
    inputs["eps_probe"].mul_(2)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, grad_probe(**inputs, backend=backend))
    assert not torch.equal(captured, first)


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
