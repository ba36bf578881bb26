"""Which sequence every slot of every global batch trains on: a function of the shard tables,
the seed, the global batch and the blend weights, with no I/O.

Slots and lanes. A global batch of B sequences has B slots. The blend gives each dataset a
share of the slots in proportion to its weight (interleaved, so every rank trains on the
blend); slot j is fed, step after step, by its own lane of its dataset. Rank r of W trains on
slots [r B/W, (r+1) B/W) and so reads only its lanes: about 1/W of the data. The slots, not
the ranks, fix what step s trains on, so any world size trains on the same global batches,
and a cursor (per dataset: epoch and step) resumes at any world size.

Windows. A dataset's epoch takes its shards in a seeded order and cuts them into windows of
K shards. A window lays its shards end to end (each shard's row groups in a seeded order,
each row group's sequences shuffled) and cuts the result into L equal lane ranges (L: the
dataset's lanes); the last L-1 or fewer sequences of a window are not used that epoch. At
the window's step t, lane l trains on sequence l * S + t of it (S: the window's steps).
The lanes are spread evenly over the window's shards, so every global batch mixes
min(K, L) shards, while each lane reads about K/L shards' worth of row groups, one after
another: a rank opens few shards and reads a row group once (twice where two lanes meet).

Each dataset runs through its own epochs: a small dataset of a blend starts its next epoch
while a large one is still in its first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raymoe.data.shards import DatasetError


@dataclass(frozen=True)
class Source:
    """One dataset's split as the plan sees it."""

    name: str
    shard_sequences: np.ndarray
    row_group_sequences: int


def blend_slots(weights: list[float], global_batch: int) -> np.ndarray:
    """The dataset of each slot: slot j goes to the dataset furthest below its share of the
    first j + 1 slots (Megatron's blending rule), so shares are exact to one slot and
    interleaved."""
    shares = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.zeros(len(shares), dtype=np.int64)
    slots = np.empty(global_batch, dtype=np.int64)
    for j in range(global_batch):
        d = int(np.argmax(shares * (j + 1) - counts))
        slots[j] = d
        counts[d] += 1
    return slots


