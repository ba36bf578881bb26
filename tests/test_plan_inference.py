"""`raymoe plan --inference`: the bytes a decode step reads and a rank holds, against what
raymoe's model holds and reads on the CPU (fp32: the planner's CPU profile), at EP 1 in
this process and at EP 2 on two gloo ranks; and the reference's question answered."""

from __future__ import annotations

import pytest
import torch
from multiproc import run_distributed

from raymoe.cli import main
from raymoe.config import load_config
from raymoe.model import GPT
from raymoe.model.resident import ResidentBytes, resident_bytes
from raymoe.plan.inference import decode_bytes, estimate_decode, experts_touched

CONFIG = ["model.moe.num_experts=8", "model.seq_len=64"]


def test_a_decode_step_reads_and_holds_what_the_planner_says():
    cfg = load_config("tiny-moe8", CONFIG)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    planned = decode_bytes(cfg, 4, gpus=1, batch=1)  # fp32 on the CPU
    held = resident_bytes(model)
    assert planned.weights_held == pytest.approx(held.total, rel=0.15)

    # One token decoded with a full context: every dense weight, one expert per MoE layer
    # (top-1 of one token), and the whole KV cache.
    context = cfg.model.seq_len - 1
    cache = model.new_cache(1, cfg.model.seq_len, torch.zeros(1, dtype=torch.long))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, context)), cache=cache)
        stats = model(torch.randint(0, 256, (1, 1)), cache=cache).moe_stats
    expert_bytes = held.experts / (len(stats) * cfg.model.moe.num_experts)
    touched = sum(int((s.tokens_per_expert > 0).sum()) for s in stats)
    kv = cache.keys.nbytes + cache.values.nbytes
    read = held.dense + touched * expert_bytes + kv
    assert touched == len(stats) == 2
    assert planned.kv_held == pytest.approx(kv, rel=0.15)
    assert planned.read == pytest.approx(read, rel=0.15)


def _held_at_ep_2(rank: int, world: int) -> ResidentBytes:
    from raymoe.parallel.build import build_model
    from raymoe.parallel.mesh import Mesh

    cfg = load_config("tiny-moe8", [*CONFIG, "parallel.ep_size=2"])
    torch.manual_seed(0)
    return resident_bytes(build_model(cfg, Mesh(ep_size=2), torch.device("cpu")))


def test_an_ep_2_rank_holds_what_the_planner_says(tmp_path):
    cfg = load_config("tiny-moe8", CONFIG)
    held = run_distributed(_held_at_ep_2, 2, tmp_path)
    planned = decode_bytes(cfg, 4, gpus=2, batch=2)
    assert planned.ep == 2
    for rank in held:
        assert planned.weights_held == pytest.approx(rank.total, rel=0.15)
    assert held[0].experts == resident_bytes(GPT(cfg.model)).experts // 2


def test_experts_touched_is_the_expected_count_of_distinct_choices():
    assert experts_touched(1, 128) == pytest.approx(1.0)
    assert experts_touched(64, 128) == pytest.approx(128 * (1 - (127 / 128) ** 64))
    assert experts_touched(10_000, 8) == pytest.approx(8.0)


def test_more_gpus_speed_up_the_moe_model_and_not_the_dense_one():
    moe, dense = load_config("gpt-1.3b-moe128"), load_config("gpt-6.7b")
    at = {g: estimate_decode(moe, "a100-40gb", g, 64) for g in (4, 8, 16, 64)}
    assert at[4].step_seconds > at[8].step_seconds > at[16].step_seconds > at[64].step_seconds
    assert not estimate_decode(moe, "a100-40gb", 2, 64).fits  # 52B parameters need 4 A100s
    one = estimate_decode(dense, "a100-40gb", 1, 1)
    assert estimate_decode(dense, "a100-40gb", 16, 1).step_seconds == one.step_seconds
    # no GPU count changes what a batch of one reads: the dense weights and one expert a layer
    assert decode_bytes(moe, 2, 128, 1).read == decode_bytes(moe, 2, 4, 1).read


def test_the_cli_answers_the_references_question(capsys):
    assert main(["plan", "gpt-1.3b-moe128", "--inference", "--gpu", "a100-40gb"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:]].count("gpt-6.7b") == 16  # 8 GPU counts x 2 batches
    for batch in (1, 64):
        line = next(li for li in lines if li.startswith(f"batch {batch}:"))
        assert "gpt-1.3b-moe128 decodes as fast as gpt-6.7b from" in line
    assert "NCCL over NVLink" in lines[-1]
