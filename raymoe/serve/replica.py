"""The model's Serve deployment: each replica holds one inference group (``ep`` Ray
actors, raymoe.infer.group) and answers rows of tokens. Concurrent rows are batched
when the group is free (``BatchWhenFree``) into as few generate calls as their sampling
allows (batching.py).

A call that does not come back within the timeout, or whose group lost an actor, fails
with ModelUnavailable and leaves the replica unhealthy: its health check then fails and
Serve replaces it (with a fresh group)."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from raymoe.infer.group import GroupOptions, InferenceGroups
from raymoe.model.generation import Sampling
from raymoe.serve.batching import BatchWhenFree, Call, Row, plan_calls


class ModelUnavailable(RuntimeError):
    """The replica cannot answer now (its group died or hung); a retry may reach a healthy one."""


@dataclass(frozen=True)
class Batching:
    max_batch_size: int = 32
    """Rows per batch; 1 turns batching off."""
    wait_s: float = 0.01
    """How long a batch waits to fill before it runs."""


@dataclass
class Counters:
    """What a replica has done, for /v1/stats: fewer calls than rows is batching at work."""

    rows: int = 0
    batches: int = 0
    calls: int = 0
    largest_call: int = 0


@serve.deployment(ray_actor_options={"num_cpus": 0}, health_check_period_s=2.0)
class GroupReplica:
    def __init__(self, uri: str, seq_len: int, group: GroupOptions, batching: Batching, timeout_s: float):
        self.groups = InferenceGroups(uri, dataclasses.replace(group, replicas=1))
        self.seq_len, self.timeout_s = seq_len, timeout_s
        self.counters = Counters()
        self.broken: str | None = None
        self.batcher = BatchWhenFree(self._generate_batch, batching.max_batch_size, batching.wait_s)

    async def generate(self, row: Row) -> list[int]:
        """The row's new tokens (the end-of-text token last when it came), generated with
        the rows that arrive with it."""
        return await self.batcher.submit(row)

    async def _generate_batch(self, rows: list[Row]) -> list[list[int]]:
        self.counters.rows += len(rows)
        self.counters.batches += 1
        out: list[list[int]] = [[] for _ in rows]
        for call in plan_calls(rows, self.seq_len):
            tokens = await self._call(call, rows)
            for i, new in zip(call.rows, tokens, strict=True):
                out[i] = new[:rows[i].max_tokens]
        return out

    async def _call(self, call: Call, rows: list[Row]) -> list[list[int]]:
        self.check_health()
        self.counters.calls += 1
        self.counters.largest_call = max(self.counters.largest_call, len(call.rows))
        first = rows[call.rows[0]]
        seed = first.seed if first.seed is not None else random.randrange(2**31)
        prompts = [list(rows[i].prompt) for i in call.rows]
        work = asyncio.to_thread(self.groups.generate_tokens, prompts, call.max_tokens,
                                 Sampling(first.temperature, 0, first.top_p), seed)
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except TimeoutError:
            self.broken = f"the inference group gave no answer within {self.timeout_s:g} s"
        except ray.exceptions.RayError as err:  # an actor of the group died
            self.broken = f"the inference group failed: {type(err).__name__}: {err}".splitlines()[0]
        raise self._unavailable()

    def stats(self) -> dict[str, Any]:
        return dataclasses.asdict(self.counters)

    def check_health(self) -> None:
        """Serve's health check (and before each call): a broken replica is replaced."""
        if self.broken is not None:
            raise self._unavailable()

    def _unavailable(self) -> ModelUnavailable:
        return ModelUnavailable(f"{self.broken}; Serve is replacing this replica, retry shortly")

    def __del__(self) -> None:
        """Serve's graceful shutdown: the group's actors and placement group go too."""
        groups = getattr(self, "groups", None)
        if groups is not None:
            groups.close()

