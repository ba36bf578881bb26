"""The ``raymoe`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raymoe.config import ConfigError, load_config

SAMPLE_CORPUS = Path(__file__).parent / "sample" / "corpus"


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from raymoe.model import GPT

    cfg = load_config(args.config, args.overrides)
    with torch.device("meta"):
        model = GPT(cfg.model)
    m, moe = cfg.model, cfg.model.moe
    print(f"{cfg.name}: {m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads, "
          f"FFN {m.d_ffn}, seq_len {m.seq_len}, vocab {m.vocab_size} (padded {m.padded_vocab_size})")
    if moe.enabled:
        layers = [i + 1 for i in range(m.n_layer) if moe.is_moe_layer(i)]
        print(f"MoE: {moe.num_experts} experts, top-{moe.top_k}, on layers {layers}, "
              f"capacity factor {moe.capacity_factor}, EP size {cfg.parallel.ep_size}")
    print(f"total parameters:  {model.num_parameters():,} ({model.num_parameters() / 1e9:.2f}B)")
    active = model.num_parameters(active_only=True)
    print(f"active per token:  {active:,} ({active / 1e9:.2f}B)")


def cmd_demo(args: argparse.Namespace) -> None:
    from raymoe.train.local import train_locally

    cfg = load_config(args.config, args.overrides)
    train_locally(cfg, Path(args.corpus), max_seconds=args.seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shape and parameter counts of a preset or YAML config")
    info.add_argument("config", help="preset name or YAML file")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.moe.num_experts=32")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="train a tiny MoE GPT in one process on the bundled sample")
    demo.add_argument("config", nargs="?", default="tiny-moe8")
    demo.add_argument("overrides", nargs="*")
    demo.add_argument("--corpus", default=str(SAMPLE_CORPUS), help="directory of .txt files")
    demo.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as err:
        print(f"raymoe: config error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
