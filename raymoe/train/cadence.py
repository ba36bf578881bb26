"""When to checkpoint: every ``train.checkpoint_every`` steps, and once
``train.checkpoint_every_minutes`` passed since the last checkpoint (on spot nodes the work
lost to a preemption is the work since the last checkpoint, which a step count bounds
badly when step times change).

A checkpoint is a collective, so every rank must decide alike, and the ranks' clocks
disagree near the threshold. They agree through the all-reduce that every step already
makes (raymoe.train.step sums its statistics over the ranks, and values handed to it as
``summed``): each rank adds its seconds since the last checkpoint, and all decide on the
same mean, with no collective of the cadence's own. (Agreeing at each checkpoint on the
next one from the mean step time would need nothing per step either, but would miss the
bound whenever step times change: a slower data source, a throttled GPU, a new layout.)

The clock is the wall clock, and each checkpoint stores when it was saved: a restarted or
resized group goes on from that time, not from its own start (a group that restarts
every 20 minutes would otherwise never checkpoint at 30).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from raymoe.config import TrainConfig


class CheckpointCadence:
    def __init__(self, cfg: TrainConfig, saved_at: float | None = None,
                 clock: Callable[[], float] = time.time):
        """``saved_at``: when the checkpoint resumed from was saved (None: now)."""
        self.every = cfg.checkpoint_every
        self.seconds = cfg.checkpoint_every_minutes * 60
        self.clock = clock
        self.saved_at = clock() if saved_at is None else saved_at

    def elapsed(self) -> float:
        """Seconds since the last checkpoint by this rank's clock."""
        return self.clock() - self.saved_at

    def due(self, step: int, mean_elapsed: float) -> bool:
        """Whether to checkpoint after ``step``, given the ranks' mean ``elapsed()`` at its
        start: the same answer on every rank."""
        return step % self.every == 0 or 0 < self.seconds <= mean_elapsed

    def restart(self) -> float:
        """A checkpoint is saved now: the time to store in it."""
        self.saved_at = self.clock()
        return self.saved_at
