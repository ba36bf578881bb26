"""Token ids checked where they enter from outside (prompts, scored texts), on the host
before they reach the device: there an id outside the embedding is a CUDA assert that
names nothing, and checking a device tensor would read it back to the host. Training
data is checked where it is read (raymoe.data.shards)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def check_token_ids(vocab_size: int, **ids: Iterable[Sequence[int]]) -> None:
    """Raise naming the first id outside [0, vocab_size): each keyword is some rows of
    token ids, named for what they are ("prompt", "context", "continuation")."""
    for what, rows in ids.items():
        for row in rows:
            if row and (min(row) < 0 or max(row) >= vocab_size):
                bad = next(i for i in row if not 0 <= i < vocab_size)
                raise ValueError(f"{what} token id {bad} is outside the vocabulary [0, {vocab_size})")
