"""The cluster definitions: Ray's own schema and config validation for the cluster YAML,
the KubeRay manifests' field layout, and that the reference runs fit the cluster."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from raymoe.config import PRESETS, load_config
from raymoe.train.layout import plan_layout

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
    assert par.use_gpu and par.elastic and par.max_workers <= gpu_capacity_aws()
    for size in (par.min_workers, par.max_workers):  # both ends train, at EP 64 or 128
        layout = plan_layout(cfg, size)
        assert layout.workers == size and not layout.skipped
        if moe.enabled:
            assert layout.ep_size in (64, 128)


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


GPU_GROUPS = ("gpu_p4d", "gpu_p4d_spot")


def test_every_p4d_group_has_four_efa_interfaces_that_ray_accepts():
    """The p4d's four network cards each get an EFA interface, with the subnet and group
    Ray's AWS provider takes from them (its own function; `ray up` itself needs AWS)."""
    from ray.autoscaler._private.aws.config import (
        _configure_subnets_and_groups_from_network_interfaces,
    )

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for group in GPU_GROUPS:
        node = copy.deepcopy(raw["available_node_types"][group]["node_config"])
        interfaces = node["NetworkInterfaces"]
        assert [(i["NetworkCardIndex"], i["InterfaceType"]) for i in interfaces] == \
            [(card, "efa") for card in range(4)], group
        assert [i["DeviceIndex"] for i in interfaces] == [0, 1, 1, 1]
        configured = _configure_subnets_and_groups_from_network_interfaces(node)
        assert configured["SubnetIds"] and configured["SecurityGroupIds"]
        assert node["Placement"] == {"GroupName": "raymoe-nccl"}
    broken = copy.deepcopy(raw["available_node_types"]["gpu_p4d"]["node_config"])
    del broken["NetworkInterfaces"][2]["SubnetId"]
    with pytest.raises(ValueError, match="missing a subnet"):
        _configure_subnets_and_groups_from_network_interfaces(broken)


def test_the_image_carries_efa_and_the_containers_may_pin_memory():
    """Not buildable here (no registry, no GPU): the fields that make NCCL use EFA."""
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-cu\d+$", dockerfile, re.M)
    assert "efa_installer.sh -y --skip-kmod" in dockerfile  # libfabric, no kernel module
    assert "aws-ofi-nccl" in dockerfile and "--with-libfabric=/opt/amazon/efa" in dockerfile
    assert "pip install --no-cache-dir torch==2.13.0" in dockerfile
    assert "/opt/aws-ofi-nccl/lib" in dockerfile  # where NCCL finds the plugin
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    options = raw["docker"]["run_options"]
    assert "--ulimit memlock=-1:-1" in options and "--cap-add=IPC_LOCK" in options
    assert "--device=/dev/infiniband" in options and raw["docker"]["image"].endswith(":2.60.0-efa")


def test_the_jobs_get_the_efa_environment():
    from raymoe.jobs import read_env_file

    env = read_env_file(str(CLUSTER / "efa.env"))
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_NET_PLUGIN"] == "ofi"
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"] == env


def test_kuberay_workers_have_shared_memory_and_may_pin_memory():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    for group in cluster["spec"]["workerGroupSpecs"]:
        pod = group["template"]["spec"]
        container = pod["containers"][0]
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        if "nvidia.com/gpu" in container["resources"]["limits"]:
            assert container["resources"]["limits"]["vpc.amazonaws.com/efa"] == "4"
            assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
            assert container["image"].endswith(":2.60.0-efa")
