"""The checkpoint: loadable at any world size, expert-parallel size and shard mode.

A checkpoint is a directory:
  .metadata, __R_N.distcp   torch.distributed.checkpoint (DCP) files: rank R writes only
                            the slices it holds (replicated slices once, by one rank)
  rank-NNNNN.pt             optional per-rank state (RNG), restored at the same world size
  manifest.json             written last, by rank 0: the settings, and the name and size
                            of every other file (format and names: raymoe.runs)

Every tensor is addressed by its GLOBAL shape: a dense parameter whole, an expert
parameter as one [num_experts, ...] tensor of which a rank holds the block of its EP rank
(sharded further over its expert-data-parallel group under FSDP), and each AdamW state
like its parameter. DCP reads exactly the slices a rank's layout needs, so a checkpoint
written with shard fsdp at (world 4, EP 2) loads at (world 2, EP 1, shard none) or in one
process, optimizer state included (DeepSpeed stores optimizer state per EP rank and
cannot).

Ranks may write their files into directories of their own that are uploaded one by one
(Ray Train's background upload): the manifest can then be in storage before another
rank's file; raymoe.runs tells a complete checkpoint from a partial one and finds the one
to load. Loading reads where the checkpoint lies
(raymoe.parallel.checkpoint_reader): each rank only the items its layout needs.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint import TensorStorageMetadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor, Replicate, Shard

from raymoe.data.storage import Location, locate
from raymoe.errors import may_pass
from raymoe.model.moe import MoELayer, is_expert_parameter
from raymoe.parallel.checkpoint_reader import ByteCount, RangedReader
from raymoe.parallel.mesh import Mesh
from raymoe.parallel.shard import is_sharded
from raymoe.runs import FORMAT, MANIFEST, CheckpointError, CheckpointUnavailable, read_manifest

HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")
"""The optimizer's per-group settings a checkpoint restores (not device choices like fused)."""
# DCP warns on every one-process save and load, even when told so with no_dist=True (as
# raymoe does exactly when it means one process): a healthy eval would print it per worker.
warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized",
                        UserWarning)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


_OWNED = re.compile(r"^(?:__(\d+)_\d+\.distcp|rank-(\d+)\.pt)$")


def _writer(name: str) -> int:
    """The rank that wrote a file: DCP names rank R's data files __R_N.distcp; the
    metadata and the shared files (tokenizer) are rank 0's."""
    m = _OWNED.match(name)
    return int(m.group(1) or m.group(2)) if m else 0


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- global view


def _global_tensor(name: str, tensor: Tensor, model: nn.Module, mesh: Mesh) -> Tensor:
    """``tensor`` (a parameter or a state shaped like it) as DCP should address it.

    Dense tensors are whole (plain: replicated) or FSDP DTensors already. An expert
    tensor holds this EP rank's block of experts: it becomes a DTensor over the expert
    mesh, split over "ep" on dim 0 and replicated (or, under FSDP, sharded as FSDP
    placed it) over "edp", whose global shape counts every expert.
    """
    if not is_expert_parameter(name) or not mesh.is_distributed:
        return tensor
    layer = model.get_submodule(name.split(".experts.")[0])
    assert isinstance(layer, MoELayer)
    num_experts = layer.num_experts
    if isinstance(tensor, DTensor):
        local, inner = tensor.to_local(), tensor.placements[0]
        block = tensor.shape
    else:
        local, inner, block = tensor, Replicate(), tensor.shape
    shape = torch.Size((num_experts, *block[1:]))
    assert mesh.expert_mesh is not None
    return DTensor.from_local(local, mesh.expert_mesh, [Shard(0), inner], shape=shape,
                              stride=_contiguous_stride(shape))


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _model_state(model: nn.Module, mesh: Mesh) -> dict[str, Tensor]:
    """The parameters, and the buffers (the routers' balancing biases: dense, alike on
    every rank)."""
    state = {f"model.{n}": _global_tensor(n, p.detach(), model, mesh) for n, p in model.named_parameters()}
    state.update((f"model.{n}", b) for n, b in model.named_buffers())
    return state


