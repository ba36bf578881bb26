"""Decode speed on N GPUs from the bytes each device reads per generated token: the
reference's inference question. A MoE model holds several times the parameters of the
dense model of equal quality; must it decode that much slower? Decoding a batch of B
sequences reads, per step, every weight the step uses and every cached key and value:
memory-bound, so what counts is the bytes the busiest device reads, not the FLOPs. The
experts spread over N devices each read 1/N of the experts the batch touches, so the MoE
model gets faster with N, while a dense model (raymoe has no tensor parallelism: it is
replicated, the batch split) reads its whole weights on every device at any N.

Assumptions (printed with the estimate): weights and the KV cache in the GPU's compute
dtype (bf16); top-k routing spreads a batch's tokens uniformly over the experts; the batch's
rows split evenly over the devices (raymoe's row-split inference groups); HBM reads at
``MEMORY_EFFICIENCY`` of peak; per MoE layer two all-to-all exchanges per step (dispatch and
combine, raymoe's block exchange: a block of top-k x rows to every device of the group),
or three where the blocks pass BLOCK_EXCHANGE_BYTES (the counts first, then only the
rows), each of fixed latency ``ALL_TO_ALL_LATENCY`` plus its bytes on NVLink (inside a
node: NCCL over NVLink, tens of microseconds) or the network; no kernel-launch overhead
(CUDA graphs), no prompt processing."""

from __future__ import annotations

import math
from dataclasses import dataclass

from raymoe.config import Config
from raymoe.model.dispatch import BLOCK_EXCHANGE_BYTES, block_exchange_bytes
from raymoe.plan.hardware import GB, Hardware, PlanError, hardware
from raymoe.plan.sizes import model_shape
from raymoe.plan.timing import ALL_TO_ALL_LATENCY, COMPUTE_EFFICIENCY

EQUAL_QUALITY = {"gpt-350m-moe128": "gpt-1.3b", "gpt-1.3b-moe128": "gpt-6.7b"}
"""The dense model each reference MoE model matches in validation loss (DeepSpeed-MoE for
NLG): what `raymoe plan --inference` compares it with unless told otherwise."""
MEMORY_EFFICIENCY = 0.8
"""Share of peak HBM bandwidth a decode step's reads reach (an assumption)."""


@dataclass(frozen=True)
class DecodeBytes:
    """What the busiest device of ``gpus`` holds and reads in one decode step of ``batch``
    sequences at ``context`` tokens, with ``width``-byte weights and cache."""

    gpus: int
    ep: int
    batch: int
    context: int
    weights_held: float
    kv_held: float
    dense_read: float
    expert_read: float
    rows: int
    """Sequences the busiest device decodes."""
    exchange_bytes: float
    """Bytes one all-to-all sends from a device."""
    exchanges_per_moe_layer: int

    @property
    def held(self) -> float:
        return self.weights_held + self.kv_held

    @property
    def read(self) -> float:
        """One token of each of its rows: the weights the step uses and the whole cache."""
        return self.dense_read + self.expert_read + self.kv_held


@dataclass(frozen=True)
class DecodeEstimate:
    name: str
    bytes: DecodeBytes
    exchange_seconds: float
    compute_seconds: float
    step_seconds: float
    fits: bool

    @property
    def tokens_per_second(self) -> float:
        return self.bytes.batch / self.step_seconds


def experts_touched(tokens: int, num_experts: int) -> float:
    """Expected distinct experts that ``tokens`` uniformly routed choices reach."""
    return num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** tokens)


def decode_bytes(cfg: Config, width: int, gpus: int, batch: int, context: int = 0) -> DecodeBytes:
    """A MoE model's experts spread over an EP group of ``gpus`` (at most one expert per
    device: a larger N replicates the group), a dense model replicated, the batch's rows
    split over the devices; ``context`` defaults to the model's sequence length."""
    m, moe = cfg.model, cfg.model.moe
    context = context or m.seq_len
    ep = math.gcd(gpus, moe.num_experts) if moe.enabled else 1
    shape = model_shape(_with_ep(cfg, ep))
    rows = math.ceil(batch / gpus)
    expert_read = 0.0
    if moe.enabled:
        group_tokens = min(batch, rows * ep) * moe.top_k  # the tokens one EP group routes per step
        per_device = min(math.ceil(experts_touched(group_tokens, moe.num_experts) / ep), shape.local_experts)
        expert_read = shape.moe_layers * per_device * shape.expert_params * width
    return DecodeBytes(gpus, ep, batch, context,
                       weights_held=(shape.dense_params + shape.local_expert_params) * width,
                       kv_held=rows * 2 * m.n_layer * context * m.d_model * width,
                       dense_read=shape.dense_params * width, expert_read=expert_read, rows=rows,
                       **_exchange(ep, rows * moe.top_k, m.d_model, width))


