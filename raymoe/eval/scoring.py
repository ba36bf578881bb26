"""Batched log-likelihood scoring and greedy generation with a GPT and its tokenizer.

Token pairs follow lm-evaluation-harness: the context is encoded alone, the continuation is
what encoding context + continuation adds after it, and an input too long for the model
loses tokens on the left (a continuation longer than the model's context is scored on its
last seq_len tokens). Log-probabilities are over the tokenizer's vocabulary (the
embedding's padding rows are not tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from raymoe.data.tokenizers import Tokenizer
from raymoe.model import GPT
from raymoe.model.generation import Sampling, generate, left_pad
from raymoe.model.precision import autocast
from raymoe.model.token_ids import check_token_ids


@dataclass(frozen=True)
class Score:
    logprob: float
    """Sum of the continuation tokens' log-probabilities."""
    greedy: bool
    """Whether every continuation token is the model's argmax."""


TokenPair = tuple[list[int], list[int]]


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[TokenPair]:
    """(context, continuation) texts -> token ids; trailing spaces of the context move to
    the continuation, an empty context becomes the end-of-text token."""
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        moved.append((context, continuation))
    contexts = tokenizer.encode_batch([c for c, _ in moved])
    wholes = tokenizer.encode_batch([c + k for c, k in moved])
    encoded = []
    for context_ids, whole in zip(contexts, wholes, strict=False):
        continuation_ids = whole[len(context_ids):]
        if not continuation_ids:
            raise ValueError("a continuation encodes to no tokens")
        encoded.append((context_ids or [tokenizer.eot_id], continuation_ids))
    return encoded


