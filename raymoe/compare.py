"""`raymoe compare STUDY.yaml`: the dense-versus-MoE study as a Ray Tune experiment.

Each trial is a raymoe training run (a TorchTrainer driven from a Tune function trial, the
pattern Ray 2.60 supports) at the study's token budget and data. Trials write their runs
under the study's storage with the run name STUDY/TRIAL, so re-running an interrupted
study resumes every unfinished trial from its checkpoints and finished ones end at once.
The report (Figure 1 and Table 2 of the reference, in small) is written beside the study;
with an ``eval`` section, every trial's final checkpoint is evaluated zero-shot and the
report gains Table 1's form (the models as columns, the tasks as rows).
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymoe.config import ConfigError, load_config
from raymoe.data.storage import is_s3
from raymoe.errors import root_cause
from raymoe.eval.harness import EvalOptions

STUDY_KEYS = {"name", "storage", "data", "tokens", "models", "seeds", "max_concurrent_trials",
              "overrides", "asha", "eval"}
EVAL_KEYS = {"tasks", "data_dir", "files", "limit", "batch_size", "workers"}


@dataclass
class StudyEval:
    """Zero-shot evaluation of each trial's final checkpoint."""

    options: EvalOptions
    workers: int = 0
    """Ray workers to spread each evaluation over (0: in the driver)."""


@dataclass
class ModelSpec:
    name: str
    config: str
    """A preset or YAML file."""
    overrides: list[str] = field(default_factory=list)


@dataclass
class Study:
    name: str
    storage: str
    data: str
    tokens: int
    models: list[ModelSpec]
    seeds: list[int] = field(default_factory=lambda: [1234])
    max_concurrent_trials: int = 1
    overrides: list[str] = field(default_factory=list)
    """Applied to every model (log and checkpoint cadence, batch sizes)."""
    asha: dict[str, Any] | None = None
    """Early stopping on val_loss, for LR sweeps: {max_t, grace_period, reduction_factor}."""
    eval: StudyEval | None = None

    @property
    def directory(self) -> Path:
        return Path(self.storage) / self.name

    def trials(self) -> list[dict[str, Any]]:
        return [{"name": f"{m.name}-seed{seed}", "model": m.name, "seed": seed,
                 "config": m.config,
                 "overrides": [*self.overrides, *m.overrides, f"data.path={self.data}",
                               f"train.storage={self.storage}",
                               f"train.run_name={self.name}/{m.name}-seed{seed}",
                               f"train.total_tokens={self.tokens}", f"train.seed={seed}",
                               f"optim.decay_tokens={self.tokens}",
                               "train.max_steps=0"]}
                for m in self.models for seed in self.seeds]


def load_study(path: str) -> Study:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the study: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of study settings")
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown study keys {sorted(unknown)} (known: {sorted(STUDY_KEYS)})")
    for key in ("name", "data", "tokens", "models"):
        if key not in raw:
            raise ConfigError(f"{path}: the study needs '{key}'")
    models = []
    for i, m in enumerate(raw["models"]):
        if not isinstance(m, dict) or "name" not in m or "config" not in m:
            raise ConfigError(f"{path}: models[{i}] needs 'name' and 'config'")
        models.append(ModelSpec(m["name"], m["config"], list(m.get("overrides", []))))
    return Study(name=raw["name"], storage=_absolute(raw.get("storage", "runs")),
                 data=_absolute(raw["data"]),
                 tokens=int(float(raw["tokens"])), models=models,
                 seeds=list(raw.get("seeds", [1234])),
                 max_concurrent_trials=int(raw.get("max_concurrent_trials", 1)),
                 overrides=list(raw.get("overrides", [])), asha=raw.get("asha"),
                 eval=_study_eval(path, raw["eval"]) if raw.get("eval") else None)


def _study_eval(path: str, raw: Any) -> StudyEval:
    if not isinstance(raw, dict) or not raw.get("tasks"):
        raise ConfigError(f"{path}: eval needs 'tasks' (a list of task names)")
    unknown = set(raw) - EVAL_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown eval keys {sorted(unknown)} (known: {sorted(EVAL_KEYS)})")
    tasks = raw["tasks"].split(",") if isinstance(raw["tasks"], str) else list(raw["tasks"])
    options = EvalOptions(tasks, _absolute(raw["data_dir"]) if raw.get("data_dir") else None,
                          {k: _absolute(v) for k, v in (raw.get("files") or {}).items()},
                          raw.get("limit"), int(raw.get("batch_size", 16)))
    return StudyEval(options, int(raw.get("workers", 0)))


def _absolute(uri: str) -> str:
    """Local paths as absolute ones: Tune runs each trial in a directory of its own."""
    return uri if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


