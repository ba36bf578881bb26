"""Per-rank memory of one training step, by what holds it and by phase of the step."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raymoe.config import Config, with_overrides
from raymoe.plan.hardware import Hardware, hardware
from raymoe.plan.sizes import model_shape
from raymoe.train.layout import layout_config, plan_layout


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per rank by what holds them, and the peak over the step's phases."""

    hardware: Hardware
    parameters: float
    gradients: float
    optimizer_states: float
    weight_copies: float
    """bf16 copies of the weights: autocast's cached casts (shard none) or FSDP's
    all-gathered blocks (shard fsdp); none on CPU."""
    activations: float
    """Saved for backward at the micro-batch, plus the backward's working set."""
    moe_dispatch: float
    """MoE buffers at capacity: the expert buffers saved for backward and one layer's
    exchange buffers (checkpointed at EP > 1, also every layer's exchanged rows, kept for
    its recomputation)."""
    moe_dispatch_no_drop: float
    """The same when no token is dropped and all the EP group's tokens pick one expert."""
    logits_loss: float
    """Logits, their fp32 copy, log-softmax and its gradient at the loss."""
    grad_sync: float
    """shard none: the flat copy the gradient all-reduce makes; fsdp: the unsharded fp32
    gradients held from the first micro-batch to the last when they are reduce-scattered
    once per step (parallel.grad_sync), else none beyond the gathered blocks."""
    optimizer_step: float
    """Temporaries of the AdamW step."""
    overhead: float
    peak_phase: str
    """Where the peak falls: forward/backward, gradient sync or optimizer step."""
    peak: float
    no_drop_in_peak: bool = False
    """Whether the peak counts the no-drop worst case (moe.drop_tokens off)."""

    @property
    def model_states(self) -> float:
        return self.parameters + self.gradients + self.optimizer_states

    @property
    def fits(self) -> bool:
        return self.peak <= self.hardware.memory

    @property
    def short_by(self) -> float:
        return max(self.peak - self.hardware.memory, 0.0)

    def rows(self) -> list[tuple[str, float]]:
        worst = "MoE dispatch, no-drop worst case" + ("" if self.no_drop_in_peak else " (not in peak)")
        return [("parameters", self.parameters), ("gradients", self.gradients),
                ("optimizer states (AdamW)", self.optimizer_states),
                ("bf16 weight copies / gathered", self.weight_copies),
                ("activations", self.activations),
                ("MoE dispatch at capacity", self.moe_dispatch),
                (worst, self.moe_dispatch_no_drop),
                ("logits and loss", self.logits_loss),
                ("gradient sync buffers", self.grad_sync),
                ("optimizer step temporaries", self.optimizer_step),
                ("framework overhead", self.overhead)]


def with_workers(cfg: Config, workers: int | None) -> Config:
    """``cfg`` at ``workers`` GPUs; an elastic config at that size of its range (default: its
    largest), laid out as the run would lay it out."""
    if cfg.parallel.elastic:
        return layout_config(cfg, plan_layout(cfg, workers or cfg.parallel.max_workers))
    if workers is None or workers == cfg.parallel.num_workers:
        return cfg
    return with_overrides(cfg, [f"parallel.num_workers={workers}"])


def dispatch_rows(cfg: Config, tokens: int, no_drop: bool) -> int:
    """Rows of one rank's [local experts, capacity, d] expert buffer per micro-batch."""
    moe, ep = cfg.model.moe, cfg.parallel.ep_size
    if not moe.enabled:
        return 0
    if no_drop:  # capacity = the largest count: all the EP group's tokens on one expert
        return moe.num_experts // ep * (ep * tokens)
    factor = moe.capacity_factor * moe.top_k
    capacity = max(math.ceil(tokens / moe.num_experts * factor), moe.min_capacity)
    return moe.num_experts * min(capacity, tokens)


