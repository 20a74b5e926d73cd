"""FusedSampler(cuda_graph=True): the whole K-step loop captured once into a CUDA graph and
replayed over static buffers (docs/DESIGN.md §5).

On any machine: argument validation, and the captured loop body itself — the loop over the
static buffers (x_T, the [B, L] plan, the [K, B, …] noise filled from the generator) is run on
the CPU without a capture and must equal the eager loop bit for bit, also after new inputs are
loaded into the same buffers (what a replay sees). On an NVIDIA GPU: capture and replay,
bit-identical to eager sampling with the same CUDA generator, new seeds and plans replayed
without re-capture, NFE counted as in eager sampling, and the clear errors.
"""

from __future__ import annotations

import pytest
import torch

import stepdrop.sampler as sampler_module
from stepdrop import Adaptive, FusedSampler, NoiseSchedule, StepPlan, StochasticStepDrop, TinyUNet
from stepdrop.solvers import SOLVERS
from stepdrop.cuda_graph import CudaGraphError, PlanGraph, check_graphable, graph_body, load_inputs
from stepdrop.loop import Run
from test_sampler import BACKENDS_HERE, SCHEDULE, SHAPE, CountingModel, gen

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)")

ROWS_A = torch.tensor([[999, 700, 400, 100, -1], [999, 500, -1, -1, -1], [800, 300, 10, -1, -1]])
ROWS_B = torch.tensor([[900, 600, -1, -1, -1], [999, 800, 600, 200, -1], [999, 400, 100, 50, -1]])  # same L
SHARED = torch.tensor([999, 750, 500, 250, -1])  # a shared plan of that length


class GraphSafeModel(CountingModel):
    """CountingModel without the per-call timestep copy to the host (a capture refuses syncs)."""

    record = False


class SyncingModel(GraphSafeModel):
    """Reads a tensor value on the host every call: fine eagerly, impossible to capture."""

    def forward(self, x, t):
        if float(x.abs().max()) > 1e9:  # a host sync
            raise RuntimeError("unreachable")
        return super().forward(x, t)


# ====================================================================== arguments (any machine)
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_graph_without_cuda_raises_at_construction():
    with pytest.raises(ValueError, match=r"cuda_graph=True needs a CUDA device.*cuda_graph=False"):
        FusedSampler(CountingModel(), SCHEDULE, cuda_graph=True)


def test_cuda_graph_on_a_cpu_model_raises_at_sample(monkeypatch):
    """With CUDA present but the model (hence the run) on the CPU, sample() names the device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    s = FusedSampler(CountingModel(), SCHEDULE, cuda_graph=True)
    with pytest.raises(ValueError, match=r"cuda_graph=True needs a CUDA device, but this run samples on cpu"):
        s.sample(2, "uniform", budget=3, generator=gen(0))
    assert s.graph_captures == 0


@pytest.mark.parametrize("arg", ["progress", "callback"])
def test_progress_and_callback_rule_out_a_graph(arg):
    kw = dict(progress=arg == "progress", callback=(lambda k, t, x: None) if arg == "callback" else None)
    with pytest.raises(ValueError, match=rf"{arg} is not supported with cuda_graph=True"):
        check_graphable(torch.device("cuda", 0), **kw)
    assert check_graphable(torch.device("cuda", 0), False, None) == torch.device("cuda", 0)


def test_online_policy_rules_out_a_graph(monkeypatch):
    """The check comes after the plan is resolved and before anything is drawn or captured;
    the device check is bypassed so that it can run on the CPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sampler_module, "check_graphable", lambda device, progress, callback: device)
    s = FusedSampler(CountingModel(), SCHEDULE, cuda_graph=True)
    for policy in ("adaptive", Adaptive(signal="eps")):
        with pytest.raises(ValueError, match=r"OnlinePolicy.*data-dependent.*cuda_graph=False"):
            s.sample(2, policy, budget=5, generator=gen(0))
    assert s.graph_captures == 0


