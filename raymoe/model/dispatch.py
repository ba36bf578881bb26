"""Dispatch and combine: tokens to the experts of the expert-parallel group and back.

Two ways, both index-based (never a [tokens, experts, capacity] tensor):

- Fixed capacity, when tokens are dropped (DeepSpeed's and GShard's exchange). The gate
  has already given each kept token its (expert, slot) and the capacity C is a function of
  shapes, so every rank sends a [E x C, d] buffer: rows [r x E_local x C, ...) go to rank
  r. Nothing needs the host: no count exchange and no variable split sizes.
- Variable splits, when no token is dropped (capacity is the largest expert load, known
  only from the counts). Kept assignments are sorted by expert and sent as they are; the
  per-expert counts are exchanged and read on the host once, in one copy, to size the
  all-to-all and the expert buffer.

On a GPU a host read stalls the CPU until the device catches up; the fixed path has none,
the variable one exactly one per layer forward. Either way the experts see an
[E_local, capacity, d] buffer, padded with zero rows, and each token's result comes back
scaled by its combine weight. The fixed path requires every rank of an expert-parallel
group to route the same number of tokens (training does: each rank runs micro_batch x
seq_len tokens), since each receiver assumes its peers' capacity equals its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from raymoe.model.gating import GateOutput, count_per_expert, position_in_expert


class ExpertExchange(Protocol):
    """How an MoE layer reaches the experts of its expert-parallel group."""

    ep_size: int
    ep_rank: int

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        """Differentiable: rows [sum(send_counts[:r]), ...) go to rank r of the group."""

    def exchange_counts(self, counts: Tensor) -> Tensor:
        """(E,) routed counts per global expert -> (ep_size, E_local) received per source."""


class LocalExchange:
    """One process holds every expert: all exchanges are identities."""

    ep_size = 1
    ep_rank = 0

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        return x

    def exchange_counts(self, counts: Tensor) -> Tensor:
        return counts.view(1, -1)


ExpertsFn = Callable[[Tensor, "list[int] | None"], Tensor]
"""The local experts: (E_local, C, d) -> (E_local, C, d), given each expert's real rows
(the first of its C; the rest are padding whose outputs go unused) where the host knows them."""


class _Combine(torch.autograd.Function):
    """y[token] += weight * out for each assignment, keeping only what backward needs
    (autograd's mul + index_add would hold two [assignments, d] tensors, not one)."""

    @staticmethod
    def forward(ctx, out: Tensor, weight: Tensor, token_index: Tensor, num_tokens: int) -> Tensor:
        ctx.save_for_backward(out, weight, token_index)
        y = out.new_zeros(num_tokens, out.shape[1])
        return y.index_add_(0, token_index, out * weight.unsqueeze(1).to(out.dtype))

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        out, weight, token_index = ctx.saved_tensors
        rows = grad_y.index_select(0, token_index).to(out.dtype)
        grad_weight = torch.bmm(rows.unsqueeze(1), out.unsqueeze(2)).view(-1).to(weight.dtype)
        return rows.mul_(weight.unsqueeze(1).to(rows.dtype)), grad_weight, None, None


def dispatch_fixed(tokens: Tensor, gate: GateOutput, exchange: ExpertExchange, experts: ExpertsFn,
                   num_experts: int, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Combined expert outputs (S, d) for tokens routed with dropping, and the rows per
    local expert in the expert buffer (EP size x the gate's capacity)."""
    assert gate.capacity is not None, "the fixed-capacity exchange needs a capacity"
    capacity, ep = gate.capacity, exchange.ep_size
    local_experts, d = num_experts // ep, tokens.shape[1]
    expert, slot, weight = gate.expert.reshape(-1), gate.slot.reshape(-1), gate.weight.reshape(-1)
    top_k = _top_k(gate)
    rows = num_experts * capacity
    # A dropped assignment goes to a spare last row that is never sent.
    row = torch.where(slot >= 0, expert * capacity + slot, rows)
    token_index = torch.arange(expert.numel(), device=tokens.device) // top_k
    values = tokens if top_k == 1 else tokens.index_select(0, token_index)
    send_buffer = tokens.new_zeros(rows + 1, d, dtype=dtype)
    send_buffer.index_put_((row,), values.to(dtype))  # index_put_ keeps only the indices
    split = [local_experts * capacity] * ep
    arrived = exchange.all_to_all(send_buffer[:rows], split, split)  # (source, expert, slot)
    buffer_ECD = arrived.view(ep, local_experts, capacity, d).transpose(0, 1).reshape(
        local_experts, ep * capacity, d)
    out_ECD = experts(buffer_ECD, None)
    back = out_ECD.view(local_experts, ep, capacity, d).transpose(0, 1).reshape(rows, d)
    returned = exchange.all_to_all(back, split, split)  # (global expert, slot), as sent
    # A dropped assignment reads any real row: its combine weight is exactly 0.
    out = returned.index_select(0, row.clamp(max=rows - 1))
    return _Combine.apply(out, weight, token_index, tokens.shape[0]), ep * capacity


def dispatch_variable(tokens: Tensor, gate: GateOutput, exchange: ExpertExchange, experts: ExpertsFn,
                      num_experts: int, dtype: torch.dtype) -> tuple[Tensor, int]:
    """Combined expert outputs (S, d) with split sizes from the routed counts (any gate,
    dropping or not), and the rows per local expert in the expert buffer."""
    ep = exchange.ep_size
    local_experts, d = num_experts // ep, tokens.shape[1]
    expert, weight = gate.expert.reshape(-1), gate.weight.reshape(-1)
    top_k = _top_k(gate)
    by_expert = torch.where(gate.kept.reshape(-1), expert, num_experts)  # dropped: last
    order = torch.argsort(by_expert, stable=True)
    counts = count_per_expert(by_expert, num_experts + 1)[:num_experts]
    received = exchange.exchange_counts(counts)  # (ep, E_local), on the device
    sizes = _host_sizes(counts.view(ep, local_experts).sum(dim=1), received)
    order = order[:sum(sizes.send)]  # the kept assignments, sorted by expert
    token_index = order // top_k
    sent = tokens.index_select(0, token_index).to(dtype)
    arrived = exchange.all_to_all(sent, sizes.send, sizes.recv)
    del sent  # rows now live in `arrived` (the same tensor with one rank): free early

    # Rows arrive grouped by source rank, then by local expert: give each its place.
    local_expert = torch.arange(local_experts, device=tokens.device).repeat(ep)
    local_expert = local_expert.repeat_interleave(received.flatten(), output_size=sum(sizes.recv))
    row = local_expert * sizes.capacity + position_in_expert(local_expert, local_experts)
    buffer = arrived.new_zeros(local_experts * sizes.capacity, d)
    buffer.index_put_((row,), arrived)
    del arrived
    results = experts(buffer.view(local_experts, sizes.capacity, d), sizes.per_expert)
    results = results.reshape(-1, d).index_select(0, row)
    out = exchange.all_to_all(results, sizes.recv, sizes.send)
    return _Combine.apply(out, weight.index_select(0, order), token_index, tokens.shape[0]), sizes.capacity


def _top_k(gate: GateOutput) -> int:
    """Assignments per token (from the shape: a rank may route no token at all)."""
    return gate.expert.shape[1] if gate.expert.ndim == 2 else 1


class _HostSizes:
    """What the variable exchange needs on the host, read from the device in one copy."""

    def __init__(self, send: list[int], received: list[list[int]]):
        self.send = send
        """Rows to each rank of the group."""
        self.recv = [sum(per_expert) for per_expert in received]
        """Rows from each rank of the group."""
        self.per_expert = [sum(col) for col in zip(*received, strict=True)]
        """Rows each local expert gets."""
        self.capacity = max(max(self.per_expert), 1)
        """The largest number of rows any local expert gets."""


def _host_sizes(send: Tensor, received: Tensor) -> _HostSizes:
    ep, local_experts = received.shape
    flat = torch.cat([send, received.flatten()]).tolist()  # the layer's one host sync
    return _HostSizes(flat[:ep], [flat[ep + r * local_experts: ep + (r + 1) * local_experts]
                                  for r in range(ep)])
