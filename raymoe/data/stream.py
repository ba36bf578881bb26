"""Streaming packed sequences to data-parallel ranks, resumable from a cursor.

Each epoch has a plan: the shards in a seeded order, each read in a seeded permutation of
its sequences (the shuffle buffer is one shard). The plan is one list of sequences, and
the training run consumes it front to back, whatever the number of ranks: a call
``next_batch(n)`` on each of W ranks takes the next W x n sequences of the plan, rank r
getting the r-th n of them. So step s always trains on the same global batch, one
worker with gradient accumulation sees what W workers see, and the cursor is just
(epoch, position in the plan): a resumed reader, at the same or another world size,
continues exactly where the run stopped, repeating and skipping nothing of the epoch.

Every rank streams the whole plan and keeps its share: a W-fold read, which is small next
to training (a 2048-token sequence is 4 KiB). Shards are read through Ray Data (one
ordered task per segment, prefetched), so S3 or local shards load in the background.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from raymoe.data.shards import DatasetError, PreparedDataset
from raymoe.errors import find_cause

Segment = tuple[int, int, int]
"""(shard index in the manifest, start in the shard's permuted order, count)."""


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0
    """Sequences of the epoch's plan consumed by all ranks together."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cursor:
        return cls(int(data["epoch"]), int(data["position"]))


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


class SequenceReader:
    """This rank's share of the sequences (numpy arrays of seq_len + 1 token ids)."""

    def __init__(self, dataset: PreparedDataset, split: str, rank: int, world_size: int,
                 seed: int, cursor: Cursor | None = None, shuffle: bool = True,
                 prefetch_segments: int = 2):
        self.dataset = dataset
        self.split = split
        self.shards = dataset.shards(split)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle = shuffle
        self.prefetch_segments = prefetch_segments
        self.wait_seconds = 0.0
        self.total = sum(s.sequences for s in self.shards)
        if self.total == 0:
            raise DatasetError(f"{dataset.root.uri}: split {split!r} has no sequences")
        self._rows: Iterator[np.ndarray] = iter(())
        self._start(cursor or Cursor())

    @property
    def cursor(self) -> Cursor:
        """Where the run stands (equal on every rank); store it in the checkpoint."""
        return Cursor(self._epoch, self._position)

    def _start(self, cursor: Cursor) -> None:
        self.close()
        self._epoch, self._position = cursor.epoch, cursor.position
        plan = epoch_plan([s.sequences for s in self.shards], self.seed, self._epoch, self.shuffle)
        segments = take_range(plan, self._position, self.total - self._position)
        self._rows = self._read(segments) if segments else iter(())

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
                                       "epoch": self._epoch, "shuffle": self.shuffle})
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

    def __enter__(self) -> SequenceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def next_batch(self, size: int) -> np.ndarray:
        """(size, seq_len + 1) token ids: this rank's share of the next world_size x size
        sequences. An epoch ends when fewer than that are left (they are not used)."""
        block = size * self.world_size
        if block > self.total:
            raise DatasetError(f"{self.dataset.root.uri}: split {self.split!r} has {self.total} "
                               f"sequences, fewer than {self.world_size} ranks x {size}")
        started = time.perf_counter()
        if self._position + block > self.total:
            self._start(Cursor(self._epoch + 1, 0))
        rows = [next(self._rows) for _ in range(block)]
        self._position += block
        self.wait_seconds += time.perf_counter() - started
        return np.stack(rows[self.rank * size:(self.rank + 1) * size])


def _load_segments(batch: dict[str, np.ndarray], dataset_uri: str, split: str, seed: int,
                   epoch: int, shuffle: bool) -> dict[str, np.ndarray]:
    dataset = PreparedDataset.open(dataset_uri)
    shards = dataset.shards(split)
    out = []
    for shard, start, count in zip(batch["shard"], batch["start"], batch["count"], strict=False):
        sequences = dataset.read_shard(shards[int(shard)])
        order = (np.random.default_rng([seed, epoch, int(shard)]).permutation(len(sequences))
                 if shuffle else np.arange(len(sequences)))
        out.append(sequences[order[int(start):int(start) + int(count)]])
    return {"tokens": np.concatenate(out)}

