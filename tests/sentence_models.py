"""Tiny byte-level GPTs trained in one process on a few sentences (tests only): a model
whose answers are known, saved as a raymoe checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from raymoe.config import Config, load_config
from raymoe.model import GPT
from raymoe.model.generation import generate
from raymoe.parallel.checkpoint import save_checkpoint
from raymoe.parallel.mesh import Mesh
from raymoe.runs import step_directory

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


def unlearnt_sentences(model: GPT) -> list[str]:
    """The sentences whose first two words do not make the model generate the rest
    greedily (the known answers the evaluation tests score)."""
    prompts = [" ".join(s.split()[:2]) for s in SENTENCES]
    rests = [s[len(p):] for p, s in zip(prompts, SENTENCES, strict=True)]
    was_training = model.training
    generated = generate(model.eval(), [list(p.encode()) for p in prompts], max(map(len, rests)))
    model.train(was_training)
    return [s for s, rest, tokens in zip(SENTENCES, rests, generated, strict=True)
            if bytes(tokens[:len(rest)]) != rest.encode()]


def train_sentence_model(cfg: Config, loss_bound: float = 0.15, max_steps: int = 1500,
                         check_every: int = 50) -> GPT:
    """Trains until the model has memorised SENTENCES: the mean training loss of the last
    ``check_every`` steps below ``loss_bound`` and every sentence generated greedily from its
    first two words. The trajectory depends on the CPU's float rounding (the thread count
    alone changes it), so a fixed step count memorises on one machine and not on another."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    losses: list[float] = []
    for step in range(1, max_steps + 1):
        ids = _batch(rng, 8, cfg.model.seq_len + 1)
        loss = model(ids[:, :-1], ids[:, 1:]).loss
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % check_every == 0:
            recent = sum(losses[-check_every:]) / check_every
            if recent < loss_bound and not unlearnt_sentences(model):
                return model.eval()
    raise AssertionError(f"the sentence model did not memorise SENTENCES in {max_steps} steps: "
                         f"mean loss of the last {check_every} steps {recent:.3f} (bound {loss_bound}), "
                         f"not generated: {unlearnt_sentences(model)}")


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
    from raymoe.runs import read_manifest

    loaded = load_model(source, mesh=Mesh(ep_size=2))
    extra = read_manifest(loaded.uri)["extra"]
    save_checkpoint(step_directory(target, loaded.step), loaded.model, Mesh(ep_size=2), extra=extra)
