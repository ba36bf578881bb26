"""One optimizer step over micro-batches: forward, backward, reduce, clip, update.

A step whose loss or gradient norm is not finite on any rank is skipped on every rank
(gradients dropped, no update) and says which parameter first had a non-finite gradient.

On a GPU each read of a device value on the host stalls the CPU until the device catches
up. The step's losses, gradient norm and MoE statistics therefore stay on the device,
are summed over ranks in one all-reduce, and are read on the host in one copy: the one
read the step needs, since skipping a non-finite step is a host decision. The caller's
``summed`` values ride along (the checkpoint cadence's clocks: raymoe.train.cadence).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from raymoe.model import GPT
from raymoe.model.precision import autocast_to
from raymoe.parallel.grads import global_grad_norm, local_grad, reduce_gradients, scale_gradients
from raymoe.parallel.mesh import Mesh
from raymoe.train.transfer import to_device


@dataclass
class StepResult:
    loss: float
    """Mean training loss (LM + MoE terms) over micro-batches and ranks."""
    lm_loss: float
    l_aux: float
    grad_norm: float
    """Global gradient norm before clipping."""
    skipped: bool = False
    diagnosis: str = ""
    """For a skipped step: what was not finite, and where."""
    tokens_per_expert: list[Tensor] = field(default_factory=list)
    """Per MoE layer, tokens routed to each expert over all ranks and micro-batches (CPU)."""
    dropped_fraction: list[float] = field(default_factory=list)
    summed: list[float] = field(default_factory=list)
    """The caller's ``summed`` values, each summed over the ranks."""


def train_step(model: GPT, optimizer: torch.optim.Optimizer, mesh: Mesh,
               micro_batches: Iterable[tuple[Tensor, Tensor]], grad_clip: float,
               autocast_dtype: torch.dtype | None = None,
               sync_every_micro_batch: bool = False, summed: Sequence[float] = ()) -> StepResult:
    """Each rank passes its own micro-batches (the same number on every rank); the step
    equals one process taking all ranks' micro-batches with gradient accumulation.
    ``summed``: host values (as many on every rank) to sum over the ranks with the step's
    statistics, in its all-reduce.

    A sharded model reduce-scatters its gradients after the last micro-batch only
    (FSDP accumulates them unsharded until then), or after each one when
    ``sync_every_micro_batch`` (parallel.grad_sync)."""
    batches = list(micro_batches)
    device = next(model.parameters()).device
    layers, experts = len(model.moe_layers), model.cfg.moe.num_experts
    # Per micro-batch means: loss, lm_loss, l_aux, then each MoE layer's dropped fraction.
    means = torch.zeros(3 + layers, device=device)
    counts = torch.zeros(layers, experts, device=device, dtype=torch.long)
    for i, (inputs, targets) in enumerate(batches):
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync_every_micro_batch or i == len(batches) - 1)
        with autocast_to(device, autocast_dtype):
            out = model(inputs, targets)
        (out.loss / len(batches)).backward()
        means += torch.stack([out.loss.detach(), out.lm_loss.detach(), out.l_aux.detach(),
                              *(s.dropped_fraction.detach() for s in out.moe_stats)]) / len(batches)
        for i, stats in enumerate(out.moe_stats):
            counts[i] += stats.tokens_per_expert
    reduce_gradients(model, mesh)
    norm = global_grad_norm(model, mesh)
    # float64 holds counts exactly up to 2**53: one tensor, one all-reduce, one host read.
    callers = to_device(torch.tensor(summed, dtype=torch.float64), device)
    summary = torch.cat([means.double() / mesh.dp_size, counts.flatten().double(), callers])
    if mesh.is_distributed:
        dist.all_reduce(summary)
    host = torch.cat([summary, norm.double().reshape(1)]).tolist()  # the step's host sync
    loss, lm_loss, l_aux = host[:3]
    counts_end = 3 + layers + layers * experts
    result = StepResult(loss, lm_loss, l_aux, host[-1], dropped_fraction=host[3:3 + layers],
                        tokens_per_expert=list(torch.tensor(host[3 + layers:counts_end], dtype=torch.long)
                                               .view(layers, experts)),
                        summed=host[counts_end:-1])
    if not all(math.isfinite(v) for v in (loss, lm_loss, l_aux, result.grad_norm)):
        result.skipped = True
        result.diagnosis = _diagnose(model, result)
    else:
        if grad_clip > 0:
            scale_gradients(model, grad_clip, norm)
        optimizer.step()
        for layer, loads in zip(model.moe_layers, result.tokens_per_expert, strict=True):
            layer.router.balance(loads)  # loss-free balancing, where on
    optimizer.zero_grad(set_to_none=False)  # the expert FFN reuses gradient buffers
    return result


def _diagnose(model: GPT, result: StepResult) -> str:
    parts = [f"loss={result.loss}", f"lm_loss={result.lm_loss}", f"l_aux={result.l_aux}",
             f"grad_norm={result.grad_norm}"]
    for i, layer in enumerate(model.moe_layers):
        if layer.last_stats is not None and not torch.isfinite(layer.last_stats.l_aux):
            parts.append(f"MoE layer {i} (blocks.{_block_index(model, layer)}) l_aux is not finite")
    for name, param in model.named_parameters():
        grad = local_grad(param)  # a sharded gradient's own slice: no collective
        if grad is not None and not torch.isfinite(grad).all():
            parts.append(f"first non-finite gradient on this rank: {name}")
            break
    return "; ".join(parts)


def _block_index(model: GPT, layer: torch.nn.Module) -> int:
    return next(i for i, block in enumerate(model.blocks) if block.mlp is layer)
