"""The compiled fused step (``stepdrop._C``) against the torch reference, its specification.

float64 must agree to ~1e-12. For float32 the tolerance is measured, not guessed: the kernel
may be at most 2× as far from the float64 reference as the reference itself run in float32
(plus one float32 ulp of slack for cases where that error happens to be ~0). Sizes are odd
on purpose. The CUDA section skips, with its reason, where no GPU or no CUDA build exists.
"""

from __future__ import annotations

import pytest
import torch

try:
    from stepdrop import _C
except ImportError as exc:  # built without the extension: nothing to test here
    pytest.skip(f"stepdrop._C failed to import ({exc}); build it with `make build`", allow_module_level=True)

from stepdrop.ops import fused_step
from stepdrop.ops.reference import CLEAN, fused_step_reference
from backend_cases import T, as_f64, assert_matches_reference, make_case, table

SOLVERS = [("ddim", 0.0), ("ddim", 0.3), ("ddim", 1.0), ("ddpm", 0.0)]
BATCHES = [0, 1, 3, 257]
SHAPES = [(3, 7, 5), (1, 1, 1), (3, 32, 32)]
DTYPES = [torch.float32, torch.float64]


# --------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("solver,eta", SOLVERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("masked", [False, True])
def test_cpu_matches_reference(solver, eta, dtype, batch, shape, clip, masked):
    case = make_case(batch, shape, dtype, solver=solver, eta=eta, masked=masked)
    out = fused_step(**case, solver=solver, eta=eta, clip=clip, return_x0=True, backend="cpu")
    assert_matches_reference(out, case, solver=solver, eta=eta, clip=clip)


