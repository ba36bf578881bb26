"""Training on a Ray Train worker group: the TorchTrainer, its storage, and the hooks that
connect the per-worker loop to ray.train.report / get_checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    FailureConfig,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig, TorchTrainer

from raymoe.config import Config, config_from_dict
from raymoe.data.storage import is_s3, s3_filesystem
from raymoe.errors import RaymoeError
from raymoe.plan import check_fits, device_hardware


class ClusterTooSmallError(RaymoeError, RuntimeError):
    """The config asks for more than the cluster has (and waiting was not asked for)."""


class RayTrainHooks:
    """Checkpoints through ray.train.report (uploaded in the background), resume through
    ray.train.get_checkpoint (the latest of this run name in this storage)."""

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
            yield Path(checkpoint.path)
            return
        # A private copy per worker: Checkpoint.as_directory shares one directory per node,
        # into which a second worker may download again while the first is reading it
        # (torch.load then fails on a file being rewritten).
        with tempfile.TemporaryDirectory(prefix="raymoe-resume-") as directory:
            yield Path(checkpoint.to_directory(directory))

    def new_checkpoint_dir(self, step: int) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"raymoe-step-{step:08d}-"))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=f"step-{step:08d}",
                         checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)


def _train_worker(loop_config: dict[str, Any]) -> None:
    import logging

    import ray.train.torch

    from raymoe.console import quiet_ray
    from raymoe.train.loop import Trainer

    quiet_ray()
    cfg = config_from_dict(loop_config["config"])
    metrics_dir = Path(loop_config["metrics_dir"]) if loop_config["metrics_dir"] else None
    log = logging.getLogger("raymoe").info  # Ray Train sends worker logs to the console once
    device = ray.train.torch.get_device()
    check_gpu_fits(cfg, device)
    Trainer(cfg, RayTrainHooks(), device, metrics_dir, log=log).run()


def check_gpu_fits(cfg: Config, device: torch.device) -> None:
    """Stop before the first step, with the plan's verdict, when the config cannot fit
    this GPU (only the workers see which GPU they got: Ray's accelerator label does not
    tell an A100 40GB from an 80GB)."""
    if device.type != "cuda":
        return
    props = torch.cuda.get_device_properties(device)
    check_fits(cfg, device_hardware(props.name, props.total_memory))


@dataclass
class RunLocation:
    name: str
    storage_path: str
    """As RunConfig wants it: no scheme when a filesystem object is given."""
    uri: str
    """The run directory as a user writes it."""
    metrics_dir: str


def run_location(cfg: Config) -> RunLocation:
    name = cfg.train.run_name or cfg.name
    storage = cfg.train.storage
    if is_s3(storage):
        uri = storage.rstrip("/") + "/" + name
        metrics = os.path.abspath(os.path.join("runs", name, "metrics"))  # on rank 0's node
        return RunLocation(name, storage[len("s3://"):].rstrip("/"), uri, metrics)
    storage = os.path.abspath(os.path.expanduser(storage))
    return RunLocation(name, storage, os.path.join(storage, name), os.path.join(storage, name, "metrics"))


def check_cluster_fits(cfg: Config, wait: bool) -> None:
    """Fail fast, naming the numbers, when the worker group cannot be placed."""
    par = cfg.parallel
    have = ray.cluster_resources()
    need_cpu = par.num_workers * par.cpus_per_worker
    short = []
    if need_cpu > have.get("CPU", 0):
        short.append(f"{need_cpu:g} CPUs ({par.num_workers} workers x {par.cpus_per_worker:g}); "
                     f"the cluster has {have.get('CPU', 0):g}")
    if par.use_gpu and par.num_workers > have.get("GPU", 0):
        short.append(f"{par.num_workers} GPUs; the cluster has {have.get('GPU', 0):g}")
    if not short:
        return
    message = "the worker group needs " + " and ".join(short)
    if not wait:
        raise ClusterTooSmallError(message + ". Lower parallel.num_workers or "
                                   "parallel.cpus_per_worker, or pass --wait-for-resources to "
                                   "wait for an autoscaling cluster to grow")
    print(f"waiting: {message}; Ray will start the workers when the cluster has grown")


def train_on_ray(cfg: Config, wait_for_resources: bool = False,
                 callbacks: list | None = None) -> ray.train.Result:
    """Run (or resume: same run name and storage) a training on the connected cluster.
    ``callbacks`` go to the RunConfig (a Tune trial passes TuneReportCallback)."""
    check_cluster_fits(cfg, wait_for_resources)
    if cfg.data.path and not is_s3(cfg.data.path):  # workers do not share the driver's cwd
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, path=os.path.abspath(os.path.expanduser(cfg.data.path))))
    where = run_location(cfg)
    par = cfg.parallel
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": cfg.to_dict(), "metrics_dir": where.metrics_dir},
        torch_config=TorchConfig(backend="nccl" if par.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=par.num_workers, use_gpu=par.use_gpu,
                                     resources_per_worker={"CPU": par.cpus_per_worker}),
        run_config=RunConfig(
            name=where.name, storage_path=where.storage_path,
            storage_filesystem=s3_filesystem() if is_s3(cfg.train.storage) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Train V2's RunConfig (Ray 2.60's default) has logging_config; mypy reads V1's.
            logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks),  # type: ignore[call-arg]
    )
    print(f"run {where.name}: checkpoints in {where.uri}, metrics (TensorBoard, metrics.jsonl) "
          f"in {where.metrics_dir}")
    return trainer.fit()
