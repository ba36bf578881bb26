"""The study's learning-rate search: every model's short runs at every rate of a log grid
(the same grid, tokens, schedule shape and seed for all), read back from their metrics;
each model then trains at the rate whose run ended with the lowest validation loss.

The search's outcome is a JSON file in the study's storage, so a resumed study trains at
the rates it chose before instead of searching again."""

from __future__ import annotations

import json
import math
from typing import Any

from raymoe.config import ConfigError, load_config
from raymoe.data.storage import locate
from raymoe.runs import read_metrics, run_location
from raymoe.study.spec import Study

SEARCH_FILE = "lr_search.json"


def search_uri(study: Study) -> str:
    return locate(study.uri).join(SEARCH_FILE).uri


def load_search(study: Study) -> dict[str, Any] | None:
    """The search this study already ran with the same grid, tokens and models, if any."""
    found = locate(search_uri(study))
    if study.lr_search is None or not found.exists():
        return None
    search = json.loads(found.read_bytes())
    same = (search["lrs"] == study.lr_search.lrs and search["tokens"] == study.lr_search.tokens
            and set(search["chosen"]) == {m.name for m in study.models})
    return search if same else None


def search_outcome(study: Study, errors: dict[str, str]) -> dict[str, Any]:
    """Each search run's last validation loss and how far it got; each model's choice."""
    assert study.lr_search is not None
    runs = [_search_run(trial, errors.get(trial["name"], ""), study.lr_search.tokens)
            for trial in study.search_trials()]
    chosen = {}
    for model in study.models:
        mine = [r for r in runs if r["model"] == model.name and r["val_loss"] is not None]
        finished = [r for r in mine if not r["stopped_early"]] or mine
        if finished:
            chosen[model.name] = min(finished, key=lambda r: r["val_loss"])["lr"]
    return {"tokens": study.lr_search.tokens, "seed": study.seeds[0], "lrs": study.lr_search.lrs,
            "trials": runs, "chosen": chosen}


def _search_run(trial: dict[str, Any], error: str, tokens: int) -> dict[str, Any]:
    run = {"model": trial["model"], "lr": trial["lr"], "val_loss": None, "tokens": 0,
           "stopped_early": False, "error": error}
    try:
        cfg = load_config(trial["config"], trial["overrides"])
    except ConfigError as err:
        return {**run, "error": error or f"ConfigError: {err}"}
    evaluated = [r for r in read_metrics(run_location(cfg).metrics_uri)
                 if "val_loss" in r and math.isfinite(r["val_loss"])]
    if evaluated:
        run.update(val_loss=evaluated[-1]["val_loss"], tokens=evaluated[-1]["tokens"])
        run["stopped_early"] = not error and run["tokens"] < tokens
    return run


def save_search(study: Study, search: dict[str, Any]) -> None:
    locate(search_uri(study)).write_bytes(json.dumps(search, indent=1).encode())


def describe_search(search: dict[str, Any]) -> list[str]:
    """A line per model: its chosen rate and every rate's loss."""
    lines = []
    for model, lr in search["chosen"].items():
        tried = ", ".join(f"{r['lr']:g}: {r['val_loss']:.4f}" + (" (stopped)" if r["stopped_early"] else "")
                          for r in search["trials"] if r["model"] == model and r["val_loss"] is not None)
        lines.append(f"learning rate of {model}: {lr:g} (validation loss after the search's runs: {tried})")
    return lines
