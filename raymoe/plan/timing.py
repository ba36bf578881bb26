"""Step time from FLOPs and bytes over peak rates, with the assumptions it makes."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from raymoe.config import Config
from raymoe.plan.hardware import Hardware, PlanError, hardware
from raymoe.plan.memory import dispatch_rows, with_workers
from raymoe.plan.sizes import model_shape

COMPUTE_EFFICIENCY = 0.45
"""Share of peak bf16 FLOP/s the matrix products reach (an assumption, typical of tuned
GPT training at this size on A100/H100; not measured here)."""
ALL_TO_ALL_LATENCY = 50e-6
"""Seconds of fixed cost per all-to-all (launch and per-peer set-up)."""


@dataclass(frozen=True)
class TimeEstimate:
    step_seconds: float
    compute_seconds: float
    all_to_all_seconds: float
    grad_sync_seconds: float
    """Time of the gradient reduction (and FSDP's gathers) on the wire."""
    exposed_sync_seconds: float
    """The part of it the step waits for (fsdp overlaps it with compute)."""
    optimizer_seconds: float
    tokens_per_second: float
    mfu: float
    assumptions: list[str] = field(default_factory=list)


def flops_per_token(cfg: Config) -> float:
    """Model FLOPs per trained token: 6 x active parameters plus attention (12 x L x d x s),
    as the trainer's MFU counts them."""
    m = cfg.model
    return 6 * model_shape(cfg).active_params + 12 * m.n_layer * m.d_model * m.seq_len


def _ring_seconds(nbytes: float, ranks: int, bandwidth: float, all_reduce: bool) -> float:
    if ranks <= 1:
        return 0.0
    factor = 2 if all_reduce else 1
    return factor * (ranks - 1) / ranks * nbytes / bandwidth


def _group_bandwidth(hw: Hardware, size: int, stride: int) -> float:
    """Bytes/s of a ring over ``size`` ranks ``stride`` apart: NVLink inside one node,
    else the node's network shared by the concurrent groups that have a rank on it."""
    if size * stride <= hw.gpus_per_node:
        return hw.nvlink_bandwidth
    concurrent = min(stride, hw.gpus_per_node)
    return hw.network_bandwidth / concurrent


def estimate_time(cfg: Config, gpu: str | Hardware = "a100-40gb", workers: int | None = None) -> TimeEstimate:
    cfg = with_workers(cfg, workers)
    hw = hardware(gpu, cfg.parallel.max_workers)
    if not hw.is_gpu:
        raise PlanError("step time is predicted for GPUs only")
    m, moe, par, train = cfg.model, cfg.model.moe, cfg.parallel, cfg.train
    shape = model_shape(cfg)
    world, ep = par.max_workers, par.ep_size
    tokens = train.micro_batch * m.seq_len
    accumulation = train.global_batch // (train.micro_batch * world)
    ckpt = m.activation_checkpointing
    model_flops = flops_per_token(cfg) * tokens
    hardware_flops = model_flops * (8 / 6 if ckpt else 1.0)  # checkpointing runs forward twice
    compute = hardware_flops / (hw.peak_flops * COMPUTE_EFFICIENCY)

    all_to_all = 0.0
    if moe.enabled and ep > 1:
        nbytes = dispatch_rows(cfg, tokens, no_drop=False) * m.d_model * hw.compute_bytes
        in_node = min(ep, hw.gpus_per_node)
        off_node = nbytes * (ep - in_node) / ep
        on_node = nbytes * (in_node - 1) / ep
        one = max(off_node / (hw.network_bandwidth / hw.gpus_per_node),
                  on_node / hw.nvlink_bandwidth) + ALL_TO_ALL_LATENCY
        # dispatch + combine, forward and backward (checkpointing replays, not repeats, them)
        exchanges = 4 * shape.moe_layers
        all_to_all = one * exchanges

    reduce_bytes = 2 if par.reduce_dtype == "bfloat16" else 4
    dense_bw = _group_bandwidth(hw, world, 1)
    replicas = world // ep
    expert_bw = _group_bandwidth(hw, replicas, ep)
    if par.shard == "fsdp":  # per micro-batch: all-gather bf16 weights twice; reduce-scatter
        # the gradients after each micro-batch or after the last (parallel.grad_sync)
        reductions = accumulation if par.grad_sync == "every_micro_batch" else 1
        per_param = reductions * reduce_bytes + accumulation * 2 * 2
        sync = (_ring_seconds(shape.dense_params * per_param, world, dense_bw, False)
                + _ring_seconds(shape.local_expert_params * per_param, replicas, expert_bw, False))
        exposed = max(sync - accumulation * compute, 0.0)
    else:  # one fp32 all-reduce after the backward pass, nothing overlapped
        sync = (_ring_seconds(shape.dense_params * 4, world, dense_bw, True)
                + _ring_seconds(shape.local_expert_params * 4, replicas, expert_bw, True))
        exposed = sync
    local = (shape.dense_params / world + shape.local_expert_params / replicas
             if par.shard == "fsdp" else shape.dense_params + shape.local_expert_params)
    optimizer = local * 28 / hw.hbm_bandwidth  # AdamW reads 16 and writes 12 bytes per parameter

    step = accumulation * (compute + all_to_all) + exposed + optimizer
    step_tokens = train.global_batch * m.seq_len
    mfu = flops_per_token(cfg) * step_tokens / (step * hw.peak_flops * world)
    nodes = math.ceil(world / hw.gpus_per_node)
    assumptions = [
        f"matrix products at {COMPUTE_EFFICIENCY:.0%} of the {hw.peak_flops / 1e12:.0f} TFLOP/s bf16 peak"
        + ("; checkpointing recomputes the forward (8/6 of the FLOPs)" if ckpt else ""),
        f"NVLink {hw.nvlink_bandwidth / 1e9:.0f} GB/s per GPU within a node; "
        f"{hw.network_bandwidth * 8 / 1e9:.0f} Gb/s EFA per node between nodes "
        f"({nodes} node{'s' if nodes > 1 else ''}), shared by its {hw.gpus_per_node} GPUs",
        "all-to-all: the fixed [experts x capacity, d] bf16 buffer, 2 per MoE layer forward "
        f"and backward, not overlapped, {ALL_TO_ALL_LATENCY * 1e6:.0f} us each",
        ("gradient sync: FSDP reduce-scatter + 2 bf16 all-gathers, overlapped with compute"
         if par.shard == "fsdp" else "gradient sync: an fp32 ring all-reduce after the backward"),
    ]
    return TimeEstimate(step, accumulation * compute, accumulation * all_to_all, sync, exposed,
                        optimizer, step_tokens / step, mfu, assumptions)
