"""Parameter counts per rank, derived from the config (no model built)."""

from __future__ import annotations

from dataclasses import dataclass

from raymoe.config import Config


@dataclass(frozen=True)
class Shape:
    """What the memory and time models need to know about a config, per rank."""

    dense_params: int
    """Every parameter outside the experts (embeddings, attention, dense FFNs, routers)."""
    dense_matrices: int
    """Dense parameters that matrix products use (cast to bf16 under autocast)."""
    expert_params: int
    """Parameters of one expert."""
    local_experts: int
    """Experts this rank holds, per MoE layer."""
    moe_layers: int
    largest_block: int
    """Parameters (dense + this rank's experts) of the largest transformer block."""
    active_params: int
    """Parameters one token uses (dense + top_k experts per MoE layer)."""

    @property
    def local_expert_params(self) -> int:
        return self.expert_params * self.local_experts * self.moe_layers


def model_shape(cfg: Config) -> Shape:
    """Parameter counts of raymoe.model.GPT, derived from the config (no model built)."""
    m, moe, ep = cfg.model, cfg.model.moe, cfg.parallel.ep_size
    d, f, v = m.d_model, m.d_ffn, m.padded_vocab_size
    attention = 4 * d * d + 4 * d + 4 * d  # qkv + proj with biases, two LayerNorms
    ffn = 2 * d * f + f + d
    moe_layers = sum(moe.is_moe_layer(i) for i in range(m.n_layer))
    dense_layers = m.n_layer - moe_layers
    routers = moe_layers * moe.num_experts * d
    dense = v * d + m.seq_len * d + 2 * d + m.n_layer * attention + dense_layers * ffn + routers
    matrices = v * d + m.n_layer * 4 * d * d + dense_layers * 2 * d * f
    local = moe.num_experts // ep if moe.enabled else 0
    block = attention + (moe.num_experts * d + local * ffn if moe_layers else ffn)
    if dense_layers:
        block = max(block, attention + ffn)
    active = dense + moe_layers * moe.top_k * ffn
    return Shape(dense, matrices, ffn, local, moe_layers, block, active)
