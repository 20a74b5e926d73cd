"""The Triton fused step (``backend="triton"``) against the torch reference, its specification.

On the CPU the kernel runs under Triton's interpreter, which reads ``TRITON_INTERPRET=1`` when
triton is imported. Other test modules import torch and stepdrop first, and the variable must
not leak into the rest of the session (on a GPU machine it would turn compiled Triton into the
interpreter), so the CPU cases run once in a subprocess: this file run as a script, with the
variable set, saves every output; the tests here compare them with the reference. The CUDA
section runs the compiled kernel in-process and skips, with its reason, without a GPU.

Tolerances as in tests/test_native.py: float64 to 1e-12; float32 at most 2× as far from the
float64 reference as the reference itself run in float32, plus one ulp of slack.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter subprocess: before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from stepdrop.ops import available_backends, fused_step, resolve_backend, triton_step
from stepdrop.ops.reference import CLEAN, fused_step_reference
from stepdrop.ops.step_args import StepOptions
from backend_cases import T, as_f64, assert_matches_reference, interpreter_results, make_case, table

SOLVERS = [("ddim", 0.0), ("ddim", 0.5), ("ddim", 1.0), ("ddpm", 0.0)]
SHAPES = [(1,), (7, 5, 3), (3, 32, 32), (5, 13, 17)]  # 1 element; odd; 3 full blocks; 2 blocks with a tail
DTYPES = [torch.float32, torch.float64]


def _strided(case):
    """The same values with non-contiguous strides (and garbage in the skipped elements)."""
    out = dict(case)
    out["x"] = case["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    out["eps"] = torch.stack([case["eps"], torch.full_like(case["eps"], float("nan"))], -1)[..., 0]
    if case["noise"] is not None:
        out["noise"] = torch.stack([case["noise"], case["noise"]], 1)[:, 0]
    out["t"] = torch.stack([case["t"], -case["t"]], 1)[:, 0]
    out["s"] = torch.stack([case["s"], case["s"]], 1)[:, 1]
    out["alphas_cumprod"] = torch.stack([case["alphas_cumprod"], -case["alphas_cumprod"]], 1)[:, 0]
    if case["active"] is not None:
        out["active"] = torch.stack([case["active"], ~case["active"]], 1)[:, 0]
    assert not any(v.is_contiguous() for v in out.values() if isinstance(v, torch.Tensor))
    return out


# ------------------------------------------------------------------ the interpreter's cases
def _cpu_cases() -> dict[str, dict]:
    """Every CPU case by id: the inputs' recipe and the step's options."""
    cases = {}
    for solver, eta in SOLVERS:
        for dtype in DTYPES:
            d = str(dtype).split(".")[-1]
            for shape in SHAPES:
                for batch in (0, 1, 3):
                    for clip, masked in ((None, False), (1.0, True), (0.5, False), (None, True)):
                        cid = f"{solver}{eta}-{d}-B{batch}-{'x'.join(map(str, shape))}-clip{clip}-mask{masked}"
                        cases[cid] = dict(batch=batch, shape=shape, dtype=dtype, solver=solver, eta=eta, clip=clip,
                                          masked=masked)  # fmt: skip
            cases[f"{solver}{eta}-{d}-strided"] = dict(batch=9, shape=(7, 5, 3), dtype=dtype, solver=solver, eta=eta,
                                                       clip=1.5, masked=True, seed=1, strided=True)  # fmt: skip
    # B = 257: one small block per sample (the interpreter runs programs one by one)
    for (solver, eta), dtype, shape in zip(SOLVERS, DTYPES * 2, [(7, 5, 3), (1,)] * 2):
        d = str(dtype).split(".")[-1]
        cases[f"{solver}{eta}-{d}-B257"] = dict(batch=257, shape=shape, dtype=dtype, solver=solver, eta=eta, clip=1.0,
                                                masked=True, seed=3)  # fmt: skip
    # η not representable in float32 (η travels as float64 bits); more blocks than the grid allows
    cases["ddim0.3-float64-eta-bits"] = dict(batch=5, shape=(7, 5, 3), dtype=torch.float64, solver="ddim", eta=0.3,
                                             clip=None, masked=False, seed=4)  # fmt: skip
    cases["ddim0.7-float32-grid-loop"] = dict(batch=2, shape=(3, 32, 33), dtype=torch.float32, solver="ddim", eta=0.7,
                                              clip=2.0, masked=False, seed=5, max_grid_y=3)  # fmt: skip
    return cases


CPU_CASES = _cpu_cases()
NO_X0 = "ddpm0.0-float32-B3-7x5x3-clip1.0-maskTrue"  # also run with return_x0=False


def _build(spec, device="cpu"):
    case = make_case(spec["batch"], spec["shape"], spec["dtype"], solver=spec["solver"], eta=spec["eta"],
                 masked=spec["masked"], seed=spec.get("seed", 0), device=device)  # fmt: skip
    return case, dict(solver=spec["solver"], eta=spec["eta"], clip=spec["clip"])


def _runmake_case(spec, device="cpu"):
    case, kw = _build(spec, device)
    inputs = _strided(case) if spec.get("strided") else case
    saved = triton_step.MAX_GRID_Y
    triton_step.MAX_GRID_Y = spec.get("max_grid_y", saved)
    try:
        return fused_step(**inputs, **kw, return_x0=True, backend="triton")
    finally:
        triton_step.MAX_GRID_Y = saved


class _ElementwiseModel(torch.nn.Module):
    """eps = 0.1·x + 0.05·sin(t/100): every sample computed on its own."""

    sample_shape = (1, 8, 8)

    def forward(self, x, t):
        return 0.1 * x + 0.05 * torch.sin(t.to(x.dtype) / 100).view(-1, *([1] * (x.ndim - 1)))


def _sampler_runs(backend):
    """FusedSampler runs whose outputs must agree across backends: a shared DDIM plan, a
    stochastic DDPM run, a per-sample plan with masked (finished) samples."""
    from stepdrop import FusedSampler, NoiseSchedule, StepPlan

    schedule = NoiseSchedule.linear(T)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    rows = torch.tensor([[999, 700, 400, 100, -1], [999, 500, -1, -1, -1], [800, 300, 10, -1, -1]])
    out = {}
    for name, kw, plan in (
        ("ddim", dict(solver="ddim"), "uniform"),
        ("ddpm", dict(solver="ddpm"), "uniform"),
        ("per-sample", dict(solver="ddim", eta=0.5, clip=1.0), StepPlan(rows, T)),
    ):
        sampler = FusedSampler(_ElementwiseModel(), schedule, backend=backend, **kw)
        x, stats = sampler.sample(noise.clone(), plan, budget=None if isinstance(plan, StepPlan) else 5,
                                  generator=torch.Generator().manual_seed(1))  # fmt: skip
        out[name] = (x, stats.backend)
    return out


def _interpreter_main(path: str) -> None:
    """Subprocess entry: run every CPU case through the interpreter; save the outputs."""
    results = {cid: _runmake_case(spec) for cid, spec in CPU_CASES.items()}
    x, eps, noise = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).unbind(0)
    t, s = torch.tensor([10**9, -5, 999]), torch.tensor([10**9 - 1, CLEAN, 10**12])
    results["clamped"] = triton_step.fused_step_triton(x, eps, table(), t, s, None, StepOptions(noise, "ddpm"), True)
    case, kw = _build(CPU_CASES[NO_X0])
    results["no-x0"] = fused_step(**case, **kw, backend="triton")
    results["sampler"] = {b: _sampler_runs(b) for b in ("triton", "torch")}
    results["backends"] = (available_backends("cpu"), resolve_backend("auto", "cpu"), "triton" in sys.modules)
    torch.save(results, path)


# ----------------------------------------------------------------------------------- CPU
@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """Outputs of every CPU case, computed under TRITON_INTERPRET=1 in a fresh process."""
    return interpreter_results(__file__, tmp_path_factory)


@pytest.mark.parametrize("cid", list(CPU_CASES))
def test_interpreter_matches_reference(interpreted, cid):
    case, kw = _build(CPU_CASES[cid])
    assert_matches_reference(interpreted[cid], case, **kw)


def test_interpreter_clamps_out_of_range_indices(interpreted):
    """Past the Python validation, bad indices of active samples are clamped like the reference's gather."""
    x, eps, noise = torch.randn(3, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6)).unbind(0)
    t, s = torch.tensor([10**9, -5, 999]), torch.tensor([10**9 - 1, CLEAN, 10**12])
    want = fused_step_reference(x, eps, table(), t, s, noise=noise, solver="ddpm", return_x0=True)
    for got, ref in zip(interpreted["clamped"], want):
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_interpreter_return_x0_false(interpreted):
    alone = interpreted["no-x0"]
    assert isinstance(alone, torch.Tensor) and torch.equal(alone, interpreted[NO_X0][0])


