"""Load a raymoe checkpoint, written with any expert-parallel size, into one process for
inference: every expert local, MoE layers in eval mode with no token dropping."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from raymoe.config import Config, config_from_dict
from raymoe.data.tokenizers import Tokenizer
from raymoe.model import GPT
from raymoe.model.precision import autocast_dtype, cast_for_inference
from raymoe.parallel.checkpoint import CheckpointSource
from raymoe.parallel.mesh import Mesh
from raymoe.runs import CheckpointError, checkpoint_tokenizer, find_checkpoint


@dataclass
class LoadedModel:
    model: GPT
    tokenizer: Tokenizer
    config: Config
    uri: str
    """The checkpoint, as found (local path or s3:// URI), read where it lies."""
    step: int
    bytes_read: int
    """Of the checkpoint, by this process (its experts only, in an expert-parallel group)."""


def load_model(path: str, device: str | torch.device = "cpu",
               tokenizer: str | None = None, mesh: Mesh | None = None) -> LoadedModel:
    """The model of checkpoint ``path`` on ``device``, ready for inference.

    ``tokenizer`` overrides the one recorded with the checkpoint ("gpt2", "bytes" or a
    tokenizer.json). ``mesh``: this rank's expert-parallel group (default: one process
    holding every expert); the rank loads its own experts only. Where inference autocasts
    (GPU: bf16), the linear layers' and experts' weights are stored in its dtype
    (cast_for_inference): run the model under ``raymoe.model.precision.autocast``.
    """
    mesh = mesh or Mesh(1)
    uri = find_checkpoint(path)
    source = CheckpointSource(uri)
    extra = source.manifest["extra"]
    if "config" not in extra:
        raise CheckpointError(f"{uri}: the manifest holds no model config "
                              "(not written by raymoe's trainer)")
    cfg = inference_config(config_from_dict(extra["config"]), mesh.ep_size)
    model = GPT(cfg.model, mesh.expert_exchange())
    source.load(model, mesh)
    model = model.to(device).eval()
    cast_for_inference(model, autocast_dtype(torch.device(device)))
    return LoadedModel(model, checkpoint_tokenizer(uri, extra, tokenizer), cfg, uri,
                       int(extra.get("step", 0)), source.bytes_read)


def inference_config(cfg: Config, ep_size: int = 1) -> Config:
    """One expert-parallel group, no dropout, and MoE layers that drop no token (as the
    reference evaluated its MoE models)."""
    model = cfg.model
    moe = dataclasses.replace(model.moe, eval_drop_tokens=False)
    model = dataclasses.replace(model, dropout=0.0, activation_checkpointing=False, moe=moe)
    parallel = dataclasses.replace(cfg.parallel, ep_size=ep_size, num_workers=ep_size)
    return dataclasses.replace(cfg, model=model, parallel=parallel)
