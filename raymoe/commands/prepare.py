"""`raymoe prepare`: tokenize raw text into packed shards (Ray Data)."""

from __future__ import annotations

import argparse

from raymoe.commands import Subcommands
from raymoe.console import connect_ray


def cmd_prepare(args: argparse.Namespace) -> None:
    from raymoe.data.prepare import PrepareOptions, prepare

    connect_ray(args.address)
    prepare(PrepareOptions(inputs=args.inputs, output=args.out, tokenizer=args.tokenizer,
                           seq_len=args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
                           text_field=args.text_field, doc_chars=args.doc_chars,
                           shard_bytes=int(args.shard_mb * 2**20),
                           row_group_bytes=int(args.row_group_kb * 2**10)))


def add_commands(sub: Subcommands) -> None:
    prep = sub.add_parser("prepare", help="tokenize raw text into packed shards (Ray Data)")
    prep.add_argument("inputs", nargs="+", help="paths or s3:// URIs of .txt/.jsonl/.parquet "
                                                "files or directories of them")
    prep.add_argument("--out", required=True, help="output directory or s3:// prefix")
    prep.add_argument("--tokenizer", default="gpt2", help="gpt2, bytes, or a tokenizer.json")
    prep.add_argument("--seq-len", type=int, default=2048)
    prep.add_argument("--val-fraction", type=float, default=0.005,
                      help="share of documents held back for validation")
    prep.add_argument("--seed", type=int, default=1234, help="seed of the validation split")
    prep.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    prep.add_argument("--doc-chars", type=int, default=0,
                      help="cut long texts into documents of about this many characters")
    prep.add_argument("--shard-mb", type=float, default=64,
                      help="target shard size in MiB of tokens (before compression)")
    prep.add_argument("--row-group-kb", type=float, default=256,
                      help="row group size in KiB of tokens: the unit a training rank reads")
    prep.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    prep.set_defaults(func=cmd_prepare)
