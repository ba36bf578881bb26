"""When to checkpoint: every ``train.checkpoint_every`` steps, and when
``train.checkpoint_every_minutes`` passed since the last checkpoint (on spot nodes the work
lost to a preemption is the work since the last checkpoint, which a step count bounds
badly when step times change).

Clocks of different ranks disagree near the threshold, and a checkpoint is a collective:
the ranks agree by one all-reduce of their elapsed times (the largest wins) on a gloo
group, a few bytes on the host per step, so a GPU step gains no device sync.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from raymoe.config import TrainConfig


class CheckpointCadence:
    def __init__(self, cfg: TrainConfig, distributed: bool):
        self.every = cfg.checkpoint_every
        self.seconds = cfg.checkpoint_every_minutes * 60
        # Creating a group is collective: every rank builds its cadence at the same point.
        self.group = dist.new_group(backend="gloo") if self.seconds and distributed else None
        self.distributed = distributed
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether to checkpoint after ``step``: the same answer on every rank."""
        if step % self.every == 0:
            return True
        if not self.seconds:
            return False
        elapsed = torch.tensor([time.monotonic() - self.last], dtype=torch.float64)
        if self.distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.group)
        return float(elapsed) >= self.seconds

    def saved(self) -> None:
        self.last = time.monotonic()