# ====================================================================== the captured body, on the CPU
def _body(s: FusedSampler, graph: PlanGraph, x_T, plan: StepPlan, generator, sample_shape=SHAPE):
    """Load new inputs into ``graph``'s buffers and run the loop a capture records over them."""
    run = Run.make(x_T.device, torch.float32, s.backend, s.schedule, generator, sample_shape)
    load_inputs(s, graph, x_T, plan.expand(x_T.shape[0]), run)
    return graph_body(s, graph, run, range(plan.length - 1))


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 0.5)] + [(n, 0.0) for n in SOLVERS if n != "ddim"])
def test_static_buffer_loop_equals_eager_loop(backend, solver, eta):
    """Same buffers, four sets of inputs (seed, x_T, per-sample or shared plan of one length):
    each run equals eager sampling bit for bit, NFE included, so a replay reads nothing but
    the buffers, and one graph serves shared and per-sample plans alike."""
    s = FusedSampler(CountingModel(), SCHEDULE, solver=solver, eta=eta, backend=backend)
    graph = None
    for rows, seed in ((ROWS_A, 1), (ROWS_A, 2), (ROWS_B, 3), (SHARED, 4)):
        plan = StepPlan(rows, 1000)
        x_T = torch.randn(3, *SHAPE, generator=gen(100 + seed))
        eager, stats = s.sample(x_T.clone(), plan, generator=gen(seed))
        if graph is None:
            graph = PlanGraph.allocate(x_T, plan.length, s.noise_draws(x_T.shape, plan.length - 1, SHAPE), s.model)
        out, counts = _body(s, graph, x_T, plan, gen(seed))
        assert torch.equal(out, eager), (rows, seed)
        assert torch.equal(counts.nfe, stats.nfe)
        assert counts.calls == stats.model_calls == plan.length - 1


@pytest.mark.parametrize("solver", ["ddim", "ddpm", "unipc"])
@pytest.mark.parametrize("calls", ["+mixres(0.5,0.5)", "+cache(2,0)", "+mixres(0.5,0.4)+cache(2,1)"])
def test_static_buffer_loop_equals_eager_loop_with_call_variants(solver, calls):
    """Mixed resolution and deep-feature caching in the captured body: x_T at the reduced size,
    one buffer per draw (the switch noise included, in the eager order), the cached feature kept
    between calls: each run equals eager sampling bit for bit."""
    torch.manual_seed(0)
    model = TinyUNet(in_channels=1, image_size=16, base_channels=16, channel_mults=(1, 2, 2), num_res_blocks=1,
                     attention_resolutions=(8,)).eval().requires_grad_(False)
    s = FusedSampler(model, SCHEDULE, solver=solver, calls=calls)
    full = (1, 16, 16)
    start = s.calls.start_shape(full)
    graph = None
    for rows, seed in ((ROWS_A, 1), (ROWS_B, 2), (SHARED, 3)):
        plan = StepPlan(rows, 1000)
        x_T = torch.randn(3, *start, generator=gen(100 + seed))
        eager, stats = s.sample(x_T.clone(), plan, generator=gen(seed))
        if graph is None:
            graph = PlanGraph.allocate(x_T, plan.length, s.noise_draws(x_T.shape, plan.length - 1, full), s.model)
            assert ("switch", s.calls.mixres.low_res_calls(4) - 1) in graph.noise if s.calls.mixres else True
        out, counts = _body(s, graph, x_T, plan, gen(seed), sample_shape=full)
        assert torch.equal(out, eager), (rows, seed)
        assert torch.equal(counts.nfe, stats.nfe)


def test_noise_buffer_holds_the_eager_draws():
    """The [K, B, …] buffer filled before a replay holds, step by step, what the eager loop
    draws from the same generator state (also for a CPU generator feeding another device)."""
    s = FusedSampler(CountingModel(), SCHEDULE, solver="ddpm")
    run = Run.make(torch.device("cpu"), torch.float32, "torch", SCHEDULE, gen(5), SHAPE)
    graph = PlanGraph.allocate(torch.zeros(2, *SHAPE), 4, s.noise_draws((2, *SHAPE), 3, SHAPE), s.model)
    load_inputs(s, graph, torch.zeros(2, *SHAPE), torch.tensor([[999, 500, 100, -1]] * 2), run)
    g = gen(5)
    assert list(graph.noise) == [("step", 0), ("step", 1), ("step", 2)]
    for k in range(3):
        assert torch.equal(graph.noise[("step", k)], torch.randn(2, *SHAPE, generator=g)), k


