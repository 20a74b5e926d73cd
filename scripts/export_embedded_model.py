"""Export a training checkpoint as the embedded model and write its model card.

Every figure in the card is read from the checkpoint or measured here: optimizer steps and
training wall time (stored by ``stepdrop train``), parameters, GFLOPs per model call
(``torch.utils.flop_counter`` on one batch-1 forward, attention included), file size.

    python scripts/export_embedded_model.py runs/fm/checkpoint.pt --name fashion-mnist \
        --command "stepdrop train ..." --hardware "2-core x86-64 CPU"
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from stepdrop._io import atomic_write_bytes
from stepdrop.checkpoint import export_model, load_checkpoint, read_file
from stepdrop.cost import gflops_per_call

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="training checkpoint (checkpoint.pt)")
    parser.add_argument("--name", default="fashion-mnist", help="model name (file stepdrop/weights/<name>.pt)")
    parser.add_argument("--command", required=True, help="the training command, for the card")
    parser.add_argument("--hardware", required=True, help="where it was trained, for the card")
    parser.add_argument("--card", default=str(ROOT / "docs" / "MODEL_CARD.md"), help="model card to write")
    args = parser.parse_args()

    payload = read_file(args.checkpoint)
    train_config = payload.get("train_config", {})
    loaded = load_checkpoint(args.checkpoint)
    params = sum(p.numel() for p in loaded.model.parameters())
    flops = gflops_per_call(loaded.model)
    recent = payload["losses"][-500:]
    meta = {
        "name": args.name,
        "dataset": train_config.get("dataset"),
        "steps": int(payload["step"]),
        "batch_size": train_config.get("batch_size"),
        "train_wall_time_s": round(float(payload["wall_time_s"]), 1),
        "hardware": args.hardware,
        "command": args.command,
        "parameters": params,
        "gflops_per_call": round(flops, 4),
        "final_loss_mean_last_500": round(sum(recent) / len(recent), 5),
        "torch": str(torch.__version__),
        "weights": "EMA, fp16 storage",
    }
    out = export_model(args.checkpoint, ROOT / "stepdrop" / "weights" / f"{args.name}.pt", half=True, meta=meta)
    meta["file_bytes"] = out.stat().st_size
    schedule = payload["schedule"]
    card = f"""# Model card: `{args.name}` (embedded in stepdrop)

A TinyUNet noise-prediction model (ε-parameterisation, DDPM objective) trained on
Fashion-MNIST (60k train images, padded to 32×32, 1 channel, scaled to [−1, 1]).
Load it with `stepdrop.checkpoint.load_pretrained("{args.name}")`.

| | |
|---|---|
| training command | `{args.command}` |
| optimizer steps | {meta['steps']} (batch {meta['batch_size']}) |
| training wall time | {meta['train_wall_time_s'] / 3600:.2f} h |
| hardware | {args.hardware} |
| parameters | {params:,} |
| GFLOPs per model call (batch 1, `torch.utils.flop_counter`) | {flops:.3f} |
| mean training loss, last 500 steps | {meta['final_loss_mean_last_500']} |
| noise schedule | {schedule['kind']}, T = {schedule['num_timesteps']} |
| architecture | `{json.dumps(loaded.model.config)}` |
| stored weights | EMA (decay {train_config.get('ema_decay')}), fp16, {meta['file_bytes'] / 1e6:.2f} MB |
| torch | {torch.__version__} ({platform.machine()}) |

All figures are read from the checkpoint or measured by `scripts/export_embedded_model.py`.
The model was trained for as long as one working session allowed on a 2-core CPU; it is
small and under-trained by the standards of the field — expect recognisable but soft
clothing shapes, not state-of-the-art samples. Samples: `docs/samples/`.
"""
    atomic_write_bytes(args.card, card.encode())
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
