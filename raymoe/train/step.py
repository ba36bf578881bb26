"""One optimizer step over micro-batches: forward, backward, reduce, clip, update."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from raymoe.model import GPT
from raymoe.parallel.grads import clip_gradients, reduce_gradients
from raymoe.parallel.mesh import Mesh


@dataclass
class StepResult:
    loss: float
    """Mean training loss (LM + MoE terms) over micro-batches and ranks."""
    lm_loss: float
    grad_norm: float
    """Global gradient norm before clipping."""


def train_step(model: GPT, optimizer: torch.optim.Optimizer, mesh: Mesh,
               micro_batches: Iterable[tuple[Tensor, Tensor]], grad_clip: float) -> StepResult:
    """Each rank passes its own micro-batches (the same number on every rank); the step
    equals one process taking all ranks' micro-batches with gradient accumulation."""
    batches = list(micro_batches)
    totals = torch.zeros(2, device=next(model.parameters()).device)
    for inputs, targets in batches:
        out = model(inputs, targets)
        (out.loss / len(batches)).backward()
        totals += torch.stack([out.loss.detach(), out.lm_loss.detach()]) / len(batches)
    reduce_gradients(model, mesh)
    norm = clip_gradients(model, mesh, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # experts accumulate into .grad in place
    if mesh.is_distributed:
        dist.all_reduce(totals)
        totals /= mesh.world_size
    return StepResult(float(totals[0]), float(totals[1]), float(norm))
