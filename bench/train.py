"""Training throughput on 2 CPU workers.

1. Ray overhead: the tiny MoE GPT trained through Ray Train (2 workers) against the same
   loop launched by torchrun (2 processes), same steps; wall-clock tokens/s between the
   first and the last logged step (a report every 10 steps, as the presets log). Goal >= 0.95.
2. Table 2 at small scale: samples/s of tiny-moe8 against a dense GPT of about 5x its
   active parameters, same data and steps, both on Ray Train.
3. train.precision: wall-clock tokens/s of the study's models (jobs/configs/study-tiny.yaml)
   in fp32 and in bf16 autocast, one process of one thread (a worker's share), and their
   ratio; ``auto`` picks the faster where the CPU has native bf16 (raymoe.model.precision).

    python bench/train.py [--steps 60] [--precision-only]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import ray  # noqa: E402
import torch  # noqa: E402

from raymoe.config import config_from_dict, load_config  # noqa: E402
from raymoe.data.prepare import PrepareOptions, prepare  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.runs import read_metrics  # noqa: E402
from raymoe.train.launcher import train_on_ray  # noqa: E402


def wall_tokens_per_s(metrics: Path, skip: int = 9, until: int | None = None) -> float:
    """Tokens/s of wall time between the records of steps (skip, until]."""
    lines = [r for r in read_metrics(str(metrics))
             if "lm_loss" in r and r["step"] > skip and (until is None or r["step"] <= until)]
    first, last = lines[0], lines[-1]
    return (last["tokens"] - first["tokens"]) / (last["time"] - first["time"])


def median_samples_per_s(metrics: Path, skip: int = 9) -> float:
    return statistics.median(r["samples_per_s"] for r in read_metrics(str(metrics))
                             if "lm_loss" in r and r["step"] > skip)


def torchrun_worker(config_json: str, address: str) -> None:
    import torch.distributed as dist

    from raymoe.train.loop import FileHooks, Trainer

    ray.init(address=address, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    torch.set_num_threads(1)  # as Ray Train gives its workers
    dist.init_process_group("gloo")
    cfg = config_from_dict(json.loads(config_json))
    run_dir = Path(cfg.train.storage) / cfg.train.run_name
    Trainer(cfg, FileHooks(run_dir, cfg.train.keep_checkpoints, dist.get_rank()),
            torch.device("cpu"), metrics_uri=run_dir / "metrics", log=lambda _: None).run()
    dist.destroy_process_group()


def dense_of_5x_active(moe_cfg) -> list[str]:
    """Overrides giving a dense GPT with about 5x the MoE model's active parameters."""
    target = 5 * GPT_active(moe_cfg)
    best = min(range(128, 1024, 32), key=lambda d: abs(GPT_active(load_config(
        "tiny", [f"model.d_model={d}"])) - target))
    return [f"model.d_model={best}"]


def GPT_active(cfg) -> int:  # noqa: N802
    with torch.device("meta"):
        return GPT(cfg.model).num_parameters(active_only=True)


STUDY_MODELS = {"dense-base": ("tiny", []),
                "base-moe16": ("tiny-moe8", ["model.moe.num_experts=16"]),
                "dense-4x": ("tiny", ["model.d_model=256", "model.n_layer=5"])}


def one_process_tokens_per_s(preset: str, overrides: list[str]) -> float:
    """The training loop in this process alone (no process group), as a worker runs it."""
    from raymoe.train.loop import FileHooks, Trainer

    cfg = load_config(preset, [*overrides, "parallel.num_workers=1"])
    run_dir = Path(cfg.train.storage) / cfg.train.run_name
    Trainer(cfg, FileHooks(run_dir, cfg.train.keep_checkpoints, 0), torch.device("cpu"),
            metrics_uri=run_dir / "metrics", log=lambda _: None).run()
    return wall_tokens_per_s(run_dir / "metrics")


