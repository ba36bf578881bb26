"""The expert-sharded checkpoint: loadable at any expert-parallel size.

A checkpoint is a directory:
  dense.pt              every non-expert parameter and its AdamW state (written by rank 0)
  experts-NNNNN.pt      per EP rank of the first EP group: each of its experts' parameters
                        and AdamW state under the expert's GLOBAL id
  rank-NNNNN.pt         optional per-rank state (RNG), restored at the same world size
  manifest.json         written last, by rank 0, once every other file is complete

A directory without manifest.json (a crash mid-save) is not a checkpoint. Because experts
are stored by global id, a checkpoint written with EP size a loads with EP size b, the
optimizer state included (DeepSpeed stores optimizer state per EP rank and cannot).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from raymoe.data.storage import locate
from raymoe.errors import RaymoeError
from raymoe.model.moe import is_expert_parameter
from raymoe.parallel.mesh import Mesh

FORMAT = "raymoe-checkpoint/1"
MANIFEST = "manifest.json"
DENSE_FILE = "dense.pt"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RaymoeError, RuntimeError):
    """A checkpoint is missing, incomplete, or of another model."""


def step_directory(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def _experts_file(ep_rank: int) -> str:
    return f"experts-{ep_rank:05d}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _barrier(mesh: Mesh) -> None:
    if mesh.is_distributed:
        dist.barrier()


def _adam_state(optimizer: torch.optim.Optimizer | None, param: nn.Parameter) -> dict[str, Tensor]:
    if optimizer is None:
        return {}
    return {k: v for k, v in optimizer.state.get(param, {}).items() if isinstance(v, Tensor)}


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


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
    experts: dict[str, dict[int, dict[str, Tensor]]] = {}
    dense: dict[str, dict[str, Tensor]] = {}
    for name, param in model.named_parameters():
        state = _adam_state(optimizer, param)
        if not is_expert_parameter(name):
            dense[name] = {"param": param.detach().cpu(), **{k: v.cpu() for k, v in state.items()}}
            continue
        layer_ids = mesh.global_expert_ids(_num_experts(model, name))
        experts[name] = {
            gid: {"param": param.detach()[i].cpu().clone(),
                  **{k: (v[i] if v.ndim else v).cpu().clone() for k, v in state.items()}}
            for i, gid in enumerate(layer_ids)}

    first_ep_group = mesh.rank < mesh.ep_size
    if first_ep_group and experts:
        _atomic_save({"experts": experts}, directory / _experts_file(mesh.ep_rank))
    if mesh.rank == 0:
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in (optimizer.param_groups if optimizer else [])]
        _atomic_save({"dense": dense, "param_groups": groups}, directory / DENSE_FILE)
    _barrier(mesh)
    if mesh.rank == 0:
        expert_files = {}
        if experts:
            num_experts = _num_experts(model, next(iter(experts)))
            for ep_rank in range(mesh.ep_size):
                expert_files[_experts_file(ep_rank)] = list(
                    mesh.layout.global_expert_ids(ep_rank, num_experts))
        manifest = {"format": FORMAT, "ep_size": mesh.ep_size, "world_size": mesh.world_size,
                    "has_optimizer": optimizer is not None, "expert_files": expert_files,
                    "extra": extra or {}}
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, directory / MANIFEST)
    _barrier(mesh)
    return directory


def load_rank_state(directory: str | Path, mesh: Mesh) -> dict[str, Any] | None:
    """This rank's saved state, when the checkpoint was written by as many ranks."""
    if read_manifest(directory)["world_size"] != mesh.world_size:
        return None
    path = Path(directory) / _rank_file(mesh.rank)
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The format-checked manifest of a checkpoint, read where it lies (a local directory
    or an s3:// URI: raymoe.runs finds checkpoints through it without downloading them)."""
    path = locate(str(directory)).join(MANIFEST)
    if not path.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is incomplete "
                              "(a save that did not finish) or not a raymoe checkpoint")
    manifest = json.loads(path.read_bytes())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path.uri}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_checkpoint(directory: str | Path, model: nn.Module, mesh: Mesh,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load into this rank's model (and optimizer); returns the manifest's ``extra``."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    if optimizer is not None and not manifest["has_optimizer"]:
        raise CheckpointError(f"{directory}: holds no optimizer state")
    saved = torch.load(directory / DENSE_FILE, map_location="cpu", weights_only=True)
    expert_source = _ExpertSource(directory, manifest)
    names = dict(model.named_parameters())
    _check_names(directory, names, saved["dense"], expert_source.names())
    for name, param in names.items():
        if is_expert_parameter(name):
            ids = mesh.global_expert_ids(_num_experts(model, name))
            entries = [expert_source.get(name, gid) for gid in ids]
            _check_shape(directory, f"{name} (one expert)", entries[0]["param"], param[0])
            entry = {k: entries[0][k] if k == "step" else torch.stack([e[k] for e in entries])
                     for k in entries[0]}
        else:
            entry = saved["dense"][name]
            _check_shape(directory, name, entry["param"], param)
        with torch.no_grad():
            param.copy_(entry["param"])
        if optimizer is not None:
            optimizer.state[param] = {k: v.to(param.device) for k, v in entry.items() if k != "param"}
    if optimizer is not None:
        for group, saved_group in zip(optimizer.param_groups, saved["param_groups"], strict=False):
            group.update(saved_group)
    return manifest["extra"]


class _ExpertSource:
    """Finds an expert's entry by global id across the experts-*.pt files (read lazily)."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.file_of = {gid: f for f, ids in manifest["expert_files"].items() for gid in ids}
        self.loaded: dict[str, dict[str, Any]] = {}

    def _file(self, name: str) -> dict[str, Any]:
        if name not in self.loaded:
            path = self.directory / name
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in the manifest but missing")
            self.loaded[name] = torch.load(path, map_location="cpu", weights_only=True,
                                           mmap=True)["experts"]
        return self.loaded[name]

    def names(self) -> set[str]:
        return set(self._file(next(iter(set(self.file_of.values()))))) if self.file_of else set()

    def get(self, name: str, gid: int) -> dict[str, Tensor]:
        if gid not in self.file_of:
            raise CheckpointError(f"{self.directory}: {name}: no expert {gid} in the checkpoint "
                                  f"(it holds {len(self.file_of)} experts per layer)")
        return self._file(self.file_of[gid])[name][gid]


def _check_names(directory: Path, names: dict[str, nn.Parameter], dense: dict[str, Any],
                 expert_names: set[str]) -> None:
    expected = set(names)
    found = set(dense) | expert_names
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise CheckpointError(f"{directory}: checkpoint of another model: missing parameters "
                              f"{missing[:5]}, unexpected parameters {unexpected[:5]}")


def _check_shape(directory: Path, name: str, saved: Tensor, param: Tensor) -> None:
    if saved.shape != param.shape:
        raise CheckpointError(f"{directory}: parameter {name} has shape {tuple(saved.shape)} in "
                              f"the checkpoint but {tuple(param.shape)} in the model")


def _num_experts(model: nn.Module, param_name: str) -> int:
    return model.get_submodule(param_name.split(".experts.")[0]).num_experts
