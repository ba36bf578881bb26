"""Whether a worker group fits, whether the cluster can grow, waiting for it with a line
every few seconds, and where the study's evaluation actors go (on the session's real
local Ray cluster: one node of 4 CPUs, a fixed cluster)."""

from __future__ import annotations

import pytest

from raymoe.train import capacity
from raymoe.train.capacity import ClusterTooSmallError, WorkerGroupDemand, worker_group_capacity


def test_a_worker_lies_on_one_node():
    demand = WorkerGroupDemand(workers=4, cpus_per_worker=2)
    assert demand.placeable([{"CPU": 3}, {"CPU": 3}]) == 2  # a CPU left on each, not a worker
    assert demand.placeable([{"CPU": 8}]) == 4
    assert demand.placeable([{"CPU": 16}, {"CPU": 4}]) == 4  # never more than asked
    assert demand.placeable([{}, {"CPU": 0.5}]) == 0
    gpus = WorkerGroupDemand(workers=16, cpus_per_worker=8, gpus_per_worker=1)
    assert gpus.placeable([{"CPU": 96, "GPU": 8}, {"CPU": 96, "GPU": 8}, {"CPU": 16}]) == 16
    assert gpus.placeable([{"CPU": 96, "GPU": 8}, {"CPU": 16}]) == 8
    assert gpus.describe([{"CPU": 16}]) == (
        "the worker group needs 128 CPU, 16 GPU (16 workers x 8 CPU + 1 GPU); 0 of 16 workers "
        "fit on the cluster's 1 node(s) with 16 CPU, 0 GPU")


def test_an_autoscaler_is_told_from_the_mirror_of_a_fixed_cluster(monkeypatch, ray_cluster):
    """The status of a cluster-launcher autoscaler (AWS, which cannot run here) is given;
    the fixed cluster's is the real one of the session's cluster."""
    assert not capacity.cluster_can_grow()
    aws = {"autoscaler_report": {"active_nodes": {"head_cpu": 1}, "pending_launches": {"gpu_p4d": 2},
                                 "pending_nodes": [["10.0.0.7", "gpu_p4d", "setting-up"]]}}
    monkeypatch.setattr(capacity, "_autoscaler_status", lambda: aws)
    assert capacity.cluster_can_grow()
    assert capacity.pending_nodes() == "2 gpu_p4d launching, 1 node(s) starting"
    fixed = {"autoscaler_report": {"active_nodes": {"node_5f2a": 1, "node_77c1": 1}}}
    monkeypatch.setattr(capacity, "_autoscaler_status", lambda: fixed)
    assert not capacity.cluster_can_grow()


def test_waiting_says_what_is_missing_and_gives_up_after_the_timeout(ray_cluster):
    lines: list[str] = []
    demand = WorkerGroupDemand(workers=16, cpus_per_worker=1)
    with pytest.raises(ClusterTooSmallError, match=r"needs 16 CPU \(16 workers x 1 CPU\); 4 of 16 "
                                                   r"workers fit .*, still after waiting 1 s"):
        with worker_group_capacity(demand, "wait", timeout=1, log=lines.append, poll=0.2):
            pass
    assert lines and lines[0].startswith("waiting 0/1 s: the worker group needs 16 CPU")
    with pytest.raises(ClusterTooSmallError, match=r"\(--no-wait\)"):
        with worker_group_capacity(demand, "no-wait"):
            pass
    entered = []
    with worker_group_capacity(WorkerGroupDemand(2, 1), "no-wait"):
        entered.append(True)
    assert entered


def test_the_evaluation_goes_to_nodes_that_can_hold_the_model(ray_cluster):
    import ray

    from raymoe.eval.runner import EvalCapacityError, node_placements

    node = next(n for n in ray.nodes() if n["Alive"])
    assert node_placements("ckpt", need=2**20) == [(node["NodeID"], 4)]
    assert node_placements("ckpt", need=2**20, max_nodes=1) == [(node["NodeID"], 4)]
    have = node["Resources"]["memory"] / 2**30
    with pytest.raises(EvalCapacityError, match=rf"ckpt: evaluating needs about 1024.0 GiB in one "
                                                rf"process .* the largest of the cluster's 1 node\(s\) "
                                                rf"with CPUs offers {have:.1f} GiB of Ray memory"):
        node_placements("ckpt", need=2**40)


def test_a_study_evaluates_a_moe_model_at_the_smallest_ep_size_its_ranks_fit():
    from raymoe.config import load_config
    from raymoe.eval.runner import EvalCapacityError, expert_parallel_size, inference_bytes

    manifest = {"uri": "ckpt", "extra": {"config": load_config("tiny-moe8").to_dict()}}
    whole, half, eighth = (inference_bytes(manifest, ep) for ep in (1, 2, 8))
    assert whole > half > eighth
    assert expert_parallel_size(manifest, [whole]) == 1
    assert expert_parallel_size(manifest, [whole - 1, whole - 1]) == 2  # a rank on each node
    assert expert_parallel_size(manifest, [whole - 1, half]) == 2
    assert expert_parallel_size(manifest, [half - 1] * 8) == 4
    with pytest.raises(EvalCapacityError, match="ckpt: no expert-parallel size fits this cluster: even at EP 8"):
        expert_parallel_size(manifest, [eighth - 1] * 16)
