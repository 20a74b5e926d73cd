"""``stepdrop.ops.fused_plan_step`` on every backend against the torch reference, its
specification (:func:`stepdrop.ops.reference.fused_plan_step_reference`).

x_next within the fused step's measured tolerance (tests/backend_cases.py), finished samples
bit for bit, the bookkeeping (nfe, t_next, active_next) exactly; running k = 0..L−2 equals,
bit for bit, the loop of ``fused_step`` with t = plan[:, k], s = plan[:, k+1], active = t ≥ 0
on the same backend. Sizes are odd (3×17×19 is a multiple of no block size). Triton's CPU
cases run under its interpreter in a subprocess (this file run as a script, as in
tests/test_triton.py); the CUDA sections skip, with their reason, without a GPU.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # the interpreter subprocess: before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from stepdrop.ops import CLEAN, _native, available_backends, fused_plan_step, fused_step, triton_step
from stepdrop.ops.reference import fused_plan_step_reference
from backend_cases import (
    T,
    as_step_case,
    assert_plan_step_matches_reference,
    copy_outputs,
    interpreter_results,
    need_cuda_backend,
    make_plan,
    make_plan_case,
    table,
)

SOLVERS = [("ddim", 0.0), ("ddim", 0.5), ("ddpm", 0.0)]
DTYPES = [torch.float32, torch.float64]
SHAPE = (3, 17, 19)
LENGTH = 6


def _cases() -> dict[str, dict]:
    """Every case by id: the recipe of its inputs and the step's options."""
    cases = {}
    i = 0
    for solver, eta in SOLVERS:
        for dtype in DTYPES:
            d = str(dtype).split(".")[-1]
            for batch in (0, 1, 3, 257):
                for clip in (None, 1.0):
                    k = i % (LENGTH - 1)  # every k in turn
                    cases[f"{solver}{eta}-{d}-B{batch}-clip{clip}-k{k}"] = dict(
                        batch=batch, shape=SHAPE, dtype=dtype, solver=solver, eta=eta, clip=clip, k=k, seed=i
                    )
                    i += 1
            for k in range(LENGTH - 1):  # non-contiguous x, ε, z and plan; one case per k
                cases[f"{solver}{eta}-{d}-strided-k{k}"] = dict(batch=9, shape=SHAPE, dtype=dtype, solver=solver,
                                                                eta=eta, clip=1.5, k=k, seed=100 + k,
                                                                strided=True)  # fmt: skip
    base = dict(dtype=torch.float32, solver="ddim", eta=0.5, clip=None, seed=7)
    cases["shared-plan"] = dict(base, batch=5, shape=SHAPE, k=2, shared=True)  # one row expanded: stride 0
    cases["one-element"] = dict(base, batch=33, shape=(), k=1)
    cases["no-elements"] = dict(base, batch=4, shape=(0, 3), k=1)  # bookkeeping only
    cases["nfe-only"] = dict(base, batch=7, shape=SHAPE, k=0, outputs=("nfe",))
    cases["no-outputs"] = dict(base, batch=7, shape=SHAPE, k=3, outputs=())
    return cases


CASES = _cases()
LOOPS = {f"{solver}{eta}-{str(dtype).split('.')[-1]}": dict(solver=solver, eta=eta, dtype=dtype)
         for solver, eta in SOLVERS for dtype in DTYPES}  # fmt: skip