class Window:
    """K shards' row groups end to end, cut into lane ranges."""

    def __init__(self, source: Source, shards: np.ndarray, lanes: int, rng: np.random.Generator | None):
        size = source.row_group_sequences
        counts = source.shard_sequences[shards]
        groups = -(-counts // size)
        shard = np.repeat(shards, groups)
        index = np.arange(len(shard)) - np.repeat(np.cumsum(groups) - groups, groups)
        if rng is not None:  # row groups in a random order within each shard
            order = np.lexsort((rng.random(len(shard)), np.repeat(np.arange(len(shards)), groups)))
            index = index[order]
        self.shard, self.row_group = shard, index
        self.sequences = np.minimum(size, source.shard_sequences[shard] - index * size)
        self.starts = np.concatenate([[0], np.cumsum(self.sequences)])
        self.steps = int(self.starts[-1]) // lanes

    def locate(self, lanes: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, row group, offset in the shuffled row group) of each lane at ``step``."""
        position = lanes * self.steps + step
        k = np.searchsorted(self.starts, position, side="right") - 1
        return self.shard[k], self.row_group[k], position - self.starts[k]


class EpochLayout:
    """One dataset's epoch: its shards in order, cut into windows."""

    def __init__(self, source: Source, index: int, lanes: int, seed: int, epoch: int,
                 window: int, shuffle: bool):
        self.source, self.lanes, self.shuffle = source, lanes, shuffle
        self.seed = (seed, index, epoch)
        n = len(source.shard_sequences)
        order = np.random.default_rng(self.seed).permutation(n) if shuffle else np.arange(n)
        self.order = order[source.shard_sequences[order] > 0]
        self.window = window
        starts = np.arange(0, len(self.order), window)
        totals = (np.add.reduceat(source.shard_sequences[self.order], starts) if len(starts)
                  else np.zeros(0, dtype=np.int64))
        self.window_steps = totals // lanes
        self.first_step = np.concatenate([[0], np.cumsum(self.window_steps)])
        self.steps = int(self.first_step[-1])
        if self.steps == 0:
            raise DatasetError(f"{source.name}: its {int(source.shard_sequences.sum())} sequences "
                               f"do not fill one step of its {lanes} lanes (slots of the global "
                               "batch); use a smaller global batch or more data")
        self._window: tuple[int, Window] | None = None

    def window_at(self, step: int) -> tuple[Window, int]:
        """The window that ``step`` of the epoch falls in, and the step within it."""
        w = int(np.searchsorted(self.first_step, step, side="right")) - 1
        if self._window is None or self._window[0] != w:
            rng = np.random.default_rng((*self.seed, w)) if self.shuffle else None
            shards = self.order[w * self.window:(w + 1) * self.window]
            self._window = (w, Window(self.source, shards, self.lanes, rng))
        return self._window[1], step - int(self.first_step[w])


@dataclass
class Cursor:
    """Where a run stands: per dataset the epoch and the steps taken in it. Equal on every
    rank and independent of the world size; stored in checkpoints."""

    global_batch: int
    epochs: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"global_batch": self.global_batch, "epochs": list(self.epochs),
                "steps": list(self.steps)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cursor:
        if "global_batch" not in data:
            raise DatasetError(f"data cursor {data}: written by an older raymoe; it cannot "
                               "resume this stream")
        return cls(int(data["global_batch"]), [int(e) for e in data["epochs"]],
                   [int(s) for s in data["steps"]])


@dataclass(frozen=True)
class Read:
    """One sequence to read: dataset, epoch, shard, row group, offset in the shuffled row group."""

    dataset: int
    epoch: int
    shard: int
    row_group: int
    offset: int


class StreamPlan:
    """The stream of global batches over one or more datasets (see the module docstring)."""

    def __init__(self, sources: list[Source], weights: list[float], global_batch: int, seed: int,
                 window: int = 64, shuffle: bool = True):
        if window < 1:
            raise DatasetError(f"shuffle window {window}: must be >= 1 shard")
        self.sources, self.global_batch, self.seed = sources, global_batch, seed
        self.window, self.shuffle = window, shuffle
        self.slot_dataset = blend_slots(weights, global_batch)
        self.lanes = np.bincount(self.slot_dataset, minlength=len(sources))
        for source, weight, lanes in zip(sources, weights, self.lanes, strict=True):
            if lanes == 0:
                raise DatasetError(f"{source.name}: weight {weight} gives it no slot of a global "
                                   f"batch of {global_batch}; raise its weight or the batch")
        self.slot_lane = np.zeros(global_batch, dtype=np.int64)
        for d in range(len(sources)):
            mine = self.slot_dataset == d
            self.slot_lane[mine] = np.arange(int(mine.sum()))
        self._layouts: dict[tuple[int, int], EpochLayout] = {}

    def start(self) -> Cursor:
        return Cursor(self.global_batch, [0] * len(self.sources), [0] * len(self.sources))

    def check(self, cursor: Cursor) -> Cursor:
        if cursor.global_batch != self.global_batch or len(cursor.epochs) != len(self.sources):
            raise DatasetError(f"data cursor of {len(cursor.epochs)} datasets at global batch "
                               f"{cursor.global_batch} cannot resume a stream of "
                               f"{len(self.sources)} datasets at global batch {self.global_batch}: "
                               "keep train.global_batch and the data sources of the run")
        return cursor

    def layout(self, dataset: int, epoch: int) -> EpochLayout:
        key = (dataset, epoch)
        if key not in self._layouts:
            self._layouts = {k: v for k, v in self._layouts.items() if k[0] != dataset}
            self._layouts[key] = EpochLayout(self.sources[dataset], dataset, int(self.lanes[dataset]),
                                             self.seed, epoch, self.window, self.shuffle)
        return self._layouts[key]

    def reads(self, cursor: Cursor, slots: range) -> list[Read]:
        """What ``slots`` of the global batch at ``cursor`` train on, in slot order."""
        out: list[Read | None] = [None] * len(slots)
        chosen = np.arange(slots.start, slots.stop)
        for d in np.unique(self.slot_dataset[chosen]):
            mine = np.flatnonzero(self.slot_dataset[chosen] == d)
            epoch = cursor.epochs[d]
            window, step = self.layout(int(d), epoch).window_at(cursor.steps[d])
            shards, groups, offsets = window.locate(self.slot_lane[chosen[mine]], step)
            for i, s, g, o in zip(mine, shards, groups, offsets, strict=True):
                out[i] = Read(int(d), epoch, int(s), int(g), int(o))
        return [r for r in out if r is not None]

    def advance(self, cursor: Cursor) -> Cursor:
        """The cursor one global batch later; a dataset at the end of its epoch starts the next."""
        epochs, steps = list(cursor.epochs), list(cursor.steps)
        for d in range(len(self.sources)):
            steps[d] += 1
            if steps[d] >= self.layout(d, epochs[d]).steps:
                epochs[d], steps[d] = epochs[d] + 1, 0
        return Cursor(self.global_batch, epochs, steps)

    def row_order(self, read: Read, size: int) -> np.ndarray:
        """The shuffled order of a row group's sequences (stored order without shuffling)."""
        if not self.shuffle:
            return np.arange(size)
        key = (self.seed, read.dataset, read.epoch, read.shard, read.row_group)
        return np.random.default_rng(key).permutation(size)
