"""Dollars per run and per billion tokens at the cluster YAML's instance price."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from raymoe.config import Config
from raymoe.plan.hardware import HARDWARE, Hardware, PlanError
from raymoe.plan.timing import TimeEstimate

INSTANCE_PRICES = {
    "p4d.24xlarge": 32.77,
    "p4de.24xlarge": 40.97,
    "p5.48xlarge": 55.04,
    "p5en.48xlarge": 63.30,
}
"""On-demand USD per hour in us-east-1 (AWS list prices of 2025; pass your own with
--price-per-hour)."""

CLUSTER_YAML = Path(__file__).resolve().parents[2] / "cluster" / "aws.yaml"


@dataclass(frozen=True)
class CostEstimate:
    instance: str
    price_per_hour: float
    nodes: int
    run_hours: float
    run_cost: float
    cost_per_billion_tokens: float
    source: str


def cluster_instance(path: Path = CLUSTER_YAML) -> str | None:
    """The instance type of the cluster YAML's GPU worker nodes (the first that has GPUs)."""
    if not path.is_file():
        return None
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise PlanError(f"{path}: not valid YAML: {err}") from err
    for node in (raw.get("available_node_types") or {}).values():
        if (node.get("resources") or {}).get("GPU"):
            return node.get("node_config", {}).get("InstanceType")
    return None


def estimate_cost(cfg: Config, hw: Hardware, time: TimeEstimate, cluster_yaml: Path = CLUSTER_YAML,
                  price_per_hour: float | None = None) -> CostEstimate:
    """Run cost at the cluster YAML's instance when it carries this GPU, else at the
    instance that does."""
    instance = cluster_instance(cluster_yaml)
    source = f"{cluster_yaml.name} provisions {instance}"
    if instance is None or HARDWARE.get(hw.name, hw).instance != instance:
        source = (f"{hw.name} comes on {hw.instance}" +
                  (f" ({cluster_yaml.name} provisions {instance})" if instance else ""))
        instance = hw.instance
    if price_per_hour is None:
        if instance not in INSTANCE_PRICES:
            raise PlanError(f"no price known for {instance}: pass --price-per-hour")
        price_per_hour = INSTANCE_PRICES[instance]
        source += f", on-demand ${price_per_hour:.2f}/h (us-east-1 list price)"
    else:
        source += f", ${price_per_hour:.2f}/h as given"
    nodes = math.ceil(cfg.parallel.max_workers / hw.gpus_per_node)
    tokens = cfg.train.total_tokens
    hours = tokens / time.tokens_per_second / 3600
    cost = hours * nodes * price_per_hour
    return CostEstimate(instance, price_per_hour, nodes, hours, cost, cost / (tokens / 1e9), source)
