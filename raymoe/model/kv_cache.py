"""A key/value cache for incremental decoding of left-padded batches.

Rows of a batch may hold prompts of different lengths: each row is left-padded by
``pad[row]`` tokens, which no query attends to and which do not count as positions (the
first real token of every row has position 0). Keys and values are preallocated for
``max_len`` positions; ``length`` is how many are filled.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, pad: Tensor | None = None):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.pad = (pad if pad is not None else torch.zeros(batch, dtype=torch.long)).to(device)
        self.least_pad = int(self.pad.min())
        self.length = 0

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def longest(self, new_tokens: int) -> int:
        """The most real tokens of any row once ``new_tokens`` more are in (no device sync)."""
        return self.length + new_tokens - self.least_pad

    def positions(self, new_tokens: int) -> Tensor:
        """(batch, new_tokens) position ids of the next tokens, padding not counted."""
        steps = torch.arange(self.length, self.length + new_tokens, device=self.pad.device)
        return (steps.unsqueeze(0) - self.pad.unsqueeze(1)).clamp_(min=0)

    def attention_mask(self, new_tokens: int) -> Tensor:
        """(batch, 1, new_tokens, length + new_tokens): True where a query may attend.

        Causal, and blind to each row's left padding; a padding query sees itself only, so
        that no row of the softmax is empty (its output is never used).
        """
        total = self.length + new_tokens
        key = torch.arange(total, device=self.pad.device)
        query = torch.arange(self.length, total, device=self.pad.device)
        causal = key.view(1, 1, -1) <= query.view(1, -1, 1)
        real = key.view(1, 1, -1) >= self.pad.view(-1, 1, 1)
        itself = key.view(1, 1, -1) == query.view(1, -1, 1)
        return ((causal & real) | itself).unsqueeze(1)

    def store(self, layer: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new (batch, heads, new, head_dim) keys and values of ``layer``; return
        all of that layer's keys and values so far."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {end} tokens")
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def repeat_rows(self, counts: list[int]) -> KVCache:
        """A cache whose rows are row i of this one repeated counts[i] times (one context
        shared by several continuations)."""
        index = torch.repeat_interleave(torch.arange(self.batch, device=self.pad.device),
                                        torch.tensor(counts, device=self.pad.device))
        copy = KVCache.__new__(KVCache)
        copy.keys = self.keys.index_select(1, index)
        copy.values = self.values.index_select(1, index)
        copy.pad = self.pad.index_select(0, index)
        copy.least_pad = self.least_pad
        copy.length = self.length
        return copy
