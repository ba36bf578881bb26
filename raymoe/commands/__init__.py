"""The ``raymoe`` subcommands, each module a command group: its arguments beside its
handlers. ``add_commands(subcommands)`` adds the group's subparsers to raymoe's; the
top-level parser (raymoe.cli) composes them in the order ``raymoe --help`` lists.

  info.py         info: shape and parameter counts
  plan.py         plan: memory, time and cost before anything runs
  train.py        train, and what train and compare share (the wait options, a run's result)
  demo.py         demo: the bundled sample, prepared and trained
  prepare.py      prepare: raw text into packed shards
  compare.py      compare: the dense-versus-MoE study
  checkpoints.py  eval, generate, export: what reads a checkpoint
  serve.py        serve, serve-stop: a checkpoint behind an HTTP API (Ray Serve)
  jobs.py         submit, status, stop, logs, jobs: Ray jobs on a cluster
  tokenizer.py    tokenizer train
"""

from __future__ import annotations

import argparse

Subcommands = argparse._SubParsersAction
"""What ``ArgumentParser.add_subparsers`` returns: each group's ``add_commands`` takes it."""
