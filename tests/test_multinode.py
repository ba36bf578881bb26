"""The cluster path as users run it, on a real multi-node Ray cluster on this machine (a
CPU-less head with token auth, worker nodes that join later) with S3 storage (SeaweedFS):
an elastic job that waits for its nodes and follows them as they join and leave, a resume
from a driver in a fresh directory, a fixed cluster that fails fast, and the dense-versus-MoE
study submitted as a job whose every artefact is read back from S3. Each driver runs in a temporary
directory that is deleted before the checks, so nothing a run or a study wrote can be found
on the driver's disk."""

from __future__ import annotations

import csv
import io
import itertools
import json
import pickle
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from one_process import train_in_one_process

from raymoe.eval.harness import EvalOptions
from raymoe.eval.runner import evaluate_checkpoint
from raymoe.eval.tasks import SAMPLE_DATA
from raymoe.jobs import RaymoeJobs
from raymoe.local_cluster import BIN, MultiNodeCluster, wait_until
from raymoe.parallel.mesh import MeshLayout
from raymoe.runs import read_metrics

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.slow]

WORKER_CPUS = 3
"""A node's CPUs: two training workers of 1.5 CPU (the elastic job's; the study's two
trials at once), but only one of 2 CPU (the fixed cluster's test)."""
SMALL = ["model.seq_len=32", "model.d_model=32", "model.n_layer=2", "model.n_head=2",
         "train.global_batch=8", "train.micro_batch=4", "train.log_every=1", "train.eval_every=2",
         "train.eval_batches=1", "optim.warmup_tokens=256", "parallel.num_workers=2",
         "parallel.cpus_per_worker=2"]
@pytest.fixture(scope="module")
def cluster(s3_server):
    """The head alone (CPU 0, like cluster/aws.yaml's); tests add the worker nodes. Ray's
    temp dirs are short paths of their own (Ray's socket paths have a length limit)."""
    root = Path(tempfile.mkdtemp(prefix="raymoe-mn-"))
    nodes = MultiNodeCluster(root)
    try:
        nodes.start_head()
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def s3(s3_server):
    """This module's prefix in the bucket, and the reader (and deleter) the checks use."""
    prefix = f"multinode-{secrets.token_hex(4)}"
    fs = s3_server["fs"]

    def read(key: str) -> bytes:
        with fs.open_input_stream(f"{s3_server['bucket']}/{prefix}/{key}") as f:
            return f.read()

    def listing(key: str) -> list[str]:
        from pyarrow import fs as pafs

        base = f"{s3_server['bucket']}/{prefix}/{key}"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def delete(key: str) -> None:
        fs.delete_file(f"{s3_server['bucket']}/{prefix}/{key}")

    return {"uri": f"s3://{s3_server['bucket']}/{prefix}", "read": read, "list": listing, "delete": delete}


@pytest.fixture(scope="module")
def dataset_uri(s3, s3_server, dataset) -> str:
    """The session's prepared sample (the bundled corpus, byte tokenizer, seq_len 32), copied
    into S3: the cluster's nodes read it from there (preparing into S3 is test_data's)."""
    from pyarrow import fs as pafs

    uri = f"{s3['uri']}/data"
    pafs.copy_files(str(dataset), uri.removeprefix("s3://"), destination_filesystem=s3_server["fs"])
    return uri


@pytest.fixture
def new_driver_dir():
    """new_driver_dir() -> a fresh directory for a driver to run from; the test deletes it
    before its checks, and any left (a failed test) go at teardown."""
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="raymoe-driver-")))
        return made[-1]

    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def job_id_of(output: str) -> str:
    found = re.search(r"submitted \w+ job (raysubmit_\w+)", output)
    assert found, output
    return found.group(1)


ELASTIC_STEPS = 160
"""Enough steps for the preemption to come before the end however slowly the nodes join: on
a quiet machine the group grows near step 60 and saves before the preemption near step 80; on
a loaded one each join can take a minute more, while the group trains a step a second."""
JOIN_SEEN = 30
"""Seconds for Ray Train to see a node that joined (its view of the cluster is refreshed every
20 s) and make its resize checks (every 5 s): a restart for nothing would come by then."""
ELASTIC = [*SMALL[:-2], "model.moe.use_rts=false", "optim.lr=1e-4", "train.micro_batch=2",
           "train.eval_every=1000", "train.checkpoint_every=4", "train.keep_checkpoints=100",
           "parallel.num_workers=[2, 4]", "parallel.ep_size=2", "parallel.cpus_per_worker=1.5",
           "parallel.resize_check_seconds=5", "train.max_failures=3", "train.preemption_save_seconds=5"]
