"""What a lost spot node costs an elastic run, with and without the warning a spot node
gets, measured on a multi-node Ray cluster on this machine (raymoe.local_cluster, as the
multi-node tests run it: a CPU-less head and two worker nodes started with `ray start`).

tiny-moe8 trains elastic on [2, 4] workers (2 per node, EP 4, a checkpoint every 10
steps); after 25 steps one node's raylet is killed, unwarned. Measured: seconds from the
loss to the next training step (the group of 2 at EP 2, resumed from its checkpoint) and
the steps redone (those the lost group had trained past the checkpoint resumed from, from
the run's metrics, at the group's step time). A new node joins: seconds from the join to
the first step of the group of 4 again. Then that node is reclaimed as a spot node is:
warned WARNING_SECONDS ahead (a drain with a deadline), then killed at the deadline; the
run's train.preemption_save_seconds is SAVE_SECONDS (the tiny model saves in well under a
second; the default is 60). Measured: the hold (from the just-in-time checkpoint the group
saves, as late as is safe, to the node's loss), seconds from the loss to the next step of
the group of 2, and the steps redone (none: it resumes from the just-in-time checkpoint).
Also the stall a checkpoint adds to a step. And the group starts a join sequence makes at
the reference's size (gpt-1.3b-moe128: [64, 128] GPUs, 128 micro-batches a step; 8 to 16
nodes of 8 GPUs joining one at a time), with Ray's elastic policy and with raymoe's, their
controller calls simulated (raymoe.train.scaling.group_starts), not run on a cluster.

Modelled: the share of an hour's work lost at a preemption rate and a checkpoint cadence.
Without a warning each preemption costs the measured restart plus the work since the last
checkpoint (half a cadence on average, preemptions falling at random times); with a warning
it costs the measured restart plus the hold, at most train.preemption_save_seconds plus two
steps whatever the cadence (modelled as --hold, default 60 s: the default
train.preemption_save_seconds, sized for AWS's two-minute spot warning; the two steps left
out). Each checkpoint of the cadence costs its stall either way:
    lost without a warning = rate x (restart + cadence / 2) + (checkpoints per hour x stall)
    lost with a warning    = rate x (restart + hold)        + (checkpoints per hour x stall)
over an hour.

    python bench/elastic.py [--rates 1 0.2] [--cadences 5 10 30] [--hold 60]
"""

from __future__ import annotations

import argparse
import logging
import os
import re
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
CHECKPOINT_EVERY = 10
WARNING_SECONDS = 30
"""Seconds between the warning and the node's loss (AWS: 120)."""
SAVE_SECONDS = 5
"""The run's train.preemption_save_seconds: the tiny model saves in well under a second (default 60)."""
RUN = ["model.seq_len=32", "model.d_model=32", "model.n_layer=2", "model.n_head=2",
       "train.global_batch=8", "train.micro_batch=2", "train.log_every=1", "train.eval_every=100000",
       f"train.checkpoint_every={CHECKPOINT_EVERY}", "optim.warmup_tokens=256", "parallel.num_workers=[2, 4]",
       "parallel.ep_size=4", "parallel.cpus_per_worker=1.5", "parallel.resize_check_seconds=5",
       "train.max_failures=3", "train.max_steps=100000", f"train.preemption_save_seconds={SAVE_SECONDS}"]
SAVED = re.compile(r"step (\d+): saved before the preemption \((-?\d+) s left\)")
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


def step_gaps(lines: list[dict], every: int) -> tuple[list[float], list[float]]:
    """Wall time of each step of the first group of 4, split into the steps that save a
    checkpoint and the others."""
    steps = [r for r in lines if "lm_loss" in r and r["workers"] == 4]
    saves: list[float] = []
    plain: list[float] = []
    for before, after in zip(steps, steps[1:], strict=False):
        if after["step"] != before["step"] + 1:
            break
        gap = after["time"] - before["time"]
        (saves if after["step"] % every == 0 else plain).append(gap)
    return saves, plain


def checkpoint_stall(lines: list[dict], every: int) -> float:
    """Mean extra wall time of a step that saves over one that does not (one group)."""
    saves, plain = step_gaps(lines, every)
    return max(statistics.median(saves) - statistics.median(plain), 0.0) if saves and plain else 0.0


