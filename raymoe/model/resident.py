"""The parameter bytes a rank holds, dense and expert: what an expert-parallel group
reports of each rank, and what a zero-shot evaluation's results keep of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.model.moe import is_expert_parameter


@dataclass(frozen=True)
class ResidentBytes:
    """The parameter bytes one rank holds, and the checkpoint bytes it read to load them."""

    dense: int
    experts: int
    read: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.experts


def resident_bytes(model: torch.nn.Module) -> ResidentBytes:
    dense = experts = 0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if is_expert_parameter(name):
            experts += size
        else:
            dense += size
    return ResidentBytes(dense, experts)
