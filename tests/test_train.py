"""Training on Ray Train, on the session's real local Ray cluster: EP equivalence, exact
resume, recovery from a killed worker, checkpoints on the local S3 server (a stopped server
included; resuming at another layout from S3 is in test_multinode)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import session_ray_processes
from one_process import run_losses, train_in_one_process

from raymoe.config import load_config
from raymoe.data.storage import StorageError, locate
from raymoe.runs import latest_checkpoint, missing_files, read_metrics
from raymoe.train.capacity import ClusterTooSmallError
from raymoe.train.launcher import train_on_ray

SMALL = ["model.seq_len=32", "model.d_model=32", "model.n_layer=2", "model.n_head=2",
         "train.global_batch=8", "train.micro_batch=4", "train.log_every=1",
         "train.eval_every=1000", "train.eval_batches=1", "optim.warmup_tokens=1000"]


def config(dataset: Path, storage: str, name: str, *overrides: str):
    return load_config("tiny-moe8", [f"data.path={dataset}", f"train.storage={storage}",
                                     f"train.run_name={name}", *SMALL, *overrides])


def final_cursor(result) -> dict:
    manifest = json.loads((Path(result.checkpoint.path) / "manifest.json").read_text())
    return manifest["extra"]["cursor"]


NO_RTS = ["model.moe.use_rts=false", "train.global_batch=16"]
"""Without random token selection every layout trains alike (no per-rank random draws);
16 sequences are micro-batches of 4 on one, two or four workers."""


REFERENCE_STEPS = 12


@pytest.fixture(scope="module")
def one_worker(dataset, tmp_path_factory) -> tuple[dict[int, float], dict]:
    """Step -> loss of 12 steps of one rank (in this process), and its final data cursor:
    the reference of every other layout, of a restarted and of a resumed run."""
    storage = tmp_path_factory.mktemp("one")
    cfg = config(dataset, str(storage), "one", "parallel.num_workers=1", f"train.max_steps={REFERENCE_STEPS}",
                 *NO_RTS)
    return train_in_one_process(cfg, storage / "one")


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps: range) -> None:
    """Another layout sums in another order: equal to 1e-4 (one layout: 1e-5 or better)."""
    for step in steps:
        assert got[step] == pytest.approx(expected[step], abs=1e-4), step


def _kill_a_worker_past_a_checkpoint(run_dir: Path, killed: list[int]) -> None:
    """Once a checkpoint is complete and a later step logged, SIGKILL one training worker
    of the session's Ray cluster (only its own: other clusters may run on the machine);
    ``killed`` gets the number of workers the group had."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        saved = [int(p.parent.name[5:]) for p in run_dir.glob("step-*/manifest.json")]
        if saved and any(r.get("step", 0) > max(saved) for r in read_metrics(str(run_dir / "metrics"))):
            workers = [pid for pid, command in session_ray_processes() if "RayTrainWorker" in command]
            if workers:
                os.kill(workers[0], signal.SIGKILL)
                killed.append(len(workers))
                return
        time.sleep(0.02)


def test_an_elastic_group_starts_at_the_size_its_layout_trains_and_a_killed_worker_restarts_it(
        dataset, one_worker, tmp_path):
    """The cluster holds 3 workers ([1, 3] on 4 CPUs); a step's 4 micro-batches split over 2
    (3 would not divide them), so the group starts with 2 (raymoe.train.scaling), which
    train at EP 2 as one worker does (another layout: 1e-4). Checkpoints come by the clock
    (the step rule is never due before the end), every rank at the same step. A worker is
    killed past a checkpoint and the group restarts from the last one: the same losses and
    the same sequences, none twice."""
    expected, cursor = one_worker
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_past_a_checkpoint, args=(tmp_path / "elastic", killed))
    killer.start()
    result = train_on_ray(config(dataset, str(tmp_path), "elastic", f"train.max_steps={REFERENCE_STEPS}",
                                 "parallel.num_workers=[1, 3]", "parallel.ep_size=2", "train.max_failures=1",
                                 *NO_RTS, "train.checkpoint_every=1000", "train.checkpoint_every_minutes=0.01"))
    killer.join()
    assert killed, "no worker was killed: the test did not test anything"
    assert result.error is None and result.metrics["step"] == REFERENCE_STEPS
    assert_same_losses(run_losses(tmp_path / "elastic"), expected, range(1, REFERENCE_STEPS + 1))
    assert final_cursor(result) == cursor  # the same sequences, none twice
    records = read_metrics(str(tmp_path / "elastic" / "metrics"))
    assert killed == [2], "the group is started with the workers its layout trains on"
    assert {(r["workers"], r["ep_size"]) for r in records if "lm_loss" in r} == {(2, 2)}
    restarts = [r["resumed_from"] for r in records if "resumed_from" in r]
    assert len(restarts) == 1 and int(restarts[0][-8:]) < REFERENCE_STEPS, restarts  # the kill's
    saved = sorted(p.parent.name for p in (tmp_path / "elastic").glob("step-*/manifest.json"))
    assert len(saved) >= 2 and saved[-1] == f"step-{REFERENCE_STEPS:08d}", saved