@pytest.mark.parametrize("solver,eta", SOLVERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_non_contiguous_inputs(solver, eta, dtype):
    batch, shape = 9, (3, 7, 5)
    case = make_case(batch, shape, dtype, solver=solver, eta=eta, masked=True, seed=1)
    strided = dict(case)
    strided["x"] = case["x"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, transposed strides
    strided["eps"] = torch.stack([case["eps"], torch.full_like(case["eps"], float("nan"))], -1)[..., 0]
    if case["noise"] is not None:
        strided["noise"] = torch.stack([case["noise"], case["noise"]], 1)[:, 0]
    strided["t"] = torch.stack([case["t"], -case["t"]], 1)[:, 0]
    strided["s"] = torch.stack([case["s"], case["s"]], 1)[:, 1]
    strided["active"] = torch.stack([case["active"], ~case["active"]], 1)[:, 0]
    assert not any(v.is_contiguous() for k, v in strided.items() if k != "alphas_cumprod" and v is not None)
    out = fused_step(**strided, solver=solver, eta=eta, clip=1.5, return_x0=True, backend="cpu")
    assert_matches_reference(out, case, solver=solver, eta=eta, clip=1.5)


def test_cpu_return_x0_false_and_inputs_untouched():
    case = make_case(5, (3, 7, 5), torch.float32, solver="ddpm", eta=0.0, masked=True)
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    x_next = fused_step(**case, solver="ddpm", backend="cpu")
    assert isinstance(x_next, torch.Tensor) and x_next.data_ptr() != case["x"].data_ptr()
    x_next2, _ = fused_step(**case, solver="ddpm", return_x0=True, backend="cpu")
    assert torch.equal(x_next, x_next2)
    for k, v in before.items():
        assert torch.equal(case[k], v), f"{k} was modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_one_large_sample_parallel_over_elements(dtype):
    # One sample of 66 048 elements: several chunks of one sample, an odd tail.
    case = make_case(1, (4, 128, 129), dtype, solver="ddim", eta=0.7, masked=False, seed=2)
    out = fused_step(**case, solver="ddim", eta=0.7, clip=2.0, return_x0=True, backend="cpu")
    assert_matches_reference(out, case, solver="ddim", eta=0.7, clip=2.0)


def test_cpu_one_dimensional_samples():
    case = make_case(33, (), torch.float64, solver="ddpm", eta=0.0, masked=True)
    out = fused_step(**case, solver="ddpm", return_x0=True, backend="cpu")
    assert_matches_reference(out, case, solver="ddpm", eta=0.0, clip=None)


def test_binding_clamps_out_of_range_indices():
    """Past the Python validation, bad indices of active samples are clamped like the reference's gather."""
    x, eps, noise = torch.randn(3, 3, 4, 4, dtype=torch.float64).unbind(0)
    alphas = table()
    t = torch.tensor([10**9, -5, 999])
    s = torch.tensor([10**9 - 1, CLEAN, 10**12])
    x0 = torch.empty_like(x)
    got = _C.fused_step(x, eps, alphas, t, s, noise, None, 1, 0.0, 0.0, x0)
    want, want_x0 = fused_step_reference(x, eps, alphas, t, s, noise=noise, solver="ddpm", return_x0=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(x0, want_x0, rtol=1e-12, atol=1e-12)


def _binding_args(**change):
    x = torch.randn(4, 2, 3)
    args = dict(
        x=x, eps=torch.randn_like(x), alphas_cumprod=table(), t=torch.full((4,), 500), s=torch.full((4,), 400),
        noise=None, active=None, solver=0, eta=0.0, clip=0.0, x0_out=None,
    )  # fmt: skip
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(eps=torch.randn(4, 2, 3, dtype=torch.float64)), "eps must have the dtype of x"),
        (dict(x=torch.randn(4, 2, 3).half(), eps=torch.randn(4, 2, 3).half()), "x must be float32 or float64"),
        (dict(eps=torch.randn(4, 3, 2)), "eps must have the shape of x"),
        (dict(x=torch.randn(4, 3, 2).transpose(1, 2)), "x must be contiguous"),
        (dict(alphas_cumprod=table().float()), "alphas_cumprod must be float64"),
        (dict(alphas_cumprod=torch.empty(0, dtype=torch.float64)), "alphas_cumprod must be a non-empty"),
        (dict(t=torch.full((4,), 500, dtype=torch.int32)), "t must be Long"),
        (dict(s=torch.full((3,), 400)), r"s must have shape \[4\]"),
        (dict(noise=torch.randn(4, 2, 3, dtype=torch.float64)), "noise must have the dtype of x"),
        (dict(active=torch.ones(4, dtype=torch.uint8)), "active must be Bool"),
        (dict(solver=2), "solver must be 0"),
        (dict(eta=1.5), "eta must be in"),
        (dict(clip=-1.0), "clip must be >= 0"),
        (dict(x0_out=torch.empty(4, 6)), "x0_out must have the shape of x"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_binding_checks(change, match):
    with pytest.raises(RuntimeError, match=match):
        _C.fused_step(*_binding_args(**change))


def test_binding_rejects_aliased_x0_out():
    args = _binding_args()
    args[-1] = args[0]  # x0_out is x
    with pytest.raises(RuntimeError):
        _C.fused_step(*args)


def test_has_cuda_is_bool():
    assert isinstance(_C.has_cuda(), bool)


# -------------------------------------------------------------------------------------- CUDA


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device available")
    if not _C.has_cuda():
        pytest.skip("stepdrop._C was built without the CUDA kernels (no nvcc or a CPU-only torch at build time)")


@pytest.mark.cuda
@pytest.mark.parametrize("solver,eta", SOLVERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("shape", SHAPES + [(4, 8, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("clip,masked", [(None, False), (1.0, True)])
def test_cuda_matches_reference(solver, eta, dtype, batch, shape, clip, masked):
    _need_cuda()
    case = make_case(batch, shape, dtype, solver=solver, eta=eta, masked=masked, device="cuda")
    out = fused_step(**case, solver=solver, eta=eta, clip=clip, return_x0=True, backend="cuda")
    assert_matches_reference(out, case, solver=solver, eta=eta, clip=clip)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_non_contiguous_and_return_x0_false(dtype):
    _need_cuda()
    case = make_case(7, (3, 7, 5), dtype, solver="ddpm", eta=0.0, masked=True, device="cuda")
    strided = dict(case, x=case["x"].transpose(2, 3).contiguous().transpose(2, 3))
    strided["eps"] = torch.stack([case["eps"], case["eps"]], -1)[..., 1]
    x_next = fused_step(**strided, solver="ddpm", backend="cuda")
    want = fused_step_reference(**case, solver="ddpm")
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(x_next, want, rtol=tol, atol=tol)


@pytest.mark.cuda
def test_cuda_batch_beyond_grid_y_limit():
    _need_cuda()
    case = make_case(70_000, (1,), torch.float64, solver="ddim", eta=0.5, masked=True, device="cuda")
    out = fused_step(**case, solver="ddim", eta=0.5, return_x0=True, backend="cuda")
    assert_matches_reference(out, case, solver="ddim", eta=0.5, clip=None)


@pytest.mark.cuda
def test_cuda_side_stream_and_graph_replay():
    _need_cuda()
    case = make_case(5, (3, 8, 8), torch.float32, solver="ddpm", eta=0.0, masked=True, device="cuda")
    args = [case[k] for k in ("x", "eps", "alphas_cumprod", "t", "s", "noise", "active")]
    x0 = torch.empty_like(case["x"])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager = _C.fused_step(*args, 1, 0.0, 1.0, x0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _C.fused_step(*args, 1, 0.0, 1.0, x0)
    torch.cuda.current_stream().wait_stream(stream)
    case["x"].mul_(0.5)  # new values in the static input buffer, then replay
    graph.replay()
    torch.cuda.synchronize()
    want = fused_step_reference(**case, solver="ddpm", clip=1.0)
    torch.testing.assert_close(captured, want, rtol=1e-4, atol=1e-4)
    assert not torch.equal(eager, captured)
