"""Peak memory of real training steps on CPU, measured at the allocator (tests only).

torch's profiler records every allocation and free of the CPU allocator with the running
size; the peak of a step is what was live when it started (parameters, gradients,
optimizer states, the batch: their storages' sizes) plus the largest running total of the
step's allocations and frees.
"""

from __future__ import annotations

import torch
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from raymoe.config import Config
from raymoe.model import GPT
from raymoe.parallel import Mesh
from raymoe.parallel.shard import shard_model
from raymoe.train.optim import build_optimizer
from raymoe.train.step import train_step


def _live_bytes(tensors) -> int:
    """Bytes of the storages under ``tensors`` (a sharded tensor's local part)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}
    return sum(storages.values())


def _largest_running_total(prof) -> int:
    """The largest sum of the allocations and frees since the profile started.

    Not the events' own ``total_allocated``: that is the allocator's process-wide counter,
    which a block allocated under an earlier profile and freed outside one leaves raised
    for every later profile in the process (earlier tests made the peaks read 10 MB high).
    """
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak


def measured_step_peak(cfg: Config, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> int:
    """Peak bytes of this rank in its second training step (the first allocates the
    gradients and AdamW states that every later step keeps)."""
    mesh = Mesh(cfg.parallel.ep_size)
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model, mesh.expert_exchange())
    if cfg.parallel.shard == "fsdp":
        shard_model(model, mesh)
    optimizer = build_optimizer(model, cfg.optim)
    train_step(model, optimizer, mesh, batches, cfg.optim.grad_clip)
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    live = [*model.parameters(), *(p.grad for p in model.parameters() if p.grad is not None),
            *states, *(t for batch in batches for t in batch)]
    baseline = _live_bytes(live)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, optimizer, mesh, batches, cfg.optim.grad_clip)
    return baseline + _largest_running_total(prof)
