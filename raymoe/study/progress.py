"""A study's console: a line per trial as it trains, named by the study's model and seed
(not Tune's trial ids), in place of Tune's status tables and every worker's step lines."""

from __future__ import annotations

import time
from typing import Any

from ray.tune.progress_reporter import TrialProgressCallback

PROGRESS_EVERY_S = 60.0
"""At most one progress line per trial this often (an evaluation's line waits for it)."""


def _total_tokens(trial_config: dict[str, Any]) -> int:
    for override in reversed(trial_config["overrides"]):
        if override.startswith("train.total_tokens="):
            return int(float(override.split("=", 1)[1]))
    return 0


def progress_line(name: str, result: dict[str, Any], total_tokens: int) -> str:
    """``dense-base-seed1: 1.23M of 3.00M tokens, loss 5.234, val 5.301, 15.2k tokens/s``."""
    parts = [f"{result['tokens'] / 1e6:.2f}M of {total_tokens / 1e6:.2f}M tokens"]
    if "lm_loss" in result:
        parts.append(f"loss {result['lm_loss']:.3f}")
    parts.append(f"val {result['val_loss']:.3f}")
    if "tokens_per_s" in result:
        parts.append(f"{result['tokens_per_s'] / 1e3:.1f}k tokens/s")
    return f"{name}: {', '.join(parts)}"


class TrialProgress(TrialProgressCallback):
    """Prints each trial's evaluations (at most one a minute) and how it ended. It takes
    the place of Tune's own trial printer (which Tune adds unless one is given, and which
    prints "Trial ... completed. Last result: ..." whatever the verbosity): every method
    of that printer that prints is overridden here."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._latest: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _name(trial: Any) -> str:
        return trial.config["trial"]["name"]

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._started[self._name(trial)] = time.monotonic()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        name = self._name(trial)
        if "lm_loss" in result or "val_loss" in result:
            self._latest[name] = {**self._latest.get(name, {}), **result}
        if "val_loss" not in result or "tokens" not in result:
            return
        now = time.monotonic()
        if now - self._last.get(name, 0.0) >= PROGRESS_EVERY_S:
            self._last[name] = now
            print(progress_line(name, self._latest[name], _total_tokens(trial.config["trial"])), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "done")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "failed")

    def _ended(self, trial: Any, how: str) -> None:
        name = self._name(trial)
        minutes = (time.monotonic() - self._started.get(name, time.monotonic())) / 60
        latest = self._latest.get(name)
        total = _total_tokens(trial.config["trial"])
        tail = ""
        if latest and "val_loss" in latest and "tokens" in latest:
            how = "stopped early" if how == "done" and latest["tokens"] < total else how
            tail = ": " + progress_line(name, latest, total).split(": ", 1)[1]
        print(f"{name} {how} in {minutes:.1f} min{tail}", flush=True)
