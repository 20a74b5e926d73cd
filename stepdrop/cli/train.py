"""``stepdrop train``: train a model."""

from __future__ import annotations

import argparse
from dataclasses import fields

from stepdrop.cli._common import HelpFormatter, ints


def add_parser(sub: argparse._SubParsersAction) -> None:
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
        formatter_class=HelpFormatter,
    )
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="training images")
    p.add_argument("--data-root", default=None, help="folder with the dataset files (default: the dataset's standard place)")
    p.add_argument("--download", action="store_true",
                   help="cifar10: download the batches (torchvision) when they are absent; needs internet")
    p.add_argument("--channels", type=int, choices=(1, 3), default=d.channels, help="image channels (Fashion-MNIST: 1, or 3 replicated)")
    p.add_argument("--base-channels", type=int, default=d.base_channels, help="UNet width")
    p.add_argument("--channel-mults", type=ints, default=d.channel_mults, help="width multiplier per resolution, e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks, help="residual blocks per resolution")
    p.add_argument("--attention-resolutions", type=ints, default=d.attention_resolutions, help="resolutions with self-attention, e.g. 16 (empty: none)")
    p.add_argument("--dropout", type=float, default=d.dropout, help="dropout in the residual blocks")
    p.add_argument("--prediction-type", choices=PREDICTION_TYPES, default=d.prediction_type,
                   help="what the network learns to output: v_prediction (v = α·ε − σ·x0, MSE weighted so that "
                        "high noise is trained: the default), epsilon (the noise ε; the DDPM and StepDrop papers' "
                        "objective, whose MSE barely trains t ≳ 750, so DDIM then needs clipping) or sample (x0)")
    p.add_argument("--init", default=None,
                   help="warm-start from this model file or checkpoint (its EMA weights; same architecture, any "
                        "prediction type; fresh optimizer)")
    p.add_argument("--slimmable", action="store_true",
                   help="train a SlimmableTinyUNet that also runs at widths 0.75, 0.5 and 0.25 (DDSM's sandwich step: "
                        "three passes per batch, at width 1, 0.25 and one of 0.75/0.5); warm-start it from a "
                        "TinyUNet with --init")
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stepdrop.train import TrainConfig, train

    names = {f.name for f in fields(TrainConfig)}
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    try:
        path = train(config, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    print(f"saved {path}")
    return 0
