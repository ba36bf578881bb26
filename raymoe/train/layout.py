"""The layout of one worker group: how many of the workers Ray gave train, at which EP size
and with how many micro-batches each, so that every size trains the same run.

A step is ``train.global_batch / train.micro_batch`` micro-batches of consecutive
sequences of the global batch (raymoe.data.stream gives each rank a contiguous block of
them). Any worker count that divides that number keeps the step exactly: the same
micro-batches, the same mean loss and gradient, the same tokens per step (so the same
learning-rate schedule) and the same data cursor. A count that does not divide it is
skipped for the next smaller one: an elastic run's group is started at that size
(raymoe.train.scaling), so no worker idles.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raymoe.config import Config


@dataclass(frozen=True)
class Layout:
    available: int
    """Workers the cluster holds for the group."""
    workers: int
    """Workers that train: the most, up to ``available``, that keep the global batch."""
    ep_size: int
    accumulation: int
    """Micro-batches per worker and step."""
    micro_batch: int
    skipped: tuple[str, ...] = ()
    """Why each larger size (available and down) could not train."""

    def describe(self) -> str:
        each = "micro-batch" if self.accumulation == 1 else "micro-batches"
        return (f"{self.workers} workers, EP {self.ep_size}, {self.accumulation} {each} of "
                f"{self.micro_batch} each")


def expert_parallel_size(workers: int, num_experts: int, largest: int) -> int:
    """The largest EP size that divides the worker count and the expert count and does not
    exceed ``largest`` (parallel.ep_size); 1 for a dense model."""
    if num_experts == 0:
        return 1
    return max(d for d in range(1, min(largest, workers) + 1)
               if workers % d == 0 and num_experts % d == 0)


def plan_layout(cfg: Config, available: int) -> Layout:
    """The layout for a group of ``available`` workers (a fixed-size config gives itself)."""
    t = cfg.train
    micro_batches = t.global_batch // t.micro_batch
    skipped = []
    workers = available
    while micro_batches % workers:
        skipped.append(f"{workers} workers cannot keep the global batch: its {micro_batches} "
                       f"micro-batches (train.global_batch {t.global_batch} / train.micro_batch "
                       f"{t.micro_batch}) do not split evenly over {workers}")
        workers -= 1
    ep = expert_parallel_size(workers, cfg.model.moe.num_experts, cfg.parallel.ep_size)
    return Layout(available, workers, ep, micro_batches // workers, t.micro_batch, tuple(skipped))


def layout_config(cfg: Config, layout: Layout) -> Config:
    """``cfg`` as a fixed-size run of this layout (what the loop runs and the checkpoint
    records)."""
    parallel = dataclasses.replace(cfg.parallel, num_workers=layout.workers, ep_size=layout.ep_size)
    return dataclasses.replace(cfg, parallel=parallel).validate()


def full_size(cfg: Config) -> Config:
    """An elastic config at its largest worker group (what the planner sizes); a fixed one
    as it is."""
    if not cfg.parallel.elastic:
        return cfg
    return layout_config(cfg, plan_layout(cfg, cfg.parallel.max_workers))
