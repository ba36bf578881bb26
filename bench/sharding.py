"""Sharded data parallelism on 4 processes (gloo, CPU): per-rank peak memory and tokens/s
of training steps of a small MoE GPT with shard none against shard fsdp (FSDP2), at the
same global batch and EP size, their ratios, and the planner's predicted peaks
(raymoe.plan.estimate_memory for fp32 on CPU at 4 workers) beside the measurements.

Per-rank peak = the bytes the rank holds between steps (its parameters, gradients and
AdamW states, as local tensors) + the most torch allocated on top of them during one step
(the profiler's memory events). Both modes run in the same processes, one after the other.

    python bench/sharding.py [--steps 6] [--experts 8] [--d-model 256] [--ep 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymoe.config import Config, load_config  # noqa: E402
from raymoe.local_cluster import free_port  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.parallel import Mesh  # noqa: E402
from raymoe.parallel.shard import shard_model  # noqa: E402
from raymoe.plan import estimate_memory  # noqa: E402
from raymoe.train.optim import build_optimizer  # noqa: E402
from raymoe.train.step import train_step  # noqa: E402

WORLD = 4


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def held_bytes(model: GPT, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, gradients and optimizer states this rank holds."""
    total = 0
    for p in model.parameters():
        total += _local(p).nbytes + (_local(p.grad).nbytes if p.grad is not None else 0)
        total += sum(_local(v).nbytes for v in optimizer.state[p].values())
    return total


def transient_peak_bytes(run_step) -> int:
    """The most torch allocated during ``run_step`` beyond what was allocated before."""
    with torch.profiler.profile(profile_memory=True,
                                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_step()
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = [e["args"] for e in json.load(open(trace.name))["traceEvents"]
                  if e.get("name") == "[memory]"]
    if not events:
        return 0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return max(e["Total Allocated"] for e in events) - start


def bench_config(args: argparse.Namespace, shard: str = "none") -> Config:
    return load_config("tiny-moe8", [
        f"model.moe.num_experts={args.experts}", f"model.d_model={args.d_model}",
        "model.seq_len=256", f"parallel.ep_size={args.ep}", f"parallel.num_workers={WORLD}",
        f"parallel.shard={shard}", f"train.micro_batch={args.micro_batch}",
        f"train.global_batch={args.micro_batch * WORLD}"])


def run(rank: int, port: int, args: argparse.Namespace, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    cfg = bench_config(args)
    mesh = Mesh(args.ep)
    g = torch.Generator().manual_seed(rank)
    out = {}
    for shard in ("none", "fsdp"):
        torch.manual_seed(0)
        model = GPT(cfg.model, mesh.expert_exchange())
        if shard == "fsdp":
            shard_model(model, mesh)
        optimizer = build_optimizer(model, cfg.optim)

        def step(model: GPT = model, optimizer: torch.optim.Optimizer = optimizer) -> None:
            data = torch.randint(0, cfg.model.vocab_size, (args.micro_batch, cfg.model.seq_len + 1),
                                 generator=g)
            train_step(model, optimizer, mesh, [(data[:, :-1], data[:, 1:])], cfg.optim.grad_clip)

        step()  # warm-up: gradients and optimizer states exist from here on
        peak = held_bytes(model, optimizer) + transient_peak_bytes(step)
        times = []
        for _ in range(args.steps):
            dist.barrier()
            start = time.perf_counter()
            step()
            dist.barrier()
            times.append(time.perf_counter() - start)
        peaks = [torch.zeros(WORLD, dtype=torch.int64)]
        dist.all_gather_into_tensor(peaks[0], torch.tensor([peak], dtype=torch.int64))
        out[shard] = {"peak": max(peaks[0].tolist()),
                      "tokens_per_s": WORLD * args.micro_batch * cfg.model.seq_len / statistics.median(times)}
    if rank == 0:
        out["params"] = model.num_parameters()
        results.put(out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=run, args=(r, port, args, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    out = results.get(timeout=1800)
    for p in procs:
        p.join()
    none, fsdp = out["none"], out["fsdp"]
    print(f"sharding on {WORLD} gloo processes, tiny-moe8 at d_model {args.d_model}, "
          f"{args.experts} experts, EP {args.ep}, seq 256, micro-batch {args.micro_batch}, "
          f"{out['params']:,} parameters, median of {args.steps} steps")
    predicted = {shard: estimate_memory(bench_config(args, shard), gpu="cpu", workers=WORLD).peak
                 for shard in ("none", "fsdp")}
    print(f"{'shard':>6} {'peak MiB/rank':>14} {'planner MiB':>12} {'tokens/s':>9}")
    for name, row in (("none", none), ("fsdp", fsdp)):
        print(f"{name:>6} {row['peak'] / 2**20:>14.1f} {predicted[name] / 2**20:>12.1f} "
              f"{row['tokens_per_s']:>9.0f}")
    print(f"fsdp/none: peak memory {fsdp['peak'] / none['peak']:.3f} "
          f"(planner {predicted['fsdp'] / predicted['none']:.3f}), "
          f"tokens/s {fsdp['tokens_per_s'] / none['tokens_per_s']:.3f}")


if __name__ == "__main__":
    main()
