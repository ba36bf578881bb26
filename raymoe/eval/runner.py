"""Evaluate a checkpoint in this process, or spread over a Ray cluster's workers (each
loads the checkpoint once and scores whole chunks, so the numbers equal one process's)."""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from raymoe.data.storage import is_s3
from raymoe.eval.harness import Chunk, ChunkScorer, EvalOptions, EvalResults, evaluate, score_chunk, score_here
from raymoe.eval.loading import load_model
from raymoe.eval.scoring import Scorer


def evaluate_checkpoint(checkpoint: str, options: EvalOptions, *, workers: int = 0,
                        cpus_per_worker: float = 1.0, tokenizer: Optional[str] = None,
                        device: str = "cpu", show_progress: bool = True) -> EvalResults:
    """``workers`` > 0: score on that many Ray actors of the connected cluster."""
    loaded = load_model(checkpoint, device, tokenizer)  # here too: fail early, record the step
    if workers > 0:  # workers fetch an s3:// checkpoint themselves; a local one must be shared
        source = checkpoint if is_s3(checkpoint) else str(loaded.directory)
        score = score_on_ray(source, options, workers, cpus_per_worker,
                             tokenizer, device)
    else:
        score = score_here(Scorer(loaded.model, loaded.tokenizer, options.batch_size), options)
    return evaluate(options, score, str(loaded.directory), loaded.step, show_progress)


class EvalWorker:
    """A Ray actor holding one copy of the model."""

    def __init__(self, checkpoint: str, options: EvalOptions, tokenizer: Optional[str],
                 device: str, threads: int):
        torch.set_num_threads(threads)
        loaded = load_model(checkpoint, device, tokenizer)
        self.scorer = Scorer(loaded.model, loaded.tokenizer, options.batch_size)
        self.options = options

    def score(self, chunk: Chunk) -> list[dict[str, float]]:
        return score_chunk(self.scorer, chunk, self.options)


def score_on_ray(checkpoint: str, options: EvalOptions, workers: int, cpus_per_worker: float,
                 tokenizer: Optional[str], device: str) -> ChunkScorer:
    import ray
    from ray.util import ActorPool

    actor = ray.remote(EvalWorker).options(num_cpus=cpus_per_worker,
                                           num_gpus=1 if device.startswith("cuda") else 0)
    threads = max(int(cpus_per_worker), 1)

    def score(chunks: list[Chunk]) -> Iterator[list[dict[str, float]]]:
        pool = ActorPool([actor.remote(checkpoint, options, tokenizer, device, threads)
                          for _ in range(workers)])
        yield from pool.map(lambda a, chunk: a.score.remote(chunk), chunks)

    return score
