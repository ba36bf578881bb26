"""This rank's sequences of the run's stream (raymoe.data.schedule), read in the background.

A rank reads only the row groups of its own lanes: at W ranks about 1/W of the data, each
row group fetched once (or twice where two lanes share it), verified against the shard
table, and kept in a small cache while its lane runs through it. Reading, decompression and
hashing run in one thread of the training process; pyarrow and hashlib release the GIL
for them, so a step waits for data only when storage is slower than training.

Why not Ray Data here. The old reader streamed every shard through Ray Data on every rank.
A sampling profile (py-spy, 50 Hz, 25 s) of both workers of tiny-moe8 on 26 shards of the
Austen books put 84-85% of a worker's samples in the training step, 11-13% in Ray's
core-worker loop and 3-4% in Ray Data's batch-iterator thread; the streaming executor had
already read the 10 MB epoch and stopped, and the slow steps of that run came from other
load on the machine's two cores. On larger datasets the executor keeps polling while shards
remain to read. More to the point, Ray Data has no way to read one rank's row groups in a
planned order and to resume mid-epoch; what is left to read per rank (1/W of the data) is
small, so one thread with pyarrow is all it needs, and it sleeps on a queue between steps.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from raymoe.data.schedule import Cursor, Read, Source, StreamPlan
from raymoe.data.shards import DatasetError, PreparedDataset, ShardFile


class _LRU(OrderedDict):
    def __init__(self, capacity: int, on_evict=None):
        super().__init__()
        self.capacity, self.on_evict = capacity, on_evict

    def put(self, key, value) -> None:
        self[key] = value
        while len(self) > self.capacity:
            _, old = self.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old)

    def hit(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


class SequenceReader:
    """This rank's share of the global batches (numpy arrays of seq_len + 1 token ids).

    ``datasets`` with ``weights`` form a blend; one dataset is the plain form. Each call
    ``next_batch(n)`` returns the next n of this rank's global_batch / world_size rows of
    the current step.
    """

    def __init__(self, datasets: PreparedDataset | Sequence[PreparedDataset], split: str, rank: int,
                 world_size: int, global_batch: int, seed: int, weights: Sequence[float] | None = None,
                 cursor: Cursor | None = None, shuffle: bool = True, window: int = 64,
                 prefetch_steps: int = 2):
        self.datasets = [datasets] if isinstance(datasets, PreparedDataset) else list(datasets)
        if global_batch % world_size:
            raise DatasetError(f"global batch {global_batch} does not split over {world_size} ranks")
        self.split, self.rank, self.world_size = split, rank, world_size
        sources = [Source(f"{d.uri} ({split})", d.shards(split).sequences, d.row_group_sequences)
                   for d in self.datasets]
        self.plan = StreamPlan(sources, list(weights or [1.0] * len(sources)), global_batch, seed,
                               window, shuffle)
        per_rank = global_batch // world_size
        self.slots = range(rank * per_rank, (rank + 1) * per_rank)
        self._cursor = self.plan.check(cursor) if cursor is not None else self.plan.start()
        self.wait_seconds = 0.0
        self._rows: np.ndarray | None = None
        self._used = 0
        self._pending_cursor = self._cursor
        self._files = _LRU(per_rank + 4, on_evict=ShardFile.close)
        self._groups = _LRU(2 * per_rank + 4)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch_steps))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(self._cursor,),
                                        name=f"raymoe-reader-{split}", daemon=True)
        self._thread.start()

    @property
    def cursor(self) -> Cursor:
        """Where the run stands after the last step this rank consumed whole (equal on every
        rank); store it in the checkpoint."""
        return self._cursor

    def next_batch(self, size: int) -> np.ndarray:
        """The next ``size`` rows of this rank's share of the current global batch."""
        started = time.perf_counter()
        if self._rows is None or self._used == len(self._rows):
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._queue.put(item)  # every later call fails the same way
                raise item
            self._rows, self._pending_cursor = item
            self._used = 0
        assert self._rows is not None
        if (len(self._rows) - self._used) < size:
            raise DatasetError(f"a batch of {size} does not divide this rank's {len(self._rows)} "
                               "sequences of a step (global batch / world size)")
        rows = self._rows[self._used:self._used + size]
        self._used += size
        if self._used == len(self._rows):
            self._cursor = self._pending_cursor
        self.wait_seconds += time.perf_counter() - started
        return rows

    def close(self) -> None:
        """Stop the background reads (also at the end of a ``with`` block)."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        for file in self._files.values():
            file.close()
        self._files.clear()

    def __enter__(self) -> SequenceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- background thread

    def _produce(self, cursor: Cursor) -> None:
        try:
            while not self._stop.is_set():
                rows = np.stack([self._sequence(read) for read in self.plan.reads(cursor, self.slots)])
                cursor = self.plan.advance(cursor)
                while not self._stop.is_set():
                    try:
                        self._queue.put((rows, cursor), timeout=0.1)
                        break
                    except queue.Full:
                        pass
        except BaseException as err:  # handed to the training thread by next_batch
            while not self._stop.is_set():
                try:
                    self._queue.put(err, timeout=0.1)
                    return
                except queue.Full:
                    pass

    def _sequence(self, read: Read) -> np.ndarray:
        key = (read.dataset, read.epoch, read.shard, read.row_group)
        group = self._groups.hit(key)
        if group is None:
            rows = self._file(read.dataset, read.shard).read_row_group(read.row_group)
            group = rows[self.plan.row_order(read, len(rows))]
            self._groups.put(key, group)
        return group[read.offset]

    def _file(self, dataset: int, shard: int) -> ShardFile:
        file = self._files.hit((dataset, shard))
        if file is None:
            data = self.datasets[dataset]
            file = data.open_shard(data.shards(self.split)[shard])
            self._files.put((dataset, shard), file)
        return file
