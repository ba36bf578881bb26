"""Training metrics: what is measured each logged step, and where it is written
(TensorBoard event files and metrics.jsonl in the run's storage, a progress line)."""

from __future__ import annotations

import datetime
import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import torch

from raymoe.config import TrainConfig
from raymoe.data.storage import locate
from raymoe.runs import METRICS_FILE

if TYPE_CHECKING:
    from raymoe.model import GPT
    from raymoe.train.loop import Trainer
    from raymoe.train.step import StepResult

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


def flops_per_token(trainer: Trainer) -> float:
    return model_flops_per_token(trainer.model)


def model_flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 x active parameters plus attention (12 x L x d x T)."""
    m = model.cfg
    return 6 * model.num_parameters(active_only=True) + 12 * m.n_layer * m.d_model * m.seq_len


def step_metrics(trainer: Trainer, result: StepResult, lr: float, seconds: float,
                 data_wait: float, tokens_per_step: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "loss": result.loss, "lm_loss": result.lm_loss, "l_aux": result.l_aux, "lr": lr,
        "grad_norm": result.grad_norm, "tokens_per_s": tokens_per_step / seconds,
        "samples_per_s": trainer.cfg.train.global_batch / seconds, "step_seconds": seconds,
        "data_wait_s": data_wait, "skipped_steps": trainer.skipped,
        "workers": trainer.world, "ep_size": trainer.mesh.ep_size, "idle_workers": trainer.idle_workers,
    }
    peak = peak_flops(trainer.device, trainer.cfg.train.peak_flops)
    if peak:
        metrics["mfu"] = flops_per_token(trainer) * metrics["tokens_per_s"] / (peak * trainer.world)
    for i, (counts, dropped) in enumerate(zip(result.tokens_per_expert, result.dropped_fraction, strict=False)):
        load = counts.float()
        metrics[f"moe{i}/load_min"] = int(load.min())
        metrics[f"moe{i}/load_max"] = int(load.max())
        metrics[f"moe{i}/load_cv"] = float(load.std() / load.mean()) if load.mean() > 0 else 0.0
        metrics[f"moe{i}/dropped"] = dropped
    return metrics


class MetricsWriter:
    """TensorBoard event files and a metrics.jsonl line per report, kept in the run's
    storage ``uri`` (a local directory or s3://) beside its checkpoints, so a study or a
    user reads them from there whichever node rank 0 ran on.

    For remote storage the files are written in a local staging directory and copied up
    (whole objects: S3 has no append) at most every ``sync_seconds``, with every
    checkpoint and at close; a resumed run first fetches the metrics.jsonl it continues.
    """

    def __init__(self, uri: str | Path, sync_seconds: float = 30.0):
        from tensorboardX import SummaryWriter

        self.target = locate(str(uri))
        self.remote = not isinstance(self.target.fs, pafs.LocalFileSystem)
        self.directory = (Path(tempfile.mkdtemp(prefix="raymoe-metrics-")) if self.remote
                          else Path(self.target.path))
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.remote and self.target.join(METRICS_FILE).exists():
            (self.directory / METRICS_FILE).write_bytes(self.target.join(METRICS_FILE).read_bytes())
        self.tensorboard = SummaryWriter(str(self.directory / "tensorboard"))
        self.sync_seconds = sync_seconds
        self.synced: dict[Path, tuple[int, int]] = {}
        self.last_sync = time.monotonic()
        self.started = time.monotonic()

    def write(self, step: int, metrics: dict[str, Any], sync: bool = False) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.tensorboard.add_scalar(key, value, step)
        self.tensorboard.flush()
        with open(self.directory / METRICS_FILE, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        if sync or time.monotonic() - self.last_sync >= self.sync_seconds:
            self.sync()

    def sync(self) -> None:
        """Copy the files that changed since the last sync to the run's storage."""
        self.last_sync = time.monotonic()
        if not self.remote:
            return
        for path in sorted(p for p in self.directory.rglob("*") if p.is_file()):
            stat = path.stat()
            if self.synced.get(path) != (stat.st_size, stat.st_mtime_ns):
                self.target.join(*path.relative_to(self.directory).parts).write_bytes(path.read_bytes())
                self.synced[path] = (stat.st_size, stat.st_mtime_ns)

    def close(self) -> None:
        self.tensorboard.close()
        self.sync()
        if self.remote:
            shutil.rmtree(self.directory, ignore_errors=True)

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
        return line
