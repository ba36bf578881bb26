"""The just-in-time checkpoint's decisions from what the ranks summed (raymoe.train.preemption);
the run on a warned and lost node is in test_multinode."""

from __future__ import annotations

from raymoe.train.preemption import HOLD_PAST_DEADLINE_SECONDS, PreemptionGuard, seconds_to_preemption


def test_no_warning_outside_ray_train_and_none_without_one():
    assert seconds_to_preemption() is None
    guard = PreemptionGuard(save_seconds=30, log=lambda _: None)
    assert guard.scalars(2.0) == [0.0, 0.0, 2.0]
    agreed = guard.agree([0.0, 0.0, 8.0], world=4)
    assert not agreed.warned and agreed.step_seconds == 2.0
    assert not guard.checkpoint_now(agreed)


def test_the_checkpoint_comes_once_when_the_next_steps_would_leave_too_little():
    guard = PreemptionGuard(save_seconds=30, log=lambda _: None)
    # 3 of 4 ranks saw the warning (each 100 s left); steps of 2 s: save at <= 34 s left
    assert not guard.checkpoint_now(guard.agree([3.0, 300.0, 8.0], world=4))
    assert not guard.checkpoint_now(guard.agree([4.0, 4 * 34.5, 8.0], world=4))
    assert guard.checkpoint_now(guard.agree([4.0, 4 * 33.0, 8.0], world=4))
    assert not guard.checkpoint_now(guard.agree([4.0, 4 * 31.0, 8.0], world=4))  # once


def test_holding_waits_past_the_deadline_then_trains_on():
    lines: list[str] = []
    slept: list[float] = []
    guard = PreemptionGuard(save_seconds=30, log=lines.append, sleep=slept.append)
    agreed = guard.agree([2.0, 2 * 20.0, 2.0], world=2)
    assert guard.checkpoint_now(agreed)
    guard.hold(agreed, step=12)
    assert slept == [20.0 + HOLD_PAST_DEADLINE_SECONDS]
    assert lines[0].startswith("step 12: saved before the preemption (20 s left); holding")
    assert "did not go" in lines[1]
    assert guard.checkpoint_now(agreed)  # a later warning gets its own checkpoint
