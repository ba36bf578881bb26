"""The gate against DeepSpeed's own top1gating/top2gating, and its invariants."""

import math

import pytest
import torch

from raymoe.model.moe import expert_capacity, top1_gating, top2_gating

sharded_moe = pytest.importorskip("deepspeed.moe.sharded_moe", reason="deepspeed is a test extra")


def dense_combine(gate, num_experts: int, capacity: int) -> torch.Tensor:
    """Our index form expanded into DeepSpeed's [S, E, C] combine tensor (tests only)."""
    expert = gate.expert.reshape(gate.expert.shape[0], -1)
    slot = gate.slot.reshape(expert.shape)
    weight = gate.weight.reshape(expert.shape)
    out = torch.zeros(expert.shape[0], num_experts, capacity)
    for s in range(expert.shape[0]):
        for j in range(expert.shape[1]):
            if slot[s, j] >= 0:
                out[s, expert[s, j], slot[s, j]] += weight[s, j]
    return out


def skewed_logits(tokens: int, experts: int, seed: int) -> torch.Tensor:
    """Router logits where expert 0 is popular, so some experts overflow."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g)
    logits[:, 0] += 1.0
    return logits


@pytest.mark.parametrize("tokens,experts,factor", [(64, 8, 1.0), (100, 16, 1.5), (37, 4, 0.5)])
def test_top1_counts_l_aux_and_capacity_match_deepspeed(tokens, experts, factor):
    logits = skewed_logits(tokens, experts, seed=tokens)
    ours = top1_gating(logits, capacity_factor=factor, min_capacity=4, use_rts=False)
    l_aux, combine, _, exp_counts = sharded_moe.top1gating(logits, factor, 4, use_rts=False)
    assert torch.equal(ours.exp_counts, exp_counts)
    assert torch.allclose(ours.l_aux, l_aux, atol=1e-6)
    assert ours.capacity == combine.shape[2]
    # Which tokens an over-full expert keeps is left to torch.topk's ties in DeepSpeed;
    # compare the per-expert kept counts, and the whole tensor on experts that fit.
    ours_dense = dense_combine(ours, experts, ours.capacity)
    assert torch.equal((ours_dense > 0).sum(dim=(0, 2)), (combine > 0).sum(dim=(0, 2)))
    fits = exp_counts <= ours.capacity
    assert torch.allclose(ours_dense[:, fits], combine[:, fits], atol=1e-7)


def test_top1_without_dropping_matches_deepspeed_exactly():
    logits = skewed_logits(80, 8, seed=3)
    ours = top1_gating(logits, 1.0, 4, drop_tokens=False, use_rts=False)
    _, combine, _, _ = sharded_moe.top1gating(logits, 1.0, 4, drop_tokens=False, use_rts=False)
    assert ours.capacity is None  # no capacity without dropping: the dispatch sizes its buffer
    assert torch.allclose(dense_combine(ours, 8, combine.shape[2]), combine, atol=1e-7)
    assert bool(ours.kept.all())


@pytest.mark.parametrize("drop", [True, False])
def test_top2_matches_deepspeed_exactly(drop):
    logits = skewed_logits(96, 8, seed=5)
    ours = top2_gating(logits, 1.0, 4, drop_tokens=drop, second_expert_sampling=False)
    l_aux, combine, _, exp_counts = sharded_moe.top2gating(
        logits.clone(), 1.0, 4, drop_tokens=drop, top2_2nd_expert_sampling=False)
    assert torch.equal(ours.exp_counts, exp_counts)
    assert torch.allclose(ours.l_aux, l_aux, atol=1e-6)
    assert ours.capacity == (combine.shape[2] if drop else None)
    assert torch.allclose(dense_combine(ours, 8, combine.shape[2]), combine, atol=1e-6)


@pytest.mark.parametrize("use_rts", [True, False])
def test_no_expert_above_capacity_and_dropped_tokens_have_zero_weight(use_rts):
    logits = skewed_logits(200, 8, seed=11)
    gate = top1_gating(logits, capacity_factor=1.0, min_capacity=4, use_rts=use_rts)
    kept_per_expert = torch.bincount(gate.expert[gate.kept], minlength=8)
    assert int(kept_per_expert.max()) <= gate.capacity == math.ceil(200 / 8)
    assert int((~gate.kept).sum()) > 0, "the skewed router must overflow an expert"
    assert torch.all(gate.weight[~gate.kept] == 0)
    assert torch.all(gate.weight[gate.kept] > 0)
    # Slots of each expert are 0..kept-1 in token order.
    for e in range(8):
        slots = gate.slot[gate.kept & (gate.expert == e)]
        assert torch.equal(slots, torch.arange(slots.numel()))


def test_drop_tokens_false_drops_nothing():
    gate = top1_gating(skewed_logits(200, 8, seed=2), 0.25, 1, drop_tokens=False)
    assert bool(gate.kept.all()) and gate.capacity is None
    for e in range(8):  # every token of an expert has its own slot
        assert sorted(gate.slot[gate.expert == e].tolist()) == list(range(int(gate.exp_counts[e])))


def test_l_aux_equals_the_formula_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 3.0, 0.0], [0.5, 0.0, 0.0]])
    gate = top1_gating(logits, 1.0, 4, use_rts=False)
    probs = torch.softmax(logits, dim=1)
    fraction = torch.tensor([2 / 4, 2 / 4, 0.0])  # experts chosen: 0, 1, 1, 0
    expected = 3 * sum(probs[:, e].mean() * fraction[e] for e in range(3))
    assert torch.allclose(gate.l_aux, expected)
    assert gate.exp_counts.tolist() == [2, 2, 0]


def test_rts_keeps_exactly_capacity_tokens_at_random():
    logits = torch.zeros(64, 4)
    logits[:, 2] = 1.0  # every token wants expert 2; capacity is max(ceil(64/4), 4) = 16
    kept_sets = set()
    for seed in range(5):
        gate = top1_gating(logits, 1.0, 4, use_rts=True,
                           generator=torch.Generator().manual_seed(seed))
        assert int(gate.kept.sum()) == gate.capacity == 16
        kept_sets.add(tuple(torch.nonzero(gate.kept).flatten().tolist()))
    assert len(kept_sets) == 5, "different seeds must keep different random subsets"
    first = top1_gating(logits, 1.0, 4, use_rts=False)
    assert torch.nonzero(first.kept).flatten().tolist() == list(range(16))


def test_rsample_noise_changes_choices_but_not_gates():
    logits = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    plain = top1_gating(logits, 2.0, 4, use_rts=False)
    noisy = top1_gating(logits, 2.0, 4, use_rts=False, noisy_gate_policy="RSample",
                        generator=torch.Generator().manual_seed(1))
    assert not torch.equal(plain.expert, noisy.expert)
    chosen = torch.softmax(logits, 1).gather(1, noisy.expert[:, None]).squeeze(1)
    assert torch.allclose(noisy.weight[noisy.kept], chosen[noisy.kept])


def test_capacity_formula():
    assert expert_capacity(8192, 128, 1.0, 4) == 64
    assert expert_capacity(10, 128, 1.0, 4) == 4
    assert expert_capacity(100, 8, 1.5, 4) == math.ceil(100 / 8 * 1.5)
