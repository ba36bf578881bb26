"""Memory, time and cost of a config on a GPU type, before anything runs.

A function of the config and the hardware: no process group, no Ray, no tensors. Every
figure is per rank (one GPU) and in decimal GB. The memory model follows what the code
allocates (see ``estimate_memory``); it was checked against torch's MemTracker at the
reference shapes and against the allocator's peak in real CPU training steps
(tests/test_plan_memory.py). The time model is FLOPs and bytes over peak rates with the
assumptions listed in ``TimeEstimate.assumptions``.

  hardware.py  the GPU profiles (and the CPU one), the planner's errors
  sizes.py     parameter counts per rank from the config
  memory.py    per-rank memory by term and by phase of the step
  timing.py    step time, tokens/s, MFU, all-to-all and gradient-sync time
  cost.py      dollars per run and per billion tokens at the cluster YAML's instance
               (and at spot when its nodes may be spot)
  evaluation.py  where a study's trained model is evaluated and for how long (CPUs)
  here         the plan: verdict, the smallest change that fits, the table, the GPU check
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from raymoe.config import Config, with_overrides
from raymoe.plan.cost import CLUSTER_YAML, CostEstimate, cluster_instance, estimate_cost
from raymoe.plan.hardware import GB, HARDWARE, DoesNotFitError, Hardware, PlanError, cpu_hardware, hardware
from raymoe.plan.memory import MemoryEstimate, estimate_memory, with_workers
from raymoe.plan.sizes import Shape, model_shape
from raymoe.plan.timing import TimeEstimate, estimate_time, flops_per_token

__all__ = [
    "CLUSTER_YAML", "GB", "HARDWARE", "CostEstimate", "DoesNotFitError", "Hardware", "MemoryEstimate",
    "Plan", "PlanError", "Shape", "TimeEstimate", "check_fits", "cluster_instance", "cpu_hardware",
    "device_hardware", "estimate_cost", "estimate_memory", "estimate_time", "flops_per_token",
    "fix_text", "format_plan", "hardware", "make_plan", "model_shape", "smallest_fix", "verdict",
]

def _fix_candidates(cfg: Config) -> list[list[str]]:
    """Setting changes that lower memory, each a list of overrides, fewest changes first."""
    single: list[list[str]] = []
    if not cfg.model.activation_checkpointing:
        single.append(["model.activation_checkpointing=true"])
    if cfg.parallel.shard == "none":
        single.append(["parallel.shard=fsdp"])
    elif cfg.parallel.grad_sync == "last_micro_batch":
        single.append(["parallel.grad_sync=every_micro_batch"])
    batches = []
    micro = cfg.train.micro_batch
    per_rank = cfg.train.global_batch // cfg.parallel.max_workers
    for smaller in range(micro - 1, 0, -1):
        if per_rank % smaller == 0:
            batches.append([f"train.micro_batch={smaller}"])
    combos: list[list[str]] = []
    for i, a in enumerate(single):
        combos += [a + b for b in single[i + 1:]] + [a + b for b in batches]
    if len(single) == 2:
        combos += [single[0] + single[1] + b for b in batches]
    if cfg.parallel.shard == "none" and cfg.parallel.grad_sync == "last_micro_batch":
        combos.append(["parallel.shard=fsdp", "parallel.grad_sync=every_micro_batch"])
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
    cfg = with_workers(cfg, workers)
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


def fix_text(plan: Plan) -> str:
    """The smallest change that makes the plan's config fit, as overrides."""
    return (" ".join(plan.fix) if plan.fix else
            "none of checkpointing, sharding and a smaller micro-batch; use GPUs with more memory")


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
        lines.append(f"smallest change that fits: {fix_text(plan)}")
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
