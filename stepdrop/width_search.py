"""The width search of DDSM (Wang et al. 2024, "Denoising Diffusion Step-aware Models", sec.
3.3): an evolutionary search for the width of every model call of a plan, on a slimmable
network (docs/DESIGN.md §4c).

The genome is one width per call (or per band of consecutive calls, to keep a long plan's
genome small). Fitness = FID (or KID×1e3) of ``num_samples`` images from fixed seeds against
cached reference features, + λ × GFLOPs per sample (counted per call variant), lower is
better: the FLOPs are a soft penalty, not a bound, as in the paper. The first population holds
every uniform-width individual plus random ones; each generation keeps the better half and
fills the rest with uniform crossover and per-gene mutation of random parents, duplicates
removed. Everything random comes from one ``torch.Generator`` seeded by ``seed``, and the
images of an individual from seeds fixed per batch, so a search is deterministic.

Resumable: ``<out>/search_state.json`` is written atomically after every evaluation (fitness
cache) and every generation (population, generator state), so a killed search loses at most
one individual. The search's own cost (model calls, sample evaluations, wall time) is
recorded apart and never counted into the sampling cost of the schedule it finds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from stepdrop._io import atomic_write_bytes
from stepdrop._validation import check_choice, check_float, check_int, model_device_dtype
from stepdrop.cost import gflops_per_variant
from stepdrop.policies import get_policy
from stepdrop.sampler import FusedSampler
from stepdrop.schedule import NoiseSchedule
from stepdrop.variants import CallPlan, Widths, width_schedule_path

__all__ = ["WidthSearch", "check_slimmable", "expand_bands", "search_widths", "width_schedule_path"]

METRICS = ("fid", "kid")


@dataclass(frozen=True)
class WidthSearch:
    """The search's settings (``stepdrop search-widths --help`` explains each)."""

    solver: str = "ddim"
    policy: str = "uniform"
    budget: int = 25
    clip: float | None = None
    metric: str = "fid"
    num_samples: int = 256
    batch_size: int = 128
    lam: float = 0.1  # fitness per GFLOP per sample
    population: int = 12
    generations: int = 5
    mutation: float = 0.2
    bands: int | None = None  # genes; None: one per call
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("budget", self.budget, low=1)
        check_choice("metric", self.metric, METRICS)
        check_int("num_samples", self.num_samples, low=2)
        check_int("batch_size", self.batch_size, low=1)
        check_float("lam", self.lam, low=0.0)
        check_int("population", self.population, low=2)
        check_int("generations", self.generations, low=1)
        check_float("mutation", self.mutation, low=0.0, high=1.0)
        check_int("seed", self.seed, low=0)
        if self.bands is not None:
            check_int("bands", self.bands, low=1, high=self.budget)

    @property
    def genes(self) -> int:
        return self.bands or self.budget


def check_slimmable(model) -> tuple[float, ...]:
    """The widths of a slimmable model; ValueError naming what is missing otherwise."""
    widths = tuple(getattr(model, "widths", ()) or ())
    CallPlan(width=Widths(widths or (1.0,))).check_model(model, getattr(model, "sample_shape", (1, 1, 1)))
    return widths


