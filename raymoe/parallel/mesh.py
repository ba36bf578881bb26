"""Every process group raymoe uses, derived once from (world size, EP size).

Ranks are laid out as DeepSpeed does: expert-parallel (EP) groups are blocks of
contiguous ranks, [0..ep-1], [ep..2ep-1], ...; rank r holds the experts
[ep_rank * E/ep, (ep_rank + 1) * E/ep). Ranks holding the same experts (r, r + ep, ...)
form an expert-data-parallel group, over which those experts' gradients are reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from raymoe.model.moe import ExpertExchange, LocalExchange


@dataclass(frozen=True)
class MeshLayout:
    """The arithmetic of the mesh, with no process group (testable anywhere)."""

    world_size: int
    ep_size: int

    def __post_init__(self) -> None:
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(f"expert-parallel size {self.ep_size} must divide the world size "
                             f"{self.world_size}")

    @property
    def ep_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.ep_size)) for s in range(0, self.world_size, self.ep_size)]

    @property
    def expert_dp_groups(self) -> list[list[int]]:
        return [list(range(r, self.world_size, self.ep_size)) for r in range(self.ep_size)]

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def global_expert_ids(self, rank: int, num_experts: int) -> range:
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts do not split over EP size {self.ep_size}")
        per_rank = num_experts // self.ep_size
        first = self.ep_rank(rank) * per_rank
        return range(first, first + per_rank)


class Mesh:
    """This rank's view of the layout, with its process groups.

    With one process (no default group) only ep_size=1 is possible and no group exists.
    All ranks must construct their Mesh objects in the same order: ``new_group`` is
    collective.
    """

    def __init__(self, ep_size: int = 1):
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size, rank = 1, 0
        self.layout = MeshLayout(world_size, ep_size)
        self.rank = rank
        self.ep_group: dist.ProcessGroup | None = None
        self.expert_dp_group: dist.ProcessGroup | None = None
        if world_size > 1:
            self.ep_group = self._own_group(self.layout.ep_groups)
            self.expert_dp_group = self._own_group(self.layout.expert_dp_groups)

    def _own_group(self, groups: list[list[int]]) -> dist.ProcessGroup:
        own = None
        for ranks in groups:
            group = dist.new_group(ranks)  # every rank takes part in every new_group call
            if self.rank in ranks:
                own = group
        assert own is not None
        return own

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def global_expert_ids(self, num_experts: int) -> range:
        return self.layout.global_expert_ids(self.rank, num_experts)

    def expert_exchange(self) -> ExpertExchange:
        """What MoE layers talk to: nothing at all when each rank holds every expert."""
        if self.ep_size == 1:
            return LocalExchange()
        from raymoe.parallel.exchange import ProcessGroupExchange

        return ProcessGroupExchange(self.ep_group, self.ep_size, self.ep_rank)