# ====================================================================== capture and replay (GPU)
def _cuda_gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _unet() -> TinyUNet:
    torch.manual_seed(0)
    return TinyUNet(in_channels=1, image_size=8, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                    attention_resolutions=(4,)).cuda().eval()


def _pair(model, **kw) -> tuple[FusedSampler, FusedSampler]:
    schedule = NoiseSchedule.linear(1000)
    return FusedSampler(model, schedule, **kw), FusedSampler(model, schedule, cuda_graph=True, **kw)


def _assert_same_run(a, b):
    (xa, sa), (xb, sb) = a, b
    assert torch.equal(xa, xb)
    assert torch.equal(sa.nfe, sb.nfe) and torch.equal(sa.timesteps, sb.timesteps)
    assert sa.model_calls == sb.model_calls


@needs_cuda
@pytest.mark.parametrize("model_fn", [GraphSafeModel, _unet], ids=["elementwise", "tinyunet"])
@pytest.mark.parametrize("solver,eta", [("ddim", 0.0), ("ddim", 0.5)] + [(n, 0.0) for n in SOLVERS if n != "ddim"])
def test_graph_replay_is_bit_identical_to_eager(model_fn, solver, eta):
    model = model_fn().cuda()
    eager, graphed = _pair(model, solver=solver, eta=eta)
    for seed in (0, 1, 2):  # the first call captures, the others replay with a new seed
        _assert_same_run(eager.sample(4, "uniform", budget=10, generator=_cuda_gen(seed)),
                         graphed.sample(4, "uniform", budget=10, generator=_cuda_gen(seed)))
    assert graphed.graph_captures == 1
    # a CPU generator feeds the same graph (its draws are copied into the noise buffer)
    _assert_same_run(eager.sample(4, "uniform", budget=10, generator=gen(7)),
                     graphed.sample(4, "uniform", budget=10, generator=gen(7)))
    assert graphed.graph_captures == 1


@needs_cuda
@pytest.mark.parametrize("solver", ["ddim", "ddpm", "unipc"])
@pytest.mark.parametrize("calls", ["+mixres(0.5,0.4)", "+cache(3,0)", "+mixres(0.5,0.4)+cache(2,1)"])
def test_graph_replay_with_call_variants_is_bit_identical_to_eager(solver, calls):
    eager, graphed = _pair(_unet(), solver=solver, calls=calls)
    for seed in (0, 1):
        _assert_same_run(eager.sample(4, "uniform", budget=10, generator=_cuda_gen(seed)),
                         graphed.sample(4, "uniform", budget=10, generator=_cuda_gen(seed)))
    assert graphed.graph_captures == 1


@needs_cuda
@pytest.mark.parametrize("solver", SOLVERS)
def test_new_per_sample_plan_replays_without_recapture(solver):
    eager, graphed = _pair(GraphSafeModel().cuda(), solver=solver)
    x_T = torch.randn(3, *SHAPE, device="cuda", generator=_cuda_gen(9))
    for rows in (ROWS_A, ROWS_B, ROWS_A):
        plan = StepPlan(rows, 1000)
        a = eager.sample(x_T.clone(), plan, generator=_cuda_gen(3))
        b = graphed.sample(x_T.clone(), plan, generator=_cuda_gen(3))
        _assert_same_run(a, b)
        assert b[1].nfe.tolist() == (rows >= 0).sum(1).tolist()  # counted in the graph, per sample
    assert graphed.graph_captures == 1
    # a per-sample policy's plans go through the same path
    policy = StochasticStepDrop(per_sample=True)
    _assert_same_run(eager.sample(3, policy, budget=8, generator=_cuda_gen(4)),
                     graphed.sample(3, policy, budget=8, generator=_cuda_gen(4)))


