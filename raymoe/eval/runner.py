"""Evaluate a checkpoint in this process, or spread over a Ray cluster's workers (each
loads the checkpoint once and scores whole chunks, so the numbers equal one process's)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from raymoe.errors import root_cause
from raymoe.eval.harness import (
    Chunk,
    ChunkScorer,
    EvalOptions,
    EvalResults,
    evaluate,
    score_chunk,
    score_here,
)
from raymoe.eval.loading import checkpoint_manifest, load_model
from raymoe.eval.scoring import Scorer


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
    from ray.util import ActorPool

    actor = ray.remote(EvalWorker).options(num_cpus=cpus_per_worker,
                                           num_gpus=1 if device.startswith("cuda") else 0)
    threads = max(int(cpus_per_worker), 1)

    def score(chunks: list[Chunk]) -> Iterator[list[dict[str, float]]]:
        pool = ActorPool([actor.remote(checkpoint, options, tokenizer, device, threads)
                          for _ in range(workers)])
        try:
            yield from pool.map(lambda a, chunk: a.score.remote(chunk), chunks)
        except ray.exceptions.RayError as err:  # the worker's own error, not Ray's wrapping
            raise root_cause(err) from None

    return score
