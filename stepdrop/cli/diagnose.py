"""``stepdrop diagnose``: the model's error per timestep."""

from __future__ import annotations

import argparse
from pathlib import Path

from stepdrop.cli._common import HelpFormatter, add_device_and_threads, ints, set_threads


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        formatter_class=HelpFormatter,
    )
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="shipped model names or files (default: the first shipped model)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="images (default: the dataset of the first model's file)")
    p.add_argument("--data-root", default=None, help="folder with the dataset files")
    p.add_argument("--num-images", type=int, default=256, help="test images per timestep")
    p.add_argument("--timesteps", type=ints, default=None,
                   help="comma-separated timesteps (default 0, 50, …, 950 and T−1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draw")
    p.add_argument("--batch-size", type=int, default=256, help="images per model call")
    add_device_and_threads(p)
    p.add_argument("--out", default="diagnosis", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    set_threads(args.threads)
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
