"""The ``raymoe`` command."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from raymoe.config import ConfigError, load_config
from raymoe.console import connect_ray
from raymoe.errors import RaymoeError, find_cause
from raymoe.jobs import KINDS
from raymoe.plan import CLUSTER_YAML, HARDWARE

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


def plan_options() -> argparse.ArgumentParser:
    """`raymoe plan`'s overrides and options, which may come in any order
    (`raymoe plan gpt-6.7b --gpu a100-40gb parallel.shard=none`)."""
    options = argparse.ArgumentParser(prog="raymoe plan CONFIG", add_help=False)
    options.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.shard=fsdp")
    options.add_argument("--gpu", choices=list(HARDWARE), default="a100-40gb",
                         help="the GPU type (default: the cluster YAML's A100 40GB)")
    options.add_argument("--workers", type=int, default=None,
                         help="GPUs of the run (default: parallel.num_workers; elastic: its MAX)")
    options.add_argument("--cluster", default=str(CLUSTER_YAML),
                         help="cluster YAML whose GPU instance type prices the run")
    options.add_argument("--price-per-hour", type=float, default=None,
                         help="USD per instance-hour instead of the on-demand list price")
    return options


def cmd_plan(args: argparse.Namespace) -> None:
    """Memory, time and cost on a GPU type; exit 3 when the config does not fit."""
    from raymoe.plan import format_plan, make_plan

    options = plan_options().parse_intermixed_args(args.rest)
    cfg = load_config(args.config, options.overrides)
    plan = make_plan(cfg, options.gpu, options.workers, Path(options.cluster), options.price_per_hour)
    print(format_plan(plan))
    if not plan.fits:
        raise SystemExit(3)


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


def cmd_demo(args: argparse.Namespace) -> None:
    """Prepare the bundled sample (once), then train a tiny MoE GPT on 2 Ray workers."""
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


def cmd_prepare(args: argparse.Namespace) -> None:
    from raymoe.data.prepare import PrepareOptions, prepare

    connect_ray(args.address)
    prepare(PrepareOptions(inputs=args.inputs, output=args.out, tokenizer=args.tokenizer,
                           seq_len=args.seq_len, val_fraction=args.val_fraction, seed=args.seed,
                           text_field=args.text_field, doc_chars=args.doc_chars,
                           shard_bytes=int(args.shard_mb * 2**20),
                           row_group_bytes=int(args.row_group_kb * 2**10)))


def cmd_compare(args: argparse.Namespace) -> None:
    from raymoe.data.shards import PreparedDataset
    from raymoe.study.run import run_study
    from raymoe.study.spec import load_study

    study = load_study(args.study)
    PreparedDataset.open(study.data)  # before Ray: a missing dataset is one line, not a failed trial each
    connect_ray(args.address, num_cpus=4)
    report = run_study(study, wait=args.wait, timeout=args.timeout)
    print(report.table())
    for line in report.comparisons:
        print(line)
    if report.eval_tasks:
        print(report.table1())
        for line in report.eval_failures:
            print(line)
    print(f"report, plot and CSV in {study.uri}")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from raymoe.data.prepare import list_inputs, read_documents
    from raymoe.data.tokenizers import train_tokenizer

    texts = (text for uri in list_inputs(args.inputs)
             for _, text in read_documents(uri, args.text_field, 0))
    tokenizer = train_tokenizer(texts, args.vocab_size, args.out)
    print(f"trained a byte-level BPE of {tokenizer.vocab_size:,} tokens: {args.out}")


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


def _jobs(args: argparse.Namespace):
    import os

    from raymoe.jobs import RaymoeJobs

    return RaymoeJobs(args.address, token=args.token or os.environ.get("RAY_AUTH_TOKEN"))


def cmd_submit(args: argparse.Namespace) -> None:
    from raymoe.jobs import read_env_file

    env_vars = read_env_file(args.env_file) if args.env_file else None
    train = None
    if args.kind == "train":  # train's own parsing (before any job server), for the run's directory
        train = build_parser().parse_args(["train", *args.args])
    jobs = _jobs(args)
    if train is not None:
        options = args.args[:]
        for positional in (train.config, *train.overrides):
            options.remove(positional)
        job_id = jobs.submit_train(train.config, train.overrides, options, working_dir=args.working_dir,
                                   entrypoint_num_gpus=args.entrypoint_gpus, env_vars=env_vars)
    else:
        job_id = jobs.submit(args.kind, args.args, working_dir=args.working_dir, env_vars=env_vars)
    print(f"submitted {args.kind} job {job_id} to {args.address}")
    if args.follow:
        for chunk in jobs.follow(job_id):
            print(chunk, end="")
        print(f"job {job_id}: {jobs.status(job_id)}")


def cmd_status(args: argparse.Namespace) -> None:
    info = _jobs(args).info(args.job_id)
    print(f"{info.job_id}: {info.status} ({info.kind} {info.config}) {info.message}".rstrip())


def cmd_logs(args: argparse.Namespace) -> None:
    jobs = _jobs(args)
    if args.follow:
        for chunk in jobs.follow(args.job_id):
            print(chunk, end="")
    else:
        print(jobs.logs(args.job_id), end="")


def cmd_stop(args: argparse.Namespace) -> None:
    stopped = _jobs(args).stop(args.job_id)
    print(f"{args.job_id}: {'stopping' if stopped else 'already finished'}")


def cmd_jobs(args: argparse.Namespace) -> None:
    for info in _jobs(args).list():
        print(f"{info.job_id}  {info.status:9s}  {info.kind:8s}  {info.config:24s}  {info.run_dir}")


def add_wait_options(command: argparse.ArgumentParser) -> None:
    """When the cluster is too small for a worker group: wait for it to grow or fail."""
    wait = command.add_mutually_exclusive_group()
    wait.add_argument("--wait", dest="wait", action="store_const", const="wait", default="auto",
                      help="wait for nodes to join (default: when the cluster has an autoscaler)")
    wait.add_argument("--no-wait", dest="wait", action="store_const", const="no-wait",
                      help="fail at once, naming the numbers, when the cluster is too small")
    command.add_argument("--timeout", type=float, default=1800.0,
                         help="seconds to wait for the worker group's nodes (default 1800)")


def _add_group_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ep", type=int, default=None,
                        help="spread the experts over a group of this many Ray actors "
                             "(each holds the dense part and 1/N of the experts)")
    parser.add_argument("--cpus-per-rank", type=float, default=1.0,
                        help="with --ep: CPUs of each actor of the group")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raymoe", description=__doc__)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of every error (also RAYMOE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="shape and parameter counts of a preset or YAML config")
    info.add_argument("config", help="preset name or YAML file")
    info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.moe.num_experts=32")
    info.set_defaults(func=cmd_info)

    plan = sub.add_parser("plan", help="per-GPU memory, step time, MFU and cost of a config on a "
                                       "GPU type (exit 3 when it does not fit)",
                          epilog=plan_options().format_help(),
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("config", help="preset name or YAML file")
    plan.add_argument("rest", nargs=argparse.REMAINDER, metavar="...",
                      help="dotted overrides and the options below, in any order")
    plan.set_defaults(func=cmd_plan)

    train = sub.add_parser("train", help="train on a Ray Train worker group (resumes a run "
                                          "of the same name and storage)")
    train.add_argument("config", help="preset name or YAML file")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    train.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    add_wait_options(train)
    train.set_defaults(func=cmd_train)

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

    compare = sub.add_parser("compare", help="the dense-versus-MoE study (Ray Tune) and its report")
    compare.add_argument("study", help="study YAML, e.g. jobs/configs/study-tiny.yaml")
    compare.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    add_wait_options(compare)
    compare.set_defaults(func=cmd_compare)

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

    def job_command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("--address", default="http://127.0.0.1:8265",
                             help="the cluster's job server (through `ray dashboard` or a port-forward)")
        command.add_argument("--token", default=None,
                             help="the cluster's auth token (default: RAY_AUTH_TOKEN)")
        command.set_defaults(func=func)
        return command

    submit = job_command("submit", "submit raymoe work to a Ray cluster as a Ray job", cmd_submit)
    submit.description = ("Submit `raymoe KIND ARGS...` as a Ray job. submit's own options may "
                          "come before or after the kind; every other argument is the command's "
                          "(after --, all of them are). --help shows this and submits nothing.")
    submit.allow_abbrev = False  # a command's option is never taken for an abbreviated one of submit's
    submit.add_argument("kind", choices=sorted(KINDS),
                        help="the command to run; its arguments follow (see `raymoe KIND --help`)")
    submit.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir")
    submit.add_argument("--entrypoint-gpus", type=float, default=0)
    submit.add_argument("--env-file", default=None, metavar="FILE",
                        help="NAME=VALUE lines for the job's environment (cluster/efa.env: NCCL over EFA)")
    submit.add_argument("--follow", action="store_true", help="stream the logs until it ends")
    for name, help_text, func in (("status", "a job's status", cmd_status),
                                  ("stop", "stop a job", cmd_stop)):
        job_command(name, help_text, func).add_argument("job_id")
    logs = job_command("logs", "a job's logs", cmd_logs)
    logs.add_argument("job_id")
    logs.add_argument("--follow", action="store_true")
    job_command("jobs", "the cluster's raymoe jobs", cmd_jobs)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="action", required=True)
    train_tok = tok.add_parser("train", help="train a byte-level BPE on a corpus")
    train_tok.add_argument("inputs", nargs="+")
    train_tok.add_argument("--vocab-size", type=int, default=8192)
    train_tok.add_argument("--out", required=True, help="where to write tokenizer.json")
    train_tok.add_argument("--text-field", default="text")
    train_tok.set_defaults(func=cmd_tokenizer_train)
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
