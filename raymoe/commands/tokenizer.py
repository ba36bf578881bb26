"""`raymoe tokenizer train`: a byte-level BPE trained on a corpus."""

from __future__ import annotations

import argparse

from raymoe.commands import Subcommands


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from raymoe.data.prepare import list_inputs, read_documents
    from raymoe.data.tokenizers import train_tokenizer

    texts = (text for uri in list_inputs(args.inputs)
             for _, text in read_documents(uri, args.text_field, 0))
    tokenizer = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"trained a byte-level BPE of {tokenizer.vocab_size:,} tokens: {args.out}")


def add_commands(sub: Subcommands) -> None:
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    train_tok = tok.add_parser("train", help="train a byte-level BPE on a corpus")
    train_tok.add_argument("inputs", nargs="+")
    train_tok.add_argument("--vocab-size", type=int, default=8192)
    train_tok.add_argument("--out", required=True, help="where to write tokenizer.json")
    train_tok.add_argument("--text-field", default="text")
    train_tok.set_defaults(func=cmd_tokenizer_train)
