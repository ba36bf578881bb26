"""Dispatch and combine: tokens to the experts of the expert-parallel group and back.

Three ways, all index-based (never a [tokens, experts, capacity] tensor):

- Fixed capacity, when tokens are dropped (DeepSpeed's and GShard's exchange). The gate
  has already given each kept token its (expert, slot) and the capacity C is a function of
  shapes, so every rank sends a [E x C, d] buffer: rows [r x E_local x C, ...) go to rank
  r. Nothing needs the host: no count exchange and no variable split sizes.
- Variable splits, when no token is dropped (capacity is the largest expert load, known
  only from the counts). Kept assignments are sorted by expert and sent as they are; the
  per-expert counts are exchanged and read on the host once, in one copy, to size the
  all-to-all and the expert buffer.
- Blocks, without gradients (evaluation, decoding), when the group agreed on a block size
  small enough: each rank sends every rank a block of that many rows, each with its local
  expert's id in the row, after a header of the sender's tokens, flag and layer. No count
  exchange comes first: 2 exchanges a layer instead of 3, which is what bounds decoding a
  few tokens a step (each exchange costs a round trip, whatever its size). The size is
  top-k x the most tokens any rank routed in the group's previous forward, so that a
  rank's rows fit whatever their experts; when a rank has more, all ranks see it in the
  headers and run the layer again at the new size (or with counts, past
  BLOCK_EXCHANGE_BYTES). Decoding routes the same number of tokens every step, so only
  the first step after a prompt pays for that.

On a GPU a host read stalls the CPU until the device catches up; the fixed path has none,
the variable and block ones exactly one per layer forward. Either way the experts see an
[E_local, capacity, d] buffer, padded with zero rows, and each token's result comes back
scaled by its combine weight. The fixed path requires every rank of an expert-parallel
group to route the same number of tokens (training does: each rank runs micro_batch x
seq_len tokens), since each receiver assumes its peers' capacity equals its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from raymoe.model.gating import GateOutput, count_per_expert, position_in_expert

BLOCK_EXCHANGE_BYTES = 1 << 20
"""The block exchange is used while a rank's blocks (to every rank of the group) take at
most this many bytes: past it, padding every block to the largest rank's tokens costs
more in bytes than the count exchange it saves in latency."""


@dataclass
class GroupAgreement:
    """What the ranks of an expert-parallel group hear from each other in every exchange's
    header (_HEADER_FIELDS), and the block size they agree from it; one per group, shared
    by its MoE layers, so the same on every rank."""

    flag: int = 0
    """This rank's flag, sent with every header (raymoe.infer.worker's Lockstep: working)."""
    flags: list[int] = field(default_factory=list)
    """Every rank's flag in the last header."""
    block_rows: int | None = None
    """Rows per destination of the next block exchange; None: exchange counts first."""

    def heard(self, headers: list[list[int]], top_k: int, d_model: int, itemsize: int) -> bool:
        """Every rank's header from one layer's exchange; whether some rank's rows overflowed.
        Ranks in different layers (one failed inside a forward and went on in another) fail
        here, all alike, instead of serving each other's tokens to the wrong experts."""
        tokens, self.flags, layers, overflowed = (list(column) for column in zip(*headers, strict=True))
        if len(set(layers)) > 1:
            raise RuntimeError(f"the expert exchange is out of step: the group's ranks are in the MoE layers "
                               f"of blocks {layers} (one failed inside a forward?); start the group again")
        rows = top_k * max(tokens)
        fits = block_exchange_bytes(len(tokens), rows, d_model, itemsize) <= BLOCK_EXCHANGE_BYTES
        self.block_rows = rows if fits else None
        return any(overflowed)


def block_exchange_bytes(ep: int, block_rows: int, d_model: int, itemsize: int) -> int:
    """What a rank sends in one block exchange: to each rank a header row and ``block_rows``
    rows, each of a token's values and its local expert (int32)."""
    return ep * (block_rows + 1) * _block_row_bytes(d_model, itemsize)


