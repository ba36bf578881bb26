"""Expert parallelism on 2 processes (gloo, CPU): tokens/s of a forward + backward of the
tiny MoE GPT with EP 2 against EP 1 (experts replicated) at the same global batch, and the
share of the EP 2 step spent in all-to-all.

    python bench/expert_parallel.py [--steps 10] [--experts 8] [--d-model 256]
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymoe.config import load_config  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.parallel import Mesh  # noqa: E402
from raymoe.parallel.grads import reduce_gradients  # noqa: E402

WORLD = 2


def run(rank: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    cfg = load_config("tiny-moe8", [f"model.moe.num_experts={args.experts}",
                                    f"model.d_model={args.d_model}", "model.seq_len=256"])
    meshes = {ep: Mesh(ep) for ep in (1, 2)}
    models = {}
    for ep, mesh in meshes.items():
        torch.manual_seed(0)
        models[ep] = GPT(cfg.model, mesh.expert_exchange())
    g = torch.Generator().manual_seed(rank)
    local_batch = args.global_batch // WORLD
    data = torch.randint(0, cfg.model.vocab_size, (local_batch, cfg.model.seq_len + 1), generator=g)
    inputs, targets = data[:, :-1], data[:, 1:]
    times: dict[int, list[float]] = {1: [], 2: []}
    reduce_times: dict[int, list[float]] = {1: [], 2: []}
    exchange_seconds = 0.0
    for step in range(args.steps + 2):  # two warm-up steps
        for ep, model in models.items():
            exchanges = [layer.exchange for layer in model.moe_layers]
            before = sum(getattr(e, "seconds", 0.0) for e in exchanges)
            dist.barrier()
            start = time.perf_counter()
            model(inputs, targets).loss.backward()
            dist.barrier()
            elapsed = time.perf_counter() - start
            reduce_gradients(model, meshes[ep])
            dist.barrier()
            reduced = time.perf_counter() - start - elapsed
            model.zero_grad(set_to_none=False)
            if step >= 2:
                times[ep].append(elapsed)
                reduce_times[ep].append(reduced)
                if ep == 2:
                    exchange_seconds += sum(e.seconds for e in exchanges) - before
    if rank == 0:
        tokens = args.global_batch * cfg.model.seq_len
        full = {f"full{ep}": tokens / statistics.median([a + b for a, b in zip(t, reduce_times[ep], strict=False)])
                for ep, t in times.items()}
        results.put({ep: tokens / statistics.median(t) for ep, t in times.items()} | full
                    | {"a2a_share": exchange_seconds / sum(times[2])})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=16)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=run, args=(rank, port, args, results)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    out = results.get(timeout=600)
    for p in procs:
        p.join()
    print(f"tiny MoE GPT fwd+bwd on {WORLD} processes (gloo, CPU, 1 thread each), "
          f"{args.experts} experts, d_model {args.d_model}, global batch {args.global_batch} x 256 tokens")
    print(f"tokens/s EP 1 (experts replicated): {out[1]:,.0f}")
    print(f"tokens/s EP 2 (experts split):      {out[2]:,.0f}")
    print(f"EP 2 / EP 1 throughput ratio: {out[2] / out[1]:.3f}")
    print(f"share of the EP 2 step in all-to-all: {out['a2a_share']:.1%}")
    print(f"with gradient reduction (EP 1 all-reduces every expert, EP 2 none here): "
          f"EP 2 / EP 1 = {out['full2'] / out['full1']:.3f}")


if __name__ == "__main__":
    main()
