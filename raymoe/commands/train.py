"""`raymoe train`, and what the commands that train share: the options for a cluster too
small for a worker group, and the printed result of a run."""

from __future__ import annotations

import argparse

from raymoe.commands import Subcommands
from raymoe.config import load_config
from raymoe.console import connect_ray


def cmd_train(args: argparse.Namespace) -> None:
    from raymoe.runs import run_location
    from raymoe.train.launcher import train_on_ray
    from raymoe.train.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg, run_location(cfg).uri)  # before a Ray cluster is joined or started
    connect_ray(args.address)
    result = train_on_ray(cfg, wait=args.wait, timeout=args.timeout)
    report_result(result)


def report_result(result) -> None:
    if result.error is not None:  # main finds a user's error inside Ray's wrappers
        raise result.error
    metrics = result.metrics or {}
    val = metrics.get("val_loss")
    print(f"finished at step {metrics.get('step')}: loss {metrics.get('lm_loss', float('nan')):.4f}"
          + (f", validation loss {val:.4f} (perplexity {metrics.get('val_perplexity'):.2f})"
             if val is not None else ""))
    print(f"run directory: {result.path}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")


def add_wait_options(command: argparse.ArgumentParser) -> None:
    """When the cluster is too small for a worker group: wait for it to grow or fail."""
    wait = command.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_const", const="wait", default="auto",
                      help="wait for nodes to join (default: when the cluster has an autoscaler)")
    wait.add_argument("--no-wait", dest="wait", action="store_const", const="no-wait",
                      help="fail at once, naming the numbers, when the cluster is too small")
    command.add_argument("--timeout", type=float, default=1800.0,
                         help="seconds to wait for the worker group's nodes (default 1800)")


def add_commands(sub: Subcommands) -> None:
    train = sub.add_parser("train", help="train on a Ray Train worker group (resumes a run "
                                          "of the same name and storage)")
    train.add_argument("config", help="preset name or YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    train.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    add_wait_options(train)
    train.set_defaults(func=cmd_train)
