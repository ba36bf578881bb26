"""A GPT-2 style decoder whose feed-forward layers may be Mixture-of-Experts layers.

Read top to bottom: attention, the dense MLP, a Block (pre-LayerNorm), the GPT with tied
input/output embeddings, its initialisation and its parameter counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from raymoe.config import ModelConfig
from raymoe.model.exchange_tape import keep_exchanges
from raymoe.model.kv_cache import KVCache
from raymoe.model.moe import ExpertExchange, MoELayer, MoEStats, is_expert_parameter


@dataclass
class LayerCache:
    """One layer's view of a KVCache during one forward."""

    kv: KVCache
    layer: int
    mask: Tensor


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> Tensor:
        batch, seq, dim = x.shape
        q, k, v = self.qkv(x).split(dim, dim=2)
        q, k, v = (t.view(batch, seq, self.n_head, dim // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v = cache.kv.store(cache.layer, k.to(cache.kv.keys.dtype), v.to(cache.kv.keys.dtype))
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=cache.mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ffn)
        self.proj = nn.Linear(cfg.d_ffn, cfg.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int, exchange: ExpertExchange | None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model)
        self.is_moe = cfg.moe.is_moe_layer(layer_index)
        self.mlp: nn.Module = (MoELayer(cfg.d_model, cfg.d_ffn, cfg.moe, exchange, layer_index)
                               if self.is_moe else MLP(cfg))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: LayerCache | None = None) -> tuple[Tensor, MoEStats | None]:
        x = x + self.drop(self.attn(self.ln_1(x), cache))
        if self.is_moe:
            out, stats = self.mlp(self.ln_2(x))
        else:
            out, stats = self.mlp(self.ln_2(x)), None
        return x + self.drop(out), stats