class Scorer:
    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: expected >= 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_len = model.cfg.seq_len
        self.vocab = tokenizer.vocab_size
        self.device = model.wte.weight.device

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer.encode_batch(texts)

    def encode_pairs(self, pairs: list[tuple[str, str]]) -> list[TokenPair]:
        return encode_pairs(self.tokenizer, pairs)

    def fit(self, context: list[int], continuation: list[int]) -> TokenPair:
        """The pair cut to the model's context (seq_len inputs predict seq_len + 1 tokens):
        tokens go on the left; a continuation longer than seq_len keeps its last ones."""
        whole = context + continuation
        if len(whole) <= self.max_len + 1:
            return context, continuation
        whole = whole[-(self.max_len + 1):]
        scored = min(len(continuation), self.max_len)
        return whole[:-scored], whole[-scored:]

    def _log_probs(self, logits: Tensor) -> Tensor:
        return logits[..., :self.vocab].float().log_softmax(dim=-1)

    @staticmethod
    def _score(log_probs: Tensor, targets: list[int]) -> Score:
        """log_probs: (len(targets), vocab), row i predicting targets[i]."""
        target = torch.tensor(targets, device=log_probs.device)
        picked = log_probs.gather(1, target.unsqueeze(1)).sum()
        return Score(float(picked), bool((log_probs.argmax(dim=1) == target).all()))

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices in batches of similar lengths (longest first), to pad little."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    @torch.no_grad()
    def loglikelihoods(self, pairs: list[TokenPair]) -> list[Score]:
        """Each continuation given its context, one full forward per batch (no cache)."""
        self._check(pairs)
        pairs = [self.fit(c, k) for c, k in pairs]
        results: list[Score] = [Score(0.0, False)] * len(pairs)
        for batch in self._batches([len(c) + len(k) for c, k in pairs]):
            inputs = [(pairs[i][0] + pairs[i][1])[:-1] for i in batch]
            longest = max(len(x) for x in inputs)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, x in enumerate(inputs):
                ids[row, :len(x)] = torch.tensor(x)
            features, _ = self.model.features(ids.to(self.device))
            for row, i in enumerate(batch):  # the output layer only where a continuation is
                continuation, end = pairs[i][1], len(inputs[row])
                rows = self._log_probs(self.model.head(features[row, end - len(continuation):end]))
                results[i] = self._score(rows, continuation)
        return results

    @torch.no_grad()
    def choice_loglikelihoods(self, items: list[tuple[list[int], list[list[int]]]],
                              use_cache: bool = True) -> list[list[Score]]:
        """For (context, continuations) items, every continuation's score.

        With ``use_cache`` an item whose context is longer than its continuations runs
        the context once into a KV cache that its continuations then share (a question
        reads its passage once, not once a choice; a context too long for the model
        loses as many tokens as the longest continuation of its batch needs). Other
        items, and all without ``use_cache``, run every (context, continuation) pair as
        one full forward.
        """
        self._check([(c, k) for c, ks in items for k in ks])
        shared = [use_cache and self._worth_sharing(c, ks) for c, ks in items]
        results: list[list[Score]] = [[] for _ in items]
        separate = [i for i, s in enumerate(shared) if not s]
        flat = iter(self.loglikelihoods([(items[i][0], k) for i in separate for k in items[i][1]]))
        for i in separate:
            results[i] = [next(flat) for _ in items[i][1]]
        cached = [i for i, s in enumerate(shared) if s]
        for batch in self._batches([len(items[i][0]) for i in cached]):
            batch = [cached[b] for b in batch]
            for i, scores in zip(batch, self._shared_context_batch([items[i] for i in batch]), strict=False):
                results[i] = scores
        return results

    def _check(self, pairs: list[TokenPair]) -> None:
        check_token_ids(self.model.cfg.vocab_size, context=[c for c, _ in pairs],
                        continuation=[k for _, k in pairs])

    def _worth_sharing(self, context: list[int], continuations: list[list[int]]) -> bool:
        longest = max(len(k) for k in continuations)
        return longest < len(context) and longest <= self.max_len

    def _shared_context_batch(self, items: list[tuple[list[int], list[list[int]]]]) -> list[list[Score]]:
        longest_continuation = max(len(k) for _, ks in items for k in ks)
        contexts = [c[-(self.max_len + 1 - longest_continuation):] for c, _ in items]
        ids, pad = left_pad(contexts, pad_id=0, device=self.device)
        cache = self.model.new_cache(len(items), ids.shape[1] + longest_continuation - 1, pad)
        first = self._log_probs(self.model(ids, cache=cache, keep_last=1).logits[:, -1])  # (items, vocab)
        counts = [len(ks) for _, ks in items]
        continuations = [k for _, ks in items for k in ks]
        rest = None
        if longest_continuation > 1:  # feed every continuation but its last token
            tails = torch.zeros(len(continuations), longest_continuation - 1, dtype=torch.long)
            for row, k in enumerate(continuations):
                tails[row, :len(k) - 1] = torch.tensor(k[:-1], dtype=torch.long)
            rest, _ = self.model.features(tails.to(self.device), cache=cache.repeat_rows(counts))
        out: list[list[Score]] = []
        row = 0
        for item, (_, ks) in enumerate(items):
            scores = []
            for k in ks:
                rows = first[item:item + 1]
                if len(k) > 1:
                    assert rest is not None  # computed whenever a continuation is longer than one token
                    rows = torch.cat([rows, self._log_probs(self.model.head(rest[row, :len(k) - 1]))])
                scores.append(self._score(rows, k))
                row += 1
            out.append(scores)
        return out

    def generate_until(self, contexts: list[str], stop: tuple[str, ...],
                       max_new_tokens: int = 32, use_cache: bool = True) -> list[str]:
        """Greedy continuations, each cut at the first stop string."""
        encoded = self.encode(contexts)
        keep = max(self.max_len - max_new_tokens, 1)
        encoded = [(ids or [self.tokenizer.eot_id])[-keep:] for ids in encoded]

        def is_done(new: list[int]) -> bool:
            return new[-1] == self.tokenizer.eot_id or any(s in self.tokenizer.decode(new) for s in stop)

        texts = [""] * len(contexts)
        for batch in self._batches([len(e) for e in encoded]):
            outputs = generate(self.model, [encoded[i] for i in batch], max_new_tokens, Sampling(),
                               use_cache=use_cache, is_done=is_done)
            for i, tokens in zip(batch, outputs, strict=False):
                texts[i] = _cut(self.tokenizer.decode(t for t in tokens if t != self.tokenizer.eot_id), stop)
        return texts


class ScoringModel:
    """A model and its tokenizer scoring at whatever batch size a caller asks (a Scorer
    per size), in the model's autocast: what the harness adapter and an inference rank serve."""

    def __init__(self, model: GPT, tokenizer: Tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.scorers: dict[int, Scorer] = {}

    def scorer(self, batch_size: int) -> Scorer:
        if batch_size not in self.scorers:
            self.scorers[batch_size] = Scorer(self.model, self.tokenizer, batch_size)
        return self.scorers[batch_size]

    def loglikelihoods(self, pairs: list[TokenPair], batch_size: int) -> list[Score]:
        scorer = self.scorer(batch_size)
        with autocast(scorer.device):
            return scorer.loglikelihoods(pairs)

    def generate_until(self, contexts: list[str], stop: tuple[str, ...], max_new_tokens: int,
                       batch_size: int) -> list[str]:
        scorer = self.scorer(batch_size)
        with autocast(scorer.device):
            return scorer.generate_until(contexts, stop, max_new_tokens)


def _cut(text: str, stop: tuple[str, ...]) -> str:
    cut = min((text.find(s) for s in stop if s in text), default=len(text))
    return text[:cut]
