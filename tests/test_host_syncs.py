"""Host syncs, counted on CPU: the counter itself, the MoE layer's forward and backward
against the issue's goals (at most 2 with dropping, 4 without), and the one host read
of train_step."""

from __future__ import annotations

import pytest
import torch

from raymoe.config import MoEConfig, load_config
from raymoe.host_syncs import count_host_syncs
from raymoe.model import GPT
from raymoe.model.moe import MoELayer
from raymoe.parallel import Mesh
from raymoe.train.optim import build_optimizer
from raymoe.train.step import train_step


def test_counter_sees_each_kind_of_sync_and_nothing_else():
    x = torch.randn(8)
    long_index = torch.tensor([0, 3])
    with count_host_syncs() as synced:
        x.tolist()
        int(x[0])
        x[x > 0]
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))
        torch.bincount(long_index)
        x.cpu()
    assert dict(synced.by_reason) == {"tolist": 1, "item": 1, "boolean mask index": 1,
                                      "repeat_interleave without output_size": 1,
                                      "bincount": 1, "cpu": 1}
    with count_host_syncs() as none:
        x[long_index]
        x.masked_fill(x > 0, 0.0)
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]), output_size=6)
        torch.zeros(4, dtype=torch.long).scatter_add_(0, long_index, torch.ones_like(long_index))
        torch.argsort(x, stable=True)
        x.to(torch.float64)
    assert none.total == 0, none


def layer_syncs(moe: MoEConfig) -> tuple[int, int]:
    """(forward, backward) syncs of one MoE layer in training mode."""
    torch.manual_seed(0)
    layer = MoELayer(16, 32, moe)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 64, 16, requires_grad=True)
    with count_host_syncs() as forward:
        y, stats = layer(x)
    assert float(stats.dropped_fraction) > 0 if moe.drop_tokens else float(stats.dropped_fraction) == 0
    with count_host_syncs() as backward:
        (y.square().mean() + stats.l_aux).backward()
    return forward.total, backward.total


@pytest.mark.parametrize("top_k,options", [(1, dict(use_rts=True)),
                                           (1, dict(use_rts=False, noisy_gate_policy="RSample")),
                                           (2, dict())])
def test_moe_layer_syncs_within_the_goals(top_k, options):
    moe = dict(num_experts=4, top_k=top_k, capacity_factor=0.5, min_capacity=1, **options)
    dropping = layer_syncs(MoEConfig(drop_tokens=True, **moe))
    no_drop = layer_syncs(MoEConfig(drop_tokens=False, **moe))
    variable = layer_syncs(MoEConfig(drop_tokens=True, fixed_capacity_exchange=False, **moe))
    assert dropping == (0, 0)  # the goal is at most 2: the fixed exchange needs none
    assert no_drop == (1, 0)  # the goal is at most 4: one read of the exchanged counts
    assert variable == (1, 0)


def test_a_training_step_reads_the_host_once():
    """One read for the step (losses, norm, finite check, MoE statistics, the values summed
    over ranks with them); per micro-batch, none per MoE layer (2 here) with dropping, one
    without. (The loop's whole step, reader and metrics included: test_loop.)"""
    for drop, per_moe_layer in ((True, 0), (False, 1)):
        cfg = load_config("tiny-moe8", ["model.seq_len=16", "model.n_layer=2", "model.d_model=32",
                                        "model.moe.every=1", f"model.moe.drop_tokens={str(drop).lower()}"])
        torch.manual_seed(0)
        model = GPT(cfg.model)
        optimizer = build_optimizer(model, cfg.optim)
        data = torch.randint(0, cfg.model.vocab_size, (3, 2, 17))
        batches = [(rows[:, :-1], rows[:, 1:]) for rows in data]
        with count_host_syncs(excluding=optimizer) as synced:
            result = train_step(model, optimizer, Mesh(1), batches, grad_clip=1.0, summed=[2.5])
        assert not result.skipped and result.grad_norm > 0 and result.summed == [2.5]
        assert synced.total == 1 + len(batches) * 2 * per_moe_layer, (drop, synced)
        assert [int(c.sum()) for c in result.tokens_per_expert] == [3 * 2 * 16] * 2
