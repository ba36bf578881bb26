"""Load a raymoe checkpoint, written with any expert-parallel size, into one process for
inference: every expert local, MoE layers in eval mode with no token dropping."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymoe.config import Config, config_from_dict
from raymoe.data.storage import is_s3, locate
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.model import GPT
from raymoe.parallel.checkpoint import (
    FORMAT,
    MANIFEST,
    STEP_DIR,
    CheckpointError,
    load_checkpoint,
    read_manifest,
)
from raymoe.parallel.mesh import Mesh


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: Config
    uri: str
    """The checkpoint, as found (local path or s3:// URI)."""
    directory: Path
    """Its local directory (a downloaded copy for s3://)."""
    step: int


def find_checkpoint(path: str) -> str:
    """The checkpoint that ``path`` names (local or s3://), downloading nothing: ``path``
    itself when it holds a manifest, else the latest complete step-* checkpoint in it."""
    from pyarrow import fs as pafs

    if not is_s3(path):  # absolute: Ray workers do not share this process's cwd
        path = os.path.abspath(os.path.expanduser(path))
    root = locate(path)
    if root.join(MANIFEST).exists():
        return path
    entries = root.fs.get_file_info(pafs.FileSelector(root.path, allow_not_found=True))
    steps = sorted(e.base_name for e in entries if STEP_DIR.match(e.base_name)
                   and root.join(e.base_name, MANIFEST).exists())
    if not steps:
        what = "holds no complete checkpoint" if root.exists() else "does not exist"
        raise CheckpointError(f"{path}: {what} (expected a checkpoint directory with "
                              f"{MANIFEST}, or a run directory of step-* checkpoints)")
    return root.join(steps[-1]).uri


def checkpoint_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint ``path`` names, read where it lies."""
    uri = find_checkpoint(path)
    manifest = json.loads(locate(uri).join(MANIFEST).read_bytes())
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{uri}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return {**manifest, "uri": uri}


def _download(uri: str) -> Path:
    from pyarrow import fs as pafs

    source = locate(uri)
    target = Path(tempfile.mkdtemp(prefix="raymoe-checkpoint-")) / source.path.rsplit("/", 1)[-1]
    target.mkdir()
    pafs.copy_files(source.path, str(target), source_filesystem=source.fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return target


def load_model(path: str, device: str | torch.device = "cpu",
               tokenizer: str | None = None) -> LoadedModel:
    """The model of checkpoint ``path`` on ``device``, ready for inference.

    ``tokenizer`` overrides the one recorded with the checkpoint ("gpt2", "bytes" or a
    tokenizer.json).
    """
    uri = find_checkpoint(path)
    directory = _download(uri) if is_s3(uri) else Path(uri).expanduser()
    manifest = read_manifest(directory)
    extra = manifest["extra"]
    if "config" not in extra:
        raise CheckpointError(f"{directory}: the manifest holds no model config "
                              "(not written by raymoe's trainer)")
    cfg = inference_config(config_from_dict(extra["config"]))
    model = GPT(cfg.model)
    load_checkpoint(directory, model, Mesh(1))
    model = model.to(device).eval()
    return LoadedModel(model, _tokenizer(directory, extra, cfg, tokenizer), cfg, uri, directory,
                       int(extra.get("step", 0)))


def inference_config(cfg: Config) -> Config:
    """One process, no dropout, and MoE layers that drop no token (as the reference
    evaluated its MoE models)."""
    model = cfg.model
    moe = dataclasses.replace(model.moe, eval_drop_tokens=False)
    model = dataclasses.replace(model, dropout=0.0, activation_checkpointing=False, moe=moe)
    parallel = dataclasses.replace(cfg.parallel, ep_size=1, num_workers=1)
    return dataclasses.replace(cfg, model=model, parallel=parallel)


def _tokenizer(directory: Path, extra: dict[str, Any], cfg: Config,
               override: str | None) -> Tokenizer:
    if override:
        return load_tokenizer(override)
    spec = extra.get("tokenizer")
    if spec == TOKENIZER_FILE:
        return tokenizer_from_json((directory / TOKENIZER_FILE).read_text())
    if spec:
        return load_tokenizer(spec)
    if cfg.data.path:  # checkpoints written before the tokenizer was recorded
        from raymoe.data.shards import PreparedDataset

        return PreparedDataset.open(cfg.data.path).tokenizer()
    raise CheckpointError(f"{directory}: no tokenizer recorded; pass one (gpt2, bytes or a "
                          "tokenizer.json)")
