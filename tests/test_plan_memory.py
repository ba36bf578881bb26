"""The planner against measurement: the allocator's peak in real CPU training steps
(1, 2 and 4 gloo ranks, dense and MoE, checkpointing on and off, shard none and fsdp) and
torch's MemTracker under FakeTensorMode at a reference shape. The CPU profile is the same
model as the GPU ones with fp32 compute and no CUDA overhead (raymoe.plan.estimate_memory)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from memory_measure import measured_step_peak
from multiproc import run_distributed

from raymoe.config import load_config
from raymoe.plan import estimate_memory

TOLERANCE = 0.15
BOOK = Path(__file__).resolve().parents[1] / "raymoe" / "sample" / "corpus" / "Pride_and_Prejudice.txt"
SMALL = ["model.d_model=128", "model.n_layer=2", "model.seq_len=128", "train.micro_batch=8"]


def _batches(cfg, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches of one step: bytes of a bundled book (byte vocabulary)."""
    b, s = cfg.train.micro_batch, cfg.model.seq_len
    count = cfg.train.global_batch // (b * cfg.parallel.num_workers)
    need = count * b * (s + 1)
    data = torch.frombuffer(bytearray(BOOK.read_bytes()[rank * need:(rank + 1) * need]), dtype=torch.uint8)
    rows = data.to(torch.int64).view(count, b, s + 1)
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def _compare(name: str, overrides: list[str], rank: int = 0) -> tuple[str, float, float]:
    cfg = load_config(name, SMALL + overrides)
    measured = measured_step_peak(cfg, _batches(cfg, rank))
    return " ".join([name, *overrides]), estimate_memory(cfg, "cpu").peak, measured


def _assert_close(results: list[tuple[str, float, float]]) -> None:
    lines = [f"{label}: predicted {p / 1e6:.1f} MB, measured {m / 1e6:.1f} MB ({p / m - 1:+.1%})"
             for label, p, m in results]
    print("\n".join(lines))
    for line, (_, predicted, measured) in zip(lines, results, strict=True):
        assert abs(predicted / measured - 1) <= TOLERANCE, line


ONE_RANK = [
    ("tiny", ["parallel.num_workers=1", "train.global_batch=16", "model.n_layer=4"]),
    ("tiny", ["parallel.num_workers=1", "train.global_batch=8", "model.activation_checkpointing=true"]),
    ("tiny-moe8", ["parallel.num_workers=1", "train.global_batch=8"]),
    ("tiny-moe8", ["parallel.num_workers=1", "train.global_batch=8", "model.activation_checkpointing=true",
                   "model.moe.top_k=2"]),
]


def test_planner_matches_the_measured_peak_of_one_rank_steps():
    torch.set_num_threads(1)
    _assert_close([_compare(name, overrides) for name, overrides in ONE_RANK])


MULTI_RANK = [
    ("tiny-moe8", ["parallel.num_workers=4", "parallel.ep_size=4", "train.global_batch=32",
                   "model.activation_checkpointing=true"]),
    ("tiny-moe8", ["parallel.num_workers=4", "parallel.ep_size=2", "train.global_batch=32"]),
    ("tiny", ["parallel.num_workers=4", "train.global_batch=32"]),
    # states outweigh activations: the peak is the gradient all-reduce's flat copy
    ("tiny", ["parallel.num_workers=4", "train.global_batch=4", "train.micro_batch=1", "model.seq_len=32"]),
    # two micro-batches: the unsharded gradients held until the last one's reduce-scatter
    ("tiny-moe8", ["parallel.num_workers=4", "parallel.ep_size=2", "parallel.shard=fsdp",
                   "train.global_batch=64"]),
]
"""Four ranks (the layouts of world 2 repeat on each replica of these)."""


def _measure_on_rank(rank: int, _world: int) -> list[tuple[str, float, float]]:
    return [_compare(name, overrides, rank) for name, overrides in MULTI_RANK]


@pytest.mark.slow
def test_planner_matches_the_measured_peak_on_every_rank(tmp_path):
    results = run_distributed(_measure_on_rank, 4, tmp_path)
    _assert_close([(f"rank {r}: {label}", p, m) for r, rows in enumerate(results) for label, p, m in rows])


def _fake_step_peak(cfg) -> float:
    """MemTracker's peak of the second training step, every tensor fake (no memory).

    The step is train_step's tensor work without its host reads (FakeTensorMode has no
    values to read). MoE layers read routing counts on the host, which FakeTensorMode
    cannot give, so only dense models are tracked this way.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from raymoe.model import GPT
    from raymoe.parallel import Mesh
    from raymoe.parallel.grads import global_grad_norm, scale_gradients
    from raymoe.train.optim import build_optimizer

    def step(model, optimizer, batches) -> None:
        for inputs, targets in batches:
            (model(inputs, targets).loss / len(batches)).backward()
        scale_gradients(model, cfg.optim.grad_clip, global_grad_norm(model, Mesh()))
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)

    with FakeTensorMode():
        model = GPT(cfg.model)
        optimizer = build_optimizer(model, cfg.optim)
        ids = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.model.seq_len + 1))
        batches = [(ids[:, :-1], ids[:, 1:])]
        step(model, optimizer, batches)  # gradients and AdamW states exist from here on
        tracker = MemTracker()
        tracker.track_external(model, optimizer)
        with tracker:
            step(model, optimizer, batches)
        peak = tracker.get_tracker_snapshot("peak")
    return next(iter(peak.values()))["Total"]


@pytest.mark.slow
def test_planner_matches_memtracker_at_a_reference_shape():
    """gpt-1.3b's layer shapes (width 2,048, 2,048 tokens, the GPT-2 vocabulary's logits) at a
    quarter of its depth: the tracker's time grows with the number of ops, the planner's
    per-layer terms are the same at any depth."""
    cfg = load_config("gpt-1.3b", ["parallel.num_workers=1", "train.global_batch=1", "train.micro_batch=1",
                                  "model.n_layer=6"])
    _assert_close([("gpt-1.3b, 6 of its 24 layers, micro-batch 1 (FakeTensorMode)",
                    estimate_memory(cfg, "cpu").peak, _fake_step_peak(cfg))])
