"""The expert-parallel exchange over a process group: a differentiable all-to-all with
given split sizes (``all_to_all_single``; the list form fails on gloo when the sizes
differ), the per-expert count exchange and the equal-split block exchange. None reads a
device value on the host. A CPU group on one host may pass them through shared memory
instead (raymoe.parallel.shared_memory), those that fit its parts."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from raymoe.model.dispatch import GroupAgreement
from raymoe.parallel.shared_memory import SharedMemoryAllToAll


class _AllToAll(torch.autograd.Function):
    """Rows go out by ``send_counts`` and come in by ``recv_counts``; the gradient goes
    back the opposite way."""

    @staticmethod
    def forward(ctx, x: Tensor, send_counts: list[int], recv_counts: list[int],
                exchange: ProcessGroupExchange) -> Tensor:
        ctx.counts = (send_counts, recv_counts)
        ctx.exchange = exchange
        return exchange.exchange_rows(x, send_counts, recv_counts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        send_counts, recv_counts = ctx.counts
        return ctx.exchange.exchange_rows(grad, recv_counts, send_counts), None, None, None


class ProcessGroupExchange:
    def __init__(self, group: dist.ProcessGroup, ep_size: int, ep_rank: int):
        self.group = group
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.agreement = GroupAgreement()
        self.shared: SharedMemoryAllToAll | None = None
        """Where set, the exchanges that fit go through shared memory."""
        self.seconds = 0.0
        """Wall time spent in row and block all-to-alls, forward and backward (host-side:
        on a GPU it counts only what the host waits for)."""

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        return _AllToAll.apply(x, send_counts, recv_counts, self)

    def exchange_rows(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        start = time.perf_counter()
        out = self._exchange(x, send_counts, recv_counts)
        self.seconds += time.perf_counter() - start
        return out

    def exchange_counts(self, counts: Tensor) -> Tensor:
        return self._exchange(counts).view(self.ep_size, -1)

    def exchange_blocks(self, blocks: Tensor) -> Tensor:
        start = time.perf_counter()
        out = self._exchange(blocks)
        self.seconds += time.perf_counter() - start
        return out

    def _exchange(self, x: Tensor, send_counts: list[int] | None = None,
                  recv_counts: list[int] | None = None) -> Tensor:
        """Through shared memory where set and the rows fit, else the process group's
        all_to_all (counts None: equal shares)."""
        out = self.shared.all_to_all(x, send_counts, recv_counts) if self.shared is not None else None
        if out is None:
            rows = x.shape[0] if recv_counts is None else sum(recv_counts)
            out = x.new_empty((rows,) + tuple(x.shape[1:]))
            dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        return out
