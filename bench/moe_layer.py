"""Forward + backward time of raymoe's MoE layer against a dense FFN and DeepSpeed's MoE.

CPU, fp32, 8192 tokens, hidden 512, FFN 2048, capacity factor 1.0, experts 8, 32, 128.
The three layers run alternately in the same process; the table shows median ratios.
Peak memory of one forward + backward at the largest expert count is what torch allocates
during the step, from the profiler's memory events. Host syncs (ops that would make the
host wait for a GPU) are counted on CPU by raymoe.host_syncs, with and without dropping.

DeepSpeed (an optional reference, not a dependency) is set up first, under a time limit;
where it cannot start, the bench says why and prints our side.

    python bench/moe_layer.py [--reps 7] [--experts 8 32 128] [--no-deepspeed]
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import statistics
import time

import torch
from torch import nn

TOKENS, HIDDEN, FFN = 8192, 512, 2048


def dense_ffn() -> nn.Module:
    return nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(approximate="tanh"), nn.Linear(FFN, HIDDEN))


def ours(experts: int, drop_tokens: bool = True) -> nn.Module:
    from raymoe.config import MoEConfig
    from raymoe.model.moe import MoELayer

    layer = MoELayer(HIDDEN, FFN, MoEConfig(num_experts=experts, capacity_factor=1.0,
                                            min_capacity=4, use_rts=True, drop_tokens=drop_tokens))
    for p in layer.parameters():
        nn.init.normal_(p, std=0.02)
    return layer


DEEPSPEED_START_S = 180
"""Longer than this to set DeepSpeed up (import, process group, one layer): reported as not
started, and the table shows our side only."""


def deepspeed_moe(experts: int) -> nn.Module:
    import logging

    import deepspeed
    import deepspeed.comm as ds_comm
    import deepspeed.ops
    from deepspeed.moe.layer import MoE
    from deepspeed.utils import logger

    logger.setLevel(logging.ERROR)
    if not ds_comm.is_initialized():
        with socket.socket() as s:  # a free port: a fixed one hangs two runs at once
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        # Its shared-memory all-reduce kernel is of no use to one process, and building it
        # compiles a C++ extension for minutes on start-up (a build killed midway leaves
        # a lock in the extension cache on which every later start waits forever).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    layer = MoE(HIDDEN, dense_ffn(), num_experts=experts, ep_size=1, k=1, capacity_factor=1.0,
                min_capacity=4, use_rts=True)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.02)
    return layer


def output(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = layer(x)
    return y[0] if isinstance(y, tuple) else y


def step(layer: nn.Module, x: torch.Tensor) -> float:
    """One forward + backward against a fixed output gradient (no loss to allocate)."""
    start = time.perf_counter()
    output(layer, x).backward(_output_grad(x))
    layer.zero_grad(set_to_none=False)  # as a training loop does: keep the buffers
    return time.perf_counter() - start


_GRADS: dict[tuple[int, ...], torch.Tensor] = {}


def _output_grad(x: torch.Tensor) -> torch.Tensor:
    if x.shape not in _GRADS:
        _GRADS[x.shape] = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return _GRADS[x.shape]


def build(kind: str, experts: int) -> nn.Module:
    return {"dense": lambda e: dense_ffn(), "ours": ours, "deepspeed": deepspeed_moe}[kind](experts)


def start_deepspeed(experts: int) -> str | None:
    """None when DeepSpeed's MoE layer can be built here, else why not (first use only:
    afterwards its process group exists)."""
    def give_up(signum, frame):
        raise TimeoutError(f"no layer after {DEEPSPEED_START_S} s")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(DEEPSPEED_START_S)
    try:
        build("deepspeed", experts)
    except Exception as err:  # an ImportError, a failed build, the time-out: all mean "not here"
        return f"{type(err).__name__}: {err}".splitlines()[0]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return None


def time_table(expert_counts: list[int], reps: int, kinds: tuple[str, ...]) -> list[tuple[int, float, float, float]]:
    """Per expert count: ours/dense, deepspeed/dense, deepspeed/ours (NaN without DeepSpeed)."""
    rows = []
    for experts in expert_counts:
        torch.manual_seed(0)
        layers = {kind: build(kind, experts) for kind in kinds}
        x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
        for layer in layers.values():  # warm-up
            step(layer, x)
        times: dict[str, list[float]] = {kind: [] for kind in layers}
        for _ in range(reps):
            for kind, layer in layers.items():
                times[kind].append(step(layer, x))
        med = {kind: statistics.median(t) for kind, t in times.items()}
        ds = med.get("deepspeed", math.nan)
        rows.append((experts, med["ours"] / med["dense"], ds / med["dense"], ds / med["ours"]))
    return rows


def peak_memory_mib(layer: nn.Module, x: torch.Tensor) -> float:
    """Peak of the bytes torch allocates during one forward + backward (after a warm-up
    step, so gradient buffers already exist), read from the profiler's memory events."""
    import json
    import tempfile

    step(layer, x)
    with torch.profiler.profile(profile_memory=True,
                                activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(layer, x)
    with tempfile.NamedTemporaryFile(suffix=".json") as trace:
        prof.export_chrome_trace(trace.name)
        events = [e["args"] for e in json.load(open(trace.name))["traceEvents"]
                  if e.get("name") == "[memory]"]
    if not events:
        return 0.0
    start = events[0]["Total Allocated"] - events[0]["Bytes"]
    return (max(e["Total Allocated"] for e in events) - start) / 2**20


def host_syncs(experts: int, drop_tokens: bool) -> tuple[int, int]:
    """(forward, backward) host syncs of one step of our layer."""
    from raymoe.host_syncs import count_host_syncs

    layer = ours(experts, drop_tokens)
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    with count_host_syncs() as forward:
        y = output(layer, x)
    with count_host_syncs() as backward:
        y.backward(_output_grad(x))
    return forward.total, backward.total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--no-deepspeed", action="store_true", help="time our layer and the dense FFN only")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    print(f"MoE layer fwd+bwd, CPU fp32, {TOKENS} tokens, hidden {HIDDEN}, FFN {FFN}, "
          f"capacity factor 1.0, median of {args.reps}, {torch.get_num_threads()} threads")
    kinds: tuple[str, ...] = ("dense", "ours", "deepspeed")
    if args.no_deepspeed:
        kinds = kinds[:2]
        print("deepspeed: not run (--no-deepspeed); its columns read nan")
    elif (why := start_deepspeed(min(args.experts))) is not None:
        kinds = kinds[:2]
        print(f"deepspeed: could not start here ({why}); its columns read nan")
    print(f"{'experts':>8} {'ours/dense':>11} {'deepspeed/dense':>16} {'deepspeed/ours':>15}")
    for experts, ours_ratio, ds_ratio, speedup in time_table(args.experts, args.reps, kinds):
        print(f"{experts:>8} {ours_ratio:>11.3f} {ds_ratio:>16.3f} {speedup:>15.3f}")
    experts = max(args.experts)
    x = torch.randn(1, TOKENS, HIDDEN, requires_grad=True)
    mib = {kind: peak_memory_mib(build(kind, experts), x) for kind in kinds}
    deepspeed = (f", deepspeed {mib['deepspeed']:.0f} MiB, ours/deepspeed {mib['ours'] / mib['deepspeed']:.3f}"
                 if "deepspeed" in mib else "")
    print(f"peak memory of one fwd+bwd at {experts} experts: dense FFN {mib['dense']:.0f} MiB, "
          f"ours {mib['ours']:.0f} MiB{deepspeed}")
    dropping, no_drop = host_syncs(experts, True), host_syncs(experts, False)
    print(f"host syncs per MoE layer forward: dropping {dropping[0]}, no-drop {no_drop[0]}")
    print(f"host syncs per MoE layer backward: dropping {dropping[1]}, no-drop {no_drop[1]}")


if __name__ == "__main__":
    main()
