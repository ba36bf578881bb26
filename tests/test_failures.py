"""The failure policy's decisions on Ray Train's WorkerGroupError, built here as the
controller receives it (a corrupt shard ending a real run is in test_train)."""

from __future__ import annotations

import pytest
from ray.train.v2._internal.execution.failure_handling import FailureDecision
from ray.train.v2.api.config import FailureConfig
from ray.train.v2.api.exceptions import WorkerGroupError

from raymoe.data.shards import DatasetError, DatasetUnavailable
from raymoe.data.storage import StorageError, StorageUnavailable
from raymoe.errors import may_pass
from raymoe.train.failures import RunStorage, UsersErrorsEndTheRun

RUN = RunStorage("s3://bucket/runs/r", "runs/r")  # as pyarrow names S3 keys: no bucket


def _failed(error: Exception) -> WorkerGroupError:
    return WorkerGroupError("rank 0 failed", {0: error})


@pytest.mark.parametrize("error", [
    DatasetError("shard s3://b/d/train/x.parquet: row group 3: checksum does not match (corrupt or replaced)"),
    StorageError("cannot write s3://bucket/runs/r/step-1: AWS Error ACCESS_DENIED: AccessDenied"),
    OSError("When uploading part for key 'runs/r/step-00000004/rank0.distcp' in bucket 'bucket': "
            "AWS Error ACCESS_DENIED during UploadPart operation: Access Denied"),
])
def test_an_error_a_restart_would_meet_again_ends_the_run(error):
    policy = UsersErrorsEndTheRun(FailureConfig(max_failures=3), RUN)
    assert policy.make_decision(_failed(error)) == FailureDecision.RAISE


@pytest.mark.parametrize("error", [
    StorageUnavailable("cannot read s3://bucket/d/train: AWS Error NETWORK_CONNECTION during GetObject "
                       "operation: curlCode: 7, Couldn't connect to server"),
    DatasetUnavailable("shard s3://b/d/train/x.parquet: not a readable parquet file: AWS Error SLOW_DOWN "
                       "during GetObject operation: SlowDown"),
    OSError("When uploading part for key 'runs/r/step-00000004/rank0.distcp' in bucket 'bucket': "
            "AWS Error SERVICE_UNAVAILABLE: HTTP response code: 503"),
    RuntimeError("NCCL watchdog timeout"),
])
def test_a_failure_that_may_pass_is_retried_on_max_failures(error):
    policy = UsersErrorsEndTheRun(FailureConfig(max_failures=2), RUN)
    assert [policy.make_decision(_failed(error)) for _ in range(3)] == [
        FailureDecision.RETRY, FailureDecision.RETRY, FailureDecision.RAISE]
    assert policy.describe(_failed(error), FailureDecision.RAISE) == \
        "the worker group failed: 3 of 2 on train.max_failures; the run stops"


def test_io_errors_that_may_pass_and_those_that_come_back():
    assert may_pass(ConnectionResetError("reset by peer"))
    assert may_pass(OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 28, "
                            "Timeout was reached"))
    assert not may_pass(PermissionError("[Errno 13] Permission denied: '/mnt/nvme/raymoe'"))
    assert not may_pass(FileNotFoundError("no such file"))
    assert not may_pass(OSError("Couldn't deserialize thrift: TProtocolException: Invalid data"))
    assert not may_pass(OSError("AWS Error NO_SUCH_BUCKET during ListObjectsV2 operation: NoSuchBucket"))