def redone(lines: list[dict], after: float, lost_at: float) -> tuple[int, int]:
    """(The last step of the group of 4 that started after ``after``, the step the next
    group resumed from: the 'resumed_from' record each resume writes, the first after the
    loss at ``lost_at``). The group's ranks on the surviving node can still finish a step or
    a few after the raylet is killed, before the collective fails: counted as reached."""
    resume = next(r for r in lines if "resumed_from" in r and r["time"] > lost_at)
    reached = max(r["step"] for r in lines if "lm_loss" in r and r["workers"] == 4
                  and after < r["time"] < resume["time"])
    return reached, resume["step"]


def lost_share(rate: float, cadence_min: float, per_preemption_s: float, stall_s: float) -> float:
    """Share of an hour lost: ``per_preemption_s`` at ``rate`` an hour, and the stall of a
    checkpoint every ``cadence_min`` minutes."""
    per_hour = rate * per_preemption_s + (60 / cadence_min) * stall_s
    return min(per_hour / 3600, 1.0)


def lose_node(cluster: MultiNodeCluster, metrics: str, what: str) -> tuple[float, float]:
    """Kill worker node 1; when, and the seconds to the first step of the group of 2 after it."""
    lost_at = time.time()
    cluster.kill_raylet(1)
    wait_until(lambda: first_step_after(metrics, lost_at, 2) is not None, 600, what)
    shrunk = first_step_after(metrics, lost_at, 2)
    assert shrunk is not None
    return lost_at, shrunk["time"] - lost_at


