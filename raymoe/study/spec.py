"""The study YAML: which models, seeds, token budget, data and storage; its trials.

Trials write their runs under the study's storage with the run name STUDY/TRIAL, so a
re-run study resumes every unfinished trial from its checkpoints, and everything the
study writes (Tune's state, eval results, the report) lies beside them, on local disk or
S3 alike."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raymoe.config import ConfigError, load_config
from raymoe.data.storage import locate
from raymoe.eval.harness import EvalOptions
from raymoe.runs import absolute

STUDY_KEYS = {"name", "storage", "data", "tokens", "models", "seeds", "max_concurrent_trials",
              "overrides", "asha", "eval", "lr_search", "extra_validation", "note"}
LR_SEARCH_KEYS = {"lrs", "tokens", "asha"}
EVAL_KEYS = {"tasks", "data_dir", "files", "limit", "batch_size", "nodes", "ep"}


@dataclass
class StudyEval:
    """Zero-shot evaluation of each trial's final checkpoint."""

    options: EvalOptions
    nodes: int = 0
    """At most this many Ray nodes score (one actor per node, all its CPUs); 0: every node."""
    ep: int = 0
    """Expert-parallel group size for MoE trials; 0: the smallest whose ranks fit the
    cluster's nodes (1, the whole model per node, when a node holds it)."""


@dataclass
class LRSearch:
    """Each model's learning rate, chosen by the same search: every model trains the first
    seed on ``tokens`` at every rate of ``lrs`` (its own schedule, over those tokens); the
    lowest final validation loss wins."""

    lrs: list[float]
    tokens: int
    asha: dict[str, Any] | None = None
    """Early stopping of the worse rates on val_loss: {grace_period, reduction_factor}, in steps."""


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
    """A local path (absolute) or an s3:// URI."""
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
    lr_search: LRSearch | None = None
    extra_validation: dict[str, str] = field(default_factory=dict)
    """Other prepared datasets every trial validates on (data.extra_validation)."""
    note: str = ""
    """What the study can and cannot show, printed after its tables and atop its report."""

    @property
    def uri(self) -> str:
        """Where the study's own files go (beside its trials' runs)."""
        return locate(self.storage).join(self.name).uri

    def eval_uri(self, trial: str) -> str:
        return locate(self.uri).join("eval", f"{trial}.json").uri

    def trials(self, lrs: dict[str, float] | None = None) -> list[dict[str, Any]]:
        """Every model at every seed; ``lrs``: model -> the learning rate it trains at (the
        search's choice), else its config's."""
        return [self._trial(m, f"{m.name}-seed{seed}", seed, self.tokens,
                            [f"optim.lr={lrs[m.name]}"] if lrs and m.name in lrs else [])
                for m in self.models for seed in self.seeds]

    def search_trials(self) -> list[dict[str, Any]]:
        """The learning-rate search's short runs: every model at every rate, the first seed."""
        assert self.lr_search is not None
        return [self._trial(m, f"search/{m.name}-lr{lr:g}", self.seeds[0], self.lr_search.tokens,
                            [f"optim.lr={lr}"], lr=lr)
                for m in self.models for lr in self.lr_search.lrs]

    def _trial(self, model: ModelSpec, name: str, seed: int, tokens: int, extra: list[str],
               **fields: Any) -> dict[str, Any]:
        extra_sets = [f"data.extra_validation.{k}={v}" for k, v in self.extra_validation.items()]
        return {"name": name, "model": model.name, "seed": seed, "config": model.config, **fields,
                "overrides": [*self.overrides, *model.overrides, f"data.path={self.data}", *extra_sets,
                              f"train.storage={self.storage}", f"train.run_name={self.name}/{name}",
                              f"train.total_tokens={tokens}", f"train.seed={seed}",
                              f"optim.decay_tokens={self.decay_tokens(model, tokens)}",
                              "train.max_steps=0", *extra]}

    def decay_tokens(self, model: ModelSpec, tokens: int) -> int:
        """A trial trains ``tokens``; its learning rate decays over the share of them that
        its model's own config decays over (the dense presets: 260B of 300B, as the
        reference scripts; the MoE presets: all of them)."""
        try:
            cfg = load_config(model.config, [*self.overrides, *model.overrides])
        except ConfigError:
            return tokens  # the trial fails on that error, reported in the study's table
        return round(tokens * cfg.optim.decay_tokens / cfg.train.total_tokens)


