"""Memory, time and cost of a config on a GPU type, before anything runs.

A function of the config and the hardware: no process group, no Ray, no tensors. Every
figure is per rank (one GPU) and in decimal GB. The memory model follows what the code
allocates (see ``estimate_memory``); it was checked against torch's MemTracker at the
reference shapes and against the allocator's peak in real CPU training steps
(tests/test_plan_memory.py). The time model is FLOPs and bytes over peak rates with the
assumptions listed in ``TimeEstimate.assumptions``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from raymoe.config import Config, with_overrides
from raymoe.errors import RaymoeError

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """One accelerator type and the instance that carries it."""

    name: str
    memory: float
    """Bytes torch can allocate on one device (total memory as torch reports it)."""
    peak_flops: float
    """Dense peak of the compute dtype (bf16 on GPUs), per device."""
    compute_bytes: int
    """Bytes of an activation element in the compute dtype (bf16 autocast: 2; CPU fp32: 4)."""
    flash_attention: bool
    """Whether attention keeps no [heads, seq, seq] scores for backward."""
    overhead: float
    """Framework memory outside tensors: CUDA context, cuBLAS workspaces, NCCL buffers and
    allocator fragmentation."""
    hbm_bandwidth: float = 0.0
    gpus_per_node: int = 8
    nvlink_bandwidth: float = 0.0
    """Bytes/s one GPU sends to the others of its node, one direction."""
    network_bandwidth: float = 0.0
    """Bytes/s a node sends to other nodes (all its NICs together), one direction."""
    instance: str = ""
    """The cloud instance that carries 8 of these GPUs (for the price)."""

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"


_EFA_P4D = 4 * 100e9 / 8  # p4d/p4de: 4 x 100 Gb/s EFA
_EFA_P5 = 32 * 100e9 / 8  # p5/p5en: 32 x 100 Gb/s EFA
_MiB = 2**20

HARDWARE: dict[str, Hardware] = {
    "a100-40gb": Hardware("a100-40gb", 40_536 * _MiB, 312e12, 2, True, 2.5 * GB, 1.555e12, 8,
                          300e9, _EFA_P4D, "p4d.24xlarge"),
    "a100-80gb": Hardware("a100-80gb", 81_050 * _MiB, 312e12, 2, True, 2.5 * GB, 2.039e12, 8,
                          300e9, _EFA_P4D, "p4de.24xlarge"),
    "h100-80gb": Hardware("h100-80gb", 81_008 * _MiB, 989e12, 2, True, 2.5 * GB, 3.35e12, 8,
                          450e9, _EFA_P5, "p5.48xlarge"),
    "h200-141gb": Hardware("h200-141gb", 143_156 * _MiB, 989e12, 2, True, 2.5 * GB, 4.8e12, 8,
                           450e9, _EFA_P5, "p5en.48xlarge"),
}
"""The GPUs `raymoe plan --gpu` knows; ``cpu_hardware()`` adds the CPU profile."""

INSTANCE_PRICES = {
    "p4d.24xlarge": 32.77,
    "p4de.24xlarge": 40.97,
    "p5.48xlarge": 55.04,
    "p5en.48xlarge": 63.30,
}
"""On-demand USD per hour in us-east-1 (AWS list prices of 2025; pass your own with
--price-per-hour)."""

COMPUTE_EFFICIENCY = 0.45
"""Share of peak bf16 FLOP/s the matrix products reach (an assumption, typical of tuned
GPT training at this size on A100/H100; not measured here)."""
ALL_TO_ALL_LATENCY = 50e-6
"""Seconds of fixed cost per all-to-all (launch and per-peer set-up)."""
CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster" / "aws.yaml"


def cpu_hardware(workers: int = 1) -> Hardware:
    """fp32 compute and no CUDA overhead; the machine's RAM shared by ``workers``."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", ram / workers, 0.0, 4, True, 0.0, gpus_per_node=workers)


def hardware(gpu: str | Hardware, workers: int = 1) -> Hardware:
    if isinstance(gpu, Hardware):
        return gpu
    if gpu == "cpu":
        return cpu_hardware(workers)
    if gpu not in HARDWARE:
        raise PlanError(f"--gpu {gpu!r} is not one of {', '.join([*HARDWARE, 'cpu'])}")
    return HARDWARE[gpu]


class PlanError(RaymoeError, ValueError):
    """A plan was asked for hardware or a cluster file it cannot read."""


class DoesNotFitError(RaymoeError, MemoryError):
    """The config cannot fit the GPU it was about to train on; the message is the verdict."""


# ---------------------------------------------------------------------------- model sizes


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