def _trial(trial: dict[str, Any]) -> None:
    """One Tune trial: a raymoe training run whose reports flow into Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymoe.train.launcher import train_on_ray

    cfg = load_config(trial["trial"]["config"], trial["trial"]["overrides"])
    result = train_on_ray(cfg, callbacks=[TuneReportCallback()])
    if result.error is not None:
        raise result.error


def run_study(study: Study) -> Report:
    """Run every trial (or resume them) on the connected Ray cluster, then report."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if study.asha:
        scheduler = ASHAScheduler(metric="val_loss", mode="min", time_attr="step", **study.asha)
    tuner = tune.Tuner(
        # The trial only drives a TorchTrainer: it must not hold the CPUs its workers need.
        tune.with_resources(_trial, {"CPU": 0, "memory": 1_000_000}),
        param_space={"trial": tune.grid_search(study.trials())},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent_trials,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=f"{study.name}-tune",
                                  storage_path=str(Path(study.storage).absolute() / ".tune")),
    )
    grid = tuner.fit()
    errors = {}
    for result in grid:
        if result.error is not None:
            cause = root_cause(result.error)
            errors[result.config["trial"]["name"]] = f"{type(cause).__name__}: {cause}"
    eval_errors = evaluate_trials(study, skip=set(errors)) if study.eval is not None else {}
    report = build_report(study, errors, eval_errors)
    report.write(study.directory)
    return report


def _eval_file(study: Study, trial: str) -> Path:
    return study.directory / "eval" / f"{trial}.json"


def evaluate_trials(study: Study, skip: set[str]) -> dict[str, str]:
    """Evaluate each finished trial's final checkpoint (again only when it changed);
    returns the trials whose evaluation failed, with why."""
    from raymoe.eval.loading import find_checkpoint
    from raymoe.eval.runner import evaluate_checkpoint
    from raymoe.train.launcher import run_location

    failed = {}
    for trial in study.trials():
        if trial["name"] in skip:
            continue
        out = _eval_file(study, trial["name"])
        try:
            run = run_location(load_config(trial["config"], trial["overrides"])).uri
            if out.is_file() and json.loads(out.read_text())["checkpoint"] == find_checkpoint(run):
                continue
            print(f"evaluating {trial['name']} ({', '.join(study.eval.options.tasks)})", flush=True)
            evaluate_checkpoint(run, study.eval.options, workers=study.eval.workers,
                                show_progress=False).save(out)
        except (ValueError, OSError, RuntimeError) as err:
            failed[trial["name"]] = f"{type(err).__name__}: {err}"
    return failed


# ---------------------------------------------------------------------------- report


@dataclass
class TrialOutcome:
    name: str
    model: str
    seed: int
    total_params: int = 0
    active_params: int = 0
    val_loss: float = math.nan
    tokens: int = 0
    tokens_per_s: float = math.nan
    samples_per_s: float = math.nan
    train_flops: float = math.nan
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str = ""
    eval: dict[str, float] = field(default_factory=dict)
    """task -> its Table 1 metric, when the study evaluates."""


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


def _markdown_row(values) -> str:
    return "| " + " | ".join(values) + " |"


