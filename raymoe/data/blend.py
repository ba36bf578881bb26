"""The datasets a run trains on (data.path, or the weighted datasets of data.blend), opened
once and checked to fit together."""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config import DataConfig
from raymoe.data.shards import DatasetError, PreparedDataset

MUST_MATCH = ("tokenizer", "vocab_size", "seq_len", "dtype")


@dataclass(frozen=True)
class Blend:
    datasets: list[PreparedDataset]
    weights: list[float]

    @property
    def first(self) -> PreparedDataset:
        """Any one of them: they share tokenizer, vocabulary and sequence length."""
        return self.datasets[0]


def open_blend(data: DataConfig) -> Blend:
    entries = data.sources()
    if not all(e.path for e in entries):
        raise DatasetError("data.path is empty: prepare a dataset with `raymoe prepare` and set "
                           "data.path (or data.blend) to it")
    datasets = [PreparedDataset.open(e.path) for e in entries]
    first = datasets[0]
    for other in datasets[1:]:
        for key in MUST_MATCH:
            if other.manifest[key] != first.manifest[key]:
                raise DatasetError(f"data.blend: {other.uri} has {key} {other.manifest[key]!r}, "
                                   f"{first.uri} has {first.manifest[key]!r}; a blend needs "
                                   f"datasets prepared with the same {', '.join(MUST_MATCH)}")
    return Blend(datasets, [e.weight for e in entries])
