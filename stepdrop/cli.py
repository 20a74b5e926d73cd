"""The ``stepdrop`` command line: ``stepdrop train``, ``export``, ``sample``, ``compare``, ``optimize`` and ``diagnose``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields, replace
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: …)" only where it informs: not for flags, None or "" (the help text says
    what their absence means), nor where the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.nargs == 0 or action.default in (None, "") or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="name of a model shipped with stepdrop (default: the first one)")
    src.add_argument("--checkpoint", default=None, help="a training checkpoint or exported model file")


def _add_device_and_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda[:N]'")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _add_train(sub: argparse._SubParsersAction) -> None:
    from stepdrop.train import LR_SCHEDULES, SCHEDULES, TrainConfig
    from stepdrop.data import DATASETS
    from stepdrop.prediction import PREDICTION_TYPES

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a TinyUNet diffusion model",
        description="Train a TinyUNet with the DDPM objective (MSE on v, ε or x0: --prediction-type), AdamW, warm-up then cosine or "
        "constant LR, EMA weights and gradient clipping. Checkpoints (<out>/checkpoint.pt) are written atomically "
        "every --checkpoint-every steps and on Ctrl-C; --resume continues a run exactly (bit for bit on the CPU).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training images")
    p.add_argument("--data-root", default=None, help="folder with the dataset files (default: the dataset's standard place)")
    p.add_argument("--download", action="store_true",
                   help="cifar10: download the batches (torchvision) when they are absent; needs internet")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help="image channels (Fashion-MNIST: 1, or 3 replicated)")
    p.add_argument("--base-channels", type=int, default=d.base_channels, help="UNet width")
    p.add_argument("--channel-mults", type=_ints, default=d.channel_mults, help="width multiplier per resolution, e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks, help="residual blocks per resolution")
    p.add_argument("--attention-resolutions", type=_ints, default=d.attention_resolutions, help="resolutions with self-attention, e.g. 16 (empty: none)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout in the residual blocks")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=d.prediction_type,
                   help="what the network learns to output: v_prediction (v = α·ε − σ·x0, MSE weighted so that "
                        "high noise is trained: the default), epsilon (the noise ε; the DDPM and StepDrop papers' "
                        "objective, whose MSE barely trains t ≳ 750, so DDIM then needs clipping) or sample (x0)")
    p.add_argument("--init", default=None,
                   help="warm-start from this model file or checkpoint (its EMA weights; same architecture, any "
                        "prediction type; fresh optimizer)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="β schedule")
    p.add_argument("--num-timesteps", type=int, default=d.num_timesteps, help="T, diffusion steps")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps in total (may grow on --resume)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule, help="after the warm-up")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="EMA decay per step")
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random draw")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=d.log_every, help="steps between lines of <out>/log.jsonl")
    p.add_argument("--out", default=d.out, help="run folder (checkpoint.pt, log.jsonl)")
    p.add_argument("--device", default=d.device, help="'auto', 'cpu' or 'cuda[:N]'")
    p.add_argument("--resume", action="store_true", help="continue <out>/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from stepdrop.train import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        path = train(config, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    print(f"saved {path}")
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint's EMA weights as a model file",
        description="Write the EMA weights of a training checkpoint, with its model config, noise schedule and a "
        "model card, as a file that load_checkpoint() reads (fp16 by default).",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("checkpoint", help="training checkpoint (checkpoint.pt)")
    p.add_argument("out", help="model file to write")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights (default: fp16 storage)")
    p.add_argument("--meta", default="{}", help="JSON object merged into the model card")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from stepdrop.checkpoint import export_model

    meta = json.loads(args.meta)
    if not isinstance(meta, dict):
        raise ValueError("--meta must be a JSON object")
    print(f"saved {export_model(args.checkpoint, args.out, half=not args.fp32, meta=meta)}")
    return 0


DEFAULT_SPECS = "ddpm-1000@4,ddim-10,ddim-25,stepdrop-25,adaptive-25"


def _add_sample(sub: argparse._SubParsersAction) -> None:
    from stepdrop.ops import BACKENDS
    from stepdrop.solvers import SOLVERS

    p = sub.add_parser(
        "sample",
        help="sample a model with several policies from one seed; PNG grids + a cost table",
        description="Sample a model with each policy spec from the same initial noise. Writes <out>/<spec>.png "
        "(a grid per spec), <out>/results.json and results.csv (counted NFE per sample, model calls, wall time of "
        "the sampling loop without I/O, images/s, the timesteps used) and prints the table. A spec is "
        f"[solver:]policy-budget[@num_samples] with a solver of {', '.join(SOLVERS)}: ddim-25, "
        "ddpm-1000 and dpmpp_2m-10 are the uniform policy with that solver; "
        "other policies (uniform, quadratic, cosine, logsnr, importance, stepdrop, stepdrop_exact, "
        "stepdrop_per_sample, noise_aware, gradient_aware, combined, adaptive) use DDIM unless a solver is given "
        "(ddpm:importance-25); @N overrides --num-samples for that spec.",
        formatter_class=_HelpFormatter,
    )
    _add_model_source(p)
    p.add_argument("--policies", default=DEFAULT_SPECS, help="comma-separated specs")
    p.add_argument("--num-samples", type=int, default=16, help="images per spec")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise, step noise and stochastic plans")
    p.add_argument("--clip", type=float, default=1.0,
                   help="clip x̂0 to [-clip, clip] at every step (1: the [-1, 1] data range of stepdrop's models; "
                        "0: no clipping — an under-trained model then drifts out of range at high noise)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="fused-step backend")
    _add_device_and_threads(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each run's whole loop as one CUDA graph (GPU only; not for adaptive)")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_sample)


def _run_sample(args: argparse.Namespace) -> int:
    import torch

    from stepdrop._io import ensure_writable_folder
    from stepdrop.runs import format_table, parse_spec, run_specs, save_grid, write_results

    specs = [parse_spec(s) for s in args.policies.split(",") if s.strip()]
    if not specs:
        raise ValueError("--policies names no spec")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    _set_threads(args.threads)
    out = Path(args.out)
    ensure_writable_folder(out)
    loaded = _load_model(args)
    if args.clip < 0:
        raise ValueError(f"--clip must be >= 0 (0: no clipping), got {args.clip}")
    results = run_specs(loaded.model, loaded.schedule, specs, num_samples=args.num_samples, seed=args.seed,
                        backend=args.backend, clip=args.clip or None, progress=not args.no_progress,
                        cuda_graph=args.cuda_graph)
    rows = []
    for spec, images, row in results:
        row["grid"] = str(save_grid(images, out / f"{_file_name(spec.label)}.png"))
        rows.append(row)
    meta = {"model": loaded.path, "model_meta": loaded.meta, "seed": args.seed, "clip": args.clip or None,
            "device": args.device,
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    json_path, csv_path = write_results(rows, out, meta)
    print(format_table(rows))
    print(f"grids, {json_path.name} and {csv_path.name} in {out}")
    return 0


def _load_model(args: argparse.Namespace):
    """The model of --checkpoint, or the shipped model --model (default: the first one)."""
    from stepdrop.checkpoint import load_checkpoint, load_pretrained, pretrained_names

    if args.checkpoint is not None:
        return load_checkpoint(args.checkpoint, map_location=args.device)
    names = pretrained_names()
    if args.model is None and not names:
        raise ValueError("no model is shipped with this installation: pass --checkpoint PATH")
    return load_pretrained(args.model or names[0], map_location=args.device)


def _add_compare(sub: argparse._SubParsersAction) -> None:
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
        formatter_class=_HelpFormatter,
    )
    _add_model_source(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help=f"a small run that finishes in under 15 minutes on 2 CPU cores: {QUICK}")
    size.add_argument("--full", action="store_true", help=f"the full study, for a GPU: {FULL}")
    # None: not typed, so a preset (--quick, --full) may fill it; a typed value always wins
    p.add_argument("--policies", default=None, help=f"comma-separated policy names (default {','.join(d.policies)})")
    p.add_argument("--budgets", type=_ints, default=None,
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
    _add_device_and_threads(p)
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each batch's whole loop as one CUDA graph (GPU only; not for adaptive)")
    p.add_argument("--out", default="compare", help="output folder (re-use it to resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from stepdrop.compare import FULL, QUICK, CompareConfig, command_line, run_compare

    preset = QUICK if args.quick else FULL if args.full else {}
    chosen = dict(
        cells=tuple(c for c in args.cells.split(",") if c.strip()),
        seed=args.seed, clip=args.clip or None, ref_split=args.ref_split, extractor=args.extractor,
        film_label=args.film, cache_dir=args.cache_dir, data_root=args.data_root, backend=args.backend,
        cuda_graph=args.cuda_graph,
    )
    # a preset fills what the user did not type; a typed flag always wins
    typed = dict(budgets=args.budgets, num_samples=args.num_samples, batch_size=args.batch_size,
                 ref_samples=args.ref_samples, bootstrap=args.bootstrap,
                 **{name: tuple(v for v in getattr(args, name).split(",") if v.strip())
                    for name in ("policies", "solvers", "references") if getattr(args, name) is not None})
    chosen.update(preset)
    chosen.update({name: value for name, value in typed.items() if value is not None})
    if args.dataset is not None:
        chosen["dataset"] = args.dataset
    config = CompareConfig(**chosen)
    if args.clip < 0:
        raise ValueError(f"--clip must be >= 0 (0: no clipping), got {args.clip}")
    _set_threads(args.threads)
    loaded = _load_model(args)
    trained_on = (loaded.meta or {}).get("dataset")
    if args.dataset is not None and trained_on is not None and args.dataset != trained_on:
        raise ValueError(f"--dataset {args.dataset} but the model was trained on {trained_on} (its model file says "
                         f"so): FID against other images measures nothing; omit --dataset")
    if args.dataset is None and trained_on is not None:
        config = replace(config, dataset=trained_on)
    name = args.checkpoint or f"{Path(loaded.path).stem} (shipped with stepdrop)"
    report = run_compare(loaded.model, loaded.schedule, config, args.out, model_name=name,
                         command=command_line(args.argv), progress=not args.no_progress)
    print(f"{len(report['cells'])} cells; report.md, report.json, report.csv and plots in {args.out}")
    return 0


def _add_diagnose(sub: argparse._SubParsersAction) -> None:
    from stepdrop.data import DATASETS

    p = sub.add_parser(
        "diagnose",
        help="a model's ε and x̂0 error per timestep on real images, beside a linear-Gaussian reference",
        description="Noise real test images to each timestep of a grid and measure the model's ε-MSE and x̂0-RMSE "
        "there, next to the best linear estimator built from the training set's mean and covariance (which a "
        "trained network should match or beat at high noise). Shows where a model is under-trained before anyone "
        "samples it. Prints a table with the weak range; writes <out>/diagnosis.json, diagnosis.csv and "
        "diagnosis.png. MODEL is a model shipped with stepdrop or a checkpoint / model file; several compare on "
        "one plot.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="shipped model names or files (default: the first shipped model)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="images (default: the dataset of the first model's file)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    p.add_argument("--num-images", type=int, default=256, help="test images per timestep")
    p.add_argument("--timesteps", type=_ints, default=None,
                   help="comma-separated timesteps (default 0, 50, …, 950 and T−1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draw")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call")
    _add_device_and_threads(p)
    p.add_argument("--out", default="diagnosis", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_diagnose)


def _run_diagnose(args: argparse.Namespace) -> int:
    from stepdrop._io import ensure_writable_folder
    from stepdrop.checkpoint import load_checkpoint, load_pretrained, pretrained_names
    from stepdrop.data import load_images
    from stepdrop.diagnose import diagnose, format_diagnosis, plot_diagnosis, test_and_reference, write_diagnosis

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    _set_threads(args.threads)
    out = ensure_writable_folder(args.out)
    names = args.models or list(pretrained_names()[:1])
    if not names:
        raise ValueError("no model is shipped with this installation: name a model file")
    shipped = set(pretrained_names())
    loaded = [load_pretrained(n, map_location=args.device) if n in shipped else
              load_checkpoint(n, map_location=args.device) for n in names]
    dataset = args.dataset or (loaded[0].meta or {}).get("dataset") or "fashion-mnist"
    channels = loaded[0].model.sample_shape[0]
    test = load_images(dataset, "test", root=args.data_root, channels=channels)
    train = load_images(dataset, "train", root=args.data_root, channels=channels)
    if args.num_images > len(test):
        raise ValueError(f"--num-images must be in [1, {len(test)}] (the {dataset} test split), got {args.num_images}")
    images, reference = test_and_reference(test, train, args.num_images)
    timesteps = None if args.timesteps is None else list(args.timesteps)
    curves, report = {}, {}
    for name, model in zip(names, loaded):
        rows = diagnose(model.model, model.schedule, images, reference, timesteps=timesteps,
                        batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress)
        label = Path(name).stem if name not in shipped else name
        curves[f"{label} ({model.model.prediction_type})"] = rows
        report[name] = rows
        print(f"{name} ({model.model.prediction_type}):\n{format_diagnosis(rows)}\n")
    folder = out if len(names) == 1 else None
    for name, rows in report.items():
        target = folder or out / (Path(name).stem if name not in shipped else name)
        meta = {"model": name, "dataset": dataset, "num_images": args.num_images, "seed": args.seed}
        write_diagnosis(rows, target, meta)
    png = plot_diagnosis(curves, out / "diagnosis.png")
    print(f"diagnosis.json, diagnosis.csv and {png.name} in {out}")
    return 0


def _add_optimize(sub: argparse._SubParsersAction) -> None:
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
        formatter_class=_HelpFormatter,
    )
    _add_model_source(p)
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
    _add_device_and_threads(p)
    p.add_argument("--out", default="optimized", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_optimize)


def _run_optimize(args: argparse.Namespace) -> int:
    from stepdrop._io import ensure_writable_folder
    from stepdrop.optimize import Optimized, write_timesteps
    from stepdrop.sampler import FusedSampler

    if args.clip < 0:
        raise ValueError(f"--clip must be >= 0 (0: no clipping), got {args.clip}")
    policy = Optimized(pilot_batch=args.pilot_batch, reference_solver=args.reference_solver,
                       reference_steps=args.reference_steps, max_evals=args.max_evals, seed=args.seed,
                       cache_dir=args.cache_dir, progress=not args.no_progress)
    _set_threads(args.threads)
    out = ensure_writable_folder(args.out)
    loaded = _load_model(args)
    sampler = FusedSampler(loaded.model, loaded.schedule, solver=args.solver, clip=args.clip or None,
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


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _file_name(label: str) -> str:
    return label.replace(":", "_").replace("@", "_n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepdrop",
        description="Fast sampling for tiny diffusion models: step policies, fused kernels, counted costs.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub)
    _add_export(sub)
    _add_sample(sub)
    _add_compare(sub)
    _add_optimize(sub)
    _add_diagnose(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # the command as typed, for reports
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError) as exc:
        print(f"stepdrop {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