"""A step is 4 micro-batches of 2: 4 workers (EP 2, 2 data-parallel replicas) or 2 (EP 2);
3 would idle one. Each layout sums in another order, so the last bits differ, and training
amplifies that by the learning rate: at the preset's 2e-3 the losses of 86 steps were
2.4e-4 apart (another batch of data moves them by far more than 1e-4 at any rate). Every
checkpoint is kept, for the checks of what each resume read."""
PREEMPTION_WARNING = 20
"""Seconds between a spot node's warning and its loss (AWS: 120)."""
PACE = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1.0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}
"""The job's environment: a report a step, taken by the controller once a second, holds
the run to about a step a second, so that a joining node (5 s on a quiet machine, up to a
minute on a loaded one) takes fewer steps than the group of 2 has left. Ray Train sees the
cluster's nodes through a view refreshed every 20 s, so after a node is lost it first tries
a group of the old size, whose placement group cannot be placed: that try gives up after
10 s, not Ray's 60 (the timeout covers only the placement, which takes well under a second
when the nodes are there)."""


def reference_run(dataset_uri: str, directory: Path, steps: int) -> tuple[dict[int, float], dict]:
    """The same run uninterrupted, at a fixed size (one process, EP 1, here)."""
    from raymoe.config import load_config

    return train_in_one_process(load_config("tiny-moe8", [
        f"data.path={dataset_uri}", *ELASTIC, "parallel.num_workers=1", "parallel.ep_size=1",
        "train.checkpoint_every=100000", f"train.max_steps={steps}"]), directory)


@pytest.fixture
def leaves_two_worker_nodes(cluster):
    """After the test, passed or failed: no job of it still running, and the cluster's worker
    nodes two of two workers each, as the next tests expect."""
    yield
    jobs = RaymoeJobs(cluster.job_server, token=cluster.token)
    for info in jobs.list():
        if info.status in ("PENDING", "RUNNING"):
            jobs.stop(info.job_id)
    with_two_worker_nodes(cluster)


def job_story(jobs: RaymoeJobs, job: str) -> str:
    """The lines of a job's log that tell its resizes, checkpoints and failures."""
    return "\n".join(line for line in jobs.logs(job).splitlines()
                     if re.search(r"resize|saved|preempt|failed|finished|fits", line))


