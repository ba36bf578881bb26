"""`raymoe demo`: prepare the bundled sample (once), then train a tiny MoE GPT on 2 Ray workers."""

from __future__ import annotations

import argparse
from pathlib import Path

from raymoe.commands import Subcommands
from raymoe.commands.train import report_result
from raymoe.config import load_config
from raymoe.console import connect_ray

SAMPLE_CORPUS = Path(__file__).parents[1] / "sample" / "corpus"


def cmd_demo(args: argparse.Namespace) -> None:
    from raymoe.data.prepare import PrepareOptions, prepare
    from raymoe.data.shards import MANIFEST
    from raymoe.train.launcher import train_on_ray

    data = Path(args.workdir) / "sample-bytes"
    connect_ray(args.address, num_cpus=4)
    if not (data / MANIFEST).is_file():
        prepare(PrepareOptions([str(SAMPLE_CORPUS)], str(data), tokenizer="bytes", seq_len=128,
                               val_fraction=0.05, doc_chars=8000, shard_bytes=256 * 2**10))
    if args.prepare_only:
        print(f"the bundled sample is prepared in {data}")
        return
    overrides = [f"data.path={data}", f"train.storage={args.workdir}",
                 f"train.max_steps={args.steps}", "train.eval_every=100", *args.overrides]
    cfg = load_config(args.config, overrides)
    report_result(train_on_ray(cfg))


def add_commands(sub: Subcommands) -> None:
    demo = sub.add_parser("demo", help="prepare the bundled sample, train a tiny MoE GPT on "
                                       "2 local Ray workers")
    demo.add_argument("--config", default="tiny-moe8", help="preset name or YAML file")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--workdir", default="runs", help="where the data and the run go")
    demo.add_argument("--address", default=None)
    demo.add_argument("--prepare-only", action="store_true",
                      help="only prepare the bundled sample (WORKDIR/sample-bytes), as `make study` needs")
    demo.set_defaults(func=cmd_demo)