@pytest.mark.parametrize("run", ["ddim", "ddpm", "per-sample"])
def test_sampler_runs_the_triton_backend(interpreted, run):
    x, backend = interpreted["sampler"]["triton"][run]
    want, _ = interpreted["sampler"]["torch"][run]
    assert backend == "triton"
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def test_interpreter_backend_listing(interpreted):
    usable, auto, imported = interpreted["backends"]
    assert imported and usable[-1] == "triton"  # last on the CPU: the interpreter is slow
    assert auto == ("cpu" if "cpu" in usable else "torch")  # "auto" never picks the interpreter


def test_cpu_without_interpreter_is_refused():
    if triton_step.triton_available("cpu"):
        pytest.skip("this process runs Triton's interpreter (TRITON_INTERPRET=1)")
    assert "triton" not in available_backends("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", "cpu")


def test_unavailable_without_triton(monkeypatch):
    monkeypatch.setattr(triton_step, "_STATE", {"error": ImportError("No module named 'triton'")})
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not triton_step.triton_available("cpu") and not triton_step.triton_available("cuda")
    assert "triton" not in available_backends("cpu") and "triton" not in available_backends("cuda")
    with pytest.raises(RuntimeError, match="triton is not available"):
        index = torch.zeros(1, dtype=torch.int64)
        triton_step.fused_step_triton(*[torch.zeros(1)] * 3, index, index, None, StepOptions(), False)