# ---------------------------------------------------------------------------- memory


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
    exchange buffers."""
    moe_dispatch_no_drop: float
    """The same when no token is dropped and all the EP group's tokens pick one expert."""
    logits_loss: float
    """Logits, their fp32 copy, log-softmax and its gradient at the loss."""
    grad_sync: float
    """shard none: the flat copy the gradient all-reduce makes; fsdp: none beyond the
    gathered blocks."""
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


def _with_workers(cfg: Config, workers: int | None) -> Config:
    if workers is None or workers == cfg.parallel.num_workers:
        return cfg
    return with_overrides(cfg, [f"parallel.num_workers={workers}"])


def _dispatch_rows(cfg: Config, tokens: int, no_drop: bool) -> int:
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
    - at the loss, logits in c, their fp32 copy and log-softmax, and in backward their
      fp32 gradients;
    - the backward's working set: the residual's gradient and one wide gradient of a block;
      the forward/backward peak is the larger of the loss and that (or an MoE exchange).
    The CPU profile of this model is within a few percent of the allocator's peak in real
    CPU steps and of MemTracker at gpt-1.3b (tests/test_plan_memory.py).
    """
    cfg = _with_workers(cfg, workers)
    hw = hardware(gpu, cfg.parallel.num_workers)
    m, moe, par, train = cfg.model, cfg.model.moe, cfg.parallel, cfg.train
    shape = model_shape(cfg)
    world = par.num_workers
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

    def held(rows: int) -> tuple[float, float]:
        """(MoE dispatch row, activations + dispatch + logits at the forward/backward peak)."""
        moe_saved, exchange = dispatch(rows)
        layers = 1 if ckpt else shape.moe_layers
        with_moe = [s + (moe_saved if moe.is_moe_layer(i) else 0) for i, s in enumerate(saved)]
        if ckpt:  # block inputs kept; one block recomputed and its backward at a time
            inputs = m.n_layer * 4 * d * tokens
            peak = inputs + max(head + logits_loss, max(with_moe) + max(layer_work, exchange))
        else:
            peak = sum(with_moe) + head + max(logits_loss, layer_work, exchange)
        return layers * moe_saved + exchange, peak

    if ckpt:
        activations = m.n_layer * 4 * d * tokens + head + max(saved) + layer_work
    else:
        activations = sum(saved) + head + layer_work
    moe_dispatch, held_at_capacity = held(_dispatch_rows(cfg, tokens, no_drop=False))
    moe_no_drop, held_no_drop = held(_dispatch_rows(cfg, tokens, no_drop=True))
    distributed = world > 1
    grad_sync = 4 * max(shape.dense_params, shape.local_expert_params) if distributed and not fsdp else 0.0
    largest = max(v * d, shape.local_experts * d * f)
    if hw.is_gpu:  # foreach AdamW: one fp32 temporary per parameter of the step
        optimizer_step = 4 * local
    else:  # single-tensor AdamW: two temporaries of the largest parameter
        optimizer_step = 2 * 4 * largest

    states = parameters + gradients + optimizer_states
    forward_backward = held_at_capacity if moe.drop_tokens or not moe.enabled else held_no_drop
    phases = {"forward/backward": states + weight_copies + forward_backward,
              "gradient sync": states + grad_sync,
              "optimizer step": states + optimizer_step}
    phase = max(phases, key=lambda k: phases[k])
    return MemoryEstimate(hw, parameters, gradients, optimizer_states, weight_copies, activations,
                          moe_dispatch, moe_no_drop, logits_loss, grad_sync, optimizer_step,
                          hw.overhead, phase, phases[phase] + hw.overhead,
                          no_drop_in_peak=moe.enabled and not moe.drop_tokens)


# ---------------------------------------------------------------------------- time


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
    cfg = _with_workers(cfg, workers)
    hw = hardware(gpu, cfg.parallel.num_workers)
    if not hw.is_gpu:
        raise PlanError("step time is predicted for GPUs only")
    m, moe, par, train = cfg.model, cfg.model.moe, cfg.parallel, cfg.train
    shape = model_shape(cfg)
    world, ep = par.num_workers, par.ep_size
    tokens = train.micro_batch * m.seq_len
    accumulation = train.global_batch // (train.micro_batch * world)
    ckpt = m.activation_checkpointing
    model_flops = flops_per_token(cfg) * tokens
    hardware_flops = model_flops * (8 / 6 if ckpt else 1.0)  # checkpointing runs forward twice
    compute = hardware_flops / (hw.peak_flops * COMPUTE_EFFICIENCY)

    all_to_all = 0.0
    if moe.enabled and ep > 1:
        nbytes = _dispatch_rows(cfg, tokens, no_drop=False) * m.d_model * hw.compute_bytes
        in_node = min(ep, hw.gpus_per_node)
        off_node = nbytes * (ep - in_node) / ep
        on_node = nbytes * (in_node - 1) / ep
        one = max(off_node / (hw.network_bandwidth / hw.gpus_per_node),
                  on_node / hw.nvlink_bandwidth) + ALL_TO_ALL_LATENCY
        exchanges = (6 if ckpt else 4) * shape.moe_layers  # dispatch + combine, fwd (x2) + bwd
        all_to_all = one * exchanges

    reduce_bytes = 2 if par.reduce_dtype == "bfloat16" else 4
    dense_bw = _group_bandwidth(hw, world, 1)
    replicas = world // ep
    expert_bw = _group_bandwidth(hw, replicas, ep)
    if par.shard == "fsdp":  # reduce-scatter the gradients, all-gather bf16 weights twice
        sync = (_ring_seconds(shape.dense_params * (reduce_bytes + 2 * 2), world, dense_bw, False)
                + _ring_seconds(shape.local_expert_params * (reduce_bytes + 2 * 2), replicas,
                                expert_bw, False))
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


# ---------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class CostEstimate:
    instance: str
    price_per_hour: float
    nodes: int
    run_hours: float
    run_cost: float
    cost_per_billion_tokens: float
    source: str


def cluster_instance(path: Path = CLUSTER_YAML) -> str | None:
    """The instance type of the cluster YAML's GPU worker nodes (the first that has GPUs)."""
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlanError(f"{path}: not valid YAML: {err}") from err
    for node in (raw.get("available_node_types") or {}).values():
        if (node.get("resources") or {}).get("GPU"):
            return node.get("node_config", {}).get("InstanceType")
    return None


