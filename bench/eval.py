"""Eval speed: scoring with the KV cache against without, and scoring spread over Ray
workers against one process, on real task files and the GPT-2 tokenizer.

    python bench/eval.py [--limit 64] [--d-model 256] [--layers 4]

With the cache, a multiple-choice question's context runs once and its choices share it;
without, every (context, choice) pair is a full forward. Generation with the cache feeds
one new token per step; without, it recomputes the whole sequence each step. Tokens per
second count the same tokens both ways: for choices, the tokens of every (context,
choice) pair; for generation, the tokens generated. The models are randomly initialised
(speed does not depend on the weights; generation runs to --max-new-tokens).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402

from raymoe.config import Config, load_config  # noqa: E402
from raymoe.eval.harness import EvalOptions, plan, score_chunk  # noqa: E402
from raymoe.eval.loading import load_model  # noqa: E402
from raymoe.eval.runner import evaluate_checkpoint  # noqa: E402
from raymoe.eval.scoring import Scorer  # noqa: E402
from raymoe.eval.tasks import ChoiceExample, GenerationExample  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.parallel.checkpoint import save_checkpoint  # noqa: E402
from raymoe.parallel.mesh import Mesh  # noqa: E402
from raymoe.runs import step_directory  # noqa: E402

EVAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def bench_config(args: argparse.Namespace, experts: int) -> Config:
    overrides = [f"model.d_model={args.d_model}", f"model.n_layer={args.layers}",
                 f"model.n_head={args.d_model // 64}", "model.seq_len=1024",
                 "model.vocab_size=50257"]
    if experts:
        overrides += [f"model.moe.num_experts={experts}", "model.moe.every=2"]
    return load_config("tiny", overrides)


def write_checkpoint(cfg: Config, root: Path) -> Path:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_checkpoint(step_directory(root, 1), model, Mesh(1),
                    extra={"config": cfg.to_dict(), "tokenizer": "gpt2", "step": 1})
    return root


def scored_tokens(scorer: Scorer, chunks) -> int:
    count = 0
    for chunk in chunks:
        for example in chunk.examples:
            if isinstance(example, ChoiceExample):
                pairs = scorer.encode_pairs([(example.context, " " + c) for c in example.choices])
                count += sum(len(c) + len(k) for c, k in pairs)
    return count


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cache_ratio(checkpoint: Path, task: str, options: EvalOptions) -> str:
    loaded = load_model(str(checkpoint))
    scorer = Scorer(loaded.model, loaded.tokenizer, options.batch_size)
    _, chunks = plan(EvalOptions([task], data_dir=str(EVAL_DATA), limit=options.limit))
    generation = isinstance(chunks[0].examples[0], GenerationExample)
    rates = {}
    for use_cache in (False, True):
        opts = EvalOptions([task], limit=options.limit, batch_size=options.batch_size,
                           use_cache=use_cache, max_new_tokens=options.max_new_tokens)
        score_chunk(scorer, chunks[0], opts)  # warm-up
        seconds = timed(lambda opts=opts: [score_chunk(scorer, c, opts) for c in chunks])
        examples = sum(len(c.examples) for c in chunks)
        tokens = examples * options.max_new_tokens if generation else scored_tokens(scorer, chunks)
        rates[use_cache] = tokens / seconds
    unit = "generated" if generation else "scored"
    return (f"{task:9s} {rates[False]:10.0f} {rates[True]:10.0f} {rates[True] / rates[False]:8.2f}"
            f"   ({unit} tokens/s)")


def ray_ratio(checkpoint: Path, options: EvalOptions, cpus: int) -> str:
    torch.set_num_threads(cpus)
    one = evaluate_checkpoint(str(checkpoint), options, show_progress=False)
    spread = evaluate_checkpoint(str(checkpoint), options, workers=cpus, cpus_per_worker=1,
                                 show_progress=False)
    same = all(abs(a.value - b.value) <= 1e-6 * max(1.0, abs(a.value))
               for a, b in zip(one.metrics, spread.metrics, strict=False))
    return (f"{'+'.join(options.tasks):24s} {one.seconds:8.1f}s {spread.seconds:8.1f}s "
            f"{one.seconds / spread.seconds:8.2f}   same numbers: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    cpus = min(os.cpu_count() or 1, 2)
    torch.set_num_threads(cpus)
    options = EvalOptions(["boolq", "piqa", "lambada", "triviaqa"], data_dir=str(EVAL_DATA),
                          limit=args.limit, batch_size=args.batch_size,
                          max_new_tokens=args.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"Eval scoring, CPU fp32, {cpus} threads, GPT-2 tokenizer, d_model {args.d_model}, "
              f"{args.layers} layers, first {args.limit} examples of each task")
        for experts in (0, 8):
            checkpoint = write_checkpoint(bench_config(args, experts), Path(tmp) / f"e{experts}")
            name = f"MoE-{experts}" if experts else "dense"
            print(f"{name}: KV cache against none\n{'task':9s} {'no cache':>10s} {'cache':>10s} {'ratio':>8s}")
            for task in ("boolq", "piqa", "triviaqa"):
                print(cache_ratio(checkpoint, task, options))
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        print(f"Ray: {cpus} workers of 1 CPU against one process of {cpus} threads (dense)")
        print(f"{'tasks':24s} {'one':>9s} {'ray':>9s} {'one/ray':>8s}")
        print(ray_ratio(Path(tmp) / "e0", options, cpus))
        ray.shutdown()


if __name__ == "__main__":
    main()