def estimate_memory(cfg: Config, gpu: str | Hardware = "a100-40gb",
                    workers: int | None = None) -> MemoryEstimate:
    """Per-rank memory of one training step of ``cfg`` on ``gpu`` ("cpu" for fp32 on CPU).

    What is counted, as the code allocates it (b micro-batch, s seq_len, d d_model, T = b x s
    tokens, c bytes of the compute dtype, V padded vocabulary):
    - fp32 parameters, fp32 gradients (kept between steps) and two fp32 AdamW states,
      divided over the data-parallel ranks (dense) and the expert-data-parallel ranks
      (experts) under shard fsdp;
    - per block, saved for backward: the fp32 residual stream twice (4 + 4 bytes/element),
      the LayerNorm outputs cast for the products, q/k/v and the attention output (flash
      and CPU attention return it laid out as the projection reads it: no copy), the FFN
      input, pre-activation and GELU output (c each, 3c/4c for the wide ones); an MoE
      block keeps the router's fp32 input, the gates and the combine's rows instead of the
      dense FFN's, and its expert buffer and pre-activation (rows at capacity); without
      flash attention the softmax scores (4 x heads x s per token) too;
    - activation checkpointing keeps each block's input and recomputes one block at a time;
      at EP > 1 each MoE layer also keeps what its two exchanges returned (the fixed
      exchange's buffers at capacity, or the rows received and sent back), so that the
      recomputation exchanges nothing;
    - under fsdp with gradient accumulation reduced once per step, the unsharded fp32
      gradients through the micro-batches' forward and backward passes;
    - at the loss, logits in c, their fp32 copy and log-softmax, and in backward their
      fp32 gradients;
    - the backward's working set: the residual's gradient and one wide gradient of a block;
      the forward/backward peak is the larger of the loss and that (or an MoE exchange).
    The CPU profile of this model is within a few percent of the allocator's peak in real
    CPU steps and of MemTracker at gpt-1.3b (tests/test_plan_memory.py).
    """
    cfg = with_workers(cfg, workers)
    hw = hardware(gpu, cfg.parallel.max_workers)
    m, moe, par, train = cfg.model, cfg.model.moe, cfg.parallel, cfg.train
    shape = model_shape(cfg)
    world = par.max_workers
    fsdp = par.shard == "fsdp"
    c, d, f, v = hw.compute_bytes, m.d_model, m.d_ffn, m.padded_vocab_size
    ckpt = m.activation_checkpointing
    tokens = train.micro_batch * m.seq_len

    dense_local = shape.dense_params / world if fsdp else shape.dense_params
    expert_replicas = world // par.ep_size
    expert_local = shape.local_expert_params / expert_replicas if fsdp else shape.local_expert_params
    local = dense_local + expert_local
    parameters, gradients, optimizer_states = 4 * local, 4 * local, 8 * local

    if not hw.is_gpu:
        weight_copies = 0.0
    elif fsdp:  # the block in use and the next one prefetched: bf16 weights, bf16 + fp32 grads
        weight_copies = 2 * shape.largest_block * (2 + 2 + 4) + 2 * v * d
    else:
        weight_copies = 2 * shape.dense_matrices

    scores = 0 if hw.flash_attention else 4 * m.n_head * m.seq_len
    attention = (8 + 5 * c) * d + scores  # residual x2 (fp32), ln cast, q/k/v, output
    dense_ffn = 9 * c * d  # ln cast, pre-activation (4d), GELU output (4d)
    moe_ffn = (4 + c * moe.top_k) * d + 4 * moe.num_experts  # router input, combine rows, gates
    saved = [tokens * (attention + (moe_ffn if moe.is_moe_layer(i) else dense_ffn)) for i in range(m.n_layer)]
    head = tokens * (4 + c) * d  # the last block's output, ln_f's output cast for the head
    layer_work = tokens * (4 + 4 * c) * d  # the residual's gradient and a wide one of a block
    logits_loss = tokens * v * (c + 12)  # logits; log-softmax, its gradient, the logits' (fp32)

    def dispatch(rows: int) -> tuple[float, float]:
        """(saved by one MoE layer, its exchange's transient buffers)."""
        if not moe.enabled:
            return 0.0, 0.0
        saved_rows = rows * c * (d + f)  # the expert input buffer and pre-activation
        sent = tokens * moe.top_k * d * c  # rows out, rows back, combine's output and cast
        chunks = min(8, max(shape.local_experts, 1))  # the expert FFN runs in up to 8 chunks
        gelu = rows / chunks * f * c  # one chunk's GELU output
        weight_casts = 0 if c == 4 else shape.local_experts / chunks * 2 * d * f * c
        exchange = 4 * sent + rows * d * c + gelu + weight_casts
        return saved_rows, exchange

    def held(rows: int, fixed: bool) -> tuple[float, float]:
        """(MoE dispatch row, activations + dispatch + logits at the forward/backward peak);
        ``fixed``: the fixed-capacity exchange, else the variable one."""
        moe_saved, exchange = dispatch(rows)
        layers = 1 if ckpt else shape.moe_layers
        with_moe = [s + (moe_saved if moe.is_moe_layer(i) else 0) for i, s in enumerate(saved)]
        assignments = tokens * moe.top_k  # the variable exchange receives real rows only
        received, returned = (rows, rows) if fixed else (min(rows, par.ep_size * assignments), assignments)
        # checkpointing: held from each MoE layer's forward until its recomputation
        kept = (received + returned) * d * c if ckpt and moe.enabled and par.ep_size > 1 else 0
        if ckpt:  # block inputs kept; one block recomputed and its backward at a time
            inputs = m.n_layer * 4 * d * tokens
            peak = inputs + max(head + logits_loss + shape.moe_layers * kept,
                                max(with_moe) + max(layer_work, exchange) + (shape.moe_layers - 1) * kept)
        else:
            peak = sum(with_moe) + head + max(logits_loss, layer_work, exchange)
        return layers * moe_saved + shape.moe_layers * kept + exchange, peak

    if ckpt:
        activations = m.n_layer * 4 * d * tokens + head + max(saved) + layer_work
    else:
        activations = sum(saved) + head + layer_work
    moe_dispatch, held_at_capacity = held(dispatch_rows(cfg, tokens, no_drop=False), moe.fixed_capacity_exchange)
    moe_no_drop, held_no_drop = held(dispatch_rows(cfg, tokens, no_drop=True), fixed=False)
    distributed = world > 1
    accumulation = train.global_batch // (train.micro_batch * world)
    held_unsharded = fsdp and par.grad_sync == "last_micro_batch" and accumulation > 1
    grad_sync = 0.0
    if held_unsharded:  # FSDP accumulates every unit's whole gradient until the last backward
        grad_sync = 4.0 * (shape.dense_params + shape.local_expert_params)
    elif distributed and not fsdp:
        grad_sync = 4.0 * max(shape.dense_params, shape.local_expert_params)
    largest = max(v * d, shape.local_experts * d * f)
    if hw.is_gpu:  # foreach AdamW: one fp32 temporary per parameter of the step
        optimizer_step = 4 * local
    else:  # single-tensor AdamW: two temporaries of the largest parameter
        optimizer_step = 2 * 4 * largest

    states = parameters + gradients + optimizer_states
    forward_backward = held_at_capacity if moe.drop_tokens or not moe.enabled else held_no_drop
    phases = {"forward/backward": states + weight_copies + forward_backward
              + (grad_sync if held_unsharded else 0.0),
              "gradient sync": states + grad_sync,
              "optimizer step": states + optimizer_step}
    phase = max(phases, key=lambda k: phases[k])
    return MemoryEstimate(hw, parameters, gradients, optimizer_states, weight_copies, activations,
                          moe_dispatch, moe_no_drop, logits_loss, grad_sync, optimizer_step,
                          hw.overhead, phase, phases[phase] + hw.overhead,
                          no_drop_in_peak=moe.enabled and not moe.drop_tokens)
