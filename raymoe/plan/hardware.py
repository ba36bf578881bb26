"""The accelerators a plan knows (memory, FLOP/s, bandwidths, the instance that carries
them), the CPU profile, and the planner's errors."""

from __future__ import annotations

import os
from dataclasses import dataclass

from raymoe.errors import RaymoeError

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and the instance that carries it."""

    name: str
    memory: float
    """Bytes torch can allocate on one device (total memory as torch reports it)."""
    peak_flops: float
    """Dense peak of the compute dtype (bf16 on GPUs), per device."""
    compute_bytes: int
    """Bytes of an activation element in the compute dtype (bf16 autocast: 2; CPU fp32: 4)."""
    flash_attention: bool
    """Whether attention keeps no [heads, seq, seq] scores for backward."""
    overhead: float
    """Framework memory outside tensors: CUDA context, cuBLAS workspaces, NCCL buffers and
    allocator fragmentation."""
    hbm_bandwidth: float = 0.0
    gpus_per_node: int = 8
    nvlink_bandwidth: float = 0.0
    """Bytes/s one GPU sends to the others of its node, one direction."""
    network_bandwidth: float = 0.0
    """Bytes/s a node sends to other nodes (all its NICs together), one direction."""
    instance: str = ""
    """The cloud instance that carries 8 of these GPUs (for the price)."""
    host_cpus: int = 0
    """vCPUs of that instance (a study's evaluation scores on them)."""
    host_memory: float = 0.0
    """Bytes of that instance's RAM."""

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


_EFA_P4D = 4 * 100e9 / 8  # p4d/p4de: 4 x 100 Gb/s EFA
_EFA_P5 = 32 * 100e9 / 8  # p5/p5en: 32 x 100 Gb/s EFA
_MiB = 2**20

_GiB = 2**30
_P4D_HOST = {"host_cpus": 96, "host_memory": 1152 * _GiB}  # p4d/p4de: 96 vCPUs, 1152 GiB
_P5_HOST = {"host_cpus": 192, "host_memory": 2048 * _GiB}  # p5/p5en: 192 vCPUs, 2048 GiB

HARDWARE: dict[str, Hardware] = {
    "a100-40gb": Hardware("a100-40gb", 40_536 * _MiB, 312e12, 2, True, 2.5 * GB, 1.555e12, 8,
                          300e9, _EFA_P4D, "p4d.24xlarge", **_P4D_HOST),
    "a100-80gb": Hardware("a100-80gb", 81_050 * _MiB, 312e12, 2, True, 2.5 * GB, 2.039e12, 8,
                          300e9, _EFA_P4D, "p4de.24xlarge", **_P4D_HOST),
    "h100-80gb": Hardware("h100-80gb", 81_008 * _MiB, 989e12, 2, True, 2.5 * GB, 3.35e12, 8,
                          450e9, _EFA_P5, "p5.48xlarge", **_P5_HOST),
    "h200-141gb": Hardware("h200-141gb", 143_156 * _MiB, 989e12, 2, True, 2.5 * GB, 4.8e12, 8,
                           450e9, _EFA_P5, "p5en.48xlarge", **_P5_HOST),
}
"""The GPUs `raymoe plan --gpu` knows; ``cpu_hardware()`` adds the CPU profile."""


def cpu_hardware(workers: int = 1) -> Hardware:
    """fp32 compute and no CUDA overhead; the machine's RAM shared by ``workers``."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", ram / workers, 0.0, 4, True, 0.0, gpus_per_node=workers)


def hardware(gpu: str | Hardware, workers: int = 1) -> Hardware:
    if isinstance(gpu, Hardware):
        return gpu
    if gpu == "cpu":
        return cpu_hardware(workers)
    if gpu not in HARDWARE:
        raise PlanError(f"--gpu {gpu!r} is not one of {', '.join([*HARDWARE, 'cpu'])}")
    return HARDWARE[gpu]


class PlanError(RaymoeError, ValueError):
    """A plan was asked for hardware or a cluster file it cannot read."""


class DoesNotFitError(RaymoeError, MemoryError):
    """The config cannot fit the GPU it was about to train on; the message is the verdict."""
