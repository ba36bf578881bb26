"""Checkpoint I/O per rank on 4 processes (gloo, CPU) at EP 2: the bytes each rank writes
and, on resume at the same layout, the bytes it reads (manifest, DCP index, dense items,
its EP block of experts, its rank file) against the whole checkpoint, which is what every
rank downloaded before (Ray's Checkpoint.to_directory).

    python bench/checkpoint_io.py [--experts 8] [--d-model 128] [--ep 2] [--shard fsdp]

With shard none every rank reads the whole dense state (it holds it); with fsdp, its shard.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raymoe.config import load_config  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.parallel import Mesh  # noqa: E402
from raymoe.parallel.checkpoint import CheckpointSource, mib, save_checkpoint  # noqa: E402
from raymoe.parallel.shard import shard_model  # noqa: E402
from raymoe.train.optim import build_optimizer  # noqa: E402
from raymoe.train.step import train_step  # noqa: E402

WORLD = 4


def build(cfg, mesh: Mesh, shard: str) -> GPT:
    model = GPT(cfg.model, mesh.expert_exchange())
    if shard == "fsdp":
        shard_model(model, mesh)
    return model


def run(rank: int, port: int, args: argparse.Namespace, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cfg = load_config("tiny-moe8", [f"model.moe.num_experts={args.experts}",
                                    f"model.d_model={args.d_model}", "model.seq_len=64",
                                    f"parallel.ep_size={args.ep}", f"parallel.num_workers={WORLD}",
                                    "train.micro_batch=2", f"train.global_batch={2 * WORLD}"])
    mesh = Mesh(args.ep)
    torch.manual_seed(0)
    model = build(cfg, mesh, args.shard)
    optimizer = build_optimizer(model, cfg.optim)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_len + 1))
    train_step(model, optimizer, mesh, [(tokens[:, :-1], tokens[:, 1:])], 1.0)  # AdamW state
    save_checkpoint(directory, model, mesh, optimizer, rank_state={"torch": torch.get_rng_state()})
    source = CheckpointSource(directory)
    fresh = build(cfg, mesh, args.shard)
    source.load(fresh, mesh, build_optimizer(fresh, cfg.optim))
    source.rank_state(mesh)
    read = source.bytes_read_per_rank(mesh)
    if rank == 0:
        whole, written = source.size, source.manifest["rank_bytes"]
        print(f"checkpoint of tiny-moe{args.experts} d_model {args.d_model}, {WORLD} ranks, EP "
              f"{args.ep}, shard {args.shard}: {mib(whole)} in {len(source.manifest['files'])} files")
        for r in range(WORLD):
            print(f"rank {r}: wrote {mib(written[r])}, read {mib(read[r])} on resume "
                  f"({read[r] / whole:.1%} of the checkpoint)")
        print(f"resume reads {mib(sum(read))} over {WORLD} ranks against {mib(WORLD * whole)} "
              f"when each downloads the whole checkpoint: {WORLD * whole / sum(read):.2f}x less")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--shard", choices=["none", "fsdp"], default="none")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="raymoe-bench-ckpt-") as directory:
        mp.spawn(run, args=(port, args, directory), nprocs=WORLD)


if __name__ == "__main__":
    main()
