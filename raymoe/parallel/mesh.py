"""Every process group raymoe uses, derived once from (world size, EP size), with names.

All ranks are data-parallel ranks (each reads its own part of the global batch). Ranks
are laid out as DeepSpeed does: expert-parallel (EP) groups are blocks of contiguous
ranks, [0..ep-1], [ep..2ep-1], ...; rank r holds the experts
[ep_rank * E/ep, (ep_rank + 1) * E/ep). Ranks holding the same experts (r, r + ep, ...)
form an expert-data-parallel (EDP) group, over which those experts' gradients are
reduced and, with sharding, their parameters sharded.

The groups live in two torch DeviceMeshes: ``dp_mesh`` (1-D, every rank: dense
parameters are sharded over it) and ``expert_mesh`` (2-D, dims ("ep", "edp"): dim "ep"
splits the experts, dim "edp" replicates or shards each block of them). Code asks the
Mesh for a role (dp_rank, ep_group, edp_size, ...), never for the global rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

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
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def ep_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.ep_size)) for s in range(0, self.world_size, self.ep_size)]

    @property
    def expert_dp_groups(self) -> list[list[int]]:
        return [list(range(r, self.world_size, self.ep_size)) for r in range(self.ep_size)]

    def ep_rank(self, rank: int) -> int:
        return rank % self.ep_size

    def edp_rank(self, rank: int) -> int:
        return rank // self.ep_size

    def expert_mesh_ranks(self) -> torch.Tensor:
        """Global ranks as an (ep, edp) grid: row i is the EDP group of EP rank i."""
        return torch.arange(self.world_size).view(self.edp_size, self.ep_size).T

    def global_expert_ids(self, rank: int, num_experts: int) -> range:
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts do not split over EP size {self.ep_size}")
        per_rank = num_experts // self.ep_size
        first = self.ep_rank(rank) * per_rank
        return range(first, first + per_rank)


class Mesh:
    """This rank's roles in the layout, with its process groups and device meshes.

    With one process (no default group) only ep_size=1 is possible and no group or
    device mesh exists. All ranks must construct their Mesh objects in the same order:
    creating groups is collective.
    """

    def __init__(self, ep_size: int = 1):
        if dist.is_available() and dist.is_initialized():
            world_size, rank = dist.get_world_size(), dist.get_rank()
        else:
            world_size, rank = 1, 0
        self.layout = MeshLayout(world_size, ep_size)
        self.rank = rank
        self.dp_mesh: DeviceMesh | None = None
        self.expert_mesh: DeviceMesh | None = None
        self.ep_group: dist.ProcessGroup | None = None
        self.expert_dp_group: dist.ProcessGroup | None = None
        if world_size > 1:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
            self.dp_mesh = DeviceMesh(device_type, torch.arange(world_size), mesh_dim_names=("dp",))
            self.expert_mesh = DeviceMesh(device_type, self.layout.expert_mesh_ranks(),
                                          mesh_dim_names=("ep", "edp"))
            self.ep_group = self.expert_mesh.get_group("ep")
            self.expert_dp_group = self.expert_mesh.get_group("edp")

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def dp_rank(self) -> int:
        """Which part of the global batch this rank reads (every rank is data-parallel)."""
        return self.rank

    @property
    def dp_size(self) -> int:
        return self.layout.world_size

    @property
    def ep_size(self) -> int:
        return self.layout.ep_size

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def edp_size(self) -> int:
        """Ranks holding the same experts."""
        return self.layout.edp_size

    @property
    def edp_rank(self) -> int:
        return self.layout.edp_rank(self.rank)

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

        assert self.ep_group is not None
        return ProcessGroupExchange(self.ep_group, self.ep_size, self.ep_rank)
