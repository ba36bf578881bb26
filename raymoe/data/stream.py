"""Streaming packed sequences to data-parallel ranks, resumable from a cursor.

Each epoch has a plan: the shards in a seeded order, each read in a seeded permutation of
its sequences (the shuffle buffer is one shard). The plan is one list of sequences; with
world size W and N sequences in it, rank r reads positions [r * N//W, (r + 1) * N//W)
(the last N mod W wait for the next epoch), so ranks read disjoint shards, never the
whole dataset each, and finish an epoch together.

The cursor is (epoch, the plan, the world size it was cut for, sequences each rank has
consumed). With the same world size a resumed reader yields exactly what the
uninterrupted one would have. With another world size, the unread remainder of every
old rank's range becomes the new plan, split anew: nothing of the epoch is repeated.

Shards are read through Ray Data (one task per segment, ordered, prefetched), so S3 or
local shards load in the background while the model trains.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

import numpy as np

from raymoe.data.shards import DatasetError, PreparedDataset
from raymoe.errors import find_cause

Segment = tuple[int, int, int]
"""(shard index in the manifest, start in the shard's permuted order, count)."""


@dataclass
class Cursor:
    epoch: int = 0
    plan: Optional[list[Segment]] = None
    """Remaining plan of this epoch; None means the epoch's full seeded plan."""
    plan_world_size: int = 0
    consumed: int = 0
    """Sequences each rank has taken from its range of the plan."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Cursor":
        plan = data.get("plan")
        return cls(data["epoch"], [tuple(s) for s in plan] if plan is not None else None,
                   data["plan_world_size"], data["consumed"])


def epoch_plan(shard_sizes: list[int], seed: int, epoch: int, shuffle: bool) -> list[Segment]:
    order = (np.random.default_rng([seed, epoch]).permutation(len(shard_sizes)) if shuffle
             else np.arange(len(shard_sizes)))
    return [(int(i), 0, shard_sizes[i]) for i in order if shard_sizes[i] > 0]


def take_range(plan: list[Segment], start: int, count: int) -> list[Segment]:
    """The segments covering positions [start, start + count) of the plan."""
    out, position = [], 0
    for shard, seg_start, seg_count in plan:
        lo, hi = max(start, position), min(start + count, position + seg_count)
        if lo < hi:
            out.append((shard, seg_start + lo - position, hi - lo))
        position += seg_count
        if position >= start + count:
            break
    return out


def rank_range(plan: list[Segment], rank: int, world_size: int) -> tuple[int, int]:
    per_rank = sum(s[2] for s in plan) // world_size
    return rank * per_rank, per_rank


def remaining_plan(plan: list[Segment], world_size: int, consumed: int) -> list[Segment]:
    """What no rank of the old world has read yet: each rank's unread part, in rank order,
    then the plan's tail that no rank's range covered."""
    out: list[Segment] = []
    for rank in range(world_size):
        start, per_rank = rank_range(plan, rank, world_size)
        out.extend(take_range(plan, start + consumed, per_rank - consumed))
    covered = world_size * rank_range(plan, 0, world_size)[1]
    out.extend(take_range(plan, covered, sum(s[2] for s in plan) - covered))
    return out


class SequenceReader:
    """This rank's stream of sequences (numpy arrays of seq_len + 1 token ids)."""

    def __init__(self, dataset: PreparedDataset, split: str, rank: int, world_size: int,
                 seed: int, cursor: Optional[Cursor] = None, shuffle: bool = True,
                 prefetch_segments: int = 2):
        self.dataset = dataset
        self.split = split
        self.shards = dataset.shards(split)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = shuffle
        self.prefetch_segments = prefetch_segments
        self.wait_seconds = 0.0
        self._cursor = cursor or Cursor()
        self._rows: Optional[Iterator[np.ndarray]] = None
        if not self.shards:
            raise DatasetError(f"{dataset.root.uri}: split {split!r} has no sequences")
        self._start_epoch(self._cursor)

    @property
    def cursor(self) -> Cursor:
        """Where this reader stands; store it in the checkpoint."""
        return Cursor(self._cursor.epoch, self._cursor.plan, self._cursor.plan_world_size,
                      self._cursor.consumed)

    def _start_epoch(self, cursor: Cursor) -> None:
        fresh = epoch_plan([s.sequences for s in self.shards], self.seed, cursor.epoch, self.shuffle)
        plan = cursor.plan if cursor.plan is not None else fresh
        consumed = cursor.consumed
        if cursor.plan_world_size not in (0, self.world_size):
            plan = remaining_plan(plan, cursor.plan_world_size, consumed)
            consumed = 0
        stored_plan = None if plan == fresh else plan
        self._cursor = Cursor(cursor.epoch, stored_plan, self.world_size, consumed)
        start, per_rank = rank_range(plan, self.rank, self.world_size)
        if per_rank == 0:
            raise DatasetError(f"{self.dataset.root.uri}: {sum(s[2] for s in plan)} sequences "
                               f"cannot feed {self.world_size} ranks")
        self._segments = take_range(plan, start + consumed, per_rank - consumed)
        self._rows = self._read(self._segments) if self._segments else iter(())

    def _read(self, segments: list[Segment]) -> Iterator[np.ndarray]:
        import ray

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True
        ctx.raise_original_map_exception = True  # a DatasetError arrives as one
        items = [{"shard": s, "start": a, "count": c} for s, a, c in segments]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_load_segments, batch_size=1, batch_format="numpy",
                            fn_kwargs={"dataset_uri": self.dataset.root.uri, "split": self.split,
                                       "seed": self.seed,
                                       "epoch": self._cursor.epoch, "shuffle": self.shuffle})
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy",
                                         prefetch_batches=self.prefetch_segments):
                yield from batch["tokens"]
        except Exception as err:
            cause = find_cause(err, DatasetError)
            if cause is not None and cause is not err:
                raise DatasetError(str(cause)) from err
            raise

    def close(self) -> None:
        """Stop the background reads (also at the end of a ``with`` block)."""
        if hasattr(self._rows, "close"):
            self._rows.close()

    def __enter__(self) -> "SequenceReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_batch(self, size: int) -> np.ndarray:
        """(size, seq_len + 1) token ids; moves to the next epoch when this one ends."""
        rows = []
        started = time.perf_counter()
        while len(rows) < size:
            row = next(self._rows, None)
            if row is None:
                self.close()
                self._start_epoch(Cursor(self._cursor.epoch + 1))
                continue
            rows.append(row)
            self._cursor.consumed += 1
        self.wait_seconds += time.perf_counter() - started
        return np.stack(rows)


def _load_segments(batch: dict[str, np.ndarray], dataset_uri: str, split: str, seed: int,
                   epoch: int, shuffle: bool) -> dict[str, np.ndarray]:
    dataset = PreparedDataset.open(dataset_uri)
    shards = dataset.shards(split)
    out = []
    for shard, start, count in zip(batch["shard"], batch["start"], batch["count"]):
        sequences = dataset.read_shard(shards[int(shard)])
        order = (np.random.default_rng([seed, epoch, int(shard)]).permutation(len(sequences))
                 if shuffle else np.arange(len(sequences)))
        out.append(sequences[order[int(start):int(start) + int(count)]])
    return {"tokens": np.concatenate(out)}

