"""``compare`` under torchrun: real torch.distributed processes (gloo, localhost).

The same cells with 1, 2 and 3 ranks give identical images and identical report numbers; a
rank that dies makes the others stop with an error instead of waiting; the run resumes with
another number of ranks without sampling a finished batch again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from test_compare import Counted, _config, needs_metrics
from test_train import make_config, make_data

pytestmark = needs_metrics


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from stepdrop.train import train

    out = tmp_path_factory.mktemp("ckpt") / "run"
    return train(make_config(out, steps=2), data=make_data(), progress=False)


def _compare(checkpoint: Path, out: Path, cache: Path, ranks: int) -> subprocess.CompletedProcess:
    args = ["-m", "stepdrop.cli", "compare", "--checkpoint", str(checkpoint), "--policies", "uniform,stepdrop",
            "--budgets", "2", "--references", "ddim-3@4", "--num-samples", "6", "--batch-size", "2",
            "--ref-samples", "12", "--bootstrap", "2", "--clip", "0", "--threads", "1", "--cache-dir", str(cache),
            "--out", str(out), "--no-progress"]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port", str(_free_port()),
                *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=900, env=env)


def test_one_two_and_three_ranks_give_the_same_images_and_numbers(checkpoint, tmp_path):
    runs = {}
    for ranks in (1, 2, 3):
        run = _compare(checkpoint, tmp_path / f"r{ranks}", tmp_path / "cache", ranks)
        assert run.returncode == 0, run.stderr[-3000:]
        runs[ranks] = json.loads((tmp_path / f"r{ranks}" / "report.json").read_text())
    assert runs[2]["meta"]["ranks"] == 2 and runs[3]["meta"]["ranks"] == 3
    for ranks in (2, 3):
        assert [c["label"] for c in runs[ranks]["cells"]] == [c["label"] for c in runs[1]["cells"]]
        for one, many in zip(runs[1]["cells"], runs[ranks]["cells"]):
            for name in ("fid", "kid", "precision", "recall", "classifier_score", "nfe_mean", "gflops_per_sample"):
                assert many[name] == pytest.approx(one[name], rel=1e-6, abs=1e-9), (ranks, one["label"], name)
            assert many["timesteps"] == one["timesteps"] and many["timestep_histogram"] == one["timestep_histogram"]
        for cell in ("ddim_uniform-2", "ddim_stepdrop-2", "ddim-3_n4"):
            a = torch.load(tmp_path / "r1" / "cells" / f"{cell}.pt", weights_only=True)["state"]
            b = torch.load(tmp_path / f"r{ranks}" / "cells" / f"{cell}.pt", weights_only=True)["state"]
            assert torch.equal(a["images"], b["images"]) and torch.equal(a["nfe"], b["nfe"]), (ranks, cell)
        assert not list((tmp_path / f"r{ranks}" / "cells").glob("*.batches"))  # merged, then removed


def _rank_main(rank: int, world: int, port: int, out: str, cache: str, fail_at: int | None, result: str) -> None:
    import torch.distributed as dist

    from stepdrop import NoiseSchedule
    from stepdrop.compare import run_compare
    from stepdrop.distributed import Group, RankFailure

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import datetime

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20))
    torch.manual_seed(0)  # the same weights in every process
    model = Counted(fail_at=fail_at if rank == 1 else None)
    config = _config(policies=("uniform",), budgets=(2,), references=(), num_samples=12, batch_size=2,
                     film_samples=0, grid_samples=0, cache_dir=cache)
    try:
        run_compare(model, NoiseSchedule.linear(100), config, out, progress=False, log=lambda s: None,
                    group=Group(rank, world, rank))
        outcome = "finished"
    except RankFailure as exc:
        outcome = f"RankFailure: {exc}"
    except KeyboardInterrupt:
        outcome = "died"
        os._exit(1)  # a rank killed in the middle of a cell
    Path(result, f"rank{rank}.txt").write_text(outcome)


def test_a_dead_rank_stops_the_others_and_the_run_resumes(tmp_path):
    # rank 1 dies inside its second batch (warm-up 1 call, batch 1: 2 calls, batch 3: the 2nd call)
    port, ctx = _free_port(), mp.get_context("spawn")
    ranks = [ctx.Process(target=_rank_main, args=(rank, 2, port, str(tmp_path / "out"), str(tmp_path / "cache"),
                                                  1 + 2 + 2, str(tmp_path))) for rank in range(2)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=300)
    assert [p.exitcode for p in ranks] == [0, 1]  # rank 0 returned with the error; rank 1 died
    survivor = (tmp_path / "rank0.txt").read_text()
    assert survivor.startswith("RankFailure: rank 0 of 2:") and "re-run the same command to resume" in survivor
    folder = tmp_path / "out" / "cells" / "ddim_uniform-2.batches"
    finished = sorted(p.name for p in folder.glob("batch-*.pt"))
    assert "batch-000001.pt" in finished and "batch-000003.pt" not in finished  # rank 1 kept its first batch
    # one process finishes the cell, sampling only what is missing, and gets the one-process images
    torch.manual_seed(0)
    model = Counted()
    config = _config(policies=("uniform",), budgets=(2,), references=(), num_samples=12, batch_size=2,
                     film_samples=0, grid_samples=0, cache_dir=str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with 1 thread: a cell's key holds the thread count (its images/s)
    try:
        report, whole = _finish_and_redo(model, config, tmp_path)
    finally:
        torch.set_num_threads(threads)
    missing = 6 - len(finished)
    assert model.calls == 1 + 1 + 2 * missing  # FLOP count, warm-up, the missing batches
    a = torch.load(tmp_path / "out" / "cells" / "ddim_uniform-2.pt", weights_only=True)["state"]["images"]
    b = torch.load(tmp_path / "fresh" / "cells" / "ddim_uniform-2.pt", weights_only=True)["state"]["images"]
    assert torch.equal(a, b) and report["cells"][0]["fid"] == pytest.approx(whole["cells"][0]["fid"], rel=1e-9)


def _finish_and_redo(model, config, tmp_path):
    from stepdrop import NoiseSchedule
    from stepdrop.compare import run_compare

    report = run_compare(model, NoiseSchedule.linear(100), config, tmp_path / "out", progress=False,
                         log=lambda s: None)
    torch.manual_seed(0)
    fresh = Counted()
    whole = run_compare(fresh, NoiseSchedule.linear(100), config, tmp_path / "fresh", progress=False,
                        log=lambda s: None)
    return report, whole


def test_sample_under_torchrun_equals_one_process(checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    def run(ranks: int) -> Path:
        args = ["-m", "stepdrop.cli", "sample", "--checkpoint", str(checkpoint), "--policies", "ddpm-3,ddim:stepdrop-3",
                "--num-samples", "5", "--batch-size", "2", "--clip", "0", "--threads", "1", "--out",
                str(tmp_path / f"out{ranks}"), "--save-images", str(tmp_path / f"img{ranks}"), "--no-progress"]
        if ranks > 1:
            args = ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
                    str(_free_port()), *args]
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-3000:]
        return tmp_path / f"img{ranks}"

    one, three = run(1), run(3)  # 3 batches: one per rank
    for spec in ("ddpm-3", "ddim_stepdrop-3"):  # a stochastic solver and a stochastic per-batch plan
        a, b = sorted((one / spec).glob("*.png")), sorted((three / spec).glob("*.png"))
        assert len(a) == len(b) == 5
        assert all(np.array_equal(np.array(Image.open(x)), np.array(Image.open(y))) for x, y in zip(a, b))
        assert json.loads((one / spec / "samples.json").read_text())["samples"] == \
            json.loads((three / spec / "samples.json").read_text())["samples"]
