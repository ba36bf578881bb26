"""`raymoe info`: shape and parameter counts of a preset or YAML config."""

from __future__ import annotations

import argparse

from raymoe.commands import Subcommands
from raymoe.config import load_config


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


def add_commands(sub: Subcommands) -> None:
    info = sub.add_parser("info", help="shape and parameter counts of a preset or YAML config")
    info.add_argument("config", help="preset name or YAML file")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.moe.num_experts=32")
    info.set_defaults(func=cmd_info)
