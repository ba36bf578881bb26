"""`raymoe eval`, `generate` and `export`: what reads a trained checkpoint, in one process
or on an expert-parallel group of Ray actors (--ep)."""

from __future__ import annotations

import argparse
import os
import sys

from raymoe.commands import Subcommands
from raymoe.console import connect_ray
from raymoe.errors import RaymoeError


def cmd_eval(args: argparse.Namespace) -> None:
    from raymoe.eval.harness import EvalOptions
    from raymoe.eval.runner import evaluate_checkpoint
    from raymoe.eval.tasks import REFERENCE_TASKS

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else list(REFERENCE_TASKS)
    files = dict(_key_value(item, "--task-file") for item in args.task_file)
    options = EvalOptions(tasks, args.data_dir, files, args.limit, args.batch_size,
                          use_cache=not args.no_cache, max_new_tokens=args.max_new_tokens)
    if args.ep or args.replicas:
        _eval_sharded(args, options)
        return
    workers = 0
    if args.ray:
        import ray

        connect_ray(args.address)
        workers = args.workers or max(int(ray.cluster_resources().get("CPU", 1) // args.cpus_per_worker), 1)
        print(f"scoring on {workers} Ray workers of {args.cpus_per_worker:g} CPU", file=sys.stderr)
    results = evaluate_checkpoint(args.checkpoint, options, workers=workers,
                                  cpus_per_worker=args.cpus_per_worker, tokenizer=args.tokenizer,
                                  device=args.device)
    _print_results(results, args.out)


def _print_results(results, out: str | None) -> None:
    print(results.table())
    if results.resident is not None:
        from raymoe.infer.group import format_resident

        print(format_resident(results.resident))
    out = out or f"eval-step{results.step}.json"
    results.save(out)
    print(f"{results.checkpoint} (step {results.step}): {results.seconds:.1f}s; results in {out}")


def _group_options(args: argparse.Namespace):
    from raymoe.infer.group import GroupOptions

    return GroupOptions(args.ep or 1, getattr(args, "replicas", None) or 1, args.cpus_per_rank,
                        args.device, args.tokenizer)


def _eval_sharded(args: argparse.Namespace, options) -> None:
    from raymoe.infer.evaluate import evaluate_sharded
    from raymoe.infer.group import check_group_shape
    from raymoe.runs import checkpoint_manifest

    group = _group_options(args)
    check_group_shape(checkpoint_manifest(args.checkpoint), group.ep, group.replicas)  # before Ray
    connect_ray(args.address)
    print(f"scoring on {group.replicas} group(s) of {group.ep} Ray actors of "
          f"{group.cpus_per_rank:g} CPU", file=sys.stderr)
    _print_results(evaluate_sharded(args.checkpoint, options, group), args.out)


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key or not value:
        raise RaymoeError(f"{flag} {item!r}: expected NAME=PATH")
    return key, value


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    import torch

    from raymoe.eval.loading import load_model
    from raymoe.model.generation import Sampling, generate
    from raymoe.model.precision import autocast

    sampling = Sampling(0.0 if args.greedy else args.temperature, args.top_k, args.top_p)
    if args.ep:
        _generate_sharded(args, sampling)
        return
    loaded = load_model(args.checkpoint, args.device, args.tokenizer)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode_batch([args.prompt])[0] or [tokenizer.eot_id]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.monotonic()
    with autocast(loaded.model.wte.weight.device):
        outputs = generate(loaded.model, [prompt] * args.num_samples, args.max_new_tokens, sampling,
                           use_cache=not args.no_cache, generator=generator,
                           is_done=lambda new: new[-1] == tokenizer.eot_id)
    seconds = time.monotonic() - start
    for i, tokens in enumerate(outputs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tokenizer.decode(t for t in tokens if t != tokenizer.eot_id))
    count = sum(len(t) for t in outputs)
    print(f"{count} tokens in {seconds:.2f}s ({count / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)


def _generate_sharded(args: argparse.Namespace, sampling) -> None:
    import time

    from raymoe.infer.group import InferenceGroups, check_group_shape, format_resident
    from raymoe.runs import checkpoint_manifest

    if args.no_cache:
        raise RaymoeError("--no-cache: not available with --ep (the group decodes with its KV cache)")
    group = _group_options(args)
    manifest = checkpoint_manifest(args.checkpoint)
    check_group_shape(manifest, group.ep)  # before Ray
    connect_ray(args.address)
    with InferenceGroups(manifest["uri"], group) as groups:
        start = time.monotonic()
        tokens = groups.generate_tokens(groups.encode([args.prompt]) * args.num_samples,
                                        args.max_new_tokens, sampling, args.seed)
        seconds = time.monotonic() - start
        for i, text in enumerate(groups.decode(tokens)):
            if args.num_samples > 1:
                print(f"--- sample {i + 1}")
            print(args.prompt + text)
        print(format_resident(groups.resident))
    count = sum(len(t) for t in tokens)
    print(f"{count} tokens in {seconds:.2f}s ({count / max(seconds, 1e-9):.1f} tokens/s) on "
          f"{group.ep} Ray actors", file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from raymoe.eval.export import export
    from raymoe.eval.loading import load_model

    loaded = load_model(args.checkpoint, "cpu", args.tokenizer)
    out = export(loaded, args.out, getattr(torch, args.dtype), int(args.max_shard_gb * 2**30))
    kind = "raymoe MoE safetensors" if loaded.config.model.moe.enabled else "Hugging Face GPT-2"
    print(f"exported {loaded.uri} (step {loaded.step}) as {kind}: {out}")
    if loaded.tokenizer.spec == "bytes":
        print("note: a byte-level model has no Hugging Face tokenizer; feed it UTF-8 bytes "
              f"(end of text = {loaded.tokenizer.eot_id})")


def _add_group_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int, default=None,
                        help="spread the experts over a group of this many Ray actors "
                             "(each holds the dense part and 1/N of the experts)")
    parser.add_argument("--cpus-per-rank", type=float, default=1.0,
                        help="with --ep: CPUs of each actor of the group")


def add_commands(sub: Subcommands) -> None:
    evaluate = sub.add_parser("eval", help="zero-shot evaluation of a checkpoint (LAMBADA, PIQA, "
                                           "BoolQ, RACE-h, TriviaQA, WebQuestions, or your own)")
    evaluate.add_argument("checkpoint", help="checkpoint or run directory (local or s3://)")
    evaluate.add_argument("--tasks", default=None,
                          help="comma-separated: lambada,piqa,boolq,race_h,triviaqa,webqs or the "
                               "name of a {query, choices, gold} jsonl task (default: the six)")
    evaluate.add_argument("--data-dir", default=os.environ.get("RAYMOE_EVAL_DATA"),
                          help="directory laid out as the published sets (default: RAYMOE_EVAL_DATA)")
    evaluate.add_argument("--task-file", action="append", default=[], metavar="NAME=PATH",
                          help="a task's file (repeatable); overrides --data-dir")
    evaluate.add_argument("--limit", type=int, default=None, help="first N examples of each task")
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--max-new-tokens", type=int, default=32, help="for triviaqa and webqs")
    evaluate.add_argument("--no-cache", action="store_true",
                          help="score choices without sharing the context's KV cache")
    evaluate.add_argument("--out", default=None, help="results JSON (default: eval-stepN.json)")
    evaluate.add_argument("--ray", action="store_true", help="spread the examples over Ray workers")
    evaluate.add_argument("--workers", type=int, default=0,
                          help="with --ray: how many (default: the cluster's CPUs / --cpus-per-worker)")
    evaluate.add_argument("--cpus-per-worker", type=float, default=1.0)
    evaluate.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    evaluate.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    evaluate.add_argument("--device", default="cpu", help="cpu or cuda")
    _add_group_arguments(evaluate)
    evaluate.add_argument("--replicas", type=int, default=None,
                          help="groups of --ep actors that split the examples (Ray)")
    evaluate.set_defaults(func=cmd_eval)

    gen = sub.add_parser("generate", help="generate text from a checkpoint (KV cache)")
    gen.add_argument("checkpoint", help="checkpoint or run directory (local or s3://)")
    gen.add_argument("prompt")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    gen.add_argument("--top-p", type=float, default=1.0, help="1.0: no nucleus filter")
    gen.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--no-cache", action="store_true", help="recompute every step (slow)")
    gen.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--address", default=None, help="with --ep: Ray cluster address (default: local)")
    _add_group_arguments(gen)
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="a checkpoint as safetensors: dense as a Hugging Face "
                                        "GPT-2 directory, MoE in raymoe's documented layout")
    exp.add_argument("checkpoint", help="checkpoint or run directory (local or s3://)")
    exp.add_argument("--format", choices=["hf"], default="hf")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    exp.add_argument("--max-shard-gb", type=float, default=5.0)
    exp.add_argument("--tokenizer", default=None, help="override the checkpoint's tokenizer")
    exp.set_defaults(func=cmd_export)
