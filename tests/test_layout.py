"""Elastic layouts: the EP size, the worker count and the accumulation each group size
gets, and the config rules of parallel.num_workers: [MIN, MAX]."""

from __future__ import annotations

import pytest

from raymoe.config import ConfigError, load_config
from raymoe.plan import make_plan
from raymoe.train.layout import expert_parallel_size, full_size, layout_config, plan_layout


def elastic(*overrides: str):
    return load_config("tiny-moe8", ["parallel.num_workers=[2, 8]",
                                     "train.global_batch=16", "train.micro_batch=2", *overrides])


@pytest.mark.parametrize("workers,experts,largest,expected", [
    (8, 8, 8, 8), (6, 8, 8, 2), (4, 8, 2, 2), (3, 8, 8, 1), (12, 128, 128, 4),
    (120, 128, 128, 8), (128, 128, 64, 64), (5, 0, 1, 1)])
def test_ep_is_the_largest_divisor_of_workers_and_experts_within_ep_size(workers, experts,
                                                                          largest, expected):
    assert expert_parallel_size(workers, experts, largest) == expected


def test_each_group_size_keeps_the_global_batch():
    cfg = elastic("parallel.ep_size=4")  # 8 micro-batches of 2 per step
    got = {w: (plan_layout(cfg, w).workers, plan_layout(cfg, w).ep_size,
               plan_layout(cfg, w).accumulation) for w in range(2, 9)}
    assert got == {2: (2, 2, 4), 3: (2, 2, 4), 4: (4, 4, 2), 5: (4, 4, 2), 6: (4, 4, 2),
                   7: (4, 4, 2), 8: (8, 4, 1)}
    for w, (workers, _, accumulation) in got.items():
        assert workers * accumulation * cfg.train.micro_batch == cfg.train.global_batch, w


def test_a_skipped_size_says_why():
    layout = plan_layout(elastic("parallel.ep_size=8"), 7)
    assert (layout.available, layout.workers) == (7, 4)
    assert layout.skipped == tuple(
        f"{w} workers cannot keep the global batch: its 8 micro-batches (train.global_batch 16 / "
        f"train.micro_batch 2) do not split evenly over {w}" for w in (7, 6, 5))
    assert layout.describe() == "4 workers, EP 4, 2 micro-batches of 2 each"


def test_the_layout_runs_as_a_fixed_config():
    cfg = layout_config(elastic("parallel.ep_size=8"), plan_layout(elastic("parallel.ep_size=8"), 6))
    assert (cfg.parallel.num_workers, cfg.parallel.ep_size, cfg.parallel.elastic) == (4, 4, False)
    assert full_size(elastic()).parallel.num_workers == 8


def test_the_planner_sizes_an_elastic_reference_run_at_its_largest_group():
    cfg = load_config("gpt-1.3b-moe128")
    assert (cfg.parallel.min_workers, cfg.parallel.max_workers) == (64, 128)
    plan = make_plan(cfg, "a100-40gb")
    assert plan.cfg.parallel.num_workers == 128 and plan.cfg.parallel.ep_size == 128
    assert make_plan(cfg, "a100-40gb", workers=120).cfg.parallel.num_workers == 64