@needs_cuda
def test_signature_change_captures_once_per_signature():
    _, graphed = _pair(GraphSafeModel().cuda())
    for budget, batch in ((10, 2), (12, 2), (10, 3), (10, 2), (12, 2)):
        graphed.sample(batch, "uniform", budget=budget, generator=_cuda_gen(0))
    assert graphed.graph_captures == 3
    graphed.clear_cuda_graphs()
    graphed.sample(2, "uniform", budget=10, generator=_cuda_gen(0))
    assert graphed.graph_captures == 4


@needs_cuda
def test_images_survive_the_next_replay_and_weights_update_in_place():
    model = _unet()
    eager, graphed = _pair(model)
    first, _ = graphed.sample(2, "uniform", budget=5, generator=_cuda_gen(0))
    kept = first.clone()
    graphed.sample(2, "uniform", budget=5, generator=_cuda_gen(1))
    assert torch.equal(first, kept)  # a copy, not the static output buffer
    with torch.no_grad():  # in place: the graph reads the new weights, no re-capture
        for p in model.parameters():
            p.mul_(0.9)
    _assert_same_run(eager.sample(2, "uniform", budget=5, generator=_cuda_gen(0)),
                     graphed.sample(2, "uniform", budget=5, generator=_cuda_gen(0)))
    assert graphed.graph_captures == 1
    old = [p.data for p in model.parameters()]  # held, so that the new copies get new addresses
    for p in model.parameters():  # what model.to(...) does: new .data for the same parameters
        p.data = p.data.clone()
    _assert_same_run(eager.sample(2, "uniform", budget=5, generator=_cuda_gen(0)),
                     graphed.sample(2, "uniform", budget=5, generator=_cuda_gen(0)))
    assert graphed.graph_captures == 2 and len(old) > 0


@needs_cuda
def test_nonfinite_output_is_reported_after_a_replay():
    class Poison(GraphSafeModel):
        def forward(self, x, t):
            eps = super().forward(x, t)
            return torch.where((t == 499).view(-1, 1, 1, 1), torch.full_like(eps, float("nan")), eps)

    _, graphed = _pair(Poison().cuda())
    with pytest.raises(ValueError, match=r"step 2 \(timestep t=499\)"):
        graphed.sample(2, [999, 700, 499, 100], generator=_cuda_gen(0))


@needs_cuda
def test_graph_errors_on_gpu():
    _, graphed = _pair(GraphSafeModel().cuda())
    with pytest.raises(ValueError, match="OnlinePolicy"):
        graphed.sample(2, "adaptive", budget=5, generator=_cuda_gen(0))
    with pytest.raises(ValueError, match="callback"):
        graphed.sample(2, "uniform", budget=5, callback=lambda k, t, x: None)
    with pytest.raises(ValueError, match="progress"):
        graphed.sample(2, "uniform", budget=5, progress=True)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        FusedSampler(CountingModel(), SCHEDULE, cuda_graph=True).sample(2, "uniform", budget=3)
    assert graphed.graph_captures == 0


@needs_cuda
def test_a_model_that_syncs_cannot_be_captured():
    model = SyncingModel().cuda()
    eager, graphed = _pair(model)
    with pytest.raises(CudaGraphError, match=r"could not be captured.*cuda_graph=False"):
        graphed.sample(2, "uniform", budget=5, generator=_cuda_gen(0))
    assert graphed.graph_captures == 0
    # the failed capture left the process usable: eager sampling still runs on the caller's stream
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    x, stats = eager.sample(2, "uniform", budget=5, generator=_cuda_gen(0))
    assert torch.isfinite(x).all() and stats.nfe.tolist() == [5, 5]
    # ... and the default CUDA generator, which the capture registered, draws outside a graph again
    assert torch.randn(3, device="cuda").isfinite().all()


def test_moved_weights_are_noticed():
    """A graph reads the weights at their capture-time addresses: new memory means a new capture."""
    model = CountingModel()
    graph = PlanGraph.allocate(torch.zeros(1, *SHAPE), 3, [], model)
    with torch.no_grad():
        model.w.mul_(2.0)  # in place (load_state_dict): the replay sees it
    assert not graph.weights_moved()
    old = model.w.data
    model.w.data = old.clone()  # what model.to(...) does
    assert graph.weights_moved()
    assert not PlanGraph.allocate(torch.zeros(1, *SHAPE), 3, [], lambda x, t: x).weights_moved()
