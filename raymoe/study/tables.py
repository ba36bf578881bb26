"""The study's tables: a row per model (mean and spread over seeds), Table 2's form (each
MoE model against the dense model of equal quality, and its worth read off a fit over the
dense models), Table 1's form (zero-shot scores), the learning-rate search and the routers'
health."""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from raymoe.study.outcomes import WARMUP_SHARE, LayerHealth, TrialOutcome
from raymoe.study.spec import Study

RISE_LIMIT = 0.05
"""The stability criterion: val_loss never rises more than this from one evaluation to the next."""


@dataclass
class ModelRow:
    model: str
    total_params: int
    active_params: int
    non_embedding_params: int
    active_non_embedding_params: int
    lr: float
    val_loss: float
    val_spread: float
    val_losses: list[float]
    """Each finished seed's final validation loss."""
    tokens_per_s: float
    samples_per_s: float
    train_flops: float
    trials: int
    failed: list[str]
    is_moe: bool
    eval: dict[str, float] = field(default_factory=dict)
    """task -> the mean over seeds of its Table 1 metric."""


def one_line(error: str) -> str:
    """An error's last line (a traceback's own message)."""
    return error.strip().splitlines()[-1]


def model_rows(trials: list[TrialOutcome], study: Study) -> list[ModelRow]:
    rows = []
    for spec in study.models:
        mine = [t for t in trials if t.model == spec.name]
        good = [t for t in mine if not t.error and not math.isnan(t.val_loss)]
        losses = [t.val_loss for t in good]
        first = good[0] if good else mine[0]
        rows.append(ModelRow(
            model=spec.name, total_params=first.total_params, active_params=first.active_params,
            non_embedding_params=first.non_embedding_params,
            active_non_embedding_params=first.active_non_embedding_params, lr=first.lr,
            val_loss=statistics.mean(losses) if losses else math.nan,
            val_spread=(max(losses) - min(losses)) if len(losses) > 1 else 0.0, val_losses=losses,
            tokens_per_s=statistics.mean(t.tokens_per_s for t in good) if good else math.nan,
            samples_per_s=statistics.mean(t.samples_per_s for t in good) if good else math.nan,
            train_flops=statistics.mean(t.train_flops for t in good) if good else math.nan,
            trials=len(good),
            failed=[f"{t.name}: {one_line(t.error)}" for t in mine if t.error],
            is_moe=first.total_params != first.active_params,
            eval={task: statistics.mean(t.eval[task] for t in good if task in t.eval)
                  for task in {k for t in good for k in t.eval}}))
    return rows


@dataclass(frozen=True)
class LossFit:
    """Validation loss = intercept + slope * ln(non-embedding parameters), least squares
    over the mean losses of the study's dense models."""

    intercept: float
    slope: float
    models: int
    low: int
    """The smallest dense model's non-embedding parameters."""
    high: int
    """The largest's."""

    def params_at(self, loss: float) -> float:
        """The non-embedding parameters of a dense model of validation loss ``loss``."""
        return math.exp((loss - self.intercept) / self.slope)

    def extrapolated(self, params: float) -> bool:
        return not self.low <= params <= self.high


def fit_dense(rows: list[ModelRow]) -> LossFit | None:
    """The fit over every dense model that trained; None with fewer than two sizes or when
    the loss does not fall with size (no size then has a given loss)."""
    dense = [r for r in rows if not r.is_moe and r.trials]
    sizes = [r.non_embedding_params for r in dense]
    if len(set(sizes)) < 2:
        return None
    slope, intercept = statistics.linear_regression([math.log(n) for n in sizes], [r.val_loss for r in dense])
    if slope >= 0:
        return None
    return LossFit(intercept, slope, len(dense), min(sizes), max(sizes))


@dataclass(frozen=True)
class Worth:
    """A MoE model's dense-equivalent non-embedding parameters over its own active ones."""

    equivalent: float
    """The dense-equivalent non-embedding parameters of its mean loss."""
    of_mean: float
    """The worth of its mean loss."""
    seeds: list[float]
    """The worth of each seed's loss."""


