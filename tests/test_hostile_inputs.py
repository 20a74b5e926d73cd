"""Hostile inputs (issue 19, first part): model files that are not what they claim, and devices
this machine lacks, get the project's error naming the file or device, never torch's
traceback or its advice to unpickle with ``weights_only=False``."""

from __future__ import annotations

import io
import pickle
import random
import zipfile

import pytest
import torch

from stepdrop.checkpoint import CheckpointError, load_checkpoint, load_pretrained
from stepdrop.cli import main

SHIPPED = load_pretrained("fashion-mnist").path


def _shipped_bytes() -> bytes:
    with open(SHIPPED, "rb") as f:
        return f.read()


def _zip_boundaries(data: bytes) -> list[int]:
    """Offsets where an entry starts in the archive (truncating there leaves whole entries)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return sorted({info.header_offset for info in archive.infolist()} | {len(data) - 22, len(data) - 1})


@pytest.mark.parametrize("case", ["text", "random", "empty", "pickle", "zip without torch", "truncated"])
def test_files_that_are_not_stepdrop_checkpoints(tmp_path, case):
    path = tmp_path / "model.pt"
    data = {"text": b"root:x:0:0:root:/root:/bin/bash\n", "random": random.Random(0).randbytes(4096), "empty": b"",
            "pickle": pickle.dumps({"format": "stepdrop-model"}, protocol=2)}.get(case)
    if case == "zip without torch":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("readme.txt", "hello")
        data = buffer.getvalue()
    if case == "truncated":
        data = _shipped_bytes()[:5000]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model.pt is not a stepdrop checkpoint: ") as info:
        load_checkpoint(path)
    assert "weights_only" not in str(info.value)


def test_truncation_at_every_zip_boundary_is_refused(tmp_path):
    data = _shipped_bytes()
    cuts = _zip_boundaries(data)
    assert len(cuts) > 5
    for cut in cuts:
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="is not a stepdrop checkpoint") as info:
            load_checkpoint(path)
        assert "weights_only" not in str(info.value), cut


@pytest.mark.parametrize("field,value", [(8, 0x01), (10, 99), (10, 8)])  # encrypted; unknown method; deflate
def test_a_damaged_central_directory_is_named(tmp_path, field, value):
    """One byte of the central directory changed: the zip reader's own exceptions (RuntimeError,
    NotImplementedError, zlib.error) become the project's error."""
    data = bytearray(_shipped_bytes())
    central = data.rfind(b"PK\x01\x02")
    data[central + field] = value
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is not a stepdrop checkpoint"):
        load_checkpoint(path)


def test_a_foreign_torch_file_is_named_as_such(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a pickled module: not plain tensors and values
    with pytest.raises(CheckpointError, match="a torch file holding objects other than tensors and plain values"):
        load_checkpoint(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
@pytest.mark.parametrize("device,match", [
    ("cuda", r"--device='cuda': CUDA is not available on this machine .*available here: cpu"),
    ("cuda:7", r"--device='cuda:7': CUDA is not available"),
    ("mps", r"--device='mps': stepdrop runs on the CPU and on CUDA devices"),
    ("gpu0", r"--device='gpu0' is not a device; available here: cpu"),
])
def test_devices_this_machine_lacks_are_named_before_any_file_is_read(tmp_path, capsys, device, match):
    missing = tmp_path / "missing.pt"  # never read: the device is refused first
    assert main(["sample", "--checkpoint", str(missing), "--device", device, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().split("error: ", 1)[1].startswith(f"--device='{device}'")
    with pytest.raises(ValueError, match=match):
        from stepdrop._validation import check_device

        check_device("--device", device)


def test_cli_reports_a_text_file_without_a_traceback(tmp_path, capsys):
    assert main(["sample", "--checkpoint", "/etc/passwd", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "/etc/passwd is not a stepdrop checkpoint: not a torch file" in err


# ====================================================================== fuzzing (Hypothesis)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = settings(max_examples=1000, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SHIPPED_BYTES = _shipped_bytes()
_FUZZ_COUNT = {"checkpoint": 0, "refused": 0}


def _mutate(data: bytes, kind: str, where: float, bit: int, span: int) -> bytes:
    at = min(len(data) - 1, int(where * len(data)))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << bit)]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    if kind == "delete":
        return data[:at] + data[at + span:]
    return data[:at] + random.Random(at).randbytes(span) + data[at + span:]  # "overwrite"


@FUZZ
@given(kind=st.sampled_from(["flip", "truncate", "delete", "overwrite"]), where=st.floats(0, 1),
       bit=st.integers(0, 7), span=st.integers(1, 64))
def test_mutated_model_files_fail_only_with_the_projects_error(tmp_path_factory, kind, where, bit, span):
    """Bit flips, truncations, deletions and overwrites of the shipped model file: each either
    loads (a byte the archive never reads) or raises CheckpointError, nothing else."""
    _FUZZ_COUNT["checkpoint"] += 1
    path = tmp_path_factory.mktemp("fuzz") / "model.pt"
    path.write_bytes(_mutate(SHIPPED_BYTES, kind, where, bit, span))
    try:
        load_checkpoint(path)
    except CheckpointError as exc:
        assert "weights_only" not in str(exc) and str(path) in str(exc)
        _FUZZ_COUNT["refused"] += 1


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                    max_leaves=12)


@FUZZ
@given(value=st.one_of(JSON, st.fixed_dictionaries({"widths": JSON}),
                       st.fixed_dictionaries({"widths": st.lists(st.floats(allow_nan=True), max_size=6)})),
       raw=st.one_of(st.none(), st.binary(max_size=64)))
def test_width_schedule_files_fail_only_with_a_value_error(tmp_path_factory, value, raw):
    """A named width schedule (``+width(@file.json)``) that is not one: ValueError naming it."""
    import json

    from stepdrop.variants import parse_calls

    _FUZZ_COUNT["widths"] = _FUZZ_COUNT.get("widths", 0) + 1
    path = tmp_path_factory.mktemp("widths") / "schedule.json"
    path.write_bytes(raw if raw is not None else json.dumps(value).encode())
    try:
        plan = parse_calls(f"+width(@{path})")
    except ValueError as exc:
        assert "schedule" in str(exc) or "width" in str(exc)
    else:
        assert all(0 < w <= 1 for w in plan.width.widths)


SCHEDULE_VALUES = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=0, max_size=12),
    st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12),  # in range, often not monotone
    JSON)


