"""The checkpoint cadence: by steps and by minutes; ranks whose clocks disagree checkpoint
at the same step with no collective of the cadence's own (the step's all-reduce carries
their clocks); a resumed run counts the minutes from when its checkpoint was saved."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist
from multiproc import run_distributed
from one_process import StepCounts
from test_train import config

import raymoe.train.loop as loop
from raymoe.config import load_config
from raymoe.runs import MANIFEST, step_directory
from raymoe.train.cadence import CheckpointCadence
from raymoe.train.loop import Trainer

COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
               "all_to_all_single", "barrier", "all_gather_object", "broadcast_object_list")


def test_checkpoints_come_by_steps_and_by_minutes():
    now = [1000.0]
    cfg = load_config("tiny-moe8", ["train.checkpoint_every=5", "train.checkpoint_every_minutes=2"]).train
    cadence = CheckpointCadence(cfg, clock=lambda: now[0])
    now[0] += 60
    assert cadence.elapsed() == 60
    assert [cadence.due(step, 60.0) for step in (1, 2, 5)] == [False, False, True]
    assert cadence.due(6, 120.0)
    assert cadence.restart() == 1060.0 and cadence.elapsed() == 0
    assert CheckpointCadence(cfg, saved_at=940.0, clock=lambda: now[0]).elapsed() == 120
    assert not CheckpointCadence(load_config("tiny-moe8").train).due(99, 1e9)  # by steps only


def _train_with_a_clock_of_its_own(rank: int, world: int, cfg, run_dir) -> tuple[list[int], dict[int, int]]:
    """This rank's checkpoint steps, and per step the collectives called outside
    train_step. Rank 0's clock gains 60 s a step, rank 1's 90 s."""
    outside = [0]
    inside = [False]

    def counted(collective):
        def call(*args, **kwargs):
            outside[0] += not inside[0]
            return collective(*args, **kwargs)
        return call

    train_step = loop.train_step

    def step(*args, **kwargs):
        inside[0] = True
        try:
            return train_step(*args, **kwargs)
        finally:
            inside[0] = False

    for name in COLLECTIVES:
        setattr(dist, name, counted(getattr(dist, name)))
    loop.train_step = step
    hooks = StepCounts(run_dir, rank)
    trainer = Trainer(cfg, hooks, torch.device("cpu"), log=lambda _: None)
    trainer.cadence = CheckpointCadence(cfg.train, saved_at=0.0, clock=lambda: trainer.step * (60 + 30 * rank))
    outside[0] = 0  # from the first step on
    hooks.count = lambda: outside[0]
    trainer.run()
    return hooks.saved(), hooks.per_step()


def test_ranks_agree_on_the_checkpoint_step_without_a_collective_of_their_own(dataset, tmp_path):
    """Every 2.5 minutes: by its own clock rank 0 would first checkpoint after step 4, rank
    1 after step 3 (a step's time is taken at its start). They agree on the mean of their
    clocks, 75 s a step: steps 3 and 6, then 7, the last. The steps between call no
    collective besides train_step's (which carries the clocks); a checkpoint calls some."""
    cfg = config(dataset, str(tmp_path), "cadence", "train.max_steps=7", "train.log_every=100",
                 "train.eval_every=100", "train.checkpoint_every=1000", "train.checkpoint_every_minutes=2.5")
    results = run_distributed(_train_with_a_clock_of_its_own, 2, tmp_path, cfg, tmp_path / "cadence")
    for saved, outside in results:
        assert saved == [3, 6, 7]
        assert [outside[step] for step in (1, 2, 4, 5)] == [0, 0, 0, 0]
        assert outside[3] > 0 and outside[6] > 0  # the counting sees the checkpoints' collectives


def test_a_resumed_run_counts_the_minutes_from_its_checkpoint(dataset, tmp_path):
    """A checkpoint saved an hour ago (its stored time moved back) is overdue at a 30-minute
    cadence: the resumed run checkpoints after its first step, and then not before its end."""
    cfg = config(dataset, str(tmp_path), "resumed", "parallel.num_workers=1", "train.max_steps=2",
                 "train.log_every=100", "train.eval_every=100", "train.checkpoint_every=1000",
                 "train.checkpoint_every_minutes=30")
    run_dir = tmp_path / "resumed"
    Trainer(cfg, StepCounts(run_dir), torch.device("cpu"), log=lambda _: None).run()
    manifest_file = step_directory(run_dir, 2) / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["extra"]["saved_at"] -= 3600
    manifest_file.write_text(json.dumps(manifest))

    cfg.train.max_steps = 5
    hooks = StepCounts(run_dir)
    trainer = Trainer(cfg, hooks, torch.device("cpu"), log=lambda _: None)
    assert trainer.step == 2  # resumed
    trainer.run()
    assert hooks.saved() == [3, 5]