def test_an_elastic_job_waits_for_a_node_grows_and_shrinks_with_the_nodes_and_a_new_driver_resumes_it(
        cluster, s3, dataset_uri, new_driver_dir, leaves_two_worker_nodes):
    """An elastic job ([2, 4] workers of 1.5 CPU) submitted while the cluster has no worker
    node waits; a node joins 10 s later and the job trains on 2 workers (EP 2); two nodes of
    one worker join one at a time: the first changes nothing (3 workers train as 2: no
    restart, which would show as a fourth resume), with the second the group, asked first,
    saves a checkpoint and holds, then grows to 4 (EP 2) from it, each rank reading only its
    part of the 2-worker checkpoint from S3; the first of them is reclaimed as a spot node
    is (warned, then gone at the deadline): the group saves a just-in-time checkpoint as
    late as is safe and holds, shrinks to 2 once the node is gone (3 workers left train as
    2 do), resumes from that checkpoint redoing no step, and trains to the end.
    A new driver in a fresh directory then resumes the run from S3 alone,
    without Ray's record of the run, each rank again reading only its part. Every step's
    loss is the uninterrupted run's, and the last data cursor too: no sequence skipped or
    trained twice through three resizes and a resume."""
    driver = new_driver_dir()
    total = ELASTIC_STEPS + 2

    def saved() -> dict[int, int]:
        """Step -> world size of each checkpoint in S3."""
        try:
            files = s3["list"]("runs/elastic")
        except FileNotFoundError:  # before the first upload
            return {}
        steps = [f.split("/")[0] for f in files if f.endswith("/manifest.json")]
        return {int(d[5:]): json.loads(s3["read"](f"runs/elastic/{d}/manifest.json"))["world_size"]
                for d in steps}

    storage = f"{s3['uri']}/runs"
    train_args = ["tiny-moe8", f"data.path={dataset_uri}", f"train.storage={storage}",
                  "train.run_name=elastic", *ELASTIC]
    (driver / "pace.env").write_text("".join(f"{k}={v}\n" for k, v in PACE.items()))
    # submit's own options after the kind; --wait and --timeout are train's
    submitted = cluster.raymoe("submit", "train", *train_args, f"train.max_steps={ELASTIC_STEPS}",
                               "--wait", "--timeout", "600", "--address", cluster.job_server,
                               "--working-dir", str(REPO), "--env-file", str(driver / "pace.env"),
                               cwd=driver)
    assert submitted.returncode == 0, submitted.stderr
    job = job_id_of(submitted.stdout)
    jobs = RaymoeJobs(cluster.job_server, token=cluster.token)
    wait_until(lambda: "waiting" in jobs.logs(job), 240, "the job's first waiting line")
    waiting_since = time.monotonic()
    assert "0 of 2 workers fit on the cluster's 1 node(s) with 0 CPU" in jobs.logs(job)
    expected, cursor = reference_run(dataset_uri, driver / "reference", total)  # while the job waits
    time.sleep(max(0.0, 10 - (time.monotonic() - waiting_since)))
    cluster.add_worker(WORKER_CPUS, memory_gib=2)  # 2 workers of 1.5 CPU
    wait_until(lambda: 2 in saved().values(), 300, "a checkpoint of the group of 2")
    # Two nodes of one worker each join one at a time: with 3 workers the layout is the 2's
    # (4 micro-batches a step), so the group restarts only when the second one makes 4.
    cluster.add_worker(WORKER_CPUS - 1, memory_gib=2)  # 1 worker of 1.5 CPU
    time.sleep(JOIN_SEEN)
    cluster.add_worker(WORKER_CPUS - 1, memory_gib=2)
    wait_until(lambda: 4 in saved().values(), 300, "a checkpoint of the group of 4")
    # The second node (of one worker) is a spot node reclaimed: warned 20 s ahead (as the autoscaler drains
    # it), then gone at the deadline. The group saves when the deadline is its
    # preemption_save_seconds and two steps away, and holds.
    warned = time.time()
    cluster.warn_preemption(1, PREEMPTION_WARNING)
    # The line reaches the job's log through Ray's log monitor, a second or more after the
    # worker printed it: it may come after the deadline, but only the save must come before.
    try:
        wait_until(lambda: "saved before the preemption" in jobs.logs(job), PREEMPTION_WARNING + 20,
                   "the just-in-time checkpoint")
    except TimeoutError as err:
        raise AssertionError(f"{err}; the job so far:\n{job_story(jobs, job)}") from err
    time.sleep(max(0.0, warned + PREEMPTION_WARNING - time.time()))
    cluster.kill_raylet(1)
    status = jobs.wait(job, timeout=600)
    output = jobs.logs(job)
    assert status == "SUCCEEDED", output[-5000:]
    assert "the cluster fits the worker group after" in output
    assert f"finished at step {ELASTIC_STEPS}" in output, output[-5000:]
    grow = re.search(r"resize: added node\(s\) [\w, ]+ \(2 -> 4 workers\): 2 workers, EP 2, 2 "
                     r"micro-batches of 2 each -> 4 workers, EP 2, 1 micro-batch of 2 each; resumed "
                     r"from step (\d+) \(the previous group reached step (\d+)\)", output)
    shrink = re.search(r"resize: lost node\(s\) [\w, ]+ \(4 -> 2 workers\): 4 workers, EP 2, 1 "
                       r"micro-batch of 2 each -> 2 workers, EP 2, 2 micro-batches of 2 each; resumed "
                       r"from step (\d+) \(the previous group reached step (\d+)\); [\d.]+ s lost", output)
    assert shrink and grow, "\n".join(line for line in output.splitlines() if "resize" in line or "saved" in line)
    # resumed from the just-in-time checkpoint, redoing at most one step
    held = re.search(r"step (\d+): saved before the preemption \(\d+ s left\); holding", output)
    assert held and int(shrink.group(1)) == int(held.group(1)), output[-5000:]
    assert int(shrink.group(2)) - int(shrink.group(1)) <= 1, shrink.group(0)
    # the lost node was a preemption, on its own budget, not a worker failure
    assert "the worker group failed: 1 of no limit on train.max_preemptions; restarting" in output, output[-5000:]
    assert "on train.max_failures" not in output, output[-5000:]
    # the grow was asked of the group first: it saved, held, and the larger group resumed there
    saved_for_grow = re.search(r"step (\d+): saved before the group grows; holding", output)
    assert saved_for_grow and int(grow.group(1)) == int(saved_for_grow.group(1)), output[-5000:]
    assert int(grow.group(2)) - int(grow.group(1)) <= 1, grow.group(0)
    final = json.loads(s3["read"](f"runs/elastic/step-{ELASTIC_STEPS:08d}/manifest.json"))
    assert final["world_size"] == 2 and final["extra"]["tokens"] == ELASTIC_STEPS * 8 * 32

    # A second driver, in a directory of its own, resumes the run from S3 alone, even with
    # Ray's own record of the run's checkpoints lost (as a storage failure while Ray writes
    # it loses it): from the latest complete checkpoint.
    shutil.rmtree(driver)
    s3["delete"]("runs/elastic/checkpoint_manager_snapshot.json")
    driver = new_driver_dir()
    resumed = cluster.raymoe("train", *train_args, f"train.max_steps={total}", "--address",
                             cluster.address, cwd=driver)
    shutil.rmtree(driver)
    cluster.kill_raylet(1)  # the other node of one worker: the next tests add nodes of two
    text = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, text
    assert re.search(rf"resumed from \S+ at step {ELASTIC_STEPS} \({ELASTIC_STEPS * 8 * 32:,} tokens\)", text), text
    assert f"finished at step {total}" in resumed.stdout
    assert "Ray Train holds no record of this run's checkpoints; resuming from" in text

    records = read_metrics(f"{s3['uri']}/runs/elastic/metrics")
    trained = [(r["step"], r["workers"], r["ep_size"], r["lm_loss"]) for r in records if "lm_loss" in r]
    assert [w for w, _ in itertools.groupby((w, ep) for _, w, ep, _ in trained)] == [(2, 2), (4, 2), (2, 2)]
    last = {step: loss for step, _, _, loss in trained}  # a redone step's last line wins
    assert sorted(last) == list(range(1, total + 1))
    for step, loss in last.items():
        assert loss == pytest.approx(expected[step], abs=1e-4), step
    # Each group trains on from the checkpoint it resumed from, one step after the other:
    # past that checkpoint no step (no sequence) is trained twice. (Lines the lost group
    # wrote after its last upload of its metrics are gone with it.)
    restarts = {int(grow.group(1)), int(shrink.group(1)), ELASTIC_STEPS}
    assert all(trained[i][0] == trained[i - 1][0] + 1 or trained[i][0] - 1 in restarts
               for i in range(1, len(trained)))
    last_manifest = json.loads(s3["read"](f"runs/elastic/step-{total:08d}/manifest.json"))
    assert last_manifest["extra"]["cursor"] == cursor and last_manifest["world_size"] == 2
    files = s3["list"]("runs/elastic")
    assert any(f.startswith("metrics/tensorboard/events.out.tfevents") for f in files), files

    resumes = [m for m in records if "checkpoint_read_bytes" in m]  # one a restart
    assert [int(m["resumed_from"][-8:]) for m in resumes] == [int(grow.group(1)), int(shrink.group(1)),
                                                             ELASTIC_STEPS]
    # The group of 4 read a checkpoint of 2 ranks (no rank's RNG file: another world size);
    # the new driver's 2 ranks read one of 2 (each its own RNG file too).
    for resume, workers in ((resumes[0], 4), (resumes[-1], 2)):
        expected_bytes = expected_reads(s3, resume["resumed_from"].removeprefix(s3["uri"] + "/"),
                                        MeshLayout(workers, 2), num_experts=8)
        assert resume["checkpoint_read_bytes"] == expected_bytes, resume
        assert max(expected_bytes) < 0.8 * resume["checkpoint_bytes"], (expected_bytes, resume["checkpoint_bytes"])


