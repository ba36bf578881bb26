"""Which rows form a batch (BatchWhenFree), and which rows of a batch can share one
generate call (plan_calls).

Generation takes one sampling setting and one seed per call, and left-pads a call's
prompts to the longest: rows share a call when they sample alike and, together, fit
the model's context (the longest prompt plus the most new tokens). Greedy rows all
sample alike. A row with a seed gets a call of its own, so that its text depends on
its request only; sampled rows without one share a call with a fresh seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Row:
    """One prompt's generation: what the model's replicas batch."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def sampling_key(self, index: int) -> Hashable:
        if self.temperature == 0:
            return "greedy"
        if self.seed is not None:
            return index  # alone
        return self.temperature, self.top_p


@dataclass
class Call:
    """The rows (indices into the batch) of one generate call."""

    rows: list[int] = field(default_factory=list)
    longest: int = 0
    max_tokens: int = 0

    def fits(self, row: Row, seq_len: int) -> bool:
        return max(self.longest, len(row.prompt)) + max(self.max_tokens, row.max_tokens) <= seq_len

    def add(self, index: int, row: Row) -> None:
        self.rows.append(index)
        self.longest = max(self.longest, len(row.prompt))
        self.max_tokens = max(self.max_tokens, row.max_tokens)


def plan_calls(rows: Sequence[Row], seq_len: int) -> list[Call]:
    """The batch's rows in calls, in order of their first row (each row alone must fit)."""
    open_calls: dict[Hashable, list[Call]] = {}
    calls: list[Call] = []
    for index, row in enumerate(rows):
        same = open_calls.setdefault(row.sampling_key(index), [])
        call = next((c for c in same if c.fits(row, seq_len)), None)
        if call is None:
            call = Call()
            same.append(call)
            calls.append(call)
        call.add(index, row)
    return calls


RunBatch = Callable[[list[Row]], Awaitable[list[list[int]]]]
"""Generates a batch's rows: each row's new tokens, in order."""

Waiting = tuple[Row, "asyncio.Future[list[int]]"]
"""A queued row and the future its request awaits."""


class BatchWhenFree:
    """Batches rows for one model that runs one batch at a time: once the model is free and
    a row waits, the batch fills for at most ``wait_s`` (at once when ``max_rows`` wait) and
    takes every row queued by then, those that came while the previous batch ran included.
    (Waiting after a busy batch too, as Serve does, lets the clients it answered send
    their next rows in time to join, where they do so within ``wait_s``.)

    Written here rather than taken from Serve: ``@serve.batch`` (Ray 2.60) forms each batch
    ``wait_s`` after its first row even while the previous batch still runs, and queues the
    batches behind one another, so under load its batches stay as small as the rows of one
    wait (bench/serve.py, 32 clients: 2 to 2.6 rows a batch with it, 16 with this; docs/serve.md).
    """

    def __init__(self, run: RunBatch, max_rows: int, wait_s: float):
        if max_rows < 1:
            raise ValueError(f"max_rows={max_rows}: expected at least 1")
        self.run, self.max_rows, self.wait_s = run, max_rows, wait_s
        self.queue: deque[Waiting] = deque()
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None

    async def submit(self, row: Row) -> list[int]:
        """The row's new tokens, once the batch it joins has run."""
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self.queue.append((row, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():
            # A context of its own: not the first request's (Serve's request id, for one).
            self.worker = asyncio.create_task(self._batches(), context=contextvars.Context())
        return await future

    async def _batches(self) -> None:
        try:
            while True:
                if not self.queue:
                    self.arrived.clear()
                    await self.arrived.wait()
                await self._fill()
                batch = self._take()
                if batch:
                    await self._run(batch)
        finally:  # stopped (cancelled with the replica): no request is left waiting
            while self.queue:
                self.queue.popleft()[1].cancel()

    async def _fill(self) -> None:
        """Wait for more rows, at most ``wait_s`` or until ``max_rows`` queue."""
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while len(self.queue) < self.max_rows:
            self.arrived.clear()
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), left)

    def _take(self) -> list[Waiting]:
        """Up to ``max_rows`` queued rows whose requests still wait (a cancelled one is dropped)."""
        batch: list[Waiting] = []
        while self.queue and len(batch) < self.max_rows:
            row, future = self.queue.popleft()
            if not future.done():
                batch.append((row, future))
        return batch

    async def _run(self, batch: list[Waiting]) -> None:
        try:
            outputs = await self.run([row for row, _ in batch])
            for (_, future), tokens in zip(batch, outputs, strict=True):
                if not future.done():
                    future.set_result(tokens)
        except Exception as err:  # noqa: BLE001 - the batch's requests get the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
        except BaseException:  # cancelled (the replica stops): so are its requests
            for _, future in batch:
                future.cancel()
            raise
