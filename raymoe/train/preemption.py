"""Just-in-time checkpoints before a warned preemption.

A spot node is warned before it goes (two minutes on AWS: the autoscaler drains it with a
deadline), and Ray Train passes the warning to every worker of the group. Without a
checkpoint taken then, the run loses everything since the last one (up to
``train.checkpoint_every_minutes``). Here each rank adds what it knows of a warning to the
scalars the step already sums over the ranks (raymoe.train.step: one all-reduce the step
makes anyway), so every rank learns of it at the same step with no collective of its own;
they train on while there is time, save a checkpoint as late as is safe (the deadline less
``train.preemption_save_seconds`` and two steps), uploaded before the ranks go on, and then
hold, stepping no further, until the node is gone and Ray Train restarts the group from that
checkpoint: the resume redoes no step. The checkpoint is complete before the deadline, so
the surviving ranks need none of Ray's relaxed collectives or grace past it. A warning
whose node does not go (a drain cancelled) lets the ranks train on once the deadline is
well past.

Ray Train keeps the warning on each worker (``get_train_context().preemption_context``, what
its public ``ray.train.get_preemption_info`` broadcasts from rank 0 in a collective of its
own); that internal record is read here, stable across the pinned ray==2.60.*."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

HOLD_PAST_DEADLINE_SECONDS = 60.0
"""How long past the deadline a holding group waits for its node to go."""


def seconds_to_preemption(clock: Callable[[], float] = time.time) -> float | None:
    """Seconds until a warned node of this worker's group goes (negative once past), or None
    when no node was warned, or outside a Ray Train worker."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return None
    if info is None or info.deadline_ms is None:
        return None
    return info.deadline_ms / 1000.0 - clock()


@dataclass(frozen=True)
class Agreed:
    """What the ranks agreed at a step: whether a node is being preempted, the seconds left
    (as the ranks that saw the warning know it) and the ranks' mean step time."""

    warned: bool
    seconds_left: float
    step_seconds: float


class PreemptionGuard:
    """One rank's side: what it adds to the step's summed scalars, and the decision every
    rank takes alike from their sums."""

    SCALARS = 3

    def __init__(self, save_seconds: float, log: Callable[[str], None],
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.save_seconds, self.log, self.clock, self.sleep = save_seconds, log, clock, sleep
        self.saved_for_warning = False

    def scalars(self, step_seconds: float) -> list[float]:
        """This rank's [warned, seconds left, seconds of its last step]."""
        left = seconds_to_preemption(self.clock)
        return [0.0 if left is None else 1.0, left or 0.0, step_seconds]

    @staticmethod
    def agree(summed: list[float], world: int) -> Agreed:
        warned, left, step = summed
        return Agreed(warned > 0, left / warned if warned else 0.0, step / world)

    def checkpoint_now(self, agreed: Agreed) -> bool:
        """Whether to save the just-in-time checkpoint at this step (once per warning):
        when the next steps would leave less than the save needs."""
        if not agreed.warned or self.saved_for_warning:
            return False
        if agreed.seconds_left > self.save_seconds + 2 * agreed.step_seconds:
            return False
        self.saved_for_warning = True
        return True

    def hold(self, agreed: Agreed, step: int) -> None:
        """After the just-in-time checkpoint: step no further until the group is torn down;
        train on if the node outlives its deadline by HOLD_PAST_DEADLINE_SECONDS."""
        wait = max(0.0, agreed.seconds_left) + HOLD_PAST_DEADLINE_SECONDS
        self.log(f"step {step}: saved before the preemption ({agreed.seconds_left:.0f} s left); holding "
                 "until the node is gone and the group restarts from this checkpoint")
        self.sleep(wait)
        self.log(f"step {step}: the warned node did not go within {wait:.0f} s of the warning's "
                 "checkpoint; training on")
        self.saved_for_warning = False
