"""``stepdrop optimize``: search timesteps for a model and solver."""

from __future__ import annotations

import argparse

from stepdrop.cli._common import (
    HelpFormatter,
    add_device_and_threads,
    add_model_source,
    clip_setting,
    load_model,
    set_threads,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from stepdrop.ops import BACKENDS
    from stepdrop.optimize import Optimized, default_cache_dir
    from stepdrop.solvers import solver_help

    d = Optimized(cache_dir=".")
    p = sub.add_parser(
        "optimize",
        help="search K timesteps for a model and solver (the 'optimized' policy); cached, exportable",
        description="Search the K model-call timesteps whose samples come closest (MSE, from the same noise) to a "
        "high-NFE reference solution on a pilot batch, starting from the best fixed spacing (uniform, quadratic, "
        "logsnr, cosine) and moving one timestep at a time. Every model call is counted. The result is cached per "
        "(model, solver, K, settings), so 'optimized-K' in sample/compare reuses it; <out>/timesteps.json, .csv "
        "and timesteps.png hold the list, for set_timesteps(timesteps=...) in a diffusers pipeline.",
        formatter_class=HelpFormatter,
    )
    add_model_source(p)
    p.add_argument("--budget", type=int, required=True, help="K, model calls per sample")
    p.add_argument("--solver", default="dpmpp_2m", help=f"a deterministic solver: {solver_help()}")
    p.add_argument("--clip", type=float, default=0.0, help="clip x̂0 to [-clip, clip] while sampling (0: no clipping)")
    p.add_argument("--pilot-batch", type=int, default=d.pilot_batch, help="samples the search measures on")
    p.add_argument("--reference-solver", default=d.reference_solver, help="solver of the reference solution")
    p.add_argument("--reference-steps", type=int, default=d.reference_steps, help="model calls of the reference")
    p.add_argument("--max-evals", type=int, default=d.max_evals, help="trajectories the search may try (K calls each)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the pilot noise (held-out noise: seed + 1)")
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default {default_cache_dir()})")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="fused-step backend")
    add_device_and_threads(p)
    p.add_argument("--out", default="optimized", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stepdrop._io import ensure_writable_folder
    from stepdrop.optimize import Optimized, write_timesteps
    from stepdrop.sampler import FusedSampler

    policy = Optimized(pilot_batch=args.pilot_batch, reference_solver=args.reference_solver,
                       reference_steps=args.reference_steps, max_evals=args.max_evals, seed=args.seed,
                       cache_dir=args.cache_dir, progress=not args.no_progress)
    set_threads(args.threads)
    out = ensure_writable_folder(args.out)
    loaded = load_model(args)
    sampler = FusedSampler(loaded.model, loaded.schedule, solver=args.solver, clip=clip_setting(args.clip),
                           backend=args.backend)
    plan = policy.plan(loaded.schedule, args.budget, model=loaded.model, sample_shape=tuple(loaded.model.sample_shape),
                       sampler=sampler)
    paths = write_timesteps(plan, out, meta={"model": loaded.path, "command": "stepdrop " + " ".join(args.argv)})
    info = plan.info
    ts = [int(v) for v in plan.timesteps[:-1]]
    print(f"optimized-{args.budget} for {args.solver}: {','.join(map(str, ts))}")
    print(f"MSE to the reference, pilot: {info['start']} {info['pilot_mse']['start']:.4g} -> {info['pilot_mse']['optimized']:.4g}; "
          f"held-out: {info['holdout_mse']['start']:.4g} -> {info['holdout_mse']['optimized']:.4g}")
    spent = "read from the cache" if info["cached"] else "searched now"
    print(f"{info['search_calls']} batched model calls ({info['search_samples']} sample evaluations, "
          f"{info['evaluations']} trajectories), {spent}: {info['cache_file']}")
    print(f"{', '.join(p.name for p in paths)} in {out}")
    return 0
