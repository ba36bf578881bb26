"""Where a run lives and what it holds, on any storage (a local path or an s3:// URI).

A run is a directory ``STORAGE/RUN_NAME``: its checkpoints ``step-NNNNNNNN`` (complete once
their manifest and every file it lists are there) and its metrics (``metrics/metrics.jsonl``, TensorBoard event
files under ``metrics/tensorboard``). Everything here reads through the storage layer, so
the driver, any worker and a later study see the same run wherever it lies; nothing
downloads a checkpoint to find it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from raymoe.data.storage import is_s3, locate
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.parallel.checkpoint import (
    MANIFEST,
    STEP_DIR,
    CheckpointError,
    missing_files,
    read_manifest,
)

if TYPE_CHECKING:
    from raymoe.config import Config

METRICS_FILE = "metrics.jsonl"


def absolute(uri: str) -> str:
    """A URI as is, a local path made absolute (Ray workers do not share the driver's cwd)."""
    return uri.rstrip("/") if is_s3(uri) else os.path.abspath(os.path.expanduser(uri))


@dataclass(frozen=True)
class RunLocation:
    name: str
    storage: str
    """The storage root as given (an s3:// URI or an absolute path)."""

    @property
    def uri(self) -> str:
        """The run directory."""
        return locate(self.storage).join(*self.name.split("/")).uri

    @property
    def metrics_uri(self) -> str:
        return locate(self.uri).join("metrics").uri


def run_location(cfg: Config) -> RunLocation:
    return RunLocation(cfg.train.run_name or cfg.name, absolute(cfg.train.storage))


Log = Callable[[str], None]
_warn: Log = logging.getLogger("raymoe").warning


def _step_directories(run_uri: str) -> list[tuple[int, str]]:
    """(step, uri) of a run's step-* directories, oldest first."""
    root = locate(absolute(run_uri))
    steps = sorted((int(m.group(1)), name) for name in root.children() if (m := STEP_DIR.match(name)))
    return [(step, root.join(name).uri) for step, name in steps]


def complete_checkpoints(run_uri: str) -> list[str]:
    """The complete step-* checkpoints of a run, oldest first (a save or an upload that
    did not finish is skipped)."""
    return [uri for _, uri in _step_directories(run_uri) if missing_files(uri) is None]


def latest_checkpoint(run_uri: str, before_step: int | None = None, log: Log = _warn) -> str | None:
    """The highest-step complete checkpoint of a run (below ``before_step`` if given), or
    None; each newer incomplete one is logged with what it lacks."""
    for step, uri in reversed(_step_directories(run_uri)):
        if before_step is not None and step >= before_step:
            continue
        problem = missing_files(uri)
        if problem is None:
            return uri
        log(f"skipping the incomplete checkpoint {uri}: {problem}")
    return None


def resumable(checkpoint_uri: str, log: Log = _warn) -> str | None:
    """The checkpoint to resume from when the launcher names ``checkpoint_uri`` (a run's
    step-* directory): itself when complete, else the latest complete one before it. Ray
    Train names a checkpoint once every rank's upload finished, but a rank's file can
    still be lost (a preempted rank's upload, a deleted object); a partial one is never
    loaded."""
    problem = missing_files(checkpoint_uri)
    if problem is None:
        return checkpoint_uri
    run_uri, _, name = checkpoint_uri.rstrip("/").rpartition("/")
    match = STEP_DIR.match(name)
    previous = latest_checkpoint(run_uri, int(match.group(1)), log) if match else None
    log(f"not resuming from {checkpoint_uri}: incomplete ({problem}); "
        + (f"resuming from {previous}, the latest complete checkpoint before it" if previous
           else "no complete checkpoint before it, starting afresh"))
    return previous


def find_checkpoint(path: str, log: Log = _warn) -> str:
    """The checkpoint that ``path`` names: ``path`` itself when it holds a manifest (it
    must be complete), else the latest complete checkpoint of the run directory ``path``."""
    path = absolute(path)
    root = locate(path)
    if root.join(MANIFEST).exists():
        problem = missing_files(path)
        if problem is not None:
            raise CheckpointError(f"{path}: an incomplete checkpoint: {problem}")
        return path
    latest = latest_checkpoint(path, log=log)
    if latest is None:
        what = "holds no complete checkpoint" if root.exists() else "does not exist"
        raise CheckpointError(f"{path}: {what} (expected a checkpoint directory with "
                              f"{MANIFEST}, or a run directory of step-* checkpoints)")
    return latest


def checkpoint_manifest(path: str) -> dict[str, Any]:
    """The manifest of the checkpoint ``path`` names, with its ``uri``."""
    uri = find_checkpoint(path)
    return {**read_manifest(uri), "uri": uri}


def checkpoint_tokenizer(checkpoint_uri: str, extra: dict[str, Any],
                         override: str | None = None) -> Tokenizer:
    """The tokenizer a checkpoint was trained with (``override`` wins): a trained one is
    stored in the checkpoint, a named one ("gpt2", "bytes") in its manifest."""
    if override:
        return load_tokenizer(override)
    spec = extra.get("tokenizer")
    if spec == TOKENIZER_FILE:
        return tokenizer_from_json(locate(checkpoint_uri).join(TOKENIZER_FILE).read_bytes().decode())
    if spec:
        return load_tokenizer(spec)
    data_path = extra.get("config", {}).get("data", {}).get("path")
    if data_path:  # checkpoints written before the tokenizer was recorded
        from raymoe.data.shards import PreparedDataset

        return PreparedDataset.open(data_path).tokenizer()
    raise CheckpointError(f"{checkpoint_uri}: no tokenizer recorded; pass one (gpt2, bytes or "
                          "a tokenizer.json)")
