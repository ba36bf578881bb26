"""Training metrics: what is measured each logged step, and where it is written
(TensorBoard event files and metrics.jsonl parts in the run's storage, off the training
thread; a progress line)."""

from __future__ import annotations

import datetime
import json
import math
import queue
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch

from raymoe.config import TrainConfig
from raymoe.data.storage import locate
from raymoe.runs import metrics_part, metrics_parts

if TYPE_CHECKING:
    from tensorboardX.event_file_writer import EventsWriter

    from raymoe.model import GPT
    from raymoe.train.step import StepResult

PART_BYTES = 4 * 2**20
"""A part of metrics.jsonl ends at this size, and the part of the TensorBoard events
with it (the same reports, in fewer bytes)."""
TENSORBOARD = "tensorboard"

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "A10G": 125e12, "L4": 121e12}
"""Dense bf16 peak per GPU, by a substring of the device name."""


class StepTimer:
    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self) -> float:
        return time.perf_counter() - self._start


def peak_flops(device: torch.device, configured: float) -> float | None:
    if configured > 0:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def model_flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 x active parameters plus attention (12 x L x d x T)."""
    m = model.cfg
    return 6 * model.num_parameters(active_only=True) + 12 * m.n_layer * m.d_model * m.seq_len


@dataclass(frozen=True)
class _Report:
    step: int
    time: float
    metrics: dict[str, Any]


@dataclass(frozen=True)
class RunFacts:
    """What a run's step metrics report besides the step itself: fixed for the run."""

    global_batch: int
    workers: int
    ep_size: int
    flops_per_token: float
    peak_flops: float | None
    """A worker's (see peak_flops); None where unknown, and then no MFU is reported."""


def step_metrics(run: RunFacts, result: StepResult, lr: float, seconds: float, data_wait: float,
                 tokens_per_step: int, skipped_steps: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "loss": result.loss, "lm_loss": result.lm_loss, "l_aux": result.l_aux, "lr": lr,
        "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_step / seconds,
        "samples_per_s": run.global_batch / seconds, "step_seconds": seconds,
        "data_wait_s": data_wait, "skipped_steps": skipped_steps,
        "workers": run.workers, "ep_size": run.ep_size,
    }
    if run.peak_flops:
        metrics["mfu"] = run.flops_per_token * metrics["tokens_per_s"] / (run.peak_flops * run.workers)
    for i, (counts, dropped) in enumerate(zip(result.tokens_per_expert, result.dropped_fraction, strict=False)):
        load = counts.float()
        metrics[f"moe{i}/load_min"] = int(load.min())
        metrics[f"moe{i}/load_max"] = int(load.max())
        metrics[f"moe{i}/load_cv"] = float(load.std() / load.mean()) if load.mean() > 0 else 0.0
        metrics[f"moe{i}/dropped"] = dropped
    return metrics


