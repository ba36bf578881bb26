"""`raymoe serve`, batched against unbatched: requests/s and p50/p99 latency at 1, 8 and 32
concurrent HTTP clients, on the same application with batching on (--max-batch-size)
and off (a batch of 1).

    python bench/serve.py [CHECKPOINT] [--requests 96] [--max-tokens 32] [--ep 1] [--cpus-per-rank 1]

Without a checkpoint it writes a small byte-level MoE model, randomly initialised (speed
does not depend on the weights; bench/inference.py's shapes). Each client sends greedy
completions of random --prompt-byte prompts back to back, --requests of them in all per
run (at least 4 per client), after a warm-up. Prints one line per (mode, clients), then
the batched/unbatched ratios: of requests/s (above 1: batching serves more) and of p50
and p99 latency (below 1: batching answers sooner).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from inference import bench_config, write_checkpoint  # noqa: E402

from raymoe.local_cluster import free_port  # noqa: E402
from raymoe.serve import ServeOptions, serve_checkpoint  # noqa: E402

CLIENTS = tuple(int(c) for c in os.environ.get("BENCH_CLIENTS", "1,8,32").split(","))


@dataclass(frozen=True)
class Load:
    requests_per_s: float
    p50_s: float
    p99_s: float
    tokens_per_s: float
    rows_per_call: float
    """Prompts per generate call on the replica (1 without batching)."""


def complete(url: str, prompt: str, max_tokens: int) -> int:
    """One greedy completion; its generated tokens."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    request = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.load(reply)["usage"]["completion_tokens"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(round(q * (len(ordered) - 1)), len(ordered) - 1)]


def stats(url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{url}/v1/stats", timeout=60) as reply:
        return json.load(reply)


def run_load(url: str, prompts: list[str], clients: int, max_tokens: int) -> Load:
    latencies: list[float] = []
    tokens: list[int] = []
    before = stats(url)

    def client(mine: list[str]) -> None:
        for prompt in mine:
            start = time.perf_counter()
            tokens.append(complete(url, prompt, max_tokens))
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, [prompts[i::clients] for i in range(clients)]))
    seconds = time.perf_counter() - start
    after = stats(url)
    return Load(len(prompts) / seconds, percentile(latencies, 0.5), percentile(latencies, 0.99),
                sum(tokens) / seconds, (after["rows"] - before["rows"]) / (after["calls"] - before["calls"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default=None,
                        help="checkpoint or run directory (default: a small random MoE model)")
    parser.add_argument("--requests", type=int, default=96, help="per run (at least 4 per client)")
    parser.add_argument("--prompt", type=int, default=16, help="bytes of each random prompt")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32, help="of the batched application")
    parser.add_argument("--batch-wait", type=float, default=ServeOptions.batch_wait_s,
                        help="seconds a batch waits to fill (batched application)")
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--cpus-per-rank", type=float, default=1.0)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    checkpoint = args.checkpoint
    if checkpoint is None:
        cfg = bench_config(args.d_model, args.layers, args.experts, seq_len=args.prompt + args.max_tokens + 8)
        checkpoint, params = write_checkpoint(cfg, root / "moe")
        print(f"model: random byte-level MoE, d_model {args.d_model}, {args.layers} layers, {args.experts} "
              f"experts, {params / 1e6:.2f}M parameters", flush=True)
    ray.init(num_cpus=max(int(args.ep * args.cpus_per_rank), 1) + 1, include_dashboard=False,
             log_to_driver=False, _temp_dir=str(root / "ray"))
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    port = free_port()
    results: dict[tuple[str, int], Load] = {}
    for mode, batch in (("batched", args.max_batch_size), ("unbatched", 1)):
        options = ServeOptions(ep=args.ep, cpus_per_rank=args.cpus_per_rank, port=port, max_batch_size=batch,
                               batch_wait_s=args.batch_wait, app_name=f"bench-{mode}")
        served = serve_checkpoint(checkpoint, options, log=lambda line: print(line, file=sys.stderr))
        complete(served.url, "warm up", args.max_tokens)
        for clients in CLIENTS:
            prompts = ["".join(rng.choice(letters) for _ in range(args.prompt))
                       for _ in range(max(args.requests, 4 * clients))]
            load = results[mode, clients] = run_load(served.url, prompts, clients, args.max_tokens)
            print(f"{mode:<9} (max batch {batch:>2}) {clients:>2} clients: {load.requests_per_s:7.2f} requests/s, "
                  f"p50 {load.p50_s * 1e3:7.1f} ms, p99 {load.p99_s * 1e3:7.1f} ms, "
                  f"{load.tokens_per_s:8.1f} tokens/s, {load.rows_per_call:5.2f} prompts per generate call "
                  f"({len(prompts)} requests of {args.max_tokens} tokens)",
                  flush=True)
        served.shutdown()
    ray.shutdown()
    for clients in CLIENTS:
        on, off = results["batched", clients], results["unbatched", clients]
        print(f"batched/unbatched {clients:>2} clients: RATIO requests/s {on.requests_per_s / off.requests_per_s:.2f}, "
              f"p50 latency {on.p50_s / off.p50_s:.2f}, p99 latency {on.p99_s / off.p99_s:.2f}")


if __name__ == "__main__":
    main()
