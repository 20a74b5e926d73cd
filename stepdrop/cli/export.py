"""``stepdrop export``: write a checkpoint as a model file."""

from __future__ import annotations

import argparse
import json

from stepdrop.cli._common import HelpFormatter


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint's EMA weights as a model file",
        description="Write the EMA weights of a training checkpoint, with its model config, noise schedule and a "
        "model card, as a file that load_checkpoint() reads (fp16 by default).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("checkpoint", help="training checkpoint (checkpoint.pt)")
    p.add_argument("out", help="model file to write")
    p.add_argument("--fp32", action="store_true", help="keep float32 weights (default: fp16 storage)")
    p.add_argument("--meta", default="{}", help="JSON object merged into the model card")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stepdrop.checkpoint import export_model

    meta = json.loads(args.meta)
    if not isinstance(meta, dict):
        raise ValueError("--meta must be a JSON object")
    print(f"saved {export_model(args.checkpoint, args.out, half=not args.fp32, meta=meta)}")
    return 0
