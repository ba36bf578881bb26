"""Ray jobs end to end: a real head started with `ray start --head` and token auth on;
raymoe.jobs and Ray's own `ray job` CLI see and stop each other's jobs; no secret leaks."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO

from raymoe.jobs import JobError, RaymoeJobs
from raymoe.local_cluster import BIN, free_port
from raymoe.runs import read_metrics


def head_env(token: str) -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1")
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A second, separate Ray cluster with its job server on a free port; stopped by
    ending exactly its own processes (a plain `ray stop` would end every cluster here)."""
    temp_dir = tmp_path_factory.mktemp("head")
    token = secrets.token_hex(16)
    port, dashboard = free_port(), free_port()
    own_ports = [f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
        "metrics-export-port")]  # the session's other cluster holds the defaults
    subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={port}",
                    f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", *own_ports,
                    "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                   env=head_env(token), check=True, capture_output=True, timeout=120)
    yield {"address": f"http://127.0.0.1:{dashboard}", "token": token, "temp_dir": temp_dir}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if str(temp_dir) in " ".join(proc.info["cmdline"] or []):
            with __import__("contextlib").suppress(psutil.Error):
                os.kill(proc.info["pid"], signal.SIGKILL)


def ray_job_cli(head, command: str, *args: str) -> str:
    out = subprocess.run([str(BIN / "ray"), "job", command, "--address", head["address"], *args],
                         env=head_env(head["token"]), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout + out.stderr


def test_submit_follow_list_and_stop_jobs(ray_head, dataset, tmp_path, monkeypatch):
    aws_secret = secrets.token_hex(20)  # in the submitter's environment, as a user's would be
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws_secret)
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head["token"])
    jobs = RaymoeJobs(ray_head["address"], token=ray_head["token"])
    storage = tmp_path / "runs"
    train_args = [f"data.path={dataset}", f"train.storage={storage}", "train.max_steps=4",
                  "train.checkpoint_every=2", "model.seq_len=32", "train.log_every=2", "parallel.num_workers=1"]
    first = jobs.submit_train("tiny-moe8", train_args, working_dir=str(REPO))
    logs = "".join(jobs.follow(first))
    assert jobs.wait(first, timeout=60) == "SUCCEEDED", logs
    assert "finished at step 4" in logs
    run_dir = storage / "tiny-moe8"
    assert (run_dir / "step-00000004" / "manifest.json").is_file()
    assert [r["step"] for r in read_metrics(str(run_dir / "metrics")) if "lm_loss" in r] == [2, 4]
    info = jobs.info(first)
    assert (info.kind, info.config, info.run_dir) == ("train", "tiny-moe8", str(run_dir))

    # an eval job on the trained run, spread over 2 Ray workers
    task = tmp_path / "lambada.jsonl"
    task.write_text("".join(json.dumps({"text": t}) + "\n" for t in (
        "the sun rose over the quiet hills", "she opened the door and smiled", "rain fell all day")))
    results = tmp_path / "eval.json"
    evaluation = jobs.submit("eval", [str(run_dir), "--tasks", "lambada", "--task-file",
                                      f"lambada={task}", "--workers", "2", "--out", str(results)],
                             working_dir=str(REPO))
    eval_logs = "".join(jobs.follow(evaluation))
    assert jobs.wait(evaluation, timeout=60) == "SUCCEEDED", eval_logs
    assert "scoring on 2 Ray workers" in eval_logs and "lambada      perplexity" in eval_logs
    assert {(r["metric"], r["n"]) for r in json.loads(results.read_text())["results"]} == \
        {("acc", 3), ("perplexity", 3)}
    assert (jobs.info(evaluation).kind, jobs.info(evaluation).config) == ("eval", str(run_dir))

    second = jobs.submit_train("tiny-moe8", [*train_args[:1], f"train.storage={tmp_path / 'b'}",
                                             "train.max_steps=100000"], working_dir=str(REPO))
    ray_job_cli(ray_head, "stop", second)  # Ray's CLI stops raymoe's job
    assert jobs.wait(second, timeout=60) == "STOPPED"
    listed = {j.job_id: j.status for j in jobs.list()}
    assert listed == {first: "SUCCEEDED", evaluation: "SUCCEEDED", second: "STOPPED"}
    ray_listing = ray_job_cli(ray_head, "list")
    assert first in ray_listing and second in ray_listing

    # ...and raymoe stops a job that Ray's CLI submitted
    out = ray_job_cli(ray_head, "submit", "--no-wait", "--", "sleep", "600")
    third = re.search(r"raysubmit_[A-Za-z0-9]+", out).group(0)
    assert jobs.stop(third)
    assert jobs.wait(third, timeout=60) == "STOPPED"

    # No secret anywhere: job records, logs, saved config, metrics, the uploaded files.
    secrets_here = [ray_head["token"], aws_secret]
    records = json.dumps([vars(jobs.info(j)) for j in (first, second)]) + \
        json.dumps([jobs.client.get_job_info(j).runtime_env for j in (first, second)])
    texts = [records, logs, (run_dir / "step-00000004" / "manifest.json").read_text(),
             json.dumps(read_metrics(str(run_dir / "metrics")))]
    uploads = list(Path(ray_head["temp_dir"]).rglob("runtime_resources/**/*"))
    assert any(p.name == "pretrain.py" for p in uploads), "the working_dir upload was not found"
    assert not any(p.name in (".venv", ".git", "runs") for p in uploads)
    texts += [p.read_text(errors="ignore") for p in uploads if p.is_file() and p.stat().st_size < 2**20]
    for secret in secrets_here:
        assert not any(secret in text for text in texts)


def test_wrong_token_and_dead_address_fail_fast(ray_head):
    start = time.monotonic()
    with pytest.raises(JobError, match="refused the token"):
        RaymoeJobs(ray_head["address"], token="not-the-token")
    with pytest.raises(JobError, match="cannot reach the Ray job server at http://127.0.0.1:9"):
        RaymoeJobs("http://127.0.0.1:9", token="x")
    assert time.monotonic() - start < 30