def _build(spec, device="cpu"):
    """(inputs as the op receives them, the same with contiguous tensors, the step's options)."""
    case = make_plan_case(spec["batch"], spec["shape"], spec["dtype"], solver=spec["solver"], eta=spec["eta"],
                          k=spec["k"], length=LENGTH, seed=spec["seed"], device=device)  # fmt: skip
    if spec.get("shared"):
        case["plan"] = case["plan"][:1].expand(spec["batch"], LENGTH)
    for name in ("nfe", "t_next", "active_next"):
        if name not in spec.get("outputs", (name,)):
            case[name] = None
    inputs = dict(case)
    if spec.get("strided"):
        inputs["x"] = case["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
        inputs["eps"] = torch.stack([case["eps"], torch.full_like(case["eps"], float("nan"))], -1)[..., 0]
        if case["noise"] is not None:
            inputs["noise"] = torch.stack([case["noise"], case["noise"]], 1)[:, 0]
        inputs["plan"] = case["plan"].t().contiguous().t()  # column-major
        inputs["alphas_cumprod"] = torch.stack([case["alphas_cumprod"], -case["alphas_cumprod"]], 1)[:, 0]
        assert not any(inputs[k].is_contiguous() for k in ("x", "eps", "plan", "alphas_cumprod"))
    return inputs, case, dict(solver=spec["solver"], eta=spec["eta"], clip=spec["clip"])


def _run(spec, backend, device="cpu"):
    """(x_next, nfe, t_next, active_next) of one plan step on ``backend``."""
    inputs, _, kw = _build(spec, device)
    inputs = copy_outputs(inputs)
    x_next = fused_plan_step(**inputs, **kw, backend=backend)
    return (x_next, inputs["nfe"], inputs["t_next"], inputs["active_next"])


def _check(out, spec):
    _, case, kw = _build(spec, out[0].device)
    assert_plan_step_matches_reference(out, case, **kw)


def _loop(spec, backend, device="cpu"):
    """x after each step k of a 9-sample plan run with fused_plan_step, and the same run with
    fused_step, t = plan[:, k], s = plan[:, k+1], active = t ≥ 0; nfe after the run."""
    batch, steps = 9, LENGTH - 1
    case = make_plan_case(batch, SHAPE, spec["dtype"], solver=spec["solver"], eta=spec["eta"], k=0, length=LENGTH,
                          seed=11, device=device)  # fmt: skip
    kw = dict(solver=spec["solver"], eta=spec["eta"], clip=1.0)
    g = torch.Generator().manual_seed(12)
    eps = torch.randn(steps, batch, *SHAPE, generator=g, dtype=torch.float64).to(spec["dtype"]).to(device)
    noise = torch.randn(steps, batch, *SHAPE, generator=g, dtype=torch.float64).to(spec["dtype"]).to(device)
    plan, table_ = case["plan"], case["alphas_cumprod"]
    nfe = torch.zeros(batch, dtype=torch.int64, device=device)
    x = y = case["x"]
    planned, stepped = [], []
    for k in range(steps):
        z = noise[k] if case["noise"] is not None else None
        x = fused_plan_step(x, eps[k], table_, plan, k, noise=z, nfe=nfe, **kw, backend=backend)
        t, s = plan[:, k], plan[:, k + 1]
        y = fused_step(y, eps[k], table_, t, s, noise=z, active=t >= 0, **kw, backend=backend)
        planned.append(x)
        stepped.append(y)
    return torch.stack(planned), torch.stack(stepped), nfe, plan


def _check_loop(planned, stepped, nfe, plan):
    assert torch.equal(planned, stepped)
    assert torch.equal(nfe, (plan[:, :-1] >= 0).sum(1))  # one model call per live step


# ------------------------------------------------------------------------------------ torch, cpu
CPU_BACKENDS = [b for b in ("torch", "cpu") if b in available_backends("cpu")]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cid", list(CASES))
def test_matches_reference(backend, cid):
    _check(_run(CASES[cid], backend), CASES[cid])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lid", list(LOOPS))
def test_loop_equals_fused_step_loop(backend, lid):
    _check_loop(*_loop(LOOPS[lid], backend))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inputs_untouched_and_outputs_in_place(backend):
    spec = next(v for v in CASES.values() if v["batch"] == 3 and v["solver"] == "ddpm")
    inputs, _, kw = _build(spec)
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    outs = {k: inputs[k] for k in ("nfe", "t_next", "active_next")}
    ptrs = {k: v.data_ptr() for k, v in outs.items()}
    x_next = fused_plan_step(**inputs, **kw, backend=backend)
    assert x_next.data_ptr() != inputs["x"].data_ptr()
    for k, v in before.items():
        if k not in outs:
            assert torch.equal(inputs[k], v), f"{k} was modified"
    assert {k: v.data_ptr() for k, v in outs.items()} == ptrs  # written in place, not rebound
    assert torch.equal(outs["nfe"], before["nfe"] + (inputs["plan"][:, spec["k"]] >= 0))


def test_reference_bookkeeping_by_hand():
    plan = torch.tensor([[900, 500, 0, CLEAN], [700, CLEAN, CLEAN, CLEAN], [CLEAN] * 4])
    x = torch.randn(3, 2, dtype=torch.float64)
    nfe = torch.tensor([5, 0, 2])
    t_next, active_next = torch.empty(3, dtype=torch.int64), torch.empty(3, dtype=torch.bool)
    for k, want_nfe, want_t, want_active in [(0, [6, 1, 2], [500, 0, 0], [True, False, False]),
                                             (1, [7, 1, 2], [0, 0, 0], [True, False, False]),
                                             (2, [8, 1, 2], [0, 0, 0], [False, False, False])]:  # fmt: skip
        fused_plan_step_reference(x, x, table(), plan, k, nfe=nfe, t_next=t_next, active_next=active_next)
        assert nfe.tolist() == want_nfe and t_next.tolist() == want_t and active_next.tolist() == want_active


def test_binding_clamps_out_of_range_plan_entries():
    """Past the Python validation, bad plan entries of active samples are clamped like the reference's gather."""
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("stepdrop._C is not built")
    x, eps, noise = torch.randn(3, 3, 4, 4, dtype=torch.float64).unbind(0)
    plan = torch.tensor([[5, 10**9, 10**9 - 1], [7, -5, CLEAN], [9, 999, 10**12]])
    t_next = torch.empty(3, dtype=torch.int64)
    got = _native._C.fused_plan_step(x, eps, table(), plan, 1, noise, 1, 0.0, 0.0, None, t_next, None)
    want_t = torch.empty(3, dtype=torch.int64)
    want = fused_plan_step_reference(x, eps, table(), plan, 1, noise=noise, solver="ddpm", t_next=want_t)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert torch.equal(t_next, want_t)


def _binding_args(**change):
    x = torch.randn(4, 2, 3)
    args = dict(
        x=x, eps=torch.randn_like(x), alphas_cumprod=table(), plan=make_plan(4, 5), k=1, noise=None, solver=0,
        eta=0.0, clip=0.0, nfe=torch.zeros(4, dtype=torch.int64), t_next=None, active_next=None,
    )  # fmt: skip
    args.update(change)
    return list(args.values())


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(plan=make_plan(4, 5).int()), "plan must be Long"),
        (dict(plan=make_plan(3, 5)), r"plan must have shape \[4, L\]"),
        (dict(plan=make_plan(4, 1)), r"plan must have shape \[4, L\] with L >= 2"),
        (dict(plan=make_plan(4, 5)[:, 0]), "plan must have shape"),
        (dict(k=4), r"k must be in \[0, 3\]"),
        (dict(k=-1), r"k must be in \[0, 3\]"),
        (dict(nfe=torch.zeros(4, dtype=torch.int32)), "nfe must be Long"),
        (dict(nfe=torch.zeros(5, dtype=torch.int64)), r"nfe must have shape \[4\]"),
        (dict(nfe=torch.zeros(4, 2, dtype=torch.int64)[:, 0]), "nfe must be contiguous"),
        (dict(t_next=torch.zeros(4, dtype=torch.int32)), "t_next must be Long"),
        (dict(active_next=torch.zeros(4, dtype=torch.int64)), "active_next must be Bool"),
        (dict(eps=torch.randn(4, 2, 3, dtype=torch.float64)), "eps must have the dtype of x"),
        (dict(solver=2), "solver must be 0"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_binding_checks(change, match):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("stepdrop._C is not built")
    with pytest.raises(RuntimeError, match=match):
        _native._C.fused_plan_step(*_binding_args(**change))


def test_binding_rejects_outputs_sharing_memory():
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("stepdrop._C is not built")
    nfe = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="single memory location"):
        _native._C.fused_plan_step(*_binding_args(nfe=nfe, t_next=nfe))
    plan = make_plan(4, 5)
    with pytest.raises(RuntimeError, match="single memory location"):  # t_next is the first 4 entries of plan
        _native._C.fused_plan_step(*_binding_args(plan=plan, t_next=plan.view(-1)[:4]))


