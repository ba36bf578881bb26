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
              "overrides", "asha", "eval"}
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

    @property
    def uri(self) -> str:
        """Where the study's own files go (beside its trials' runs)."""
        return locate(self.storage).join(self.name).uri

    def eval_uri(self, trial: str) -> str:
        return locate(self.uri).join("eval", f"{trial}.json").uri

    def trials(self) -> list[dict[str, Any]]:
        return [{"name": f"{m.name}-seed{seed}", "model": m.name, "seed": seed,
                 "config": m.config,
                 "overrides": [*self.overrides, *m.overrides, f"data.path={self.data}",
                               f"train.storage={self.storage}",
                               f"train.run_name={self.name}/{m.name}-seed{seed}",
                               f"train.total_tokens={self.tokens}", f"train.seed={seed}",
                               f"optim.decay_tokens={self.decay_tokens(m)}",
                               "train.max_steps=0"]}
                for m in self.models for seed in self.seeds]

    def decay_tokens(self, model: ModelSpec) -> int:
        """Every model trains the study's tokens; its learning rate decays over the share of
        them that its own config decays over (the dense presets: 260B of 300B, as the
        reference scripts; the MoE presets: all of them)."""
        try:
            cfg = load_config(model.config, [*self.overrides, *model.overrides])
        except ConfigError:
            return self.tokens  # the trial fails on that error, reported in the study's table
        return round(self.tokens * cfg.optim.decay_tokens / cfg.train.total_tokens)


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
                 eval=_study_eval(path, raw["eval"]) if raw.get("eval") else None)


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
