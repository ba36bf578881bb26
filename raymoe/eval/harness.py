"""Zero-shot evaluation: tasks cut into chunks of examples, each chunk scored by a Scorer
(here, or on Ray workers: the same chunks, so the same numbers), records aggregated."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import cast

from raymoe.eval.metrics import (
    MetricResult,
    aggregate,
    choice_record,
    completion_record,
    exact_match,
    format_value,
)
from raymoe.eval.scoring import Scorer
from raymoe.eval.tasks import (
    ChoiceExample,
    CompletionExample,
    Example,
    GenerationExample,
    Task,
    get_task,
    load_examples,
    task_file,
)
from raymoe.model.precision import autocast
from raymoe.model.resident import ResidentBytes

CHUNK = 32
"""Examples per unit of work: what one Ray worker scores at a time, and the progress step."""


@dataclass
class EvalOptions:
    tasks: list[str]
    data_dir: str | None = None
    """A directory laid out as the published sets (see Task.default_file)."""
    files: dict[str, str] = field(default_factory=dict)
    """task name -> its file, overriding data_dir."""
    limit: int | None = None
    """Score only the first ``limit`` examples of each task."""
    batch_size: int = 16
    use_cache: bool = True
    """Share each multiple-choice context's KV cache between its choices."""
    max_new_tokens: int = 32


@dataclass
class Chunk:
    task: str
    examples: list[Example]


def plan(options: EvalOptions) -> tuple[list[Task], list[Chunk]]:
    """Read every task's examples (so a bad file fails before any scoring) and cut them
    into chunks."""
    tasks, chunks = [], []
    for name in options.tasks:
        task = get_task(name)
        examples = load_examples(task, task_file(task, options.data_dir, options.files), options.limit)
        tasks.append(task)
        chunks += [Chunk(name, examples[i:i + CHUNK]) for i in range(0, len(examples), CHUNK)]
    return tasks, chunks


def score_chunk(scorer: Scorer, chunk: Chunk, options: EvalOptions) -> list[dict[str, float]]:
    """One record of per-example scores for each example of the chunk (in bf16 on GPU,
    as the model trained; log-probabilities in fp32)."""
    with autocast(scorer.device):
        return _score_chunk(scorer, chunk, options)


def _score_chunk(scorer: Scorer, chunk: Chunk, options: EvalOptions) -> list[dict[str, float]]:
    task, examples = get_task(chunk.task), chunk.examples
    if task.kind == "completion":
        completions = cast(list[CompletionExample], examples)  # a task's kind fixes its examples' type
        scores = scorer.loglikelihoods(scorer.encode_pairs([(e.context, e.continuation) for e in completions]))
        return [completion_record(s) for s in scores]
    if task.kind == "choice":
        choices = cast(list[ChoiceExample], examples)
        items = []
        for e in choices:
            pairs = scorer.encode_pairs([(e.context, " " + c) for c in e.choices])
            items.append((pairs[0][0], [k for _, k in pairs]))
        choice_scores = scorer.choice_loglikelihoods(items, options.use_cache)
        return [choice_record(e, s) for e, s in zip(choices, choice_scores, strict=True)]
    generations = cast(list[GenerationExample], examples)
    outputs = scorer.generate_until([e.context for e in generations], task.stop,
                                    options.max_new_tokens, options.use_cache)
    return [{"exact_match": exact_match(o, e.answers)} for o, e in zip(outputs, generations, strict=True)]


class Progress:
    """A line on stderr at most every few seconds: examples done, rate, time left."""

    def __init__(self, total: int, every: float = 5.0, stream=sys.stderr):
        self.total, self.every, self.stream = total, every, stream
        self.done, self.start, self.last = 0, time.monotonic(), 0.0

    def update(self, chunk: Chunk) -> None:
        self.done += len(chunk.examples)
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else 0.0
            print(f"eval: {self.done}/{self.total} examples ({chunk.task}), {rate:.1f} examples/s, "
                  f"{left:.0f}s left", file=self.stream, flush=True)


@dataclass
class EvalResults:
    checkpoint: str
    step: int
    metrics: list[MetricResult]
    seconds: float
    resident: list[list[ResidentBytes]] | None = None
    """Per inference group and rank, the parameter bytes it held (expert-parallel runs)."""

    def value(self, task: str, metric: str) -> float:
        return next(m.value for m in self.metrics if m.task == task and m.metric == metric)

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"checkpoint": self.checkpoint, "step": self.step,
                                  "seconds": round(self.seconds, 2),
                                  "results": [m.to_dict() for m in self.metrics]}
        if self.resident is not None:
            out["parameter_bytes"] = [[asdict(r) for r in group] for group in self.resident]
        return out

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self) -> str:
        lines = [f"{'task':<12} {'metric':<12} {'value':>9} {'stderr':>8} {'n':>6}"]
        lines += [f"{m.task:<12} {m.metric:<12} {format_value(m.value):>9} "
                  f"{format_value(m.stderr):>8} {m.n:>6}" for m in self.metrics]
        return "\n".join(lines)


def collect(tasks: list[Task], chunks: list[Chunk], records: Iterable[list[dict[str, float]]],
            progress: Progress | None) -> list[MetricResult]:
    """Aggregate chunk records (arriving in chunk order) per task."""
    per_task: dict[str, list[dict[str, float]]] = {t.name: [] for t in tasks}
    for chunk, chunk_records in zip(chunks, records, strict=False):
        per_task[chunk.task] += chunk_records
        if progress is not None:
            progress.update(chunk)
    return [m for t in tasks for m in aggregate(t, per_task[t.name])]


ChunkScorer = Callable[[list[Chunk]], Iterable[list[dict[str, float]]]]
"""Maps chunks to their records, in order."""


def score_here(scorer: Scorer, options: EvalOptions) -> ChunkScorer:
    return lambda chunks: (score_chunk(scorer, c, options) for c in chunks)


def evaluate(options: EvalOptions, score: ChunkScorer, checkpoint: str = "", step: int = 0,
             show_progress: bool = True) -> EvalResults:
    """Score every task of ``options``."""
    start = time.monotonic()
    tasks, chunks = plan(options)
    progress = Progress(sum(len(c.examples) for c in chunks)) if show_progress else None
    metrics = collect(tasks, chunks, score(chunks), progress)
    return EvalResults(checkpoint, step, metrics, time.monotonic() - start)
