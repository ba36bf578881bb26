"""Training on a Ray Train worker group: the TorchTrainer, its storage, and the hooks that
connect the per-worker loop to ray.train.report / get_checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
import torch.distributed as dist
from ray.experimental.internal_kv import _internal_kv_del
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointUploadMode,
    LoggingConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.torch import TorchConfig

from raymoe.config import Config, DataConfig, config_from_dict
from raymoe.data.storage import is_s3, locate
from raymoe.plan import check_fits, device_hardware
from raymoe.runs import CheckpointError, absolute, latest_checkpoint, resumable, run_location, step_name
from raymoe.train.capacity import WaitPolicy, WorkerGroupDemand, worker_group_capacity
from raymoe.train.failures import RaymoeTorchTrainer, RunStorage, failure_budgets, name_out_of_memory
from raymoe.train.layout import layout_config, plan_layout
from raymoe.train.scaling import trained_workers


class RayTrainHooks:
    """Checkpoints through ray.train.report: each rank writes its files into a local
    staging directory (``train.checkpoint_staging``) that Ray uploads in the background.
    Resume from the checkpoint Ray Train names (the latest of this run name in this
    storage), or, when Ray holds no record of the run (its snapshot lost with the storage
    that failed while writing it), from the latest complete checkpoint in the run's
    directory ``run_uri``: a restart never trains afresh over a run's checkpoints. Each
    rank reads only its part, where it lies."""

    def __init__(self, run_uri: str, staging: str = "", log: Callable[[str], None] = print):
        self.run_uri, self.staging, self.log = run_uri, staging, log
        os.rmdir(staging_directory(staging, "raymoe-check-"))  # a bad path fails now, not at the first save

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[str | None]:
        uri = None
        if ray.train.get_context().get_world_rank() == 0:  # one rank lists, all agree
            uri = self._find_checkpoint()
        if dist.is_initialized():
            agreed = [uri]
            dist.broadcast_object_list(agreed, src=0)
            uri = agreed[0]
        yield uri

    def _find_checkpoint(self) -> str | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            return resumable(_uri(checkpoint), self.log)
        found = latest_checkpoint(self.run_uri, log=self.log)
        if found is not None:
            self.log(f"Ray Train holds no record of this run's checkpoints; resuming from {found}, "
                     "the latest complete checkpoint in the run's storage")
        return found

    def new_checkpoint_dir(self, step: int) -> Path:
        return Path(staging_directory(self.staging, f"raymoe-{step_name(step)}-"))

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, step: int,
               wait_for_upload: bool = False) -> None:
        if checkpoint_dir is None:
            ray.train.report(metrics)
            return
        mode = CheckpointUploadMode.SYNC if wait_for_upload else CheckpointUploadMode.ASYNC
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)),
                         checkpoint_dir_name=step_name(step), checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)

    def on_step(self, step: int, seconds: float, saved: bool) -> None:
        pass

    def grow_requested(self) -> bool:
        return False


def _uri(checkpoint: Checkpoint) -> str:
    """A Ray checkpoint's location as raymoe's storage layer names it."""
    if isinstance(checkpoint.filesystem, pafs.S3FileSystem):
        return f"s3://{checkpoint.path}"
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return checkpoint.path
    raise CheckpointError(f"{checkpoint.path}: storage {checkpoint.filesystem!r} "
                          "is not supported (a local path or s3://)")


def staging_directory(root: str, prefix: str) -> str:
    """A new directory for one checkpoint's files under ``root`` (the system's temporary
    directory when empty); the error names the config key."""
    try:
        if root:
            os.makedirs(root, exist_ok=True)
        return tempfile.mkdtemp(prefix=prefix, dir=root or None)
    except OSError as err:
        where = root or tempfile.gettempdir()
        raise CheckpointError(f"train.checkpoint_staging={where}: cannot create a checkpoint "
                              f"staging directory on node {ray.util.get_node_ip_address()}: "
                              f"{err.strerror or err}") from err


def _train_worker(loop_config: dict[str, Any]) -> None:
    import logging

    import ray.train.torch

    from raymoe.console import quiet_ray
    from raymoe.train.elastic import ElasticHooks, ResizeLog, gather_nodes
    from raymoe.train.loop import Trainer
    from raymoe.train.network import warn_without_efa

    quiet_ray()
    cfg = config_from_dict(loop_config["config"])
    log = logging.getLogger("raymoe").info  # Ray Train sends worker logs to the console once
    context = ray.train.get_context()
    rank = context.get_world_rank()
    if cfg.parallel.use_gpu and context.get_local_rank() == 0:  # once per node
        warn_without_efa(logging.getLogger("raymoe").warning)
    layout = plan_layout(cfg, context.get_world_size())
    nodes = gather_nodes()
    if rank == 0:
        for reason in layout.skipped:
            log(f"layout: {reason}")
    elastic = cfg.parallel.elastic
    cfg = layout_config(cfg, layout)
    device = ray.train.torch.get_device()
    check_gpu_fits(cfg, device)
    resize_log = (ResizeLog(loop_config["resize_key"], layout, nodes, log)
                  if rank == 0 else None)
    checkpoints = RayTrainHooks(loop_config["run_uri"], cfg.train.checkpoint_staging, log)
    hooks = ElasticHooks(checkpoints, resize_log, elastic)
    try:
        Trainer(cfg, hooks, device, loop_config["metrics_uri"], log=log).run()
    except torch.OutOfMemoryError as err:
        raise name_out_of_memory(err, rank, cfg.train.micro_batch) from err


def check_gpu_fits(cfg: Config, device: torch.device) -> None:
    """Stop before the first step, with the plan's verdict, when the config cannot fit
    this GPU (only the workers see which GPU they got: Ray's accelerator label does not
    tell an A100 40GB from an 80GB)."""
    if device.type != "cuda":
        return
    props = torch.cuda.get_device_properties(device)
    check_fits(cfg, device_hardware(props.name, props.total_memory))


def _absolute_data_paths(data: DataConfig) -> DataConfig:
    """Local dataset paths made absolute: workers do not share the driver's cwd."""
    return dataclasses.replace(data, path=absolute(data.path) if data.path else "", blend=[
        dataclasses.replace(e, path=absolute(e.path)) for e in data.blend],
        extra_validation={name: absolute(path) for name, path in data.extra_validation.items()})


