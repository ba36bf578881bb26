"""The training model, built without ever holding it whole: on the meta device, sharded,
then only this rank's parts materialised and initialised.

The values are those of the model built whole in one process from the same seed, at any
world size, EP size and shard mode. Dense parameters share the global RNG stream, which
cannot skip ahead: every rank first replays the draws nn.Linear and nn.Embedding make
when constructed on a real device (GPT.replay_construction_draws), then draws each dense
parameter in full on the CPU, one at a time, and keeps its slice (time as building the
whole model; memory: the largest dense parameter, 0.8 GB at gpt-6.7b's embedding).
Experts have a generator each, so a rank draws only the experts it holds (one expert at
a time when FSDP splits each expert's rows).
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard

from raymoe.config import Config
from raymoe.model import GPT
from raymoe.model.precision import training_dtype
from raymoe.parallel.mesh import Mesh
from raymoe.parallel.shard import shard_model


def build_model(cfg: Config, mesh: Mesh, device: torch.device) -> GPT:
    """The model for ``cfg.parallel.shard`` on ``device``, initialised from the global RNG
    (seed it alike on every rank first)."""
    with torch.device("meta"):
        model = GPT(cfg.model, mesh.expert_exchange())
    if cfg.parallel.shard == "fsdp":
        shard_model(model, mesh, training_dtype(cfg, device), cfg.parallel.reduce_dtype)
    model.to_empty(device=device)
    initialise(model)
    return model


@torch.no_grad()
def initialise(model: GPT) -> None:
    """Every parameter's local part, with the values of the model built whole."""
    model.replay_construction_draws()
    model.reset_buffers()
    for name, param in model.named_parameters():
        init = model.initializer(name)
        if not isinstance(param, DTensor):
            init.fill(param)
            continue
        local = param.to_local()
        if not init.is_random:
            init.fill(local)
            continue
        dim, start, stop = _local_range(param)
        if init.expert_seeds is not None and dim == 0:
            init.fill(local, range(start, stop))
        elif init.expert_seeds is not None:  # each expert's rows: draw one expert at a time
            whole = torch.empty(1, *param.shape[1:], dtype=param.dtype)
            for expert in range(param.shape[0]):
                init.fill(whole, range(expert, expert + 1))
                local[expert].copy_(whole[0].narrow(dim - 1, start, stop - start))
        else:
            whole = torch.empty(param.shape, dtype=param.dtype)
            init.fill(whole)
            local.copy_(whole.narrow(dim, start, stop - start))


def _local_range(param: DTensor) -> tuple[int, int, int]:
    """(dim, start, stop): the slice of the whole parameter this rank holds, as FSDP
    splits it (torch.chunk: equal parts rounded up, the last ones short or empty)."""
    (placement,) = param.placements
    assert isinstance(placement, Shard), placement
    size, parts = param.shape[placement.dim], param.device_mesh.size()
    per_rank = math.ceil(size / parts)
    start = min(param.device_mesh.get_local_rank() * per_rank, size)
    return placement.dim, start, min(start + per_rank, size)
