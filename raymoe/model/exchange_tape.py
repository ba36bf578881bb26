"""Activation checkpointing that runs each expert exchange once.

Checkpointing a block keeps its input and runs its forward again in backward to rebuild
the activations it dropped. An MoE layer's forward exchanges rows with the other ranks
of its expert-parallel group twice (dispatch and combine; the variable-split path
exchanges the per-expert counts first): run again, a layer would make 6 row all-to-alls
per micro-batch instead of 4, mostly across nodes at a large EP size. Instead the
checkpointed forward keeps what each exchange returned on a tape, and the recomputation
takes the results back from it in call order: the dense parts are recomputed, the
exchanges are not. The price is the exchanged rows, held from a layer's forward until
its recomputation (raymoe.plan.memory counts them). The variable-split path still reads
the exchanged counts on the host again when recomputed (a wait for the device, no traffic).

``checkpoint(block, ..., use_reentrant=False, context_fn=keep_exchanges)`` checkpoints a
region this way; an MoE layer reaches its exchange through ``taped(exchange)``.
"""

from __future__ import annotations

from collections import deque
from contextvars import ContextVar, Token
from typing import Any

import torch
from torch import Tensor

from raymoe.model.dispatch import ExpertExchange


class _TapeContext:
    """Makes a tape (what the exchanges of one checkpointed region returned in its forward,
    in order) the active one: recording (the checkpointed forward) or replaying (a
    recomputation). Re-entrant: each recomputation enters the same context."""

    def __init__(self, tape: deque[Tensor], replaying: bool):
        self.tape = tape
        self.replaying = replaying
        self._tokens: list[Token[_TapeContext | None]] = []

    def __enter__(self) -> None:
        self._tokens.append(_active.set(self))

    def __exit__(self, *exc: object) -> None:
        _active.reset(self._tokens.pop())
        if self.replaying:
            # Free the kept rows; a later recomputation (a second backward through a
            # retained graph) finds the tape empty and exchanges again, as every rank does.
            self.tape.clear()


_active: ContextVar[_TapeContext | None] = ContextVar("raymoe_exchange_tape", default=None)
"""Per thread: the backward's recomputation may run on autograd's device thread, and
enters its context there."""


def keep_exchanges() -> tuple[_TapeContext, _TapeContext]:
    """``context_fn`` of ``torch.utils.checkpoint.checkpoint``: the forward records the
    region's exchanges on a new tape, the recomputation replays them."""
    tape: deque[Tensor] = deque()
    return _TapeContext(tape, replaying=False), _TapeContext(tape, replaying=True)


def taped(exchange: ExpertExchange) -> ExpertExchange:
    """``exchange`` as the active tape records or replays it; itself outside checkpointed
    regions and within one process (an identity exchange costs nothing to repeat)."""
    context = _active.get()
    if context is None or exchange.ep_size == 1:
        return exchange
    return _TapedExchange(exchange, context)


class _TapedExchange:
    """An ExpertExchange whose results go on the tape (recording), or come from it
    (replaying; live once it is empty)."""

    def __init__(self, inner: ExpertExchange, context: _TapeContext):
        self.inner = inner
        self.context = context
        self.ep_size = inner.ep_size
        self.ep_rank = inner.ep_rank
        self.agreement = inner.agreement

    def all_to_all(self, x: Tensor, send_counts: list[int], recv_counts: list[int]) -> Tensor:
        kept = self._take()
        if kept is not None:
            return _Replayed.apply(x, self.inner, send_counts, recv_counts, _Kept(kept))
        return self._keep(self.inner.all_to_all(x, send_counts, recv_counts))

    def exchange_counts(self, counts: Tensor) -> Tensor:
        kept = self._take()
        return kept if kept is not None else self._keep(self.inner.exchange_counts(counts))

    def exchange_blocks(self, blocks: Tensor) -> Tensor:
        return self.inner.exchange_blocks(blocks)  # without gradients: nothing to recompute

    def _take(self) -> Tensor | None:
        tape = self.context.tape
        return tape.popleft() if self.context.replaying and tape else None

    def _keep(self, result: Tensor) -> Tensor:
        if not self.context.replaying:
            self.context.tape.append(result.detach())
        return result


class _Kept:
    """A kept result, handed to _Replayed as a plain object: not an input of its graph."""

    def __init__(self, tensor: Tensor):
        self.tensor = tensor


class _Replayed(torch.autograd.Function):
    """An all-to-all's output from the tape, attached to its input as the exchange would
    be: nothing is exchanged forward; backward (of the recomputed graph, which only a
    backward inside the checkpointed region runs) sends the gradient back like the
    exchange's own."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, exchange: ExpertExchange, send_counts: list[int],
                recv_counts: list[int], kept: _Kept) -> Tensor:
        ctx.exchange = exchange
        ctx.counts = (send_counts, recv_counts)
        return kept.tensor

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        send_counts, recv_counts = ctx.counts
        return ctx.exchange.all_to_all(grad, recv_counts, send_counts), None, None, None, None
