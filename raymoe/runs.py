"""Where a run lives and what it holds, on any storage (a local path or an s3:// URI).

A run is a directory ``STORAGE/RUN_NAME``: its checkpoints ``step-NNNNNNNN`` and its
metrics (``metrics/metrics.jsonl.NNNNNN`` parts and TensorBoard event files under
``metrics/tensorboard``; ``read_metrics`` reads them back).
A checkpoint is complete when its manifest is there and every file the manifest lists is
there with its size (one listing): anything less (a crash mid-save, an upload that failed
or is still running) is not a checkpoint. Everything here reads through the storage
layer, so the driver, any worker and a later study see the same run wherever it lies;
nothing downloads a checkpoint to find it.

raymoe.parallel.checkpoint writes and reads a checkpoint's tensors and writes its
manifest in the format read here; it imports its names from here, never the other way
(so this module needs no torch).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raymoe.data.storage import is_s3, locate
from raymoe.data.tokenizers import TOKENIZER_FILE, Tokenizer, load_tokenizer, tokenizer_from_json
from raymoe.errors import RaymoeError, TransientError

if TYPE_CHECKING:
    from raymoe.config import Config

LEGACY_METRICS = "metrics.jsonl"
METRICS_PART = re.compile(r"^metrics\.jsonl\.(\d+)$")
"""A part of a run's metrics.jsonl lines (S3 has no append: a writer adds parts)."""
FORMAT = "raymoe-checkpoint/3"
"""/3: the manifest lists every file with its size."""
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RaymoeError, RuntimeError):
    """A checkpoint is missing, incomplete, or of another model."""


class CheckpointUnavailable(CheckpointError, TransientError):
    """A checkpoint could not be read for a reason that may pass (storage unreachable,
    throttled, a reset connection)."""


def step_name(step: int) -> str:
    """The name of a run's checkpoint directory of ``step``."""
    return f"step-{step:08d}"


def step_directory(root: str | Path, step: int) -> Path:
    return Path(root) / step_name(step)


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


# ---------------------------------------------------------------------------- a run's metrics


def metrics_part(number: int) -> str:
    return f"metrics.jsonl.{number:06d}"


def metrics_parts(metrics_uri: str, children: list[str] | None = None) -> list[int]:
    """The numbers of the metrics.jsonl parts in ``metrics_uri`` (or among its
    ``children``, listed by the caller), in order."""
    names = locate(metrics_uri).children() if children is None else children
    return sorted(int(m.group(1)) for name in names if (m := METRICS_PART.match(name)))


def read_metrics(metrics_uri: str) -> list[dict[str, Any]]:
    """Every record of a run's metrics (``RunLocation.metrics_uri``), in the order written;
    none when there are none: a whole ``metrics.jsonl`` of a run written before metrics
    came in parts, then the parts. A line still being written (local storage appends in
    place) is left out."""
    root = locate(metrics_uri)
    children = root.children()
    files = ([LEGACY_METRICS] if LEGACY_METRICS in children else []) + \
        [metrics_part(number) for number in metrics_parts(metrics_uri, children)]
    return [json.loads(line) for name in files for line in root.join(name).read_bytes().split(b"\n")[:-1]]


Log = Callable[[str], None]
_warn: Log = logging.getLogger("raymoe").warning


# ---------------------------------------------------------------------------- one checkpoint


def read_manifest(directory: str | Path, count: Callable[[bytes], bytes] | None = None) -> dict[str, Any]:
    """The format-checked manifest of a checkpoint, read where it lies (a local directory
    or an s3:// URI). ``count`` is handed the bytes read (a checkpoint's reader counts
    every byte it reads)."""
    path = locate(str(directory)).join(MANIFEST)
    if not path.exists():
        raise CheckpointError(f"{directory}: no {MANIFEST}; the checkpoint is incomplete "
                              "(a save that did not finish) or not a raymoe checkpoint")
    data = path.read_bytes()
    manifest = json.loads(count(data) if count else data)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path.uri}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path.uri}: lists no files (not written by raymoe's save_checkpoint)")
    return manifest


def missing_files(directory: str | Path) -> str | None:
    """Why the checkpoint in ``directory`` is not complete, or None when it is: its
    manifest and every file the manifest lists, with that size (one listing and the
    manifest's read)."""
    root = locate(str(directory))
    present = root.file_sizes()
    if MANIFEST not in present:
        return f"no {MANIFEST}"
    listed = read_manifest(root.uri)["files"]
    gone = [name for name in listed if name not in present]
    short = [f"{name} ({present[name]} of {size} bytes)" for name, size in listed.items()
             if name in present and present[name] != size]
    problems = []
    if gone:
        problems.append(f"missing {', '.join(gone[:5])}" + (f" and {len(gone) - 5} more" if len(gone) > 5 else ""))
    if short:
        problems.append(f"incomplete {', '.join(short[:5])}")
    return "; ".join(problems) or None


# ---------------------------------------------------------------------------- a run's checkpoints


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
