"""What a study will cost before it runs (`raymoe plan STUDY.yaml`, and `raymoe compare`
before its trials start): each model's plan at the configs its trials train (the study's
token budget), the evaluation's share, and the totals, with the wall time that
max_concurrent_trials implies. No Ray: raymoe.plan's functions of config and hardware."""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from pathlib import Path

from raymoe.config import Config, load_config
from raymoe.plan import CLUSTER_YAML, Plan, fix_text, make_plan, verdict
from raymoe.plan.evaluation import CPU_FLOPS, EvalEstimate, estimate_eval
from raymoe.plan.timing import COMPUTE_EFFICIENCY
from raymoe.study.spec import Study


@dataclass(frozen=True)
class ModelPlan:
    """One model of the study: its plan, its trials (one per seed) and their evaluation."""

    name: str
    plan: Plan
    trials: int
    evaluation: EvalEstimate | None

    @property
    def hours(self) -> float:
        """Training hours of all its trials."""
        return self.plan.cost.run_hours * self.trials

    @property
    def gpu_hours(self) -> float:
        return self.hours * self.plan.cfg.parallel.max_workers

    @property
    def eval_hours(self) -> float:
        return self.evaluation.hours * self.trials if self.evaluation else 0.0

    @property
    def node_hours(self) -> float:
        """Instance-hours of its trials' training and evaluation: what the bill counts."""
        held = self.evaluation.nodes if self.evaluation else 0
        return self.hours * self.plan.cost.nodes + self.eval_hours * held


@dataclass(frozen=True)
class StudyPlan:
    """Every model's plan, and the study's totals."""

    study: Study
    models: list[ModelPlan]

    @property
    def fits(self) -> bool:
        return all(m.plan.fits for m in self.models)

    @property
    def gpu_hours(self) -> float:
        return sum(m.gpu_hours for m in self.models)

    @property
    def cost(self) -> float:
        return sum(m.node_hours * m.plan.cost.price_per_hour for m in self.models)

    @property
    def spot_cost(self) -> float | None:
        """At the spot price, when the cluster YAML's nodes may be spot."""
        total = 0.0
        for m in self.models:
            price = m.plan.cost.spot_price_per_hour
            if price is None:
                return None
            total += m.node_hours * price
        return total

    @property
    def wall_hours(self) -> float:
        """The trials in the study's order, up to max_concurrent_trials at once (as Tune
        starts them), then every trial's evaluation, one after another."""
        by_name = {m.name: m for m in self.models}
        durations = [by_name[t["model"]].plan.cost.run_hours for t in self.study.trials()]
        return schedule_hours(durations, self.study.max_concurrent_trials) + sum(m.eval_hours for m in self.models)


def schedule_hours(durations: list[float], slots: int) -> float:
    """When the last of ``durations`` ends, each started in order on the first of ``slots``
    that is free."""
    ends = [0.0] * max(slots, 1)
    for duration in durations:
        heapq.heapreplace(ends, ends[0] + duration)
    return max(ends)


def trial_configs(study: Study, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Config]:
    """Each model's config as its trials train it (its seeds differ in the seed alone),
    with ``overrides`` on top."""
    configs: dict[str, Config] = {}
    for trial in study.trials():
        if trial["model"] not in configs:
            configs[trial["model"]] = load_config(trial["config"], [*trial["overrides"], *overrides])
    return configs


def plan_study(study: Study, gpu: str = "a100-40gb", workers: int | None = None,
               cluster_yaml: Path = CLUSTER_YAML, price_per_hour: float | None = None,
               overrides: list[str] | tuple[str, ...] = ()) -> StudyPlan:
    models = []
    for name, cfg in trial_configs(study, overrides).items():
        plan = make_plan(cfg, gpu, workers, cluster_yaml, price_per_hour)
        evaluation = None
        if study.eval is not None:
            options = study.eval.options
            evaluation = estimate_eval(plan.cfg, plan.memory.hardware, plan.cost.nodes, options.tasks,
                                       options.limit, options.max_new_tokens, study.eval.nodes, study.eval.ep)
        models.append(ModelPlan(name, plan, len(study.seeds), evaluation))
    return StudyPlan(study, models)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' if n != 1 else ''}"


