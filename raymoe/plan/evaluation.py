"""A study's evaluation, before it runs: where each trained model is scored (one actor per
node holding the whole model, or an expert-parallel group of 1-CPU ranks when no node holds
it, as raymoe.study.evaluate does) and for how long on the nodes' CPUs (fp32)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from raymoe.config import Config
from raymoe.eval.tasks import TASKS
from raymoe.plan.hardware import GB, Hardware, PlanError
from raymoe.plan.sizes import model_shape
from raymoe.plan.timing import flops_per_token

TASK_TOKENS: dict[str, tuple[int, float]] = {
    "lambada": (5153, 83.5),
    "piqa": (1838, 59.7),
    "boolq": (3270, 141.0),
    # RACE-h's test set is not at hand: its 1,045 articles of 353 words on average (the RACE
    # paper), each with its earlier questions and answers, the last question and four options
    "race_h": (1045, 560.0),
    "triviaqa": (3000, 23.1),
    "webqs": (2032, 14.6),
}
"""Examples of each reference task's published file (the one raymoe.eval.tasks reads) and
the GPT-2 tokens the scorer reads per example: the context once and every choice, or the
continuation; a generation task adds its new tokens. Counted on those files, except RACE-h."""

CPU_FLOPS = 20e9
"""fp32 FLOP/s one Ray CPU (a vCPU) gives the scorer: about half of what torch's fp32
products reach on one thread of a current x86 core, the rest lost to attention, small
batches and decoding (an assumption, not measured on the nodes)."""

OBJECT_STORE_SHARE, OBJECT_STORE_MAX = 0.3, 200e9
"""Ray's default object store: 30% of a node's memory, at most 200 GB; the rest is the
node's `memory` resource, which the evaluation's actors reserve."""


def inference_bytes(dense_params: int, expert_params: int, ep: int = 1) -> int:
    """Memory one process needs to evaluate a model holding 1/``ep`` of its experts: that
    part of the model in fp32 twice over (the model, and the checkpoint's tensors being
    copied into it)."""
    return 2 * 4 * (dense_params + expert_params // ep)


def smallest_expert_parallel_size(num_experts: int, need: Callable[[int], int],
                                  node_memory: Sequence[float]) -> int | None:
    """1 when one node holds the whole model (``need(1)`` bytes), else the smallest EP size
    that divides the experts and whose ranks (``need(ep)`` bytes each) fit on the nodes,
    one rank per node at least; None when none does."""
    for ep in [1] + [e for e in range(2, num_experts + 1) if num_experts % e == 0]:
        if sum(memory // need(ep) for memory in node_memory) >= ep:
            return ep
    return None


def ray_memory(host_memory: float) -> float:
    """A node's Ray `memory` resource: what its default object store leaves."""
    return host_memory - min(OBJECT_STORE_SHARE * host_memory, OBJECT_STORE_MAX)


@dataclass(frozen=True)
class EvalEstimate:
    ep: int
    nodes: int
    """Nodes the evaluation holds."""
    cpus: int
    """CPUs that score."""
    tokens: float
    hours: float
    uncounted: list[str]
    """Tasks of unknown size (not in TASK_TOKENS), left out of the hours."""


def estimate_eval(cfg: Config, hw: Hardware, nodes: int, tasks: list[str], limit: int | None = None,
                  max_new_tokens: int = 32, max_nodes: int = 0, ep: int = 0) -> EvalEstimate:
    """The evaluation of one trained ``cfg`` on ``nodes`` nodes of ``hw.instance``: one actor
    per node (at most ``max_nodes``; 0: all) with all its CPUs, or an expert-parallel group
    of ``ep`` 1-CPU ranks (0: the smallest whose ranks fit the nodes)."""
    shape = model_shape(cfg)
    moe = cfg.model.moe
    experts = shape.expert_params * moe.num_experts * shape.moe_layers

    def need(size: int) -> int:
        return inference_bytes(shape.dense_params, experts, size)

    memory = ray_memory(hw.host_memory)
    size = (ep or smallest_expert_parallel_size(moe.num_experts, need, [memory] * nodes)) if moe.enabled else 1
    if size is None:
        raise PlanError(f"{cfg.name}: no expert-parallel size fits its evaluation on {nodes} x "
                        f"{hw.instance} ({memory / GB:.0f} GB of Ray memory each): even at EP "
                        f"{moe.num_experts} a rank needs {need(moe.num_experts) / GB:.0f} GB")
    if size == 1:
        held = min(max_nodes or nodes, nodes)
        cpus = held * hw.host_cpus
    else:
        cpus = size
        held = math.ceil(size / max(int(memory // need(size)), 1))
    counted = [t for t in tasks if t in TASK_TOKENS]
    tokens = 0.0
    for task in counted:
        examples, per_example = TASK_TOKENS[task]
        generated = max_new_tokens if TASKS[task].kind == "generation" else 0
        tokens += min(limit or examples, examples) * (per_example + generated)
    forward_flops = flops_per_token(cfg) / 3  # training counts forward + backward (3 x forward)
    hours = tokens * forward_flops / (cpus * CPU_FLOPS) / 3600
    return EvalEstimate(size, held, cpus, tokens, hours, [t for t in tasks if t not in TASK_TOKENS])
