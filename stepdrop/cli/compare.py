"""``stepdrop compare``: the evaluation grid."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from stepdrop.cli._common import (
    HelpFormatter,
    add_compile,
    add_device_and_threads,
    add_model_source,
    clip_setting,
    ints,
    load_model,
    set_threads,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from stepdrop.compare import FULL, QUICK, CompareConfig
    from stepdrop.data import DATASETS
    from stepdrop.metrics import EXTRACTORS
    from stepdrop.ops import BACKENDS
    from stepdrop.solvers import solver_help

    d = CompareConfig()
    p = sub.add_parser(
        "compare",
        help="policy × budget × solver grid: FID/KID/precision/recall, classifier score, NFE, GFLOPs, images/s",
        description="Sample every cell [solver:]policy-budget of the grid (plus the reference runs) from one model "
        "with the same seeds and write <out>/report.json, report.csv, report.md and PNG plots (FID vs NFE, vs GFLOPs, "
        "vs images/s with the Pareto front, a timestep barcode per policy, same-seed samples, a denoising film strip). "
        "FID/KID/precision-recall use Inception-v3 pool3 features through torch-fidelity against a cached reference "
        "set; FID carries a bootstrap interval. Finished cells are kept in <out>/cells and never recomputed; a cell "
        "in progress resumes from its last batch, so re-running the same command continues an interrupted run.",
        formatter_class=HelpFormatter,
    )
    add_model_source(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"a small run that finishes in under 15 minutes on 2 CPU cores: {QUICK}")
    size.add_argument("--full", action="store_true", help=f"the full study, for a GPU: {FULL}")
    # None: not typed, so a preset (--quick, --full) may fill it; a typed value always wins
    p.add_argument("--policies", default=None, help=f"comma-separated policy names (default {','.join(d.policies)})")
    p.add_argument("--budgets", type=ints, default=None,
                   help=f"model calls per sample, comma-separated (default {','.join(map(str, d.budgets))})")
    p.add_argument("--solvers", default=None,
                   help=f"comma-separated solvers ({solver_help()}) "
                        f"(default {','.join(d.solvers)})")
    p.add_argument("--cells", default="",
                   help="extra cells as specs [solver:]policy-budget[@num_samples], ranked with the grid "
                        "(for what a full policy × budget × solver product would not give, e.g. dpmpp_2m:logsnr-10)")
    p.add_argument("--references", default=None,
                   help=f"reference runs as specs [solver:]policy-budget[@num_samples], empty: none "
                        f"(default {','.join(d.references)})")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="the real images FID compares with (default: the dataset the model was trained on, "
                        "from its model file)")
    p.add_argument("--num-samples", type=int, default=None, help=f"images per cell (default {d.num_samples})")
    p.add_argument("--batch-size", type=int, default=None, help=f"images per sampler call (default {d.batch_size})")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every cell's noise and plans")
    p.add_argument("--clip", type=float, default=1.0, help="clip x̂0 to [-clip, clip] (0: no clipping)")
    p.add_argument("--ref-split", choices=("train", "test"), default=d.ref_split, help="reference images")
    p.add_argument("--ref-samples", type=int, default=None, help=f"reference images (default {d.ref_samples})")
    p.add_argument("--extractor", choices=EXTRACTORS, default=None,
                   help="Inception weights (default: inception-v3-compat if its weights are cached, else the "
                        "offline TorchScript copy of the same weights)")
    p.add_argument("--bootstrap", type=int, default=None, help=f"FID bootstrap resamples, 0: none (default {d.bootstrap})")
    p.add_argument("--film", default=None, help="cell for the film strip (default: the first at budget 25)")
    p.add_argument("--cache-dir", default=None, help="reference feature cache (default ~/.cache/stepdrop/features)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="fused-step backend")
    add_device_and_threads(p)
    add_compile(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each batch's whole loop as one CUDA graph (GPU only; not for adaptive)")
    p.add_argument("--out", default="compare", help="output folder (re-use it to resume)")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="also write every cell's samples, for other FID tools: DIR/<cell>/000000.png, … (or "
                        "DIR/<cell>.npz with --save-format npz) with each sample's seeds and timesteps in samples.json")
    p.add_argument("--save-format", choices=("png", "npz"), default="png", help="format of --save-images")
    p.add_argument("--overwrite", action="store_true", help="replace what --save-images finds in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stepdrop.compare import FULL, QUICK, CompareConfig, command_line, run_compare
    from stepdrop.runs import split_specs

    preset = QUICK if args.quick else FULL if args.full else {}
    chosen = dict(
        cells=tuple(split_specs(args.cells)),
        seed=args.seed, clip=clip_setting(args.clip), ref_split=args.ref_split, extractor=args.extractor,
        film_label=args.film, cache_dir=args.cache_dir, data_root=args.data_root, backend=args.backend,
        cuda_graph=args.cuda_graph, compile=args.compile,
    )
    # a preset fills what the user did not type; a typed flag always wins
    typed = dict(budgets=args.budgets, num_samples=args.num_samples, batch_size=args.batch_size,
                 ref_samples=args.ref_samples, bootstrap=args.bootstrap,
                 **{name: tuple(split_specs(getattr(args, name)))
                    for name in ("policies", "solvers", "references") if getattr(args, name) is not None})
    chosen.update(preset)
    chosen.update({name: value for name, value in typed.items() if value is not None})
    if args.dataset is not None:
        chosen["dataset"] = args.dataset
    config = CompareConfig(**chosen)
    set_threads(args.threads)
    from stepdrop.distributed import start

    group, args.device = start(args.device)  # under torchrun: this rank's place and device
    loaded = load_model(args)
    trained_on = (loaded.meta or {}).get("dataset")
    if args.dataset is not None and trained_on is not None and args.dataset != trained_on:
        raise ValueError(f"--dataset {args.dataset} but the model was trained on {trained_on} (its model file says "
                         f"so): FID against other images measures nothing; omit --dataset")
    if args.dataset is None and trained_on is not None:
        config = replace(config, dataset=trained_on)
    name = args.checkpoint or f"{Path(loaded.path).stem} (shipped with stepdrop)"
    report = run_compare(loaded.model, loaded.schedule, config, args.out, model_name=name,
                         command=command_line(args.argv), progress=not args.no_progress,
                         save_images=args.save_images, save_format=args.save_format, overwrite=args.overwrite,
                         group=group)
    if not group.main:
        group.close(destroy=False)  # the command exits right after (stepdrop.cli.main)
        return 0
    print(f"{len(report['cells'])} cells; report.md, report.json, report.csv and plots in {args.out}")
    group.close(destroy=False)  # the command exits right after (stepdrop.cli.main)
    return 0
