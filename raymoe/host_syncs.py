"""Count the operations that would make the host wait for a CUDA device, on any device.

A host sync stalls the CPU until the GPU has finished everything queued before it, so the
CPU cannot run ahead and queue the next kernels. On CPU nothing waits, but the same ops are
called: counting them here tells what a GPU run will pay. torch's own facility,
``torch.cuda.set_sync_debug_mode``, only sees CUDA tensors, hence this counter.

Two hooks are needed: most syncs are aten ops (seen by a TorchDispatchMode), but
``tolist()``, ``numpy()`` and ``cpu()`` of a CPU tensor reach no aten op at all, so a
TorchFunctionMode counts those calls. Neither hook counts what the other one does.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

ALWAYS_SYNC = {
    aten._local_scalar_dense.default: "item",  # .item(), int(t), float(t), bool(t)
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",  # CUDA reads the input's min and max on the host
    aten.equal.default: "equal",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
}
"""aten ops whose CUDA kernels copy a value to the host before they return."""

HOST_COPIES = {"tolist", "numpy", "cpu"}
"""Tensor methods that copy a device tensor to the host."""


def _has_mask_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


def sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why this aten call would sync on CUDA, or None when it would not."""
    if func in ALWAYS_SYNC:
        return ALWAYS_SYNC[func]
    if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default,
                aten._index_put_impl_.default) and _has_mask_index(args[1]):
        return "boolean mask index"  # the mask becomes indices through nonzero
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    return None


class HostSyncCount:
    """Syncs counted so far, by reason."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.by_reason: Counter[str] = Counter()
        self.paused = False

    def add(self, reason: str, tensor: Any) -> None:
        if not self.paused and isinstance(tensor, torch.Tensor) and tensor.device.type == self.device_type:
            self.by_reason[reason] += 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def __repr__(self) -> str:
        return f"HostSyncCount({self.total}: {dict(self.by_reason)})"


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, count: HostSyncCount):
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = sync_reason(func, args, kwargs)
        if reason is not None and args:
            self.count.add(reason, args[0])
        return func(*args, **kwargs)


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, count: HostSyncCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and (name in HOST_COPIES or (name == "to" and _to_host(args, kwargs))):
            self.count.add(name if name != "to" else "to(cpu)", args[0])
        return func(*args, **kwargs)


def _to_host(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


@contextmanager
def count_host_syncs(device: torch.device | str = "cpu",
                     excluding: torch.optim.Optimizer | None = None) -> Iterator[HostSyncCount]:
    """Count, in this thread and in autograd's backward, the calls on tensors of ``device``
    that would sync a GPU.

    On CPU a copy to the host counts although the tensor already lives there (on a GPU
    run it would be on the device). What stays on the host on a GPU too is over-counted
    there: torch's AdamW reads its step counters (host tensors unless fused or
    capturable) once per parameter, so pass the optimizer as ``excluding`` to leave its
    ``step()`` out.
    """
    count = HostSyncCount(torch.device(device).type)
    hooks = []
    if excluding is not None:
        hooks = [excluding.register_step_pre_hook(lambda *_: setattr(count, "paused", True)),
                 excluding.register_step_post_hook(lambda *_: setattr(count, "paused", False))]
    try:
        with _FunctionCounter(count), _DispatchCounter(count):
            yield count
    finally:
        for hook in hooks:
            hook.remove()
