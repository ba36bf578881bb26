"""AdamW with decay on matrices only, and the token-based warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from raymoe.config import OptimConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on weight matrices (embeddings, projections, experts); none on biases
    and LayerNorms. ``fused``: one kernel per step on GPU (build after sharding, so that
    the optimizer holds the sharded parameters)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_matrix = param.ndim >= 2 and not leaf.startswith("bias")
        (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused or None)


def learning_rate(tokens_seen: int, cfg: OptimConfig) -> float:
    """Linear warm-up over warmup_tokens, then cosine to min_lr_ratio * lr at decay_tokens."""
    if tokens_seen < cfg.warmup_tokens:
        return cfg.lr * (tokens_seen + 1) / cfg.warmup_tokens
    span = max(cfg.decay_tokens - cfg.warmup_tokens, 1)
    progress = min((tokens_seen - cfg.warmup_tokens) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