# ---------------------------------------------------------------------------------- CUDA
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device available")
    if not triton_step.triton_available("cuda"):
        pytest.skip("triton is not installed")


CUDA_CASES = [cid for cid in CPU_CASES if "-B3-" not in cid or "clipNone-maskFalse" in cid or "clip1.0-maskTrue" in cid]


@pytest.mark.cuda
@pytest.mark.parametrize("cid", CUDA_CASES)
def test_cuda_matches_reference(cid):
    _need_cuda()
    spec = CPU_CASES[cid]
    case, kw = _build(spec, device="cuda")
    assert_matches_reference(_runmake_case(spec, device="cuda"), case, **kw)


@pytest.mark.cuda
def test_cuda_batch_beyond_grid_y_limit():
    _need_cuda()
    case = make_case(70_000, (1,), torch.float64, solver="ddim", eta=0.5, masked=True, device="cuda")
    out = fused_step(**case, solver="ddim", eta=0.5, return_x0=True, backend="triton")
    assert_matches_reference(out, case, solver="ddim", eta=0.5, clip=None)


@pytest.mark.cuda
def test_cuda_graph_replay():
    _need_cuda()
    case = make_case(5, (3, 8, 8), torch.float32, solver="ddpm", eta=0.0, masked=True, device="cuda")
    args = [case[name] for name in ("x", "eps", "alphas_cumprod", "t", "s", "active")]
    options = StepOptions(case["noise"], solver="ddpm", clip=1.0)
    triton_step.fused_step_triton(*args, options, False)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = triton_step.fused_step_triton(*args, options, False)
    torch.cuda.current_stream().wait_stream(stream)
    case["x"].mul_(0.5)  # new values in the static input buffer, then replay
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, fused_step_reference(**case, solver="ddpm", clip=1.0), rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
