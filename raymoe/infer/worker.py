"""One rank of an inference group: a Ray actor holding the dense part of the model and
its share of every MoE layer's experts.

A call's rows (prompts, scored pairs, examples) are split over the group's ranks in
contiguous blocks (raymoe.infer.group), as training splits its batch: each rank runs the
model of one process on its own rows only, with its own KV cache, and its tokens reach
the experts of the other ranks through the MoE layers' all-to-alls, training's exchange
in eval mode. Inference drops no token, so the exchange is a variable one (counts first,
or blocks sized by the group's previous forward: raymoe.model.dispatch), which lets ranks
route different numbers of tokens, none included. A CPU group on one host exchanges
through shared memory (raymoe.parallel.shared_memory), a tenth of gloo's latency. What
the ranks must share is the sequence of collectives: ``Lockstep`` makes every rank run
the same number of forwards, agreeing through the exchange itself. Each rank reads only
its own experts' weights, which is what lets the group hold a model no single device can.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from raymoe.eval.harness import Chunk, EvalOptions, score_chunk
from raymoe.eval.loading import LoadedModel, load_model
from raymoe.eval.scoring import Score, ScoringModel, TokenPair
from raymoe.eval.tasks import Example
from raymoe.model.dispatch import GroupAgreement
from raymoe.model.generation import Sampling, generate
from raymoe.model.gpt import GPT
from raymoe.model.precision import autocast
from raymoe.model.resident import ResidentBytes, resident_bytes
from raymoe.parallel.exchange import ProcessGroupExchange
from raymoe.parallel.mesh import Mesh
from raymoe.parallel.shared_memory import SharedMemoryAllToAll

TIMEOUT = datetime.timedelta(minutes=10)
"""A rank that died leaves the others waiting in a collective for this long at most."""

T = TypeVar("T")


class Lockstep:
    """Keeps one rank's forwards in step with the rest of its group.

    Ranks hold different rows, so one may run more forwards than another (more batches,
    later-finishing rows). Every forward already meets the other ranks' in each MoE
    layer's exchanges, whose headers carry a flag from each rank (the group's
    GroupAgreement): 1 while it works. Once its own work is done, a rank runs rounds of
    each MoE layer on no tokens (the exchanges of a forward, its only collectives, without
    its dense part), serving its experts to the others' tokens, until a round in which no
    rank flagged work: the one after every rank's last forward. Every rank thus runs the
    same number of forwards, with no collective beyond the exchanges (one empty round per
    call). With one rank, or no MoE layer, there is nothing to keep in step.
    """

    def __init__(self, model: GPT, ranks: int):
        self.model = model
        layers = model.moe_layers
        self.agreement = layers[0].exchange.agreement if ranks > 1 and layers else None

    def run(self, work: Callable[[], T]) -> T:
        """``work()`` on this rank's rows, returning once every rank's work is done; also
        when ``work`` fails before a forward (a bad prompt), so that the others finish."""
        if self.agreement is None:
            return work()
        self.agreement.flag = 1
        try:
            return work()
        finally:
            self.agreement.flag = 0
            self._wait_for_the_others(self.agreement)

    @torch.no_grad()
    def _wait_for_the_others(self, agreement: GroupAgreement) -> None:
        device = self.model.wte.weight.device
        no_tokens = torch.zeros(0, self.model.cfg.d_model, device=device)
        with autocast(device):  # the others' tokens arrive in the dtype of their autocast
            while True:
                for layer in self.model.moe_layers:
                    layer(no_tokens)
                if not any(agreement.flags):
                    return


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s sampling generator: ``seed`` itself on rank 0 (a group
    of one samples as one process), others on the other ranks, whose rows would otherwise
    draw rank 0's numbers (a large odd step: seed + 1 on rank 0 is not seed on rank 1)."""
    return (seed + rank * 0x9E3779B97F4A7C15) % 2**64


class InferenceWorker:
    """Rank ``rank`` of a group of ``world_size``. The constructor does nothing that can
    fail (an actor constructor's error reaches the caller only as text): ``join`` forms
    the group and loads the model. Every call takes this rank's block of the rows; every
    rank of the group must get the call."""

    def __init__(self, rank: int, world_size: int, threads: int):
        torch.set_num_threads(threads)
        self.rank, self.world_size = rank, world_size
        self.loaded: LoadedModel | None = None
        self.scoring: ScoringModel | None = None
        self.lockstep: Lockstep | None = None

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
        exchange = self.loaded.model.moe_layers[0].exchange if self.loaded.model.moe_layers else None
        if isinstance(exchange, ProcessGroupExchange) and backend == "gloo":
            exchange.shared = SharedMemoryAllToAll.connect(exchange.group, timeout=TIMEOUT.total_seconds())
        self.lockstep = Lockstep(self.loaded.model, self.world_size)
        self.scoring = ScoringModel(self.loaded.model, self.loaded.tokenizer)
        return dataclasses.replace(resident_bytes(self.loaded.model), read=self.loaded.bytes_read)

    def _in_step(self, work: Callable[[], T]) -> T:
        assert self.lockstep is not None, "join first"
        return self.lockstep.run(work)

    def _scoring(self) -> ScoringModel:
        assert self.scoring is not None, "join first"
        return self.scoring

    def score(self, examples: list[Example], task: str, options: EvalOptions) -> list[dict[str, float]]:
        """The records of this rank's examples of a chunk of ``task``."""
        scorer = self._scoring().scorer(options.batch_size)
        return self._in_step(lambda: score_chunk(scorer, Chunk(task, examples), options))

    def loglikelihoods(self, pairs: list[TokenPair], batch_size: int) -> list[Score]:
        return self._in_step(lambda: self._scoring().loglikelihoods(pairs, batch_size))

    def generate_until(self, contexts: list[str], stop: tuple[str, ...], max_new_tokens: int,
                       batch_size: int) -> list[str]:
        return self._in_step(lambda: self._scoring().generate_until(contexts, stop, max_new_tokens,
                                                                    batch_size))

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                 seed: int, stop_at_eot: bool, longest: int) -> list[list[int]]:
        """The new tokens of this rank's prompts. ``longest``: the group's longest prompt,
        which bounds every row's new tokens to the model's context, as in one process."""
        assert self.loaded is not None, "join first"
        model, eot = self.loaded.model, self.loaded.tokenizer.eot_id
        device = model.wte.weight.device
        generator = torch.Generator(device=device).manual_seed(rank_seed(seed, self.rank))
        max_new_tokens = min(max_new_tokens, model.cfg.seq_len - longest)

        def work() -> list[list[int]]:
            if not prompts:
                return []
            with autocast(device):
                return generate(model, prompts, max_new_tokens, sampling, generator=generator,
                                is_done=(lambda new: new[-1] == eot) if stop_at_eot else None)

        return self._in_step(work)

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