def worth(fit: LossFit, moe: ModelRow) -> Worth:
    equivalent = fit.params_at(moe.val_loss)
    return Worth(equivalent, equivalent / moe.active_non_embedding_params,
                 [fit.params_at(loss) / moe.active_non_embedding_params for loss in moe.val_losses])


def _millions(params: float) -> str:
    return f"{params / 1e6:.2f}M"


def worth_line(moe: ModelRow, fit: LossFit | None) -> str:
    """The MoE model's worth with its spread over seeds, and where it was read."""
    head = f"{moe.model} (val {moe.val_loss:.4f})"
    if fit is None:
        return (f"{head}: no dense-equivalent size, the study's dense models give no fit (it needs "
                "two or more sizes whose validation loss falls with size).")
    w = worth(fit, moe)
    where = (f"extrapolated beyond their {_millions(fit.low)}-{_millions(fit.high)}"
             if fit.extrapolated(w.equivalent) else "within their range")
    return (f"{head} is worth a dense model of {_millions(w.equivalent)} non-embedding parameters, "
            f"{w.of_mean:.2f}x its {_millions(moe.active_non_embedding_params)} active ones (per seed: "
            f"mean {statistics.mean(w.seeds):.2f}x, range {min(w.seeds):.2f}x-{max(w.seeds):.2f}x over "
            f"{len(w.seeds)} seeds), read off a least-squares fit of validation loss against log "
            f"non-embedding parameters over {fit.models} dense models ({where}).")


def equal_quality(rows: list[ModelRow], moe: ModelRow) -> ModelRow | None:
    """The smallest dense model whose validation loss is at or below the MoE model's; none
    where the MoE model is worse than every dense model (it matches none of them)."""
    dense = [r for r in rows if not r.is_moe and r.trials]
    if all(r.val_loss < moe.val_loss for r in dense):
        return None
    matched = [r for r in dense if r.val_loss <= moe.val_loss]
    return min(matched, key=lambda r: r.non_embedding_params, default=None)


def _markdown_row(values: Sequence[str]) -> str:
    return "| " + " | ".join(values) + " |"


def _markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join([_markdown_row(head), _markdown_row(["---"] * len(head)), *map(_markdown_row, rows)])


def _matches_none(rows: list[ModelRow], moe: ModelRow) -> str:
    """Why no dense model is of the MoE model's quality."""
    dense = [r.val_loss for r in rows if not r.is_moe and r.trials]
    if not dense:
        return "none in the study"
    than = "better" if min(dense) > moe.val_loss else "worse"
    return f"none ({than} than every dense model)"


def table2(rows: list[ModelRow], fit: LossFit | None) -> str:
    """Table 2's form: each MoE model, the dense model of equal quality (else the fit's
    equivalent size) and both models' training throughput."""
    lines = []
    for moe in (r for r in rows if r.is_moe and r.trials):
        dense = equal_quality(rows, moe)
        mine = [moe.model, f"{moe.val_loss:.4f}"]
        if dense is not None:
            lines.append([*mine, dense.model, f"{dense.val_loss:.4f}", f"{moe.samples_per_s:.1f}",
                          f"{dense.samples_per_s:.1f}", f"{moe.tokens_per_s:,.0f}", f"{dense.tokens_per_s:,.0f}",
                          f"{moe.samples_per_s / dense.samples_per_s:.2f}x"])
            continue
        equivalent = _matches_none(rows, moe)
        if fit is not None:
            equivalent += f"; the fit's: {_millions(fit.params_at(moe.val_loss))} non-embedding params"
        lines.append([*mine, equivalent, "-", f"{moe.samples_per_s:.1f}", "-", f"{moe.tokens_per_s:,.0f}", "-", "-"])
    return _markdown_table(["MoE model", "its val loss", "dense model of equal quality", "its val loss",
                            "MoE samples/s", "dense samples/s", "MoE tokens/s", "dense tokens/s",
                            "throughput ratio"], lines)


