"""The metrics writer: uploads to S3 off the training thread while the next steps run,
everything in storage at the end; a failed upload raised on the training thread; parts
that end at their size, numbered on by a resumed run, read back in order (metrics.jsonl
lines and TensorBoard events alike)."""

from __future__ import annotations

import struct
import threading
from pathlib import Path

import pytest
import torch
from tensorboardX.proto.event_pb2 import Event
from test_train import config

import raymoe.train.metrics as metrics_module
from raymoe.data.storage import Location, StorageError
from raymoe.runs import metrics_part, read_metrics
from raymoe.train.loop import FileHooks, Trainer
from raymoe.train.metrics import MetricsWriter


def test_metrics_go_up_while_the_next_steps_run(dataset, s3_server, tmp_path, monkeypatch):
    """Every write to the metrics' storage waits until the test lets it go, after step 4
    (or 30 s): the upload of step 1's report starts, and steps 2 to 4 run while it waits.
    The last step's checkpoint waits for its report to be in storage; then every report
    is there."""
    uri = f"s3://{s3_server['bucket']}/runs/held/metrics"
    started, uploading, released = threading.Event(), threading.Event(), threading.Event()
    write_bytes = Location.write_bytes

    def held(self: Location, data: bytes) -> None:
        if self.uri.startswith(uri):
            started.set()
            uploading.set()
            released.wait(30)
            uploading.clear()
        write_bytes(self, data)

    monkeypatch.setattr(Location, "write_bytes", held)
    monkeypatch.setattr(MetricsWriter, "sync_seconds", 0.0)  # upload each report at once
    while_uploading: list[bool] = []

    class Holding(FileHooks):
        def on_step(self, step: int, seconds: float, saved: bool) -> None:
            if step == 2:
                assert started.wait(60), "step 1's report was not uploaded"
            if step <= 4:
                while_uploading.append(uploading.is_set())
            if step == 4:
                released.set()

    cfg = config(dataset, str(tmp_path), "held", "parallel.num_workers=1", "train.max_steps=5",
                 "train.checkpoint_every=1000", "train.eval_every=1000")
    Trainer(cfg, Holding(tmp_path / "held", keep=1, rank=0), torch.device("cpu"), metrics_uri=uri,
            log=lambda _: None).run()
    assert while_uploading == [False, True, True, True]  # steps 1 to 4
    assert [r["step"] for r in read_metrics(uri) if "lm_loss" in r] == [1, 2, 3, 4, 5]


def test_a_failed_upload_is_raised_on_the_training_thread(s3_server, monkeypatch):
    uri = f"s3://{s3_server['bucket']}/runs/refused/metrics"

    def refused(self: Location, data: bytes) -> None:
        raise StorageError(f"cannot write {self.uri}: access denied")

    monkeypatch.setattr(Location, "write_bytes", refused)
    writer = MetricsWriter(uri)
    writer.write(1, {"loss": 2.0})  # queued; its upload is not due yet
    with pytest.raises(StorageError, match=f"^cannot write {uri}/metrics.jsonl.000000: access denied$"):
        writer.write(2, {"loss": 1.0}, sync=True)
    with pytest.raises(StorageError, match="access denied"):
        writer.write(3, {"loss": 0.5})
    with pytest.raises(StorageError, match="access denied"):
        writer.close()


def tensorboard_steps(directory: Path) -> list[int]:
    """The steps of the scalar events in a directory's event files, in the parts' order
    (the number that ends each file's name)."""
    steps = []
    for path in sorted(directory.iterdir(), key=lambda p: int(p.name.rsplit(".", 1)[1])):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):  # TFRecords: length, its CRC, the event, its CRC
            (length,) = struct.unpack_from("<Q", data, offset)
            event = Event.FromString(data[offset + 12:offset + 12 + length])
            if event.summary.value:
                steps.append(event.step)
            offset += 16 + length
    return steps


def test_parts_end_at_their_size_and_a_resumed_run_adds_its_own(tmp_path, monkeypatch):
    """Lines of 120 to 140 bytes: a part of 300 ends with its third line."""
    monkeypatch.setattr(metrics_module, "PART_BYTES", 300)
    directory = tmp_path / "metrics"
    for run in range(2):
        writer = MetricsWriter(directory)
        for step in range(1, 6):
            writer.write(step, {"loss": 1.0 / step, "run": run, "note": "x" * 50})
        writer.close()
    records = read_metrics(str(directory))
    assert [(r["run"], r["step"]) for r in records] == [(run, step) for run in (0, 1) for step in range(1, 6)]
    parts = sorted(directory.glob("metrics.jsonl.*"))
    assert [len(p.read_text().splitlines()) for p in parts] == [3, 2, 3, 2]
    assert len(list((directory / "tensorboard").iterdir())) == 4
    assert tensorboard_steps(directory / "tensorboard") == [1, 2, 3, 4, 5] * 2


def test_a_run_written_before_metrics_came_in_parts_reads_its_whole_file_first(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / metrics_part(0)).write_text('{"step": 3}\n{"step": 4, "partial')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
