"""The programmatic job API: raymoe work as Ray jobs on a cluster's job server.

Built on ray.job_submission.JobSubmissionClient, so a job submitted here is an ordinary
Ray job (`ray job list/logs/stop` see it) and raymoe lists Ray's jobs that it submitted
(tagged in their metadata). Secrets are never part of a job: no environment variable is
copied into the runtime_env, the metadata holds only the kind, config name and run
directory, and the working_dir upload excludes environments, runs and credential files.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ray.job_submission import JobStatus, JobSubmissionClient

from raymoe.errors import RaymoeError

KINDS = {
    "train": ["python", "-m", "raymoe.cli", "train"],
    "prepare": ["python", "-m", "raymoe.cli", "prepare"],
    "compare": ["python", "-m", "raymoe.cli", "compare"],
    "eval": ["python", "-m", "raymoe.cli", "eval", "--ray"],
}
"""What each kind of job runs; ``python -m`` puts the uploaded working_dir on sys.path."""

UPLOAD_EXCLUDES = [".venv", ".git", "runs", "**/__pycache__", "*.egg-info", ".pytest_cache",
                   ".env", "*.pem", "*.key", ".aws", "auth_token"]
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
AGENT_WAIT_S = 30.0


class JobError(RaymoeError, RuntimeError):
    """The job server cannot be reached, refuses us, or a job did not do what was asked."""


@dataclass
class JobInfo:
    job_id: str
    status: str
    kind: str
    config: str
    run_dir: str
    entrypoint: str
    message: str


def _connect(address: str, token: str | None) -> JobSubmissionClient:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:  # the client raises plain exceptions with the HTTP story
        text = str(err)
        if "401" in text or "Unauthorized" in text:
            raise JobError(f"the Ray cluster at {address} requires a token: pass token= "
                           "(raymoe --token, or RAY_AUTH_TOKEN with RAY_AUTH_MODE=token)") from err
        if "403" in text or "Forbidden" in text:
            raise JobError(f"the Ray cluster at {address} refused the token: it is not this "
                           "cluster's (see ~/.ray/auth_token on the head node)") from err
        raise JobError(f"cannot reach the Ray job server at {address}: {text.splitlines()[0]}") from err


class RaymoeJobs:
    """Submit, watch and stop raymoe jobs on the cluster at ``address``
    (http://host:8265, usually through `ray dashboard` or a port-forward)."""

    def __init__(self, address: str, token: str | None = None):
        self.address = address
        self.client = _connect(address, token)

    def submit(self, kind: str, args: list[str], *, working_dir: str | None = ".",
               pip: list[str] | None = None, env_vars: dict[str, str] | None = None,
               entrypoint_num_cpus: float = 0,
               entrypoint_num_gpus: float = 0, run_dir: str = "",
               submission_id: str | None = None) -> str:
        """Start ``raymoe KIND ARGS...`` as a Ray job; returns its id."""
        if kind not in KINDS:
            raise JobError(f"unknown job kind {kind!r}: expected one of {sorted(KINDS)}")
        runtime_env: dict = {}
        if working_dir:
            runtime_env.update(working_dir=working_dir, excludes=UPLOAD_EXCLUDES)
        if pip:
            runtime_env["pip"] = pip
        if env_vars:  # named by the user (cluster/efa.env), never copied from this process
            runtime_env["env_vars"] = dict(env_vars)
        config = args[0] if kind in ("train", "eval") and args else ""  # config / checkpoint
        metadata = {"raymoe": "1", "kind": kind, "config": config, "run_dir": run_dir}
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=shlex.join(KINDS[kind] + list(args)),
                    runtime_env=runtime_env or None, metadata=metadata,
                    entrypoint_num_cpus=entrypoint_num_cpus,
                    entrypoint_num_gpus=entrypoint_num_gpus, submission_id=submission_id)
            except RuntimeError as err:  # a head that just started has no job agent yet
                if "No available agent" not in str(err) or time.monotonic() > deadline:
                    raise JobError(f"job server {self.address} did not take the job: {err}") from err
                time.sleep(1.0)

    def submit_train(self, config: str, overrides: Sequence[str] = (), options: Sequence[str] = (),
                     **kwargs) -> str:
        """A training run; its run directory (storage/run_name) is recorded with the job.
        ``options``: raymoe train's own (--wait, --timeout, ...)."""
        from raymoe.config import load_config
        from raymoe.runs import run_location

        local = _is_local_file_or_preset(config)
        run_dir = run_location(load_config(config, list(overrides))).uri if local else ""
        return self.submit("train", [config, *overrides, *options], run_dir=run_dir, **kwargs)

    def info(self, job_id: str) -> JobInfo:
        details = self.client.get_job_info(job_id)
        meta = details.metadata or {}
        return JobInfo(job_id, str(details.status.value), meta.get("kind", ""),
                       meta.get("config", ""), meta.get("run_dir", ""), details.entrypoint,
                       details.message or "")

    def status(self, job_id: str) -> str:
        return str(self.client.get_job_status(job_id).value)

    def logs(self, job_id: str) -> str:
        return self.client.get_job_logs(job_id)

    def follow(self, job_id: str) -> Iterator[str]:
        """Log chunks as they are written, until the job ends."""
        stream = self.client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()

    def stop(self, job_id: str) -> bool:
        return self.client.stop_job(job_id)

    def list(self) -> list[JobInfo]:
        """The cluster's raymoe jobs, newest last."""
        jobs = [j for j in self.client.list_jobs() if (j.metadata or {}).get("raymoe") == "1"]
        jobs.sort(key=lambda j: j.start_time or 0)
        return [self.info(j.submission_id) for j in jobs if j.submission_id]

    def wait(self, job_id: str, timeout: float, poll: float = 1.0) -> str:
        """Block until the job ends; JobError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.client.get_job_status(job_id)
            if status in TERMINAL:
                return str(status.value)
            if time.monotonic() > deadline:
                raise JobError(f"job {job_id} still {status.value} after {timeout:g} s")
            time.sleep(poll)


def read_env_file(path: str) -> dict[str, str]:
    """NAME=VALUE lines (blank lines and # comments skipped), for a job's env_vars."""
    from pathlib import Path

    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise JobError(f"{path}: cannot read the environment file: {err}") from err
    env = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().isidentifier():
            raise JobError(f"{path}:{number}: expected NAME=VALUE, got {line!r}")
        env[name.strip()] = value.strip()
    return env


def _is_local_file_or_preset(config: str) -> bool:
    from pathlib import Path

    from raymoe.config import PRESETS

    return config in PRESETS or Path(config).is_file()