def _block_row_bytes(d_model: int, itemsize: int) -> int:
    """A token's values, padded to 8 bytes (every dtype's alignment) and to room for the
    header (a header row uses its values' bytes), then 8 for its local expert."""
    return max(-(-d_model * itemsize // 8) * 8, 4 * _HEADER) + _ID_BYTES


_HEADER_FIELDS = ("tokens", "flag", "layer", "overflow")
"""An exchange header: the sender's tokens, its flag, its layer's block index, whether its
rows overflowed the block size (blocks only)."""
_HEADER = len(_HEADER_FIELDS)
_ID_BYTES = 8
"""A row's last bytes: its local expert (int32; -1 for padding), then padding."""


class ExpertExchange(Protocol):
    """How an MoE layer reaches the experts of its expert-parallel group."""

    ep_size: int
    ep_rank: int
    agreement: GroupAgreement

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        """Differentiable: rows [sum(send_counts[:r]), ...) go to rank r of the group."""

    def exchange_counts(self, counts: Tensor) -> Tensor:
        """(ep_size x n,) integers, n for each rank -> (ep_size, n) received per source."""

    def exchange_blocks(self, blocks: Tensor) -> Tensor:
        """Not differentiable: an equal share of ``blocks``' rows to each rank, in order;
        the shares from each rank come back in rank order."""


class LocalExchange:
    """One process holds every expert: all exchanges are identities."""

    ep_size = 1
    ep_rank = 0

    def __init__(self) -> None:
        self.agreement = GroupAgreement()

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        return x

    def exchange_counts(self, counts: Tensor) -> Tensor:
        return counts.view(1, -1)

    def exchange_blocks(self, blocks: Tensor) -> Tensor:
        return blocks


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
                      num_experts: int, dtype: torch.dtype, layer: int = 0) -> tuple[Tensor, int]:
    """Combined expert outputs (S, d) for any gate (dropping or not), without a capacity
    known beforehand, and the rows per local expert in the expert buffer: by blocks where
    the group agreed a block size and no gradient is needed, else with the counts first.
    ``layer``: the MoE layer's block index, which every rank must share."""
    agreement = exchange.agreement
    while exchange.ep_size > 1 and not torch.is_grad_enabled() and agreement.block_rows is not None:
        done = _dispatch_blocks(tokens, gate, exchange, experts, num_experts, dtype, layer, agreement.block_rows)
        if done is not None:
            return done
    return _dispatch_counted(tokens, gate, exchange, experts, num_experts, dtype, layer)


def _header(tokens: Tensor, exchange: ExpertExchange, layer: int, overflow: bool) -> tuple[int, ...]:
    return tokens.shape[0], exchange.agreement.flag, layer, int(overflow)


def _dispatch_counted(tokens: Tensor, gate: GateOutput, exchange: ExpertExchange, experts: ExpertsFn,
                      num_experts: int, dtype: torch.dtype, layer: int) -> tuple[Tensor, int]:
    """The variable split: counts (with each rank's header) first, then rows sized by them."""
    ep = exchange.ep_size
    local_experts, d = num_experts // ep, tokens.shape[1]
    expert, weight = gate.expert.reshape(-1), gate.weight.reshape(-1)
    top_k = _top_k(gate)
    by_expert = torch.where(gate.kept.reshape(-1), expert, num_experts)  # dropped: last
    order = torch.argsort(by_expert, stable=True)
    counts = count_per_expert(by_expert, num_experts + 1)[:num_experts]
    header = torch.stack([counts.new_full((ep,), value)  # fills: no copy to the device
                          for value in _header(tokens, exchange, layer, overflow=False)], dim=1)
    received = exchange.exchange_counts(torch.cat([counts.view(ep, local_experts), header], dim=1).flatten())
    sizes = _host_sizes(counts.view(ep, local_experts).sum(dim=1), received)  # on the device
    exchange.agreement.heard(sizes.headers, top_k, d, dtype.itemsize)
    order = order[:sum(sizes.send)]  # the kept assignments, sorted by expert
    token_index = order // top_k
    sent = tokens.index_select(0, token_index).to(dtype)
    arrived = exchange.all_to_all(sent, sizes.send, sizes.recv)
    del sent  # rows now live in `arrived` (the same tensor with one rank): free early

    # Rows arrive grouped by source rank, then by local expert: give each its place.
    local_expert = torch.arange(local_experts, device=tokens.device).repeat(ep)
    local_expert = local_expert.repeat_interleave(received[:, :-_HEADER].flatten(), output_size=sum(sizes.recv))
    row = local_expert * sizes.capacity + position_in_expert(local_expert, local_experts)
    buffer = arrived.new_zeros(local_experts * sizes.capacity, d)
    buffer.index_put_((row,), arrived)
    del arrived
    results = experts(buffer.view(local_experts, sizes.capacity, d), sizes.per_expert)
    results = results.reshape(-1, d).index_select(0, row)
    out = exchange.all_to_all(results, sizes.recv, sizes.send)
    return _Combine.apply(out, weight.index_select(0, order), token_index, tokens.shape[0]), sizes.capacity


@torch.no_grad()
def _dispatch_blocks(tokens: Tensor, gate: GateOutput, exchange: ExpertExchange, experts: ExpertsFn,
                     num_experts: int, dtype: torch.dtype, layer: int, block: int) -> tuple[Tensor, int] | None:
    """The block exchange (module docstring); None, on every rank alike, when some rank's
    rows did not fit ``block`` (the agreement then holds the size that fits)."""
    ep, d, device = exchange.ep_size, tokens.shape[1], tokens.device
    local_experts = num_experts // ep
    top_k = _top_k(gate)
    expert, weight = gate.expert.reshape(-1), gate.weight.reshape(-1)
    overflow = top_k * tokens.shape[0] > block
    data_bytes, row_bytes = d * dtype.itemsize, _block_row_bytes(d, dtype.itemsize)
    stride = block + 1  # a header row, then the block
    packed = torch.zeros(ep * stride + 1, row_bytes, dtype=torch.uint8, device=device)  # + a spare row
    id_bytes = slice(row_bytes - _ID_BYTES, row_bytes - _ID_BYTES + 4)
    ids = packed[:, id_bytes].view(torch.int32).view(-1)
    ids.fill_(-1)  # padding: no expert
    token_index = torch.arange(expert.numel(), device=device) // top_k
    to_rank = torch.where(gate.kept.reshape(-1), expert // local_experts, ep)  # dropped: none
    position = position_in_expert(to_rank, ep)
    if not overflow:  # else only the header goes: the layer runs again
        sent_row = torch.where(to_rank < ep, to_rank * stride + 1 + position, ep * stride)
        packed[:, :data_bytes].view(dtype).index_put_((sent_row,), tokens.index_select(0, token_index).to(dtype))
        ids.index_put_((sent_row,), (expert % local_experts).to(torch.int32))
    header = packed[:ep * stride].view(ep, stride, row_bytes)[:, 0, :4 * _HEADER].view(torch.int32)
    for field_index, value in enumerate(_header(tokens, exchange, layer, overflow)):
        header[:, field_index].fill_(value)  # a fill: no copy to the device, no wait for it

    arrived = exchange.exchange_blocks(packed[:ep * stride]).view(ep, stride, row_bytes)
    arrived_ids = arrived[:, 1:, id_bytes].reshape(-1).view(torch.int32).long()
    local_expert = torch.where(arrived_ids >= 0, arrived_ids, local_experts)  # padding: spare
    counts = count_per_expert(local_expert, local_experts + 1)[:local_experts]
    heard = arrived[:, 0, :4 * _HEADER].view(torch.int32)
    flat = torch.cat([heard.flatten().long(), counts]).tolist()  # the layer's one host sync
    headers = [flat[r * _HEADER:(r + 1) * _HEADER] for r in range(ep)]
    if exchange.agreement.heard(headers, top_k, d, dtype.itemsize):
        return None
    per_expert = flat[ep * _HEADER:]
    capacity = max(max(per_expert), 1)
    row = torch.where(local_expert < local_experts,
                      local_expert * capacity + position_in_expert(local_expert, local_experts),
                      local_experts * capacity)
    buffer = tokens.new_zeros(local_experts * capacity + 1, d, dtype=dtype)
    buffer.index_put_((row,), arrived[:, 1:, :data_bytes].reshape(-1, data_bytes).view(dtype))
    results = experts(buffer[:-1].view(local_experts, capacity, d), per_expert)
    # Padding rows go back as zeros (an expert's rows past its own are left unset).
    results = torch.cat([results.reshape(-1, d), results.new_zeros(1, d)])
    returned = exchange.exchange_blocks(results.index_select(0, row))  # each rank's rows, as sent
    # A dropped assignment reads any row: its combine weight is exactly 0.
    out = returned.index_select(0, torch.where(to_rank < ep, to_rank * block + position, 0))
    return _Combine.apply(out, weight, token_index, tokens.shape[0]), capacity


def _top_k(gate: GateOutput) -> int:
    """Assignments per token (from the shape: a rank may route no token at all)."""
    return gate.expert.shape[1] if gate.expert.ndim == 2 else 1


class _HostSizes:
    """What the variable exchange needs on the host, read from the device in one copy."""

    def __init__(self, send: list[int], received: list[list[int]], headers: list[list[int]]):
        self.headers = headers
        """Each rank's header."""
        self.send = send
        """Rows to each rank of the group."""
        self.recv = [sum(per_expert) for per_expert in received]
        """Rows from each rank of the group."""
        self.per_expert = [sum(col) for col in zip(*received, strict=True)]
        """Rows each local expert gets."""
        self.capacity = max(max(self.per_expert), 1)
        """The largest number of rows any local expert gets."""


def _host_sizes(send: Tensor, received: Tensor) -> _HostSizes:
    """From the rows to each rank and the (ep, E_local + _HEADER) counts and headers received."""
    ep, width = received.shape
    flat = torch.cat([send, received.flatten()]).tolist()  # the layer's one host sync
    per_source = [flat[ep + r * width: ep + (r + 1) * width] for r in range(ep)]
    return _HostSizes(flat[:ep], [row[:-_HEADER] for row in per_source], [row[-_HEADER:] for row in per_source])