def s3_records(s3_server, run: str) -> list[dict]:
    return read_metrics(f"s3://{s3_server['bucket']}/runs/{run}/metrics")


def _stop_mid_upload(server, run: str, stopped: list[str]) -> None:
    """Once step 2 is complete, stop the server as soon as a later checkpoint is partly in
    storage (or 2 s later): ``stopped`` gets what storage held then."""
    complete_at, deadline = None, time.monotonic() + 300
    while time.monotonic() < deadline:
        steps = {name: locate(f"{run}/{name}").file_sizes() for name in locate(run).children()
                 if name.startswith("step-")}
        if complete_at is None and missing_files(f"{run}/step-00000002") is None:
            complete_at = time.monotonic()
        partial = [name for name, files in steps.items()
                   if files and name > "step-00000002" and missing_files(f"{run}/{name}") is not None]
        if complete_at is not None and (partial or time.monotonic() - complete_at > 2):
            server.stop()
            stopped.append(f"partial: {partial}" if partial else "no upload in flight")
            return
        time.sleep(0.01)


@pytest.mark.slow  # two runs of two workers, and the S3 server's restart
def test_s3_stopped_during_uploads_no_partial_checkpoint_is_loaded(dataset, s3_server, one_worker):
    """The S3 server stops once step 2 is in storage, while the run checkpoints every step
    (as a later checkpoint's upload starts, when the poll sees one): the run fails with a
    StorageError naming the run; the next run (another fit, as a user's second command, on
    one worker) resumes from a complete checkpoint, never a partial one, and continues
    exactly: the losses and the final data cursor of the uninterrupted run. Ray's own record
    of the run's checkpoints may or may not survive the stop (it did not when the stop hit
    its upload); the run resumes either way."""
    expected, cursor = one_worker
    storage = f"s3://{s3_server['bucket']}/runs"
    every_step = ["train.checkpoint_every=1", *NO_RTS]
    no_restart = "train.max_failures=0"  # a stopped server may come back: with a budget, restarts would wait for it
    stopped: list[str] = []
    stopper = threading.Thread(target=_stop_mid_upload, args=(s3_server["server"], f"{storage}/cut",
                                                              stopped))
    stopper.start()
    try:
        with pytest.raises(StorageError) as failed:
            train_on_ray(config(dataset, storage, "cut", "train.max_steps=40", "parallel.num_workers=2",
                                   "parallel.ep_size=2", no_restart, *every_step))
    finally:
        stopper.join()
        if stopped:
            s3_server["server"].start()
    assert stopped, "the S3 server was never stopped: the test did not test anything"
    # The user's error, naming the run whose storage failed (the CLI prints it as one line)
    assert str(failed.value).startswith(f"{storage}/cut: the run's storage failed"), failed.value
    checkpoints = [f"{storage}/cut/{name}" for name in locate(f"{storage}/cut").children()
                   if name.startswith("step-")]
    status = {uri: missing_files(uri) for uri in checkpoints}
    print("stopped with", stopped[0], "; checkpoints after the stop:", status)
    latest = latest_checkpoint(f"{storage}/cut")
    assert latest is not None and latest >= f"{storage}/cut/step-00000002"
    resumed = train_on_ray(config(dataset, storage, "cut", f"train.max_steps={REFERENCE_STEPS}",
                                  "parallel.num_workers=1", *every_step))  # one rank reads both ranks' parts
    assert resumed.error is None and resumed.metrics["step"] == REFERENCE_STEPS
    assert resumed.checkpoint.path.endswith(f"runs/cut/step-{REFERENCE_STEPS:08d}")  # Ray's view of S3
    records = s3_records(s3_server, "cut")
    resumes = [r["resumed_from"] for r in records if "resumed_from" in r]
    assert len(resumes) == 1 and status[resumes[0]] is None and resumes[0] <= latest
    got = {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}
    assert_same_losses(got, expected, range(int(resumes[0][-8:]) + 1, REFERENCE_STEPS + 1))
    assert final_cursor_on_s3(s3_server, resumed) == cursor  # the same sequences, none twice


