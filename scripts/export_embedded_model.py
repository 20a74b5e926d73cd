"""Export a training checkpoint as the embedded model and write its model card.

Every figure in the card is read from the checkpoint or measured here: optimizer steps and
training wall time (stored by ``stepdrop train``), parameters, GFLOPs per model call
(``torch.utils.flop_counter`` on one batch-1 forward, attention included), file size, and the
per-timestep diagnosis (``stepdrop diagnose``) of the new model beside the models named by
``--compare`` (a PNG in docs/ and a table).

    python scripts/export_embedded_model.py runs/fm/checkpoint.pt --name fashion-mnist \
        --command "stepdrop train ..." --hardware "2-core x86-64 CPU" --compare fashion-mnist-eps
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
    parser.add_argument("--compare", default="", help="comma-separated shipped models or files to diagnose beside it")
    parser.add_argument("--notes", default="", help="a paragraph for the card: how the run went")
    parser.add_argument("--num-images", type=int, default=1024, help="test images for the diagnosis")
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
        "prediction_type": loaded.model.prediction_type,
    }
    out = export_model(args.checkpoint, ROOT / "stepdrop" / "weights" / f"{args.name}.pt", half=True, meta=meta)
    meta["file_bytes"] = out.stat().st_size
    schedule = payload["schedule"]
    diagnosis = _diagnosis_section(args, out, meta.get("dataset") or "fashion-mnist")
    card = f"""# Model card: `{args.name}` (embedded in stepdrop)

A TinyUNet diffusion model ({_PARAMETERISATION[meta['prediction_type']]}, DDPM objective) trained
on Fashion-MNIST (60k train images, padded to 32×32, 1 channel, scaled to [−1, 1]).
Load it with `stepdrop.checkpoint.load_pretrained("{args.name}")`; samplers read its
prediction type from the file.

| | |
|---|---|
| prediction type | `{meta['prediction_type']}` |
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

{args.notes}
{diagnosis}
Samples: `docs/samples/`; quality by sampler and budget: `docs/results/`.
"""
    atomic_write_bytes(args.card, card.encode())
    print(json.dumps(meta, indent=2))


_PARAMETERISATION = {"epsilon": "ε-prediction", "v_prediction": "v-prediction, v = α_t·ε − σ_t·x0",
                     "sample": "x0-prediction"}


def _diagnosis_section(args: argparse.Namespace, model_file: Path, dataset: str) -> str:
    """`stepdrop diagnose` of the new model and the --compare models: a table and docs/diagnosis.png."""
    from stepdrop.checkpoint import load_pretrained, pretrained_names
    from stepdrop.data import load_images
    from stepdrop.diagnose import diagnose, plot_diagnosis, test_and_reference, weak_range

    test, reference = test_and_reference(load_images(dataset, "test"), load_images(dataset, "train"), args.num_images)
    names = [args.name] + [n for n in args.compare.split(",") if n.strip()]
    shipped = set(pretrained_names())
    curves = {}
    for name in names:
        loaded = load_checkpoint(model_file) if name == args.name else \
            load_pretrained(name) if name in shipped else load_checkpoint(name)
        curves[f"{name} ({loaded.model.prediction_type})"] = diagnose(loaded.model, loaded.schedule, test, reference)
    plot_diagnosis(curves, ROOT / "docs" / "diagnosis.png")
    labels = list(curves)
    head = "| t | SNR | " + " | ".join(f"ε-MSE {n}" for n in labels) + " | ε-MSE linear | " + \
        " | ".join(f"x̂0-RMSE {n}" for n in labels) + " | x̂0-RMSE linear |"
    lines = [head, "|" + "---|" * (4 + 2 * len(labels))]
    first = curves[labels[0]]
    for i, r in enumerate(first):
        eps = " | ".join(f"{curves[n][i].eps_mse:.3g}" for n in labels)
        x0 = " | ".join(f"{curves[n][i].x0_rmse:.3g}" for n in labels)
        lines.append(f"| {r.t} | {r.snr:.3g} | {eps} | {r.linear_eps_mse:.3g} | {x0} | {r.linear_x0_rmse:.3g} |")
    weak = []
    for n in labels:
        span = weak_range(curves[n])
        weak.append(f"`{n}`: " + (f"t = {span[0]}..{span[1]}" if span else "none"))
    return f"""
## Diagnosis: error per timestep (`stepdrop diagnose`)

{args.num_images} Fashion-MNIST test images noised to each t (one fixed noise draw), against the
best linear estimator built from the training set's mean and covariance (docs/DESIGN.md §4), which
a trained network should match or beat at high noise. Weak range (ε-MSE more than 2× the
reference): {"; ".join(weak)}.

![diagnosis](diagnosis.png)

{chr(10).join(lines)}
"""


if __name__ == "__main__":
    main()
