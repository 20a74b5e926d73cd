"""Train a diffusion model: the DDPM objective (Ho et al. 2020, Algorithm 1) in one of three
parameterisations.

loss = ‖y − F_θ(x_t, t)‖², x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, t ~ U{0..T−1}, ε ~ N(0, I), with the
target y = ε ("epsilon", the DDPM paper's and the StepDrop paper's objective), v = α_t·ε − σ_t·x0
("v_prediction", Salimans & Ho 2022, the default) or x0 ("sample"); :mod:`stepdrop.prediction`
says what each weights at high noise (ε-MSE barely trains t ≳ 750; v-MSE does). AdamW
(Loshchilov & Hutter 2019), linear warm-up then cosine decay (or constant), EMA of the
weights, gradient-norm clipping, bf16 autocast on a GPU. ``init`` warm-starts from a model
file's weights with a fresh optimizer, in any parameterisation (an ε-model's weights read as a
v-model are ε̂ = σ_t·x_t + α_t·F: right at both ends of the chain, wrong in between).

Every random draw (data order, flips, t, ε, dropout) comes from generators whose states are
saved in the checkpoint, so ``resume=True`` continues the run bit for bit on the CPU.
Checkpoints are written atomically every ``checkpoint_every`` steps and at the end. Ctrl-C
(SIGINT) is deferred to the end of the step in progress, then the run is saved and
``KeyboardInterrupt`` raised: a checkpoint never holds a half-applied step.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stepdrop._io import ensure_writable_folder
from stepdrop._validation import check_bool, check_choice, check_float, check_int
from stepdrop.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save, read_file
from stepdrop.data import DATASETS, ImageData, load_images
from stepdrop.models import TinyUNet, build_model
from stepdrop.models.slimmable import WIDTHS
from stepdrop.ops.reference import q_sample
from stepdrop.prediction import check_prediction_type, training_target
from stepdrop.schedule import NoiseSchedule

__all__ = ["TrainConfig", "train", "lr_at"]

SCHEDULES = ("linear", "cosine")
LR_SCHEDULES = ("cosine", "constant")
# Settings that may change between a run and its resumption: bookkeeping (where the data
# comes from included), and `steps`, which extends the run (under the cosine LR schedule it
# also stretches the remaining decay).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "log_every", "out", "data_root", "device", "download")
# What a checkpoint written before a setting existed was trained with.
LEGACY_SETTINGS = {"prediction_type": "epsilon", "init": None, "slimmable": False}
# Architecture keys a warm start (`init`) may change: they hold no weights.
INIT_MAY_CHANGE = ("dropout", "prediction_type", "zero_init_output", "widths")


@dataclass
class TrainConfig:
    """Everything that defines a training run (stored in every checkpoint)."""

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    channels: int = 1
    base_channels: int = 32
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    prediction_type: str = "v_prediction"
    init: str | None = None  # model file (or checkpoint) whose weights start the run; fresh optimizer
    schedule: str = "linear"
    num_timesteps: int = 1000
    steps: int = 20_000
    batch_size: int = 64
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    warmup: int = 500
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    log_every: int = 50
    out: str = "runs/fashion-mnist"
    device: str = "auto"
    download: bool = False  # cifar10: fetch the batches with torchvision when absent (needs internet)
    slimmable: bool = False  # DDSM sandwich training of a SlimmableTinyUNet (widths 1, 0.75, 0.5, 0.25)

    def __post_init__(self) -> None:
        self.channel_mults = tuple(self.channel_mults)
        self.attention_resolutions = tuple(self.attention_resolutions)
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        for name in ("steps", "batch_size", "checkpoint_every", "log_every", "num_timesteps"):
            check_int(name, getattr(self, name), low=1 if name != "num_timesteps" else 2)
        check_int("warmup", self.warmup, low=0)
        check_int("seed", self.seed, low=0)
        check_float("lr", self.lr, low=0.0, low_open=True)
        check_float("weight_decay", self.weight_decay, low=0.0)
        check_float("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        check_float("grad_clip", self.grad_clip, low=0.0)
        check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        check_bool("download", self.download)
        check_bool("slimmable", self.slimmable)
        check_prediction_type(self.prediction_type)
        if self.init is not None and not isinstance(self.init, str):
            raise TypeError(f"init must be a path string or None, got {type(self.init).__name__}")

    def model_config(self) -> dict[str, Any]:
        return {
            "in_channels": self.channels,
            "image_size": 32,
            "base_channels": self.base_channels,
            "channel_mults": list(self.channel_mults),
            "num_res_blocks": self.num_res_blocks,
            "attention_resolutions": list(self.attention_resolutions),
            "dropout": self.dropout,
            "prediction_type": self.prediction_type,
            **({"widths": list(WIDTHS)} if self.slimmable else {}),
        }

    def noise_schedule(self) -> NoiseSchedule:
        return getattr(NoiseSchedule, self.schedule)(self.num_timesteps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channel_mults"] = list(self.channel_mults)
        d["attention_resolutions"] = list(self.attention_resolutions)
        return d


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then cosine or constant."""
    if config.warmup and step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    if config.lr_schedule == "constant":
        return config.lr
    span = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / span, 1.0)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


