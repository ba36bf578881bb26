"""Inference groups on a Ray cluster: ``replicas`` groups of ``ep`` actors, each group a
torch.distributed process group (gloo on CPU, NCCL on GPU) holding the whole model, its
experts spread over the group's ranks. Groups share nothing: each has its own default
process group in its own processes, and the examples are split between the groups.
Within a group, a call's rows are split over the ranks in contiguous blocks (each rank
computes its own rows, raymoe.infer.worker) and the answers gathered here in order."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from raymoe.config import config_from_dict
from raymoe.errors import RaymoeError, root_cause
from raymoe.eval.harness import Chunk, ChunkScorer, EvalOptions
from raymoe.eval.scoring import Score, TokenPair
from raymoe.infer.worker import InferenceWorker
from raymoe.model.generation import Sampling
from raymoe.model.resident import ResidentBytes


class InferenceSetupError(RaymoeError, ValueError):
    """The EP size or replica count does not fit the checkpoint or the request."""


def check_group_shape(manifest: dict[str, Any], ep: int, replicas: int = 1) -> None:
    """Fail before any actor starts when ``ep`` cannot split the checkpoint's experts."""
    if replicas < 1:
        raise InferenceSetupError(f"--replicas {replicas}: expected at least 1")
    if ep < 1:
        raise InferenceSetupError(f"--ep {ep}: expected at least 1")
    experts = config_from_dict(manifest["extra"]["config"]).model.moe.num_experts
    if ep > 1 and not experts:
        raise InferenceSetupError(f"--ep {ep}: {manifest['uri']} is a dense model, it has no "
                                  "experts to spread (use --ep 1; --replicas for throughput)")
    if experts % ep:
        raise InferenceSetupError(f"--ep {ep}: must divide the checkpoint's {experts} experts "
                                  f"per MoE layer ({manifest['uri']})")


@dataclass
class GroupOptions:
    ep: int = 1
    replicas: int = 1
    cpus_per_rank: float = 1.0
    device: str = "cpu"
    tokenizer: str | None = None
    memory_per_rank: int = 0
    """Ray memory each rank reserves (bytes; 0: none), so that ranks too large to share a
    node are placed on different nodes."""


class InferenceGroup:
    """One group's actors, placed together (a PACK placement group: one node when it fits,
    which keeps the all-to-alls off the network)."""

    def __init__(self, ep: int, options: GroupOptions):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = options.device.startswith("cuda")
        memory = {"memory": options.memory_per_rank} if options.memory_per_rank else {}
        bundle = {"CPU": options.cpus_per_rank, **({"GPU": 1} if gpu else {}), **memory}
        self.placement = placement_group([bundle] * ep, strategy="PACK")
        threads = max(int(options.cpus_per_rank), 1)
        actor = ray.remote(InferenceWorker)
        self.ranks: list[Any] = [actor.options(
            num_cpus=options.cpus_per_rank, num_gpus=1 if gpu else 0, memory=options.memory_per_rank or None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement, i),
        ).remote(i, ep, threads) for i in range(ep)]
        self.resident: list[ResidentBytes] = []

    def join(self, checkpoint: str, options: GroupOptions) -> list[Any]:
        """Start forming the group and loading (ObjectRefs of each rank's ResidentBytes)."""
        import ray

        master = ray.get(self.ranks[0].address.remote())
        return [r.join.remote(master, checkpoint, options.tokenizer, options.device)
                for r in self.ranks]

    def call(self, method: str, *args: Any) -> list[Any]:
        """The same call on every rank (each then computes every row); ObjectRefs of the results."""
        return [getattr(r, method).remote(*args) for r in self.ranks]

    def split(self, method: str, rows: Sequence[Any], *args: Any) -> list[Any]:
        """``method`` on every rank, with the rank's block of ``rows`` first and the same
        ``args``; ObjectRefs of each rank's answers (``joined`` puts them back in order).
        Calls to a group must not overlap (from several threads): its ranks must take
        them in the same order."""
        return [getattr(rank, method).remote(rows[block.start:block.stop], *args)
                for rank, block in zip(self.ranks, row_blocks(len(rows), len(self.ranks)), strict=True)]

    def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for r in self.ranks:
            ray.kill(r)
        remove_placement_group(self.placement)


