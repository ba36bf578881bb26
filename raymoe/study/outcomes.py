"""A trial's outcome read back from the run's storage: parameter counts, its validation
curve and throughput from its metrics, its zero-shot scores from the study's eval file."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from raymoe.config import ConfigError, load_config
from raymoe.data.storage import locate
from raymoe.runs import read_metrics, run_location


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


def read_outcome(trial: dict[str, Any], error: str, eval_uri: str) -> TrialOutcome:
    import torch

    from raymoe.model import GPT

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
    metrics_uri = run_location(cfg).metrics_uri
    records = read_metrics(metrics_uri)
    if not records:
        outcome.error = outcome.error or f"no metrics were written ({metrics_uri})"
        return outcome
    curve = {r["tokens"]: r["val_loss"] for r in records if "val_loss" in r}
    outcome.curve = sorted(curve.items())
    if outcome.curve:
        outcome.tokens, outcome.val_loss = outcome.curve[-1]
    rates = [r for r in records if "tokens_per_s" in r]
    if rates:
        outcome.tokens_per_s = statistics.median(r["tokens_per_s"] for r in rates)
        outcome.samples_per_s = statistics.median(r["samples_per_s"] for r in rates)
    outcome.eval = read_eval_scores(eval_uri)
    m = cfg.model
    per_token = 6 * outcome.active_params + 12 * m.n_layer * m.d_model * m.seq_len
    outcome.train_flops = per_token * outcome.tokens
    return outcome


def read_eval_scores(eval_uri: str) -> dict[str, float]:
    """task -> its primary metric, from a trial's eval results (empty when not evaluated)."""
    from raymoe.eval.tasks import get_task

    results = locate(eval_uri)
    if not results.exists():
        return {}
    return {r["task"]: r["value"] for r in json.loads(results.read_bytes())["results"]
            if r["metric"] == get_task(r["task"]).primary}