class _Run:
    """The mutable state of one training run, (de)serialised as a checkpoint."""

    def __init__(self, config: TrainConfig, device: torch.device, warm_start: bool = True):
        self.config = config
        self.device = device
        self.schedule = config.noise_schedule()
        torch.manual_seed(config.seed)  # initial weights; dropout later draws from this RNG too
        self.model = build_model({**config.model_config(), "zero_init_output": True}).to(device)
        if config.init is not None and warm_start:
            _warm_start(self.model, config.init)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.data_gen = torch.Generator().manual_seed(config.seed + 1)
        self.noise_gen = torch.Generator().manual_seed(config.seed + 2)
        self.step = 0
        self.epoch = 0
        self.position = 0
        self.order: torch.Tensor | None = None
        self.wall_time_s = 0.0
        self.losses: list[float] = []
        self.pending: list[torch.Tensor] = []  # losses still on the device (read in batches: no sync per step)

    def flush_losses(self) -> None:
        """Move the pending losses to :attr:`losses` (one host sync for all of them)."""
        if self.pending:
            self.losses.extend(torch.stack(self.pending).tolist())
            self.pending.clear()

    def state(self) -> dict[str, Any]:
        self.flush_losses()
        return {
            "format": CHECKPOINT_FORMAT,
            "version": FORMAT_VERSION,
            "model_config": self.model.config,
            "schedule": self.schedule.to_config(),
            "train_config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "data": {"epoch": self.epoch, "position": self.position, "order": self.order},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "data": self.data_gen.get_state(),
                "noise": self.noise_gen.get_state(),
            },
            "wall_time_s": self.wall_time_s,
            "losses": list(self.losses),
            "meta": {"dataset": self.config.dataset, "step": self.step, "train_wall_time_s": self.wall_time_s,
                     "parameters": sum(p.numel() for p in self.model.parameters())},
        }

    def load(self, payload: dict[str, Any]) -> None:
        self.model.load_state_dict(payload["model"])
        self.ema.load_state_dict(payload["ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.step = int(payload["step"])
        data = payload["data"]
        self.epoch, self.position, self.order = int(data["epoch"]), int(data["position"]), data["order"]
        rng = payload["rng"]  # generator states are CPU byte tensors, wherever the checkpoint was mapped
        torch.set_rng_state(rng["torch"].cpu())
        if rng["cuda"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([state.cpu() for state in rng["cuda"]])
        self.data_gen.set_state(rng["data"].cpu())
        self.noise_gen.set_state(rng["noise"].cpu())
        self.wall_time_s = float(payload["wall_time_s"])
        self.losses = list(payload["losses"])

    def next_indices(self, n_items: int) -> torch.Tensor:
        """The next batch of example indices: a fresh permutation per epoch, no partial batches."""
        B = self.config.batch_size
        if self.order is None or self.position + B > n_items:
            self.order = torch.randperm(n_items, generator=self.data_gen)
            self.position = 0
            self.epoch += 1
        idx = self.order[self.position : self.position + B]
        self.position += B
        return idx


def train(config: TrainConfig, *, resume: bool = False, data: ImageData | None = None, progress: bool = True) -> Path:
    """Train (or resume) a run; returns the path of its final checkpoint ``<out>/checkpoint.pt``.

    Args:
        config: the run's settings.
        resume: continue from ``<out>/checkpoint.pt``; its stored config must match ``config``
            except for :data:`RESUMABLE_CHANGES` (e.g. a larger ``steps``).
        data: images to train on (default: ``load_images(config.dataset, "train", ...)``).
        progress: show a tqdm bar with the loss and it/s.
    """
    out = Path(config.out)
    ckpt_path = out / "checkpoint.pt"
    ensure_writable_folder(out)
    if not resume and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
    device = _pick_device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions once
    data = data if data is not None else load_images(config.dataset, "train", root=config.data_root,
                                                     channels=config.channels, download=config.download)
    if data.num_channels != config.channels:
        raise ValueError(f"channels={config.channels} but the data has {data.num_channels} channel(s)")
    if len(data) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} exceeds the {len(data)} training images")

    if resume:
        if not ckpt_path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        payload = read_file(ckpt_path, map_location=device)
        saved = {**LEGACY_SETTINGS, **payload.get("train_config", {})}
        if config.init is None:  # the warm start is history once the run has a checkpoint
            config = replace(config, init=saved["init"])
        _check_same_config(saved, config, ckpt_path)
        run = _Run(config, device, warm_start=False)
        run.load(payload)
    else:
        run = _Run(config, device)

    table = run.schedule.table(device, torch.float32)
    T = run.schedule.num_timesteps
    log_path = out / "log.jsonl"
    bar = _progress(run.step, config.steps, progress)
    start = time.perf_counter()
    with _DeferredInterrupt() as interrupt:
        try:
            while run.step < config.steps and not interrupt.requested:
                _train_step(run, data, table, T)
                if bar is not None:
                    bar.update(1)
                if run.step % config.log_every == 0:
                    run.flush_losses()
                    recent = run.losses[-config.log_every:]
                    if bar is not None:
                        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_at(run.step - 1, config):.2e}")
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": run.step, "loss": sum(recent) / len(recent),
                                            "lr": lr_at(run.step - 1, config)}) + "\n")
                if run.step % config.checkpoint_every == 0 and run.step < config.steps:
                    run.wall_time_s += time.perf_counter() - start
                    start = time.perf_counter()
                    atomic_save(run.state(), ckpt_path)
        except KeyboardInterrupt:
            # raised inside a step (not through the SIGINT handler): the in-memory state may be
            # half-updated, so keep the last checkpoint on disk untouched
            print(f"interrupted inside step {run.step + 1}: kept the last checkpoint ({ckpt_path})")
            raise
        finally:
            if bar is not None:
                bar.close()
    run.wall_time_s += time.perf_counter() - start
    atomic_save(run.state(), ckpt_path)
    if interrupt.requested:
        print(f"interrupted at step {run.step}: saved {ckpt_path} (continue with --resume)")
        raise KeyboardInterrupt
    return ckpt_path


