"""What a lost spot node costs an elastic run, measured on a multi-node Ray cluster on this
machine (raymoe.local_cluster, as the multi-node tests run it: a CPU-less head and two
worker nodes started with `ray start`).

tiny-moe8 trains elastic on [2, 4] workers (2 per node, EP 4); after the first checkpoint
one node's raylet is killed. Measured: seconds from the loss to the next training step
(the group of 2 at EP 2, resumed from its checkpoint), then seconds from a new node's
join to the first step of the group of 4 again, and the stall a checkpoint adds to a step.

Modelled: the share of an hour's work lost at a preemption rate and a checkpoint cadence.
Each preemption costs the measured restart plus the work since the last checkpoint (half a
cadence on average, preemptions falling at random times); each checkpoint costs its stall:
    lost = rate x (restart + cadence / 2) + (checkpoints per hour x stall), over an hour.

    python bench/elastic.py [--rates 1 0.2] [--cadences 5 10 30]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raymoe.local_cluster import BIN, MultiNodeCluster, wait_until  # noqa: E402
from raymoe.runs import read_metrics  # noqa: E402

NODE_CPUS = 3
RUN = ["model.seq_len=32", "model.d_model=32", "model.n_layer=2", "model.n_head=2",
       "train.global_batch=8", "train.micro_batch=2", "train.log_every=1", "train.eval_every=100000",
       "train.checkpoint_every=10", "optim.warmup_tokens=256", "parallel.num_workers=[2, 4]",
       "parallel.ep_size=4", "parallel.cpus_per_worker=1.5", "parallel.resize_check_seconds=5",
       "train.max_failures=3", "train.max_steps=100000"]
PREPARE = """
import sys, ray
from raymoe.data.prepare import PrepareOptions, prepare
ray.init(num_cpus=2, include_dashboard=False, _temp_dir=sys.argv[2])
prepare(PrepareOptions([sys.argv[3]], sys.argv[1], tokenizer="bytes", seq_len=32,
                       val_fraction=0.05, doc_chars=8000, shard_bytes=256 * 2**10), log=lambda _: None)
"""


def first_step_after(metrics: str, since: float, workers: int) -> dict | None:
    return next((r for r in read_metrics(metrics) if "lm_loss" in r and r["time"] > since
                 and r["workers"] == workers), None)


def checkpoint_stall(lines: list[dict], every: int) -> float:
    """Mean extra wall time of a step that saves over one that does not (one group)."""
    steps = [r for r in lines if "lm_loss" in r and r["workers"] == 4]
    saves, plain = [], []
    for before, after in zip(steps, steps[1:], strict=False):
        if after["step"] != before["step"] + 1:
            break
        gap = after["time"] - before["time"]
        (saves if after["step"] % every == 0 else plain).append(gap)
    return max(statistics.median(saves) - statistics.median(plain), 0.0) if saves and plain else 0.0


def lost_share(rate: float, cadence_min: float, restart_s: float, stall_s: float) -> float:
    per_hour = rate * (restart_s + cadence_min * 60 / 2) + (60 / cadence_min) * stall_s
    return min(per_hour / 3600, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.2],
                        help="preemptions per hour to model")
    parser.add_argument("--cadences", type=float, nargs="+", default=[5.0, 10.0, 30.0],
                        help="checkpoint cadences (minutes) to model")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="raymoe-bench-elastic-"))
    cluster = MultiNodeCluster(Path(tempfile.mkdtemp(prefix="raymoe-be-")))  # short: socket paths
    driver = None
    try:
        data = root / "data"
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        subprocess.run([sys.executable, "-c", PREPARE, str(data), str(root / "prep"),
                        str(REPO / "raymoe" / "sample" / "corpus")], env=env, check=True,
                       capture_output=True, timeout=600)
        cluster.start_head()
        for _ in range(2):
            cluster.add_worker(NODE_CPUS, memory_gib=2)
        metrics = str(root / "runs" / "elastic" / "metrics")
        log = open(root / "driver.log", "w")
        driver = subprocess.Popen([str(BIN / "raymoe"), "train", "tiny-moe8", f"data.path={data}",
                                   f"train.storage={root / 'runs'}", "train.run_name=elastic", *RUN,
                                   "--address", cluster.address], cwd=root, env=cluster.env(),
                                  stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: any(r.get("step", 0) >= 25 for r in read_metrics(metrics)), 600,
                   "25 steps of the group of 4")
        lost_at = time.time()
        cluster.kill_raylet(1)
        wait_until(lambda: first_step_after(metrics, lost_at, 2) is not None, 600,
                   "the first step of the group of 2")
        shrunk = first_step_after(metrics, lost_at, 2)
        assert shrunk is not None
        restart = shrunk["time"] - lost_at
        print(f"elastic: node loss -> next step: {restart:.1f} s (4 -> 2 workers, EP 4 -> 2, "
              f"resumed at step {shrunk['step']})")
        joined_at = time.time()
        cluster.add_worker(NODE_CPUS, memory_gib=2)
        wait_until(lambda: first_step_after(metrics, joined_at, 4) is not None, 600,
                   "the first step of the group of 4 again")
        grown = first_step_after(metrics, joined_at, 4)
        assert grown is not None
        print(f"elastic: node join -> first step of the larger group: {grown['time'] - joined_at:.1f} s "
              f"(node start included; resize check every 5 s)")
        stall = checkpoint_stall(read_metrics(metrics), every=10)
        print(f"elastic: checkpoint stall: {stall:.2f} s per checkpoint")
        for rate in args.rates:
            for cadence in args.cadences:
                print(f"lost work at {rate:g} preemption/h, checkpoint every {cadence:g} min: "
                      f"{100 * lost_share(rate, cadence, restart, stall):.1f} %")
    except BaseException:
        if (root / "driver.log").is_file():
            print((root / "driver.log").read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        if driver is not None and driver.poll() is None:
            driver.send_signal(signal.SIGINT)
            try:
                driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                driver.kill()
        cluster.stop()
        for directory in (root, cluster.root):
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
