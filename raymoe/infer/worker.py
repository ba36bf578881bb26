"""One rank of an inference group: a Ray actor holding the dense part of the model and
its share of every MoE layer's experts.

Every rank of a group runs the same calls on the same inputs (the batch is replicated
across the group): the ranks then execute identical code, so the MoE layers' collectives
always meet, and every rank holds every answer. Each rank reads only its own experts'
weights, which is what lets the group hold a model no single device can, and what makes
a batch's expert reads N-way parallel. Splitting the batch's rows across the group as
well (so that the dense part is not computed N times) is left for later.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from raymoe.eval.harness import Chunk, EvalOptions, score_chunk
from raymoe.eval.loading import LoadedModel, load_model
from raymoe.eval.scoring import Score, ScoringModel, TokenPair
from raymoe.model.generation import Sampling, generate
from raymoe.model.gpt import GPT, GPTOutput
from raymoe.model.precision import autocast
from raymoe.model.resident import ResidentBytes, resident_bytes
from raymoe.parallel.mesh import Mesh

TIMEOUT = datetime.timedelta(minutes=10)
"""A rank that died leaves the others waiting in a collective for this long at most."""


class AgreedLogits:
    """The model, with every forward's logits taken from rank 0 of the group.

    Generation feeds each rank's picked tokens back in and stops rows by them: if float
    rounding ever made two ranks pick differently, their next forwards would differ and
    the MoE collectives would hang. Broadcasting the (batch x vocab) logits rules that
    out at a small cost. Everything else is the model's own.
    """

    def __init__(self, model: GPT):
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> GPTOutput:
        out = self.model(*args, **kwargs)
        logits = out.logits.contiguous()
        dist.broadcast(logits, src=0)
        out.logits = logits
        return out


class InferenceWorker:
    """Rank ``rank`` of a group of ``world_size``. The constructor does nothing that can
    fail (an actor constructor's error reaches the caller only as text): ``join`` forms
    the group and loads the model."""

    def __init__(self, rank: int, world_size: int, threads: int):
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.loaded: LoadedModel | None = None
        self.scoring: ScoringModel | None = None

    def address(self) -> tuple[str, int]:
        """Where rank 0 listens for the group's rendezvous."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, master: tuple[str, int], checkpoint: str, tokenizer: str | None,
             device: str) -> ResidentBytes:
        """Form the group and load this rank's part of the checkpoint."""
        os.environ.update(MASTER_ADDR=master[0], MASTER_PORT=str(master[1]))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size,
                                timeout=TIMEOUT)
        self.loaded = load_model(checkpoint, device, tokenizer, Mesh(self.world_size))
        return dataclasses.replace(resident_bytes(self.loaded.model), read=self.loaded.bytes_read)

    def _model(self) -> GPT:
        assert self.loaded is not None, "join first"
        return self.loaded.model

    def _scoring(self) -> ScoringModel:
        assert self.loaded is not None, "join first"
        if self.scoring is None:
            agreed: Any = AgreedLogits(self.loaded.model)  # a GPT to the scorer
            self.scoring = ScoringModel(agreed, self.loaded.tokenizer)
        return self.scoring

    def score(self, chunk: Chunk, options: EvalOptions) -> list[dict[str, float]]:
        return score_chunk(self._scoring().scorer(options.batch_size), chunk, options)

    def loglikelihoods(self, pairs: list[TokenPair], batch_size: int) -> list[Score]:
        return self._scoring().loglikelihoods(pairs, batch_size)

    def generate_until(self, contexts: list[str], stop: tuple[str, ...], max_new_tokens: int,
                       batch_size: int) -> list[str]:
        return self._scoring().generate_until(contexts, stop, max_new_tokens, batch_size)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                 seed: int, stop_at_eot: bool) -> list[list[int]]:
        """The new tokens of each prompt; every rank draws from a generator seeded alike."""
        assert self.loaded is not None, "join first"
        model = self._model()
        eot = self.loaded.tokenizer.eot_id
        generator = torch.Generator(device=model.wte.weight.device).manual_seed(seed)
        agreed: Any = AgreedLogits(model)
        with autocast(model.wte.weight.device):
            return generate(agreed, prompts, max_new_tokens, sampling, generator=generator,
                            is_done=(lambda new: new[-1] == eot) if stop_at_eot else None)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Each text's tokens (the end-of-text token for an empty one)."""
        assert self.loaded is not None, "join first"
        tokenizer = self.loaded.tokenizer
        return [ids or [tokenizer.eot_id] for ids in tokenizer.encode_batch(texts)]

    def decode(self, outputs: list[list[int]]) -> list[str]:
        assert self.loaded is not None, "join first"
        tokenizer = self.loaded.tokenizer
        return [tokenizer.decode(t for t in tokens if t != tokenizer.eot_id) for tokens in outputs]

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
