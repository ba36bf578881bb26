"""`raymoe compare`: the dense-versus-MoE study (Ray Tune) and its report."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from raymoe.commands import Subcommands
from raymoe.commands.train import add_wait_options
from raymoe.console import connect_ray

if TYPE_CHECKING:
    from raymoe.study.report import Report


def cmd_compare(args: argparse.Namespace) -> None:
    from raymoe.config import ConfigError
    from raymoe.data.shards import PreparedDataset
    from raymoe.study.plan import format_study_plan, plan_study, trial_configs
    from raymoe.study.run import report_study, run_study
    from raymoe.study.spec import load_study

    study = load_study(args.study)
    if args.report_only:
        print_report(report_study(study))
        return
    for data in (study.data, *study.extra_validation.values()):  # before Ray: a missing dataset
        PreparedDataset.open(data)  # is one line, not a failed trial each
    try:  # the bill, before paying it
        if any(cfg.parallel.use_gpu for cfg in trial_configs(study).values()):
            print(format_study_plan(plan_study(study)), flush=True)
    except ConfigError as err:  # that model's trial fails and is reported; the others train
        print(f"no cost plan: {err}", flush=True)
    connect_ray(args.address, num_cpus=4, worker_logs=False)
    print_report(run_study(study, wait=args.wait, timeout=args.timeout))


def print_report(report: Report) -> None:
    print(report.table())
    for line in report.comparisons:
        print(line)
    if report.eval_tasks:
        print(report.table1())
        for line in report.eval_failures:
            print(line)
    if report.note:
        print(report.note)
    print(f"report, plot and CSV in {report.uri}")


def add_commands(sub: Subcommands) -> None:
    compare = sub.add_parser("compare", help="the dense-versus-MoE study (Ray Tune) and its report")
    compare.add_argument("study", help="study YAML, e.g. jobs/configs/study-tiny.yaml")
    compare.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    compare.add_argument("--report-only", action="store_true",
                         help="write the report again from the trials' runs in storage, training nothing")
    add_wait_options(compare)
    compare.set_defaults(func=cmd_compare)
