"""What a failed worker group costs: the user's errors end the run at the first attempt;
other worker errors are retried up to ``train.max_failures`` and preemptions up to
``train.max_preemptions``, each from the latest checkpoint.

A corrupt shard, a checkpoint from another model, a storage permission error, a GPU the
config does not fit: each comes back after a resume, so retrying it restarts the whole
worker group (128 GPUs) from the same checkpoint for nothing, as often as the budget allows.
Storage that is unreachable or throttled for a while (an S3 503, a reset connection) may
pass, and is retried on ``train.max_failures`` like any worker error.
Ray Train 2.60 retries every worker error alike and builds its failure policy from the
FailureConfig alone; ``RaymoeTorchTrainer`` is the one place that gives it this policy
instead, and an elastic run raymoe.train.scaling's (``_initialize_and_run_controller`` is
Ray's internal entry point, stable across the pinned ray==2.60.*)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from ray.train.torch import TorchTrainer
from ray.train.v2._internal.execution.failure_handling import DefaultFailurePolicy, FailureDecision
from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure
from ray.train.v2.api.config import FailureConfig
from ray.train.v2.api.exceptions import TrainingFailedError, WorkerGroupError

from raymoe.config import TrainConfig
from raymoe.data.storage import StorageError
from raymoe.errors import RaymoeError, TransientError, find_cause, may_pass
from raymoe.train.scaling import LayoutScalingPolicy

logger = logging.getLogger(__name__)


class OutOfDeviceMemory(RaymoeError):
    """A rank ran out of GPU memory: the config does not fit the GPU at its micro-batch;
    a restart would run out again at the same step."""


def name_out_of_memory(err: torch.OutOfMemoryError, rank: int, micro_batch: int) -> OutOfDeviceMemory:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
    return OutOfDeviceMemory(f"rank {rank}: out of GPU memory at train.micro_batch={micro_batch} "
                             f"({first_line}); `raymoe plan CONFIG --gpu GPU` shows the memory plan: "
                             "lower train.micro_batch, or raise parallel.ep_size for the experts")


def failure_budgets(train: TrainConfig) -> FailureConfig:
    """Ray Train's budgets: worker errors and preemptions counted apart."""
    return FailureConfig(max_failures=train.max_failures, max_preemption_failures=train.max_preemptions)


@dataclass(frozen=True)
class RunStorage:
    """Where a run's checkpoints and metrics go: ``uri`` as the user named it, ``run_dir``
    as both pyarrow's S3 and local errors name it (S3 keys come without the bucket)."""

    uri: str
    run_dir: str

    def failure(self, err: BaseException) -> StorageError | None:
        """A run that failed because its storage did (S3 unreachable or refusing while a
        checkpoint or metrics were written: an OSError that names the run's directory):
        the user's error, one line naming the run, instead of Ray's failure around
        pyarrow's. None for any other failure."""
        users = find_cause(err, RaymoeError)
        if users is not None and not isinstance(users, StorageError):
            return None
        failed = users or find_cause(err, OSError)
        if failed is None or self.run_dir not in str(failed):
            return None
        first_line = str(failed).strip().splitlines()[0]
        return StorageError(f"{self.uri}: the run's storage failed (the last complete checkpoint is kept; "
                            f"run the same command again to resume from it): {first_line}")


class UsersErrorsEndTheRun(DefaultFailurePolicy):
    """Ray's budgets, except that a worker group failure caused by the user's error that a
    restart would meet again (a RaymoeError, or the run's storage refusing: not an I/O
    failure that may pass, raymoe.errors.TransientError; not a preemption's collateral) is
    raised at once, never retried."""

    def __init__(self, failure_config: FailureConfig, storage: RunStorage):
        super().__init__(failure_config)
        self.storage = storage

    def make_decision(self, training_failed_error: TrainingFailedError) -> FailureDecision:
        if (isinstance(training_failed_error, WorkerGroupError)
                and not _is_preemption_failure(training_failed_error)):
            users = self.final_error(training_failed_error)
            if users is not None:
                logger.warning("the run stops (the user's error, not retried): %s", users)
                return FailureDecision.RAISE
        decision = super().make_decision(training_failed_error)
        if isinstance(training_failed_error, WorkerGroupError) or _is_preemption_failure(training_failed_error):
            logger.warning(self.describe(training_failed_error, decision))
        return decision

    def final_error(self, error: TrainingFailedError) -> BaseException | None:
        """The user's error that a restart would meet again, or None."""
        users = find_cause(error, RaymoeError)
        if users is not None:
            return None if isinstance(users, TransientError) else users
        storage = self.storage.failure(error)
        io = find_cause(error, OSError)
        return storage if storage is not None and io is not None and not may_pass(io) else None

    def describe(self, error: TrainingFailedError, decision: FailureDecision) -> str:
        """One line: which budget the failure was charged to, how much of it is used, and
        whether the group restarts (the counts are Ray's, kept by DefaultFailurePolicy)."""
        if _is_preemption_failure(error):
            budget, used, limit = "train.max_preemptions", self._preemption_failures, \
                self.failure_config.max_preemption_failures
        else:
            budget, used, limit = "train.max_failures", self._worker_group_failures, self.failure_config.max_failures
        outcome = "restarting from the latest checkpoint" if decision == FailureDecision.RETRY else "the run stops"
        return (f"the worker group failed: {used} of {'no limit' if limit == -1 else limit} on {budget}; "
                f"{outcome}")


class RaymoeTorchTrainer(TorchTrainer):
    """A TorchTrainer whose controller follows UsersErrorsEndTheRun for the run's storage
    and, for an elastic run, resizes by its layout (raymoe.train.scaling: ``elastic`` is the
    map from the workers the cluster holds to those the layout trains on, and the run's
    resize key)."""

    def __init__(self, storage: RunStorage, elastic: tuple[dict[int, int], str] | None, *args: Any,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.storage, self.elastic = storage, elastic

    def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
        budgets = self.run_config.failure_config or FailureConfig()
        kwargs["failure_policy"] = UsersErrorsEndTheRun(budgets, self.storage)  # type: ignore[arg-type]
        if self.elastic is not None:
            kwargs["scaling_policy"] = LayoutScalingPolicy(kwargs["scaling_policy"].scaling_config, *self.elastic)
        # Train V2's TorchTrainer (Ray 2.60's default) has it; mypy reads V1's.
        return super()._initialize_and_run_controller(**kwargs)  # type: ignore[misc]
