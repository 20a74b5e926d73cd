"""Named sampling runs: parse "solver:policy-budget@samples" specs, run them from one seed,
and write PNG grids plus JSON/CSV results (what ``stepdrop sample`` and ``make demo`` do).

Spec grammar: ``[solver:]policy-budget[+variant…][@num_samples]``, e.g. ``ddim-25``,
``stepdrop-25``, ``ddpm:uniform-100``, ``ddpm-1000@4``, ``dpmpp_2m:logsnr-10``,
``ddim:quadratic-25+mixres(0.5,0.3)+cache(5)`` (how the calls are made:
:func:`stepdrop.variants.parse_calls`). A solver name alone
(``ddim-K``, ``ddpm-K``, ``dpmpp_2m-K``) means the uniform policy with that solver; any other
policy runs with DDIM (η = 0) unless a solver is given. Every spec starts from the same
initial noise (the first samples of one seeded draw).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from stepdrop._io import atomic_write, atomic_write_bytes
from stepdrop._validation import check_choice, check_int
from stepdrop.solvers import SOLVERS
from stepdrop.policies import POLICIES, get_policy
from stepdrop.distributed import Group
from stepdrop.ops.reference import CLEAN
from stepdrop.sampler import FusedSampler, SampleStats
from stepdrop.compiled import CompiledModel
from stepdrop.cost import gflops_per_variant
from stepdrop.schedule import NoiseSchedule
from stepdrop.variants import CallPlan, parse_calls

__all__ = ["RunSpec", "parse_spec", "run_specs", "save_grid", "split_specs", "write_results"]

_SPEC = re.compile(r"^(?:(?P<solver>[a-z][a-z0-9_]*):)?(?P<policy>[a-z][a-z0-9_]*)-(?P<budget>\d+)"
                   r"(?P<calls>(?:\+[a-z]+\([^()]*\))*)(?:@(?P<samples>\d+))?$")


@dataclass(frozen=True)
class RunSpec:
    """One sampling configuration: ``label`` as the user wrote it (or :meth:`of` names it)."""

    label: str
    solver: str
    policy: str
    budget: int
    num_samples: int | None = None
    calls: str = ""  # the call plan's spec suffix, e.g. "+mixres(0.5,0.3)" ("": full calls)

    def __post_init__(self) -> None:
        check_choice("solver", self.solver, SOLVERS)
        check_choice("policy", self.policy, tuple(POLICIES))
        check_int("budget", self.budget, low=1)
        if self.num_samples is not None:
            check_int("num_samples", self.num_samples, low=1)
        parse_calls(self.calls)

    @classmethod
    def of(cls, solver: str, policy: str, budget: int, num_samples: int | None = None, calls: str = "") -> "RunSpec":
        """The spec with its canonical label ``solver:policy-budget[+variants][@num_samples]``."""
        calls = parse_calls(calls).text
        label = f"{solver}:{policy}-{budget}{calls}" + ("" if num_samples is None else f"@{num_samples}")
        return cls(label, solver, policy, budget, num_samples, calls)

    @property
    def call_plan(self) -> CallPlan:
        return parse_calls(self.calls)


def split_specs(text: str) -> list[str]:
    """A comma-separated list of specs, split at the commas outside parentheses (a variant's
    arguments are comma-separated too: ``ddim-50+cache(3,0),unipc-10`` is two specs)."""
    specs, depth, current = [], 0, []
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            specs.append("".join(current))
            current = []
        else:
            current.append(char)
    specs.append("".join(current))
    return [s.strip() for s in specs if s.strip()]


def parse_spec(text: str) -> RunSpec:
    """Parse ``[solver:]policy-budget[@num_samples]`` (module docstring)."""
    m = _SPEC.match(text.strip())
    if m is None:
        raise ValueError(f"policy spec {text!r} must look like [solver:]policy-budget[+variant...][@num_samples], e.g. "
                         f"ddim-25, stepdrop-25, ddpm-1000@4, ddim:quadratic-25+mixres(0.5,0.3)+cache(5)")
    solver, policy = m["solver"], m["policy"]
    if solver is None and policy in SOLVERS:
        solver, policy = policy, "uniform"
    solver = solver or "ddim"
    if solver not in SOLVERS:
        raise ValueError(f"solver in {text!r} must be one of {SOLVERS}, got {solver!r}")
    if policy not in POLICIES:
        raise ValueError(f"policy in {text!r} must be one of {tuple(POLICIES)} (or a solver: "
                         f"{', '.join(SOLVERS)}), got {policy!r}")
    samples = None if m["samples"] is None else check_int("num_samples", int(m["samples"]), low=1)
    return RunSpec(text.strip(), solver, policy, int(m["budget"]), samples, parse_calls(m["calls"]).text)


def run_specs(
    model: torch.nn.Module,
    schedule: NoiseSchedule,
    specs: Sequence[RunSpec],
    *,
    num_samples: int,
    seed: int,
    backend: str = "auto",
    clip: float | None = 1.0,
    progress: bool = True,
    cuda_graph: bool = False,
    batch_size: int | None = None,
    group: Group = Group(),
) -> list[tuple[RunSpec, Tensor, dict[str, Any]]]:
    """Run each spec on the same initial noise; returns (spec, images, stats dict) per spec.

    ``batch_size``: images per sampler call (default: all of a spec's in one); batch i draws
    its plans and step noise from ``torch.Generator().manual_seed(seed + i)`` and its x_T is
    rows i·b … of the one seeded draw, so the images do not depend on who samples a batch.
    Under torchrun (``group``) batch i runs on rank i mod world and rank 0 gathers the
    results (the other ranks return an empty list).

    ``clip`` clips x̂0 to [−clip, clip] at every step (1.0: the [−1, 1] data range our models
    are trained on; None: no clipping). Timing covers the sampling loop only (no I/O); a
    one-call warm-up runs first. ``cuda_graph``: replay each spec's loop as one CUDA graph
    (:class:`FusedSampler`; the capture is timed apart, in ``info["cuda_graph"]``); a replayed
    graph runs no Python between steps, so it shows no per-step progress.
    """
    device = next(model.parameters()).device
    largest = max([num_samples] + [s.num_samples or 0 for s in specs])
    shape = tuple(model.sample_shape)
    noise = torch.randn((largest, *shape), generator=torch.Generator().manual_seed(seed)).to(device)
    low_res: dict[tuple[int, ...], Tensor] = {}  # x_T at a reduced size (mixres), from the same seed
    FusedSampler(model, schedule, backend=backend).sample(noise[:1], "uniform", budget=1)  # warm-up
    if batch_size is not None:
        check_int("batch_size", batch_size, low=1)
    results = []
    flops: dict[str, dict[str, float]] = {}  # GFLOPs per call of each variant, per call plan (counted once)
    for spec in specs:
        n = spec.num_samples or num_samples
        sampler = FusedSampler(model, schedule, solver=spec.solver, clip=clip, backend=backend, cuda_graph=cuda_graph,
                               calls=spec.calls)
        policy = get_policy(spec.policy)
        start = spec.call_plan.start_shape(shape)
        if start != shape and start not in low_res:
            low_res[start] = torch.randn((largest, *start), generator=torch.Generator().manual_seed(seed)).to(device)
        x_T = noise if start == shape else low_res[start]
        b = batch_size or n
        parts = {}
        for i in group.shard(range(math.ceil(n / b))):
            generator = torch.Generator().manual_seed(seed + i)
            images, stats = sampler.sample(x_T[i * b:min(n, (i + 1) * b)], policy, budget=spec.budget,
                                           generator=generator, progress=progress and group.main and not cuda_graph)
            parts[i] = (images.cpu(), stats)
        gathered = {i: part for share in group.all_gather(parts, f"the samples of {spec.label}") for i, part in
                    share.items()}
        if not group.main:
            continue
        images = torch.cat([gathered[i][0] for i in sorted(gathered)])
        stats = _merge_stats([gathered[i][1] for i in sorted(gathered)])
        row = stats.to_dict()
        if spec.calls not in flops:
            flops[spec.calls] = gflops_per_variant(model.inner if isinstance(model, CompiledModel) else model,
                                                   spec.call_plan)
        row["gflops_per_sample"] = sum(flops[spec.calls][label] * float(count.double().mean())
                                       for label, count in stats.calls_by_variant().items())
        row.update(label=spec.label, budget=spec.budget, seed=seed, num_samples=n, clip=clip, nfe=stats.nfe.tolist(),
                   timesteps_row0=[int(v) for v in stats.timesteps[0] if v >= 0],
                   timesteps=[[int(v) for v in r if v >= 0] for r in stats.timesteps],
                   noise_shape=list(x_T.shape[1:]))
        results.append((spec, images, row))
    return results


def _merge_stats(parts: list[SampleStats]) -> SampleStats:
    """One :class:`SampleStats` for a spec sampled in batches (counts summed, per-sample rows
    concatenated, plans padded with CLEAN to the longest)."""
    if len(parts) == 1:
        return parts[0]
    L = max(p.timesteps.shape[1] for p in parts)
    timesteps = torch.cat([torch.nn.functional.pad(p.timesteps, (0, L - p.timesteps.shape[1]), value=CLEAN)
                           for p in parts])
    first = parts[0]
    return replace(first, nfe=torch.cat([p.nfe for p in parts]), timesteps=timesteps,
                   model_calls=sum(p.model_calls for p in parts),
                   evaluated_samples=sum(p.evaluated_samples for p in parts),
                   overhead_calls=sum(p.overhead_calls for p in parts),
                   overhead_samples=sum(p.overhead_samples for p in parts),
                   wall_time_s=sum(p.wall_time_s for p in parts),
                   variants=max((p.variants for p in parts), key=len))


def save_grid(images: Tensor, path: str | os.PathLike, *, nrow: int | None = None, padding: int = 2) -> Path:
    """Write images in [−1, 1] ([B, C, H, W], C ∈ {1, 3}) as one PNG grid (atomic write)."""
    from PIL import Image

    from stepdrop.metrics import to_uint8

    x = to_uint8(images).cpu()
    B, C, H, W = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(B)))
    rows = math.ceil(B / nrow)
    grid = torch.full((C, rows * (H + padding) + padding, nrow * (W + padding) + padding), 255, dtype=torch.uint8)
    for i in range(B):
        r, c = divmod(i, nrow)
        top, left = padding + r * (H + padding), padding + c * (W + padding)
        grid[:, top : top + H, left : left + W] = x[i]
    array = grid[0].numpy() if C == 1 else grid.permute(1, 2, 0).numpy()
    return atomic_write(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


RESULT_COLUMNS = ("label", "solver", "policy", "budget", "num_samples", "mean_nfe", "min_nfe", "max_nfe",
                  "gflops_per_sample", "model_calls", "overhead_calls", "wall_time_s", "images_per_second", "backend", "seed")


def write_results(rows: list[dict[str, Any]], out: str | os.PathLike, meta: dict[str, Any]) -> tuple[Path, Path]:
    """``results.json`` (everything, incl. timesteps) and ``results.csv`` (the table), atomically."""
    out = Path(out)
    json_path = atomic_write_bytes(out / "results.json",
                                    json.dumps({"meta": meta, "runs": rows}, indent=2).encode())
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write_bytes(out / "results.csv", buffer.getvalue().encode())
    return json_path, csv_path


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of the counted costs."""
    width = max([18] + [len(r["label"]) for r in rows])
    head = (f"{'run':<{width}} {'solver':<6} {'NFE mean':>9} {'min':>5} {'max':>5} {'GFLOPs':>7} {'calls':>6} "
            f"{'time s':>8} {'img/s':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['label']:<{width}} {r['solver']:<6} {r['mean_nfe']:>9.2f} {r['min_nfe']:>5} {r['max_nfe']:>5} "
                     f"{r.get('gflops_per_sample', float('nan')):>7.2f} {r['model_calls']:>6} {r['wall_time_s']:>8.2f} "
                     f"{r['images_per_second']:>8.2f}")
    return "\n".join(lines)
