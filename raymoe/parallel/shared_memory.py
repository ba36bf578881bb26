"""All-to-alls between the ranks of one host, through shared memory.

Decoding exchanges a few kilobytes per MoE layer and token step, so what an exchange costs
is its latency. gloo's all_to_all between two busy processes of one host costs about 1 ms
(measured here in a decode step: its work and transport threads hand each call over, and
every hand-over is a wake-up), against 0.2 ms for a copy into shared memory and a spin on
the peers' round counters: an EP 2 group decoding 64 rows took 14.7 ms a token step over
gloo and 7.9 ms this way, one rank 10.7 ms. So a CPU inference group whose ranks share a
host exchanges here (raymoe.parallel.exchange), and only where every rank is on the same
x86 host: x86 keeps one core's stores in order for the others, which is what lets a
counter written after the rows publish them. Elsewhere gloo, and NCCL on GPUs, do it.

Layout of the mapping: a 64-byte header per rank (its round counter, its process id,
whether its rows fit, in even and in odd rounds; rank 0's also a number that tells the
others they map the same file), then two buffers used in alternate rounds, each with a
part per (source, destination) pair. A rank rewrites a buffer (and its flag) only two
rounds on, by when every peer has read it (each has published the round between). A
round in which some rank's rows do not fit its parts is left, on every rank, to the
process group.
"""

from __future__ import annotations

import math
import os
import platform
import secrets
import socket
import tempfile
import time

import torch
import torch.distributed as dist
from torch import Tensor

SLOT_BYTES = 8 << 20
"""What one rank may send in one exchange, at most SLOT_BYTES / ranks to each; the mapping
holds 2 x ranks slots (16 MiB a rank)."""
SPIN_SECONDS = 2e-3
"""A waiting rank spins this long, yielding its core between looks (to a peer it waits
for, where ranks outnumber cores: an EP 4 group on 2 cores decoded in 18 ms a step
instead of 28), then sleeps between looks (a peer busy with a long forward, or done with
its work, should not cost a core)."""
_HEADER_BYTES = 64


