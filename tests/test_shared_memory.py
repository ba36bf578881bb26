"""The shared-memory all-to-all of a CPU group on one host: the same rows as gloo's
all_to_all_single, equal shares or not, round after round (a rank rewrites a buffer only
once its peers have read it); rows past one rank's part leave the round to the process
group on every rank; a peer that is gone is named in an error instead of a hang."""

from __future__ import annotations

import time

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