def _optimizer_state(model: nn.Module, mesh: Mesh,
                     optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor):
                out[f"optim.{name}.{key}"] = (_global_tensor(name, value, model, mesh)
                                              if value.ndim else value)
    return out


# ---------------------------------------------------------------------------- save


def save_checkpoint(directory: str | Path, model: nn.Module, mesh: Mesh,
                    optimizer: torch.optim.Optimizer | None = None,
                    extra: dict[str, Any] | None = None,
                    rank_state: dict[str, Any] | None = None) -> Path:
    """Collective: every rank calls it. ``extra`` (JSON) goes into the manifest;
    ``rank_state`` is this rank's own (for example its RNG states).

    Ranks may write into different local directories that are later merged (as Ray
    Train's upload does): each file name belongs to exactly one rank.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if rank_state is not None:
        _atomic_save(rank_state, directory / _rank_file(mesh.rank))
    state = _model_state(model, mesh)
    if optimizer is not None:
        state.update(_optimizer_state(model, mesh, optimizer))
    dcp.save(state, checkpoint_id=directory, no_dist=not mesh.is_distributed)
    if mesh.is_distributed:
        dist.barrier()
    listings = _gather(_local_files(directory), mesh)
    if mesh.rank == 0:
        files = _merge(listings)
        rank_bytes = [0] * mesh.world_size
        for name, size in files.items():
            rank_bytes[_writer(name)] += size
        groups = [{k: g[k] for k in HYPERPARAMETERS if k in g}
                  for g in (optimizer.param_groups if optimizer else [])]
        manifest = {"format": FORMAT, "world_size": mesh.world_size, "ep_size": mesh.ep_size,
                    "shard": "fsdp" if is_sharded(model) else "none",
                    "has_optimizer": optimizer is not None, "param_groups": groups,
                    "files": files, "rank_bytes": rank_bytes, "extra": extra or {}}
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, directory / MANIFEST)
    if mesh.is_distributed:
        dist.barrier()
    return directory


def _local_files(directory: Path) -> dict[str, int]:
    return {e.name: e.stat().st_size for e in os.scandir(directory)
            if e.is_file() and e.name != MANIFEST and not e.name.endswith(".tmp")}


def _gather(obj: Any, mesh: Mesh) -> list[Any]:
    """Every rank's ``obj`` on rank 0 (an empty list elsewhere)."""
    if not mesh.is_distributed:
        return [obj]
    out: list[Any] | None = [None] * mesh.world_size if mesh.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def _merge(listings: list[dict[str, int]]) -> dict[str, int]:
    """The ranks' files (each its own directory, or one they share) as one listing."""
    files: dict[str, int] = {}
    for listing in listings:
        files.update(listing)
    return dict(sorted(files.items()))


def describe_written(manifest: dict[str, Any], where: str) -> str:
    """One line: the checkpoint's size and what each rank wrote into ``where``."""
    per_rank = manifest["rank_bytes"]
    return (f"checkpoint written: {mib(sum(manifest['files'].values()))} in "
            f"{len(manifest['files'])} files, {mib(min(per_rank))} to {mib(max(per_rank))} per "
            f"rank ({len(per_rank)} ranks) into {where}")


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---------------------------------------------------------------------------- load