class SharedMemoryAllToAll:
    """One group's mapping; ``all_to_all`` is collective over the group, as the process
    group's is."""

    def __init__(self, mapping: Tensor, rank: int, size: int, slot_bytes: int, timeout: float):
        self.rank, self.size, self.timeout = rank, size, timeout
        self.part_bytes = slot_bytes // size
        self.mapping = mapping
        header = mapping[:size * _HEADER_BYTES].view(torch.int64).view(size, -1)
        self.rounds, self.pids, self.fits = header[:, 0], header[:, 1], header[:, 2:4]
        self.nonces = header[:, 4]
        """Rank 0's: the number its ``connect`` wrote, which tells a rank it maps that file."""
        parts = mapping[size * _HEADER_BYTES:size * (_HEADER_BYTES + 2 * slot_bytes)]
        self.parts = parts.view(2, size, slot_bytes)[..., :size * self.part_bytes].unflatten(2, (size, -1))
        self.round = 0

    @classmethod
    def connect(cls, group: dist.ProcessGroup, slot_bytes: int = SLOT_BYTES,
                timeout: float = 600.0) -> SharedMemoryAllToAll | None:
        """Collective: the group's mapping, or None (on every rank) unless all its ranks
        run on one x86 host, see the same mapping and each other's processes (containers
        of one host may share neither /dev/shm nor process ids), and the room for it is
        there (a full /dev/shm would kill a rank that touches the mapping)."""
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        hosts: list[object] = [None] * size
        dist.all_gather_object(hosts, (socket.gethostname(), _boot_id(), platform.machine()), group=group)
        if len(set(hosts)) != 1 or platform.machine().lower() not in ("x86_64", "amd64"):
            return None
        nbytes = size * (_HEADER_BYTES + 2 * slot_bytes)
        offer: list[tuple[str, int] | None] = [_create(nbytes) if rank == 0 else None]
        dist.broadcast_object_list(offer, src=dist.get_global_rank(group, 0), group=group)
        if offer[0] is None:
            return None
        path, nonce = offer[0]
        exchange = None
        if os.path.exists(path):  # else from_file would make another file: not the group's
            mapping = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
            exchange = cls(mapping, rank, size, slot_bytes, timeout)
            exchange.pids[rank] = os.getpid()
        dist.barrier(group=group)  # every rank has mapped it and written its process id
        sees_all = exchange is not None and int(exchange.nonces[0]) == nonce and all(
            _running(int(pid)) for peer, pid in enumerate(exchange.pids) if peer != rank)
        agreed: list[object] = [None] * size
        dist.all_gather_object(agreed, sees_all, group=group)
        if rank == 0:
            os.unlink(path)  # the mappings stay; nothing is left behind when they go
        return exchange if all(agreed) else None

    def all_to_all(self, x: Tensor, send_counts: list[int] | None = None,
                   recv_counts: list[int] | None = None) -> Tensor | None:
        """Rows [sum(send_counts[:r]), ...) of ``x`` to rank r and ``recv_counts[r]`` rows
        from it, in rank order (None: equal shares); None, on every rank, when some rank's
        rows did not fit its parts (then the caller exchanges them otherwise)."""
        if send_counts is None or recv_counts is None:
            send_counts = recv_counts = [x.shape[0] // self.size] * self.size
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        sizes = [n * row_bytes for n in send_counts]
        fits = x.device.type == "cpu" and max(sizes) <= self.part_bytes
        self.round += 1
        parity = self.round % 2
        buffer = self.parts[parity]
        if fits:
            sent = x.contiguous().view(-1).view(torch.uint8)
            start = 0
            for peer, n in enumerate(sizes):
                buffer[self.rank, peer, :n].copy_(sent[start:start + n])
                start += n
        self.fits[self.rank, parity] = int(fits)
        self.rounds[self.rank] = self.round  # publishes the rows (stores stay in order)
        for peer in range(self.size):
            self._wait_for(peer)
        if not bool(self.fits[:, parity].all()):
            return None
        out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
        received = out.view(-1).view(torch.uint8)
        start = 0
        for peer, rows in enumerate(recv_counts):
            n = rows * row_bytes
            received[start:start + n].copy_(buffer[peer, self.rank, :n])
            start += n
        return out

    def _wait_for(self, peer: int) -> None:
        start = time.perf_counter()
        looks = 0
        while int(self.rounds[peer]) < self.round:
            looks += 1
            waited = time.perf_counter() - start
            if waited > SPIN_SECONDS:
                time.sleep(1e-4)
            else:
                os.sched_yield()
            if looks % 1024 == 0:
                self._check_alive(peer, waited)

    def _check_alive(self, peer: int, waited: float) -> None:
        pid = int(self.pids[peer])
        if waited > self.timeout or not _running(pid):
            why = f"waited {waited:.0f} s" if waited > self.timeout else f"its process {pid} is gone"
            raise RuntimeError(f"shared-memory exchange: rank {peer} of the group never sent round "
                               f"{self.round} ({why})")


def _create(nbytes: int) -> tuple[str, int] | None:
    """A file of ``nbytes`` reserved (not sparse) under /dev/shm, with a random number at
    rank 0's nonce; None where there is no room for it."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") else None
    handle, path = tempfile.mkstemp(prefix="raymoe-exchange-", dir=folder)
    nonce = secrets.randbits(62) + 1
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(handle, 0, nbytes)
        else:
            os.ftruncate(handle, nbytes)
        os.pwrite(handle, nonce.to_bytes(8, "little"), 4 * 8)  # rank 0's header, field 4
    except OSError:
        os.unlink(path)
        return None
    finally:
        os.close(handle)
    return path, nonce


def _running(pid: int) -> bool:
    if not os.path.isdir("/proc"):
        return True  # nothing to look at: only the timeout tells
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")  # not a zombie
    except FileNotFoundError:
        return False


def _boot_id() -> str:
    """Tells two machines of one hostname apart (containers on several hosts)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""