def expand_bands(genome: tuple[float, ...], calls: int) -> tuple[float, ...]:
    """Per-call widths from a genome of one width per band of consecutive calls (band b covers
    calls ⌊b·K/G⌋ … ⌊(b+1)·K/G⌋ − 1)."""
    G = len(genome)
    return tuple(genome[min(G - 1, k * G // calls)] for k in range(calls))


def search_widths(model, schedule: NoiseSchedule, search: WidthSearch, reference: Tensor, out: str | Path, *,
                  extractor: str | None = None, name: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) the search into ``out``; returns the result written to ``widths.json``
    and to the named schedule (:func:`width_schedule_path`), default name
    ``<solver>-<policy>-<budget>``. ``reference``: the reference set's Inception features, from
    ``extractor`` (default :func:`stepdrop.metrics.default_extractor`), which the samples use too."""
    import hashlib

    from stepdrop import metrics
    from stepdrop.checkpoint import model_fingerprint

    out = Path(out)
    widths = check_slimmable(model)
    extractor = extractor or metrics.default_extractor()
    columns = _plan_columns(search, schedule)
    # a resumed search must be the same search: settings, weights and reference features
    settings = dict(asdict(search), model=model_fingerprint(model), extractor=extractor,
                    reference=hashlib.sha1(reference.numpy().tobytes()).hexdigest()[:16])
    state_path = out / "search_state.json"
    state = _load_state(state_path, settings, log)
    rng = torch.Generator().manual_seed(search.seed)
    if state["rng"] is not None:
        rng.set_state(torch.tensor(state["rng"], dtype=torch.uint8))
    if not state["population"]:
        state["population"] = _first_population(widths, search, rng)
    sampler_noise = torch.Generator().manual_seed(search.seed + 1)
    noise = torch.randn((search.num_samples, *model.sample_shape), generator=sampler_noise)

    def evaluate(genome: tuple[float, ...]) -> dict[str, Any]:
        calls = CallPlan(width=Widths(expand_bands(genome, columns)))
        sampler = FusedSampler(model, schedule, solver=search.solver, clip=search.clip, calls=calls)
        images, used, start = [], {}, time.perf_counter()
        model_calls = evaluated = 0
        for i in range(0, search.num_samples, search.batch_size):
            x, stats = sampler.sample(noise[i:i + search.batch_size].to(model_device_dtype(model)[0]), search.policy,
                                      budget=search.budget, generator=torch.Generator().manual_seed(search.seed + 2 + i))
            images.append(metrics.to_uint8(x.cpu()))
            for label, n in stats.calls_by_variant().items():
                used[label] = used.get(label, 0) + int(n.sum())
            model_calls += stats.model_calls
            evaluated += int(stats.nfe.sum())
        features = metrics.extract_features(torch.cat(images), extractor=extractor)
        per_call = gflops_per_variant(model, calls)
        gflops = sum(per_call[label] * n for label, n in used.items()) / search.num_samples
        if search.metric == "fid":
            quality = metrics.fid(features, reference)
        else:
            quality = 1e3 * metrics.kid(features, reference, subsets=50, subset_size=min(1000, len(features)),
                                        seed=search.seed)[0]
        return dict(genome=list(genome), quality=quality, gflops=gflops, fitness=quality + search.lam * gflops,
                    model_calls=model_calls, sample_evaluations=evaluated, seconds=time.perf_counter() - start)

    bar = _bar(progress, search.generations * search.population, state["generation"] * search.population)
    while state["generation"] < search.generations:
        for genome in state["population"]:  # the parents kept from the last generation are scored already
            key = _key(genome)
            if key not in state["evaluated"]:
                state["evaluated"][key] = evaluate(tuple(genome))
                _save_state(state_path, state, rng)
            if bar is not None:
                bar.update(1)
        ranked = sorted(state["population"], key=lambda g: state["evaluated"][_key(g)]["fitness"])
        best = state["evaluated"][_key(ranked[0])]
        state["history"].append(dict(generation=state["generation"], best=best["genome"],
                                     best_fitness=best["fitness"], best_quality=best["quality"],
                                     best_gflops=best["gflops"],
                                     mean_fitness=sum(state["evaluated"][_key(g)]["fitness"] for g in ranked) / len(ranked)))
        log(f"generation {state['generation']}: best fitness {best['fitness']:.3f} ({search.metric} "
            f"{best['quality']:.3f}, {best['gflops']:.3f} GFLOPs/sample) {_key(best['genome'])}")
        state["generation"] += 1
        if state["generation"] < search.generations:
            state["population"] = _next_population(ranked, widths, search, rng)
        _save_state(state_path, state, rng)
    if bar is not None:
        bar.close()
    return _write_result(state, search, columns, widths, out, name or f"{search.solver}-{search.policy}-{search.budget}")


def _plan_columns(search: WidthSearch, schedule: NoiseSchedule) -> int:
    """Calls per sample of the searched plan; ValueError for a policy whose plan is not one fixed
    list of K timesteps (online, per-sample or random-per-batch plans, plans that probe a model)."""
    from stepdrop.policies import OnlinePolicy

    policy = get_policy(search.policy)
    if isinstance(policy, OnlinePolicy):
        raise ValueError(f"policy {search.policy!r} picks its steps online: a width per call needs a fixed plan")
    try:
        plans = [policy.plan(schedule, search.budget, batch_size=2, generator=torch.Generator().manual_seed(s))
                 for s in (0, 1)]
    except ValueError as exc:
        raise ValueError(f"policy {search.policy!r} cannot be width-searched here: {exc}") from None
    if plans[0].per_sample or not torch.equal(plans[0].timesteps, plans[1].timesteps):
        raise ValueError(f"policy {search.policy!r} draws its plans at random: a width per call needs one fixed plan; "
                         f"use a deterministic spacing (uniform, quadratic, logsnr, cosine, …)")
    return plans[0].length - 1


def _first_population(widths: tuple[float, ...], search: WidthSearch, rng: torch.Generator) -> list[list[float]]:
    population = [[w] * search.genes for w in widths][: search.population]
    for _ in range(100 * search.population):  # fewer distinct genomes may exist than asked for: a bound
        if len(population) >= search.population:
            break
        genome = [widths[int(i)] for i in torch.randint(0, len(widths), (search.genes,), generator=rng)]
        if genome not in population:
            population.append(genome)
    return population


def _next_population(ranked: list[list[float]], widths: tuple[float, ...], search: WidthSearch,
                     rng: torch.Generator) -> list[list[float]]:
    parents = ranked[: max(2, search.population // 2)]
    population = [list(g) for g in parents]
    for _ in range(100 * search.population):  # duplicates are redrawn; a bound, not a loop forever
        if len(population) >= search.population:
            break
        a, b = (parents[int(i)] for i in torch.randint(0, len(parents), (2,), generator=rng))
        pick = torch.rand(search.genes, generator=rng) < 0.5
        mutate = torch.rand(search.genes, generator=rng) < search.mutation
        fresh = torch.randint(0, len(widths), (search.genes,), generator=rng)
        child = [widths[int(fresh[i])] if mutate[i] else (a[i] if pick[i] else b[i]) for i in range(search.genes)]
        if child not in population:
            population.append(child)
    return population


def _write_result(state: dict[str, Any], search: WidthSearch, columns: int, widths: tuple[float, ...], out: Path,
                  name: str) -> dict[str, Any]:
    from stepdrop.plots import new_figure, save_png

    evaluated = state["evaluated"].values()
    best = min(evaluated, key=lambda r: r["fitness"])
    uniform = {f"{w:g}": state["evaluated"].get(_key([w] * search.genes)) for w in widths}
    cost = {k: sum(r[k] for r in evaluated) for k in ("model_calls", "sample_evaluations", "seconds")}
    result = dict(name=name, widths=list(expand_bands(tuple(best["genome"]), columns)), genome=best["genome"],
                  fitness=best["fitness"], quality=best["quality"], metric=search.metric, gflops=best["gflops"],
                  uniform={k: (None if r is None else dict(quality=r["quality"], gflops=r["gflops"]))
                           for k, r in uniform.items()},
                  search=dict(asdict(search), individuals=len(state["evaluated"]), cost=cost,
                              note="the search's own cost; never counted into the schedule's sampling cost"),
                  history=state["history"])
    payload = (json.dumps(result, indent=1) + "\n").encode()
    atomic_write_bytes(out / "widths.json", payload)
    atomic_write_bytes(width_schedule_path(name), payload)
    rows = "".join(f"{h['generation']},{h['best_fitness']:.6g},{h['best_quality']:.6g},{h['best_gflops']:.6g},"
                   f"{h['mean_fitness']:.6g}\n" for h in state["history"])
    atomic_write_bytes(out / "generations.csv",
                       ("generation,best_fitness,best_quality,best_gflops,mean_fitness\n" + rows).encode())
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    ax.step(range(columns), result["widths"], where="mid", color="k", lw=2, label=f"searched ({name})")
    ax.set(xlabel="model call (noise → data)", ylabel="width", ylim=(0, 1.05),
           title=f"width per call: {search.metric} {best['quality']:.2f}, {best['gflops']:.2f} GFLOPs/sample")
    ax.legend(fontsize=7)
    save_png(fig, out / "widths.png")
    return result


def _key(genome) -> str:
    return ",".join(f"{w:g}" for w in genome)


def _load_state(path: Path, settings: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    fresh = dict(settings=settings, generation=0, population=[], evaluated={}, history=[], rng=None)
    if not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        log(f"{path} cannot be read: starting the search afresh")
        return fresh
    if not isinstance(state, dict) or state.get("settings") != settings:
        raise ValueError(f"{path} holds a search with other settings ({state.get('settings') if isinstance(state, dict) else None}); "
                         f"use another --out, or the same settings to resume it")
    return state


def _save_state(path: Path, state: dict[str, Any], rng: torch.Generator) -> None:
    state["rng"] = rng.get_state().tolist()
    atomic_write_bytes(path, json.dumps(state).encode())


def _bar(progress: bool, total: int, done: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(done, total), desc="width search", unit="individual")
