"""``stepdrop compare``: sample a grid of policies × budgets × solvers from one model with the
same seeds, measure quality and cost, and write a report with plots.

Every cell ``[solver:]policy-budget`` draws ``num_samples`` images in batches of
``batch_size``; batch i of every cell starts from the same initial noise x_T (seeded by
(seed, i)) and uses its own generator, seeded the same way, for plans and per-step noise. A
cell records its counted NFE (per sample), pilot calls, the wall time of the sampler calls
(plan construction with any pilot run, and the loop; device synchronised, no I/O), images/s
(from the median batch), peak GPU memory, the realised timesteps, then FID with a bootstrap
interval, KID, precision/recall against a cached reference feature set, and the in-domain
classifier score (Fashion-MNIST). GFLOPs per sample = Σ over call variants (full, reduced
resolution, shallow: :mod:`stepdrop.variants`) of GFLOPs per call × counted calls.

Resumable: each finished cell is stored atomically in ``<out>/cells/<label>.pt`` and never
recomputed for the same settings — the same model weights (a content hash, wherever the file
lives), seed, batch size, clip, T, device (with the CPU thread count), backend and CUDA-graph
setting, since images/s and peak memory belong to them; its metrics are recomputed alone when
the reference features or metric settings change. A cell in progress is checkpointed after every batch
(``<label>.partial.pt``), so an interrupted run loses at most one batch. A cell file made with
other settings, or one that cannot be read, is renamed aside (``.set-aside-<time>.pt``) and
redone, never overwritten (:mod:`stepdrop.cells`). The report (``report.json``, ``report.csv``,
``report.md``: :mod:`stepdrop.tables`; PNG plots: :mod:`stepdrop.plots`) is rewritten after
every cell, so a long run shows its progress.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import math
import platform
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from stepdrop._io import ensure_writable_folder
from stepdrop import plots, tables
from stepdrop import shards
from stepdrop.cells import batch_seeds, load as _load, load_matching as _load_matching, safe_name as _safe, save as _save
from stepdrop.checkpoint import model_fingerprint
from stepdrop._validation import check_choice, check_int, model_device_dtype
from stepdrop.compiled import COMPILE_MODES, compile_model
from stepdrop.distributed import Group
from stepdrop.image_files import cell_targets, save_cell
from stepdrop.cost import PeakMemory, gflops_per_call, gflops_per_variant
from stepdrop.solvers import SOLVERS, get_solver
from stepdrop.policies import POLICIES, OnlinePolicy, get_policy
from stepdrop.runs import RunSpec, parse_spec
from stepdrop.loop import clock as _clock
from stepdrop.sampler import FusedSampler
from stepdrop.schedule import NoiseSchedule

__all__ = ["CompareConfig", "QUICK", "FULL", "cell_specs", "run_compare"]


@dataclass
class CompareConfig:
    """Settings of a comparison (``stepdrop compare --help`` explains each)."""

    policies: tuple[str, ...] = ("uniform", "quadratic", "logsnr", "stepdrop")
    budgets: tuple[int, ...] = (10, 20, 25, 50)
    solvers: tuple[str, ...] = ("ddim",)
    cells: tuple[str, ...] = ()
    references: tuple[str, ...] = ("ddim-100", "ddpm-1000")
    num_samples: int = 2000
    batch_size: int = 100
    seed: int = 0
    clip: float | None = 1.0
    backend: str = "auto"
    cuda_graph: bool = False
    compile: str = "none"
    dataset: str = "fashion-mnist"
    ref_split: str = "test"
    ref_samples: int = 10000
    extractor: str | None = None
    bootstrap: int = 100
    kid_subsets: int = 100
    grid_samples: int = 8
    film_samples: int = 4
    film_label: str | None = None
    cache_dir: str | None = None
    data_root: str | None = None

    def __post_init__(self) -> None:
        for name in ("policies", "budgets", "solvers", "cells", "references"):
            setattr(self, name, tuple(getattr(self, name)))
        for name in ("cells", "references"):  # specs, as a comma list with spaces gives them
            setattr(self, name, tuple(spec.strip() for spec in getattr(self, name) if spec.strip()))
        for p in self.policies:
            check_choice("policies", p, tuple(POLICIES))
        for s in self.solvers:
            check_choice("solvers", s, SOLVERS)
        check_choice("compile", self.compile, COMPILE_MODES)
        for b in self.budgets:
            check_int("budgets", b, low=1)
        for r in self.cells + self.references:
            parse_spec(r)
        check_int("num_samples", self.num_samples, low=2)
        check_int("seed", self.seed, low=0, high=2**39 - 1)  # batch seeds are (seed << 24) + 2i, within 64 bits
        check_int("batch_size", self.batch_size, low=1)
        check_int("ref_samples", self.ref_samples, low=2)
        check_int("bootstrap", self.bootstrap, low=0)
        if self.bootstrap == 1:
            raise ValueError("bootstrap must be 0 (no interval) or >= 2 resamples, got 1")
        check_int("kid_subsets", self.kid_subsets, low=1)
        check_int("grid_samples", self.grid_samples, low=0)
        check_int("film_samples", self.film_samples, low=0, high=4)
        if not (self.policies and self.budgets and self.solvers) and not self.cells and not self.references:
            raise ValueError("the grid is empty: give policies, budgets and solvers, cells, or references")
        specs = cell_specs(self)  # also refuses a cell named twice
        for spec in specs:
            if spec.num_samples is not None and spec.num_samples < 2:
                raise ValueError(f"cell {spec.label!r}: @num_samples must be >= 2 (FID needs two samples), "
                                 f"got {spec.num_samples}")
        labels = [spec.label for spec in specs]
        if self.film_label is not None and self.film_label not in labels:
            raise ValueError(f"film_label (--film) must be a cell of the grid, one of {labels}, "
                             f"got {self.film_label!r}")


QUICK = dict(policies=("uniform", "quadratic", "stepdrop"), num_samples=100, ref_samples=500, bootstrap=20,
             kid_subsets=20, references=("ddim-100", "ddpm-1000@8"))
"""``--quick``: the whole pipeline in under 15 minutes on 2 CPU cores (measured: 14 min 33 s
on a quiet 2-core EPYC with DDPM-1000 on 16 samples, reference features included; 8 now). FID
at 100 samples is heavily biased and only good for spotting gross differences."""

FULL = dict(num_samples=10000, batch_size=250)
"""``--full``: ≥ 10k samples per cell, for a GPU."""


def cell_specs(config: CompareConfig) -> list[RunSpec]:
    """The grid (budget-major, so every budget gets all policies early in a long run), the extra
    cells (ranked with the grid: for comparisons that are not a full product), then the references."""
    grid = [RunSpec.of(solver, policy, budget) for budget in config.budgets for policy in config.policies
            for solver in config.solvers]
    specs = grid + [parse_spec(c) for c in config.cells] + [parse_spec(r) for r in config.references]
    seen: dict[tuple, str] = {}
    for spec in specs:  # "ddim-25" and "ddim:uniform-25" are one run
        run = (spec.solver, spec.policy, spec.budget, spec.calls, spec.num_samples)
        if run in seen:
            raise ValueError(f"the grid names a cell twice: {seen[run]!r} and {spec.label!r}")
        seen[run] = spec.label
    return specs


def _batch_generators(seed: int, index: int) -> tuple[torch.Generator, torch.Generator]:
    """(initial-noise generator, plan/step-noise generator) of batch ``index``."""
    noise, plan = batch_seeds(seed, index)
    return torch.Generator().manual_seed(noise), torch.Generator().manual_seed(plan)


# ----------------------------------------------------------------------------- sampling
def _sample_cell(model, schedule, spec: RunSpec, n: int, config: CompareConfig, device: torch.device,
                 cells_dir: Path, key: dict[str, Any], progress: bool, log: Callable[[str], None] = print,
                 group: Group = Group()) -> dict[str, Any] | None:
    """Sample this rank's batches of one cell that are not done yet, each stored as it finishes
    (:mod:`stepdrop.shards`); then, on rank 0, the cell's merged state (None on the others)."""
    from stepdrop.metrics import to_uint8

    T = schedule.num_timesteps
    shape = tuple(model.sample_shape)
    start_shape = spec.call_plan.start_shape(shape)  # x_T's size: smaller under mixres
    folder = shards.batch_dir(cells_dir, _safe(spec.label))
    batches = math.ceil(n / config.batch_size)
    legacy = cells_dir / f"{_safe(spec.label)}.partial.pt"
    # rank 0 converts a legacy partial and sets foreign or damaged batch files aside before the
    # others look, so no two ranks rename the same file; then each reads what is done
    done = shards.done_batches(folder, legacy, key, log, convert=True) if group.main else None
    group.barrier(f"resuming cell {spec.label}")
    if done is None:
        done = shards.done_batches(folder, legacy, key, log, convert=False)
    mine = [i for i in group.shard(range(batches)) if i not in done]
    bar = None
    if progress and group.main:  # the whole job's progress, counted from the batch files
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=min(n, len(done) * config.batch_size), desc=spec.label, unit="img", leave=False)
    if mine:
        sampler = FusedSampler(model, schedule, solver=spec.solver, clip=config.clip, backend=config.backend,
                               cuda_graph=config.cuda_graph, calls=spec.calls)
        policy = get_policy(spec.policy)
        _warm_up(sampler, policy, spec, min(config.batch_size, n), start_shape, device, config.cuda_graph)
    for i in mine:
        size = min(config.batch_size, n - i * config.batch_size)
        noise_gen, step_gen = _batch_generators(config.seed, i)
        x_T = torch.randn((size, *start_shape), generator=noise_gen).to(device)
        with PeakMemory(device) as peak:
            start = _clock(device)
            images, stats = sampler.sample(x_T, policy, budget=spec.budget, generator=step_gen)
            # the whole call: plan (pilot runs too) + loop; a CUDA graph captured for a plan length
            # first drawn in this batch is a one-time cost, not sampling, and is left out
            elapsed = _clock(device) - start - stats.info.get("cuda_graph", {}).get("capture_s", 0.0)
        record = shards.new_state(key, shape, T)
        shards.add_batch(record, to_uint8(images.cpu()), stats, elapsed, peak.megabytes)
        shards.save_batch(record, folder, i)
        if bar is not None:
            bar.n = min(n, len(shards.batch_files(folder)) * config.batch_size)
            bar.refresh()
    group.barrier(f"sampling cell {spec.label}")
    if bar is not None:
        bar.close()
    if not group.main:
        return None
    return shards.merge(folder, key, batches, shape, T, log)


