"""The per-worker training loop, independent of how its processes were launched.

``Trainer`` runs on every data-parallel rank of an initialised process group (or alone).
What depends on the launcher (where checkpoints go, how metrics leave the worker) is a
``RunHooks`` object: Ray Train's in raymoe.train.launcher, plain files in ``FileHooks``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from raymoe.config import Config
from raymoe.data.blend import Blend
from raymoe.data.shards import DatasetError
from raymoe.data.stream import Cursor, SequenceReader
from raymoe.data.tokenizers import TOKENIZER_FILE
from raymoe.errors import RaymoeError
from raymoe.model.precision import autocast_to, training_dtype
from raymoe.parallel import Mesh
from raymoe.parallel.build import build_model
from raymoe.parallel.checkpoint import CheckpointSource, describe_written, save_checkpoint
from raymoe.runs import complete_checkpoints, latest_checkpoint, read_manifest, step_directory
from raymoe.train.cadence import CheckpointCadence
from raymoe.train.metrics import (
    MetricsWriter,
    RunFacts,
    StepTimer,
    model_flops_per_token,
    peak_flops,
    step_metrics,
)
from raymoe.train.optim import build_optimizer, learning_rate, set_learning_rate
from raymoe.train.preemption import RestartGuard
from raymoe.train.preflight import open_extra_validation, open_training_data
from raymoe.train.step import train_step
from raymoe.train.transfer import to_device


class NonFiniteLossError(RaymoeError, FloatingPointError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class RunHooks(Protocol):
    def latest_checkpoint(self) -> contextlib.AbstractContextManager[str | None]:
        """Where the latest complete checkpoint lies (a local path or an s3:// URI), or None."""

    def new_checkpoint_dir(self, step: int) -> Path:
        """Where this rank writes the files of the checkpoint of ``step``."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int,
               wait_for_upload: bool = False) -> None:
        """Publish metrics (and a written checkpoint: in storage before returning when
        ``wait_for_upload``, else uploaded in the background)."""

    def on_step(self, step: int, seconds: float, saved: bool) -> None:
        """After every trained step (``saved``: a checkpoint of it was written)."""

    def grow_requested(self) -> bool:
        """Whether the group is about to be restarted larger (raymoe.train.scaling): known
        to rank 0, False elsewhere."""


@dataclass
class TrainSummary:
    step: int
    tokens: int
    loss: float
    validation_loss: float
    skipped_steps: int


class FileHooks:
    """Checkpoints in ``run_dir``/step-N on a filesystem every rank shares; metrics only
    through the MetricsWriter."""

    def __init__(self, run_dir: Path, keep: int, rank: int):
        self.run_dir, self.keep, self.rank = Path(run_dir), keep, rank

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        yield latest_checkpoint(str(self.run_dir))

    def new_checkpoint_dir(self, step: int) -> Path:
        return step_directory(self.run_dir, step)

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int,
               wait_for_upload: bool = False) -> None:
        if checkpoint_dir is None or self.rank != 0:
            return
        for old in map(Path, complete_checkpoints(str(self.run_dir))[:-self.keep]):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()

    def on_step(self, step: int, seconds: float, saved: bool) -> None:
        pass

    def grow_requested(self) -> bool:
        return False


class Trainer:
    def __init__(self, cfg: Config, hooks: RunHooks, device: torch.device,
                 metrics_uri: str | Path | None = None, log=print):
        self.cfg, self.hooks, self.device, self.log = cfg, hooks, device, log
        self.mesh = Mesh(cfg.parallel.ep_size)
        self.rank, self.world = self.mesh.dp_rank, self.mesh.dp_size
        """This rank's part of every batch, and how many parts there are."""
        torch.manual_seed(cfg.train.seed)  # same dense init on every rank
        self.compute_dtype = training_dtype(cfg, device)
        """bf16 autocast, or None: fp32 (train.precision)."""
        self.model = build_model(cfg, self.mesh, device)  # never whole on a rank
        self.facts = RunFacts(global_batch=cfg.train.global_batch, workers=self.world,
                              ep_size=self.mesh.ep_size,
                              flops_per_token=model_flops_per_token(self.model),
                              peak_flops=peak_flops(device, cfg.train.peak_flops))
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=device.type == "cuda")
        self.blend = open_training_data(cfg)
        self.dataset = self.blend.first
        self.tokenizer_json = (self.dataset.root.join(TOKENIZER_FILE).read_bytes()
                               if self.dataset.manifest["tokenizer"] == TOKENIZER_FILE else None)
        """A trained tokenizer, read once, copied into every checkpoint (self-contained)."""
        self.extra_validation = open_extra_validation(cfg, self.dataset)
        self.metrics = MetricsWriter(metrics_uri) if metrics_uri is not None and self.rank == 0 else None
        self.step, self.tokens, self.skipped, self.consecutive_nan = 0, 0, 0, 0
        resumed = self._resume()
        self.cadence = CheckpointCadence(cfg.train, resumed.get("saved_at") if resumed else None)
        self.restarts = RestartGuard(cfg.train.preemption_save_seconds, 2 * cfg.parallel.resize_check_seconds + 60,
                                     log if self.rank == 0 else lambda _: None)
        self.reader = self._reader(self.blend, "train", cfg.train.global_batch,
                                   Cursor.from_dict(resumed["cursor"]) if resumed else None, shuffle=True)

    # ---------------------------------------------------------------- set-up

    def _reader(self, data: Blend, split: str, global_batch: int, cursor: Cursor | None = None,
                shuffle: bool = False) -> SequenceReader:
        return SequenceReader(data.datasets, split, self.rank, self.world, global_batch,
                              seed=self.cfg.data.seed, weights=data.weights, cursor=cursor,
                              shuffle=shuffle, window=self.cfg.data.shuffle_window)

    def _resume(self) -> dict[str, Any] | None:
        """The ``extra`` of the checkpoint resumed from, or None when the run starts afresh."""
        with self.hooks.latest_checkpoint() as directory:
            if directory is None:
                return None
            source = CheckpointSource(directory)
            extra = source.load(self.model, self.mesh, self.optimizer)
            rank_state = source.rank_state(self.mesh)
            bytes_read = source.bytes_read_per_rank(self.mesh)
        if extra["config"]["model"] != self.cfg.to_dict()["model"]:
            self.log(f"note: resuming from {directory} whose model config differs in non-shape "
                     "settings; using the current config")
        self.step, self.tokens, self.skipped = extra["step"], extra["tokens"], extra["skipped"]
        if rank_state is not None:
            torch.set_rng_state(rank_state["torch"])
            if rank_state.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rank_state["cuda"], self.device)
        if self.rank == 0:
            self.log(f"resumed from {directory} at step {self.step} ({self.tokens:,} tokens); "
                     f"{source.describe_read(bytes_read)}")
        if self.metrics is not None:
            self.metrics.write(self.step, {"resumed_from": directory, "checkpoint_bytes": source.size,
                                           "checkpoint_read_bytes": bytes_read})
        return extra

    # ---------------------------------------------------------------- loop

    @property
    def accumulation(self) -> int:
        t = self.cfg.train
        return t.global_batch // (t.micro_batch * self.world)

    def _done(self) -> bool:
        t = self.cfg.train
        return (t.max_steps and self.step >= t.max_steps) or self.tokens >= t.total_tokens

    def _next_batch(self, reader: SequenceReader) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of one micro-batch on the device, cut to model.seq_len. Its
        token ids were checked when the reader read them (raymoe.data.shards)."""
        rows = reader.next_batch(self.cfg.train.micro_batch)[:, :self.cfg.model.seq_len + 1]
        on_device = to_device(torch.from_numpy(rows.astype(np.int64)), self.device)
        return on_device[:, :-1], on_device[:, 1:]

    def _micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self._next_batch(self.reader) for _ in range(self.accumulation)]

    def run(self) -> TrainSummary:
        try:
            return self._run()
        finally:
            self.reader.close()
            if self.metrics is not None:
                self.metrics.close()

    def _run(self) -> TrainSummary:
        cfg, t = self.cfg, self.cfg.train
        tokens_per_step = t.global_batch * cfg.model.seq_len
        timer = StepTimer()
        seconds = 0.0
        validation = float("nan")
        last_loss = float("nan")
        if self.rank == 0:
            self.log(f"training {cfg.name}: {self.model.num_parameters():,} parameters "
                     f"({self.model.num_parameters(active_only=True):,} active), "
                     f"{self.world} workers, EP {cfg.parallel.ep_size}, shard {cfg.parallel.shard}, "
                     f"{'bf16' if self.compute_dtype else 'fp32'}, "
                     f"{self.accumulation} micro-batches of {t.micro_batch} per worker and step")
        while not self._done():
            lr = learning_rate(self.tokens, cfg.optim)
            set_learning_rate(self.optimizer, lr)
            wait_before = self.reader.wait_seconds
            timer.start()
            result = train_step(self.model, self.optimizer, self.mesh, self._micro_batches(),
                                cfg.optim.grad_clip, self.compute_dtype,
                                cfg.parallel.grad_sync == "every_micro_batch",
                                summed=[self.cadence.elapsed(),
                                        *self.restarts.scalars(seconds, self.hooks.grow_requested())])
            seconds = timer.stop()
            self.step += 1
            if result.skipped:
                self._on_nonfinite(result)
                continue
            self.consecutive_nan = 0
            self.tokens += tokens_per_step
            last_loss = result.lm_loss
            metrics: dict[str, Any] = {}
            if self.step % t.log_every == 0 or self._done():
                metrics = step_metrics(self.facts, result, lr, seconds, self.reader.wait_seconds - wait_before,
                                       tokens_per_step, self.skipped)
            if self.step % t.eval_every == 0 or self._done():
                losses = self.validate()
                validation = losses["val_loss"]
                metrics.update(losses, val_perplexity=math.exp(min(validation, 50.0)))
            coming = self.restarts.agree(result.summed[1:], self.world)
            just_in_time = self.restarts.checkpoint_now(coming)
            checkpoint = None
            if self._done() or just_in_time or self.cadence.due(self.step, result.summed[0] / self.world):
                checkpoint = self.save()
            if metrics or checkpoint is not None:
                metrics.update(step=self.step, tokens=self.tokens)
                self._publish(metrics, checkpoint, wait_for_upload=just_in_time is not None)
            self.hooks.on_step(self.step, seconds, checkpoint is not None)  # a checkpoint is reported by now
            if just_in_time and not self._done():
                self.restarts.hold(just_in_time, coming, self.step)
        return TrainSummary(self.step, self.tokens, last_loss, validation, self.skipped)

    def _publish(self, metrics: dict[str, Any], checkpoint: Path | None, wait_for_upload: bool = False) -> None:
        if self.metrics is not None:
            self.metrics.write(self.step, metrics, sync=checkpoint is not None)
            if "loss" in metrics:
                self.log(self.metrics.progress_line(self.step, metrics, self.cfg.train, self.tokens))
        self.hooks.report(metrics, checkpoint, self.step, wait_for_upload)

    def _on_nonfinite(self, result) -> None:
        self.skipped += 1
        self.consecutive_nan += 1
        if self.rank == 0:
            self.log(f"step {self.step}: skipped, not finite: {result.diagnosis}")
        if self.consecutive_nan >= self.cfg.train.nan_tolerance:
            raise NonFiniteLossError(
                f"stopping at step {self.step}: {self.consecutive_nan} consecutive steps with a "
                f"non-finite loss or gradient ({result.diagnosis}); the last good checkpoint is kept")

    def validate(self) -> dict[str, float]:
        """Mean LM loss on the validation split (val_loss) and on each of
        data.extra_validation (val_loss/NAME): eval mode, so eval capacity, no dropping.
        The RNG is left as it was, so a run validates without changing its training."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type), torch.no_grad():
            self.model.eval()
            try:
                return self._validate()
            finally:
                self.model.train()

    def _validate(self) -> dict[str, float]:
        """Every set read from its start (the same batches at every evaluation); the sums of
        all sets in one all-reduce. A set without batches (no validation split) gives NaN."""
        sets = [("val_loss", self.blend, "validation"),
                *((f"val_loss/{e.name}", e.data, e.split) for e in self.extra_validation)]
        totals = torch.stack([self._loss_sum(data, split) for _, data, split in sets])
        if self.mesh.is_distributed:
            dist.all_reduce(totals)
        return {key: float(loss / batches) for (key, _, _), (loss, batches) in zip(sets, totals, strict=True)}

    def _loss_sum(self, data: Blend, split: str) -> torch.Tensor:
        """[sum of the LM losses, batches] of train.eval_batches micro-batches of ``split``."""
        total = torch.zeros(2, device=self.device)
        try:
            reader = self._reader(data, split, self.cfg.train.micro_batch * self.world)
        except DatasetError as err:
            if self.rank == 0:
                self.log(f"no validation: {err}")
            return total
        with reader:
            for _ in range(self.cfg.train.eval_batches):
                inputs, targets = self._next_batch(reader)
                with autocast_to(self.device, self.compute_dtype):
                    total += torch.stack([self.model(inputs, targets).lm_loss.float(),
                                          torch.ones((), device=self.device)])
        return total

    def save(self) -> Path:
        directory = self.hooks.new_checkpoint_dir(self.step)
        directory.mkdir(parents=True, exist_ok=True)  # before rank 0's file; a failure here would
        # leave the other ranks waiting in save_checkpoint's collectives
        if self.tokenizer_json is not None and self.rank == 0:
            (directory / TOKENIZER_FILE).write_bytes(self.tokenizer_json)
        extra = {"step": self.step, "tokens": self.tokens, "skipped": self.skipped,
                 "cursor": self.reader.cursor.to_dict(), "config": self.cfg.to_dict(),
                 "tokenizer": self.dataset.manifest["tokenizer"], "saved_at": self.cadence.restart()}
        rank_state = {"torch": torch.get_rng_state(),
                      "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        save_checkpoint(directory, self.model, self.mesh, self.optimizer, extra=extra,
                        rank_state=rank_state)
        if self.rank == 0:
            manifest = read_manifest(directory)
            self.log(f"step {self.step}: {describe_written(manifest, str(directory.parent))}")
        return directory

