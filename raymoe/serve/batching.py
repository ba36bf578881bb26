"""Which rows of a batch can share one generate call.

Generation takes one sampling setting and one seed per call, and left-pads a call's
prompts to the longest: rows share a call when they sample alike and, together, fit
the model's context (the longest prompt plus the most new tokens). Greedy rows all
sample alike. A row with a seed gets a call of its own, so that its text depends on
its request only; sampled rows without one share a call with a fresh seed.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
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
