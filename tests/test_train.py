"""stepdrop.train, stepdrop.checkpoint and the `stepdrop train|export` CLI.

Every run here is a tiny TinyUNet (base_channels 8, two levels, no attention) on a few
synthetic 32×32 images, a handful of steps on the CPU, so the whole file takes seconds.
Expected values come from independent computations (a model rebuilt by hand, an
uninterrupted run, the EMA formula written out), never from the code under test.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import signal
import re
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import stepdrop.train as train_mod
from stepdrop.checkpoint import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    CheckpointError,
    atomic_save,
    export_model,
    load_checkpoint,
    load_pretrained,
    pretrained_names,
    read_file,
)
from stepdrop.cli import main
from stepdrop.data import ImageData
from stepdrop.models import TinyUNet
from stepdrop.train import TrainConfig, lr_at, train

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=())
# The keys of a training checkpoint that define the state of the run (wall time and the
# model card legitimately differ between runs).
STATE_KEYS = ("model", "ema", "optimizer", "step", "data", "rng", "losses")


# ----------------------------------------------------------------------------- helpers
def make_data(n: int = 12, channels: int = 1, seed: int = 0, hflip: bool = False) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.int64)
    return ImageData(images, labels, "fashion-mnist", "train", hflip=hflip)


def make_config(out: Path, **overrides) -> TrainConfig:
    base = dict(TINY, dataset="fashion-mnist", channels=1, dropout=0.0, schedule="linear", num_timesteps=50,
                steps=6, batch_size=4, lr=1e-3, lr_schedule="constant", warmup=2, ema_decay=0.9, grad_clip=1.0,
                seed=0, checkpoint_every=3, log_every=2, out=str(out), device="cpu")
    base.update(overrides)
    return TrainConfig(**base)


def load_raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tree_diffs(a, b, path: str = "") -> list[str]:
    """Paths where two nested structures of dicts, lists and tensors differ (tensors: torch.equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [path or "<root>"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"]
        return [d for k in a for d in tree_diffs(a[k], b[k], f"{path}.{k}" if path else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in tree_diffs(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def state_diffs(a: dict, b: dict) -> list[str]:
    return tree_diffs({k: a[k] for k in STATE_KEYS}, {k: b[k] for k in STATE_KEYS})


def summarize(diffs: list[str]) -> str:
    """Differing paths, tensors of one group counted rather than listed (e.g. 'model: 110 tensors')."""
    groups: dict[str, int] = {}
    rest = []
    for d in diffs:
        head = d.split(".")[0] if d.split(".")[0] in ("model", "ema") else ".".join(d.split(".")[:2])
        if head in ("model", "ema", "optimizer.state") and ":" not in d:
            groups[head] = groups.get(head, 0) + 1
        else:
            rest.append(d)
    return ", ".join([f"{k}: {n} tensors" for k, n in groups.items()] + rest)


def record_saves(monkeypatch) -> list[dict]:
    """Wrap train's atomic_save: keep a deep copy of every payload it writes, in order."""
    saved: list[dict] = []
    real = train_mod.atomic_save

    def recording(payload, path):
        saved.append(copy.deepcopy(payload))
        return real(payload, path)

    monkeypatch.setattr(train_mod, "atomic_save", recording)
    return saved


def initial_model(config: TrainConfig) -> TinyUNet:
    """The model _Run builds before step 1, rebuilt independently: seed, then construct."""
    torch.manual_seed(config.seed)
    return TinyUNet(**config.model_config(), zero_init_output=True)


def raise_on_call(monkeypatch, owner, name: str, k: int) -> None:
    """Make ``owner.name`` raise KeyboardInterrupt on its k-th call (1-based), before doing anything."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


def sigint_on_call(monkeypatch, owner, name: str, k: int) -> None:
    """Send this process a real SIGINT (what Ctrl-C does) during the k-th call of ``owner.name``."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


# ----------------------------------------------------------------------------- shared runs
# Uninterrupted reference run: dropout, hflip and both generators all draw random numbers,
# and every step is recorded (checkpoint_every=1 does not change the math).
REF_STEPS = 5


def ref_config(out: Path, **overrides) -> TrainConfig:
    return make_config(out, dropout=0.1, steps=REF_STEPS, lr_schedule="cosine", warmup=1, **overrides)


def ref_data() -> ImageData:
    return make_data(n=10, hflip=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """{step: payload} of an uninterrupted run, one entry per step (1..REF_STEPS)."""
    out = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    try:
        saved = record_saves(mp)
        train(ref_config(out, checkpoint_every=1), data=ref_data(), progress=False)
    finally:
        mp.undo()
    by_step = {p["step"]: p for p in saved}
    assert sorted(by_step) == list(range(1, REF_STEPS + 1))
    return by_step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run (cosine β schedule) whose EMA clearly differs from the model."""
    out = tmp_path_factory.mktemp("trained")
    config = make_config(out, steps=4, schedule="cosine", ema_decay=0.5, lr=3e-3, warmup=0)
    path = train(config, data=make_data(), progress=False)
    return config, path


# ----------------------------------------------------------------------------- 1. learning, EMA
def test_loss_goes_down_on_learnable_data(tmp_path):
    # Every image is the same square: x0 is known, so ε is a learnable function of (x_t, t).
    images = torch.zeros(8, 1, 32, 32, dtype=torch.uint8)
    images[:, :, 8:24, 8:24] = 255
    data = ImageData(images, torch.zeros(8, dtype=torch.int64), "fashion-mnist", "train")
    config = make_config(tmp_path / "run", steps=40, lr=3e-3, warmup=0, checkpoint_every=100, log_every=10)
    losses = load_raw(train(config, data=data, progress=False))["losses"]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > 0.7  # zero-initialised output: ε̂ = 0 at the start, loss ≈ E[ε²] = 1
    assert last < 0.6 * first, (first, last)
    # log.jsonl: one line per log_every steps, the mean of those steps' losses.
    lines = [json.loads(s) for s in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [10, 20, 30, 40]
    assert lines[-1]["loss"] == pytest.approx(sum(losses[30:]) / 10)
    assert lines[-1]["lr"] == pytest.approx(3e-3)


def test_ema_follows_the_update_formula_step_by_step(tmp_path, monkeypatch):
    d = 0.75
    config = make_config(tmp_path / "run", steps=3, checkpoint_every=1, ema_decay=d, warmup=0, lr=1e-2)
    saved = record_saves(monkeypatch)
    train(config, data=make_data(), progress=False)
    assert [p["step"] for p in saved] == [1, 2, 3]  # every checkpoint_every steps, the last one once

    init = initial_model(config).state_dict()
    prev_ema = init
    for p in saved:
        model, ema = p["model"], p["ema"]
        assert set(ema) == set(init)
        for k in init:
            expected = prev_ema[k] + (1 - d) * (model[k] - prev_ema[k])  # e ← e + (1−d)(p − e)
            torch.testing.assert_close(ema[k], expected, rtol=0, atol=1e-7, msg=f"step {p['step']} {k}")
        prev_ema = ema
    # Step 1 moves only conv_out (zero-initialised output: no gradient reaches the rest yet);
    # by step 3 the optimizer has moved (almost) every tensor.
    moved = [k for k in init if not torch.equal(saved[0]["model"][k], init[k])]
    assert sorted(moved) == ["conv_out.bias", "conv_out.weight"]
    moved = [k for k in init if not torch.equal(saved[-1]["model"][k], init[k])]
    assert len(moved) > 0.9 * len(init)

    # After one step the EMA lies between the initial weights and the model, and differs from both.
    first = saved[0]
    for k in init:
        lo, hi = torch.minimum(init[k], first["model"][k]), torch.maximum(init[k], first["model"][k])
        assert ((first["ema"][k] >= lo - 1e-7) & (first["ema"][k] <= hi + 1e-7)).all(), k
    assert not torch.equal(first["ema"]["conv_out.weight"], first["model"]["conv_out.weight"])
    assert not torch.equal(first["ema"]["conv_out.weight"], init["conv_out.weight"])


def test_ema_update_unit():
    ema, model = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    nn.init.zeros_(ema.weight), nn.init.ones_(model.weight)
    model.running_mean.fill_(3.0)
    train_mod._ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((2,), 0.1))  # 0 + 0.1·(1 − 0)
    assert torch.equal(ema.running_mean, model.running_mean)  # buffers are copied, not averaged
    assert torch.equal(model.weight, torch.ones(2))  # the model is untouched


def test_lr_schedule():
    c = make_config(Path("unused"), steps=10, warmup=4, lr=1.0, lr_schedule="cosine")
    assert [lr_at(s, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, c) == pytest.approx(1.0)
    assert lr_at(7, c) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert lr_at(10, c) == pytest.approx(0.0, abs=1e-12) and lr_at(50, c) == pytest.approx(0.0, abs=1e-12)
    const = make_config(Path("unused"), steps=10, warmup=0, lr=0.5, lr_schedule="constant")
    assert {lr_at(s, const) for s in range(12)} == {0.5}


# ----------------------------------------------------------------------------- 2. exact resume
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_resume_of_a_shorter_run_equals_a_straight_run(tmp_path, dropout):
    # Constant LR after the warm-up: lr_at does not depend on `steps`, so 3 + 3 steps must be 6 steps.
    data = make_data()
    straight = load_raw(train(make_config(tmp_path / "a", steps=6, dropout=dropout), data=data, progress=False))

    first = train(make_config(tmp_path / "b", steps=3, dropout=dropout), data=data, progress=False)
    assert load_raw(first)["step"] == 3
    # steps, checkpoint_every and log_every may change on resume.
    resumed_cfg = make_config(tmp_path / "b", steps=6, dropout=dropout, checkpoint_every=5, log_every=1)
    resumed = load_raw(train(resumed_cfg, resume=True, data=data, progress=False))

    assert resumed["step"] == straight["step"] == 6
    assert len(resumed["losses"]) == 6 and resumed["losses"] == straight["losses"]
    assert state_diffs(straight, resumed) == []
    assert straight["optimizer"]["state"], "optimizer state must be non-empty for the comparison to mean anything"


def test_resume_from_a_mid_run_checkpoint_equals_the_straight_run(tmp_path, monkeypatch, reference_run):
    # Cosine LR, dropout, hflip: resuming the step-2 checkpoint of a 5-step run reproduces its steps 3..5.
    mid = tmp_path / "resumed"
    mid.mkdir()
    atomic_save(reference_run[2], mid / "checkpoint.pt")
    final = load_raw(train(ref_config(mid), resume=True, data=ref_data(), progress=False))
    assert final["step"] == REF_STEPS
    assert state_diffs(reference_run[REF_STEPS], final) == []


def test_resume_past_the_target_changes_nothing(tmp_path):
    data = make_data()
    path = train(make_config(tmp_path / "r", steps=3), data=data, progress=False)
    before = load_raw(path)
    after = load_raw(train(make_config(tmp_path / "r", steps=2), resume=True, data=data, progress=False))
    assert after["step"] == 3 and state_diffs(before, after) == []


# ----------------------------------------------------------------------------- 3. Ctrl-C
@pytest.mark.parametrize(
    "where",
    [
        "step start",  # Run.next_indices: nothing of step k has happened yet
        "forward",  # after the batch, t and ε are drawn, before the optimizer step
        "ema update",  # after optimizer.step(), before the EMA update and step += 1
    ],
)
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, capsys, reference_run, where):
    k = 3  # Ctrl-C arrives during step 3: the step is finished, then the run saved at step 3
    owner, name = {"step start": (train_mod._Run, "next_indices"), "forward": (TinyUNet, "forward"),
                   "ema update": (train_mod, "_ema_update")}[where]
    out = tmp_path / "run"
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, the default otherwise
    with monkeypatch.context() as m:
        sigint_on_call(m, owner, name, k)
        with pytest.raises(KeyboardInterrupt):
            train(ref_config(out), data=ref_data(), progress=False)
    assert f"interrupted at step {k}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "log.jsonl"]  # no temp files left
    saved = load_raw(out / "checkpoint.pt")
    assert saved["step"] == k and len(saved["losses"]) == k
    assert state_diffs(reference_run[k], saved) == []  # exactly the state after k complete steps
    assert load_checkpoint(out / "checkpoint.pt").meta["step"] == k

    # The documented contract: Ctrl-C then --resume continues the run exactly.
    final = load_raw(train(ref_config(out), resume=True, data=ref_data(), progress=False))
    assert final["step"] == REF_STEPS
    assert state_diffs(reference_run[REF_STEPS], final) == []
    assert signal.getsignal(signal.SIGINT) == handler_before  # the caller's handler is restored


def test_keyboard_interrupt_inside_a_step_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys, reference_run):
    """A KeyboardInterrupt raised mid-step (not via SIGINT) must not save the half-updated state."""
    out = tmp_path / "run"
    config = ref_config(out, checkpoint_every=2)
    with monkeypatch.context() as m:
        raise_on_call(m, train_mod, "_ema_update", 4)  # after step 4's optimizer.step()
        with pytest.raises(KeyboardInterrupt):
            train(config, data=ref_data(), progress=False)
    assert "kept the last checkpoint" in capsys.readouterr().out
    saved = load_raw(out / "checkpoint.pt")
    assert saved["step"] == 2 and state_diffs(reference_run[2], saved) == []


def test_cli_train_returns_130_on_ctrl_c(monkeypatch):
    def interrupted(config, resume, progress):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "train", interrupted)
    assert main(["train", "--steps", "1"]) == 130


# ----------------------------------------------------------------------------- 4. atomic writes
class _Failure(Exception):
    pass


@pytest.mark.parametrize("exc", [_Failure, OSError, KeyboardInterrupt])
def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch, exc):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"format": "old", "x": torch.arange(5)}, path)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file" * 100)  # some bytes reach the temporary file
        f.flush()
        raise exc("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(exc):
        atomic_save({"format": "new", "x": torch.arange(7)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert torch.equal(load_raw(path)["x"], torch.arange(5))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


def test_failed_checkpoint_during_training_keeps_the_last_good_one(tmp_path, monkeypatch):
    data = make_data()
    path = train(make_config(tmp_path / "r", steps=3), data=data, progress=False)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        train(make_config(tmp_path / "r", steps=6), resume=True, data=data, progress=False)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_file(path)["step"] == 3
    assert sorted(os.listdir(tmp_path / "r")) == ["checkpoint.pt", "log.jsonl"]


def test_atomic_save_creates_the_folder_with_normal_permissions(tmp_path):
    path = atomic_save({"a": torch.ones(2)}, tmp_path / "new" / "deeper" / "f.pt")
    assert path.is_file() and torch.equal(load_raw(path)["a"], torch.ones(2))
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# ----------------------------------------------------------------------------- 5. errors
def test_resume_with_a_different_config_names_the_keys(tmp_path):
    data = make_data()
    path = train(make_config(tmp_path / "r", steps=1), data=data, progress=False)
    before = path.read_bytes()
    with pytest.raises(ValueError) as info:
        train(make_config(tmp_path / "r", steps=2, base_channels=16, lr=1e-2), resume=True, data=data,
              progress=False)
    msg = str(info.value)
    assert "base_channels: checkpoint 8 vs now 16" in msg
    assert "lr: checkpoint 0.001 vs now 0.01" in msg
    assert not re.search(r"\bsteps:", msg) and "seed:" not in msg  # only the keys that differ
    assert path.read_bytes() == before


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        train(make_config(tmp_path / "empty"), resume=True, data=make_data(), progress=False)


@pytest.mark.parametrize("seed", range(8))
def test_resume_from_a_corrupt_checkpoint(tmp_path, seed):
    # seeded bytes: the unpickler fails on random input in many ways (KeyError, IndexError, …)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "checkpoint.pt").write_bytes(random.Random(seed).randbytes(500))
    with pytest.raises(CheckpointError, match="is not a stepdrop checkpoint: not a torch file"):
        train(make_config(tmp_path / "r"), resume=True, data=make_data(), progress=False)


def test_new_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    data = make_data()
    path = train(make_config(tmp_path / "r", steps=1), data=data, progress=False)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(make_config(tmp_path / "r", steps=1), data=data, progress=False)
    assert path.read_bytes() == before


def test_output_folder_under_a_regular_file(tmp_path):
    # Works as root too (chmod does not stop root from writing; a file as a parent folder does).
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file is not a folder"):
        train(make_config(blocker / "run"), data=make_data(), progress=False)


def test_unwritable_output_folder(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a 0o555 folder is still writable (see the regular-file test)")
        with pytest.raises(PermissionError, match="not writable"):
            train(make_config(folder / "run"), data=make_data(), progress=False)
    finally:
        folder.chmod(0o755)


def test_unwritable_output_folder_reported_by_os_access(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(PermissionError, match="not writable"):
        train(make_config(tmp_path / "run"), data=make_data(), progress=False)


@pytest.mark.parametrize(
    "field, value, exc",
    [
        ("steps", 0, ValueError),
        ("steps", 2.5, TypeError),
        ("batch_size", 0, ValueError),
        ("batch_size", True, TypeError),
        ("lr", -1.0, ValueError),
        ("lr", 0.0, ValueError),
        ("lr", float("nan"), ValueError),
        ("lr", "1e-3", TypeError),
        ("dataset", "nope", ValueError),
        ("schedule", "nope", ValueError),
        ("lr_schedule", "nope", ValueError),
        ("ema_decay", 1.0, ValueError),
        ("ema_decay", -0.1, ValueError),
        ("dropout", 1.0, ValueError),
        ("warmup", -1, ValueError),
        ("num_timesteps", 1, ValueError),
        ("grad_clip", -1.0, ValueError),
        ("weight_decay", -0.1, ValueError),
        ("seed", -1, ValueError),
        ("checkpoint_every", 0, ValueError),
    ],
)
def test_bad_config_values_name_the_field(tmp_path, field, value, exc):
    with pytest.raises(exc, match=rf"^{field} must"):
        make_config(tmp_path, **{field: value})


def test_batch_larger_than_the_data(tmp_path):
    with pytest.raises(ValueError, match=r"batch_size=8 exceeds the 5 training images"):
        train(make_config(tmp_path / "r", batch_size=8), data=make_data(n=5), progress=False)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_channel_mismatch(tmp_path):
    with pytest.raises(ValueError, match=r"channels=1 but the data has 3 channel"):
        train(make_config(tmp_path / "r"), data=make_data(channels=3), progress=False)
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


# ----------------------------------------------------------------------------- 6. loading
def hand_built_ema(payload: dict) -> TinyUNet:
    model = TinyUNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in payload["model_config"].items()})
    model.load_state_dict(payload["ema"])
    return model.eval()


def probe_input(channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return torch.randn(3, channels, 32, 32, generator=g), torch.tensor([0, 17, 49])


def test_load_training_checkpoint_gives_the_ema_model(trained):
    config, path = trained
    payload = load_raw(path)
    loaded = load_checkpoint(path)
    assert not loaded.model.training
    assert loaded.meta["step"] == 4 and loaded.path == str(path)
    params = dict(loaded.model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in payload["ema"].items())
    assert not torch.equal(params["conv_out.weight"], payload["model"]["conv_out.weight"])  # EMA, not raw
    x, t = probe_input()
    with torch.no_grad():
        assert torch.equal(loaded.model(x, t), hand_built_ema(payload)(x, t))
    expected = config.noise_schedule()
    assert loaded.schedule.kind == "cosine"
    assert torch.equal(loaded.schedule.alphas_cumprod, expected.alphas_cumprod)


def test_export_fp16_loads_close_to_fp32(trained, tmp_path):
    _, path = trained
    payload = load_raw(path)
    out = export_model(path, tmp_path / "model.pt", meta={"note": "test"})
    raw = load_raw(out)
    assert raw["format"] == MODEL_FORMAT and "optimizer" not in raw and "model" not in raw
    assert all(v.dtype == torch.float16 for v in raw["ema"].values())
    assert raw["meta"]["note"] == "test" and raw["meta"]["step"] == 4
    loaded = load_checkpoint(out)
    assert not loaded.model.training
    params = dict(loaded.model.named_parameters())
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(torch.equal(params[k], v.half().float()) for k, v in payload["ema"].items())
    x, t = probe_input()
    with torch.no_grad():
        got, want = loaded.model(x, t), hand_built_ema(payload)(x, t)
    assert not torch.equal(got, want)  # it really is rounded
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3 * want.abs().max().item())
    assert torch.equal(loaded.schedule.alphas_cumprod, load_checkpoint(path).schedule.alphas_cumprod)
    # fp32 export is exact.
    exact = load_checkpoint(export_model(path, tmp_path / "model32.pt", half=False))
    with torch.no_grad():
        assert torch.equal(exact.model(x, t), want)


def test_load_checkpoint_dtype(trained):
    _, path = trained
    loaded = load_checkpoint(path, dtype=torch.float64)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float64}


class NotAllowed:  # pickled into a file: weights_only must refuse to rebuild it
    def __init__(self):
        self.x = 1


def _corrupt_files(folder: Path, good: Path) -> dict[str, Path]:
    files = {}
    files["random"] = folder / "random.pt"
    files["random"].write_bytes(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0),
                                              dtype=torch.uint8).numpy().tobytes())
    files["empty"] = folder / "empty.pt"
    files["empty"].write_bytes(b"")
    data = good.read_bytes()
    files["truncated"] = folder / "truncated.pt"
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["custom class"] = folder / "custom.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, "obj": NotAllowed()}, files["custom class"])
    return files


@pytest.mark.parametrize("kind", ["random", "empty", "truncated", "custom class"])
def test_unreadable_files_raise_checkpoint_error(trained, tmp_path, kind):
    path = _corrupt_files(tmp_path, trained[1])[kind]
    with pytest.raises(CheckpointError, match=r"is not a stepdrop checkpoint: ") as info:
        load_checkpoint(path)
    assert isinstance(info.value, ValueError) and str(path) in str(info.value)
    assert "weights_only" not in str(info.value)  # torch's advice to unpickle anything is never passed on
    expected = {"random": "not a torch file", "empty": "not a torch file", "truncated": "truncated or damaged",
                "custom class": "objects other than tensors and plain values"}[kind]
    assert expected in str(info.value)


@pytest.mark.parametrize("obj", [{"a": 1}, [1, 2], {"format": "other-tool", "version": 1}])
def test_foreign_torch_file(tmp_path, obj):
    path = tmp_path / "foreign.pt"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=r"is not a stepdrop checkpoint \(format"):
        load_checkpoint(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path)  # a folder is not a checkpoint file


def _rewritten(trained, tmp_path, edit) -> Path:
    payload = load_raw(trained[1])
    edit(payload)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return path


def test_version_mismatch(trained, tmp_path):
    path = _rewritten(trained, tmp_path, lambda p: p.update(version=2))
    with pytest.raises(CheckpointError, match="format version 2"):
        load_checkpoint(path)


def test_missing_ema(trained, tmp_path):
    path = _rewritten(trained, tmp_path, lambda p: p.pop("ema"))
    with pytest.raises(CheckpointError, match="lacks 'ema'"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["model_config"].update(base_channels=16),  # shapes do not fit
        lambda p: p["model_config"].update(num_res_blocks=2),  # missing keys
        lambda p: p["ema"].pop("conv_out.bias"),
        lambda p: p["model_config"].update(bogus=1),  # unknown config key
        lambda p: p.update(ema=[torch.zeros(3)]),  # not a state dict at all
    ],
    ids=["wider", "deeper", "missing-tensor", "unknown-key", "ema-not-a-dict"],
)
def test_ema_weights_that_do_not_fit_the_config(trained, tmp_path, edit):
    path = _rewritten(trained, tmp_path, edit)
    with pytest.raises(CheckpointError, match="weights do not fit the stored model config"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "schedule",
    [{"kind": "nope", "num_timesteps": 50, "params": {}}, {"kind": "linear", "params": {}}],
    ids=["unknown-kind", "no-num-timesteps"],
)
def test_malformed_schedule_raises_checkpoint_error(trained, tmp_path, schedule):
    path = _rewritten(trained, tmp_path, lambda p: p.update(schedule=schedule))
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_unknown_pretrained_name_lists_the_available_ones():
    names = pretrained_names()
    assert isinstance(names, tuple)
    with pytest.raises(ValueError, match=r"unknown pretrained model 'nope'; available: ") as info:
        load_pretrained("nope")
    assert str(names) in str(info.value)


# ----------------------------------------------------------------------------- 7. CLI
TINY_CLI = ["--base-channels", "8", "--channel-mults", "1,2", "--num-res-blocks", "1", "--attention-resolutions", "",
            "--batch-size", "2", "--num-timesteps", "10", "--warmup", "0", "--no-progress"]


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").is_file()
                    and not (REAL_FASHION / "train-images-idx3-ubyte").is_file(),
                    reason=f"Fashion-MNIST not installed in {REAL_FASHION} (apt-get install dataset-fashion-mnist)")
def test_cli_train_resume_and_export(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STEPDROP_FASHION_MNIST_DIR", raising=False)
    out = tmp_path / "run"
    assert main(["train", *TINY_CLI, "--steps", "2", "--out", str(out)]) == 0
    assert f"saved {out / 'checkpoint.pt'}" in capsys.readouterr().out
    payload = read_file(out / "checkpoint.pt")
    assert payload["step"] == 2 and payload["train_config"]["base_channels"] == 8
    assert payload["train_config"]["attention_resolutions"] == [] and payload["model_config"]["channel_mults"] == [1, 2]

    assert main(["train", *TINY_CLI, "--steps", "2", "--out", str(out)]) == 2  # exists, no --resume
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *TINY_CLI, "--steps", "3", "--out", str(out), "--resume"]) == 0
    assert read_file(out / "checkpoint.pt")["step"] == 3

    model_file = tmp_path / "model.pt"
    assert main(["export", str(out / "checkpoint.pt"), str(model_file), "--meta", '{"name": "tiny"}']) == 0
    loaded = load_checkpoint(model_file)
    assert loaded.meta["name"] == "tiny" and loaded.meta["step"] == 3 and loaded.meta["dataset"] == "fashion-mnist"
    assert next(iter(load_raw(model_file)["ema"].values())).dtype == torch.float16


def test_cli_export(trained, tmp_path, capsys):
    _, path = trained
    out = tmp_path / "m32.pt"
    assert main(["export", str(path), str(out), "--fp32"]) == 0
    assert str(out) in capsys.readouterr().out
    raw = load_raw(out)
    assert raw["format"] == MODEL_FORMAT and all(v.dtype == torch.float32 for v in raw["ema"].values())
    assert tree_diffs(raw["ema"], load_raw(path)["ema"]) == []
    load_checkpoint(out)


@pytest.mark.parametrize("meta", ["[1, 2]", "not json"])
def test_cli_export_bad_meta(trained, tmp_path, capsys, meta):
    assert main(["export", str(trained[1]), str(tmp_path / "m.pt"), "--meta", meta]) == 2
    assert "stepdrop export: error:" in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_cli_export_missing_checkpoint(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), str(tmp_path / "m.pt")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_unknown_dataset_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--dataset", "nope"])
    assert info.value.code == 2
    assert "--dataset" in capsys.readouterr().err


@pytest.mark.parametrize("args, name", [(["--steps", "0"], "steps"), (["--lr", "-1"], "lr"),
                                        (["--ema-decay", "1"], "ema_decay")])
def test_cli_bad_values_return_2_and_name_the_setting(tmp_path, capsys, args, name):
    assert main(["train", *args, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stepdrop train: error: ") and f"{name} must" in err
    assert not (tmp_path / "r").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "Fast sampling for tiny diffusion models" in text and "train" in text and "export" in text
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    assert "--resume" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 8. shared formulas, --download
def test_training_noises_with_the_shared_q_sample(tmp_path, monkeypatch):
    """x_t of every step is stepdrop.ops.reference.q_sample(x0, ε, ᾱ table, t) — the one forward
    formula, shared with StepDropScheduler.add_noise — and is exactly what the model is fed."""
    from stepdrop.ops.reference import q_sample

    calls, seen = [], []

    def spy(x0, noise, table, t):
        out = q_sample(x0, noise, table, t)
        calls.append((x0.clone(), noise.clone(), table, t.clone(), out.clone()))
        return out

    forward = TinyUNet.forward
    monkeypatch.setattr(train_mod, "q_sample", spy)
    monkeypatch.setattr(TinyUNet, "forward", lambda self, x, t: seen.append(x.detach().clone()) or forward(self, x, t))
    config = make_config(tmp_path / "run", steps=2)
    train(config, data=make_data(), progress=False)
    assert len(calls) == 2 and len(seen) == 2
    for (x0, noise, table, t, out), fed in zip(calls, seen):
        assert torch.equal(fed, out)
        assert table.dtype == torch.float32 and t.shape == (config.batch_size,)
        a = table.double()[t].view(-1, 1, 1, 1)  # Ho et al. 2020 eq. 4, written out
        torch.testing.assert_close(out.double(), a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double(),
                                   rtol=0, atol=1e-6)


def test_cli_train_download_reaches_load_images(tmp_path, monkeypatch, capsys):
    """`stepdrop train --download` (README: CIFAR-10 "--download where there is internet") is
    passed on as load_images(..., download=True); without it, download=False."""
    calls = []

    def fake_load_images(name, split="train", root=None, channels=None, download=False):
        calls.append(dict(name=name, split=split, root=root, channels=channels, download=download))
        return make_data(channels=3)

    monkeypatch.setattr(train_mod, "load_images", fake_load_images)
    out = tmp_path / "run"
    args = ["train", *TINY_CLI, "--dataset", "cifar10", "--channels", "3", "--steps", "1", "--out", str(out)]
    assert main([*args, "--download"]) == 0
    assert calls == [dict(name="cifar10", split="train", root=None, channels=3, download=True)]
    assert read_file(out / "checkpoint.pt")["train_config"]["download"] is True
    # resuming may change --download (where the data comes from, not what the run is)
    args[args.index("--steps") + 1] = "2"
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert calls[-1]["download"] is False
    assert read_file(out / "checkpoint.pt")["step"] == 2
    assert "download" in train_mod.RESUMABLE_CHANGES


def test_download_must_be_a_bool(tmp_path):
    with pytest.raises(TypeError, match="download"):
        make_config(tmp_path / "r", download="yes")


# ----------------------------------------------------------------------------- 7. prediction types, warm start
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_the_mse_on_the_target_of_the_prediction_type(tmp_path, monkeypatch, prediction_type):
    """The first step's loss, recomputed by hand from the same draws: the model's output against
    ε, v = α·ε − σ·x0 or x0, written out here."""
    config = make_config(tmp_path / "run", steps=1, prediction_type=prediction_type, dropout=0.0)
    data = make_data()
    seen = {}
    real = train_mod.q_sample

    def spy(x0, eps, table, t):
        seen.update(x0=x0.clone(), eps=eps.clone(), t=t.clone())
        return real(x0, eps, table, t)

    monkeypatch.setattr(train_mod, "q_sample", spy)
    payload = load_raw(train(config, data=data, progress=False))
    assert payload["model_config"]["prediction_type"] == prediction_type
    model = initial_model(config)
    a = config.noise_schedule().alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    alpha, sigma = a.sqrt().float(), (1 - a).sqrt().float()
    x_t = alpha * seen["x0"] + sigma * seen["eps"]
    target = {"epsilon": seen["eps"], "sample": seen["x0"],
              "v_prediction": alpha * seen["eps"] - sigma * seen["x0"]}[prediction_type]
    # the zero-initialised output layer: the first prediction is 0 whatever the type
    assert float(model(x_t, seen["t"]).abs().max()) == 0.0
    assert payload["losses"][0] == pytest.approx(float(target.pow(2).mean()), rel=1e-6)


def test_init_warm_starts_from_a_model_file(tmp_path, trained):
    """--init: the new run starts from the file's EMA weights (in any parameterisation), with a
    fresh optimizer; the first step's update is then taken from those weights."""
    _, ckpt = trained
    exported = export_model(ckpt, tmp_path / "eps.pt", half=False)
    payload = load_raw(exported)  # weights far from any fresh initialisation
    g = torch.Generator().manual_seed(0)
    payload["ema"] = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                      for k, v in payload["ema"].items()}
    atomic_save(payload, exported)
    config = make_config(tmp_path / "warm", steps=1, prediction_type="v_prediction", init=str(exported),
                         schedule="cosine", checkpoint_every=1)
    saved = []
    real = train_mod.atomic_save
    train_mod.atomic_save = lambda payload, path: (saved.append(copy.deepcopy(payload)), real(payload, path))[1]
    try:
        train(config, data=make_data(), progress=False)
    finally:
        train_mod.atomic_save = real
    start = load_raw(exported)["ema"]
    after = saved[-1]
    assert after["train_config"]["init"] == str(exported) and after["optimizer"]["state"][0]["step"] == 1
    # one AdamW step of size ≤ lr·(1 + tiny) away from the init weights, and not from a fresh init
    fresh = initial_model(config).state_dict()
    for k, v in start.items():
        if v.is_floating_point():
            assert float((after["model"][k] - v).abs().max()) <= 1.01 * config.lr, k
    assert max(float((fresh[k] - start[k]).abs().max()) for k in start if start[k].is_floating_point()) > 0.2


def test_init_with_another_architecture_names_the_keys(tmp_path, trained):
    _, ckpt = trained
    with pytest.raises(ValueError, match=r"init=.* has another architecture \(base_channels: 8 there vs 16 here;"):
        train(make_config(tmp_path / "w", init=str(ckpt), base_channels=16), data=make_data(), progress=False)


def test_resume_keeps_the_warm_start_without_repeating_it(tmp_path, trained):
    """A resumed warm-started run continues its checkpoint (the init file is not re-read: it may be
    gone), and equals the straight run."""
    _, ckpt = trained
    init = shutil.copy(ckpt, tmp_path / "init.pt")
    data = make_data()
    straight = load_raw(train(make_config(tmp_path / "a", steps=4, init=str(init)), data=data, progress=False))
    train(make_config(tmp_path / "b", steps=2, init=str(init)), data=data, progress=False)
    os.unlink(init)
    resumed = load_raw(train(make_config(tmp_path / "b", steps=4), resume=True, data=data, progress=False))
    assert resumed["train_config"]["init"] == str(init)
    assert state_diffs(straight, resumed) == []


def test_resume_of_a_checkpoint_from_before_prediction_types(tmp_path):
    """A checkpoint written before `prediction_type` and `init` existed was an ε run: it resumes as one."""
    data = make_data()
    path = train(make_config(tmp_path / "old", steps=2, prediction_type="epsilon"), data=data, progress=False)
    payload = load_raw(path)
    for key in ("prediction_type", "init"):
        del payload["train_config"][key]
    del payload["model_config"]["prediction_type"]
    atomic_save(payload, path)
    resumed = load_raw(train(make_config(tmp_path / "old", steps=3, prediction_type="epsilon"), resume=True,
                             data=data, progress=False))
    assert resumed["step"] == 3
    with pytest.raises(ValueError, match=r"prediction_type: checkpoint 'epsilon' vs now 'v_prediction'"):
        train(make_config(tmp_path / "old", steps=4, prediction_type="v_prediction"), resume=True, data=data,
              progress=False)