def comparisons(rows: list[ModelRow], trials: Sequence[TrialOutcome] = ()) -> list[str]:
    """Table 2's form, each MoE model's worth, then its worth along training."""
    fit = fit_dense(rows)
    along = worth_along(rows, trials)
    return [table2(rows, fit), *(worth_line(moe, fit) for moe in rows if moe.is_moe and moe.trials),
            *([along] if along else [])]


WORTH_POINTS = 8
"""Evaluations shown in the worth-along-training table (spread evenly in log tokens)."""


def worth_along(rows: list[ModelRow], trials: Sequence[TrialOutcome], points: int = WORTH_POINTS) -> str:
    """Each MoE model's worth at evaluations along training, where the study's trials all
    evaluated: the fit over the dense models' mean losses at those tokens, read at the MoE
    model's mean loss there (where it is heading). Empty without a MoE model or two points."""
    finished = [t for t in trials if not t.error and t.curve]
    moe = [r for r in rows if r.is_moe and r.trials]
    common = sorted(set.intersection(*(set(tokens for tokens, _ in t.curve) for t in finished))) if finished else []
    if not moe or len(common) < 2:
        return ""
    low, high = math.log(common[0]), math.log(common[-1])
    targets = [math.exp(low + (high - low) * i / (points - 1)) for i in range(points)]
    chosen = sorted({min(common, key=lambda tokens: abs(math.log(tokens / target))) for target in targets})

    curves = [(t.model, dict(t.curve)) for t in finished]

    def at(tokens: int) -> list[ModelRow]:
        out = []
        for row in rows:
            losses = [curve[tokens] for model, curve in curves if model == row.model]
            if losses:
                out.append(dataclasses.replace(row, val_loss=statistics.mean(losses), val_losses=losses))
        return out

    lines = []
    for tokens in chosen:
        here = at(tokens)
        fit = fit_dense(here)
        cells = []
        for model in moe:
            mine = next((r for r in here if r.model == model.model), None)
            cells.append("-" if fit is None or mine is None else f"{worth(fit, mine).of_mean:.2f}x")
        lines.append([f"{tokens:,}", *cells])
    return ("Worth along training (at each of these evaluations, the fit over the dense models' mean "
            "losses there, read at the MoE model's mean loss there):\n\n"
            + _markdown_table(["tokens", *(m.model for m in moe)], lines))


def format_lr(lr: float) -> str:
    return f"{lr:.2e}"


def main_table(rows: list[ModelRow]) -> str:
    lines = []
    for m in rows:
        status = f"{m.trials}" + (f", failed: {'; '.join(m.failed)}" if m.failed else "")
        lines.append([m.model, f"{m.total_params:,}", f"{m.active_params:,}", f"{m.non_embedding_params:,}",
                      f"{m.active_non_embedding_params:,}", format_lr(m.lr),
                      f"{m.val_loss:.4f} +- {m.val_spread:.4f}", f"{m.samples_per_s:.1f}",
                      f"{m.tokens_per_s:,.0f}", f"{m.train_flops:.3g}", status])
    return _markdown_table(["model", "total params", "active params", "non-embedding params",
                            "active non-embedding params", "lr", "val loss (mean +- spread over seeds)",
                            "samples/s", "tokens/s", "training FLOPs", "trials"], lines)


def table1(rows: list[ModelRow], tasks: list[str]) -> str:
    """Table 1's form: a column per model; parameters, validation loss and the zero-shot
    tasks as rows (accuracy or exact match, mean over seeds)."""
    from raymoe.eval.metrics import format_value
    from raymoe.eval.tasks import get_task

    lines = [["total params", *(f"{m.total_params / 1e6:.2f}M" for m in rows)],
             ["active params", *(f"{m.active_params / 1e6:.2f}M" for m in rows)],
             ["validation loss", *(format_value(m.val_loss) for m in rows)]]
    for name in tasks:
        task = get_task(name)
        lines.append([f"{task.title} ({task.primary})", *(format_value(m.eval.get(name, math.nan)) for m in rows)])
    return _markdown_table(["", *(m.model for m in rows)], lines)


