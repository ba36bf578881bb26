"""Host tensors to the device without waiting for it."""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device``. On a GPU it is copied from pinned memory, queued behind
    the work already queued while the host runs on; from pageable memory the copy is
    synchronous whatever ``non_blocking`` says (the driver stages it, and may wait for
    the queued work first). On CPU it is the tensor itself."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)
