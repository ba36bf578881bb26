"""Load a raymoe checkpoint, written with any expert-parallel size, into one process for
inference: every expert local, MoE layers in eval mode with no token dropping."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from raymoe.config import Config, config_from_dict
from raymoe.data.storage import is_s3, s3_filesystem
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.model import GPT
from raymoe.parallel.checkpoint import (MANIFEST, CheckpointError, latest_checkpoint,
                                        load_checkpoint, read_manifest)
from raymoe.parallel.mesh import Mesh


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: Config
    directory: Path
    """The checkpoint directory (a local copy for s3:// checkpoints)."""
    step: int


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint);
    ``s3://`` ones are downloaded to a local temporary directory first."""
    if is_s3(path):
        path = str(_download(path))
    directory = Path(path).expanduser()
    if (directory / MANIFEST).is_file():
        return directory
    latest = latest_checkpoint(directory)
    if latest is None:
        what = "does not exist" if not directory.exists() else "holds no complete checkpoint"
        raise CheckpointError(f"{path}: {what} (expected a checkpoint directory with "
                              f"{MANIFEST}, or a run directory of step-* checkpoints)")
    return latest


def _download(uri: str) -> Path:
    from pyarrow import fs as pafs

    filesystem, source = s3_filesystem(), uri[len("s3://"):].rstrip("/")
    selector = pafs.FileSelector(source, allow_not_found=True)
    names = [info.base_name for info in filesystem.get_file_info(selector)]
    if MANIFEST not in names:  # a run: take its latest complete checkpoint
        steps = sorted(n for n in names if n.startswith("step-")
                       and filesystem.get_file_info(f"{source}/{n}/{MANIFEST}").is_file)
        if not steps:
            raise CheckpointError(f"{uri}: holds no complete checkpoint")
        source = f"{source}/{steps[-1]}"
    target = Path(tempfile.mkdtemp(prefix="raymoe-checkpoint-")) / source.rsplit("/", 1)[-1]
    target.mkdir()
    pafs.copy_files(source, str(target), source_filesystem=filesystem,
                    destination_filesystem=pafs.LocalFileSystem())
    return target


def load_model(path: str, device: str | torch.device = "cpu",
               tokenizer: Optional[str] = None) -> LoadedModel:
    """The model of checkpoint ``path`` on ``device``, ready for inference.

    ``tokenizer`` overrides the one recorded with the checkpoint ("gpt2", "bytes" or a
    tokenizer.json).
    """
    directory = resolve_checkpoint(path)
    manifest = read_manifest(directory)
    extra = manifest["extra"]
    if "config" not in extra:
        raise CheckpointError(f"{directory}: the manifest holds no model config "
                              "(not written by raymoe's trainer)")
    cfg = inference_config(config_from_dict(extra["config"]))
    model = GPT(cfg.model)
    load_checkpoint(directory, model, Mesh(1))
    model = model.to(device).eval()
    return LoadedModel(model, _tokenizer(directory, extra, cfg, tokenizer), cfg, directory,
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
               override: Optional[str]) -> Tokenizer:
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
