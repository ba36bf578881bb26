"""Just-in-time checkpoints before a warned preemption, and before a planned grow.

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
the surviving ranks need none of Ray's relaxed collectives or grace past it. Ray Train
tears the group down at the deadline whether the node went or not; a group still there
well past it trains on, without a second checkpoint for the same warning. A group that
raymoe.train.scaling is about to restart larger is told the same way (rank 0 reads the
request; the sum tells everyone): it saves at once and holds, so the grow loses no work
either.

Ray Train keeps the warning on each worker (``get_train_context().preemption_context``, what
its public ``ray.train.get_preemption_info`` broadcasts from rank 0 in a collective of its
own); that internal record is read here, stable across the pinned ray==2.60.*."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

HOLD_PAST_DEADLINE_SECONDS = 60.0
"""How long past the deadline a holding group waits for its node to go."""
UNSTATED_DEADLINE_SECONDS = 120.0
"""A warning that names no deadline: Ray Train waits this long from seeing it."""


def preemption_warning() -> tuple[bool, float | None]:
    """Whether a node of this worker's group was warned, and the deadline (UNIX seconds)
    if the warning names one; (False, None) outside a Ray Train worker."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        info = get_train_context().preemption_context.preemption_info
    except (ImportError, AttributeError, RuntimeError, ValueError):
        return False, None
    if info is None:
        return False, None
    return True, None if info.deadline_ms is None else info.deadline_ms / 1000.0


@dataclass(frozen=True)
class Agreed:
    """What the ranks agreed at a step: whether a node is being preempted, the seconds left
    (as the ranks that saw the warning know it), the ranks' mean step time, and whether
    the group is about to be restarted larger (raymoe.train.scaling asks first)."""

    warned: bool
    seconds_left: float
    step_seconds: float
    grow: bool


class RestartGuard:
    """One rank's side: what it adds to the step's summed scalars, and the decision every
    rank takes alike from their sums: a checkpoint before a warned preemption, or before a
    planned grow, and the hold after it."""

    SCALARS = 4

    def __init__(self, save_seconds: float, grow_wait_seconds: float, log: Callable[[str], None],
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.save_seconds, self.grow_wait, self.log = save_seconds, grow_wait_seconds, log
        self.clock, self.sleep = clock, sleep
        self.saved_for: set[str] = set()
        self.first_warned: float | None = None

    def scalars(self, step_seconds: float, grow_requested: bool) -> list[float]:
        """This rank's [warned, seconds left, seconds of its last step, grow requested]."""
        warned, deadline = preemption_warning()
        if warned and deadline is None:
            self.first_warned = self.first_warned or self.clock()
            deadline = self.first_warned + UNSTATED_DEADLINE_SECONDS
        left = deadline - self.clock() if deadline is not None else 0.0
        return [float(warned), left, step_seconds, float(grow_requested)]

    @staticmethod
    def agree(summed: list[float], world: int) -> Agreed:
        warned, left, step, grow = summed
        return Agreed(warned > 0, left / warned if warned else 0.0, step / world, grow > 0)

    def checkpoint_now(self, agreed: Agreed) -> str | None:
        """Why to save a checkpoint at this step, once per event: "preemption" when the
        next steps would leave less than the save needs, "grow" as soon as a grow is asked."""
        if (agreed.warned and "preemption" not in self.saved_for
                and agreed.seconds_left <= self.save_seconds + 2 * agreed.step_seconds):
            self.saved_for.add("preemption")
            return "preemption"
        if agreed.grow and "grow" not in self.saved_for:
            self.saved_for.add("grow")
            return "grow"
        return None

    def hold(self, reason: str, agreed: Agreed, step: int) -> None:
        """After a checkpoint for ``reason``: step no further until the group is torn down;
        train on if that does not come in time (a node that outlives its deadline by
        HOLD_PAST_DEADLINE_SECONDS, a grow not made within ``grow_wait_seconds``)."""
        if reason == "preemption":
            wait = max(0.0, agreed.seconds_left) + HOLD_PAST_DEADLINE_SECONDS
            self.log(f"step {step}: saved before the preemption ({agreed.seconds_left:.0f} s left); holding "
                     "until the node is gone and the group restarts from this checkpoint")
        else:
            wait = self.grow_wait
            self.log(f"step {step}: saved before the group grows; holding until it restarts larger")
        self.sleep(wait)
        self.log(f"step {step}: no restart came within {wait:.0f} s of the {reason}'s checkpoint; training on")
        if reason == "grow":  # a new request has a new id (raymoe.train.elastic); a warning stays
            self.saved_for.discard(reason)