# ------------------------------------------------------------------------------------ bad input
def _good(**over):
    """A valid call's arguments (B = 3, L = 5, k = 1), with overrides."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 3, generator=g, dtype=torch.float64)
    args = dict(x=x, eps=torch.randn(x.shape, generator=g, dtype=torch.float64), alphas_cumprod=table(),
                plan=torch.tensor([[900, 500, 100, CLEAN, CLEAN], [800, CLEAN, CLEAN, CLEAN, CLEAN], [CLEAN] * 5]),
                k=1, noise=None, solver="ddim", eta=0.0, clip=None, nfe=torch.zeros(3, dtype=torch.int64),
                t_next=torch.zeros(3, dtype=torch.int64), active_next=torch.zeros(3, dtype=torch.bool),
                backend="torch")  # fmt: skip
    args.update(over)
    return args


def _raises(exc, pattern, **over):
    with pytest.raises(exc, match=pattern) as info:
        fused_plan_step(**_good(**over))
    return str(info.value)


def test_good_call_runs():
    """Baseline for the tests below: the unmodified arguments are accepted."""
    assert fused_plan_step(**_good()).shape == (3, 2, 3)


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool])
def test_plan_dtype(dtype):
    _raises(TypeError, r"\bplan\b.*int64", plan=_good()["plan"].to(dtype))


@pytest.mark.parametrize("shape", [(15,), (3, 5, 1), (2, 5), (4, 5), (3, 1)])
def test_plan_shape(shape):
    plan = torch.full(shape, CLEAN, dtype=torch.int64)
    msg = _raises(ValueError, r"\bplan\b", plan=plan)
    assert str(shape[0]) in msg or "dimension" in msg or "2 columns" in msg


@pytest.mark.parametrize("k", [-1, 4, 10])
def test_k_out_of_range(k):
    msg = _raises(ValueError, r"\bk\b", k=k)
    assert "[0, 3]" in msg  # states the legal range


@pytest.mark.parametrize("k", [1.0, "1", None, True, torch.tensor(1)])
def test_k_type(k):
    _raises(TypeError, r"\bk\b", k=k)


@pytest.mark.parametrize("name,dtype", [("nfe", torch.int32), ("t_next", torch.float64), ("active_next", torch.int64)])
def test_output_dtype(name, dtype):
    _raises(TypeError, name, **{name: torch.zeros(3, dtype=dtype)})


@pytest.mark.parametrize("name", ["nfe", "t_next", "active_next"])
def test_output_shape_and_layout(name):
    dtype = torch.bool if name == "active_next" else torch.int64
    _raises(ValueError, name, **{name: torch.zeros(4, dtype=dtype)})
    _raises(ValueError, name, **{name: torch.zeros(3, 1, dtype=dtype)})
    msg = _raises(ValueError, name, **{name: torch.zeros(3, 2, dtype=dtype)[:, 0]})
    assert "contiguous" in msg
    _raises(TypeError, name, **{name: [0, 0, 0]})


def test_outputs_sharing_memory():
    nfe = torch.zeros(3, dtype=torch.int64)
    _raises(ValueError, "nfe and t_next must not share memory", nfe=nfe, t_next=nfe)
    buf = torch.full((20,), CLEAN, dtype=torch.int64)
    plan = buf[:15].view(3, 5)
    plan[0, :3] = torch.tensor([900, 500, 100])
    _raises(ValueError, "plan and t_next must not share memory", plan=plan, t_next=buf[12:15])
    assert fused_plan_step(**_good(plan=plan, t_next=buf[15:18])).shape == (3, 2, 3)  # adjacent is fine


def test_devices_differ():
    """A tensor on another device is named (meta stands in for a second device without a GPU)."""
    for name in ("plan", "nfe", "t_next", "active_next", "eps"):
        with pytest.raises(ValueError, match=name) as info:
            fused_plan_step(**_good(**{name: _good()[name].to("meta")}))
        assert "device" in str(info.value)


@pytest.mark.parametrize("k,column,value", [(1, 1, T), (0, 0, T + 5), (1, 2, 500), (1, 2, 600), (0, 1, -2)])
def test_plan_values_of_active_samples(k, column, value):
    """On the CPU the two columns the step reads are checked: t ∈ [0, T−1], s ∈ [CLEAN, t−1]."""
    plan = _good()["plan"].clone()
    plan[0, column] = value
    msg = _raises(ValueError, rf"plan\[:, {column}\]", plan=plan, k=k)
    assert f"plan[:, {k}]" in msg


def test_plan_values_below_clean():
    plan = _good()["plan"].clone()
    plan[2, 1] = -3
    msg = _raises(ValueError, r"plan\[:, 1\]", plan=plan)
    assert f"[{CLEAN}, {T - 1}]" in msg


def test_finished_rows_stay_finished():
    plan = _good()["plan"].clone()
    plan[1, 2] = 40  # finished at column 1, alive again at column 2
    msg = _raises(ValueError, "stay", plan=plan)
    assert "plan[1, 1]" in msg and "plan[1, 2] = 40" in msg


def test_finished_rows_are_not_errors():
    """Rows at CLEAN in both columns are masked, not range errors; they pass through."""
    args = _good(k=3)
    out = fused_plan_step(**args)
    assert torch.equal(out, args["x"]) and args["nfe"].tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    "over,exc,name",
    [
        (dict(eps=torch.zeros(3, 2, 4, dtype=torch.float64)), ValueError, "eps"),
        (dict(x=torch.zeros(3, 2, 3, dtype=torch.float16)), TypeError, r"\bx\b"),
        (dict(solver="euler"), ValueError, "solver"),
        (dict(eta=0.5), ValueError, "noise"),
        (dict(eta=1.5), ValueError, "eta"),
        (dict(clip=0.0), ValueError, "clip"),
        (dict(alphas_cumprod=torch.ones(1000, dtype=torch.float64)), ValueError, "alphas_cumprod"),
        (dict(backend="fast"), ValueError, "backend"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_shared_step_checks(over, exc, name):
    """The checks of the update itself are fused_step's (tests/test_ops_validation.py)."""
    _raises(exc, name, **over)


