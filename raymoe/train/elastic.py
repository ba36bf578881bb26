"""An elastic worker group on Ray Train: what each (re)started group does before training.

Ray Train (``ScalingConfig(num_workers=(MIN, MAX))``) restarts the train function on every
worker whenever the group changes size: a lost node fails the group and it restarts with
the workers the cluster still holds; the resize check (every
``parallel.resize_check_seconds``) restarts it larger when nodes join, and only when the
layout trains on more of them (raymoe.train.scaling). Each start:

1. plans the layout for the group's size (raymoe.train.layout);
2. resumes from the latest checkpoint (the loop does), resharded to the layout;
3. logs, at its first step, what changed since the previous group: the nodes lost or
   added, the old and the new layout, the step resumed from and the seconds lost.

The previous group's record lives in Ray's key-value store of the cluster (GCS), under a
key the driver chooses per run and deletes at the end.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch.distributed as dist
from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from raymoe.train.layout import Layout
from raymoe.train.loop import RunHooks


def grow_key(resize_key: str | bytes) -> bytes:
    """Where raymoe.train.scaling asks the group for a checkpoint before it grows it."""
    return (resize_key if isinstance(resize_key, bytes) else resize_key.encode()) + b"/grow"


KEEP_SAVED = 16
"""Checkpoint times remembered (resume picks one of the last few)."""


def gather_nodes() -> list[str]:
    """The Ray node of every rank of the group."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, ray.get_runtime_context().get_node_id())
    return everyone


class ResizeLog:
    """Rank 0's record of its group in the cluster's key-value store, and the line that
    compares it with the previous group's."""

    def __init__(self, key: str, layout: Layout, nodes: list[str], log: Callable[[str], None],
                 clock: Callable[[], float] = time.time):
        self.key, self.layout, self.log, self.clock = key.encode(), layout, log, clock
        raw = _internal_kv_get(self.key)
        self.previous: dict[str, Any] | None = json.loads(raw) if raw else None
        self.record: dict[str, Any] = {
            "nodes": sorted(set(nodes)), "available": layout.available, "workers": layout.workers,
            "layout": layout.describe(), "last": None,
            "saved": self.previous["saved"] if self.previous else {}}
        self.first = True
        self.written = float("-inf")
        self._write()

    def ready_for(self, request: str) -> None:
        """The group's checkpoint for grow ``request`` is in storage on every rank."""
        self.record["ready_for"] = request
        self._write()

    def _write(self) -> None:
        _internal_kv_put(self.key, json.dumps(self.record).encode(), overwrite=True)
        self.written = time.monotonic()

    def on_step(self, step: int, seconds: float, saved: bool) -> None:
        now = self.clock()
        if self.first and self.previous is not None:
            self.log(self.describe_resize(step - 1, now - seconds))
        self.first = False
        self.record["last"] = [step, now]
        if saved:
            self.record["saved"][str(step)] = now
            self.record["saved"] = dict(sorted(self.record["saved"].items(),
                                               key=lambda kv: int(kv[0]))[-KEEP_SAVED:])
        if saved or time.monotonic() - self.written >= 1.0:
            self._write()

    def describe_resize(self, resumed: int, started: float) -> str:
        """The resize line: what changed, old and new layout, resumed step, seconds lost
        (from the previous group's last step to this group's first, plus the time the
        previous group had spent past the checkpoint resumed from)."""
        prev = self.previous
        assert prev is not None
        lost = sorted(set(prev["nodes"]) - set(self.record["nodes"]))
        added = sorted(set(self.record["nodes"]) - set(prev["nodes"]))
        changes = ([f"lost node(s) {', '.join(n[:8] for n in lost)}"] if lost else []) + \
                  ([f"added node(s) {', '.join(n[:8] for n in added)}"] if added else [])
        what = "; ".join(changes) or "restarted on the same nodes (a worker failed)"
        line = (f"resize: {what} ({prev['available']} -> {self.layout.available} workers): "
                f"{prev['layout']} -> {self.layout.describe()}; resumed from step {resumed}")
        last = prev["last"]
        resumed_at = prev["saved"].get(str(resumed))
        if last is not None and resumed_at is not None:
            restart, redo = started - last[1], last[1] - resumed_at
            line += (f" (the previous group reached step {last[0]}); {restart + redo:.1f} s lost: "
                     f"{restart:.1f} s restarting, {redo:.1f} s of work redone")
        return line


class ElasticHooks:
    """The run's hooks (Ray Train's); rank 0 keeps the ResizeLog and, in an elastic run,
    watches for raymoe.train.scaling's request to grow the group (at most once a second,
    off the step's critical path otherwise): each request is reported once, and once its
    checkpoint is in storage on every rank the record says it is ready."""

    POLL_SECONDS = 1.0

    def __init__(self, inner: RunHooks, resize_log: ResizeLog | None, elastic: bool,
                 clock: Callable[[], float] = time.monotonic):
        self.inner, self.resize_log, self.clock = inner, resize_log, clock
        self.watch = elastic and resize_log is not None
        self.polled = float("-inf")
        self.seen: str | None = None
        """The last grow request reported to the group."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        return self.inner.latest_checkpoint()

    def new_checkpoint_dir(self, step: int) -> Path:
        return self.inner.new_checkpoint_dir(step)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int,
               wait_for_upload: bool = False) -> None:
        self.inner.report(metrics, checkpoint_dir, step, wait_for_upload)
        if wait_for_upload and checkpoint_dir is not None:
            if dist.is_initialized():
                dist.barrier()  # every rank's part is in storage, not only rank 0's
            if self.resize_log is not None and self.seen is not None:
                self.resize_log.ready_for(self.seen)

    def on_step(self, step: int, seconds: float, saved: bool) -> None:
        if self.resize_log is not None:
            self.resize_log.on_step(step, seconds, saved)

    def grow_requested(self) -> bool:
        if not self.watch or self.clock() - self.polled < self.POLL_SECONDS:
            return False
        self.polled = self.clock()
        assert self.resize_log is not None
        try:
            raw = _internal_kv_get(grow_key(self.resize_log.key))
        except Exception as err:  # the GCS busy: ask again at the next poll, never fail the step
            self.resize_log.log(f"grow request not read: {err}")
            return False
        request = raw.decode() if raw else None
        if request is None or request == self.seen:
            return False
        self.seen = request
        return True