class InferenceGroups:
    """``replicas`` groups of ``ep`` ranks serving checkpoint ``uri`` (a context manager:
    leaving it frees the actors)."""

    def __init__(self, uri: str, options: GroupOptions):
        import ray

        from raymoe.train.capacity import WorkerGroupDemand, worker_group_capacity

        self.options = options
        self.capacity = contextlib.ExitStack()  # fails or waits (autoscaler) before placing
        demand = WorkerGroupDemand(options.ep * options.replicas, options.cpus_per_rank,
                                   1.0 if options.device.startswith("cuda") else 0.0)
        self.capacity.enter_context(worker_group_capacity(
            demand, log=lambda line: print(f"inference groups: {line}", file=sys.stderr)))
        self.groups = [InferenceGroup(options.ep, options) for _ in range(options.replicas)]
        try:
            joins = [g.join(uri, options) for g in self.groups]  # groups load concurrently
            for group, refs in zip(self.groups, joins, strict=True):
                group.resident = ray.get(refs)
        except ray.exceptions.RayError as err:
            self.close()
            raise root_cause(err) from None

    def __enter__(self) -> InferenceGroups:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for g in self.groups:
            g.close()
        self.groups = []
        self.capacity.close()

    @property
    def resident(self) -> list[list[ResidentBytes]]:
        """Per group, per rank: the parameter bytes it holds."""
        return [g.resident for g in self.groups]

    def score(self, options: EvalOptions) -> ChunkScorer:
        """Chunks go to whichever group is free, each split over its ranks; results come
        back in chunk order."""
        import ray
        from ray.util import ActorPool

        def score(chunks: list[Chunk]) -> Iterator[list[dict[str, float]]]:
            pool = ActorPool(self.groups)  # a group stands in for an actor: it returns refs
            try:
                for per_rank in pool.map(lambda g, chunk: g.split("score", chunk.examples, chunk.task,
                                                                  options), chunks):
                    yield joined(per_rank)
            except ray.exceptions.RayError as err:
                raise root_cause(err) from None

        return score

    def generate(self, prompts: list[str], max_new_tokens: int, sampling: Sampling, seed: int = 0,
                 stop_at_eot: bool = True) -> list[str]:
        """Each prompt's continuation, on the first group."""
        return self.decode(self.generate_tokens(self.encode(prompts), max_new_tokens, sampling,
                                                seed, stop_at_eot))

    def generate_tokens(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling,
                        seed: int = 0, stop_at_eot: bool = True) -> list[list[int]]:
        """Each prompt's new tokens, on the first group. Greedy tokens are those of one
        process; sampled ones are drawn from one generator per rank (``seed`` on the first)."""
        longest = max(map(len, prompts), default=0)
        return self._first("generate", prompts, max_new_tokens, sampling, seed, stop_at_eot, longest)

    def loglikelihoods(self, pairs: list[TokenPair], batch_size: int) -> list[Score]:
        """Each (context, continuation) pair's score, on the first group (``batch_size``
        rows per forward on each rank)."""
        return self._first("loglikelihoods", pairs, batch_size)

    def generate_until(self, contexts: list[str], stop: tuple[str, ...], max_new_tokens: int,
                       batch_size: int) -> list[str]:
        """Greedy continuations cut at the first stop string, on the first group
        (``batch_size`` rows per forward on each rank)."""
        return self._first("generate_until", contexts, stop, max_new_tokens, batch_size)

    def encode(self, texts: list[str]) -> list[list[int]]:
        import ray

        return ray.get(self.groups[0].ranks[0].encode.remote(texts))

    def decode(self, outputs: list[list[int]]) -> list[str]:
        import ray

        return ray.get(self.groups[0].ranks[0].decode.remote(outputs))

    def _first(self, method: str, rows: Sequence[Any], *args: Any) -> list[Any]:
        """``rows`` split over the first group's ranks; their answers in order."""
        import ray

        try:
            return joined(ray.get(self.groups[0].split(method, rows, *args)))
        except ray.exceptions.RayError as err:
            raise root_cause(err) from None


def row_blocks(rows: int, ranks: int) -> list[range]:
    """Contiguous blocks of ``rows`` rows, one per rank, their sizes differing by one at
    most (fewer rows than ranks leave some ranks none)."""
    return [range(r * rows // ranks, (r + 1) * rows // ranks) for r in range(ranks)]


def joined(per_rank: list[list[Any]]) -> list[Any]:
    """The ranks' answers, in row order."""
    return [answer for answers in per_rank for answer in answers]


def format_resident(resident: list[list[ResidentBytes]]) -> str:
    """One line per group: each rank's parameter bytes (dense + experts) and the checkpoint
    bytes it read (its experts only)."""
    lines = []
    for g, ranks in enumerate(resident):
        per_rank = ", ".join(f"rank {r}: {_mib(b.total)} ({_mib(b.dense)} dense + "
                             f"{_mib(b.experts)} experts; read {_mib(b.read)} of the checkpoint)"
                             for r, b in enumerate(ranks))
        lines.append(f"group {g} parameter bytes: {per_rank}")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