def final_cursor_on_s3(s3_server, result) -> dict:
    with s3_server["fs"].open_input_stream(f"{result.checkpoint.path}/manifest.json") as f:
        return json.loads(f.read())["extra"]["cursor"]


def test_too_many_workers_fail_fast_with_the_numbers(dataset, tmp_path):
    cfg = config(dataset, str(tmp_path), "big", "parallel.num_workers=16",
                 "train.global_batch=64")
    with pytest.raises(ClusterTooSmallError, match=r"needs 8 CPU \(16 workers x 0.5 CPU\); 8 of "
                                                   r"16 workers fit on the cluster's 1 node\(s\) "
                                                   r"with 4 CPU \(the cluster has no autoscaler"):
        train_on_ray(cfg)


def _row_group_first_read_after(dataset: Path, cfg, step: int, limit: int = 300) -> tuple[str, int, int]:
    """The first (shard path, row group, step) that one rank's reader first reads after
    ``step`` (counted in this process in the trainer's reading order, read-ahead included):
    a lane moves to its next row group every few hundred steps."""
    from raymoe.data.shards import PreparedDataset, ShardFile
    from raymoe.data.stream import SequenceReader

    reads: list[tuple[str, int, int]] = []
    batches_taken = [0]
    original = ShardFile.read_row_group

    def recording(self, index):
        reads.append((self.name, index, batches_taken[0]))
        return original(self, index)

    ShardFile.read_row_group = recording
    try:
        with SequenceReader(PreparedDataset.open(str(dataset)), "train", 0, 1, cfg.train.global_batch,
                            seed=cfg.data.seed, window=cfg.data.shuffle_window) as reader:
            while batches_taken[0] < limit:
                reader.next_batch(cfg.train.global_batch)
                batches_taken[0] += 1
    finally:
        ShardFile.read_row_group = original
    first: dict[tuple[str, int], int] = {}
    for name, index, at in reads:
        first.setdefault((name, index), at)
    name, index, at = next((*key, at) for key, at in first.items() if at > step)
    return str(Path(name).relative_to(dataset)), index, at


def _corrupt_row_group(path: Path, index: int) -> None:
    import pyarrow.parquet as pq

    column = pq.ParquetFile(path).metadata.row_group(index).column(0)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset + column.total_compressed_size // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_users_error_mid_run_ends_it_at_once_as_one_line(tmp_path, dataset):
    """A corrupt row group that the run first reads mid-run, past its first checkpoints,
    with train.max_failures=3: the worker's DatasetError ends the run at the first attempt
    (a retry would resume from a checkpoint, and meet the same row group again), and the
    user gets it as one line out of Ray's WorkerGroupError."""
    import shutil

    from raymoe.cli import describe_error
    from raymoe.data.shards import DatasetError
    from raymoe.errors import find_cause

    copy = tmp_path / "data"
    shutil.copytree(dataset, copy)
    settings = [*NO_RTS, "parallel.num_workers=1", "train.max_failures=3", "train.checkpoint_every=2"]
    shard, row_group, step = _row_group_first_read_after(copy, config(copy, "", "", *settings), 4)
    _corrupt_row_group(copy / shard, row_group)
    cfg = config(copy, str(tmp_path), "corrupt", *settings, f"train.max_steps={step + 4}")
    with pytest.raises(Exception) as caught:
        train_on_ray(cfg)
    found = find_cause(caught.value, DatasetError)
    assert found is not None, caught.value
    line = describe_error(found)
    assert line.startswith(f"DatasetError: shard {copy / shard}: row group {row_group}") \
        and "corrupt or replaced" in line and "\n" not in line, line
    records = read_metrics(str(tmp_path / "corrupt" / "metrics"))
    assert latest_checkpoint(str(tmp_path / "corrupt")) is not None  # a retry would have resumed
    assert not [r for r in records if "resumed_from" in r], "the run was retried"
    assert max(r["step"] for r in records if "lm_loss" in r) < step + 4


def test_a_staging_directory_that_cannot_be_made_fails_at_start_naming_the_key(tmp_path):
    from raymoe.runs import CheckpointError
    from raymoe.train.launcher import RayTrainHooks

    blocked = tmp_path / "file"
    blocked.write_text("a file where the staging directory should be")
    with pytest.raises(CheckpointError, match=f"^train.checkpoint_staging={blocked / 'nvme'}: cannot create "
                                              "a checkpoint staging directory on node"):
        RayTrainHooks(str(tmp_path / "run"), staging=str(blocked / "nvme"))
    RayTrainHooks(str(tmp_path / "run"), staging=str(tmp_path / "nvme"))
    assert list((tmp_path / "nvme").iterdir()) == []  # the check leaves nothing behind