class CheckpointSource:
    """One checkpoint, read where it lies (local directory or s3:// URI): its manifest,
    DCP's index, then only the items and the rank file this process needs.
    ``bytes_read`` counts them all."""

    def __init__(self, directory: str | Path):
        self.location: Location = locate(str(directory))
        self.count = ByteCount()
        self.manifest = read_manifest(self.location.uri, self.count.add)

    @property
    def bytes_read(self) -> int:
        return self.count.total

    @property
    def size(self) -> int:
        """The bytes of the whole checkpoint."""
        return sum(self.manifest["files"].values())

    def load(self, model: nn.Module, mesh: Mesh,
             optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Load into this rank's model (and optimizer), whatever layout wrote the
        checkpoint; returns the manifest's ``extra``. Collective when the mesh is
        distributed."""
        uri, manifest = self.location.uri, self.manifest
        if optimizer is not None and not manifest["has_optimizer"]:
            raise CheckpointError(f"{uri}: holds no optimizer state")
        reader = RangedReader(self.location, self.count)
        saved = reader.read_metadata().state_dict_metadata
        state = _model_state(model, mesh)
        _check_parameters(uri, state, saved)
        if optimizer is not None:
            _create_optimizer_state(model, optimizer, saved)
            state.update(_optimizer_state(model, mesh, optimizer))
        try:
            dcp.load(state, storage_reader=reader, no_dist=not mesh.is_distributed)
        except CheckpointException as err:
            first = _first_failure(err)
            kind = CheckpointUnavailable if isinstance(first, OSError) and may_pass(first) else CheckpointError
            raise kind(f"{uri}: could not be read: {first}") from err
        if optimizer is not None:
            for group, saved_group in zip(optimizer.param_groups, manifest["param_groups"], strict=True):
                group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved_group.items()})
        return manifest["extra"]

    def rank_state(self, mesh: Mesh) -> dict[str, Any] | None:
        """This rank's saved state, when the checkpoint was written by as many ranks."""
        name = _rank_file(mesh.rank)
        if self.manifest["world_size"] != mesh.world_size or name not in self.manifest["files"]:
            return None
        data = self.count.add(self.location.join(name).read_bytes())
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)

    def bytes_read_per_rank(self, mesh: Mesh) -> list[int]:
        """Collective: every rank's ``bytes_read``, on rank 0 (empty elsewhere)."""
        return _gather(self.bytes_read, mesh)

    def describe_read(self, per_rank: list[int]) -> str:
        return (f"read {mib(min(per_rank))} to {mib(max(per_rank))} per rank ({len(per_rank)} "
                f"ranks) of the checkpoint's {mib(self.size)}")


def load_checkpoint(directory: str | Path, model: nn.Module, mesh: Mesh,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """CheckpointSource(directory).load(...)."""
    return CheckpointSource(directory).load(model, mesh, optimizer)


def _create_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                            saved: dict[str, Any]) -> None:
    """Empty state tensors of the checkpoint's keys, laid out like their parameters, for
    DCP to read into (a fresh optimizer has none until its first step)."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        prefix = f"optim.{name}."
        keys = [k[len(prefix):] for k in saved if k.startswith(prefix)]
        if not keys:
            raise CheckpointError(f"no optimizer state for parameter {name} in the checkpoint")
        group = groups[id(param)]
        on_device = group.get("fused") or group.get("capturable")
        state = optimizer.state[param]
        for key in keys:
            shape = saved[prefix + key].size
            if len(shape) == 0:
                state[key] = torch.zeros((), dtype=torch.float32,
                                         device=param.device if on_device else "cpu")
            else:
                state[key] = torch.zeros_like(param.detach())


def _check_parameters(directory: str, state: dict[str, Tensor], saved: dict[str, Any]) -> None:
    expected = {k for k in state}
    found = {k for k in saved if k.startswith("model.")}
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        strip = [k.removeprefix("model.") for k in missing[:5]]
        extra = [k.removeprefix("model.") for k in unexpected[:5]]
        raise CheckpointError(f"{directory}: checkpoint of another model: missing parameters "
                              f"{strip}, unexpected parameters {extra}")
    for key, tensor in state.items():
        meta = saved[key]
        if not isinstance(meta, TensorStorageMetadata) or meta.size != tensor.shape:
            size = tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else "(not a tensor)"
            raise CheckpointError(f"{directory}: parameter {key.removeprefix('model.')} has shape "
                                  f"{size} in the checkpoint but {tuple(tensor.shape)} in the model")


def _first_failure(err: CheckpointException) -> BaseException:
    """The first rank's exception (DCP pairs each with its traceback)."""
    failures = list(err.failures.values())
    if not failures:
        return err
    first = failures[0]
    return first[0] if isinstance(first, tuple) else first