def test_cuda_backend_on_cpu_tensors():
    _raises(ValueError, "backend", backend="cuda")


# ------------------------------------------------------------------------------------ triton (interpreter)
def _interpreter_main(path: str) -> None:
    """Subprocess entry: every case and loop through the interpreter; save the outputs."""
    results = {cid: _run(spec, "triton") for cid, spec in CASES.items()}
    results["loops"] = {lid: _loop(spec, "triton") for lid, spec in LOOPS.items()}
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    return interpreter_results(__file__, tmp_path_factory)


@pytest.mark.parametrize("cid", list(CASES))
def test_interpreter_matches_reference(interpreted, cid):
    _check(interpreted[cid], CASES[cid])


@pytest.mark.parametrize("lid", list(LOOPS))
def test_interpreter_loop_equals_fused_step_loop(interpreted, lid):
    _check_loop(*interpreted["loops"][lid])


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
@pytest.mark.parametrize("lid", list(LOOPS))
def test_cuda_loop_equals_fused_step_loop(backend, lid):
    need_cuda_backend(backend)
    _check_loop(*_loop(LOOPS[lid], backend, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_batch_beyond_grid_y_limit(backend):
    need_cuda_backend(backend)
    spec = dict(batch=70_000, shape=(1,), dtype=torch.float64, solver="ddim", eta=0.5, clip=None, k=2, seed=3)
    _check(_run(spec, backend, device="cuda"), spec)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
def test_cuda_graph_replays_each_step_with_its_own_k(backend):
    """The whole K-step loop captured once: replay equals the eager run bit for bit, and a new
    plan copied into the static plan buffer is followed on the next replay (docs/DESIGN.md §5)."""
    need_cuda_backend(backend)
    batch, steps = 9, LENGTH - 1
    case = make_plan_case(batch, SHAPE, torch.float32, solver="ddpm", eta=0.0, k=0, length=LENGTH, seed=21,
                          device="cuda")  # fmt: skip
    g = torch.Generator().manual_seed(22)
    eps = torch.randn(steps, batch, *SHAPE, generator=g).cuda()
    noise = torch.randn(steps, batch, *SHAPE, generator=g).cuda()
    plan, x0 = case["plan"], case["x"]
    nfe = torch.zeros(batch, dtype=torch.int64, device="cuda")
    t_next = torch.zeros(batch, dtype=torch.int64, device="cuda")
    active_next = torch.zeros(batch, dtype=torch.bool, device="cuda")

    def run():
        x = x0
        for k in range(steps):
            x = fused_plan_step(x, eps[k], case["alphas_cumprod"], plan, k, noise=noise[k], solver="ddpm", clip=1.0,
                                nfe=nfe, t_next=t_next, active_next=active_next, backend=backend)  # fmt: skip
        return x

    def eager():
        nfe.zero_()
        out = run()
        torch.cuda.synchronize()
        return out.clone(), nfe.clone(), t_next.clone(), active_next.clone()

    want = eager()  # also compiles the Triton kernel outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for new_plan in (plan.clone(), make_plan(batch, LENGTH, seed=23, device="cuda")):
        plan.copy_(new_plan)
        want = eager()
        nfe.zero_()
        t_next.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip((captured, nfe, t_next, active_next), want):
            assert torch.equal(got, ref)
    assert torch.equal(nfe, (plan[:, :-1] >= 0).sum(1))


if __name__ == "__main__":
    _interpreter_main(sys.argv[1])