@dataclass
class Report:
    study: str
    trials: list[TrialOutcome]
    models: list[ModelRow]
    comparisons: list[str]
    eval_tasks: list[str] = field(default_factory=list)
    eval_failures: list[str] = field(default_factory=list)

    def table1(self) -> str:
        """Table 1's form: a column per model; parameters, validation loss and the
        zero-shot tasks as rows (accuracy or exact match, mean over seeds)."""
        from raymoe.eval.metrics import format_value
        from raymoe.eval.tasks import get_task

        models = self.models
        lines = [_markdown_row(["", *(m.model for m in models)]),
                 _markdown_row(["---"] * (len(models) + 1)),
                 _markdown_row(["total params", *(f"{m.total_params / 1e6:.2f}M" for m in models)]),
                 _markdown_row(["active params", *(f"{m.active_params / 1e6:.2f}M" for m in models)]),
                 _markdown_row(["validation loss", *(format_value(m.val_loss) for m in models)])]
        for name in self.eval_tasks:
            task = get_task(name)
            lines.append(_markdown_row([f"{task.title} ({task.primary})",
                                        *(format_value(m.eval.get(name, math.nan)) for m in models)]))
        return "\n".join(lines)

    def table(self) -> str:
        head = ("| model | total params | active params | val loss (mean +- spread over seeds) "
                "| samples/s | tokens/s | training FLOPs | trials |\n|---|---|---|---|---|---|---|---|")
        rows = []
        for m in self.models:
            status = f"{m.trials}" + (f", failed: {'; '.join(m.failed)}" if m.failed else "")
            rows.append(f"| {m.model} | {m.total_params:,} | {m.active_params:,} | "
                        f"{m.val_loss:.4f} +- {m.val_spread:.4f} | {m.samples_per_s:.1f} | "
                        f"{m.tokens_per_s:,.0f} | {m.train_flops:.3g} | {status} |")
        return "\n".join([head, *rows])

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "validation_curves.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["trial", "model", "seed", "tokens", "val_loss"])
            for t in self.trials:
                writer.writerows([t.name, t.model, t.seed, tokens, loss] for tokens, loss in t.curve)
        with open(directory / "trials.json", "w") as f:
            json.dump([asdict(t) for t in self.trials], f, indent=1)
        parts = [f"# Study {self.study}", self.table(), *self.comparisons]
        if self.eval_tasks:
            parts += ["## Zero-shot evaluation (Table 1 form)", self.table1(), *self.eval_failures]
        text = "\n\n".join(parts)
        (directory / "report.md").write_text(text + "\n")
        self._plot(directory / "validation_loss.png")

    def _plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5))
        for t in self.trials:
            if t.curve:
                xs, ys = zip(*t.curve, strict=False)
                ax.plot(xs, ys, label=t.name, linestyle="-" if "moe" in t.model else "--")
        ax.set_xlabel("training tokens")
        ax.set_ylabel("validation loss")
        ax.set_title(f"{self.study}: validation loss against tokens")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def _outcome(trial: dict[str, Any], error: str, eval_file: Path) -> TrialOutcome:
    import torch

    from raymoe.model import GPT
    from raymoe.train.launcher import run_location

    outcome = TrialOutcome(trial["name"], trial["model"], trial["seed"], error=error)
    try:
        cfg = load_config(trial["config"], trial["overrides"])
    except ConfigError as err:
        outcome.error = outcome.error or f"ConfigError: {err}"
        return outcome
    with torch.device("meta"):
        model = GPT(cfg.model)
    outcome.total_params = model.num_parameters()
    outcome.active_params = model.num_parameters(active_only=True)
    metrics_file = Path(run_location(cfg).metrics_dir) / "metrics.jsonl"
    if not metrics_file.is_file():
        outcome.error = outcome.error or "no metrics were written"
        return outcome
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    curve = {r["tokens"]: r["val_loss"] for r in records if "val_loss" in r}
    outcome.curve = sorted(curve.items())
    if outcome.curve:
        outcome.tokens, outcome.val_loss = outcome.curve[-1]
    rates = [r for r in records if "tokens_per_s" in r]
    if rates:
        outcome.tokens_per_s = statistics.median(r["tokens_per_s"] for r in rates)
        outcome.samples_per_s = statistics.median(r["samples_per_s"] for r in rates)
    if eval_file.is_file():
        from raymoe.eval.tasks import get_task

        results = json.loads(eval_file.read_text())["results"]
        outcome.eval = {r["task"]: r["value"] for r in results
                        if r["metric"] == get_task(r["task"]).primary}
    m = cfg.model
    outcome.train_flops = (6 * outcome.active_params + 12 * m.n_layer * m.d_model * m.seq_len) * outcome.tokens
    return outcome


def _model_rows(trials: list[TrialOutcome], study: Study) -> list[ModelRow]:
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
            trials=len(good), failed=[f"{t.name}: {t.error}" for t in mine if t.error],
            is_moe=first.total_params != first.active_params,
            eval={task: statistics.mean(t.eval[task] for t in good if task in t.eval)
                  for task in {k for t in good for k in t.eval}}))
    return rows


def _comparisons(rows: list[ModelRow]) -> list[str]:
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
        worth = _dense_equivalent(dense, moe.val_loss)
        if worth is not None:
            lines.append(f"{moe.model} is worth a dense model of about {worth / 1e6:.2f}M active "
                         f"parameters ({worth / moe.active_params:.1f}x its own), interpolating "
                         "validation loss against log parameters of the dense runs.")
    return lines


def _dense_equivalent(dense: list[ModelRow], loss: float) -> float | None:
    """Parameters at which the dense runs' loss (linear in log params) equals ``loss``."""
    points = [(math.log(d.active_params), d.val_loss) for d in dense]
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if min(y0, y1) <= loss <= max(y0, y1) and y0 != y1:
            return math.exp(x0 + (loss - y0) * (x1 - x0) / (y1 - y0))
    return None


def build_report(study: Study, errors: dict[str, str],
                 eval_errors: dict[str, str] | None = None) -> Report:
    trials = [_outcome(t, errors.get(t["name"], ""), _eval_file(study, t["name"]))
              for t in study.trials()]
    rows = _model_rows(trials, study)
    return Report(study.name, trials, rows, _comparisons(rows),
                  study.eval.options.tasks if study.eval else [],
                  [f"evaluation of {name} failed: {why}" for name, why in (eval_errors or {}).items()])