def _exchange(ep: int, assignments: int, d_model: int, width: int) -> dict[str, int]:
    """What a device sends per exchange of a decode step, and how many exchanges (see
    raymoe.model.dispatch): blocks where they fit, else counts and then only the rows."""
    blocks = block_exchange_bytes(ep, assignments, d_model, width)
    if blocks <= BLOCK_EXCHANGE_BYTES:
        return {"exchange_bytes": blocks, "exchanges_per_moe_layer": 2}
    return {"exchange_bytes": assignments * d_model * width, "exchanges_per_moe_layer": 3}


def estimate_decode(cfg: Config, gpu: str | Hardware, gpus: int, batch: int, context: int = 0) -> DecodeEstimate:
    """Latency per generated token and throughput of ``decode_bytes`` on a GPU type."""
    hw = hardware(gpu)
    if not hw.is_gpu:
        raise PlanError("decode time is predicted for GPUs only")
    b = decode_bytes(cfg, hw.compute_bytes, gpus, batch, context)
    shape = model_shape(_with_ep(cfg, b.ep))
    exchange = (b.exchanges_per_moe_layer * shape.moe_layers * _all_to_all_seconds(hw, b.ep, b.exchange_bytes)
                if b.ep > 1 else 0.0)
    memory_seconds = b.read / (hw.hbm_bandwidth * MEMORY_EFFICIENCY)
    compute_seconds = 2 * shape.active_params * b.rows / (hw.peak_flops * COMPUTE_EFFICIENCY)
    step = max(memory_seconds, compute_seconds) + exchange
    return DecodeEstimate(cfg.name, b, exchange, compute_seconds, step, b.held + hw.overhead <= hw.memory)


def _with_ep(cfg: Config, ep: int) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, ep_size=ep))


def _all_to_all_seconds(hw: Hardware, ep: int, nbytes: float) -> float:
    """One exchange of ``nbytes`` per device over an EP group: its fixed latency plus the
    bytes that leave the device, on NVLink inside a node, the network across nodes."""
    in_node = min(ep, hw.gpus_per_node)
    off_node = nbytes * (ep - in_node) / ep
    on_node = nbytes * (in_node - 1) / ep
    return ALL_TO_ALL_LATENCY + max(off_node / (hw.network_bandwidth / hw.gpus_per_node),
                                    on_node / hw.nvlink_bandwidth)


def gpu_counts(cfg: Config, most: int = 128) -> list[int]:
    """Powers of two up to ``most`` (a MoE model's up to its expert count as well)."""
    top = min(most, cfg.model.moe.num_experts) if cfg.model.moe.enabled else most
    return [2**i for i in range(int(math.log2(top)) + 1)]


def gpus_to_match(moe: Config, dense: Config, gpu: str | Hardware, batch: int, context: int = 0) -> int | None:
    """The fewest GPUs on which ``moe`` fits and decodes a batch at least as fast as
    ``dense`` does on as many GPUs (where the dense model fits); None if no count does."""
    for gpus in gpu_counts(moe):
        ours = estimate_decode(moe, gpu, gpus, batch, context)
        theirs = estimate_decode(dense, gpu, gpus, batch, context)
        if ours.fits and theirs.fits and ours.step_seconds <= theirs.step_seconds:
            return gpus
    return None


def format_decode(estimates: list[DecodeEstimate]) -> str:
    lines = [f"{'model':<18}{'GPUs':>5}{'EP':>5}{'batch':>7}{'fits':>6}{'GB held':>9}"
             f"{'GB read/step':>14}{'exchange ms':>13}{'ms/token':>10}{'tokens/s':>11}"]
    for e in estimates:
        b = e.bytes
        lines.append(f"{e.name:<18}{b.gpus:>5}{b.ep:>5}{b.batch:>7}{'yes' if e.fits else 'no':>6}"
                     f"{b.held / GB:>9.1f}{b.read / GB:>14.2f}{e.exchange_seconds * 1e3:>13.2f}"
                     f"{e.step_seconds * 1e3:>10.2f}{e.tokens_per_second:>11,.0f}")
    return "\n".join(lines)


ASSUMPTIONS = (
    f"assumptions: decoding is memory-bound: each step reads the busiest device's weights in use and KV cache "
    f"at {MEMORY_EFFICIENCY:.0%} of HBM bandwidth (FLOPs at {COMPUTE_EFFICIENCY:.0%} of peak when larger); "
    "bf16 weights and cache; a batch's tokens spread uniformly over the experts and its rows evenly over "
    f"the devices; 2 all-to-alls per MoE layer and step, {ALL_TO_ALL_LATENCY * 1e6:.0f} us each plus their "
    "bytes: to each device a block of top-k x the busiest device's rows (3 all-to-alls where that passes "
    f"{BLOCK_EXCHANGE_BYTES // 2**20} MiB a device: counts first, then only the rows), inside a node NCCL "
    "over NVLink (microseconds), across nodes the network; a dense model is "
    "replicated (no tensor parallelism), so more GPUs do not lower its latency; no kernel-launch overhead "
    "(CUDA graphs), no prompt processing; context = the model's sequence length unless given")