def _warm_up(sampler, policy, spec: RunSpec, size: int, start_shape, device, cuda_graph: bool) -> None:
    """One untimed run at the timed batch size (allocator, thread pools); a CUDA graph is
    captured here for the cell's own plan length, so no capture falls in a timed batch."""
    warm = torch.randn(size, *start_shape, device=device)
    if cuda_graph:
        sampler.sample(warm, policy, budget=spec.budget, generator=torch.Generator().manual_seed(0))
    elif spec.call_plan.width is not None and len(spec.call_plan.width.widths) > 1:
        # a width per call fits the cell's own plan length only
        sampler.sample(warm[:2], policy, budget=spec.budget, generator=torch.Generator().manual_seed(0))
    else:
        sampler.sample(warm, "uniform", budget=1 if spec.call_plan.mixres is None else 2)


def _film(model, schedule, spec: RunSpec, config: CompareConfig, device: torch.device) -> list[tuple[int, Tensor]]:
    """The state x after every step for the first ``film_samples`` samples of batch 0 (a state at
    a reduced resolution is shown enlarged to the full size, nearest-neighbour)."""
    noise_gen, step_gen = _batch_generators(config.seed, 0)
    shape = tuple(model.sample_shape)
    start = spec.call_plan.start_shape(shape)
    x_T = torch.randn((config.batch_size, *start), generator=noise_gen)[: config.film_samples].to(device)
    states: list[Tensor] = []
    sampler = FusedSampler(model, schedule, solver=spec.solver, clip=config.clip, backend=config.backend,
                           calls=spec.calls)

    def keep(k, t, x):
        x = x.detach().float().cpu()
        states.append(torch.nn.functional.interpolate(x, size=shape[1:]) if x.shape[1:] != shape else x.clone())

    _, stats = sampler.sample(x_T, get_policy(spec.policy), budget=spec.budget, generator=step_gen, callback=keep)
    after = stats.timesteps[0, 1:].tolist()  # the timestep each frame has reached (−1: clean)
    return [(int(t), x) for t, x in zip(after, states)]


