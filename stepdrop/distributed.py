"""Running under ``torchrun``: one process per rank, work sharded by whole batches.

``torchrun --nproc-per-node N -m stepdrop.cli compare ...`` (or ``sample``) starts N copies;
:func:`start` joins them into one ``torch.distributed`` group (gloo on the CPU, NCCL on GPUs,
one GPU per local rank) with a collective timeout, so that a rank that dies makes the others
fail with an error instead of waiting forever. Without torchrun's environment it returns a
group of one and nothing else changes.

The rules that make the result independent of the number of ranks:

* work is split by whole batches, batch i to rank ``i % world``; every batch draws its noise
  and plans from its own seeds, so a batch is the same computation on any rank;
* each finished batch is stored in its own file under the (shared) output folder, so a run
  interrupted anywhere resumes without sampling a finished batch again, with the same or
  another number of ranks;
* rank 0 merges the batches in order and writes every report; the other ranks wait for it.

The output folder must be visible to every rank: torchrun on one machine, or a shared file
system across machines.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["Group", "RankFailure", "start"]

DEFAULT_TIMEOUT_S = 1800.0
"""How long a collective waits for a rank (a cell's features on a slow rank take minutes)."""


class RankFailure(RuntimeError):
    """A collective failed: another rank died or timed out (its log says why)."""


@dataclass(frozen=True)
class Group:
    """This process's place in the run: ``rank`` of ``world`` (``world == 1``: no torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: it writes the reports and shows the progress bars."""
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's share: items i with i % world == rank."""
        return [item for i, item in enumerate(items) if i % self.world == self.rank]

    def barrier(self, what: str) -> None:
        if self.world > 1:
            _collective(what, self, dist.barrier)

    def all_gather(self, obj: Any, what: str) -> list[Any]:
        """Every rank's ``obj``, in rank order (pickled: for metadata and feature tensors)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        _collective(what, self, dist.all_gather_object, out, obj)
        return out

    def close(self, destroy: bool = True) -> None:
        """Wait until every rank is done (rank 0 writes last), then leave the group: a rank that
        exits while another is still in a collective would take the process group down with it.
        ``destroy=False`` keeps the group for a process that ends right after (the command line
        exits with ``os._exit`` then: gloo's teardown, racing the other ranks' closing sockets,
        can abort a finished rank)."""
        if self.world > 1 and dist.is_initialized():
            self.barrier("the end of the run")
            if destroy:
                dist.destroy_process_group()

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        _collective(what, self, dist.broadcast_object_list, box, 0)
        return box[0]


def start(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Group, str]:
    """Join the torchrun group, if there is one: (group, this rank's device). A CUDA device
    becomes ``cuda:<local rank>``; the backend is NCCL there and gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=_dt.timedelta(seconds=timeout_s))
    return Group(rank, world, local), device


def _collective(what: str, group: Group, fn, *args) -> None:
    try:
        fn(*args)
    except (RuntimeError, dist.DistBackendError) as exc:  # a peer closed its connection, or the timeout passed
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RankFailure(f"rank {group.rank} of {group.world}: {what} failed, so another rank died or timed out "
                          f"({first}); see the other ranks' logs above, then re-run the same command to resume "
                          f"(finished batches are kept)") from exc
