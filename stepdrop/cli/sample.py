"""``stepdrop sample``: sample with several policies."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepdrop.cells import safe_name
from stepdrop.cli._common import (
    HelpFormatter,
    add_compile,
    add_device_and_threads,
    add_model_source,
    clip_setting,
    load_model,
    set_threads,
)


DEFAULT_SPECS = "ddpm-1000@4,ddim-10,ddim-25,stepdrop-25,adaptive-25"


def add_parser(sub: argparse._SubParsersAction) -> None:
    from stepdrop.ops import BACKENDS
    from stepdrop.solvers import SOLVERS

    p = sub.add_parser(
        "sample",
        help="sample a model with several policies from one seed; PNG grids + a cost table",
        description="Sample a model with each policy spec from the same initial noise. Writes <out>/<spec>.png "
        "(a grid per spec), <out>/results.json and results.csv (counted NFE per sample, model calls, wall time of "
        "the sampling loop without I/O, images/s, the timesteps used) and prints the table. A spec is "
        f"[solver:]policy-budget[+variant...][@num_samples] with a solver of {', '.join(SOLVERS)}: ddim-25, "
        "ddpm-1000 and dpmpp_2m-10 are the uniform policy with that solver; "
        "other policies (uniform, quadratic, cosine, logsnr, importance, stepdrop, stepdrop_exact, "
        "stepdrop_per_sample, noise_aware, gradient_aware, combined, adaptive, optimized) use DDIM unless a solver "
        "is given (ddpm:importance-25); @N overrides --num-samples for that spec. Variants make calls cheaper: "
        "+mixres(scale,fraction) runs the first fraction of the calls at scale x the size (PostDiff), "
        "+cache(N[,branch[,uniform|quadratic]]) runs the whole network every N calls and only its shallow path, "
        "with the cached deep feature, in between (DeepCache): ddim:quadratic-25+mixres(0.5,0.3)+cache(5).",
        formatter_class=HelpFormatter,
    )
    add_model_source(p)
    p.add_argument("--policies", default=DEFAULT_SPECS, help="comma-separated specs")
    p.add_argument("--num-samples", type=int, default=16, help="images per spec")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per sampler call (default: all of a spec's at once); batch i is seeded seed + i, so "
                        "under torchrun (batch i on rank i mod N) the images equal a single process's")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, step noise and stochastic plans")
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip x̂0 to [-clip, clip] at every step (1: the [-1, 1] data range of stepdrop's models; "
                        "0: no clipping — an under-trained model then drifts out of range at high noise)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="fused-step backend")
    add_device_and_threads(p)
    add_compile(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each run's whole loop as one CUDA graph (GPU only; not for adaptive)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="also write every sample, for other FID tools: DIR/<spec>/000000.png, … (or DIR/<spec>.npz "
                        "with --save-format npz: uint8 NHWC as arr_0) and a samples.json of each sample's seed and "
                        "timesteps beside them")
    p.add_argument("--save-format", choices=("png", "npz"), default="png", help="format of --save-images")
    p.add_argument("--overwrite", action="store_true", help="replace what --save-images finds in DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from stepdrop._io import ensure_writable_folder
    from stepdrop.runs import format_table, parse_spec, run_specs, save_grid, split_specs, write_results

    specs = [parse_spec(s) for s in split_specs(args.policies)]
    if not specs:
        raise ValueError("--policies names no spec")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    set_threads(args.threads)
    out = Path(args.out)
    ensure_writable_folder(out)
    targets = {}
    if args.save_images is not None:  # refused before any sampling, not after
        from stepdrop.image_files import check_output

        suffix = ".npz" if args.save_format == "npz" else ""
        targets = {s.label: check_output(Path(args.save_images) / f"{safe_name(s.label)}{suffix}", args.overwrite,
                                         "--save-images") for s in specs}
    from stepdrop.compiled import compile_model
    from stepdrop.distributed import start

    group, args.device = start(args.device)  # under torchrun: this rank's place and device
    loaded = load_model(args)
    results = run_specs(compile_model(loaded.model, args.compile), loaded.schedule, specs, num_samples=args.num_samples,
                        seed=args.seed, backend=args.backend, clip=clip_setting(args.clip),
                        progress=not args.no_progress, cuda_graph=args.cuda_graph, batch_size=args.batch_size,
                        group=group)
    if not group.main:
        group.close(destroy=False)  # the command exits right after (stepdrop.cli.main)
        return 0
    rows = []
    for spec, images, row in results:
        row["grid"] = str(save_grid(images, out / f"{safe_name(spec.label)}.png"))
        if spec.label in targets:
            from stepdrop.image_files import save_samples

            per_batch = args.batch_size or images.shape[0]
            records = [dict(index=i, seed=args.seed, noise_row=i, plan_seed=args.seed + i // per_batch,
                            nfe=row["nfe"][i], timesteps=row["timesteps"][i]) for i in range(images.shape[0])]
            row["saved_images"] = str(save_samples(images, targets[spec.label], records=records, overwrite=args.overwrite,
                                                   meta=dict(label=spec.label, model=loaded.path, seed=args.seed,
                                                             noise=_noise_recipe(specs, args, row["noise_shape"]))))
        rows.append(row)
    meta = {"model": loaded.path, "model_meta": loaded.meta, "seed": args.seed, "clip": clip_setting(args.clip),
            "device": args.device, "compile": args.compile,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    json_path, csv_path = write_results(rows, out, meta)
    print(format_table(rows))
    print(f"grids, {json_path.name} and {csv_path.name} in {out}")
    group.close(destroy=False)  # the command exits right after (stepdrop.cli.main)
    return 0


def _noise_recipe(specs, args, shape) -> str:
    """How sample i's initial noise is drawn (row ``noise_row`` of one seeded draw)."""
    largest = max([args.num_samples] + [s.num_samples or 0 for s in specs])
    dims = ", ".join(str(d) for d in [largest, *shape])
    return f"row noise_row of torch.randn(({dims}), generator=torch.Generator().manual_seed({args.seed}))"
