"""The precision policy, one for training and inference: bf16 autocast on GPU, plain fp32
on CPU (the same code on either device). Routers and log-probabilities stay in fp32."""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    return torch.bfloat16 if device.type == "cuda" else None


def autocast(device: torch.device) -> torch.autocast:
    dtype = autocast_dtype(device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
