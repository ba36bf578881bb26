"""The cluster definitions: Ray's own schema and config validation for the cluster YAML,
the KubeRay manifests' field layout, and that the reference runs fit the cluster."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from raymoe.config import PRESETS, load_config
from raymoe.jobs import read_env_file
from raymoe.train import network
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
    assert raw["docker"]["image"].endswith(":2.60.0-efa")
    for group in GPU_GROUPS:  # the EFA devices, on the nodes that have them alone
        assert "--device=/dev/infiniband" in raw["available_node_types"][group]["docker"]["worker_run_options"]
    assert "--device=/dev/infiniband" not in options


DLAMI = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
NEWEST_CUDA_OF_THE_AMIS_DRIVER = (12, 8)
"""The driver branch the AMI series carries (570 or later) runs CUDA up to 12.8."""


def test_every_node_boots_the_pinned_gpu_image_whose_driver_runs_the_images_cuda():
    """Ray's default image (an Ubuntu 18.04 Deep Learning AMI) never replaces ours, and the
    Docker image's CUDA is one the AMI's driver runs: a newer CUDA needs a newer AMI."""
    from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami

    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    _check_ami(raw)
    for name, node in raw["available_node_types"].items():
        assert node["node_config"]["ImageId"] == DLAMI, name
        assert node["node_config"]["ImageId"] not in DEFAULT_AMI.values()
    cuda = re.search(r"^FROM rayproject/ray:\S+-cu(\d+)(\d)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    assert cuda and (int(cuda[1]), int(cuda[2])) <= NEWEST_CUDA_OF_THE_AMIS_DRIVER, \
        "the image's CUDA needs a newer driver than the AMI named in cluster/aws.yaml is known to carry"


NVME = "/mnt/nvme"


def _volumes(options: list[str]) -> dict[str, str]:
    """-v HOST:CONTAINER options, as {container path: host path}."""
    pairs = [option.split(None, 1)[1].split(":")[:2] for option in options if option.startswith("-v ")]
    return {container: host for host, container in pairs}


def test_the_presets_stage_checkpoints_on_the_nvme_that_every_gpu_node_mounts():
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    for preset in REFERENCE:
        staging = Path(load_config(preset).train.checkpoint_staging)
        assert staging.is_relative_to(NVME), preset
        for group in GPU_GROUPS:
            node = raw["available_node_types"][group]
            assert _volumes(node["docker"]["worker_run_options"])[NVME] == NVME, group
            assert len(node["initialization_commands"]) == 1 and NVME in node["initialization_commands"][0]


def _fake(bin_dir: Path, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


DISKS = [f"/dev/nvme{i}n1" for i in range(1, 9)]
EBS = "/dev/nvme0n1 Amazon Elastic Block Store"


@pytest.mark.parametrize("case", ["fresh", "assembled and mounted", "no instance store", "mounted"])
def test_the_nvme_setup_builds_the_raid_once_and_keeps_what_is_there(tmp_path, case):
    """The GPU nodes' initialization command, run by bash against fake block devices (lsblk,
    findmnt, mountpoint) and a sudo that only records: nothing touches this machine."""
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    script = raw["available_node_types"]["gpu_p4d"]["initialization_commands"][0]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    disks = "\n".join([EBS] + [f"{d} Amazon EC2 NVMe Instance Storage" for d in DISKS])
    tree = "\n".join(f"{d} disk" for d in DISKS)
    if case == "assembled and mounted":  # a reboot, or an AMI that builds the array itself
        tree += "\n/dev/md127 raid0"
    _fake(bin_dir, "lsblk", f"""case "$*" in *-d*) printf '%s\\n' "{EBS if case == 'no instance store' else disks}";;
                               *) printf '%s\\n' "{tree}";; esac""")
    _fake(bin_dir, "findmnt", "echo /opt/dlami/nvme" if case == "assembled and mounted" else "true")
    _fake(bin_dir, "mountpoint", "exit 0" if case == "mounted" else "exit 1")
    _fake(bin_dir, "sudo", f'echo "$*" >> {tmp_path}/sudo.log')
    subprocess.run(["bash", "-c", script], check=True, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    log = (tmp_path / "sudo.log").read_text().splitlines() if (tmp_path / "sudo.log").exists() else []
    expected = {
        "fresh": [f"mkdir -p {NVME}",
                  f"mdadm --create /dev/md0 --run --force --level=0 --raid-devices=8 {' '.join(DISKS)}",
                  "mkfs.ext4 -q -F /dev/md0", f"mount /dev/md0 {NVME}", f"chmod 1777 {NVME}"],
        "assembled and mounted": [f"mkdir -p {NVME}", f"mount --bind /opt/dlami/nvme {NVME}", f"chmod 1777 {NVME}"],
        "no instance store": [f"mkdir -p {NVME}", f"chmod 1777 {NVME}"],  # on the root volume
        "mounted": [],
    }
    assert log == expected[case]


def test_every_worker_starts_ray_with_the_efa_environment(tmp_path):
    """The workers' start commands, run by bash with a fake `ray` that records its
    environment (Ray's worker processes inherit it) and the home Ray's file_mounts fill."""
    raw = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    env = read_env_file(str(CLUSTER / "efa.env"))
    assert env["FI_PROVIDER"] == "efa" and env["FI_EFA_USE_DEVICE_RDMA"] == "1"
    assert env["NCCL_NET_PLUGIN"] == "ofi"
    for remote, local in raw["file_mounts"].items():  # ray up runs in the repository's root
        if not local.startswith("~"):
            shutil.copy(CLUSTER.parent / local, tmp_path / remote.removeprefix("~/"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake(bin_dir, "ray", f'env > {tmp_path}/ray-env')
    for command in raw["worker_start_ray_commands"]:
        subprocess.run(["bash", "-c", command], check=True, stderr=subprocess.DEVNULL,
                       env={"HOME": str(tmp_path), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    started = dict(line.split("=", 1) for line in (tmp_path / "ray-env").read_text().splitlines() if "=" in line)
    assert started.items() >= {**env, "RAY_AUTH_MODE": "token"}.items()


def test_kuberay_gpu_workers_have_the_efa_environment():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    group = next(g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu-a100")
    container = group["template"]["spec"]["containers"][0]
    given = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert given.items() >= read_env_file(str(CLUSTER / "efa.env")).items()
    assert {"name": "nvme", "mountPath": NVME} in container["volumeMounts"]


P4D_EFA = ["rdmap16s27", "rdmap32s27", "rdmap144s27", "rdmap160s27"]


@pytest.fixture
def p4d(tmp_path):
    """A p4d as a container sees it: a fake sysfs (four EFA adapters and a non-EFA RDMA
    device) and /dev/infiniband. Mocking AWS hardware is what this test is for."""
    sys_ib, dev_ib = tmp_path / "sys", tmp_path / "dev"
    for name in [*P4D_EFA, "mlx5_0"]:
        (sys_ib / name).mkdir(parents=True)
    dev_ib.mkdir()
    for i in range(4):
        (dev_ib / f"uverbs{i}").touch()
    return sys_ib, dev_ib


def test_a_node_set_up_for_efa_gets_no_warning(p4d):
    tried = []

    def plugin_loads(names):
        tried.append(names)
        return names[0] == "libnccl-net-ofi.so"

    assert network.efa_warning(*p4d, read_env_file(str(CLUSTER / "efa.env")), plugin_loads) is None
    assert tried == [["libnccl-net-ofi.so", "ofi"]]


@pytest.mark.parametrize("env,plugin_loads,says", [
    ({}, True, "FI_PROVIDER is unset, not efa"),
    ({"FI_PROVIDER": "tcp"}, True, "FI_PROVIDER is tcp, not efa"),
    ({"FI_PROVIDER": "efa", "NCCL_NET": "Socket"}, True, "NCCL_NET=Socket"),
    ({"FI_PROVIDER": "efa"}, False, "NCCL's network plugin libnccl-net.so does not load"),
])
def test_a_node_with_efa_that_nccl_will_not_use_says_why(p4d, env, plugin_loads, says):
    line = network.efa_warning(*p4d, env, lambda names: plugin_loads)
    assert line and says in line
    assert line.startswith(f"4 EFA adapters ({', '.join(sorted(P4D_EFA))}), but NCCL falls back to TCP")


def test_a_container_without_the_efa_devices_is_named(p4d):
    sys_ib, dev_ib = p4d
    shutil.rmtree(dev_ib)
    line = network.efa_warning(sys_ib, dev_ib, {"FI_PROVIDER": "efa"}, lambda names: True)
    assert line and "--device=/dev/infiniband" in line and "FI_PROVIDER" not in line


def test_a_node_without_efa_gets_no_warning(tmp_path):
    (tmp_path / "sys" / "mlx5_0").mkdir(parents=True)
    for sys_ib in (tmp_path / "sys", tmp_path / "none"):
        assert network.efa_warning(sys_ib, tmp_path / "dev", {}, lambda names: False) is None


def test_the_plugin_check_loads_libraries_as_nccl_does():
    assert not network.library_loads(["libnccl-net-raymoe-absent.so"])
    assert network.library_loads(["libnccl-net-raymoe-absent.so", "libc.so.6"])


def test_the_warning_names_the_node(p4d, monkeypatch):
    monkeypatch.setattr(network, "SYS_INFINIBAND", p4d[0])
    monkeypatch.setattr(network, "DEV_INFINIBAND", p4d[1])
    monkeypatch.delenv("FI_PROVIDER", raising=False)
    warnings: list[str] = []
    network.warn_without_efa(warnings.append)
    assert len(warnings) == 1 and re.match(r"node \S+: 4 EFA adapters", warnings[0])


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
