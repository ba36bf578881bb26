"""The study's tables: a row per model (mean and spread over seeds), Table 2's form (each
MoE model against the dense model it matches) and Table 1's form (zero-shot scores)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from raymoe.study.outcomes import TrialOutcome
from raymoe.study.spec import Study


@dataclass
class ModelRow:
    model: str
    total_params: int
    active_params: int
    val_loss: float
    val_spread: float
    tokens_per_s: float
    samples_per_s: float
    train_flops: float
    trials: int
    failed: list[str]
    is_moe: bool
    eval: dict[str, float] = field(default_factory=dict)
    """task -> the mean over seeds of its Table 1 metric."""


def model_rows(trials: list[TrialOutcome], study: Study) -> list[ModelRow]:
    rows = []
    for spec in study.models:
        mine = [t for t in trials if t.model == spec.name]
        good = [t for t in mine if not t.error and not math.isnan(t.val_loss)]
        losses = [t.val_loss for t in good]
        first = good[0] if good else mine[0]
        rows.append(ModelRow(
            model=spec.name, total_params=first.total_params, active_params=first.active_params,
            val_loss=statistics.mean(losses) if losses else math.nan,
            val_spread=(max(losses) - min(losses)) if len(losses) > 1 else 0.0,
            tokens_per_s=statistics.mean(t.tokens_per_s for t in good) if good else math.nan,
            samples_per_s=statistics.mean(t.samples_per_s for t in good) if good else math.nan,
            train_flops=statistics.mean(t.train_flops for t in good) if good else math.nan,
            trials=len(good),
            failed=[f"{t.name}: {t.error.strip().splitlines()[-1]}" for t in mine if t.error],
            is_moe=first.total_params != first.active_params,
            eval={task: statistics.mean(t.eval[task] for t in good if task in t.eval)
                  for task in {k for t in good for k in t.eval}}))
    return rows


def comparisons(rows: list[ModelRow]) -> list[str]:
    """Table 2's form: each MoE model against the dense models, by validation loss."""
    dense = sorted((r for r in rows if not r.is_moe and r.trials), key=lambda r: r.active_params)
    lines = []
    for moe in (r for r in rows if r.is_moe and r.trials):
        matched = [d for d in dense if d.val_loss >= moe.val_loss]
        if matched:
            best = max(matched, key=lambda d: d.active_params)
            lines.append(f"{moe.model} (val {moe.val_loss:.4f}) matches or beats {best.model} "
                         f"(val {best.val_loss:.4f}, {best.active_params / moe.active_params:.1f}x its "
                         f"active parameters): equal quality at "
                         f"{moe.samples_per_s / best.samples_per_s:.2f}x the throughput "
                         f"({moe.samples_per_s:.1f} vs {best.samples_per_s:.1f} samples/s).")
        else:
            lines.append(f"{moe.model} (val {moe.val_loss:.4f}) beats no dense model of the study.")
        worth = dense_equivalent(dense, moe.val_loss)
        if worth is not None:
            lines.append(f"{moe.model} is worth a dense model of about {worth / 1e6:.2f}M active "
                         f"parameters ({worth / moe.active_params:.1f}x its own), interpolating "
                         "validation loss against log parameters of the dense runs.")
    return lines


def dense_equivalent(dense: list[ModelRow], loss: float) -> float | None:
    """Parameters at which the dense runs' loss (linear in log params) equals ``loss``."""
    points = [(math.log(d.active_params), d.val_loss) for d in dense]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if min(y0, y1) <= loss <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (loss - y0) * (x1 - x0) / (y1 - y0))
    return None


def _markdown_row(values: Sequence[str]) -> str:
    return "| " + " | ".join(values) + " |"


def main_table(rows: list[ModelRow]) -> str:
    head = ("| model | total params | active params | val loss (mean +- spread over seeds) "
            "| samples/s | tokens/s | training FLOPs | trials |\n|---|---|---|---|---|---|---|---|")
    lines = []
    for m in rows:
        status = f"{m.trials}" + (f", failed: {'; '.join(m.failed)}" if m.failed else "")
        lines.append(f"| {m.model} | {m.total_params:,} | {m.active_params:,} | "
                     f"{m.val_loss:.4f} +- {m.val_spread:.4f} | {m.samples_per_s:.1f} | "
                     f"{m.tokens_per_s:,.0f} | {m.train_flops:.3g} | {status} |")
    return "\n".join([head, *lines])


def table1(rows: list[ModelRow], tasks: list[str]) -> str:
    """Table 1's form: a column per model; parameters, validation loss and the zero-shot
    tasks as rows (accuracy or exact match, mean over seeds)."""
    from raymoe.eval.metrics import format_value
    from raymoe.eval.tasks import get_task

    lines = [_markdown_row(["", *(m.model for m in rows)]),
             _markdown_row(["---"] * (len(rows) + 1)),
             _markdown_row(["total params", *(f"{m.total_params / 1e6:.2f}M" for m in rows)]),
             _markdown_row(["active params", *(f"{m.active_params / 1e6:.2f}M" for m in rows)]),
             _markdown_row(["validation loss", *(format_value(m.val_loss) for m in rows)])]
    for name in tasks:
        task = get_task(name)
        lines.append(_markdown_row([f"{task.title} ({task.primary})",
                                    *(format_value(m.eval.get(name, math.nan)) for m in rows)]))
    return "\n".join(lines)