@dataclass
class GPTOutput:
    logits: Tensor
    lm_loss: Tensor | None = None
    """Mean next-token cross-entropy, when targets were given."""
    l_aux: Tensor | None = None
    """Sum of the MoE layers' load-balancing losses (0 for a dense model)."""
    z_loss: Tensor | None = None
    loss: Tensor | None = None
    """What to minimise: lm_loss + moe.loss_coef * l_aux + moe.z_loss_coef * z_loss."""
    moe_stats: list[MoEStats] = field(default_factory=list)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, exchange: ExpertExchange | None = None):
        """``exchange`` connects MoE layers to their expert-parallel group (None: local)."""
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, exchange) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        if not self.wte.weight.is_meta:  # on meta: initialised once materialised
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std); output projections scaled by 1/sqrt(2 * layers).

        Dense parameters come from the global RNG (seed every rank alike and they agree).
        Each expert is drawn from its own generator seeded by its GLOBAL id, so a model
        is initialised the same whatever the expert-parallel size. Values are drawn on
        the CPU whatever the parameters' device.
        """
        for name, param in self.named_parameters():
            self.initializer(name).fill(param)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The routers' balancing biases (the model's only buffers) start at zero."""
        for buffer in self.buffers():
            buffer.zero_()

    def initializer(self, name: str) -> ParameterInit:
        """How parameter ``name`` is initialised. Ask in ``named_parameters`` order, once per
        parameter, and fill it before asking for the next: dense draws and each expert
        parameter's base seed come from the global RNG in that order."""
        std = self.cfg.init_std
        leaf = name.rsplit(".", 1)[-1]
        if ".ln_" in name or name.startswith("ln_f"):
            return ParameterInit(1.0 if leaf == "weight" else 0.0)
        if leaf.startswith("bias"):
            return ParameterInit(0.0)
        if name.endswith("router.weight"):
            # DeepSpeed's gate is a default nn.Linear: U(-1/sqrt(d), 1/sqrt(d)), std 1/sqrt(3 d)
            # (0.051 at d_model 128, 2.5x the 0.02 it was drawn with here before)
            return ParameterInit(bound=1 / math.sqrt(self.cfg.d_model))
        if name.endswith("proj.weight") or leaf == "w_out":
            std /= math.sqrt(2 * self.cfg.n_layer)
        if is_expert_parameter(name):
            base_seed = int(torch.randint(2**62, (), device="cpu"))  # one draw, any EP size
            return ParameterInit(std=std, expert_seeds=[base_seed + gid for gid in
                                                        self.moe_layer_of(name).global_expert_ids])
        return ParameterInit(std=std)

    @torch.no_grad()
    def replay_construction_draws(self) -> None:
        """Draw from the global RNG what building this model on a real device draws.

        nn.Linear and nn.Embedding initialise themselves when constructed (values that
        reset_parameters then overwrites); on the meta device they draw nothing. A model
        built on meta calls this before initialising, so that the same seed gives the same
        values as a model built whole. One parameter's worth of memory at a time.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                torch.empty(module.weight.shape).uniform_()
                if module.bias is not None:
                    torch.empty(module.bias.shape).uniform_()
            elif isinstance(module, nn.Embedding):
                torch.empty(module.weight.shape).normal_()

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.mlp for b in self.blocks if isinstance(b.mlp, MoELayer)]

    def moe_layer_of(self, expert_param_name: str) -> MoELayer:
        """The MoE layer that holds the expert parameter of that name."""
        layer = self.get_submodule(expert_param_name.split(".experts.")[0])
        assert isinstance(layer, MoELayer), expert_param_name
        return layer

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None, keep_last: int | None = None) -> GPTOutput:
        """``cache``: attend to its keys and values too, store this call's, and advance it
        (incremental decoding; its left padding is masked and not counted in positions).
        ``keep_last``: logits of the last positions only (the rest are not computed).
        Token ids are checked where they enter, on the host (raymoe.model.token_ids)."""
        x, stats = self.features(idx, cache)
        logits = self.head(x if keep_last is None else x[:, -keep_last:])
        if targets is None:
            return GPTOutput(logits=logits, moe_stats=stats)
        lm_loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        zero = lm_loss.new_zeros(())
        l_aux = sum((s.l_aux for s in stats), zero)
        z_loss = sum((s.z_loss for s in stats), zero)
        moe = self.cfg.moe
        loss = lm_loss + moe.loss_coef * l_aux + moe.z_loss_coef * z_loss
        return GPTOutput(logits, lm_loss, l_aux, z_loss, loss, stats)

    def features(self, idx: Tensor, cache: KVCache | None = None) -> tuple[Tensor, list[MoEStats]]:
        """The final (normalised) hidden states, before the output embedding."""
        seq = idx.shape[1]
        positions = torch.arange(seq, device=idx.device) if cache is None else cache.positions(seq)
        longest = seq if cache is None else cache.longest(seq)  # a cache's padding is no position
        if longest > self.cfg.seq_len:
            raise ValueError(f"sequence of {longest} tokens exceeds model.seq_len={self.cfg.seq_len}")
        mask = cache.attention_mask(seq) if cache is not None else None
        x = self.drop(self.wte(idx) + self.wpe(positions))
        stats: list[MoEStats] = []
        for i, block in enumerate(self.blocks):
            layer_cache = LayerCache(cache, i, mask) if cache is not None and mask is not None else None
            if self.cfg.activation_checkpointing and self.training:
                x, layer_stats = checkpoint(block, x, layer_cache, use_reentrant=False,
                                            context_fn=keep_exchanges)
            else:
                x, layer_stats = block(x, layer_cache)
            if layer_stats is not None:
                stats.append(layer_stats)
        if cache is not None:
            cache.advance(seq)
        return self.ln_f(x), stats

    def head(self, features: Tensor) -> Tensor:
        """Logits over the padded vocabulary (the output embedding is the input one)."""
        return F.linear(features, self.wte.weight)

    def new_cache(self, batch: int, max_len: int, pad: Tensor | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """An empty KV cache for ``batch`` rows of up to ``max_len`` tokens."""
        cfg = self.cfg
        return KVCache(cfg.n_layer, batch, cfg.n_head, cfg.d_model // cfg.n_head, max_len,
                       dtype or self.wte.weight.dtype, self.wte.weight.device, pad)

    def num_parameters(self, active_only: bool = False) -> int:
        """All parameters of the full model (every expert, whatever this rank holds), or
        those one token uses: the dense ones, the routers and top_k experts per MoE layer."""
        total = 0
        for name, param in self.named_parameters():
            if not is_expert_parameter(name):
                total += param.numel()
                continue
            layer = self.moe_layer_of(name)
            per_expert = param.numel() // layer.num_local_experts
            total += per_expert * (layer.cfg.top_k if active_only else layer.num_experts)
        return total


@dataclass(frozen=True)
class ParameterInit:
    """One parameter's initial value: a constant, uniform(-bound, bound) where a bound is
    given, or normal(0, std); drawn on the CPU (from the global RNG, or for experts from one
    generator per expert)."""

    constant: float | None = None
    std: float = 0.0
    bound: float = 0.0
    expert_seeds: list[int] | None = None
    """Per local expert (the parameter's leading dim), the seed of its generator."""

    @property
    def is_random(self) -> bool:
        return self.constant is None

    def fill(self, out: Tensor, experts: range | None = None) -> None:
        """Fill ``out`` with the parameter's value; for experts, the values of the local
        experts ``experts`` (all by default) along ``out``'s leading dim."""
        if out.is_meta:
            return
        if self.constant is not None:
            out.fill_(self.constant)
        elif self.expert_seeds is None:
            self._draw_on_cpu(out)
        else:
            for row, local in enumerate(experts if experts is not None else range(out.shape[0])):
                self._draw_on_cpu(out[row], torch.Generator().manual_seed(self.expert_seeds[local]))

    def _draw_on_cpu(self, out: Tensor, generator: torch.Generator | None = None) -> None:
        """The random value into ``out``, drawn on the CPU (the same values on every device)."""
        on_cpu = out.device.type == "cpu" and out.is_contiguous()
        target = out if on_cpu else torch.empty(out.shape, dtype=out.dtype)
        if self.bound:
            target.uniform_(-self.bound, self.bound, generator=generator)
        else:
            target.normal_(0.0, self.std, generator=generator)
        if not on_cpu:
            out.copy_(target)