def precision_rows(common: list[str], steps: int) -> list[str]:
    """Part 3."""
    torch.set_num_threads(1)  # as Ray Train gives its workers
    tiny = load_config("tiny")
    rows = [f"one process, one thread, {steps} steps, global batch {tiny.train.global_batch} x "
            f"{tiny.model.seq_len} tokens"]
    for name, (preset, overrides) in STUDY_MODELS.items():
        rates = {p: one_process_tokens_per_s(preset, [*common, *overrides, f"train.precision={p}",
                                                      f"train.run_name={name}-{p}"])
                 for p in ("fp32", "bf16")}
        rows.append(f"{name} ({' '.join([preset, *overrides])}): fp32 {rates['fp32']:,.0f} tokens/s   "
                    f"bf16 {rates['bf16']:,.0f} tokens/s   bf16 / fp32 = {rates['bf16'] / rates['fp32']:.2f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--torchrun-worker", nargs=2, metavar=("CONFIG_JSON", "ADDRESS"))
    parser.add_argument("--precision-only", action="store_true", help="only part 3")
    args = parser.parse_args()
    if args.torchrun_worker:
        torchrun_worker(*args.torchrun_worker)
        return
    context = ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/data"
        prepare(PrepareOptions([str(REPO / "raymoe" / "sample" / "corpus")], data, tokenizer="bytes",
                               seq_len=128, val_fraction=0.05, doc_chars=8000,
                               shard_bytes=256 * 2**10),
                log=lambda _: None)
        common = [f"data.path={data}", f"train.storage={tmp}", f"train.max_steps={args.steps}",
                  "train.log_every=10", "train.checkpoint_every=1000", "train.eval_every=100000"]
        rows = [] if args.precision_only else ray_rows(common, tmp, args.steps, context.address_info["address"])
        rows += precision_rows(common, args.steps)
    print("\n".join(rows))
    ray.shutdown()


def ray_rows(common: list[str], tmp: str, steps: int, address: str) -> list[str]:
    """Parts 1 and 2."""

    def run_ray(name: str, *extra: str) -> Path:
        train_on_ray(load_config("tiny-moe8" if "dense" not in name else "tiny",
                                 [*common, f"train.run_name={name}", *extra]))
        return Path(tmp) / name / "metrics"

    ray_rate = wall_tokens_per_s(run_ray("ray"))
    cfg = load_config("tiny-moe8", [*common, "train.run_name=torchrun"])
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", __file__, "--torchrun-worker",
                    json.dumps(cfg.to_dict()), address],
                   check=True, cwd=REPO)
    torchrun_rate = wall_tokens_per_s(Path(tmp) / "torchrun" / "metrics")
    moe_cfg = load_config("tiny-moe8")
    dense_overrides = dense_of_5x_active(moe_cfg)
    dense_cfg = load_config("tiny", dense_overrides)
    moe_rate = median_samples_per_s(run_ray("moe-table2"))
    dense_rate = median_samples_per_s(run_ray("dense-table2", *dense_overrides))
    return [f"tiny-moe8, 2 CPU workers (gloo), {steps} steps, global batch "
            f"{moe_cfg.train.global_batch} x {moe_cfg.model.seq_len} tokens",
            f"Ray Train: {ray_rate:,.0f} tokens/s   torchrun: {torchrun_rate:,.0f} tokens/s   "
            f"Ray / torchrun = {ray_rate / torchrun_rate:.3f}",
            f"tiny-moe8 ({GPT_active(moe_cfg):,} active of {GPT(moe_cfg.model).num_parameters():,}) "
            f"{moe_rate:.1f} samples/s; dense {dense_overrides[0]} ({GPT_active(dense_cfg):,}, "
            f"{GPT_active(dense_cfg) / GPT_active(moe_cfg):.1f}x active) {dense_rate:.1f} samples/s; "
            f"MoE / dense = {moe_rate / dense_rate:.2f}x"]


if __name__ == "__main__":
    main()
