"""Peak memory of real training steps on CPU, measured at the allocator (tests only).

torch's profiler records every allocation and free of the CPU allocator with the running
total since it started; the peak of a step is what was live when it started (parameters,
gradients, optimizer states, the batch: their storages' sizes) plus the largest running
total inside it.
"""

from __future__ import annotations

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from raymoe.config import Config
from raymoe.model import GPT
from raymoe.parallel import Mesh
from raymoe.train.optim import build_optimizer
from raymoe.train.step import train_step


def _live_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _largest_running_total(prof) -> int:
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak


def measured_step_peak(cfg: Config, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Peak bytes of this rank in its second training step (the first allocates the
    gradients and AdamW states that every later step keeps)."""
    mesh = Mesh(cfg.parallel.ep_size)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, mesh.expert_exchange())
    optimizer = build_optimizer(model, cfg.optim)
    train_step(model, optimizer, mesh, batches, cfg.optim.grad_clip)
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    live = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
            *states, *(t for batch in batches for t in batch)]
    baseline = _live_bytes(live)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, optimizer, mesh, batches, cfg.optim.grad_clip)
    return baseline + _largest_running_total(prof)
