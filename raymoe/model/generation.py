"""Text generation with a KV cache: greedy decoding and sampling (temperature, top-k,
top-p) over left-padded batches of prompts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from raymoe.model.gpt import GPT
from raymoe.model.token_ids import check_token_ids


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: expected >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: expected >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: expected a value in (0, 1]")

    def pick(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(batch, vocab) logits -> (batch,) next token ids."""
        if self.temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            sorted_probs = sorted_logits.softmax(dim=-1)
            drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= self.top_p  # keeps the first
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(batch, longest) ids with each prompt at the right end, and each row's padding."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
    pad = torch.tensor([longest - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), pad.to(device)


@torch.no_grad()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int,
             sampling: Sampling = Sampling(), *, use_cache: bool = True,
             is_done: Callable[[list[int]], bool] | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """The new tokens of each prompt (prompts are token id lists, not empty).

    A row stops once ``is_done(its new tokens)`` says so; generation ends when every row
    has stopped or ``max_new_tokens`` were drawn, or the model's context is full. With
    ``use_cache=False`` every step recomputes the whole sequence (the reference the cache
    is checked against).
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    check_token_ids(model.cfg.vocab_size, prompt=prompts)
    device = model.wte.weight.device
    ids, pad = left_pad(prompts, pad_id=0, device=device)
    max_new_tokens = min(max_new_tokens, model.cfg.seq_len - ids.shape[1])
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    cache = model.new_cache(len(prompts), ids.shape[1] + max_new_tokens, pad)
    logits = model(ids, cache=cache, keep_last=1).logits[:, -1]
    for step in range(max_new_tokens):
        token = sampling.pick(logits[:, :model.cfg.vocab_size], generator)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                new[row].append(t)
                done[row] = is_done is not None and is_done(new[row])
        if all(done) or step == max_new_tokens - 1:
            break
        if use_cache:
            logits = model(token.unsqueeze(1), cache=cache).logits[:, -1]
        else:
            ids = torch.cat([ids, token.unsqueeze(1)], dim=1)
            fresh = model.new_cache(len(prompts), ids.shape[1], pad)
            logits = model(ids, cache=fresh, keep_last=1).logits[:, -1]
    return new
