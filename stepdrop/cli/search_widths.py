"""``stepdrop search-widths``: DDSM's evolutionary search for the width of every model call."""

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
    from stepdrop.metrics import EXTRACTORS
    from stepdrop.solvers import solver_help
    from stepdrop.width_search import METRICS, WidthSearch

    d = WidthSearch()
    p = sub.add_parser(
        "search-widths",
        help="search the width of every model call of a slimmable model (DDSM); saved as a named width schedule",
        description="Evolutionary search (DDSM, Wang et al. 2024) for one width per model call of a plan on a "
        "slimmable model (stepdrop train --slimmable). Fitness: FID (or KID x 1e3) of --num-samples images from "
        "fixed seeds against the cached test-set features, plus --lam x GFLOPs per sample (counted per width). The "
        "first population holds every uniform width; each generation keeps the better half and adds crossover and "
        "mutation children. Deterministic for a --seed, resumable (re-run the same command), with a progress bar. "
        "Writes <out>/widths.json (the schedule, its fitness, the search's own cost in calls and seconds), "
        "generations.csv and widths.png, and saves the schedule under --name so that specs can use it: "
        "ddim:uniform-25+width(@NAME).",
        formatter_class=HelpFormatter,
    )
    add_model_source(p)
    p.add_argument("--solver", default=d.solver, help=f"solver: {solver_help()}")
    p.add_argument("--policy", default=d.policy, help="step policy of the plan")
    p.add_argument("--budget", type=int, default=d.budget, help="model calls per sample")
    p.add_argument("--clip", type=float, default=0.0, help="clip x̂0 to [-clip, clip] while sampling (0: no clipping)")
    p.add_argument("--metric", choices=METRICS, default=d.metric, help="quality term of the fitness")
    p.add_argument("--num-samples", type=int, default=d.num_samples, help="images per individual (fixed seeds)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per sampler call")
    p.add_argument("--lam", type=float, default=d.lam, help="fitness added per GFLOP per sample")
    p.add_argument("--population", type=int, default=d.population, help="individuals per generation")
    p.add_argument("--generations", type=int, default=d.generations, help="generations")
    p.add_argument("--mutation", type=float, default=d.mutation, help="probability that a gene is redrawn")
    p.add_argument("--bands", type=int, default=None, help="genes: one width per band of consecutive calls "
                   "(default: one per call)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the search and of its images")
    p.add_argument("--ref-samples", type=int, default=5000, help="test images of the FID reference")
    p.add_argument("--extractor", choices=EXTRACTORS, default=None, help="Inception weights (default: as compare)")
    p.add_argument("--cache-dir", default=None, help="reference feature cache (default ~/.cache/stepdrop/features)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    add_device_and_threads(p)
    p.add_argument("--name", default=None, help="name of the saved schedule (default <solver>-<policy>-<budget>)")
    p.add_argument("--out", default="width-search", help="output folder (re-use it to resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stepdrop import metrics
    from stepdrop._io import ensure_writable_folder
    from stepdrop.width_search import WidthSearch, check_slimmable, search_widths

    search = WidthSearch(solver=args.solver, policy=args.policy, budget=args.budget, clip=clip_setting(args.clip),
                         metric=args.metric, num_samples=args.num_samples, batch_size=args.batch_size, lam=args.lam,
                         population=args.population, generations=args.generations, mutation=args.mutation,
                         bands=args.bands, seed=args.seed)
    set_threads(args.threads)
    out = ensure_writable_folder(args.out)
    loaded = load_model(args)
    check_slimmable(loaded.model)  # before minutes of reference features
    dataset = (loaded.meta or {}).get("dataset", "fashion-mnist")
    reference = metrics.reference_features(dataset, "test", args.ref_samples, extractor=args.extractor,
                                           cache_dir=args.cache_dir, data_root=args.data_root,
                                           device=args.device, progress=not args.no_progress)
    result = search_widths(loaded.model, loaded.schedule, search, reference, out, extractor=args.extractor,
                           name=args.name, progress=not args.no_progress)
    cost = result["search"]["cost"]
    print(f"best: {result['metric']} {result['quality']:.3f} at {result['gflops']:.3f} GFLOPs/sample; widths "
          f"{','.join(f'{w:g}' for w in result['widths'])}")
    print(f"search: {result['search']['individuals']} individuals, {cost['model_calls']} batched model calls, "
          f"{cost['sample_evaluations']} sample evaluations, {cost['seconds']:.0f} s (not part of sampling cost)")
    print(f"saved as @{result['name']}: use it as +width(@{result['name']}); widths.json, generations.csv, "
          f"widths.png in {out}")
    return 0
