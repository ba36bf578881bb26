"""The ``raymoe`` command."""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from raymoe.commands import checkpoints, compare, demo, info, jobs, plan, prepare, serve, tokenizer, train
from raymoe.config import ConfigError
from raymoe.errors import RaymoeError, find_cause

COMMAND_GROUPS = (info, plan, train, demo, prepare, compare, checkpoints, serve, jobs, tokenizer)
"""raymoe.commands' modules, in the order `raymoe --help` lists their commands."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of every error (also RAYMOE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """As argparse does, except that what `raymoe submit` does not know is the command's."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command != "submit":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        return args
    if "--" in rest:
        rest.remove("--")
    args.args = rest
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; 2 with one line for an error that is the user's to fix (found
    inside Ray's wrappers too); anything else is a bug and keeps its traceback (exit 1).
    ``--debug`` or RAYMOE_DEBUG=1 prints the traceback of every error."""
    args = parse_args(argv)
    debug = args.debug or os.environ.get("RAYMOE_DEBUG", "") not in ("", "0")
    try:
        args.func(args)
    except Exception as err:
        user_error = find_cause(err, RaymoeError)
        if user_error is None:
            raise
        if debug:
            traceback.print_exception(err)
        print(f"raymoe: {describe_error(user_error)}", file=sys.stderr)
        return 2
    return 0


def describe_error(err: RaymoeError) -> str:
    label = "config error" if isinstance(err, ConfigError) else type(err).__name__
    return f"{label}: {err}"


if __name__ == "__main__":
    sys.exit(main())
