"""The just-in-time checkpoint's decisions from what the ranks summed (raymoe.train.preemption);
the run on a warned and lost node is in test_multinode."""

from __future__ import annotations

import raymoe.train.preemption as preemption
from raymoe.train.preemption import HOLD_PAST_DEADLINE_SECONDS, RestartGuard, preemption_warning


def test_no_warning_outside_ray_train_and_none_without_one():
    assert preemption_warning() == (False, None)
    guard = RestartGuard(save_seconds=30, grow_wait_seconds=70, log=lambda _: None)
    assert guard.scalars(2.0, grow_requested=False) == [0.0, 0.0, 2.0, 0.0]
    agreed = guard.agree([0.0, 0.0, 8.0, 0.0], world=4)
    assert not agreed.warned and not agreed.grow and agreed.step_seconds == 2.0
    assert guard.checkpoint_now(agreed) is None


def test_the_checkpoint_comes_once_when_the_next_steps_would_leave_too_little():
    guard = RestartGuard(save_seconds=30, grow_wait_seconds=70, log=lambda _: None)
    # 3 of 4 ranks saw the warning (each 100 s left); steps of 2 s: save at <= 34 s left
    assert guard.checkpoint_now(guard.agree([3.0, 300.0, 8.0, 0.0], world=4)) is None
    assert guard.checkpoint_now(guard.agree([4.0, 4 * 34.5, 8.0, 0.0], world=4)) is None
    assert guard.checkpoint_now(guard.agree([4.0, 4 * 33.0, 8.0, 0.0], world=4)) == "preemption"
    assert guard.checkpoint_now(guard.agree([4.0, 4 * 31.0, 8.0, 0.0], world=4)) is None  # once


def test_a_grow_asked_by_rank_0_saves_every_rank_at_once():
    guard = RestartGuard(save_seconds=30, grow_wait_seconds=70, log=lambda _: None)
    assert guard.checkpoint_now(guard.agree([0.0, 0.0, 8.0, 1.0], world=4)) == "grow"
    assert guard.checkpoint_now(guard.agree([0.0, 0.0, 8.0, 1.0], world=4)) is None


def test_holding_waits_past_the_deadline_then_trains_on():
    lines: list[str] = []
    slept: list[float] = []
    guard = RestartGuard(save_seconds=30, grow_wait_seconds=70, log=lines.append, sleep=slept.append)
    agreed = guard.agree([2.0, 2 * 20.0, 2.0, 0.0], world=2)
    assert guard.checkpoint_now(agreed) == "preemption"
    guard.hold("preemption", agreed, step=12)
    grow = guard.agree([0.0, 0.0, 2.0, 1.0], world=2)
    assert guard.checkpoint_now(grow) == "grow"
    guard.hold("grow", grow, step=13)
    assert slept == [20.0 + HOLD_PAST_DEADLINE_SECONDS, 70]
    assert lines[0].startswith("step 12: saved before the preemption (20 s left); holding")
    assert lines[1] == "step 12: no restart came within 80 s of the preemption's checkpoint; training on"
    assert lines[2] == "step 13: saved before the group grows; holding until it restarts larger"
    assert guard.checkpoint_now(agreed) is None  # one checkpoint a warning, whatever comes after
    assert guard.checkpoint_now(grow) == "grow"  # a new grow request does get one


def test_a_warning_without_a_deadline_gets_rays_two_minutes_from_first_sight(monkeypatch):
    now = [500.0]
    monkeypatch.setattr(preemption, "preemption_warning", lambda: (True, None))
    guard = RestartGuard(save_seconds=30, grow_wait_seconds=70, log=lambda _: None, clock=lambda: now[0])
    assert guard.scalars(1.0, grow_requested=False) == [1.0, 120.0, 1.0, 0.0]
    now[0] += 100
    assert guard.scalars(1.0, grow_requested=False) == [1.0, 20.0, 1.0, 0.0]
