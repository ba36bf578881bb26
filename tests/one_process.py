"""A run trained uninterrupted in this process (one rank, no Ray): the reference that
distributed, restarted, resized and resumed runs are compared with; and hooks that count
what each step of a Trainer does."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from raymoe.config import Config
from raymoe.runs import latest_checkpoint, read_manifest, read_metrics
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
    """Step -> LM loss from the run's metrics (a redone step's last record wins)."""
    return {r["step"]: r["lm_loss"] for r in read_metrics(str(run_dir / "metrics")) if "lm_loss" in r}


class StepCounts(FileHooks):
    """FileHooks that note, after every step, whether it saved and what ``count()`` (set by
    the test) says then."""

    def __init__(self, run_dir: Path, rank: int = 0):
        super().__init__(run_dir, keep=5, rank=rank)
        self.count: Callable[[], int] = lambda: 0
        self.noted: list[tuple[int, bool, int]] = []

    def on_step(self, step: int, seconds: float, saved: bool) -> None:
        self.noted.append((step, saved, self.count()))

    def saved(self) -> list[int]:
        return [step for step, saved, _ in self.noted if saved]

    def per_step(self) -> dict[int, int]:
        """Step -> what was counted from the previous step's end to its own (the first
        step: from the count's start). A step ends after its checkpoint and before its
        metrics are published."""
        ends = [0] + [n for _, _, n in self.noted]
        return {step: ends[i + 1] - ends[i] for i, (step, _, _) in enumerate(self.noted)}
