"""The cluster definitions: Ray's own schema and config validation for the cluster YAML,
the KubeRay manifests' field layout, and that the reference runs fit the cluster."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from raymoe.config import PRESETS, load_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REFERENCE = [p for p in PRESETS if not p.startswith("tiny")]


def test_aws_cluster_yaml_passes_rays_schema_and_validation():
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)
    validate_config(prepare_config(copy.deepcopy(raw)))
    broken = copy.deepcopy(raw)  # the validation does catch mistakes
    broken["head_node_type"] = "head"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["gpu_p4d"]["gpus"] = 8
    with pytest.raises(jsonschema.ValidationError, match="'gpus' was unexpected"):
        jsonschema.validate(broken, schema)


def test_aws_cluster_is_closed_and_keyless():
    text = (CLUSTER / "aws.yaml").read_text()
    raw = yaml.safe_load(text)
    head_start = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws_secret_access_key" not in text
    assert raw["available_node_types"]["head_cpu"]["resources"] == {"CPU": 0}


def gpu_capacity_aws() -> int:
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    node = raw["available_node_types"]["gpu_p4d"]
    return node["max_workers"] * node["resources"]["GPU"]


def gpu_capacity_kuberay() -> int:
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-a100")
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return group["maxReplicas"] * int(limits["nvidia.com/gpu"])


@pytest.mark.parametrize("preset", REFERENCE)
def test_reference_runs_fit_the_clusters(preset):
    cfg = load_config(preset)
    par, moe = cfg.parallel, cfg.model.moe
    assert gpu_capacity_aws() == gpu_capacity_kuberay() == 128
    assert par.use_gpu and par.num_workers <= gpu_capacity_aws()
    assert par.num_workers % par.ep_size == 0
    if moe.enabled:
        assert moe.num_experts % par.ep_size == 0 and par.ep_size in (64, 128)
    assert cfg.train.global_batch % (cfg.train.micro_batch * par.num_workers) == 0


def test_kuberay_manifests_have_the_expected_layout():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
        assert container["resources"]["limits"] == container["resources"]["requests"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert "python -m raymoe.cli train jobs/configs/gpt-1.3b-moe128.yaml" in job["spec"]["entrypoint"]
