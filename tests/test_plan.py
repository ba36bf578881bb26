"""`raymoe plan` and raymoe.plan: parameter counts against the model, the reference presets
on the cluster's GPU, the verdict and its exit status, the smallest fix, cost from the
cluster YAML, the time model's behaviour and the check that stops training on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from raymoe.cli import main
from raymoe.config import PRESETS, load_config, with_overrides
from raymoe.model import GPT
from raymoe.model.moe import is_expert_parameter
from raymoe.parallel.exchange import ProcessGroupExchange
from raymoe.plan import (
    CLUSTER_YAML,
    GB,
    HARDWARE,
    DoesNotFitError,
    PlanError,
    check_fits,
    device_hardware,
    estimate_cost,
    estimate_memory,
    estimate_time,
    model_shape,
    smallest_fix,
)

REFERENCE = ["gpt-350m", "gpt-350m-moe128", "gpt-1.3b", "gpt-1.3b-moe128", "gpt-6.7b"]


@pytest.mark.parametrize("name, overrides", [
    ("tiny", []), ("tiny-moe8", ["parallel.ep_size=2"]),
    ("gpt-350m-moe128", ["model.moe.top_k=2", "model.moe.every=3"]), ("gpt-1.3b-moe128", []),
])
def test_parameter_counts_match_the_model(name, overrides):
    cfg = load_config(name, overrides)
    exchange = ProcessGroupExchange(None, cfg.parallel.ep_size, 0) if cfg.parallel.ep_size > 1 else None
    with torch.device("meta"):
        model = GPT(cfg.model, exchange)
    dense = sum(p.numel() for n, p in model.named_parameters() if not is_expert_parameter(n))
    experts = sum(p.numel() for n, p in model.named_parameters() if is_expert_parameter(n))
    shape = model_shape(cfg)
    assert (shape.dense_params, shape.local_expert_params) == (dense, experts)
    assert shape.active_params == model.num_parameters(active_only=True)


def _as_the_reference_runs(name: str) -> list[str]:
    """Sharding and checkpointing as the reference scripts run, where the preset does not
    already set them."""
    preset = PRESETS[name]
    overrides = []
    if preset["parallel"].get("shard", "none") != "fsdp":
        overrides.append("parallel.shard=fsdp")
    if not preset["model"].get("activation_checkpointing", False):
        overrides.append("model.activation_checkpointing=true")
    return overrides


@pytest.mark.parametrize("name", REFERENCE)
def test_every_reference_preset_fits_the_cluster_gpu(name, capsys):
    assert main(["plan", name, *_as_the_reference_runs(name), "--gpu", "a100-40gb", "--workers", "128"]) == 0
    out = capsys.readouterr().out
    assert "fits: peak" in out and "does not fit" not in out
    assert "p4d.24xlarge" in out and "per billion tokens" in out


def test_gpt_6_7b_unsharded_does_not_fit_and_exits_3(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "gpt-6.7b", "--gpu", "a100-40gb", "parallel.shard=none"])
    assert exit_.value.code == 3
    out = capsys.readouterr().out
    assert "does not fit" in out
    fix = out.split("smallest change that fits: ")[1].splitlines()[0].split()
    cfg = load_config("gpt-6.7b", ["parallel.shard=none"])
    assert not estimate_memory(cfg).fits
    assert estimate_memory(with_overrides(cfg, fix)).fits


def test_the_fix_is_the_fewest_changes_and_the_fastest_of_those():
    cfg = load_config("gpt-1.3b", ["parallel.shard=none", "model.activation_checkpointing=false"])
    fix = smallest_fix(cfg, "a100-40gb")
    assert fix is not None and estimate_memory(with_overrides(cfg, fix), "a100-40gb").fits
    candidates = [["model.activation_checkpointing=true"], ["parallel.shard=fsdp"],
                  ["train.micro_batch=2"], ["train.micro_batch=1"]]
    fitting = [c for c in candidates if estimate_memory(with_overrides(cfg, c), "a100-40gb").fits]
    if fitting:
        assert len(fix) == 1
        speed = {tuple(c): estimate_time(with_overrides(cfg, c), "a100-40gb").tokens_per_second
                 for c in fitting}
        assert speed[tuple(fix)] == max(speed.values())
    else:
        assert len(fix) > 1


def test_memory_terms_follow_the_settings():
    base = load_config("gpt-1.3b-moe128", ["parallel.shard=none", "model.activation_checkpointing=false"])
    plain = estimate_memory(base)
    sharded = estimate_memory(with_overrides(base, ["parallel.shard=fsdp"]))
    checkpointed = estimate_memory(with_overrides(base, ["model.activation_checkpointing=true"]))
    smaller = estimate_memory(with_overrides(base, ["train.micro_batch=2"]))
    # fsdp divides the dense states over 128 ranks; the experts (EP 128) have one replica each
    shape = model_shape(base)
    assert plain.optimizer_states == pytest.approx(8 * (shape.dense_params + shape.local_expert_params))
    sharded_params = shape.dense_params / 128 + shape.local_expert_params
    assert sharded.optimizer_states == pytest.approx(8 * sharded_params)
    assert checkpointed.activations < plain.activations / 4
    assert smaller.activations == pytest.approx(plain.activations / 2, rel=0.01)
    assert smaller.logits_loss == pytest.approx(plain.logits_loss / 2)
    # not dropping tokens counts the worst case: every token of the EP group on one expert
    no_drop = estimate_memory(with_overrides(base, ["model.moe.drop_tokens=false"]))
    assert no_drop.moe_dispatch_no_drop == plain.moe_dispatch_no_drop > 100 * plain.moe_dispatch
    assert no_drop.peak > no_drop.moe_dispatch_no_drop > plain.peak
    assert estimate_memory(load_config("gpt-1.3b")).moe_dispatch == 0


def test_workers_change_the_sharded_share():
    cfg = load_config("gpt-1.3b", ["parallel.shard=fsdp"])
    at_128 = estimate_memory(cfg, "a100-40gb", workers=128)
    at_64 = estimate_memory(cfg, "a100-40gb", workers=64)
    assert at_64.parameters == pytest.approx(2 * at_128.parameters)


def test_time_model_behaves():
    cfg = load_config("gpt-1.3b-moe128", ["parallel.shard=fsdp"])
    t = estimate_time(cfg, "a100-40gb")
    assert t.tokens_per_second == pytest.approx(cfg.train.global_batch * cfg.model.seq_len / t.step_seconds)
    assert 0 < t.mfu < 1
    assert t.all_to_all_seconds > 0
    # an EP group inside one node uses NVLink: much faster than across 16 nodes of EFA
    in_node = estimate_time(with_overrides(cfg, ["parallel.ep_size=8"]), "a100-40gb")
    assert in_node.all_to_all_seconds < t.all_to_all_seconds / 5
    assert estimate_time(load_config("gpt-1.3b"), "a100-40gb").all_to_all_seconds == 0
    # an H100 computes faster than an A100; unsharded sync is all exposed
    assert estimate_time(cfg, "h100-80gb").compute_seconds < t.compute_seconds / 2
    unsharded = estimate_time(with_overrides(cfg, ["parallel.shard=none"]), "a100-40gb")
    assert unsharded.exposed_sync_seconds == unsharded.grad_sync_seconds > 0


def test_cost_uses_the_cluster_yaml_instance(tmp_path):
    cfg = load_config("gpt-350m")
    t = estimate_time(cfg, "a100-40gb")
    cost = estimate_cost(cfg, HARDWARE["a100-40gb"], t, CLUSTER_YAML)
    assert cost.instance == "p4d.24xlarge" and cost.nodes == 16
    assert cost.run_cost == pytest.approx(cfg.train.total_tokens / t.tokens_per_second / 3600 * 16 * 32.77)
    assert cost.cost_per_billion_tokens == pytest.approx(cost.run_cost / (cfg.train.total_tokens / 1e9))
    odd = tmp_path / "cluster.yaml"
    odd.write_text("available_node_types:\n  gpu:\n    resources: {GPU: 8}\n"
                   "    node_config: {InstanceType: p4d.24xlarge}\n")
    assert estimate_cost(cfg, HARDWARE["a100-40gb"], t, odd, price_per_hour=10.0).run_cost == pytest.approx(
        cost.run_cost * 10.0 / 32.77)
    # another GPU than the YAML's is priced on the instance that carries it
    assert estimate_cost(cfg, HARDWARE["h100-80gb"], t, CLUSTER_YAML).instance == "p5.48xlarge"
    unknown = dataclasses.replace(HARDWARE["a100-40gb"], name="custom", instance="x9.metal")
    with pytest.raises(PlanError, match="--price-per-hour"):
        estimate_cost(cfg, unknown, t, tmp_path / "absent.yaml")


def test_an_unknown_gpu_is_named():
    with pytest.raises(PlanError, match="'v100'"):
        estimate_memory(load_config("tiny"), "v100")


def test_training_stops_before_the_first_step_when_the_gpu_is_too_small():
    a100 = device_hardware("NVIDIA A100-SXM4-40GB", 42_505_273_344)
    assert a100 == HARDWARE["a100-40gb"]
    assert device_hardware("NVIDIA A100-SXM4-80GB", 85_100_000_000) == HARDWARE["a100-80gb"]
    assert device_hardware("NVIDIA H200", 150_000_000_000) == HARDWARE["h200-141gb"]
    other = device_hardware("NVIDIA L4", 24_000_000_000)
    assert other.memory == 24_000_000_000 and other.name == "NVIDIA L4"
    cfg = load_config("gpt-1.3b", ["parallel.shard=none", "model.activation_checkpointing=false"])
    with pytest.raises(DoesNotFitError, match="gpt-1.3b cannot train on a100-40gb: does not fit.*fits with"):
        check_fits(cfg, a100)
    fits = check_fits(with_overrides(cfg, ["parallel.shard=fsdp"]), a100)
    assert fits.peak < 40 * GB