def expected_reads(s3, checkpoint: str, layout: MeshLayout, num_experts: int) -> list[int]:
    """The bytes each rank of ``layout`` must read to resume from ``checkpoint``, written at
    the same EP size: the manifest, DCP's index, every dense item (replicated), the expert
    items of its EP rank's block, and its own rank file when the world size is the
    checkpoint's (RNG states only restore at the same size); from DCP's index."""
    manifest_bytes = s3["read"](f"{checkpoint}/manifest.json")
    manifest = json.loads(manifest_bytes)
    sizes = manifest["files"]
    items = pickle.loads(s3["read"](f"{checkpoint}/.metadata")).storage_data
    same_world = manifest["world_size"] == layout.world_size
    blocks = [layout.global_expert_ids(rank, num_experts) for rank in range(layout.world_size)]
    reads = [len(manifest_bytes) + sizes[".metadata"]
             + (sizes[f"rank-{rank:05d}.pt"] if same_world else 0) for rank in range(layout.world_size)]
    for index, info in items.items():
        for rank, block in enumerate(blocks):
            expert_chunk = ".experts." in index.fqn and len(index.offset) > 0  # not a scalar state
            if not expert_chunk or index.offset[0] in block:
                reads[rank] += info.length
    return reads


def with_two_worker_nodes(cluster: MultiNodeCluster) -> None:
    """The cluster's worker nodes become two of two workers each: a node of another size (the
    elastic test's, left by its failure) goes, nodes join until there are two."""
    for index in reversed(range(len(cluster.workers))):
        if cluster.worker_cpus[cluster.workers[index]] != WORKER_CPUS:
            cluster.kill_raylet(index)
    while len(cluster.workers) < 2:
        cluster.add_worker(WORKER_CPUS, memory_gib=2)


