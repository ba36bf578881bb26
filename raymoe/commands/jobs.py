"""`raymoe submit`, `status`, `stop`, `logs` and `jobs`: raymoe work as Ray jobs on a
cluster's job server."""

from __future__ import annotations

import argparse
import os

from raymoe.commands import Subcommands, train
from raymoe.jobs import KINDS


def _jobs(args: argparse.Namespace):
    from raymoe.jobs import RaymoeJobs

    return RaymoeJobs(args.address, token=args.token or os.environ.get("RAY_AUTH_TOKEN"))


def _train_arguments(argv: list[str]) -> argparse.Namespace:
    """`raymoe train`'s own parsing of a train job's arguments: its errors and its --help,
    before any job server is reached."""
    parser = argparse.ArgumentParser(prog="raymoe")
    train.add_commands(parser.add_subparsers())
    return parser.parse_args(["train", *argv])


def cmd_submit(args: argparse.Namespace) -> None:
    from raymoe.jobs import read_env_file

    env_vars = read_env_file(args.env_file) if args.env_file else None
    train_args = _train_arguments(args.args) if args.kind == "train" else None  # for the run's directory
    jobs = _jobs(args)
    if train_args is not None:
        options = args.args[:]
        for positional in (train_args.config, *train_args.overrides):
            options.remove(positional)
        job_id = jobs.submit_train(train_args.config, train_args.overrides, options,
                                   working_dir=args.working_dir, entrypoint_num_gpus=args.entrypoint_gpus,
                                   env_vars=env_vars)
    else:
        job_id = jobs.submit(args.kind, args.args, working_dir=args.working_dir, env_vars=env_vars)
    print(f"submitted {args.kind} job {job_id} to {args.address}")
    if args.follow:
        for chunk in jobs.follow(job_id):
            print(chunk, end="")
        print(f"job {job_id}: {jobs.status(job_id)}")


def cmd_status(args: argparse.Namespace) -> None:
    info = _jobs(args).info(args.job_id)
    print(f"{info.job_id}: {info.status} ({info.kind} {info.config}) {info.message}".rstrip())


def cmd_logs(args: argparse.Namespace) -> None:
    jobs = _jobs(args)
    if args.follow:
        for chunk in jobs.follow(args.job_id):
            print(chunk, end="")
    else:
        print(jobs.logs(args.job_id), end="")


def cmd_stop(args: argparse.Namespace) -> None:
    stopped = _jobs(args).stop(args.job_id)
    print(f"{args.job_id}: {'stopping' if stopped else 'already finished'}")


def cmd_jobs(args: argparse.Namespace) -> None:
    for info in _jobs(args).list():
        print(f"{info.job_id}  {info.status:9s}  {info.kind:8s}  {info.config:24s}  {info.run_dir}")


def add_commands(sub: Subcommands) -> None:
    def job_command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--address", default="http://127.0.0.1:8265",
                             help="the cluster's job server (through `ray dashboard` or a port-forward)")
        command.add_argument("--token", default=None,
                             help="the cluster's auth token (default: RAY_AUTH_TOKEN)")
        command.set_defaults(func=func)
        return command

    submit = job_command("submit", "submit raymoe work to a Ray cluster as a Ray job", cmd_submit)
    submit.description = ("Submit `raymoe KIND ARGS...` as a Ray job. submit's own options may "
                          "come before or after the kind; every other argument is the command's "
                          "(after --, all of them are). --help shows this and submits nothing.")
    submit.allow_abbrev = False  # a command's option is never taken for an abbreviated one of submit's
    submit.add_argument("kind", choices=sorted(KINDS),
                        help="the command to run; its arguments follow (see `raymoe KIND --help`)")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir")
    submit.add_argument("--entrypoint-gpus", type=float, default=0)
    submit.add_argument("--env-file", default=None, metavar="FILE",
                        help="NAME=VALUE lines for the job's environment (cluster/efa.env: NCCL over EFA)")
    submit.add_argument("--follow", action="store_true", help="stream the logs until it ends")
    for name, help_text, func in (("status", "a job's status", cmd_status),
                                  ("stop", "stop a job", cmd_stop)):
        job_command(name, help_text, func).add_argument("job_id")
    logs = job_command("logs", "a job's logs", cmd_logs)
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true")
    job_command("jobs", "the cluster's raymoe jobs", cmd_jobs)