def estimate_cost(cfg: Config, hw: Hardware, time: TimeEstimate, cluster_yaml: Path = CLUSTER_YAML,
                  price_per_hour: float | None = None) -> CostEstimate:
    """Run cost at the cluster YAML's instance when it carries this GPU, else at the
    instance that does."""
    instance = cluster_instance(cluster_yaml)
    source = f"{cluster_yaml.name} provisions {instance}"
    if instance is None or HARDWARE.get(hw.name, hw).instance != instance:
        source = (f"{hw.name} comes on {hw.instance}" +
                  (f" ({cluster_yaml.name} provisions {instance})" if instance else ""))
        instance = hw.instance
    if price_per_hour is None:
        if instance not in INSTANCE_PRICES:
            raise PlanError(f"no price known for {instance}: pass --price-per-hour")
        price_per_hour = INSTANCE_PRICES[instance]
        source += f", on-demand ${price_per_hour:.2f}/h (us-east-1 list price)"
    else:
        source += f", ${price_per_hour:.2f}/h as given"
    nodes = math.ceil(cfg.parallel.num_workers / hw.gpus_per_node)
    tokens = cfg.train.total_tokens
    hours = tokens / time.tokens_per_second / 3600
    cost = hours * nodes * price_per_hour
    return CostEstimate(instance, price_per_hour, nodes, hours, cost, cost / (tokens / 1e9), source)


# ---------------------------------------------------------------------------- the plan


def _fix_candidates(cfg: Config) -> list[list[str]]:
    """Setting changes that lower memory, each a list of overrides, fewest changes first."""
    single: list[list[str]] = []
    if not cfg.model.activation_checkpointing:
        single.append(["model.activation_checkpointing=true"])
    if cfg.parallel.shard == "none":
        single.append(["parallel.shard=fsdp"])
    batches = []
    micro = cfg.train.micro_batch
    per_rank = cfg.train.global_batch // cfg.parallel.num_workers
    for smaller in range(micro - 1, 0, -1):
        if per_rank % smaller == 0:
            batches.append([f"train.micro_batch={smaller}"])
    combos: list[list[str]] = []
    for i, a in enumerate(single):
        combos += [a + b for b in single[i + 1:]] + [a + b for b in batches]
    if len(single) == 2:
        combos += [single[0] + single[1] + b for b in batches]
    return single + batches + sorted(combos, key=len)


def smallest_fix(cfg: Config, gpu: str | Hardware) -> list[str] | None:
    """The fewest setting changes that make ``cfg`` fit, the fastest among equals; None if
    none does."""
    best: tuple[int, float, list[str]] | None = None
    for overrides in _fix_candidates(cfg):
        candidate = with_overrides(cfg, overrides)
        if not estimate_memory(candidate, gpu).fits:
            continue
        speed = estimate_time(candidate, gpu).tokens_per_second if hardware(gpu).is_gpu else 0.0
        key = (len(overrides), -speed)
        if best is None or key < best[:2]:
            best = (key[0], key[1], overrides)
    return best[2] if best else None


