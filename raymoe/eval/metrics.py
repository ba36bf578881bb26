"""Per-example scores of each task kind, and their aggregation into metrics with standard
errors (as lm-evaluation-harness: the sample standard error of the mean)."""

from __future__ import annotations

import math
import re
import string
from dataclasses import asdict, dataclass

from raymoe.eval.scoring import Score
from raymoe.eval.tasks import ChoiceExample, Task

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = ARTICLES.sub(" ", text.lower().translate(PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, answers: list[str]) -> float:
    predicted = normalize_answer(prediction)
    return float(any(predicted == normalize_answer(a) for a in answers))


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: values[i])


def choice_record(example: ChoiceExample, scores: list[Score]) -> dict[str, float]:
    """acc: the most likely choice is gold; acc_norm: the same per character of choice."""
    logprobs = [s.logprob for s in scores]
    normalised = [lp / max(len(c), 1) for lp, c in zip(logprobs, example.choices, strict=False)]
    return {"acc": float(_argmax(logprobs) == example.gold),
            "acc_norm": float(_argmax(normalised) == example.gold)}


def completion_record(score: Score) -> dict[str, float]:
    return {"acc": float(score.greedy), "loglikelihood": score.logprob}


def format_value(value: float) -> str:
    """Four decimals, or four significant digits for huge values (an untrained model's
    perplexity); '-' for a missing one (NaN)."""
    if math.isnan(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"


@dataclass
class MetricResult:
    task: str
    metric: str
    value: float
    stderr: float
    n: int

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def aggregate(task: Task, records: list[dict[str, float]]) -> list[MetricResult]:
    """The task's metrics over its per-example records. Perplexity is exp(-mean
    log-likelihood), its standard error by the delta method."""
    results = []
    for metric in task.metrics:
        if metric == "perplexity":
            mean, stderr = _mean_stderr([r["loglikelihood"] for r in records])
            value = math.exp(-mean)
            results.append(MetricResult(task.name, metric, value, value * stderr, len(records)))
        else:
            mean, stderr = _mean_stderr([r[metric] for r in records])
            results.append(MetricResult(task.name, metric, mean, stderr, len(records)))
    return results
