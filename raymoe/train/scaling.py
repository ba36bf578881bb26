"""An elastic group resizes only for a new layout.

Ray Train's elastic policy restarts the group whenever the number of workers the cluster
holds changes. Each restart loses the work since the last checkpoint and re-reads the
checkpoint on every rank, yet many counts train alike: a global batch of 128 micro-batches
trains on 64 workers whether 64, 72 or 120 are there (raymoe.train.layout), so nodes that
return one at a time would restart a 128-GPU run up to seven times for nothing. This policy
counts the workers as the layout would train on them, so Ray starts a group of exactly that
many (no worker idles) and restarts it only when that number changes; and a grow, which
Ray makes with the group running, waits for the group's checkpoint first, so that it loses
no work (a lost node leaves no such choice: a preemption warning does, raymoe.train.preemption).

Ray Train 2.60 builds its scaling policy from the ScalingConfig alone;
raymoe.train.failures.RaymoeTorchTrainer hands its controller this one instead."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_put
from ray.train.v2._internal.execution.scaling_policy import (
    ElasticScalingPolicy,
    NoopDecision,
    ResizeDecision,
    ScalingDecision,
)
from ray.train.v2.api.config import ScalingConfig

from raymoe.config import Config
from raymoe.train.elastic import grow_key
from raymoe.train.layout import plan_layout

GROW_SAVE_TIMEOUT_SECONDS = 120.0
"""How long a grow waits for the group's checkpoint before it restarts the group anyway."""


def trained_workers(cfg: Config) -> dict[int, int]:
    """Workers the cluster holds -> workers the layout trains on, for an elastic config's
    range [MIN, MAX]."""
    par = cfg.parallel
    return {n: plan_layout(cfg, n).workers for n in range(par.min_workers, par.max_workers + 1)}


class LayoutScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, with the workers it could start counted as the layout trains
    on them (below MIN as they are: Ray then waits). Before it grows a running group it asks
    the group for a checkpoint (a request id under ``grow_key(resize_key)``; the group saves,
    uploads on every rank and holds: raymoe.train.preemption) and grows once the group's
    record (raymoe.train.elastic.ResizeLog, under ``resize_key``) says that checkpoint of
    that request is in storage, or after GROW_SAVE_TIMEOUT_SECONDS. A request the cluster
    no longer backs (the new node gone again, the group restarted) is withdrawn."""

    def __init__(self, scaling_config: ScalingConfig, trained: dict[int, int], resize_key: str,
                 clock: Callable[[], float] = time.time):
        super().__init__(scaling_config)
        self.trained, self.resize_key, self.clock = trained, resize_key, clock
        self.request: str | None = None
        self.asked_at = 0.0

    def _count_possible_workers(self, reserved_resources) -> int:
        available = super()._count_possible_workers(reserved_resources)
        return self.trained.get(available, available)

    def make_decision_for_non_running_worker_group(self) -> ScalingDecision:
        self._withdraw()
        return super().make_decision_for_non_running_worker_group()

    def make_decision_for_running_worker_group(self, worker_group_state, worker_group_status) -> ScalingDecision:
        considered = self._latest_monitor_time
        decision = super().make_decision_for_running_worker_group(worker_group_state, worker_group_status)
        if self._latest_monitor_time == considered:
            return decision  # between resize checks: nothing was considered, a request stands
        if not isinstance(decision, ResizeDecision) or decision.num_workers <= worker_group_state.num_workers:
            self._withdraw()
            return decision
        return decision if self._saved_for_grow() else NoopDecision()

    def _saved_for_grow(self) -> bool:
        now = self.clock()
        if self.request is None:
            self.request, self.asked_at = uuid.uuid4().hex, now
            _internal_kv_put(grow_key(self.resize_key), self.request.encode(), overwrite=True)
            return False
        raw = _internal_kv_get(self.resize_key.encode())
        ready = raw is not None and json.loads(raw).get("ready_for") == self.request
        if ready or now - self.asked_at > GROW_SAVE_TIMEOUT_SECONDS:
            self._withdraw()
            return True
        return False

    def _withdraw(self) -> None:
        if self.request is not None:
            _internal_kv_del(grow_key(self.resize_key))
            self.request = None


def group_starts(policy: ElasticScalingPolicy, held: list[int]) -> list[int]:
    """The group sizes a controller with ``policy`` starts as the cluster comes to hold
    ``held`` workers, one count after the other (nodes joining): its calls simulated (a
    decision for a group not yet running, then one per count for the running group, every
    resize check due), the cluster's resources given directly, a grow's checkpoint taken as
    saved. What bench/elastic.py counts restarts with, at the reference's sizes."""
    from types import SimpleNamespace

    policy._maybe_send_resource_request = lambda: None  # type: ignore[method-assign]
    policy.scaling_config.elastic_resize_monitor_interval_s = 0.0
    if isinstance(policy, LayoutScalingPolicy):
        policy._saved_for_grow = lambda: True  # type: ignore[method-assign]
    per_worker = policy.scaling_config._resources_per_worker_not_none
    started: list[int] = []
    group: Any = None
    for workers in held:
        reserved = {f"node{i}": dict(per_worker) for i in range(workers)}
        policy._get_reserved_resources = lambda reserved=reserved: reserved  # type: ignore[method-assign,misc]
        decision = (policy.make_decision_for_non_running_worker_group() if group is None else
                    policy.make_decision_for_running_worker_group(group, None))  # type: ignore[arg-type]
        if isinstance(decision, ResizeDecision):
            started.append(decision.num_workers)
            group = SimpleNamespace(num_workers=decision.num_workers, start_time=float("-inf"))
    return started