def test_a_fixed_cluster_too_small_fails_at_once_with_the_numbers(cluster, dataset_uri, tmp_path):
    with_two_worker_nodes(cluster)
    start = time.monotonic()
    out = cluster.raymoe("train", "tiny-moe8", f"data.path={dataset_uri}", *SMALL,
                         "parallel.num_workers=4", "train.global_batch=16", "--address",
                         cluster.address, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "raymoe: ClusterTooSmallError: the worker group needs 8 CPU (4 workers x 2 CPU); 2 of 4 "
        "workers fit on the cluster's 3 node(s) with 6 CPU (the cluster has no autoscaler to "
        "grow it). Lower parallel.num_workers or parallel.cpus_per_worker, or pass --wait to "
        "wait for nodes to join")
    assert time.monotonic() - start < 120


def test_a_study_submitted_as_a_job_writes_every_artefact_to_s3(cluster, s3, dataset_uri, new_driver_dir):
    """The dense-versus-MoE study on Ray Tune, as a job: a dense and a MoE trial train at the
    same time (a node's worth of workers each) and complete, a third fails (a config error)
    and is reported in the table; each trained model's final checkpoint is evaluated
    zero-shot (the dense one on one actor per node, the MoE one on an expert-parallel group
    of 2), with the numbers of one process."""
    with_two_worker_nodes(cluster)
    driver = new_driver_dir()
    study_file = driver / "study.yaml"
    eval_options = EvalOptions(["lambada", "piqa"], data_dir=str(SAMPLE_DATA), limit=4)
    study_file.write_text(yaml.safe_dump({
        "name": "mini", "storage": f"{s3['uri']}/studies", "data": dataset_uri, "tokens": 2048,
        "seeds": [1], "max_concurrent_trials": 3,
        "overrides": SMALL[:-2] + ["train.eval_every=4", "parallel.num_workers=2", "parallel.cpus_per_worker=1.5"],
        "models": [{"name": "dense", "config": "tiny"}, {"name": "moe", "config": "tiny-moe8"},
                   {"name": "broken", "config": "tiny", "overrides": ["model.n_head=5"]}],
        "eval": {"tasks": eval_options.tasks, "data_dir": eval_options.data_dir, "limit": eval_options.limit,
                 "ep": 2},
    }))
    submitted = cluster.raymoe("submit", "compare", str(study_file), "--address", cluster.job_server,
                               "--working-dir", str(REPO), cwd=driver)
    assert submitted.returncode == 0, submitted.stderr
    job = job_id_of(submitted.stdout)
    jobs = RaymoeJobs(cluster.job_server, token=cluster.token)
    status = jobs.wait(job, timeout=900)
    logs = jobs.logs(job)
    shutil.rmtree(driver)
    assert status == "SUCCEEDED", logs

    # The dense model's evaluation ran one actor per worker node, holding all of its CPUs.
    actors = subprocess.run([str(BIN / "ray"), "list", "actors", "--address", cluster.job_server,
                             "--filter", "class_name=EvalWorker", "--detail", "--format", "json",
                             "--limit", "100"], env=cluster.env(), capture_output=True, text=True,
                            timeout=120)
    assert actors.returncode == 0, actors.stderr
    per_node = json.loads(actors.stdout)
    assert len(per_node) == 2  # 1 trial evaluated this way x 2 nodes
    assert {a["required_resources"]["CPU"] for a in per_node} == {WORKER_CPUS}
    assert len({a["node_id"] for a in per_node}) == 2

    study = "studies/mini"
    report = s3["read"](f"{study}/report.md").decode()
    sections = {text.split("\n", 1)[0]: text.split("\n\n", 1)[1] for text in report.split("\n## ")}
    main_table = sections["# Study mini"]
    rows = [line.split(" | ")[0] for line in main_table.splitlines()
            if line.startswith("| ") and not line.startswith(("| model", "| ---"))]
    assert rows == ["| dense", "| moe", "| broken"]
    # the user's error as one line, not Ray's remote traceback
    assert "failed: broken-seed1: ConfigError: model.n_head: 5 heads do not divide model.d_model=32 |" \
        in main_table
    table2 = sections["MoE against dense (Table 2 form)"]
    assert re.search(r"^moe \(val", table2, re.MULTILINE), report  # against the dense model
    table1 = sections["Zero-shot evaluation (Table 1 form)"].strip().splitlines()
    assert table1[0] == "|  | dense | moe | broken |"
    assert [line.split(" | ")[0] for line in table1[2:]] == [
        "| total params", "| active params", "| validation loss", "| LAMBADA (acc)", "| PIQA (acc)"]
    (dense_total, moe_total), (dense_active, moe_active) = (line.split(" | ")[1:3] for line in table1[2:4])
    assert dense_total == dense_active and moe_total != moe_active, table1
    assert table1[-1].endswith(" | - |")  # the broken model has no scores
    curves = list(csv.DictReader(io.StringIO(s3["read"](f"{study}/validation_curves.csv").decode())))
    assert {(r["trial"], int(r["tokens"])) for r in curves} == {
        (trial, n) for trial in ("dense-seed1", "moe-seed1") for n in (1024, 2048)}
    plot = s3["read"](f"{study}/validation_loss.png")
    assert len(plot) > 10_000 and plot[:8] == b"\x89PNG\r\n\x1a\n"
    trials = json.loads(s3["read"](f"{study}/trials.json"))
    assert [t["error"] == "" for t in trials] == [True, True, False]
    for trial, ranks in (("dense-seed1", 0), ("moe-seed1", 2)):
        results = json.loads(s3["read"](f"{study}/eval/{trial}.json"))
        checkpoint = f"{s3['uri']}/studies/mini/{trial}/step-00000008"
        assert results["checkpoint"] == checkpoint
        assert {(r["task"], r["n"]) for r in results["results"] if r["metric"] == "acc"} == {
            ("lambada", 4), ("piqa", 4)}
        direct = evaluate_checkpoint(checkpoint, eval_options, show_progress=False)  # in this process
        assert [r["value"] for r in results["results"]] == pytest.approx([m.value for m in direct.metrics],
                                                                          rel=1e-5)
        assert len(results.get("parameter_bytes", [[]])[0]) == ranks  # the MoE model: one group of 2
        files = s3["list"](f"{study}/{trial}")
        assert "metrics/metrics.jsonl.000000" in files and "step-00000008/manifest.json" in files
        assert any(f.startswith("metrics/tensorboard/events.out.tfevents") for f in files)
    tune_state = s3["list"]("studies/.tune/mini-tune")
    assert any(f.startswith("experiment_state") for f in tune_state), tune_state
    # Tune's own record of each trial that reported (the broken one never did): its last
    # result's time, and for how long it had run. The dense and the MoE trial ran at the same
    # time (max_concurrent_trials).
    spans = []
    for name in (f for f in tune_state if f.endswith("/result.json")):
        results = s3["read"](f"studies/.tune/mini-tune/{name}").splitlines()
        if results:
            last = json.loads(results[-1])
            spans.append((last["timestamp"] - last["time_total_s"], last["timestamp"]))
    assert len(spans) == 2, tune_state
    (first_start, first_end), (second_start, second_end) = spans
    assert first_start < second_end and second_start < first_end, spans
