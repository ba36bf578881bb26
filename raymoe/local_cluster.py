"""A multi-node Ray cluster on this machine, shaped like the shipped cluster YAML: a head
that offers no CPU (`ray start --head --num-cpus=0`) with token authentication, and
worker nodes that join it (`ray start --address`), each with its own resources, ports and
temp dir; a node is lost as a spot node is, by killing its raylet (after the warning a
spot node gets, if wanted). The multi-node tests and bench/elastic.py run on it.

The caller never joins this cluster: it runs raymoe as subprocesses (the CLI, or Ray
jobs), so any other Ray cluster of the caller's is untouched. Stopped by ending exactly
its own processes (a plain `ray stop` would end every cluster on the machine)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
"""Where this environment's `ray` and `raymoe` commands are."""
PACKAGE_PARENT = Path(__file__).resolve().parents[1]
"""The directory holding this raymoe package (a checkout's root): on the cluster's
PYTHONPATH, so that its nodes run this raymoe."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own_ports() -> list[str]:
    return [f"--{flag}={free_port()}" for flag in (
        "node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")]


@dataclass
class MultiNodeCluster:
    root: Path
    """The parent of every node's temp dir: a short path (Ray's socket paths have a length limit)."""
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    workers: list[Path] = field(default_factory=list)
    worker_cpus: dict[Path, int] = field(default_factory=dict)
    """Each worker node's logical CPUs, by its temp dir."""

    @property
    def address(self) -> str:
        """The GCS address, for `raymoe train --address` and `ray start --address`."""
        return f"127.0.0.1:{self.port}"

    @property
    def job_server(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of this cluster and of its clients: the token,
        this process's environment (S3 variables included), this environment's commands
        first on PATH."""
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.1", PYTHONPATH=str(PACKAGE_PARENT),
                   # a loaded 2-core machine starts a node's agents slowly
                   RAY_agent_register_timeout_ms="120000",
                   # the head checks each node every second (not 3): a killed raylet refuses
                   # the check at once, so a lost node is marked dead after 5 refusals, in
                   # about 5 s instead of 15-20 (a slow but live node still has 10 s per check)
                   RAY_health_check_period_ms="1000", **extra)
        env.pop("RAY_ADDRESS", None)
        return env

    def _ray_start(self, temp_dir: Path, arguments: Callable[[], list[str]]) -> None:
        """`ray start` with ports of its own; once more with new ports when it fails (a
        port taken between choosing and binding it, or agents too slow on a loaded machine)."""
        for attempt in range(2):
            args = arguments()
            directory = temp_dir.with_name(f"{temp_dir.name}-{attempt}")
            directory.mkdir(parents=True)
            started = subprocess.run([str(BIN / "ray"), "start", f"--temp-dir={directory}",
                                      "--disable-usage-stats", *_own_ports(), *args],
                                     env=self.env(), capture_output=True, text=True, timeout=300)
            if started.returncode == 0:
                return
            self._kill(directory)
        raise RuntimeError(f"ray start {' '.join(args)}:\n{started.stdout[-3000:]}\n"
                           f"{started.stderr[-3000:]}")

    def start_head(self) -> None:
        def arguments() -> list[str]:
            self.port, self.dashboard_port = free_port(), free_port()
            return ["--head", f"--port={self.port}", "--num-cpus=0", "--object-store-memory=200000000",
                    f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1",
                    f"--ray-client-server-port={free_port()}"]
        self._ray_start(self.root / "head", arguments)

    def add_worker(self, cpus: int, memory_gib: float) -> None:
        """A worker node of ``cpus`` logical CPUs and ``memory_gib`` of Ray memory."""
        index = 0
        while any(self.root.glob(f"worker{index}-*")):  # a lost node's directory stays
            index += 1
        temp_dir = self.root / f"worker{index}"
        self._ray_start(temp_dir, lambda: [f"--address={self.address}", f"--num-cpus={cpus}",
                                           f"--memory={int(memory_gib * 2**30)}",
                                           "--object-store-memory=200000000"])
        self.workers.append(temp_dir)
        self.worker_cpus[temp_dir] = cpus

    def kill_raylet(self, index: int) -> int:
        """Take worker node ``index`` away as a lost spot node does: its raylet killed by pid
        (its workers go with it). Returns the pid."""
        directory = self.workers.pop(index)
        for proc in psutil.process_iter(["pid", "name", "cmdline"]):
            line = " ".join(proc.info["cmdline"] or [])
            if "raylet" in (proc.info["name"] or "") and f"{directory}-" in line:
                os.kill(proc.info["pid"], signal.SIGKILL)
                return proc.info["pid"]
        raise RuntimeError(f"no raylet of {directory} is running")

    def node_id(self, index: int) -> str:
        """Worker node ``index``'s Ray node id, as its raylet logged it."""
        for log in self.root.glob(f"{self.workers[index].name}-*/session_*/logs/raylet.out"):
            found = re.search(r"Setting node ID node_id=(\w+)", log.read_text(errors="replace"))
            if found:
                return found.group(1)
        raise RuntimeError(f"no raylet log of {self.workers[index]} names its node id")

    def warn_preemption(self, index: int, seconds: int) -> None:
        """Warn that worker node ``index`` goes in ``seconds``, as the autoscaler warns of a
        spot node's reclaim (a drain with a deadline; the node stays until killed)."""
        subprocess.run([str(BIN / "ray"), "drain-node", f"--address={self.address}",
                        f"--node-id={self.node_id(index)}", "--reason=DRAIN_NODE_REASON_PREEMPTION",
                        "--reason-message=spot instance reclaimed",
                        f"--deadline-remaining-seconds={seconds}"],
                       env=self.env(), check=True, capture_output=True, text=True, timeout=60)

    def raymoe(self, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """The raymoe command, run from ``cwd``, its output captured."""
        return subprocess.run([str(BIN / "raymoe"), *args], cwd=cwd, env=self.env(),
                              capture_output=True, text=True, timeout=timeout)

    def stop(self) -> None:
        self._kill(self.root)

    @staticmethod
    def _kill(directory: Path) -> None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if str(directory) in " ".join(proc.info["cmdline"] or []):
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    os.kill(proc.info["pid"], signal.SIGKILL)


def wait_until(predicate: Callable[[], object], timeout: float, what: str, poll: float = 1.0) -> None:
    """Poll ``predicate`` until it is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(poll)
