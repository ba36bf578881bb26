"""Run a function on N local processes joined by a gloo process group (tests only)."""

from __future__ import annotations

import datetime
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raymoe.local_cluster import free_port

TIMEOUT = datetime.timedelta(seconds=20)  # a collective bug fails fast instead of hanging

multiprocessing.get_context("forkserver").set_forkserver_preload(
    ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "raymoe.model", "raymoe.parallel",
     "raymoe.train.step"])
"""Ranks are forked from a server process that imported these once (at the first run):
spawned ranks each imported them again, which was most of these tests' time (the gloo
tests of test_expert_parallel, test_sharding and test_checkpoint took 110 s spawned, 48 s
forked). The server is a fresh interpreter, not a fork of the test process and its Ray
connection; each rank takes the test process's environment as it is at the run."""


def _entry(rank: int, world_size: int, port: int, fn: Callable, out_dir: str, args: tuple,
           environ: dict[str, str]) -> None:
    os.environ.clear()
    os.environ.update(environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=TIMEOUT)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) on each rank; returns the ranks' results in order."""
    out_dir = tmp_path / f"results-{fn.__name__}-{world_size}"
    out_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_entry, args=(world_size, free_port(), fn, str(out_dir), args, dict(os.environ)),
                       nprocs=world_size, start_method="forkserver")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
