"""`raymoe plan`: per-GPU memory, step time, MFU and cost of a config, or what a whole
study will cost, before anything runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from raymoe.commands import Subcommands
from raymoe.config import Config, load_config
from raymoe.plan import CLUSTER_YAML, HARDWARE


def plan_options() -> argparse.ArgumentParser:
    """`raymoe plan`'s overrides and options, which may come in any order
    (`raymoe plan gpt-6.7b --gpu a100-40gb parallel.shard=none`)."""
    options = argparse.ArgumentParser(prog="raymoe plan CONFIG", add_help=False)
    options.add_argument("overrides", nargs="*",
                         help="dotted overrides, e.g. parallel.shard=fsdp (of every model of a study)")
    options.add_argument("--gpu", choices=list(HARDWARE), default="a100-40gb",
                         help="the GPU type (default: the cluster YAML's A100 40GB)")
    options.add_argument("--workers", type=int, default=None,
                         help="GPUs of the run (default: parallel.num_workers; elastic: its MAX)")
    options.add_argument("--cluster", default=str(CLUSTER_YAML),
                         help="cluster YAML whose GPU instance type prices the run")
    options.add_argument("--price-per-hour", type=float, default=None,
                         help="USD per instance-hour instead of the on-demand list price")
    options.add_argument("--inference", action="store_true",
                         help="decode latency per token and tokens/s on GPU counts instead of training")
    options.add_argument("--gpus", type=int, default=None,
                         help="with --inference: this GPU count (default: powers of two up to 128)")
    options.add_argument("--batch", type=int, action="append", default=None,
                         help="with --inference: sequences decoded together (default: 1 and 64; repeatable)")
    options.add_argument("--context", type=int, default=0,
                         help="with --inference: tokens in each sequence's KV cache (default: model.seq_len)")
    options.add_argument("--against", default=None,
                         help="with --inference: the dense config to compare with (default for the "
                              "reference MoE presets: the dense model of equal quality)")
    return options


def cmd_plan(args: argparse.Namespace) -> None:
    """Memory, time and cost on a GPU type; exit 3 when the config does not fit."""
    from raymoe.plan import format_plan, make_plan
    from raymoe.study.spec import is_study

    options = plan_options().parse_intermixed_args(args.rest)
    if is_study(args.config):
        cmd_plan_study(args.config, options)
        return
    cfg = load_config(args.config, options.overrides)
    if options.inference:
        cmd_plan_inference(cfg, options)
        return
    plan = make_plan(cfg, options.gpu, options.workers, Path(options.cluster), options.price_per_hour)
    print(format_plan(plan))
    if not plan.fits:
        raise SystemExit(3)


def cmd_plan_inference(cfg: Config, options: argparse.Namespace) -> None:
    """Decode speed of the config, and of the dense model it is compared with, on GPU
    counts; for a MoE model, the fewest GPUs at which it decodes as fast as that one."""
    from raymoe.plan.inference import (
        ASSUMPTIONS,
        EQUAL_QUALITY,
        estimate_decode,
        format_decode,
        gpu_counts,
        gpus_to_match,
    )

    against_name = options.against or EQUAL_QUALITY.get(cfg.name)
    against = load_config(against_name) if against_name else None
    batches = options.batch or [1, 64]
    counts = [options.gpus] if options.gpus else gpu_counts(cfg)
    models = [cfg] + ([against] if against is not None else [])
    print(format_decode([estimate_decode(model, options.gpu, gpus, batch, options.context)
                         for batch in batches for model in models for gpus in counts]))
    if against is not None and cfg.model.moe.enabled:
        for batch in batches:
            gpus = gpus_to_match(cfg, against, options.gpu, batch, options.context)
            found = f"from {gpus} GPUs" if gpus else "on none of the GPU counts above"
            print(f"batch {batch}: {cfg.name} decodes as fast as {against.name} {found} ({options.gpu})")
    print(ASSUMPTIONS)


def cmd_plan_study(path: str, options: argparse.Namespace) -> None:
    """Every model of the study at its trials' configs, the evaluation and the totals; exit
    3 when a model does not fit."""
    from raymoe.study.plan import format_study_plan, plan_study
    from raymoe.study.spec import load_study

    plan = plan_study(load_study(path), options.gpu, options.workers, Path(options.cluster),
                      options.price_per_hour, options.overrides)
    print(format_study_plan(plan))
    if not plan.fits:
        raise SystemExit(3)


def add_commands(sub: Subcommands) -> None:
    plan = sub.add_parser("plan", help="per-GPU memory, step time, MFU and cost of a config on a "
                                       "GPU type, or of every model of a study and its total "
                                       "(exit 3 when one does not fit)",
                          epilog=plan_options().format_help(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("config", help="preset name, YAML file, or study YAML")
    plan.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                      help="dotted overrides and the options below, in any order")
    plan.set_defaults(func=cmd_plan)