class MetricsWriter:
    """Rank 0's reports as metrics.jsonl lines and TensorBoard events, kept in the run's
    storage ``uri`` (a local directory or s3://) beside its checkpoints, so that a study or
    a user reads them there (raymoe.runs.read_metrics) whichever node rank 0 ran on.

    The training thread only queues a report: the thread ``raymoe-metrics`` writes it, so
    that no rank waits in the next collective for rank 0's storage. Both files come in
    parts of up to PART_BYTES, numbered on from the parts already in storage (a resumed
    run reads nothing back). Local storage is appended to in place. S3 has no append: the
    parts are written in a local staging directory, and those that grew are copied up (so
    at most PART_BYTES of each file; a full part is never sent again) at most every
    ``sync_seconds``, at each ``flush`` and at close. A write that failed (the storage
    layer's StorageError names the part, in the run's directory) is raised on the training
    thread by its next call.
    """

    sync_seconds = 30.0

    def __init__(self, uri: str | Path):
        self.target = locate(str(uri))
        self.remote = not isinstance(self.target.fs, pafs.LocalFileSystem)
        self.directory = (Path(tempfile.mkdtemp(prefix="raymoe-metrics-")) if self.remote
                          else Path(self.target.path))
        (self.directory / TENSORBOARD).mkdir(parents=True, exist_ok=True)
        self._part = max(metrics_parts(self.target.uri), default=-1) + 1
        self._lines: IO[bytes] | None = None
        self._events: EventsWriter | None = None
        self._uploaded: dict[Path, int] = {}
        """Staged file -> its size when last copied up."""
        self._queue: queue.Queue[_Report | threading.Event | None] = queue.Queue()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="raymoe-metrics", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the training thread

    def write(self, step: int, metrics: dict[str, Any], sync: bool = False) -> None:
        """Queue a report; with ``sync``, return once it is in storage (``flush``)."""
        self._raise_failure()
        self._queue.put(_Report(step, time.time(), dict(metrics)))
        if sync:
            self.flush()

    def flush(self) -> None:
        """Wait until every report queued so far is in the run's storage."""
        done = threading.Event()
        self._queue.put(done)
        done.wait()
        self._raise_failure()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.remote:
            shutil.rmtree(self.directory, ignore_errors=True)
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    # ---------------------------------------------------------------- the writer thread

    def _work(self) -> None:
        """Reports in order; an upload ``sync_seconds`` after the first report it carries,
        at each flush, and the last at the end. Once a write failed, nothing more is written."""
        due: float | None = None
        while True:
            try:
                item = self._queue.get(timeout=None if due is None else max(due - time.monotonic(), 0.0))
            except queue.Empty:
                item = threading.Event()  # the upload that is due: nobody waits for it
            try:
                if self._failure is not None:
                    pass
                elif isinstance(item, _Report):
                    self._write(item)
                    if self.remote and due is None:
                        due = time.monotonic() + self.sync_seconds
                else:
                    if item is None:
                        self._end_part()
                    self._upload()
                    due = None
            except BaseException as err:  # the training thread raises it
                self._failure, due = err, None
            finally:
                if isinstance(item, threading.Event):
                    item.set()
            if item is None:
                return

    def _write(self, report: _Report) -> None:
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        if self._lines is None or self._events is None:
            self._lines = open(self.directory / metrics_part(self._part), "ab")
            self._events = EventsWriter(str(self.directory / TENSORBOARD / "events"), f".{self._part:06d}")
        line = json.dumps({"step": report.step, "time": report.time, **report.metrics}) + "\n"
        self._lines.write(line.encode())
        self._lines.flush()
        scalars = [Summary.Value(tag=key, simple_value=float(value)) for key, value in report.metrics.items()
                   if isinstance(value, (int, float)) and math.isfinite(value)]
        self._events.write_event(Event(wall_time=report.time, step=report.step, summary=Summary(value=scalars)))
        self._events.flush()
        if self._lines.tell() >= PART_BYTES:
            self._end_part()
            self._part += 1

    def _end_part(self) -> None:
        if self._lines is not None and self._events is not None:
            self._lines.close()
            self._events.close()
        self._lines = self._events = None

    def _upload(self) -> None:
        """Copy the staged files that grew since their last upload to the run's storage."""
        if not self.remote:
            return
        for path in sorted(p for p in self.directory.rglob("*") if p.is_file()):
            size = path.stat().st_size
            if self._uploaded.get(path) != size:
                self.target.join(*path.relative_to(self.directory).parts).write_bytes(path.read_bytes())
                self._uploaded[path] = size

    def progress_line(self, step: int, metrics: dict[str, Any], cfg: TrainConfig, tokens: int) -> str:
        rate = metrics["tokens_per_s"]
        if cfg.max_steps:
            left_tokens = max(cfg.max_steps - step, 0) * (tokens / max(step, 1))
        else:
            left_tokens = max(cfg.total_tokens - tokens, 0)
        eta = datetime.timedelta(seconds=int(left_tokens / rate)) if rate > 0 else "?"
        line = (f"step {step:6d} | loss {metrics['lm_loss']:.4f} | l_aux {metrics['l_aux']:.3f} | "
                f"lr {metrics['lr']:.2e} | {rate:,.0f} tok/s | grad {metrics['grad_norm']:.2f} | "
                f"ETA {eta}")
        if "val_loss" in metrics:
            line += f" | val {metrics['val_loss']:.4f}"
            extra = [f"{key.removeprefix('val_loss/')} {value:.4f}" for key, value in metrics.items()
                     if key.startswith("val_loss/")]
            line += f" ({', '.join(extra)})" if extra else ""
        return line
