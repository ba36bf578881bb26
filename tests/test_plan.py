"""`raymoe plan` and raymoe.plan: parameter counts against the model, the reference presets
on the cluster's GPU, the verdict and its exit status, the smallest fix, cost from the
cluster YAML, the time model's behaviour and the check that stops training on a GPU."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch
import yaml

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
    make_plan,
    model_shape,
    smallest_fix,
)
from raymoe.plan.cost import INSTANCE_PRICES, SPOT_SHARE
from raymoe.plan.evaluation import OBJECT_STORE_SHARE, TASK_TOKENS, estimate_eval, ray_memory
from raymoe.plan.memory import dispatch_rows
from raymoe.study.plan import plan_study, schedule_hours
from raymoe.study.spec import load_study

REPO = Path(__file__).resolve().parents[1]

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
    # checkpointed at EP > 1, each MoE layer keeps what its two exchanges returned (on CPU,
    # fp32 rows; at EP 16 and 1 the expert FFN runs in 8 chunks alike)
    at_ep = {ep: estimate_memory(with_overrides(base, ["model.activation_checkpointing=true",
                                                       f"parallel.ep_size={ep}"]), "cpu") for ep in (1, 16)}
    rows = dispatch_rows(base, base.train.micro_batch * base.model.seq_len, no_drop=False)
    kept = shape.moe_layers * 2 * rows * base.model.d_model * 4
    assert at_ep[16].moe_dispatch - at_ep[1].moe_dispatch == pytest.approx(kept)


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
    # checkpointing recomputes the dense work, not the exchanges
    plain, checkpointed = (estimate_time(with_overrides(cfg, [f"model.activation_checkpointing={on}"]), "a100-40gb")
                           for on in ("false", "true"))
    assert checkpointed.all_to_all_seconds == plain.all_to_all_seconds
    assert checkpointed.compute_seconds > plain.compute_seconds
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


def test_the_cluster_yamls_spot_nodes_are_priced_at_spot(tmp_path):
    cfg = load_config("gpt-350m")
    t = estimate_time(cfg, "a100-40gb")
    cost = estimate_cost(cfg, HARDWARE["a100-40gb"], t, CLUSTER_YAML)  # gpu_p4d_spot: p4d on the spot market
    assert cost.spot_price_per_hour == pytest.approx(INSTANCE_PRICES["p4d.24xlarge"] * SPOT_SHARE)
    assert cost.spot_run_cost == pytest.approx(cost.run_cost * SPOT_SHARE)
    on_demand_only = tmp_path / "cluster.yaml"
    on_demand_only.write_text("available_node_types:\n  gpu:\n    resources: {GPU: 8}\n"
                              "    node_config: {InstanceType: p4d.24xlarge}\n")
    assert estimate_cost(cfg, HARDWARE["a100-40gb"], t, on_demand_only).spot_price_per_hour is None
    assert estimate_cost(cfg, HARDWARE["a100-40gb"], t, CLUSTER_YAML, price_per_hour=10.0).spot_price_per_hour is None


def _study(tmp_path, models: list[dict], **settings) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"name": "s", "storage": str(tmp_path), "data": str(tmp_path / "data"),
                                    "tokens": 1_000_000_000, "models": models, **settings}))
    return str(path)


def _row(out: str, name: str) -> list[str]:
    return next(line.split() for line in out.splitlines() if line.split()[:1] == [name])


def test_a_study_plan_is_each_models_plan_and_their_sum(capsys, monkeypatch):
    """`raymoe plan STUDY` prints, for each model, what `raymoe plan CONFIG` prints for its
    config (the presets train the study's 300B tokens), and the totals are their sum."""
    monkeypatch.chdir(REPO)  # the study names its model configs relative to the repository
    study_file = "jobs/configs/study-reference.yaml"
    assert main(["plan", study_file, "--gpu", "a100-40gb"]) == 0
    out = capsys.readouterr().out
    study = load_study(study_file)
    singles = {}
    for model in study.models:
        assert main(["plan", model.config, "--gpu", "a100-40gb"]) == 0
        single = capsys.readouterr().out
        step, tokens_per_second = re.search(r"step time +([\d.]+) s.*\nthroughput +([\d,]+) tokens/s", single).groups()
        dollars, hours = re.search(r"cost +\$([\d,]+) per run of 300B tokens \(([\d.]+) h", single).groups()
        fits, gpus, *_ = _row(out, model.name)[1:]
        assert _row(out, model.name)[3:7] == [step, tokens_per_second, hours, "1"]
        assert _row(out, model.name)[8] == dollars and (fits, gpus) == ("yes", "128")
        singles[model.name] = make_plan(load_config(model.config), "a100-40gb")

    plan = plan_study(study, "a100-40gb")
    price = INSTANCE_PRICES["p4d.24xlarge"]
    evaluations = [m.evaluation for m in plan.models]
    assert all(e is not None and e.ep == 1 and e.nodes == 16 and e.hours > 0 for e in evaluations)
    eval_hours = sum(e.hours for e in evaluations if e)
    eval_cost = sum(e.hours * e.nodes * price for e in evaluations if e)
    assert plan.gpu_hours == pytest.approx(sum(p.cost.run_hours * 128 for p in singles.values()))
    assert plan.cost == pytest.approx(sum(p.cost.run_cost for p in singles.values()) + eval_cost)
    assert plan.spot_cost == pytest.approx(plan.cost * SPOT_SHARE)
    assert plan.wall_hours == pytest.approx(sum(p.cost.run_hours for p in singles.values()) + eval_hours)
    assert f"${plan.cost:,.0f} (${plan.spot_cost:,.0f} at spot)" in out
    assert f"wall time: {plan.wall_hours:,.1f} h (1 trial at a time" in out


def test_the_wall_time_follows_max_concurrent_trials(tmp_path):
    assert schedule_hours([5, 1, 1, 1], 2) == 5  # the short ones share the second slot
    assert schedule_hours([1, 1, 5], 2) == 6  # the third starts when the first slot frees
    assert schedule_hours([1, 2, 3], 1) == 6
    models = [{"name": "dense", "config": "gpt-350m"}, {"name": "moe", "config": "gpt-350m-moe128"}]
    one, two = (plan_study(load_study(_study(tmp_path, models, seeds=[1, 2], max_concurrent_trials=k)))
                for k in (1, 2))
    dense, moe = (m.plan.cost.run_hours for m in one.models)
    # the trials' token budget is the study's, as they will train it
    assert dense == pytest.approx(make_plan(load_config("gpt-350m", ["train.total_tokens=1e9"])).cost.run_hours)
    assert one.wall_hours == pytest.approx(2 * dense + 2 * moe)  # no evaluation section
    assert two.wall_hours == pytest.approx(dense + moe)  # each seed's trials side by side
    assert two.cost == pytest.approx(one.cost) and two.gpu_hours == pytest.approx(2 * 128 * (dense + moe))


def test_a_study_with_a_model_that_does_not_fit_exits_3_naming_it(tmp_path, capsys):
    study = _study(tmp_path, [{"name": "small", "config": "gpt-350m"},
                              {"name": "big-unsharded", "config": "gpt-6.7b", "overrides": ["parallel.shard=none"]}])
    with pytest.raises(SystemExit) as exit_:
        main(["plan", study, "--gpu", "a100-40gb"])
    assert exit_.value.code == 3
    out = capsys.readouterr().out
    assert _row(out, "small")[1] == "yes" and _row(out, "big-unsharded")[1] == "NO"
    assert "\nbig-unsharded does not fit: peak" in out and "smallest change that fits: parallel.shard=fsdp" in out
    assert "small does not fit" not in out


def test_a_study_with_a_bad_key_gets_the_studys_error(tmp_path, capsys):
    study = _study(tmp_path, [{"name": "small", "config": "gpt-350m"}], storag="runs")
    assert main(["plan", study]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raymoe: config error: {study}: unknown study keys ['storag'] (known: ")
    assert "unknown key" not in err


def test_the_plan_evaluates_on_the_ep_size_the_study_will_use():
    """The planner's EP size for a study's evaluation is the one raymoe.eval.runner picks
    from the nodes' Ray memory: on 64 GB nodes 1.3B+MoE-128 needs a group of 8."""
    from raymoe.eval.runner import expert_parallel_size

    cfg = load_config("gpt-1.3b-moe128")
    node = dataclasses.replace(HARDWARE["a100-40gb"], host_memory=64e9 / (1 - OBJECT_STORE_SHARE))
    assert ray_memory(node.host_memory) == pytest.approx(64e9)
    planned = estimate_eval(cfg, node, nodes=16, tasks=["piqa"])
    assert planned.ep == expert_parallel_size({"extra": {"config": cfg.to_dict()}, "uri": "x"}, [64 * 10**9] * 16) == 8
    assert (planned.nodes, planned.cpus) == (8, 8)  # one 1-CPU rank per node: two do not fit one
    whole = estimate_eval(cfg, HARDWARE["a100-40gb"], nodes=16, tasks=["piqa", "mine"], limit=100, max_nodes=4)
    assert (whole.ep, whole.nodes, whole.cpus, whole.uncounted) == (1, 4, 4 * 96, ["mine"])
    assert whole.tokens == pytest.approx(100 * TASK_TOKENS["piqa"][1])
