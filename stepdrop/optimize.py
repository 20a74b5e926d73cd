"""The ``optimized`` step policy: K timesteps chosen for one model and one solver.

For a model, a deterministic solver and a budget K, it searches the K model-call timesteps
whose samples lie closest, from the same initial noise, to a high-NFE solution of the
probability-flow ODE (default: DPM-Solver++(2M) with 200 log-SNR-uniform calls) on a pilot
batch. Per-model, per-solver schedules are the idea of Align Your Steps (Sabour et al. 2024);
measuring a schedule by the distance of the solver's result to the exact ODE solution is the
objective of Xue et al. 2024 ("Accelerating Diffusion Sampling with Optimized Time Steps",
CVPR). Both papers derive their objective analytically; this module measures it directly on
the model, which needs no assumption about the data and no training (docs/DESIGN.md §4).

The search (deterministic for a seed):

1. The first call stays at T−1 (sampling starts from pure noise, "trailing").
2. Start from the best of the fixed spacings (uniform, quadratic, log-SNR, cosine) on the pilot.
3. Coordinate pattern search on the integer timesteps t_1 … t_{K−1}: try moving one timestep a
   fraction of the way towards either neighbour, keep a move that lowers the distance, halve
   the fraction after a sweep without a gain; stop when one-step moves no longer help or
   ``max_evals`` trajectories have run.
4. Score the start and the result on a held-out batch (other noise), so that a search that only
   fits its pilot shows up in ``plan.info["holdout_mse"]``.

Every model call the search makes is counted: a plan built by a search reports them as
``overhead_calls`` / ``overhead_samples``. The result is cached in a JSON file per (model
fingerprint, solver, K) and the search settings; a plan read from that file spent no calls
(``info["cached"]``; the file keeps what the search cost).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from stepdrop._io import atomic_write_bytes, cache_root
from stepdrop._validation import check_int, model_device_dtype
from stepdrop.checkpoint import model_fingerprint
from stepdrop.plan import StepPlan
from stepdrop.policies import POLICIES, StepPolicy, get_policy
from stepdrop.schedule import NoiseSchedule
from stepdrop.solvers import SOLVERS

__all__ = ["Optimized", "START_SPACINGS", "coordinate_search", "default_cache_dir", "write_timesteps"]

START_SPACINGS = ("uniform", "quadratic", "logsnr", "cosine")
FORMAT = "stepdrop-optimized-timesteps"
VERSION = 1


def default_cache_dir() -> Path:
    """``$STEPDROP_CACHE/timesteps``, default ``~/.cache/stepdrop/timesteps``."""
    return cache_root() / "timesteps"


class Optimized(StepPolicy):
    """Timesteps searched for the sampler that runs them (module docstring).

    The sampler passes itself to :meth:`plan` (``FusedSampler`` does), so the search runs the
    same model, solver, clip and backend as the sampling run.

    Args:
        pilot_batch: samples in the pilot batch (and in the held-out batch).
        reference_solver: a deterministic solver from :data:`stepdrop.solvers.SOLVERS`.
        reference_steps: model calls of the reference solution (log-SNR-uniform spacing; at
            most T).
        max_evals: trajectories the search may run after the start (each costs K calls).
        seed: seeds the pilot noise (the held-out noise uses seed + 1).
        cache_dir: folder of the cache files (default :func:`default_cache_dir`); None there.
        progress: a tqdm bar over the search's trajectories.
    """

    name = "optimized"
    needs_model = True
    needs_deterministic_solver = True

    def __init__(self, pilot_batch: int = 32, reference_solver: str = "dpmpp_2m", reference_steps: int = 200,
                 max_evals: int = 100, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                 progress: bool = True):
        self.pilot_batch = check_int("pilot_batch", pilot_batch, low=1)
        self.reference_solver = _check_deterministic("reference_solver", reference_solver)
        self.reference_steps = check_int("reference_steps", reference_steps, low=2)
        self.max_evals = check_int("max_evals", max_evals, low=0)
        self.seed = check_int("seed", seed, low=0)
        self.cache_dir = default_cache_dir() if cache_dir is None else Path(cache_dir)
        self.progress = bool(progress)

    # ------------------------------------------------------------------ StepPolicy
    def _plan(self, schedule: NoiseSchedule, budget: int, *, sampler=None, sample_shape=None, **kwargs: Any) -> StepPlan:
        if sampler is None:
            raise ValueError("policy 'optimized' tunes its timesteps for the sampler that runs them: use it through "
                             "stepdrop.FusedSampler(...).sample(..., 'optimized', budget=K), or pass sampler=...")
        if sampler.stochastic:
            raise ValueError(
                f"policy 'optimized' matches each sample to a deterministic reference trajectory from the same noise, "
                f"but solver {sampler.solver!r} (eta={sampler.eta}) draws fresh noise at every step; use one of "
                f"{_deterministic_solvers()}")
        shape = tuple(sample_shape if sample_shape is not None else getattr(sampler.model, "sample_shape", ()))
        if not shape:
            raise ValueError("sample_shape is required (the model has no sample_shape attribute)")
        T = schedule.num_timesteps
        if budget == 1:  # one call, at T−1: nothing to choose
            return StepPlan.from_timesteps([T - 1], T, policy=self.name)
        if not isinstance(sampler.model, torch.nn.Module):  # no weights to fingerprint: search, never cache
            return _plan_from(self.search(sampler, schedule, budget, shape), T, cached=False, path=None)
        key = self._key(sampler, schedule, budget, shape)
        path = self.cache_dir / f"{key['model']}-{key['solver']}-{budget}-{_digest(key)}.json"
        found = _read(path, key)
        if found is not None:
            return _plan_from(found, T, cached=True, path=path)
        result = self.search(sampler, schedule, budget, shape)
        result.update(format=FORMAT, version=VERSION, key=key)
        atomic_write_bytes(path, (json.dumps(result, indent=1) + "\n").encode())
        return _plan_from(result, T, cached=False, path=path)

    def _key(self, sampler, schedule: NoiseSchedule, budget: int, shape: tuple[int, ...]) -> dict[str, Any]:
        table = schedule.alphas_cumprod.detach().to("cpu", torch.float64).contiguous()
        return dict(model=model_fingerprint(sampler.model), schedule=hashlib.sha1(table.numpy().tobytes()).hexdigest()[:16],
                    prediction_type=sampler.prediction_type, solver=sampler.solver, eta=sampler.eta, clip=sampler.clip,
                    budget=budget, sample_shape=list(shape), pilot_batch=self.pilot_batch,
                    reference=f"{self.reference_solver}:logsnr-{self.reference_steps}", max_evals=self.max_evals,
                    seed=self.seed)

    # ------------------------------------------------------------------ the search
    def search(self, sampler, schedule: NoiseSchedule, budget: int, shape: tuple[int, ...]) -> dict[str, Any]:
        """Run the search (no cache); returns the record a cache file holds."""
        from stepdrop.sampler import FusedSampler  # the sampler imports the policies

        def runner(solver) -> FusedSampler:  # a name, or the sampler's own Solver object (its η built in)
            return FusedSampler(sampler.model, schedule, solver=solver, clip=sampler.clip, backend=sampler.backend,
                                prediction_type=sampler.prediction_type)

        device, _ = model_device_dtype(sampler.model)
        started = time.perf_counter()
        spent = {"calls": 0, "samples": 0}
        target, reference = runner(sampler._solver), runner(self.reference_solver)

        def run(who: FusedSampler, x_T: Tensor, plan) -> Tensor:
            kwargs = {} if isinstance(plan, list) else {"budget": min(self.reference_steps, schedule.num_timesteps)}
            out, stats = who.sample(x_T, plan, **kwargs)
            spent["calls"] += stats.model_calls
            spent["samples"] += stats.evaluated_samples
            return out.double()

        def noise(seed: int) -> Tensor:
            gen = torch.Generator().manual_seed(seed)
            return torch.randn((self.pilot_batch, *shape), generator=gen).to(device)

        pilot, holdout = noise(self.seed), noise(self.seed + 1)
        pilot_ref = run(reference, pilot, "logsnr")

        def mse(ts: list[int], x_T: Tensor = pilot, ref: Tensor = pilot_ref) -> float:
            return float((run(target, x_T, ts) - ref).pow(2).mean())

        starts = {name: [int(v) for v in get_policy(name).plan(schedule, budget).timesteps[:-1]] for name in START_SPACINGS}
        start_mse = {name: mse(ts) for name, ts in starts.items()}
        start_name = min(START_SPACINGS, key=lambda name: start_mse[name])
        best, evals = coordinate_search(lambda ts: mse(ts), starts[start_name], start_mse[start_name],
                                        self.max_evals, progress=self.progress)
        holdout_ref = run(reference, holdout, "logsnr")
        holdout_mse = {"start": mse(starts[start_name], holdout, holdout_ref), "optimized": mse(best[0], holdout, holdout_ref)}
        return dict(timesteps=best[0], pilot_mse={"start": start_mse[start_name], "optimized": best[1]},
                    holdout_mse=holdout_mse, start=start_name, start_mse=start_mse, evaluations=evals,
                    search_calls=spent["calls"], search_samples=spent["samples"],
                    search_seconds=round(time.perf_counter() - started, 3))


def coordinate_search(loss: Callable[[list[int]], float], start: list[int], start_loss: float, max_evals: int,
                      progress: bool = False) -> tuple[tuple[list[int], float], int]:
    """Minimise ``loss`` over strictly decreasing integer timesteps with the first one fixed
    (step 3 of the module docstring); returns ((timesteps, loss), trajectories evaluated)."""
    ts, best = list(start), start_loss
    fraction, evals = 0.5, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_evals, desc=f"optimized-{len(ts)}", unit="traj", leave=False)
    try:
        while evals < max_evals:
            improved, smallest = False, True
            for i in range(1, len(ts)):
                upper = ts[i - 1] - 1
                lower = ts[i + 1] + 1 if i + 1 < len(ts) else 0
                for room, sign in ((upper - ts[i], 1), (ts[i] - lower, -1)):
                    if room < 1 or evals >= max_evals:
                        continue
                    move = max(1, int(round(fraction * room)))
                    smallest &= move == 1
                    candidate = ts[:i] + [ts[i] + sign * move] + ts[i + 1:]
                    value = loss(candidate)
                    evals += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(mse=f"{min(best, value):.3g}")
                    if value < best:
                        ts, best, improved = candidate, value, True
                        break
            if not improved:
                if smallest:
                    break  # no one-step move helps: a local minimum on the integer grid
                fraction /= 2
    finally:
        if bar is not None:
            bar.close()
    return (ts, best), evals


# ---------------------------------------------------------------------- export
def write_timesteps(plan: StepPlan, out: str | os.PathLike, meta: dict[str, Any] | None = None) -> list[Path]:
    """``timesteps.json`` (the list, the search record and ``meta``), ``timesteps.csv`` (call,
    timestep, log-SNR) and ``timesteps.png`` (the list against the fixed spacings), atomically."""
    from stepdrop.plots import new_figure, save_png

    out = Path(out)
    T = plan.num_train_timesteps
    ts = [int(v) for v in plan.timesteps[:-1]]
    payload = {"timesteps": ts, "num_train_timesteps": T, "policy": plan.policy, "search": plan.info, "meta": meta or {}}
    paths = [atomic_write_bytes(out / "timesteps.json", (json.dumps(payload, indent=1) + "\n").encode())]
    rows = "".join(f"{k},{t}\n" for k, t in enumerate(ts))
    paths.append(atomic_write_bytes(out / "timesteps.csv", ("call,timestep\n" + rows).encode()))
    fig = new_figure(5.5, 3.6)
    ax = fig.add_subplot()
    for name in START_SPACINGS:
        fixed = get_policy(name).plan(NoiseSchedule.linear(T), len(ts)).timesteps[:-1].tolist()
        ax.plot(range(len(ts)), fixed, marker=".", lw=0.8, alpha=0.6, label=name)
    ax.plot(range(len(ts)), ts, marker="o", lw=2, color="k", label="optimized")
    ax.set(xlabel="model call", ylabel="timestep t", title=f"optimized-{len(ts)}")
    ax.legend(fontsize=7)
    paths.append(save_png(fig, out / "timesteps.png"))
    return paths


# ---------------------------------------------------------------------- cache files
def _plan_from(record: dict[str, Any], T: int, *, cached: bool, path: Path | None) -> StepPlan:
    info = {k: record[k] for k in ("pilot_mse", "holdout_mse", "start", "evaluations", "search_calls",
                                   "search_samples", "search_seconds")}
    info.update(cached=cached, cache_file=None if path is None else str(path))
    calls, samples = (0, 0) if cached else (record["search_calls"], record["search_samples"])
    timesteps = StepPlan.from_timesteps(record["timesteps"], T).timesteps  # validated, CLEAN appended
    return StepPlan(timesteps, T, policy="optimized", overhead_calls=calls, overhead_samples=samples, info=info)


def _read(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached record for ``key``, or None (absent, unreadable or stale: searched again)."""
    try:
        record = json.loads(path.read_text())
        ok = record.get("format") == FORMAT and record.get("version") == VERSION and record.get("key") == key
        return record if ok and len(record["timesteps"]) == key["budget"] else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def _deterministic_solvers() -> tuple[str, ...]:
    from stepdrop.solvers import get_solver

    return tuple(name for name in SOLVERS if not get_solver(name).stochastic)


def _check_deterministic(name: str, solver: str) -> str:
    allowed = _deterministic_solvers()
    if solver not in allowed:
        raise ValueError(f"{name} must be a deterministic solver, one of {allowed}, got {solver!r}")
    return solver


POLICIES["optimized"] = Optimized
