"""`stepdrop sample`: spec parsing, PNG grids, results files, and the command end to end."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from stepdrop import NoiseSchedule, TinyUNet
from stepdrop.checkpoint import CHECKPOINT_FORMAT, FORMAT_VERSION, atomic_save
from stepdrop.cli import main
from stepdrop.runs import parse_spec, run_specs, save_grid


@pytest.mark.parametrize(
    "text, expected",
    [
        ("ddim-25", ("ddim", "uniform", 25, None)),
        ("ddpm-1000@4", ("ddpm", "uniform", 1000, 4)),
        ("stepdrop-25", ("ddim", "stepdrop", 25, None)),
        ("ddpm:importance-10@3", ("ddpm", "importance", 10, 3)),
        ("adaptive-25", ("ddim", "adaptive", 25, None)),
        ("dpmpp_2m-10", ("dpmpp_2m", "uniform", 10, None)),
        ("dpmpp_2m:logsnr-10@2", ("dpmpp_2m", "logsnr", 10, 2)),
        ("dpmpp_2m:gradient_aware-7", ("dpmpp_2m", "gradient_aware", 7, None)),
    ],
)
def test_parse_spec(text, expected):
    spec = parse_spec(text)
    assert (spec.solver, spec.policy, spec.budget, spec.num_samples) == expected


@pytest.mark.parametrize("text, word", [("ddim", "policy-budget"), ("euler:uniform-5", "solver"),
                                       ("nope-5", "policy"), ("ddim-5@0", "num_samples")])
def test_parse_spec_errors_name_the_problem(text, word):
    with pytest.raises(ValueError, match=word):
        parse_spec(text)


def test_save_grid_layout_and_values(tmp_path):
    images = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 1.0)])
    path = save_grid(images, tmp_path / "g.png", nrow=3, padding=1)
    with Image.open(path) as image:
        assert image.mode == "L"
        pixels = torch.tensor(np.asarray(image))
    assert pixels.shape == (6, 16)
    assert int(pixels[1, 1]) == 0 and int(pixels[1, 6]) == 128 and int(pixels[1, 11]) == 255
    assert int(pixels[0, 0]) == 255  # padding


def _tiny_checkpoint(path):
    model = TinyUNet(in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=(), image_size=8)
    schedule = NoiseSchedule.linear(50)
    payload = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "model_config": model.config,
               "schedule": schedule.to_config(), "ema": model.state_dict(), "meta": {"note": "test"}}
    return atomic_save(payload, path)


def test_same_seed_same_noise_across_specs():
    model = TinyUNet(in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
                     attention_resolutions=(), image_size=8).eval()
    schedule = NoiseSchedule.linear(50)
    specs = [parse_spec("ddim-5"), parse_spec("ddim-5@2")]
    (_, a, _), (_, b, _) = run_specs(model, schedule, specs, num_samples=3, seed=7, progress=False)
    assert torch.equal(a[:2], b)  # the @2 run starts from the first two of the same noise


def test_sample_command_end_to_end(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    out = tmp_path / "out"
    code = main(["sample", "--checkpoint", str(ckpt), "--policies", "ddpm-50@2,ddim-5,stepdrop-5,adaptive-5",
                 "--num-samples", "3", "--seed", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["label"] for r in rows] == ["ddpm-50@2", "ddim-5", "stepdrop-5", "adaptive-5"]
    report = json.load(open(out / "results.json"))
    for run in report["runs"]:
        # the counted NFE of sample 0 is the number of timesteps it actually visited
        assert run["nfe"][0] == len(run["timesteps_row0"])
        assert len(run["nfe"]) == run["num_samples"]
        # 3 images of 8x8 → a 2x2 grid, 2 images → 2x1, with 2 px padding
        assert Image.open(run["grid"]).size == {3: (22, 22), 2: (22, 12)}[run["num_samples"]]
    assert report["runs"][3]["max_nfe"] <= 5  # adaptive stays within its budget
    assert report["runs"][0]["mean_nfe"] == 50 and report["runs"][1]["mean_nfe"] == 5
    assert "NFE mean" in capsys.readouterr().out


def test_sample_command_errors(tmp_path, capsys):
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["sample", "--checkpoint", str(ckpt), "--out", str(blocker / "sub")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--policies", "bogus", "--out", str(tmp_path)]) == 2
    assert "policy-budget" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(ckpt), "--clip", "-1", "--out", str(tmp_path)]) == 2
    assert "--clip" in capsys.readouterr().err


def test_sample_command_clips_by_default(tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "m.pt")
    for clip, folder in (("1", "clipped"), ("0", "raw")):
        assert main(["sample", "--checkpoint", str(ckpt), "--policies", "ddim-5", "--num-samples", "2",
                     "--clip", clip, "--out", str(tmp_path / folder), "--no-progress"]) == 0
    assert json.load(open(tmp_path / "clipped" / "results.json"))["runs"][0]["clip"] == 1.0
    assert json.load(open(tmp_path / "raw" / "results.json"))["runs"][0]["clip"] is None