# ----------------------------------------------------------------------------- evaluation
FEATURE_BATCH = 64
"""Images per Inception pass; under torchrun rank r extracts passes j ≡ r (mod world), the same
passes a single process makes, so the features are the same."""


def _feature_layers(images: Tensor, extractor: str, device: torch.device, progress: bool,
                    group: Group) -> tuple[Tensor, ...] | None:
    """The FID features (and Inception logits where the extractor has them) of ``images``; under
    torchrun each rank computes its share of the passes and rank 0 gets them all (None elsewhere)."""
    from stepdrop import metrics

    # IS needs the classifier head that only inception-v3-compat has; one pass gives both layers
    layers = (metrics.FEATURE_LAYER,) + (("logits_unbiased",) if extractor == metrics.COMPAT_EXTRACTOR else ())
    if group.world == 1:
        return metrics.extract_feature_layers(images, layers, extractor=extractor, device=device,
                                              batch_size=FEATURE_BATCH, progress=progress)
    passes = group.shard(range(math.ceil(images.shape[0] / FEATURE_BATCH)))
    mine = {j: metrics.extract_feature_layers(images[j * FEATURE_BATCH:(j + 1) * FEATURE_BATCH], layers,
                                              extractor=extractor, device=device, batch_size=FEATURE_BATCH)
            for j in passes}
    everyone = group.all_gather(mine, "the Inception features")
    if not group.main:
        return None
    merged = {j: tensors for part in everyone for j, tensors in part.items()}
    return tuple(torch.cat([merged[j][k] for j in sorted(merged)]) for k in range(len(layers)))


