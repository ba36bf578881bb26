"""Evaluate a checkpoint in this process, or spread over a Ray cluster's workers (each
loads the checkpoint once and scores whole chunks, so the numbers equal one process's)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from raymoe.errors import RaymoeError, root_cause
from raymoe.eval.harness import (
    Chunk,
    ChunkScorer,
    EvalOptions,
    EvalResults,
    evaluate,
    score_chunk,
    score_here,
)
from raymoe.eval.loading import load_model
from raymoe.eval.scoring import Scorer
from raymoe.runs import checkpoint_manifest


def evaluate_checkpoint(checkpoint: str, options: EvalOptions, *, workers: int = 0,
                        cpus_per_worker: float = 1.0, tokenizer: str | None = None,
                        device: str = "cpu", show_progress: bool = True) -> EvalResults:
    """``workers`` > 0: score on that many Ray actors of the connected cluster, each
    loading the checkpoint itself (this process only reads its manifest)."""
    if workers > 0:
        manifest = checkpoint_manifest(checkpoint)
        score = score_on_ray(manifest["uri"], options, workers, cpus_per_worker, tokenizer, device)
        return evaluate(options, score, manifest["uri"], int(manifest["extra"].get("step", 0)),
                        show_progress)
    loaded = load_model(checkpoint, device, tokenizer)
    score = score_here(Scorer(loaded.model, loaded.tokenizer, options.batch_size), options)
    return evaluate(options, score, loaded.uri, loaded.step, show_progress)


class EvalWorker:
    """A Ray actor holding one copy of the model, loaded by its first task (an error in
    a task reaches the caller as itself; one in an actor's constructor only as text)."""

    def __init__(self, checkpoint: str, options: EvalOptions, tokenizer: str | None,
                 device: str, threads: int):
        torch.set_num_threads(threads)
        self.source = (checkpoint, device, tokenizer)
        self.options = options
        self.scorer: Scorer | None = None

    def score(self, chunk: Chunk) -> list[dict[str, float]]:
        if self.scorer is None:
            loaded = load_model(*self.source)
            self.scorer = Scorer(loaded.model, loaded.tokenizer, self.options.batch_size)
        return score_chunk(self.scorer, chunk, self.options)


def score_on_ray(checkpoint: str, options: EvalOptions, workers: int, cpus_per_worker: float,
                 tokenizer: str | None, device: str) -> ChunkScorer:
    import ray

    actor = ray.remote(EvalWorker).options(num_cpus=cpus_per_worker,
                                           num_gpus=1 if device.startswith("cuda") else 0)
    threads = max(int(cpus_per_worker), 1)
    return _pool_scorer(lambda: [actor.remote(checkpoint, options, tokenizer, device, threads)
                                 for _ in range(workers)])


def _pool_scorer(start_actors: Callable[[], list[Any]]) -> ChunkScorer:
    import ray
    from ray.util import ActorPool

    def score(chunks: list[Chunk]) -> Iterator[list[dict[str, float]]]:
        pool = ActorPool(start_actors())
        try:
            yield from pool.map(lambda a, chunk: a.score.remote(chunk), chunks)
        except ray.exceptions.RayError as err:  # the worker's own error, not Ray's wrapping
            raise root_cause(err) from None

    return score


class EvalCapacityError(RaymoeError, RuntimeError):
    """No node of the cluster can hold the model for evaluation."""


def inference_bytes(manifest: dict[str, Any], ep: int = 1) -> int:
    """Memory one process needs to evaluate a checkpoint holding 1/``ep`` of its experts
    (raymoe.plan.evaluation.inference_bytes of the checkpoint's model)."""
    from raymoe.config import config_from_dict
    from raymoe.model import GPT
    from raymoe.model.moe import is_expert_parameter
    from raymoe.plan.evaluation import inference_bytes as bytes_of

    with torch.device("meta"):
        model = GPT(config_from_dict(manifest["extra"]["config"]).model)
    counts = {True: 0, False: 0}
    for name, param in model.named_parameters():
        counts[is_expert_parameter(name)] += param.numel()
    return bytes_of(counts[False], counts[True], ep)


def _nodes_with_cpus() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]


def node_placements(checkpoint: str, need: int, max_nodes: int = 0) -> list[tuple[str, int]]:
    """(node id, CPUs) of the nodes that can hold the whole model, most CPUs first (each
    scores with all the node's CPUs)."""
    nodes = _nodes_with_cpus()
    fitting = sorted(((n["NodeID"], int(n["Resources"]["CPU"])) for n in nodes
                      if n["Resources"].get("memory", 0) >= need), key=lambda p: -p[1])
    if not fitting:
        largest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
        raise EvalCapacityError(
            f"{checkpoint}: evaluating needs about {need / 2**30:.1f} GiB in one process (the "
            f"model in fp32, twice while loading); the largest of the cluster's {len(nodes)} "
            f"node(s) with CPUs offers {largest / 2**30:.1f} GiB of Ray memory. Add a node "
            "with more memory, or spread a MoE model's experts over an expert-parallel group")
    return fitting[:max_nodes or None]


def expert_parallel_size(manifest: dict[str, Any], node_memory: list[int]) -> int:
    """The EP size a study evaluates a checkpoint with: 1 when one node holds the whole
    model, else the smallest that divides the expert count and whose ranks (the dense
    part and 1/EP of the experts each) fit on the nodes, one rank per node at least."""
    from raymoe.config import config_from_dict
    from raymoe.plan.evaluation import smallest_expert_parallel_size

    experts = config_from_dict(manifest["extra"]["config"]).model.moe.num_experts
    ep = smallest_expert_parallel_size(experts, lambda size: inference_bytes(manifest, size), node_memory)
    if ep is not None:
        return ep
    raise EvalCapacityError(
        f"{manifest['uri']}: no expert-parallel size fits this cluster: even at EP "
        f"{max(experts, 1)} a rank needs about {inference_bytes(manifest, max(experts, 1)) / 2**30:.1f} "
        f"GiB (the dense part in fp32, twice while loading), and the nodes offer "
        f"{sorted((m / 2**30 for m in node_memory), reverse=True)[:4]} GiB of Ray memory")


def cluster_node_memory() -> list[int]:
    """Ray memory of each live node with CPUs."""
    return [int(n["Resources"].get("memory", 0)) for n in _nodes_with_cpus()]


def evaluate_on_nodes(checkpoint: str, options: EvalOptions, max_nodes: int = 0,
                      tokenizer: str | None = None, show_progress: bool = False) -> EvalResults:
    """Score on one Ray actor per node (at most ``max_nodes``; 0: every node that can hold
    the model), each holding the whole model and all the node's CPUs and memory it needs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    manifest = checkpoint_manifest(checkpoint)
    need = inference_bytes(manifest)
    placements = node_placements(manifest["uri"], need, max_nodes)
    actor = ray.remote(EvalWorker)
    score = _pool_scorer(lambda: [
        actor.options(num_cpus=cpus, memory=need,
                      scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
        .remote(manifest["uri"], options, tokenizer, "cpu", cpus)
        for node, cpus in placements])
    return evaluate(options, score, manifest["uri"], int(manifest["extra"].get("step", 0)),
                    show_progress)