def train_on_ray(cfg: Config, wait: WaitPolicy = "auto", timeout: float = 1800.0,
                 callbacks: list | None = None) -> ray.train.Result:
    """Run (or resume: same run name and storage) a training on the connected cluster,
    once the cluster fits its worker group (see raymoe.train.capacity for ``wait``).
    ``callbacks`` go to the RunConfig (a Tune trial passes TuneReportCallback)."""
    cfg = dataclasses.replace(cfg, data=_absolute_data_paths(cfg.data))
    where = run_location(cfg)
    par = cfg.parallel
    storage = locate(where.storage)
    resize_key = f"raymoe/resize/{where.name}/{uuid.uuid4().hex}"
    # Train V2's ScalingConfig (Ray 2.60's default) takes (MIN, MAX); mypy reads V1's.
    scaling: dict[str, Any] = {"num_workers": par.num_workers, "use_gpu": par.use_gpu,
                               "resources_per_worker": {"CPU": par.cpus_per_worker}}
    if par.elastic:
        scaling["elastic_resize_monitor_interval_s"] = par.resize_check_seconds
    # S3 names keys without the bucket: the run's directory is what both name
    run_storage = RunStorage(where.uri, f"{Path(storage.path).name}/{where.name}")
    trainer = RaymoeTorchTrainer(
        run_storage, (trained_workers(cfg), resize_key) if par.elastic else None, _train_worker,
        train_loop_config={"config": cfg.to_dict(), "run_uri": where.uri, "metrics_uri": where.metrics_uri,
                           "resize_key": resize_key},
        torch_config=TorchConfig(backend="nccl" if par.use_gpu else "gloo"),
        scaling_config=ScalingConfig(**scaling),
        run_config=RunConfig(
            # As RunConfig wants it: with a filesystem object, a path without the scheme.
            name=where.name, storage_path=storage.path,
            storage_filesystem=storage.fs if is_s3(where.storage) else None,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=failure_budgets(cfg.train),
            # Train V2's RunConfig (Ray 2.60's default) has logging_config; mypy reads V1's.
            logging_config=LoggingConfig(log_level="WARNING"), callbacks=callbacks),  # type: ignore[call-arg]
    )
    demand = WorkerGroupDemand(par.min_workers, par.cpus_per_worker, 1.0 if par.use_gpu else 0.0)
    with worker_group_capacity(demand, wait, timeout):
        print(f"run {where.name}: checkpoints and metrics (TensorBoard, metrics.jsonl) in {where.uri}")
        try:
            return trainer.fit()
        except Exception as err:
            failure = run_storage.failure(err)
            if failure is None:
                raise
            raise failure from err
        finally:
            _internal_kv_del(resize_key.encode())
