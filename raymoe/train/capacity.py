"""Whether the connected Ray cluster can place a worker group, whether it can grow (an
autoscaler is present), and waiting for it to grow with a line every few seconds.

On an autoscaling cluster (a CPU head, GPU nodes from zero) the worker group never fits
when a run starts: raymoe asks the autoscaler for the group's bundles
(``ray.autoscaler.sdk.request_resources``, so nodes are launched before any placement
group exists) and waits. On a fixed cluster waiting would never end: it fails at once,
naming the numbers.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import ray

from raymoe.errors import RaymoeError

WaitPolicy = Literal["auto", "wait", "no-wait"]
READONLY_NODE_TYPE = "node_"
"""Ray's autoscaler names the nodes of a fixed cluster (its read-only provider) node_<id>."""


class ClusterTooSmallError(RaymoeError, RuntimeError):
    """The worker group cannot be placed, and the cluster cannot or did not grow in time."""


@dataclass(frozen=True)
class WorkerGroupDemand:
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0

    @property
    def bundle(self) -> dict[str, float]:
        bundle = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            bundle["GPU"] = self.gpus_per_worker
        return bundle

    def placeable(self, nodes: list[dict[str, float]]) -> int:
        """How many workers fit on nodes of these total resources (a worker lies on one node)."""
        def fits(node: dict[str, float]) -> float:
            return min(math.floor(node.get(k, 0.0) / v + 1e-9) if v else math.inf
                       for k, v in self.bundle.items())
        return int(min(sum(min(fits(n), self.workers) for n in nodes), self.workers))

    def describe(self, nodes: list[dict[str, float]]) -> str:
        have = {k: sum(n.get(k, 0.0) for n in nodes) for k in self.bundle}
        need = ", ".join(f"{v * self.workers:g} {k}" for k, v in self.bundle.items())
        each = " + ".join(f"{v:g} {k}" for k, v in self.bundle.items())
        has = ", ".join(f"{v:g} {k}" for k, v in have.items())
        return (f"the worker group needs {need} ({self.workers} workers x {each}); "
                f"{self.placeable(nodes)} of {self.workers} workers fit on the cluster's "
                f"{len(nodes)} node(s) with {has}")


def node_resources() -> list[dict[str, float]]:
    """The total resources of every alive node."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _autoscaler_status() -> dict[str, Any]:
    """Autoscaler v1's status (the cluster launcher's; `ray status` reads the same)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw) if raw else {}


def _node_types() -> set[str]:
    report = _autoscaler_status().get("autoscaler_report") or {}
    types = set(report.get("active_nodes") or {}) | set(report.get("idle_nodes") or {})
    return types | set(report.get("pending_launches") or {})


def cluster_can_grow() -> bool:
    """An autoscaler that can add nodes: one that reports its node groups (autoscaler v2,
    as Ray Train checks), or v1's status naming node types of a cluster config rather
    than the read-only mirror Ray keeps of a fixed cluster."""
    from ray._private.state import state

    if state.get_max_resources_from_cluster_config():
        return True
    return any(not t.startswith(READONLY_NODE_TYPE) for t in _node_types())


def pending_nodes() -> str:
    """What the autoscaler says it is launching, as a phrase ("" when nothing)."""
    report = _autoscaler_status().get("autoscaler_report") or {}
    launches = report.get("pending_launches") or {}
    starting = report.get("pending_nodes") or []
    parts = [f"{count} {kind} launching" for kind, count in launches.items()]
    if starting:
        parts.append(f"{len(starting)} node(s) starting")
    return ", ".join(parts)


@contextlib.contextmanager
def worker_group_capacity(demand: WorkerGroupDemand, policy: WaitPolicy = "auto",
                          timeout: float = 1800.0, log: Callable[[str], None] = print,
                          poll: float = 5.0) -> Iterator[None]:
    """Returns when the worker group fits; while the block runs, the autoscaler is asked
    to keep the group's nodes (the request is withdrawn afterwards, so idle nodes can go).

    ``policy``: "wait" always waits, "no-wait" fails at once, "auto" waits when the
    cluster can grow."""
    from ray.autoscaler.sdk import request_resources

    nodes = node_resources()
    if demand.placeable(nodes) >= demand.workers:
        yield
        return
    if policy == "no-wait" or (policy == "auto" and not cluster_can_grow()):
        grow = "the cluster has no autoscaler to grow it" if policy == "auto" else "--no-wait"
        raise ClusterTooSmallError(
            f"{demand.describe(nodes)} ({grow}). Lower parallel.num_workers or "
            "parallel.cpus_per_worker, or pass --wait to wait for nodes to join")
    request_resources(bundles=[demand.bundle] * demand.workers)
    try:
        _wait(demand, timeout, log, poll)
        yield
    finally:
        request_resources(bundles=[])


def _wait(demand: WorkerGroupDemand, timeout: float, log: Callable[[str], None],
          poll: float) -> None:
    start = time.monotonic()
    while True:
        nodes = node_resources()
        if demand.placeable(nodes) >= demand.workers:
            log(f"the cluster fits the worker group after {time.monotonic() - start:.0f} s "
                f"({len(nodes)} nodes)")
            return
        waited = time.monotonic() - start
        if waited > timeout:
            raise ClusterTooSmallError(f"{demand.describe(nodes)}, still after waiting "
                                       f"{timeout:g} s (--timeout)")
        pending = pending_nodes()
        log(f"waiting {waited:.0f}/{timeout:g} s: {demand.describe(nodes)}"
            + (f"; autoscaler: {pending}" if pending else ""))
        time.sleep(poll)
