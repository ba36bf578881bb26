"""Running a study: every trial a raymoe training run (a TorchTrainer driven from a Tune
function trial, the pattern Ray 2.60 supports), Tune's experiment state in the study's
storage (so an interrupted study resumes), then evaluation and the report."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from raymoe.config import load_config
from raymoe.data.storage import is_s3, locate
from raymoe.errors import RaymoeError, find_cause
from raymoe.study.evaluate import evaluate_trials
from raymoe.study.progress import TrialProgress
from raymoe.study.report import Report, build_report
from raymoe.study.search import describe_search, load_search, save_search, search_outcome
from raymoe.study.spec import Study
from raymoe.train.capacity import WaitPolicy


def _trial(trial: dict[str, Any]) -> None:
    """One Tune trial: a raymoe training run whose reports flow into Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from raymoe.train.launcher import train_on_ray

    cfg = load_config(trial["trial"]["config"], trial["trial"]["overrides"])
    result = train_on_ray(cfg, trial["wait"], trial["timeout"], callbacks=[TuneReportCallback()])
    if result.error is not None:
        raise result.error


@contextmanager
def _tune_output_off() -> Iterator[None]:
    """Tune's console off (TrialProgress prints instead): its newer output engine prints the
    experiment's configuration box and paths even when silent, the older one obeys verbose=0."""
    previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["RAY_AIR_NEW_OUTPUT"]
        else:
            os.environ["RAY_AIR_NEW_OUTPUT"] = previous


def trial_error(err: BaseException) -> str:
    """A user-fixable error as one line; anything else with its traceback."""
    cause = find_cause(err, RaymoeError)
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err)


def run_study(study: Study, wait: WaitPolicy = "auto", timeout: float = 1800.0) -> Report:
    """Search each model's learning rate (when the study asks), run every trial (or resume
    them) on the connected Ray cluster, evaluate, then report.
    ``wait``/``timeout``: each trial's wait for its worker group (raymoe.train.capacity)."""
    lr_search = None
    if study.lr_search is not None:
        lr_search = load_search(study)
        if lr_search is None:
            asha = study.lr_search.asha
            errors = run_trials(study, "search", study.search_trials(), asha, wait, timeout)
            lr_search = search_outcome(study, errors)
            save_search(study, lr_search)
        for line in describe_search(lr_search):
            print(line, flush=True)
    chosen = lr_search["chosen"] if lr_search else None
    errors = run_trials(study, "tune", study.trials(chosen), study.asha, wait, timeout)
    eval_errors = evaluate_trials(study, skip=set(errors)) if study.eval is not None else {}
    report = build_report(study, errors, eval_errors, lr_search=lr_search)
    report.write(study.uri)
    return report


def report_study(study: Study) -> Report:
    """The report again from what the trials left in storage (no training): after a change
    to the report's code, or of a study whose trials another process ran. A trial's error is
    known only from its run then (no metrics: reported as such)."""
    report = build_report(study, {}, lr_search=load_search(study))
    report.write(study.uri)
    return report


def run_trials(study: Study, stage: str, trials: list[dict[str, Any]], asha: dict[str, Any] | None,
               wait: WaitPolicy, timeout: float) -> dict[str, str]:
    """One Tune experiment (``stage``) over ``trials``; the failed ones' errors by name."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    scheduler = None
    if asha:
        scheduler = ASHAScheduler(metric="val_loss", mode="min", time_attr="step", **asha)
    state = locate(study.storage).join(".tune")
    tuner = tune.Tuner(
        # The trial only drives a TorchTrainer: it must not hold the CPUs its workers need.
        tune.with_resources(_trial, {"CPU": 0, "memory": 1_000_000}),
        param_space={"trial": tune.grid_search(trials), "wait": wait, "timeout": timeout},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent_trials,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(name=f"{study.name}-{stage}", storage_path=state.path,
                                  storage_filesystem=state.fs if is_s3(state.uri) else None,
                                  verbose=0, callbacks=[TrialProgress()]),
    )
    with _tune_output_off():
        grid = tuner.fit()
    errors = {}
    for result in (grid[i] for i in range(len(grid))):
        if result.error is not None:
            name = (result.config or {})["trial"]["name"]
            errors[name] = trial_error(result.error)
            if find_cause(result.error, RaymoeError) is None:
                print(f"trial {name} failed:\n{result.error}", file=sys.stderr)
    return errors
