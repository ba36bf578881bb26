"""MoE versus dense inference, and MoE inference on more devices: generated tokens/s and
per-token latency with the KV cache, and scoring tokens/s, for the dense base, the MoE
model (base + experts) at EP 1, 2 and 4 (inference groups of Ray actors), and a dense
model of about 5x the base's parameters (the quality-equivalent dense model in the
reference).

    python bench/inference.py [--cpus-per-rank 1] [--d-model 128] [--layers 4] [--experts 8]

A rank stands for one device: every actor gets --cpus-per-rank CPUs and as many threads,
so that EP N computes on N times the resources of EP 1 (a dense model runs on one rank).
Batches of 1, 8, 32 and 64 random prompts generate --new-tokens tokens each (no early stop);
scoring is the log-likelihood of --score-pairs random (context, continuation) pairs of
--score-len tokens, --score-batch rows per forward on each rank (thousands of tokens per
forward). Every configuration's group is held for the whole run, and each figure is the
best of --repeats rounds that run every configuration in turn. Prints one line per
(model, batch) and one per model for scoring; how much 2 processes gain over one on this
machine, at the start and at the end (other work on a shared machine lowers it, and
EP2/EP1 with it), and how busy the machine is while the groups are held idle; then the
ratios of tokens/s: MoE / dense-5x and MoE / dense-base per batch size and for scoring
(above 1: the MoE model is faster), and MoE at EP N / EP 1 (above 1: the group is faster
than one rank); last, what bounds EP 2 at batch 64 here: one rank's step at 32 rows plus
the exchanges of a token step, each at least a block exchange's latency between 2 Ray
actors through shared memory, as the groups exchange on one host (measured before the
groups start, with gloo's beside it). The models are randomly initialised (speed does
not depend on the weights) and byte-level, so that the output layer stays small beside
the feed-forward layers.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from raymoe.config import Config, load_config  # noqa: E402
from raymoe.eval.scoring import TokenPair  # noqa: E402
from raymoe.infer.group import GroupOptions, InferenceGroups  # noqa: E402
from raymoe.local_cluster import free_port  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.model.dispatch import block_exchange_bytes  # noqa: E402
from raymoe.model.generation import Sampling  # noqa: E402
from raymoe.parallel.checkpoint import save_checkpoint  # noqa: E402
from raymoe.parallel.exchange import ProcessGroupExchange  # noqa: E402
from raymoe.parallel.mesh import Mesh  # noqa: E402
from raymoe.parallel.shared_memory import SharedMemoryAllToAll  # noqa: E402
from raymoe.runs import step_directory  # noqa: E402

BATCHES = (1, 8, 32, 64)
EP_SIZES = (1, 2, 4)
SCORING = "scoring"
"""The key of the scoring figure among a model's (the others are batch sizes)."""


def bench_config(d_model: int, layers: int, experts: int, seq_len: int) -> Config:
    overrides = [f"model.d_model={d_model}", f"model.n_layer={layers}",
                 f"model.n_head={max(d_model // 64, 1)}", f"model.seq_len={seq_len}",
                 "model.vocab_size=257"]
    if experts:
        overrides += [f"model.moe.num_experts={experts}", "model.moe.every=2"]
    return load_config("tiny", overrides)


def write_checkpoint(cfg: Config, root: Path) -> tuple[str, int]:
    torch.manual_seed(0)
    model = GPT(cfg.model)
    save_checkpoint(step_directory(root, 1), model, Mesh(1),
                    extra={"config": cfg.to_dict(), "tokenizer": "bytes", "step": 1})
    return str(step_directory(root, 1)), model.num_parameters()


@dataclass
class Workload:
    """What every configuration runs: prompts per batch size, and scored pairs."""

    prompts: dict[int, list[list[int]]]
    pairs: list[TokenPair]

    @staticmethod
    def random(args: argparse.Namespace) -> Workload:
        rng = random.Random(0)

        def tokens(n: int) -> list[int]:
            return [rng.randrange(256) for _ in range(n)]

        continuation = args.score_len // 8
        return Workload({batch: [tokens(args.prompt) for _ in range(batch)] for batch in BATCHES},
                        [(tokens(args.score_len - continuation), tokens(continuation))
                         for _ in range(args.score_pairs)])


def seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_once(groups: InferenceGroups, work: Workload, args: argparse.Namespace) -> dict[int | str, float]:
    """Tokens/s: per batch size, of generated tokens; for SCORING, of scored input tokens."""
    tokens_per_s: dict[int | str, float] = {}
    for batch, prompts in work.prompts.items():
        generate = partial(groups.generate_tokens, prompts, args.new_tokens, Sampling(), stop_at_eot=False)
        tokens_per_s[batch] = batch * args.new_tokens / seconds(generate)
    score = partial(groups.loglikelihoods, work.pairs, args.score_batch)
    tokens_per_s[SCORING] = len(work.pairs) * (args.score_len - 1) / seconds(score)
    return tokens_per_s


