"""Sharded data parallelism (PyTorch FSDP2) composed with expert parallelism.

Dense parameters, their gradients and AdamW states are sharded over every rank
(``Mesh.dp_mesh``); each block of experts over its expert-data-parallel group
(``expert_mesh["edp"]``), the ranks that hold the same experts. One FSDP unit per
Experts module, one per Block (the rest of it), one at the root (embeddings, final
LayerNorm). FSDP2 all-gathers a unit's parameters before its forward and backward and
reduce-scatters its gradients as soon as its backward is done, overlapping the
reduction with the rest of the backward pass.

The reduce-scatter's divide factors keep the gradient exact (see raymoe.parallel.grads):
dense gradients are averaged over all N ranks (FSDP's default over a group of N), expert
gradients are summed over their EDP group and divided by N, not by the group's size.

Where the compute is bf16 (``train.precision``; on GPU, and on gloo alike) parameters are
all-gathered in bf16 and gradients reduced in fp32 (``parallel.reduce_dtype``); routers
keep fp32 parameters, as the gate computes in fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from raymoe.model import GPT
from raymoe.parallel.mesh import Mesh

REDUCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def shard_model(model: GPT, mesh: Mesh, param_dtype: torch.dtype | None = None,
                reduce_dtype: str = "float32") -> GPT:
    """Shard ``model`` in place (it stays a GPT); nothing to shard in one process.

    ``param_dtype``: the dtype of the gathered parameters (bf16 where the compute is, None
    keeps fp32).
    """
    if not mesh.is_distributed:
        return model
    assert mesh.dp_mesh is not None and mesh.expert_mesh is not None
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=REDUCE_DTYPES[reduce_dtype])
    units: list[tuple[FSDPModule, int]] = []  # with the size of the group they shard over
    for layer in model.moe_layers:
        experts = fully_shard(layer.experts, mesh=mesh.expert_mesh["edp"], mp_policy=policy,
                              shard_placement_fn=_expert_placement(mesh.edp_size))
        experts.set_gradient_divide_factor(float(mesh.world_size))
        units.append((experts, mesh.edp_size))
        if param_dtype is not None:
            router = fully_shard(layer.router, mesh=mesh.dp_mesh,
                                 mp_policy=MixedPrecisionPolicy(reduce_dtype=policy.reduce_dtype))
            units.append((router, mesh.dp_size))
    for block in model.blocks:
        units.append((fully_shard(block, mesh=mesh.dp_mesh, mp_policy=policy), mesh.dp_size))
    units.append((fully_shard(model, mesh=mesh.dp_mesh, mp_policy=policy), mesh.dp_size))
    if mesh.dp_mesh.device_type == "cpu":
        # gloo has neither AVG nor pre-multiplied SUM reductions: sum, then divide. Not for
        # a unit whose group is one rank (experts when EP = world): FSDP then skips the
        # collective and would divide twice with a forced sum.
        for unit, group_size in units:
            if group_size > 1:
                unit.set_force_sum_reduction_for_comms(True)
    return model


def _expert_placement(edp_size: int) -> Callable[[nn.Parameter], Shard]:
    """Experts split whole over the EDP group when their count allows it; else each
    expert's rows (FSDP pads an uneven dim 0, but needs any other dim to divide evenly)."""

    def placement(param: nn.Parameter) -> Shard:
        if param.shape[0] % edp_size and param.ndim > 1 and param.shape[1] % edp_size == 0:
            return Shard(1)
        return Shard(0)

    return placement
