"""A trial's outcome read back from the run's storage: parameter counts, its learning rate,
its validation curves (its own set and any extra ones), throughput and router health from
its metrics, its zero-shot scores from the study's eval file."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from raymoe.config import ConfigError, load_config
from raymoe.data.storage import locate
from raymoe.runs import read_metrics, run_location

if TYPE_CHECKING:
    from torch import nn

OWN = "own"
"""The name of a trial's own validation set (metric ``val_loss``); an extra set NAME logs
``val_loss/NAME``."""
EMBEDDINGS = ("wte.", "wpe.")
"""The GPT's token and position embeddings (the output head is tied to ``wte``)."""
WARMUP_SHARE = 0.05
"""Router health leaves out the first 5% of the training tokens."""

Curve = list[tuple[int, float]]
Record = dict[str, Any]


@dataclass
class LayerHealth:
    """One MoE layer's router in one trial, after the first WARMUP_SHARE of its tokens."""

    layer: int
    dropped_mean: float
    dropped_max: float
    load_cv_mean: float


@dataclass
class TrialOutcome:
    name: str
    model: str
    seed: int
    total_params: int = 0
    active_params: int = 0
    non_embedding_params: int = 0
    """All parameters less the token and position embeddings."""
    active_non_embedding_params: int = 0
    """Those a token uses, less the embeddings."""
    lr: float = math.nan
    """The trial's peak learning rate (optim.lr)."""
    val_loss: float = math.nan
    tokens: int = 0
    tokens_per_s: float = math.nan
    samples_per_s: float = math.nan
    train_flops: float = math.nan
    curve: Curve = field(default_factory=list)
    extra_curves: dict[str, Curve] = field(default_factory=dict)
    """Extra validation set -> its curve (tokens, loss)."""
    router: list[LayerHealth] = field(default_factory=list)
    max_val_rise: float = math.nan
    """The largest rise of val_loss from one evaluation to the next (0: it never rose)."""
    error: str = ""
    eval: dict[str, float] = field(default_factory=dict)
    """task -> its Table 1 metric, when the study evaluates."""

    def curve_of(self, name: str) -> Curve:
        """The curve of the validation set ``name`` (OWN or an extra set's)."""
        return self.curve if name == OWN else self.extra_curves.get(name, [])


def read_outcome(trial: dict[str, Any], error: str, eval_uri: str) -> TrialOutcome:
    import torch

    from raymoe.model import GPT

    outcome = TrialOutcome(trial["name"], trial["model"], trial["seed"], error=error)
    try:
        cfg = load_config(trial["config"], trial["overrides"])
    except ConfigError as err:
        outcome.error = outcome.error or f"ConfigError: {err}"
        return outcome
    outcome.lr = cfg.optim.lr
    with torch.device("meta"):
        model = GPT(cfg.model)
    outcome.total_params = model.num_parameters()
    outcome.active_params = model.num_parameters(active_only=True)
    embeddings = embedding_parameters(model)
    outcome.non_embedding_params = outcome.total_params - embeddings
    outcome.active_non_embedding_params = outcome.active_params - embeddings
    metrics_uri = run_location(cfg).metrics_uri
    records = read_metrics(metrics_uri)
    if not records:
        outcome.error = outcome.error or f"no metrics were written ({metrics_uri})"
        return outcome
    curves = validation_curves(records)
    outcome.curve = curves.pop(OWN, [])
    outcome.extra_curves = curves
    if outcome.curve:
        outcome.tokens, outcome.val_loss = outcome.curve[-1]
    if outcome.tokens < cfg.train.total_tokens and not outcome.error:  # stopped, or still running:
        outcome.error = (f"incomplete: evaluated at {outcome.tokens:,} of its "  # not a result
                         f"{cfg.train.total_tokens:,} tokens")
    outcome.max_val_rise = largest_rise(outcome.curve)
    outcome.router = router_health(records, cfg.train.total_tokens)
    rates = [r for r in records if "tokens_per_s" in r]
    if rates:
        outcome.tokens_per_s = statistics.median(r["tokens_per_s"] for r in rates)
        outcome.samples_per_s = statistics.median(r["samples_per_s"] for r in rates)
    outcome.eval = read_eval_scores(eval_uri)
    m = cfg.model
    per_token = 6 * outcome.active_params + 12 * m.n_layer * m.d_model * m.seq_len
    outcome.train_flops = per_token * outcome.tokens
    return outcome


def embedding_parameters(model: nn.Module) -> int:
    """The parameters of the token and position embeddings (the tied head counts once)."""
    return sum(p.numel() for name, p in model.named_parameters() if name.startswith(EMBEDDINGS))


def validation_curves(records: Sequence[Record]) -> dict[str, Curve]:
    """Validation set (OWN for ``val_loss``, NAME for ``val_loss/NAME``) -> its curve,
    (tokens, loss) in token order (the last record of a token count wins)."""
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            if key == "val_loss" or key.startswith("val_loss/"):
                name = OWN if key == "val_loss" else key.removeprefix("val_loss/")
                curves.setdefault(name, {})[record["tokens"]] = value
    return {name: sorted(points.items()) for name, points in curves.items()}


def largest_rise(curve: Curve) -> float:
    """The largest rise of the loss from one evaluation to the next, 0 when it never rose
    (NaN with fewer than two evaluations)."""
    if len(curve) < 2:
        return math.nan
    return max(0.0, *(b - a for (_, a), (_, b) in zip(curve, curve[1:], strict=False)))


def router_health(records: Sequence[Record], total_tokens: int) -> list[LayerHealth]:
    """Each MoE layer's dropped share (mean and max) and load CV (mean) over the records
    logged after the first WARMUP_SHARE of ``total_tokens``; a layer that logs no dropped
    share (it drops nothing) shows 0."""
    late = [r for r in records if r.get("tokens", 0) > WARMUP_SHARE * total_tokens]
    layers = sorted({int(key[3:].split("/")[0]) for r in late for key in r
                     if key.startswith("moe") and key.endswith("/load_cv")})
    health = []
    for i in layers:
        logged = [r for r in late if f"moe{i}/load_cv" in r]
        dropped = [r.get(f"moe{i}/dropped", 0.0) for r in logged]
        health.append(LayerHealth(i, statistics.mean(dropped), max(dropped),
                                  statistics.mean(r[f"moe{i}/load_cv"] for r in logged)))
    return health


def read_eval_scores(eval_uri: str) -> dict[str, float]:
    """task -> its primary metric, from a trial's eval results (empty when not evaluated)."""
    from raymoe.eval.tasks import get_task

    results = locate(eval_uri)
    if not results.exists():
        return {}
    return {r["task"]: r["value"] for r in json.loads(results.read_bytes())["results"]
            if r["metric"] == get_task(r["task"]).primary}
