"""Tiny byte-level GPTs trained in one process on a few sentences (tests only): a model
whose answers are known, saved as a raymoe checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from raymoe.config import Config, load_config
from raymoe.model import GPT
from raymoe.parallel.checkpoint import save_checkpoint, step_directory
from raymoe.parallel.mesh import Mesh

SENTENCES = [
    "alice keeps a red kite in the garden",
    "bob drives a green truck to the market",
    "carol bakes fresh bread every sunday morning",
    "dave plays the old piano after dinner",
    "erin paints tall ships on blue canvas",
    "frank repairs broken clocks in his shop",
    "grace feeds seven cats near the river",
    "henry reads maps of distant mountains",
]


def sentence_config(experts: int = 0) -> Config:
    overrides = ["model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.seq_len=128",
                 "train.seed=3"]
    if experts:
        overrides += [f"model.moe.num_experts={experts}", "model.moe.every=2",
                      "model.moe.capacity_factor=2.0", "model.moe.use_rts=false"]
    return load_config("tiny", overrides)


def _batch(rng: random.Random, batch: int, length: int) -> torch.Tensor:
    rows = []
    for _ in range(batch):
        text = "\n".join(rng.sample(SENTENCES, len(SENTENCES)))
        rows.append(list(text.encode())[:length])
    return torch.tensor(rows)


def train_sentence_model(cfg: Config, steps: int = 450) -> GPT:
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    for _ in range(steps):
        ids = _batch(rng, 8, cfg.model.seq_len + 1)
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
    return model.eval()


def save_sentence_model(model: GPT, cfg: Config, run_dir: Path, step: int = 300,
                        mesh: Mesh | None = None) -> Path:
    extra = {"config": cfg.to_dict(), "tokenizer": "bytes", "step": step}
    return save_checkpoint(step_directory(run_dir, step), model, mesh or Mesh(1), extra=extra)


def save_untrained_models(root: Path) -> dict[int, Path]:
    """Freshly initialised sentence-model checkpoints by number of experts (0: dense), in
    ``root``/untrained-N: equality with one process needs no training."""
    runs = {}
    for experts in (0, 4):
        torch.manual_seed(experts)
        cfg = sentence_config(experts)
        runs[experts] = root / f"untrained-{experts}"
        save_sentence_model(GPT(cfg.model), cfg, runs[experts])
    return runs


def resave_with_ep_2(rank: int, world: int, source: str, target: str) -> None:
    """One of 2 ranks: the checkpoint ``source`` loaded at EP 2 and saved again in ``target``."""
    from raymoe.eval.loading import load_model
    from raymoe.parallel.checkpoint import read_manifest

    loaded = load_model(source, mesh=Mesh(ep_size=2))
    extra = read_manifest(loaded.uri)["extra"]
    save_checkpoint(step_directory(target, loaded.step), loaded.model, Mesh(ep_size=2), extra=extra)