@FUZZ
@given(kind=st.sampled_from(["custom", "linear", "cosine", "scaled_linear", "other", None]),
       table=SCHEDULE_VALUES, T=st.one_of(st.integers(-5, 2000), st.floats(allow_nan=True), st.text(max_size=3)),
       params=st.one_of(st.none(), st.dictionaries(st.sampled_from(["beta_start", "beta_end", "s", "x"]),
                                                   st.one_of(st.floats(allow_nan=True), st.text(max_size=3)))))
def test_checkpoints_with_malformed_schedules_fail_only_with_the_projects_error(tmp_path_factory, kind, table, T,
                                                                                   params):
    """A model file whose noise schedule is malformed (NaN, negative or non-monotone ᾱ, wrong
    types, unknown kinds): CheckpointError, or a schedule that passed the schedule's own checks."""
    _FUZZ_COUNT["schedules"] = _FUZZ_COUNT.get("schedules", 0) + 1
    payload = dict(_TINY_PAYLOAD)
    payload["schedule"] = {"kind": kind, "num_timesteps": T, "alphas_cumprod": table, "params": params or {}}
    path = tmp_path_factory.mktemp("schedule") / "model.pt"
    torch.save(payload, path)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:
        a = loaded.schedule.alphas_cumprod
        assert torch.isfinite(a).all() and (a > 0).all() and (a <= 1).all() and (a[1:] <= a[:-1]).all()


def _tiny_payload() -> dict:
    from stepdrop import NoiseSchedule, TinyUNet
    from stepdrop.checkpoint import FORMAT_VERSION, MODEL_FORMAT

    model = TinyUNet(in_channels=1, image_size=8, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=())
    return dict(format=MODEL_FORMAT, version=FORMAT_VERSION, model_config=model.config,
                schedule=NoiseSchedule.linear(10).to_config(), ema=model.state_dict(), meta={})


_TINY_PAYLOAD = _tiny_payload()


def test_fuzz_case_count_is_reported(capsys):
    """The count of cases the fuzz suite tried, printed in the test summary (runs after it)."""
    if _FUZZ_COUNT["checkpoint"] == 0:
        pytest.skip("the fuzz test did not run in this session (selected alone)")
    with capsys.disabled():
        print(f"\nfuzz: {_FUZZ_COUNT['checkpoint']} mutated model files, {_FUZZ_COUNT['refused']} refused with "
              f"CheckpointError, the rest loaded (bytes the archive never reads), no other exception")
        print(f"fuzz: {_FUZZ_COUNT.get('widths', 0)} malformed width-schedule files, each refused with ValueError or "
              f"read as a valid schedule")
        print(f"fuzz: {_FUZZ_COUNT.get('schedules', 0)} model files with malformed noise schedules, each refused with "
              f"CheckpointError or read as a valid schedule")
    assert _FUZZ_COUNT["checkpoint"] >= 1000 and _FUZZ_COUNT["refused"] > 900
    assert _FUZZ_COUNT.get("widths", 0) >= 1000 and _FUZZ_COUNT.get("schedules", 0) >= 1000
