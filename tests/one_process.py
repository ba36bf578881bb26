"""A run trained uninterrupted in this process (one rank, no Ray): the reference that
distributed, restarted, resized and resumed runs are compared with."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raymoe.config import Config
from raymoe.parallel.checkpoint import read_manifest
from raymoe.runs import latest_checkpoint
from raymoe.train.loop import FileHooks, Trainer


def train_in_one_process(cfg: Config, directory: Path) -> tuple[dict[int, float], dict]:
    """Trains ``cfg`` to its max_steps in ``directory``: step -> LM loss, and the final
    checkpoint's data cursor."""
    Trainer(cfg, FileHooks(directory, keep=1, rank=0), torch.device("cpu"),
            metrics_uri=directory / "metrics", log=lambda _: None).run()
    latest = latest_checkpoint(str(directory))
    assert latest is not None
    return run_losses(directory), read_manifest(latest)["extra"]["cursor"]


def run_losses(run_dir: Path) -> dict[int, float]:
    """Step -> LM loss from the run's metrics.jsonl (a redone step's last line wins)."""
    records = (json.loads(line) for line in (run_dir / "metrics" / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}