@pytest.mark.parametrize("overrides,message", [
    (["parallel.num_workers=[4, 2]"], r"^parallel\.num_workers: expected \[MIN, MAX\] with "
                                      r"1 <= MIN <= MAX, got \[4, 2\]$"),
    (["parallel.num_workers=[0, 2]"], r"expected \[MIN, MAX\] with 1 <= MIN <= MAX, got \[0, 2\]"),
    (["parallel.num_workers=[1, 2, 3]"], r"^parallel\.num_workers: expected int or \[int, int\], "
                                         r"got \[1, 2, 3\]$"),
    (["parallel.num_workers=0"], r"^parallel\.num_workers: expected a number >= 1 or \[MIN, MAX\]"),
    (["parallel.num_workers=[3, 8]"], r"^parallel\.num_workers: MIN=3 workers cannot keep the global "
                                      r"batch: its 8 micro-batches \(train\.global_batch / "
                                      r"train\.micro_batch = 16 / 2\) do not split evenly over 3"),
    (["train.max_failures=-2"], r"^train\.max_failures: must be >= 0, or -1 for no limit, got -2$"),
    (["train.max_preemptions=-3"], r"^train\.max_preemptions: must be >= 0, or -1 for no limit, got -3$"),
    (["parallel.resize_check_seconds=0"], r"^parallel\.resize_check_seconds: must be > 0"),
    (["train.checkpoint_every_minutes=-1"], r"^train\.checkpoint_every_minutes: must be >= 0"),
])
def test_bad_elastic_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        elastic(*overrides)


def test_an_elastic_group_restarts_only_for_a_new_layout():
    """[2, 4] workers and 4 micro-batches a step: 3 workers train as 2 do. As nodes of one
    worker join one at a time, Ray's own policy starts the group at 2 and restarts it at 3
    and at 4; raymoe's at 2 and 4 only, and a group of exactly the workers that train (none
    idles). The controller's calls are simulated (raymoe.train.scaling.group_starts)."""
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy
    from ray.train.v2.api.config import ScalingConfig

    from raymoe.train.scaling import LayoutScalingPolicy, group_starts, trained_workers

    cfg = elastic("parallel.num_workers=[2, 4]", "train.global_batch=8")
    assert trained_workers(cfg) == {2: 2, 3: 2, 4: 4}

    def scaling() -> ScalingConfig:
        return ScalingConfig(num_workers=(2, 4), resources_per_worker={"CPU": 1})

    assert group_starts(ElasticScalingPolicy(scaling()), [1, 2, 3, 4]) == [2, 3, 4]
    ours = LayoutScalingPolicy(scaling(), trained_workers(cfg), "raymoe/resize/test")
    assert group_starts(ours, [1, 2, 3, 4]) == [2, 4]  # its grow's checkpoint: the next test


def test_a_grow_waits_for_the_groups_checkpoint(monkeypatch):
    """The policy asks the running group for a checkpoint (a request id in Ray's key-value
    store, here a dict) and grows once the group's record says that request's checkpoint
    is in storage, or after its timeout; a request the cluster no longer backs is withdrawn."""
    import json

    from ray.train.v2.api.config import ScalingConfig

    import raymoe.train.scaling as scaling

    store: dict[bytes, bytes] = {}
    monkeypatch.setattr(scaling, "_internal_kv_put", lambda k, v, overwrite: store.__setitem__(k, v))
    monkeypatch.setattr(scaling, "_internal_kv_get", store.get)
    monkeypatch.setattr(scaling, "_internal_kv_del", store.pop)
    now = [1000.0]
    policy = scaling.LayoutScalingPolicy(ScalingConfig(num_workers=(2, 4)), {2: 2, 3: 2, 4: 4},
                                         "raymoe/resize/run", clock=lambda: now[0])
    request_key = b"raymoe/resize/run/grow"

    def ready_for(request: str) -> None:
        store[b"raymoe/resize/run"] = json.dumps({"saved": {}, "ready_for": request}).encode()

    assert not policy._saved_for_grow()
    request = store[request_key].decode()  # asked
    ready_for("an older request")
    assert not policy._saved_for_grow()
    ready_for(request)
    assert policy._saved_for_grow() and request_key not in store
    assert not policy._saved_for_grow() and request_key in store  # the next grow asks anew
    policy._withdraw()  # the cluster no longer backs it
    assert request_key not in store and policy.request is None
    assert not policy._saved_for_grow()
    now[0] += scaling.GROW_SAVE_TIMEOUT_SECONDS + 1
    assert policy._saved_for_grow()  # a group that never saves is grown all the same