def is_study(source: str) -> bool:
    """Whether ``source`` is a study YAML (a mapping with `models`) rather than a preset or a
    model's config."""
    path = Path(source)
    if not path.is_file():
        return False
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return False  # not a study; load_config names what is wrong
    return isinstance(raw, dict) and "models" in raw


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
        config = absolute(m["config"]) if Path(m["config"]).is_file() else m["config"]
        models.append(ModelSpec(m["name"], config, list(m.get("overrides", []))))
    return Study(name=raw["name"], storage=absolute(raw.get("storage", "runs")),
                 data=absolute(raw["data"]),
                 tokens=int(float(raw["tokens"])), models=models,
                 seeds=list(raw.get("seeds", [1234])),
                 max_concurrent_trials=int(raw.get("max_concurrent_trials", 1)),
                 overrides=list(raw.get("overrides", [])), asha=raw.get("asha"),
                 eval=_study_eval(path, raw["eval"]) if raw.get("eval") else None,
                 lr_search=_lr_search(path, raw["lr_search"]) if raw.get("lr_search") else None,
                 extra_validation=_extra_validation(path, raw.get("extra_validation") or {}),
                 note=" ".join(str(raw.get("note", "")).split()))


def _lr_search(path: str, raw: Any) -> LRSearch:
    if not isinstance(raw, dict) or not raw.get("lrs") or not raw.get("tokens"):
        raise ConfigError(f"{path}: lr_search needs 'lrs' (a list of learning rates) and 'tokens'")
    unknown = set(raw) - LR_SEARCH_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown lr_search keys {sorted(unknown)} (known: {sorted(LR_SEARCH_KEYS)})")
    try:
        lrs = [float(lr) for lr in raw["lrs"]]
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: lr_search lrs: {raw['lrs']!r}, expected a list of numbers") from err
    if any(lr <= 0 for lr in lrs):
        raise ConfigError(f"{path}: lr_search lrs: {lrs}, expected positive learning rates")
    return LRSearch(lrs, int(float(raw["tokens"])), raw.get("asha"))


def _extra_validation(path: str, raw: Any) -> dict[str, str]:
    """name -> a prepared dataset (a path relative to here, made absolute, or s3://)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: extra_validation: expected a mapping of name -> prepared dataset")
    return {str(name): absolute(str(where)) for name, where in raw.items()}


def _study_eval(path: str, raw: Any) -> StudyEval:
    if not isinstance(raw, dict) or not raw.get("tasks"):
        raise ConfigError(f"{path}: eval needs 'tasks' (a list of task names)")
    unknown = set(raw) - EVAL_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown eval keys {sorted(unknown)} (known: {sorted(EVAL_KEYS)})")
    tasks = raw["tasks"].split(",") if isinstance(raw["tasks"], str) else list(raw["tasks"])
    options = EvalOptions(tasks, absolute(raw["data_dir"]) if raw.get("data_dir") else None,
                          {k: absolute(v) for k, v in (raw.get("files") or {}).items()},
                          raw.get("limit"), int(raw.get("batch_size", 16)))
    ep = raw.get("ep", 0)
    if not isinstance(ep, int) or ep < 0:
        raise ConfigError(f"{path}: eval ep: {ep!r}, expected an expert-parallel size >= 1 "
                          "(or 0 for the smallest that fits)")
    return StudyEval(options, int(raw.get("nodes", 0)), ep)