def _tokens(n: int) -> str:
    return f"{n / 1e9:,.4g}B" if n >= 1e9 else f"{n / 1e6:,.4g}M" if n >= 1e6 else f"{n:,}"


def format_study_plan(plan: StudyPlan) -> str:
    """One short block: a line per model, the evaluation's share, the totals."""
    study, models = plan.study, plan.models
    first = models[0].plan
    lines = [f"{study.name}: {_count(len(models), 'model')} x {_count(len(study.seeds), 'seed')} at "
             f"{_tokens(study.tokens)} tokens on {first.memory.hardware.name}, "
             f"{_count(study.max_concurrent_trials, 'trial')} at a time",
             f"priced: {first.cost.source}",
             *_model_rows(plan)]
    if study.eval is not None:
        lines += _eval_rows(plan)
    spot, evaluated = plan.spot_cost, study.eval is not None
    lines += [f"total: {plan.gpu_hours:,.0f} GPU-hours of training"
              + (f" and {sum(m.eval_hours for m in models):,.1f} h of evaluation" if evaluated else "")
              + f": ${plan.cost:,.0f}" + (f" (${spot:,.0f} at spot)" if spot is not None else ""),
              f"wall time: {plan.wall_hours:,.1f} h ({_count(study.max_concurrent_trials, 'trial')} at a time"
              + (", then the evaluations)" if evaluated else ")")]
    lines += [f"{m.name} {verdict(m.plan.memory)}; smallest change that fits: {fix_text(m.plan)}"
              for m in models if not m.plan.fits]
    lines.append(f"assumptions: each model's as `raymoe plan CONFIG` lists them (matrix products at "
                 f"{COMPUTE_EFFICIENCY:.0%} of peak); evaluation in fp32 at {CPU_FLOPS / 1e9:.0f} GFLOP/s "
                 "per CPU of the instances the trials held")
    return "\n".join(lines)


def _model_rows(plan: StudyPlan) -> list[str]:
    """The header and a line per model: its training, all seeds counted."""
    spot = plan.spot_cost is not None
    width = max(len("model"), *(len(m.name) for m in plan.models))
    rows = [f"{'model':{width}s}  fits  GPUs  step s     tokens/s  h/trial  trials  GPU-hours  "
            f"{'cost $':>11s}" + (f"  {'at spot $':>9s}" if spot else "")]
    for m in plan.models:
        p = m.plan
        node_hours = m.hours * p.cost.nodes
        rows.append(f"{m.name:{width}s}  {'yes' if p.fits else 'NO':4s}  {p.cfg.parallel.max_workers:4d}  "
                    f"{p.time.step_seconds:6.3f}  {p.time.tokens_per_second:11,.0f}  {p.cost.run_hours:7.1f}  "
                    f"{m.trials:6d}  {m.gpu_hours:9,.0f}  {node_hours * p.cost.price_per_hour:11,.0f}"
                    + (f"  {node_hours * (p.cost.spot_price_per_hour or 0.0):9,.0f}" if spot else ""))
    return rows


def _eval_rows(plan: StudyPlan) -> list[str]:
    """Where each trial is evaluated and for how long."""
    assert plan.study.eval is not None
    options = plan.study.eval.options
    width = max(len(m.name) for m in plan.models)
    rows = [f"evaluation of each trial ({_count(len(options.tasks), 'task')}"
            + (f", {options.limit} examples each" if options.limit else "") + "), after the trials:"]
    for m in plan.models:
        e = m.evaluation
        assert e is not None
        where = (f"one actor per node on {_count(e.nodes, 'node')} ({e.cpus:,} CPUs)" if e.ep == 1 else
                 f"an expert-parallel group of {e.ep} 1-CPU ranks on {_count(e.nodes, 'node')}")
        rows.append(f"  {m.name:{width}s}  EP {e.ep}: {where}, {e.hours:.2f} h each")
    uncounted = sorted({t for m in plan.models if m.evaluation for t in m.evaluation.uncounted})
    if uncounted:
        rows.append(f"  (the hours leave out {', '.join(uncounted)}: of unknown size)")
    return rows
