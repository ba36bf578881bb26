"""The per-worker loop in one process (no Ray Train): non-finite steps are skipped, then
stopped with the layer named, keeping the last good checkpoint; plain-file checkpoints;
the host syncs of a whole step; train.precision=bf16 reaches training and validation."""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from one_process import StepCounts
from test_train import config

from raymoe.host_syncs import count_host_syncs
from raymoe.model import precision
from raymoe.model.moe import Router
from raymoe.runs import latest_checkpoint, step_directory
from raymoe.train.loop import FileHooks, NonFiniteLossError, Trainer


def make_trainer(cfg, run_dir, log=None) -> Trainer:
    return Trainer(cfg, FileHooks(run_dir, keep=2, rank=0), torch.device("cpu"),
                   metrics_uri=run_dir / "metrics", log=log or (lambda _: None))


def test_non_finite_steps_are_skipped_then_stop_naming_the_layer(dataset, tmp_path):
    cfg = config(dataset, str(tmp_path), "nan", "parallel.num_workers=1", "train.max_steps=2",
                 "train.checkpoint_every=2", "train.nan_tolerance=3")
    run_dir = tmp_path / "nan"
    assert make_trainer(cfg, run_dir).run().step == 2
    good = latest_checkpoint(str(run_dir))
    assert good == str(step_directory(run_dir, 2))

    cfg.train.max_steps = 10
    lines: list[str] = []
    trainer = make_trainer(cfg, run_dir, lines.append)
    assert trainer.step == 2  # resumed
    router = trainer.model.blocks[1].mlp.router.weight
    with torch.no_grad():
        router[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(NonFiniteLossError, match=r"stopping at step 5: 3 consecutive steps .*"
                                                 r"MoE layer 0 \(blocks\.1\) l_aux is not finite"):
        trainer.run()
    assert sum("skipped, not finite" in line for line in lines) == 3
    for name, param in trainer.model.named_parameters():  # skipped steps changed nothing
        assert torch.equal(param, before[name]) or name == "blocks.1.mlp.router.weight", name
    assert latest_checkpoint(str(run_dir)) == good


def test_file_hooks_keep_the_last_k_checkpoints(dataset, tmp_path):
    cfg = config(dataset, str(tmp_path), "keep", "parallel.num_workers=1", "train.max_steps=6",
                 "train.checkpoint_every=1", "train.eval_every=3")
    summary = make_trainer(cfg, tmp_path / "keep").run()
    assert summary.step == 6 and math.isfinite(summary.validation_loss)
    assert sorted(p.name for p in (tmp_path / "keep").glob("step-*")) == ["step-00000005", "step-00000006"]


def test_a_step_that_does_not_log_reads_the_host_once(dataset, tmp_path):
    """The loop's whole step on CPU, counted by raymoe.host_syncs: the reader's two
    micro-batches, their copy to the device, the checkpoint cadence (by minutes too), the
    step and the metrics writer. One host read, the step's own (it was 6: a token-id check
    and a copy per micro-batch, and the cadence's all-reduce). Steps 2 to 4 neither log,
    validate nor save; step 5, the last, does all three."""
    cfg = config(dataset, str(tmp_path), "syncs", "parallel.num_workers=1", "train.max_steps=5",
                 "train.log_every=100", "train.eval_every=100", "train.checkpoint_every=100",
                 "train.checkpoint_every_minutes=30")
    hooks = StepCounts(tmp_path / "syncs")
    trainer = Trainer(cfg, hooks, torch.device("cpu"), metrics_uri=tmp_path / "syncs" / "metrics",
                      log=lambda _: None)
    assert trainer.accumulation == 2
    with count_host_syncs(excluding=trainer.optimizer) as synced:
        hooks.count = lambda: synced.total
        trainer.run()
    assert [hooks.per_step()[step] for step in (2, 3, 4)] == [1, 1, 1], synced
    assert hooks.saved() == [5]


def test_bf16_precision_reaches_training_and_validation(dataset, tmp_path):
    cfg = config(dataset, str(tmp_path), "bf16", "parallel.num_workers=1", "train.max_steps=2",
                 "train.eval_every=2", "train.eval_batches=1", "train.precision=bf16")
    with mock.patch.object(precision, "cpu_has_native_bf16", return_value=True):  # any CPU computes it
        trainer = make_trainer(cfg, tmp_path / "bf16")
    seen: set[tuple[str, bool, torch.dtype]] = set()
    trainer.model.blocks[0].attn.qkv.register_forward_hook(
        lambda m, _i, out: seen.add(("attention", m.training, out.dtype)))
    for router in (m for m in trainer.model.modules() if isinstance(m, Router)):
        router.register_forward_hook(lambda m, _i, out: seen.add(("router", m.training, out.dtype)))
    assert math.isfinite(trainer.run().validation_loss)
    assert seen == {(module, training, dtype) for training in (True, False)
                    for module, dtype in (("attention", torch.bfloat16), ("router", torch.float32))}