def join_sequence_line() -> str:
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy
    from ray.train.v2.api.config import ScalingConfig

    from raymoe.config import load_config
    from raymoe.train.scaling import LayoutScalingPolicy, group_starts, trained_workers

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # a line per simulated decision
    cfg = load_config("gpt-1.3b-moe128")
    held = list(range(64, 129, 8))  # 8 to 16 nodes of 8 GPUs

    def scaling() -> ScalingConfig:
        return ScalingConfig(num_workers=(64, 128), use_gpu=True)

    ray_starts = group_starts(ElasticScalingPolicy(scaling()), held)
    ours = group_starts(LayoutScalingPolicy(scaling(), trained_workers(cfg), "bench"), held)
    return (f"elastic: nodes joining one at a time, 8 -> 16 x 8 GPUs (gpt-1.3b-moe128, simulated): "
            f"Ray's policy starts the group {len(ray_starts)} times {ray_starts}, raymoe's "
            f"{len(ours)} times {ours}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.2],
                        help="preemptions per hour to model")
    parser.add_argument("--cadences", type=float, nargs="+", default=[5.0, 10.0, 30.0],
                        help="checkpoint cadences (minutes) to model")
    parser.add_argument("--hold", type=float, default=60.0,
                        help="seconds from the just-in-time checkpoint to the node's loss to model "
                             "(default: train.preemption_save_seconds's default, for AWS's 2-minute warning)")
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
        log_path = root / "driver.log"
        log = open(log_path, "w")
        driver = subprocess.Popen([str(BIN / "raymoe"), "train", "tiny-moe8", f"data.path={data}",
                                   f"train.storage={root / 'runs'}", "train.run_name=elastic", *RUN,
                                   "--address", cluster.address], cwd=root,
                                  env=cluster.env(PYTHONUNBUFFERED="1"),  # its log, line by line
                                  stdout=log, stderr=subprocess.STDOUT)

        # -- a node lost without a warning
        wait_until(lambda: any(r.get("step", 0) >= 25 for r in read_metrics(metrics)), 600,
                   "25 steps of the group of 4")
        lost_at, restart = lose_node(cluster, metrics, "the first step of the group of 2")
        lines = read_metrics(metrics)
        _, plain = step_gaps(lines, CHECKPOINT_EVERY)
        step_s = statistics.median(plain)
        reached, resumed = redone(lines, 0.0, lost_at)
        before_kill = max(r["step"] for r in lines if "lm_loss" in r and r["workers"] == 4
                          and r["time"] < lost_at)
        redo = (reached - resumed) * step_s
        print(f"elastic: unwarned loss -> next step: {restart:.1f} s (4 -> 2 workers, EP 4 -> 2)")
        print(f"elastic: unwarned loss: {reached - resumed} steps redone (reached step {reached}, "
              f"resumed from step {resumed}; checkpoint every {CHECKPOINT_EVERY} steps; {reached - before_kill} "
              f"steps finished after the kill) = {redo:.1f} s at {step_s:.2f} s/step")

        # -- a node joins
        joined_at = time.time()
        cluster.add_worker(NODE_CPUS, memory_gib=2)
        wait_until(lambda: first_step_after(metrics, joined_at, 4) is not None, 600,
                   "the first step of the group of 4 again")
        grown = first_step_after(metrics, joined_at, 4)
        assert grown is not None
        print(f"elastic: node join -> first step of the larger group: {grown['time'] - joined_at:.1f} s "
              f"(node start included; resize check every 5 s)")
        print(join_sequence_line())

        # -- that node reclaimed as a spot node is: warned, then gone at the deadline
        wait_until(lambda: any(r.get("step", 0) >= grown["step"] + 5 and r.get("workers") == 4
                               and r["time"] > joined_at for r in read_metrics(metrics)), 600,
                   "5 steps of the group of 4 again")
        warned_at = time.time()
        cluster.warn_preemption(1, WARNING_SECONDS)
        wait_until(lambda: SAVED.search(log_path.read_text(errors="replace")), WARNING_SECONDS + 5,
                   "the just-in-time checkpoint", poll=0.2)
        saved = SAVED.search(log_path.read_text(errors="replace"))
        assert saved is not None
        time.sleep(max(0.0, warned_at + WARNING_SECONDS - time.time()))
        killed_at, restart_warned = lose_node(cluster, metrics,
                                              "the first step of the group of 2 after the warned loss")
        lines = read_metrics(metrics)
        reached_w, resumed_w = redone(lines, joined_at, killed_at)
        jit = next(r for r in lines if "lm_loss" in r and r["step"] == int(saved.group(1))
                   and r["workers"] == 4 and r["time"] > joined_at)
        hold = killed_at - jit["time"]
        print(f"elastic: warned loss -> next step: {restart_warned:.1f} s (warned {WARNING_SECONDS} s "
              f"ahead, killed at the deadline; 4 -> 2 workers, EP 4 -> 2)")
        print(f"elastic: warned loss: {reached_w - resumed_w} steps redone (reached step {reached_w}, "
              f"resumed from step {resumed_w}; the just-in-time checkpoint: step {saved.group(1)})")
        print(f"elastic: warned loss: hold {hold:.1f} s (from the just-in-time checkpoint to the node's "
              f"loss; {saved.group(2)} s left when the ranks agreed to save; "
              f"train.preemption_save_seconds={SAVE_SECONDS} + 2 steps of {step_s:.2f} s)")
        print(f"elastic: work lost per preemption here: {restart + redo:.1f} s without a warning "
              f"(restart + {reached - resumed} steps redone), {restart_warned + hold:.1f} s with "
              f"(restart + hold; checkpoints here every {CHECKPOINT_EVERY * step_s:.0f} s)")
        stall = checkpoint_stall(lines, every=CHECKPOINT_EVERY)
        print(f"elastic: checkpoint stall: {stall:.2f} s per checkpoint")

        # -- the model
        print(f"model: lost per preemption without a warning = {restart:.1f} s restart + half a cadence; "
              f"with = {restart_warned:.1f} s restart + {args.hold:g} s hold (the default "
              f"train.preemption_save_seconds, for AWS's 2-minute warning); each checkpoint "
              f"{stall:.2f} s")
        for rate in args.rates:
            for cadence in args.cadences:
                without = lost_share(rate, cadence, restart + cadence * 60 / 2, stall)
                warned = lost_share(rate, cadence, restart_warned + args.hold, stall)
                print(f"lost work at {rate:g} preemption/h, checkpoint every {cadence:g} min: "
                      f"{100 * without:.1f} % without a warning, {100 * warned:.1f} % with")
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
