"""Whether NCCL will use this node's EFA adapters, said once at the start of a GPU run.

When a node has EFA adapters but the container cannot open them, libfabric is not told to
use them, or NCCL's aws-ofi-nccl plugin does not load, NCCL falls back to TCP sockets
without a word, and the run trains at a fraction of the p4d's 4 x 100 Gbps between nodes.
The settings are cluster/efa.env's, which cluster/aws.yaml gives every worker."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import ray

SYS_INFINIBAND = Path("/sys/class/infiniband")
DEV_INFINIBAND = Path("/dev/infiniband")


def efa_devices(sys_infiniband: Path) -> list[str]:
    """The EFA adapters the kernel lists: ``efa_N`` as the driver names them, ``rdmapBsS``
    once rdma-core's udev rule renamed them (the name it gives RDMA devices that are neither
    InfiniBand, RoCE nor iWARP)."""
    if not sys_infiniband.is_dir():
        return []
    return sorted(d.name for d in sys_infiniband.iterdir() if d.name.startswith(("efa_", "rdmap")))


def net_plugin_names(env: Mapping[str, str]) -> list[str]:
    """The libraries NCCL tries to load as its network plugin (NCCL_NET_PLUGIN=ofi:
    libnccl-net-ofi.so, else the name as given; unset: libnccl-net.so)."""
    name = env.get("NCCL_NET_PLUGIN", "")
    return [f"libnccl-net-{name}.so", name] if name else ["libnccl-net.so"]


def library_loads(names: Sequence[str]) -> bool:
    """Whether the dynamic loader finds and loads one of ``names``, as NCCL's dlopen would
    (this process's LD_LIBRARY_PATH, the loader's cache)."""
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def efa_warning(sys_infiniband: Path, dev_infiniband: Path, env: Mapping[str, str],
                plugin_loads: Callable[[Sequence[str]], bool] = library_loads) -> str | None:
    """A line saying why NCCL will not use the EFA adapters this node has; None when it has
    none, or when the container, libfabric and NCCL are set up to use them."""
    devices = efa_devices(sys_infiniband)
    if not devices:
        return None
    problems = []
    if not any(dev_infiniband.glob("uverbs*")):
        problems.append(f"no {dev_infiniband}/uverbs* in this container (docker run --device=/dev/infiniband)")
    if env.get("FI_PROVIDER") != "efa":
        problems.append(f"FI_PROVIDER is {env.get('FI_PROVIDER') or 'unset'}, not efa")
    if env.get("NCCL_NET", "").lower() == "socket":
        problems.append("NCCL_NET=Socket")
    plugins = net_plugin_names(env)
    if not plugin_loads(plugins):
        problems.append(f"NCCL's network plugin {plugins[0]} does not load (aws-ofi-nccl on LD_LIBRARY_PATH?)")
    if not problems:
        return None
    return (f"{len(devices)} EFA adapters ({', '.join(devices)}), but NCCL falls back to TCP "
            f"sockets between nodes: {'; '.join(problems)}. cluster/efa.env has the settings.")


def warn_without_efa(warn: Callable[[str], None]) -> None:
    """Check this node (call once per node: the local rank 0) and warn through ``warn``."""
    line = efa_warning(SYS_INFINIBAND, DEV_INFINIBAND, os.environ)
    if line:
        warn(f"node {ray.util.get_node_ip_address()}: {line}")
