#!/usr/bin/env python
"""Train the Fashion-MNIST classifier behind stepdrop's "classifier score" and write its file.

    OMP_NUM_THREADS=1 python scripts/train_classifier.py --threads 1

writes ``stepdrop/weights/fashion_mnist_classifier.pth`` and, beside it, ``<out>.json``: one
JSON line with the metrics (test accuracy on the full 10k test split, training time, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stepdrop._io import atomic_write_bytes
from stepdrop.classifier import train_classifier

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "stepdrop" / "weights" / "fashion_mnist_classifier.pth"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model file to write (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5, help="passes over the 60k training images (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=128, help="default: %(default)s")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (warm-up, cosine decay) (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, order, dropout and augmentation (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default: fp16)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    metrics = train_classifier(args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                               progress=not args.no_progress, half=not args.fp32)
    metrics.pop("path", None)  # the JSON sits beside the weights; no machine-specific path in it
    metrics["command"] = " ".join(["scripts/train_classifier.py", *(argv if argv is not None else sys.argv[1:])])
    metrics["file_bytes"] = Path(args.out).stat().st_size
    json_path = Path(str(args.out) + ".json")
    atomic_write_bytes(json_path, (json.dumps(metrics, sort_keys=True) + "\n").encode())
    print(f"test accuracy {metrics['test_accuracy']:.4f} on {metrics['test_images']} {metrics['test_data']} images; "
          f"{metrics['train_time_s']:.0f} s; wrote {args.out} ({metrics['file_bytes']} bytes) and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
