"""Top-1 and top-2 gating with DeepSpeed's semantics, computed on indices.

DeepSpeed builds one-hot [tokens, experts] masks and a [tokens, experts, capacity] combine
tensor. Here every decision is a per-token integer (expert, slot) found by sorting, so the
cost has no experts x capacity term. What is computed (capacity, exp_counts, l_aux, which
tokens are kept, combine weights) follows deepspeed/moe/sharded_moe.py; the README's "The gate" section states them.

Nothing here waits for the device: counts are scatter-adds into a known number of bins
(CUDA's bincount reads the input's min and max on the host), and with dropping the
capacity is a function of shapes. Without dropping every token is kept and no capacity
is needed here; the dispatch sizes its buffers from the counts it exchanges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class GateOutput:
    """Routing decisions for S tokens: shapes (S,) for top-1, (S, 2) for top-2."""

    expert: Tensor
    """Chosen expert id, int64."""
    slot: Tensor
    """Position in the expert's capacity buffer, -1 when the token is dropped."""
    weight: Tensor
    """Combine weight (0 for a dropped token); carries the router's gradient."""
    l_aux: Tensor
    """Load-balancing loss, scalar."""
    exp_counts: Tensor
    """Tokens routed to each expert before dropping, (E,) int64."""
    capacity: int | None
    """Slots per expert; None without dropping (every token is kept)."""

    @property
    def kept(self) -> Tensor:
        return self.slot >= 0


def expert_capacity(num_tokens: int, num_experts: int, capacity_factor: float,
                    min_capacity: int) -> int:
    """DeepSpeed's capacity: max(ceil(tokens / experts * factor), min_capacity)."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor), min_capacity)


def count_per_expert(expert: Tensor, num_bins: int) -> Tensor:
    """How many entries hold each value in [0, num_bins), int64, without a host sync."""
    counts = torch.zeros(num_bins, dtype=torch.int64, device=expert.device)
    return counts.scatter_add_(0, expert.reshape(-1), torch.ones_like(expert).reshape(-1))


def position_in_expert(expert: Tensor, num_experts: int) -> Tensor:
    """For each entry, how many earlier entries chose the same expert (stable, by sorting).

    Entries with expert == num_experts form an extra bucket, used for "not counted".
    """
    order = torch.argsort(expert, stable=True)
    counts = count_per_expert(expert, num_experts + 1)
    starts = torch.cumsum(counts, 0) - counts
    sorted_pos = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
    pos = torch.empty_like(sorted_pos)
    pos[order] = sorted_pos
    return pos


def _load_balancing_loss(gates: Tensor, first_counts: Tensor) -> Tensor:
    """l_aux = E * sum_e mean_s(gates[:, e]) * fraction of tokens whose first choice is e."""
    num_tokens, num_experts = gates.shape
    me = gates.mean(dim=0)
    ce = first_counts.to(gates.dtype) / num_tokens
    return (me * ce).sum() * num_experts


def top1_gating(logits: Tensor, capacity_factor: float = 1.0, min_capacity: int = 4,
                drop_tokens: bool = True, use_rts: bool = True,
                noisy_gate_policy: str | None = None,
                generator: torch.Generator | None = None,
                selection_bias: Tensor | None = None) -> GateOutput:
    """DeepSpeed's top1gating on (S, E) fp32 router logits.

    Without RTS an over-full expert keeps its first ``capacity`` tokens in token order.
    ``selection_bias`` (E,): added to the logits for the choice of expert only (loss-free
    balancing); the combine weights and l_aux use the unbiased softmax.
    """
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    choice = logits if selection_bias is None else logits + selection_bias
    if noisy_gate_policy == "RSample":
        noise = -torch.log(-torch.log(_uniform(logits.shape, logits, generator)))
        expert = torch.argmax(choice + noise, dim=1)
    else:  # DeepSpeed's argmax over the softmax (ties as it breaks them) unless biased
        expert = torch.argmax(gates if selection_bias is None else choice, dim=1)
    exp_counts = count_per_expert(expert, num_experts)
    l_aux = _load_balancing_loss(gates, exp_counts)
    if not drop_tokens:
        slot = position_in_expert(expert, num_experts)
        weight = gates.gather(1, expert[:, None]).squeeze(1)
        return GateOutput(expert, slot, weight, l_aux, exp_counts, None)

    capacity = expert_capacity(num_tokens, num_experts, capacity_factor, min_capacity)
    if use_rts:
        # Each token's rank among its expert's tokens by a uniform score; the top
        # `capacity` survive (DeepSpeed: topk over mask * uniform).
        score = _uniform((num_tokens,), logits, generator)
        by_score = torch.argsort(score, descending=True)
        rank = torch.empty_like(expert)
        rank[by_score] = position_in_expert(expert[by_score], num_experts)
        kept = rank < capacity
        # Slots follow token order among the kept tokens (DeepSpeed: cumsum of the mask).
        slot = position_in_expert(torch.where(kept, expert, num_experts), num_experts)
    else:
        slot = position_in_expert(expert, num_experts)
        kept = slot < capacity
    slot = torch.where(kept, slot, -1)
    weight = gates.gather(1, expert[:, None]).squeeze(1) * kept
    return GateOutput(expert, slot, weight, l_aux, exp_counts, capacity)


def top2_gating(logits: Tensor, capacity_factor: float = 1.0, min_capacity: int = 4,
                drop_tokens: bool = True, second_expert_sampling: bool = True,
                generator: torch.Generator | None = None,
                selection_bias: Tensor | None = None) -> GateOutput:
    """DeepSpeed's top2gating: outputs have shape (S, 2); first choices fill slots first.
    ``selection_bias`` as in top1_gating, for both choices."""
    num_tokens, num_experts = logits.shape
    gates = F.softmax(logits, dim=1)
    choice = logits if selection_bias is None else logits + selection_bias
    first = torch.argmax(gates if selection_bias is None else choice, dim=1)
    second_logits = choice
    if second_expert_sampling:
        second_logits = choice + -torch.log(-torch.log(_uniform(logits.shape, logits, generator)))
    second_logits = second_logits.scatter(1, first[:, None], float("-inf"))
    second = torch.argmax(second_logits, dim=1)

    first_counts = count_per_expert(first, num_experts)
    exp_counts = first_counts + count_per_expert(second, num_experts)
    l_aux = _load_balancing_loss(gates, first_counts)
    slot1 = position_in_expert(first, num_experts)
    slot2 = position_in_expert(second, num_experts) + first_counts[second]
    expert = torch.stack([first, second], dim=1)
    slot = torch.stack([slot1, slot2], dim=1)
    weight = gates.gather(1, expert)
    capacity = None
    if drop_tokens:
        capacity = expert_capacity(num_tokens, num_experts, 2 * capacity_factor, min_capacity)
        kept = slot < capacity
        slot = torch.where(kept, slot, -1)
        weight = weight * kept
    denom = weight.sum(dim=1, keepdim=True).clamp(min=torch.finfo(weight.dtype).eps)
    return GateOutput(expert, slot, weight / denom, l_aux, exp_counts, capacity)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean squared log-partition of the router logits."""
    return torch.logsumexp(logits, dim=1).square().mean()


def _uniform(shape: tuple[int, ...] | torch.Size, like: Tensor,
             generator: torch.Generator | None) -> Tensor:
    """U(0, 1) strictly inside (0, 1) so that Gumbel noise stays finite."""
    u = torch.rand(shape, device=like.device, dtype=like.dtype, generator=generator)
    tiny = torch.finfo(like.dtype).tiny
    return u.clamp(min=tiny, max=1.0 - torch.finfo(like.dtype).eps)