def _train_step(run: _Run, data: ImageData, table: torch.Tensor, T: int) -> None:
    """One optimizer step of the DDPM objective; its loss joins ``run.pending``.

    A slimmable run takes DDSM's sandwich step (Wang et al. 2024, sec. 3.2): on the same
    images, three passes with their own t and noise, at width 1, at the narrowest width, and
    at one drawn from the widths between; their gradients add up before one clipped optimizer
    step. The loss logged is their mean."""
    config, device = run.config, run.device
    idx = run.next_indices(len(data))
    x0 = data.batch(idx, generator=run.data_gen).to(device)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_at(run.step, config)
    run.model.train()
    run.optimizer.zero_grad(set_to_none=True)
    if config.slimmable:
        widths = run.model.widths
        middle = widths[1:-1]
        pick = middle[int(torch.randint(0, len(middle), (1,), generator=run.noise_gen))] if middle else widths[-1]
        passes = (widths[0], widths[-1], pick)
    else:
        passes = (None,)
    losses = []
    for width in passes:
        t = torch.randint(0, T, (x0.shape[0],), generator=run.noise_gen).to(device)
        eps = torch.randn(x0.shape, generator=run.noise_gen).to(device)
        x_t = q_sample(x0, eps, table, t)
        target = training_target(x0, eps, table, t, config.prediction_type)
        if width is not None:
            run.model.set_width(width)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = run.model(x_t, t)
        loss = F.mse_loss(pred.float(), target)
        loss.backward()
        losses.append(loss.detach())
    if config.slimmable:
        run.model.set_width(1.0)
    loss = torch.stack(losses).mean()
    if config.grad_clip > 0:
        nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip)
    run.optimizer.step()
    _ema_update(run.ema, run.model, config.ema_decay)
    run.step += 1
    run.pending.append(loss.detach())


class _DeferredInterrupt:
    """Turn SIGINT into a flag the loop checks between steps (main thread only; elsewhere
    signals cannot be handled and KeyboardInterrupt behaves as usual)."""

    def __enter__(self) -> "_DeferredInterrupt":
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    # one multi-tensor kernel instead of one lerp per parameter (~100 launches on a GPU)
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def _warm_start(model: TinyUNet, path: str) -> None:
    """Load the weights of a model file or checkpoint (its EMA weights) into ``model``, whose
    architecture must match it except for :data:`INIT_MAY_CHANGE`."""
    payload = read_file(path)
    theirs = {k: v for k, v in build_model(payload["model_config"]).config.items() if k not in INIT_MAY_CHANGE}
    ours = {k: v for k, v in model.config.items() if k not in INIT_MAY_CHANGE}
    diffs = [f"{k}: {theirs.get(k)!r} there vs {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]
    if diffs:
        raise ValueError(f"init={path} has another architecture ({'; '.join(diffs)}); only {INIT_MAY_CHANGE} "
                         f"may differ from the run's")
    model.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in payload["ema"].items()})


def _check_same_config(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    current = config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {current[k]!r}"
             for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if diffs:
        raise ValueError(f"cannot resume {path} with a different config ({'; '.join(diffs)}); "
                         f"only {RESUMABLE_CHANGES} may change")


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _progress(done: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
