"""The ``optimized`` policy (stepdrop.optimize, docs/DESIGN.md §4): its search finds known
minima, the timesteps it picks solve a closed-form ODE better than the spacing it starts
from, every model call it makes is counted, its cache is keyed by model, solver and settings
and survives bad files, it is deterministic, it plugs into diffusers through
``set_timesteps(timesteps=...)``, and bad arguments name themselves."""

from __future__ import annotations

import json

import pytest
import torch

from stepdrop import FusedSampler, NoiseSchedule, Optimized, get_policy
from stepdrop.diffusers_scheduler import StepDropScheduler
from stepdrop.optimize import START_SPACINGS, coordinate_search
from test_multistep import SCHEDULE, T, GaussianModel, SmoothModel, diffusers_scheduler, diffusers_trajectory
from test_sampler import gen


class Counting(GaussianModel):
    """The Gaussian's exact ε, counting batched calls and evaluated samples."""

    def __init__(self):
        super().__init__()
        self.calls = self.samples = 0

    def forward(self, x, t):
        self.calls += 1
        self.samples += x.shape[0]
        return super().forward(x, t)


def small(tmp_path, **kwargs) -> Optimized:
    settings = dict(pilot_batch=4, reference_steps=60, max_evals=40, cache_dir=tmp_path, progress=False)
    return Optimized(**{**settings, **kwargs})


# ----------------------------------------------------------------------------- the search
def test_coordinate_search_finds_a_separable_minimum():
    target = [999, 700, 420, 200, 60, 3]
    loss = lambda ts: float(sum((a - b) ** 2 for a, b in zip(ts, target)))  # noqa: E731
    start = [999, 800, 600, 400, 200, 100]
    (found, value), evals = coordinate_search(loss, start, loss(start), max_evals=2000)
    assert found == target and value == 0
    assert evals < 2000  # it stopped because no one-step move helps, not on the budget


def test_coordinate_search_keeps_a_valid_plan_and_its_budget():
    seen = []

    def loss(ts):  # pulls every timestep down hard: the search must stay strictly decreasing, t ≥ 0
        seen.append(list(ts))
        return float(sum(ts))

    start = [999, 500, 300, 10]
    (found, _), evals = coordinate_search(loss, start, loss(start), max_evals=25)
    assert evals == 25 and len(seen) == 26
    for ts in seen:
        assert ts[0] == 999 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
    assert sum(found) < sum(start)


# ----------------------------------------------------------------------------- on a model
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc"])
def test_beats_its_start_on_the_closed_form_ode(solver, tmp_path):
    """The Gaussian's probability-flow ODE has a closed form: the optimized timesteps must come
    closer to it than the best fixed spacing, on noise neither the pilot nor the held-out batch saw."""
    model = GaussianModel()
    sampler = FusedSampler(model, SCHEDULE, solver=solver)
    plan = small(tmp_path).plan(SCHEDULE, 4, model=model, sampler=sampler)
    x = torch.randn(64, *model.sample_shape, generator=gen(99), dtype=torch.float64)
    exact = GaussianModel.ode_solution(x)
    start = get_policy(plan.info["start"]).plan(SCHEDULE, 4)

    def error(p):
        return float((sampler.sample(x, p)[0] - exact).pow(2).mean())

    assert plan.info["start"] in START_SPACINGS
    assert plan.info["pilot_mse"]["optimized"] < plan.info["pilot_mse"]["start"]
    assert plan.info["holdout_mse"]["optimized"] < plan.info["holdout_mse"]["start"]
    assert error(plan) < 0.8 * error(start)
    assert plan.timesteps[0] == T - 1 and plan.length == 5


def test_every_search_call_is_counted_and_a_cached_plan_costs_none(tmp_path):
    model = Counting()
    sampler = FusedSampler(model, SCHEDULE, solver="dpmpp_2m")
    policy = small(tmp_path)
    _, stats = sampler.sample(8, policy, budget=5, generator=gen(0))
    # the sample itself: 5 calls; everything else was the search
    assert stats.overhead_calls == model.calls - 5 > 0
    assert stats.overhead_samples == model.samples - 5 * 8
    assert stats.overhead_calls == stats.info["search_calls"] and stats.info["cached"] is False
    calls = model.calls
    _, again = sampler.sample(8, policy, budget=5, generator=gen(0))
    assert model.calls == calls + 5  # read from the cache: no search call
    assert again.overhead_calls == again.overhead_samples == 0 and again.info["cached"] is True
    assert again.timesteps.tolist() == stats.timesteps.tolist()
    assert again.info["search_calls"] == stats.overhead_calls  # the file keeps what the search cost


