"""The shared-memory all-to-all of a CPU group on one host: the same rows as gloo's
all_to_all_single, equal shares or not, round after round (a rank rewrites a buffer only
once its peers have read it); rows past one rank's part leave the round to the process
group on every rank; a peer that is gone is named in an error instead of a hang; a group
whose ranks cannot share a mapping (no room, a /dev/shm or process ids of their own) is
told so on every rank, and exchanges over the process group instead."""

from __future__ import annotations

import contextlib
import errno
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from multiproc import run_distributed

from raymoe.parallel.shared_memory import SharedMemoryAllToAll


def rounds_worker(rank: int, world: int) -> list[bool]:
    shared = SharedMemoryAllToAll.connect(dist.group.WORLD, slot_bytes=4096 * world)
    assert shared is not None, "ranks of one host"
    same = []
    for step in range(40):  # ranks drift apart: each sleeps now and then
        if step % 7 == rank:
            time.sleep(0.01)
        dtype = (torch.float32, torch.bfloat16, torch.int64, torch.uint8)[step % 4]
        # Rows from rank r to rank p: equal shares on even steps, else they vary (none too).
        counts = [[1 + step % 5 if step % 2 == 0 else (r + 2 * p + step) % 4 for p in range(world)]
                  for r in range(world)]
        send, recv = counts[rank], [counts[r][rank] for r in range(world)]
        x = (torch.arange(sum(send) * 3) + 1000 * rank + step).to(dtype).view(-1, 3)
        expected = x.new_empty(sum(recv), 3)
        dist.all_to_all_single(expected, x, recv, send)
        got = shared.all_to_all(x) if step % 2 == 0 else shared.all_to_all(x, send, recv)
        same.append(got is not None and torch.equal(got, expected))
    # One rank's rows to one peer past its part (4096 bytes): every rank is told None.
    too_many = [4097 if rank == 0 and p == 1 else 1 for p in range(world)]
    from_others = [4097 if r == 0 and rank == 1 else 1 for r in range(world)]
    x = torch.zeros(sum(too_many), 1, dtype=torch.uint8)
    same.append(shared.all_to_all(x, too_many, from_others) is None)
    return same


@pytest.mark.parametrize("world", [2, 3])
def test_rounds_give_gloos_rows(tmp_path, world):
    for rank_results in run_distributed(rounds_worker, world, tmp_path):
        assert all(rank_results), [i for i, ok in enumerate(rank_results) if not ok]


def gone_peer_worker(rank: int, world: int) -> str:
    shared = SharedMemoryAllToAll.connect(dist.group.WORLD)
    assert shared is not None
    if rank == 1:
        return "left"  # its process ends without sending
    start = time.perf_counter()
    try:
        shared.all_to_all(torch.zeros(2, 4))
    except RuntimeError as e:
        return f"{time.perf_counter() - start:.1f} s: {e}"
    return "no error"


def test_a_peer_that_is_gone_is_named_not_waited_for(tmp_path):
    error = run_distributed(gone_peer_worker, 2, tmp_path)[0]
    seconds, message = error.split(" s: ", 1)
    assert "rank 1 of the group never sent round 1" in message and "is gone" in message
    assert float(seconds) < 20


def refused_worker(rank: int, world: int, case: str) -> tuple[bool, list[str]]:
    """``case`` on one rank: no room under /dev/shm (rank 0 creates the file), a /dev/shm
    of its own (rank 1 does not find the file), or process ids of its own (rank 1 does not
    see rank 0's process). Every rank must be told None, and no file left behind."""
    from raymoe.parallel import shared_memory

    patches = {
        "no room": (0, mock.patch.object(shared_memory.os, "posix_fallocate",
                                         side_effect=OSError(errno.ENOSPC, "No space left on device"))),
        "own /dev/shm": (1, mock.patch.object(shared_memory.os.path, "exists", return_value=False)),
        "own process ids": (1, mock.patch.object(shared_memory, "_running", return_value=False)),
    }
    patched_rank, patch = patches[case]
    with patch if rank == patched_rank else contextlib.nullcontext():
        shared = SharedMemoryAllToAll.connect(dist.group.WORLD)
    dist.barrier()
    return shared is None, sorted(p.name for p in Path("/dev/shm").glob("raymoe-exchange-*"))


@pytest.mark.parametrize("case", ["no room", "own /dev/shm", "own process ids"])
def test_a_group_that_cannot_share_a_mapping_is_told_so_on_every_rank(tmp_path, case):
    before = sorted(p.name for p in Path("/dev/shm").glob("raymoe-exchange-*"))
    for refused, left in run_distributed(refused_worker, 2, tmp_path, case):
        assert refused
        assert left == before
