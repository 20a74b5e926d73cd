"""Scaling under torchrun on the CPU: one DDIM-25 cell (the embedded model, 64 samples in
batches of 8, 1 thread per process), 1 process against 2 torchrun ranks, rounds interleaved
in one benchmark run; the time is taken inside the processes, between barriers
(``torchrun_cell.py``). ``scaling`` = seconds(1 rank) / seconds(2 ranks) (target ≥ 1.7 on
2 cores). Slow: runs only with ``--benchmark-only``."""

import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path

CELL = Path(__file__).with_name("torchrun_cell.py")
SAMPLES, BATCH = 64, 8


def _seconds(ranks: int) -> float:
    cmd = [sys.executable, str(CELL), str(SAMPLES), str(BATCH)]
    if ranks > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-port",
               str(port), *cmd[1:]]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    return float(re.search(r"SECONDS ([0-9.]+)", done.stdout).group(1))


def test_two_ranks_against_one(benchmark_only, benchmark):
    ones, twos = [], []
    for _ in range(3):  # interleaved: both see the same machine state
        ones.append(_seconds(1))
        twos.append(_seconds(2))
    one, two = statistics.median(ones), statistics.median(twos)
    benchmark.extra_info.update(one_rank_s=one, two_ranks_s=two, scaling=one / two,
                                images_per_second_1=SAMPLES / one, images_per_second_2=SAMPLES / two)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the ratio above is the result
    print(f"\nDDIM-25, {SAMPLES} samples, batch {BATCH}, 1 thread per process: 1 rank {one:.2f} s "
          f"({SAMPLES / one:.1f} img/s), 2 ranks {two:.2f} s ({SAMPLES / two:.1f} img/s): scaling {one / two:.2f}x")
