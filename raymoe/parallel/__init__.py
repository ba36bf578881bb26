"""Data + expert parallelism over torch.distributed: the mesh, the all-to-all exchange,
gradient reduction and clipping, and the expert-sharded checkpoint format."""

from raymoe.parallel.mesh import Mesh, MeshLayout

__all__ = ["Mesh", "MeshLayout"]