@dataclass(frozen=True)
class Plan:
    cfg: Config
    memory: MemoryEstimate
    time: TimeEstimate
    cost: CostEstimate
    fix: list[str] | None

    @property
    def fits(self) -> bool:
        return self.memory.fits


def make_plan(cfg: Config, gpu: str = "a100-40gb", workers: int | None = None,
              cluster_yaml: Path = CLUSTER_YAML, price_per_hour: float | None = None) -> Plan:
    cfg = _with_workers(cfg, workers)
    memory = estimate_memory(cfg, gpu)
    time = estimate_time(cfg, gpu)
    cost = estimate_cost(cfg, memory.hardware, time, cluster_yaml, price_per_hour)
    return Plan(cfg, memory, time, cost, None if memory.fits else smallest_fix(cfg, gpu))


def verdict(memory: MemoryEstimate) -> str:
    hw = memory.hardware
    if memory.fits:
        return (f"fits: peak {memory.peak / GB:.1f} GB of {hw.memory / GB:.1f} GB "
                f"({hw.memory / GB - memory.peak / GB:.1f} GB free), at the {memory.peak_phase}")
    return (f"does not fit: peak {memory.peak / GB:.1f} GB at the {memory.peak_phase}, "
            f"{memory.short_by / GB:.1f} GB more than the {hw.memory / GB:.1f} GB of one {hw.name}")


def format_plan(plan: Plan) -> str:
    cfg, mem, t, cost = plan.cfg, plan.memory, plan.time, plan.cost
    m, par, train = cfg.model, cfg.parallel, cfg.train
    lines = [f"{cfg.name} on {par.num_workers} x {mem.hardware.name}: shard {par.shard}, EP {par.ep_size}, "
             f"micro-batch {train.micro_batch} x {m.seq_len} tokens, activation checkpointing "
             f"{'on' if m.activation_checkpointing else 'off'}",
             "",
             f"{'per-GPU memory (the peak is the largest phase, not the sum)':62s} {'GB':>7s}"]
    lines += [f"  {label:60s} {value / GB:7.2f}" for label, value in mem.rows()]
    lines += [f"  {'peak, at the ' + mem.peak_phase:60s} {mem.peak / GB:7.2f}",
              f"  {'capacity of one ' + mem.hardware.name:60s} {mem.hardware.memory / GB:7.2f}",
              "",
              verdict(mem)]
    if not plan.fits:
        lines.append("smallest change that fits: " + (
            " ".join(plan.fix) if plan.fix else
            "none of checkpointing, sharding and a smaller micro-batch; use GPUs with more memory"))
    lines += ["",
              f"step time      {t.step_seconds:8.3f} s  (compute {t.compute_seconds:.3f} s, all-to-all "
              f"{t.all_to_all_seconds:.3f} s, gradient sync {t.grad_sync_seconds:.3f} s of which "
              f"{t.exposed_sync_seconds:.3f} s exposed, optimizer {t.optimizer_seconds:.3f} s)",
              f"throughput     {t.tokens_per_second:,.0f} tokens/s, "
              f"{t.tokens_per_second / m.seq_len:,.1f} samples/s, MFU {t.mfu:.1%}",
              f"cost           ${cost.run_cost:,.0f} per run of {train.total_tokens / 1e9:,.0f}B tokens "
              f"({cost.run_hours:,.1f} h on {cost.nodes} x {cost.instance}), "
              f"${cost.cost_per_billion_tokens:,.2f} per billion tokens",
              "assumptions:"]
    lines += [f"  - {text}" for text in t.assumptions + [cost.source]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the GPU check


def device_hardware(name: str, total_memory: int) -> Hardware:
    """The profile of a CUDA device from its name and memory; unknown GPUs keep the A100's
    rates (only the memory matters for the fit check)."""
    family = next((k for k in ("H200", "H100", "A100") if k in name.upper()), None)
    if family is not None:
        known = [hw for key, hw in HARDWARE.items() if key.startswith(family.lower())]
        best = min(known, key=lambda hw: abs(hw.memory - total_memory))
        if abs(best.memory - total_memory) < 0.1 * total_memory:
            return best
    return dataclasses.replace(HARDWARE["a100-40gb"], name=name, memory=float(total_memory))


def check_fits(cfg: Config, hw: Hardware) -> MemoryEstimate:
    """Raise DoesNotFitError with the plan's verdict when ``cfg`` cannot fit ``hw``."""
    memory = estimate_memory(cfg, hw)
    if not memory.fits:
        fix = smallest_fix(cfg, hw)
        raise DoesNotFitError(
            f"{cfg.name} cannot train on {hw.name}: {verdict(memory)}; "
            + (f"it fits with {' '.join(fix)}" if fix else "no smaller setting fits it")
            + f" (see `raymoe plan {cfg.name} --gpu ...`)")
    return memory
