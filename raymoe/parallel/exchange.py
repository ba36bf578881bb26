"""The expert-parallel exchange over a process group: a differentiable all-to-all with
given split sizes (``all_to_all_single``; the list form fails on gloo when the sizes
differ) and the per-expert count exchange. Neither reads a device value on the host."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor


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
        self.seconds = 0.0
        """Wall time spent in row all-to-alls, forward and backward (host-side: on a GPU
        it counts only what the host waits for)."""

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        return _AllToAll.apply(x, send_counts, recv_counts, self)

    def exchange_rows(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        start = time.perf_counter()
        out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=self.group)
        self.seconds += time.perf_counter() - start
        return out

    def exchange_counts(self, counts: Tensor) -> Tensor:
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.group)
        return received.view(self.ep_size, -1)