def _evaluate(images: Tensor, layers: tuple[Tensor, ...], reference: Tensor, config: CompareConfig,
              classifier: torch.nn.Module | None) -> dict[str, Any]:
    from stepdrop import metrics

    features, *logits = layers
    n = features.shape[0]
    out: dict[str, Any] = {"fid": metrics.fid(features, reference), "fid_ci": None}
    out["inception_score"], out["inception_score_std"] = (
        metrics.inception_score(logits[0], splits=min(10, n)) if logits else (None, None))
    if config.bootstrap:
        out["fid_ci"] = list(metrics.fid_bootstrap(features, reference, resamples=config.bootstrap, seed=config.seed))
    out["kid"], out["kid_std"] = metrics.kid(features, reference, subsets=config.kid_subsets,
                                            subset_size=min(1000, n, reference.shape[0]), seed=config.seed)
    if n > 3 and reference.shape[0] > 3:
        out["precision"], out["recall"] = metrics.precision_recall(features, reference[:n])
    else:
        out["precision"] = out["recall"] = None
    out["classifier_score"] = None
    if classifier is not None:
        from stepdrop.classifier import classifier_score, predict_probs

        out["classifier_score"] = classifier_score(predict_probs(classifier, images.float() / 127.5 - 1))
    return out


def _cell_row(spec: RunSpec, n: int, state: dict[str, Any], gflops: dict[str, float], config: CompareConfig,
              sampler_eta: float) -> dict[str, Any]:
    """The report row of a cell; ``gflops``: GFLOPs per call of each call variant, by label."""
    nfe = state["nfe"].double()
    overhead_per_sample = state["overhead_samples"] / n
    full = gflops["full"]
    # cells stored before call variants were counted made full calls only
    calls = state.get("calls_by_variant") or {"full": int(state["nfe"].sum())}
    evaluated = state.get("evaluated_by_variant") or {"full": state["evaluated_samples"]}
    return dict(
        label=spec.label, solver=spec.solver, policy=spec.policy, budget=spec.budget, eta=sampler_eta,
        calls=spec.calls, calls_by_variant={label: count / n for label, count in calls.items()},
        widths=list(spec.call_plan.width.per_column(spec.budget)) if spec.call_plan.width is not None else None,
        reference=spec.label in config.references, num_samples=n, seed=config.seed, batch_size=config.batch_size,
        nfe_mean=float(nfe.mean()), nfe_min=int(state["nfe"].min()), nfe_max=int(state["nfe"].max()),
        overhead_calls=int(state["overhead_calls"]), overhead_samples=int(state["overhead_samples"]),
        model_calls=int(state["model_calls"]),
        gflops_per_sample=sum(gflops[label] * count for label, count in calls.items()) / n + full * overhead_per_sample,
        evaluated_gflops_per_sample=(sum(gflops[label] * count for label, count in evaluated.items())
                                     + full * state["overhead_samples"]) / n,
        images_per_second=_images_per_second(n, state), wall_time_s=state["wall"],
        peak_memory_mb=state["peak_mb"], timesteps=state["timesteps"],
        per_sample_plans=state.get("per_sample_plans"), timestep_histogram=state["histogram"].tolist(),
    )