def test_cache_is_keyed_by_model_solver_budget_and_settings(tmp_path):
    model = GaussianModel()
    policy = small(tmp_path, max_evals=6)

    def plan(solver="dpmpp_2m", budget=4, net=model, pol=policy):
        return pol.plan(SCHEDULE, budget, model=net, sampler=FusedSampler(net, SCHEDULE, solver=solver))

    first = plan()
    assert first.info["cached"] is False
    assert plan().info["cached"] is True
    assert plan(solver="unipc").info["cached"] is False
    assert plan(budget=3).info["cached"] is False
    assert plan(pol=small(tmp_path, max_evals=6, seed=1)).info["cached"] is False
    other = GaussianModel()
    with torch.no_grad():
        other.scale.fill_(0.99)  # other weights: another fingerprint
    assert plan(net=other).info["cached"] is False
    assert len(list(tmp_path.glob("*.json"))) == 5
    record = json.loads(open(first.info["cache_file"]).read())
    assert record["timesteps"] == first.timesteps[:-1].tolist() and record["key"]["solver"] == "dpmpp_2m"


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other_key", "wrong_length"])
def test_a_bad_cache_file_is_searched_again_never_trusted(damage, tmp_path):
    model = GaussianModel()
    sampler = FusedSampler(model, SCHEDULE, solver="dpmpp_2m")
    policy = small(tmp_path, max_evals=6)
    first = policy.plan(SCHEDULE, 4, model=model, sampler=sampler)
    path = first.info["cache_file"]
    text = open(path).read()
    record = json.loads(text)
    bad = {"garbage": "\x00\xff not json", "truncated": text[: len(text) // 2],
           "other_key": json.dumps({**record, "key": {**record["key"], "budget": 5}}),
           "wrong_length": json.dumps({**record, "timesteps": record["timesteps"][:2]})}[damage]
    open(path, "w").write(bad)
    again = policy.plan(SCHEDULE, 4, model=model, sampler=sampler)
    assert again.info["cached"] is False and again.timesteps.tolist() == first.timesteps.tolist()
    assert json.loads(open(path).read())["timesteps"] == record["timesteps"]  # rewritten whole


def test_deterministic_for_a_seed(tmp_path):
    model = SmoothModel()
    runs = [small(tmp_path / str(i), max_evals=10).plan(SCHEDULE, 5, model=model,
                                                         sampler=FusedSampler(model, SCHEDULE, solver="unipc"))
            for i in range(2)]
    assert runs[0].timesteps.tolist() == runs[1].timesteps.tolist()
    assert runs[0].info["pilot_mse"] == runs[1].info["pilot_mse"]


def test_a_plain_function_model_is_searched_but_not_cached(tmp_path):
    net = GaussianModel()
    sampler = FusedSampler(lambda x, t: net(x, t), SCHEDULE, solver="ddim")
    plan = small(tmp_path, max_evals=4).plan(SCHEDULE, 3, sample_shape=net.sample_shape, sampler=sampler)
    assert plan.info["cache_file"] is None and plan.overhead_calls > 0 and not list(tmp_path.iterdir())


def test_a_solver_object_from_outside_the_registry(tmp_path):
    """The search runs the sampler's own solver object, not one looked up by name: the
    unregistered AdamsBashforth2 restates DPM-Solver++(2M), so it finds the same timesteps."""
    from test_multistep import AdamsBashforth2

    model = SmoothModel()
    plans = [small(tmp_path / str(i), max_evals=6).plan(SCHEDULE, 4, model=model,
                                                         sampler=FusedSampler(model, SCHEDULE, solver=solver))
             for i, solver in enumerate([AdamsBashforth2(), "dpmpp_2m"])]
    assert plans[0].timesteps.tolist() == plans[1].timesteps.tolist()


def test_one_call_needs_no_search(tmp_path):
    model = Counting()
    plan = small(tmp_path).plan(SCHEDULE, 1, model=model, sampler=FusedSampler(model, SCHEDULE))
    assert plan.timesteps.tolist() == [T - 1, -1] and model.calls == 0


# ----------------------------------------------------------------------------- diffusers
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_the_list_runs_in_diffusers_through_set_timesteps(tmp_path, monkeypatch):
    """The exported list, given to diffusers' own DPMSolverMultistepScheduler and to
    StepDropScheduler with set_timesteps(timesteps=...), gives FusedSampler's trajectory."""
    model = SmoothModel()
    sampler = FusedSampler(model, SCHEDULE, solver="dpmpp_2m")
    plan = small(tmp_path, max_evals=8).plan(SCHEDULE, 6, model=model, sampler=sampler)
    timesteps = plan.timesteps[:-1].tolist()
    x = torch.randn(3, *model.sample_shape, generator=gen(5), dtype=torch.float64)
    ours, _ = sampler.sample(x.clone(), timesteps)

    peer = diffusers_scheduler("dpmpp_2m", 6, monkeypatch, timesteps=timesteps)
    assert peer.timesteps.tolist() == timesteps
    torch.testing.assert_close(ours, diffusers_trajectory(peer, model, x), rtol=0, atol=1e-10)

    sched = StepDropScheduler(num_train_timesteps=T, beta_schedule="linear", solver="dpmpp_2m")
    sched.set_timesteps(timesteps=timesteps)
    y = x.clone()
    for t in sched.timesteps:
        y = sched.step(model(y, torch.full((3,), int(t))), t, y).prev_sample
    # on the scheduler's own ᾱ table (diffusers' float32 β linspace, not ours)
    same_table, _ = FusedSampler(model, sched.schedule, solver="dpmpp_2m").sample(x.clone(), timesteps)
    torch.testing.assert_close(y, same_table, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("solver, eta", [("ddpm", 0.0), ("dpmpp_2m_sde", 0.0), ("ddim", 0.5)])
def test_a_stochastic_solver_is_refused_by_name(solver, eta, tmp_path):
    model = GaussianModel()
    sampler = FusedSampler(model, SCHEDULE, solver=solver, eta=eta)
    with pytest.raises(ValueError, match=f"solver '{solver}'.*draws fresh noise.*one of"):
        sampler.sample(2, small(tmp_path), budget=4)


def test_needs_the_sampler(tmp_path):
    with pytest.raises(ValueError, match="sampler"):
        small(tmp_path).plan(SCHEDULE, 4, model=GaussianModel())


@pytest.mark.parametrize("kwargs, name", [({"pilot_batch": 0}, "pilot_batch"), ({"reference_steps": 1}, "reference_steps"),
                                          ({"max_evals": -1}, "max_evals"), ({"seed": -2}, "seed"),
                                          ({"reference_solver": "ddpm"}, "reference_solver"),
                                          ({"reference_solver": "euler"}, "reference_solver")])
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Optimized(**kwargs)


def test_registered_by_name():
    assert isinstance(get_policy("optimized", pilot_batch=2), Optimized)
    assert get_policy("optimized").needs_model


def test_other_schedules(tmp_path):
    schedule = NoiseSchedule.cosine(50)
    model = SmoothModel()
    plan = small(tmp_path, max_evals=6).plan(schedule, 7, model=model, sampler=FusedSampler(model, schedule))
    assert plan.num_train_timesteps == 50 and plan.timesteps[0] == 49 and plan.length == 8


# ----------------------------------------------------------------------------- the command line
def test_optimize_command_then_sample_reuses_it_by_name(tmp_path, monkeypatch, capsys):
    from stepdrop.cli import main
    from test_runs import _tiny_checkpoint

    monkeypatch.setenv("STEPDROP_CACHE", str(tmp_path / "cache"))
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "opt"
    assert main(["optimize", "--checkpoint", str(ckpt), "--budget", "3", "--solver", "unipc", "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    exported = json.load(open(out / "timesteps.json"))
    timesteps = exported["timesteps"]
    assert printed.startswith(f"optimized-3 for unipc: {','.join(map(str, timesteps))}")
    assert exported["search"]["cached"] is False and exported["search"]["search_calls"] > 0
    assert (out / "timesteps.csv").read_text().splitlines()[1:] == [f"{k},{t}" for k, t in enumerate(timesteps)]
    assert (out / "timesteps.png").read_bytes()[:4] == b"\x89PNG"
    # sample's optimized-3 has the same settings: it reads the cache, spends no search call
    assert main(["sample", "--checkpoint", str(ckpt), "--policies", "unipc:optimized-3", "--clip", "0",
                 "--num-samples", "2", "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    run = json.load(open(tmp_path / "s" / "results.json"))["runs"][0]
    assert run["timesteps_row0"] == timesteps and run["overhead_calls"] == 0 and run["model_calls"] == 3
    # a stochastic solver is refused with exit code 2 and the reason
    assert main(["optimize", "--checkpoint", str(ckpt), "--budget", "3", "--solver", "ddpm", "--out", str(out)]) == 2
    assert "draws fresh noise" in capsys.readouterr().err