def _lr_cell(trial: dict[str, Any] | None, chosen: bool) -> str:
    if trial is None:
        return "-"
    if trial["error"]:
        text = f"failed: {one_line(trial['error'])}".replace("|", "\\|")
    elif trial["val_loss"] is None:
        text = "no val loss"
    else:
        text = f"{trial['val_loss']:.4f}"
        if trial["stopped_early"]:
            text += f" (stopped at {trial['tokens'] / 1e6:.2f}M tokens)"
    return f"**{text}**" if chosen else text


def lr_search_table(search: dict[str, Any]) -> str:
    """The learning-rate search: a row per model, a column per rate, the validation loss of
    each (the chosen rate in bold), and the search's budget."""
    by_run = {(t["model"], t["lr"]): t for t in search["trials"]}
    chosen = search["chosen"]
    models = dict.fromkeys([*(t["model"] for t in search["trials"]), *chosen])
    table = _markdown_table(
        ["model", *(f"lr {format_lr(lr)}" for lr in search["lrs"])],
        [[model, *(_lr_cell(by_run.get((model, lr)), chosen.get(model) == lr) for lr in search["lrs"])]
         for model in models])
    return (f"{table}\n\nEach model trained {search['tokens']:,} tokens (seed {search['seed']}) at each "
            "learning rate; in bold the rate chosen for the study's trials.")


def _over_seeds(values: list[float], form: Callable[[float], str]) -> str:
    """The mean over seeds, and the worst (highest) seed's value when there are several."""
    mean = form(statistics.mean(values))
    return mean if len(values) == 1 else f"{mean} (worst {form(max(values))})"


def router_table(trials: list[TrialOutcome], rows: list[ModelRow]) -> str:
    """Each MoE model's layers: dropped share (mean and max) and load CV (mean) after the
    first WARMUP_SHARE of the tokens, mean over seeds and the worst seed."""
    lines = []
    for row in (r for r in rows if r.is_moe):
        layers: dict[int, list[LayerHealth]] = {}
        for t in trials:
            if t.model == row.model:
                for health in t.router:
                    layers.setdefault(health.layer, []).append(health)
        if not layers:
            lines.append([row.model, "-", "no router statistics", "-", "-"])
        for layer, seeds in sorted(layers.items()):
            lines.append([row.model, str(layer),
                          _over_seeds([h.dropped_mean for h in seeds], "{:.2%}".format),
                          _over_seeds([h.dropped_max for h in seeds], "{:.2%}".format),
                          _over_seeds([h.load_cv_mean for h in seeds], "{:.3f}".format)])
    after = f"after {WARMUP_SHARE:.0%}"
    table = _markdown_table(["model", "MoE layer", f"dropped share, mean {after}", f"dropped share, max {after}",
                             f"load CV, mean {after}"], lines)
    return (f"{table}\n\nMean over seeds (the worst seed in brackets), over the steps logged after the first "
            f"{WARMUP_SHARE:.0%} of the training tokens.")


def stability_table(trials: list[TrialOutcome]) -> str:
    """Each trial's largest rise of val_loss from one evaluation to the next, against RISE_LIMIT."""
    lines = [[t.name, "-", "-"] if math.isnan(t.max_val_rise) else
             [t.name, f"{t.max_val_rise:.4f}", "yes" if t.max_val_rise <= RISE_LIMIT else "no"]
             for t in trials]
    return _markdown_table(["trial", "largest rise of val loss between evaluations",
                            f"no rise above {RISE_LIMIT}"], lines)