def measure(groups: dict[str, InferenceGroups], args: argparse.Namespace) -> dict[str, dict[int | str, float]]:
    """The best tokens/s of each configuration over --repeats rounds, each round running
    every configuration in turn: a burst of other work on a shared machine hits them alike."""
    work = Workload.random(args)
    for group in groups.values():  # warm-up, with a row on every rank
        group.generate_tokens([[1] * args.prompt] * max(EP_SIZES), 2, Sampling(), stop_at_eot=False)
    best: dict[str, dict[int | str, float]] = {label: {} for label in groups}
    for _ in range(args.repeats):
        for label, group in groups.items():
            for key, per_s in measure_once(group, work, args).items():
                best[label][key] = max(per_s, best[label].get(key, 0.0))
    return best


def _matmuls_per_s(seconds: float, queue: Any) -> None:
    torch.set_num_threads(1)
    a, w = torch.randn(64, 128), torch.randn(128, 512)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, w)
        count += 1
    queue.put(count / (time.perf_counter() - start))


def parallel_headroom(processes: int, seconds: float = 1.0) -> float:
    """The matmul throughput of ``processes`` concurrent single-thread processes, in units
    of one process's (``processes`` where that many cores are free): the most a group of
    that many ranks can gain over one on this machine, now."""
    context = multiprocessing.get_context("fork")  # no Ray running: before init, after shutdown

    def throughput(count: int) -> float:
        queue = context.Queue()
        workers = [context.Process(target=_matmuls_per_s, args=(seconds, queue)) for _ in range(count)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(queue.get() for _ in workers)

    return throughput(processes) / throughput(1)


class ExchangeProbe:
    """One of 2 Ray actors timing a decode step's block exchange (ProcessGroupExchange's,
    what a group's ranks call) between them: over gloo, and through shared memory."""

    def __init__(self, rank: int, threads: int):
        torch.set_num_threads(threads)
        self.rank = rank

    def join(self, port: int) -> None:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=self.rank, world_size=2)

    def seconds_per_call(self, rows: int, d_model: int, calls: int) -> dict[str, float]:
        assert dist.group.WORLD is not None, "join first"
        exchange = ProcessGroupExchange(dist.group.WORLD, 2, self.rank)
        blocks = torch.zeros(block_exchange_bytes(2, rows // 2, d_model, 4), dtype=torch.uint8)
        seconds = {}
        for way, shared in (("gloo", None), ("shared memory", SharedMemoryAllToAll.connect(dist.group.WORLD))):
            exchange.shared = shared
            for _ in range(calls // 10):  # warm-up
                exchange.exchange_blocks(blocks)
            start = time.perf_counter()
            for _ in range(calls):
                exchange.exchange_blocks(blocks)
            seconds[way] = (time.perf_counter() - start) / calls
        dist.destroy_process_group()
        return seconds


def exchange_latency(rows: int, d_model: int, cpus_per_rank: int, calls: int = 300) -> dict[str, float]:
    """Seconds per block exchange of ``rows`` rows (half from each) between 2 Ray actors of
    the inference groups' size, back to back, over gloo and through shared memory (what the
    groups use on one host): what each of an EP 2 group's exchanges costs at least here."""
    probe = ray.remote(num_cpus=cpus_per_rank)(ExchangeProbe)
    ranks = [probe.remote(rank, cpus_per_rank) for rank in range(2)]
    port = free_port()
    ray.get([rank.join.remote(port) for rank in ranks])
    seconds = ray.get([rank.seconds_per_call.remote(rows, d_model, calls) for rank in ranks])[0]
    for rank in ranks:
        ray.kill(rank)
    return seconds


def background_line(seconds: float = 5.0) -> str:
    """How much of the machine is busy while every group is held and none works: Ray's own
    processes (every actor's threads, the raylet, the GCS) and the system's. A group of 2
    computes on both cores and shares them with it; one rank leaves it a core."""
    busy = psutil.cpu_percent(interval=seconds) / 100 * psutil.cpu_count()
    return (f"background: {busy:.2f} of {psutil.cpu_count()} cores busy while every group is held idle "
            "(Ray's own processes and the system's), which a group of 2 shares with its ranks")


def headroom_line(when: str) -> str:
    return (f"parallel headroom {when}: 2 single-thread processes do {parallel_headroom(2):.2f}x "
            "the work of one (2.00 on 2 free cores; the bound of EP2/EP1)")


def open_groups(stack: contextlib.ExitStack, shapes: dict[str, tuple[int, int]], args: argparse.Namespace,
                root: Path) -> tuple[dict[str, InferenceGroups], dict[str, int]]:
    """A group per configuration (MoE at each EP size), and each one's parameter count."""
    seq_len = max(args.prompt + args.new_tokens, args.score_len)
    groups: dict[str, InferenceGroups] = {}
    params: dict[str, int] = {}
    for name, (d_model, experts) in shapes.items():
        checkpoint, count = write_checkpoint(bench_config(d_model, args.layers, experts, seq_len), root / name)
        for ep in (EP_SIZES if experts else (1,)):
            label = f"{name}@ep{ep}" if experts else name
            options = GroupOptions(ep, 1, cpus_per_rank=args.cpus_per_rank)
            groups[label], params[label] = stack.enter_context(InferenceGroups(checkpoint, options)), count
    return groups, params


def print_results(results: dict[str, dict[int | str, float]], params: dict[str, int],
                  args: argparse.Namespace) -> None:
    for label, per_s in results.items():
        for batch in BATCHES:
            print(f"{label:<12} params {params[label] / 1e6:7.2f}M batch {batch:>3}: {per_s[batch]:9.1f} "
                  f"tokens/s, {1e3 * batch / per_s[batch]:8.2f} ms/token step")
        print(f"{label:<12} params {params[label] / 1e6:7.2f}M scoring  : {per_s[SCORING]:9.1f} tokens/s "
              f"({args.score_pairs} pairs of {args.score_len} tokens, {args.score_batch} rows per forward "
              "per rank)")


def ratio_line(what: str, ratios: dict[str, float]) -> str:
    return f"{what}: RATIO tokens/s " + ", ".join(f"{name} {r:.2f}" for name, r in ratios.items())


def print_ratios(results: dict[str, dict[int | str, float]]) -> None:
    for key in (*BATCHES, SCORING):
        what = SCORING + "  " if key == SCORING else f"batch {key:>3}"
        moe = {ep: results[f"moe@ep{ep}"][key] for ep in EP_SIZES}
        for ep in EP_SIZES:
            print(ratio_line(f"{what} moe@ep{ep}", {"moe/dense-5x": moe[ep] / results["dense-5x"][key],
                                                    "moe/dense-base": moe[ep] / results["dense-base"][key]}))
        print(ratio_line(f"{what} moe", {f"EP{ep}/EP1": moe[ep] / moe[1] for ep in EP_SIZES[1:]}))


def decode_bound_line(results: dict[str, dict[int | str, float]], latency: dict[str, float],
                      moe_layers: int) -> str:
    """What bounds EP 2 at batch 64 here: each rank computes 32 rows, as one rank does at
    batch 32, and adds its exchanges (2 per MoE layer a token step once the group agreed
    its block size: tokens out, results back), each at least the measured latency."""
    def step_ms(label: str, batch: int) -> float:
        return 1e3 * batch / results[label][batch]

    half, whole, measured = step_ms("moe@ep1", 32), step_ms("moe@ep1", 64), step_ms("moe@ep2", 64)
    exchanges, shared = 2 * moe_layers, latency["shared memory"] * 1e3
    return (f"batch  64 moe@ep2, its bound: EP1's step at 32 rows {half:.2f} ms + {exchanges} exchanges x "
            f"{shared:.3f} ms (a block exchange of 64 rows between 2 Ray actors through shared memory, "
            f"measured; over gloo {latency['gloo'] * 1e3:.3f} ms) = {half + exchanges * shared:.2f} ms, "
            f"against EP1's step at 64 rows {whole:.2f} ms (EP2's measured step: {measured:.2f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpus-per-rank", type=int, default=1)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--score-pairs", type=int, default=512)
    parser.add_argument("--score-len", type=int, default=128)
    parser.add_argument("--score-batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    d5 = 64 * round(args.d_model * math.sqrt(5) / 64)  # ~5x the parameters at the same depth
    root = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    shapes = {"dense-base": (args.d_model, 0), "moe": (args.d_model, args.experts),
              "dense-5x": (d5, 0)}
    print(headroom_line("before"), flush=True)
    ray.init(num_cpus=(sum(EP_SIZES) + 2) * args.cpus_per_rank, include_dashboard=False,
             log_to_driver=False, _temp_dir=str(root / "ray"))
    latency = exchange_latency(64, args.d_model, args.cpus_per_rank)
    with contextlib.ExitStack() as stack:
        groups, params = open_groups(stack, shapes, args, root)
        results = measure(groups, args)
        background = background_line()
    print_results(results, params, args)
    ray.shutdown()
    print(headroom_line("after"))
    print(background)
    print_ratios(results)
    print(decode_bound_line(results, latency, args.layers // 2))  # bench_config: every other layer


if __name__ == "__main__":
    main()