def _images_per_second(n: int, state: dict[str, Any]) -> float | None:
    """Images/s from the median batch (seconds per image): a load spike or a suspended
    process in one batch does not move it. Cells stored before per-batch times were kept
    fall back to all images ÷ the summed time."""
    batches = state.get("batch_seconds") or []
    if batches:
        return 1.0 / statistics.median(seconds / size for size, seconds in batches)
    return n / state["wall"] if state["wall"] > 0 else None


def run_compare(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    config: CompareConfig,
    out: str | Path,
    *,
    model_name: str = "",
    command: str = "",
    progress: bool = True,
    log: Callable[[str], None] = print,
    save_images: str | Path | None = None,
    save_format: str = "png",
    overwrite: bool = False,
    group: Group = Group(),
) -> dict[str, Any] | None:
    """Run (or resume) the comparison into ``out``; returns the report dict (schema in
    :mod:`stepdrop.tables`). ``save_images``: also write each cell's samples to
    ``save_images/<cell>/`` (PNGs, or ``<cell>.npz`` with ``save_format="npz"``) with their seeds
    and timesteps (:mod:`stepdrop.image_files`); a cell already saved there with the same
    settings is kept, anything else there is refused before sampling unless ``overwrite``.

    Under torchrun (``group``, :mod:`stepdrop.distributed`) every rank calls this with the same
    arguments: each samples its share of every cell's batches and extracts the Inception
    features of its share of the images; rank 0 merges, scores and writes everything, shows the
    progress and returns the report (the other ranks return None). The numbers equal a single
    process's (same batches, same seeds, same feature batches)."""
    from stepdrop import metrics

    if not group.main:
        log, progress = (lambda message: None), False
    out = ensure_writable_folder(out)
    device = model_device_dtype(model)[0]
    extractor = config.extractor or metrics.default_extractor()
    specs = cell_specs(config)
    _check_runnable(model, schedule, config, specs)
    gflops = gflops_per_call(model)
    log(f"{len(specs)} cells, {config.num_samples} samples each (unless @n), {gflops:.3f} GFLOPs per model call")
    device_name = _device_name(device)
    sample_key = dict(seed=config.seed, batch_size=config.batch_size, clip=config.clip, model=model_fingerprint(model),
                      T=schedule.num_timesteps, device=device_name, backend=config.backend,
                      cuda_graph=config.cuda_graph)
    if config.compile != "none":  # images/s belong to it (kept out of the key otherwise: older cells stay valid)
        sample_key["compile"] = config.compile
    fast = compile_model(model, config.compile)  # samples; FLOPs and the fingerprint are the model's own
    keys = {}
    for spec in specs:
        key = dict(sample_key, label=spec.label, num_samples=spec.num_samples or config.num_samples)
        if spec.call_plan.width is not None:  # a named schedule may be searched again under its name
            key["widths"] = list(spec.call_plan.width.widths)
        keys[spec.label] = key
    targets = cell_targets(specs, keys, save_images, save_format, overwrite)  # refused now, not hours later
    reference = None
    for turn in ("main", "others"):  # rank 0 fills the feature cache first; the others read it
        if (turn == "main") == group.main:
            reference = metrics.reference_features(config.dataset, config.ref_split, config.ref_samples,
                                                   extractor=extractor, cache_dir=config.cache_dir,
                                                   data_root=config.data_root, device=device, progress=progress)
        group.barrier("the reference features")
    classifier = None
    if config.dataset == "fashion-mnist" and tuple(model.sample_shape)[0] == 1:
        from stepdrop.classifier import load_classifier

        classifier = load_classifier()
    meta = dict(
        model=model_name, dataset=config.dataset,
        reference=dict(split=config.ref_split, num_images=int(reference.shape[0]), extractor=extractor),
        seed=config.seed, num_samples=config.num_samples, clip=config.clip, device=device_name,
        torch=str(torch.__version__), gflops_per_call=gflops, command=command, ranks=group.world,
        interval=(f"95 % bootstrap over the generated samples ({config.bootstrap} resamples, percentile spread "
                  f"re-centred on the estimate, "
                  f"reference set fixed)" if config.bootstrap else "none"),
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    )
    cells_dir = out / "cells"
    variant_gflops = {"": {"full": gflops}}  # GFLOPs per call of each variant, per call plan
    rows: list[dict[str, Any]] = []
    grids: dict[str, Tensor] = {}
    metric_key = dict(extractor=extractor, ref_split=config.ref_split, ref_samples=int(reference.shape[0]),
                      bootstrap=config.bootstrap, kid_subsets=config.kid_subsets, dataset=config.dataset,
                      reference=hashlib.sha1(reference.numpy().tobytes()).hexdigest()[:16])
    for spec in specs:
        n = spec.num_samples or config.num_samples
        key = keys[spec.label]
        path = cells_dir / f"{_safe(spec.label)}.pt"
        done = _load_matching(path, key, log) if group.main else None
        if group.broadcast(done is None, f"cell {spec.label}: is it done"):
            state = _sample_cell(fast, schedule, spec, n, config, device, cells_dir, key, progress, log, group)
            if group.main:
                done = dict(key=key, state=state, metric_key=None, metrics=None)
                _save(done, path)
                shards.remove(shards.batch_dir(cells_dir, _safe(spec.label)))
        if group.broadcast(group.main and done.get("metric_key") != metric_key, f"cell {spec.label}: metrics"):
            images = group.broadcast(done["state"]["images"] if group.main else None, f"cell {spec.label}: images")
            layers = _feature_layers(images, extractor, device, progress, group)
            if group.main:
                done["metrics"] = _evaluate(images, layers, reference, config, classifier)
                done["metric_key"] = metric_key
                _save(done, path)
        if not group.main:
            continue
        eta = 1.0 if get_solver(spec.solver).stochastic else 0.0  # the cell's η column: 1 for a noisy solver
        if spec.calls not in variant_gflops:
            variant_gflops[spec.calls] = gflops_per_variant(model, spec.call_plan)
        row = _cell_row(spec, n, done["state"], variant_gflops[spec.calls], config, eta)
        if spec.label in targets:
            save_cell(done["state"], key, config.seed, config.batch_size, targets[spec.label], overwrite)
            row["saved_images"] = str(targets[spec.label])
        row.update(done["metrics"])
        rows.append(row)
        if config.compile != "none":  # the one-time cost of the first compile, apart from any cell's time
            meta["compile"] = dict(mode=config.compile, first_compile_s=getattr(fast, "compile_seconds", None))
        if config.grid_samples:
            grids[spec.label] = done["state"]["images"][: config.grid_samples].float() / 127.5 - 1
        log(f"{spec.label:<22} NFE {row['nfe_mean']:6.2f}  FID {row['fid']:7.2f}  "
            f"{row['images_per_second'] or 0:7.2f} img/s")
        _write(dict(meta=meta, cells=rows), out, grids, None, None)
    if not group.main:
        return None
    film = _film_report(model, schedule, config, specs, device, cells_dir,
                        dict(sample_key, n=config.film_samples, clean_step=-1))  # frames once stored clean as t=0
    full = dict(meta=dict(meta, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")), cells=rows)
    _write(full, out, grids, *film)
    return full


def _check_runnable(model: torch.nn.Module, schedule: NoiseSchedule, config: CompareConfig,
                    specs: Sequence[RunSpec]) -> None:
    """What would otherwise fail only when its cell is reached, hours into a run (or score the
    samples against the wrong images): refused before any reference feature or sample."""
    from stepdrop.data import load_images

    shape = tuple(getattr(model, "sample_shape", ()) or ())
    if len(shape) != 3:
        raise ValueError(f"model must have a sample_shape (C, H, W), got {shape or None}")
    data = load_images(config.dataset, config.ref_split, root=config.data_root)
    check_int("ref_samples", config.ref_samples, low=2, high=len(data))
    ref_shape = tuple(data.images.shape[1:])
    # a grey dataset may score a 3-channel model of it (Inception sees grey as replicated RGB)
    if shape[1:] != ref_shape[1:] or shape[0] not in {ref_shape[0], 3}:
        raise ValueError(f"the model's samples are {shape} but dataset={config.dataset!r} holds {ref_shape} images: "
                         f"FID against it would compare different data; give the dataset the model was trained on")
    T = schedule.num_timesteps
    for spec in specs:
        if spec.budget > T:
            raise ValueError(f"cell {spec.label!r}: budget must be <= T = {T} (the model's timesteps), got {spec.budget}")
        policy = get_policy(spec.policy)
        if getattr(policy, "needs_deterministic_solver", False) and get_solver(spec.solver).stochastic:
            raise ValueError(f"cell {spec.label!r}: policy {spec.policy!r} matches a deterministic trajectory, but solver "
                             f"{spec.solver!r} draws fresh noise at every step; pair it with a deterministic solver")
        if not spec.call_plan.plain:  # a scale the UNet cannot take, a branch it lacks: refused now
            try:
                spec.call_plan.check_model(model, shape)
                if spec.call_plan.mixres is not None:
                    spec.call_plan.mixres.low_res_calls(spec.budget)
            except ValueError as exc:
                raise ValueError(f"cell {spec.label!r}: {exc}") from None
        if config.cuda_graph and isinstance(policy, OnlinePolicy):
            raise ValueError(f"cell {spec.label!r}: cuda_graph=True cannot run policy {spec.policy!r}, which picks "
                             f"its steps online from the model output; drop the cell or use cuda_graph=False")


def _film_report(model, schedule, config, specs, device, cells_dir, key) -> tuple[list | None, str | None]:
    if not config.film_samples:
        return None, None
    label = config.film_label
    if label is None:
        at_25 = [s for s in specs if s.budget == 25 and s.label not in config.references]
        label = (at_25 or specs)[0].label
    spec = next(s for s in specs if s.label == label)  # CompareConfig checked that it is a cell
    path = cells_dir / f"film_{_safe(label)}.pt"
    saved = _load(path)
    if saved is None or saved.get("key") != key:
        frames = _film(model, schedule, spec, config, device)
        saved = dict(key=key, steps=[t for t, _ in frames], frames=torch.stack([x for _, x in frames]))
        _save(saved, path)
    return list(zip(saved["steps"], saved["frames"])), label


def _write(rep: dict[str, Any], out: Path, grids: dict[str, Tensor], frames, film_label) -> None:
    tables.write_report(rep, out)
    plots.plot_cost_curves(rep, out)
    budgets = sorted({c["budget"] for c in rep["cells"] if not c["reference"]})
    if budgets:
        plots.plot_timestep_barcode(rep, out, budget=25 if 25 in budgets else budgets[0])
    plots.plot_width_schedules(rep, out)
    if grids:
        plots.plot_sample_grid(grids, out)
    if frames:
        plots.plot_film_strip(frames, out, film_label)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} threads"


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed, for the report."""
    return "stepdrop " + shlex.join(list(argv if argv is not None else sys.argv[1:]))
