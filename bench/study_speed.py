"""Training speed of study-small's models: raymoe's trainer against a bare PyTorch loop.

For the base (dense-1x) and the base + 32 experts (base-moe32), at the study's batch (one
micro-batch of 16 x 128 tokens a step), on this machine's 2 cores:
- a bare loop (forward, backward, clipping, AdamW; the batches already in memory as
  tensors) in fp32, in bf16 autocast and compiled (torch.compile), 2 threads;
- raymoe's trainer on one Ray worker of 2 CPUs (fp32 and bf16) and on 2 workers of 1 CPU
  (the MoE model also at EP 2), over the same sequences (the study's prepared data, its first shard in order);
and the ratios: trainer / bare loop (goal >= 0.9 on one worker), 2 workers / one (goal
>= 1.0), bf16 / fp32, compiled / eager. Wall-clock tokens/s after the first logged steps
(and, for raymoe, before the last, which also writes the final checkpoint).

    python bench/study_speed.py [--steps 150] [--data runs/gutenberg/train]
(`make study` prepares the data.)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from train import wall_tokens_per_s  # noqa: E402

from raymoe.config import Config, load_config  # noqa: E402
from raymoe.data.shards import PreparedDataset  # noqa: E402
from raymoe.model import GPT  # noqa: E402
from raymoe.model.precision import autocast_to  # noqa: E402
from raymoe.study.spec import load_study  # noqa: E402
from raymoe.train.launcher import train_on_ray  # noqa: E402
from raymoe.train.optim import build_optimizer  # noqa: E402

MODELS = ("dense-1x", "base-moe32")
WARMUP_STEPS = 10
"""Steps left out of every rate (allocation, the first compilation, the first reads)."""


def study_config(model: str, overrides: list[str]) -> Config:
    study = load_study(str(REPO / "jobs" / "configs" / "study-small.yaml"))
    trial = next(t for t in study.trials() if t["model"] == model)
    keep = [o for o in trial["overrides"] if not o.startswith(("train.storage", "train.run_name",
                                                               "data.extra_validation"))]
    return load_config(trial["config"], [*keep, *overrides])


def first_sequences(data: str, count: int) -> torch.Tensor:
    """The first ``count`` sequences of the dataset's first training shard, in order."""
    dataset = PreparedDataset.open(data)
    shard = dataset.open_shard(dataset.shards("train")[0])
    rows: list[np.ndarray] = []
    group = 0
    while sum(len(r) for r in rows) < count:
        rows.append(shard.read_row_group(group))
        group += 1
    shard.close()
    return torch.from_numpy(np.concatenate(rows)[:count].astype(np.int64))


def bare_loop(cfg: Config, batches: torch.Tensor, dtype: torch.dtype | None, compiled: bool) -> float:
    """Tokens/s of plain PyTorch over ``batches`` ([steps, batch, seq + 1])."""
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    forward: Callable = torch.compile(model) if compiled else model
    device = torch.device("cpu")
    start = 0.0
    for step, batch in enumerate(batches):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        with autocast_to(device, dtype):
            loss = forward(batch[:, :-1], batch[:, 1:]).loss
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
    tokens = (len(batches) - WARMUP_STEPS) * batches.shape[1] * (batches.shape[2] - 1)
    return tokens / (time.perf_counter() - start)


def trainer(cfg_of: Callable[[list[str]], Config], tmp: str, name: str, overrides: list[str]) -> float:
    """Wall tokens/s of raymoe's trainer on Ray (metrics every 10 steps, no evaluation),
    up to the record before the last step's: the last step also writes the run's final
    checkpoint, which a bare loop does not (about 0.4 s here, 3% of the run)."""
    cfg = cfg_of([f"train.storage={tmp}", f"train.run_name={name}", *overrides])
    result = train_on_ray(cfg)
    if result.error is not None:
        raise result.error
    return wall_tokens_per_s(Path(tmp) / name / "metrics", skip=WARMUP_STEPS - 1,
                             until=cfg.train.max_steps - 1)


def model_rows(model: str, data: str, steps: int, tmp: str) -> list[str]:
    common = [f"data.path={data}", f"train.max_steps={steps}", "train.log_every=10",
              "train.eval_every=1000000", "train.checkpoint_every=1000000"]

    def cfg_of(extra: list[str]) -> Config:
        return study_config(model, [*common, *extra])

    cfg = cfg_of([])
    batch = cfg.train.global_batch
    batches = first_sequences(data, steps * batch).view(steps, batch, -1)
    torch.set_num_threads(2)
    bare = {"fp32": bare_loop(cfg, batches, None, False), "bf16": bare_loop(cfg, batches, torch.bfloat16, False)}
    try:
        rate = bare_loop(cfg, batches, None, True)
        compiled, compiled_ratio = f"{rate:,.0f}", f"{rate / bare['fp32']:.2f}"
    except Exception as err:  # noqa: BLE001 - the bench reports what compile could not do
        compiled, compiled_ratio = f"failed ({type(err).__name__})", "-"
    one = {p: trainer(cfg_of, tmp, f"{model}-1w-{p}", ["parallel.num_workers=1", "parallel.cpus_per_worker=2",
                                                       f"train.precision={p}"])
           for p in ("fp32", "bf16")}
    on_two = ["parallel.num_workers=2", "parallel.cpus_per_worker=1", "train.micro_batch=8", "train.precision=fp32"]
    two = trainer(cfg_of, tmp, f"{model}-2w", on_two)
    # a MoE model also at EP 2: each worker holds and all-reduces half the experts
    ep2 = trainer(cfg_of, tmp, f"{model}-2w-ep2", [*on_two, "parallel.ep_size=2"]) if cfg.model.moe.enabled else None
    return [
        f"{model}: bare loop fp32 {bare['fp32']:,.0f} tokens/s, bf16 {bare['bf16']:,.0f}, compiled {compiled}",
        f"{model}: raymoe 1 worker fp32 {one['fp32']:,.0f} tokens/s, bf16 {one['bf16']:,.0f}; "
        f"2 workers fp32 {two:,.0f}" + (f", at EP 2 {ep2:,.0f}" if ep2 else ""),
        f"{model}: raymoe 1 worker / bare loop (fp32) = {one['fp32'] / bare['fp32']:.2f}   "
        f"(bf16) = {one['bf16'] / bare['bf16']:.2f}   2 workers / 1 worker = {two / one['fp32']:.2f}"
        + (f" (EP 2: {ep2 / one['fp32']:.2f})" if ep2 else "") + "   "
        f"bf16 / fp32: bare {bare['bf16'] / bare['fp32']:.2f}, raymoe {one['bf16'] / one['fp32']:.2f}   "
        f"compiled / eager (bare) = {compiled_ratio}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--data", default=str(REPO / "runs" / "gutenberg" / "train"))
    args = parser.parse_args()
    if not (Path(args.data) / "manifest.json").is_file() and not args.data.startswith("s3://"):
        sys.exit(f"bench/study_speed.py: no prepared dataset at {args.data}: run `make study` "
                 "first, or pass --data")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = [f"{os.cpu_count()} cores, {args.steps} steps of 16 x 128 tokens (the first "
            f"{WARMUP_STEPS} left out), study-small's models"]
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODELS:
            rows += model_rows(model, args.data, args.steps, tmp)
    print("\n".join(rows))
    ray.shutdown()


if __name__ == "__main__":
    main()
